"""The host Intel driver: what it writes into the physical unit's structures, the attach-time checks of
nested domains (iommufd.md §6.2, §6.3), the invalidations that follow every change (§6.3, §6.4,
vtd-facts §8), and that those invalidations really reach the unit's caches and device TLBs.
"""

from __future__ import annotations

import errno

import pytest

from vtd_emu.tables import FirstStageTable, PageAllocator, U, W
from vtd_emu.errors import ConfigError
from vtd_emu.host import (HWPT_ALLOC_DIRTY_TRACKING, HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID, VTD_INV_FLAGS_LEAF,
                          VTD_S1_EAFE, VTD_S1_SRE, VTD_S1_WPE, Host, HwptVtdS1, IommufdError, VtdS1Invalidate)
from vtd_emu.host.intel import calculate_psi_aligned_address
from vtd_emu.spec import specs
from vtd_emu.vtd.config import VtdConfig

PAGE = 4096
GUEST = 4 << 20


def expect_errno(err: int, fn, *args, **kwargs) -> IommufdError:
    with pytest.raises(IommufdError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == err, f"expected {errno.errorcode[err]}, got {ei.value.name}: {ei.value}"
    return ei.value


def pasid_entry(host: Host, sid: int, index: int) -> dict[str, int]:
    info = host.intel.devices[sid]
    addr = info.pasid_table.entry_addr(index)
    assert addr is not None
    raw = int.from_bytes(host.ram.read(addr, 64), "little")
    return specs().structure("pasid_entry").decode(raw)


def types(host: Host, start: int) -> list[tuple[str, dict[str, int]]]:
    return [(r.type, r.fields) for r in host.intel.inv_log[start:]]


class Vm:
    """A VMM with guest RAM mapped at IOVA (= GPA) 0 and a device on a nest parent."""

    def __init__(self, host: Host | None = None, *, ats: bool = False, pri: bool = False) -> None:
        self.host = host or Host()
        h = self.host
        self.ictx = h.open_iommufd()
        self.ioas = self.ictx.ioas_alloc()
        self.ram_va = h.mmap(GUEST)
        self.ictx.ioas_map(self.ioas, self.ram_va, GUEST, iova=0)
        self.dev = h.add_device(0x100, pasid_bits=20, ats=ats, pri=pri)
        self.dev_id = self.dev.bind_iommufd(self.ictx)
        self.parent = self.ictx.hwpt_alloc(self.dev_id, self.ioas, HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_PASID)
        self.gview = h.user_view(self.ram_va, GUEST)
        self.fs = FirstStageTable(self.gview, PageAllocator(self.gview, base=0x10_0000, limit=0x20_0000))

    def nested(self, flags: int = 0, width: int = 48, pasid_flag: bool = True) -> int:
        return self.ictx.hwpt_alloc(self.dev_id, self.parent, HWPT_ALLOC_PASID if pasid_flag else 0,
                                    HwptVtdS1(flags, self.fs.root, width))


def test_host_needs_a_scalable_unit_with_qi() -> None:
    with pytest.raises(ConfigError):
        Host("qemu-7.2-default")


def test_bring_up_programs_the_unit() -> None:
    host = Host()
    regs = host.iommu.regs
    gsts = regs.get("GSTS")
    assert gsts & (1 << 31) and gsts & (1 << 26)       # TES, QIES
    assert host.iommu.root_scalable
    assert regs.get("IQA") & (1 << 11)                # 256-bit descriptors
    assert regs.get("FECTL") >> 31 == 0 and regs.get("PECTL") >> 31 == 0   # both events unmasked
    # Context entry at probe: PASID directory, DTE for ATS, PASIDE for PASID, PRE for PRI.
    host.add_device(0x10)
    host.add_device(0x0208, pasid_bits=20, pri=True)
    for sid, dte, paside, pre in ((0x10, 0, 0, 0), (0x0208, 1, 1, 1)):
        addr = host.intel.root.context_entry_addr(sid >> 8, sid & 0xFF)
        ctx = specs().structure("sm_context_entry").decode(int.from_bytes(host.ram.read(addr, 32), "little"))
        assert (ctx["P"], ctx["DTE"], ctx["PASIDE"], ctx["PRE"], ctx["RID_PASID"]) == (1, dte, paside, pre, 0)
    assert host.intel.devices[0x0208].pasid_table.pdts == 7   # 2**20 PASIDs: 16384 directory entries


def test_paging_domain_pasid_entry_and_teardown() -> None:
    vm = Vm()
    host = vm.host
    hwpt = vm.dev.attach_pt(vm.ioas)
    e = pasid_entry(host, 0x100, 0)
    dom = vm.ictx._objects[hwpt].domain
    assert (e["P"], e["PGTT"], e["AW"], e["DID"], e["PWSNP"], e["SSADE"]) == (1, 2, 3, dom.did, 1, 0)
    assert e["SSPTPTR"] << 12 == dom.table.root and dom.did >= 2
    did = dom.did
    start = len(host.intel.inv_log)
    vm.dev.detach_pt()
    assert pasid_entry(host, 0x100, 0)["P"] == 0
    assert [t for t, _ in types(host, start)] == ["pasid-cache", "iotlb"]
    pc, io = (f for _, f in types(host, start))
    assert (pc["G"], pc["DID"], pc["PASID"]) == (1, did, 0)
    assert (io["G"], io["DID"]) == (2, did)
    assert dom.did == 0 and did not in host.intel._dids   # the DID left with the last attachment


def test_nested_pasid_entry_fields() -> None:
    vm = Vm()
    host = vm.host
    vm.dev.attach_pt(vm.parent)
    n = vm.nested(VTD_S1_SRE | VTD_S1_WPE | VTD_S1_EAFE, 57)
    vm.dev.attach_pt(n, pasid=5)
    e = pasid_entry(host, 0x100, 5)
    parent = vm.ictx._objects[vm.parent].domain
    nested = vm.ictx._objects[n].domain
    assert (e["PGTT"], e["FSPM"], e["SRE"], e["WPE"], e["EAFE"], e["PGSNP"]) == (3, 1, 1, 1, 1, 1)
    assert e["FSPTPTR"] << 12 == vm.fs.root and e["SSPTPTR"] << 12 == parent.table.root
    assert e["DID"] == nested.did != parent.did and e["AW"] == parent.table.aw
    # WPE counts only with SRE; unknown flag bits are ignored.
    n2 = vm.nested(VTD_S1_WPE | 0x80)
    vm.dev.attach_pt(n2, pasid=6)
    e = pasid_entry(host, 0x100, 6)
    assert (e["SRE"], e["WPE"], e["FSPM"]) == (0, 0, 0)


@pytest.mark.parametrize("override, flags, width", [
    ({"cap.FL5LP": 0}, 0, 57), ({}, 0, 40), ({}, 0, 0), ({"ecap.SRS": 0}, VTD_S1_SRE, 48),
    ({"ecap.EAFS": 0}, VTD_S1_EAFE, 48),
])
def test_nested_attach_checks(override: dict, flags: int, width: int) -> None:
    vm = Vm(Host(VtdConfig.preset("modern", overrides=override)))
    vm.dev.attach_pt(vm.parent)
    n = vm.nested(flags, width)          # allocation checks none of it
    expect_errno(errno.EINVAL, vm.dev.attach_pt, n, pasid=5)
    expect_errno(errno.EINVAL, vm.dev.attach_pt, n)
    assert vm.dev.attached_hwpt() == vm.parent
    assert pasid_entry(vm.host, 0x100, 0)["PGTT"] == 2    # the old entry was left alone


def test_unmap_invalidations_psi_dsi_and_nested_children() -> None:
    vm = Vm(ats=True)
    host, ictx = vm.host, vm.ictx
    vm.dev.attach_pt(vm.parent)
    n = vm.nested()
    vm.dev.attach_pt(n, pasid=7)
    buf = host.mmap(16 * PAGE)
    ictx.ioas_map(vm.ioas, buf, 16 * PAGE, iova=0x100_0000 + 3 * PAGE)
    pdid = ictx._objects[vm.parent].domain.did
    ndid = ictx._objects[n].domain.did
    start = len(host.intel.inv_log)
    ictx.ioas_unmap(vm.ioas, 0x100_0000 + 3 * PAGE, 16 * PAGE)
    log = types(host, start)
    addr, pages, mask = calculate_psi_aligned_address(0x100_0000 + 3 * PAGE, 0x100_0000 + 19 * PAGE - 1)
    assert ("iotlb", {"G": 3, "DW": 1, "DR": 1, "DID": pdid, "AM": mask, "IH": 0, "ADDR": addr}) in log
    assert ("iotlb", {"G": 3, "DW": 1, "DR": 1, "DID": ndid, "AM": mask, "IH": 0, "ADDR": addr}) in log
    devtlb = [f for t, f in log if t == "device-tlb"]
    pdevtlb = [f for t, f in log if t == "pasid-device-tlb"]
    assert devtlb and devtlb[0]["S"] == 1 and devtlb[0]["SID"] == 0x100
    # The nested child's device TLB is flushed whole (S2 changes hide behind any S1 address).
    assert pdevtlb and pdevtlb[0]["PASID"] == 7 and pdevtlb[0]["ADDR"] == (1 << 63) - PAGE


def test_ranges_beyond_mamv_fall_back_to_selective_flushes() -> None:
    vm = Vm(Host(VtdConfig.preset("modern", overrides={"cap.MAMV": 2})))
    host, ictx = vm.host, vm.ictx
    vm.dev.attach_pt(vm.parent)
    n = vm.nested()
    vm.dev.attach_pt(n, pasid=7)
    pdid = ictx._objects[vm.parent].domain.did
    ndid = ictx._objects[n].domain.did
    buf = host.mmap(16 * PAGE)
    ictx.ioas_map(vm.ioas, buf, 16 * PAGE, iova=0x100_0000)
    start = len(host.intel.inv_log)
    ictx.ioas_unmap(vm.ioas, 0x100_0000, 16 * PAGE)
    assert {(f["G"], f["DID"]) for t, f in types(host, start) if t == "iotlb"} == {(2, pdid), (2, ndid)}
    start = len(host.intel.inv_log)
    ictx.hwpt_invalidate(n, [VtdS1Invalidate(0, 8)])
    assert types(host, start) == [("pasid-iotlb", {"G": 2, "DID": ndid, "PASID": 7, "AM": 0, "IH": 0, "ADDR": 0})]


def test_psi_alignment() -> None:
    assert calculate_psi_aligned_address(0x1000, 0x1FFF) == (0x1000, 1, 0)
    assert calculate_psi_aligned_address(0x3000, 0x12FFF) == (0, 32, 5)
    assert calculate_psi_aligned_address(0x8000, 0xFFFF) == (0x8000, 8, 3)
    assert calculate_psi_aligned_address(0, (1 << 64) - 1)[2] == 52


def test_hwpt_invalidate_descriptors() -> None:
    vm = Vm(ats=True)
    host, ictx = vm.host, vm.ictx
    vm.dev.attach_pt(vm.parent)
    n = vm.nested()
    vm.dev.attach_pt(n, pasid=7)
    ndid = ictx._objects[n].domain.did
    start = len(host.intel.inv_log)
    assert ictx.hwpt_invalidate(n, [VtdS1Invalidate(0x7000, 1, VTD_INV_FLAGS_LEAF),
                                    VtdS1Invalidate(0, 0xFFFF_FFFF_FFFF_FFFF)]) == 2
    log = types(host, start)
    assert log[0] == ("pasid-iotlb", {"G": 3, "DID": ndid, "PASID": 7, "AM": 0, "IH": 1, "ADDR": 0x7000})
    assert log[1][0] == "pasid-device-tlb" and log[1][1]["S"] == 0 and log[1][1]["ADDR"] == 0x7000
    assert log[2] == ("pasid-iotlb", {"G": 2, "DID": ndid, "PASID": 7, "AM": 0, "IH": 0, "ADDR": 0})
    assert log[3][0] == "pasid-device-tlb" and log[3][1]["S"] == 1
    # The RID attachment of a nested domain is tagged with PASID 0 (RID_PASID).
    vm.dev.attach_pt(n)
    start = len(host.intel.inv_log)
    ictx.hwpt_invalidate(n, [VtdS1Invalidate(0x7000, 2)])
    got = {(t, f.get("PASID")) for t, f in types(host, start)}
    assert got == {("pasid-iotlb", 0), ("pasid-iotlb", 7), ("device-tlb", None), ("pasid-device-tlb", 7)}


def test_pasid_replace_flushes_the_old_did() -> None:
    vm = Vm()
    host, ictx = vm.host, vm.ictx
    vm.dev.attach_pt(vm.parent)
    a, b = vm.nested(), vm.nested()
    vm.dev.attach_pt(a, pasid=3)
    adid = ictx._objects[a].domain.did
    start = len(host.intel.inv_log)
    vm.dev.attach_pt(b, pasid=3)
    assert types(host, start) == [("pasid-cache", {"G": 1, "DID": adid, "PASID": 3}),
                                  ("pasid-iotlb", {"G": 2, "DID": adid, "PASID": 3, "AM": 0, "IH": 0, "ADDR": 0})]
    assert pasid_entry(host, 0x100, 3)["DID"] == ictx._objects[b].domain.did
    # The DID of a domain with no attachment left is free again.
    assert adid not in host.intel._dids


def _guest_rw(vm: Vm, gva: int, gpa: int) -> None:
    vm.fs.map(gva, gpa, PAGE, W | U)


def test_stage1_changes_need_hwpt_invalidate() -> None:
    """The unit caches nested translations: a guest remap is invisible until HWPT_INVALIDATE."""
    vm = Vm()
    ictx = vm.ictx
    vm.dev.attach_pt(vm.parent)
    n = vm.nested()
    vm.dev.attach_pt(n, pasid=4)
    gva = 0x4000_0000
    _guest_rw(vm, gva, 0x30_0000)
    assert vm.dev.dma_write(gva, b"one", pasid=4).ok
    assert vm.gview.read(0x30_0000, 3) == b"one"
    vm.fs.unmap(gva, PAGE)
    _guest_rw(vm, gva, 0x31_0000)
    vm.dev.dma_write(gva, b"two", pasid=4)
    assert vm.gview.read(0x30_0000, 3) == b"two" and vm.gview.read(0x31_0000, 3) == bytes(3)  # stale IOTLB
    ictx.hwpt_invalidate(n, [VtdS1Invalidate(gva, 1)])
    vm.dev.dma_write(gva, b"new", pasid=4)
    assert vm.gview.read(0x31_0000, 3) == b"new"


def test_stage1_changes_reach_the_device_tlb() -> None:
    vm = Vm(ats=True)
    ictx = vm.ictx
    vm.dev.attach_pt(vm.parent)
    n = vm.nested()
    vm.dev.attach_pt(n, pasid=4)
    gva = 0x4000_0000
    _guest_rw(vm, gva, 0x30_0000)
    assert vm.dev.dma_write(gva, b"one", pasid=4).ok
    assert vm.dev.endpoint.lookup(gva, 4) is not None
    vm.fs.unmap(gva, PAGE)
    _guest_rw(vm, gva, 0x31_0000)
    vm.dev.dma_write(gva, b"two", pasid=4)
    assert vm.gview.read(0x30_0000, 3) == b"two"     # the device's own TLB still has the old page
    ictx.hwpt_invalidate(n, [VtdS1Invalidate(gva, 1, VTD_INV_FLAGS_LEAF)])
    assert vm.dev.endpoint.lookup(gva, 4) is None
    vm.dev.dma_write(gva, b"new", pasid=4)
    assert vm.gview.read(0x31_0000, 3) == b"new"


def test_unmap_reaches_the_iotlb() -> None:
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev = host.add_device(0x10)
    dev.bind_iommufd(ictx)
    dev.attach_pt(ioas)
    buf = host.mmap(PAGE)
    ictx.ioas_map(ioas, buf, PAGE, iova=0x8000)
    assert dev.dma_read(0x8000, 4).ok                  # now cached in the IOTLB
    ictx.ioas_unmap(ioas, 0x8000, PAGE)
    out = dev.dma_read(0x8000, 4)
    assert not out.ok and out.fault_name is not None
    assert host.dmar_faults[-1].record.addr == 0x8000 and host.dmar_faults[-1].record.sid == 0x10
    # The driver's fault handler cleared the record.
    assert host.iommu.fault_records() == []
    assert host.iommu.regs.get("FSTS") & 2 == 0
    ictx.close()


def test_invalidation_queue_wraps() -> None:
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev = host.add_device(0x10)
    dev.bind_iommufd(ictx)
    dev.attach_pt(ioas)
    buf = host.mmap(PAGE)
    for i in range(150):
        iova = ictx.ioas_map(ioas, buf, PAGE)
        ictx.ioas_unmap(ioas, iova, PAGE)
    regs = host.iommu.regs
    assert regs.get("IQH") == regs.get("IQT")
    assert host.iommu.qi.counts[2] >= 150 and regs.get("FSTS") & (1 << 4) == 0
    ictx.close()


def test_dirty_tracking_sets_ssade_with_flushes() -> None:
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev = host.add_device(0x10)
    dev_id = dev.bind_iommufd(ictx)
    hwpt = ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_DIRTY_TRACKING)
    dev.attach_pt(hwpt)
    start = len(host.intel.inv_log)
    ictx.hwpt_set_dirty_tracking(hwpt, True)
    assert pasid_entry(host, 0x10, 0)["SSADE"] == 1
    assert [t for t, _ in types(host, start)] == ["pasid-cache", "iotlb"]
    ictx.hwpt_set_dirty_tracking(hwpt, False)
    assert pasid_entry(host, 0x10, 0)["SSADE"] == 0
    ictx.close()


def test_release_device_clears_its_context() -> None:
    host = Host()
    dev = host.add_device(0x10)
    host.intel.release_device(dev.info)
    addr = host.intel.root.context_entry_addr(0, 0x10)
    assert host.ram.read_u64(addr) & 1 == 0


def test_caching_mode_unit_gets_flushed_on_map_and_attach() -> None:
    host = Host(VtdConfig.preset("modern", overrides={"cap.CM": 1}))
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev = host.add_device(0x10)
    dev.bind_iommufd(ictx)
    hwpt = dev.attach_pt(ioas)
    did = ictx._objects[hwpt].domain.did
    buf = host.mmap(PAGE)
    host.write_user(buf, b"cm")
    assert not dev.dma_read(0x10000, 2).ok
    start = len(host.intel.inv_log)
    ictx.ioas_map(ioas, buf, PAGE, iova=0x10000)
    # With CM=1 a not-present to present change is flushed too (the unit may cache not-present).
    assert types(host, start) == [("iotlb", {"G": 3, "DW": 1, "DR": 1, "DID": did, "AM": 0, "IH": 0,
                                             "ADDR": 0x10000})]
    assert dev.dma_read(0x10000, 2).data == b"cm"
    ictx.close()
