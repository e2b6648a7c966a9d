"""vtd-emu timeline: Chrome/Perfetto trace-event JSON with the right events and phases."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from vtd_emu.cli import main
from vtd_emu.trace.model import load_trace
from vtd_emu.trace.timeline import build_timeline

TRACES = Path(__file__).resolve().parents[1] / "traces"


def test_timeline_of_the_qi_trace(tmp_path: Path) -> None:
    src = TRACES / "qi-heavy.yaml"
    out = tmp_path / "t.json"
    assert main(["timeline", str(src), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    evs = doc["traceEvents"]
    phases = Counter(e["ph"] for e in evs)
    t = load_trace(src)
    n_dma = sum(1 for e in t.iter_events() if e.op == "dma")
    n_desc = sum(len(e.fields["descriptors"]) for e in t.iter_events() if e.op == "qi_submit")
    n_resp = sum(1 for e in t.iter_events() if e.op == "page_response")
    assert phases["X"] == n_dma == doc["otherData"]["dmas"]
    by_tid = Counter((e["ph"], e["tid"]) for e in evs)
    names = {e["args"]["name"]: e["tid"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    assert by_tid[("i", names["invalidations"])] == n_desc + n_resp
    assert by_tid[("i", names["faults"])] == doc["otherData"]["faults"] == 1
    n_req = sum(1 for e in t.iter_events() if e.op == "page_request")
    assert by_tid[("i", names["page requests"])] == n_req + n_resp
    assert all(e["ts"] >= 0 for e in evs if e["ph"] != "M")
    dmas = [e for e in evs if e["ph"] == "X"]
    assert all(e["name"] in ("dma read", "dma write") and e["dur"] > 0 for e in dmas)
    assert [e["ts"] for e in dmas] == sorted(e["ts"] for e in dmas)


def test_timeline_of_a_binary_trace_counts_every_dma() -> None:
    t = load_trace(TRACES / "bulk-dma.npz")
    doc = build_timeline(t)
    phases = Counter(e["ph"] for e in doc["traceEvents"])
    assert phases["X"] == doc["otherData"]["dmas"] == 12_000
    assert phases["M"] == 6  # process name, four fixed tracks, the one requester
