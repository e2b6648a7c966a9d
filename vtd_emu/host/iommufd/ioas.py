"""IO address spaces (the kernel's ``ioas.c``): the IOAS object and the IOAS_* ioctls, with the kernel's
checks in the kernel's order; the areas themselves live in :mod:`vtd_emu.host.iopt`."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Iterable, NamedTuple

from ..errors import fail
from ..iopt import IOMMU_READ, IOMMU_WRITE, IoPageTable, Pages
from ..process import MemFd
from ..uapi import (IOAS_MAP_FIXED_IOVA, IOAS_MAP_FLAGS, IOAS_MAP_READABLE, IOAS_MAP_WRITEABLE, OPTION_OP_GET,
                    OPTION_OP_SET, PAGE_SIZE, U64_MAX, ULONG_MAX, IovaRange)
from .core import Obj, check_u

if TYPE_CHECKING:
    from .hw_pagetable import HwptPaging
    from .main import IommuFd


class Ioas(Obj):
    kind = "ioas"

    def __init__(self, ictx: "IommuFd") -> None:
        super().__init__(ictx)
        self.iopt = IoPageTable()
        self.hwpts: list[HwptPaging] = []

    def release(self) -> None:
        """``iommufd_ioas_destroy``: the areas go (no domain or access can be left: they held the IOAS)."""
        self.iopt.unmap_all()
        if self.ictx.vfio_compat_ioas is self:
            self.ictx.vfio_compat_ioas = None


class IovaRanges(NamedTuple):
    """``IOMMU_IOAS_IOVA_RANGES``: the usable ranges and the alignment maps must respect."""

    ranges: list[IovaRange]
    alignment: int


def ioas_alloc(ictx: "IommuFd", flags: int) -> int:
    if flags:
        raise fail(errno.EOPNOTSUPP, "IOAS_ALLOC flags")
    return ictx.add_object(Ioas(ictx))


def ioas_iova_ranges(ictx: "IommuFd", ioas_id: int) -> IovaRanges:
    ioas = ictx.get_object(ioas_id, Ioas)
    return IovaRanges(ioas.iopt.iova_ranges(), ioas.iopt.alignment)


def ioas_allow_iovas(ictx: "IommuFd", ioas_id: int, ranges: Iterable[tuple[int, int]]) -> None:
    ioas = ictx.get_object(ioas_id, Ioas)
    new: list[IovaRange] = []
    for start, last in ranges:
        check_u("start", start, 64)
        check_u("last", last, 64)
        if start >= last:
            raise fail(errno.EINVAL, "empty or inverted range")
        if any(r.start <= last and r.last >= start for r in new):
            raise fail(errno.EINVAL, "overlapping ranges")
        new.append(IovaRange(start, last))
    ioas.iopt.set_allowed(new)


def ioas_add_reserved(ictx: "IommuFd", ioas_id: int, start: int, length: int) -> None:
    ioas = ictx.get_object(ioas_id, Ioas)
    ioas.iopt.reserve(start, start + length - 1, None)


def map_prot(flags: int) -> int:
    return (IOMMU_READ if flags & IOAS_MAP_READABLE else 0) | (IOMMU_WRITE if flags & IOAS_MAP_WRITEABLE else 0)


def _map_prologue(ictx: "IommuFd", ioas_id: int, length: int, iova: int | None, flags: int) -> tuple[Ioas, int]:
    """The checks MAP and MAP_FILE share, in the kernel's order; the IOAS and the flags (with FIXED_IOVA
    set when ``iova`` is given)."""
    check_u("length", length, 64)
    if iova is not None:
        check_u("iova", iova, 64)
        flags |= IOAS_MAP_FIXED_IOVA
    if flags & ~IOAS_MAP_FLAGS:
        raise fail(errno.EOPNOTSUPP, "unknown map flags")
    if (iova or 0) >= ULONG_MAX or length >= ULONG_MAX:
        raise fail(errno.EOVERFLOW, "iova or length too large")
    if not flags & (IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE):
        raise fail(errno.EINVAL, "neither readable nor writeable")
    return ictx.get_object(ioas_id, Ioas), flags


def _map_new_pages(ictx: "IommuFd", ioas: Ioas, base: int, start_byte: int, length: int, iova: int | None,
                   flags: int, uptr: int, memfd: MemFd | None = None) -> int:
    npages = (start_byte + length + PAGE_SIZE - 1) // PAGE_SIZE
    pages = Pages(ictx.host.process, base=base, npages=npages, writable=bool(flags & IOAS_MAP_WRITEABLE),
                  memfd=memfd)
    fixed = (iova or 0) if flags & IOAS_MAP_FIXED_IOVA else None
    return ioas.iopt.map_pages([(pages, start_byte, length)], length, fixed, map_prot(flags), uptr)


def ioas_map(ictx: "IommuFd", ioas_id: int, user_va: int, length: int, iova: int | None, flags: int) -> int:
    check_u("flags", flags, 32)
    check_u("user_va", user_va, 64)
    ioas, flags = _map_prologue(ictx, ioas_id, length, iova, flags)
    if length == 0 or length > ULONG_MAX - PAGE_SIZE:
        raise fail(errno.EINVAL, "length is zero")
    if user_va + length > ULONG_MAX:
        raise fail(errno.EOVERFLOW, "user_va + length overflows")
    base = user_va & ~(PAGE_SIZE - 1)
    return _map_new_pages(ictx, ioas, base, user_va - base, length, iova, flags, user_va)


def ioas_map_file(ictx: "IommuFd", ioas_id: int, memfd: MemFd | int, start: int, length: int, iova: int | None,
                  flags: int) -> int:
    check_u("start", start, 64)
    ioas, flags = _map_prologue(ictx, ioas_id, length, iova, flags)
    files = ictx.host.process.files
    f = files.get(memfd) if isinstance(memfd, int) else memfd
    if f is None or (isinstance(f, MemFd) and f.fd not in files):
        raise fail(errno.EBADF, "not an open file descriptor")
    if not isinstance(f, MemFd):
        raise fail(errno.EINVAL, "not a memfd/shmem/hugetlbfs file")
    if length == 0 or start + length > f.size:
        raise fail(errno.EINVAL, "range empty or past the end of the file")
    return _map_new_pages(ictx, ioas, start // PAGE_SIZE, start % PAGE_SIZE, length, iova, flags, start, memfd=f)


def ioas_copy(ictx: "IommuFd", dst_ioas_id: int, dst_iova: int | None, src_ioas_id: int, src_iova: int,
              length: int, flags: int) -> int:
    for name, v in (("src_iova", src_iova), ("length", length), ("flags", flags)):
        check_u(name, v, 64)
    if dst_iova is not None:
        check_u("dst_iova", dst_iova, 64)
        flags |= IOAS_MAP_FIXED_IOVA
    if flags & ~IOAS_MAP_FLAGS:
        raise fail(errno.EOPNOTSUPP, "unknown copy flags")
    if length >= ULONG_MAX or src_iova >= ULONG_MAX or (dst_iova or 0) >= ULONG_MAX:
        raise fail(errno.EOVERFLOW, "value too large")
    if not flags & (IOAS_MAP_READABLE | IOAS_MAP_WRITEABLE):
        raise fail(errno.EINVAL, "neither readable nor writeable")
    src = ictx.get_object(src_ioas_id, Ioas)
    elems = src.iopt.get_pages(src_iova, length)
    dst = ictx.get_object(dst_ioas_id, Ioas)
    fixed = (dst_iova or 0) if flags & IOAS_MAP_FIXED_IOVA else None
    first, sb, _ = elems[0]
    uptr = (first.base * PAGE_SIZE if first.is_file else first.base) + sb
    return dst.iopt.map_pages(elems, length, fixed, map_prot(flags), uptr)


def ioas_unmap(ictx: "IommuFd", ioas_id: int, iova: int, length: int) -> int:
    ioas = ictx.get_object(ioas_id, Ioas)
    check_u("iova", iova, 64)
    check_u("length", length, 64)
    if iova == 0 and length == U64_MAX:
        return ioas.iopt.unmap_all()
    if iova >= ULONG_MAX or length >= ULONG_MAX:
        raise fail(errno.EOVERFLOW, "iova or length too large")
    if not length:
        raise fail(errno.EINVAL, "length is zero")
    if iova + length - 1 > ULONG_MAX:
        raise fail(errno.EOVERFLOW, "iova + length overflows")
    return ioas.iopt.unmap(iova, iova + length - 1)


def ioas_change_process(ictx: "IommuFd") -> None:
    for ioas in ictx.objects_of(Ioas):
        if any(not a.pages.is_file for a in ioas.iopt.areas):
            raise fail(errno.EINVAL, "an IOAS maps user memory")


def ioas_option_huge_pages(ictx: "IommuFd", ioas_id: int, op: int, val64: int) -> int:
    """``iommufd_ioas_option``: IOMMU_OPTION_HUGE_PAGES of one IOAS."""
    ioas = ictx.get_object(ioas_id, Ioas)
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


__all__ = ["Ioas", "IovaRanges", "ioas_alloc", "ioas_iova_ranges", "ioas_allow_iovas", "ioas_add_reserved",
           "ioas_map", "ioas_map_file", "ioas_copy", "ioas_unmap", "ioas_change_process", "ioas_option_huge_pages",
           "map_prot"]
