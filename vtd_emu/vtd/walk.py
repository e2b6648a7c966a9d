"""Page walks: second stage (legacy and scalable), first stage (IA-32e, 4/5 levels) and nested.

Hot path.  Faults are returned as int reason codes, successes as small tuples; nothing is allocated per
level except an optional trace entry (``trace`` is None unless a caller such as ``vtd-emu walk`` wants
to see every entry).  Entry layouts come compiled from ``specs/structures.yaml`` as :class:`Geometry`.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from dataclasses import dataclass
from typing import Callable

from ..memory import HostRAM
from ..spec import specs
from ..spec.consts import FR, FS_PDE_2M, FS_PTE, SS_PDE_2M, SS_PTE
from .access import ALL_REQ, EXEC, PRIV, READ, REQ_SUP, REQ_USER, REQ_W, REQ_X, WRITE

ADDR_MASK = FS_PTE.ADDR
"""Bits 51:12 of a table entry: the next table (its bits at or above HAW are reserved, so checked)."""

TraceEntry = tuple[str, int, int, int]
"""(structure name, level, address the entry was read from, entry value)"""

SS_NAMES = {5: ("ss_pml5e", None), 4: ("ss_pml4e", None), 3: ("ss_pdpe", "ss_pdpe_1g"),
            2: ("ss_pde", "ss_pde_2m"), 1: (None, "ss_pte")}
FS_NAMES = {5: ("fs_pml5e", None), 4: ("fs_pml4e", None), 3: ("fs_pdpe", "fs_pdpe_1g"),
            2: ("fs_pde", "fs_pde_2m"), 1: (None, "fs_pte")}


@dataclass(frozen=True, slots=True)
class Geometry:
    """Per-level masks of one stage for one configuration (index = level, 1..5)."""

    rsvd_table: tuple[int, ...]
    rsvd_leaf: tuple[int, ...]
    leaf_addr: tuple[int, ...]
    large_ok: tuple[bool, ...]

    @staticmethod
    def compile(stage: str, features: frozenset[str], haw: int, large: tuple[bool, bool],
                extra_rsvd: dict[str, int] | None = None, drop_rsvd: int = 0) -> "Geometry":
        """``large`` = (2 MiB leaves allowed, 1 GiB leaves allowed); ``extra_rsvd``/``drop_rsvd`` adjust
        the spec's masks for quirk profiles."""
        names = SS_NAMES if stage == "ss" else FS_NAMES
        sp = specs()
        rt, rl, la = [0] * 6, [0] * 6, [0] * 6
        extra = extra_rsvd or {}
        for lvl, (tname, lname) in names.items():
            if tname:
                lay = sp.structure(tname)
                rt[lvl] = (lay.reserved_mask(features, haw) | extra.get(tname, 0)) & ~drop_rsvd
            if lname:
                lay = sp.structure(lname)
                rl[lvl] = (lay.reserved_mask(features, haw) | extra.get(lname, 0)) & ~drop_rsvd
                la[lvl] = lay.field("ADDR").mask & ((1 << haw) - 1)
        ok = (False, True, large[0], large[1], False, False)
        return Geometry(tuple(rt), tuple(rl), tuple(la), ok)


# Fault codes of one second-stage context: (top-level read error, lower read error, read denied,
# write denied, reserved bits, execute denied)
SS_CODES_LEGACY = (FR.CONTEXT_ENTRY_INV, FR.PAGING_ENTRY_INV, FR.READ, FR.WRITE, FR.PAGING_ENTRY_RSVD, FR.READ)
SS_CODES_SM = (FR.SM_SSPTPTR_INV, FR.SM_SS_READ_ERR, FR.SM_SS_ENTRY_NP, FR.SM_SS_ENTRY_NP, FR.SM_SS_ENTRY_RSVD,
               FR.SM_EXEC_DENIED)

# Entry bits the walkers test and set (the same in every level's layout: the 4 KiB leaf's names)
SS_A, SS_D, SS_PS = SS_PTE.A, SS_PTE.D, SS_PDE_2M.PS
FS_P, FS_A, FS_D, FS_EA, FS_PS = FS_PTE.P, FS_PTE.A, FS_PTE.D, FS_PTE.EA, FS_PDE_2M.PS
FS_RW_LO, FS_US_LO, FS_XD_LO = FS_PTE.RW_LO, FS_PTE.US_LO, FS_PTE.XD_LO
_FS_READ_ERR, _FS_ROOT_READ_ERR, _FS_ENTRY_P = FR.SM_FS_READ_ERR, FR.SM_FSPTPTR_READ_ERR, FR.SM_FS_ENTRY_P
_FS_ENTRY_RSVD, _NESTED_AD_DENIED, _FS_AD_WRITE_FAIL = FR.SM_FS_ENTRY_RSVD, FR.SM_NESTED_FS_AD_SS_DENIED, FR.SM_FS_AD_WRITE_FAIL
_US_CLEAR, _SM_WRITE, _EXEC_DENIED = FR.SM_US_CLEAR, FR.SM_WRITE, FR.SM_EXEC_DENIED

SsResult = tuple[int, int, int]
"""(output base aligned to the leaf, log2 of the leaf size, perm: R=1 W=2 X=4, DIRTY_OK=8)"""
DIRTY_OK = 8


def ss_walk(rd: Callable[[int], int], wr: Callable[[int, int], bool] | None, root: int, levels: int,
            iova: int, req: int, geo: Geometry, codes: tuple[int, ...], psc: OrderedDict[int, tuple[int, int]] | None,
            psc_tag: int, psc_limit: int, trace: list[TraceEntry] | None) -> SsResult | int:
    """Walk second-stage tables from ``root``.  ``wr`` is given when A/D updates are enabled (SSADE)."""
    perm = 7
    lvl = levels
    table = root
    if psc is not None:
        for probe in range(2, levels + 1):
            hit = psc.get(((psc_tag << 3 | probe) << 56) | (iova >> (3 + 9 * probe)))
            if hit is not None:
                table, perm = hit
                lvl = probe - 1
                break
    touched: list[tuple[int, int]] | None = [] if wr is not None else None
    # READ, WRITE and EXEC request bits sit where the entry's R, W and X bits do: one mask test per level.
    need = req & 7
    rsvd_leaf, rsvd_table = geo.rsvd_leaf, geo.rsvd_table
    shift = 3 + 9 * lvl
    while True:
        ea = table | (((iova >> shift) & 0x1FF) << 3)
        e = rd(ea)
        if e < 0:
            return codes[0] if lvl == levels else codes[1]
        if trace is not None:
            trace.append(("ss", lvl, ea, e))
        p = e & 7
        perm &= p
        if (perm & need) != need or not p & 3:
            if not p & 3 or need & 3 & ~perm:
                return codes[3] if (req & WRITE and not perm & 2) else codes[2]
            return codes[5]
        if touched is not None:
            touched.append((ea, e))
        if lvl == 1 or (e & SS_PS and lvl <= 3):
            if e & rsvd_leaf[lvl] or not geo.large_ok[lvl]:
                return codes[4]
            dirty = DIRTY_OK
            if touched is not None and wr is not None:
                dirty = set_ad(wr, touched, SS_A, SS_D if req & WRITE else 0) and (e & SS_D or req & WRITE) and DIRTY_OK
            return (e & geo.leaf_addr[lvl], shift, perm | dirty)
        if e & rsvd_table[lvl]:
            return codes[4]
        table = e & ADDR_MASK
        if psc is not None and psc_limit:
            if len(psc) >= psc_limit:
                psc.popitem(last=False)
            psc[((psc_tag << 3 | lvl) << 56) | (iova >> shift)] = (table, perm)
        lvl -= 1
        shift -= 9


def ss_walk_ram(mem: HostRAM, ad: bool, root: int, levels: int, iova: int, req: int, geo: Geometry,
                codes: tuple[int, ...], psc: OrderedDict[int, tuple[int, int]] | None, psc_tag: int,
                psc_limit: int) -> SsResult | int:
    """:func:`ss_walk` over a :class:`HostRAM` with its reads inlined and no trace: the same result, cache
    fills and writes (``ad``: A/D updates enabled).  The cached miss path's walker; ``ss_walk`` stays the
    reference (``tests/test_speed_equivalence.py`` holds the two equal)."""
    perm = 7
    lvl = levels
    table = root
    if psc is not None:
        for probe in range(2, levels + 1):
            hit = psc.get(((psc_tag << 3 | probe) << 56) | (iova >> (3 + 9 * probe)))
            if hit is not None:
                table, perm = hit
                lvl = probe - 1
                break
    rows, q = mem.qword_rows()
    touched: list[tuple[int, int]] | None = [] if ad else None
    need = req & 7
    rsvd_table = geo.rsvd_table
    shift = 3 + 9 * lvl
    while True:
        ea = table | (((iova >> shift) & 0x1FF) << 3)
        row = rows(ea >> 12)
        if row is not None:
            e = q[(row << 9) | ((ea >> 3) & 511)]
        else:
            e = mem.read_u64(ea)
            if e < 0:
                return codes[0] if lvl == levels else codes[1]
        p = e & 7
        perm &= p
        if (perm & need) != need or not p & 3:
            if not p & 3 or need & 3 & ~perm:
                return codes[3] if (req & WRITE and not perm & 2) else codes[2]
            return codes[5]
        if touched is not None:
            touched.append((ea, e))
        if lvl == 1 or (e & SS_PS and lvl <= 3):
            if e & geo.rsvd_leaf[lvl] or not geo.large_ok[lvl]:
                return codes[4]
            dirty = DIRTY_OK
            if touched is not None:
                dirty = (set_ad(mem.write_u64, touched, SS_A, SS_D if req & WRITE else 0)
                         and (e & SS_D or req & WRITE) and DIRTY_OK)
            return (e & geo.leaf_addr[lvl], shift, perm | dirty)
        if e & rsvd_table[lvl]:
            return codes[4]
        table = e & ADDR_MASK
        if psc is not None and psc_limit:
            if len(psc) >= psc_limit:
                psc.popitem(last=False)
            psc[((psc_tag << 3 | lvl) << 56) | (iova >> shift)] = (table, perm)
        lvl -= 1
        shift -= 9


def set_ad(wr: Callable[[int, int], bool], touched: list[tuple[int, int]], a_bit: int, d_bit: int) -> bool:
    """Set ``a_bit`` in every entry used and ``d_bit`` in the leaf; False if a write failed."""
    last = len(touched) - 1
    for i, (ea, e) in enumerate(touched):
        want = e | a_bit | (d_bit if i == last else 0)
        if want != e and not wr(ea, want):
            return False
    return True


# First-stage request flags carried from the PASID entry
F_SRE, F_WPE, F_NXE, F_SMEP, F_ERE, F_EAFE = 1, 2, 4, 8, 16, 32


def fs_allowed(rw: int, us: int, xd: int, dirty: bool, flags: int) -> int:
    """Requests a first-stage leaf (accumulated R/W, U/S, XD) allows under the PASID entry's flags."""
    allowed = ALL_REQ
    if not us:
        allowed &= ~REQ_USER
    if not rw:
        allowed &= ~(REQ_W & REQ_USER)
        if flags & F_WPE:
            allowed &= ~REQ_W
    if not flags & F_SRE:
        allowed &= ~REQ_SUP
    if not flags & F_ERE or (xd and flags & F_NXE):
        allowed &= ~REQ_X
    if us and flags & F_SMEP:
        allowed &= ~(REQ_X & REQ_SUP)
    if not dirty:
        allowed &= ~REQ_W
    return allowed


def fs_denied_code(req: int, rw: int, us: int, flags: int) -> int:
    """The fault reason for a request ``fs_allowed`` refused (dirty aside): U/S, then write, then exec."""
    if not req & PRIV and not us:
        return _US_CLEAR
    if req & WRITE and not rw and (not req & PRIV or flags & F_WPE):
        return _SM_WRITE
    return _EXEC_DENIED


FsResult = tuple[int, int, int]
"""(output base aligned to the leaf, log2 of the leaf size, allowed-request mask)"""

TableXlate = Callable[[int, bool], "tuple[int, int] | int"]
"""Nested only: (table GPA, is it the FS root) → (table HPA, second-stage perm) or a fault code."""


def fs_walk(rd: Callable[[int], int], wr: Callable[[int, int], bool], root: int, levels: int, va: int,
            req: int, geo: Geometry, flags: int, psc: OrderedDict[int, tuple[int, int, int, int]] | None,
            psc_tag: int, psc_limit: int, trace: list[TraceEntry] | None,
            table_xlate: TableXlate | None = None) -> FsResult | int:
    """Walk first-stage (IA-32e) tables.  The caller has checked canonicality.  With ``table_xlate``
    (nested) every table pointer is a GPA translated through the second stage before it is read."""
    rw, us, xd = 1, 1, 0
    lvl = levels
    table = root
    if psc is not None:
        for probe in range(2, levels + 1):
            hit = psc.get(((psc_tag << 3 | probe) << 56) | ((va >> (3 + 9 * probe)) & ((1 << (54 - 9 * probe)) - 1)))
            if hit is not None:
                table, rw, us, xd = hit
                lvl = probe - 1
                break
    touched: list[tuple[int, int]] = []
    acc = -1  # AND of every entry used: tells at the leaf whether any A bit is still clear
    ss_ro = False  # nested: some FS table on the walk is read-only in the second stage
    while True:
        idx = ((va >> (3 + 9 * lvl)) & 0x1FF) << 3
        if table_xlate is not None:
            t = table_xlate(table, lvl == levels)
            if type(t) is int:
                return t
            ea = t[0] | idx  # type: ignore[index]
            if not t[1] & 2:  # type: ignore[index]
                ss_ro = True
        else:
            ea = table | idx
        e = rd(ea)
        if e < 0:
            return _FS_ROOT_READ_ERR if lvl == levels else _FS_READ_ERR
        if trace is not None:
            trace.append(("fs", lvl, ea, e))
        if not e & FS_P:
            return _FS_ENTRY_P
        touched.append((ea, e))
        acc &= e
        rw &= (e >> FS_RW_LO) & 1
        us &= (e >> FS_US_LO) & 1
        xd |= e >> FS_XD_LO
        if lvl == 1 or (e & FS_PS and lvl <= 3):
            if e & geo.rsvd_leaf[lvl] or not geo.large_ok[lvl]:
                return _FS_ENTRY_RSVD
            allowed = fs_allowed(rw, us, xd, True, flags)
            if not (allowed >> req) & 1:
                return fs_denied_code(req, rw, us, flags)
            a_bit = FS_A | (FS_EA if flags & F_EAFE else 0)
            d_bit = FS_D if req & WRITE else 0
            if (acc & a_bit) != a_bit or (e & d_bit) != d_bit:  # some A/EA/D bit still to set
                if ss_ro:
                    # A/D updates write the FS tables through the second stage, which must allow it.
                    return _NESTED_AD_DENIED
                if not set_ad(wr, touched, a_bit, d_bit):
                    return _FS_AD_WRITE_FAIL
            if not (e & FS_D or d_bit):
                allowed &= ~REQ_W  # a later write must walk again to set D
            return (e & geo.leaf_addr[lvl], 3 + 9 * lvl, allowed)
        if e & geo.rsvd_table[lvl]:
            return _FS_ENTRY_RSVD
        table = e & ADDR_MASK
        if psc is not None and psc_limit:
            if len(psc) >= psc_limit:
                psc.popitem(last=False)
            psc[((psc_tag << 3 | lvl) << 56) | ((va >> (3 + 9 * lvl)) & ((1 << (54 - 9 * lvl)) - 1))] = (table, rw, us, xd)
        lvl -= 1


def fs_walk_ram(mem: HostRAM, root: int, levels: int, va: int, req: int, geo: Geometry, flags: int,
                psc: OrderedDict[int, tuple[int, int, int, int]] | None, psc_tag: int, psc_limit: int,
                table_xlate: TableXlate | None = None) -> FsResult | int:
    """:func:`fs_walk` over a :class:`HostRAM` with its reads inlined and no trace: the same result, cache
    fills and A/D writes.  The cached miss path's walker; ``fs_walk`` stays the reference."""
    rw, us, xd = 1, 1, 0
    lvl = levels
    table = root
    if psc is not None:
        for probe in range(2, levels + 1):
            hit = psc.get(((psc_tag << 3 | probe) << 56) | ((va >> (3 + 9 * probe)) & ((1 << (54 - 9 * probe)) - 1)))
            if hit is not None:
                table, rw, us, xd = hit
                lvl = probe - 1
                break
    rows, q = mem.qword_rows()
    touched: list[tuple[int, int]] = []
    acc = -1
    ss_ro = False
    rsvd_table = geo.rsvd_table
    shift = 3 + 9 * lvl
    while True:
        if table_xlate is not None:
            t = table_xlate(table, lvl == levels)
            if type(t) is int:
                return t  # type: ignore[return-value]
            ea = t[0] | (((va >> shift) & 0x1FF) << 3)  # type: ignore[index]
            if not t[1] & 2:  # type: ignore[index]
                ss_ro = True
        else:
            ea = table | (((va >> shift) & 0x1FF) << 3)
        row = rows(ea >> 12)
        if row is not None:
            e = q[(row << 9) | ((ea >> 3) & 511)]
        else:
            e = mem.read_u64(ea)
            if e < 0:
                return _FS_ROOT_READ_ERR if lvl == levels else _FS_READ_ERR
        if not e & FS_P:
            return _FS_ENTRY_P
        touched.append((ea, e))
        acc &= e
        rw &= e >> FS_RW_LO
        us &= e >> FS_US_LO
        xd |= e >> FS_XD_LO
        if lvl == 1 or (e & FS_PS and lvl <= 3):
            if e & geo.rsvd_leaf[lvl] or not geo.large_ok[lvl]:
                return _FS_ENTRY_RSVD
            allowed = fs_allowed(rw, us, xd, True, flags)
            if not (allowed >> req) & 1:
                return fs_denied_code(req, rw, us, flags)
            a_bit = FS_A | (FS_EA if flags & F_EAFE else 0)
            d_bit = FS_D if req & WRITE else 0
            if (acc & a_bit) != a_bit or (e & d_bit) != d_bit:
                if ss_ro:
                    return _NESTED_AD_DENIED
                if not set_ad(mem.write_u64, touched, a_bit, d_bit):
                    return _FS_AD_WRITE_FAIL
            if not (e & FS_D or d_bit):
                allowed &= ~REQ_W
            return (e & geo.leaf_addr[lvl], shift, allowed)
        if e & rsvd_table[lvl]:
            return _FS_ENTRY_RSVD
        table = e & ADDR_MASK
        if psc is not None and psc_limit:
            if len(psc) >= psc_limit:
                psc.popitem(last=False)
            psc[((psc_tag << 3 | lvl) << 56) | ((va >> shift) & ((1 << (54 - 9 * lvl)) - 1))] = (table, rw, us, xd)
        lvl -= 1
        shift -= 9


def canonical(va: int, levels: int) -> bool:
    """IA-32e canonical form: bits 63:47 (4-level) or 63:56 (5-level) all equal."""
    top = va >> (47 if levels == 4 else 56)
    return top == 0 or top == (1 << (17 if levels == 4 else 8)) - 1


# -- generated walkers ---------------------------------------------------------------------------------
# The cached miss path over a HostRAM walks with functions generated per (stage, levels, geometry): the
# loop unrolled, every mask a literal, the entry checks of a level folded into one or two tests, and the
# permission logic of the first stage a table lookup.  They only decide the *common* outcome: a leaf whose
# walk needs no write (A/D bits already set) and faults nowhere.  For anything else they return None before
# any side effect, and the caller walks again with the loop walkers above, which produce the fault, the
# A/D writes or the cache fills exactly (tests/test_speed_equivalence.py holds the two paths equal).

QwordRows = Callable[[int], "int | None"]
SsFast = Callable[[QwordRows, memoryview, int, int, int, bool], "SsResult | None"]
"""(rows, q, root, iova, req, ad) → the :func:`ss_walk` result, or None: walk with the loop walker."""
FsFast = Callable[[QwordRows, memoryview, int, int, int, int], "FsResult | None"]
"""(rows, q, root, va, req, flags) → the :func:`fs_walk` result, or None: walk with the loop walker."""

_FS_ALLOWED = tuple(fs_allowed(i & 1, (i >> 1) & 1, (i >> 2) & 1, True, i >> 3) for i in range(64 * 8))
"""fs_allowed(rw, us, xd, True, flags) at index flags << 3 | xd << 2 | us << 1 | rw."""


def _read_lines(table: str, shift: int) -> list[str]:
    return [f"    row = rows({table} >> 12)",
            "    if row is None:",
            "        return None",
            f"    e = q[(row << 9) | ((va >> {shift}) & 511)]"]


def _guard(test: str, rsvd: int, large_ok: bool) -> list[str]:
    """A leaf's refusal: ``test``, reserved bits, or a leaf size the unit does not support."""
    if not large_ok:
        return ["        return None"]
    tests = [t for t in (test, f"e & {rsvd:#x}" if rsvd else "") if t]
    return [f"        if {' or '.join(tests)}:", "            return None"] if tests else []


def _ss_source(levels: int, geo: Geometry) -> str:
    out = ["def walk(rows, q, t, va, req, ad):"]
    for lvl in range(levels, 0, -1):
        out += _read_lines("t", 3 + 9 * lvl)
        out.append("    acc = e" if lvl == levels else "    acc &= e")
        leaf = _guard("not e & 3", geo.rsvd_leaf[lvl], geo.large_ok[lvl]) + [
                "        if (acc & req & 7) != req & 7:",
                "            return None",
                "        if not ad:",
                f"            return (e & {geo.leaf_addr[lvl]:#x}, {3 + 9 * lvl}, (acc & 7) | {DIRTY_OK})",
                f"        if not acc & {SS_A} or (req & {WRITE} and not e & {SS_D}):",
                "            return None",
                f"        return (e & {geo.leaf_addr[lvl]:#x}, {3 + 9 * lvl}, "
                f"(acc & 7) | ({DIRTY_OK} if e & {SS_D} or req & {WRITE} else 0))"]
        if lvl == 1:
            out.append("    if True:")
            out += leaf
            break
        if lvl <= 3:
            out.append(f"    if e & {SS_PS}:")
            out += leaf
        out += [f"    if not e & 3 or e & {geo.rsvd_table[lvl]:#x}:",
                "        return None",
                f"    t = e & {ADDR_MASK:#x}"]
    return "\n".join(out) + "\n"


def _fs_source(levels: int, geo: Geometry) -> str:
    out = ["def walk(rows, q, t, va, req, flags):"]
    for lvl in range(levels, 0, -1):
        out += _read_lines("t", 3 + 9 * lvl)
        out.append("    acc = orr = e" if lvl == levels else "    acc &= e\n    orr |= e")
        leaf = _guard("", geo.rsvd_leaf[lvl], geo.large_ok[lvl]) + [
                f"        allowed = ALLOWED[flags << 3 | (orr >> {FS_XD_LO - 2}) & 4 | (acc >> {FS_RW_LO}) & 3]",
                "        if not (allowed >> req) & 1:",
                "            return None",
                f"        a_bit = {FS_A | FS_EA} if flags & {F_EAFE} else {FS_A}",
                "        if acc & a_bit != a_bit:",
                "            return None",
                f"        if not e & {FS_D}:",
                f"            if req & {WRITE}:",
                "                return None",
                f"            allowed &= {~REQ_W & ALL_REQ:#x}",
                f"        return (e & {geo.leaf_addr[lvl]:#x}, {3 + 9 * lvl}, allowed)"]
        if lvl == 1:
            out += [f"    if not e & {FS_P}:", "        return None", "    if True:"]
            out += leaf
            break
        if lvl <= 3:
            out.append(f"    if e & {geo.rsvd_table[lvl] | FS_PS | FS_P:#x} != {FS_P}:")
            out += [f"        if e & {FS_PS | FS_P} != {FS_PS | FS_P}:", "            return None"]
            out += leaf
        else:
            out += [f"    if e & {geo.rsvd_table[lvl] | FS_P:#x} != {FS_P}:", "        return None"]
        out.append(f"    t = e & {ADDR_MASK:#x}")
    return "\n".join(out) + "\n"


@lru_cache(maxsize=64)
def ss_fast_walker(levels: int, geo: Geometry) -> SsFast:
    """The generated second-stage walker of ``levels`` levels under ``geo`` (see above)."""
    scope: dict[str, object] = {}
    exec(compile(_ss_source(levels, geo), f"<ss_fast_walker {levels}>", "exec"), scope)
    return scope["walk"]  # type: ignore[return-value]


@lru_cache(maxsize=64)
def fs_fast_walker(levels: int, geo: Geometry) -> FsFast:
    """The generated first-stage walker of ``levels`` levels under ``geo`` (see above)."""
    scope: dict[str, object] = {"ALLOWED": _FS_ALLOWED}
    exec(compile(_fs_source(levels, geo), f"<fs_fast_walker {levels}>", "exec"), scope)
    return scope["walk"]  # type: ignore[return-value]
