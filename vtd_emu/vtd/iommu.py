"""The VT-d unit: register side effects, root/context/PASID decode, translation and DMA.

``VtdIommu.translate`` is the public, friendly call; ``xlate`` is the hot path used by DMA and replay:
a front-cache probe (one dict lookup) and, on a miss, the context cache → PASID cache → IOTLB → walk
chain.  Faults travel as negative ints and are recorded (or suppressed by FPD) here, never raised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from ..memory import Memory
from ..spec import specs
from .access import EXEC, NO_PASID, PRIV, READ, REQ_W, REQ_X, WRITE, describe, ss_allowed
from .caches import (E_ALIVE, E_ALLOWED, E_KIND, E_SHIFT, KIND_FS, KIND_NAMES, KIND_NESTED, KIND_PT, KIND_SS,
                     Caches, iotlb_key, sid_matches)
from .config import VtdConfig
from .events import EventUnit, Interrupt
from .faults import QUALIFIED, FaultRecord, FaultUnit, reason_name
from .intremap import InterruptRemapper, IrFault
from .prq import PageRequestStatus, PageRequestUnit, PageResponse
from .qi import InvalidationQueue
from .regs import RegisterFile
from .walk import (ADDR_MASK, DIRTY_OK, F_EAFE, F_ERE, F_NXE, F_SMEP, F_SRE, F_WPE, SS_CODES_LEGACY,
                   SS_CODES_SM, Geometry, TraceEntry, canonical, fs_walk, ss_walk)

if TYPE_CHECKING:
    from .ats import AtsCompletion, AtsDevice

# GCMD / GSTS bits
TE, SRTP, SFL, EAFL, WBF, QIE, IRE, SIRTP, CFI = (1 << 31, 1 << 30, 1 << 29, 1 << 28, 1 << 27, 1 << 26,
                                                  1 << 25, 1 << 24, 1 << 23)
_PERSISTENT = TE | EAFL | QIE | IRE | CFI
_ONE_SHOT = SRTP | SFL | WBF | SIRTP

INTR_LO, INTR_HI = 0xFEE0_0000, 0xFEF0_0000
DROPPED = -(1 << 16)
"""xlate result of a request dropped without a fault (QEMU's cached-permission quirk)."""

# A fault travels as an int: reason | FPD << 8 | WALK << 9 | PASID used << 10.  WALK marks faults met
# once the translation structures were decoded (paging faults), which is what QEMU's PP/PV quirks key on.
_FPD_SHIFT, _WALK = 8, 1 << 9

_CTX_LEGACY, _CTX_SM = 0, 1
_TT_PT = 2
_PGTT_FS, _PGTT_SS, _PGTT_NESTED, _PGTT_PT = 1, 2, 3, 4

# How QEMU 7.2 reports scalable-mode conditions (quirk sm_legacy_fault_codes); None = access dependent.
_QEMU_SM_CODES: dict[int, int | None] = {
    0x38: 0x08, 0x39: 0x01, 0x3A: 0x0A, 0x40: 0x09, 0x41: 0x02, 0x42: 0x0B, 0x43: 0x03,
    0x46: 0x58, 0x50: 0x58, 0x51: 0x58, 0x52: 0x58, 0x58: 0x58, 0x59: 0x58, 0x5A: 0x58, 0x5B: 0x58,
    0x78: 0x07, 0x79: None, 0x7A: 0x0C, 0x7B: 0x03, 0x83: 0x04, 0x84: 0x04,
}


# IOTLB probes (size index, page mask) for each set of page sizes the IOTLB may hold (Caches.sizes_held)
_PROBES = [tuple((i, ~((1 << (12 + 9 * i)) - 1)) for i in range(4) if held >> i & 1) for held in range(16)]


class Translation(NamedTuple):
    """A successful translation of one address."""

    addr: int
    page_size: int
    perms: str
    kind: str


class Fault(NamedTuple):
    """A translation that faulted.  ``recorded`` is False when FPD suppressed it or logging dropped it."""

    reason: int
    name: str
    addr: int
    recorded: bool

    def __bool__(self) -> bool:  # a Fault is falsy so `if iommu.translate(...)` reads naturally
        return False


class DmaResult(NamedTuple):
    """Outcome of a DMA: bytes read (reads), and every fault reason met, one per faulting chunk."""

    data: bytes
    faults: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not self.faults


class StaleHit(NamedTuple):
    """Sanitizer report: a translation whose cached answer differs from what memory says now — a guest
    changed a structure without the invalidation the spec requires (or relies on one it never did)."""

    sid: int
    pasid: int | None
    iova: int
    access: str
    cached: int
    """What the unit answered: output address, or -reason."""
    fresh: int
    """What an uncached walk of memory answers now: output address, or -reason."""


class WalkReport(NamedTuple):
    """Everything one uncached walk touched, for inspection (``vtd-emu walk``)."""

    steps: list[tuple[str, int, int, int | tuple[int, ...]]]
    """(structure name, level or 0, address, value or qwords)"""
    result: Translation | Fault


class VtdIommu:
    """One VT-d remapping unit over a memory (host RAM for a physical unit, guest RAM for a vIOMMU)."""

    def __init__(self, mem: Memory, config: VtdConfig | str = "modern", *,
                 on_interrupt: Callable[[Interrupt], None] | None = None, sanitize: bool = False) -> None:
        cfg = VtdConfig.preset(config) if isinstance(config, str) else config.validated()
        self.cfg = cfg
        self.mem = mem
        self.quirks = q = cfg.quirks
        self.interrupts: list[Interrupt] = []
        self.on_interrupt = on_interrupt
        self.regs = RegisterFile(cfg)
        # The upper MSI address register is only used by units with extended interrupt mode.
        uaddr = not q.qemu_register_widths and bool(cfg.ecap_field("EIM"))
        self.fault_event = EventUnit(self.regs, "FE", "fault", self._interrupt,
                                     data_bits=16 if q.qemu_register_widths else 32, uaddr_used=uaddr)
        self.inv_event = EventUnit(self.regs, "IE", "invalidation", self._interrupt, uaddr_used=uaddr)
        self.prq_event = EventUnit(self.regs, "PE", "page-request", self._interrupt, uaddr_used=uaddr)
        self.faults = FaultUnit(cfg, self.regs, self.fault_event)
        self.caches = Caches(iotlb_size=cfg.iotlb_size, context_size=cfg.context_cache_size,
                             pasid_size=cfg.pasid_cache_size, psc_size=0 if q.no_psc else cfg.psc_size,
                             flush_when_full=q.iotlb_capacity_flush, psi_mask_bits=8 if q.psi_mask_8bit else None)
        # The front memo dict is only ever cleared, never replaced: bind its get once for the hot path.
        self._front_get = self.caches.front.get
        self.suppressed = 0
        self._pt_bypass: set[int] = set()
        self._last_entry: list[int] | None = None
        self._iva = 0
        self._compile()
        # Translation state latched by GCMD
        self.te = False
        self.root_addr = 0
        self.root_scalable = False
        self.root_invalid = False
        self.irta_latched = 0
        self.stale_hits: list[StaleHit] = []
        if sanitize:
            self.enable_sanitizer()
        h = self.regs.handlers
        h["GCMD"] = self._gcmd_written
        h["CCMD"] = self._ccmd_written
        h["IVA"] = self._iva_written
        h["IOTLB"] = self._iotlb_written
        h["IECTL"] = lambda i, old, new, v, m: self.inv_event.ctl_written(old, new)
        h["PECTL"] = lambda i, old, new, v, m: self.prq_event.ctl_written(old, new)
        h["ICS"] = self._ics_written
        # Queued invalidation, page requests and interrupt remapping install their own register handlers.
        self.devices: dict[int, AtsDevice] = {}
        self.unmatched_responses: list[PageResponse] = []
        self.qi = InvalidationQueue(self) if cfg.ecap_field("QI") else None
        self.prq = PageRequestUnit(self) if cfg.ecap_field("PRS") else None
        self.intremap = InterruptRemapper(self) if self.ecap_ir else None

    # -- configuration compiled to masks -----------------------------------------------------------
    def _compile(self) -> None:
        cfg, q, sp = self.cfg, self.quirks, specs()
        self.haw = haw = cfg.haw
        self.mgaw = cfg.mgaw
        self.fi_mask = (1 << 64) - 1 if q.fault_fi_full_address else (1 << (self.mgaw + 1)) - 1
        self.sagaw = cfg.cap_field("SAGAW")
        sllps = cfg.cap_field("SLLPS")
        self.ecap_dt = bool(cfg.ecap_field("DT"))
        self.ecap_pt = bool(cfg.ecap_field("PT"))
        self.ecap_rps = bool(cfg.ecap_field("RPS"))
        self.ecap_ir = bool(cfg.ecap_field("IR"))
        self.use_rid_pasid = self.ecap_rps or q.rid_pasid_without_rps
        self.ecap_srs = bool(cfg.ecap_field("SRS"))
        self.ecap_pgtt = {_PGTT_FS: bool(cfg.ecap_field("FLTS")), _PGTT_SS: bool(cfg.ecap_field("SLTS")),
                          _PGTT_NESTED: bool(cfg.ecap_field("NEST")), _PGTT_PT: self.ecap_pt}
        self.ecap_slads = bool(cfg.ecap_field("SLADS"))
        self.fs5 = bool(cfg.cap_field("FL5LP"))
        self.scalable_unit = cfg.scalable
        ss_feat = set()
        if cfg.ecap_field("SC") or (q.qemu_reserved_bits and self.scalable_unit):
            ss_feat.add("SC")
        if self.ecap_dt:
            ss_feat.add("TM")
        self.ss_geo = Geometry.compile("ss", frozenset(ss_feat), haw, (bool(sllps & 1), bool(sllps & 2)))
        self.fs_geo = Geometry.compile("fs", frozenset(), haw, (True, bool(cfg.cap_field("FL1GP"))))
        lr, lc = sp.structure("legacy_root_entry"), sp.structure("legacy_context_entry")
        self.lroot_rsvd = lr.qword_masks(lr.reserved_mask(frozenset(), haw))
        lc_rsvd = lc.reserved_mask(frozenset(), haw)
        if q.qemu_reserved_bits:
            lc_rsvd &= ~(0xF << 67)  # QEMU does not check legacy context-hi bits 3-6
        self.lctx_rsvd = lc.qword_masks(lc_rsvd)
        self.lctx = {n: lc.field(n) for n in ("P", "FPD", "TT", "SLPTPTR", "AW", "DID")}
        sr, sc = sp.structure("sm_root_entry"), sp.structure("sm_context_entry")
        self.sroot_rsvd: tuple[int, ...] = sr.qword_masks(sr.reserved_mask(frozenset(), haw))
        sc_feat = {n for n in ("RPS", "RPRIVS") if cfg.ecap_field(n)}
        if q.qemu_reserved_bits:
            above_haw = ~((1 << haw) - 1) & ((1 << 64) - 1)
            self.sctx_rsvd: tuple[int, ...] = ((0xF << 5) | above_haw, ~((1 << 21) - 1) & ((1 << 64) - 1), (1 << 64) - 1, (1 << 64) - 1)
        else:
            self.sctx_rsvd = sc.qword_masks(sc.reserved_mask(frozenset(sc_feat), haw))
        self.enforce_pdts = not q.qemu_reserved_bits
        self.sctx = {n: sc.field(n) for n in ("FPD", "DTE", "PASIDE", "PRE", "PDTS", "PASIDDIRPTR",
                                              "RID_PASID", "RID_PRIV")}
        pd, pe = sp.structure("pasid_dir_entry"), sp.structure("pasid_entry")
        self.pdir_rsvd = 0 if q.qemu_reserved_bits else pd.reserved_mask(frozenset(), haw)
        self.pdir_ptr = pd.field("SMPTBLPTR").mask & ((1 << haw) - 1)
        self.pe_rsvd = (0,) * 8 if q.qemu_reserved_bits else pe.qword_masks(pe.reserved_mask(frozenset(), haw))
        self.pe = {n: pe.field(n) for n in ("FPD", "AW", "SSEE", "PGTT", "SSADE", "SSPTPTR", "DID", "SRE",
                                            "ERE", "FSPM", "WPE", "NXE", "SMEP", "EAFE", "FSPTPTR")}
        self.addr_mask = ADDR_MASK & ((1 << haw) - 1)
        self.ss_codes_sm = SS_CODES_SM
        # The front memo may only answer what the caches behind it hold.
        self.front_ok = bool(cfg.iotlb_size and cfg.context_cache_size
                             and (cfg.pasid_cache_size or q.pasid_entry_uncached))

    # -- interrupts --------------------------------------------------------------------------------
    def _interrupt(self, irq: Interrupt) -> None:
        self.interrupts.append(irq)
        if self.on_interrupt is not None:
            self.on_interrupt(irq)

    # -- MMIO --------------------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int = 4) -> int:
        return self.regs.read(offset, size)

    def mmio_write(self, offset: int, value: int, size: int = 4) -> None:
        self.regs.write(offset, value, size)

    # -- GCMD handshake ----------------------------------------------------------------------------
    def _gcmd_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        regs = self.regs
        gsts = regs.get("GSTS")
        changed = (value ^ gsts) & _PERSISTENT
        if changed & TE:
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
        self._pt_bypass.clear()
        if not on and q.te_off_resets_fri:
            self.faults.reset_index()

    def _latch_root(self) -> None:
        rt = self.regs.get("RTADDR")
        ttm = (rt >> 10) & 3
        self.root_addr = rt & self.addr_mask
        # TTM is read-only zero on units without scalable mode, so only 10 (reserved) and 11 (abort-DMA,
        # not implemented) can be invalid here.
        self.root_scalable = ttm == 1
        self.root_invalid = ttm >= 2
        self._set_status(SRTP, True)
        if self.quirks.srtp_te_flush_caches or self.cfg.cap_field("ESRTPS"):
            self.caches.flush_all()
        self.caches.front.clear()
        self._pt_bypass.clear()

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
        if not new & 1:
            self.inv_event.clear_pending()

    # -- register-based invalidation -------------------------------------------------------------
    def _ccmd_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        icc = 1 << 63
        if not value & icc:
            return
        if self.regs.get("GSTS") & QIE:
            return  # register-based invalidation is ignored while queued invalidation is on
        v = (new & ~wmask) | (value & wmask)  # write-only fields are only in what was written
        cirg = (v >> 61) & 3
        did = v & 0xFFFF
        sid = (v >> 16) & 0xFFFF
        fm = (v >> 32) & 3
        caig = self.invalidate_context(cirg, did, sid, fm)
        self.regs.set("CCMD", (new & ~icc & ~(3 << 59)) | (caig << 59))

    def invalidate_context(self, granularity: int, did: int = 0, sid: int = 0, fm: int = 0) -> int:
        """Context-cache invalidation (1 global, 2 domain, 3 device); returns the granularity done."""
        c = self.caches
        if granularity == 1 or (granularity == 2 and self.quirks.domain_cc_as_global):
            c.context_global()
            self._pt_bypass.clear()
            return 1
        if granularity == 2:
            c.context_domain(did)
            self._pt_bypass.clear()
            return 2
        if granularity == 3:
            c.context_device(sid, fm)
            self._pt_bypass = {s for s in self._pt_bypass if not sid_matches(s, sid, fm)}
            return 3
        return 0

    def _iva_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        self._iva = (self._iva & ~wmask) | (value & wmask)

    def _iotlb_written(self, index: int, old: int, new: int, value: int, wmask: int) -> None:
        ivt = 1 << 63
        if not value & ivt:
            return
        if self.regs.get("GSTS") & QIE:
            return
        iirg = (new >> 60) & 3
        did = (new >> 32) & 0xFFFF
        iva = self._iva
        iaig = self.invalidate_iotlb(iirg, did, iva & ~0xFFF, iva & 0x3F, bool(iva & 0x40))
        self.regs.set("IOTLB", (new & ~ivt & ~(3 << 57)) | (iaig << 57))

    def invalidate_iotlb(self, granularity: int, did: int = 0, addr: int = 0, am: int = 0, ih: bool = False) -> int:
        """IOTLB invalidation (1 global, 2 domain, 3 page-selective); returns the granularity done."""
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

    # -- translation: public ---------------------------------------------------------------------
    def translate(self, sid: int, iova: int, access: str | int = "r", pasid: int | None = None,
                  priv: bool = False, exe: bool = False) -> Translation | Fault:
        """Translate one address as a DMA request would, updating caches and recording any fault.

        ``access`` is ``"r"``, ``"w"``, ``"rw"`` (AtomicOp) or the int bits READ=1 | WRITE=2."""
        req = _req(access, priv, exe, pasid)
        ptag = NO_PASID if pasid is None else pasid
        before = self.faults.recorded
        self._last_entry = None
        out = self.xlate(sid, ptag, iova, req)
        if out >= 0:
            e = self._last_entry or self._entry_for(sid, ptag, iova)
            if e is None:  # translation disabled, or a pass-through bypass
                return Translation(out, 4096, describe(req & 3), "untranslated")
            return Translation(out, 1 << e[E_SHIFT], allowed_text(e[E_ALLOWED]), KIND_NAMES[e[E_KIND]])
        reason = -out if out != DROPPED else 0
        return Fault(reason, reason_name(reason) if reason else "DROPPED", iova, self.faults.recorded > before)

    def _entry_for(self, sid: int, ptag: int, iova: int) -> list[int] | None:
        hit = self.caches.front.get((((sid << 21) | ptag) << 52) | (iova >> 12))
        return hit[1] if hit is not None else None

    # -- translation: hot path -------------------------------------------------------------------
    def xlate(self, sid: int, ptag: int, iova: int, req: int) -> int:
        """Output address (>= 0), ``-reason`` for a fault (already recorded or suppressed), or DROPPED."""
        hit = self._front_get((((sid << 21) | ptag) << 52) | (iova >> 12))
        if hit is not None:
            e = hit[1]
            if e[3] and (e[2] >> req) & 1:
                return hit[0] | (iova & 0xFFF)
        return self._xlate_slow(sid, ptag, iova, req)

    def enable_sanitizer(self) -> None:
        """From now on re-walk every translation uncached and append each one whose cached answer memory
        no longer supports to :attr:`stale_hits`."""
        # An instance attribute shadows the method: the plain hot path pays nothing for the option.
        self.xlate = self._xlate_sanitized  # type: ignore[method-assign]

    def _xlate_sanitized(self, sid: int, ptag: int, iova: int, req: int) -> int:
        out = VtdIommu.xlate(self, sid, ptag, iova, req)
        fresh = self._fresh(sid, ptag, iova, req)
        if fresh != out and out != DROPPED:
            self.stale_hits.append(StaleHit(sid, None if ptag == NO_PASID else ptag, iova, describe(req), out, fresh))
        return out

    def _fresh(self, sid: int, ptag: int, iova: int, req: int) -> int:
        """What memory says now for this request, bypassing and not touching any cache or memory."""
        if not self.te or sid in self._pt_bypass:
            return iova
        if self.root_invalid:
            return -0x30
        saved = self.mem
        self.mem = _ReadOnly(saved)  # type: ignore[assignment]
        try:
            r = self._lookup(sid, ptag, iova, req, [])
        finally:
            self.mem = saved
        if type(r) is int:
            reason = r & 0xFF  # type: ignore[operator]
            if self.quirks.sm_legacy_fault_codes and reason in _QEMU_SM_CODES:
                mapped = _QEMU_SM_CODES[reason]
                reason = mapped if mapped is not None else (0x05 if req & WRITE else 0x06)
            return -reason
        return r[1]  # type: ignore[index]

    def _xlate_slow(self, sid: int, ptag: int, iova: int, req: int) -> int:
        if not self.te or sid in self._pt_bypass:
            return iova
        if self.root_invalid:
            return self._fault(sid, ptag, iova, req, 0x30)
        r = self._lookup(sid, ptag, iova, req)
        if type(r) is int:
            if r == DROPPED:
                return DROPPED
            return self._fault(sid, ptag, iova, req, r)
        e, out = r  # type: ignore[misc]
        self._last_entry = e  # for translate(): the slow path is the only one that builds entries
        if e[E_ALIVE] and e[E_ALLOWED] and self.front_ok:
            c = self.caches
            c.put_front((((sid << 21) | ptag) << 52) | (iova >> 12), out & ~0xFFF, e)
        return out

    def _lookup(self, sid: int, ptag: int, iova: int, req: int,
                trace: list | None = None) -> "tuple[list[int], int] | int":
        """(IOTLB entry, output address) or a fault int (see _FPD_SHIFT).  With ``trace`` (inspection) every
        cache is bypassed and left untouched, and each structure read is appended to ``trace``."""
        c = self.caches
        q = self.quirks
        st = c.stats
        cached = trace is None
        if cached and q.iotlb_before_context and not self.root_scalable:
            hitr = self._probe_iotlb(sid, 0, iova, req)
            if hitr is not None:
                return hitr
        ctx = self.context_entry(sid, trace)
        if type(ctx) is int:
            return ctx  # type: ignore[return-value]
        psc_ss = c.psc_ss if (cached and c.psc_size) else None
        if ctx[0] == _CTX_LEGACY:  # type: ignore[index]
            _, did, tt, levels, slptptr, fpd = ctx  # type: ignore[misc]
            if ptag != NO_PASID:
                return 0x31
            tag = sid if q.iotlb_before_context else did
            if tt == _TT_PT:
                if q.pt_fast_path and cached:
                    self._pt_bypass.add(sid)
                return self._pt_entry(tag, 0, iova, did, cached)
            if cached and not q.iotlb_before_context:
                hitr = self._probe_iotlb(tag, 0, iova, req)
                if hitr is not None:
                    return hitr
            finfo = fpd << 8 | _WALK
            if iova >> min(9 * levels + 12, self.mgaw + 1):
                return 0x04 | finfo
            if cached:
                st.iotlb_misses += 1
                st.walks += 1
            res = ss_walk(self.mem.read_u64, None, slptptr, levels, iova, req, self.ss_geo, SS_CODES_LEGACY,
                          psc_ss, did, c.psc_size, trace)
            if type(res) is int:
                return res | finfo  # type: ignore[operator]
            base, shift, perm = res  # type: ignore[misc]
            return self._fill(tag, 0, did, KIND_SS, iova, base, shift, ss_allowed(perm & 7), finfo, False, cached)
        # scalable mode
        _, cfpd, pdir, pdts, rid_pasid, pre, paside, dte, rid_priv = ctx  # type: ignore[misc]
        if ptag == NO_PASID:
            pasid = rid_pasid if self.use_rid_pasid else 0
        else:
            if not paside:
                return 0x45 | cfpd << 8
            pasid = ptag
        pe = self.pasid_entry(sid, ctx, pasid, trace)  # type: ignore[arg-type]
        if type(pe) is int:
            return pe  # type: ignore[return-value]
        did, pgtt, ss_levels, ssptptr, fs_levels, fsptptr, fpd, flags, ssade, ssee = pe  # type: ignore[misc]
        fpd_info = fpd << 8 | _WALK | pasid << 10
        if req & PRIV and not flags & F_SRE:
            return 0x5D | fpd_info
        if req & EXEC and pgtt in (_PGTT_FS, _PGTT_NESTED) and not flags & F_ERE:
            return 0x5C | fpd_info
        tag = sid if q.iotlb_before_context else did
        if cached:
            hitr = self._probe_iotlb(tag, pasid, iova, req)
            if hitr is not None:
                return hitr
        if pgtt == _PGTT_PT:
            if q.pt_fast_path:
                # QEMU: no width check, and the device's requests without PASID bypass from now on.
                if cached and ptag == NO_PASID:
                    self._pt_bypass.add(sid)
            elif iova >> self.haw:
                return 0x83 | fpd_info
            return self._pt_entry(tag, pasid, iova, did, cached)
        if cached:
            st.iotlb_misses += 1
            st.walks += 1
        rd = self.mem.read_u64
        wr = self.mem.write_u64
        if pgtt == _PGTT_SS:
            if iova >> (self.mgaw + 1):
                return 0x83 | fpd_info
            if iova >> (9 * ss_levels + 12):
                return 0x84 | fpd_info
            if req & EXEC and not ssee:
                return 0x82 | fpd_info
            res = ss_walk(rd, wr if ssade else None, ssptptr, ss_levels, iova, req, self.ss_geo, self.ss_codes_sm,
                          psc_ss, did, c.psc_size, trace)
            if type(res) is int:
                return res | fpd_info  # type: ignore[operator]
            base, shift, perm = res  # type: ignore[misc]
            allowed = ss_allowed(perm & 7)
            if not ssee:
                allowed &= ~REQ_X  # execute needs SSEE whatever the X bits say
            if not perm & DIRTY_OK:
                allowed &= ~REQ_W  # writes must walk again to set D
            return self._fill(tag, pasid, did, KIND_SS, iova, base, shift, allowed, fpd_info, True, cached)
        # first stage or nested
        if not canonical(iova, fs_levels):
            return 0x80 | fpd_info
        if pgtt == _PGTT_FS:
            res = fs_walk(rd, wr, fsptptr, fs_levels, iova, req, self.fs_geo, flags,
                          c.psc_fs if (cached and c.psc_size) else None, did << 20 | pasid, c.psc_size, trace)
            if type(res) is int:
                return res | fpd_info  # type: ignore[operator]
            base, shift, allowed = res  # type: ignore[misc]
            return self._fill(tag, pasid, did, KIND_FS, iova, base, shift, allowed, fpd_info, True, cached)
        return self._nested(tag, pasid, did, iova, req, pe, fpd_info, trace)  # type: ignore[arg-type]

    def context_entry(self, sid: int, trace: list | None = None) -> "tuple[int, ...] | int":
        """The decoded context entry of ``sid`` through the context cache (filled on a miss), or a fault
        int.  With ``trace`` the cache is bypassed and the structures read are appended to it."""
        c = self.caches
        if trace is None:
            ctx = c.context.get(sid)
            if ctx is not None:
                c.stats.context_hits += 1
                return ctx
        loaded = self._load_context(sid, trace)
        if trace is None and type(loaded) is not int:
            c.stats.context_misses += 1
            c.put_context(sid, loaded)  # type: ignore[arg-type]
        return loaded

    def pasid_entry(self, sid: int, ctx: tuple[int, ...], pasid: int,
                    trace: list | None = None) -> "tuple[int, ...] | int":
        """The decoded PASID entry of (sid, pasid) under a scalable context, through the PASID cache, or a
        fault int; ``trace`` as for :meth:`context_entry`."""
        c = self.caches
        uncached = self.quirks.pasid_entry_uncached
        if trace is None and not uncached:
            pe = c.pasid.get((sid, pasid))
            if pe is not None:
                c.stats.pasid_hits += 1
                return pe
        loaded = self._load_pasid(ctx[2], ctx[3], ctx[1], pasid, trace)
        if trace is None and type(loaded) is not int:
            c.stats.pasid_misses += 1
            if not uncached:
                c.put_pasid(sid, pasid, loaded)  # type: ignore[arg-type]
        return loaded

    def _nested(self, tag: int, pasid: int, did: int, iova: int, req: int, pe: tuple[int, ...], fpd_info: int,
                trace: list[TraceEntry] | None) -> "tuple[list[int], int] | int":
        _, _, ss_levels, ssptptr, fs_levels, fsptptr, fpd, flags, ssade, _ = pe
        c = self.caches
        rd, wr = self.mem.read_u64, self.mem.write_u64
        ss_wr = wr if ssade else None
        psc_ss = c.psc_ss if (c.psc_size and trace is None) else None
        limit = 9 * ss_levels + 12
        geo, codes = self.ss_geo, self.ss_codes_sm

        def table_xlate(gpa: int, is_root: bool) -> tuple[int, int] | int:
            if gpa >> limit:
                return 0x74
            r = ss_walk(rd, ss_wr, ssptptr, ss_levels, gpa, READ, geo, codes, psc_ss, did, c.psc_size, trace)
            if type(r) is int:
                return (0x75 if is_root else 0x76) if r == 0x79 else r  # type: ignore[return-value]
            base, shift, perm = r  # type: ignore[misc]
            return (base | (gpa & ((1 << shift) - 1))) & ~0xFFF, perm

        res = fs_walk(rd, wr, fsptptr, fs_levels, iova, req, self.fs_geo, flags,
                      c.psc_fs if (c.psc_size and trace is None) else None, did << 20 | pasid, c.psc_size, trace,
                      table_xlate)
        if type(res) is int:
            return res | fpd_info  # type: ignore[operator]
        fs_base, fs_shift, fs_allowed_mask = res  # type: ignore[misc]
        gpa = fs_base | (iova & ((1 << fs_shift) - 1))
        if gpa >> limit:
            return 0x84 | fpd_info
        r2 = ss_walk(rd, ss_wr, ssptptr, ss_levels, gpa, req, geo, codes, psc_ss, did, c.psc_size, trace)
        if type(r2) is int:
            return r2 | fpd_info  # type: ignore[operator]
        ss_base, ss_shift, perm = r2  # type: ignore[misc]
        shift = min(fs_shift, ss_shift)
        hpa = ss_base | (gpa & ((1 << ss_shift) - 1))
        allowed = fs_allowed_mask & ss_allowed(perm & 7)
        if not perm & DIRTY_OK:
            allowed &= ~REQ_W
        base = hpa & ~((1 << shift) - 1)
        return self._fill(tag, pasid, did, KIND_NESTED, iova, base, shift, allowed, fpd_info, True, trace is None)

    def _probe_iotlb(self, tag: int, pasid: int, iova: int, req: int) -> "tuple[list[int], int] | int | None":
        c = self.caches
        iotlb = c.iotlb
        for size_idx, mask in _PROBES[c.sizes_held]:
            e = iotlb.get((((((tag << 21) | pasid) << 2) | size_idx) << 52) | ((iova & mask) >> 12))
            if e is not None:
                if (e[2] >> req) & 1:
                    self.caches.stats.iotlb_hits += 1
                    return e, e[0] | (iova & e[1])
                if self.quirks.cached_perm_drop_silently and e[E_KIND] != KIND_PT:
                    return DROPPED
                return None
        return None

    def _pt_entry(self, tag: int, pasid: int, iova: int, did: int, insert: bool) -> "tuple[list[int], int]":
        # Pass-through: identity, cached per 4 KiB page like any other translation.
        page = iova & ~0xFFF
        e = [page, 0xFFF, 0xFFFF, 1, did, pasid, KIND_PT, page, 12]
        if insert and not self.quirks.pt_fast_path:
            self.caches.put_iotlb(iotlb_key(tag, pasid, 0, page), e)
            if self.cfg.iotlb_size == 0:
                e[E_ALIVE] = 0
        else:
            e[E_ALIVE] = 0
        return e, iova

    def _fill(self, tag: int, pasid: int, did: int, kind: int, iova: int, base: int, shift: int, allowed: int,
              finfo: int, sm: bool, insert: bool = True) -> "tuple[list[int], int] | int":
        mask = (1 << shift) - 1
        out = base | (iova & mask)
        # Interrupt-address range: never translated to; such a leaf is not cached so every access is checked.
        if base < INTR_HI and base + mask >= INTR_LO:
            if self.quirks.intr_range_whole_leaf or INTR_LO <= (out & ~0xFFF) < INTR_HI:
                code = 0x87 if (sm or (self.quirks.intr_range_whole_leaf and self.scalable_unit)) else 0x0E
                return code | finfo
            return [base, mask, allowed, 0, did, pasid, kind, iova & ~mask, shift], out
        e = [base, mask, allowed, 1, did, pasid, kind, iova & ~mask, shift]
        if insert and self.cfg.iotlb_size:
            self.caches.put_iotlb(iotlb_key(tag, pasid, (shift - 12) // 9, iova & ~mask), e)
        else:
            e[E_ALIVE] = 0
        return e, out

    def _fault(self, sid: int, ptag: int, iova: int, req: int, f: int) -> int:
        reason = f & 0xFF
        fpd = (f >> 8) & 1
        q = self.quirks
        if q.sm_legacy_fault_codes and reason in _QEMU_SM_CODES:
            mapped = _QEMU_SM_CODES[reason]
            reason = mapped if mapped is not None else (0x05 if req & WRITE else 0x06)
        if fpd and reason in QUALIFIED:
            self.suppressed += 1
            return -reason
        pasid: int | None = None if ptag == NO_PASID else ptag
        pv: int | None = None
        walk = f & _WALK
        if q.sm_fault_pp_rid_pasid and self.root_scalable and ptag == NO_PASID and walk:
            pasid = (f >> 10) & 0xFFFFF
        if q.fault_pv_16bit:
            if pasid is not None:
                pv = pasid & 0xFFFF
            elif not self.root_scalable and walk:
                pv = 0xFFFF
        # FI holds the page address; bits above the guest address width read as zero.
        self.faults.record(sid, iova & self.fi_mask, reason, bool(req & WRITE) and not req & READ, pasid,
                           bool(req & PRIV), bool(req & EXEC), pv)
        return -reason

    # -- structure decode ------------------------------------------------------------------------
    def _load_context(self, sid: int, trace: list | None = None) -> "tuple[int, ...] | int":
        rd = self.mem.read_u64
        bus, devfn = sid >> 8, sid & 0xFF
        ra = self.root_addr + bus * 16
        lo, hi = rd(ra), rd(ra + 8)
        if not self.root_scalable:
            if trace is not None:
                trace.append(("legacy_root_entry", 0, ra, (lo, hi)))
            if lo < 0 or hi < 0:
                return 0x08
            if not lo & 1:
                return 0x01
            if lo & self.lroot_rsvd[0] or hi & self.lroot_rsvd[1]:
                return 0x0A
            ca = (lo & self.addr_mask) + devfn * 16
            clo, chi = rd(ca), rd(ca + 8)
            if trace is not None:
                trace.append(("legacy_context_entry", 0, ca, (clo, chi)))
            if clo < 0 or chi < 0:
                return 0x09
            fpd = (clo >> 1) & 1
            if not clo & 1:
                return 0x02 | fpd << 8
            if clo & self.lctx_rsvd[0] or chi & self.lctx_rsvd[1]:
                return 0x0B | fpd << 8
            f = self.lctx
            v = clo | chi << 64
            tt = f["TT"].get(v)
            aw = f["AW"].get(v)
            if tt == 3 or (tt == 1 and not self.ecap_dt) or (tt == _TT_PT and not self.ecap_pt):
                return 0x03 | fpd << 8
            if tt != _TT_PT and not (self.sagaw >> aw) & 1:
                return 0x03 | fpd << 8
            return (_CTX_LEGACY, f["DID"].get(v), tt, aw + 2, f["SLPTPTR"].get(v) << 12 & self.addr_mask, fpd)
        if trace is not None:
            trace.append(("sm_root_entry", 0, ra, (lo, hi)))
        if lo < 0 or hi < 0:
            return 0x38
        half = hi if devfn >= 128 else lo
        if not half & 1:
            return 0x39
        if half & self.sroot_rsvd[1 if devfn >= 128 else 0]:
            return 0x3A
        ca = (half & self.addr_mask) + (devfn & 0x7F) * 32
        qs = tuple(rd(ca + 8 * i) for i in range(4))
        if trace is not None:
            trace.append(("sm_context_entry", 0, ca, qs))
        if min(qs) < 0:
            return 0x40
        v = qs[0] | qs[1] << 64 | qs[2] << 128 | qs[3] << 192
        fpd = (qs[0] >> 1) & 1
        if not qs[0] & 1:
            return 0x41 | fpd << 8
        if any(x & m for x, m in zip(qs, self.sctx_rsvd)):
            return 0x42 | fpd << 8
        f = self.sctx
        return (_CTX_SM, fpd, f["PASIDDIRPTR"].get(v) << 12 & self.addr_mask, f["PDTS"].get(v),
                f["RID_PASID"].get(v), f["PRE"].get(v), f["PASIDE"].get(v), f["DTE"].get(v), f["RID_PRIV"].get(v))

    def _load_pasid(self, pdir: int, pdts: int, fpd: int, pasid: int,
                    trace: list | None = None) -> "tuple[int, ...] | int":
        rd = self.mem.read_u64
        didx = pasid >> 6
        if didx >= 1 << (pdts + 7) and self.enforce_pdts:
            return 0x46 | fpd << 8
        da = pdir + didx * 8
        de = rd(da)
        if trace is not None:
            trace.append(("pasid_dir_entry", 0, da, de))
        if de < 0:
            return 0x50 | fpd << 8
        fpd |= (de >> 1) & 1
        if not de & 1:
            return 0x51 | fpd << 8
        if de & self.pdir_rsvd:
            return 0x52 | fpd << 8
        pa = (de & self.pdir_ptr) + (pasid & 63) * 64
        qs = tuple(rd(pa + 8 * i) for i in range(8))
        if trace is not None:
            trace.append(("pasid_entry", 0, pa, qs))
        if min(qs) < 0:
            return 0x58 | fpd << 8
        fpd |= (qs[0] >> 1) & 1
        if not qs[0] & 1:
            return 0x59 | fpd << 8
        if any(x & m for x, m in zip(qs, self.pe_rsvd)):
            return 0x5A | fpd << 8
        f = self.pe
        v = qs[0] | qs[1] << 64 | qs[2] << 128
        pgtt = f["PGTT"].get(v)
        if self.quirks.pgtt_walked_as_ss and pgtt in (_PGTT_FS, _PGTT_NESTED):
            pgtt = _PGTT_SS
        if not self.ecap_pgtt.get(pgtt, False):
            return 0x5B | fpd << 8
        aw = f["AW"].get(v)
        if pgtt in (_PGTT_SS, _PGTT_NESTED) and not (self.sagaw >> aw) & 1:
            return 0x5B | fpd << 8
        fspm = f["FSPM"].get(v)
        if pgtt in (_PGTT_FS, _PGTT_NESTED) and (fspm > 1 or (fspm == 1 and not self.fs5)):
            return 0x5B | fpd << 8
        flags = ((F_SRE if f["SRE"].get(v) and self.ecap_srs else 0) | (F_WPE if f["WPE"].get(v) else 0)
                 | (F_NXE if f["NXE"].get(v) else 0) | (F_SMEP if f["SMEP"].get(v) else 0)
                 | (F_ERE if f["ERE"].get(v) else 0) | (F_EAFE if f["EAFE"].get(v) else 0))
        ssade = bool(f["SSADE"].get(v)) and self.ecap_slads
        return (f["DID"].get(v), pgtt, aw + 2, f["SSPTPTR"].get(v) << 12 & self.addr_mask, 5 if fspm else 4,
                f["FSPTPTR"].get(v) << 12 & self.addr_mask, fpd, flags, ssade, f["SSEE"].get(v))

    # -- inspection --------------------------------------------------------------------------------
    def walk(self, sid: int, iova: int, access: str | int = "r", pasid: int | None = None, priv: bool = False,
             exe: bool = False) -> WalkReport:
        """Walk memory for one request bypassing every cache, recording each structure and entry read.
        Nothing is cached, recorded or written (A/D bits are not set)."""
        req = _req(access, priv, exe, pasid)
        steps: list = []
        ro = _ReadOnly(self.mem)
        saved_mem = self.mem
        self.mem = ro  # type: ignore[assignment]
        try:
            ptag = NO_PASID if pasid is None else pasid
            if not self.te:
                res: Any = ([iova & ~0xFFF, 0xFFF, 0xFFFF, 0, 0, 0, KIND_PT, iova & ~0xFFF, 12], iova)
            elif self.root_invalid:
                res = 0x30
            else:
                res = self._lookup(sid, ptag, iova, req, steps)
        finally:
            self.mem = saved_mem
        if type(res) is int:
            reason = res & 0xFF
            return WalkReport(steps, Fault(reason, reason_name(reason), iova, False))
        e, out = res  # type: ignore[misc]
        return WalkReport(steps, Translation(out, 1 << e[E_SHIFT], allowed_text(e[E_ALLOWED]), KIND_NAMES[e[E_KIND]]))

    # -- DMA ---------------------------------------------------------------------------------------
    def dma_read(self, sid: int, iova: int, length: int, pasid: int | None = None, priv: bool = False) -> DmaResult:
        """Read ``length`` bytes as a device would, translating each 4 KiB IOVA page separately; a faulting
        chunk reads as zeros (as does, under the ``interrupt_window_untranslated`` quirk, the MSI window)."""
        return self._dma(sid, iova, length, None, pasid, READ | (PRIV if priv else 0))

    def dma_write(self, sid: int, iova: int, data: bytes, pasid: int | None = None, priv: bool = False) -> DmaResult:
        """Write ``data`` as a device would; faulting chunks are dropped."""
        return self._dma(sid, iova, len(data), memoryview(data), pasid, WRITE | (PRIV if priv else 0))

    def _dma(self, sid: int, iova: int, length: int, data: memoryview | None, pasid: int | None,
             req: int) -> DmaResult:
        out = bytearray(length if data is None else 0)
        faults: list[int] = []
        ptag = NO_PASID if pasid is None else pasid
        mem = self.mem
        xl = self.xlate
        window = self.quirks.interrupt_window_untranslated
        pos = 0
        while pos < length:
            a = iova + pos
            n = min(4096 - (a & 0xFFF), length - pos)
            if window and INTR_LO <= a < INTR_HI:
                pos += n  # QEMU: never translated; reads give zeros, writes become MSIs, no fault
                continue
            hpa = xl(sid, ptag, a, req)
            if hpa >= 0:
                if data is None:
                    out[pos:pos + n] = mem.read(hpa, n)
                else:
                    mem.write(hpa, data[pos:pos + n])
            elif hpa != DROPPED:
                faults.append(-hpa)
            pos += n
        return DmaResult(bytes(out), tuple(faults))

    # -- endpoints: ATS, page requests, interrupts ------------------------------------------------
    def attach_device(self, sid: int, *, ats: bool = True, pri: bool = False, respond: bool = True,
                      spurious_completion: bool = False, atc_size: int = 256) -> AtsDevice:
        """An endpoint with a device TLB (and PRI if ``pri``) behind this unit; device-TLB invalidations and
        page group responses for ``sid`` reach it."""
        from .ats import AtsDevice
        dev = AtsDevice(self, sid, ats=ats, pri=pri, respond=respond, spurious_completion=spurious_completion,
                        atc_size=atc_size)
        self.devices[sid] = dev
        return dev

    def ats_translate(self, sid: int, iova: int, *, write: bool = False, pasid: int | None = None,
                      priv: bool = False) -> AtsCompletion:
        """Process an ATS translation request (no fault is recorded for page-walk failures)."""
        from .ats import chip_translate
        return chip_translate(self, sid, iova, write=write, pasid=pasid, priv=priv)

    def translated_access(self, sid: int, addr: int, write: bool, pasid: int | None = None) -> int:
        """Check a translated (AT=10) request: the address, or -reason after recording a fault."""
        from .ats import chip_translated_access
        return chip_translated_access(self, sid, addr, write, pasid)

    def page_request(self, sid: int, addr: int, *, read: bool, write: bool, exe: bool = False,
                     priv: bool = False, pasid: int | None = None, last: bool = False, prgi: int = 0,
                     private_data: int | None = None) -> PageRequestStatus:
        """A PRI page request from requester ``sid`` (see :class:`PageRequestUnit`)."""
        if self.prq is None:
            return PageRequestStatus.UNSUPPORTED
        return self.prq.request(sid, addr, read=read, write=write, exe=exe, priv=priv, pasid=pasid, last=last,
                                prgi=prgi, private_data=private_data)

    def remap_interrupt(self, sid: int, addr: int, data: int) -> Interrupt | IrFault:
        """An MSI write from requester ``sid``: the interrupt delivered, or why it was blocked."""
        if self.intremap is None:
            irq = Interrupt("passthrough", addr, data, data & 0xFF, (addr >> 12) & 0xFF)
            self._interrupt(irq)
            return irq
        return self.intremap.remap(sid, addr, data)

    # -- state -------------------------------------------------------------------------------------
    def fault_records(self) -> list[FaultRecord]:
        return self.faults.records()

    def register_dump(self) -> dict[int, int]:
        """Every register's readable value by offset (what a driver would read)."""
        out = {}
        for (name, idx), slot in sorted(self.regs.slots.items(), key=lambda kv: kv[1].offset):
            out[slot.offset] = self.regs.values[(name, idx)] & slot.readable
        return out


class _ReadOnly:
    """A memory view that refuses writes (for side-effect-free inspection walks)."""

    def __init__(self, mem: Memory) -> None:
        self.read_u64 = mem.read_u64
        self.read = mem.read
        self.is_ram = mem.is_ram

    def write_u64(self, addr: int, value: int) -> bool:
        return True

    def write(self, addr: int, data: bytes) -> int:
        return len(data)


def _req(access: str | int, priv: bool, exe: bool, pasid: int | None) -> int:
    if isinstance(access, str):
        bits = 0
        for ch in access.lower():
            if ch == "r":
                bits |= READ
            elif ch == "w":
                bits |= WRITE
            elif ch == "x":
                bits |= EXEC
            else:
                raise ValueError(f"access must be made of 'r', 'w', 'x'; got {access!r}")
    else:
        bits = int(access)
    if not bits & (READ | WRITE):
        bits |= READ  # an execute request is a read
    if exe:
        bits |= EXEC
    if priv:
        bits |= PRIV
    if bits & (EXEC | PRIV) and pasid is None:
        raise ValueError("execute and privileged requests carry a PASID; pass pasid=")
    if pasid is not None and not 0 <= pasid < NO_PASID:
        raise ValueError(f"pasid must be 0..0xFFFFF, got {pasid:#x}")
    return bits & 15


def allowed_text(allowed: int) -> str:
    """Human text of an ``allowed``-request mask: "rw", "r", or "r/s:rw" when supervisor requests differ."""
    # Read, write, exec as allowed for a user request; "s" marks supervisor-only differences.
    user = "".join(c for bit, c in ((READ, "r"), (WRITE, "w"), (EXEC | READ, "x")) if (allowed >> bit) & 1)
    sup = "".join(c for bit, c in ((READ, "r"), (WRITE, "w"), (EXEC | READ, "x")) if (allowed >> (bit | PRIV)) & 1)
    return user if user == sup or not sup else f"{user or '-'}/s:{sup}"
