"""Which guest descriptors reach the host and how (docs/vmm.md, "Invalidation forwarding"), the bind
triggers' selectivity, and the ordering rule: the guest's wait completes only after the host work."""

from __future__ import annotations

from vtd_emu.host import HwptVtdS1
from vtd_emu.tables import U, W
from vtd_emu.vmm import BridgeAction, Machine
from vtd_emu.vtd.qi import T_DEV_TLB, T_IOTLB, T_PASID_DEV_TLB, make_descriptor

from vmm_helpers import ITE, RawGuest, iotlb_domain, pasid_cache, piotlb

SID, SID2 = 0x0310, 0x0318
GVA = 0x7F00_0000_0000
PAGE = 4096
FULL = (0, (1 << 64) - 1, 0)


def setup(*sids: int, ats: bool = False, qi: bool = True) -> tuple[Machine, RawGuest]:
    m = Machine(guest_ram=16 << 20)
    for sid in sids:
        m.add_passthrough_device(sid, ats=ats)
    g = RawGuest(m)
    for sid in sids:
        g.device(sid)
    g.enable(qi=qi)
    return m, g


def invalidations(m: Machine, since: int) -> list[BridgeAction]:
    return [a for a in m.bridge.actions[since:] if a.call == "invalidate"]


def hwpt_of(m: Machine, sid: int, pasid: int) -> int:
    b = m.bridge.binds[(sid, pasid)]
    assert b.nested is not None
    return b.nested


def test_iotlb_and_device_tlb_descriptors_reach_the_hwpts_they_cover() -> None:
    m, g = setup(SID, ats=True)
    fs = g.fs_table()
    fs.map(GVA, 0x80_0000, 4 * PAGE, W | U)
    g.bind_fs(SID, 1, fs, 5)
    g.bind_fs(SID, 2, fs, 6)
    g.bind_fs(SID, 0, fs, 7)
    h1, h2, h0 = hwpt_of(m, SID, 1), hwpt_of(m, SID, 2), hwpt_of(m, SID, 0)
    cases = [
        # type 2 domain-selective and page-selective: every FS entry of the DID, whatever the address
        (iotlb_domain(5), {h1: [FULL]}),
        (make_descriptor(T_IOTLB, G=3, DID=6, ADDR=GVA, AM=0), {h2: [FULL]}),
        (make_descriptor(T_IOTLB, G=1), {h1: [FULL], h2: [FULL], h0: [FULL]}),
        # type 6: the (DID, PASID) tag; page-selective keeps the range, AM and IH
        (piotlb(6, 2, GVA + 2 * PAGE, am=1, ih=True), {h2: [(GVA + 2 * PAGE, 2, 1)]}),
        (piotlb(6, 1), {}),                                   # DID 6 has no PASID 1 bound
        (piotlb(5, 1), {h1: [FULL]}),
        # type 8 by (sid, PASID), G=1 every PASID of the device; type 3 the RID_PASID bind
        (make_descriptor(T_PASID_DEV_TLB, SID=SID, PASID=2, G=0, ADDR=GVA + PAGE, S=0), {h2: [(GVA + PAGE, 1, 0)]}),
        (make_descriptor(T_PASID_DEV_TLB, SID=SID, PASID=0, G=1, ADDR=0, S=0), {h1: [(0, 1, 0)], h2: [(0, 1, 0)],
                                                                                 h0: [(0, 1, 0)]}),
        (make_descriptor(T_DEV_TLB, SID=SID, ADDR=GVA | 0x1000, S=1), {h0: [(GVA, 4, 0)]}),
        (make_descriptor(T_PASID_DEV_TLB, SID=SID2, PASID=1, G=0, ADDR=GVA, S=0), {}),   # not this device
    ]
    for desc, want in cases:
        before = len(m.bridge.actions)
        assert g.submit(desc)
        got = {a.args["hwpt"]: a.args["entries"] for a in invalidations(m, before)}
        assert got == want, desc
    m.close()


def test_the_guest_wait_completes_only_after_the_host_work() -> None:
    m, g = setup(SID)
    fs = g.fs_table()
    fs.map(GVA, 0x80_0000, PAGE, W | U)
    g.bind_fs(SID, 1, fs, 5)
    seen: list[tuple[str, int]] = []
    m.bridge.listeners.append(lambda a: seen.append((a.call, g.status_word())))
    token = g.waits + 1
    assert g.submit(piotlb(5, 1, GVA), piotlb(5, 1, GVA + PAGE))
    assert seen == [("invalidate", token - 1)] and g.status_word() == token
    m.close()


def test_register_based_invalidation_is_forwarded_at_once() -> None:
    m, g = setup(SID, qi=False)
    fs = g.fs_table()
    fs.map(GVA, 0x80_0000, PAGE, W | U)
    # Without a queue there is no PASID-cache invalidation: the entry is written, then TE is toggled.
    g.pasids[SID].set_entry(1, pgtt=1, did=5, fsptptr=fs.root)
    g.set_te(False)
    g.set_te(True)
    h1 = hwpt_of(m, SID, 1)
    iotlb = m.viommu.regs.slots[("IOTLB", 0)].offset
    before = len(m.bridge.actions)
    m.mmio_write(iotlb, 1 << 63 | 2 << 60 | 5 << 32, 8)     # IVT, domain-selective, DID 5
    (inv,) = invalidations(m, before)
    assert inv.args["hwpt"] == h1 and inv.args["entries"] == [FULL]
    assert inv.trigger.kind == "iotlb" and inv.trigger.slot is None and inv.trigger.action == m.guest_actions
    # A failure there has nowhere to go but the log: no ITE now, none later once the queue is on.
    from vtd_emu.host import IommufdError

    def failing(hwpt: int, entries: object, **kw: object) -> int:
        raise IommufdError(5, "injected", entry_num=0)

    orig, m.vmm.hwpt_invalidate = m.vmm.hwpt_invalidate, failing  # type: ignore[method-assign]
    m.mmio_write(iotlb, 1 << 63 | 2 << 60 | 5 << 32, 8)
    m.vmm.hwpt_invalidate = orig  # type: ignore[method-assign]
    assert m.bridge.stats.failed_forwards == 1 and m.bridge.actions[-1].errno == 5
    g.enable_qi()
    assert g.submit() and not g.fsts() & ITE
    m.close()


def test_domain_selective_pasid_cache_rebinds_only_that_domain() -> None:
    m, g = setup(SID)
    a, b = g.fs_table(), g.fs_table()
    a.map(GVA, 0x80_0000, PAGE, W | U)
    b.map(GVA, 0x90_0000, PAGE, W | U)
    g.bind_fs(SID, 1, a, 5)
    g.bind_fs(SID, 2, a, 6)
    old2 = hwpt_of(m, SID, 2)
    g.bind_fs(SID, 1, b, 5, invalidate=False)
    g.bind_fs(SID, 2, b, 6, invalidate=False)
    assert g.submit(pasid_cache(5))
    assert m.bridge.binds[(SID, 1)].s1 == HwptVtdS1(0, b.root, 48)
    assert hwpt_of(m, SID, 2) == old2 and m.bridge.binds[(SID, 2)].s1 == HwptVtdS1(0, a.root, 48)
    m.close()


def test_device_selective_context_invalidation_rebinds_only_that_device() -> None:
    from vtd_emu.vtd.qi import T_CONTEXT
    m, g = setup(SID, SID2)
    fs = g.fs_table()
    fs.map(GVA, 0x80_0000, PAGE, W | U)
    g.bind_fs(SID, 1, fs, 5, invalidate=False)
    g.bind_fs(SID2, 1, fs, 5, invalidate=False)
    assert g.submit(make_descriptor(T_CONTEXT, G=3, SID=SID2, FM=0))
    assert (SID, 1) not in m.bridge.binds and m.bridge.binds[(SID2, 1)].kind == "nested"
    m.close()


def test_a_device_plugged_into_a_running_guest_is_bound_at_once() -> None:
    m = Machine(guest_ram=16 << 20)
    m.add_passthrough_device(SID)
    g = RawGuest(m)
    g.device(SID)
    g.device(SID2)
    fs = g.fs_table()
    fs.map(GVA, 0x80_0000, PAGE, W | U)
    g.enable()
    g.bind_fs(SID2, 3, fs, 5)               # the guest already set up the device's tables
    dev = m.add_passthrough_device(SID2)
    assert m.bridge.binds[(SID2, 3)].kind == "nested"
    assert {a.trigger.kind for a in m.bridge.actions if a.call == "hwpt_alloc" and a.args.get("pasid") == 3} == {"plug"}
    assert dev.dma_write(GVA, b"hot", pasid=3).ok and m.mem.read(0x80_0000, 3) == b"hot"
    assert m.sid_map == {SID: SID, SID2: SID2}
    m.close()
