"""The machinery first- and second-stage page-table builders share: entry formats precomputed from the
spec layouts, the builder's own model of what it mapped (:class:`Mapping`), map/unmap/protect and the
raw-entry pokes tests use to build broken tables."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ._common import _LEAF_LEVEL, _U64, _bits, _layout, _Mem, _put64
from .alloc import PageAllocator


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

