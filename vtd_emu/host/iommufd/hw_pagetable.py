"""Hardware page tables (the kernel's ``hw_pagetable.c``): paging and nested HWPT objects, HWPT_ALLOC,
dirty tracking and HWPT_INVALIDATE."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable, Iterable

from ..errors import IommufdError, fail
from ..intel import NestedDomain, PagingDomain
from ..uapi import (HWPT_ALLOC_DIRTY_TRACKING, HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID, HWPT_DATA_NONE,
                    HWPT_DATA_VTD_S1, HWPT_DIRTY_TRACKING_ENABLE, HWPT_FAULT_ID_VALID,
                    HWPT_GET_DIRTY_BITMAP_NO_CLEAR, HWPT_INVALIDATE_DATA_VTD_S1, IOMMU_NO_PASID, U64_MAX, ULONG_MAX,
                    VTD_S1_INV_SIZE, VTD_S1_SIZE, HwptVtdS1, IommuHwptVtdS1, IommuHwptVtdS1Invalidate,
                    VtdS1Invalidate)
from . import device as _device
from .core import Obj, UserData, check_u
from .fault import Fault, iopf_handler_for
from .ioas import Ioas

if TYPE_CHECKING:
    from .device import Device
    from .main import IommuFd


class Hwpt(Obj):
    """What paging and nested HWPTs share: the driver domain, the fault queue, ALLOC_PASID."""

    fault: Fault | None = None
    pasid_compat = False
    domain: PagingDomain | NestedDomain

    def _put_fault(self) -> None:
        if self.fault is not None:
            self.fault.users -= 1


class HwptPaging(Hwpt):
    kind = "hwpt_paging"

    def __init__(self, ictx: "IommuFd", ioas: Ioas) -> None:
        super().__init__(ictx)
        self.ioas = ioas
        self.auto_domain = False
        self.nest_parent = False
        self.domain: PagingDomain

    def release(self) -> None:
        """``iommufd_hwpt_paging_destroy``: out of the IOAS (unfilling the domain), domain freed."""
        ioas = self.ioas
        if self in ioas.hwpts:
            ioas.hwpts.remove(self)
        if self.domain in ioas.iopt.domains:
            ioas.iopt.remove_domain(self.domain)
        self.domain.free()
        ioas.users -= 1
        self._put_fault()


class HwptNested(Hwpt):
    kind = "hwpt_nested"

    def __init__(self, ictx: "IommuFd", parent: HwptPaging) -> None:
        super().__init__(ictx)
        self.parent = parent
        self.domain: NestedDomain

    def release(self) -> None:
        """``iommufd_hwpt_nested_destroy``."""
        self.domain.free()
        self.parent.users -= 1
        self._put_fault()


# -- HWPT_ALLOC -------------------------------------------------------------------------------------

def hwpt_alloc(ictx: "IommuFd", dev_id: int, pt_id: int, flags: int, user: UserData, fault_id: int | None) -> int:
    """``iommufd_hwpt_alloc``."""
    check_u("flags", flags, 32)
    if fault_id is not None:
        flags |= HWPT_FAULT_ID_VALID
    if (user.type == HWPT_DATA_NONE and user.len) or (user.type != HWPT_DATA_NONE and not user.len):
        raise fail(errno.EINVAL, "data type and length disagree")
    idev = ictx.get_object(dev_id, _device.Device)
    pt = ictx.lookup(pt_id)
    if pt is None:
        raise fail(errno.EINVAL, f"no object {pt_id}")
    if isinstance(pt, Ioas):
        hwpt: Hwpt = hwpt_paging_alloc(ictx, pt, idev, IOMMU_NO_PASID, flags, False, user if user.len else None)
    elif isinstance(pt, HwptPaging):
        hwpt = hwpt_nested_alloc(ictx, pt, flags, user)
    else:
        raise fail(errno.EINVAL, "pt_id is not an IOAS or a paging HWPT")
    if flags & HWPT_FAULT_ID_VALID:
        try:
            fault = ictx.get_object(fault_id or 0, Fault)
        except IommufdError:
            ictx.destroy_object(hwpt)
            raise
        hwpt.fault = fault
        hwpt.domain.iopf_handler = iopf_handler_for(ictx, hwpt)
        fault.users += 1
    return hwpt.id


def hwpt_paging_alloc(ictx: "IommuFd", ioas: Ioas, idev: "Device", pasid: int, flags: int, immediate_attach: bool,
                      user: UserData | None) -> HwptPaging:
    """``iommufd_hwpt_paging_alloc``; with ``immediate_attach`` the device attaches before the domain is
    filled (an automatic domain)."""
    valid = HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_DIRTY_TRACKING | HWPT_FAULT_ID_VALID | HWPT_ALLOC_PASID
    if flags & ~valid or (flags & HWPT_FAULT_ID_VALID and flags & HWPT_ALLOC_NEST_PARENT):
        raise fail(errno.EOPNOTSUPP, "unsupported HWPT flags")
    drv = ictx.drv
    if flags & HWPT_ALLOC_DIRTY_TRACKING and not drv.ssads:
        raise fail(errno.EOPNOTSUPP, "device cannot track dirty pages")
    drv_flags = flags & ~HWPT_FAULT_ID_VALID
    # intel_iommu_domain_alloc_paging_flags / _second_stage
    if user is not None:
        raise fail(errno.EOPNOTSUPP, "the Intel driver takes no data for paging domains")
    if drv_flags & HWPT_ALLOC_NEST_PARENT and not drv.nesting:
        raise fail(errno.EOPNOTSUPP, "no nesting support")
    domain = PagingDomain(drv, nest_parent=bool(flags & HWPT_ALLOC_NEST_PARENT),
                          dirty_ops=bool(flags & HWPT_ALLOC_DIRTY_TRACKING))
    hwpt = HwptPaging(ictx, ioas)
    hwpt.domain = domain
    hwpt.nest_parent = domain.nest_parent
    hwpt.pasid_compat = bool(flags & HWPT_ALLOC_PASID)
    ioas.users += 1
    ictx.add_object(hwpt)
    try:
        if immediate_attach:
            _device.hw_pagetable_attach(ictx, hwpt, idev, pasid)
        try:
            ioas.iopt.add_domain(domain)
        except IommufdError:
            if immediate_attach:
                _device.hw_pagetable_detach(ictx, idev, pasid, put=False)
            raise
    except IommufdError:
        ictx.remove_object(hwpt)
        domain.free()
        ioas.users -= 1
        raise
    ioas.hwpts.append(hwpt)
    return hwpt


def hwpt_nested_alloc(ictx: "IommuFd", parent: HwptPaging, flags: int, user: UserData) -> HwptNested:
    """``iommufd_hwpt_nested_alloc`` and the Intel driver's ``intel_iommu_domain_alloc_nested``."""
    if flags & ~(HWPT_FAULT_ID_VALID | HWPT_ALLOC_PASID) or not user.len:
        raise fail(errno.EOPNOTSUPP, "unsupported nested HWPT flags, or no data")
    if parent.auto_domain or not parent.nest_parent:
        raise fail(errno.EINVAL, "parent is not a nest parent")
    if not ictx.drv.nesting:
        raise fail(errno.EOPNOTSUPP, "no nesting support")
    if user.type != HWPT_DATA_VTD_S1:
        raise fail(errno.EOPNOTSUPP, f"data type {user.type}")
    raw = user.copy_struct(HWPT_DATA_VTD_S1, VTD_S1_SIZE, VTD_S1_SIZE)
    c = IommuHwptVtdS1.parse(raw)
    s1 = HwptVtdS1(c.flags, c.pgtbl_addr, c.addr_width, c["__reserved"])
    hwpt = HwptNested(ictx, parent)
    hwpt.domain = NestedDomain(ictx.drv, parent.domain, s1)
    hwpt.pasid_compat = bool(flags & HWPT_ALLOC_PASID)
    parent.users += 1
    ictx.add_object(hwpt)
    return hwpt


# -- dirty tracking ----------------------------------------------------------------------------------

def hwpt_set_dirty_tracking(ictx: "IommuFd", hwpt_id: int, flags: int) -> None:
    if flags & ~HWPT_DIRTY_TRACKING_ENABLE:
        raise fail(errno.EOPNOTSUPP, "unknown flags")
    hwpt = ictx.get_object(hwpt_id, HwptPaging)
    domain = hwpt.domain
    if not domain.dirty_ops:
        raise fail(errno.EOPNOTSUPP, "HWPT was not allocated with DIRTY_TRACKING")
    on = bool(flags & HWPT_DIRTY_TRACKING_ENABLE)
    if on and not domain.dirty_tracking:
        # Start from clean: nothing dirtied before tracking may show up in the first bitmap.
        for area in hwpt.ioas.iopt.areas:
            domain.read_and_clear_dirty(area.iova, area.length, True, None)
    domain.set_dirty_tracking(on)


def hwpt_get_dirty_bitmap(ictx: "IommuFd", hwpt_id: int, iova: int, length: int, page_size: int,
                          flags: int) -> bytes:
    if flags & ~HWPT_GET_DIRTY_BITMAP_NO_CLEAR:
        raise fail(errno.EOPNOTSUPP, "unknown flags")
    hwpt = ictx.get_object(hwpt_id, HwptPaging)
    for name, v in (("iova", iova), ("length", length), ("page_size", page_size)):
        check_u(name, v, 64)
    last = iova + ((length - 1) & U64_MAX)
    if last > U64_MAX or iova > ULONG_MAX:
        raise fail(errno.EOVERFLOW, "iova + length overflows")
    align = hwpt.ioas.iopt.alignment
    if iova & (align - 1) or ((last + 1) & U64_MAX) & (align - 1):
        raise fail(errno.EINVAL, "range not aligned to the IOAS alignment")
    if not page_size:
        raise fail(errno.EINVAL, "page_size is zero")
    if iova % page_size or ((last + 1) & U64_MAX) % page_size:
        raise fail(errno.EINVAL, "range not aligned to page_size")
    domain = hwpt.domain
    if not domain.dirty_ops:
        raise fail(errno.EOPNOTSUPP, "HWPT was not allocated with DIRTY_TRACKING")
    slices = hwpt.ioas.iopt.contig_run(iova, last)
    if not slices or slices[-1][2] != last:
        raise fail(errno.EINVAL, "range not fully mapped")
    nbits = (last - iova) // page_size + 1
    bitmap = bytearray(((nbits + 63) // 64) * 8)

    def record(base: int, size: int) -> None:
        lo = max(base, iova)
        hi = min(base + size - 1, last)
        for bit in range((lo - iova) // page_size, (hi - iova) // page_size + 1):
            bitmap[bit // 8] |= 1 << (bit % 8)

    for _, s, e in slices:
        domain.read_and_clear_dirty(s, e - s + 1, not flags & HWPT_GET_DIRTY_BITMAP_NO_CLEAR, record)
    return bytes(bitmap)


# -- HWPT_INVALIDATE ---------------------------------------------------------------------------------

def hwpt_invalidate(ictx: "IommuFd", hwpt_id: int, entries: "Iterable[VtdS1Invalidate | bytes] | None",
                    data_type: int, entry_len: int | None, entry_num: int | None) -> int:
    """The Python call: ``entries`` None is a NULL array pointer; raw bytes entries are copied as given
    (the kernel reads them), :class:`VtdS1Invalidate` ones packed (their fields already fit)."""
    blob = b"" if entries is None else b"".join(e.pack() if isinstance(e, VtdS1Invalidate) else bytes(e)
                                              for e in entries)
    if entry_len is None:
        entry_len = VTD_S1_INV_SIZE
    if entry_num is None:
        entry_num = (len(blob) // entry_len if entry_len else 0) if entries is not None else 0

    def reader(off: int, n: int) -> bytes:
        if off + n > len(blob):
            raise fail(errno.EFAULT, "entry array too short")
        return blob[off:off + n]
    return invalidate(ictx, hwpt_id, data_type, entry_len, entry_num, entries is not None, reader)


def invalidate(ictx: "IommuFd", hwpt_id: int, data_type: int, entry_len: int, entry_num: int, has_ptr: bool,
               read: Callable[[int, int], bytes]) -> int:
    """``iommufd_hwpt_invalidate`` over an entry array read with ``read(offset, n)``; a failure carries
    ``entry_num`` (entries handled before it), which the kernel writes back either way."""
    try:
        if entry_num and (not has_ptr or not entry_len):
            raise fail(errno.EINVAL, "entries without a pointer or an entry length")
        obj = ictx.lookup(hwpt_id)
        if obj is None:
            raise fail(errno.ENOENT, f"no object {hwpt_id}")
        if not isinstance(obj, HwptNested):
            raise fail(errno.EINVAL, "only nested HWPTs take cache invalidations")
        readers = [_entry_reader(read, i, entry_len) for i in range(entry_num)]
        return obj.domain.cache_invalidate_user(readers, data_type)
    except IommufdError as e:
        if e.entry_num is None:
            e.entry_num = 0
        raise


def _entry_reader(read: Callable[[int, int], bytes], index: int, entry_len: int) -> Callable[[], VtdS1Invalidate]:
    def entry() -> VtdS1Invalidate:
        base = index * entry_len
        raw = UserData(HWPT_INVALIDATE_DATA_VTD_S1, entry_len, lambda o, n: read(base + o, n)).copy_struct(
            HWPT_INVALIDATE_DATA_VTD_S1, VTD_S1_INV_SIZE, VTD_S1_INV_SIZE)
        c = IommuHwptVtdS1Invalidate.parse(raw)
        return VtdS1Invalidate(c.addr, c.npages, c.flags, c["__reserved"])
    return entry


__all__ = ["Hwpt", "HwptPaging", "HwptNested", "hwpt_alloc", "hwpt_paging_alloc", "hwpt_nested_alloc",
           "hwpt_set_dirty_tracking", "hwpt_get_dirty_bitmap", "hwpt_invalidate", "invalidate"]
