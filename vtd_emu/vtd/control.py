"""Register side effects of the unit: the GCMD/GSTS handshake and register-based invalidation (CCMD,
IOTLB + IVA), and the invalidation entry points the invalidation queue shares with them.

Every invalidation performed is also handed, decoded, to the invalidation observers
(:mod:`.descriptors`): the cold-path hook a vIOMMU bridge forwards guest invalidations through.
"""

from __future__ import annotations

from typing import Callable

from ..spec.consts import CCMD, GCMD, GSTS, ICS, IOTLB, IVA, RTADDR
from .caches import sid_matches
from .descriptors import ContextInvalidation, Invalidation, IotlbInvalidation
from .state import ChipState

TE, SRTP, SFL, EAFL, WBF, QIE, IRE, SIRTP, CFI = (GCMD.TE, GCMD.SRTP, GCMD.SFL, GCMD.EAFL, GCMD.WBF, GCMD.QIE,
                                                  GCMD.IRE, GCMD.SIRTP, GCMD.CFI)
# GSTS mirrors GCMD bit for bit (TES, RTPS, FLS, AFLS, WBFS, QIES, IRES, IRTPS, CFIS).
assert (GSTS.TES, GSTS.RTPS, GSTS.QIES, GSTS.IRES, GSTS.CFIS) == (TE, SRTP, QIE, IRE, CFI)
_PERSISTENT = TE | EAFL | QIE | IRE | CFI

_ICC, _CAIG, _CAIG_LO = CCMD.ICC, CCMD.CAIG, CCMD.CAIG_LO
_CIRG_LO, _CIRG_MAX = CCMD.CIRG_LO, CCMD.CIRG_MAX
_CC_DID_MAX, _CC_SID_LO, _CC_SID_MAX, _CC_FM_LO, _CC_FM_MAX = CCMD.DID_MAX, CCMD.SID_LO, CCMD.SID_MAX, CCMD.FM_LO, CCMD.FM_MAX
_IVT, _IAIG, _IAIG_LO = IOTLB.IVT, IOTLB.IAIG, IOTLB.IAIG_LO
_IIRG_LO, _IIRG_MAX, _IO_DID_LO, _IO_DID_MAX = IOTLB.IIRG_LO, IOTLB.IIRG_MAX, IOTLB.DID_LO, IOTLB.DID_MAX
_IVA_ADDR, _IVA_AM, _IVA_IH = IVA.ADDR, IVA.AM, IVA.IH
_TTM_LO, _TTM_MAX = RTADDR.TTM_LO, RTADDR.TTM_MAX
_TTM_SCALABLE = 1
_IWC = ICS.IWC


class RegisterControl(ChipState):
    """GCMD, CCMD, IOTLB/IVA and ICS side effects, and the invalidations they perform."""

    _iva: int

    def add_invalidation_observer(self, observer: Callable[[Invalidation], None]) -> None:
        """Call ``observer`` with every invalidation the unit performs from now on (register-based and
        queued), after the unit's caches were invalidated."""
        self.invalidation_observers.append(observer)

    def remove_invalidation_observer(self, observer: Callable[[Invalidation], None]) -> None:
        self.invalidation_observers.remove(observer)

    def notify_invalidation(self, inv: Invalidation) -> None:
        for obs in list(self.invalidation_observers):
            obs(inv)

    # -- GCMD handshake ----------------------------------------------------------------------------
    def _gcmd_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        regs = self.regs
        gsts = regs.get("GSTS")
        changed = (value ^ gsts) & _PERSISTENT
        if changed & TE and self.cfg.dma_translation:
            self._set_te(bool(value & TE))
        if value & SRTP:
            self._latch_root()
        if changed & QIE:
            self._set_qie(bool(value & QIE))
        if changed & IRE and self.ecap_ir:
            self._set_status(IRE, bool(value & IRE))
        if changed & CFI and not self.quirks.ignore_cfi:
            self._set_status(CFI, bool(value & CFI))
        if changed & EAFL and self.cfg.cap_field("AFL"):
            self._set_status(EAFL, bool(value & EAFL))
        if value & SIRTP:
            self._latch_irta()
        if value & SFL and self.cfg.cap_field("AFL"):
            self._set_status(SFL, True)
        # WBF completes at once: WBFS never reads 1.

    def _set_status(self, bit: int, on: bool) -> None:
        gsts = self.regs.get("GSTS")
        self.regs.set("GSTS", gsts | bit if on else gsts & ~bit)

    def _set_te(self, on: bool) -> None:
        self._set_status(TE, on)
        self.te = on
        q = self.quirks
        if q.srtp_te_flush_caches or (not on and self.scalable_unit):
            # The spec: disabling translation on a scalable-capable unit invalidates its caches.
            self.caches.flush_all()
        self.caches.front.clear()
        self.pt_bypass.clear()
        if not on and q.te_off_resets_fri:
            self.faults.reset_index()

    def _latch_root(self) -> None:
        rt = self.regs.get("RTADDR")
        ttm = (rt >> _TTM_LO) & _TTM_MAX
        self.root_addr = rt & self.addr_mask
        if self.quirks.rtaddr_smt_bit:
            # QEMU 7.2 reads bit 10 alone ("SMT"), and only on a scalable-capable unit.
            self.root_scalable = self.scalable_unit and bool(ttm & _TTM_SCALABLE)
            self.root_invalid = False
        else:
            # 00 legacy; 01 scalable needs ECAP.SMTS; 10 is reserved and 11 (abort-DMA) is not
            # implemented: an unsupported mode is invalid root-table programming (0x30 on every request).
            self.root_scalable = ttm == _TTM_SCALABLE and self.scalable_unit
            self.root_invalid = ttm >= 2 or (ttm == _TTM_SCALABLE and not self.scalable_unit)
        self._set_status(SRTP, True)
        if self.quirks.srtp_te_flush_caches or self.cfg.cap_field("ESRTPS"):
            self.caches.flush_all()
        self.caches.front.clear()
        self.pt_bypass.clear()

    def _set_qie(self, on: bool) -> None:
        if self.qi is not None:
            self.qi.set_enabled(on)  # the queue owns QIES: it may refuse (QEMU) or start fetching at once
            return
        self._set_status(QIE, on)
        if not on:
            self.regs.set("IQH", 0)

    def _latch_irta(self) -> None:
        self.irta_latched = self.regs.get("IRTA")
        self._set_status(SIRTP, True)
        if self.intremap is not None:
            self.intremap.table_latched()

    def _ics_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        if not new & _IWC:
            self.inv_event.clear_pending()

    # -- register-based invalidation -------------------------------------------------------------
    def _ccmd_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        if not value & _ICC:
            return
        if self.regs.get("GSTS") & QIE:
            return  # register-based invalidation is ignored while queued invalidation is on
        v = (new & ~wmask) | (value & wmask)  # write-only fields are only in what was written
        cirg = (v >> _CIRG_LO) & _CIRG_MAX
        did = v & _CC_DID_MAX
        sid = (v >> _CC_SID_LO) & _CC_SID_MAX
        fm = (v >> _CC_FM_LO) & _CC_FM_MAX
        caig = self.invalidate_context(cirg, did, sid, fm)
        self.regs.set("CCMD", (new & ~_ICC & ~_CAIG) | (caig << _CAIG_LO))

    def invalidate_context(self, granularity: int, did: int = 0, sid: int = 0, fm: int = 0, *,
                           queued: bool = False) -> int:
        """Context-cache invalidation (1 global, 2 domain, 3 device); returns the granularity done."""
        done = self._invalidate_context(granularity, did, sid, fm)
        if done and self.invalidation_observers:
            self.notify_invalidation(ContextInvalidation(granularity, did, sid, fm, done, queued))
        return done

    def _invalidate_context(self, granularity: int, did: int, sid: int, fm: int) -> int:
        c = self.caches
        if granularity == 1 or (granularity == 2 and self.quirks.domain_cc_as_global):
            c.context_global()
            self.pt_bypass.clear()
            return 1
        if granularity == 2:
            c.context_domain(did)
            self.pt_bypass.clear()
            return 2
        if granularity == 3:
            c.context_device(sid, fm)
            self.pt_bypass = {s for s in self.pt_bypass if not sid_matches(s, sid, fm)}
            return 3
        return 0

    def _iva_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        self._iva = (self._iva & ~wmask) | (value & wmask)

    def _iotlb_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        if not value & _IVT:
            return
        if self.regs.get("GSTS") & QIE:
            return
        iirg = (new >> _IIRG_LO) & _IIRG_MAX
        did = (new >> _IO_DID_LO) & _IO_DID_MAX
        iva = self._iva
        iaig = self.invalidate_iotlb(iirg, did, iva & _IVA_ADDR, iva & _IVA_AM, bool(iva & _IVA_IH))
        self.regs.set("IOTLB", (new & ~_IVT & ~_IAIG) | (iaig << _IAIG_LO))

    def invalidate_iotlb(self, granularity: int, did: int = 0, addr: int = 0, am: int = 0, ih: bool = False, *,
                         queued: bool = False) -> int:
        """IOTLB invalidation (1 global, 2 domain, 3 page-selective); returns the granularity done."""
        done = self._invalidate_iotlb(granularity, did, addr, am, ih)
        if done and self.invalidation_observers:
            self.notify_invalidation(IotlbInvalidation(granularity, did, addr, am, ih, done, queued))
        return done

    def _invalidate_iotlb(self, granularity: int, did: int, addr: int, am: int, ih: bool) -> int:
        c = self.caches
        if granularity == 1:
            c.iotlb_global()
            return 1
        if granularity == 2:
            c.iotlb_domain(did)
            return 2
        if granularity == 3:
            if am > self.cfg.cap_field("MAMV"):
                return 0
            if not self.cfg.cap_field("PSI"):
                c.iotlb_domain(did)
                return 2
            c.iotlb_page(did, addr, am, ih)
            return 3
        return 0


__all__ = ["RegisterControl", "TE", "SRTP", "SFL", "EAFL", "WBF", "QIE", "IRE", "SIRTP", "CFI"]
