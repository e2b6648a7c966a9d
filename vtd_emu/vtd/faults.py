"""Fault reasons (numbered exactly as the VT-d specification; the table is ``specs/faults.yaml``), the one
fault-report path (QEMU's code remap, FPD suppression) and primary fault logging into the FRCD registers."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

from ..spec import specs
from ..spec.consts import FR, FRCD, FSTS
from .access import READ, WRITE
from .config import VtdConfig
from .events import EventUnit
from .regs import RegisterFile

if TYPE_CHECKING:
    FaultReason = IntEnum
else:
    FaultReason = IntEnum("FaultReason", {f.name: code for code, f in sorted(specs().faults.items())})
FaultReason.__doc__ = "VT-d fault reason codes, loaded from specs/faults.yaml."

QUALIFIED: frozenset[int] = frozenset(code for code, f in specs().faults.items() if f.qualified)
"""Codes that FPD suppresses."""

PFO, PPF, AFO, APF, IQE, ICE, ITE = FSTS.PFO, FSTS.PPF, FSTS.AFO, FSTS.APF, FSTS.IQE, FSTS.ICE, FSTS.ITE
FRI_SHIFT = FSTS.FRI_LO
_FRI = FSTS.FRI
_STATUS = PFO | PPF | AFO | APF | IQE | ICE | ITE
_F = FRCD.F

# How QEMU 7.2 reports scalable-mode conditions (quirk sm_legacy_fault_codes): the legacy code it uses
# instead; None = READ or WRITE by the access.
QEMU_SM_CODES: dict[int, int | None] = {
    FR.SM_ROOT_READ_ERR: FR.ROOT_TABLE_INV, FR.SM_ROOT_ENTRY_P: FR.ROOT_ENTRY_P,
    FR.SM_ROOT_ENTRY_RSVD: FR.ROOT_ENTRY_RSVD, FR.SM_CONTEXT_READ_ERR: FR.CONTEXT_TABLE_INV,
    FR.SM_CONTEXT_ENTRY_P: FR.CONTEXT_ENTRY_P, FR.SM_CONTEXT_ENTRY_RSVD: FR.CONTEXT_ENTRY_RSVD,
    FR.SM_CONTEXT_ENTRY_INV: FR.CONTEXT_ENTRY_INV,
    # QEMU has one "PASID table invalid" code for every PASID directory/table condition.
    FR.SM_PASID_BEYOND_PDTS: FR.SM_PASID_TABLE_READ_ERR, FR.SM_PASID_DIR_READ_ERR: FR.SM_PASID_TABLE_READ_ERR,
    FR.SM_PASID_DIR_ENTRY_P: FR.SM_PASID_TABLE_READ_ERR, FR.SM_PASID_DIR_ENTRY_RSVD: FR.SM_PASID_TABLE_READ_ERR,
    FR.SM_PASID_TABLE_READ_ERR: FR.SM_PASID_TABLE_READ_ERR, FR.SM_PASID_ENTRY_P: FR.SM_PASID_TABLE_READ_ERR,
    FR.SM_PASID_ENTRY_RSVD: FR.SM_PASID_TABLE_READ_ERR, FR.SM_PASID_ENTRY_INV: FR.SM_PASID_TABLE_READ_ERR,
    FR.SM_SS_READ_ERR: FR.PAGING_ENTRY_INV, FR.SM_SS_ENTRY_NP: None, FR.SM_SS_ENTRY_RSVD: FR.PAGING_ENTRY_RSVD,
    FR.SM_SSPTPTR_INV: FR.CONTEXT_ENTRY_INV, FR.SM_BEYOND_HW_MAX: FR.ADDR_BEYOND_MGAW,
    FR.SM_BEYOND_SS_MAX: FR.ADDR_BEYOND_MGAW,
}
_FR_WRITE, _FR_READ = FR.WRITE, FR.READ

# FRCD packing (high qword = bits 127:64)
_SID_LO, _SID_MAX = FRCD.SID_LO - 64, FRCD.SID_MAX
_T2_LO, _PRIV_LO, _EXE_LO, _PP_LO = FRCD.T2_LO - 64, FRCD.PRIV_LO - 64, FRCD.EXE_LO - 64, FRCD.PP_LO - 64
_FR_LO, _FR_MAX, _PV_LO, _PV_MAX = FRCD.FR_LO - 64, FRCD.FR_MAX, FRCD.PV_LO - 64, FRCD.PV_MAX
_T_LO, _F_LO = FRCD.T_LO - 64, FRCD.F_LO - 64
_FI = FRCD.FI


def reason_name(code: int) -> str:
    f = specs().faults.get(code)
    return f.name if f is not None else f"UNKNOWN_{code:#x}"


class FaultRecord(NamedTuple):
    """A decoded FRCD (or a fault the caller was told about)."""

    reason: int
    sid: int
    addr: int
    is_write: bool
    pasid: int | None
    priv: bool = False
    exe: bool = False

    @property
    def name(self) -> str:
        return reason_name(self.reason)


class FaultUnit:
    """Primary fault logging: NFR+1 FRCDs used round robin, PPF/FRI/PFO, optional same-source collapse."""

    def __init__(self, cfg: VtdConfig, regs: RegisterFile, event: EventUnit) -> None:
        self.cfg = cfg
        self.regs = regs
        self.event = event
        self.nfr = cfg.nfr
        self.next_index = 0
        self.collapse = cfg.fault_collapse or cfg.quirks.fault_collapse_same_sid
        self.gate = (PPF | PFO | IQE) if cfg.quirks.qemu_fault_event_gating else _STATUS
        # QEMU re-evaluates FECTL.IP only when FSTS is written, not when a fault record is cleared.
        self.ip_on_fsts_only = cfg.quirks.qemu_fault_event_gating
        self.recorded = 0
        self.dropped = 0
        self.suppressed = 0
        """Faults FPD kept out of the FRCDs (DMA, page requests and interrupts alike)."""
        self.remap_sm_codes = cfg.quirks.sm_legacy_fault_codes
        regs.handlers["FSTS"] = self._fsts_written
        regs.handlers["FRCD"] = self._frcd_written
        regs.handlers["FECTL"] = lambda i, old, new, v, m: event.ctl_written(old, new)

    def reason(self, reason: int, req: int) -> int:
        """The code the unit reports for ``reason`` met by a request with access bits ``req`` (QEMU 7.2
        reports most scalable-mode conditions with legacy codes)."""
        if self.remap_sm_codes and reason in QEMU_SM_CODES:
            mapped = QEMU_SM_CODES[reason]
            return mapped if mapped is not None else (_FR_WRITE if req & WRITE else _FR_READ)
        return reason

    def report(self, sid: int, addr: int, reason: int, fpd: int, is_write: bool, pasid: int | None = None,
               priv: bool = False, exe: bool = False, pv: int | None = None,
               page_request: bool = False) -> bool | None:
        """The one way a fault reaches the FRCDs: None if FPD suppressed it (counted in ``suppressed``),
        else whether it was recorded (see :meth:`record`)."""
        if fpd and reason in QUALIFIED:
            self.suppressed += 1
            return None
        return self.record(sid, addr, reason, is_write, pasid, priv, exe, pv, page_request)

    def record(self, sid: int, addr: int, reason: int, is_write: bool, pasid: int | None = None,
               priv: bool = False, exe: bool = False, pv: int | None = None, page_request: bool = False) -> bool:
        """Log one primary fault; False if it was dropped (overflow or collapse).

        ``pasid`` None means the request had no PASID (PP=0); ``pv`` forces the PV field (QEMU quirks);
        ``page_request`` sets T2 (with ``is_write`` True, (T2, T1) = 10 marks a page request)."""
        regs = self.regs
        fsts = regs.get("FSTS")
        if fsts & PFO:
            self.dropped += 1
            return False
        if self.collapse:
            for i in range(self.nfr):
                hi = regs.get("FRCD", i) >> 64
                if hi >> _F_LO and (hi >> _SID_LO) & _SID_MAX == sid:
                    self.dropped += 1
                    return False
        idx = self.next_index
        if regs.get("FRCD", idx) & _F:
            regs.set("FSTS", fsts | PFO)
            self.dropped += 1
            if not fsts & self.gate:
                self.event.fire()
            return False
        pv_field = (pasid if pasid is not None else 0) if pv is None else pv
        hi = (sid & _SID_MAX) << _SID_LO | int(page_request) << _T2_LO | int(priv) << _PRIV_LO | int(exe) << _EXE_LO
        hi |= int(pasid is not None) << _PP_LO
        hi |= (reason & _FR_MAX) << _FR_LO | (pv_field & _PV_MAX) << _PV_LO | int(not is_write) << _T_LO | 1 << _F_LO
        regs.set("FRCD", (hi << 64) | (addr & _FI), idx)
        self.next_index = (idx + 1) % self.nfr
        self.recorded += 1
        if not fsts & PPF:
            regs.set("FSTS", (fsts & ~_FRI) | PPF | (idx << FRI_SHIFT))
            if not fsts & self.gate:
                self.event.fire()
        return True

    def set_status(self, bits: int) -> None:
        """Set FSTS status bits (IQE, ICE, ITE...) and raise the fault event if none was pending."""
        fsts = self.regs.get("FSTS")
        self.regs.set("FSTS", fsts | bits)
        if not fsts & self.gate:
            self.event.fire()

    def records(self) -> list[FaultRecord]:
        """Every FRCD with F=1, in index order (decoded; cold path)."""
        out = []
        for i in range(self.nfr):
            v = self.regs.get("FRCD", i)
            if v & _F:
                hi = v >> 64
                pp = (hi >> _PP_LO) & 1
                out.append(FaultRecord((hi >> _FR_LO) & _FR_MAX, (hi >> _SID_LO) & _SID_MAX, v & _FI,
                                       not (hi >> _T_LO) & 1, ((hi >> _PV_LO) & _PV_MAX) if pp else None,
                                       bool((hi >> _PRIV_LO) & 1), bool((hi >> _EXE_LO) & 1)))
        return out

    def reset_index(self) -> None:
        self.next_index = 0

    # -- register side effects -------------------------------------------------------------------
    def _frcd_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        self._update_ppf()

    def _fsts_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        self._maybe_clear_ip()

    def _update_ppf(self) -> None:
        pending = any(self.regs.get("FRCD", i) & _F for i in range(self.nfr))
        fsts = self.regs.get("FSTS")
        self.regs.set("FSTS", fsts | PPF if pending else fsts & ~PPF)
        if not self.ip_on_fsts_only:
            self._maybe_clear_ip()

    def _maybe_clear_ip(self) -> None:
        if not self.regs.get("FSTS") & _STATUS:
            self.event.clear_pending()
