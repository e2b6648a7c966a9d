"""The VT-d unit: the :class:`VtdIommu` façade over its parts.

``VtdIommu.translate`` is the public, friendly call; ``xlate`` is the hot path used by DMA and replay:
a front-cache probe (one dict lookup) and, on a miss, the context cache → PASID cache → IOTLB → walk
chain.  Faults travel as negative ints and are recorded (or suppressed by FPD), never raised.

The parts, each a class the façade inherits (so the hot path stays one method call):

=================  ==============================================================================
``state``          configuration compiled to masks; the state GCMD latched
``control``        GCMD/GSTS, CCMD, IOTLB/IVA side effects; invalidation entry points and observers
``lookup``         root/context/PASID decode through the context and PASID caches
``translate``      ``xlate``, the lookup/fill/fault chain, ``translate``
``inspection``     uncached walk reports and the stale-cache sanitizer
``dma``            ``dma_read``/``dma_write``
=================  ==============================================================================
"""

from __future__ import annotations

from typing import Callable

from ..memory import Memory
from .ats import AtsCompletion, AtsDevice, chip_translate, chip_translated_access
from .caches import Caches
from .config import VtdConfig
from .control import RegisterControl
from .descriptors import UnitReset
from .dma import DmaPort
from .entries import DROPPED, INTR_HI, INTR_LO
from .events import EventUnit, Interrupt
from .faults import FaultRecord, FaultUnit
from .inspection import Inspector
from .intremap import InterruptRemapper, IrFault
from .prq import PageRequestStatus, PageRequestUnit, PageResponse
from .qi import InvalidationQueue
from .regs import RegisterFile
from .results import DmaResult, Fault, StaleHit, Translation, WalkReport, allowed_text


class VtdIommu(RegisterControl, Inspector, DmaPort):
    """One VT-d remapping unit over a memory (host RAM for a physical unit, guest RAM for a vIOMMU)."""

    def __init__(self, mem: Memory, config: VtdConfig | str = "modern", *,
                 on_interrupt: Callable[[Interrupt], None] | None = None, sanitize: bool = False) -> None:
        cfg = VtdConfig.preset(config) if isinstance(config, str) else config.validated()
        self.cfg = cfg
        self.mem = mem
        self.quirks = q = cfg.quirks
        self.interrupts = []
        self.on_interrupt = on_interrupt
        self.invalidation_observers = []
        self.control_observers = []
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
        self._front_get = self.caches.front.get
        self.pt_bypass = set()
        self._last_entry = None
        self._iva = 0
        self.compile_config()
        self.compile_walkers()
        self.te = False
        self.root_addr = 0
        self.root_scalable = False
        self.root_invalid = False
        self.irta_latched = 0
        self.stale_hits = []
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
        self.devices = {}
        self.unmatched_responses = []
        self.qi = InvalidationQueue(self) if cfg.ecap_field("QI") else None
        self.prq = PageRequestUnit(self) if cfg.ecap_field("PRS") else None
        self.intremap = InterruptRemapper(self) if self.ecap_ir else None

    @property
    def suppressed(self) -> int:
        """Faults FPD kept out of the fault records (DMA, page requests and interrupts)."""
        return self.faults.suppressed

    # -- interrupts --------------------------------------------------------------------------------
    def _interrupt(self, irq: Interrupt) -> None:
        self.interrupts.append(irq)
        if self.on_interrupt is not None:
            self.on_interrupt(irq)

    def deliver_interrupt(self, irq: Interrupt) -> Interrupt:
        """Send an interrupt message the unit produced (or let through) to the CPU side."""
        self._interrupt(irq)
        return irq

    # -- MMIO --------------------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int = 4) -> int:
        return self.regs.read(offset, size)

    def mmio_write(self, offset: int, value: int, size: int = 4) -> None:
        self.regs.write(offset, value, size)

    # -- endpoints: ATS, page requests, interrupts ------------------------------------------------
    def attach_device(self, sid: int, *, ats: bool = True, pri: bool = False, respond: bool = True,
                      spurious_completion: bool = False, atc_size: int = 256) -> AtsDevice:
        """An endpoint with a device TLB (and PRI if ``pri``) behind this unit; device-TLB invalidations and
        page group responses for ``sid`` reach it."""
        dev = AtsDevice(self, sid, ats=ats, pri=pri, respond=respond, spurious_completion=spurious_completion,
                        atc_size=atc_size)
        self.devices[sid] = dev
        return dev

    def ats_translate(self, sid: int, iova: int, *, write: bool = False, pasid: int | None = None,
                      priv: bool = False, exe: bool = False) -> AtsCompletion:
        """Process an ATS translation request (no fault is recorded for page-walk failures)."""
        return chip_translate(self, sid, iova, write=write, pasid=pasid, priv=priv, exe=exe)

    def translated_access(self, sid: int, addr: int, write: bool, pasid: int | None = None) -> int:
        """Check a translated (AT=10) request: the address, or -reason after recording a fault."""
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
            return self.deliver_interrupt(Interrupt("passthrough", addr, data, data & 0xFF, (addr >> 12) & 0xFF))
        return self.intremap.remap(sid, addr, data)

    # -- state -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """System reset: every register back to its default, caches, queue, fault records and latched
        state dropped, translation off.  What is outside the unit survives: the endpoints behind it (their
        device TLBs are theirs), the interrupt sink, the observers (then told :class:`UnitReset`), and
        whatever shadows ``xlate`` on the instance (the sanitizer, a validator's wrapper) as it was."""
        observers, controls = self.invalidation_observers, self.control_observers
        devices, on_interrupt = self.devices, self.on_interrupt
        shadow = self.__dict__.get("xlate")
        VtdIommu.__init__(self, self.mem, self.cfg, on_interrupt=on_interrupt)
        if shadow is not None:
            self.xlate = shadow  # type: ignore[method-assign]
        self.invalidation_observers, self.control_observers, self.devices = observers, controls, devices
        if controls:
            self.notify_control(UnitReset())

    def fault_records(self) -> list[FaultRecord]:
        return self.faults.records()

    def register_dump(self) -> dict[int, int]:
        """Every register's readable value by offset (what a driver would read)."""
        out = {}
        for (name, idx), slot in sorted(self.regs.slots.items(), key=lambda kv: kv[1].offset):
            out[slot.offset] = self.regs.values[(name, idx)] & slot.readable
        return out


__all__ = ["VtdIommu", "Translation", "Fault", "DmaResult", "StaleHit", "WalkReport", "allowed_text", "DROPPED",
           "INTR_LO", "INTR_HI", "PageResponse"]
