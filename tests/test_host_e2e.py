"""End to end: a VMM maps guest RAM into an IOAS, allocates a nest-parent HWPT and a nested VT-d stage-1
HWPT over a first-stage table the guest wrote in its RAM, attaches it to a PASID of a passthrough
device; the device's DMA with that PASID lands at the host-physical address the two stages give, and
a page fault travels to the fault file, the VMM answers it, and the DMA resumes.
"""

from __future__ import annotations

from vtd_emu.tables import PAGE_2M, FirstStageTable, PageAllocator, U, W
from vtd_emu.host import (HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID, PAGE_RESP_SUCCESS, Host, HwptVtdS1, PageFault,
                          VtdS1Invalidate, page_response)

PAGE = 4096
GUEST_RAM = 8 << 20
PASID = 0x42


def test_nested_passthrough_dma_and_iopf_round_trip() -> None:
    host = Host("modern")
    vmm = host.open_iommufd()

    # Guest RAM: VMM memory, mapped at IOVA = GPA 0.
    ram_va = host.mmap(GUEST_RAM)
    ioas = vmm.ioas_alloc()
    assert vmm.ioas_map(ioas, ram_va, GUEST_RAM, iova=0) == 0

    dev = host.add_device(0x0310, pasid_bits=20, pri=True)
    dev_id = dev.bind_iommufd(vmm)
    info = vmm.get_hw_info(dev_id)
    assert info.vtd is not None and info.max_pasid_log2 == 20

    parent = vmm.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_PASID)
    assert dev.attach_pt(parent) == parent      # requests without PASID: GPA = IOVA

    # The guest builds a 4-level first-stage table in its own RAM (every pointer a GPA).
    guest = host.user_view(ram_va, GUEST_RAM)
    fs = FirstStageTable(guest, PageAllocator(guest, base=0x10_0000, limit=0x20_0000), levels=4)
    gva = 0x7F12_3400_0000
    fs.map(gva, 0x40_0000, 4 * PAGE, W | U)
    fs.map(gva + PAGE_2M, 0x60_0000, PAGE_2M, W | U, page_size=PAGE_2M)

    fault_id, fault_file = vmm.fault_queue_alloc()
    s1 = HwptVtdS1(flags=0, pgtbl_addr=fs.root, addr_width=48)
    nested = vmm.hwpt_alloc(dev_id, parent, HWPT_ALLOC_PASID, s1, fault_id=fault_id)
    assert dev.attach_pt(nested, pasid=PASID) == nested

    def hpa_of(gpa: int) -> int:
        page = host.process._page(ram_va + (gpa & ~(PAGE - 1)), create=False)
        assert page is not None
        return page + (gpa & (PAGE - 1))

    # DMA through both stages: GVA -> GPA (guest table, walked through stage 2) -> HPA (the IOAS).
    out = dev.dma_write(gva + 2 * PAGE + 0x18, b"two stages", pasid=PASID)
    assert out.ok
    assert host.ram.read(hpa_of(0x40_0000 + 2 * PAGE + 0x18), 10) == b"two stages"
    out = dev.dma_write(gva + PAGE_2M + 0x12345, b"big page", pasid=PASID)   # inside the 2 MiB guest page
    assert out.ok
    assert host.ram.read(hpa_of(0x60_0000 + 0x12345), 8) == b"big page"
    assert dev.dma_read(gva + 2 * PAGE + 0x18, 10, pasid=PASID).data == b"two stages"
    # Without the PASID the same address means a GPA: outside guest RAM, so it faults.
    assert not dev.dma_read(gva, 4).ok
    assert guest.read(0x40_0000 + 2 * PAGE + 0x18, 10) == b"two stages"

    # A page fault: the device asks for a page the guest has not mapped yet.
    missing = gva + 16 * PAGE
    out = dev.dma_write(missing + 8, b"after fault", pasid=PASID)
    assert out.pending and out.page_requests == 1
    assert fault_file.poll()
    rec = PageFault.parse_all(fault_file.read(40 * 4))
    assert len(rec) == 1
    r = rec[0]
    assert (r.dev_id, r.pasid, r.addr, r.flags & 3, r.perm & 2) == (dev_id, PASID, missing, 3, 2)
    # The guest handles it (maps the page, invalidates as its vIOMMU would forward), the VMM answers.
    fs.map(missing, 0x48_0000, PAGE, W | U)
    assert vmm.hwpt_invalidate(nested, [VtdS1Invalidate(missing, 1)]) == 1
    assert fault_file.write(page_response(r.cookie, PAGE_RESP_SUCCESS)) == 8
    assert out.ok and not out.pending and out.responses == [0]
    assert host.ram.read(hpa_of(0x48_0000 + 8), 11) == b"after fault"

    # Everything comes back: no object, no pin, no DID left.
    fault_file.close()
    vmm.close()
    assert host.pinned_pages == 0
    assert host.intel._dids == set()
    assert host.iommu.unmatched_responses == []
