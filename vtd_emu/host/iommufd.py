"""The iommufd context: objects (IOAS, HWPT paging/nested, device, fault queue, access), their ids and
reference counts, and one method per ioctl with the kernel's checks in the kernel's order.

Semantics follow ``iommufd.md`` (Linux 6.17) and the kernel sources it names; where a check's order is
recorded there, it is reproduced here.  Values outside their C type (negative, or wider than the field)
are caller mistakes and raise ``ValueError``; everything the kernel answers with an errno raises
:class:`~vtd_emu.host.errors.IommufdError`.
"""

from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple

from ..errors import InternalError
from .errors import IommufdError, fail
from .intel import IopfGroup, NestedDomain, PagingDomain
from .iopt import IOMMU_READ, IOMMU_WRITE, Area, IoPageTable, Pages
from .uapi import (HW_CAP_DIRTY_TRACKING, HW_INFO_FLAG_INPUT_TYPE, HW_INFO_TYPE_DEFAULT, HW_INFO_TYPE_INTEL_VTD,
                   HW_INFO_VTD_ERRATA_772415_SPR17, HWPT_ALLOC_DIRTY_TRACKING, HWPT_ALLOC_NEST_PARENT,
                   HWPT_ALLOC_PASID, HWPT_DATA_NONE, HWPT_DATA_VTD_S1, HWPT_DIRTY_TRACKING_ENABLE,
                   HWPT_FAULT_ID_VALID, HWPT_GET_DIRTY_BITMAP_NO_CLEAR, HWPT_INVALIDATE_DATA_VTD_S1,
                   IOAS_MAP_FIXED_IOVA, IOAS_MAP_FLAGS, IOAS_MAP_READABLE, IOAS_MAP_WRITEABLE, IOMMU_NO_PASID,
                   OPTION_HUGE_PAGES, OPTION_OP_GET, OPTION_OP_SET, OPTION_RLIMIT_MODE, PAGE_RESP_INVALID,
                   PAGE_RESP_SUCCESS, PAGE_RESPONSE_SIZE, PAGE_SIZE, PGFAULT_SIZE, U32_MAX, U64_MAX, ULONG_MAX,
                   VIOMMU_TYPE_DEFAULT, VTD_S1_INV_SIZE, VTD_S1_SIZE, HwInfo, HwptVtdS1, IommuHwInfoVtd,
                   IommuHwptPageResponse, IommuHwptPgfault, IommuHwptVtdS1, IommuHwptVtdS1Invalidate, IovaRange,
                   VtdS1Invalidate)

if TYPE_CHECKING:
    from .device import VfioDevice
    from .host import Host
    from .intel import DevInfo
    from .process import MemFd

MSI_RANGE = IovaRange(0xFEE0_0000, 0xFEEF_FFFF)
"""The reserved region every device behind an Intel IOMMU reports (IOMMU_RESV_MSI, the IOAPIC range)."""

VFIO_IOAS_GET, VFIO_IOAS_SET, VFIO_IOAS_CLEAR = 0, 1, 2


def _u(name: str, value: int, bits: int) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"{name} must be a {bits}-bit unsigned value, got {value!r}")
    return value


class UserData:
    """Driver data as the kernel sees it: a type, a length and a user pointer read on demand (a read
    that faults is EFAULT at the point the kernel would copy it)."""

    def __init__(self, data_type: int, length: int, read: Callable[[int, int], bytes]) -> None:
        self.type = data_type
        self.len = length
        self._read = read

    @staticmethod
    def of(data: "HwptVtdS1 | bytes | None", data_type: int | None, data_len: int | None) -> "UserData":
        if isinstance(data, HwptVtdS1):
            raw: bytes | None = data.pack()
        else:
            raw = data
        if data_type is None:
            data_type = HWPT_DATA_NONE if raw is None else HWPT_DATA_VTD_S1
        length = len(raw) if data_len is None and raw is not None else (data_len or 0)

        def read(off: int, n: int) -> bytes:
            if raw is None or off + n > len(raw):
                raise fail(errno.EFAULT, "bad user pointer")
            return raw[off:off + n]
        return UserData(data_type, length, read)

    def copy_struct(self, data_type: int, size: int, min_size: int) -> bytes:
        """``iommu_copy_struct_from_user``: exactly ``size`` bytes (zero-extended)."""
        if self.type != data_type:
            raise fail(errno.EINVAL, "data type mismatch")
        if self.len < min_size:
            raise fail(errno.EINVAL, "user data too short")
        head = self._read(0, min(self.len, size))
        if self.len > size and any(self._read(size, self.len - size)):
            raise fail(errno.E2BIG, "non-zero bytes past the structure")
        return head + bytes(size - len(head))


# -- objects ---------------------------------------------------------------------------------------

class _Obj:
    kind = "object"

    def __init__(self, ictx: "IommuFd") -> None:
        self.ictx = ictx
        self.id = 0
        self.users = 1
        """The table's reference plus one per holder (``iommufd.md`` §3.1)."""


class Ioas(_Obj):
    kind = "ioas"

    def __init__(self, ictx: "IommuFd") -> None:
        super().__init__(ictx)
        self.iopt = IoPageTable()
        self.hwpts: list[HwptPaging] = []


class Hwpt(_Obj):
    fault: "Fault | None" = None
    pasid_compat = False
    domain: PagingDomain | NestedDomain


class HwptPaging(Hwpt):
    kind = "hwpt_paging"

    def __init__(self, ictx: "IommuFd", ioas: Ioas) -> None:
        super().__init__(ictx)
        self.ioas = ioas
        self.auto_domain = False
        self.nest_parent = False
        self.domain: PagingDomain


class HwptNested(Hwpt):
    kind = "hwpt_nested"

    def __init__(self, ictx: "IommuFd", parent: HwptPaging) -> None:
        super().__init__(ictx)
        self.parent = parent
        self.domain: NestedDomain


class Device(_Obj):
    kind = "device"

    def __init__(self, ictx: "IommuFd", vdev: "VfioDevice", igroup: "IGroup") -> None:
        super().__init__(ictx)
        self.vdev = vdev
        self.igroup = igroup

    @property
    def info(self) -> "DevInfo":
        return self.vdev.info


class AttachHandle:
    """``iommufd_attach_handle``: what page requests through one (group, PASID) attachment report to."""

    def __init__(self, idev: Device, hwpt: Hwpt, pasid: int) -> None:
        self.idev = idev
        self.hwpt = hwpt
        self.pasid = pasid


class Attach:
    def __init__(self) -> None:
        self.hwpt: Hwpt | None = None
        self.devices: dict[int, Device] = {}
        self.handle: AttachHandle | None = None


class IGroup:
    """``iommufd_group``: per IOMMU group, per PASID, which HWPT its devices use."""

    def __init__(self, group_id: int) -> None:
        self.group_id = group_id
        self.attach: dict[int, Attach] = {}
        self.devices: list[Device] = []


class Fault(_Obj):
    """A fault queue: groups waiting to be read, and groups read but not answered (by cookie)."""

    kind = "fault"

    def __init__(self, ictx: "IommuFd") -> None:
        super().__init__(ictx)
        self.deliver: deque[IopfGroup] = deque()
        self.response: dict[int, IopfGroup] = {}

    def next_cookie(self) -> int:
        c = 1
        while c in self.response:
            c += 1
        if c > U32_MAX:
            raise fail(errno.ENOSPC, "no free fault cookie")
        return c


class FaultFile:
    """The fault queue's file descriptor ("[iommufd-pgfault]"): ``read`` returns whole groups of 40-byte
    ``iommu_hwpt_pgfault`` records (b"" when none is queued), ``write`` takes 8-byte
    ``iommu_hwpt_page_response`` records."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.closed = False
        self.fd = fault.ictx.host.process.alloc_fd(self)

    def _check(self) -> None:
        if self.closed:
            raise fail(errno.EBADF, "fault file closed")

    def poll(self) -> bool:
        """EPOLLIN: something to read."""
        self._check()
        return bool(self.fault.deliver)

    def read(self, count: int) -> bytes:
        self._check()
        if count % PGFAULT_SIZE:
            raise fail(errno.ESPIPE, "count is not a multiple of the record size")
        f = self.fault
        out = bytearray()
        while f.deliver:
            group = f.deliver[0]
            if len(out) >= count or len(group.faults) * PGFAULT_SIZE > count - len(out):
                break
            f.deliver.popleft()
            group.cookie = f.next_cookie()
            f.response[group.cookie] = group
            idev = group.handle.idev  # type: ignore[attr-defined]
            for flt in group.faults:
                out += IommuHwptPgfault.build(dict(flags=flt.flags, dev_id=idev.id, pasid=flt.pasid,
                                                   grpid=flt.grpid, perm=flt.perm, __reserved=0, addr=flt.addr,
                                                   length=0, cookie=group.cookie))
        return bytes(out)

    def write(self, data: bytes) -> int:
        self._check()
        if len(data) % PAGE_RESPONSE_SIZE:
            raise fail(errno.ESPIPE, "length is not a multiple of the response size")
        f = self.fault
        done = 0
        err: IommufdError | None = None
        while done < len(data):
            r = _parse_response(data[done:done + PAGE_RESPONSE_SIZE])
            if r.code not in (PAGE_RESP_SUCCESS, PAGE_RESP_INVALID):
                err = fail(errno.EINVAL, f"response code {r.code}")
                break
            group = f.response.pop(r.cookie, None)
            if group is None:
                err = fail(errno.EINVAL, f"no group waits for cookie {r.cookie}")
                break
            f.ictx._respond(group, r.code)
            done += PAGE_RESPONSE_SIZE
        f.ictx.host.drain()
        if done == 0 and err is not None:
            raise err
        return done

    def close(self) -> None:
        """Closing drops the file's references; its pending groups stay until the fault object dies."""
        if self.closed:
            return
        self.closed = True
        self.fault.users -= 1
        self.fault.ictx._files.discard(self)
        self.fault.ictx.host.process.files.pop(self.fd, None)


def _parse_response(raw: bytes) -> "_Resp":
    c = IommuHwptPageResponse.parse(raw)
    return _Resp(c.cookie, c.code)


class _Resp(NamedTuple):
    cookie: int
    code: int


class IovaRanges(NamedTuple):
    """``IOMMU_IOAS_IOVA_RANGES``: the usable ranges and the alignment maps must respect."""

    ranges: list[IovaRange]
    alignment: int


class Access(_Obj):
    """An in-kernel user of an IOAS (an emulated device, ``iommufd_access``): pins pages, reads and writes
    through the IOAS, follows IOAS replacement.  When an area it pinned is unmapped, ``on_unmap(iova,
    length)`` is called and must unpin what overlaps (the default does)."""

    kind = "access"

    def __init__(self, ictx: "IommuFd", *, needs_pin_pages: bool,
                 on_unmap: Callable[["Access", int, int], None] | None) -> None:
        super().__init__(ictx)
        self.users = 2  # the table and the driver that created it
        self.ioas: Ioas | None = None
        self.iova_alignment = PAGE_SIZE if needs_pin_pages else 1
        self.needs_pin_pages = needs_pin_pages
        self.on_unmap = on_unmap
        self.items: dict[int, tuple[int, int, list[tuple[Area, int, int]]]] = {}
        self._next_item = 1
        self.unmap_calls = 0

    def _change_ioas(self, new: Ioas | None) -> None:
        cur = self.ioas
        if cur is new:
            return
        if new is not None:
            new.iopt.add_access(self)
            new.users += 1
        if cur is not None:
            self.notify_unmap(0, ULONG_MAX)
            for item in list(self.items):
                self._unpin_item(item)
            cur.iopt.remove_access(self)
            cur.users -= 1
        self.ioas = new

    def replace_ioas(self, ioas_id: int) -> None:
        """``iommufd_access_replace``: move to another IOAS (pins are dropped through ``on_unmap``)."""
        if self.ioas is None:
            raise fail(errno.ENOENT, "access has no IOAS")
        ioas = self.ictx._get(ioas_id, Ioas)
        assert isinstance(ioas, Ioas)
        self._change_ioas(ioas)

    def notify_unmap(self, iova: int, length: int) -> None:
        self.unmap_calls += 1
        if self.on_unmap is not None:
            self.on_unmap(self, iova, length)
            return
        last = iova + length - 1
        for item, (s, n, _) in list(self.items.items()):
            if s <= last and s + n - 1 >= iova:
                self._unpin_item(item)

    def _contig_run(self, iova: int, length: int) -> tuple[int, list[tuple[Area, int, int]]]:
        """(last IOVA, the IOAS's contiguous area slices from ``iova``), after the range checks pinning
        and access share."""
        if not length:
            raise fail(errno.EINVAL, "length is zero")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise fail(errno.EOVERFLOW, "iova + length overflows")
        if self.ioas is None:
            raise fail(errno.ENOENT, "access has no IOAS")
        return last, self.ioas.iopt.contig_run(iova, last)

    def pin_pages(self, iova: int, length: int, write: bool = False) -> tuple[int, list[int]]:
        """``iommufd_access_pin_pages``: (item id, host address of each page).  Unpin with the id."""
        _u("iova", iova, 64)
        _u("length", length, 64)
        if not self.needs_pin_pages:
            raise fail(errno.EINVAL, "access created without pin-pages support")
        last, slices = self._contig_run(iova, length)
        pinned: list[tuple[Area, int, int]] = []
        out: list[int] = []
        try:
            for n, (area, s, e) in enumerate(slices):
                if area.prevent_access or not _contig_aligned(area, s, n == len(slices) - 1):
                    raise fail(errno.EINVAL, "access range not page aligned in its pages")
                if write and not area.prot & IOMMU_WRITE:
                    raise fail(errno.EPERM, "write pin of a read-only area")
                fi, _ = area.index_of(s)
                li, _ = area.index_of(e)
                out += area.pages.pin(fi, li)
                area.num_accesses += 1
                pinned.append((area, fi, li))
            if not slices or slices[-1][2] != last:
                raise fail(errno.ENOENT, "range not fully mapped")
        except IommufdError:
            for area, fi, li in pinned:
                area.pages.unpin(fi, li)
                area.num_accesses -= 1
            raise
        item = self._next_item
        self._next_item += 1
        self.items[item] = (iova, length, pinned)
        return item, out

    def unpin(self, item: int) -> None:
        if item not in self.items:
            raise fail(errno.ENOENT, f"no pinned item {item}")
        self._unpin_item(item)

    def _unpin_item(self, item: int) -> None:
        _, _, pinned = self.items.pop(item)
        for area, fi, li in pinned:
            area.pages.unpin(fi, li)
            area.num_accesses -= 1

    def _rw(self, iova: int, length: int, write: bool, data: bytes | None) -> bytes:
        _u("iova", iova, 64)
        last, slices = self._contig_run(iova, length)
        out = bytearray()
        for area, s, e in slices:
            if area.prevent_access:
                raise fail(errno.EINVAL, "area being unmapped")
            if not area.prot & (IOMMU_WRITE if write else IOMMU_READ):
                raise fail(errno.EPERM, "area does not allow this access")
        if not slices or slices[-1][2] != last:
            raise fail(errno.ENOENT, "range not fully mapped")
        for area, s, e in slices:
            pos = s
            while pos <= e:
                index, off = area.index_of(pos)
                n = min(PAGE_SIZE - off, e - pos + 1)
                if write:
                    assert data is not None
                    area.pages.write(index, off, data[pos - iova:pos - iova + n])
                else:
                    out += area.pages.read(index, off, n)
                pos += n
        return bytes(out)

    def read(self, iova: int, length: int) -> bytes:
        """``iommufd_access_rw`` read."""
        return self._rw(iova, length, False, None)

    def write(self, iova: int, data: bytes) -> None:
        """``iommufd_access_rw`` write."""
        self._rw(iova, len(data), True, bytes(data))

    def destroy(self) -> None:
        """``iommufd_access_destroy``: drop pins and the IOAS, then the object."""
        ictx = self.ictx
        if self.id not in ictx._objects:
            return
        self._change_ioas(None)
        ictx._remove(self)


def _contig_aligned(area: Area, s: int, final: bool) -> bool:
    if (area.start_byte + s - area.iova) % PAGE_SIZE:
        return False
    if not final and (area.start_byte + area.last - area.iova) % PAGE_SIZE != PAGE_SIZE - 1:
        return False
    return True


@dataclass
class ObjectInfo:
    id: int
    kind: str
    users: int


# -- the context -----------------------------------------------------------------------------------

class IommuFd:
    """An open ``/dev/iommu``.  Obtain one with :meth:`vtd_emu.host.Host.open_iommufd`."""

    def __init__(self, host: "Host") -> None:
        self.host = host
        self.drv = host.intel
        self._objects: dict[int, _Obj] = {}
        self._groups: dict[int, IGroup] = {}
        self._files: set[FaultFile] = set()
        self.account_mode_mm = False
        self.vfio_compat_ioas: Ioas | None = None
        self.closed = False

    # -- object table -----------------------------------------------------------------------------
    def _add(self, obj: _Obj) -> int:
        i = 1
        while i in self._objects:
            i += 1
        if i >= 1 << 31:
            raise fail(errno.ENOSPC, "object IDs exhausted")
        obj.id = i
        self._objects[i] = obj
        return i

    def _remove(self, obj: _Obj) -> None:
        self._objects.pop(obj.id, None)

    def _get(self, obj_id: int, cls: type) -> "_Obj":
        self._check_open()
        obj = self._objects.get(obj_id)
        if obj is None or not isinstance(obj, cls):
            raise fail(errno.ENOENT, f"no {cls.__name__} with id {obj_id}")
        return obj

    def _check_open(self) -> None:
        if self.closed:
            raise fail(errno.EBADF, "iommufd closed")

    def objects(self) -> list[ObjectInfo]:
        """Every live object (id, kind, users): for tests of the object model."""
        return [ObjectInfo(o.id, o.kind, o.users) for o in sorted(self._objects.values(), key=lambda o: o.id)]

    def users(self, obj_id: int) -> int:
        return self._objects[obj_id].users

    # -- DESTROY ----------------------------------------------------------------------------------
    def destroy(self, obj_id: int) -> None:
        """``IOMMU_DESTROY``: ENOENT for an unknown id, EBUSY while anything else holds the object."""
        self._check_open()
        _u("id", obj_id, 32)
        obj = self._objects.get(obj_id)
        if obj is None:
            raise fail(errno.ENOENT, f"no object {obj_id}")
        if obj.users != 1:
            raise fail(errno.EBUSY, f"object {obj_id} has {obj.users - 1} other users")
        self._destroy_obj(obj)

    def _destroy_obj(self, obj: _Obj) -> None:
        self._remove(obj)
        if isinstance(obj, Ioas):
            obj.iopt.unmap_all()
            if self.vfio_compat_ioas is obj:
                self.vfio_compat_ioas = None
        elif isinstance(obj, HwptPaging):
            ioas = obj.ioas
            if obj in ioas.hwpts:
                ioas.hwpts.remove(obj)
            if obj.domain in ioas.iopt.domains:
                ioas.iopt.remove_domain(obj.domain)
            obj.domain.free()
            ioas.users -= 1
            if obj.fault is not None:
                obj.fault.users -= 1
        elif isinstance(obj, HwptNested):
            obj.domain.free()
            obj.parent.users -= 1
            if obj.fault is not None:
                obj.fault.users -= 1
        elif isinstance(obj, Fault):
            for group in list(obj.deliver) + list(obj.response.values()):
                self._respond(group, PAGE_RESP_INVALID)
            obj.deliver.clear()
            obj.response.clear()
            self.host.drain()
        elif isinstance(obj, Device):
            obj.igroup.devices.remove(obj)
            if not obj.igroup.devices:
                del self._groups[obj.igroup.group_id]
        elif isinstance(obj, Access):
            obj._change_ioas(None)

    # -- IOAS -------------------------------------------------------------------------------------
    def ioas_alloc(self, flags: int = 0) -> int:
        self._check_open()
        if flags:
            raise fail(errno.EOPNOTSUPP, "IOAS_ALLOC flags")
        return self._add(Ioas(self))

    def ioas_iova_ranges(self, ioas_id: int) -> IovaRanges:
        ioas = self._get(ioas_id, Ioas)
        assert isinstance(ioas, Ioas)
        return IovaRanges(ioas.iopt.iova_ranges(), ioas.iopt.alignment)

    def ioas_allow_iovas(self, ioas_id: int, ranges: Iterable[tuple[int, int]]) -> None:
        """Replace the allowed list (empty clears it); each range is inclusive (start, last)."""
        ioas = self._get(ioas_id, Ioas)
        assert isinstance(ioas, Ioas)
        new: list[IovaRange] = []
        for start, last in ranges:
            _u("start", start, 64)
            _u("last", last, 64)
            if start >= last:
                raise fail(errno.EINVAL, "empty or inverted range")
            if any(r.start <= last and r.last >= start for r in new):
                raise fail(errno.EINVAL, "overlapping ranges")
            new.append(IovaRange(start, last))
        ioas.iopt.set_allowed(new)

    def ioas_add_reserved(self, ioas_id: int, start: int, length: int) -> None:
        """The selftest's ``IOMMU_TEST_OP_ADD_RESERVED`` (no uAPI): reserve [start, start+length)."""
        ioas = self._get(ioas_id, Ioas)
        assert isinstance(ioas, Ioas)
        ioas.iopt.reserve(start, start + length - 1, None)

    @staticmethod
    def _map_prot(flags: int) -> int:
        return (IOMMU_READ if flags & IOAS_MAP_READABLE else 0) | (IOMMU_WRITE if flags & IOAS_MAP_WRITEABLE else 0)

    def _map_prologue(self, ioas_id: int, length: int, iova: int | None, flags: int) -> tuple[Ioas, int]:
        """The checks MAP and MAP_FILE share, in the kernel's order; the IOAS and the flags (with
        FIXED_IOVA set when ``iova`` is given)."""
        _u("length", length, 64)
        if iova is not None:
            _u("iova", iova, 64)
            flags |= IOAS_MAP_FIXED_IOVA
        if flags & ~IOAS_MAP_FLAGS:
            raise fail(errno.EOPNOTSUPP, "unknown map flags")
        if (iova or 0) >= ULONG_MAX or length >= ULONG_MAX:
            raise fail(errno.EOVERFLOW, "iova or length too large")
        if not flags & (IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE):
            raise fail(errno.EINVAL, "neither readable nor writeable")
        ioas = self._get(ioas_id, Ioas)
        assert isinstance(ioas, Ioas)
        return ioas, flags

    def _map_new_pages(self, ioas: Ioas, base: int, start_byte: int, length: int, iova: int | None, flags: int,
                       uptr: int, memfd: "MemFd | None" = None) -> int:
        npages = (start_byte + length + PAGE_SIZE - 1) // PAGE_SIZE
        pages = Pages(self.host.process, base=base, npages=npages, writable=bool(flags & IOAS_MAP_WRITEABLE),
                      memfd=memfd)
        fixed = (iova or 0) if flags & IOAS_MAP_FIXED_IOVA else None
        return ioas.iopt.map_pages([(pages, start_byte, length)], length, fixed, self._map_prot(flags), uptr)

    def ioas_map(self, ioas_id: int, user_va: int, length: int, iova: int | None = None,
                 flags: int = IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE) -> int:
        """``IOMMU_IOAS_MAP``: map VMM memory [user_va, +length) at ``iova`` (FIXED_IOVA), or at an IOVA
        the IOAS chooses when ``iova`` is None and ``flags`` has no FIXED_IOVA.  Returns the IOVA."""
        self._check_open()
        _u("flags", flags, 32)
        _u("user_va", user_va, 64)
        ioas, flags = self._map_prologue(ioas_id, length, iova, flags)
        if length == 0 or length > ULONG_MAX - PAGE_SIZE:
            raise fail(errno.EINVAL, "length is zero")
        if user_va + length > ULONG_MAX:
            raise fail(errno.EOVERFLOW, "user_va + length overflows")
        base = user_va & ~(PAGE_SIZE - 1)
        return self._map_new_pages(ioas, base, user_va - base, length, iova, flags, user_va)

    def ioas_map_file(self, ioas_id: int, memfd: "MemFd | int", start: int, length: int, iova: int | None = None,
                      flags: int = IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE) -> int:
        """``IOMMU_IOAS_MAP_FILE``: map [start, +length) of a memfd."""
        self._check_open()
        _u("start", start, 64)
        ioas, flags = self._map_prologue(ioas_id, length, iova, flags)
        from .process import MemFd
        f = self.host.process.files.get(memfd) if isinstance(memfd, int) else memfd
        if f is None or (isinstance(f, MemFd) and f.fd not in self.host.process.files):
            raise fail(errno.EBADF, "not an open file descriptor")
        if not isinstance(f, MemFd):
            raise fail(errno.EINVAL, "not a memfd/shmem/hugetlbfs file")
        if length == 0 or start + length > f.size:
            raise fail(errno.EINVAL, "range empty or past the end of the file")
        return self._map_new_pages(ioas, start // PAGE_SIZE, start % PAGE_SIZE, length, iova, flags, start, memfd=f)

    def ioas_copy(self, dst_ioas_id: int, dst_iova: int | None, src_ioas_id: int, src_iova: int, length: int,
                  flags: int = IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE) -> int:
        """``IOMMU_IOAS_COPY``: map the pages behind src [src_iova, +length) (any sub-range of areas) at
        ``dst_iova`` of another (or the same) IOAS, sharing the pins.  Returns the destination IOVA."""
        self._check_open()
        for name, v in (("src_iova", src_iova), ("length", length), ("flags", flags)):
            _u(name, v, 64)
        if dst_iova is not None:
            _u("dst_iova", dst_iova, 64)
            flags |= IOAS_MAP_FIXED_IOVA
        if flags & ~IOAS_MAP_FLAGS:
            raise fail(errno.EOPNOTSUPP, "unknown copy flags")
        if length >= ULONG_MAX or src_iova >= ULONG_MAX or (dst_iova or 0) >= ULONG_MAX:
            raise fail(errno.EOVERFLOW, "value too large")
        if not flags & (IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE):
            raise fail(errno.EINVAL, "neither readable nor writeable")
        src = self._get(src_ioas_id, Ioas)
        assert isinstance(src, Ioas)
        elems = src.iopt.get_pages(src_iova, length)
        dst = self._get(dst_ioas_id, Ioas)
        assert isinstance(dst, Ioas)
        fixed = (dst_iova or 0) if flags & IOAS_MAP_FIXED_IOVA else None
        first, sb, _ = elems[0]
        uptr = (first.base * PAGE_SIZE if first.is_file else first.base) + sb
        return dst.iopt.map_pages(elems, length, fixed, self._map_prot(flags), uptr)

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """``IOMMU_IOAS_UNMAP``: bytes unmapped.  (0, U64_MAX) unmaps everything, even nothing."""
        ioas = self._get(ioas_id, Ioas)
        assert isinstance(ioas, Ioas)
        _u("iova", iova, 64)
        _u("length", length, 64)
        if iova == 0 and length == U64_MAX:
            return ioas.iopt.unmap_all()
        if iova >= ULONG_MAX or length >= ULONG_MAX:
            raise fail(errno.EOVERFLOW, "iova or length too large")
        if not length:
            raise fail(errno.EINVAL, "length is zero")
        if iova + length - 1 > ULONG_MAX:
            raise fail(errno.EOVERFLOW, "iova + length overflows")
        return ioas.iopt.unmap(iova, iova + length - 1)

    def ioas_change_process(self) -> None:
        """``IOMMU_IOAS_CHANGE_PROCESS``: refused while any IOAS maps user VA (not a file).  The host has
        one process, so the accounting never has anywhere else to move."""
        self._check_open()
        for obj in self._objects.values():
            if isinstance(obj, Ioas) and any(not a.pages.is_file for a in obj.iopt.areas):
                raise fail(errno.EINVAL, "an IOAS maps user memory")

    # -- OPTION / VFIO compat ---------------------------------------------------------------------
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
            ioas = self._get(object_id, Ioas)
            assert isinstance(ioas, Ioas)
            if op == OPTION_OP_GET:
                return int(not ioas.iopt.disable_large_pages)
            if op == OPTION_OP_SET:
                if val64 == 0:
                    ioas.iopt.set_large_pages(False)
                elif val64 == 1:
                    ioas.iopt.set_large_pages(True)
                else:
                    raise fail(errno.EINVAL, "HUGE_PAGES is 0 or 1")
                return val64
            raise fail(errno.EOPNOTSUPP, "unknown op")
        raise fail(errno.EOPNOTSUPP, "unknown option")

    def vfio_ioas(self, op: int, ioas_id: int = 0) -> int:
        """``IOMMU_VFIO_IOAS``: GET/SET/CLEAR the IOAS the VFIO type1 compatibility layer would use."""
        self._check_open()
        if op == VFIO_IOAS_GET:
            if self.vfio_compat_ioas is None:
                raise fail(errno.ENODEV, "no compat IOAS")
            return self.vfio_compat_ioas.id
        if op == VFIO_IOAS_SET:
            ioas = self._get(ioas_id, Ioas)
            assert isinstance(ioas, Ioas)
            self.vfio_compat_ioas = ioas
            return ioas_id
        if op == VFIO_IOAS_CLEAR:
            self.vfio_compat_ioas = None
            return 0
        raise fail(errno.EOPNOTSUPP, "unknown op")

    # -- HWPT_ALLOC -------------------------------------------------------------------------------
    def hwpt_alloc(self, dev_id: int, pt_id: int, flags: int = 0, data: "HwptVtdS1 | bytes | UserData | None" = None,
                   fault_id: int | None = None, *, data_type: int | None = None,
                   data_len: int | None = None) -> int:
        """``IOMMU_HWPT_ALLOC``.  ``pt_id`` an IOAS: a paging HWPT; a paging HWPT (nest parent): a nested
        HWPT from ``data`` (:class:`HwptVtdS1`, or raw bytes to exercise length checks).  ``fault_id``
        sets FAULT_ID_VALID.  ``data_len`` larger than ``data`` models a pointer that faults."""
        self._check_open()
        _u("flags", flags, 32)
        if fault_id is not None:
            flags |= HWPT_FAULT_ID_VALID
        user = data if isinstance(data, UserData) else UserData.of(data, data_type, data_len)
        if (user.type == HWPT_DATA_NONE and user.len) or (user.type != HWPT_DATA_NONE and not user.len):
            raise fail(errno.EINVAL, "data type and length disagree")
        idev = self._get(dev_id, Device)
        assert isinstance(idev, Device)
        pt = self._objects.get(pt_id)
        if pt is None:
            raise fail(errno.EINVAL, f"no object {pt_id}")
        if isinstance(pt, Ioas):
            hwpt: Hwpt = self._hwpt_paging_alloc(pt, idev, IOMMU_NO_PASID, flags, False,
                                                  user if user.len else None)
        elif isinstance(pt, HwptPaging):
            hwpt = self._hwpt_nested_alloc(pt, flags, user)
        else:
            raise fail(errno.EINVAL, "pt_id is not an IOAS or a paging HWPT")
        if flags & HWPT_FAULT_ID_VALID:
            try:
                fault = self._get(fault_id or 0, Fault)
            except IommufdError:
                self._destroy_obj(hwpt)
                raise
            assert isinstance(fault, Fault)
            hwpt.fault = fault
            hwpt.domain.iopf_handler = self._iopf_handler_for(hwpt)
            fault.users += 1
        return hwpt.id

    def _hwpt_paging_alloc(self, ioas: Ioas, idev: Device, pasid: int, flags: int, immediate_attach: bool,
                           user: UserData | None) -> HwptPaging:
        valid = HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_DIRTY_TRACKING | HWPT_FAULT_ID_VALID | HWPT_ALLOC_PASID
        if flags & ~valid or (flags & HWPT_FAULT_ID_VALID and flags & HWPT_ALLOC_NEST_PARENT):
            raise fail(errno.EOPNOTSUPP, "unsupported HWPT flags")
        if flags & HWPT_ALLOC_DIRTY_TRACKING and not self.drv.ssads:
            raise fail(errno.EOPNOTSUPP, "device cannot track dirty pages")
        drv_flags = flags & ~HWPT_FAULT_ID_VALID
        # intel_iommu_domain_alloc_paging_flags / _second_stage
        if user is not None:
            raise fail(errno.EOPNOTSUPP, "the Intel driver takes no data for paging domains")
        if drv_flags & HWPT_ALLOC_NEST_PARENT and not self.drv.nesting:
            raise fail(errno.EOPNOTSUPP, "no nesting support")
        domain = PagingDomain(self.drv, nest_parent=bool(flags & HWPT_ALLOC_NEST_PARENT),
                              dirty_ops=bool(flags & HWPT_ALLOC_DIRTY_TRACKING))
        hwpt = HwptPaging(self, ioas)
        hwpt.domain = domain
        hwpt.nest_parent = domain.nest_parent
        hwpt.pasid_compat = bool(flags & HWPT_ALLOC_PASID)
        ioas.users += 1
        self._add(hwpt)
        try:
            if immediate_attach:
                self._hw_pagetable_attach(hwpt, idev, pasid)
            try:
                ioas.iopt.add_domain(domain)
            except IommufdError:
                if immediate_attach:
                    self._hw_pagetable_detach(idev, pasid, put=False)
                raise
        except IommufdError:
            self._remove(hwpt)
            domain.free()
            ioas.users -= 1
            raise
        ioas.hwpts.append(hwpt)
        return hwpt

    def _hwpt_nested_alloc(self, parent: HwptPaging, flags: int, user: UserData) -> HwptNested:
        if flags & ~(HWPT_FAULT_ID_VALID | HWPT_ALLOC_PASID) or not user.len:
            raise fail(errno.EOPNOTSUPP, "unsupported nested HWPT flags, or no data")
        if parent.auto_domain or not parent.nest_parent:
            raise fail(errno.EINVAL, "parent is not a nest parent")
        # intel_iommu_domain_alloc_nested
        if not self.drv.nesting:
            raise fail(errno.EOPNOTSUPP, "no nesting support")
        if user.type != HWPT_DATA_VTD_S1:
            raise fail(errno.EOPNOTSUPP, f"data type {user.type}")
        raw = user.copy_struct(HWPT_DATA_VTD_S1, VTD_S1_SIZE, VTD_S1_SIZE)
        c = IommuHwptVtdS1.parse(raw)
        s1 = HwptVtdS1(c.flags, c.pgtbl_addr, c.addr_width, c["__reserved"])
        hwpt = HwptNested(self, parent)
        hwpt.domain = NestedDomain(self.drv, parent.domain, s1)
        hwpt.pasid_compat = bool(flags & HWPT_ALLOC_PASID)
        parent.users += 1
        self._add(hwpt)
        return hwpt

    # -- GET_HW_INFO ------------------------------------------------------------------------------
    def get_hw_info(self, dev_id: int, data_len: int = 24, *, flags: int = 0,
                    data_type: int = HW_INFO_TYPE_DEFAULT) -> HwInfo:
        """``IOMMU_GET_HW_INFO`` into a ``data_len``-byte buffer."""
        self._check_open()
        if flags & ~HW_INFO_FLAG_INPUT_TYPE:
            raise fail(errno.EOPNOTSUPP, "unknown flags")
        if not flags & HW_INFO_FLAG_INPUT_TYPE:
            data_type = HW_INFO_TYPE_DEFAULT
        idev = self._get(dev_id, Device)
        assert isinstance(idev, Device)
        if data_type not in (HW_INFO_TYPE_DEFAULT, HW_INFO_TYPE_INTEL_VTD):
            raise fail(errno.EOPNOTSUPP, f"hw_info type {data_type}")
        raw = IommuHwInfoVtd.build(dict(flags=HW_INFO_VTD_ERRATA_772415_SPR17, __reserved=0,
                                        cap_reg=self.drv.cap, ecap_reg=self.drv.ecap))
        data = raw[:data_len] + bytes(max(0, data_len - len(raw)))
        caps = HW_CAP_DIRTY_TRACKING if self.drv.ssads else 0
        maxp = idev.info.max_pasids
        log2 = maxp.bit_length() - 1 if maxp > 1 else 0
        return HwInfo(HW_INFO_TYPE_INTEL_VTD, data, len(raw), caps, log2)

    # -- dirty tracking ---------------------------------------------------------------------------
    def hwpt_set_dirty_tracking(self, hwpt_id: int, enable: bool = True, *, flags: int | None = None) -> None:
        """``IOMMU_HWPT_SET_DIRTY_TRACKING`` (``flags`` overrides ``enable`` with the raw field)."""
        self._check_open()
        if flags is None:
            flags = HWPT_DIRTY_TRACKING_ENABLE if enable else 0
        if flags & ~HWPT_DIRTY_TRACKING_ENABLE:
            raise fail(errno.EOPNOTSUPP, "unknown flags")
        hwpt = self._get(hwpt_id, HwptPaging)
        assert isinstance(hwpt, HwptPaging)
        domain = hwpt.domain
        if not domain.dirty_ops:
            raise fail(errno.EOPNOTSUPP, "HWPT was not allocated with DIRTY_TRACKING")
        on = bool(flags & HWPT_DIRTY_TRACKING_ENABLE)
        if on and not domain.dirty_tracking:
            # Start from clean: nothing dirtied before tracking may show up in the first bitmap.
            for area in hwpt.ioas.iopt.areas:
                domain.read_and_clear_dirty(area.iova, area.length, True, None)
        domain.set_dirty_tracking(on)

    def hwpt_get_dirty_bitmap(self, hwpt_id: int, iova: int, length: int, page_size: int, flags: int = 0) -> bytes:
        """``IOMMU_HWPT_GET_DIRTY_BITMAP``: the bitmap as the kernel writes it (u64 words, little endian;
        bit i covers iova + i·page_size), cleared afterwards unless NO_CLEAR."""
        self._check_open()
        if flags & ~HWPT_GET_DIRTY_BITMAP_NO_CLEAR:
            raise fail(errno.EOPNOTSUPP, "unknown flags")
        hwpt = self._get(hwpt_id, HwptPaging)
        assert isinstance(hwpt, HwptPaging)
        for name, v in (("iova", iova), ("length", length), ("page_size", page_size)):
            _u(name, v, 64)
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

    # -- HWPT_INVALIDATE --------------------------------------------------------------------------
    def hwpt_invalidate(self, hwpt_id: int, entries: "Iterable[VtdS1Invalidate | bytes] | None", *,
                        data_type: int = HWPT_INVALIDATE_DATA_VTD_S1, entry_len: int | None = None,
                        entry_num: int | None = None) -> int:
        """``IOMMU_HWPT_INVALIDATE``: returns how many entries were handled; a failure raises with
        ``entry_num`` set to that count (the kernel writes it back either way).  ``entries`` None is a
        NULL array pointer; ``entry_len`` other than 24 re-slices the packed entries."""
        self._check_open()
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
        return self._invalidate(hwpt_id, data_type, entry_len, entry_num, entries is not None, reader)

    def _invalidate(self, hwpt_id: int, data_type: int, entry_len: int, entry_num: int, has_ptr: bool,
                    read: Callable[[int, int], bytes]) -> int:
        try:
            if entry_num and (not has_ptr or not entry_len):
                raise fail(errno.EINVAL, "entries without a pointer or an entry length")
            obj = self._objects.get(hwpt_id)
            if obj is None:
                raise fail(errno.ENOENT, f"no object {hwpt_id}")
            if not isinstance(obj, HwptNested):
                raise fail(errno.EINVAL, "only nested HWPTs take cache invalidations")
            readers = [self._entry_reader(read, i, entry_len) for i in range(entry_num)]
            return obj.domain.cache_invalidate_user(readers, data_type)
        except IommufdError as e:
            if e.entry_num is None:
                e.entry_num = 0
            raise

    @staticmethod
    def _entry_reader(read: Callable[[int, int], bytes], index: int,
                      entry_len: int) -> Callable[[], VtdS1Invalidate]:
        def entry() -> VtdS1Invalidate:
            base = index * entry_len
            raw = UserData(HWPT_INVALIDATE_DATA_VTD_S1, entry_len, lambda o, n: read(base + o, n)).copy_struct(
                HWPT_INVALIDATE_DATA_VTD_S1, VTD_S1_INV_SIZE, VTD_S1_INV_SIZE)
            c = IommuHwptVtdS1Invalidate.parse(raw)
            return VtdS1Invalidate(c.addr, c.npages, c.flags, c["__reserved"])
        return entry

    # -- fault queues -----------------------------------------------------------------------------
    def fault_queue_alloc(self, flags: int = 0) -> tuple[int, FaultFile]:
        """``IOMMU_FAULT_QUEUE_ALLOC``: (fault id, its file)."""
        self._check_open()
        if flags:
            raise fail(errno.EOPNOTSUPP, "FAULT_QUEUE_ALLOC flags")
        fault = Fault(self)
        fid = self._add(fault)
        f = FaultFile(fault)
        fault.users += 1
        self._files.add(f)
        return fid, f

    def _iopf_handler_for(self, hwpt: Hwpt) -> Callable[[IopfGroup], None]:
        def handler(group: IopfGroup) -> None:
            fault = hwpt.fault
            if fault is None or fault.id not in self._objects:
                self._respond(group, PAGE_RESP_INVALID)
                return
            fault.deliver.append(group)
        return handler

    def _respond(self, group: IopfGroup, code: int) -> None:
        if group.answered:
            return
        group.answered = True
        self.drv.page_response(group.sid, group.pasid, group.grpid, code)

    def _auto_response(self, hwpt: Hwpt, handle: AttachHandle | None) -> None:
        """``iommufd_auto_response_faults``: every group that came through ``handle`` gets INVALID."""
        fault = hwpt.fault
        if fault is None or handle is None:
            return
        for group in [g for g in fault.deliver if g.handle is handle]:
            fault.deliver.remove(group)
            self._respond(group, PAGE_RESP_INVALID)
        for cookie, group in list(fault.response.items()):
            if group.handle is handle:
                del fault.response[cookie]
                self._respond(group, PAGE_RESP_INVALID)

    # -- vIOMMU (not offered by the Intel driver in 6.17) -----------------------------------------
    def viommu_alloc(self, dev_id: int, hwpt_id: int, viommu_type: int, flags: int = 0,
                     data: bytes | None = None) -> int:
        """``IOMMU_VIOMMU_ALLOC``: the checks before the driver is asked; the Intel driver has no vIOMMU
        object, so a valid request ends in EOPNOTSUPP."""
        self._check_open()
        if flags or viommu_type == VIOMMU_TYPE_DEFAULT:
            raise fail(errno.EOPNOTSUPP, "flags or DEFAULT type")
        self._get(dev_id, Device)
        raise fail(errno.EOPNOTSUPP, "the Intel driver offers no vIOMMU")

    def vdevice_alloc(self, viommu_id: int, dev_id: int, virt_id: int) -> int:
        """``IOMMU_VDEVICE_ALLOC``: no vIOMMU can exist here, so the vIOMMU lookup fails."""
        self._check_open()
        _u("virt_id", virt_id, 64)
        if virt_id > ULONG_MAX:
            raise fail(errno.EINVAL, "virt_id too large")
        raise fail(errno.ENOENT, f"no vIOMMU {viommu_id}")

    # -- accesses ---------------------------------------------------------------------------------
    def access_create(self, ioas_id: int, *, needs_pin_pages: bool = True,
                      on_unmap: Callable[[Access, int, int], None] | None = None) -> Access:
        """``iommufd_access_create`` + ``iommufd_access_attach``: an emulated device's view of an IOAS."""
        self._check_open()
        acc = Access(self, needs_pin_pages=needs_pin_pages, on_unmap=on_unmap)
        self._add(acc)
        try:
            ioas = self._get(ioas_id, Ioas)
            assert isinstance(ioas, Ioas)
            acc._change_ioas(ioas)
        except IommufdError:
            self._remove(acc)
            raise
        return acc

    # -- devices (called by VfioDevice) -----------------------------------------------------------
    def _bind(self, vdev: "VfioDevice") -> Device:
        self._check_open()
        group_owner = self.host._group_owner.get(vdev.group)
        if group_owner is not None and group_owner is not self:
            raise fail(errno.EBUSY, "the IOMMU group is owned by another iommufd")
        igroup = self._groups.get(vdev.group)
        if igroup is None:
            igroup = IGroup(vdev.group)
            self._groups[vdev.group] = igroup
        idev = Device(self, vdev, igroup)
        idev.users = 2  # the table and the binding driver (VFIO) until unbind
        self._add(idev)
        igroup.devices.append(idev)
        self.host._group_owner[vdev.group] = self
        return idev

    def _unbind(self, idev: Device) -> None:
        idev.users -= 1
        if idev.users != 1:
            raise InternalError(f"device {idev.id} unbound with {idev.users - 1} attachments left")
        self._destroy_obj(idev)
        if not any(isinstance(o, Device) and o.vdev.group == idev.vdev.group for o in self._objects.values()):
            self.host._group_owner.pop(idev.vdev.group, None)

    def _pasid_compat(self, hwpt: Hwpt, idev: Device, pasid: int) -> None:
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

    def _group_infos(self, igroup: IGroup, pasid: int) -> list["DevInfo"]:
        infos = [d.info for d in self.host.group_devices(igroup.group_id)]
        if pasid != IOMMU_NO_PASID:
            infos = [i for i in infos if i.max_pasids]
        return infos

    def _core_pasid_checks(self, idev: Device, pasid: int) -> None:
        """``iommu_attach_device_pasid``'s own checks."""
        if pasid == IOMMU_NO_PASID:
            return
        if not idev.info.max_pasids:
            raise fail(errno.EINVAL, "the device has no PASID support")
        for info in self._group_infos(idev.igroup, pasid):
            if pasid >= info.max_pasids:
                raise fail(errno.EINVAL, f"PASID {pasid:#x} beyond the device's PASID width")

    def _hwpt_attach_device(self, hwpt: Hwpt, idev: Device, pasid: int) -> AttachHandle:
        self._pasid_compat(hwpt, idev, pasid)
        self._core_pasid_checks(idev, pasid)
        infos = self._group_infos(idev.igroup, pasid)
        for info in infos:
            self.drv.check_attach(info, pasid, hwpt.domain)
        handle = AttachHandle(idev, hwpt, pasid)
        done: list["DevInfo"] = []
        try:
            for info in infos:
                self.drv.attach(info, pasid, hwpt.domain)
                done.append(info)
        except IommufdError:
            for info in done:
                self.drv.detach(info, pasid)
            raise
        self.drv.handles[(idev.igroup.group_id, pasid)] = handle
        return handle

    def _hwpt_detach_device(self, hwpt: Hwpt, idev: Device, pasid: int, handle: AttachHandle | None) -> None:
        for info in self._group_infos(idev.igroup, pasid):
            self.drv.detach(info, pasid)
        self.drv.handles.pop((idev.igroup.group_id, pasid), None)
        self._auto_response(hwpt, handle)

    def _reserve_dev(self, hwpt: HwptPaging, idev: Device) -> None:
        hwpt.ioas.iopt.reserve(MSI_RANGE.start, MSI_RANGE.last, idev)

    def _hw_pagetable_attach(self, hwpt: Hwpt, idev: Device, pasid: int) -> None:
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
        resv = isinstance(hwpt, HwptPaging) and pasid == IOMMU_NO_PASID
        if resv:
            assert isinstance(hwpt, HwptPaging)
            self._reserve_dev(hwpt, idev)
        if first:
            try:
                attach.handle = self._hwpt_attach_device(hwpt, idev, pasid)
            except IommufdError:
                if resv:
                    assert isinstance(hwpt, HwptPaging)
                    hwpt.ioas.iopt.remove_reserved(idev)
                raise
            attach.hwpt = hwpt
            igroup.attach[pasid] = attach
        hwpt.users += 1
        attach.devices[idev.id] = idev

    def _hw_pagetable_detach(self, idev: Device, pasid: int, put: bool = True) -> Hwpt | None:
        """``iommufd_hw_pagetable_detach`` (+ the put of the HWPT when ``put``)."""
        igroup = idev.igroup
        attach = igroup.attach.get(pasid)
        if attach is None or idev.id not in attach.devices:
            return None
        hwpt = attach.hwpt
        assert hwpt is not None
        del attach.devices[idev.id]
        if not attach.devices:
            self._hwpt_detach_device(hwpt, idev, pasid, attach.handle)
            del igroup.attach[pasid]
        if isinstance(hwpt, HwptPaging) and pasid == IOMMU_NO_PASID:
            hwpt.ioas.iopt.remove_reserved(idev)
        hwpt.users -= 1
        if put:
            self._hwpt_put(hwpt)
        return hwpt

    def _hwpt_put(self, hwpt: Hwpt) -> None:
        # An automatic domain dies with its last attachment.
        if isinstance(hwpt, HwptPaging) and hwpt.auto_domain and hwpt.users == 1 and hwpt.id in self._objects:
            self._destroy_obj(hwpt)

    def _do_replace(self, idev: Device, pasid: int, hwpt: Hwpt) -> Hwpt | None:
        """``iommufd_device_do_replace``: the old HWPT (to put), or None when nothing changed."""
        igroup = idev.igroup
        attach = igroup.attach.get(pasid)
        if attach is None or idev.id not in attach.devices:
            raise fail(errno.EINVAL, "not attached: nothing to replace")
        old = attach.hwpt
        assert old is not None
        if hwpt is old:
            return None
        resv = isinstance(hwpt, HwptPaging) and pasid == IOMMU_NO_PASID
        old_paging = old if isinstance(old, HwptPaging) else None
        added_resv: list[Device] = []
        if resv:
            assert isinstance(hwpt, HwptPaging)
            if old_paging is None or hwpt.ioas is not old_paging.ioas:
                try:
                    for cur in attach.devices.values():
                        self._reserve_dev(hwpt, cur)
                        added_resv.append(cur)
                except IommufdError:
                    for cur in added_resv:
                        hwpt.ioas.iopt.remove_reserved(cur)
                    raise
        try:
            self._pasid_compat(hwpt, idev, pasid)
            self._core_pasid_checks(idev, pasid)
            infos = self._group_infos(igroup, pasid)
            for info in infos:
                self.drv.check_attach(info, pasid, hwpt.domain)
            for info in infos:
                self.drv.attach(info, pasid, hwpt.domain)
        except IommufdError:
            for cur in added_resv:
                assert isinstance(hwpt, HwptPaging)
                hwpt.ioas.iopt.remove_reserved(cur)
            raise
        old_handle = attach.handle
        attach.handle = AttachHandle(idev, hwpt, pasid)
        self.drv.handles[(igroup.group_id, pasid)] = attach.handle
        self._auto_response(old, old_handle)
        if old_paging is not None and pasid == IOMMU_NO_PASID and (
                not isinstance(hwpt, HwptPaging) or hwpt.ioas is not old_paging.ioas):
            for cur in attach.devices.values():
                old_paging.ioas.iopt.remove_reserved(cur)
        attach.hwpt = hwpt
        n = len(attach.devices)
        hwpt.users += n
        old.users -= n
        return old

    def _auto_get_domain(self, idev: Device, pasid: int, ioas: Ioas, replace: bool) -> tuple[int, Hwpt | None]:
        """``iommufd_device_auto_get_domain``: (HWPT id attached, old HWPT to put)."""
        for hwpt in list(ioas.hwpts):
            if not hwpt.auto_domain:
                continue
            try:
                old = None
                if replace:
                    old = self._do_replace(idev, pasid, hwpt)
                else:
                    self._hw_pagetable_attach(hwpt, idev, pasid)
            except IommufdError as e:
                if e.errno == errno.EINVAL:
                    continue
                raise
            return hwpt.id, old
        hwpt = self._hwpt_paging_alloc(ioas, idev, pasid, 0, not replace, None)
        old = None
        if replace:
            try:
                old = self._do_replace(idev, pasid, hwpt)
            except IommufdError:
                self._destroy_obj(hwpt)
                raise
        hwpt.auto_domain = True
        return hwpt.id, old

    def _change_pt(self, idev: Device, pasid: int, pt_id: int, replace: bool) -> int:
        """``iommufd_device_change_pt``: the HWPT id now attached."""
        self._check_open()
        obj = self._objects.get(pt_id)
        if obj is None:
            raise fail(errno.ENOENT, f"no object {pt_id}")
        if isinstance(obj, Hwpt):
            old = None
            if replace:
                old = self._do_replace(idev, pasid, obj)
            else:
                self._hw_pagetable_attach(obj, idev, pasid)
            out = obj.id
        elif isinstance(obj, Ioas):
            out, old = self._auto_get_domain(idev, pasid, obj, replace)
        else:
            raise fail(errno.EINVAL, "pt_id is not an IOAS or a HWPT")
        if old is not None:
            self._hwpt_put(old)
        # Groups answered INVALID by a replace reach their devices now.
        self.host.drain()
        return out

    def _device_attach(self, idev: Device, pasid: int, pt_id: int) -> int:
        out = self._change_pt(idev, pasid, pt_id, False)
        idev.users += 1
        return out

    def _device_replace(self, idev: Device, pasid: int, pt_id: int) -> int:
        return self._change_pt(idev, pasid, pt_id, True)

    def _device_detach(self, idev: Device, pasid: int) -> None:
        if self._hw_pagetable_detach(idev, pasid) is not None:
            idev.users -= 1
            self.host.drain()

    def _attached(self, idev: Device, pasid: int) -> Hwpt | None:
        attach = idev.igroup.attach.get(pasid)
        if attach is None or idev.id not in attach.devices:
            return None
        return attach.hwpt

    # -- raw ioctls -------------------------------------------------------------------------------
    def ioctl(self, request: int, arg: bytearray | None) -> int:
        """``ioctl(fd, request, arg)`` with the kernel's structure in ``arg`` (see :mod:`.ioctl`)."""
        from .ioctl import ioctl
        self._check_open()
        return ioctl(self, request, arg)

    # -- close ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the fd: unbind the devices bound through it, close fault files, destroy accesses, then
        destroy every object leaf-first.  Every pin taken through this context is released."""
        if self.closed:
            return
        for obj in sorted(self._objects.values(), key=lambda o: o.id):
            if isinstance(obj, Device) and obj.id in self._objects:
                obj.vdev.unbind()
        for f in list(self._files):
            f.close()
        for obj in list(self._objects.values()):
            if isinstance(obj, Access):
                obj.destroy()
        while self._objects:
            progress = False
            for obj in sorted(self._objects.values(), key=lambda o: -o.id):
                if obj.id in self._objects and obj.users == 1:
                    self._destroy_obj(obj)
                    progress = True
            if not progress:
                left = ", ".join(f"{o.kind} {o.id} (users {o.users})" for o in self._objects.values())
                raise InternalError(f"iommufd close leaked objects: {left}")
        self.closed = True

    def __enter__(self) -> "IommuFd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["IommuFd", "FaultFile", "Access", "IovaRanges", "ObjectInfo", "UserData", "MSI_RANGE",
           "VFIO_IOAS_GET", "VFIO_IOAS_SET", "VFIO_IOAS_CLEAR"]
