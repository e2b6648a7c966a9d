"""Page requests: descriptors in the page request queue, PPR/PRO and the page-request event, overflow and
its auto-responses, and the page group response round trip (including responses nobody waits for)."""

from __future__ import annotations

import pytest

from chip_helpers import FSTS, PAGE_4K, PECTL, PEADDR, PEDATA, PGTT_FS, PQA, PQH, PQT, PRSTS, U, W, Rig
from vtd_emu.spec import specs
from vtd_emu.vtd.prq import RC_FAILURE, RC_INVALID_REQUEST, RC_SUCCESS, PageRequestStatus, PageResponse
from vtd_emu.vtd.qi import T_PAGE_RESPONSE, make_descriptor

A = 0x0010
VA = 0x7000_0000
PPR, PRO = 1, 2
LAYOUT = specs().structure("page_request")


def rig_with_prq(pre: bool = True, qemu_size: int = 0) -> tuple[Rig, object, int]:
    rig = Rig()
    sm = rig.scalable()
    pt = sm.device(A, pre=pre, dte=True)
    fs = sm.fs_table()
    fs.map(VA, 0x8000_0000, PAGE_4K, W | U)
    pt.set_entry(7, pgtt=PGTT_FS, did=4, fsptptr=fs.root)
    sm.enable()
    rig.enable_qi(dw=True)
    pq = rig.alloc.alloc(1 << qemu_size)
    rig.w64(PQA, pq | qemu_size)
    rig.w32(PEDATA, 0x77)
    rig.w32(PEADDR, 0xFEE03000)
    rig.w32(PECTL, 0)
    return rig, pt, pq


def descriptor(rig: Rig, pq: int, index: int) -> dict[str, int]:
    raw = rig.ram.read(pq + 32 * index, 32)
    return LAYOUT.decode(int.from_bytes(raw, "little"))


def prq_events(rig: Rig) -> int:
    return sum(1 for i in rig.io.interrupts if i.source == "page-request")


def test_request_is_queued_with_every_field() -> None:
    rig, _, pq = rig_with_prq()
    st = rig.io.page_request(A, VA + 0x123, read=True, write=True, exe=True, priv=True, pasid=7, last=True,
                             prgi=0x1AB, private_data=0x1122 << 64 | 0x3344)
    assert st == PageRequestStatus.QUEUED
    d = descriptor(rig, pq, 0)
    assert d == {"TYPE": 1, "PP": 1, "PDP": 1, "RID": A, "PASID": 7, "ER": 1, "PM": 1, "RD": 1, "WR": 1,
                 "LPIG": 1, "PRGI": 0x1AB, "ADDR": VA >> 12, "PRIVATE_DATA": 0x1122 << 64 | 0x3344}
    assert rig.r64(PQT) == 32 and rig.r32(PRSTS) == PPR
    assert [(i.addr, i.data) for i in rig.io.interrupts if i.source == "page-request"] == [(0xFEE03000, 0x77)]


def test_ppr_gates_the_event_and_clearing_clears_ip() -> None:
    rig, _, pq = rig_with_prq()
    rig.w32(PECTL, 1 << 31)                                # masked: IP shows the pending event
    rig.io.page_request(A, VA, read=True, write=False, pasid=7)
    rig.io.page_request(A, VA + PAGE_4K, read=True, write=False, pasid=7)
    assert rig.r32(PECTL) == 0xC000_0000 and rig.r64(PQT) == 64 and prq_events(rig) == 0
    rig.w32(PRSTS, PPR)
    assert rig.r32(PECTL) == 0x8000_0000
    rig.w32(PECTL, 0)
    rig.io.page_request(A, VA, read=True, write=False, pasid=7)
    assert prq_events(rig) == 1


def test_overflow_sets_pro_drops_and_auto_responds() -> None:
    rig, _, pq = rig_with_prq()
    dev = rig.io.attach_device(A, pri=True)
    for i in range(127):                                   # 128 slots: one always stays free
        assert dev.page_request(VA + i * PAGE_4K, pasid=7, last=False, prgi=1) == PageRequestStatus.QUEUED
    assert rig.r64(PQT) == 127 * 32
    assert dev.page_request(VA, pasid=7, last=True, prgi=2) == PageRequestStatus.OVERFLOW
    assert rig.r32(PRSTS) == PPR | PRO and rig.r64(PQT) == 127 * 32
    assert dev.page_request(VA, pasid=7, last=True, prgi=3) == PageRequestStatus.DROPPED
    assert dev.page_request(VA, pasid=7, last=False, prgi=4) == PageRequestStatus.DROPPED
    assert [(r.prgi, r.code, r.auto) for r in dev.responses] == [(2, RC_SUCCESS, True), (3, RC_SUCCESS, True)]
    assert prq_events(rig) == 1                            # only the first request raised one
    # Software drains the queue, then clears PPR and PRO: requests flow again.
    rig.w64(PQH, rig.r64(PQT))
    rig.w32(PRSTS, PPR | PRO)
    assert dev.page_request(VA, pasid=7, last=True, prgi=5) == PageRequestStatus.QUEUED
    assert descriptor(rig, pq, 127)["PRGI"] == 5 and rig.r64(PQT) == 0     # wrapped
    assert prq_events(rig) == 2


def test_overflow_event_when_nothing_was_pending() -> None:
    rig, _, pq = rig_with_prq()
    rig.w64(PQH, 32)                                       # head one ahead of the tail: queue full
    assert rig.io.page_request(A, VA, read=True, write=False, pasid=7) == PageRequestStatus.OVERFLOW
    assert rig.r32(PRSTS) == PRO and prq_events(rig) == 1


def test_response_round_trip() -> None:
    rig, _, pq = rig_with_prq()
    dev = rig.io.attach_device(A, pri=True)
    seen: list[PageResponse] = []
    dev.on_response = seen.append
    assert dev.page_request(VA, write=True, pasid=7, last=True, prgi=9) == PageRequestStatus.QUEUED
    d = descriptor(rig, pq, 0)
    rig.submit(make_descriptor(T_PAGE_RESPONSE, PP=1, RID=d["RID"], PASID=d["PASID"], PRGI=d["PRGI"],
                               RC=RC_INVALID_REQUEST) + (0xAB, 0xCD), rig.wait())
    assert not rig.r32(FSTS)
    assert seen == [PageResponse(A, 7, 9, RC_INVALID_REQUEST, 0xCD << 64 | 0xAB)] == dev.responses
    assert rig.io.unmatched_responses == []
    # The same response again answers nothing: reported, not delivered.
    rig.submit(make_descriptor(T_PAGE_RESPONSE, PP=1, RID=A, PASID=7, PRGI=9, RC=RC_FAILURE), rig.wait())
    assert len(dev.responses) == 1
    assert rig.io.unmatched_responses == [PageResponse(A, 7, 9, RC_FAILURE, 0)]


def test_responses_before_the_last_request_or_to_other_groups_are_unmatched() -> None:
    rig, _, _ = rig_with_prq()
    dev = rig.io.attach_device(A, pri=True)
    dev.page_request(VA, pasid=7, last=False, prgi=3)
    rig.submit(make_descriptor(T_PAGE_RESPONSE, PP=1, RID=A, PASID=7, PRGI=3),        # group not complete
               make_descriptor(T_PAGE_RESPONSE, PP=0, RID=A, PRGI=3),                 # no PASID: other group
               make_descriptor(T_PAGE_RESPONSE, PP=1, RID=0x99, PASID=7, PRGI=3),     # other requester
               rig.wait())
    assert dev.responses == [] and len(rig.io.unmatched_responses) == 3
    dev.page_request(VA, pasid=7, last=True, prgi=3)
    rig.submit(make_descriptor(T_PAGE_RESPONSE, PP=1, RID=A, PASID=7, PRGI=3), rig.wait())
    assert [(r.prgi, r.code) for r in dev.responses] == [(3, RC_SUCCESS)]


def test_stop_marker_is_queued_and_never_answered() -> None:
    rig, _, pq = rig_with_prq()
    dev = rig.io.attach_device(A, pri=True)
    assert dev.page_request(0, read=False, write=False, pasid=7, last=True, prgi=0) == PageRequestStatus.QUEUED
    d = descriptor(rig, pq, 0)
    assert (d["LPIG"], d["RD"], d["WR"]) == (1, 0, 0)
    rig.submit(make_descriptor(T_PAGE_RESPONSE, PP=1, RID=A, PASID=7, PRGI=0), rig.wait())
    assert dev.responses == [] and len(rig.io.unmatched_responses) == 1


def test_pre_clear_is_fault_0x47_and_invalid_request() -> None:
    rig, _, _ = rig_with_prq(pre=False)
    dev = rig.io.attach_device(A, pri=True)
    assert dev.page_request(VA, pasid=7, last=True, prgi=1) == PageRequestStatus.FAULTED
    (f,) = rig.io.fault_records()
    assert (f.reason, f.sid, f.addr, f.pasid) == (0x47, A, VA, 7)
    hi = rig.io.regs.get("FRCD") >> 64
    assert (hi >> 28) & 1 == 1 and (hi >> 62) & 1 == 0                    # (T2, T1) = page request
    assert [(r.code, r.auto) for r in dev.responses] == [(RC_INVALID_REQUEST, True)]
    assert rig.r64(PQT) == 0


def test_pasid_entry_not_present_is_a_fault() -> None:
    rig, pt, _ = rig_with_prq()
    pt.clear_entry(7)  # type: ignore[attr-defined]
    assert rig.io.page_request(A, VA, read=True, write=False, pasid=7, last=True) == PageRequestStatus.FAULTED
    assert [f.reason for f in rig.io.fault_records()] == [0x59]


def test_legacy_root_page_request_is_fault_0x32() -> None:
    rig = Rig()
    lg = rig.legacy()
    lg.attach(A, lg.table(), did=1)
    lg.enable()
    assert rig.io.page_request(A, VA, read=True, write=False) == PageRequestStatus.FAULTED
    assert [f.reason for f in rig.io.fault_records()] == [0x32]


def test_implicit_invalidation_of_the_first_stage_page() -> None:
    rig, pt, _ = rig_with_prq()
    assert rig.io.translate(A, VA, "r", pasid=7).addr == 0x8000_0000
    iotlb = rig.io.caches.iotlb
    assert any(e.did == 4 for e in iotlb.values())
    rig.io.page_request(A, VA, read=True, write=False, pasid=7)
    assert not any(e.did == 4 for e in iotlb.values())


def test_no_prs_means_unsupported() -> None:
    rig = Rig(overrides={"ecap.PRS": 0})
    assert rig.io.prq is None
    assert rig.io.page_request(A, VA, read=True, write=False) == PageRequestStatus.UNSUPPORTED


def test_bad_arguments_are_caller_errors() -> None:
    rig, _, _ = rig_with_prq()
    with pytest.raises(ValueError):
        rig.io.page_request(A, VA, read=True, write=False, prgi=512)
    with pytest.raises(ValueError):
        rig.io.attach_device(A).page_request(VA)                        # PRI not enabled
