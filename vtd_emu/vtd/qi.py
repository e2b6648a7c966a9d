"""Queued invalidation: the invalidation queue (IQA/IQH/IQT), its descriptors and its errors.

Software writes descriptors into a ring in memory and advances IQT; the unit fetches from IQH while
IQH != IQT and queued invalidation is enabled, executes each descriptor against the caches (or sends it
to a device, or writes a status word) and advances IQH.  A bad descriptor stops fetching with FSTS.IQE
and IQH left on it; a device-TLB invalidation that a device never answers stops it with FSTS.ITE.
Nothing in a descriptor can raise: every malformed input is the architectural error.

Processing is synchronous: all fetchable descriptors are executed inside the IQT (or GCMD, FSTS) write
that made them fetchable.  Choices where the fact sheet leaves room are explained in
``docs/invalidation.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..spec import Field, specs
from ..spec.consts import GSTS, ICS, IQA, IQERCD, IQH, IQT
from .access import NO_PASID
from .config import VtdConfig
from .descriptors import DeviceTlbInvalidation, IecInvalidation, PasidCacheInvalidation, PasidIotlbInvalidation
from .faults import ICE, IQE, ITE

if TYPE_CHECKING:
    from .iommu import VtdIommu

# Descriptor types (type = qw0[3:0] | qw0[11:9] << 4)
T_NONE = 0
T_CONTEXT, T_IOTLB, T_DEV_TLB, T_IEC, T_WAIT, T_PIOTLB, T_PASID_CACHE, T_PASID_DEV_TLB, T_PAGE_RESPONSE = range(1, 10)
TYPE_NAMES = {T_CONTEXT: "context-cache", T_IOTLB: "iotlb", T_DEV_TLB: "device-tlb", T_IEC: "iec",
              T_WAIT: "wait", T_PIOTLB: "pasid-iotlb", T_PASID_CACHE: "pasid-cache",
              T_PASID_DEV_TLB: "pasid-device-tlb", T_PAGE_RESPONSE: "page-group-response"}

# IQERCD.IQEI codes (fact sheet §4.3).  QEMU-only refusals have no architectural code: they report 0.
IQEI_NO_INFO, IQEI_TAIL, IQEI_FETCH, IQEI_TYPE, IQEI_RESERVED, IQEI_DW, IQEI_TAIL_ALIGN = 0, 1, 2, 3, 4, 5, 6

_QEMU_TYPES = frozenset({T_CONTEXT, T_IOTLB, T_DEV_TLB, T_IEC, T_WAIT, T_PIOTLB, T_PASID_CACHE})
_PASID_TYPES = frozenset({T_PIOTLB, T_PASID_CACHE, T_PASID_DEV_TLB})
_BLOCKING = IQE | ITE
_IWC = ICS.IWC
_QIES = GSTS.QIES
_QT_MASK = IQT.QT
assert IQH.QH == _QT_MASK
_DW_BIT = IQA.DW
_QS = IQA.QS
LAYOUTS = {T_CONTEXT: "inv_context_cache", T_IOTLB: "inv_iotlb", T_DEV_TLB: "inv_dev_tlb", T_IEC: "inv_iec",
           T_WAIT: "inv_wait", T_PIOTLB: "inv_pasid_iotlb", T_PASID_CACHE: "inv_pasid_cache",
           T_PASID_DEV_TLB: "inv_pasid_dev_tlb", T_PAGE_RESPONSE: "inv_page_group_response"}
"""Descriptor type → its layout in ``specs/structures.yaml``."""

_Handler = Callable[[int, tuple[int, ...]], "int | None"]
"""handler(qw0 | qw1 << 64, qwords) -> None when done, or an IQEI code for an invalidation queue error."""


def make_descriptor(t: int, **fields: int) -> tuple[int, int]:
    """(qw0, qw1) of a descriptor of type ``t`` with the named fields of its spec layout (ADDR and
    STATUS_ADDR are given as addresses, low bits dropped), as a driver would build it."""
    layout = specs().structure(LAYOUTS[t])
    for name in ("ADDR", "STATUS_ADDR"):
        if name in fields:
            fields[name] >>= layout.field(name).lo & 63
    v = layout.encode(TYPE_LO=t & 0xF, TYPE_HI=t >> 4, **fields)
    return v & (1 << 64) - 1, v >> 64


def _in_qword(f: Field, v: int) -> int:
    """An address field left at its bit positions within its qword (ADDR 63:12 reads as an address)."""
    return (v & f.mask) >> (f.lo & ~63)


class InvalidationQueue:
    """The queued-invalidation interface of one unit.  Owns GSTS.QIES, IQH, IQA's latched state, ICS,
    IQERCD and the IQE/ITE/ICE bits' effect on fetching."""

    def __init__(self, chip: "VtdIommu") -> None:
        self.chip = chip
        self.regs = regs = chip.regs
        cfg, q = chip.cfg, chip.quirks
        self.qemu_regs = q.qemu_qi_registers
        self.qemu_desc = q.qemu_qi_descriptors
        self.scalable = cfg.scalable
        self.mamv = cfg.cap_field("MAMV")
        self.mhmv = cfg.ecap_field("MHMV")
        self.haw_mask = ((1 << cfg.haw) - 1) & ~0xFFF
        self.enabled = False
        self.base = 0
        self.entries = 0
        self.dw = False           # 256-bit slots for fetching and for decoding IQH/IQT
        self.dw_refused = False   # DW=1 latched on a unit without 256-bit descriptors (IQEI 5)
        self.head = 0
        self.tail = 0             # QEMU keeps its own tail: an IQT write it refuses still reads back
        self.iqa = 0              # what software wrote to IQA (QEMU's register shows something else)
        self.last_type = T_NONE
        self.pending_timeout: int | None = None
        self.abort_wait = False
        self.counts: dict[int, int] = {}
        self._busy = False
        self._rerun = False
        self.aborted_waits = 0
        self._iqa_rw = regs.slots[("IQA", 0)].rw
        self._compile(cfg)
        h = regs.handlers
        h["IQT"] = self._iqt_written
        h["IQA"] = self._iqa_written
        chained = h.get("FSTS")

        def fsts_written(index: int, old: int, new: int, value: int, wmask: int) -> None:
            if chained is not None:
                chained(index, old, new, value, wmask)
            self._fsts_written(old, new)

        h["FSTS"] = fsts_written

    # -- descriptor tables ---------------------------------------------------------------------
    def _compile(self, cfg: VtdConfig) -> None:
        sp = specs()
        dt = bool(cfg.ecap_field("DT"))
        features = frozenset({"PDS"} if cfg.ecap_field("PDS") else ())
        self.f: dict[int, dict[str, Field]] = {}
        self.rsvd: dict[int, tuple[int, int]] = {}
        for t, name in LAYOUTS.items():
            lay = sp.structure(name)
            self.f[t] = dict(lay.fields)
            mask = lay.reserved_mask(features)
            if self.qemu_desc:
                # QEMU 7.2 takes the type from bits 3:0 alone; bits 11:9 fall under each type's reserved
                # check, and types 6, 7 and IEC descriptors are checked for nothing (found by the
                # descriptor sweep, tests/data/qemu-sweeps).
                mask |= lay.field("TYPE_HI").mask
                if t in (T_DEV_TLB, T_PASID_DEV_TLB):
                    mask |= lay.field("PFSID_LO").mask | lay.field("PFSID_HI").mask  # an older spec's reserved
                elif t in (T_IEC, T_PIOTLB, T_PASID_CACHE):
                    mask = 0
                elif t == T_WAIT:
                    mask |= lay.field("PD").mask  # 7.2 predates PD
            m = lay.qword_masks(mask)
            self.rsvd[t] = (m[0], m[1])
        if self.qemu_desc:
            supported = set(_QEMU_TYPES)
        else:
            supported = {T_CONTEXT, T_IOTLB, T_WAIT}
            if dt:
                supported.add(T_DEV_TLB)
            if cfg.ecap_field("IR"):
                supported.add(T_IEC)
            if self.scalable:
                supported |= {T_PIOTLB, T_PASID_CACHE}
                if dt:
                    supported.add(T_PASID_DEV_TLB)
            if cfg.ecap_field("PRS"):
                supported.add(T_PAGE_RESPONSE)
        self.supported = frozenset(supported)
        self.handlers: dict[int, _Handler] = {
            T_CONTEXT: self._context, T_IOTLB: self._iotlb, T_DEV_TLB: self._dev_tlb, T_IEC: self._iec,
            T_WAIT: self._wait, T_PIOTLB: self._piotlb, T_PASID_CACHE: self._pasid_cache,
            T_PASID_DEV_TLB: self._pasid_dev_tlb, T_PAGE_RESPONSE: self._page_response,
        }

    # -- registers -----------------------------------------------------------------------------
    def _iqa_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        self.iqa = (self.iqa & ~wmask) | (value & wmask & self._iqa_rw)
        if self.qemu_regs:
            # QEMU decodes DW at every IQA write (ignoring it without scalable mode) and shows the base it
            # latched at QIE=1 with the live QS; DW never reads back.
            self.dw = bool(self.iqa & _DW_BIT) and self.scalable
            self.regs.set("IQA", self.base | (self.iqa & _QS))

    def _iqt_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        if self.qemu_regs:
            if self.dw and new & 0x10:
                return  # QEMU drops a misaligned 256-bit tail internally; the register keeps it
            self.tail = (new & _QT_MASK) >> (5 if self.dw else 4)
        self.process()

    def _fsts_written(self, old: int, new: int) -> None:
        # Clearing IQE or ITE lets the unit resume at IQH (QEMU waits for the next IQT write).
        if old & _BLOCKING and not new & _BLOCKING and not self.qemu_regs:
            self.process()

    def set_enabled(self, on: bool) -> None:
        """GCMD.QIE changed: latch IQA and start fetching, or stop (IQH back to 0)."""
        regs = self.regs
        gsts = regs.get("GSTS")
        qies = _QIES
        if on:
            v = self.iqa
            self.base = v & self.haw_mask
            if self.qemu_regs:
                self.dw_refused = False   # QEMU already decided DW at the IQA write
                regs.set("IQA", self.base | (v & _QS))
            else:
                dw = bool(v & _DW_BIT)
                self.dw_refused = dw and not self.scalable
                self.dw = dw and not self.dw_refused
            self.entries = 1 << ((v & _QS) + 8 - (1 if self.dw else 0))
            self.enabled = True
            regs.set("GSTS", gsts | qies)
            # A tail already past the head (Windows enables QI that way) is processed at once.
            self.process()
            return
        if self.qemu_regs and not (self.head == self.tail and self.last_type == T_WAIT):
            return  # QEMU refuses to disable a queue that is not drained by a wait descriptor
        self.enabled = False
        self.head = 0
        self.pending_timeout = None
        self.abort_wait = False
        regs.set("IQH", 0)
        regs.set("GSTS", gsts & ~qies)

    # -- fetching ------------------------------------------------------------------------------
    def _tail_index(self) -> int | None:
        """The tail as a descriptor index, or None after raising the IQE a bad tail causes."""
        if self.qemu_regs:
            tail = self.tail
        else:
            qt = self.regs.get("IQT") & _QT_MASK
            if self.dw and qt & 0x10:
                self._iqe(IQEI_TAIL_ALIGN)
                return None
            tail = qt >> (5 if self.dw else 4)
        if tail >= self.entries:
            # QEMU 7.2 has no such check and would spin over the ring; a bad tail is IQE here.
            self._iqe(IQEI_TAIL)
            return None
        return tail

    def process(self) -> None:
        """Fetch and execute descriptors from IQH up to IQT, unless disabled or stopped by IQE/ITE."""
        if self._busy:
            # An interrupt callback wrote a register while descriptors were executing: finish the current
            # pass first, then look again (the tail may have moved).
            self._rerun = True
            return
        self._busy = True
        try:
            self._rerun = True
            while self._rerun:
                self._rerun = False
                self._fetch()
        finally:
            self._busy = False

    def _fetch(self) -> None:
        if not self.enabled or self.regs.get("FSTS") & _BLOCKING:
            return
        if self.dw_refused:
            if self.regs.get("IQT") & _QT_MASK != self.head << 4:
                self._iqe(IQEI_DW)
            return
        tail = self._tail_index()
        if tail is None:
            return
        rd = self.chip.mem.read_u64
        width = 32 if self.dw else 16
        nq = width // 8
        shift = 5 if self.dw else 4
        ring = (self.enabled, self.base, self.entries, self.dw)
        while self.head != tail:
            addr = self.base + self.head * width
            qs = tuple(rd(addr + 8 * i) for i in range(nq))
            if min(qs) < 0:
                self.last_type = T_NONE
                self._iqe(IQEI_FETCH)
                return
            err = self._execute(qs)
            if err is not None:
                self._iqe(err)
                return
            if (self.enabled, self.base, self.entries, self.dw) != ring:
                # An interrupt callback disabled or re-programmed the queue: start over from its new state.
                self._rerun = True
                return
            self.head = (self.head + 1) % self.entries
            self.regs.set("IQH", (self.head << shift) & _QT_MASK)
            if self.abort_wait:
                self.abort_wait = False
                self._timeout()
                return
        if self.pending_timeout is not None:
            self._timeout()

    def _execute(self, qs: tuple[int, ...]) -> int | None:
        q0 = qs[0]
        t = q0 & 0xF if self.qemu_desc else (q0 & 0xF) | ((q0 >> 5) & 0x70)
        self.last_type = t
        if t not in self.supported:
            return IQEI_TYPE
        if t in _PASID_TYPES and not self.dw and not self.qemu_desc:
            return IQEI_TYPE  # PASID-granular descriptors exist only in a 256-bit queue
        r0, r1 = self.rsvd[t]
        q1 = qs[1]
        if q0 & r0 or q1 & r1:
            return IQEI_RESERVED
        if len(qs) == 4 and t != T_PAGE_RESPONSE and not self.qemu_desc and (qs[2] or qs[3]):
            return IQEI_RESERVED  # the upper half of a 256-bit slot is reserved except for private data
        err = self.handlers[t](q0 | q1 << 64, qs)
        if err is None:
            self.counts[t] = self.counts.get(t, 0) + 1
        return err

    # -- errors --------------------------------------------------------------------------------
    def _iqe(self, code: int) -> None:
        regs = self.regs
        regs.set("IQERCD", (regs.get("IQERCD") & ~IQERCD.IQEI) | code << IQERCD.IQEI_LO)
        self.chip.faults.set_status(IQE)

    def _timeout(self) -> None:
        sid = self.pending_timeout if self.pending_timeout is not None else 0
        self.pending_timeout = None
        regs = self.regs
        regs.set("IQERCD", (regs.get("IQERCD") & ~IQERCD.ITESID) | sid << IQERCD.ITESID_LO)
        self.chip.faults.set_status(ITE)

    def _completion_error(self, sid: int) -> None:
        regs = self.regs
        regs.set("IQERCD", (regs.get("IQERCD") & ~IQERCD.ICESID) | sid << IQERCD.ICESID_LO)
        self.chip.faults.set_status(ICE)

    # -- descriptors ---------------------------------------------------------------------------
    def _context(self, v: int, qs: tuple[int, ...]) -> int | None:
        f = self.f[T_CONTEXT]
        g = f["G"].get(v)
        if g == 0:
            return IQEI_RESERVED
        self.chip.invalidate_context(g, f["DID"].get(v), f["SID"].get(v), f["FM"].get(v), queued=True)
        return None

    def _iotlb(self, v: int, qs: tuple[int, ...]) -> int | None:
        f = self.f[T_IOTLB]
        g = f["G"].get(v)
        # DR/DW ask to drain reads/writes first: requests complete synchronously here, nothing to drain.
        done = self.chip.invalidate_iotlb(g, f["DID"].get(v), _in_qword(f["ADDR"], v), f["AM"].get(v),
                                          bool(f["IH"].get(v)), queued=True)
        return None if done else IQEI_RESERVED  # G=0 or AM > MAMV

    def _dev_tlb(self, v: int, qs: tuple[int, ...]) -> int | None:
        f = self.f[T_DEV_TLB]
        self._send_ats_invalidation(f["SID"].get(v), NO_PASID, _in_qword(f["ADDR"], v), bool(f["S"].get(v)))
        return None

    def _pasid_dev_tlb(self, v: int, qs: tuple[int, ...]) -> int | None:
        f = self.f[T_PASID_DEV_TLB]
        pasid = None if f["G"].get(v) else f["PASID"].get(v)
        self._send_ats_invalidation(f["SID"].get(v), pasid, _in_qword(f["ADDR"], v), bool(f["S"].get(v)))
        return None

    def _send_ats_invalidation(self, sid: int, pasid: int | None, addr: int, s: bool) -> None:
        """Forward an invalidation to the endpoint; ``pasid`` NO_PASID (requests without PASID), a PASID,
        or None (every PASID)."""
        chip = self.chip
        dev = chip.devices.get(sid)
        answered = True
        if dev is not None and dev.ats:
            answered = dev.invalidate(pasid, addr, s)
            if not answered:
                if self.pending_timeout is None:
                    self.pending_timeout = sid
            elif dev.spurious_completion:
                self._completion_error(sid)
        # else nothing behind this requester caches translations: the request completes at once
        if chip.invalidation_observers:
            chip.notify_invalidation(DeviceTlbInvalidation(sid, pasid, addr, s, answered))

    def _iec(self, v: int, qs: tuple[int, ...]) -> int | None:
        f = self.f[T_IEC]
        im = f["IM"].get(v)
        if im > self.mhmv and not self.qemu_desc:
            return IQEI_RESERVED
        chip = self.chip
        everything, index = not f["G"].get(v), f["IIDX"].get(v)
        if chip.intremap is not None:
            chip.intremap.invalidate(everything, index, im)
        if chip.invalidation_observers:
            chip.notify_invalidation(IecInvalidation(everything, index, im))
        return None

    def _wait(self, v: int, qs: tuple[int, ...]) -> int | None:
        f = self.f[T_WAIT]
        sw, iflag = f["SW"].get(v), f["IF"].get(v)
        if self.qemu_desc and sw == iflag:
            # QEMU 7.2 rejects a wait with neither SW nor IF, and aborts on both (modelled as IQE).
            return IQEI_NO_INFO
        if self.pending_timeout is not None:
            # This wait cannot complete before the device-TLB invalidation that timed out: aborted.
            self.abort_wait = True
            self.aborted_waits += 1
            return None
        if sw:
            mem = self.chip.mem
            addr = _in_qword(f["STATUS_ADDR"], v)
            if mem.is_ram(addr) and mem.is_ram(addr + 3):
                mem.write(addr, f["STATUS_DATA"].get(v).to_bytes(4, "little"))
            elif self.qemu_desc:
                return IQEI_NO_INFO
        if iflag:
            ics = self.regs.get("ICS")
            if not ics & _IWC:
                self.regs.set("ICS", ics | _IWC)
                self.chip.inv_event.fire()
        # FN (fence) and PD (drain page requests): every earlier descriptor and page request has already
        # completed in this synchronous model.
        return None

    def _piotlb(self, v: int, qs: tuple[int, ...]) -> int | None:
        if self.qemu_desc:
            return None  # accepted and ignored by QEMU 7.2
        f = self.f[T_PIOTLB]
        g, did, pasid = f["G"].get(v), f["DID"].get(v), f["PASID"].get(v)
        chip = self.chip
        c = chip.caches
        addr, am, ih = 0, 0, False
        if g == 2:
            c.piotlb_pasid(did, pasid)
        elif g == 3:
            am = f["AM"].get(v)
            if am > self.mamv:
                return IQEI_RESERVED
            addr, ih = _in_qword(f["ADDR"], v), bool(f["IH"].get(v))
            c.piotlb_page(did, pasid, addr, am, ih)
        else:
            return IQEI_RESERVED
        if chip.invalidation_observers:
            chip.notify_invalidation(PasidIotlbInvalidation(g, did, pasid, addr, am, ih))
        return None

    def _pasid_cache(self, v: int, qs: tuple[int, ...]) -> int | None:
        if self.qemu_desc:
            return None  # accepted and ignored by QEMU 7.2 (its PASID entries are never cached)
        f = self.f[T_PASID_CACHE]
        g, did, pasid = f["G"].get(v), f["DID"].get(v), f["PASID"].get(v)
        chip = self.chip
        c = chip.caches
        if g == 0:
            c.pasid_domain(did)
        elif g == 1:
            c.pasid_selective(did, pasid)
        elif g == 3:
            c.pasid_global()
        else:
            return IQEI_RESERVED
        if chip.invalidation_observers:
            chip.notify_invalidation(PasidCacheInvalidation(g, did, pasid))
        return None

    def _page_response(self, v: int, qs: tuple[int, ...]) -> int | None:
        f = self.f[T_PAGE_RESPONSE]
        prq = self.chip.prq
        if prq is None:
            return IQEI_TYPE
        private = (qs[2] | qs[3] << 64) if len(qs) == 4 else None
        pasid = f["PASID"].get(v) if f["PP"].get(v) else None
        prq.respond(f["RID"].get(v), pasid, f["PRGI"].get(v), f["RC"].get(v), private)
        return None

    # -- inspection ----------------------------------------------------------------------------
    @property
    def slot_bytes(self) -> int:
        return 32 if self.dw else 16

    @property
    def tail_index(self) -> int:
        """The tail the unit fetches up to, as a slot index (QEMU's internal copy under its profile)."""
        if self.qemu_regs:
            return self.tail
        return (self.regs.get("IQT") & _QT_MASK) >> (5 if self.dw else 4)

    def state(self) -> dict[str, int | bool]:
        """The queue's internal state, for tests and tools."""
        return {"enabled": self.enabled, "base": self.base, "entries": self.entries, "dw": self.dw,
                "head": self.head, "tail": self.tail_index, "last_type": self.last_type}


__all__ = ["InvalidationQueue", "make_descriptor", "LAYOUTS", "TYPE_NAMES", "T_CONTEXT", "T_IOTLB",
           "T_DEV_TLB", "T_IEC", "T_WAIT", "T_PIOTLB", "T_PASID_CACHE", "T_PASID_DEV_TLB", "T_PAGE_RESPONSE",
           "IQEI_NO_INFO", "IQEI_TAIL", "IQEI_FETCH", "IQEI_TYPE", "IQEI_RESERVED", "IQEI_DW", "IQEI_TAIL_ALIGN"]
