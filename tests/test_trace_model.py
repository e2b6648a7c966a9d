"""The vtd-trace/1 model: validation messages (file, line/event, field, expectation) and lossless round
trips between YAML, JSON Lines and .npz."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtd_emu.errors import TraceError
from vtd_emu.trace.model import (FORMAT, DmaBlock, Event, Trace, TraceConfig, blockify, canonical_events, detect_kind,
                                 load_trace, parse_event, save_trace)

HAND = """\
format: vtd-trace/1
name: hand
config:
  preset: modern
  unit: {iotlb_size: 64}
events:
  - {op: mem_write, addr: 0x1000, qwords: [0x2001, 3]}
  - {op: mem_write, addr: 0x3000, hex: "0102"}
  - {op: mmio_write, offset: 0x20, value: 0x1000, size: 8}
  - {op: mmio_read, offset: 0x1c, expect: {value: 0}}
  - {op: dma, sid: 0x10, iova: 0x4000, len: 4, dir: write, fill: 0xab}
  - {op: dma, sid: 0x10, pasid: 3, iova: 0x4000, len: 8, dir: read, priv: true, expect: {faults: [0x2]}}
  - {op: qi_submit, descriptors: [[0x11, 0], {type: iotlb, G: 1}]}
  - {op: checkpoint, mem: [{addr: 0x1000, len: 16}], expect: {regs: {0x1c: {value: 0, mask: 0x80000000}}}}
  - {op: note, text: hello}
  - {op: host.ioas_alloc, as: ioas}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_hand_written_yaml_loads(tmp_path: Path) -> None:
    t = load_trace(write(tmp_path, "h.yaml", HAND))
    assert t.name == "hand" and t.config.unit == {"iotlb_size": 64} and t.event_count() == 10
    ev = t.events
    assert isinstance(ev[0], Event) and ev[0].fields["qwords"] == [0x2001, 3]
    assert ev[4].fields["data"] == b"\xab" * 4 and "fill" not in ev[4].fields
    assert ev[5].fields["pasid"] == 3 and ev[5].expect == {"faults": [2]}
    assert ev[6].fields["descriptors"][0] == (0x11, 0) and len(ev[6].fields["descriptors"][1]) == 2
    assert ev[7].expect == {"regs": {0x1C: (0, 0x80000000)}}
    assert ev[9].op == "host.ioas_alloc" and ev[9].fields["as"] == "ioas"


@pytest.mark.parametrize("kind", ["yaml", "jsonl", "npz"])
def test_round_trip_is_lossless(tmp_path: Path, kind: str) -> None:
    t = load_trace(write(tmp_path, "h.yaml", HAND))
    out = tmp_path / f"t.{kind}"
    save_trace(t, out)
    assert detect_kind(out) == kind
    t2 = load_trace(out)
    assert canonical_events(t2) == canonical_events(t)
    assert t2.config == t.config and t2.name == t.name
    # and back again through every other encoding
    for k2 in ("yaml", "jsonl", "npz"):
        o2 = tmp_path / f"u.{k2}"
        save_trace(t2, o2)
        assert canonical_events(load_trace(o2)) == canonical_events(t)


def _dma_events() -> st.SearchStrategy[list[Event]]:
    def make(sid: int, pasid: int | None, iova: int, ln: int, write: bool, exp: int) -> Event:
        f = {"sid": sid, "pasid": pasid, "iova": iova, "len": ln, "dir": "write" if write else "read",
             "priv": False}
        if write:
            f["data"] = bytes((iova + i) & 0xFF for i in range(ln))
        expect = None
        if exp == 1:
            expect = {"faults": [5], "addrs": [None] * 2}
        elif exp == 2 and not write:
            expect = {"faults": [], "addrs": [0x1000], "data": bytes(ln)}
        return Event("dma", f, expect)

    one = st.builds(make, st.integers(0, 0xFFFF), st.none() | st.integers(0, (1 << 20) - 1),
                    st.integers(0, (1 << 60)), st.integers(1, 300), st.booleans(), st.integers(0, 2))
    return st.lists(one, min_size=1, max_size=30)


@settings(max_examples=25, deadline=None)
@given(evs=_dma_events())
def test_dma_blocks_round_trip(evs: list[Event], tmp_path_factory: pytest.TempPathFactory) -> None:
    d = tmp_path_factory.mktemp("rt")
    notes = [Event("note", {"text": "x"})]
    t = Trace(TraceConfig(), notes + evs + notes + evs[:3], "p")
    want = canonical_events(t)
    for kind in ("jsonl", "npz", "yaml"):
        p = d / f"t.{kind}"
        save_trace(t, p)
        assert canonical_events(load_trace(p)) == want
    b = Trace(t.config, blockify(t.events), "p")
    assert any(isinstance(e, DmaBlock) for e in b.events)
    assert canonical_events(b) == want


@pytest.mark.parametrize("line,where,what", [
    ('{"op": "dma", "sid": "0x10", "iova": 0, "len": 4, "dir": "sideways"}', "line 2 (event 0) (dma) field 'dir'",
     "expected 'read'"),
    ('{"op": "dma", "sid": "0x10", "iova": 0, "len": 4, "dir": "write"}', "line 2 (event 0) (dma)",
     "needs 'data'"),
    ('{"op": "mmio_write", "offset": "0x18"}', "line 2 (event 0) (mmio_write)", "missing field 'value'"),
    ('{"op": "mmio_read", "offset": "zz"}', "line 2 (event 0) (mmio_read) field 'offset'", "32-bit value"),
    ('{"op": "frobnicate"}', "line 2 (event 0)", "unknown op 'frobnicate'"),
    ('{"op": "dma", "sid": 1, "iova": 0, "len": 2, "dir": "read", "expect": {"value": 1}}',
     "line 2 (event 0) (dma) expect", "unknown expectation 'value'"),
    ('{"op": "mem_write", "addr": 0}', "line 2 (event 0) (mem_write)", "exactly one of 'qwords'"),
    ('{not json', "line 2", "invalid JSON"),
])
def test_jsonl_errors_name_line_event_field(tmp_path: Path, line: str, where: str, what: str) -> None:
    p = write(tmp_path, "bad.jsonl", json.dumps({"format": FORMAT, "config": {}}) + "\n" + line + "\n")
    with pytest.raises(TraceError) as ei:
        load_trace(p)
    e = ei.value
    assert e.file == str(p) and e.where == where and what in e.message


def test_yaml_errors_carry_the_line(tmp_path: Path) -> None:
    text = HAND.replace("dir: write, fill: 0xab", "dir: write, fill: 0x1ab")
    with pytest.raises(TraceError) as ei:
        load_trace(write(tmp_path, "bad.yaml", text))
    assert ei.value.where.startswith("line 11 event 4 (dma) field 'fill'")
    with pytest.raises(TraceError, match="format: vtd-trace/1"):
        load_trace(write(tmp_path, "nofmt.yaml", "config: {}\nevents: []\n"))
    with pytest.raises(TraceError, match=r"config.ram_size"):
        load_trace(write(tmp_path, "cfg.yaml", "format: vtd-trace/1\nconfig: {ram_size: -1}\n"))
    with pytest.raises(TraceError, match="not supported"):
        load_trace(write(tmp_path, "v2.yaml", "format: vtd-trace/3\n"))


def test_npz_errors(tmp_path: Path) -> None:
    t = Trace(TraceConfig(), [Event("dma", {"sid": 1, "pasid": None, "iova": 0, "len": 4, "dir": "write",
                                           "data": b"abcd", "priv": False})])
    p = tmp_path / "t.npz"
    save_trace(t, p)
    arrs = dict(np.load(p))
    arrs["dma_data_off"] = np.array([100], np.int64)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrs)
    with pytest.raises(TraceError) as ei:
        load_trace(bad)
    assert ei.value.where == "event 0 (dma row 0)" and "payload" in ei.value.message
    arrs["dma_len"] = arrs["dma_len"].astype(np.int64)
    np.savez(bad, **arrs)
    with pytest.raises(TraceError, match="dtype uint32"):
        load_trace(bad)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(TraceError, match="not a readable"):
        load_trace(tmp_path / "junk.npz")


def test_oracle_file_is_recognised(tmp_path: Path) -> None:
    p = write(tmp_path, "o.jsonl", json.dumps({"format": "vtd-oracle-scenario/1", "id": "x", "steps": []}) + "\n")
    assert detect_kind(p) == "oracle"
    with pytest.raises(TraceError, match="oracle"):
        load_trace(p)


def test_parse_event_rejects_privileged_without_pasid() -> None:
    with pytest.raises(TraceError, match="carries a PASID"):
        parse_event({"op": "dma", "sid": 1, "iova": 0, "len": 4, "dir": "read", "priv": True}, "f", "event 3")
