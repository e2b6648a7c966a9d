"""End to end through the vIOMMU machine: a guest first-stage table bound to a PASID of a passthrough
device becomes a nested HWPT; DMA lands where guest FS + host SS say (checked against the builder's
model and the VMM's page table, not the IOMMUs); invalidations are forwarded; replace is hitless;
unbind, reset and SRTP re-bind."""

from __future__ import annotations

import pytest

from vtd_emu.host import HwptVtdS1
from vtd_emu.spec.consts import FR
from vtd_emu.tables import PGTT_PT, PGTT_SS, U, W
from vtd_emu.vmm import Machine
from vtd_emu.vtd.descriptors import PasidCacheInvalidation

from vmm_helpers import ITE, RawGuest, context_global, expected_hpa, pasid_cache, piotlb, reg

SID, EMU = 0x0310, 0x0320
PASID = 0x42
DID = 7
GVA = 0x7F12_3400_0000
PAGE = 4096


def machine(**kw: object) -> tuple[Machine, RawGuest]:
    m = Machine(guest_ram=32 << 20, **kw)  # type: ignore[arg-type]
    m.add_passthrough_device(SID)
    g = RawGuest(m)
    g.device(SID)
    g.enable()
    return m, g


def nested_objects(m: Machine) -> list[int]:
    return [o.id for o in m.objects() if o.kind == "hwpt_nested"]


def test_pasid_cache_invalidation_binds_a_nested_hwpt_and_dma_uses_both_stages() -> None:
    m, g = machine()
    dev = m.devices[SID]
    fs = g.fs_table()
    fs.map(GVA, 0x100_0000, 4 * PAGE, W | U)
    assert nested_objects(m) == []
    # The entry alone does nothing: the bind happens at the PASID-cache invalidation (caching mode).
    g.pasids[SID].set_entry(PASID, pgtt=1, did=DID, fsptptr=fs.root)
    assert nested_objects(m) == [] and m.bridge.binds.get((SID, PASID)) is None
    # Until then the device's PASID is not bound: its DMA faults as a not-present PASID entry.
    assert dev.dma_write(GVA, b"early", pasid=PASID).faults == (FR.SM_PASID_ENTRY_P,)
    assert g.submit(pasid_cache(DID, PASID))
    (nested,) = nested_objects(m)
    assert dev.vfio.attached_hwpt(PASID) == nested  # type: ignore[union-attr]
    alloc = [a for a in m.bridge.actions if a.call == "hwpt_alloc" and a.args.get("pasid") == PASID]
    assert len(alloc) == 1 and alloc[0].result == nested and alloc[0].errno is None
    assert (alloc[0].args["pgtbl_addr"], alloc[0].args["addr_width"], alloc[0].args["s1_flags"]) == (fs.root, 48, 0)
    trig = alloc[0].trigger
    assert trig.kind == "pasid-cache" and trig.event == PasidCacheInvalidation(1, DID, PASID) and trig.slot is not None

    for off, data in ((0x18, b"two stages"), (2 * PAGE + 0x7F0, b"x" * 0x20)):
        out = dev.dma_write(GVA + off, data, pasid=PASID)
        assert out.ok
        first = expected_hpa(m, fs, GVA + off)
        assert first is not None
        # Check page by page: guest pages need not be host-contiguous.
        for i in range(len(data)):
            hpa = expected_hpa(m, fs, GVA + off + i)
            assert hpa is not None and m.host.ram.read(hpa, 1) == data[i:i + 1]
    assert dev.dma_read(GVA + 0x18, 10, pasid=PASID).data == b"two stages"
    # An unmapped GVA faults with the guest's first-stage reason, recorded in the guest's FRCDs.
    out = dev.dma_read(GVA + 8 * PAGE, 4, pasid=PASID)
    assert out.faults == (FR.SM_FS_ENTRY_P,)
    recs = m.viommu.fault_records()
    assert [(r.sid, r.reason, r.pasid, r.addr) for r in recs] == [(SID, FR.SM_PASID_ENTRY_P, PASID, GVA),
                                                                   (SID, FR.SM_FS_ENTRY_P, PASID, GVA + 8 * PAGE)]
    m.close()
    assert m.host.pinned_pages == 0


def test_remap_with_invalidation_is_forwarded_and_without_it_the_stale_translation_stays() -> None:
    m, g = machine()
    dev = m.devices[SID]
    fs = g.fs_table()
    fs.map(GVA, 0x100_0000, PAGE, W | U)
    g.bind_fs(SID, PASID, fs, DID)
    assert dev.dma_write(GVA, b"old", pasid=PASID).ok           # fills the host IOTLB
    old_hpa = expected_hpa(m, fs, GVA)
    # Remap without invalidating: the host keeps using the old translation (stale, as hardware does).
    fs.unmap(GVA, PAGE)
    fs.map(GVA, 0x110_0000, PAGE, W | U)
    new_hpa = expected_hpa(m, fs, GVA)
    assert old_hpa is not None and new_hpa is not None and old_hpa != new_hpa
    before = len(m.bridge.actions)
    assert dev.dma_write(GVA, b"stale", pasid=PASID).ok
    assert m.host.ram.read(old_hpa, 5) == b"stale" and m.host.ram.read(new_hpa, 5) == bytes(5)
    assert len(m.bridge.actions) == before
    # Invalidate: one forwarded HWPT_INVALIDATE for the page, and the new mapping is used.
    assert g.submit(piotlb(DID, PASID, GVA, 0, ih=False))
    inv = [a for a in m.bridge.actions[before:] if a.call == "invalidate"]
    assert len(inv) == 1 and inv[0].errno is None
    assert inv[0].args["entries"] == [(GVA, 1, 0)] and inv[0].trigger.kind == "wait"
    assert inv[0].args["descriptors"][0][2] == "pasid-iotlb"
    assert dev.dma_write(GVA, b"fresh", pasid=PASID).ok
    assert m.host.ram.read(new_hpa, 5) == b"fresh"
    m.close()


def test_replace_is_hitless_and_unbind_frees_the_nested_hwpt() -> None:
    m, g = machine()
    dev = m.devices[SID]
    a, b = g.fs_table(), g.fs_table()
    a.map(GVA, 0x100_0000, PAGE, W | U)
    b.map(GVA, 0x120_0000, PAGE, W | U)
    g.bind_fs(SID, PASID, a, DID)
    (first,) = nested_objects(m)
    during: list[bool] = []

    def probe(action: object) -> None:
        # Between the new HWPT's allocation and the old one's destruction the device keeps translating.
        during.append(dev.dma_write(GVA, b"mid", pasid=PASID).ok)

    m.bridge.listeners.append(probe)
    g.bind_fs(SID, PASID, b, DID)
    m.bridge.listeners.remove(probe)
    calls = [x.call for x in m.bridge.actions if x.trigger.kind == "pasid-cache"][-3:]
    assert calls == ["hwpt_alloc", "replace", "destroy"]
    assert during == [True, True, True]
    (second,) = nested_objects(m)
    assert second != first and dev.vfio.attached_hwpt(PASID) == second  # type: ignore[union-attr]
    assert dev.dma_write(GVA, b"after", pasid=PASID).ok
    hpa = expected_hpa(m, b, GVA)
    assert hpa is not None and m.host.ram.read(hpa, 5) == b"after"
    # Unbind: clear the entry, invalidate; the nested HWPT is detached and destroyed, DMA faults with the
    # reason of a not-present PASID entry (what the vIOMMU would say).
    g.pasids[SID].clear_entry(PASID)
    assert g.submit(pasid_cache(DID, PASID))
    assert nested_objects(m) == [] and dev.vfio.attached_hwpt(PASID) is None  # type: ignore[union-attr]
    assert dev.dma_write(GVA, b"gone", pasid=PASID).faults == (FR.SM_PASID_ENTRY_P,)
    assert m.bridge.live_hwpts() == set()
    m.close()


def test_reset_and_srtp_rebind_everything() -> None:
    m, g = machine()
    dev = m.devices[SID]
    fs = g.fs_table()
    fs.map(GVA, 0x100_0000, PAGE, W | U)
    g.bind_fs(SID, PASID, fs, DID)
    g.bind_fs(SID, 0, fs, DID + 1)          # requests without PASID too (RID_PASID 0)
    assert len(nested_objects(m)) == 2
    assert dev.dma_write(GVA, b"rid", pasid=None).ok
    # Reset: translation off, every bind gone, the RID back on the nest parent (GPA = IOVA).
    m.reset()
    assert nested_objects(m) == []
    assert dev.vfio.attached_hwpt() == m.parent_hwpt  # type: ignore[union-attr]
    assert dev.dma_write(0x100_0000, b"gpa", pasid=None).ok
    assert m.host.ram.read(m.hpa_of(0x100_0000) or 0, 3) == b"gpa"
    assert not dev.dma_write(GVA, b"x", pasid=PASID).ok
    # The guest comes back with the same tables in memory: SRTP + TE re-bind both without any
    # PASID-cache invalidation.
    g.tail = 0
    g.enable()
    assert len(nested_objects(m)) == 2
    assert dev.dma_write(GVA + 4, b"again", pasid=PASID).ok and dev.dma_write(GVA, b"rid", pasid=None).ok
    kinds = {a.trigger.kind for a in m.bridge.actions if a.call == "hwpt_alloc" and a.trigger.action > 0}
    assert {"pasid-cache", "te"} <= kinds
    # Point the unit at another root table (empty): SRTP unbinds everything (RID detached: blocked).
    other = RawGuest(m, base=0x90_0000, limit=0xA0_0000)
    m.mmio_write(reg("RTADDR"), other.rt.root | 1 << 10, 8)
    from vtd_emu.tables import gcmd_set
    from vtd_emu.spec.consts import GCMD
    gcmd_set(m, GCMD.SRTP)
    assert nested_objects(m) == [] and dev.vfio.attached_hwpt() is None  # type: ignore[union-attr]
    assert dev.dma_write(GVA, b"x").faults == (FR.SM_ROOT_ENTRY_P,)
    m.close()


def test_pass_through_and_second_stage_entries() -> None:
    m, g = machine()
    dev = m.devices[SID]
    g.pasids[SID].set_entry(PASID, pgtt=PGTT_PT, did=DID)
    assert g.submit(pasid_cache(DID, PASID))
    assert dev.vfio.attached_hwpt(PASID) == m.parent_hwpt  # type: ignore[union-attr]
    assert dev.dma_write(0x100_0000, b"pt", pasid=PASID).ok
    assert m.host.ram.read(m.hpa_of(0x100_0000) or 0, 2) == b"pt"
    # A second-stage entry would need caching-mode shadowing: refused, blocked, the guest gets 0x5B.
    g.pasids[SID].set_entry(PASID, pgtt=PGTT_SS, did=DID, ssptptr=0x20_0000, aw=2)
    assert g.submit(pasid_cache(DID, PASID))
    bind = m.bridge.binds[(SID, PASID)]
    assert bind.kind == "blocked" and bind.refused and bind.errno is None
    assert dev.vfio.attached_hwpt(PASID) is None  # type: ignore[union-attr]
    assert dev.dma_write(0x100_0000, b"ss", pasid=PASID).faults == (FR.SM_PASID_ENTRY_INV,)
    assert m.bridge.stats.refusals == 1
    m.close()


def test_host_refusal_blocks_the_pasid_and_faults_with_invalid_pasid_entry() -> None:
    # A dirty-tracking parent: the host refuses nested PASID attaches (EINVAL, Linux 7.1).
    m, g = machine(dirty_tracking=True)
    dev = m.devices[SID]
    fs = g.fs_table()
    fs.map(GVA, 0x100_0000, PAGE, W | U)
    g.bind_fs(SID, PASID, fs, DID)
    bind = m.bridge.binds[(SID, PASID)]
    assert bind.kind == "blocked" and bind.errno == 22 and bind.refused
    assert nested_objects(m) == []                         # the refused HWPT was freed
    failed = [a for a in m.bridge.actions if a.errno is not None]
    assert [a.call for a in failed] == ["attach"] and failed[0].args["pasid"] == PASID
    out = dev.dma_write(GVA, b"no", pasid=PASID)
    assert out.faults == (FR.SM_PASID_ENTRY_INV,)
    assert [(r.sid, r.reason, r.pasid) for r in m.viommu.fault_records()] == [(SID, FR.SM_PASID_ENTRY_INV, PASID)]
    m.close()


@pytest.mark.parametrize("mode", ["coalesced", "one-per-call"])
def test_context_invalidation_rebinds_and_failed_forward_aborts_the_wait_with_ite(mode: str) -> None:
    m, g = machine(forwarding=mode)
    dev = m.devices[SID]
    fs = g.fs_table()
    fs.map(GVA, 0x100_0000, PAGE, W | U)
    g.bind_fs(SID, PASID, fs, DID, invalidate=False)
    assert nested_objects(m) == []
    assert g.submit(context_global())
    (nested,) = nested_objects(m)
    # The host fails the forwarded invalidation: the wait after it is aborted (status not written), ITE.
    orig = m.vmm.hwpt_invalidate

    def failing(hwpt: int, entries: object, **kw: object) -> int:
        from vtd_emu.host import IommufdError
        raise IommufdError(12, "injected", entry_num=0)

    m.vmm.hwpt_invalidate = failing  # type: ignore[method-assign]
    assert not g.submit(piotlb(DID, PASID, GVA))
    assert g.fsts() & ITE and m.bridge.stats.failed_forwards == 1
    assert (m.mmio_read(reg("IQERCD"), 8) >> 32) & 0xFFFF == SID     # ITESID: the guest's device
    m.vmm.hwpt_invalidate = orig  # type: ignore[method-assign]
    g.clear_fsts(ITE)
    assert g.submit(piotlb(DID, PASID, GVA)) and not g.fsts() & ITE
    assert dev.vfio.attached_hwpt(PASID) == nested  # type: ignore[union-attr]
    m.close()


@pytest.mark.parametrize("mode", ["coalesced", "one-per-call"])
def test_forwarding_modes_count_ioctls(mode: str) -> None:
    m, g = machine(forwarding=mode)
    fs = g.fs_table()
    fs.map(GVA, 0x100_0000, 64 * PAGE, W | U)
    g.bind_fs(SID, PASID, fs, DID)
    before = m.bridge.stats.invalidate_calls
    assert g.submit(*[piotlb(DID, PASID, GVA + i * PAGE) for i in range(16)])
    calls = [a for a in m.bridge.actions if a.call == "invalidate"]
    n = m.bridge.stats.invalidate_calls - before
    if mode == "coalesced":
        assert n == 1 and calls[-1].args["entries"] == [(GVA + i * PAGE, 1, 0) for i in range(16)]
    else:
        assert n == 16 and all(len(c.args["entries"]) == 1 for c in calls[-16:])
    assert m.bridge.stats.invalidate_entries == 16
    m.close()


def test_hwpt_vtd_s1_carries_fspm_sre_wpe_eafe() -> None:
    m, g = machine()
    fs5 = g.fs_table(levels=5)
    fs5.map(GVA, 0x100_0000, PAGE, W | U)
    g.bind_fs(SID, PASID, fs5, DID, sre=True, wpe=True, eafe=True)
    alloc = [a for a in m.bridge.actions if a.call == "hwpt_alloc" and a.args.get("pasid") == PASID][-1]
    from vtd_emu.host import VTD_S1_EAFE, VTD_S1_SRE, VTD_S1_WPE
    assert (alloc.args["addr_width"], alloc.args["s1_flags"]) == (57, VTD_S1_SRE | VTD_S1_WPE | VTD_S1_EAFE)
    assert m.bridge.binds[(SID, PASID)].s1 == HwptVtdS1(VTD_S1_SRE | VTD_S1_WPE | VTD_S1_EAFE, fs5.root, 57)
    assert m.devices[SID].dma_write(GVA, b"5lvl", pasid=PASID).ok
    m.close()


def test_legacy_mode_guest_pass_through_is_backed_and_second_stage_refused() -> None:
    from vtd_emu.tables import LegacyRootTable, PageAllocator, enable_translation
    m = Machine(guest_ram=16 << 20)
    dev = m.add_passthrough_device(SID)
    alloc = PageAllocator(m.mem, base=0x10_0000, limit=0x40_0000)
    rt = LegacyRootTable(m.mem, alloc)
    rt.set_context(SID >> 8, SID & 0xFF, slptptr=0, aw=2, did=3, tt=2)          # TT=10b: pass-through
    enable_translation(m, rt.root)
    assert m.bridge.binds[(SID, 0)].kind == "parent" and dev.vfio.attached_hwpt() == m.parent_hwpt
    assert dev.dma_write(0x80_0000, b"pt").ok and m.mem.read(0x80_0000, 2) == b"pt"
    rt.set_context(SID >> 8, SID & 0xFF, slptptr=alloc.alloc(), aw=2, did=3, tt=0)
    m.mmio_write(reg("CCMD"), 1 << 63 | 1 << 61, 8)                             # ICC, global
    bind = m.bridge.binds[(SID, 0)]
    assert bind.kind == "blocked" and bind.refused and dev.vfio.attached_hwpt() is None
    assert dev.dma_write(0x80_0000, b"ss").faults == (FR.CONTEXT_ENTRY_INV,)
    m.close()
