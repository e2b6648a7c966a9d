"""Second-stage (IOVA/GPA -> HPA) page tables."""

from __future__ import annotations

import functools

from ._common import PAGE_4K, R, W, X, _Mem
from .alloc import PageAllocator
from .paging import _LEAF_NAMES, _TABLE_NAMES, _EntryFormat, _format, _PageTable


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

