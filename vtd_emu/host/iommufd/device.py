"""Devices (the kernel's ``device.c``): the DEVICE object bound by VFIO, IOMMU groups, attach / replace /
detach per RID or PASID with automatic domains (``iommufd.md`` §3.2–3.7), and GET_HW_INFO."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ...errors import InternalError
from ..errors import IommufdError, fail
from ..uapi import (HW_CAP_DIRTY_TRACKING, HW_INFO_FLAG_INPUT_TYPE, HW_INFO_TYPE_DEFAULT, HW_INFO_TYPE_INTEL_VTD,
                    HW_INFO_VTD_ERRATA_772415_SPR17, IOMMU_NO_PASID, HwInfo, IommuHwInfoVtd, IovaRange)
from . import hw_pagetable as _hwpt
from .core import Obj
from .fault import auto_response
from .ioas import Ioas

if TYPE_CHECKING:
    from ..device import VfioDevice
    from ..intel import DevInfo
    from .hw_pagetable import Hwpt, HwptPaging
    from .main import IommuFd

MSI_RANGE = IovaRange(0xFEE0_0000, 0xFEEF_FFFF)
"""The reserved region every device behind an Intel IOMMU reports (IOMMU_RESV_MSI, the IOAPIC range)."""


class Device(Obj):
    kind = "device"

    def __init__(self, ictx: "IommuFd", vdev: "VfioDevice", igroup: "IGroup") -> None:
        super().__init__(ictx)
        self.vdev = vdev
        self.igroup = igroup

    @property
    def info(self) -> "DevInfo":
        return self.vdev.info

    def release(self) -> None:
        """``iommufd_device_destroy``: the device leaves its group; the last one takes the group along."""
        self.igroup.devices.remove(self)
        if not self.igroup.devices:
            del self.ictx.groups[self.igroup.group_id]


class AttachHandle:
    """``iommufd_attach_handle``: what page requests through one (group, PASID) attachment report to."""

    def __init__(self, idev: Device, hwpt: "Hwpt", pasid: int) -> None:
        self.idev = idev
        self.hwpt = hwpt
        self.pasid = pasid


class Attach:
    def __init__(self) -> None:
        self.hwpt: "Hwpt | None" = None
        self.devices: dict[int, Device] = {}
        self.handle: AttachHandle | None = None


class IGroup:
    """``iommufd_group``: per IOMMU group, per PASID, which HWPT its devices use."""

    def __init__(self, group_id: int) -> None:
        self.group_id = group_id
        self.attach: dict[int, Attach] = {}
        self.devices: list[Device] = []


# -- bind / unbind ----------------------------------------------------------------------------------

def device_bind(ictx: "IommuFd", vdev: "VfioDevice") -> Device:
    """``iommufd_device_bind``: the group must not be owned by another context."""
    owner = ictx.host.group_owner.get(vdev.group)
    if owner is not None and owner is not ictx:
        raise fail(errno.EBUSY, "the IOMMU group is owned by another iommufd")
    igroup = ictx.groups.get(vdev.group)
    if igroup is None:
        igroup = IGroup(vdev.group)
        ictx.groups[vdev.group] = igroup
    idev = Device(ictx, vdev, igroup)
    idev.users = 2  # the table and the binding driver (VFIO) until unbind
    ictx.add_object(idev)
    igroup.devices.append(idev)
    ictx.host.group_owner[vdev.group] = ictx
    return idev


def device_unbind(ictx: "IommuFd", idev: Device) -> None:
    """``iommufd_device_unbind``: every attachment must be gone already."""
    idev.users -= 1
    if idev.users != 1:
        raise InternalError(f"device {idev.id} unbound with {idev.users - 1} attachments left")
    ictx.destroy_object(idev)
    if not any(d.vdev.group == idev.vdev.group for d in ictx.objects_of(Device)):
        ictx.host.group_owner.pop(idev.vdev.group, None)


# -- attach checks -----------------------------------------------------------------------------------

def _pasid_compat(hwpt: "Hwpt", idev: Device, pasid: int) -> None:
    igroup = idev.igroup
    if pasid == IOMMU_NO_PASID:
        if not hwpt.pasid_compat and any(p != IOMMU_NO_PASID for p in igroup.attach):
            raise fail(errno.EINVAL, "PASIDs are attached: the RID HWPT must be PASID-capable")
    else:
        if not hwpt.pasid_compat:
            raise fail(errno.EINVAL, "HWPT not allocated with ALLOC_PASID")
        rid = igroup.attach.get(IOMMU_NO_PASID)
        if rid is not None and rid.hwpt is not None and not rid.hwpt.pasid_compat:
            raise fail(errno.EINVAL, "the RID uses a HWPT without ALLOC_PASID")


def _group_infos(ictx: "IommuFd", igroup: IGroup, pasid: int) -> list["DevInfo"]:
    infos = [d.info for d in ictx.host.group_devices(igroup.group_id)]
    if pasid != IOMMU_NO_PASID:
        infos = [i for i in infos if i.max_pasids]
    return infos


def _core_pasid_checks(ictx: "IommuFd", idev: Device, pasid: int) -> None:
    """``iommu_attach_device_pasid``'s own checks."""
    if pasid == IOMMU_NO_PASID:
        return
    if not idev.info.max_pasids:
        raise fail(errno.EINVAL, "the device has no PASID support")
    for info in _group_infos(ictx, idev.igroup, pasid):
        if pasid >= info.max_pasids:
            raise fail(errno.EINVAL, f"PASID {pasid:#x} beyond the device's PASID width")


# -- attach / detach / replace -----------------------------------------------------------------------

def _hwpt_attach_device(ictx: "IommuFd", hwpt: "Hwpt", idev: Device, pasid: int) -> AttachHandle:
    _pasid_compat(hwpt, idev, pasid)
    _core_pasid_checks(ictx, idev, pasid)
    infos = _group_infos(ictx, idev.igroup, pasid)
    drv = ictx.drv
    for info in infos:
        drv.check_attach(info, pasid, hwpt.domain)
    handle = AttachHandle(idev, hwpt, pasid)
    done: list["DevInfo"] = []
    try:
        for info in infos:
            drv.attach(info, pasid, hwpt.domain)
            done.append(info)
    except IommufdError:
        for info in done:
            drv.detach(info, pasid)
        raise
    drv.handles[(idev.igroup.group_id, pasid)] = handle
    return handle


def _hwpt_detach_device(ictx: "IommuFd", hwpt: "Hwpt", idev: Device, pasid: int,
                        handle: AttachHandle | None) -> None:
    for info in _group_infos(ictx, idev.igroup, pasid):
        ictx.drv.detach(info, pasid)
    ictx.drv.handles.pop((idev.igroup.group_id, pasid), None)
    auto_response(ictx, hwpt, handle)


def _reserve_dev(hwpt: "HwptPaging", idev: Device) -> None:
    hwpt.ioas.iopt.reserve(MSI_RANGE.start, MSI_RANGE.last, idev)


def hw_pagetable_attach(ictx: "IommuFd", hwpt: "Hwpt", idev: Device, pasid: int) -> None:
    """``iommufd_hw_pagetable_attach``."""
    igroup = idev.igroup
    attach = igroup.attach.get(pasid)
    first = attach is None
    if attach is None:
        attach = Attach()
    if idev.id in attach.devices:
        raise fail(errno.EBUSY, "device already attached there")
    if attach.hwpt is not None and attach.hwpt is not hwpt:
        raise fail(errno.EINVAL, "the group uses another HWPT for this PASID")
    resv = hwpt if isinstance(hwpt, _hwpt.HwptPaging) and pasid == IOMMU_NO_PASID else None
    if resv is not None:
        _reserve_dev(resv, idev)
    if first:
        try:
            attach.handle = _hwpt_attach_device(ictx, hwpt, idev, pasid)
        except IommufdError:
            if resv is not None:
                resv.ioas.iopt.remove_reserved(idev)
            raise
        attach.hwpt = hwpt
        igroup.attach[pasid] = attach
    hwpt.users += 1
    attach.devices[idev.id] = idev


def hw_pagetable_detach(ictx: "IommuFd", idev: Device, pasid: int, put: bool = True) -> "Hwpt | None":
    """``iommufd_hw_pagetable_detach`` (+ the put of the HWPT when ``put``)."""
    igroup = idev.igroup
    attach = igroup.attach.get(pasid)
    if attach is None or idev.id not in attach.devices:
        return None
    hwpt = attach.hwpt
    assert hwpt is not None
    del attach.devices[idev.id]
    if not attach.devices:
        _hwpt_detach_device(ictx, hwpt, idev, pasid, attach.handle)
        del igroup.attach[pasid]
    if isinstance(hwpt, _hwpt.HwptPaging) and pasid == IOMMU_NO_PASID:
        hwpt.ioas.iopt.remove_reserved(idev)
    hwpt.users -= 1
    if put:
        _hwpt_put(ictx, hwpt)
    return hwpt


def _hwpt_put(ictx: "IommuFd", hwpt: "Hwpt") -> None:
    # An automatic domain dies with its last attachment.
    if isinstance(hwpt, _hwpt.HwptPaging) and hwpt.auto_domain and hwpt.users == 1 and ictx.is_live(hwpt):
        ictx.destroy_object(hwpt)


def _do_replace(ictx: "IommuFd", idev: Device, pasid: int, hwpt: "Hwpt") -> "Hwpt | None":
    """``iommufd_device_do_replace``: the old HWPT (to put), or None when nothing changed."""
    igroup = idev.igroup
    attach = igroup.attach.get(pasid)
    if attach is None or idev.id not in attach.devices:
        raise fail(errno.EINVAL, "not attached: nothing to replace")
    old = attach.hwpt
    assert old is not None
    if hwpt is old:
        return None
    new_paging = hwpt if isinstance(hwpt, _hwpt.HwptPaging) else None
    old_paging = old if isinstance(old, _hwpt.HwptPaging) else None
    added_resv: list[Device] = []
    if new_paging is not None and pasid == IOMMU_NO_PASID:
        if old_paging is None or new_paging.ioas is not old_paging.ioas:
            try:
                for cur in attach.devices.values():
                    _reserve_dev(new_paging, cur)
                    added_resv.append(cur)
            except IommufdError:
                for cur in added_resv:
                    new_paging.ioas.iopt.remove_reserved(cur)
                raise
    drv = ictx.drv
    try:
        _pasid_compat(hwpt, idev, pasid)
        _core_pasid_checks(ictx, idev, pasid)
        infos = _group_infos(ictx, igroup, pasid)
        for info in infos:
            drv.check_attach(info, pasid, hwpt.domain)
        for info in infos:
            drv.attach(info, pasid, hwpt.domain)
    except IommufdError:
        for cur in added_resv:
            assert new_paging is not None
            new_paging.ioas.iopt.remove_reserved(cur)
        raise
    old_handle = attach.handle
    attach.handle = AttachHandle(idev, hwpt, pasid)
    drv.handles[(igroup.group_id, pasid)] = attach.handle
    auto_response(ictx, old, old_handle)
    if old_paging is not None and pasid == IOMMU_NO_PASID and (
            new_paging is None or new_paging.ioas is not old_paging.ioas):
        for cur in attach.devices.values():
            old_paging.ioas.iopt.remove_reserved(cur)
    attach.hwpt = hwpt
    n = len(attach.devices)
    hwpt.users += n
    old.users -= n
    return old


def _auto_get_domain(ictx: "IommuFd", idev: Device, pasid: int, ioas: Ioas,
                     replace: bool) -> "tuple[int, Hwpt | None]":
    """``iommufd_device_auto_get_domain``: (HWPT id attached, old HWPT to put)."""
    for hwpt in list(ioas.hwpts):
        if not hwpt.auto_domain:
            continue
        try:
            old = None
            if replace:
                old = _do_replace(ictx, idev, pasid, hwpt)
            else:
                hw_pagetable_attach(ictx, hwpt, idev, pasid)
        except IommufdError as e:
            if e.errno == errno.EINVAL:
                continue
            raise
        return hwpt.id, old
    new = _hwpt.hwpt_paging_alloc(ictx, ioas, idev, pasid, 0, not replace, None)
    old = None
    if replace:
        try:
            old = _do_replace(ictx, idev, pasid, new)
        except IommufdError:
            ictx.destroy_object(new)
            raise
    new.auto_domain = True
    return new.id, old


def _change_pt(ictx: "IommuFd", idev: Device, pasid: int, pt_id: int, replace: bool) -> int:
    """``iommufd_device_change_pt``: the HWPT id now attached."""
    obj = ictx.lookup(pt_id)
    if obj is None:
        raise fail(errno.ENOENT, f"no object {pt_id}")
    if isinstance(obj, _hwpt.Hwpt):
        old = None
        if replace:
            old = _do_replace(ictx, idev, pasid, obj)
        else:
            hw_pagetable_attach(ictx, obj, idev, pasid)
        out = obj.id
    elif isinstance(obj, Ioas):
        out, old = _auto_get_domain(ictx, idev, pasid, obj, replace)
    else:
        raise fail(errno.EINVAL, "pt_id is not an IOAS or a HWPT")
    if old is not None:
        _hwpt_put(ictx, old)
    # Groups answered INVALID by a replace reach their devices now.
    ictx.host.drain()
    return out


def device_attach(ictx: "IommuFd", idev: Device, pasid: int, pt_id: int) -> int:
    """``iommufd_device_attach``: the device holds one more reference on itself while attached."""
    out = _change_pt(ictx, idev, pasid, pt_id, False)
    idev.users += 1
    return out


def device_replace(ictx: "IommuFd", idev: Device, pasid: int, pt_id: int) -> int:
    """``iommufd_device_replace``."""
    return _change_pt(ictx, idev, pasid, pt_id, True)


def device_detach(ictx: "IommuFd", idev: Device, pasid: int) -> None:
    """``iommufd_device_detach``: silent when nothing is attached there."""
    if hw_pagetable_detach(ictx, idev, pasid) is not None:
        idev.users -= 1
        ictx.host.drain()


def device_attached_hwpt(idev: Device, pasid: int) -> "Hwpt | None":
    attach = idev.igroup.attach.get(pasid)
    if attach is None or idev.id not in attach.devices:
        return None
    return attach.hwpt


# -- GET_HW_INFO -------------------------------------------------------------------------------------

def get_hw_info(ictx: "IommuFd", dev_id: int, data_len: int, flags: int, data_type: int) -> HwInfo:
    """``iommufd_get_hw_info`` with the Intel driver's ``intel_iommu_hw_info``."""
    if flags & ~HW_INFO_FLAG_INPUT_TYPE:
        raise fail(errno.EOPNOTSUPP, "unknown flags")
    if not flags & HW_INFO_FLAG_INPUT_TYPE:
        data_type = HW_INFO_TYPE_DEFAULT
    idev = ictx.get_object(dev_id, Device)
    if data_type not in (HW_INFO_TYPE_DEFAULT, HW_INFO_TYPE_INTEL_VTD):
        raise fail(errno.EOPNOTSUPP, f"hw_info type {data_type}")
    drv = ictx.drv
    raw = IommuHwInfoVtd.build(dict(flags=HW_INFO_VTD_ERRATA_772415_SPR17, __reserved=0, cap_reg=drv.cap,
                                    ecap_reg=drv.ecap))
    data = raw[:data_len] + bytes(max(0, data_len - len(raw)))
    caps = HW_CAP_DIRTY_TRACKING if drv.ssads else 0
    maxp = idev.info.max_pasids
    log2 = maxp.bit_length() - 1 if maxp > 1 else 0
    return HwInfo(HW_INFO_TYPE_INTEL_VTD, data, len(raw), caps, log2)


__all__ = ["Device", "AttachHandle", "Attach", "IGroup", "MSI_RANGE", "device_bind", "device_unbind",
           "device_attach", "device_replace", "device_detach", "device_attached_hwpt", "hw_pagetable_attach",
           "hw_pagetable_detach", "get_hw_info"]
