"""The translation chain: front memo → context cache → PASID cache → IOTLB → walk, fills and faults.

``xlate`` is the hot path used by DMA and replay: one front-memo dict probe and, on a miss, the chain in
:meth:`Translator.lookup`.  Faults travel as ints (:mod:`.entries`) until :meth:`Translator.report_fault`
records them (or FPD suppresses them); nothing here raises for anything a guest wrote.
"""

from __future__ import annotations

from typing import Callable

from ..memory import HostRAM
from ..spec.consts import FR
from .access import EXEC, NO_PASID, PRIV, READ, REQ_W, REQ_X, WRITE, describe, ss_allowed
from .caches import iotlb_key
from .entries import (CTX_LEGACY, DROPPED, FPD_SHIFT, INTR_HI, INTR_LO, KIND_NAMES, KIND_NESTED, KIND_FS, KIND_PT,
                      KIND_SS, PASID_SHIFT, PGTT_FS, PGTT_NESTED, PGTT_PT, PGTT_SS, REASON_MASK, TT_PT, WALK,
                      Context, IotlbEntry, PasidEntry)
from .faults import reason_name
from .lookup import StructureDecoder
from .results import Fault, Translation, allowed_text, request_bits
from .walk import (DIRTY_OK, F_ERE, F_SRE, SS_CODES_LEGACY, FsFast, FsResult, SsFast, SsResult, TraceEntry, canonical, fs_fast_walker,
                   fs_walk, fs_walk_ram, ss_fast_walker, ss_walk, ss_walk_ram)

_SM_RTA_INV, _SM_RTA_LEGACY_PASID = FR.SM_RTA_INV, FR.SM_RTA_LEGACY_PASID
_ADDR_BEYOND_MGAW, _INTERRUPT_ADDR, _SM_INTERRUPT_ADDR = FR.ADDR_BEYOND_MGAW, FR.INTERRUPT_ADDR, FR.SM_INTERRUPT_ADDR
_SM_PASIDE_CLEAR, _SM_SRE_CLEAR, _SM_ERE_CLEAR = FR.SM_PASIDE_CLEAR, FR.SM_SRE_CLEAR, FR.SM_ERE_CLEAR
_SM_BEYOND_HW_MAX, _SM_BEYOND_SS_MAX, _SM_EXEC_DENIED = FR.SM_BEYOND_HW_MAX, FR.SM_BEYOND_SS_MAX, FR.SM_EXEC_DENIED
_SM_NON_CANONICAL, _SM_SS_ENTRY_NP = FR.SM_NON_CANONICAL, FR.SM_SS_ENTRY_NP
_NESTED_BEYOND_SS, _NESTED_ROOT_DENIED = FR.SM_NESTED_FS_TABLE_BEYOND_SS, FR.SM_NESTED_FS_ROOT_SS_DENIED
_NESTED_TABLE_DENIED = FR.SM_NESTED_FS_TABLE_SS_DENIED
_FPD_BIT = 1 << FPD_SHIFT

_new_entry = object.__new__
_new_tuple = tuple.__new__
_SS_ALLOWED = tuple(ss_allowed(perm) for perm in range(8))
"""ss_allowed by second-stage permission bits (R=1, W=2, X=4), looked up instead of called per walk."""

_PLAIN_REQ = {"r": READ, "w": WRITE, "rw": READ | WRITE, "wr": READ | WRITE, "R": READ, "W": WRITE,
              "RW": READ | WRITE}
"""request_bits of the common ``access`` strings of requests without PASID, PRIV or EXEC."""

_DESCRIPTIONS: dict[int, tuple[int, str, str]] = {}
"""(page size, perms text, kind name) of a Translation by (allowed, kind, shift), built once each."""


def _describe(e: IotlbEntry) -> tuple[int, str, str]:
    key = (e.allowed << 8) | (e.kind << 6) | e.shift
    d = _DESCRIPTIONS.get(key)
    if d is None:
        d = _DESCRIPTIONS[key] = (1 << e.shift, allowed_text(e.allowed), KIND_NAMES[e.kind])
    return d


# IOTLB probes (size index, page mask) for each set of page sizes the IOTLB may hold (Caches.sizes_held)
_PROBES = [tuple((i, ~((1 << (12 + 9 * i)) - 1)) for i in range(4) if held >> i & 1) for held in range(16)]

Lookup = tuple[IotlbEntry, int] | int
"""(IOTLB entry, output address), or a fault int, or DROPPED."""


class Translator(StructureDecoder):
    """Translation of one request through the caches, filling them on the way."""

    _front_get: Callable[[int], tuple[int, IotlbEntry] | None]
    """``caches.front.get``, bound once: the memo dict is only ever cleared, never replaced."""
    _last_entry: IotlbEntry | None
    ss_fast: dict[int, SsFast]
    """Generated second-stage walkers by levels (``walk.ss_fast_walker``), for walks without a
    paging-structure cache."""
    fs_fast: dict[int, FsFast]
    fast_walk: bool = True
    """Walk a :class:`HostRAM` with the inlined walkers (``walk.ss_walk_ram``/``fs_walk_ram``); False makes
    every walk take the reference walkers, which ``tests/test_speed_equivalence.py`` compares against."""

    def compile_walkers(self) -> None:
        """Generate the fast walkers for the geometries ``compile_config`` derived."""
        self.ss_fast = {n: ss_fast_walker(n, self.ss_geo) for n in range(2, 6)}
        self.fs_fast = {n: fs_fast_walker(n, self.fs_geo) for n in (4, 5)}

    # -- public ------------------------------------------------------------------------------------
    def translate(self, sid: int, iova: int, access: str | int = "r", pasid: int | None = None,
                  priv: bool = False, exe: bool = False) -> Translation | Fault:
        """Translate one address as a DMA request would, updating caches and recording any fault.

        ``access`` is ``"r"``, ``"w"``, ``"rw"`` (AtomicOp) or the int bits READ=1 | WRITE=2."""
        req = _PLAIN_REQ.get(access) if not (priv or exe) and type(access) is str else None
        if req is None or (pasid is not None and not 0 <= pasid < NO_PASID):
            req = request_bits(access, priv, exe, pasid)
        ptag = NO_PASID if pasid is None else pasid
        # The front-memo probe of xlate, inlined: a hit then needs no second probe to find its entry.  Not
        # when xlate is shadowed on the instance (the sanitizer, the vIOMMU validator; as batch.py checks):
        # every translation, hits included, must go through the wrapper.
        hit = self._front_get((((sid << 21) | ptag) << 52) | (iova >> 12))
        if hit is not None and "xlate" not in self.__dict__:
            e = hit[1]
            if e.alive and (e.allowed >> req) & 1:
                d = _DESCRIPTIONS.get((e.allowed << 8) | (e.kind << 6) | e.shift)
                return _new_tuple(Translation, (hit[0] | (iova & 0xFFF),) + (d or _describe(e)))
        before = self.faults.recorded
        self._last_entry = None
        out = self.xlate(sid, ptag, iova, req)
        if out >= 0:
            filled = self._last_entry or self.front_entry(sid, ptag, iova)
            if filled is None:  # translation disabled, or a pass-through bypass
                return Translation(out, 4096, describe(req & 3), "untranslated")
            return _new_tuple(Translation, (out,) + _describe(filled))
        reason = -out if out != DROPPED else 0
        return Fault(reason, reason_name(reason) if reason else "DROPPED", iova, self.faults.recorded > before)

    def front_entry(self, sid: int, ptag: int, iova: int) -> IotlbEntry | None:
        """The IOTLB entry the front memo holds for this request's page, if any."""
        hit = self.caches.front.get((((sid << 21) | ptag) << 52) | (iova >> 12))
        return hit[1] if hit is not None else None

    # -- hot path ----------------------------------------------------------------------------------
    def xlate(self, sid: int, ptag: int, iova: int, req: int) -> int:
        """Output address (>= 0), ``-reason`` for a fault (already recorded or suppressed), or DROPPED."""
        hit = self._front_get((((sid << 21) | ptag) << 52) | (iova >> 12))
        if hit is not None:
            e = hit[1]
            if e.alive and (e.allowed >> req) & 1:
                return hit[0] | (iova & 0xFFF)
        return self._xlate_slow(sid, ptag, iova, req)

    def _xlate_slow(self, sid: int, ptag: int, iova: int, req: int) -> int:
        if not self.te or sid in self.pt_bypass:
            return iova
        if self.root_invalid:
            return self.report_fault(sid, ptag, iova, req, _SM_RTA_INV)
        r = self.lookup(sid, ptag, iova, req)
        if type(r) is int:
            if r == DROPPED:
                return DROPPED
            return self.report_fault(sid, ptag, iova, req, r)
        e, out = r  # type: ignore[misc]
        self._last_entry = e  # for translate(): the slow path is the only one that builds entries
        if e.alive and e.allowed and self.front_ok:
            self.caches.put_front((((sid << 21) | ptag) << 52) | (iova >> 12), out & ~0xFFF, e)
        return out

    # -- the chain -----------------------------------------------------------------------------------
    def lookup(self, sid: int, ptag: int, iova: int, req: int, trace: list | None = None) -> Lookup:
        """(IOTLB entry, output address) or a fault int (nothing recorded yet).  With ``trace``
        (inspection) every cache is bypassed and left untouched, and each structure read is appended to
        ``trace``."""
        c = self.caches
        q = self.quirks
        st = c.stats
        cached = trace is None
        if cached and q.iotlb_before_context and not self.root_scalable:
            hitr = self.probe_iotlb(sid, 0, iova, req)
            if hitr is not None:
                return hitr
        # The context and PASID cache probes of context_entry/pasid_entry, inlined: every miss pays them.
        ctx: Context | int | None = c.context.get(sid) if cached else None
        if ctx is not None:
            st.context_hits += 1
        else:
            ctx = self.context_entry(sid, trace)
            if type(ctx) is int:
                return ctx
        psc_ss = c.psc_ss if (cached and c.psc_size) else None
        if ctx.kind == CTX_LEGACY:  # type: ignore[union-attr]
            _, did, tt, levels, slptptr, fpd = ctx  # type: ignore[misc]
            if ptag != NO_PASID:
                return _SM_RTA_LEGACY_PASID
            tag = sid if q.iotlb_before_context else did
            if tt == TT_PT:
                if q.pt_fast_path and cached:
                    self.pt_bypass.add(sid)
                return self.pt_entry(tag, 0, iova, did, cached)
            if cached and not q.iotlb_before_context:
                hitr = self.probe_iotlb(tag, 0, iova, req)
                if hitr is not None:
                    return hitr
            finfo = fpd << FPD_SHIFT | WALK
            if iova >> min(9 * levels + 12, self.mgaw + 1):
                return _ADDR_BEYOND_MGAW | finfo
            if cached:
                st.iotlb_misses += 1
                st.walks += 1
            mem = self.mem
            res: SsResult | FsResult | int | None = None
            if cached and type(mem) is HostRAM and self.fast_walk:
                gen = self.ss_fast.get(levels)
                if gen is not None and psc_ss is None:
                    rows, qw = mem.qword_rows()
                    res = gen(rows, qw, slptptr, iova, req, False)
                if res is None:
                    res = ss_walk_ram(mem, False, slptptr, levels, iova, req, self.ss_geo, SS_CODES_LEGACY, psc_ss,
                                      did, c.psc_size)
            else:
                res = ss_walk(mem.read_u64, None, slptptr, levels, iova, req, self.ss_geo, SS_CODES_LEGACY,
                              psc_ss, did, c.psc_size, trace)
            if type(res) is int:
                return res | finfo
            base, shift, perm = res  # type: ignore[misc]
            return self.fill(tag, 0, did, KIND_SS, iova, base, shift, _SS_ALLOWED[perm & 7], finfo, False, cached)
        # scalable mode
        _, cfpd, pdir, pdts, rid_pasid, pre, paside, dte, rid_priv = ctx  # type: ignore[misc]
        if ptag == NO_PASID:
            pasid = rid_pasid if self.use_rid_pasid else 0
        else:
            if not paside:
                return _SM_PASIDE_CLEAR | cfpd << FPD_SHIFT
            pasid = ptag
        pe: PasidEntry | int | None = c.pasid.get((sid, pasid)) if cached and not q.pasid_entry_uncached else None
        if pe is not None:
            st.pasid_hits += 1
        else:
            pe = self.pasid_entry(sid, ctx, pasid, trace)  # type: ignore[arg-type]
            if type(pe) is int:
                return pe
        did, pgtt, ss_levels, ssptptr, fs_levels, fsptptr, fpd, flags, ssade, ssee = pe  # type: ignore[misc]
        fpd_info = fpd << FPD_SHIFT | WALK | pasid << PASID_SHIFT
        if req & PRIV and not flags & F_SRE:
            return _SM_SRE_CLEAR | fpd_info
        if req & EXEC and pgtt in (PGTT_FS, PGTT_NESTED) and not flags & F_ERE:
            return _SM_ERE_CLEAR | fpd_info
        tag = sid if q.iotlb_before_context else did
        if cached:
            hitr = self.probe_iotlb(tag, pasid, iova, req)
            if hitr is not None:
                return hitr
        if pgtt == PGTT_PT:
            if q.pt_fast_path:
                # QEMU: no width check, and the device's requests without PASID bypass from now on.
                if cached and ptag == NO_PASID:
                    self.pt_bypass.add(sid)
            elif iova >> self.haw:
                return _SM_BEYOND_HW_MAX | fpd_info
            return self.pt_entry(tag, pasid, iova, did, cached)
        if cached:
            st.iotlb_misses += 1
            st.walks += 1
        mem = self.mem
        ram = mem if cached and type(mem) is HostRAM and self.fast_walk else None
        res = None
        if pgtt == PGTT_SS:
            if iova >> (self.mgaw + 1):
                return _SM_BEYOND_HW_MAX | fpd_info
            if iova >> (9 * ss_levels + 12):
                return _SM_BEYOND_SS_MAX | fpd_info
            if req & EXEC and not ssee:
                return _SM_EXEC_DENIED | fpd_info
            if ram is not None:
                gen = self.ss_fast.get(ss_levels)
                if gen is not None and psc_ss is None:
                    rows, qw = ram.qword_rows()
                    res = gen(rows, qw, ssptptr, iova, req, ssade)
                if res is None:
                    res = ss_walk_ram(ram, ssade, ssptptr, ss_levels, iova, req, self.ss_geo, self.ss_codes_sm,
                                      psc_ss, did, c.psc_size)
            else:
                res = ss_walk(mem.read_u64, mem.write_u64 if ssade else None, ssptptr, ss_levels, iova, req,
                              self.ss_geo, self.ss_codes_sm, psc_ss, did, c.psc_size, trace)
            if type(res) is int:
                return res | fpd_info
            base, shift, perm = res  # type: ignore[misc]
            allowed = _SS_ALLOWED[perm & 7]
            if not ssee:
                allowed &= ~REQ_X  # execute needs SSEE whatever the X bits say
            if not perm & DIRTY_OK:
                allowed &= ~REQ_W  # writes must walk again to set D
            return self.fill(tag, pasid, did, KIND_SS, iova, base, shift, allowed, fpd_info, True, cached)
        # first stage or nested
        if not canonical(iova, fs_levels):
            return _SM_NON_CANONICAL | fpd_info
        if pgtt == PGTT_FS:
            psc_fs = c.psc_fs if (cached and c.psc_size) else None
            if ram is not None:
                fgen = self.fs_fast.get(fs_levels)
                if fgen is not None and psc_fs is None:
                    rows, qw = ram.qword_rows()
                    res = fgen(rows, qw, fsptptr, iova, req, flags)
                if res is None:
                    res = fs_walk_ram(ram, fsptptr, fs_levels, iova, req, self.fs_geo, flags, psc_fs,
                                      did << 20 | pasid, c.psc_size)
            else:
                res = fs_walk(mem.read_u64, mem.write_u64, fsptptr, fs_levels, iova, req, self.fs_geo, flags, psc_fs,
                              did << 20 | pasid, c.psc_size, trace)
            if type(res) is int:
                return res | fpd_info
            base, shift, allowed = res  # type: ignore[misc]
            return self.fill(tag, pasid, did, KIND_FS, iova, base, shift, allowed, fpd_info, True, cached)
        return self._nested(tag, pasid, did, iova, req, pe, fpd_info, trace)  # type: ignore[arg-type]

    def _nested(self, tag: int, pasid: int, did: int, iova: int, req: int, pe: PasidEntry, fpd_info: int,
                trace: list[TraceEntry] | None) -> Lookup:
        ss_levels, ssptptr, fs_levels, fsptptr, flags = pe.ss_levels, pe.ssptptr, pe.fs_levels, pe.fsptptr, pe.flags
        c = self.caches
        mem = self.mem
        rd, wr = mem.read_u64, mem.write_u64
        ssade = pe.ssade
        ss_wr = wr if ssade else None
        psc_ss = c.psc_ss if (c.psc_size and trace is None) else None
        psc_fs = c.psc_fs if (c.psc_size and trace is None) else None
        limit = 9 * ss_levels + 12
        geo, codes, psc_limit = self.ss_geo, self.ss_codes_sm, c.psc_size
        fast = trace is None and type(mem) is HostRAM and self.fast_walk

        def table_xlate(gpa: int, is_root: bool) -> tuple[int, int] | int:
            if gpa >> limit:
                return _NESTED_BEYOND_SS
            if fast:
                r = ss_walk_ram(mem, ssade, ssptptr, ss_levels, gpa, READ, geo, codes,  # type: ignore[arg-type]
                                psc_ss, did, psc_limit)
            else:
                r = ss_walk(rd, ss_wr, ssptptr, ss_levels, gpa, READ, geo, codes, psc_ss, did, psc_limit, trace)
            if type(r) is int:
                return (_NESTED_ROOT_DENIED if is_root else _NESTED_TABLE_DENIED) if r == _SM_SS_ENTRY_NP else r
            base, shift, perm = r  # type: ignore[misc]
            return (base | (gpa & ((1 << shift) - 1))) & ~0xFFF, perm

        if fast:
            res = fs_walk_ram(mem, fsptptr, fs_levels, iova, req, self.fs_geo, flags,  # type: ignore[arg-type]
                              psc_fs, did << 20 | pasid, psc_limit, table_xlate)
        else:
            res = fs_walk(rd, wr, fsptptr, fs_levels, iova, req, self.fs_geo, flags, psc_fs, did << 20 | pasid,
                          psc_limit, trace, table_xlate)
        if type(res) is int:
            return res | fpd_info
        fs_base, fs_shift, fs_allowed_mask = res  # type: ignore[misc]
        gpa = fs_base | (iova & ((1 << fs_shift) - 1))
        if gpa >> limit:
            return _SM_BEYOND_SS_MAX | fpd_info
        if fast:
            r2 = ss_walk_ram(mem, ssade, ssptptr, ss_levels, gpa, req, geo, codes, psc_ss, did,  # type: ignore[arg-type]
                             psc_limit)
        else:
            r2 = ss_walk(rd, ss_wr, ssptptr, ss_levels, gpa, req, geo, codes, psc_ss, did, psc_limit, trace)
        if type(r2) is int:
            return r2 | fpd_info
        ss_base, ss_shift, perm = r2  # type: ignore[misc]
        shift = min(fs_shift, ss_shift)
        hpa = ss_base | (gpa & ((1 << ss_shift) - 1))
        allowed = fs_allowed_mask & _SS_ALLOWED[perm & 7]
        if not perm & DIRTY_OK:
            allowed &= ~REQ_W
        base = hpa & ~((1 << shift) - 1)
        return self.fill(tag, pasid, did, KIND_NESTED, iova, base, shift, allowed, fpd_info, True, trace is None)

    # -- IOTLB ---------------------------------------------------------------------------------------
    def probe_iotlb(self, tag: int, pasid: int, iova: int, req: int) -> tuple[IotlbEntry, int] | int | None:
        """An IOTLB hit for the request: (entry, output address); DROPPED when the quirk drops a request
        its cached permissions refuse; None on a miss (a refused request is a miss: it walks again)."""
        c = self.caches
        iotlb = c.iotlb
        for size_idx, mask in _PROBES[c.sizes_held]:
            e = iotlb.get((((((tag << 21) | pasid) << 2) | size_idx) << 52) | ((iova & mask) >> 12))
            if e is not None:
                if (e.allowed >> req) & 1:
                    c.stats.iotlb_hits += 1
                    return e, e.base | (iova & e.mask)
                if self.quirks.cached_perm_drop_silently and e.kind != KIND_PT:
                    return DROPPED
                return None
        return None

    def pt_entry(self, tag: int, pasid: int, iova: int, did: int, insert: bool) -> tuple[IotlbEntry, int]:
        """Pass-through: identity, cached per 4 KiB page like any other translation."""
        page = iova & ~0xFFF
        e = IotlbEntry(page, 0xFFF, 0xFFFF, 1, did, pasid, KIND_PT, page, 12)
        if insert and not self.quirks.pt_fast_path:
            self.caches.put_iotlb(iotlb_key(tag, pasid, 0, page), e)
            if self.cfg.iotlb_size == 0:
                e.alive = 0
        else:
            e.alive = 0
        return e, iova

    def fill(self, tag: int, pasid: int, did: int, kind: int, iova: int, base: int, shift: int, allowed: int,
             finfo: int, sm: bool, insert: bool = True) -> Lookup:
        """The IOTLB entry of a walked leaf (``base``, page ``shift``, ``allowed`` requests), put in the IOTLB
        under ``tag`` when ``insert``; or the interrupt-range fault (``finfo`` OR-ed in) it gives."""
        mask = (1 << shift) - 1
        out = base | (iova & mask)
        page = iova & ~mask
        # Interrupt-address range: never translated to; such a leaf is not cached so every access is checked.
        if base < INTR_HI and base + mask >= INTR_LO:
            if self.quirks.intr_range_whole_leaf or INTR_LO <= (out & ~0xFFF) < INTR_HI:
                whole = self.quirks.intr_range_whole_leaf and self.scalable_unit
                return (_SM_INTERRUPT_ADDR if (sm or whole) else _INTERRUPT_ADDR) | finfo
            return IotlbEntry(base, mask, allowed, 0, did, pasid, kind, page, shift), out
        # IotlbEntry(base, mask, allowed, 1, did, pasid, kind, page, shift) without the __init__ call: every
        # walk builds one.
        e = _new_entry(IotlbEntry)
        e.base, e.mask, e.allowed, e.alive, e.did, e.pasid, e.kind, e.iova, e.shift = (base, mask, allowed, 1, did,
                                                                                      pasid, kind, page, shift)
        if insert and self.cfg.iotlb_size:
            # iotlb_key, inlined: this is every walk's cost
            self.caches.put_iotlb((((((tag << 21) | pasid) << 2) | ((shift - 12) // 9)) << 52) | (page >> 12), e)
        else:
            e.alive = 0
        return e, out

    # -- faults --------------------------------------------------------------------------------------
    def report_fault(self, sid: int, ptag: int, iova: int, req: int, f: int) -> int:
        """Record (or let FPD suppress) the fault int ``f`` met by a request; returns -reason as reported."""
        q = self.quirks
        faults = self.faults
        reason = faults.reason(f & REASON_MASK, req)
        pasid: int | None = None if ptag == NO_PASID else ptag
        pv: int | None = None
        walk = f & WALK
        if q.sm_fault_pp_rid_pasid and self.root_scalable and ptag == NO_PASID and walk:
            pasid = (f >> PASID_SHIFT) & 0xFFFFF
        if q.fault_pv_16bit:
            if pasid is not None:
                pv = pasid & 0xFFFF
            elif not self.root_scalable and walk:
                pv = 0xFFFF
        # FI holds the page address; bits above the guest address width read as zero.
        faults.report(sid, iova & self.fi_mask, reason, f & _FPD_BIT, bool(req & WRITE) and not req & READ, pasid,
                      bool(req & PRIV), bool(req & EXEC), pv)
        return -reason


__all__ = ["Translator", "Lookup"]
