"""In-kernel users of an IOAS (the ``iommufd_access_*`` part of the kernel's ``device.c``): an emulated
device pins pages, reads and writes through the IOAS, and is told when an area it pinned is unmapped."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable

from ..errors import IommufdError, fail
from ..iopt import IOMMU_READ, IOMMU_WRITE, Area
from ..uapi import PAGE_SIZE, ULONG_MAX
from .core import Obj, check_u
from .ioas import Ioas

if TYPE_CHECKING:
    from .main import IommuFd


class Access(Obj):
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
        self._change_ioas(self.ictx.get_object(ioas_id, Ioas))

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
        check_u("iova", iova, 64)
        check_u("length", length, 64)
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
        check_u("iova", iova, 64)
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
        """``iommufd_access_destroy`` (the creating driver lets go): drop pins and the IOAS, then the
        object."""
        ictx = self.ictx
        if not ictx.is_live(self):
            return
        self._change_ioas(None)
        ictx.remove_object(self)

    def release(self) -> None:
        """``iommufd_access_destroy_object``: what ``destroy`` does when the context goes first."""
        self._change_ioas(None)


def _contig_aligned(area: Area, s: int, final: bool) -> bool:
    if (area.start_byte + s - area.iova) % PAGE_SIZE:
        return False
    if not final and (area.start_byte + area.last - area.iova) % PAGE_SIZE != PAGE_SIZE - 1:
        return False
    return True


def access_create(ictx: "IommuFd", ioas_id: int, needs_pin_pages: bool,
                  on_unmap: Callable[[Access, int, int], None] | None) -> Access:
    """``iommufd_access_create`` + ``iommufd_access_attach``."""
    acc = Access(ictx, needs_pin_pages=needs_pin_pages, on_unmap=on_unmap)
    ictx.add_object(acc)
    try:
        acc._change_ioas(ictx.get_object(ioas_id, Ioas))
    except IommufdError:
        ictx.remove_object(acc)
        raise
    return acc


__all__ = ["Access", "access_create"]
