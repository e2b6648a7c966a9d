"""Replaying vtd-trace/1: expectations, mismatch reports, recording (bit-for-bit reproduction), guards."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtd_emu.tables import (PGTT_FS, R, U, W, FirstStageTable, LegacyRootTable, PageAllocator, PasidTables,
                            ScalableRootTable, SecondStageTable, enable_translation)
from vtd_emu.errors import TraceError
from vtd_emu.trace.model import DmaBlock, Event, Trace, TraceConfig, blockify, load_trace, save_trace
from vtd_emu.trace.recorder import Recorder
from vtd_emu.trace.replay import Replayer, fault_list, memory_hash, registers_hash
from vtd_emu.vtd.iommu import VtdIommu


def session() -> Recorder:
    """A recorded run with tables, QI, DMA through two stages, faults and a page request."""
    rec = Recorder(TraceConfig(preset="modern", devices=[{"sid": 0x108, "ats": True, "pri": True,
                                                          "respond": True}]), name="session")
    alloc = PageAllocator(rec.mem, base=0x100000)
    ss = SecondStageTable(rec.mem, alloc, levels=4)
    ss.map(0x10000, 0x800000, 0x3000, R | W)
    fs = FirstStageTable(rec.mem, alloc, levels=4)
    fs.map(0x4000_0000, 0x900000, 0x2000, W | U)
    rt = ScalableRootTable(rec.mem, alloc)
    pt = PasidTables(rec.mem, alloc)
    from vtd_emu.tables import PGTT_SS

    pt.set_entry(0, pgtt=PGTT_SS, did=1, ssptptr=ss.root, aw=ss.aw)
    pt.set_entry(4, pgtt=PGTT_FS, did=2, fsptptr=fs.root, fspm=fs.fspm)
    rt.set_context(1, 0x08, pasid_dir=pt.dir, pdts=pt.pdts, pre=True)
    q = alloc.alloc()
    prq = alloc.alloc()
    rec.mmio_write(0x90, q | 1 << 11, 8)
    rec.mmio_write(0xD0, prq, 8)
    enable_translation(rec, rt.root, scalable=True)
    rec.mmio_write(0x18, (rec.mmio_read(0x1C) & 0x96FF_FFFF) | 1 << 26)
    for i in range(40):
        rec.dma_write(0x108, 0x10000 + (i * 0x180) % 0x3000, bytes([i]) * 96)
    rec.dma_read(0x108, 0x10F00, 0x300)
    rec.dma_read(0x108, 0x4000_0000, 64, pasid=4)
    rec.dma_write(0x108, 0x4000_1FF0, b"z" * 32, pasid=4)
    rec.dma_read(0x108, 0x70000, 8)
    rec.page_request(0x108, 0x4000_5000, pasid=4, prgi=1)
    from vtd_emu.vtd.qi import T_IOTLB, T_WAIT, make_descriptor

    rec.qi_submit([make_descriptor(T_IOTLB, G=1), make_descriptor(T_WAIT, SW=1, STATUS_DATA=7,
                                                                    STATUS_ADDR=prq + 0x800)])
    rec.page_response(0x108, prgi=1, pasid=4)
    rec.checkpoint("end")
    return rec


@pytest.mark.parametrize("kind", ["yaml", "jsonl", "npz"])
@pytest.mark.parametrize("batch", [False, True])
def test_recording_replays_bit_for_bit(tmp_path: Path, kind: str, batch: bool) -> None:
    rec = session()
    path = tmp_path / f"s.{kind}"
    rec.save(path)
    res = Replayer(load_trace(path), batch=batch).run()
    assert res.mismatches == [] and res.checks > 40
    m = res.machine
    assert m is not None
    assert memory_hash(m.ram) == memory_hash(rec.ram)
    assert registers_hash(m.iommu) == registers_hash(rec.iommu)
    assert fault_list(m.iommu) == fault_list(rec.iommu)
    assert m.iommu.register_dump() == rec.iommu.register_dump()
    assert res.stats.dmas == 44 and res.stats.faults and res.stats.page_requests == {"queued": 1}


def test_blocked_dmas_replay_like_events(tmp_path: Path) -> None:
    rec = session()
    t = rec.trace()
    b = Trace(t.config, blockify(t.events, 1), t.name)
    assert any(isinstance(e, DmaBlock) for e in b.events)
    for batch in (False, True):
        res = Replayer(b, batch=batch).run()
        assert res.mismatches == []
        assert res.machine is not None and memory_hash(res.machine.ram) == memory_hash(rec.ram)


def test_mismatches_name_event_and_both_values() -> None:
    t = session().trace()
    evs = list(t.events)
    i = next(k for k, e in enumerate(evs) if e.op == "dma" and e.fields["iova"] == 0x70000)
    e = evs[i]
    assert e.expect is not None
    e.expect["faults"] = [0x5]
    j = next(k for k, e in enumerate(evs) if e.op == "mmio_read")
    evs[j].expect = {"value": 0xDEAD}
    res = Replayer(Trace(t.config, evs, "x")).run()
    msgs = [str(m) for m in res.mismatches]
    assert len(msgs) == 2
    assert msgs[0].startswith(f"event {j} (mmio_read): value: expected 0xdead, got 0x")
    assert msgs[1].startswith(f"event {i} (dma): faults: expected [0x5], got [0x")
    # the same through a DMA block (vectorised comparison)
    res2 = Replayer(Trace(t.config, blockify(evs, 1), "x")).run()
    assert sorted(str(m) for m in res2.mismatches) == sorted(msgs)


def test_generic_register_and_memory_expectations() -> None:
    rec = Recorder(TraceConfig(preset="modern"))
    rec.write_memory(0x5000, b"hi")
    t = rec.trace()
    evs = list(t.events) + [Event("note", {"text": "x"}, {"regs": {0x1C: (0x80000000, 0x80000000)},
                                                          "mem": [(0x5000, b"ho")]})]
    res = Replayer(Trace(t.config, evs)).run()
    assert [m.what for m in res.mismatches] == ["register 0x1c", "memory at 0x5000"]
    rec2 = Replayer(Trace(t.config, evs), record=True).run().recorded
    assert rec2 is not None
    assert Replayer(rec2).run().mismatches == []


def test_record_refreshes_wrong_expectations(tmp_path: Path) -> None:
    t = session().trace()
    for e in t.events:
        if isinstance(e, Event) and e.op == "dma" and e.expect:
            e.expect["addrs"] = [0x1234] * len(e.expect["addrs"])
    assert Replayer(t).run().mismatches
    fixed = Replayer(t, record=True).run().recorded
    assert fixed is not None
    save_trace(fixed, tmp_path / "f.npz")
    assert Replayer(load_trace(tmp_path / "f.npz")).run().mismatches == []


def test_profile_override_changes_behaviour() -> None:
    rec = Recorder(TraceConfig(preset="modern"))
    alloc = PageAllocator(rec.mem, base=0x100000)
    ss = SecondStageTable(rec.mem, alloc, levels=3)
    ss.map(0x1000, 0x2000, 0x1000, R)
    rt = LegacyRootTable(rec.mem, alloc)
    rt.set_context(0, 8, slptptr=ss.root, aw=1, did=1)
    enable_translation(rec, rt.root)
    rec.dma_read(8, 0x1000, 4)
    rec.dma_write(8, 0x1000, b"abcd")      # spec: walks again, faults WRITE
    t = rec.trace()
    assert Replayer(t).run().mismatches == []
    q = Replayer(t, profile="qemu-7.2").run()  # QEMU: the cached read-only entry drops it silently
    assert q.stats.dropped == 1 and q.mismatches


def test_page_request_needs_the_chip_api(monkeypatch: pytest.MonkeyPatch) -> None:
    ev = Event("page_request", {"sid": 1, "addr": 0x1000, "pasid": None, "read": True, "write": False,
                                "exe": False, "priv": False, "last": True, "prgi": 0}, where="line 3")
    monkeypatch.delattr(VtdIommu, "page_request")
    with pytest.raises(TraceError, match="page_request: this unit model has no page_request") as ei:
        Replayer(Trace(TraceConfig(), [ev], source="t.yaml")).run()
    assert ei.value.file == "t.yaml" and ei.value.where == "line 3"


HOST_EVENTS = [
    {"op": "host.open_iommufd", "as": "ictx"},
    {"op": "host.add_device", "args": {"sid": 16}, "as": "dev"},
    {"op": "host.bind_iommufd", "target": "dev", "args": {"ictx": "$ictx"}},
    {"op": "host.ioas_alloc", "target": "ictx", "as": "ioas"},
    {"op": "host.mmap", "args": {"length": 8192}, "as": "va"},
    {"op": "host.write_user", "args": {"va": "$va", "data": {"$hex": "68656c6c6f"}}},
    {"op": "host.ioas_map", "target": "ictx", "args": {"ioas_id": "$ioas", "user_va": "$va", "length": 8192,
                                                   "iova": 0x100000}},
    {"op": "host.attach_pt", "target": "dev", "args": {"pt_id": "$ioas"}},
    {"op": "host.dma_read", "target": "dev", "args": {"iova": 0x100000, "n": 5}},
    {"op": "host.ioas_unmap", "target": "ictx", "args": {"ioas_id": "$ioas", "iova": 0x300000, "length": 4096}},
    {"op": "checkpoint"},
]


def test_host_events_run_on_the_host_layer(tmp_path: Path) -> None:
    from vtd_emu.trace.model import parse_event

    evs = [parse_event(e, "h.yaml", f"event {i}") for i, e in enumerate(HOST_EVENTS)]
    t = Trace(TraceConfig(host={"preset": "modern"}), evs, "host")
    rec = Replayer(t, record=True).run().recorded
    assert rec is not None
    got = {e.op: e.expect for e in rec.events if isinstance(e, Event)}
    assert got["host.dma_read"]["result"]["buffer"] == b"hello".hex()
    assert got["host.ioas_unmap"]["errno"] == 2  # ENOENT: nothing mapped there
    save_trace(rec, tmp_path / "h.yaml")
    assert Replayer(load_trace(tmp_path / "h.yaml")).run().mismatches == []
    with pytest.raises(TraceError, match="give config.host"):
        Replayer(Trace(TraceConfig(), evs, source="h.yaml")).run()


def test_qi_submit_wraps_the_ring() -> None:
    rec = Recorder(TraceConfig(preset="modern"))
    q = 0x200000
    rec.mmio_write(0x90, q, 8)
    rec.mmio_write(0x18, 1 << 26)
    from vtd_emu.vtd.qi import T_WAIT, make_descriptor

    for k in range(300):  # 256 slots: wraps once
        rec.qi_submit([make_descriptor(T_WAIT, SW=1, STATUS_DATA=k, STATUS_ADDR=0x300000)])
    assert rec.mmio_read(0x80, 8) == rec.mmio_read(0x88, 8) == (300 % 256) * 16
    assert rec.ram.read(0x300000, 4) == (299).to_bytes(4, "little")
    assert Replayer(rec.trace()).run().mismatches == []


def test_checkpoint_hash_ignores_zero_pages() -> None:
    rec = Recorder(TraceConfig(preset="modern"))
    h0 = rec.checkpoint()["mem_sha256"]
    rec.ram.write(0x9000, bytes(4096))  # a page that exists but holds zeros
    assert memory_hash(rec.ram) == h0


def test_stats_count_faults_and_bytes() -> None:
    t = session().trace()
    res = Replayer(t).run()
    st = res.stats
    assert st.dma_bytes == 40 * 96 + 0x300 + 64 + 32 + 8
    assert dict(st.faults) and st.invalidations.get("iotlb-global") == 1
    assert st.qi_descriptors["iotlb"] == 1 and st.qi_descriptors["page-group-response"] == 1
    d = st.to_dict()
    assert d["hit_rates"]["iotlb"] is not None and 0 <= d["hit_rates"]["iotlb"] <= 1


def test_the_documented_example_replays(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "trace-format.md").read_text()
    block = doc.split("```yaml\nformat: vtd-trace/1\nname: tiny", 1)[1].split("```", 1)[0]
    p = tmp_path / "tiny.yaml"
    p.write_text("format: vtd-trace/1\nname: tiny" + block)
    res = Replayer(load_trace(p)).run()
    assert res.checks == 5 and res.mismatches == []


def test_progress_slices_long_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from vtd_emu.trace import replay as rp

    monkeypatch.setattr(rp, "PROGRESS_ROWS", 1000)
    seen: list[tuple[int, int]] = []
    t = load_trace(Path(__file__).resolve().parents[1] / "traces" / "bulk-dma.npz")
    res = Replayer(t, progress=lambda d, n: seen.append((d, n))).run()
    assert res.mismatches == [] and res.checks >= 12_000
    assert len(seen) >= 12 and seen[-1] == (t.event_count(), t.event_count())
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def _wb_trace(kind: str, tmp_path: Path, *, wrong: bool = False) -> Trace:
    """A legacy unit with translation off: a read DMA, a write-back of its bytes (``data_from``), an
    invalidation-wait status write (``mem_changes``) and a queue error (``raises``)."""
    from vtd_emu.trace.model import parse_event

    evs = [
        {"op": "mem_write", "addr": "0x5000", "hex": "0102030405060708"},
        {"op": "dma", "sid": "0x10", "iova": "0x5002", "len": 4, "dir": "read", "expect": {"data": "03040506"}},
        {"op": "dma", "sid": "0x10", "iova": "0x6001", "len": 4, "dir": "write", "data_from": 1,
         "expect": {"mem_changes": [{"addr": "0x6001", "hex": "03040506" if not wrong else "03040507"}]}},
        {"op": "mmio_write", "offset": "0x90", "value": "0x10000", "size": 8},
        {"op": "mmio_write", "offset": "0x18", "value": "0x4000000", "size": 4},
        {"op": "mem_write", "addr": "0x10000", "qwords": ["0x100000025", "0x7000"]},
        {"op": "mmio_write", "offset": "0x88", "value": "0x10", "size": 4,
         "expect": {"mem_changes": [{"addr": "0x7000", "hex": "01"}]}},  # only changed bytes
        {"op": "mem_write", "addr": "0x10010", "qwords": ["0xf", "0x0"]},
        {"op": "mmio_write", "offset": "0x88", "value": "0x20", "size": 4, "expect": {"raises": {"0x34": "0x70"}}},
    ]
    t = Trace(TraceConfig(preset="modern", ram_size=1 << 20),
              [parse_event(d, "<wb>", f"event {i}") for i, d in enumerate(evs)], "wb")
    path = tmp_path / f"wb.{kind}"
    save_trace(t, path)
    return load_trace(path)


@pytest.mark.parametrize("kind", ["yaml", "jsonl", "npz"])
@pytest.mark.parametrize("batch", [False, True])
def test_data_from_mem_changes_and_raises(tmp_path: Path, kind: str, batch: bool) -> None:
    t = _wb_trace(kind, tmp_path)
    res = Replayer(t, batch=batch).run()
    assert res.mismatches == [] and res.checks == 4
    assert res.machine is not None and res.machine.ram.read(0x6001, 4) == bytes([3, 4, 5, 6])
    bad = Replayer(_wb_trace(kind, tmp_path, wrong=True), batch=batch).run()
    assert [m.what for m in bad.mismatches] == ["mem_changes"]
    rec = Replayer(t, record=True).run().recorded
    assert rec is not None
    ev = rec.events[8]
    assert isinstance(ev, Event) and ev.expect == {"raises": {0x34: 0x10}}   # IQE, the bit that was raised


def test_raises_reports_an_error_that_did_not_happen(tmp_path: Path) -> None:
    t = _wb_trace("yaml", tmp_path)
    ev = t.events[6]
    assert isinstance(ev, Event)
    ev.expect = {"raises": {0x34: 0x70}}   # a valid wait descriptor: no queue error
    res = Replayer(t).run()
    assert len(res.mismatches) == 1 and res.checks == 4
    assert "a bit of 0x70 newly set in register 0x34: expected true, got false" in str(res.mismatches[0])


@pytest.mark.parametrize("ref,msg", [(2, "expected the number of an earlier event"),
                                     (0, "event 0 is not a read DMA of len 4")])
def test_data_from_must_name_an_earlier_read(tmp_path: Path, ref: int, msg: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("format: vtd-trace/1\nevents:\n"
                 "  - {op: mem_write, addr: 0x5000, hex: '01'}\n"
                 "  - {op: dma, sid: 1, iova: 0x5000, len: 4, dir: read}\n"
                 f"  - {{op: dma, sid: 1, iova: 0x6000, len: 4, dir: write, data_from: {ref}}}\n")
    with pytest.raises(TraceError, match=msg):
        load_trace(p)
    p.write_text("format: vtd-trace/1\nevents:\n"
                 "  - {op: dma, sid: 1, iova: 0x6000, len: 4, dir: write, data_from: 0, data: '00000000'}\n")
    with pytest.raises(TraceError, match="one of 'data', 'fill' or 'data_from'"):
        load_trace(p)


@pytest.mark.parametrize("event,where,msg", [
    ({"op": "host._get", "target": "ictx", "args": {"obj_id": 1}}, "event 1", "unknown host call 'host._get'"),
    ({"op": "host.__class__"}, "event 1", "unknown host call"),
    ({"op": "host.defer", "args": {"fn": "$ictx"}}, "event 1", "unknown host call 'host.defer'"),
    ({"op": "host.pinned_pages"}, "event 1", "unknown host call"),
    ({"op": "host.no_such_call"}, "event 1", "unknown host call"),
])
def test_host_events_outside_the_table_are_refused_when_loading(event: dict, where: str, msg: str) -> None:
    """Only the documented host calls (``HOST_CALLS``) are events; underscore methods, properties and
    callbacks never are, whatever the target."""
    from vtd_emu.trace.model import parse_event

    with pytest.raises(TraceError, match=msg) as ei:
        parse_event(event, "h.yaml", where)
    assert ei.value.file == "h.yaml" and ei.value.where == where


@pytest.mark.parametrize("event,msg", [
    ({"op": "host.ioas_alloc", "target": "dev"}, "VfioDevice.ioas_alloc is not a host call a trace may make"),
    ({"op": "host.mmap", "target": "ictx", "args": {"length": 4096}}, "IommuFd.mmap is not a host call"),
    ({"op": "host.open_iommufd", "target": "dev_id"}, "'dev_id' is a int; host calls go to a Host, IommuFd"),
    ({"op": "host.hwpt_alloc", "target": "ictx", "args": {"dev_id": "$dev_id", "pt_id": 1,
                                                          "data": {"$new": "_Obj"}}},
     "vtd_emu.host exports no class '_Obj'"),
])
def test_host_calls_go_only_to_the_table_of_their_target(event: dict, msg: str) -> None:
    """A call the table allows for one class is refused on another (no reaching private objects through a
    bound result); the error names the file and the event."""
    pytest.importorskip("vtd_emu.host")
    from vtd_emu.trace.model import parse_event

    head = [{"op": "host.open_iommufd", "as": "ictx"}, {"op": "host.add_device", "args": {"sid": 16}, "as": "dev"},
            {"op": "host.bind_iommufd", "target": "dev", "args": {"ictx": "$ictx"}, "as": "dev_id"}]
    evs = [parse_event(e, "h.yaml", f"line {i + 3}") for i, e in enumerate(head + [event])]
    with pytest.raises(TraceError, match=msg) as ei:
        Replayer(Trace(TraceConfig(host={"preset": "modern"}), evs, source="h.yaml")).run()
    assert ei.value.file == "h.yaml" and ei.value.where.startswith("line 6 (")


def test_the_host_call_table_names_public_methods() -> None:
    hostmod = pytest.importorskip("vtd_emu.host")
    import inspect

    from vtd_emu.trace.model import HOST_CALLS

    for cls_name, methods in HOST_CALLS.items():
        cls = getattr(hostmod, cls_name)
        for m in methods:
            assert not m.startswith("_") and inspect.isfunction(inspect.getattr_static(cls, m)), f"{cls_name}.{m}"


@pytest.mark.parametrize("op", ["dma", "note"])
def test_bridge_expectation_needs_a_vmm_machine_on_every_path(op: str) -> None:
    # A Trace built in Python skips load_trace's vocabulary check; the replayer must still refuse it,
    # whether the event takes the common-event shortcut (dma) or the general path (note).
    rec = Recorder(TraceConfig(preset="modern"))
    t = rec.trace()
    fields = {"sid": 1, "iova": 0x5000, "len": 4, "dir": "read"} if op == "dma" else {"text": "x"}
    ev = Event(op, fields, {"bridge": []})
    with pytest.raises(TraceError, match="expect.bridge needs a vIOMMU machine"):
        Replayer(Trace(t.config, list(t.events) + [ev], "x"), batch=False).run()
