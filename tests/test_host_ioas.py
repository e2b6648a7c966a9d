"""Conformance: FIXTURE iommufd_ioas — iommufd.md §9.4 (alloc_hwpt_nested is in test_host_hwpt.py).

Variants: ``no_domain``; ``domain`` (a device on an automatic domain plus a PASID-capable device);
``two_domains`` (two explicit paging HWPTs on the IOAS).  The mock driver's numbers are replaced by the
Intel ones: 4 KiB IOVA alignment with a domain (not 2048), an aperture starting at 0 and ending at
2**57 - 1, and the MSI window 0xFEE00000-0xFEEFFFFF reserved by every attached device.

Not covered: the ``mock_domain_limit`` variant (SET_TEMP_MEMORY_LIMIT is a test-only kernel knob) and
``fork_present`` (pages of another live process).  ``fork_gone`` is reproduced with munmap: the memory
behind the map disappears before a domain ever pinned it.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

import pytest

from vtd_emu.host import Host, IommufdError, IovaRange, VfioDevice
from vtd_emu.host.iommufd import HwptPaging, IommuFd, MSI_RANGE
from vtd_emu.host.uapi import (HW_INFO_TYPE_INTEL_VTD, HW_INFO_VTD_ERRATA_772415_SPR17, IOAS_MAP_FIXED_IOVA,
                               IOAS_MAP_READABLE, IOAS_MAP_WRITEABLE, IOCTL, OPTION_HUGE_PAGES, OPTION_OP_GET,
                               OPTION_OP_SET, U64_MAX, IommuHwInfoVtd)

PAGE = 4096
BUFFER_SIZE = 16 * PAGE
BASE = 1 << 24
APERTURE_LAST = (1 << 57) - 1
RW = IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE
FIXED_RW = IOAS_MAP_FIXED_IOVA | RW


def expect_errno(err: int, fn, *args, **kwargs) -> IommufdError:
    with pytest.raises(IommufdError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == err, f"expected {errno.errorcode[err]}, got {ei.value.name}: {ei.value}"
    return ei.value


@dataclass
class Env:
    variant: str
    host: Host
    ictx: IommuFd
    ioas: int
    buffer: int
    devices: list[VfioDevice] = field(default_factory=list)
    hwpt_ids: list[int] = field(default_factory=list)
    pasid_dev: VfioDevice | None = None

    @property
    def has_domain(self) -> bool:
        return self.variant != "no_domain"

    @property
    def device_id(self) -> int | None:
        return self.devices[0].dev_id if self.devices else None


@pytest.fixture(params=["no_domain", "domain", "two_domains"])
def env(request):
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    buf = host.mmap(BUFFER_SIZE)
    host.write_user(buf, bytes(range(256)) * (BUFFER_SIZE // 256))
    e = Env(request.param, host, ictx, ioas, buf)
    if request.param == "domain":
        dev = host.add_device(0x08)
        dev.bind_iommufd(ictx)
        e.hwpt_ids.append(dev.attach_pt(ioas))
        e.devices.append(dev)
        pdev = host.add_device(0x09, pasid_bits=20)
        pdev.bind_iommufd(ictx)
        pdev.attach_pt(ioas)
        e.pasid_dev = pdev
    elif request.param == "two_domains":
        for sid in (0x10, 0x18):
            dev = host.add_device(sid)
            dev_id = dev.bind_iommufd(ictx)
            hwpt = ictx.hwpt_alloc(dev_id, ioas)
            dev.attach_pt(hwpt)
            e.devices.append(dev)
            e.hwpt_ids.append(hwpt)
    yield e
    ictx.close()
    assert host.pinned_pages == 0
    assert host.process.pins == {}


def domain_of(e: Env, hwpt_id: int):
    obj = e.ictx._objects[hwpt_id]
    assert isinstance(obj, HwptPaging)
    return obj.domain


def check_map(e: Env, hwpt_id: int, iova: int, va: int, length: int) -> None:
    """MD_CHECK_MAP: the domain translates every page of [iova, +length) to the page behind va."""
    dom = domain_of(e, hwpt_id)
    for off in range(0, length, PAGE):
        hit = dom.table.lookup(iova + off)
        assert hit is not None, f"iova {iova + off:#x} not mapped"
        expect = e.host.process._page(va + off, create=False)
        assert hit[0] & ~(PAGE - 1) == expect


# -- lifetime --------------------------------------------------------------------------------------

def test_ioas_auto_destroy(env: Env) -> None:
    """Closing the fd destroys the IOAS even where DESTROY could not (devices attached, domains in it):
    devices unbound, domains freed with their table pages and DIDs, entries torn down, no pin left."""
    host, ictx = env.host, env.ictx
    ictx.ioas_map(env.ioas, env.buffer, 4 * PAGE, iova=BASE)
    if env.has_domain:
        expect_errno(errno.EBUSY, ictx.destroy, env.ioas)
        assert host.pinned_pages == 4
    domains = [domain_of(env, h) for h in env.hwpt_ids]
    table_pages = [p for d in domains for p in d._pages.pages]
    assert bool(table_pages) == env.has_domain
    devices = env.devices + ([env.pasid_dev] if env.pasid_dev is not None else [])
    ictx.close()
    assert ictx.closed and ictx.objects() == []
    assert host.pinned_pages == 0 and host.process.pins == {}
    assert all(d.freed for d in domains)
    assert set(table_pages) <= set(host.driver_pool.free_list)
    assert host.intel._dids == set()
    assert host.group_owner == {}
    for dev in devices:
        assert dev.idev is None and dev.info.domains == {}
        # Back to blocked DMA: the RID's entry is gone, so the unit refuses the request.
        assert not dev.dma_write(BASE, b"gone")
    expect_errno(errno.EBADF, ictx.ioas_alloc)


def test_ioas_destroy(env: Env) -> None:
    if env.has_domain:
        expect_errno(errno.EBUSY, env.ictx.destroy, env.ioas)
    else:
        env.ictx.destroy(env.ioas)


def test_hwpt_attach(env: Env) -> None:
    dev = env.host.add_device(0x30)
    dev.bind_iommufd(env.ictx)
    if env.has_domain:
        assert dev.attach_pt(env.hwpt_ids[0]) == env.hwpt_ids[0]
    else:
        expect_errno(errno.ENOENT, dev.attach_pt, 99)


def test_ioas_area_destroy(env: Env) -> None:
    env.ictx.ioas_map(env.ioas, env.buffer, PAGE, iova=BASE)
    if env.has_domain:
        expect_errno(errno.EBUSY, env.ictx.destroy, env.ioas)
    else:
        env.ictx.destroy(env.ioas)


def test_ioas_area_auto_destroy(env: Env) -> None:
    for i in range(10):
        env.ictx.ioas_map(env.ioas, env.buffer, PAGE, iova=BASE + i * PAGE)
    if env.has_domain:
        assert env.host.pinned_pages == 10


# -- GET_HW_INFO -----------------------------------------------------------------------------------

def test_get_hw_info(env: Env) -> None:
    ictx = env.ictx
    if not env.has_domain:
        expect_errno(errno.ENOENT, ictx.get_hw_info, env.ioas)
        return
    dev_id = env.device_id
    assert dev_id is not None
    chip = env.host.iommu
    for n in (0, 24, 32, 4):
        info = ictx.get_hw_info(dev_id, n)
        assert info.out_data_type == HW_INFO_TYPE_INTEL_VTD and info.data_len == 24 and len(info.data) == n
    larger = ictx.get_hw_info(dev_id, 32)
    assert larger.data[24:] == bytes(8)
    vtd = larger.vtd
    assert vtd is not None
    assert vtd.flags == HW_INFO_VTD_ERRATA_772415_SPR17
    assert (vtd.cap_reg, vtd.ecap_reg) == (chip.cfg.cap, chip.cfg.ecap)
    assert ictx.get_hw_info(dev_id, 4).data == struct.pack("<I", HW_INFO_VTD_ERRATA_772415_SPR17)
    assert ictx.get_hw_info(dev_id).max_pasid_log2 == 0
    assert ictx.get_hw_info(dev_id).capabilities & 1  # DIRTY_TRACKING: ECAP.SLADS
    if env.pasid_dev is not None:
        assert ictx.get_hw_info(env.pasid_dev.dev_id).max_pasid_log2 == 20
    expect_errno(errno.EOPNOTSUPP, ictx.get_hw_info, dev_id, flags=2)
    expect_errno(errno.EOPNOTSUPP, ictx.get_hw_info, dev_id, flags=1, data_type=2)
    assert ictx.get_hw_info(dev_id, flags=1, data_type=1).vtd == vtd


def test_get_hw_info_ioctl_zeroes_the_tail(env: Env) -> None:
    if not env.has_domain:
        return
    ubuf = env.host.mmap(PAGE)
    env.host.write_user(ubuf, b"\xAA" * 40)
    raw = bytearray(struct.pack("<IIIIQIB3sQ", 40, 0, env.device_id, 40, ubuf, 0, 0, b"\0\0\0", 0))
    env.ictx.ioctl(IOCTL["GET_HW_INFO"], raw)
    size, flags, dev, data_len, ptr, dtype, log2, rsvd, caps = struct.unpack("<IIIIQIB3sQ", raw)
    assert (data_len, dtype, caps) == (24, HW_INFO_TYPE_INTEL_VTD, 1)
    out = env.host.read_user(ubuf, 40)
    assert out[24:] == bytes(16)
    assert IommuHwInfoVtd.parse(out[:24]).cap_reg == env.host.iommu.cfg.cap
    raw[29] = 1
    expect_errno(errno.EOPNOTSUPP, env.ictx.ioctl, IOCTL["GET_HW_INFO"], raw)


# -- areas -----------------------------------------------------------------------------------------

def test_area(env: Env) -> None:
    ictx, ioas, buf = env.ictx, env.ioas, env.buffer
    for i in range(10):
        expect_errno(errno.ENOENT, ictx.ioas_unmap, ioas, i * PAGE, PAGE)
    for i in range(10):
        ictx.ioas_map(ioas, buf, PAGE, iova=BASE + i * PAGE)
    for i in range(10):
        assert ictx.ioas_unmap(ioas, BASE + i * PAGE, PAGE) == PAGE
    ictx.ioas_map(ioas, buf, 2 * PAGE, iova=BASE + 16 * PAGE)
    expect_errno(errno.ENOENT, ictx.ioas_unmap, ioas, BASE + 16 * PAGE, PAGE)
    expect_errno(errno.ENOENT, ictx.ioas_unmap, ioas, BASE + 17 * PAGE, PAGE)
    for length, at in ((2, 16), (1, 16), (1, 17), (2, 15), (3, 15)):
        expect_errno(errno.EEXIST, ictx.ioas_map, ioas, buf, length * PAGE, BASE + at * PAGE)
    assert ictx.ioas_unmap(ioas, 0, U64_MAX) == 2 * PAGE
    assert ictx.ioas_unmap(ioas, 0, U64_MAX) == 0


def test_unmap_fully_contained_areas(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    base = BASE + 4 * PAGE
    for i in range(4):
        ictx.ioas_map(ioas, env.buffer, 8 * PAGE, iova=base + i * 16 * PAGE)
    expect_errno(errno.ENOENT, ictx.ioas_unmap, ioas, base - 4 * PAGE, 8 * PAGE)
    expect_errno(errno.ENOENT, ictx.ioas_unmap, ioas, base + 3 * 16 * PAGE + 8 * PAGE - 4 * PAGE, 8 * PAGE)
    assert ictx.ioas_unmap(ioas, base - 4 * PAGE, 3 * 16 * PAGE + 8 * PAGE + 4 * PAGE) == 32 * PAGE


def test_unmap_stops_at_a_partly_covered_area(env: Env) -> None:
    # Areas before the offending one are already gone (iopt_unmap_iova_range works area by area).
    ictx, ioas = env.ictx, env.ioas
    ictx.ioas_map(ioas, env.buffer, PAGE, iova=BASE)
    ictx.ioas_map(ioas, env.buffer, 2 * PAGE, iova=BASE + 4 * PAGE)
    expect_errno(errno.ENOENT, ictx.ioas_unmap, ioas, BASE, 5 * PAGE)
    assert [a.iova for a in ictx._objects[ioas].iopt.areas] == [BASE + 4 * PAGE]


def test_area_auto_iova(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    iovas = [ictx.ioas_map(ioas, env.buffer, PAGE) for _ in range(10)]
    assert len(set(iovas)) == 10 and 0 not in iovas
    for iova in iovas:
        ictx.ioas_unmap(ioas, iova, PAGE)
    uptr = env.buffer if env.has_domain else 1 << 31
    for i in range(10):
        length = PAGE * (i + 1)
        iovas[i] = ictx.ioas_map(ioas, uptr, length)
        assert iovas[i] % (1 << ((length & -length).bit_length() - 1)) == 0
    for i in range(10):
        ictx.ioas_unmap(ioas, iovas[i], PAGE * (i + 1))
    ictx.ioas_add_reserved(ioas, PAGE * 4, PAGE * 100)
    for i in range(10):
        length = PAGE * (i + 1)
        iovas[i] = ictx.ioas_map(ioas, env.buffer, length)
        assert iovas[i] % (1 << ((length & -length).bit_length() - 1)) == 0
        assert not PAGE * 4 < iovas[i] < PAGE * 104
    for i in range(10):
        ictx.ioas_unmap(ioas, iovas[i], PAGE * (i + 1))
    expect_errno(errno.EADDRINUSE, ictx.ioas_allow_iovas, ioas, [(PAGE, PAGE * 600)])
    lo, hi = (BASE + PAGE, BASE + PAGE * 600 - 1) if env.has_domain else (PAGE * 200, PAGE * 600 - 1)
    ictx.ioas_allow_iovas(ioas, [(lo, hi)])
    for i in range(10):
        length = PAGE * (i + 1)
        iovas[i] = ictx.ioas_map(ioas, env.buffer, length)
        assert lo <= iovas[i] and iovas[i] + length <= hi + 1
    for i in range(10):
        ictx.ioas_unmap(ioas, iovas[i], PAGE * (i + 1))


def test_auto_iova_keeps_page_offset_and_reports_enospc(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    if not env.has_domain:
        iova = ictx.ioas_map(ioas, env.buffer + 0x123, 0x100)
        assert iova % PAGE == 0x123
    ictx.ioas_allow_iovas(ioas, [(BASE, BASE + 2 * PAGE - 1)])
    ictx.ioas_map(ioas, env.buffer, 2 * PAGE)
    expect_errno(errno.ENOSPC, ictx.ioas_map, ioas, env.buffer, PAGE)


def test_area_allowed(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    ictx.ioas_allow_iovas(ioas, [(BASE, BASE + PAGE * 600)])
    expect_errno(errno.EADDRINUSE, ictx.ioas_add_reserved, ioas, BASE + PAGE, PAGE)
    ictx.ioas_allow_iovas(ioas, [])
    ictx.ioas_add_reserved(ioas, BASE + PAGE, PAGE)
    expect_errno(errno.EADDRINUSE, ictx.ioas_allow_iovas, ioas, [(BASE, BASE + PAGE * 600)])


def test_allow_iovas_range_checks(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    expect_errno(errno.EINVAL, ictx.ioas_allow_iovas, ioas, [(BASE, BASE)])
    expect_errno(errno.EINVAL, ictx.ioas_allow_iovas, ioas, [(BASE, BASE + PAGE), (BASE + PAGE, BASE + 9 * PAGE)])
    expect_errno(errno.ENOENT, ictx.ioas_allow_iovas, 99, [(BASE, BASE + PAGE)])
    # The old list stays when the new one is refused (atomic swap).
    ictx.ioas_allow_iovas(ioas, [(BASE, BASE + 64 * PAGE - 1)])
    ictx.ioas_add_reserved(ioas, 1 << 40, PAGE)
    expect_errno(errno.EADDRINUSE, ictx.ioas_allow_iovas, ioas, [(1 << 40, (1 << 40) + PAGE)])
    assert ictx.ioas_map(ioas, env.buffer, PAGE) >= BASE
    # Through the ioctl: a bad array pointer is EFAULT, checked after the IOAS.
    raw = bytearray(struct.pack("<IIIIQ", 24, ioas, 1, 0, 0x1234_0000))
    expect_errno(errno.EFAULT, ictx.ioctl, IOCTL["IOAS_ALLOW_IOVAS"], raw)
    raw[4:8] = struct.pack("<I", 99)
    expect_errno(errno.ENOENT, ictx.ioctl, IOCTL["IOAS_ALLOW_IOVAS"], raw)
    raw[12:16] = struct.pack("<I", 1)
    expect_errno(errno.EOPNOTSUPP, ictx.ioctl, IOCTL["IOAS_ALLOW_IOVAS"], raw)


def test_copy_area(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    ictx.ioas_map(ioas, env.buffer, PAGE, iova=BASE)
    assert ictx.ioas_copy(ioas, BASE + PAGE, ioas, BASE, PAGE, FIXED_RW) == BASE + PAGE
    dst = ictx.ioas_alloc()
    assert ictx.ioas_copy(dst, 0, ioas, BASE, PAGE, FIXED_RW) == 0
    if env.has_domain:
        check_map(env, env.hwpt_ids[0], BASE + PAGE, env.buffer, PAGE)


def test_copy_checks_in_order(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    ictx.ioas_map(ioas, env.buffer, 2 * PAGE, iova=BASE, flags=IOAS_MAP_READABLE)
    dst = ictx.ioas_alloc()
    expect_errno(errno.EOPNOTSUPP, ictx.ioas_copy, dst, 0, ioas, BASE, PAGE, 1 << 5)
    expect_errno(errno.EOVERFLOW, ictx.ioas_copy, dst, 0, ioas, BASE, U64_MAX, FIXED_RW)
    expect_errno(errno.EINVAL, ictx.ioas_copy, dst, 0, ioas, BASE, PAGE, IOAS_MAP_FIXED_IOVA)
    expect_errno(errno.ENOENT, ictx.ioas_copy, dst, 0, 99, BASE, PAGE, FIXED_RW)
    expect_errno(errno.EINVAL, ictx.ioas_copy, dst, 0, ioas, BASE, 0, FIXED_RW)
    expect_errno(errno.ENOENT, ictx.ioas_copy, dst, 0, ioas, BASE + PAGE, 2 * PAGE, FIXED_RW)
    expect_errno(errno.ENOENT, ictx.ioas_copy, 99, 0, ioas, BASE, PAGE, FIXED_RW)
    # The source is read-only: a writeable copy is refused, a read-only one shares the pages.
    expect_errno(errno.EPERM, ictx.ioas_copy, dst, 0, ioas, BASE, PAGE, FIXED_RW)
    assert ictx.ioas_copy(dst, None, ioas, BASE + PAGE, PAGE, IOAS_MAP_READABLE) > 0


def test_iova_ranges(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    res = ictx.ioas_iova_ranges(ioas)
    if env.has_domain:
        assert res.ranges == [IovaRange(0, MSI_RANGE.start - 1), IovaRange(MSI_RANGE.last + 1, APERTURE_LAST)]
        assert res.alignment == PAGE
    else:
        assert res.ranges == [IovaRange(0, U64_MAX)] and res.alignment == 1
    ubuf = env.host.mmap(PAGE)
    raw = bytearray(struct.pack("<IIIIQQ", 32, ioas, 0, 0, ubuf, 0))
    expect_errno(errno.EMSGSIZE, ictx.ioctl, IOCTL["IOAS_IOVA_RANGES"], raw)
    assert struct.unpack("<IIIIQQ", raw)[2] == len(res.ranges)
    assert env.host.read_user(ubuf, 16) == bytes(16)
    ictx.ioas_add_reserved(ioas, PAGE, PAGE)
    res = ictx.ioas_iova_ranges(ioas)
    first = [IovaRange(0, PAGE - 1)]
    if env.has_domain:
        assert res.ranges == first + [IovaRange(2 * PAGE, MSI_RANGE.start - 1),
                                      IovaRange(MSI_RANGE.last + 1, APERTURE_LAST)]
    else:
        assert res.ranges == first + [IovaRange(2 * PAGE, U64_MAX)]
    raw = bytearray(struct.pack("<IIIIQQ", 32, ioas, 1, 0, ubuf, 0))
    expect_errno(errno.EMSGSIZE, ictx.ioctl, IOCTL["IOAS_IOVA_RANGES"], raw)
    assert struct.unpack("<IIIIQQ", raw)[2] == len(res.ranges)
    assert struct.unpack("<QQ", env.host.read_user(ubuf, 16)) == (0, PAGE - 1)
    assert env.host.read_user(ubuf + 16, 16) == bytes(16)
    raw = bytearray(struct.pack("<IIIIQQ", 32, ioas, 8, 0, ubuf, 0))
    ictx.ioctl(IOCTL["IOAS_IOVA_RANGES"], raw)
    assert struct.unpack("<IIIIQQ", raw)[5] == res.alignment


# -- map checks ------------------------------------------------------------------------------------

def test_map_checks_in_order(env: Env) -> None:
    ictx, ioas, buf = env.ictx, env.ioas, env.buffer
    expect_errno(errno.EOPNOTSUPP, ictx.ioas_map, ioas, buf, PAGE, BASE, flags=RW | 8)
    expect_errno(errno.EOVERFLOW, ictx.ioas_map, ioas, buf, U64_MAX, BASE)
    expect_errno(errno.EOVERFLOW, ictx.ioas_map, ioas, buf, PAGE, U64_MAX)
    expect_errno(errno.EINVAL, ictx.ioas_map, ioas, buf, PAGE, BASE, flags=0)
    expect_errno(errno.ENOENT, ictx.ioas_map, 99, buf, PAGE, BASE)
    expect_errno(errno.EINVAL, ictx.ioas_map, ioas, buf, 0, BASE)
    expect_errno(errno.EOVERFLOW, ictx.ioas_map, ioas, buf, 2 * PAGE, U64_MAX - PAGE + 1)
    expect_errno(errno.EOVERFLOW, ictx.ioas_map, ioas, buf, 1 << 63)
    # A reserved range is EINVAL for a fixed map, not EADDRINUSE.
    ictx.ioas_add_reserved(ioas, BASE, PAGE)
    expect_errno(errno.EINVAL, ictx.ioas_map, ioas, buf, PAGE, BASE)
    raw = bytearray(struct.pack("<IIIIQQQ", 40, FIXED_RW, ioas, 1, buf, PAGE, BASE + PAGE))
    expect_errno(errno.EOPNOTSUPP, ictx.ioctl, IOCTL["IOAS_MAP"], raw)
    raw[12:16] = bytes(4)
    ictx.ioctl(IOCTL["IOAS_MAP"], raw)
    assert struct.unpack("<IIIIQQQ", raw)[6] == BASE + PAGE
    if env.has_domain:
        expect_errno(errno.EINVAL, ictx.ioas_map, ioas, buf + 8, PAGE, BASE + 8 * PAGE)
        expect_errno(errno.EINVAL, ictx.ioas_map, ioas, buf, PAGE, BASE + 8 * PAGE + 8)
        expect_errno(errno.EINVAL, ictx.ioas_map, ioas, buf, 100, BASE + 8 * PAGE)
        expect_errno(errno.EINVAL, ictx.ioas_map, ioas, MSI_RANGE.start, PAGE, MSI_RANGE.start)


def test_map_pins_lazily_and_reports_missing_memory(env: Env) -> None:
    ictx, ioas, host = env.ictx, env.ioas, env.host
    gone = host.mmap(2 * PAGE)
    host.munmap(gone, 2 * PAGE)
    ro = host.mmap(PAGE, writable=False)
    if env.has_domain:
        expect_errno(errno.EFAULT, ictx.ioas_map, ioas, gone, PAGE, BASE)
        expect_errno(errno.EFAULT, ictx.ioas_map, ioas, env.buffer + BUFFER_SIZE - PAGE, 3 * PAGE, BASE)
        expect_errno(errno.EPERM, ictx.ioas_map, ioas, ro, PAGE, BASE)
        assert ictx.ioas_map(ioas, ro, PAGE, BASE, flags=IOAS_MAP_READABLE) == BASE
        assert host.pinned_pages == 1
        assert ictx._objects[ioas].iopt.areas[0].iova == BASE
    else:
        # Without a domain nothing is pinned at map time: the kernel only records the user range.
        assert ictx.ioas_map(ioas, gone, PAGE, BASE) == BASE
        assert host.pinned_pages == 0


# -- accesses --------------------------------------------------------------------------------------

def test_access_domain_destroy(env: Env) -> None:
    host, ictx = env.host, env.ictx
    buf = host.mmap(2 << 21, huge=True)
    ictx.ioas_map(env.ioas, buf, 2 << 21, iova=BASE)
    acc = ictx.access_create(env.ioas)
    item, pages = acc.pin_pages(BASE + PAGE, PAGE)
    assert pages == [host.process._page(buf + PAGE, create=False)]
    for dev in env.devices:
        dev.unbind()
    acc.unpin(item)
    acc.destroy()
    host.munmap(buf, 2 << 21)


def test_access_pin(env: Env) -> None:
    host, ictx, ioas = env.host, env.ictx, env.ioas
    acc = ictx.access_create(ioas)
    expect_errno(errno.EBUSY, ictx.destroy, acc.id)
    for npages in range(1, 16):
        ictx.ioas_map(ioas, env.buffer, BUFFER_SIZE, iova=BASE)
        item, _ = acc.pin_pages(BASE, npages * PAGE)
        acc.unpin(item)
        a, _ = acc.pin_pages(BASE, npages * PAGE)
        b, _ = acc.pin_pages(BASE, npages * PAGE)
        # The pages object pins each page once, however many users share it.
        assert host.process.pin_counts(env.buffer, npages * PAGE) == [1] * npages
        acc.unpin(b)
        acc.unpin(a)
        item, _ = acc.pin_pages(BASE, npages * PAGE)
        dev = host.add_device(0x40 + npages)
        dev_id = dev.bind_iommufd(ictx)
        hwpt = ictx.hwpt_alloc(dev_id, ioas)
        dev.attach_pt(hwpt)
        check_map(env, hwpt, BASE, env.buffer, BUFFER_SIZE)
        dev.unbind()
        ictx.destroy(hwpt)
        acc.unpin(item)
        ictx.ioas_unmap(ioas, BASE, BUFFER_SIZE)
    acc.destroy()


def test_access_pin_checks(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    acc = ictx.access_create(ioas)
    ictx.ioas_map(ioas, env.buffer, 4 * PAGE, iova=BASE, flags=IOAS_MAP_READABLE)
    expect_errno(errno.EINVAL, acc.pin_pages, BASE, 0)
    expect_errno(errno.EOVERFLOW, acc.pin_pages, U64_MAX, 2)
    expect_errno(errno.ENOENT, acc.pin_pages, BASE, 5 * PAGE)
    expect_errno(errno.EPERM, acc.pin_pages, BASE, PAGE, write=True)
    expect_errno(errno.EINVAL, acc.pin_pages, BASE + 8, PAGE)
    assert env.host.pinned_pages == (4 if env.has_domain else 0)
    # An access that cannot pin raises the IOAS alignment to PAGE_SIZE only when it pins.
    rw_only = ictx.access_create(ioas, needs_pin_pages=False)
    expect_errno(errno.EINVAL, rw_only.pin_pages, BASE, PAGE)
    rw_only.destroy()
    acc.destroy()


def test_access_pin_unmap(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    acc = ictx.access_create(ioas)
    ictx.ioas_map(ioas, env.buffer, BUFFER_SIZE, iova=BASE)
    item, _ = acc.pin_pages(BASE, BUFFER_SIZE)
    assert ictx.ioas_unmap(ioas, BASE, BUFFER_SIZE) == BUFFER_SIZE
    assert acc.unmap_calls == 1
    expect_errno(errno.ENOENT, acc.unpin, item)
    acc.destroy()


def test_access_that_keeps_its_pins_deadlocks_unmap(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    acc = ictx.access_create(ioas, on_unmap=lambda a, iova, length: None)
    ictx.ioas_map(ioas, env.buffer, PAGE, iova=BASE)
    item, _ = acc.pin_pages(BASE, PAGE)
    expect_errno(errno.EDEADLOCK, ictx.ioas_unmap, ioas, BASE, PAGE)
    acc.unpin(item)
    ictx.ioas_unmap(ioas, BASE, PAGE)
    acc.destroy()


def _check_access_rw(env: Env, acc, iova: int) -> None:
    host = env.host
    for start in range(iova + PAGE - 50, iova + PAGE + 50, 7):
        for length in (1, 2, 31, 63):
            off = start - iova
            assert acc.read(start, length) == host.read_user(env.buffer + off, length)
            data = bytes((start + i) & 0xFF for i in range(length))
            acc.write(start, data)
            assert host.read_user(env.buffer + off, length) == data
    assert acc.read(iova, BUFFER_SIZE) == host.read_user(env.buffer, BUFFER_SIZE)


def test_access_rw(env: Env) -> None:
    ictx = env.ictx
    acc = ictx.access_create(env.ioas, needs_pin_pages=False)
    iova = ictx.ioas_map(env.ioas, env.buffer, BUFFER_SIZE)
    _check_access_rw(env, acc, iova)
    expect_errno(errno.ENOENT, acc.read, iova + BUFFER_SIZE - 4, 8)
    expect_errno(errno.EINVAL, acc.read, iova, 0)
    ictx.ioas_unmap(env.ioas, iova, BUFFER_SIZE)
    acc.destroy()


def test_access_rw_unaligned(env: Env) -> None:
    ictx = env.ictx
    acc = ictx.access_create(env.ioas, needs_pin_pages=False)
    iova = BASE + 2048
    if env.has_domain:
        # Intel domains map 4 KiB pages: the mock's 2 KiB offset is refused.
        expect_errno(errno.EINVAL, ictx.ioas_map, env.ioas, env.buffer, BUFFER_SIZE, iova)
    else:
        ictx.ioas_map(env.ioas, env.buffer, BUFFER_SIZE, iova=iova)
        _check_access_rw(env, acc, iova)
        ictx.ioas_unmap(env.ioas, iova, BUFFER_SIZE)
    acc.destroy()


def test_access_replace_ioas(env: Env) -> None:
    ictx, host = env.ictx, env.host
    acc = ictx.access_create(env.ioas)
    other = ictx.ioas_alloc()
    ictx.ioas_map(other, env.buffer, PAGE, iova=BASE)
    ictx.ioas_map(env.ioas, env.buffer, PAGE, iova=BASE)
    acc.pin_pages(BASE, PAGE)
    assert ictx.users(env.ioas) >= 2
    acc.replace_ioas(other)
    assert acc.items == {}
    assert acc.read(BASE, 16) == host.read_user(env.buffer, 16)
    expect_errno(errno.ENOENT, acc.replace_ioas, 99)
    acc.destroy()
    ictx.destroy(other)


def test_fork_gone(env: Env) -> None:
    ictx, host = env.ictx, env.host
    acc = ictx.access_create(env.ioas, needs_pin_pages=False)
    other = host.mmap(BUFFER_SIZE)
    host.write_user(other, b"gone" * (BUFFER_SIZE // 4))
    ictx.ioas_map(env.ioas, other, BUFFER_SIZE, iova=BASE)
    host.munmap(other, BUFFER_SIZE)
    dev = host.add_device(0x60)
    dev_id = dev.bind_iommufd(ictx)
    if env.has_domain:
        # Everything was pinned at map time, so the new domain is filled from the pinned pages.
        hwpt = ictx.hwpt_alloc(dev_id, env.ioas)
        dev.attach_pt(hwpt)
        assert acc.read(BASE, 8) == b"gonegone"
        assert dev.dma_read(BASE + PAGE, 4).data == b"gone"
    else:
        expect_errno(errno.EFAULT, dev.attach_pt, env.ioas)
        expect_errno(errno.EFAULT, ictx.hwpt_alloc, dev_id, env.ioas)
    acc.destroy()


# -- options and alignment -------------------------------------------------------------------------

def test_ioas_option_huge_pages(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    assert ictx.option(OPTION_HUGE_PAGES, OPTION_OP_GET, ioas, 3) == 1
    ictx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 0)
    assert ictx.option(OPTION_HUGE_PAGES, OPTION_OP_GET, ioas, 3) == 0
    expect_errno(errno.EINVAL, ictx.option, OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 2)
    ictx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 1)


def test_ioas_iova_alloc(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    for length in list(range(1, 300)) + list(range(PAGE - 100, 2 * PAGE, 37)) + [PAGE]:
        if env.has_domain and length % PAGE:
            expect_errno(errno.EINVAL, ictx.ioas_map, ioas, env.buffer, length)
        else:
            iova = ictx.ioas_map(ioas, env.buffer, length)
            ictx.ioas_unmap(ioas, iova, length)


def test_ioas_align_change(env: Env) -> None:
    if env.has_domain:
        return
    ictx, ioas = env.ictx, env.ioas
    ictx.ioas_map(ioas, env.buffer, PAGE, iova=BASE)
    ictx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 0)
    expect_errno(errno.EINVAL, ictx.ioas_map, ioas, env.buffer + 2048, PAGE, BASE + PAGE)
    ictx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 0)
    ictx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 1)
    ictx.ioas_map(ioas, env.buffer + 2048, PAGE, iova=BASE + PAGE)
    expect_errno(errno.EADDRINUSE, ictx.option, OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 0)
    ictx.ioas_unmap(ioas, BASE + PAGE, PAGE)
    ictx.ioas_unmap(ioas, BASE, PAGE)


def test_huge_pages_off_refused_with_domain_and_mappings(env: Env) -> None:
    if not env.has_domain:
        return
    ictx, ioas = env.ictx, env.ioas
    ictx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 0)  # no mapping yet: fine
    ictx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 1)
    ictx.ioas_map(ioas, env.buffer, PAGE, iova=BASE)
    expect_errno(errno.EINVAL, ictx.option, OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 0)


def test_copy_sweep(env: Env) -> None:
    ictx, ioas = env.ictx, env.ioas
    dst = ictx.ioas_alloc()
    last = BASE + BUFFER_SIZE - 1 if env.has_domain else BASE + BUFFER_SIZE - 2
    ictx.ioas_map(ioas, env.buffer, last - BASE + 1, iova=BASE)
    length = 2048
    for iova in range(BASE - PAGE, last + 1, 511):
        if iova < BASE or iova + length - 1 > last:
            expect_errno(errno.ENOENT, ictx.ioas_copy, dst, BASE, ioas, iova, length, FIXED_RW)
        else:
            assert ictx.ioas_copy(dst, BASE, ioas, iova, length, FIXED_RW) == BASE
            ictx.ioas_unmap(dst, BASE, length)
    ictx.destroy(dst)


def test_domain_alignment_requires_aligned_areas(env: Env) -> None:
    if env.has_domain:
        return
    ictx, ioas, host = env.ictx, env.ioas, env.host
    ictx.ioas_map(ioas, env.buffer + 8, 100, iova=BASE + 8)
    dev = host.add_device(0x70)
    dev_id = dev.bind_iommufd(ictx)
    expect_errno(errno.EADDRINUSE, ictx.hwpt_alloc, dev_id, ioas)
    expect_errno(errno.EADDRINUSE, dev.attach_pt, ioas)
    ictx.ioas_unmap(ioas, 0, U64_MAX)
    # An area overlapping the MSI window refuses the device's reserved region.
    ictx.ioas_map(ioas, env.buffer, PAGE, iova=MSI_RANGE.start)
    expect_errno(errno.EADDRINUSE, dev.attach_pt, ioas)
    assert ictx.objects()[-1].kind == "device"
    ictx.ioas_unmap(ioas, 0, U64_MAX)
    # An aperture that excludes an existing area refuses the domain.
    ictx.ioas_map(ioas, env.buffer, PAGE, iova=1 << 60)
    expect_errno(errno.EADDRINUSE, dev.attach_pt, ioas)
    assert env.host.pinned_pages == 0
