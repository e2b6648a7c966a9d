"""vIOMMU objects (the kernel's ``viommu.c``): the Intel driver of 6.17 offers none, so only the checks the
core makes before asking the driver are here, and every valid request ends in the driver's refusal."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ..errors import fail
from ..uapi import ULONG_MAX, VIOMMU_TYPE_DEFAULT
from .core import check_u
from .device import Device

if TYPE_CHECKING:
    from .main import IommuFd


def viommu_alloc(ictx: "IommuFd", dev_id: int, viommu_type: int, flags: int) -> int:
    """``iommufd_viommu_alloc_ioctl``: EOPNOTSUPP from the driver once the device is found."""
    if flags or viommu_type == VIOMMU_TYPE_DEFAULT:
        raise fail(errno.EOPNOTSUPP, "flags or DEFAULT type")
    ictx.get_object(dev_id, Device)
    raise fail(errno.EOPNOTSUPP, "the Intel driver offers no vIOMMU")


def vdevice_alloc(ictx: "IommuFd", viommu_id: int, virt_id: int) -> int:
    """``iommufd_vdevice_alloc_ioctl``: no vIOMMU can exist here, so the vIOMMU lookup fails."""
    check_u("virt_id", virt_id, 64)
    if virt_id > ULONG_MAX:
        raise fail(errno.EINVAL, "virt_id too large")
    raise fail(errno.ENOENT, f"no vIOMMU {viommu_id}")


__all__ = ["viommu_alloc", "vdevice_alloc"]
