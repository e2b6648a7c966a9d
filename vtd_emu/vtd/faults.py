"""Fault reasons (numbered exactly as the VT-d specification; the table is ``specs/faults.yaml``) and
primary fault logging into the FRCD registers."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

from ..spec import specs
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

# FSTS bits
PFO, PPF, AFO, APF, IQE, ICE, ITE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6
FRI_SHIFT = 8
_STATUS = PFO | PPF | AFO | APF | IQE | ICE | ITE
_F = 1 << 127


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
        regs.handlers["FSTS"] = self._fsts_written
        regs.handlers["FRCD"] = self._frcd_written
        regs.handlers["FECTL"] = lambda i, old, new, v, m: event.ctl_written(old, new)

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
                if hi >> 63 and (hi & 0xFFFF) == sid:
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
        hi = (sid & 0xFFFF) | (int(page_request) << 28) | (int(priv) << 29) | (int(exe) << 30)
        hi |= int(pasid is not None) << 31
        hi |= (reason & 0xFF) << 32 | (pv_field & 0xFFFFF) << 40 | (int(not is_write) << 62) | (1 << 63)
        regs.set("FRCD", (hi << 64) | (addr & ~0xFFF & 0xFFFF_FFFF_FFFF_FFFF), idx)
        self.next_index = (idx + 1) % self.nfr
        self.recorded += 1
        if not fsts & PPF:
            regs.set("FSTS", (fsts & ~(0xFF << FRI_SHIFT)) | PPF | (idx << FRI_SHIFT))
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
                pp = (hi >> 31) & 1
                out.append(FaultRecord((hi >> 32) & 0xFF, hi & 0xFFFF, v & 0xFFFF_FFFF_FFFF_F000,
                                       not (hi >> 62) & 1, ((hi >> 40) & 0xFFFFF) if pp else None,
                                       bool((hi >> 29) & 1), bool((hi >> 30) & 1)))
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
