"""Table builders: allocate and fill VT-d structures and page tables in memory.

A library below the host layer (the host's Intel driver programs its root, context and PASID tables and
its paging domains with it) that users and tests use to set up a scenario in a few lines::

    ram = HostRAM()
    alloc = PageAllocator(ram)
    ss = SecondStageTable(ram, alloc, levels=4)
    ss.map(0x1000_0000, 0x8000_0000, 0x20_0000, R | W, page_size=0x20_0000)
    rt = LegacyRootTable(ram, alloc)
    rt.set_context(0, 0x08, slptptr=ss.root, aw=ss.aw, did=1)
    enable_translation(iommu, rt.root)

One module per structure family: :mod:`.alloc` (pages), :mod:`.paging` (what both page-table stages
share), :mod:`.second_stage`, :mod:`.first_stage`, :mod:`.root` (root and context tables, legacy and
scalable), :mod:`.pasid` (PASID directories and tables), :mod:`.enable` (turning translation on).

Every bit position comes from the structure layouts in ``specs/structures.yaml`` (through
:mod:`vtd_emu.spec`); nothing here re-states a layout.  Page-table builders precompute their entry bits
from those layouts once.

Each page-table builder keeps its own model of what it mapped (:attr:`~.paging._PageTable.mappings`,
queried by ``lookup``), independent of the bytes in memory, so that tests can compare an IOMMU walk
against it.  Builders raise ``ValueError`` for setup mistakes (misaligned requests, splitting a large
leaf, writing where there is no memory): those are scenario bugs, not guest behaviour.  Guest-physical
memory seen through a second-stage table is :class:`vtd_emu.memory.GuestPhysView`.
"""

from __future__ import annotations

from ._common import NX, PAGE_1G, PAGE_2M, PAGE_4K, R, U, W, X
from .alloc import AllocatorExhausted, PageAllocator
from .enable import enable_translation, gcmd_set, gsts_persistent
from .first_stage import FirstStageTable
from .paging import Mapping
from .pasid import PGTT_FS, PGTT_NESTED, PGTT_PT, PGTT_SS, PasidTables
from .root import LegacyRootTable, ScalableRootTable
from .second_stage import SecondStageTable

__all__ = ["R", "W", "X", "U", "NX", "PGTT_FS", "PGTT_SS", "PGTT_NESTED", "PGTT_PT", "PAGE_4K", "PAGE_2M",
           "PAGE_1G", "AllocatorExhausted", "PageAllocator", "Mapping", "SecondStageTable", "FirstStageTable",
           "LegacyRootTable", "ScalableRootTable", "PasidTables", "enable_translation", "gcmd_set",
           "gsts_persistent"]
