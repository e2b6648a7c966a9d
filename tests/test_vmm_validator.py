"""The vSVA validator on live machines: each kind of mistake, made on purpose by a guest that otherwise
follows Linux (GuestDriver), gives exactly the report expected — kind, device, PASID, and for stale
translations both answers computed independently (the builder's model of the guest table and the VMM's
page table) — and the same flows done right give none.  Off, the validator costs nothing: no hook exists."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from vtd_emu.host import IommufdError
from vtd_emu.spec import specs
from vtd_emu.spec.consts import FR
from vtd_emu.tables import PGTT_FS, FirstStageTable, R, U, W
from vtd_emu.vmm import GuestDriver, Machine
from vtd_emu.vmm.validator import KINDS, Validator, VsvaReport
from vtd_emu.vtd.faults import reason_name
from vtd_emu.vtd.qi import T_IOTLB, T_PIOTLB, make_descriptor

from vmm_helpers import expected_hpa

SID, EMU = 0x0310, 0x0320
PASID = 0x42
GVA = 0x7F12_3400_0000
PAGE = 4096
OLD, NEW = 0x90_0000, 0x98_0000


def machine(*, emulated: bool = False) -> tuple[Machine, Validator, GuestDriver]:
    m = Machine(guest_ram=16 << 20)
    m.add_passthrough_device(SID)
    if emulated:
        m.add_emulated_device(EMU)
    val = Validator(m)
    drv = GuestDriver(m, val.mem, alloc_base=0x10_0000, alloc_limit=0x80_0000)
    drv.init()
    return m, val, drv


def bound(sid: int = SID, *, emulated: bool = False) -> tuple[Machine, Validator, GuestDriver, FirstStageTable, int]:
    m, val, drv = machine(emulated=emulated)
    fs = FirstStageTable(val.mem, drv.alloc, levels=4)
    fs.map(GVA, OLD, 4 * PAGE, R | W | U)
    dom = drv.bind_pasid(sid, PASID, fs.root)
    assert m.devices[sid].dma_write(GVA + 0x10, b"first", pasid=PASID).ok
    return m, val, drv, fs, dom.did


def kinds(val: Validator) -> list[tuple[str, int | None, int | None]]:
    return [(r.kind, r.sid, r.pasid) for r in val.reports]


def entry_addr(drv: GuestDriver, sid: int, pasid: int) -> int:
    pt = drv.devices[sid].pasid_table
    assert pt is not None
    addr = pt.entry_addr(pasid)
    assert addr is not None
    return addr


def rebind_in_place(drv: GuestDriver, sid: int, did: int, root: int) -> None:
    """The bound PASID entry pointed at another table in one store (P stays 1)."""
    pt = drv.devices[sid].pasid_table
    assert pt is not None
    pt.set_entry(PASID, pgtt=PGTT_FS, did=did, aw=drv.agaw, fsptptr=root, extra={"PWSNP": drv._ecapf("SMPWC")})


def test_linux_like_flows_done_right_give_no_report() -> None:
    m, val, drv, fs, did = bound()
    dev = m.devices[SID]
    fs.unmap(GVA, PAGE)
    fs.map(GVA, NEW, PAGE, R | W | U)
    drv.flush_sva_range(drv.devices[SID].attached[PASID], GVA, PAGE)
    assert dev.dma_write(GVA + 0x10, b"fresh", pasid=PASID).ok
    drv.unbind_pasid(SID, PASID)
    other = FirstStageTable(val.mem, drv.alloc, levels=4)
    other.map(GVA, NEW, PAGE, R | W | U)
    drv.bind_pasid(SID, PASID, other.root)
    assert dev.dma_read(GVA, 4, pasid=PASID).ok
    dom = drv.domain_alloc("fs")
    drv.attach_device(SID, dom)
    drv.map(dom, 0x1000_0000, 0xC0_0000, 8 * PAGE, R | W)
    assert dev.dma_write(0x1000_0000, b"x" * 64).ok
    for i in range(8):
        drv.unmap(dom, 0x1000_0000 + i * PAGE, PAGE)
    m.reset()
    assert val.reports == [] and val.summary() == "validator: no findings"
    m.close()


def test_a_remap_without_piotlb_is_a_stale_host_translation_with_both_answers() -> None:
    m, val, drv, fs, did = bound()
    old_hpa = expected_hpa(m, fs, GVA + 0x10)
    fs.unmap(GVA, PAGE)
    fs.map(GVA, NEW, PAGE, R | W | U)
    new_hpa = expected_hpa(m, fs, GVA + 0x10)
    assert old_hpa is not None and new_hpa is not None and old_hpa != new_hpa
    m.devices[SID].dma_write(GVA + 0x10, b"stale", pasid=PASID)
    (rep,) = val.reports
    assert (rep.kind, rep.sid, rep.pasid, rep.cached, rep.fresh) == ("stale-host", SID, PASID, old_hpa, new_hpa)
    assert rep.action == m.guest_actions and rep.event is None
    # With the driver's log, a finding names the driver's last action; an explicit event wins.
    val.log = drv.log
    m.devices[SID].dma_read(GVA + 0x10, 4, pasid=PASID)
    assert val.reports[-1].event == len(drv.log) - 1 and val.reports[-1].kind == "stale-host"
    val.event = 1234
    m.devices[SID].dma_read(GVA + 0x10, 4, pasid=PASID)
    assert val.reports[-1].event == 1234
    m.close()


def test_an_emulated_device_reading_a_stale_vIOMMU_entry() -> None:
    m, val, drv, fs, did = bound(EMU, emulated=True)
    fs.unmap(GVA, PAGE)
    fs.map(GVA, NEW, PAGE, R | W | U)
    m.devices[EMU].dma_read(GVA + 0x10, 4, pasid=PASID)
    (rep,) = val.reports
    assert (rep.kind, rep.sid, rep.pasid, rep.cached, rep.fresh) == ("stale-viommu", EMU, PASID, OLD + 0x10,
                                                                      NEW + 0x10)
    m.close()


@pytest.mark.parametrize("then", ["dma", "wait"])
def test_a_bound_pasid_entry_changed_without_pasid_cache_invalidation(then: str) -> None:
    m, val, drv, fs, did = bound()
    other = FirstStageTable(val.mem, drv.alloc, levels=4)
    other.map(GVA, NEW, PAGE, R | W | U)
    rebind_in_place(drv, SID, did, other.root)
    assert val.reports == []          # not yet: the unit has not used it
    if then == "dma":
        m.devices[SID].dma_read(GVA, 4, pasid=PASID)
        details = "used by a DMA"
    else:
        drv.qi_submit([drv.invalidate_piotlb(2, did, PASID)])
        details = "an invalidation wait was reached"
    (rep,) = val.reports
    assert (rep.kind, rep.sid, rep.pasid) == ("entry-changed", SID, PASID)
    assert details in rep.details and f"{entry_addr(drv, SID, PASID):#x}" in rep.details
    # Once invalidated, the same change is fine; a DMA after that reports nothing more.
    drv.qi_submit([drv.invalidate_pasid_cache(1, did, PASID)])
    m.devices[SID].dma_read(GVA, 4, pasid=PASID)
    assert len(val.reports) == 1
    m.close()


def test_an_entry_cached_by_the_vIOMMU_changed_under_an_emulated_device() -> None:
    m, val, drv, fs, did = bound(EMU, emulated=True)   # the DMA cached EMU's context and PASID entries
    other = FirstStageTable(val.mem, drv.alloc, levels=4)
    other.map(GVA, NEW, PAGE, R | W | U)
    rebind_in_place(drv, EMU, did, other.root)
    m.devices[EMU].dma_read(GVA + 0x10, 4, pasid=PASID)
    # The change is found before the DMA uses it, and the sanitizer sees the cached translation is stale.
    assert kinds(val) == [("entry-changed", EMU, PASID), ("stale-viommu", EMU, PASID)]
    assert (val.reports[1].cached, val.reports[1].fresh) == (OLD + 0x10, NEW + 0x10)
    # A context entry changed in place (FPD set) is reported against the device, without PASID.
    root = drv.root
    assert root is not None
    caddr = root.context_entry_addr(EMU >> 8, EMU & 0xFF)
    assert caddr is not None
    val.mem.write_u64(caddr, val.mem.read_u64(caddr) | 2)
    m.devices[EMU].dma_read(GVA + 0x10, 4, pasid=PASID)
    # (the PASID entry was never invalidated: the cached translation is still stale, and says so again)
    assert kinds(val)[2:] == [("entry-changed", EMU, None), ("stale-viommu", EMU, PASID)]
    assert "context entry" in val.reports[2].details
    m.close()


def test_the_same_change_followed_by_the_invalidation_is_not_a_finding() -> None:
    m, val, drv, fs, did = bound()
    other = FirstStageTable(val.mem, drv.alloc, levels=4)
    other.map(GVA, NEW, PAGE, R | W | U)
    rebind_in_place(drv, SID, did, other.root)
    drv.qi_submit([drv.invalidate_pasid_cache(1, did, PASID), drv.invalidate_piotlb(2, did, PASID)])
    assert m.devices[SID].dma_write(GVA, b"hitless", pasid=PASID).ok
    assert m.mem.read(NEW, 7) == b"hitless" and val.reports == []
    m.close()


def test_an_in_place_rewrite_by_two_stores_is_a_torn_update_once() -> None:
    m, val, drv, fs, did = bound()
    val.log = drv.log
    other = FirstStageTable(val.mem, drv.alloc, levels=4)
    other.map(GVA, NEW, PAGE, R | W | U)
    addr = entry_addr(drv, SID, PASID)
    lay = specs().structure("pasid_entry")
    value = int.from_bytes(val.mem.read(addr, 64), "little")
    value = lay.field("FSPTPTR").put(value, other.root >> 12)
    val.mem.write_u64(addr + 16, value >> 128 & (1 << 64) - 1)
    assert val.reports == []
    value = lay.field("PGSNP").put(value, 1)
    val.mem.write_u64(addr + 8, value >> 64 & (1 << 64) - 1)
    val.mem.write_u64(addr + 24, 0)   # unchanged bytes: not a third store that changes anything
    n_log = len(drv.log)
    drv.qi_submit([drv.invalidate_pasid_cache(1, did, PASID), drv.invalidate_piotlb(2, did, PASID)])
    assert kinds(val) == [("torn-update", SID, PASID)]
    assert val.reports[0].event == n_log - 1    # found at the second store, before the driver's next action
    # The Linux way (clear P, invalidate, rewrite) is not torn.
    drv.unbind_pasid(SID, PASID)
    drv.bind_pasid(SID, PASID, fs.root)
    assert len(val.reports) == 1
    m.close()


def test_reserved_bits_in_a_queued_descriptor_and_in_a_pasid_entry() -> None:
    m, val, drv, fs, did = bound()
    bad = make_descriptor(T_PIOTLB, G=2, DID=did, PASID=PASID)
    drv.qi_submit([(bad[0] | 1 << 8, bad[1])])           # qw0 bit 8 is reserved in type 6
    assert kinds(val) == [("reserved-bits", None, None)] and "0x100" in val.reports[0].details
    addr = entry_addr(drv, SID, PASID)
    rsvd = specs().structure("pasid_entry").field("RSVD1")
    q1 = val.mem.read_u64(addr + 8)
    val.mem.write_u64(addr + 8, q1 | 1 << (rsvd.lo - 64))
    drv.qi_submit([drv.invalidate_pasid_cache(1, did, PASID)])
    assert [(r.kind, r.sid, r.pasid) for r in val.reports[1:]] == [("reserved-bits", SID, PASID)]
    assert f"{FR.SM_PASID_ENTRY_RSVD:#x}" in val.reports[1].details
    m.close()


def test_wrong_granularity_am_alignment_and_pasid_scope() -> None:
    m, val, drv, fs, did = bound()
    mamv = m.viommu.cfg.cap_field("MAMV")
    drv.qi_submit([drv.invalidate_piotlb(3, did, PASID, GVA, mamv + 1)])
    drv.qi_submit([drv.invalidate_piotlb(3, did, PASID, GVA + PAGE, 1)])
    other = FirstStageTable(val.mem, drv.alloc, levels=4)
    rebind_in_place(drv, SID, did, other.root)
    drv.qi_submit([drv.invalidate_pasid_cache(1, did, PASID), drv.invalidate_piotlb(3, did, PASID, GVA, 0)])
    drv.qi_submit([make_descriptor(T_IOTLB, G=3, DID=did, ADDR=GVA, AM=0)])
    got = [(r.kind, r.pasid) for r in val.reports]
    assert got == [("wrong-granularity", PASID)] * 3 + [("wrong-granularity", PASID)]
    assert "above CAP.MAMV" in val.reports[0].details and "not aligned to 2^1 pages" in val.reports[1].details
    assert "needs PASID-selective" in val.reports[2].details and "type-2" in val.reports[3].details
    m.close()


def test_a_refused_bind_and_a_failed_forward_name_the_errno() -> None:
    m, val, drv, fs, did = bound()
    orig_alloc, orig_inv = m.vmm.hwpt_alloc, m.vmm.hwpt_invalidate

    def refuse(*a: Any, **kw: Any) -> Any:
        raise IommufdError(errno.ENOSPC, "injected")

    m.vmm.hwpt_alloc = refuse  # type: ignore[method-assign]
    other = FirstStageTable(val.mem, drv.alloc, levels=4)
    drv.unbind_pasid(SID, PASID)
    drv.bind_pasid(SID, PASID, other.root)
    m.vmm.hwpt_alloc = orig_alloc  # type: ignore[method-assign]
    refused = [r for r in val.reports if r.kind == "bind-refused"]
    assert [(r.sid, r.pasid) for r in refused] == [(SID, PASID)] and "ENOSPC" in refused[0].details
    drv.qi_submit([drv.invalidate_pasid_cache(3)])       # bound again
    n = len(val.reports)

    def fail_inv(hwpt: int, entries: Any, **kw: Any) -> int:
        raise IommufdError(errno.EINVAL, "injected", entry_num=0)

    m.vmm.hwpt_invalidate = fail_inv  # type: ignore[method-assign]
    drv.qi_submit([drv.invalidate_piotlb(2, did, PASID)])
    m.vmm.hwpt_invalidate = orig_inv  # type: ignore[method-assign]
    assert [r.kind for r in val.reports[n:]] == ["forward-failed"] and "EINVAL" in val.reports[n].details
    m.close()


def test_reports_are_data_with_a_readable_summary() -> None:
    r = VsvaReport("stale-host", 7, 12, SID, PASID, "iova 0x1000 (read)", 0x2000, -FR.SM_FS_ENTRY_P)
    assert r.text() == ("event 12: stale-host: sid 0x0310 pasid 0x42: iova 0x1000 (read): cached 0x2000, memory says "
                        f"fault {FR.SM_FS_ENTRY_P:#x} {reason_name(FR.SM_FS_ENTRY_P)}")
    assert r.to_dict()["cached"] == 0x2000 and r.kind in KINDS


def test_off_by_default_and_free_when_off() -> None:
    m = Machine(guest_ram=16 << 20)
    m.add_passthrough_device(SID)
    observers = (len(m.viommu.invalidation_observers), len(m.viommu.control_observers), len(m.bridge.listeners))
    assert "xlate" not in vars(m.viommu) and "xlate" not in vars(m.host.iommu) and "mmio_write" not in vars(m)
    Validator(m)
    assert "xlate" in vars(m.viommu) and "xlate" in vars(m.host.iommu) and "mmio_write" in vars(m)
    assert (len(m.viommu.invalidation_observers), len(m.viommu.control_observers), len(m.bridge.listeners)) == \
        (observers[0] + 1, observers[1] + 1, observers[2] + 1)
    m.close()
