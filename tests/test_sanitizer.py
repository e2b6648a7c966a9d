"""Sanitizer mode: every translation is re-walked uncached and a cached answer that memory no longer
supports is reported — a guest that forgot an invalidation is caught at the DMA that exposes it."""

from __future__ import annotations

from vtd_emu import HostRAM, VtdIommu
from vtd_emu.tables import (PGTT_FS, U, W, FirstStageTable, PageAllocator, PasidTables, ScalableRootTable,
                            enable_translation)


def _setup(sanitize: bool) -> tuple[VtdIommu, FirstStageTable, HostRAM]:
    ram = HostRAM()
    io = VtdIommu(ram, "modern", sanitize=sanitize)
    alloc = PageAllocator(ram, base=0x100000)
    fs = FirstStageTable(ram, alloc, levels=4)
    fs.map(0x400000, 0x800000, 0x2000, W | U)
    pasids = PasidTables(ram, alloc)
    pasids.set_entry(5, pgtt=PGTT_FS, did=9, fsptptr=fs.root)
    root = ScalableRootTable(ram, alloc)
    root.set_context(0, 0x18, pasid_dir=pasids.dir, pdts=pasids.pdts)
    enable_translation(io, root.root, scalable=True)
    return io, fs, ram


def test_forgotten_invalidation_is_reported_with_both_answers() -> None:
    io, fs, _ = _setup(sanitize=True)
    assert io.translate(0x18, 0x400010, "r", pasid=5).addr == 0x800010
    assert io.stale_hits == []
    fs.map(0x400000, 0xA00000, 0x1000, W | U)        # remap without invalidating
    t = io.translate(0x18, 0x400010, "r", pasid=5)
    assert t.addr == 0x800010                          # the spec allows the stale answer...
    [hit] = io.stale_hits                              # ...and the sanitizer says so
    assert (hit.sid, hit.pasid, hit.iova, hit.cached, hit.fresh) == (0x18, 5, 0x400010, 0x800010, 0xA00010)
    io.caches.piotlb_pasid(9, 5)                       # the invalidation the guest forgot
    assert io.translate(0x18, 0x400010, "r", pasid=5).addr == 0xA00010
    assert len(io.stale_hits) == 1


def test_unmapped_but_cached_reports_the_fault_memory_would_give() -> None:
    io, fs, _ = _setup(sanitize=True)
    io.translate(0x18, 0x401000, "w", pasid=5)
    fs.unmap(0x401000, 0x1000)
    io.translate(0x18, 0x401000, "w", pasid=5)
    [hit] = io.stale_hits
    assert hit.fresh == -0x71 and hit.cached == 0x801000


def test_sanitizer_leaves_memory_and_caches_as_the_plain_unit_does() -> None:
    plain, fs1, ram1 = _setup(sanitize=False)
    san, fs2, ram2 = _setup(sanitize=True)
    for io in (plain, san):
        for va in (0x400000, 0x401008, 0x400ff8):
            io.translate(0x18, va, "w", pasid=5)
    assert ram1.read(0, 0x200000) == ram2.read(0, 0x200000)     # A/D bits set identically
    assert plain.caches.sizes() == san.caches.sizes()
    assert san.stale_hits == []


def test_stale_pass_through_bypass_is_reported() -> None:
    # QEMU's pass-through fast path caches "this device bypasses" until a context invalidation; a guest
    # that turns the context into a translated one without invalidating gets the stale bypass, and the
    # sanitizer's uncached walk (which must not trust that bypass) says what memory says now.
    from vtd_emu.tables import R, LegacyRootTable, SecondStageTable
    from vtd_emu.vtd.config import VtdConfig

    ram = HostRAM()
    io = VtdIommu(ram, VtdConfig.preset("modern", profile="qemu-7.2"), sanitize=True)
    alloc = PageAllocator(ram, base=0x100000)
    ss = SecondStageTable(ram, alloc, levels=4)
    ss.map(0x400000, 0x900000, 0x1000, R | W)
    rt = LegacyRootTable(ram, alloc)
    rt.set_context(0, 0x20, tt=2, aw=ss.aw, did=3)
    enable_translation(io, rt.root)
    assert io.translate(0x20, 0x400010, "r").addr == 0x400010      # pass-through: identity
    assert io.stale_hits == [] and 0x20 in io.pt_bypass
    rt.set_context(0, 0x20, slptptr=ss.root, aw=ss.aw, did=3)      # translated now, no invalidation
    assert io.translate(0x20, 0x400010, "r").addr == 0x400010      # the stale bypass answers
    [hit] = io.stale_hits
    assert (hit.sid, hit.pasid, hit.iova, hit.cached, hit.fresh) == (0x20, None, 0x400010, 0x400010, 0x900010)
    io.invalidate_context(1)                                        # the invalidation the guest forgot
    assert io.translate(0x20, 0x400010, "r").addr == 0x900010
    assert len(io.stale_hits) == 1
