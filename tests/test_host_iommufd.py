"""Conformance: FIXTURE iommufd (plain /dev/iommu) and FIXTURE change_process — iommufd.md §9.2, §9.3.

Driven through the raw ioctl layer where the case is about the ioctl contract itself (sizes, E2BIG,
ENOTTY, EFAULT), through the Python methods otherwise.

Not covered (no VFIO type1 compatibility handler is modelled; its numbers fall through to ENOTTY):
simple_ioctls, unmap_cmd, map_cmd, info_cmd, set_iommu_cmd.  change_process/basic's fork half needs a
second process (kernel-only).
"""

from __future__ import annotations

import errno
import struct

import pytest

from vtd_emu.host import Host, IommufdError
from vtd_emu.host.iommufd import VFIO_IOAS_CLEAR, VFIO_IOAS_GET, VFIO_IOAS_SET
from vtd_emu.host.uapi import (COMMANDS, IOCTL, OPTION_HUGE_PAGES, OPTION_OP_GET, OPTION_OP_SET,
                               OPTION_RLIMIT_MODE)

PAGE = 4096


def expect_errno(err: int, fn, *args, **kwargs) -> IommufdError:
    with pytest.raises(IommufdError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == err, f"expected {errno.errorcode[err]}, got {ei.value.name}: {ei.value}"
    return ei.value


@pytest.fixture
def host() -> Host:
    return Host()


@pytest.fixture
def ictx(host: Host):
    ctx = host.open_iommufd()
    yield ctx
    ctx.close()
    # Teardown of every fixture: closing releases every pin.
    assert host.pinned_pages == 0


def test_simple_close(ictx) -> None:
    assert ictx.objects() == []


def test_cmd_fail(ictx) -> None:
    expect_errno(errno.ENOENT, ictx.destroy, 0)
    expect_errno(errno.EFAULT, ictx.ioctl, IOCTL["DESTROY"], None)
    expect_errno(errno.ENOTTY, ictx.ioctl, (0x3B << 8) | 0x7F, bytearray(struct.pack("<II", 8, 0)))


# (command, min size) exactly as the selftest's TEST_LENGTH list.
LENGTH_CASES = ["DESTROY", "GET_HW_INFO", "HWPT_ALLOC", "HWPT_INVALIDATE", "IOAS_ALLOC", "IOAS_IOVA_RANGES",
                "IOAS_ALLOW_IOVAS", "IOAS_MAP", "IOAS_COPY", "IOAS_UNMAP", "OPTION", "VFIO_IOAS", "IOAS_MAP_FILE",
                "VIOMMU_ALLOC", "VDEVICE_ALLOC", "IOAS_CHANGE_PROCESS"]


@pytest.mark.parametrize("name", LENGTH_CASES)
def test_cmd_length(ictx, name: str) -> None:
    cmd = next(c for c in COMMANDS if c.name == name)
    req = IOCTL[name]

    def buf(size: int, extra: int) -> bytearray:
        b = bytearray(cmd.size + 1)
        b[:4] = struct.pack("<I", size)
        b[cmd.size] = extra
        return b

    expect_errno(errno.EINVAL, ictx.ioctl, req, buf(cmd.min_size - 1, 0xFF))
    expect_errno(errno.E2BIG, ictx.ioctl, req, buf(cmd.size + 1, 0xFF))
    try:
        ictx.ioctl(req, buf(cmd.size, 0))
        rc = 0
    except IommufdError as e:
        rc = e.errno
    if rc:
        expect_errno(rc, ictx.ioctl, req, buf(cmd.size + 1, 0))
    else:
        assert ictx.ioctl(req, buf(cmd.size + 1, 0)) == 0


def test_cmd_min_sizes_match_the_uapi() -> None:
    sizes = {c.name: (c.size, c.min_size) for c in COMMANDS}
    assert sizes["HWPT_ALLOC"] == (48, 24)
    assert sizes["GET_HW_INFO"] == (40, 32)
    assert sizes["VIOMMU_ALLOC"] == (40, 24)
    assert sizes["VEVENTQ_ALLOC"] == (32, 28)
    assert IOCTL["DESTROY"] == 0x3B80 and IOCTL["HW_QUEUE_ALLOC"] == 0x3B94


def test_cmd_ex_fail(ictx) -> None:
    cmd = bytearray(struct.pack("<IIQ", 16, 0, 0))
    expect_errno(errno.ENOENT, ictx.ioctl, IOCTL["DESTROY"], cmd)
    cmd[8:16] = struct.pack("<Q", 1)
    expect_errno(errno.E2BIG, ictx.ioctl, IOCTL["DESTROY"], cmd)
    cmd[:4] = struct.pack("<I", 8)
    expect_errno(errno.ENOENT, ictx.ioctl, IOCTL["DESTROY"], cmd)
    cmd[:4] = struct.pack("<I", 7)
    expect_errno(errno.EINVAL, ictx.ioctl, IOCTL["DESTROY"], cmd)


def test_global_options(ictx) -> None:
    assert ictx.option(OPTION_RLIMIT_MODE, OPTION_OP_GET, val64=1) == 0
    assert ictx.option(OPTION_RLIMIT_MODE, OPTION_OP_SET, val64=1) == 1
    expect_errno(errno.EINVAL, ictx.option, OPTION_RLIMIT_MODE, OPTION_OP_SET, val64=2)
    assert ictx.option(OPTION_RLIMIT_MODE, OPTION_OP_GET) == 1
    assert ictx.option(OPTION_RLIMIT_MODE, OPTION_OP_SET, val64=0) == 0
    expect_errno(errno.ENOENT, ictx.option, OPTION_HUGE_PAGES, OPTION_OP_GET, 0)
    expect_errno(errno.ENOENT, ictx.option, OPTION_HUGE_PAGES, OPTION_OP_SET, 0)


def test_options_edge_errnos(ictx) -> None:
    expect_errno(errno.EOPNOTSUPP, ictx.option, OPTION_RLIMIT_MODE, OPTION_OP_GET, object_id=1)
    expect_errno(errno.EOPNOTSUPP, ictx.option, 7, OPTION_OP_GET)
    ioas = ictx.ioas_alloc()
    # RLIMIT_MODE cannot change once any object exists.
    expect_errno(errno.EBUSY, ictx.option, OPTION_RLIMIT_MODE, OPTION_OP_SET, val64=1)
    expect_errno(errno.EOPNOTSUPP, ictx.option, OPTION_HUGE_PAGES, 9, ioas)
    # The option ioctl checks __reserved first, and writes back only val64.
    raw = bytearray(struct.pack("<IIHHIQ", 24, OPTION_HUGE_PAGES, OPTION_OP_GET, 1, ioas, 5))
    expect_errno(errno.EOPNOTSUPP, ictx.ioctl, IOCTL["OPTION"], raw)
    raw = bytearray(struct.pack("<IIHHIQ", 24, OPTION_HUGE_PAGES, OPTION_OP_GET, 0, ioas, 5))
    ictx.ioctl(IOCTL["OPTION"], raw)
    assert struct.unpack("<IIHHIQ", raw)[5] == 1


def test_vfio_ioas(ictx) -> None:
    expect_errno(errno.ENODEV, ictx.vfio_ioas, VFIO_IOAS_GET)
    expect_errno(errno.ENOENT, ictx.vfio_ioas, VFIO_IOAS_SET, 0)
    ioas = ictx.ioas_alloc()
    ictx.vfio_ioas(VFIO_IOAS_SET, ioas)
    raw = bytearray(struct.pack("<IIHH", 12, 0, VFIO_IOAS_GET, 0))
    ictx.ioctl(IOCTL["VFIO_IOAS"], raw)
    assert struct.unpack("<IIHH", raw)[1] == ioas
    ictx.vfio_ioas(VFIO_IOAS_CLEAR)
    expect_errno(errno.ENODEV, ictx.vfio_ioas, VFIO_IOAS_GET)
    # Destroying the compat IOAS clears the compat pointer.
    ictx.vfio_ioas(VFIO_IOAS_SET, ioas)
    ictx.destroy(ioas)
    expect_errno(errno.ENODEV, ictx.vfio_ioas, VFIO_IOAS_GET)


def test_ids_start_at_one_and_are_reused_lowest_first(ictx) -> None:
    a, b, c = ictx.ioas_alloc(), ictx.ioas_alloc(), ictx.ioas_alloc()
    assert (a, b, c) == (1, 2, 3)
    ictx.destroy(b)
    assert ictx.ioas_alloc() == 2
    expect_errno(errno.EOPNOTSUPP, ictx.ioas_alloc, 1)


def test_closed_fd_refuses_everything(host: Host) -> None:
    ctx = host.open_iommufd()
    ctx.ioas_alloc()
    ctx.close()
    expect_errno(errno.EBADF, ctx.ioas_alloc)


def test_vfio_type1_compat_numbers_are_not_handled(ictx) -> None:
    # VFIO_GET_API_VERSION is _IO(';', 100): below the iommufd table, handled by no compat layer here.
    expect_errno(errno.ENOTTY, ictx.ioctl, (0x3B << 8) | 100, bytearray(16))


def test_viommu_and_event_objects_are_not_offered_by_intel(host: Host, ictx) -> None:
    dev = host.add_device(0x10)
    dev_id = dev.bind_iommufd(ictx)
    ioas = ictx.ioas_alloc()
    expect_errno(errno.EOPNOTSUPP, ictx.viommu_alloc, dev_id, 0, 0)          # DEFAULT type
    expect_errno(errno.EOPNOTSUPP, ictx.viommu_alloc, dev_id, ioas, 1, 1)    # flags
    expect_errno(errno.ENOENT, ictx.viommu_alloc, ioas, ioas, 1)              # not a device
    expect_errno(errno.EOPNOTSUPP, ictx.viommu_alloc, dev_id, ioas, 1)        # no Intel vIOMMU
    expect_errno(errno.ENOENT, ictx.vdevice_alloc, 99, dev_id, 0x99)
    veventq = bytearray(struct.pack("<IIIIIIII", 32, 0, 99, 0, 2, 0, 0, 0))
    expect_errno(errno.EOPNOTSUPP, ictx.ioctl, IOCTL["VEVENTQ_ALLOC"], veventq)
    veventq[12:16] = struct.pack("<I", 0xBEEFBEEF)
    expect_errno(errno.ENOENT, ictx.ioctl, IOCTL["VEVENTQ_ALLOC"], veventq)
    veventq[16:20] = struct.pack("<I", 0)
    expect_errno(errno.EINVAL, ictx.ioctl, IOCTL["VEVENTQ_ALLOC"], veventq)
    hwq = bytearray(struct.pack("<IIIIIIQQ", 40, 0, 99, 0xDEADBEEF, 0, 0, 0, 0))
    expect_errno(errno.EINVAL, ictx.ioctl, IOCTL["HW_QUEUE_ALLOC"], hwq)
    hwq[32:40] = struct.pack("<Q", PAGE)
    hwq[24:32] = struct.pack("<Q", (1 << 64) - 1)
    expect_errno(errno.EOVERFLOW, ictx.ioctl, IOCTL["HW_QUEUE_ALLOC"], hwq)
    hwq[24:32] = struct.pack("<Q", 0)
    expect_errno(errno.ENOENT, ictx.ioctl, IOCTL["HW_QUEUE_ALLOC"], hwq)
    dev.unbind()


# -- FIXTURE change_process ------------------------------------------------------------------------

def test_change_process_basic(host: Host, ictx) -> None:
    ioas = ictx.ioas_alloc()
    dev = host.add_device(0x20)
    dev.bind_iommufd(ictx)
    dev.attach_pt(ioas)
    buf = host.mmap(PAGE)
    iova = ictx.ioas_map(ioas, buf, PAGE)
    expect_errno(errno.EINVAL, ictx.ioas_change_process)
    ictx.ioas_unmap(ioas, iova, PAGE)
    mfd = host.memfd_create(PAGE)
    ictx.ioas_map_file(ioas, mfd, 0, PAGE)
    ictx.ioas_change_process()
    raw = bytearray(struct.pack("<II", 8, 1))
    expect_errno(errno.EOPNOTSUPP, ictx.ioctl, IOCTL["IOAS_CHANGE_PROCESS"], raw)
    dev.unbind()
    mfd.close()
