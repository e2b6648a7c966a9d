"""Host-physical memory: sparse, page-granular, 64-bit addressed.

Pages live as rows of one growable ``numpy`` array of 512 u64 each, so the scalar path indexes a flat
``memoryview`` (a few tens of ns per access) and batched replay gathers whole columns of entries with
numpy.  A page exists only once it is written: reads of never-written memory return zeros and cost no
memory.

Addresses at or above ``size`` are not memory.  :meth:`HostRAM.read_u64` returns :data:`NO_MEMORY` (-1)
for them instead of raising, because an unreadable table is an architectural result (a fault) for the
IOMMU, not an error.
"""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import BinaryIO, Callable, Iterator, Protocol

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
NO_MEMORY = -1
"""Returned by ``read_u64`` for an address that is not backed by memory."""

_U64_PER_PAGE = PAGE_SIZE // 8
_ADDR_LIMIT = 1 << 64


class Memory(Protocol):
    """What every model reads and writes memory through (host RAM or a guest's view of it)."""

    def read_u64(self, addr: int) -> int: ...

    def write_u64(self, addr: int, value: int) -> bool: ...

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> int: ...

    def is_ram(self, addr: int) -> bool: ...


class ReadOnlyView:
    """A memory view that reads through to ``mem`` and drops writes (for side-effect-free inspection
    walks: A/D updates and status writes happen nowhere).  Writes report success, as they would have on
    the memory below, so the walk takes the same path it takes for real."""

    __slots__ = ("read_u64", "read", "is_ram")

    def __init__(self, mem: Memory) -> None:
        self.read_u64 = mem.read_u64
        self.read = mem.read
        self.is_ram = mem.is_ram

    def write_u64(self, addr: int, value: int) -> bool:
        return True

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> int:
        return len(data)


class HostRAM:
    """Sparse little-endian memory of ``size`` bytes (default: the whole 64-bit space)."""

    __slots__ = ("size", "_rows", "_pool", "_q", "_b", "_used", "generation", "watch")

    def __init__(self, size: int | None = None, *, initial_pages: int = 64) -> None:
        """``size`` is 1..2**64 bytes (None: 2**64); anything else raises ValueError, since no memory can
        have it (callers taking a size from a user validate it first and report it their way)."""
        if size is None:
            size = _ADDR_LIMIT
        if size <= 0 or size > _ADDR_LIMIT:
            raise ValueError(f"HostRAM size must be in 1..2**64, got {size:#x}")
        self.size = size
        self._rows: dict[int, int] = {}
        self._used = 0
        self._pool = np.zeros((max(1, initial_pages), _U64_PER_PAGE), dtype=np.uint64)
        self._q: memoryview = self._pool.reshape(-1).data.cast("B").cast("Q")
        self._b: memoryview = self._pool.reshape(-1).data.cast("B")
        # Bumped on every write: lets batched readers know when their snapshot of memory is stale.
        self.generation = 0
        # When a list, every write appends (address, previous bytes) first: how callers see exactly what
        # a DMA or an invalidation-wait status write changed.
        self.watch: list[tuple[int, bytes]] | None = None

    # -- page management -------------------------------------------------------------------------
    def _row_for_write(self, pfn: int) -> int:
        row = self._rows.get(pfn)
        if row is None:
            row = self._used
            if row == self._pool.shape[0]:
                self._grow()
            self._rows[pfn] = row
            self._used = row + 1
        return row

    def _grow(self) -> None:
        old = self._pool
        new = np.zeros((old.shape[0] * 2, _U64_PER_PAGE), dtype=np.uint64)
        new[: old.shape[0]] = old
        self._q.release()
        self._b.release()
        self._pool = new
        flat = new.reshape(-1).data.cast("B")
        self._b = flat
        self._q = flat.cast("Q")

    @property
    def pages_used(self) -> int:
        """How many 4 KiB pages have been written (what the memory footprint is proportional to)."""
        return self._used

    def is_ram(self, addr: int) -> bool:
        return 0 <= addr < self.size

    def pages(self) -> Iterator[int]:
        """Page frame numbers of every page written so far, in ascending order."""
        return iter(sorted(self._rows))

    # -- scalar access ---------------------------------------------------------------------------
    def qword_rows(self) -> tuple[Callable[[int], int | None], memoryview]:
        """(pfn → row ``get``, the pool as u64s): the walkers' inlined ``read_u64`` of an aligned address
        ``a`` is ``q[(row << 9) | ((a >> 3) & 511)]`` when ``row = get(a >> 12)`` is not None (otherwise
        they call ``read_u64``).  Valid until a page is added: take it again after any write to a page
        never written before."""
        return self._rows.get, self._q

    def read_u64(self, addr: int) -> int:
        """The little-endian u64 at ``addr``, 0 if never written, :data:`NO_MEMORY` if not memory."""
        if addr & 7 == 0:
            row = self._rows.get(addr >> PAGE_SHIFT)
            if row is not None:
                return self._q[(row << 9) | ((addr >> 3) & 511)]
            return 0 if 0 <= addr and addr + 8 <= self.size else NO_MEMORY
        if addr < 0 or addr + 8 > self.size:
            return NO_MEMORY
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u64(self, addr: int, value: int) -> bool:
        """Store ``value`` (taken modulo 2**64); False, and nothing stored, if ``addr`` is not memory."""
        if addr < 0 or addr + 8 > self.size:
            return False
        self.generation += 1
        if self.watch is not None:
            self.watch.append((addr, self.read(addr, 8)))
        if addr & 7 == 0:
            row = self._row_for_write(addr >> PAGE_SHIFT)
            self._q[(row << 9) | ((addr >> 3) & 511)] = value & 0xFFFF_FFFF_FFFF_FFFF
            return True
        self.write(addr, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))
        return True

    def read(self, addr: int, length: int) -> bytes:
        """``length`` bytes from ``addr``; bytes that are not memory read as zero."""
        if length <= 0:
            return b""
        out = bytearray(length)
        pos = 0
        rows = self._rows
        b = self._b
        size = self.size
        while pos < length:
            a = addr + pos
            off = a & PAGE_MASK
            n = min(PAGE_SIZE - off, length - pos)
            if 0 <= a < size:
                n = min(n, size - a)
                row = rows.get(a >> PAGE_SHIFT)
                if row is not None:
                    base = (row << PAGE_SHIFT) | off
                    out[pos : pos + n] = b[base : base + n]
            pos += n
        return bytes(out)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> int:
        """Store ``data`` at ``addr``; bytes that fall outside memory are dropped.  Returns bytes stored."""
        length = len(data)
        if length == 0:
            return 0
        self.generation += 1
        if self.watch is not None:
            self.watch.append((addr, self.read(addr, length)))
        mv = memoryview(data).cast("B")
        stored = 0
        pos = 0
        size = self.size
        while pos < length:
            a = addr + pos
            off = a & PAGE_MASK
            n = min(PAGE_SIZE - off, length - pos)
            if 0 <= a < size:
                n = min(n, size - a)
                row = self._row_for_write(a >> PAGE_SHIFT)
                base = (row << PAGE_SHIFT) | off
                self._b[base : base + n] = mv[pos : pos + n]
                stored += n
            pos += n
        return stored

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        self.write(addr, bytes([byte]) * length)

    # -- batched access --------------------------------------------------------------------------
    # Zero-copy accessors for vectorised readers (the batch engine): page ``pfn`` is row
    # ``page_rows()[pfn]`` of ``u64_pool()``.  Rows are handed out in the insertion order of
    # ``page_rows()`` and never move, but the pool array is replaced when it grows: take it again after
    # anything that may have added a page.
    def page_rows(self) -> MappingProxyType[int, int]:
        """pfn → row of every page written so far (a live read-only view, in the order rows were given)."""
        return MappingProxyType(self._rows)

    def u64_pool(self) -> np.ndarray:
        """The page rows, shape (rows, 512), dtype uint64 (a view: writes go to memory; rows past
        ``pages_used`` are spare)."""
        return self._pool

    def ensure_page(self, pfn: int) -> int:
        """The row of page ``pfn``, giving it one (zero-filled) if it was never written."""
        return self._row_for_write(pfn)

    def page_array(self, pfn: int) -> np.ndarray | None:
        """The u64 row of page ``pfn`` (a view, writes go to memory), or None if never written."""
        row = self._rows.get(pfn)
        return None if row is None else self._pool[row]

    def load_image(self, data: bytes | memoryview, base: int = 0) -> None:
        """Copy a raw image in at ``base``, skipping all-zero pages so a sparse image stays sparse."""
        mv = memoryview(data).cast("B")
        pages = len(mv) // PAGE_SIZE
        if pages:
            arr = np.frombuffer(mv, dtype=np.uint64, count=pages * (PAGE_SIZE // 8)).reshape(pages, -1)
            for i in np.nonzero(arr.any(axis=1))[0].tolist():
                self.write(base + i * PAGE_SIZE, mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
        tail = mv[pages * PAGE_SIZE:]
        if any(tail):
            self.write(base + pages * PAGE_SIZE, tail)

    def save(self, path: str | os.PathLike[str], *, base: int = 0, length: int | None = None,
             compress: bool | None = None, level: int = 19) -> int:
        """Write memory ``[base, base + length)`` as a RAM image that :func:`vtd_emu.ramimage.load_ram_image`
        reads back at ``base``: raw (byte offset = address - ``base``, never-written pages left as holes of
        a sparse file) or, with ``compress`` (default: the name ends in ``.zst``), one zstd frame with its
        content size and checksum.  ``length`` defaults to the end of the highest page written.  The file
        appears only once it is complete.  Returns the image's length in bytes."""
        from .outfile import replacing

        if not 0 <= base < self.size:
            raise ValueError(f"base {base:#x} is not memory (size {self.size:#x})")
        if length is None:
            top = max(self._rows, default=-1)
            length = max(0, ((top + 1) << PAGE_SHIFT) - base)
        if length < 0 or base + length > self.size:
            raise ValueError(f"length {length:#x} from {base:#x} goes beyond memory (size {self.size:#x})")
        target = os.fspath(path)
        if compress is None:
            compress = target.endswith(".zst")
        # Pages holding any byte of the range, in address order; bytes between them are zeros.
        first, last = base >> PAGE_SHIFT, (base + length - 1) >> PAGE_SHIFT
        pfns = [p for p in sorted(self._rows) if first <= p <= last] if length else []
        with replacing(target) as tmp, open(tmp, "wb") as fh:
            if compress:
                import zstandard

                cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
                with cctx.stream_writer(fh, size=length, closefd=False) as zw:
                    self._write_image(zw.write, base, length, pfns, sparse=None)
            else:
                self._write_image(fh.write, base, length, pfns, sparse=fh)
                fh.truncate(length)
        return length

    def _write_image(self, write: Callable[[bytes], object], base: int, length: int, pfns: list[int],
                     sparse: BinaryIO | None) -> None:
        """Bytes ``[base, base + length)`` in order; with ``sparse`` (a seekable raw file) zero runs are
        skipped by seeking instead of written."""
        zeros = bytes(1 << 20)

        def fill(gap: int) -> None:
            while gap > 0:
                n = min(gap, len(zeros))
                write(zeros[:n])
                gap -= n

        pos = base
        end = base + length
        for pfn in pfns:
            start = max(pfn << PAGE_SHIFT, base)
            if sparse is not None:
                sparse.seek(start - base)
            else:
                fill(start - pos)
            stop = min((pfn + 1) << PAGE_SHIFT, end)
            write(self.read(start, stop - start))
            pos = stop
        if sparse is None:
            fill(end - pos)

# -- views: one address space seen through another ------------------------------------------------------


class _Backing(Protocol):
    """The memory under a view: :class:`Memory` without ``is_ram`` (recorders of writes may lack it)."""

    def read_u64(self, addr: int) -> int: ...

    def write_u64(self, addr: int, value: int) -> bool: ...

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> int: ...


class SecondStageMap(Protocol):
    """What a guest-physical view needs of a second-stage table: where a GPA goes (``lookup`` of the
    builders' :class:`~vtd_emu.tables.SecondStageTable` gives ``(address, page size, perms)``)."""

    def lookup(self, iova: int) -> tuple[int, int, int] | None: ...


class GuestPhysView:
    """Guest-physical memory seen through a second-stage table: each GPA reaches the host address the
    table maps it to.

    A GPA the table does not map is not memory, exactly as an address beyond :class:`HostRAM` is:
    ``read_u64`` returns :data:`NO_MEMORY`, ``read`` gives zeros there, writes are dropped (``write_u64``
    returns False, ``write`` counts only the bytes stored).  So a vIOMMU walking guest tables through the
    view meets the architectural read error, never an exception.  Build nested first-stage tables with
    it::

        gview = GuestPhysView(ram, ss)
        fs = FirstStageTable(gview, PageAllocator(gview, base=gpa_base))   # all FS pointers are GPAs
    """

    def __init__(self, mem: _Backing, ss: SecondStageMap) -> None:
        self.mem = mem
        self.ss = ss

    def hpa(self, gpa: int) -> int | None:
        """The host address ``gpa`` maps to, None if the table does not map it."""
        hit = self.ss.lookup(gpa)
        return None if hit is None else hit[0]

    def is_ram(self, gpa: int) -> bool:
        hpa = self.hpa(gpa)
        if hpa is None:
            return False
        is_ram = getattr(self.mem, "is_ram", None)
        return True if is_ram is None else bool(is_ram(hpa))

    def read_u64(self, gpa: int) -> int:
        if (gpa & PAGE_MASK) <= PAGE_SIZE - 8:
            hpa = self.hpa(gpa)
            return NO_MEMORY if hpa is None else self.mem.read_u64(hpa)
        # Straddling two pages: both must be memory for the value to be readable.
        if self.hpa(gpa) is None or self.hpa(gpa + 8 - 1) is None:
            return NO_MEMORY
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> bool:
        if (gpa & PAGE_MASK) <= PAGE_SIZE - 8:
            hpa = self.hpa(gpa)
            return hpa is not None and self.mem.write_u64(hpa, value)
        if self.hpa(gpa) is None or self.hpa(gpa + 8 - 1) is None:
            return False
        return self.write(gpa, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")) == 8

    def read(self, gpa: int, length: int) -> bytes:
        out = bytearray()
        for pos, n in _page_chunks(gpa, length):
            hpa = self.hpa(pos)
            out += bytes(n) if hpa is None else self.mem.read(hpa, n)
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> int:
        mv = memoryview(data).cast("B")
        stored = 0
        for pos, n in _page_chunks(gpa, len(mv)):
            # Split at 4 KiB: every page of a GPA range may live anywhere in host memory.
            hpa = self.hpa(pos)
            if hpa is not None:
                stored += self.mem.write(hpa, bytes(mv[pos - gpa : pos - gpa + n]))
        return stored


def _page_chunks(addr: int, length: int) -> list[tuple[int, int]]:
    out = []
    end = addr + length
    while addr < end:
        n = min(PAGE_SIZE - (addr & PAGE_MASK), end - addr)
        out.append((addr, n))
        addr += n
    return out


class UserMemory(Protocol):
    """A process's virtual memory as a VMM touches it (the host layer's ``VmmProcess``): ``read`` and
    ``write`` by user VA, raising ``ValueError`` where nothing is mapped (writable)."""

    def read(self, va: int, n: int) -> bytes: ...

    def write(self, va: int, data: bytes) -> None: ...


class UserView:
    """A window of VMM memory addressed from 0 (how a VMM sees guest RAM it mapped at ``va``): the memory
    protocol the builders use, so guest page tables can be written into it by guest-physical address.

    Outside the window is not memory: ``read_u64`` returns :data:`NO_MEMORY` and ``write_u64`` False, as
    :class:`HostRAM` does past its end; a ``read``/``write`` that leaves the window raises ``ValueError``
    (the caller, not the guest, asked for bytes that are not there)."""

    def __init__(self, proc: UserMemory, va: int, size: int) -> None:
        self.proc = proc
        self.va = va
        self.size = size

    def _check(self, addr: int, n: int) -> None:
        if addr < 0 or addr + n > self.size:
            raise ValueError(f"[{addr:#x}, +{n:#x}) is outside the {self.size:#x}-byte window")

    def is_ram(self, addr: int) -> bool:
        return 0 <= addr < self.size

    def read(self, addr: int, length: int) -> bytes:
        self._check(addr, length)
        return self.proc.read(self.va + addr, length)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> int:
        self._check(addr, len(data))
        self.proc.write(self.va + addr, bytes(data))
        return len(data)

    def read_u64(self, addr: int) -> int:
        if addr < 0 or addr + 8 > self.size:
            return NO_MEMORY
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u64(self, addr: int, value: int) -> bool:
        if addr < 0 or addr + 8 > self.size:
            return False
        self.write(addr, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))
        return True


class WriteRecorder(Protocol):
    """Stores a write and returns the bytes stored, as ``HostRAM.write`` counts them (``qword``: the write
    came from ``write_u64``)."""

    def __call__(self, addr: int, data: bytes, qword: bool) -> int: ...


class RecordingMemory:
    """``ram`` with every write handed to ``record`` instead: what a trace recorder gives the builders, so
    that every table write becomes an event."""

    def __init__(self, ram: "HostRAM | GuestPhysView", record: WriteRecorder, size: int | None = None) -> None:
        self._record = record
        self.read_u64 = ram.read_u64
        self.read = ram.read
        self.is_ram = ram.is_ram
        # A guest-physical view has no size of its own: its owner says how much RAM is behind it.
        self.size = size if size is not None else ram.size  # type: ignore[union-attr]

    def write_u64(self, addr: int, value: int) -> bool:
        return self._record(addr, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"), True) == 8

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> int:
        return self._record(addr, bytes(data), False)
