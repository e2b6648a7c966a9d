"""The iommufd context and its objects, one file per object as the kernel's ``drivers/iommu/iommufd/``:

- :mod:`.main` — the context (:class:`IommuFd`): object table, DESTROY, OPTION, close, one method per ioctl
- :mod:`.core` — the object base (each type's ``release`` is its destroy operation), user-data copies
- :mod:`.ioas` — IOAS objects and the IOAS_* ioctls (areas: :mod:`vtd_emu.host.iopt`)
- :mod:`.hw_pagetable` — paging and nested HWPTs, HWPT_ALLOC, dirty tracking, HWPT_INVALIDATE
- :mod:`.device` — DEVICE objects, groups, attach/replace/detach, automatic domains, GET_HW_INFO
- :mod:`.access` — in-kernel users of an IOAS (``iommufd_access``)
- :mod:`.fault` — fault queues, their files and the IOPF round trip
- :mod:`.vfio_compat`, :mod:`.viommu` — what of those the Intel host offers (little)
"""

from __future__ import annotations

from .access import Access
from .core import Obj, ObjectInfo, UserData
from .device import MSI_RANGE, AttachHandle, Device, IGroup
from .fault import Fault, FaultFile
from .hw_pagetable import Hwpt, HwptNested, HwptPaging
from .ioas import Ioas, IovaRanges
from .main import IommuFd
from .vfio_compat import VFIO_IOAS_CLEAR, VFIO_IOAS_GET, VFIO_IOAS_SET

__all__ = ["IommuFd", "FaultFile", "Access", "IovaRanges", "ObjectInfo", "UserData", "MSI_RANGE",
           "VFIO_IOAS_GET", "VFIO_IOAS_SET", "VFIO_IOAS_CLEAR", "Obj", "Ioas", "Hwpt", "HwptPaging", "HwptNested",
           "Device", "IGroup", "AttachHandle", "Fault"]
