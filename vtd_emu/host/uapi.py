"""The iommufd / VFIO uAPI as the host layer speaks it: flag and type values, the binary records that
cross the fault file (built and parsed with construct), the VT-d driver-data structures, and the
ioctl command table (numbers, sizes, minimum sizes) used by :mod:`vtd_emu.host.ioctl`.

Values follow ``include/uapi/linux/iommufd.h`` (Linux 6.17); ``iommufd.md`` §1 and §4 is the summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import construct as cs

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
ULONG_MAX = U64_MAX
"""x86-64: unsigned long is 64 bits, so ULONG_MAX and U64_MAX coincide."""
PAGE_SIZE = 4096
HPAGE_SIZE = 2 << 20
IOMMU_NO_PASID = 0

# IOMMU_IOAS_MAP / COPY / MAP_FILE flags
IOAS_MAP_FIXED_IOVA = 1
IOAS_MAP_WRITEABLE = 2
IOAS_MAP_READABLE = 4
IOAS_MAP_FLAGS = IOAS_MAP_FIXED_IOVA | IOAS_MAP_WRITEABLE | IOAS_MAP_READABLE

# IOMMU_OPTION
OPTION_RLIMIT_MODE = 0
OPTION_HUGE_PAGES = 1
OPTION_OP_SET = 0
OPTION_OP_GET = 1

# IOMMU_HWPT_ALLOC flags and data types
HWPT_ALLOC_NEST_PARENT = 1
HWPT_ALLOC_DIRTY_TRACKING = 2
HWPT_FAULT_ID_VALID = 4
HWPT_ALLOC_PASID = 8
HWPT_DATA_NONE = 0
HWPT_DATA_VTD_S1 = 1
HWPT_DATA_ARM_SMMUV3 = 2

# iommu_hwpt_vtd_s1.flags
VTD_S1_SRE = 1
VTD_S1_EAFE = 2
VTD_S1_WPE = 4

# IOMMU_HWPT_INVALIDATE
HWPT_INVALIDATE_DATA_VTD_S1 = 0
VTD_INV_FLAGS_LEAF = 1

# IOMMU_GET_HW_INFO
HW_INFO_FLAG_INPUT_TYPE = 1
HW_INFO_TYPE_DEFAULT = 0
HW_INFO_TYPE_NONE = 0
HW_INFO_TYPE_INTEL_VTD = 1
HW_INFO_TYPE_ARM_SMMUV3 = 2
HW_CAP_DIRTY_TRACKING = 1
HW_CAP_PCI_PASID_EXEC = 2
HW_CAP_PCI_PASID_PRIV = 4
HW_INFO_VTD_ERRATA_772415_SPR17 = 1

# Dirty tracking
HWPT_DIRTY_TRACKING_ENABLE = 1
HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1

# Fault records and responses
PGFAULT_FLAGS_PASID_VALID = 1
PGFAULT_FLAGS_LAST_PAGE = 2
PGFAULT_PERM_READ = 1
PGFAULT_PERM_WRITE = 2
PGFAULT_PERM_EXEC = 4
PGFAULT_PERM_PRIV = 8
PAGE_RESP_SUCCESS = 0
PAGE_RESP_INVALID = 1

# vIOMMU types (only to reject them: the Intel driver of 6.17 offers no vIOMMU object)
VIOMMU_TYPE_DEFAULT = 0

# VFIO cdev
VFIO_DEVICE_BIND_FLAG_TOKEN = 1
VFIO_DEVICE_ATTACH_PASID = 1
VFIO_DEVICE_DETACH_PASID = 1

# -- binary records -----------------------------------------------------------------------------------

IommuHwptPgfault = cs.Struct(
    "flags" / cs.Int32ul,
    "dev_id" / cs.Int32ul,
    "pasid" / cs.Int32ul,
    "grpid" / cs.Int32ul,
    "perm" / cs.Int32ul,
    "__reserved" / cs.Int32ul,
    "addr" / cs.Int64ul,
    "length" / cs.Int32ul,
    "cookie" / cs.Int32ul,
)
"""``struct iommu_hwpt_pgfault``: one 40-byte record read from a fault file."""

IommuHwptPageResponse = cs.Struct(
    "cookie" / cs.Int32ul,
    "code" / cs.Int32ul,
)
"""``struct iommu_hwpt_page_response``: one 8-byte response written to a fault file."""

IommuHwInfoVtd = cs.Struct(
    "flags" / cs.Int32ul,
    "__reserved" / cs.Int32ul,
    "cap_reg" / cs.Int64ul,
    "ecap_reg" / cs.Int64ul,
)
"""``struct iommu_hw_info_vtd`` (24 bytes)."""

IommuHwptVtdS1 = cs.Struct(
    "flags" / cs.Int64ul,
    "pgtbl_addr" / cs.Int64ul,
    "addr_width" / cs.Int32ul,
    "__reserved" / cs.Int32ul,
)
"""``struct iommu_hwpt_vtd_s1`` (24 bytes): the user data of a nested VT-d stage-1 HWPT."""

IommuHwptVtdS1Invalidate = cs.Struct(
    "addr" / cs.Int64ul,
    "npages" / cs.Int64ul,
    "flags" / cs.Int32ul,
    "__reserved" / cs.Int32ul,
)
"""``struct iommu_hwpt_vtd_s1_invalidate`` (24 bytes): one stage-1 cache invalidation request."""

IommuIovaRange = cs.Struct("start" / cs.Int64ul, "last" / cs.Int64ul)

PGFAULT_SIZE = IommuHwptPgfault.sizeof()
PAGE_RESPONSE_SIZE = IommuHwptPageResponse.sizeof()
VTD_S1_SIZE = IommuHwptVtdS1.sizeof()
VTD_S1_INV_SIZE = IommuHwptVtdS1Invalidate.sizeof()
HW_INFO_VTD_SIZE = IommuHwInfoVtd.sizeof()


def _check_fields(record: object, layout: cs.Struct, fields: dict[str, str]) -> None:
    """``ValueError`` naming the first field of ``record`` (attribute -> C field) that does not fit its C
    type: such a value cannot reach the kernel, so it is the caller's mistake rather than an errno."""
    for attr, cname in fields.items():
        value = getattr(record, attr)
        sub = next(s for s in layout.subcons if s.name == cname)
        bits = sub.sizeof() * 8
        if not isinstance(value, int) or not 0 <= value < 1 << bits:
            raise ValueError(f"{type(record).__name__}.{attr} must be a {bits}-bit unsigned value, got {value!r}")


class IovaRange(NamedTuple):
    """An inclusive IOVA range, as ``struct iommu_iova_range``."""

    start: int
    last: int


@dataclass(frozen=True)
class HwptVtdS1:
    """``struct iommu_hwpt_vtd_s1``: flags (SRE/EAFE/WPE), the guest-physical stage-1 root and its width
    (48 = 4-level, 57 = 5-level).  None of it is checked at allocation, only at attach."""

    flags: int = 0
    pgtbl_addr: int = 0
    addr_width: int = 48
    reserved: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, IommuHwptVtdS1, {"flags": "flags", "pgtbl_addr": "pgtbl_addr",
                                             "addr_width": "addr_width", "reserved": "__reserved"})

    def pack(self) -> bytes:
        return IommuHwptVtdS1.build(dict(flags=self.flags, pgtbl_addr=self.pgtbl_addr,
                                         addr_width=self.addr_width, __reserved=self.reserved))


@dataclass(frozen=True)
class VtdS1Invalidate:
    """``struct iommu_hwpt_vtd_s1_invalidate``: ``npages`` 4 KiB pages from ``addr``; (0, U64_MAX) flushes
    everything; ``flags`` LEAF (1) asks to keep cached non-leaf entries."""

    addr: int = 0
    npages: int = U64_MAX
    flags: int = 0
    reserved: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, IommuHwptVtdS1Invalidate, {"addr": "addr", "npages": "npages", "flags": "flags",
                                                       "reserved": "__reserved"})

    def pack(self) -> bytes:
        return IommuHwptVtdS1Invalidate.build(dict(addr=self.addr, npages=self.npages, flags=self.flags,
                                                   __reserved=self.reserved))


class PageFault(NamedTuple):
    """A parsed ``struct iommu_hwpt_pgfault``."""

    flags: int
    dev_id: int
    pasid: int
    grpid: int
    perm: int
    addr: int
    length: int
    cookie: int

    @staticmethod
    def parse_all(data: bytes) -> "list[PageFault]":
        out = []
        for off in range(0, len(data) - len(data) % PGFAULT_SIZE, PGFAULT_SIZE):
            c = IommuHwptPgfault.parse(data[off:off + PGFAULT_SIZE])
            out.append(PageFault(c.flags, c.dev_id, c.pasid, c.grpid, c.perm, c.addr, c.length, c.cookie))
        return out


def page_response(cookie: int, code: int = PAGE_RESP_SUCCESS) -> bytes:
    """The 8 bytes answering the group ``cookie`` with ``code`` (any u32 pair: the fault file judges
    them; values outside u32 are ``ValueError``)."""
    for name, value in (("cookie", cookie), ("code", code)):
        if not isinstance(value, int) or not 0 <= value <= U32_MAX:
            raise ValueError(f"page_response {name} must be a 32-bit unsigned value, got {value!r}")
    return IommuHwptPageResponse.build(dict(cookie=cookie, code=code))


class HwInfoVtd(NamedTuple):
    """A parsed ``struct iommu_hw_info_vtd``."""

    flags: int
    cap_reg: int
    ecap_reg: int


@dataclass(frozen=True)
class HwInfo:
    """What ``IOMMU_GET_HW_INFO`` returns: ``data`` is what was copied into a ``data_len``-byte user
    buffer (zero-filled past the driver's structure), ``data_len`` the driver's structure size."""

    out_data_type: int
    data: bytes
    data_len: int
    capabilities: int
    max_pasid_log2: int

    @property
    def vtd(self) -> HwInfoVtd | None:
        """The decoded VT-d structure, when the buffer held all of it."""
        if self.out_data_type != HW_INFO_TYPE_INTEL_VTD or len(self.data) < HW_INFO_VTD_SIZE:
            return None
        c = IommuHwInfoVtd.parse(self.data[:HW_INFO_VTD_SIZE])
        return HwInfoVtd(c.flags, c.cap_reg, c.ecap_reg)


# -- ioctl command table -------------------------------------------------------------------------------

IOMMUFD_TYPE = 0x3B
IOMMUFD_CMD_BASE = 0x80


def _io(nr: int) -> int:
    return (IOMMUFD_TYPE << 8) | nr


class Cmd(NamedTuple):
    nr: int
    name: str
    size: int
    min_size: int


COMMANDS: tuple[Cmd, ...] = (
    Cmd(0x80, "DESTROY", 8, 8),
    Cmd(0x81, "IOAS_ALLOC", 12, 12),
    Cmd(0x82, "IOAS_ALLOW_IOVAS", 24, 24),
    Cmd(0x83, "IOAS_COPY", 40, 40),
    Cmd(0x84, "IOAS_IOVA_RANGES", 32, 32),
    Cmd(0x85, "IOAS_MAP", 40, 40),
    Cmd(0x86, "IOAS_UNMAP", 24, 24),
    Cmd(0x87, "OPTION", 24, 24),
    Cmd(0x88, "VFIO_IOAS", 12, 12),
    Cmd(0x89, "HWPT_ALLOC", 48, 24),
    Cmd(0x8A, "GET_HW_INFO", 40, 32),
    Cmd(0x8B, "HWPT_SET_DIRTY_TRACKING", 16, 16),
    Cmd(0x8C, "HWPT_GET_DIRTY_BITMAP", 48, 48),
    Cmd(0x8D, "HWPT_INVALIDATE", 32, 32),
    Cmd(0x8E, "FAULT_QUEUE_ALLOC", 16, 16),
    Cmd(0x8F, "IOAS_MAP_FILE", 40, 40),
    Cmd(0x90, "VIOMMU_ALLOC", 40, 24),
    Cmd(0x91, "VDEVICE_ALLOC", 24, 24),
    Cmd(0x92, "IOAS_CHANGE_PROCESS", 8, 8),
    Cmd(0x93, "VEVENTQ_ALLOC", 32, 28),
    Cmd(0x94, "HW_QUEUE_ALLOC", 40, 40),
)
IOCTL = {c.name: _io(c.nr) for c in COMMANDS}
"""ioctl request numbers by command name (``IOCTL["IOAS_MAP"] == 0x3b85``)."""

# Little-endian layouts of the command structures (after the leading u32 size), for the ioctl layer.
CMD_STRUCTS: dict[str, cs.Struct] = {
    "DESTROY": cs.Struct("size" / cs.Int32ul, "id" / cs.Int32ul),
    "IOAS_ALLOC": cs.Struct("size" / cs.Int32ul, "flags" / cs.Int32ul, "out_ioas_id" / cs.Int32ul),
    "IOAS_ALLOW_IOVAS": cs.Struct("size" / cs.Int32ul, "ioas_id" / cs.Int32ul, "num_iovas" / cs.Int32ul,
                                  "__reserved" / cs.Int32ul, "allowed_iovas" / cs.Int64ul),
    "IOAS_COPY": cs.Struct("size" / cs.Int32ul, "flags" / cs.Int32ul, "dst_ioas_id" / cs.Int32ul,
                           "src_ioas_id" / cs.Int32ul, "length" / cs.Int64ul, "dst_iova" / cs.Int64ul,
                           "src_iova" / cs.Int64ul),
    "IOAS_IOVA_RANGES": cs.Struct("size" / cs.Int32ul, "ioas_id" / cs.Int32ul, "num_iovas" / cs.Int32ul,
                                  "__reserved" / cs.Int32ul, "allowed_iovas" / cs.Int64ul,
                                  "out_iova_alignment" / cs.Int64ul),
    "IOAS_MAP": cs.Struct("size" / cs.Int32ul, "flags" / cs.Int32ul, "ioas_id" / cs.Int32ul,
                          "__reserved" / cs.Int32ul, "user_va" / cs.Int64ul, "length" / cs.Int64ul,
                          "iova" / cs.Int64ul),
    "IOAS_UNMAP": cs.Struct("size" / cs.Int32ul, "ioas_id" / cs.Int32ul, "iova" / cs.Int64ul,
                            "length" / cs.Int64ul),
    "OPTION": cs.Struct("size" / cs.Int32ul, "option_id" / cs.Int32ul, "op" / cs.Int16ul,
                        "__reserved" / cs.Int16ul, "object_id" / cs.Int32ul, "val64" / cs.Int64ul),
    "VFIO_IOAS": cs.Struct("size" / cs.Int32ul, "ioas_id" / cs.Int32ul, "op" / cs.Int16ul,
                           "__reserved" / cs.Int16ul),
    "HWPT_ALLOC": cs.Struct("size" / cs.Int32ul, "flags" / cs.Int32ul, "dev_id" / cs.Int32ul,
                            "pt_id" / cs.Int32ul, "out_hwpt_id" / cs.Int32ul, "__reserved" / cs.Int32ul,
                            "data_type" / cs.Int32ul, "data_len" / cs.Int32ul, "data_uptr" / cs.Int64ul,
                            "fault_id" / cs.Int32ul, "__reserved2" / cs.Int32ul),
    "GET_HW_INFO": cs.Struct("size" / cs.Int32ul, "flags" / cs.Int32ul, "dev_id" / cs.Int32ul,
                             "data_len" / cs.Int32ul, "data_uptr" / cs.Int64ul, "data_type" / cs.Int32ul,
                             "out_max_pasid_log2" / cs.Int8ul, "__reserved" / cs.Bytes(3),
                             "out_capabilities" / cs.Int64ul),
    "HWPT_SET_DIRTY_TRACKING": cs.Struct("size" / cs.Int32ul, "flags" / cs.Int32ul, "hwpt_id" / cs.Int32ul,
                                         "__reserved" / cs.Int32ul),
    "HWPT_GET_DIRTY_BITMAP": cs.Struct("size" / cs.Int32ul, "hwpt_id" / cs.Int32ul, "flags" / cs.Int32ul,
                                       "__reserved" / cs.Int32ul, "iova" / cs.Int64ul, "length" / cs.Int64ul,
                                       "page_size" / cs.Int64ul, "data" / cs.Int64ul),
    "HWPT_INVALIDATE": cs.Struct("size" / cs.Int32ul, "hwpt_id" / cs.Int32ul, "data_uptr" / cs.Int64ul,
                                 "data_type" / cs.Int32ul, "entry_len" / cs.Int32ul, "entry_num" / cs.Int32ul,
                                 "__reserved" / cs.Int32ul),
    "FAULT_QUEUE_ALLOC": cs.Struct("size" / cs.Int32ul, "flags" / cs.Int32ul, "out_fault_id" / cs.Int32ul,
                                   "out_fault_fd" / cs.Int32ul),
    "IOAS_MAP_FILE": cs.Struct("size" / cs.Int32ul, "flags" / cs.Int32ul, "ioas_id" / cs.Int32ul,
                               "fd" / cs.Int32sl, "start" / cs.Int64ul, "length" / cs.Int64ul,
                               "iova" / cs.Int64ul),
    "VIOMMU_ALLOC": cs.Struct("size" / cs.Int32ul, "flags" / cs.Int32ul, "type" / cs.Int32ul,
                              "dev_id" / cs.Int32ul, "hwpt_id" / cs.Int32ul, "out_viommu_id" / cs.Int32ul,
                              "data_len" / cs.Int32ul, "__reserved" / cs.Int32ul, "data_uptr" / cs.Int64ul),
    "VDEVICE_ALLOC": cs.Struct("size" / cs.Int32ul, "viommu_id" / cs.Int32ul, "dev_id" / cs.Int32ul,
                               "out_vdevice_id" / cs.Int32ul, "virt_id" / cs.Int64ul),
    "IOAS_CHANGE_PROCESS": cs.Struct("size" / cs.Int32ul, "__reserved" / cs.Int32ul),
    "VEVENTQ_ALLOC": cs.Struct("size" / cs.Int32ul, "flags" / cs.Int32ul, "viommu_id" / cs.Int32ul,
                               "type" / cs.Int32ul, "veventq_depth" / cs.Int32ul, "out_veventq_id" / cs.Int32ul,
                               "out_veventq_fd" / cs.Int32ul, "__reserved" / cs.Int32ul),
    "HW_QUEUE_ALLOC": cs.Struct("size" / cs.Int32ul, "flags" / cs.Int32ul, "viommu_id" / cs.Int32ul,
                                "type" / cs.Int32ul, "index" / cs.Int32ul, "out_hw_queue_id" / cs.Int32ul,
                                "nesting_parent_iova" / cs.Int64ul, "length" / cs.Int64ul),
}
