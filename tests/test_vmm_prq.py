"""Page requests of a PRI passthrough device reach the guest: the host IOMMU's page request goes to the
machine's fault queue, the VMM hands it to the vIOMMU (a descriptor in the guest's page request queue,
naming the guest's requester id), the guest maps the page and answers with a page group response, the
VMM answers the host, and the device's DMA resumes and lands where the guest's table now says.  QEMU
has no such path (page requests work only for its emulated devices)."""

from __future__ import annotations

from vtd_emu.spec import specs
from vtd_emu.spec.consts import FR
from vtd_emu.tables import U, W
from vtd_emu.vmm import Machine
from vtd_emu.vtd.qi import T_PAGE_RESPONSE, make_descriptor

from vmm_helpers import RawGuest, expected_hpa, reg

SID = 0x0310
PASID = 9
GVA = 0x7F00_0000_0000
PAGE = 4096


def setup(pre: bool = True) -> tuple[Machine, RawGuest, object]:
    m = Machine(guest_ram=16 << 20)
    dev = m.add_passthrough_device(SID, pri=True)
    g = RawGuest(m)
    g.device(SID, pre=pre)
    g.enable()
    prq = g.alloc.alloc()
    m.mmio_write(reg("PQH"), 0, 8)
    m.mmio_write(reg("PQT"), 0, 8)
    m.mmio_write(reg("PQA"), prq, 8)                      # PQS 0: one page, 128 requests
    return m, g, (dev, prq)


def read_requests(m: Machine, prq: int) -> list[dict[str, int]]:
    """The guest's page request handler: every descriptor from PQH to PQT, then PQH := PQT."""
    lay = specs().structure("page_request")
    head, tail = m.mmio_read(reg("PQH"), 8), m.mmio_read(reg("PQT"), 8)
    out = []
    while head != tail:
        v = int.from_bytes(m.mem.read(prq + head, 32), "little")
        out.append({n: lay.field(n).get(v) for n in ("RID", "PP", "PASID", "WR", "RD", "LPIG", "PRGI", "ADDR")})
        head = (head + 32) % PAGE
    m.mmio_write(reg("PQH"), head, 8)
    return out


def test_a_page_request_travels_to_the_guest_and_its_answer_resumes_the_dma() -> None:
    m, g, (dev, prq) = setup()
    fs = g.fs_table()
    fs.map(GVA, 0x80_0000, PAGE, W | U)
    g.bind_fs(SID, PASID, fs, 5)
    assert m.bridge.binds[(SID, PASID)].iopf
    out = dev.dma_write(GVA + PAGE + 0x10, b"faulted in", pasid=PASID)
    assert out.pending == 1 and not out.ok and len(dev.stalled) == 1
    (req,) = read_requests(m, prq)
    assert (req["RID"], req["PP"], req["PASID"], req["WR"], req["LPIG"], req["ADDR"] << 12) == (
        SID, 1, PASID, 1, 1, GVA + PAGE)
    # The guest makes the page present (first-stage not-present -> present needs no invalidation) and
    # answers the group.
    fs.map(GVA + PAGE, 0x90_0000, PAGE, W | U)
    assert g.submit(make_descriptor(T_PAGE_RESPONSE, RID=SID, PP=1, PASID=PASID, PRGI=req["PRGI"], RC=0))
    assert dev.stalled == []
    hpa = expected_hpa(m, fs, GVA + PAGE + 0x10)
    assert hpa is not None and m.host.ram.read(hpa, 10) == b"faulted in"
    calls = [a.call for a in m.bridge.actions if a.trigger.kind in ("page-request", "page-response")]
    assert calls == ["read_faults", "page_response"]
    m.close()
    assert m.objects() == [] and m.host.pinned_pages == 0


def test_an_invalid_response_ends_the_dma_and_no_pre_means_a_plain_fault() -> None:
    m, g, (dev, prq) = setup()
    fs = g.fs_table()
    g.bind_fs(SID, PASID, fs, 5)
    assert dev.dma_write(GVA, b"x", pasid=PASID).pending == 1
    (req,) = read_requests(m, prq)
    assert g.submit(make_descriptor(T_PAGE_RESPONSE, RID=SID, PP=1, PASID=PASID, PRGI=req["PRGI"], RC=1))
    (stalled,) = [a for a in m.bridge.actions if a.call == "page_response"]
    assert stalled.args["code"] == 1 and dev.stalled == []
    m.close()
    # Without PRE in the guest's context the bind has no fault queue: the DMA faults at once.
    m, g, (dev, prq) = setup(pre=False)
    fs = g.fs_table()
    g.bind_fs(SID, PASID, fs, 5)
    assert not m.bridge.binds[(SID, PASID)].iopf
    out = dev.dma_write(GVA, b"x", pasid=PASID)
    assert out.pending == 0 and out.faults and read_requests(m, prq) == []
    m.close()


def test_a_request_the_vIOMMU_refuses_is_answered_for_the_guest() -> None:
    m, g, (dev, prq) = setup()
    fs = g.fs_table()
    g.bind_fs(SID, PASID, fs, 5)
    # The guest clears PRE without telling anyone: the bind still forwards page requests, the vIOMMU
    # refuses the request (recording "PRE clear" for the guest) and answers INVALID itself.
    pt = g.pasids[SID]
    g.rt.set_context(SID >> 8, SID & 0xFF, pasid_dir=pt.dir, pdts=pt.pdts, pre=False, dte=True)
    out = dev.dma_write(GVA, b"x", pasid=PASID)
    assert out.pending == 0 and out.faults == (0,) and dev.stalled == []
    assert read_requests(m, prq) == []
    assert [r.reason for r in m.viommu.fault_records()] == [FR.SM_PRE_CLEAR]
    (resp,) = [a for a in m.bridge.actions if a.call == "page_response"]
    assert resp.args["code"] == 1 and resp.trigger.kind == "page-response" and resp.errno is None
    m.close()


def test_fail_nth_over_the_page_request_path() -> None:
    """The n-th host call of the flow fails (fault queue allocation, the read of the fault queue, the
    response, and every bind call): no exception, the bind refused (0x5B) when it cannot get its fault
    queue, a failed read or response retried later, the DMA completed once the host stops failing, and
    nothing leaked."""
    from vtd_emu.host.iommufd import FaultFile

    from test_vmm_fail_nth import BridgeCallInjector

    failed: set[str] = set()
    n = 1
    while True:
        m, g, (dev, prq) = setup()
        inj = BridgeCallInjector(m, dev, n)  # type: ignore[arg-type]
        m.vmm.fault_queue_alloc = inj._wrap(m.vmm.fault_queue_alloc)  # type: ignore[method-assign]
        orig_read, orig_write = FaultFile.read, FaultFile.write
        FaultFile.read = inj._wrap(orig_read)  # type: ignore[method-assign]
        FaultFile.write = inj._wrap(orig_write)  # type: ignore[method-assign]
        try:
            fs = g.fs_table()
            g.bind_fs(SID, PASID, fs, 5)
            bind = m.bridge.binds[(SID, PASID)]
            out = dev.dma_write(GVA + 0x20, b"eventually", pasid=PASID)
            if bind.refused:
                assert bind.reason & 0xFF == FR.SM_PASID_ENTRY_INV and out.faults == (FR.SM_PASID_ENTRY_INV,)
            else:
                assert out.pending == 1
                fs.map(GVA, 0x90_0000, PAGE, W | U)
                inj.n = -1 if inj.fired else inj.n
                reqs = read_requests(m, prq)
                if not reqs:                                  # the read failed: the next wake-up reads it
                    m.bridge.service_faults()
                    reqs = read_requests(m, prq)
                (req,) = reqs
                g.submit(make_descriptor(T_PAGE_RESPONSE, RID=SID, PP=1, PASID=PASID, PRGI=req["PRGI"], RC=0))
                if dev.stalled:                               # the response failed: sent at the next trigger
                    inj.n = -1
                    g.submit()
                assert dev.stalled == []
                hpa = expected_hpa(m, fs, GVA + 0x20)
                assert hpa is not None and m.host.ram.read(hpa, 10) == b"eventually"
        finally:
            FaultFile.read, FaultFile.write = orig_read, orig_write  # type: ignore[method-assign]
        fired = inj.fired
        failed |= {a.call for a in m.bridge.actions if a.errno is not None}
        m.close()
        assert m.objects() == [] and m.host.pinned_pages == 0
        if not fired:
            break
        n += 1
    assert {"fault_queue_alloc", "hwpt_alloc", "attach", "read_faults", "page_response"} <= failed
