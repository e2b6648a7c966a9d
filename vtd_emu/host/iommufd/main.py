"""The iommufd context (the kernel's ``main.c``): the object table with ids and reference counts, DESTROY
through each type's own destroy operation, OPTION, close, and one public method per ioctl, each handing
over to the file of the object it concerns.

Semantics follow ``iommufd.md`` (Linux 6.17) and the kernel sources it names; where a check's order is
recorded there, it is reproduced.  Values outside their C type (negative, or wider than the field) are
caller mistakes and raise ``ValueError``; everything the kernel answers with an errno raises
:class:`~vtd_emu.host.errors.IommufdError`.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

from ...errors import InternalError
from ..errors import fail
from ..uapi import (HW_INFO_TYPE_DEFAULT, HWPT_DIRTY_TRACKING_ENABLE, HWPT_INVALIDATE_DATA_VTD_S1,
                    IOAS_MAP_READABLE, IOAS_MAP_WRITEABLE,
                    OPTION_HUGE_PAGES, OPTION_OP_GET, OPTION_OP_SET, OPTION_RLIMIT_MODE, HwInfo, HwptVtdS1,
                    VtdS1Invalidate)
from . import access as _access
from . import device as _device
from . import fault as _fault
from . import hw_pagetable as _hwpt
from . import ioas as _ioas
from . import vfio_compat as _vfio
from . import viommu as _viommu
from .access import Access
from .core import Obj, ObjectInfo, UserData, check_u
from .device import Device, IGroup
from .fault import FaultFile
from .hw_pagetable import Hwpt
from .ioas import Ioas, IovaRanges

if TYPE_CHECKING:
    from ..device import VfioDevice
    from ..host import Host
    from ..process import MemFd

_O = TypeVar("_O", bound=Obj)

RW = IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE


class IommuFd:
    """An open ``/dev/iommu``.  Obtain one with :meth:`vtd_emu.host.Host.open_iommufd`."""

    def __init__(self, host: "Host") -> None:
        self.host = host
        self.drv = host.intel
        self._objects: dict[int, Obj] = {}
        self.groups: dict[int, IGroup] = {}
        """IOMMU group id -> the context's ``iommufd_group`` for it."""
        self.files: set[FaultFile] = set()
        """Open fault files (closed with the context)."""
        self.account_mode_mm = False
        self.vfio_compat_ioas: Ioas | None = None
        self.closed = False

    # -- the object table --------------------------------------------------------------------------
    def add_object(self, obj: Obj) -> int:
        """Give ``obj`` the lowest free id (from 1) and enter it in the table."""
        i = 1
        while i in self._objects:
            i += 1
        if i >= 1 << 31:
            raise fail(errno.ENOSPC, "object IDs exhausted")
        obj.id = i
        self._objects[i] = obj
        return i

    def remove_object(self, obj: Obj) -> None:
        """Take ``obj`` out of the table without its destroy operation (allocation failed half-way)."""
        self._objects.pop(obj.id, None)

    def destroy_object(self, obj: Obj) -> None:
        """``iommufd_object_remove`` + the type's destroy operation."""
        self.remove_object(obj)
        obj.release()

    def get_object(self, obj_id: int, cls: type[_O]) -> _O:
        """``iommufd_get_object``: ENOENT for a missing id or one of another type."""
        self._check_open()
        obj = self._objects.get(obj_id)
        if obj is None or not isinstance(obj, cls):
            raise fail(errno.ENOENT, f"no {cls.__name__} with id {obj_id}")
        return obj

    def lookup(self, obj_id: int) -> Obj | None:
        """The object with that id, of any type."""
        return self._objects.get(obj_id)

    def is_live(self, obj: Obj) -> bool:
        return self._objects.get(obj.id) is obj

    def objects_of(self, cls: type[_O]) -> Iterator[_O]:
        """Every live object of type ``cls``, by id."""
        return (o for _, o in sorted(self._objects.items()) if isinstance(o, cls))

    def _check_open(self) -> None:
        if self.closed:
            raise fail(errno.EBADF, "iommufd closed")

    def objects(self) -> list[ObjectInfo]:
        """Every live object (id, kind, users): for tests of the object model."""
        return [ObjectInfo(o.id, o.kind, o.users) for _, o in sorted(self._objects.items())]

    def users(self, obj_id: int) -> int:
        return self._objects[obj_id].users

    # -- DESTROY / OPTION -------------------------------------------------------------------------
    def destroy(self, obj_id: int) -> None:
        """``IOMMU_DESTROY``: ENOENT for an unknown id, EBUSY while anything else holds the object."""
        self._check_open()
        check_u("id", obj_id, 32)
        obj = self._objects.get(obj_id)
        if obj is None:
            raise fail(errno.ENOENT, f"no object {obj_id}")
        if obj.users != 1:
            raise fail(errno.EBUSY, f"object {obj_id} has {obj.users - 1} other users")
        self.destroy_object(obj)

    def option(self, option_id: int, op: int, object_id: int = 0, val64: int = 0) -> int:
        """``IOMMU_OPTION``; returns ``val64`` as written back."""
        self._check_open()
        if option_id == OPTION_RLIMIT_MODE:
            if object_id:
                raise fail(errno.EOPNOTSUPP, "RLIMIT_MODE is global")
            if op == OPTION_OP_GET:
                return int(self.account_mode_mm)
            if op == OPTION_OP_SET:
                if self._objects:
                    raise fail(errno.EBUSY, "objects exist")
                if val64 not in (0, 1):
                    raise fail(errno.EINVAL, "RLIMIT_MODE is 0 or 1")
                self.account_mode_mm = bool(val64)
                return val64
            raise fail(errno.EOPNOTSUPP, "unknown op")
        if option_id == OPTION_HUGE_PAGES:
            return _ioas.ioas_option_huge_pages(self, object_id, op, val64)
        raise fail(errno.EOPNOTSUPP, "unknown option")

    # -- IOAS (ioas.c) ----------------------------------------------------------------------------
    def ioas_alloc(self, flags: int = 0) -> int:
        self._check_open()
        return _ioas.ioas_alloc(self, flags)

    def ioas_iova_ranges(self, ioas_id: int) -> IovaRanges:
        return _ioas.ioas_iova_ranges(self, ioas_id)

    def ioas_allow_iovas(self, ioas_id: int, ranges: Iterable[tuple[int, int]]) -> None:
        """Replace the allowed list (empty clears it); each range is inclusive (start, last)."""
        _ioas.ioas_allow_iovas(self, ioas_id, ranges)

    def ioas_add_reserved(self, ioas_id: int, start: int, length: int) -> None:
        """The selftest's ``IOMMU_TEST_OP_ADD_RESERVED`` (no uAPI): reserve [start, start+length)."""
        _ioas.ioas_add_reserved(self, ioas_id, start, length)

    def ioas_map(self, ioas_id: int, user_va: int, length: int, iova: int | None = None, flags: int = RW) -> int:
        """``IOMMU_IOAS_MAP``: map VMM memory [user_va, +length) at ``iova`` (FIXED_IOVA), or at an IOVA
        the IOAS chooses when ``iova`` is None and ``flags`` has no FIXED_IOVA.  Returns the IOVA."""
        self._check_open()
        return _ioas.ioas_map(self, ioas_id, user_va, length, iova, flags)

    def ioas_map_file(self, ioas_id: int, memfd: "MemFd | int", start: int, length: int,
                      iova: int | None = None, flags: int = RW) -> int:
        """``IOMMU_IOAS_MAP_FILE``: map [start, +length) of a memfd."""
        self._check_open()
        return _ioas.ioas_map_file(self, ioas_id, memfd, start, length, iova, flags)

    def ioas_copy(self, dst_ioas_id: int, dst_iova: int | None, src_ioas_id: int, src_iova: int, length: int,
                  flags: int = RW) -> int:
        """``IOMMU_IOAS_COPY``: map the pages behind src [src_iova, +length) (any sub-range of areas) at
        ``dst_iova`` of another (or the same) IOAS, sharing the pins.  Returns the destination IOVA."""
        self._check_open()
        return _ioas.ioas_copy(self, dst_ioas_id, dst_iova, src_ioas_id, src_iova, length, flags)

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """``IOMMU_IOAS_UNMAP``: bytes unmapped.  (0, U64_MAX) unmaps everything, even nothing."""
        return _ioas.ioas_unmap(self, ioas_id, iova, length)

    def ioas_change_process(self) -> None:
        """``IOMMU_IOAS_CHANGE_PROCESS``: refused while any IOAS maps user VA (not a file).  The host has
        one process, so the accounting never has anywhere else to move."""
        self._check_open()
        _ioas.ioas_change_process(self)

    # -- VFIO compatibility (vfio_compat.c) -------------------------------------------------------
    def vfio_ioas(self, op: int, ioas_id: int = 0) -> int:
        """``IOMMU_VFIO_IOAS``: GET/SET/CLEAR the IOAS the VFIO type1 compatibility layer would use."""
        self._check_open()
        return _vfio.vfio_ioas(self, op, ioas_id)

    # -- HWPTs (hw_pagetable.c) -------------------------------------------------------------------
    def hwpt_alloc(self, dev_id: int, pt_id: int, flags: int = 0, data: "HwptVtdS1 | bytes | UserData | None" = None,
                   fault_id: int | None = None, *, data_type: int | None = None,
                   data_len: int | None = None) -> int:
        """``IOMMU_HWPT_ALLOC``.  ``pt_id`` an IOAS: a paging HWPT; a paging HWPT (nest parent): a nested
        HWPT from ``data`` (:class:`HwptVtdS1`, or raw bytes to exercise length checks).  ``fault_id``
        sets FAULT_ID_VALID.  ``data_len`` larger than ``data`` models a pointer that faults."""
        self._check_open()
        check_u("flags", flags, 32)
        user = data if isinstance(data, UserData) else UserData.of(data, data_type, data_len)
        return _hwpt.hwpt_alloc(self, dev_id, pt_id, flags, user, fault_id)

    def hwpt_set_dirty_tracking(self, hwpt_id: int, enable: bool = True, *, flags: int | None = None) -> None:
        """``IOMMU_HWPT_SET_DIRTY_TRACKING`` (``flags`` overrides ``enable`` with the raw field)."""
        self._check_open()
        if flags is None:
            flags = HWPT_DIRTY_TRACKING_ENABLE if enable else 0
        _hwpt.hwpt_set_dirty_tracking(self, hwpt_id, flags)

    def hwpt_get_dirty_bitmap(self, hwpt_id: int, iova: int, length: int, page_size: int, flags: int = 0) -> bytes:
        """``IOMMU_HWPT_GET_DIRTY_BITMAP``: the bitmap as the kernel writes it (u64 words, little endian;
        bit i covers iova + i·page_size), cleared afterwards unless NO_CLEAR."""
        self._check_open()
        return _hwpt.hwpt_get_dirty_bitmap(self, hwpt_id, iova, length, page_size, flags)

    def hwpt_invalidate(self, hwpt_id: int, entries: "Iterable[VtdS1Invalidate | bytes] | None", *,
                        data_type: int = HWPT_INVALIDATE_DATA_VTD_S1, entry_len: int | None = None,
                        entry_num: int | None = None) -> int:
        """``IOMMU_HWPT_INVALIDATE``: returns how many entries were handled; a failure raises with
        ``entry_num`` set to that count (the kernel writes it back either way).  ``entries`` None is a
        NULL array pointer; ``entry_len`` other than 24 re-slices the packed entries."""
        self._check_open()
        return _hwpt.hwpt_invalidate(self, hwpt_id, entries, data_type, entry_len, entry_num)

    def invalidate_user(self, hwpt_id: int, data_type: int, entry_len: int, entry_num: int, has_ptr: bool,
                        read: Callable[[int, int], bytes]) -> int:
        """HWPT_INVALIDATE over an entry array in user memory (``read(offset, n)``), as the raw ioctl has it."""
        self._check_open()
        return _hwpt.invalidate(self, hwpt_id, data_type, entry_len, entry_num, has_ptr, read)

    # -- devices (device.c) -----------------------------------------------------------------------
    def get_hw_info(self, dev_id: int, data_len: int = 24, *, flags: int = 0,
                    data_type: int = HW_INFO_TYPE_DEFAULT) -> HwInfo:
        """``IOMMU_GET_HW_INFO`` into a ``data_len``-byte buffer."""
        self._check_open()
        return _device.get_hw_info(self, dev_id, data_len, flags, data_type)

    # What a VFIO device calls (``iommufd_device_*`` of include/linux/iommufd.h).
    def device_bind(self, vdev: "VfioDevice") -> Device:
        """``iommufd_device_bind``: a DEVICE object for ``vdev`` (EBUSY if its group belongs to another
        context)."""
        self._check_open()
        return _device.device_bind(self, vdev)

    def device_unbind(self, idev: Device) -> None:
        """``iommufd_device_unbind``, once every attachment is gone."""
        _device.device_unbind(self, idev)

    def device_attach(self, idev: Device, pasid: int, pt_id: int) -> int:
        """``iommufd_device_attach`` of the RID (``pasid`` 0) or a PASID to an IOAS or a HWPT; the HWPT id."""
        self._check_open()
        return _device.device_attach(self, idev, pasid, pt_id)

    def device_replace(self, idev: Device, pasid: int, pt_id: int) -> int:
        """``iommufd_device_replace``: completes, or leaves the old attachment working."""
        self._check_open()
        return _device.device_replace(self, idev, pasid, pt_id)

    def device_detach(self, idev: Device, pasid: int) -> None:
        """``iommufd_device_detach`` (silent when nothing is attached there)."""
        _device.device_detach(self, idev, pasid)

    def device_attached_hwpt(self, idev: Device, pasid: int) -> Hwpt | None:
        """The HWPT the RID (``pasid`` 0) or PASID of ``idev`` is attached to."""
        return _device.device_attached_hwpt(idev, pasid)

    # -- accesses ---------------------------------------------------------------------------------
    def access_create(self, ioas_id: int, *, needs_pin_pages: bool = True,
                      on_unmap: Callable[[Access, int, int], None] | None = None) -> Access:
        """``iommufd_access_create`` + ``iommufd_access_attach``: an emulated device's view of an IOAS."""
        self._check_open()
        return _access.access_create(self, ioas_id, needs_pin_pages, on_unmap)

    # -- fault queues (eventq.c) ------------------------------------------------------------------
    def fault_queue_alloc(self, flags: int = 0) -> tuple[int, FaultFile]:
        """``IOMMU_FAULT_QUEUE_ALLOC``: (fault id, its file)."""
        self._check_open()
        return _fault.fault_queue_alloc(self, flags)

    # -- vIOMMU (viommu.c; not offered by the Intel driver in 6.17) -------------------------------
    def viommu_alloc(self, dev_id: int, hwpt_id: int, viommu_type: int, flags: int = 0,
                     data: bytes | None = None) -> int:
        """``IOMMU_VIOMMU_ALLOC``: the checks before the driver is asked; the Intel driver has no vIOMMU
        object, so a valid request ends in EOPNOTSUPP."""
        self._check_open()
        return _viommu.viommu_alloc(self, dev_id, viommu_type, flags)

    def vdevice_alloc(self, viommu_id: int, dev_id: int, virt_id: int) -> int:
        """``IOMMU_VDEVICE_ALLOC``: no vIOMMU can exist here, so the vIOMMU lookup fails."""
        self._check_open()
        return _viommu.vdevice_alloc(self, viommu_id, virt_id)

    # -- raw ioctls -------------------------------------------------------------------------------
    def ioctl(self, request: int, arg: bytearray | None) -> int:
        """``ioctl(fd, request, arg)`` with the kernel's structure in ``arg`` (see :mod:`..ioctl`)."""
        from ..ioctl import ioctl
        self._check_open()
        return ioctl(self, request, arg)

    # -- close ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the fd: unbind the devices bound through it, close fault files, destroy accesses, then
        destroy every object leaf-first.  Every pin taken through this context is released."""
        if self.closed:
            return
        for dev in list(self.objects_of(Device)):
            if self.is_live(dev):
                dev.vdev.unbind()
        for f in list(self.files):
            f.close()
        for acc in list(self.objects_of(Access)):
            acc.destroy()
        while self._objects:
            progress = False
            for obj in sorted(self._objects.values(), key=lambda o: -o.id):
                if self.is_live(obj) and obj.users == 1:
                    self.destroy_object(obj)
                    progress = True
            if not progress:
                left = ", ".join(f"{o.kind} {o.id} (users {o.users})" for o in self._objects.values())
                raise InternalError(f"iommufd close leaked objects: {left}")
        self.closed = True

    def __enter__(self) -> "IommuFd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["IommuFd"]
