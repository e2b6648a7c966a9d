"""A host machine: host RAM, a physical VT-d unit driven by the Intel driver, one VMM process, and the
PCI devices VFIO can hand to it."""

from __future__ import annotations

from collections import deque
from typing import Callable

from ..memory import HostRAM, UserView
from ..vtd.config import VtdConfig
from ..vtd.iommu import VtdIommu
from .device import VfioDevice
from .intel import DmarFault, IntelIommu
from .iommufd import IommuFd
from .process import MemFd, PagePool, VmmProcess

DRIVER_POOL = (0x1_0000_0000, 0x100_0000_0000)
"""Host-physical range the driver takes its tables, queues and status words from."""
VMM_POOL = (0x100_0000_0000, 0x800_0000_0000)
"""Host-physical range backing the VMM's memory (every page a device may legitimately reach)."""


class Host:
    """``Host("modern")``: the physical IOMMU (a scalable-mode :class:`VtdIommu` with nesting) over
    :class:`HostRAM`, programmed by :class:`IntelIommu`; ``mmap``/``write_user``/``read_user`` are the VMM
    process's memory; ``open_iommufd`` and ``add_device`` are /dev/iommu and the VFIO cdevs."""

    def __init__(self, preset: str | VtdConfig = "modern") -> None:
        self.ram = HostRAM()
        cfg = VtdConfig.preset(preset) if isinstance(preset, str) else preset.validated()
        self.iommu = VtdIommu(self.ram, cfg)
        self.driver_pool = PagePool(self.ram, *DRIVER_POOL, "driver")
        self.vmm_pool = PagePool(self.ram, *VMM_POOL, "vmm")
        self.process = VmmProcess(self.ram, self.vmm_pool)
        self._deferred: deque[Callable[[], None]] = deque()
        self._draining = False
        self.intel = IntelIommu(self.iommu, self.driver_pool)
        self.devices: dict[int, VfioDevice] = {}
        self.group_owner: dict[int, IommuFd] = {}
        """IOMMU group -> the iommufd its devices are bound through (one owner per group)."""
        self._next_group = 1 << 20

    # -- VMM memory -------------------------------------------------------------------------------
    def mmap(self, length: int, *, writable: bool = True, huge: bool = False) -> int:
        """Zero-filled anonymous VMM memory; returns its user VA (``huge``: 2 MiB pages, populated)."""
        return self.process.mmap(length, writable=writable, huge=huge)

    def munmap(self, va: int, length: int) -> None:
        self.process.munmap(va, length)

    def write_user(self, va: int, data: bytes) -> None:
        self.process.write(va, data)

    def read_user(self, va: int, n: int) -> bytes:
        return self.process.read(va, n)

    def user_view(self, va: int, size: int) -> UserView:
        """VMM memory [va, va+size) addressed from 0: guest RAM as the guest sees it, for building guest
        page tables with :mod:`vtd_emu.tables`."""
        return UserView(self.process, va, size)

    def memfd_create(self, size: int) -> MemFd:
        return self.process.memfd_create(size)

    @property
    def pinned_pages(self) -> int:
        return self.process.pinned_pages

    # -- iommufd and devices ----------------------------------------------------------------------
    def open_iommufd(self) -> IommuFd:
        return IommuFd(self)

    def add_device(self, sid: int, *, group: int | None = None, pasid_bits: int = 0, pri: bool = False,
                   ats: bool = False) -> VfioDevice:
        """A PCI device at requester id ``sid`` in IOMMU group ``group`` (its own group by default).
        PRI implies ATS (PCIe builds page requests on it)."""
        if not 0 <= sid <= 0xFFFF:
            raise ValueError(f"sid must be 0..0xFFFF, got {sid:#x}")
        if sid in self.devices:
            raise ValueError(f"a device with sid {sid:#06x} exists")
        if not 0 <= pasid_bits <= 20:
            raise ValueError("pasid_bits must be 0..20")
        if group is None:
            group = self._next_group
            self._next_group += 1
        dev = VfioDevice(self, sid, group, pasid_bits, pri, ats or pri)
        self.devices[sid] = dev
        return dev

    def group_devices(self, group: int) -> list[VfioDevice]:
        return [d for d in self.devices.values() if d.group == group]

    @property
    def dmar_faults(self) -> list[DmarFault]:
        """Faults the driver's fault handler read out of the FRCDs (oldest first)."""
        return self.intel.dmar_faults

    # -- deferred work ----------------------------------------------------------------------------
    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the current operation on the unit has finished (devices reacting to page
        group responses must not re-enter the unit while it processes its invalidation queue)."""
        self._deferred.append(fn)

    def drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            while self._deferred:
                self._deferred.popleft()()
        finally:
            self._draining = False
