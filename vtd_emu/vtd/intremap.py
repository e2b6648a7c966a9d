"""Interrupt remapping: MSI decode, the interrupt-remapping table (IRTA latched by GCMD.SIRTP), IRTE
validation, source-id checks, the interrupt-entry cache and the IR faults 0x20-0x26.

A device's MSI write (address 0xFEEx_xxxx + data) goes through :meth:`InterruptRemapper.remap`.  With
GSTS.IRES=0 it is delivered unchanged.  A remappable-format MSI selects an IRTE by handle (+ subhandle);
the IRTE gives vector, destination and modes of the interrupt actually delivered.  Valid IRTEs are cached
by index until an interrupt-entry-cache invalidation removes them, as on hardware.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from ..spec import specs
from ..spec.consts import FR, GSTS, IRTA
from .entries import FPD_SHIFT, REASON_MASK
from .events import Interrupt
from .faults import reason_name

if TYPE_CHECKING:
    from .iommu import VtdIommu

_IRES = GSTS.IRES
_CFIS = GSTS.CFIS
_EIME, _IRT_SIZE = IRTA.EIME, IRTA.S
_IR_REQ_RSVD, _IR_INDEX_OVER, _IR_ENTRY_P = FR.IR_REQ_RSVD, FR.IR_INDEX_OVER, FR.IR_ENTRY_P
_IR_ROOT_INVAL, _IR_IRTE_RSVD, _IR_REQ_COMPAT, _IR_SID_ERR = (FR.IR_ROOT_INVAL, FR.IR_IRTE_RSVD, FR.IR_REQ_COMPAT,
                                                             FR.IR_SID_ERR)
_MSI_BASE = 0xFEE0_0000
_SQ_MASKS = (0xFFFF, 0xFFFB, 0xFFF9, 0xFFF8)
_CACHE_LIMIT = 1024
_XAPIC_DST_RSVD = (0xFF << 32) | (0xFFFF << 48)   # xAPIC IDs sit in DST bits 15:8 (abs 47:40)


class IrFault(NamedTuple):
    """A blocked interrupt.  ``recorded`` is False when IRTE.FPD suppressed it or logging dropped it."""

    reason: int
    name: str
    index: int | None  # type: ignore[assignment]  # the IRTE index; shadows tuple.index on purpose
    recorded: bool

    def __bool__(self) -> bool:  # falsy like a DMA Fault, so `if iommu.remap_interrupt(...)` reads naturally
        return False


class _Irte(NamedTuple):
    fpd: int
    dm: int
    rh: int
    tm: int
    dlm: int
    vector: int
    dst: int
    sid: int
    sq: int
    svt: int


class InterruptRemapper:
    """The interrupt-remapping half of one unit (present when ECAP.IR=1)."""

    def __init__(self, chip: "VtdIommu") -> None:
        self.chip = chip
        cfg = chip.cfg
        lay = specs().structure("irte")
        self.f = {n: lay.field(n) for n in ("P", "FPD", "DM", "RH", "TM", "DLM", "IM", "V", "DST", "SID", "SQ",
                                            "SVT")}
        self.rsvd = lay.qword_masks(lay.reserved_mask())
        self.eim = bool(cfg.ecap_field("EIM"))
        self.flush_on_sirtp = bool(cfg.cap_field("ESIRTPS"))
        self.compat_passthrough = chip.quirks.ignore_cfi
        self.faults_unrecorded = chip.quirks.ir_faults_unrecorded
        self.lax_rsvd = chip.quirks.irte_qemu_reserved
        self.cache: dict[int, _Irte] = {}
        self.remapped = 0
        self.blocked = 0

    # -- interrupt-entry cache -------------------------------------------------------------------
    def table_latched(self) -> None:
        """GCMD.SIRTP latched a new IRTA: with CAP.ESIRTPS that also empties the interrupt-entry cache."""
        if self.flush_on_sirtp:
            self.cache.clear()

    def invalidate(self, all_entries: bool, index: int = 0, im: int = 0) -> None:
        """Interrupt-entry cache invalidation: everything, or entries index .. index + 2^im - 1."""
        if all_entries:
            self.cache.clear()
            return
        hi = index + (1 << im)
        for i in [i for i in self.cache if index <= i < hi]:
            del self.cache[i]

    # -- remapping -------------------------------------------------------------------------------
    def remap(self, sid: int, addr: int, data: int) -> Interrupt | IrFault:
        """Deliver (or block) the MSI that requester ``sid`` wrote."""
        chip = self.chip
        gsts = chip.regs.get("GSTS")
        addr &= (1 << 64) - 1
        data &= 0xFFFF_FFFF
        if not gsts & _IRES:
            return self._send(Interrupt("passthrough", addr, data, data & 0xFF, (addr >> 12) & 0xFF))
        irta = chip.irta_latched
        eime = bool(irta & _EIME) and self.eim
        if not addr & 0x10:
            # Compatibility format: allowed only in xAPIC mode with GCMD.CFI set (QEMU: always).
            if self.compat_passthrough or (not eime and gsts & _CFIS):
                return self._send(Interrupt("passthrough", addr, data, data & 0xFF, (addr >> 12) & 0xFF))
            return self._fault(sid, _IR_REQ_COMPAT, None, 0)
        handle = ((addr >> 5) & 0x7FFF) | ((addr >> 2) & 1) << 15
        shv = (addr >> 3) & 1
        index = handle + (data & 0xFFFF if shv else 0)
        if addr >> 32 or (addr >> 20) != 0xFEE or (shv and data >> 16):
            return self._fault(sid, _IR_REQ_RSVD, index, 0)
        if index >= 2 << (irta & _IRT_SIZE):
            return self._fault(sid, _IR_INDEX_OVER, index, 0)
        e = self.cache.get(index)
        if e is None:
            got = self._load(irta, index, eime)
            if isinstance(got, int):
                return self._fault(sid, got & REASON_MASK, index, got >> FPD_SHIFT)
            e = got
            if len(self.cache) >= _CACHE_LIMIT:
                del self.cache[next(iter(self.cache))]
            self.cache[index] = e
        if not self._sid_ok(sid, e):
            return self._fault(sid, _IR_SID_ERR, index, e.fpd)
        dest = e.dst if eime else (e.dst >> 8) & 0xFF
        # x2APIC destinations above 8 bits go in address bits 63:40, the x86 extended-destination MSI form
        # (Linux arch_msi_msg_addr_hi.destid_8_31; QEMU's vtd_generate_msi_message and APIC agree).
        out_addr = _MSI_BASE | (dest & 0xFF) << 12 | e.rh << 3 | e.dm << 2 | (dest & ~0xFF) << 32
        out_data = e.vector | e.dlm << 8 | 1 << 14 | e.tm << 15
        self.remapped += 1
        return self._send(Interrupt("remapped", out_addr, out_data, e.vector, dest))

    def _load(self, irta: int, index: int, eime: bool) -> "_Irte | int":
        """The IRTE, or reason | FPD << FPD_SHIFT when it cannot be used."""
        rd = self.chip.mem.read_u64
        base = irta & ~0xFFF & ((1 << self.chip.cfg.haw) - 1)
        lo, hi = rd(base + 16 * index), rd(base + 16 * index + 8)
        if lo < 0 or hi < 0:
            return _IR_ROOT_INVAL
        f = self.f
        v = lo | hi << 64
        fpd = f["FPD"].get(v)
        if not f["P"].get(v):
            return _IR_ENTRY_P | fpd << FPD_SHIFT
        # Posted format (IM=1) is not modelled (no preset has CAP.PI): its bits are reserved here.
        if lo & self.rsvd[0] or hi & self.rsvd[1] or (
                not self.lax_rsvd and (f["IM"].get(v) or (not eime and v & _XAPIC_DST_RSVD))):
            return _IR_IRTE_RSVD | fpd << FPD_SHIFT
        return _Irte(fpd, f["DM"].get(v), f["RH"].get(v), f["TM"].get(v), f["DLM"].get(v), f["V"].get(v),
                     f["DST"].get(v), f["SID"].get(v), f["SQ"].get(v), f["SVT"].get(v))

    @staticmethod
    def _sid_ok(sid: int, e: _Irte) -> bool:
        if e.svt == 0:
            return True
        if e.svt == 1:
            m = _SQ_MASKS[e.sq]
            return (sid & m) == (e.sid & m)
        if e.svt == 2:
            # Bus range: SID[15:8] is the first bus, SID[7:0] the last.
            return (e.sid >> 8) <= (sid >> 8) <= (e.sid & 0xFF)
        return False  # SVT=3 is reserved: verification cannot pass

    def _fault(self, sid: int, reason: int, index: int | None, fpd: int) -> IrFault:
        self.blocked += 1
        if self.faults_unrecorded:
            return IrFault(reason, reason_name(reason), index, False)
        fi = ((index or 0) & 0xFFFF) << 48
        # T=0 and no PASID: an interrupt request is neither a read nor a PASID-tagged request.
        recorded = self.chip.faults.report(sid, fi, reason, fpd, True)
        return IrFault(reason, reason_name(reason), index, bool(recorded))

    def _send(self, irq: Interrupt) -> Interrupt:
        return self.chip.deliver_interrupt(irq)


__all__ = ["InterruptRemapper", "IrFault"]
