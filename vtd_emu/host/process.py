"""Host memory as the host layer sees it: a page allocator over :class:`~vtd_emu.memory.HostRAM` and the
VMM process, whose user virtual addresses are backed by host pages.

Anonymous memory is populated on first touch (a read of an untouched page sees zeros without allocating,
like the kernel's zero page); ``huge=True`` mappings are populated at once with 2 MiB-aligned, physically
contiguous pages (``MAP_HUGETLB | MAP_POPULATE``), so IOMMU domains can use 2 MiB leaves for them.
A host page lives while something references it: a VMM page-table entry, a memfd, or a pin.  Pins are
what ``ioas_map`` takes (lazily, when a domain needs the pages) and what ``close()`` must give back.
"""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass

from ..memory import HostRAM
from .errors import fail
from .uapi import HPAGE_SIZE, PAGE_SIZE

_PAGE_MASK = PAGE_SIZE - 1


class PagePool:
    """Zeroed 4 KiB host pages from [base, limit); freed single pages are reused (and zeroed again)."""

    def __init__(self, ram: HostRAM, base: int, limit: int, name: str) -> None:
        self.ram = ram
        self.base = base
        self.limit = limit
        self.name = name
        self.next = base
        self.free_list: list[int] = []
        self.in_use = 0

    def alloc(self, pages: int = 1, align: int = PAGE_SIZE) -> int:
        """``pages`` contiguous zeroed pages aligned to ``align`` (the builders' allocator protocol)."""
        if pages == 1 and align == PAGE_SIZE and self.free_list:
            addr = self.free_list.pop()
            # A reused page still holds what its last owner wrote.
            self.ram.write(addr, bytes(PAGE_SIZE))
            self.in_use += 1
            return addr
        addr = (self.next + align - 1) & -align
        end = addr + pages * PAGE_SIZE
        if end > self.limit:
            raise fail(errno.ENOMEM, f"{self.name} pool exhausted")
        # Pages never handed out before were never written: HostRAM reads them as zeros already.
        for skipped in range(self.next, addr, PAGE_SIZE):
            self.free_list.append(skipped)
        self.next = end
        self.in_use += pages
        return addr

    def free(self, addr: int, pages: int = 1) -> None:
        for p in range(pages):
            self.free_list.append(addr + p * PAGE_SIZE)
        self.in_use -= pages

    def owns(self, addr: int) -> bool:
        return self.base <= addr < self.limit


@dataclass
class Vma:
    """One VMM mapping: anonymous (``memfd`` None) or a shared mapping of a memfd at ``offset``."""

    start: int
    length: int
    writable: bool
    huge: bool = False
    memfd: "MemFd | None" = None
    offset: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


class MemFd:
    """An anonymous file (``memfd_create``): pages allocated on first touch, ``truncate`` frees the tail
    (pages still pinned stay alive through their pins, as in the kernel)."""

    def __init__(self, proc: "VmmProcess", fd: int, size: int) -> None:
        self.proc = proc
        self.fd = fd
        self.size = size
        self.pages: dict[int, int] = {}

    def page(self, index: int, *, create: bool = True) -> int | None:
        pfn = self.pages.get(index)
        if pfn is None and create:
            pfn = self.proc._new_page()
            self.pages[index] = pfn
        return pfn

    def truncate(self, size: int) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        keep = (size + _PAGE_MASK) // PAGE_SIZE
        for index in [i for i in self.pages if i >= keep]:
            self.proc._put_page(self.pages.pop(index))
        if size % PAGE_SIZE and (size // PAGE_SIZE) in self.pages:
            # The bytes past EOF in the last page read as zeros afterwards.
            pfn = self.pages[size // PAGE_SIZE]
            self.proc.ram.write(pfn + size % PAGE_SIZE, bytes(PAGE_SIZE - size % PAGE_SIZE))
        self.size = size

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset:#x} is past the end of the memfd")
        self.proc._copy_in(lambda i: self.page(i), offset, data)

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"read of {n} bytes at {offset:#x} is past the end of the memfd")
        return self.proc._copy_out(lambda i: self.page(i, create=False), offset, n)

    def close(self) -> None:
        """Drop the file's own references (mappings and pins keep their pages)."""
        for pfn in self.pages.values():
            self.proc._put_page(pfn)
        self.pages.clear()
        self.proc.files.pop(self.fd, None)


class VmmProcess:
    """The one host process (the VMM): its user address space, backed by pages of ``pool``."""

    def __init__(self, ram: HostRAM, pool: PagePool, va_base: int = 0x7F00_0000_0000) -> None:
        self.ram = ram
        self.pool = pool
        self.vmas: dict[int, Vma] = {}
        self.ptes: dict[int, int] = {}
        """Anonymous pages: virtual page number -> host address of the page."""
        self.refs: Counter[int] = Counter()
        self.pins: Counter[int] = Counter()
        self.files: dict[int, object] = {}
        """The process's file descriptors: memfds and iommufd event files, by number."""
        self._next_va = va_base
        self._next_fd = 3

    # -- page lifetime -----------------------------------------------------------------------------
    def _new_page(self) -> int:
        pfn = self.pool.alloc()
        self.refs[pfn] = 1
        return pfn

    def _put_page(self, pfn: int) -> None:
        self.refs[pfn] -= 1
        if self.refs[pfn] <= 0:
            del self.refs[pfn]
            self.pool.free(pfn)

    # -- mappings ----------------------------------------------------------------------------------
    def _reserve_va(self, length: int, align: int) -> int:
        va = (self._next_va + align - 1) & -align
        # A guard page after every mapping: two mappings are never virtually contiguous.
        self._next_va = va + length + PAGE_SIZE
        return va

    def mmap(self, length: int, *, writable: bool = True, huge: bool = False) -> int:
        """Map ``length`` bytes of zero-filled anonymous memory; returns the user VA."""
        if length <= 0:
            raise ValueError("length must be positive")
        align = HPAGE_SIZE if huge else PAGE_SIZE
        length = (length + align - 1) & -align
        va = self._reserve_va(length, align)
        self.vmas[va] = Vma(va, length, writable, huge)
        if huge:
            # Populated at once, physically contiguous per 2 MiB (what hugetlbfs gives).
            for chunk in range(0, length, HPAGE_SIZE):
                base = self.pool.alloc(HPAGE_SIZE // PAGE_SIZE, HPAGE_SIZE)
                for off in range(0, HPAGE_SIZE, PAGE_SIZE):
                    self.ptes[(va + chunk + off) >> 12] = base + off
                    self.refs[base + off] = 1
        return va

    def mmap_file(self, memfd: MemFd, offset: int, length: int, *, writable: bool = True) -> int:
        """Map ``length`` bytes of ``memfd`` from ``offset`` (shared: writes reach the file)."""
        if offset % PAGE_SIZE or length <= 0:
            raise ValueError("offset must be page-aligned and length positive")
        length = (length + _PAGE_MASK) & ~_PAGE_MASK
        va = self._reserve_va(length, PAGE_SIZE)
        self.vmas[va] = Vma(va, length, writable, False, memfd, offset)
        return va

    def munmap(self, va: int, length: int) -> None:
        """Unmap whole mappings in [va, va+length) (partial unmaps are not modelled)."""
        end = va + length
        for start in [s for s, v in self.vmas.items() if v.start >= va and v.end <= end]:
            v = self.vmas.pop(start)
            if v.memfd is None:
                for vpn in range(v.start >> 12, v.end >> 12):
                    pfn = self.ptes.pop(vpn, None)
                    if pfn is not None:
                        self._put_page(pfn)

    def alloc_fd(self, obj: object) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self.files[fd] = obj
        return fd

    def memfd_create(self, size: int) -> MemFd:
        f = MemFd(self, 0, size)
        f.fd = self.alloc_fd(f)
        return f

    def vma_at(self, va: int) -> Vma | None:
        for v in self.vmas.values():
            if v.start <= va < v.end:
                return v
        return None

    # -- page lookup -------------------------------------------------------------------------------
    def _page(self, va: int, *, create: bool) -> int | None:
        """Host address of the page behind ``va`` (faulting it in if ``create``); None if untouched."""
        v = self.vma_at(va)
        if v is None:
            raise ValueError(f"user VA {va:#x} is not mapped")
        if v.memfd is not None:
            index = (v.offset + va - v.start) >> 12
            if index * PAGE_SIZE >= v.memfd.size:
                raise ValueError(f"user VA {va:#x} is past the end of its file (SIGBUS)")
            return v.memfd.page(index, create=create)
        vpn = va >> 12
        pfn = self.ptes.get(vpn)
        if pfn is None and create:
            pfn = self._new_page()
            self.ptes[vpn] = pfn
        return pfn

    def _copy_in(self, page_of: "object", start: int, data: bytes) -> None:
        mv = memoryview(bytes(data))
        pos = 0
        while pos < len(mv):
            a = start + pos
            n = min(PAGE_SIZE - (a & _PAGE_MASK), len(mv) - pos)
            pfn = page_of(a >> 12)  # type: ignore[operator]
            self.ram.write(pfn + (a & _PAGE_MASK), mv[pos:pos + n])
            pos += n

    def _copy_out(self, page_of: "object", start: int, n: int) -> bytes:
        out = bytearray(n)
        pos = 0
        while pos < n:
            a = start + pos
            k = min(PAGE_SIZE - (a & _PAGE_MASK), n - pos)
            pfn = page_of(a >> 12)  # type: ignore[operator]
            if pfn is not None:
                out[pos:pos + k] = self.ram.read(pfn + (a & _PAGE_MASK), k)
            pos += k
        return bytes(out)

    def write(self, va: int, data: bytes) -> None:
        """A CPU store by the VMM (its own memory: a scenario error, not an errno, if it is not mapped
        writable)."""
        pos = 0
        while pos < len(data):
            a = va + pos
            v = self.vma_at(a)
            if v is None or not v.writable:
                raise ValueError(f"user VA {a:#x} is not mapped writable")
            n = min(PAGE_SIZE - (a & _PAGE_MASK), len(data) - pos)
            pfn = self._page(a, create=True)
            assert pfn is not None
            self.ram.write(pfn + (a & _PAGE_MASK), data[pos:pos + n])
            pos += n

    def read(self, va: int, n: int) -> bytes:
        return self._copy_out(lambda vpn: self._page(vpn << 12, create=False), va, n)

    # -- pinning (what ioas_map and accesses do) ---------------------------------------------------
    def pin_user(self, va: int, write: bool) -> int:
        """pin_user_pages() of one page: EFAULT if not mapped, EPERM for a write pin of read-only memory."""
        v = self.vma_at(va)
        if v is None:
            raise fail(errno.EFAULT, f"user VA {va:#x} is not mapped")
        if write and not v.writable:
            raise fail(errno.EPERM, f"user VA {va:#x} is read-only")
        try:
            pfn = self._page(va, create=True)
        except ValueError as exc:
            raise fail(errno.EFAULT, str(exc)) from None
        assert pfn is not None
        return self.pin_pfn(pfn)

    def pin_pfn(self, pfn: int) -> int:
        self.refs[pfn] += 1
        self.pins[pfn] += 1
        return pfn

    def unpin(self, pfn: int) -> None:
        self.pins[pfn] -= 1
        if self.pins[pfn] <= 0:
            del self.pins[pfn]
        self._put_page(pfn)

    @property
    def pinned_pages(self) -> int:
        """Pins held on host pages, counted once per pin (the kernel's VmPin, in pages)."""
        return sum(self.pins.values())

    def pin_counts(self, va: int, length: int) -> list[int]:
        """Pins on each page behind [va, va+length) (the selftest's MD_CHECK_REFS)."""
        out = []
        for page in range(va & ~_PAGE_MASK, va + length, PAGE_SIZE):
            try:
                pfn = self._page(page, create=False)
            except ValueError:
                pfn = None
            out.append(self.pins.get(pfn, 0) if pfn is not None else 0)
        return out

