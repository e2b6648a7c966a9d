"""Fault queues and I/O page faults — iommufd.md §2 FAULT_QUEUE_ALLOC, §5 (fault fd read/write rules,
unanswered faults) and the Intel driver's page request queue handling.

Page requests come from devices with PRI through the physical unit's page request queue; the driver
reads them on the page-request interrupt and hands them to the fault queue of the HWPT they hit.
"""

from __future__ import annotations

import errno

import pytest

from vtd_emu.host import (HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID, Host, HwptVtdS1, IommufdError, PageFault,
                          page_response)
from vtd_emu.host.uapi import IommuHwptPageResponse

PAGE = 4096


def expect_errno(err: int, fn, *args, **kwargs) -> IommufdError:
    with pytest.raises(IommufdError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == err, f"expected {errno.errorcode[err]}, got {ei.value.name}: {ei.value}"
    return ei.value


@pytest.fixture
def fx():
    host = Host()
    ictx = host.open_iommufd()
    ioas = ictx.ioas_alloc()
    dev = host.add_device(0x30, pasid_bits=20, pri=True)
    dev_id = dev.bind_iommufd(ictx)
    parent = ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_PASID)
    fault_id, ffile = ictx.fault_queue_alloc()
    hwpt = ictx.hwpt_alloc(dev_id, parent, HWPT_ALLOC_PASID, HwptVtdS1(0, 0x1000, 48), fault_id=fault_id)
    dev.attach_pt(parent)
    dev.attach_pt(hwpt, pasid=9)
    yield dict(host=host, ictx=ictx, ioas=ioas, dev=dev, dev_id=dev_id, parent=parent, hwpt=hwpt,
               fault_id=fault_id, ffile=ffile)
    ffile.close()
    ictx.close()
    assert host.pinned_pages == 0


def test_fault_queue_alloc_flags(fx: dict) -> None:
    expect_errno(errno.EOPNOTSUPP, fx["ictx"].fault_queue_alloc, 1)


def test_read_rules(fx: dict) -> None:
    ffile, dev = fx["ffile"], fx["dev"]
    assert ffile.read(40) == b""
    assert not ffile.poll()
    expect_errno(errno.ESPIPE, ffile.read, 39)
    # A group of three requests: delivered whole or not at all.
    dev.page_request(0x1000, pasid=9, last=False, prgi=5)
    dev.page_request(0x2000, pasid=9, last=False, prgi=5)
    assert not ffile.poll()   # incomplete groups are not delivered
    dev.page_request(0x3000, pasid=9, write=True, last=True, prgi=5)
    assert ffile.poll()
    assert ffile.read(80) == b""
    recs = PageFault.parse_all(ffile.read(400))
    assert [(r.addr, r.grpid, r.flags, r.perm) for r in recs] == [(0x1000, 5, 1, 1), (0x2000, 5, 1, 1),
                                                                  (0x3000, 5, 3, 3)]
    assert {r.cookie for r in recs} == {1}
    dev.page_request(0x4000, pasid=9, prgi=6)
    assert PageFault.parse_all(ffile.read(40))[0].cookie == 2
    ffile.write(page_response(1) + page_response(2))
    dev.page_request(0x5000, pasid=9, prgi=6)
    assert PageFault.parse_all(ffile.read(40))[0].cookie == 1   # the lowest free cookie again
    assert [r.code for r in dev.endpoint.responses] == [0, 0]


def test_write_rules(fx: dict) -> None:
    ffile, dev = fx["ffile"], fx["dev"]
    expect_errno(errno.ESPIPE, ffile.write, b"\0" * 7)
    expect_errno(errno.EINVAL, ffile.write, page_response(1))   # nothing read yet
    dev.page_request(0x1000, pasid=9, prgi=1)
    dev.page_request(0x2000, pasid=9, prgi=2)
    c1, c2 = (r.cookie for r in PageFault.parse_all(ffile.read(80)))
    expect_errno(errno.EINVAL, ffile.write, IommuHwptPageResponse.build(dict(cookie=c1, code=2)))
    # Stops at the first bad response; what came before it is consumed.
    assert ffile.write(page_response(c1) + page_response(99)) == 8
    expect_errno(errno.EINVAL, ffile.write, page_response(c1))   # already answered
    assert ffile.write(page_response(c2, 1)) == 8
    assert [(r.prgi, r.code) for r in dev.endpoint.responses] == [(1, 0), (2, 1)]
    assert fx["host"].iommu.unmatched_responses == []


def test_unanswered_groups_on_detach_and_replace(fx: dict) -> None:
    ffile, dev, ictx = fx["ffile"], fx["dev"], fx["ictx"]
    dev.page_request(0x1000, pasid=9, prgi=1)
    dev.page_request(0x2000, pasid=9, prgi=2)
    ffile.read(40)                       # group 1 read, group 2 still queued
    dev.detach_pt(pasid=9)
    assert sorted((r.prgi, r.code) for r in dev.endpoint.responses) == [(1, 1), (2, 1)]
    assert ffile.read(400) == b""
    dev.attach_pt(fx["hwpt"], pasid=9)
    dev.page_request(0x3000, pasid=9, prgi=3)
    other = ictx.hwpt_alloc(fx["dev_id"], fx["parent"], HWPT_ALLOC_PASID, HwptVtdS1(0, 0x1000, 48))
    dev.attach_pt(other, pasid=9)
    assert (dev.endpoint.responses[-1].prgi, dev.endpoint.responses[-1].code) == (3, 1)
    # Requests now hit a HWPT without a fault queue: the driver answers INVALID itself.
    dev.page_request(0x4000, pasid=9, prgi=4)
    assert (dev.endpoint.responses[-1].prgi, dev.endpoint.responses[-1].code) == (4, 1)
    assert ffile.read(400) == b""


def test_fault_destroy_answers_everything(fx: dict) -> None:
    ffile, dev, ictx = fx["ffile"], fx["dev"], fx["ictx"]
    dev.page_request(0x1000, pasid=9, prgi=1)
    expect_errno(errno.EBUSY, ictx.destroy, fx["fault_id"])
    ictx2_fault, f2 = ictx.fault_queue_alloc()
    f2.close()
    ictx.destroy(ictx2_fault)
    # Detach and free the HWPT, close the file: then the fault object can go, answering what is left.
    fault = ictx._objects[fx["fault_id"]]
    assert len(fault.deliver) == 1
    ffile.close()
    dev.detach_pt(pasid=9)
    ictx.destroy(fx["hwpt"])
    ictx.destroy(fx["fault_id"])
    assert dev.endpoint.responses[-1].code == 1


def test_requests_nobody_handles_are_answered_invalid(fx: dict) -> None:
    dev, host = fx["dev"], fx["host"]
    # RID attached to the parent (no fault queue).
    dev.page_request(0x1000, prgi=11)
    assert (dev.endpoint.responses[-1].prgi, dev.endpoint.responses[-1].code) == (11, 1)
    # A stop marker (last, neither read nor write) is never answered.
    n = len(dev.endpoint.responses)
    dev.page_request(0x1000, pasid=9, read=False, write=False, last=True, prgi=12)
    assert len(dev.endpoint.responses) == n
    # A non-canonical address is refused by the driver before any lookup.
    dev.page_request(0x8000_0000_0000, pasid=9, prgi=13)
    assert (dev.endpoint.responses[-1].prgi, dev.endpoint.responses[-1].code) == (13, 1)
    assert host.intel.prq_bad == 1
    assert fx["ffile"].read(400) == b""


def test_iopf_hwpt_needs_a_pri_device(fx: dict) -> None:
    host, ictx = fx["host"], fx["ictx"]
    plain = host.add_device(0x40, pasid_bits=20)
    plain.bind_iommufd(ictx)
    plain.attach_pt(fx["parent"])
    expect_errno(errno.ENODEV, plain.attach_pt, fx["hwpt"], pasid=9)
    plain.unbind()


def test_dma_stalls_on_a_page_request_and_resumes(fx: dict) -> None:
    host, ictx, dev = fx["host"], fx["ictx"], fx["dev"]
    ioas = fx["ioas"]
    buf = host.mmap(8 * PAGE)
    ictx.ioas_map(ioas, buf, 8 * PAGE, iova=0)
    # A RID-level IOPF HWPT over the IOAS itself (paging HWPT with a fault queue).
    fid, ff = ictx.fault_queue_alloc()
    paging = ictx.hwpt_alloc(fx["dev_id"], ioas, HWPT_ALLOC_PASID, fault_id=fid)
    dev.attach_pt(paging)
    out = dev.dma_write(0x10_0000, b"late")      # not mapped yet
    assert out.pending and not out.ok
    rec = PageFault.parse_all(ff.read(40))[0]
    assert (rec.addr, rec.perm, rec.flags) == (0x10_0000, 2, 2)
    # The VMM maps the page, then answers: the DMA resumes and lands.
    ictx.ioas_map(ioas, buf + 4 * PAGE, PAGE, iova=0x10_0000)
    ff.write(page_response(rec.cookie))
    assert out.ok and out.responses == [0]
    assert host.read_user(buf + 4 * PAGE, 4) == b"late"
    # An INVALID answer ends the DMA with the fault it stalled on.
    out = dev.dma_read(0x20_0000, 8)
    rec = PageFault.parse_all(ff.read(40))[0]
    ff.write(page_response(rec.cookie, 1))
    assert not out.pending and not out.ok and out.fault is not None
    ff.close()
    dev.attach_pt(fx["parent"])
    ictx.destroy(paging)
    ictx.destroy(fid)
