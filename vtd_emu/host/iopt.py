"""The io_pagetable of an IOAS: areas (IOVA ranges backed by slices of pinned-on-demand pages), reserved
and allowed IOVA ranges, the domains that mirror the areas, and the in-kernel accesses that pin them.

This follows ``drivers/iommu/iommufd/io_pagetable.c`` check by check, because the errno a caller sees
depends on the order of those checks (``iommufd.md`` §2).  Pages are pinned lazily, as in the kernel:
an IOAS without a domain holds no pins; the first domain pins every area, an access pins what it asks.
"""

from __future__ import annotations

import bisect
import errno
from collections import Counter
from typing import TYPE_CHECKING, Iterator, Protocol

from .errors import IommufdError, fail
from .uapi import HPAGE_SIZE, PAGE_SIZE, ULONG_MAX, IovaRange

if TYPE_CHECKING:
    from .process import MemFd, VmmProcess

IOMMU_READ, IOMMU_WRITE = 1, 2


class Domain(Protocol):
    """What the io_pagetable needs from a driver paging domain."""

    pgsize_min: int
    aperture: tuple[int, int]

    def map_pages(self, iova: int, pfns: list[int], prot: int, large_ok: bool) -> None: ...

    def unmap_pages(self, iova: int, length: int) -> None: ...


def _pow2_roundup(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _ffs_bit(x: int) -> int:
    return (x & -x).bit_length() - 1


class Pages:
    """``iopt_pages``: ``npages`` pages of user memory (from page-aligned ``base``) or of a memfd (from
    page index ``base``), pinned page by page with counts; shared by the areas that slice it (copies)."""

    def __init__(self, proc: "VmmProcess", *, base: int, npages: int, writable: bool,
                 memfd: "MemFd | None" = None) -> None:
        self.proc = proc
        self.base = base
        self.npages = npages
        self.writable = writable
        self.memfd = memfd
        self.pfns: dict[int, int] = {}
        self.pin_count: Counter[int] = Counter()

    @property
    def is_file(self) -> bool:
        return self.memfd is not None

    def pin(self, first: int, last: int) -> list[int]:
        """Pin pages ``first..last`` (all or none); their host addresses."""
        done: list[int] = []
        try:
            for i in range(first, last + 1):
                if self.pin_count[i] == 0:
                    self.pfns[i] = self._pin_one(i)
                self.pin_count[i] += 1
                done.append(i)
        except IommufdError:
            self.unpin_indexes(done)
            raise
        return [self.pfns[i] for i in range(first, last + 1)]

    def _pin_one(self, index: int) -> int:
        if self.memfd is not None:
            f = self.memfd
            if (self.base + index) * PAGE_SIZE >= f.size:
                raise fail(errno.EFAULT, "file page past EOF")
            pfn = f.page(self.base + index)
            assert pfn is not None
            return self.proc.pin_pfn(pfn)
        return self.proc.pin_user(self.base + index * PAGE_SIZE, self.writable)

    def unpin(self, first: int, last: int) -> None:
        self.unpin_indexes(range(first, last + 1))

    def unpin_indexes(self, indexes: "list[int] | range") -> None:
        for i in indexes:
            self.pin_count[i] -= 1
            if self.pin_count[i] == 0:
                del self.pin_count[i]
                self.proc.unpin(self.pfns.pop(i))

    def read(self, index: int, off: int, n: int) -> bytes:
        pfn = self.pfns.get(index)
        if pfn is not None:
            return self.proc.ram.read(pfn + off, n)
        if self.memfd is not None:
            page = self.memfd.page(self.base + index, create=False)
            return bytes(n) if page is None else self.proc.ram.read(page + off, n)
        try:
            return self.proc.read(self.base + index * PAGE_SIZE + off, n)
        except ValueError:
            raise fail(errno.EFAULT, "user memory behind the area is gone") from None

    def write(self, index: int, off: int, data: bytes) -> None:
        pfn = self.pfns.get(index)
        if pfn is not None:
            self.proc.ram.write(pfn + off, data)
        elif self.memfd is not None:
            page = self.memfd.page(self.base + index)
            assert page is not None
            self.proc.ram.write(page + off, data)
        else:
            try:
                self.proc.write(self.base + index * PAGE_SIZE + off, data)
            except ValueError:
                raise fail(errno.EFAULT, "user memory behind the area is gone or read-only") from None


class Area:
    """IOVA [iova, iova+length) → bytes [start_byte, start_byte+length) of ``pages``."""

    def __init__(self, iova: int, length: int, pages: Pages, start_byte: int, prot: int) -> None:
        self.iova = iova
        self.length = length
        self.pages = pages
        self.start_byte = start_byte
        self.prot = prot
        self.domain_pinned = False
        self.num_accesses = 0
        self.prevent_access = False

    @property
    def last(self) -> int:
        return self.iova + self.length - 1

    @property
    def page_offset(self) -> int:
        return self.start_byte % PAGE_SIZE

    @property
    def first_index(self) -> int:
        return self.start_byte // PAGE_SIZE

    @property
    def last_index(self) -> int:
        return (self.start_byte + self.length - 1) // PAGE_SIZE

    def index_of(self, iova: int) -> tuple[int, int]:
        """(page index, offset in page) of the byte at ``iova``."""
        b = self.start_byte + iova - self.iova
        return b // PAGE_SIZE, b % PAGE_SIZE

    def __repr__(self) -> str:
        return f"Area({self.iova:#x}+{self.length:#x})"


class Reserved:
    __slots__ = ("start", "last", "owner")

    def __init__(self, start: int, last: int, owner: object) -> None:
        self.start = start
        self.last = last
        self.owner = owner


class IoPageTable:
    """``struct io_pagetable``."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._areas: list[Area] = []
        self.reserved: list[Reserved] = []
        self.allowed: list[IovaRange] = []
        self.domains: list[Domain] = []
        self.accesses: list["AccessLike"] = []
        self.alignment = 1
        self.disable_large_pages = False

    # -- interval helpers --------------------------------------------------------------------------
    @property
    def areas(self) -> list[Area]:
        return list(self._areas)

    def areas_in(self, start: int, last: int) -> Iterator[Area]:
        """Areas intersecting [start, last], in IOVA order (a snapshot)."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._areas[i].last < start:
            i += 1
        out = []
        while i < len(self._areas) and self._areas[i].iova <= last:
            out.append(self._areas[i])
            i += 1
        return iter(out)

    def area_at(self, iova: int) -> Area | None:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0 and self._areas[i].last >= iova:
            return self._areas[i]
        return None

    def _insert(self, area: Area) -> None:
        i = bisect.bisect_left(self._starts, area.iova)
        self._starts.insert(i, area.iova)
        self._areas.insert(i, area)

    def _remove(self, area: Area) -> None:
        i = self._areas.index(area)
        del self._starts[i]
        del self._areas[i]

    def reserved_in(self, start: int, last: int) -> bool:
        return any(r.start <= last and r.last >= start for r in self.reserved)

    def allowed_in(self, start: int, last: int) -> bool:
        return any(a.start <= last and a.last >= start for a in self.allowed)

    # -- mapping -----------------------------------------------------------------------------------
    def _check_iova(self, iova: int, length: int) -> None:
        if iova & (self.alignment - 1):
            raise fail(errno.EINVAL, "iova not aligned to the IOAS alignment")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise fail(errno.EOVERFLOW, "iova + length overflows")
        if self.reserved_in(iova, last):
            raise fail(errno.EINVAL, "range intersects reserved IOVA")
        if next(self.areas_in(iova, last), None) is not None:
            raise fail(errno.EEXIST, "range intersects an existing mapping")

    def _alloc_iova(self, uptr: int, length: int) -> int:
        page_offset = uptr % PAGE_SIZE
        if length == 0 or length >= ULONG_MAX // 2:
            raise fail(errno.EOVERFLOW, "length too large for automatic IOVA")
        align = _pow2_roundup(length)
        if uptr:
            align = min(align, 1 << _ffs_bit(uptr))
        # Transparent huge pages are the largest alignment worth keeping.
        align = min(align, HPAGE_SIZE)
        if align < self.alignment:
            raise fail(errno.EINVAL, "user_va alignment below the IOAS alignment")
        lo, hi = PAGE_SIZE, ULONG_MAX - PAGE_SIZE
        windows = ([(lo, hi)] if not self.allowed else
                   [(max(a.start, lo), min(a.last, hi)) for a in sorted(self.allowed)])
        used = sorted([(r.start, r.last) for r in self.reserved] + [(a.iova, a.last) for a in self._areas])
        for wstart, wlast in windows:
            if wstart > wlast or wlast - wstart < length - 1:
                continue
            start = ((wstart + align - 1) & -align) | page_offset
            if start > wlast or wlast - start < length - 1:
                continue
            wstart = start
            # Holes between used ranges inside [wstart, wlast].
            cursor = wstart
            for ustart, ulast in used + [(wlast + 1, wlast + 1)]:
                if ulast < cursor:
                    continue
                hole_last = min(ustart - 1, wlast)
                if hole_last >= cursor and hole_last - cursor >= length - 1:
                    cand = ((cursor + align - 1) & -align) | page_offset
                    if cand <= hole_last and hole_last - cand >= length - 1:
                        return cand
                cursor = max(cursor, ulast + 1)
                if cursor > wlast:
                    break
        raise fail(errno.ENOSPC, "no free IOVA range of that size")

    def map_pages(self, elems: list[tuple[Pages, int, int]], length: int, iova: int | None, prot: int,
                  uptr: int) -> int:
        """iopt_map_pages(): insert one area per (pages, start_byte, length) element at ``iova`` (or an
        automatic IOVA, guessed from ``uptr``), then fill every domain.  On failure nothing stays."""
        if length & (self.alignment - 1) or not length:
            raise fail(errno.EINVAL, "length is zero or not a multiple of the IOAS alignment")
        if iova is None:
            iova = self._alloc_iova(uptr, length)
        else:
            self._check_iova(iova, length)
        inserted: list[Area] = []
        try:
            cur = iova
            for pages, start_byte, elen in elems:
                if prot & IOMMU_WRITE and not pages.writable:
                    raise fail(errno.EPERM, "writeable mapping of read-only pages")
                if (start_byte % PAGE_SIZE) & (self.alignment - 1):
                    raise fail(errno.EINVAL, "page offset not aligned to the IOAS alignment")
                if cur + elen - 1 > ULONG_MAX:
                    raise fail(errno.EOVERFLOW, "area overflows")
                area = Area(cur, elen, pages, start_byte, prot)
                self._insert(area)
                inserted.append(area)
                cur += elen
            for n, area in enumerate(inserted):
                try:
                    self._fill_area(area)
                except IommufdError:
                    for a in inserted[:n]:
                        self._unfill_area(a)
                    raise
        except IommufdError:
            for a in inserted:
                self._remove(a)
            raise
        return iova

    def _fill_area(self, area: Area) -> None:
        """Pin the area and map it into every domain (nothing when the IOAS has none)."""
        if not self.domains:
            return
        pfns = area.pages.pin(area.first_index, area.last_index)
        done: list[Domain] = []
        try:
            for d in self.domains:
                d.map_pages(area.iova, pfns, area.prot, not self.disable_large_pages)
                done.append(d)
        except IommufdError:
            for d in done:
                d.unmap_pages(area.iova, area.length)
            area.pages.unpin(area.first_index, area.last_index)
            raise
        area.domain_pinned = True

    def _unfill_area(self, area: Area) -> None:
        if not area.domain_pinned:
            return
        for d in self.domains:
            d.unmap_pages(area.iova, area.length)
        area.pages.unpin(area.first_index, area.last_index)
        area.domain_pinned = False

    def unmap(self, start: int, last: int) -> int:
        """iopt_unmap_iova_range(): bytes unmapped; areas before a failing one stay unmapped."""
        unmapped = 0
        while True:
            area = next(self.areas_in(start, last), None)
            if area is None:
                break
            if area.iova < start or area.last > last:
                raise fail(errno.ENOENT, "an area is only partly inside the range")
            if area.num_accesses:
                area.prevent_access = True
                for acc in list(self.accesses):
                    acc.notify_unmap(area.iova, area.length)
                area.prevent_access = False
                if area.num_accesses:
                    raise fail(errno.EDEADLOCK, "an access does not release its pins")
                continue
            self._unfill_area(area)
            self._remove(area)
            unmapped += area.length
        if not unmapped:
            raise fail(errno.ENOENT, "nothing mapped in the range")
        return unmapped

    def unmap_all(self) -> int:
        try:
            return self.unmap(0, ULONG_MAX)
        except IommufdError as e:
            if e.errno == errno.ENOENT:
                return 0
            raise

    def get_pages(self, iova: int, length: int) -> list[tuple[Pages, int, int]]:
        """iopt_get_pages(): the (pages, start_byte, length) slices behind [iova, iova+length), which must be
        covered by contiguous areas."""
        if not length:
            raise fail(errno.EINVAL, "length is zero")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise fail(errno.EOVERFLOW, "iova + length overflows")
        out: list[tuple[Pages, int, int]] = []
        cur = iova
        area = self.area_at(cur)
        while area is not None:
            end = min(last, area.last)
            out.append((area.pages, area.start_byte + cur - area.iova, end - cur + 1))
            if end == last:
                return out
            cur = end + 1
            area = self.area_at(cur)
            if area is not None and area.iova != cur:
                area = None
        raise fail(errno.ENOENT, "range not fully covered by contiguous areas")

    # -- reserved / allowed ------------------------------------------------------------------------
    def reserve(self, start: int, last: int, owner: object) -> None:
        if next(self.areas_in(start, last), None) is not None or self.allowed_in(start, last):
            raise fail(errno.EADDRINUSE, f"[{start:#x}, {last:#x}] is mapped or allowed")
        self.reserved.append(Reserved(start, last, owner))

    def remove_reserved(self, owner: object) -> None:
        self.reserved = [r for r in self.reserved if r.owner is not owner]

    def set_allowed(self, ranges: list[IovaRange]) -> None:
        for r in ranges:
            if self.reserved_in(r.start, r.last):
                raise fail(errno.EADDRINUSE, f"allowed range [{r.start:#x}, {r.last:#x}] is reserved")
        self.allowed = sorted(ranges)

    def iova_ranges(self) -> list[IovaRange]:
        """Holes of the reserved ranges over [0, ULONG_MAX]."""
        out: list[IovaRange] = []
        cursor = 0
        for s, l in sorted((r.start, r.last) for r in self.reserved):
            if s > cursor:
                out.append(IovaRange(cursor, s - 1))
            cursor = max(cursor, l + 1)
            if cursor > ULONG_MAX:
                return out
        out.append(IovaRange(cursor, ULONG_MAX))
        return out

    # -- domains -----------------------------------------------------------------------------------
    def _check_alignment(self, new: int) -> None:
        mask = new - 1
        for a in self._areas:
            if a.iova & mask or a.length & mask or a.page_offset & mask:
                raise fail(errno.EADDRINUSE, f"{a} is not aligned to {new:#x}")

    def add_domain(self, domain: Domain) -> None:
        """iopt_table_add_domain(): enforce the domain's page size and aperture, then fill it."""
        new_align = max(domain.pgsize_min, self.alignment)
        if new_align > PAGE_SIZE:
            raise fail(errno.EINVAL, "domain page size larger than PAGE_SIZE")
        if new_align != self.alignment:
            self._check_alignment(new_align)
        start, end = domain.aperture
        try:
            if start != 0:
                self.reserve(0, start - 1, domain)
            if end != ULONG_MAX:
                self.reserve(end + 1, ULONG_MAX, domain)
            filled: list[Area] = []
            try:
                for area in self._areas:
                    if area.domain_pinned:
                        pfns = [area.pages.pfns[i] for i in range(area.first_index, area.last_index + 1)]
                        domain.map_pages(area.iova, pfns, area.prot, not self.disable_large_pages)
                    else:
                        pfns = area.pages.pin(area.first_index, area.last_index)
                        try:
                            domain.map_pages(area.iova, pfns, area.prot, not self.disable_large_pages)
                        except IommufdError:
                            area.pages.unpin(area.first_index, area.last_index)
                            raise
                    filled.append(area)
            except IommufdError:
                for area in filled:
                    domain.unmap_pages(area.iova, area.length)
                    if not self.domains:
                        area.pages.unpin(area.first_index, area.last_index)
                raise
        except IommufdError:
            self.remove_reserved(domain)
            raise
        if not self.domains:
            for area in self._areas:
                area.domain_pinned = True
        self.alignment = new_align
        self.domains.append(domain)

    def remove_domain(self, domain: Domain) -> None:
        self.domains.remove(domain)
        for area in self._areas:
            domain.unmap_pages(area.iova, area.length)
            if not self.domains and area.domain_pinned:
                area.pages.unpin(area.first_index, area.last_index)
                area.domain_pinned = False
        self.remove_reserved(domain)
        self.recalc_alignment(check=False)

    def recalc_alignment(self, check: bool = True) -> None:
        new = PAGE_SIZE if self.disable_large_pages else 1
        for d in self.domains:
            new = max(new, d.pgsize_min)
        for acc in self.accesses:
            new = max(new, acc.iova_alignment)
        if check and new > self.alignment:
            self._check_alignment(new)
        self.alignment = new

    def set_large_pages(self, enable: bool) -> None:
        """IOMMU_OPTION_HUGE_PAGES: disabling needs no domain holding mappings, and aligned areas."""
        if enable:
            self.disable_large_pages = False
            self.recalc_alignment(check=False)
            return
        if self.disable_large_pages:
            return
        if self.domains and self._areas:
            raise fail(errno.EINVAL, "domains already hold mappings")
        self.disable_large_pages = True
        try:
            self.recalc_alignment()
        except IommufdError:
            self.disable_large_pages = False
            raise

    # -- accesses ----------------------------------------------------------------------------------
    def add_access(self, access: "AccessLike") -> None:
        self.accesses.append(access)
        try:
            self.recalc_alignment()
        except IommufdError:
            self.accesses.remove(access)
            raise

    def remove_access(self, access: "AccessLike") -> None:
        self.accesses.remove(access)
        self.recalc_alignment(check=False)

    def contig_run(self, iova: int, last: int) -> list[tuple[Area, int, int]]:
        """(area, first iova, last iova) slices of the contiguous run of areas starting at ``iova``, up
        to ``last``; callers check that the run reached ``last`` (``iopt_area_contig_done``)."""
        out: list[tuple[Area, int, int]] = []
        cur = iova
        area = self.area_at(cur)
        while area is not None:
            end = min(last, area.last)
            out.append((area, cur, end))
            if end == last:
                break
            cur = end + 1
            nxt = self.area_at(cur)
            area = nxt if nxt is not None and nxt.iova == cur else None
        return out


class AccessLike(Protocol):
    iova_alignment: int

    def notify_unmap(self, iova: int, length: int) -> None: ...


__all__ = ["IoPageTable", "Area", "Pages", "Domain", "IOMMU_READ", "IOMMU_WRITE", "HPAGE_SIZE"]
