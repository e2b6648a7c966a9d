"""An iommufd-style host layer over a physical VT-d unit.

:class:`Host` is the machine (host RAM, the physical IOMMU programmed by the Intel driver, the VMM
process); :class:`IommuFd` is an open ``/dev/iommu`` with one method per ioctl; :class:`VfioDevice` is a
device's VFIO cdev.  Failures raise :class:`IommufdError`, an ``OSError`` carrying the kernel's errno.
"""

from __future__ import annotations

from .device import DmaOutcome, VfioDevice
from .errors import IommufdError
from .host import Host
from .intel import IntelIommu
from .iommufd import Access, FaultFile, IommuFd, IovaRanges
from .uapi import (HWPT_ALLOC_DIRTY_TRACKING, HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID, HWPT_DATA_NONE,
                   HWPT_DATA_VTD_S1, HWPT_FAULT_ID_VALID, IOAS_MAP_FIXED_IOVA, IOAS_MAP_READABLE,
                   IOAS_MAP_WRITEABLE, PAGE_RESP_INVALID, PAGE_RESP_SUCCESS, VTD_INV_FLAGS_LEAF, VTD_S1_EAFE,
                   VTD_S1_SRE, VTD_S1_WPE, HwInfo, HwptVtdS1, IovaRange, PageFault, VtdS1Invalidate,
                   page_response)

__all__ = ["Host", "IommuFd", "VfioDevice", "Access", "FaultFile", "IommufdError", "DmaOutcome", "IntelIommu",
           "IovaRanges", "HwptVtdS1", "VtdS1Invalidate", "HwInfo", "IovaRange", "PageFault", "page_response",
           "IOAS_MAP_FIXED_IOVA", "IOAS_MAP_READABLE", "IOAS_MAP_WRITEABLE", "HWPT_ALLOC_NEST_PARENT",
           "HWPT_ALLOC_DIRTY_TRACKING", "HWPT_FAULT_ID_VALID", "HWPT_ALLOC_PASID", "HWPT_DATA_NONE",
           "HWPT_DATA_VTD_S1", "VTD_S1_SRE", "VTD_S1_EAFE", "VTD_S1_WPE", "VTD_INV_FLAGS_LEAF",
           "PAGE_RESP_SUCCESS", "PAGE_RESP_INVALID"]
