"""Conformance: HWPT allocation, nesting, replace and dirty tracking — iommufd.md §9.4 (alloc_hwpt_nested),
§9.5 (FIXTURE iommufd_mock_domain) and §9.6 (FIXTURE iommufd_dirty_tracking), with the Intel driver in
place of the mock: VT-d stage-1 data (24 bytes), VT-d invalidation entries, 4 KiB IOPTEs (2 MiB for
huge buffers), second-stage D bits for dirty tracking.

Not covered: ro_unshare (copy-on-write of a MAP_PRIVATE file page is a kernel mm behaviour), and
enforce_dirty's NO_DIRTY device (every device behind one VT-d unit shares its SSADS capability; the
unit-without-SLADS case is tested instead).
"""

from __future__ import annotations

import errno
import struct

import pytest

from vtd_emu.host import (HWPT_ALLOC_DIRTY_TRACKING, HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID, HWPT_DATA_NONE,
                          HWPT_DATA_VTD_S1, HWPT_FAULT_ID_VALID, Host, HwptVtdS1, IommufdError, PageFault,
                          VtdS1Invalidate, page_response)
from vtd_emu.host.iommufd import HwptPaging
from vtd_emu.host.uapi import IOCTL, U32_MAX, U64_MAX
from vtd_emu.vtd.config import VtdConfig
from vtd_emu.vtd.iommu import Translation

PAGE = 4096
HUGE = 2 << 20
BASE = 1 << 24


def expect_errno(err: int, fn, *args, **kwargs) -> IommufdError:
    with pytest.raises(IommufdError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == err, f"expected {errno.errorcode[err]}, got {ei.value.name}: {ei.value}"
    return ei.value


def finish(host: Host, ictx) -> None:
    ictx.close()
    assert host.pinned_pages == 0


# -- alloc_hwpt_nested -----------------------------------------------------------------------------

def test_alloc_hwpt_nested() -> None:
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev = host.add_device(0x10, pri=True)
    dev_id = dev.bind_iommufd(ictx)
    dev.attach_pt(ioas)
    data = HwptVtdS1(0, 0x1000, 48)

    # 1. negative
    expect_errno(errno.ENOENT, ictx.hwpt_alloc, ioas, ioas)
    expect_errno(errno.EINVAL, ictx.hwpt_alloc, dev_id, dev_id)
    expect_errno(errno.EINVAL, ictx.hwpt_alloc, dev_id, 99)
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_alloc, dev_id, ioas, HWPT_ALLOC_NEST_PARENT | HWPT_FAULT_ID_VALID)
    # 2. parents; negative nested
    parent = ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_NEST_PARENT)
    not_parent = ictx.hwpt_alloc(dev_id, ioas, 0)
    expect_errno(errno.EINVAL, ictx.hwpt_alloc, dev_id, parent, 0, data.pack(), data_type=HWPT_DATA_NONE)
    expect_errno(errno.EINVAL, ictx.hwpt_alloc, dev_id, parent, 0, None, data_type=HWPT_DATA_VTD_S1)
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_alloc, dev_id, parent, 0, data.pack(), data_type=2)
    expect_errno(errno.EINVAL, ictx.hwpt_alloc, dev_id, parent, 0, data.pack()[:23])
    expect_errno(errno.EFAULT, ictx.hwpt_alloc, dev_id, parent, 0, None, data_type=HWPT_DATA_VTD_S1, data_len=24)
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_alloc, dev_id, parent, HWPT_ALLOC_NEST_PARENT, data)
    expect_errno(errno.EINVAL, ictx.hwpt_alloc, dev_id, not_parent, 0, data)
    expect_errno(errno.E2BIG, ictx.hwpt_alloc, dev_id, parent, 0, data.pack() + b"\x01")
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_alloc, dev_id, ioas, 0, data)  # Intel paging domains take no data
    auto = ictx.device_attached_hwpt(dev.idev, 0)
    assert auto is not None
    expect_errno(errno.EINVAL, ictx.hwpt_alloc, dev_id, auto.id, 0, data)  # an automatic domain is no parent
    # 3. two nested HWPTs on one parent, and one with a fault queue
    fault_id, fault_file = ictx.fault_queue_alloc()
    nested = [ictx.hwpt_alloc(dev_id, parent, 0, data), ictx.hwpt_alloc(dev_id, parent, 0, data.pack() + bytes(8))]
    expect_errno(errno.ENOENT, ictx.hwpt_alloc, dev_id, parent, 0, data, fault_id=U32_MAX)
    expect_errno(errno.ENOENT, ictx.hwpt_alloc, dev_id, parent, HWPT_FAULT_ID_VALID, data)
    iopf_hwpt = ictx.hwpt_alloc(dev_id, parent, 0, data, fault_id=fault_id)
    assert [o.kind for o in ictx.objects()].count("hwpt_nested") == 3
    # 4. nested on nested; parent busy
    expect_errno(errno.EINVAL, ictx.hwpt_alloc, dev_id, nested[0], 0, data)
    expect_errno(errno.EBUSY, ictx.destroy, parent)

    # 5. invalidation; attach first so the entries reach caches the device uses
    dev.attach_pt(nested[0])
    log = host.intel.inv_log
    e = expect_errno(errno.EINVAL, ictx.hwpt_invalidate, parent, [VtdS1Invalidate()])
    assert e.entry_num == 0
    assert ictx.hwpt_invalidate(nested[0], []) == 0
    expect_errno(errno.EINVAL, ictx.hwpt_invalidate, nested[0], [], data_type=1)
    e = expect_errno(errno.EINVAL, ictx.hwpt_invalidate, nested[0], [b"\0"], entry_len=1, entry_num=1)
    assert e.entry_num == 0
    expect_errno(errno.EINVAL, ictx.hwpt_invalidate, nested[0], [VtdS1Invalidate()], entry_len=0, entry_num=1)
    expect_errno(errno.E2BIG, ictx.hwpt_invalidate, nested[0], [VtdS1Invalidate().pack() + b"\x01"], entry_len=25)
    assert ictx.hwpt_invalidate(nested[0], [VtdS1Invalidate(0, 1).pack() + b"\0"], entry_len=25) == 1
    e = expect_errno(errno.EOPNOTSUPP, ictx.hwpt_invalidate, nested[0], [VtdS1Invalidate(0, 1, 0xFFFFFFFF)])
    assert e.entry_num == 0
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_invalidate, nested[0], [VtdS1Invalidate(0, 1, 0, 1)])
    expect_errno(errno.EINVAL, ictx.hwpt_invalidate, nested[0], None, entry_num=1)
    expect_errno(errno.EINVAL, ictx.hwpt_invalidate, nested[0], [VtdS1Invalidate(0x10, 1)])
    expect_errno(errno.EINVAL, ictx.hwpt_invalidate, nested[0], [VtdS1Invalidate(PAGE, U64_MAX)])
    expect_errno(errno.EFAULT, ictx.hwpt_invalidate, nested[0], [VtdS1Invalidate(0, 1)], entry_num=2)
    before = len(log)
    e = expect_errno(errno.EOPNOTSUPP, ictx.hwpt_invalidate, nested[0],
                     [VtdS1Invalidate(0x5000, 1), VtdS1Invalidate(0, 1, 2)])
    assert e.entry_num == 1
    assert [(r.type, r.fields["ADDR"]) for r in log[before:] if r.type == "pasid-iotlb"] == [("pasid-iotlb", 0x5000)]
    e = expect_errno(errno.EINVAL, ictx.hwpt_invalidate, nested[0],
                     [VtdS1Invalidate(0x5000, 1), VtdS1Invalidate(0x5001, 1)])
    assert e.entry_num == 1
    assert ictx.hwpt_invalidate(nested[0], [VtdS1Invalidate(0x6000, 2), VtdS1Invalidate(0, U64_MAX)]) == 2
    # Through the ioctl, entry_num is written back on error too.
    ubuf = host.mmap(PAGE)
    host.write_user(ubuf, VtdS1Invalidate(0, 1).pack() + VtdS1Invalidate(0, 1, 4).pack())
    raw = bytearray(struct.pack("<IIQIIII", 32, nested[0], ubuf, 0, 24, 2, 0))
    expect_errno(errno.EOPNOTSUPP, ictx.ioctl, IOCTL["HWPT_INVALIDATE"], raw)
    assert struct.unpack("<IIQIIII", raw)[5] == 1
    raw = bytearray(struct.pack("<IIQIIII", 32, 99, ubuf, 0, 24, 2, 0))
    expect_errno(errno.ENOENT, ictx.ioctl, IOCTL["HWPT_INVALIDATE"], raw)
    assert struct.unpack("<IIQIIII", raw)[5] == 0

    # 6. replace around, with an IOPF round trip on the fault-capable HWPT
    expect_errno(errno.EBUSY, ictx.destroy, nested[0])
    dev.attach_pt(nested[1])
    expect_errno(errno.EBUSY, ictx.destroy, nested[1])
    ictx.destroy(nested[0])
    dev.attach_pt(iopf_hwpt)
    expect_errno(errno.EBUSY, ictx.destroy, iopf_hwpt)
    dev.page_request(0xDEADB000, pasid=None, read=True, write=True, prgi=2)
    recs = PageFault.parse_all(fault_file.read(40))
    assert [(r.dev_id, r.grpid, r.perm, r.addr, r.flags) for r in recs] == [(dev_id, 2, 3, 0xDEADB000, 2)]
    assert fault_file.write(page_response(recs[0].cookie)) == 8
    assert dev.endpoint.responses[-1].code == 0
    dev.attach_pt(parent)
    ictx.destroy(nested[1])
    ictx.destroy(iopf_hwpt)
    dev.attach_pt(ioas)
    ictx.destroy(parent)
    ictx.destroy(not_parent)
    expect_errno(errno.EBUSY, ictx.destroy, fault_id)
    fault_file.close()
    ictx.destroy(fault_id)
    finish(host, ictx)


def test_alloc_hwpt_without_device() -> None:
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    expect_errno(errno.ENOENT, ictx.hwpt_alloc, 2, ioas)
    expect_errno(errno.ENOENT, ictx.hwpt_alloc, 2, 3, 0, HwptVtdS1())
    finish(host, ictx)


def test_hwpt_alloc_header_checks_in_order() -> None:
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev = host.add_device(0x10)
    dev_id = dev.bind_iommufd(ictx)
    raw = bytearray(struct.pack("<IIIIIIIIQII", 48, 0, dev_id, ioas, 0, 1, 0, 0, 0, 0, 0))
    expect_errno(errno.EOPNOTSUPP, ictx.ioctl, IOCTL["HWPT_ALLOC"], raw)
    raw[20:24] = bytes(4)
    raw[28:32] = struct.pack("<I", 4)   # data_len with type NONE
    expect_errno(errno.EINVAL, ictx.ioctl, IOCTL["HWPT_ALLOC"], raw)
    raw[28:32] = bytes(4)
    raw[8:12] = struct.pack("<I", 77)
    expect_errno(errno.ENOENT, ictx.ioctl, IOCTL["HWPT_ALLOC"], raw)
    raw[8:12] = struct.pack("<I", dev_id)
    raw[:4] = struct.pack("<I", 24)      # the minimal size: data fields read as zero
    ictx.ioctl(IOCTL["HWPT_ALLOC"], raw)
    hwpt = struct.unpack("<IIIIIIIIQII", raw)[4]
    assert ictx._objects[hwpt].kind == "hwpt_paging"
    # Nested data through a user pointer: a bad pointer faults only once the driver copies it.
    parent = ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_NEST_PARENT)
    ubuf = host.mmap(PAGE)
    host.write_user(ubuf, HwptVtdS1(0, 0x2000, 57).pack())
    raw = bytearray(struct.pack("<IIIIIIIIQII", 48, 0, dev_id, parent, 0, 0, 1, 24, ubuf, 0, 0))
    ictx.ioctl(IOCTL["HWPT_ALLOC"], raw)
    nested = struct.unpack("<IIIIIIIIQII", raw)[4]
    assert ictx._objects[nested].domain.s1 == HwptVtdS1(0, 0x2000, 57)
    raw = bytearray(struct.pack("<IIIIIIIIQII", 48, 0, dev_id, parent, 0, 0, 1, 24, 0x55_0000, 0, 0))
    expect_errno(errno.EFAULT, ictx.ioctl, IOCTL["HWPT_ALLOC"], raw)
    dev.unbind()
    finish(host, ictx)


@pytest.mark.parametrize("field, value", [("flags", -1), ("flags", 1 << 64), ("pgtbl_addr", -PAGE),
                                          ("pgtbl_addr", 1 << 64), ("addr_width", 1 << 32), ("addr_width", -48),
                                          ("reserved", 1 << 32), ("addr_width", "48")])
def test_vtd_s1_fields_outside_their_c_type_are_value_errors(field: str, value: object) -> None:
    """A value no ``iommu_hwpt_vtd_s1`` can hold is the caller's mistake: ValueError naming the field,
    before anything reaches the context (never construct's FormatFieldError out of hwpt_alloc)."""
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev_id = host.add_device(0x10).bind_iommufd(ictx)
    parent = ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_NEST_PARENT)
    before = ictx.objects()
    with pytest.raises(ValueError, match=f"HwptVtdS1.{field} must be a"):
        ictx.hwpt_alloc(dev_id, parent, 0, HwptVtdS1(**{field: value}))
    assert ictx.objects() == before
    finish(host, ictx)


@pytest.mark.parametrize("field, value", [("addr", -PAGE), ("addr", 1 << 64), ("npages", -1),
                                          ("npages", 1 << 64), ("flags", 1 << 32), ("reserved", -1)])
def test_vtd_s1_invalidate_fields_outside_their_c_type_are_value_errors(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"VtdS1Invalidate.{field} must be a"):
        VtdS1Invalidate(**{field: value})


def test_vtd_s1_bytes_the_kernel_sees_get_the_kernels_errno() -> None:
    """The same wrong values as bytes (the largest each field can hold) reach the driver's checks:
    allocation takes anything (iommufd.md §6.1), attach refuses the width, invalidation the flags."""
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev = host.add_device(0x10, pasid_bits=8)
    dev_id = dev.bind_iommufd(ictx)
    parent = ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_NEST_PARENT)
    dev.attach_pt(parent)
    raw = struct.pack("<QQII", U64_MAX, U64_MAX, U32_MAX, 0)
    nested = ictx.hwpt_alloc(dev_id, parent, 0, raw)
    assert ictx._objects[nested].domain.s1 == HwptVtdS1(U64_MAX, U64_MAX, U32_MAX)
    expect_errno(errno.EINVAL, dev.attach_pt, nested)           # addr_width 0xFFFFFFFF: neither 48 nor 57
    assert dev.attached_hwpt() == parent                         # the failed replace left the old attachment
    ok = ictx.hwpt_alloc(dev_id, parent, 0, HwptVtdS1(0, 0x1000, 48))
    dev.attach_pt(ok)
    e = expect_errno(errno.EOPNOTSUPP, ictx.hwpt_invalidate, ok,
                     [struct.pack("<QQII", 0, 1, U32_MAX, 0)])     # every flag bit set
    assert e.entry_num == 0
    e = expect_errno(errno.EINVAL, ictx.hwpt_invalidate, ok, [struct.pack("<QQII", U64_MAX, 1, 0, 0)])
    assert e.entry_num == 0                                      # not 4 KiB aligned
    # And through the raw ioctl: the page response with a u32 code the fault file does not know.
    fault_id, ffile = ictx.fault_queue_alloc()
    with pytest.raises(ValueError, match="code must be a 32-bit"):
        page_response(1, 1 << 32)
    expect_errno(errno.EINVAL, ffile.write, struct.pack("<II", 1, U32_MAX))
    dev.unbind()
    ffile.close()
    finish(host, ictx)


def test_nest_parent_needs_ecap_nest() -> None:
    host = Host(VtdConfig.preset("modern", overrides={"ecap.NEST": 0}))
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev_id = host.add_device(0x10).bind_iommufd(ictx)
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_alloc, dev_id, ioas, HWPT_ALLOC_NEST_PARENT)
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_alloc, dev_id, ioas, 1 << 8)
    finish(host, ictx)


def test_errata_772415_read_only_mappings_and_nest_parents() -> None:
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev_id = host.add_device(0x10).bind_iommufd(ictx)
    buf = host.mmap(4 * PAGE)
    ictx.ioas_map(ioas, buf, PAGE, iova=BASE, flags=4)   # READABLE only, no parent yet
    expect_errno(errno.EINVAL, ictx.hwpt_alloc, dev_id, ioas, HWPT_ALLOC_NEST_PARENT)
    assert host.pinned_pages == 0
    ictx.ioas_unmap(ioas, BASE, PAGE)
    ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_NEST_PARENT)
    expect_errno(errno.EINVAL, ictx.ioas_map, ioas, buf, PAGE, BASE, flags=4)
    ictx.ioas_map(ioas, buf, PAGE, BASE)
    expect_errno(errno.EINVAL, ictx.ioas_copy, ioas, BASE + PAGE, ioas, BASE, PAGE, 4)
    assert host.pinned_pages == 1
    finish(host, ictx)


# -- FIXTURE iommufd_mock_domain -------------------------------------------------------------------

@pytest.fixture(params=["one_domain", "two_domains", "one_domain_hugepage", "two_domains_hugepage",
                        "one_domain_file"])
def md(request):
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    n = 2 if request.param.startswith("two") else 1
    devs, hwpts = [], []
    for i in range(n):
        dev = host.add_device(0x20 + i)
        dev.bind_iommufd(ictx)
        hwpt = ictx.hwpt_alloc(dev.dev_id, ioas) if n == 2 else None
        hwpts.append(dev.attach_pt(hwpt if hwpt is not None else ioas))
        devs.append(dev)
    huge = "hugepage" in request.param
    size = 2 * HUGE if huge else 8 * PAGE
    memfd = None
    if request.param.endswith("file"):
        memfd = host.memfd_create(size)
        buf = host.process.mmap_file(memfd, 0, size)
    else:
        buf = host.mmap(size, huge=huge)
    host.write_user(buf, bytes(range(256)) * (size // 256))
    yield dict(host=host, ictx=ictx, ioas=ioas, devs=devs, hwpts=hwpts, buf=buf, size=size, memfd=memfd,
               huge=huge)
    ictx.close()
    if memfd is not None:
        memfd.close()
    assert host.pinned_pages == 0


def check_map(md: dict, iova: int, va: int, length: int) -> None:
    """MD_CHECK_MAP: the physical unit translates every page of [iova, +length), for each device (each
    on its own HWPT in two_domains), to the host page the VMM's own page table has behind ``va``, with
    read and write allowed; and a DMA of each page reads what the VMM wrote there."""
    host = md["host"]
    for dev in md["devs"]:
        for off in range(0, length, PAGE):
            tr = host.iommu.translate(dev.sid, iova + off, "rw")
            assert isinstance(tr, Translation), f"{dev!r}: iova {iova + off:#x} faults: {tr}"
            expect = host.process._page(va + off, create=False)
            assert expect is not None and tr.addr == expect, f"iova {iova + off:#x} -> {tr.addr:#x}, not {expect:#x}"
        first, last = iova, iova + length - 8
        for a, v in ((first, va), (last, va + length - 8)):
            assert dev.dma_read(a, 8).data == host.read_user(v, 8)


def test_md_basic(md: dict) -> None:
    host, ictx, ioas = md["host"], md["ictx"], md["ioas"]
    iova = ictx.ioas_map(ioas, md["buf"], PAGE)
    check_map(md, iova, md["buf"], PAGE)
    assert md["devs"][0].dma_read(iova, 16).data == bytes(range(16))
    one = host.mmap(PAGE)
    expect_errno(errno.EFAULT, ictx.ioas_map, ioas, one, 2 * PAGE)
    gone = host.mmap(2 * PAGE)
    host.munmap(gone, 2 * PAGE)
    expect_errno(errno.EFAULT, ictx.ioas_map, ioas, gone, 2 * PAGE)
    if md["memfd"] is not None:
        mfd = md["memfd"]
        iova = ictx.ioas_map_file(ioas, mfd, 0, PAGE)
        check_map(md, iova, md["buf"], PAGE)
        expect_errno(errno.EINVAL, ictx.ioas_map_file, ioas, mfd, 0, md["size"] + 1)
        expect_errno(errno.EBADF, ictx.ioas_map_file, ioas, 999, 0, PAGE)
        other = host.memfd_create(PAGE)
        other.truncate(0)
        expect_errno(errno.EINVAL, ictx.ioas_map_file, ioas, other, 0, PAGE)
        other.close()


def test_md_all_aligns(md: dict) -> None:
    host, ictx, ioas = md["host"], md["ictx"], md["ioas"]
    size = md["size"]
    step = size // 8 if md["huge"] else PAGE
    for start in range(0, size, step):
        for end in range(start + step, size + 1, step):
            iova = ictx.ioas_map(ioas, md["buf"] + start, end - start)
            check_map(md, iova, md["buf"] + start, end - start)
            assert host.process.pin_counts(md["buf"] + start, end - start) == [1] * ((end - start) // PAGE)
            ictx.ioas_unmap(ioas, iova, end - start)
            assert host.pinned_pages == 0


def test_md_all_aligns_copy(md: dict) -> None:
    host, ictx, ioas = md["host"], md["ictx"], md["ioas"]
    size = md["size"]
    step = size // 4 if md["huge"] else 2 * PAGE
    for start in range(0, size, step):
        for end in range(start + step, size + 1, step):
            iova = ictx.ioas_map(ioas, md["buf"] + start, end - start)
            dev = host.add_device(0x80 + start // step * 16 + end // step)
            dev_id = dev.bind_iommufd(ictx)
            hwpt = ictx.hwpt_alloc(dev_id, ioas)
            dev.attach_pt(hwpt)
            md["hwpts"].append(hwpt)
            check_map(md, iova, md["buf"] + start, end - start)
            md["hwpts"].pop()
            dev.unbind()
            ictx.destroy(hwpt)
            del host.devices[dev.sid]
            host.intel.release_device(dev.info)
            ictx.ioas_unmap(ioas, iova, end - start)


def test_md_user_copy(md: dict) -> None:
    host, ictx, ioas = md["host"], md["ictx"], md["ioas"]
    for _ in range(2):
        plain = ictx.ioas_alloc()
        acc = ictx.access_create(plain)
        ictx.ioas_map(plain, md["buf"], md["size"], iova=BASE)
        item, pages = acc.pin_pages(BASE, md["size"])
        iova = ictx.ioas_copy(ioas, None, plain, BASE, md["size"])
        check_map(md, iova, md["buf"], md["size"])
        assert md["devs"][0].dma_read(iova + PAGE, 8).data == host.read_user(md["buf"] + PAGE, 8)
        acc.replace_ioas(ioas)
        ictx.destroy(plain)
        acc.destroy()
        ictx.ioas_unmap(ioas, iova, md["size"])


def test_md_replace(md: dict) -> None:
    ictx, ioas = md["ictx"], md["ioas"]
    dev = md["devs"][0]
    other = ictx.ioas_alloc()
    old = md["hwpts"][0]
    new = dev.attach_pt(other)
    if len(md["devs"]) == 1:
        # The automatic domain died with its last device.
        assert old not in [o.id for o in ictx.objects()]
        expect_errno(errno.ENOENT, dev.attach_pt, old)
        assert dev.attach_pt(other) == new
        assert dev.attach_pt(ioas) != new
    else:
        b = md["hwpts"][1]
        dev.attach_pt(b)
        dev.attach_pt(old)
        md["devs"][1].attach_pt(old)
        md["devs"][1].attach_pt(b)
        assert ictx.users(old) == 2 and ictx.users(b) == 2


def test_md_alloc_hwpt(md: dict) -> None:
    ictx, ioas = md["ictx"], md["ioas"]
    dev = md["devs"][0]
    bad = 0xFFFFFFFF & ~(HWPT_ALLOC_NEST_PARENT | HWPT_FAULT_ID_VALID)
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_alloc, dev.dev_id, ioas, bad)
    for flags in (0, HWPT_ALLOC_NEST_PARENT):
        hwpt = ictx.hwpt_alloc(dev.dev_id, ioas, flags)
        dev.attach_pt(hwpt)
        expect_errno(errno.EBUSY, ictx.destroy, hwpt)
        dev.attach_pt(ioas)
        ictx.destroy(hwpt)
    hwpt = ictx.hwpt_alloc(dev.dev_id, ioas)
    direct = md["host"].add_device(0x70)
    direct.bind_iommufd(ictx)
    assert direct.attach_pt(hwpt) == hwpt
    direct.unbind()
    ictx.destroy(hwpt)


def test_huge_buffer_uses_2m_leaves(md: dict) -> None:
    if not md["huge"]:
        return
    ictx = md["ictx"]
    iova = ictx.ioas_map(md["ioas"], md["buf"], md["size"])
    assert iova % HUGE == 0
    dom = ictx._objects[md["hwpts"][0]].domain
    assert dom.table.lookup(iova + 5 * PAGE)[1] == HUGE
    from vtd_emu.host.uapi import OPTION_HUGE_PAGES, OPTION_OP_SET
    ictx.ioas_unmap(md["ioas"], iova, md["size"])
    if len(md["devs"]) == 1:
        # With huge pages off the same memory is mapped with 4 KiB leaves.
        plain = ictx.ioas_alloc()
        ictx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, plain, 0)
        md["devs"][0].attach_pt(plain)
        iova = ictx.ioas_map(plain, md["buf"], md["size"])
        dom = ictx.device_attached_hwpt(md["devs"][0].idev, 0).domain
        assert dom.table.lookup(iova + 5 * PAGE)[1] == PAGE


# -- dirty tracking --------------------------------------------------------------------------------

@pytest.fixture(params=[8 << 10, 16 << 10, 64 << 10, 128 << 10, 320 << 10, 4 << 20, -(4 << 20)])
def dirty(request):
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    huge = request.param < 0
    size = abs(request.param)
    dev = host.add_device(0x10)
    dev_id = dev.bind_iommufd(ictx)
    hwpt = ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_DIRTY_TRACKING)
    dev.attach_pt(hwpt)
    buf = host.mmap(size, huge=huge)
    iova = ictx.ioas_map(ioas, buf, size, iova=BASE if not huge else 1 << 30)
    yield dict(host=host, ictx=ictx, ioas=ioas, dev=dev, hwpt=hwpt, iova=iova, size=size, huge=huge, buf=buf)
    ictx.close()
    assert host.pinned_pages == 0


def _bits(bitmap: bytes, n: int) -> list[int]:
    return [i for i in range(n) if bitmap[i // 8] >> (i % 8) & 1]


def test_set_dirty_tracking_and_capability(dirty: dict) -> None:
    ictx, hwpt = dirty["ictx"], dirty["hwpt"]
    ictx.hwpt_set_dirty_tracking(hwpt, True)
    ictx.hwpt_set_dirty_tracking(hwpt, False)
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_set_dirty_tracking, hwpt, flags=2)
    expect_errno(errno.ENOENT, ictx.hwpt_set_dirty_tracking, dirty["ioas"])
    assert ictx.get_hw_info(dirty["dev"].dev_id).capabilities & 1
    plain = ictx.hwpt_alloc(dirty["dev"].dev_id, dirty["ioas"])
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_set_dirty_tracking, plain, True)
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_get_dirty_bitmap, plain, dirty["iova"], PAGE, PAGE)


def _leaf_pages(dirty: dict, pages: list[int]) -> list[int]:
    """Pages a dirty bitmap reports for writes to ``pages``: a dirty IOPTE reports all the pages it maps
    (2 MiB leaves come from huge buffers, or from 4 KiB pages that happen to be contiguous)."""
    dom = dirty["ictx"]._objects[dirty["hwpt"]].domain
    out: set[int] = set()
    for p in pages:
        size = dom.table.lookup(dirty["iova"] + p * PAGE)[1]
        first = (p * PAGE) // size * size // PAGE
        out.update(range(first, first + size // PAGE))
    return sorted(out)


def test_get_dirty_bitmap(dirty: dict) -> None:
    ictx, hwpt, dev, iova, size = dirty["ictx"], dirty["hwpt"], dirty["dev"], dirty["iova"], dirty["size"]
    # Tracking off: a bitmap is refused.
    expect_errno(errno.EINVAL, ictx.hwpt_get_dirty_bitmap, hwpt, iova, size, PAGE)
    dev.dma_write(iova, b"before")   # dirtied before tracking: must not show up
    ictx.hwpt_set_dirty_tracking(hwpt, True)
    npages = size // PAGE
    assert _bits(ictx.hwpt_get_dirty_bitmap(hwpt, iova, size, PAGE), npages) == []
    written = list(range(0, npages, 2))
    for p in written:
        assert dev.dma_write(iova + p * PAGE + 8, b"x").ok
    got = _bits(ictx.hwpt_get_dirty_bitmap(hwpt, iova, size, PAGE), npages)
    assert got == _leaf_pages(dirty, written)
    if dirty["huge"]:
        assert got == list(range(npages))   # every 2 MiB IOPTE was dirtied: all bits set
    assert _bits(ictx.hwpt_get_dirty_bitmap(hwpt, iova, size, PAGE), npages) == []
    # Cleared bits were flushed from the IOTLB: a second write sets D again.
    dev.dma_write(iova + PAGE, b"y")
    expect = _leaf_pages(dirty, [1])
    assert _bits(ictx.hwpt_get_dirty_bitmap(hwpt, iova, size, PAGE, 1), npages) == expect
    assert _bits(ictx.hwpt_get_dirty_bitmap(hwpt, iova, size, PAGE, 1), npages) == expect
    # A coarser page_size: bit i covers iova + i * 8 KiB.
    if size >= 2 * 8192:
        assert _bits(ictx.hwpt_get_dirty_bitmap(hwpt, iova, size, 8192), size // 8192) == \
            sorted({p // 2 for p in expect})


def test_get_dirty_bitmap_checks(dirty: dict) -> None:
    ictx, hwpt, iova, size = dirty["ictx"], dirty["hwpt"], dirty["iova"], dirty["size"]
    ictx.hwpt_set_dirty_tracking(hwpt, True)
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_get_dirty_bitmap, hwpt, iova, size, PAGE, 2)
    expect_errno(errno.ENOENT, ictx.hwpt_get_dirty_bitmap, dirty["ioas"], iova, size, PAGE)
    expect_errno(errno.EOVERFLOW, ictx.hwpt_get_dirty_bitmap, hwpt, U64_MAX - PAGE + 1, 2 * PAGE, PAGE)
    expect_errno(errno.EINVAL, ictx.hwpt_get_dirty_bitmap, hwpt, iova + 8, PAGE, PAGE)
    expect_errno(errno.EINVAL, ictx.hwpt_get_dirty_bitmap, hwpt, iova, size, 0)
    expect_errno(errno.EINVAL, ictx.hwpt_get_dirty_bitmap, hwpt, iova + PAGE, PAGE, 2 * PAGE)
    expect_errno(errno.EINVAL, ictx.hwpt_get_dirty_bitmap, hwpt, iova, size + PAGE, PAGE)


def test_get_dirty_bitmap_ioctl_sets_bits_in_user_memory(dirty: dict) -> None:
    host, ictx, hwpt, dev, iova = dirty["host"], dirty["ictx"], dirty["hwpt"], dirty["dev"], dirty["iova"]
    ictx.hwpt_set_dirty_tracking(hwpt, True)
    dev.dma_write(iova + PAGE, b"z")
    ubuf = host.mmap(PAGE)
    host.write_user(ubuf + 2048, b"\x80")   # a bit the kernel must not clear
    n = min(8 * PAGE, dirty["size"])
    raw = bytearray(struct.pack("<IIIIQQQQ", 48, hwpt, 0, 0, iova, n, PAGE, ubuf + 2048))
    ictx.ioctl(IOCTL["HWPT_GET_DIRTY_BITMAP"], raw)
    expect = 0x80 | sum(1 << p for p in _leaf_pages(dirty, [1]) if p < 8)
    assert host.read_user(ubuf + 2048, 1)[0] == expect
    raw[12:16] = struct.pack("<I", 1)
    expect_errno(errno.EOPNOTSUPP, ictx.ioctl, IOCTL["HWPT_GET_DIRTY_BITMAP"], raw)


def test_dirty_tracking_needs_slads() -> None:
    host = Host(VtdConfig.preset("modern", overrides={"ecap.SLADS": 0}))
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev_id = host.add_device(0x10).bind_iommufd(ictx)
    expect_errno(errno.EOPNOTSUPP, ictx.hwpt_alloc, dev_id, ioas, HWPT_ALLOC_DIRTY_TRACKING)
    assert ictx.get_hw_info(dev_id).capabilities == 0
    finish(host, ictx)


def test_dirty_hwpt_cannot_take_a_pasid_or_parent_nested_pasid() -> None:
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev = host.add_device(0x10, pasid_bits=8)
    dev_id = dev.bind_iommufd(ictx)
    dirty = ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_DIRTY_TRACKING | HWPT_ALLOC_PASID)
    expect_errno(errno.EINVAL, dev.attach_pt, dirty, pasid=3)
    parent = ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_DIRTY_TRACKING)
    nested = ictx.hwpt_alloc(dev_id, parent, HWPT_ALLOC_PASID, HwptVtdS1())
    dev.attach_pt(ioas)
    expect_errno(errno.EINVAL, dev.attach_pt, nested, pasid=3)
    assert isinstance(ictx._objects[dirty], HwptPaging)
    finish(host, ictx)
