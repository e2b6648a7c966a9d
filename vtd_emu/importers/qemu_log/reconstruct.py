"""Guest memory over time, rebuilt from what a QEMU log says QEMU read and one RAM snapshot.

The snapshot is one moment; the guest mapped and unmapped buffers all along.  QEMU prints what it read
at the moments it read it: the leaf entry of every page walk (``vtd_iotlb_page_update``), the context
entry behind every context-cache fill or hit (``vtd_iotlb_cc_update`` / ``_hit``), every IRTE
(``vtd_ir_irte_get``).  :class:`Reconstructor` keeps a model of the memory a replay will have (the
snapshot, or zeros, plus every write emitted so far) and, for each such read, returns the qword writes
that make the model hold what QEMU read, so the importer emits them just before the event that needs
them.

How it decides, for a walk QEMU made (request ``sid``, ``iova``, leaf at ``level``, leaf value):

1. The walk is made on the model by a unit of the log's configuration (:meth:`VtdIommu.walk`: uncached,
   side-effect free), so the mode (legacy or scalable, which root-entry half, PASID tables, the number
   of levels from the context entry) is whatever the log's root table and the model say, never assumed.
2. Each structure it reads is compared with what QEMU read: a root entry that is not present gets a
   context table placed in unused memory; a context entry QEMU printed that the model does not hold is
   written; a paging entry above the leaf level that does not lead one level down (not present, a leaf,
   reserved bits, beyond memory) is pointed at a fresh table placed in unused memory; the entry at the
   leaf level becomes QEMU's leaf value.  The walk is repeated until it ends on QEMU's leaf.
3. Upper levels therefore come from the snapshot wherever it has a path, and are only created where it
   has none (the table was freed before the snapshot, or not allocated yet).

Fresh tables go into pages that are zero in the model, that no qword of the snapshot points at (a
conservative pointer scan, done once, on the first placement), that no event so far used (DMA targets,
structures, queues), searched from the top of memory down.

What it cannot know: entries QEMU did not print (upper levels of a walk, PASID-directory and PASID-table
entries, root entries) are the snapshot's or placed ones, so only the leaf and the context are QEMU's
own; a cache hit shows what QEMU had cached, not what memory held then, so a guest that changed memory
without invalidating is invisible (the model keeps the last value a walk read); DMA data, and writes by
the guest to memory QEMU never read, are not in the log.  A walk it cannot steer to QEMU's leaf (a PASID
structure missing from the snapshot, a nested walk) is counted as ``unreconstructed`` and left to the
replay to report.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ...errors import TraceError
from ...memory import HostRAM
from ...spec.consts import FS_PDE, GCMD, IRTE, LEGACY_ROOT_ENTRY, RTADDR, SM_ROOT_ENTRY, SS_PDE
from ...spec.loader import specs
from ...vtd.results import Translation

if TYPE_CHECKING:
    from ...vtd.config import VtdConfig

_RTADDR_OFF, _GCMD_OFF = (specs().registers[n].resolve_offset(0, 0) for n in ("RTADDR", "GCMD"))
# A link to a next-level table that permits everything the leaf may: R+W (second stage), P+R/W+U/S (first).
_LINK = {"ss": SS_PDE.R | SS_PDE.W, "fs": FS_PDE.P | FS_PDE.RW | FS_PDE.US}
_LINK_ADDR = {"ss": SS_PDE.ADDR, "fs": FS_PDE.ADDR}
_ROOT_P = LEGACY_ROOT_ENTRY.P
_SM_UP_SHIFT = SM_ROOT_ENTRY.UP_LO - 64     # the upper half's present bit, within the second qword
_IRTE_SVT, _IRTE_SID = IRTE.SVT, IRTE.SID
_SVT_LO, _SID_LO = IRTE.SVT_LO, IRTE.SID_LO
_U64 = (1 << 64) - 1
_PLACE_LIMIT = 1 << 32   # fresh tables go below 4 GiB (what any unit's address width reaches)
_MAX_FIXES = 16          # more than any walk has structures: a walk that needs more cannot be steered


class Reconstructor:
    """The memory model and the writes that keep it equal to what QEMU read (see the module docstring).
    ``ram`` is the snapshot (or empty memory) and becomes the model; ``cfg`` the logged unit's config."""

    def __init__(self, ram: HostRAM, cfg: VtdConfig) -> None:
        from ...vtd.iommu import VtdIommu

        self.mem = ram
        self.shadow = VtdIommu(ram, cfg)
        self.stats: Counter[str] = Counter()
        self.ctx: dict[int, tuple[int, int]] = {}
        # (sid, leaf level, iova above the leaf table) -> base of the leaf table a verified walk ended in.
        self.paths: dict[tuple[int, int, int], int] = {}
        self.upper: set[int] = set()        # pages holding the entries those paths rest on
        # Pages the log showed in use (never given to a fresh table), one byte per page of the memory fresh
        # tables may go to: bounded by the guest's memory, not by the log.
        self._top = min(ram.size or _PLACE_LIMIT, _PLACE_LIMIT) >> 12
        self.used = bytearray(self._top)
        self.irta: int | None = None
        self.out: list[tuple[int, int]] = []
        self._free: Iterator[int] | None = None
        self._lctx = specs().structure("legacy_context_entry")
        self._aw = max(0, cfg.cap_field("SAGAW").bit_length() - 1)   # AW of the deepest supported table

    # -- what the log sets up ------------------------------------------------------------------------
    def set_root(self, addr: int, scalable: bool) -> None:
        """The root table QEMU latched (``vtd_reg_dmar_root``); the model walks from it with translation on."""
        io = self.shadow
        io.mmio_write(_RTADDR_OFF, addr | (int(scalable) << RTADDR.TTM_LO), 8)
        io.mmio_write(_GCMD_OFF, GCMD.SRTP, 4)
        io.mmio_write(_GCMD_OFF, GCMD.TE, 4)
        self._use(addr >> 12)
        self._forget_paths()

    def set_irta(self, addr: int) -> None:
        """The interrupt-remapping table's base (``vtd_reg_ir_root``)."""
        self.irta = addr & ~0xFFF
        self._use(self.irta >> 12)

    def context(self, sid: int, lo: int, hi: int) -> None:
        """The (first 128 bits of the) context entry QEMU read or had cached for ``sid``."""
        if self.ctx.get(sid) != (lo, hi):
            self.ctx[sid] = (lo, hi)
            self._forget_paths()

    def note_use(self, addr: int) -> None:
        """A page the guest or QEMU used at this point (a DMA target, a queue, a status address)."""
        page = addr >> 12
        if page < self._top:
            self.used[page] = 1

    def _use(self, page: int) -> None:
        if page < self._top:
            self.used[page] = 1

    def note_write(self, addr: int, qwords: list[int]) -> None:
        """A write the importer emits for its own reasons (invalidation descriptors): the model follows."""
        for k, q in enumerate(qwords):
            self._write(addr + 8 * k, q, emit=False)

    # -- QEMU's reads ----------------------------------------------------------------------------------
    def take(self) -> list[tuple[int, int]]:
        """The writes decided since the last call, in order."""
        out, self.out = self.out, []
        return out

    def irte(self, index: int, lo: int, hi: int) -> None:
        """QEMU read IRTE ``index`` as (lo, hi)."""
        if self.irta is None:
            self.stats["irte_without_table"] += 1
            return
        a = self.irta + 16 * index
        rd = self.mem.read_u64
        if rd(a) == lo and rd(a + 8) == hi:
            self.stats["irtes_unchanged"] += 1
            return
        self._write(a, lo)
        self._write(a + 8, hi)
        self.stats["irtes_written"] += 1

    @staticmethod
    def irte_requester(lo: int, hi: int) -> int:
        """A requester id the IRTE's source validation accepts (QEMU does not log the one it checked)."""
        v = lo | hi << 64
        svt, sid = (v & _IRTE_SVT) >> _SVT_LO, (v & _IRTE_SID) >> _SID_LO
        if svt == 1:
            return sid
        if svt == 2:
            return sid & 0xFF00       # the first bus of the range
        return 0

    def leaf(self, sid: int, iova: int, shift: int, value: int, domain: int | None = None) -> bool:
        """QEMU walked ``iova`` for ``sid`` (in ``domain``) to a leaf of ``1 << shift`` bytes holding
        ``value``.  False when the model could not be steered to it (counted as ``unreconstructed``)."""
        level = (shift - 12) // 9 + 1
        key = (sid, level, iova >> (shift + 9))
        base = self.paths.get(key)
        if base is not None:
            ea = base + ((iova >> shift) & 0x1FF) * 8
            if self.mem.read_u64(ea) == value:
                self.stats["leaves_unchanged"] += 1
            else:
                self._write(ea, value)
                self.stats["leaves_written"] += 1
            return True
        return self._steer(sid, iova, shift, level, value, domain, key)

    # -- internals -------------------------------------------------------------------------------------
    def _steer(self, sid: int, iova: int, shift: int, level: int, value: int, domain: int | None,
               key: tuple[int, int, int]) -> bool:
        access = "r" if value & 1 else "w"
        wrote_leaf = False
        for _ in range(_MAX_FIXES):
            rep = self.shadow.walk(sid, iova, access)
            steps = rep.steps
            kinds = {s[0] for s in steps}
            if "ss" in kinds and "fs" in kinds:
                self.stats["unreconstructed"] += 1    # nested: the leaf QEMU printed is one of two stages
                return False
            fixed, leaf_ea = self._fix(sid, steps, level, value, domain)
            if fixed == "leaf":
                wrote_leaf = True
                continue
            if fixed:
                continue
            if leaf_ea is None or not isinstance(rep.result, Translation):
                self.stats["unreconstructed"] += 1
                return False
            self.stats["leaves_written" if wrote_leaf else "leaves_unchanged"] += 1
            self.paths[key] = leaf_ea - ((iova >> shift) & 0x1FF) * 8
            self.upper.update(s[2] >> 12 for s in steps if s[2] != leaf_ea)
            return True
        self.stats["unreconstructed"] += 1
        return False

    def _fix(self, sid: int, steps: list, level: int, value: int, domain: int | None) -> tuple[str, int | None]:
        """One correction of the model along a walk's steps: ("", leaf address) when the walk reached
        QEMU's leaf unchanged, else what was fixed ("root", "context", "link", "leaf")."""
        devfn = sid & 0xFF
        for i, (kind, lvl, ea, val) in enumerate(steps):
            if kind == "legacy_root_entry":
                lo = val[0]
                if lo >= 0 and not lo & _ROOT_P:
                    self._write(ea, self._alloc() | _ROOT_P)
                    self.stats["context_tables_placed"] += 1
                    return "root", None
            elif kind == "sm_root_entry":
                upper = devfn >= 128
                half = val[1] >> _SM_UP_SHIFT if upper else val[0]
                if half >= 0 and not half & 1:
                    t = self._alloc()
                    self._write(ea + 8 * upper, t | 1 << _SM_UP_SHIFT if upper else t | _ROOT_P)
                    self.stats["context_tables_placed"] += 1
                    return "root", None
            elif kind in ("legacy_context_entry", "sm_context_entry"):
                want = self.ctx.get(sid)
                if want is None and kind == "legacy_context_entry" and not val[0] & 1 and domain is not None:
                    # The log printed no context for this device: one that reaches QEMU's leaf, in QEMU's
                    # domain, with the deepest table the unit supports.
                    v = self._lctx.encode(P=1, SLPTPTR=self._alloc() >> 12, AW=self._aw, DID=domain)
                    want = self.ctx[sid] = (v & _U64, v >> 64)
                    self.stats["contexts_placed"] += 1
                if want is not None and (val[0], val[1]) != want:
                    self._write(ea, want[0])
                    self._write(ea + 8, want[1])
                    self.stats["contexts_written"] += 1
                    return "context", None
            elif kind in _LINK:
                if lvl == level:
                    if val != value:
                        self._write(ea, value)
                        return "leaf", None
                    return "", ea
                if lvl > level:
                    nxt = steps[i + 1] if i + 1 < len(steps) else None
                    if nxt is None or nxt[0] != kind or nxt[1] != lvl - 1 or nxt[2] >> 12 != (val & _LINK_ADDR[kind]) >> 12:
                        self._write(ea, self._alloc() | _LINK[kind])
                        self.stats["tables_placed"] += 1
                        return "link", None
        return "", None

    def _write(self, addr: int, value: int, emit: bool = True) -> None:
        self.mem.write_u64(addr, value)
        if emit:
            self.out.append((addr, value))
        page = addr >> 12
        if page < self._top:
            self.used[page] = 1
        if page in self.upper:
            self._forget_paths()

    def _forget_paths(self) -> None:
        self.paths.clear()
        self.upper.clear()

    def _alloc(self) -> int:
        if self._free is None:
            self._free = self._free_pages()
        rd = self.mem.read_u64
        for pfn in self._free:
            if self.used[pfn] or any(rd((pfn << 12) + 8 * k) for k in range(512)):
                continue
            self.used[pfn] = 1
            return pfn << 12
        raise TraceError("<ram>", "", "no unused page left in guest memory to place a table the log needs "
                                      "(give a larger --ram-size)")

    def _free_pages(self) -> Iterator[int]:
        """Pages no snapshot qword points at, from the top of memory down (zero-ness is checked on use)."""
        top = self._top
        pointed = np.zeros(top, bool)
        rows = self.mem.page_rows()
        if rows:
            pool = self.mem.u64_pool()[np.fromiter(rows.values(), np.int64, len(rows))]
            # Anything with a low permission/present bit set may be an entry: its address page is taken.
            vals = pool[(pool & np.uint64(3)) != 0]
            pfns = (vals & np.uint64(0x000F_FFFF_FFFF_F000)) >> np.uint64(12)
            pointed[pfns[pfns < top].astype(np.int64)] = True
        return (p for p in range(top - 1, 0, -1) if not pointed[p])
