"""Builders: allocate and fill VT-d structures and page tables in memory.

They let users and tests set up a scenario in a few lines::

    ram = HostRAM()
    alloc = PageAllocator(ram)
    ss = SecondStageTable(ram, alloc, levels=4)
    ss.map(0x1000_0000, 0x8000_0000, 0x20_0000, R | W, page_size=0x20_0000)
    rt = LegacyRootTable(ram, alloc)
    rt.set_context(0, 0x08, slptptr=ss.root, aw=ss.aw, did=1)
    enable_translation(iommu, rt.root)

Every bit position comes from the structure layouts in ``specs/structures.yaml`` (through
:mod:`vtd_emu.spec`); nothing here re-states a layout.  Page-table builders precompute their entry bits
from those layouts once.

Each page-table builder keeps its own model of what it mapped (:attr:`_PageTable.mappings`, queried by
:meth:`_PageTable.lookup`), independent of the bytes in memory, so that tests can compare an IOMMU walk
against it.  Builders raise ``ValueError`` for setup mistakes (misaligned requests, splitting a large
leaf, unmapped guest-physical addresses): those are scenario bugs, not guest behaviour.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from vtd_emu.errors import VtdEmuError

if TYPE_CHECKING:
    from vtd_emu.spec import Layout

__all__ = [
    "R",
    "W",
    "X",
    "U",
    "NX",
    "PGTT_FS",
    "PGTT_SS",
    "PGTT_NESTED",
    "PGTT_PT",
    "PAGE_4K",
    "PAGE_2M",
    "PAGE_1G",
    "AllocatorExhausted",
    "PageAllocator",
    "Mapping",
    "SecondStageTable",
    "FirstStageTable",
    "GuestPhysView",
    "LegacyRootTable",
    "ScalableRootTable",
    "PasidTables",
    "enable_translation",
]

# Permission flags of ``perms`` arguments.  Second stage uses R/W/X; first stage uses W, U and NX
# (first-stage entries are always readable once present, so R is accepted there and ignored).
R, W, X = 1, 2, 4
U = 8
NX = 16

PGTT_FS, PGTT_SS, PGTT_NESTED, PGTT_PT = 1, 2, 3, 4

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30
_LEAF_LEVEL = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}

_PAGE_MASK = PAGE_4K - 1
_U64 = (1 << 64) - 1


class _Mem(Protocol):
    def read_u64(self, addr: int) -> int: ...

    def write_u64(self, addr: int, value: int) -> bool: ...

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> int: ...


class AllocatorExhausted(VtdEmuError, ValueError):
    """A :class:`PageAllocator` has no room left below its limit."""


# -- spec access -------------------------------------------------------------------------------------


@functools.cache
def _layout(name: str) -> Layout:
    # Imported lazily: the spec module loads YAML, and builders are importable without touching it.
    from vtd_emu.spec import specs

    return specs().structure(name)


def _bits(layout: Layout, name: str) -> int:
    """The field's bits, in place."""
    return int(layout.field(name).mask)


def _ptr(layout: Layout, name: str, addr: int) -> int:
    """The value of address field ``name`` holding ``addr`` (addr fields keep address bits in place
    within their qword, so the low ``lo % 64`` bits of ``addr`` must be 0)."""
    f = layout.field(name)
    shift = f.lo & 63
    if addr < 0 or addr & ((1 << shift) - 1) or (addr >> shift) >> f.width:
        raise ValueError(f"{layout.name}.{name}: {addr:#x} is not an address this field can hold")
    return addr >> shift


def _put64(mem: _Mem, addr: int, value: int) -> None:
    if not mem.write_u64(addr, value):
        raise ValueError(f"cannot write a page-table entry at {addr:#x}: not memory")


def _size_bytes(layout: Layout) -> int:
    return layout.size_bits // 8


def _load(mem: _Mem, addr: int, nbytes: int) -> int:
    return int.from_bytes(mem.read(addr, nbytes), "little")


def _store(mem: _Mem, addr: int, value: int, nbytes: int) -> None:
    if mem.write(addr, value.to_bytes(nbytes, "little")) != nbytes:
        raise ValueError(f"cannot write {nbytes} bytes at {addr:#x}: not memory")


def _check_extra(extra: int, layout: Layout, what: str) -> None:
    if extra < 0 or extra >> layout.size_bits:
        raise ValueError(f"{what}: extra bits {extra:#x} do not fit a {layout.size_bits}-bit entry")


# -- allocation --------------------------------------------------------------------------------------


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


# -- page tables -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mapping:
    """One leaf of a builder's reference model: [iova, iova+size) → [addr, addr+size) with ``perms``."""

    iova: int
    addr: int
    size: int
    perms: int


@dataclass(frozen=True)
class _EntryFormat:
    """Bits of one kind of page-table entry, precomputed from its spec layout."""

    addr_mask: int  # the address field, in place
    perm_bits: tuple[tuple[int, int], ...]  # (perms flag, entry bit)
    perm_mask: int  # every entry bit that ``perms`` controls
    fixed: int  # bits every entry of this kind carries (FS P; PS of large leaves)
    accessed: int
    dirty: int

    def make(self, addr: int, perms: int) -> int:
        e = self.fixed | addr
        for flag, bit in self.perm_bits:
            if perms & flag:
                e |= bit
        return e

    def perm_field(self, perms: int) -> int:
        return self.make(0, perms) & self.perm_mask


def _format(
    name: str, perm_fields: tuple[tuple[int, str], ...], *, present: str | None, ps: bool
) -> _EntryFormat:
    lay = _layout(name)
    addr = lay.field("ADDR")
    perm_bits = tuple((flag, _bits(lay, fname)) for flag, fname in perm_fields)
    perm_mask = 0
    for _, bit in perm_bits:
        perm_mask |= bit
    fixed = _bits(lay, present) if present else 0
    if ps:
        fixed |= _bits(lay, "PS")
    return _EntryFormat(
        addr_mask=addr.mask,
        perm_bits=perm_bits,
        perm_mask=perm_mask,
        fixed=fixed,
        # Table entries of some levels have no D; 0 keeps ``make`` branch-free.
        accessed=_bits(lay, "A") if "A" in lay.fields else 0,
        dirty=_bits(lay, "D") if "D" in lay.fields else 0,
    )


# Layout names per level: level 1 = the 4 KiB PTE, 5 = PML5E.
_TABLE_NAMES = {5: "pml5e", 4: "pml4e", 3: "pdpe", 2: "pde"}
_LEAF_NAMES = {3: "pdpe_1g", 2: "pde_2m", 1: "pte"}


class _PageTable:
    """Shared machinery of the first- and second-stage builders.

    The builder's own model of the tree lives in two dicts, never re-read from memory: ``_tables`` (which
    table sits under which entry) and :attr:`mappings` (the leaves).  So ``set_entry_bits`` may scribble
    on memory without confusing later ``map``/``unmap`` calls.
    """

    _MIN_LEVELS: int = 2
    _MAX_LEVELS: int = 5
    _ALLOWED_PERMS: int = 0
    _IGNORED_PERMS: int = 0

    def __init__(self, mem: _Mem, alloc: PageAllocator, levels: int) -> None:
        if not self._MIN_LEVELS <= levels <= self._MAX_LEVELS:
            raise ValueError(
                f"{type(self).__name__}: levels must be {self._MIN_LEVELS}..{self._MAX_LEVELS}, got {levels}"
            )
        self.mem = mem
        self.alloc = alloc
        self.levels = levels
        self.width = 12 + 9 * levels
        self._table_fmt, self._leaf_fmt = self._formats()
        self.root: int = alloc.alloc()
        # (level of the table, linear address >> bits the table covers) → table address.
        self._tables: dict[tuple[int, int], int] = {(levels, 0): self.root}
        self.mappings: dict[int, Mapping] = {}

    # -- hooks for the two stages -------------------------------------------------------------------
    @classmethod
    def _formats(cls) -> tuple[dict[int, _EntryFormat], dict[int, _EntryFormat]]:
        """(table-entry formats, leaf formats) by level, built once from the spec layouts."""
        raise NotImplementedError

    def _external(self, lin: int) -> int:
        """The address users see (the mappings keys) for a linear (table-indexed) address."""
        return lin

    def _check_range(self, iova: int, size: int) -> int:
        """Validates [iova, iova+size) as one contiguous range the table translates; its linear start."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _entry_size(level: int) -> int:
        return 1 << (12 + 9 * (level - 1))

    @staticmethod
    def _index(lin: int, level: int) -> int:
        return (lin >> (12 + 9 * (level - 1))) & 511

    def _child_key(self, lin: int, level: int) -> tuple[int, int]:
        """Key of the table that hangs under ``lin``'s level-``level`` entry."""
        return (level - 1, lin >> (12 + 9 * (level - 1)))

    def _norm_perms(self, perms: int, what: str) -> int:
        if perms < 0 or perms & ~(self._ALLOWED_PERMS | self._IGNORED_PERMS):
            raise ValueError(f"{type(self).__name__}: invalid {what} {perms:#x}")
        return perms & self._ALLOWED_PERMS

    def _table_entry(self, level: int, table: int, table_perms: int) -> int:
        return self._table_fmt[level].make(table, table_perms)

    def _leaf_entry(self, level: int, addr: int, perms: int) -> int:
        return self._leaf_fmt[level].make(addr, perms)

    # -- building -----------------------------------------------------------------------------------
    def _map(
        self,
        iova: int,
        addr: int,
        size: int,
        perms: int,
        page_size: int,
        extra_leaf_bits: int,
        table_perms: int,
        leaf_flags: int,
    ) -> None:
        level = _LEAF_LEVEL.get(page_size)
        if level is None:
            raise ValueError(f"page_size {page_size:#x} is not 4 KiB, 2 MiB or 1 GiB")
        if level > self.levels:
            raise ValueError(f"a {self.levels}-level table cannot hold {page_size:#x} pages")
        if size <= 0 or size % page_size:
            raise ValueError(f"size {size:#x} is not a positive multiple of the page size {page_size:#x}")
        if iova % page_size or addr % page_size:
            raise ValueError(f"iova {iova:#x} / addr {addr:#x} not aligned to the page size {page_size:#x}")
        fmt = self._leaf_fmt[level]
        if addr < 0 or (addr + size - 1) & ~fmt.addr_mask & ~(page_size - 1):
            raise ValueError(f"output range {addr:#x}+{size:#x} does not fit the entry's address field")
        if extra_leaf_bits < 0 or extra_leaf_bits > _U64:
            raise ValueError(f"extra_leaf_bits {extra_leaf_bits:#x} is not a 64-bit value")
        perms = self._norm_perms(perms, "perms")
        table_perms = self._norm_perms(table_perms, "table_perms")
        lin = self._check_range(iova, size)
        leaf_bits = extra_leaf_bits | leaf_flags
        for off in range(0, size, page_size):
            self._map_one(lin + off, addr + off, level, perms, leaf_bits, table_perms)

    def _map_one(self, lin: int, addr: int, level: int, perms: int, leaf_bits: int, table_perms: int) -> None:
        table = self.root
        for lvl in range(self.levels, level, -1):
            tkey = self._child_key(lin, lvl)
            child = self._tables.get(tkey)
            if child is None:
                # Whatever this entry held (nothing, or a large leaf) is replaced by a fresh table.
                self._forget_leaf(lin, lvl)
                child = self.alloc.alloc()
                self._tables[tkey] = child
                entry = self._table_entry(lvl, child, table_perms)
                _put64(self.mem, table + 8 * self._index(lin, lvl), entry)
            table = child
        if level > 1:
            self._drop_subtree(lin, level)
        size = self._entry_size(level)
        entry = self._leaf_entry(level, addr, perms) | leaf_bits
        _put64(self.mem, table + 8 * self._index(lin, level), entry)
        key = self._external(lin)
        self.mappings[key] = Mapping(key, addr, size, perms)

    def _forget_leaf(self, lin: int, level: int) -> None:
        size = self._entry_size(level)
        key = self._external(lin & -size)
        m = self.mappings.get(key)
        if m is not None and m.size == size:
            del self.mappings[key]

    def _drop_subtree(self, lin: int, level: int) -> None:
        """Forget the table (and everything below it) under ``lin``'s level-``level`` entry."""
        top = self._child_key(lin, level)
        if top not in self._tables:
            return
        shift = 12 + 9 * (level - 1)
        for tkey in [k for k in self._tables if k[0] < level and (k[1] << (12 + 9 * k[0])) >> shift == top[1]]:
            del self._tables[tkey]
        lo = self._external(lin & -(1 << shift))
        hi = lo + (1 << shift)
        for key in [k for k in self.mappings if lo <= k < hi]:
            del self.mappings[key]

    def _leaves(self, iova: int, size: int, *, allow_holes: bool) -> list[tuple[int, int, Mapping]]:
        """(entry address, level, mapping) of every leaf in the range; a leaf sticking out is an error."""
        if size <= 0:
            raise ValueError(f"size {size:#x} is not positive")
        start = self._check_range(iova, size)
        end = start + size
        pos = start
        out: list[tuple[int, int, Mapping]] = []
        while pos < end:
            table = self.root
            lvl = self.levels
            while True:
                esize = self._entry_size(lvl)
                base = pos & -esize
                child = self._tables.get(self._child_key(pos, lvl)) if lvl > 1 else None
                if child is not None:
                    table = child
                    lvl -= 1
                    continue
                m = self.mappings.get(self._external(base))
                if m is not None and m.size == esize:
                    if base < start or base + esize > end:
                        raise ValueError(
                            f"range {iova:#x}+{size:#x} covers part of the {esize:#x} leaf at {m.iova:#x}"
                        )
                    out.append((table + 8 * self._index(pos, lvl), lvl, m))
                elif not allow_holes:
                    raise ValueError(f"{self._external(pos):#x} is not mapped")
                pos = base + esize
                break
        return out

    # -- public API ---------------------------------------------------------------------------------
    def unmap(self, iova: int, size: int) -> None:
        """Clear the leaf entries of [iova, iova+size) (holes are fine; a partial large leaf is not)."""
        for eaddr, _lvl, m in self._leaves(iova, size, allow_holes=True):
            _put64(self.mem, eaddr, 0)
            del self.mappings[m.iova]

    def protect(self, iova: int, size: int, perms: int) -> None:
        """Change the permissions of every leaf in [iova, iova+size), in place (all must be mapped)."""
        perms = self._norm_perms(perms, "perms")
        for eaddr, lvl, m in self._leaves(iova, size, allow_holes=False):
            fmt = self._leaf_fmt[lvl]
            e = self.mem.read_u64(eaddr)
            _put64(self.mem, eaddr, (e & ~fmt.perm_mask) | fmt.perm_field(perms))
            self.mappings[m.iova] = replace(m, perms=perms)

    def entry_addr(self, iova: int, level: int) -> int | None:
        """Address of the level-``level`` entry on ``iova``'s path, None if no table exists there."""
        if not 1 <= level <= self.levels:
            raise ValueError(f"level {level} is not 1..{self.levels}")
        lin = self._check_range(iova, 1)
        table = self.root
        for lvl in range(self.levels, level, -1):
            child = self._tables.get(self._child_key(lin, lvl))
            if child is None:
                return None
            table = child
        return table + 8 * self._index(lin, level)

    def set_entry_bits(self, iova: int, level: int, set_bits: int = 0, clear_bits: int = 0) -> int:
        """Poke the raw entry at ``level`` on ``iova``'s path (the reference model is not changed)."""
        addr = self.entry_addr(iova, level)
        if addr is None:
            raise ValueError(f"no level-{level} table on the path of {iova:#x}")
        e = self.mem.read_u64(addr)
        _put64(self.mem, addr, ((e & ~clear_bits) | set_bits) & _U64)
        return addr

    def lookup(self, iova: int) -> tuple[int, int, int] | None:
        """(output address, page size, perms) from the reference model (not memory), or None."""
        try:
            lin = self._check_range(iova, 1)
        except ValueError:
            return None
        for level in range(1, min(3, self.levels) + 1):
            size = self._entry_size(level)
            base = lin & -size
            m = self.mappings.get(self._external(base))
            if m is not None and m.size == size:
                return (m.addr + (lin - base), size, m.perms)
        return None


class SecondStageTable(_PageTable):
    """A second-stage (IOVA/GPA → HPA) page table of 2..5 levels (context/PASID-entry AW = levels - 2)."""

    _MIN_LEVELS = 2
    _MAX_LEVELS = 5
    _ALLOWED_PERMS = R | W | X

    def __init__(self, mem: _Mem, alloc: PageAllocator, levels: int = 4) -> None:
        super().__init__(mem, alloc, levels)

    @property
    def aw(self) -> int:
        """The AW value selecting this table's depth."""
        return self.levels - 2

    @classmethod
    @functools.cache
    def _formats(cls) -> tuple[dict[int, _EntryFormat], dict[int, _EntryFormat]]:
        perms = ((R, "R"), (W, "W"), (X, "X"))
        tables = {lvl: _format("ss_" + n, perms, present=None, ps=False) for lvl, n in _TABLE_NAMES.items()}
        leaves = {lvl: _format("ss_" + n, perms, present=None, ps=lvl > 1) for lvl, n in _LEAF_NAMES.items()}
        return tables, leaves

    def _check_range(self, iova: int, size: int) -> int:
        if iova < 0 or iova + size > 1 << self.width:
            raise ValueError(f"range {iova:#x}+{size:#x} is beyond the {self.width}-bit table")
        return iova

    def map(
        self,
        iova: int,
        addr: int,
        size: int,
        perms: int = R | W,
        *,
        page_size: int = PAGE_4K,
        extra_leaf_bits: int = 0,
        table_perms: int = R | W | X,
    ) -> None:
        """Map [iova, iova+size) → [addr, addr+size) with ``page_size`` leaves.

        New table entries get ``table_perms`` (existing ones are left alone).  An existing leaf is
        replaced; a leaf replacing a table, or a table replacing a large leaf, replaces the whole subtree
        (nothing of the old one stays mapped).
        """
        self._map(iova, addr, size, perms, page_size, extra_leaf_bits, table_perms, 0)


class FirstStageTable(_PageTable):
    """A first-stage (IA-32e-style VA → GPA/HPA) page table of 4 or 5 levels (FSPM = levels - 4)."""

    _MIN_LEVELS = 4
    _MAX_LEVELS = 5
    _ALLOWED_PERMS = W | U | NX
    _IGNORED_PERMS = R

    def __init__(self, mem: _Mem, alloc: PageAllocator, levels: int = 4) -> None:
        super().__init__(mem, alloc, levels)
        # The top indexed bit (47 or 56): set means the upper canonical half.
        self._sign = 1 << (self.width - 1)

    @property
    def fspm(self) -> int:
        """The PASID-entry FSPM value selecting this table's depth."""
        return self.levels - 4

    @classmethod
    @functools.cache
    def _formats(cls) -> tuple[dict[int, _EntryFormat], dict[int, _EntryFormat]]:
        perms = ((W, "RW"), (U, "US"), (NX, "XD"))
        tables = {lvl: _format("fs_" + n, perms, present="P", ps=False) for lvl, n in _TABLE_NAMES.items()}
        leaves = {lvl: _format("fs_" + n, perms, present="P", ps=lvl > 1) for lvl, n in _LEAF_NAMES.items()}
        return tables, leaves

    def _linear(self, va: int) -> int:
        top = va >> (self.width - 1)
        if va < 0 or va > _U64 or top not in (0, (1 << (65 - self.width)) - 1):
            raise ValueError(f"va {va:#x} is not canonical for a {self.width}-bit table")
        return va & ((1 << self.width) - 1)

    def _external(self, lin: int) -> int:
        # Sign-extend: upper-half addresses are keyed (and reported) in their canonical form.
        return lin | (_U64 ^ ((1 << self.width) - 1)) if lin & self._sign else lin

    def _check_range(self, va: int, size: int) -> int:
        lin = self._linear(va)
        last = va + size - 1
        # Both ends canonical and in the same half: the range does not cross the non-canonical hole.
        if last > _U64 or self._linear(last) - lin != size - 1:
            raise ValueError(f"range {va:#x}+{size:#x} is not one canonical range")
        return lin

    def map(
        self,
        va: int,
        addr: int,
        size: int,
        perms: int = W | U,
        *,
        page_size: int = PAGE_4K,
        accessed: bool = False,
        dirty: bool = False,
        extra_leaf_bits: int = 0,
        table_perms: int = W | U,
    ) -> None:
        """Map [va, va+size) → [addr, addr+size) with ``page_size`` leaves (see SecondStageTable.map).

        P is always set; W sets R/W, U sets U/S, NX sets XD.  ``accessed``/``dirty`` pre-set the leaf's
        A/D.  ``va`` must be canonical; upper-half addresses are given in canonical form.
        """
        level = _LEAF_LEVEL.get(page_size, 1)
        fmt = self._leaf_fmt[level]
        flags = (fmt.accessed if accessed else 0) | (fmt.dirty if dirty else 0)
        self._map(va, addr, size, perms, page_size, extra_leaf_bits, table_perms, flags)


class GuestPhysView:
    """Guest-physical memory seen through a second-stage table's reference model.

    Reads and writes of a GPA go to the host address ``ss.lookup`` gives; an unmapped GPA raises
    ``ValueError`` (a scenario-setup error).  Build nested first-stage tables with it::

        gview = GuestPhysView(ram, ss)
        fs = FirstStageTable(gview, PageAllocator(gview, base=gpa_base))   # all FS pointers are GPAs
    """

    def __init__(self, mem: _Mem, ss: SecondStageTable) -> None:
        self.mem = mem
        self.ss = ss

    def hpa(self, gpa: int) -> int:
        """The host address ``gpa`` maps to."""
        hit = self.ss.lookup(gpa)
        if hit is None:
            raise ValueError(f"GPA {gpa:#x} is not mapped by the second-stage table")
        return hit[0]

    def is_ram(self, gpa: int) -> bool:
        hit = self.ss.lookup(gpa)
        if hit is None:
            return False
        is_ram = getattr(self.mem, "is_ram", None)
        return True if is_ram is None else bool(is_ram(hit[0]))

    def read_u64(self, gpa: int) -> int:
        if (gpa & _PAGE_MASK) <= PAGE_4K - 8:
            return self.mem.read_u64(self.hpa(gpa))
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> bool:
        if (gpa & _PAGE_MASK) <= PAGE_4K - 8:
            return self.mem.write_u64(self.hpa(gpa), value)
        return self.write(gpa, (value & _U64).to_bytes(8, "little")) == 8

    def read(self, gpa: int, length: int) -> bytes:
        out = bytearray()
        for pos, n in self._chunks(gpa, length):
            out += self.mem.read(self.hpa(pos), n)
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> int:
        mv = memoryview(data).cast("B")
        stored = 0
        for pos, n in self._chunks(gpa, len(mv)):
            # Split at 4 KiB: every page of a GPA range may live anywhere in host memory.
            stored += self.mem.write(self.hpa(pos), bytes(mv[pos - gpa : pos - gpa + n]))
        return stored

    @staticmethod
    def _chunks(addr: int, length: int) -> list[tuple[int, int]]:
        out = []
        end = addr + length
        while addr < end:
            n = min(PAGE_4K - (addr & _PAGE_MASK), end - addr)
            out.append((addr, n))
            addr += n
        return out


# -- root, context and PASID structures --------------------------------------------------------------


def _check_bdf(bus: int, devfn: int | None = None) -> None:
    if not 0 <= bus <= 255:
        raise ValueError(f"bus {bus} is not 0..255")
    if devfn is not None and not 0 <= devfn <= 255:
        raise ValueError(f"devfn {devfn} is not 0..255")


class _RootTable:
    """What legacy and scalable root tables share: context tables are allocated on first use, keyed by
    :meth:`_key`, each holding ``_TABLE_SLOTS`` context entries."""

    _ROOT_LAYOUT: ClassVar[str]
    _CTX_LAYOUT: ClassVar[str]
    _TABLE_SLOTS: ClassVar[int]
    context_tables: dict[Any, int]

    def __init__(self, mem: _Mem, alloc: PageAllocator) -> None:
        self.mem = mem
        self.alloc = alloc
        self._root = _layout(self._ROOT_LAYOUT)
        self._ctx = _layout(self._CTX_LAYOUT)
        self.root: int = alloc.alloc()
        self.context_tables = {}

    def _key(self, bus: int, devfn: int) -> Any:
        raise NotImplementedError

    def _write_root(self, key: Any, present: bool) -> None:
        raise NotImplementedError

    def root_entry_addr(self, bus: int) -> int:
        _check_bdf(bus)
        return self.root + bus * _size_bytes(self._root)

    def context_entry_addr(self, bus: int, devfn: int) -> int | None:
        """Address of the context entry, None while the context table covering it does not exist."""
        _check_bdf(bus, devfn)
        table = self.context_tables.get(self._key(bus, devfn))
        return None if table is None else table + (devfn % self._TABLE_SLOTS) * _size_bytes(self._ctx)

    def _context_table(self, key: Any) -> int:
        table = self.context_tables.get(key)
        if table is None:
            table = self.alloc.alloc()
            self.context_tables[key] = table
            self._write_root(key, True)
        return table

    def _put_context(self, bus: int, devfn: int, value: int) -> int:
        self._context_table(self._key(bus, devfn))
        addr = self.context_entry_addr(bus, devfn)
        assert addr is not None
        _store(self.mem, addr, value, _size_bytes(self._ctx))
        return addr

    def clear_context(self, bus: int, devfn: int) -> None:
        addr = self.context_entry_addr(bus, devfn)
        if addr is not None:
            _store(self.mem, addr, 0, _size_bytes(self._ctx))


class LegacyRootTable(_RootTable):
    """A legacy-mode root table (256 × 16 B) with 256-entry context tables allocated per bus."""

    _ROOT_LAYOUT = "legacy_root_entry"
    _CTX_LAYOUT = "legacy_context_entry"
    _TABLE_SLOTS = 256
    # bus → context table address.
    context_tables: dict[int, int]

    def _key(self, bus: int, devfn: int) -> int:
        return bus

    def _write_root(self, key: int, present: bool) -> None:
        value = self._root.encode(P=int(present), CTP=_ptr(self._root, "CTP", self.context_tables[key]))
        _store(self.mem, self.root_entry_addr(key), value, _size_bytes(self._root))

    def set_root_present(self, bus: int, present: bool) -> None:
        """Set or clear the root entry's P (allocating an empty context table if the bus has none)."""
        _check_bdf(bus)
        self._context_table(bus)
        self._write_root(bus, present)

    def set_context(
        self,
        bus: int,
        devfn: int,
        *,
        slptptr: int = 0,
        aw: int = 2,
        did: int = 1,
        tt: int = 0,
        fpd: bool = False,
        present: bool = True,
        extra: int = 0,
    ) -> int:
        """Write the context entry (``extra`` ORed in raw); returns its address."""
        _check_bdf(bus, devfn)
        _check_extra(extra, self._ctx, "set_context")
        value = self._ctx.encode(
            P=int(present), FPD=int(fpd), TT=tt, SLPTPTR=_ptr(self._ctx, "SLPTPTR", slptptr), AW=aw, DID=did
        )
        return self._put_context(bus, devfn, value | extra)


class ScalableRootTable(_RootTable):
    """A scalable-mode root table: each bus has a lower (devfn 0–127) and an upper (128–255) context table
    of 128 × 32 B, allocated on first use."""

    _ROOT_LAYOUT = "sm_root_entry"
    _CTX_LAYOUT = "sm_context_entry"
    _TABLE_SLOTS = 128
    # (bus, upper half?) → context table address.
    context_tables: dict[tuple[int, bool], int]

    def _key(self, bus: int, devfn: int) -> tuple[int, bool]:
        return (bus, devfn >= 128)

    def _write_root(self, key: tuple[int, bool], present: bool) -> None:
        # Read-modify-write: the other half of the root entry belongs to the other 128 devfns.
        bus, upper = key
        addr = self.root_entry_addr(bus)
        n = _size_bytes(self._root)
        value = _load(self.mem, addr, n)
        p_name, ctp_name = ("UP", "UCTP") if upper else ("LP", "LCTP")
        value = self._root.field(p_name).put(value, int(present))
        ctp = _ptr(self._root, ctp_name, self.context_tables[key])
        value = self._root.field(ctp_name).put(value, ctp)
        _store(self.mem, addr, value, n)

    def set_root_present(self, bus: int, present: bool, *, upper: bool = False) -> None:
        """Set or clear LP (or UP), allocating an empty context table for that half if needed."""
        _check_bdf(bus)
        self._context_table((bus, upper))
        self._write_root((bus, upper), present)

    def set_context(
        self,
        bus: int,
        devfn: int,
        *,
        pasid_dir: int,
        pdts: int = 0,
        rid_pasid: int = 0,
        paside: bool = True,
        pre: bool = False,
        dte: bool = False,
        fpd: bool = False,
        present: bool = True,
        extra: int = 0,
    ) -> int:
        """Write the scalable-mode context entry (``extra`` ORed in raw); returns its address."""
        _check_bdf(bus, devfn)
        _check_extra(extra, self._ctx, "set_context")
        value = self._ctx.encode(
            P=int(present),
            FPD=int(fpd),
            DTE=int(dte),
            PASIDE=int(paside),
            PRE=int(pre),
            PDTS=pdts,
            PASIDDIRPTR=_ptr(self._ctx, "PASIDDIRPTR", pasid_dir),
            RID_PASID=rid_pasid,
        )
        return self._put_context(bus, devfn, value | extra)


class PasidTables:
    """A PASID directory of ``dir_entries`` (2**(pdts+7)) entries, each pointing at a 64-entry PASID table
    allocated on first use."""

    TABLE_ENTRIES = 64

    def __init__(self, mem: _Mem, alloc: PageAllocator, dir_entries: int = 128) -> None:
        if dir_entries < 128 or dir_entries > 1 << 14 or dir_entries & (dir_entries - 1):
            raise ValueError(f"dir_entries {dir_entries} is not a power of two in 128..16384")
        self.mem = mem
        self.alloc = alloc
        self._dir = _layout("pasid_dir_entry")
        self._entry = _layout("pasid_entry")
        self.dir_entries = dir_entries
        self.pdts: int = dir_entries.bit_length() - 1 - 7
        dir_bytes = dir_entries * _size_bytes(self._dir)
        self.dir: int = alloc.alloc(max(1, -(-dir_bytes // PAGE_4K)))
        # directory index → PASID table address.
        self.tables: dict[int, int] = {}

    def _dir_index(self, pasid: int) -> int:
        if not 0 <= pasid < 1 << 20:
            raise ValueError(f"PASID {pasid:#x} is not a 20-bit value")
        index = pasid >> 6
        if index >= self.dir_entries:
            raise ValueError(f"PASID {pasid:#x} is beyond a {self.dir_entries}-entry directory")
        return index

    def dir_entry_addr(self, pasid: int) -> int:
        return self.dir + self._dir_index(pasid) * _size_bytes(self._dir)

    def entry_addr(self, pasid: int) -> int | None:
        """Address of the PASID entry, None while its PASID table does not exist."""
        table = self.tables.get(self._dir_index(pasid))
        return None if table is None else table + (pasid & 63) * _size_bytes(self._entry)

    def set_dir_entry(self, pasid: int, *, present: bool = True, fpd: bool = False) -> int:
        """Rewrite the directory entry covering ``pasid`` (allocating its table); returns its address."""
        index = self._dir_index(pasid)
        table = self.tables.get(index)
        if table is None:
            table = self.alloc.alloc()
            self.tables[index] = table
        value = self._dir.encode(P=int(present), FPD=int(fpd), SMPTBLPTR=_ptr(self._dir, "SMPTBLPTR", table))
        addr = self.dir_entry_addr(pasid)
        _store(self.mem, addr, value, _size_bytes(self._dir))
        return addr

    def set_entry(
        self,
        pasid: int,
        *,
        pgtt: int,
        did: int,
        ssptptr: int = 0,
        aw: int = 2,
        fsptptr: int = 0,
        fspm: int = 0,
        sre: bool = False,
        wpe: bool = False,
        eafe: bool = False,
        ssade: bool = False,
        ssee: bool = False,
        ere: bool = False,
        nxe: bool = False,
        fpd: bool = False,
        present: bool = True,
        dir_fpd: bool = False,
        extra: dict[str, int] | None = None,
    ) -> int:
        """Write the PASID entry; returns its address.

        The directory entry is rewritten too (P=1, FPD=``dir_fpd``).  ``extra`` maps further spec field
        names (e.g. ``PWSNP``, ``PAT``) to values and overrides the named arguments.
        """
        fields: dict[str, int] = {
            "P": int(present),
            "FPD": int(fpd),
            "AW": aw,
            "SSEE": int(ssee),
            "PGTT": pgtt,
            "SSADE": int(ssade),
            "SSPTPTR": _ptr(self._entry, "SSPTPTR", ssptptr),
            "DID": did,
            "SRE": int(sre),
            "ERE": int(ere),
            "FSPM": fspm,
            "WPE": int(wpe),
            "NXE": int(nxe),
            "EAFE": int(eafe),
            "FSPTPTR": _ptr(self._entry, "FSPTPTR", fsptptr),
        }
        if extra:
            fields.update(extra)
        value = self._entry.encode(**fields)
        self.set_dir_entry(pasid, present=True, fpd=dir_fpd)
        addr = self.entry_addr(pasid)
        assert addr is not None
        _store(self.mem, addr, value, _size_bytes(self._entry))
        return addr

    def clear_entry(self, pasid: int) -> None:
        addr = self.entry_addr(pasid)
        if addr is not None:
            _store(self.mem, addr, 0, _size_bytes(self._entry))


# -- turning translation on --------------------------------------------------------------------------

_RTADDR = 0x20
_GCMD = 0x18
_GSTS = 0x1C
_GCMD_KEEP = 0x96FF_FFFF  # GSTS bits that are persistent controls (drops one-shot 30/29/27/24)
_GCMD_SRTP = 1 << 30
_GCMD_TE = 1 << 31
_RTADDR_SMT = 1 << 10


class _Mmio(Protocol):
    def mmio_write(self, offset: int, value: int, size: int) -> Any: ...

    def mmio_read(self, offset: int, size: int) -> int: ...


def enable_translation(iommu: _Mmio, root: int, *, scalable: bool = False) -> None:
    """Program RTADDR, latch it with GCMD.SRTP and set GCMD.TE, as a driver does (read GSTS each time)."""
    if root < 0 or root > _U64 or root & _PAGE_MASK:
        raise ValueError(f"root table {root:#x} is not a 4 KiB-aligned 64-bit address")
    iommu.mmio_write(_RTADDR, root | (_RTADDR_SMT if scalable else 0), 8)
    for bit in (_GCMD_SRTP, _GCMD_TE):
        iommu.mmio_write(_GCMD, (iommu.mmio_read(_GSTS, 4) & _GCMD_KEEP) | bit, 4)
