"""Page allocation for the builders: zeroed 4 KiB pages handed out from a window of a memory."""

from __future__ import annotations

from vtd_emu.errors import VtdEmuError

from ._common import _PAGE_MASK, PAGE_4K, _Mem, _store


class AllocatorExhausted(VtdEmuError, ValueError):
    """A :class:`PageAllocator` has no room left below its limit."""



class PageAllocator:
    """Hands out zeroed, 4 KiB-aligned pages from [base, limit) of a memory.

    The memory is anything with ``read_u64/write_u64/read/write`` (a :class:`~vtd_emu.memory.HostRAM`, a
    :class:`GuestPhysView`, ...).  ``limit`` defaults to the memory's ``size`` when it has one.
    """

    def __init__(self, mem: _Mem, base: int = 0x100000, limit: int | None = None) -> None:
        if base < 0 or base & _PAGE_MASK:
            raise ValueError(f"allocator base {base:#x} is not 4 KiB-aligned")
        if limit is None:
            limit = getattr(mem, "size", 1 << 64)
        if limit < base:
            raise ValueError(f"allocator limit {limit:#x} is below its base {base:#x}")
        self.mem = mem
        self.base = base
        self.limit = limit
        self.next = base

    def alloc(self, pages: int = 1, align: int = PAGE_4K) -> int:
        """Address of ``pages`` fresh zeroed pages aligned to ``align`` (a power of two ≥ 4 KiB)."""
        if pages < 1:
            raise ValueError(f"cannot allocate {pages} pages")
        if align < PAGE_4K or align & (align - 1):
            raise ValueError(f"alignment {align:#x} is not a power of two >= 4 KiB")
        addr = (self.next + align - 1) & -align
        end = addr + pages * PAGE_4K
        if end > self.limit:
            raise AllocatorExhausted(
                f"cannot allocate {pages} page(s) at {addr:#x}: limit {self.limit:#x} reached"
            )
        # Zero-fill explicitly: the memory may hold a loaded image, or be a view onto pages in use.
        for page in range(addr, end, PAGE_4K):
            _store(self.mem, page, 0, PAGE_4K)
        self.next = end
        return addr

