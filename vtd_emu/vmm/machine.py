"""A virtual machine with a vIOMMU: guest RAM in a VMM process on a :class:`~vtd_emu.host.Host`, mapped
into one IOAS at IOVA = GPA, a :class:`VtdIommu` over that RAM, guest devices behind it, and the
:class:`~vtd_emu.vmm.bridge.Bridge` that turns the guest's binds and invalidations into host calls.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError
from ..host.device import VfioDevice
from ..host.host import Host
from ..host.iommufd.core import ObjectInfo
from ..host.uapi import HWPT_ALLOC_DIRTY_TRACKING, HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID
from ..memory import PAGE_MASK, PAGE_SIZE, GuestPhysView
from ..tables import R, W
from ..vtd.config import VtdConfig
from ..vtd.entries import INTR_LO
from ..vtd.events import Interrupt
from ..vtd.iommu import VtdIommu
from .bridge import FORWARDING_MODES, Bridge
from .caps import DEFAULT_VIOMMU, DeviceNeeds, HostCaps, check_host, viommu_config
from .devices import EmulatedDevice, GuestDevice, PassthroughDevice

_HUGE = 2 << 20


class GuestRam:
    """Guest RAM as a second-stage map for :class:`GuestPhysView`: GPA ``g`` < ``size`` is the host page
    behind user VA ``va + g`` of the VMM (populated, 2 MiB pages); anything else is not memory."""

    def __init__(self, ptes: Mapping[int, int], va: int, size: int) -> None:
        self._ptes = ptes
        self.va = va
        self.size = size

    def lookup(self, iova: int) -> tuple[int, int, int] | None:
        if not 0 <= iova < self.size:
            return None
        page = self._ptes.get((self.va + iova) >> 12)
        return None if page is None else (page | (iova & PAGE_MASK), PAGE_SIZE, R | W)


class Machine:
    """``Machine(host, viommu, guest_ram)``: a guest with a vIOMMU over ``guest_ram`` bytes of RAM.

    ``viommu`` is a :class:`VtdConfig`, a preset name, or a mapping (``preset`` + the keyword arguments of
    :meth:`VtdConfig.preset`); by default :data:`~vtd_emu.vmm.caps.DEFAULT_VIOMMU`.  ``forwarding`` is
    ``coalesced`` (one ``HWPT_INVALIDATE`` array per HWPT per invalidation wait) or ``one-per-call``
    (QEMU's one entry per ioctl).  ``dirty_tracking`` asks for a dirty-tracking nest parent (when the host
    can).  The guest drives the vIOMMU through :meth:`mmio_read`/:meth:`mmio_write` and builds its
    tables in :attr:`mem` (guest-physical addresses)."""

    def __init__(self, host: Host | None = None, viommu: "VtdConfig | str | Mapping[str, Any]" = DEFAULT_VIOMMU,
                 guest_ram: int = 64 << 20, *, forwarding: str = "coalesced", dirty_tracking: bool = False,
                 sanitize: bool = False) -> None:
        if forwarding not in FORWARDING_MODES:
            raise ConfigError(f"forwarding must be one of {FORWARDING_MODES}, got {forwarding!r}")
        if not isinstance(guest_ram, int) or not 0 < guest_ram <= INTR_LO:
            raise ConfigError(f"guest_ram must be 1..{INTR_LO:#x} bytes (below the interrupt window), got {guest_ram!r}")
        self.cfg = viommu_config(viommu)
        if guest_ram > 1 << (self.cfg.mgaw + 1):
            raise ConfigError(f"guest_ram {guest_ram:#x} is beyond the vIOMMU's MGAW ({self.cfg.mgaw + 1} bits)")
        self.host = host if host is not None else Host("modern")
        self.size = (guest_ram + _HUGE - 1) & -_HUGE
        self.dirty_tracking = dirty_tracking
        self.guest_actions = 0
        """Guest actions so far (register writes, resets, device plugs): what :class:`Trigger` indexes."""
        self.vmm = self.host.open_iommufd()
        # Guest RAM: populated 2 MiB pages of the VMM (hugetlbfs-backed, as VMMs with assigned devices use).
        self.ram_va = self.host.mmap(self.size, huge=True)
        self.ioas = self.vmm.ioas_alloc()
        self.vmm.ioas_map(self.ioas, self.ram_va, self.size, iova=0)
        self.ram_map = GuestRam(self.host.process.ptes, self.ram_va, self.size)
        self.mem = GuestPhysView(self.host.ram, self.ram_map)
        """Guest-physical memory: guest RAM, and non-memory (reads -1 / zeros, writes dropped) elsewhere."""
        self.interrupts: list[Interrupt] = []
        self.viommu = VtdIommu(self.mem, self.cfg, on_interrupt=self.interrupts.append, sanitize=sanitize)
        self.devices: dict[int, GuestDevice] = {}
        self.parent_hwpt: int | None = None
        """The nest-parent HWPT on the guest-RAM IOAS (allocated with the first passthrough device)."""
        self.bridge = Bridge(self, forwarding)
        self.closed = False

    # -- the guest's side --------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int = 4) -> int:
        return self.viommu.mmio_read(offset, size)

    def mmio_write(self, offset: int, value: int, size: int = 4) -> None:
        """A guest register write (counted: bridge actions name the write that caused them)."""
        self.guest_actions += 1
        self.viommu.mmio_write(offset, value, size)

    def reset(self) -> None:
        """System reset: the vIOMMU back to its defaults; binds follow (TE is off: every passthrough device
        back on the nest parent, PASIDs detached, nested HWPTs freed)."""
        self.guest_actions += 1
        self.viommu.reset()

    @property
    def sid_map(self) -> dict[int, int]:
        """Guest requester id → host requester id of every passthrough device."""
        return {sid: d.host_sid for sid, d in self.devices.items() if isinstance(d, PassthroughDevice)}

    def hpa_of(self, gpa: int) -> int | None:
        """The host-physical address of guest-physical ``gpa`` (None outside guest RAM)."""
        hit = self.ram_map.lookup(gpa)
        return None if hit is None else hit[0]

    # -- devices -----------------------------------------------------------------------------------
    def _check_sid(self, sid: int) -> None:
        if not isinstance(sid, int) or not 0 <= sid <= 0xFFFF:
            raise ConfigError(f"sid must be 0..0xFFFF, got {sid!r}")
        if sid in self.devices:
            raise ConfigError(f"the guest already has a device at sid {sid:#06x}")

    def add_emulated_device(self, sid: int, *, pasid_bits: int = 20, ats: bool = False,
                            pri: bool = False) -> EmulatedDevice:
        """A device the VMM emulates at guest requester id ``sid``."""
        self._check_sid(sid)
        if not 0 <= pasid_bits <= 20:
            raise ConfigError(f"pasid_bits must be 0..20, got {pasid_bits!r}")
        dev = EmulatedDevice(self, sid, pasid_bits, ats, pri)
        self.devices[sid] = dev
        return dev

    def add_passthrough_device(self, guest_sid: int, host_sid: int | None = None, *, pasid_bits: int = 20,
                               pri: bool = False, ats: bool = False, group: int | None = None) -> PassthroughDevice:
        """Assign host device ``host_sid`` (default: ``guest_sid``) to the guest at ``guest_sid``: bound to
        the machine's iommufd, its IOMMU's capabilities checked against the vIOMMU's
        (:class:`~vtd_emu.vmm.caps.CapabilityError`), attached to the nest parent, then reconciled with
        whatever the guest's tables already say.  Host failures here raise (the device is not added)."""
        self._check_sid(guest_sid)
        hsid = guest_sid if host_sid is None else host_sid
        if not 0 <= pasid_bits <= 20:
            raise ConfigError(f"pasid_bits must be 0..20, got {pasid_bits!r}")
        vfio = self.host.devices.get(hsid)
        if vfio is None:
            vfio = self.host.add_device(hsid, group=group, pasid_bits=pasid_bits, pri=pri, ats=ats)
        elif (vfio.info.pri, vfio.info.ats) != (pri, ats or pri):
            raise ConfigError(f"host device {hsid:#06x} has pri={vfio.info.pri} ats={vfio.info.ats}, "
                              f"asked for pri={pri} ats={ats or pri}")
        self.guest_actions += 1
        b = self.bridge
        b.begin("plug")
        dev_id = b.host_call("bind", {"sid": guest_sid, "host_sid": hsid}, lambda: vfio.bind_iommufd(self.vmm))
        try:
            self._plug(vfio, dev_id, DeviceNeeds(pasid_bits, ats or pri, pri))
        except BaseException:
            vfio.unbind()
            raise
        dev = PassthroughDevice(self, guest_sid, vfio, dev_id, pasid_bits, ats, pri)
        self.devices[guest_sid] = dev
        b.plugged(dev)
        return dev

    def _plug(self, vfio: VfioDevice, dev_id: int, needs: DeviceNeeds) -> None:
        b = self.bridge
        info = b.host_call("get_hw_info", {"dev_id": dev_id}, lambda: self.vmm.get_hw_info(dev_id))
        caps = HostCaps.of(info)
        check_host(self.cfg, caps, needs)
        if self.parent_hwpt is None:
            flags = HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_PASID
            if self.dirty_tracking and caps.dirty_tracking:
                flags |= HWPT_ALLOC_DIRTY_TRACKING
            parent = b.host_call("hwpt_alloc", {"dev_id": dev_id, "pt_id": self.ioas, "flags": flags},
                                 lambda: self.vmm.hwpt_alloc(dev_id, self.ioas, flags))
            if flags & HWPT_ALLOC_DIRTY_TRACKING:
                try:
                    b.host_call("set_dirty_tracking", {"hwpt": parent, "enable": True},
                                lambda: self.vmm.hwpt_set_dirty_tracking(parent))
                except OSError:
                    b.host_call("destroy", {"hwpt": parent}, lambda: self.vmm.destroy(parent))
                    raise
            self.parent_hwpt = parent
        hwpt = self.parent_hwpt
        b.host_call("attach", {"dev_id": dev_id, "pasid": 0, "hwpt": hwpt}, lambda: vfio.attach_pt(hwpt))

    # -- teardown ----------------------------------------------------------------------------------
    def objects(self) -> list[ObjectInfo]:
        """The machine's live iommufd objects (id, kind, users)."""
        return self.vmm.objects()

    def close(self) -> None:
        """Unplug every passthrough device (binds freed), then close the iommufd (the IOAS, the parent and
        every pin released)."""
        if self.closed:
            return
        self.closed = True
        b = self.bridge
        b.begin("close", None, False)
        b.flush()
        for dev in list(self.devices.values()):
            if isinstance(dev, PassthroughDevice):
                b.unplug(dev)
                dev.vfio.unbind()
        b.close()
        self.vmm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Machine", "GuestRam"]
