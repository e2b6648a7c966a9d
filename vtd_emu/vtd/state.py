"""The state every part of the unit reads: configuration compiled to masks, and what GCMD latched.

:class:`ChipState` is the base of the parts :class:`~vtd_emu.vtd.iommu.VtdIommu` is assembled from
(``control``, ``lookup``, ``translate``, ``inspection``, ``dma``); it declares the attributes they share
so that each part can be read (and type-checked) on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..memory import Memory
from ..spec import specs
from ..spec.consts import LEGACY_CONTEXT_ENTRY
from .caches import Caches
from .config import Quirks, VtdConfig
from .entries import PGTT_FS, PGTT_NESTED, PGTT_PT, PGTT_SS
from .events import EventUnit, Interrupt
from .faults import FaultUnit
from .regs import RegisterFile
from .walk import ADDR_MASK, SS_CODES_SM, Geometry

if TYPE_CHECKING:
    from ..spec import Field
    from .ats import AtsDevice
    from .descriptors import Invalidation
    from .intremap import InterruptRemapper
    from .prq import PageRequestUnit, PageResponse
    from .qi import InvalidationQueue

# Legacy context-hi bits 3-6 (AVAIL), which QEMU does not check.
_LCTX_AVAIL = LEGACY_CONTEXT_ENTRY.AVAIL


class ChipState:
    """Attributes of one unit shared by all its parts (see the module docstring)."""

    cfg: VtdConfig
    mem: Memory
    quirks: Quirks
    regs: RegisterFile
    faults: FaultUnit
    caches: Caches
    fault_event: EventUnit
    inv_event: EventUnit
    prq_event: EventUnit
    interrupts: list[Interrupt]
    on_interrupt: Callable[[Interrupt], None] | None
    invalidation_observers: list[Callable[[Invalidation], None]]
    qi: InvalidationQueue | None
    prq: PageRequestUnit | None
    intremap: InterruptRemapper | None
    devices: dict[int, AtsDevice]
    unmatched_responses: list[PageResponse]
    # Translation state latched by GCMD
    te: bool
    root_addr: int
    root_scalable: bool
    root_invalid: bool
    irta_latched: int
    pt_bypass: set[int]
    """Source ids whose requests skip translation until the next context invalidation (QEMU's
    pass-through fast path, quirk ``pt_fast_path``)."""

    def compile_config(self) -> None:
        """Derive the masks and switches the decoders and walkers use from ``cfg``."""
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
        self.ecap_pgtt = {PGTT_FS: bool(cfg.ecap_field("FLTS")), PGTT_SS: bool(cfg.ecap_field("SLTS")),
                          PGTT_NESTED: bool(cfg.ecap_field("NEST")), PGTT_PT: self.ecap_pt}
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
            lc_rsvd &= ~_LCTX_AVAIL
        self.lctx_rsvd = lc.qword_masks(lc_rsvd)
        self.lctx: dict[str, Field] = {n: lc.field(n) for n in ("P", "FPD", "TT", "SLPTPTR", "AW", "DID")}
        sr, sc = sp.structure("sm_root_entry"), sp.structure("sm_context_entry")
        self.sroot_rsvd: tuple[int, ...] = sr.qword_masks(sr.reserved_mask(frozenset(), haw))
        self.sroot_rsvd_both = q.sm_root_rsvd_both_halves
        sc_feat = {n for n in ("RPS", "RPRIVS") if cfg.ecap_field(n)}
        if q.qemu_reserved_bits:
            # QEMU checks only context-lo bits 8:5, bits above the host width, and context-hi above RID_PASID.
            above_haw = ~((1 << haw) - 1) & ((1 << 64) - 1)
            self.sctx_rsvd: tuple[int, ...] = ((0xF << 5) | above_haw, ~((1 << 21) - 1) & ((1 << 64) - 1),
                                               (1 << 64) - 1, (1 << 64) - 1)
        else:
            self.sctx_rsvd = sc.qword_masks(sc.reserved_mask(frozenset(sc_feat), haw))
        self.enforce_pdts = not q.qemu_reserved_bits
        self.sctx: dict[str, Field] = {n: sc.field(n) for n in ("FPD", "DTE", "PASIDE", "PRE", "PDTS", "PASIDDIRPTR",
                                                               "RID_PASID", "RID_PRIV")}
        pd, pe = sp.structure("pasid_dir_entry"), sp.structure("pasid_entry")
        self.pdir_rsvd = 0 if q.qemu_reserved_bits else pd.reserved_mask(frozenset(), haw)
        # QEMU neither checks nor drops PASID-directory and PASID-entry pointer bits above the host width:
        # a table there is read (and fails) at the full address.
        self.pdir_ptr = pd.field("SMPTBLPTR").mask & (-1 if q.qemu_reserved_bits else (1 << haw) - 1)
        self.ssptptr_mask = (1 << 64) - (1 << 12) if q.qemu_reserved_bits else ADDR_MASK & ((1 << haw) - 1)
        self.pe_rsvd = (0,) * 8 if q.qemu_reserved_bits else pe.qword_masks(pe.reserved_mask(frozenset(), haw))
        self.pe: dict[str, Field] = {n: pe.field(n) for n in ("FPD", "AW", "SSEE", "PGTT", "SSADE", "SSPTPTR", "DID",
                                                              "SRE", "ERE", "FSPM", "WPE", "NXE", "SMEP", "EAFE",
                                                              "FSPTPTR")}
        self.addr_mask = ADDR_MASK & ((1 << haw) - 1)
        self.ss_codes_sm = SS_CODES_SM
        # The front memo may only answer what the caches behind it hold.
        self.front_ok = bool(cfg.iotlb_size and cfg.context_cache_size
                             and (cfg.pasid_cache_size or q.pasid_entry_uncached))


__all__ = ["ChipState"]
