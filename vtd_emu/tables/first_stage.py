"""First-stage (IA-32e-style VA -> GPA/HPA) page tables, 4 or 5 levels, canonical addresses."""

from __future__ import annotations

import functools

from ._common import _LEAF_LEVEL, _U64, NX, PAGE_4K, R, U, W, _Mem
from .alloc import PageAllocator
from .paging import _LEAF_NAMES, _TABLE_NAMES, _EntryFormat, _format, _PageTable


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

