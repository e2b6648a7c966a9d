"""vIOMMU machine traces (vtd-trace/2): a machine run recorded through the Recorder replays bit for bit on a
fresh machine (host memory, both units' registers, fault records, iommufd objects, every host call the
bridge made), in every encoding; the shipped "forgot to invalidate" traces replay clean with --check and
--sanitize reports exactly the injected mistakes; errors in such files are one-line TraceErrors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtd_emu.cli import main
from vtd_emu.errors import TraceError
from vtd_emu.tables import R, U, W, FirstStageTable
from vtd_emu.trace.model import FORMAT, FORMAT2, TraceConfig, load_trace, save_trace
from vtd_emu.trace.recorder import Recorder
from vtd_emu.trace.replay import Replayer, fault_list, memory_hash, registers_hash
from vtd_emu.vmm import GuestDriver, Machine

TRACES = Path(__file__).resolve().parents[1] / "traces"
SID, EMU, PASID, GVA, PAGE = 0x0310, 0x0320, 0x42, 0x7F12_3400_0000, 4096


def state(m: Machine) -> tuple[Any, ...]:
    """Everything a replay must reproduce, read from the machine itself."""
    return (memory_hash(m.host.ram), registers_hash(m.viommu), registers_hash(m.host.iommu), fault_list(m.viommu),
            [(o.id, o.kind) for o in m.objects()], [(a.call, a.args, a.result, a.errno) for a in m.bridge.actions])


def record_run() -> tuple[Recorder, Any]:
    rec = Recorder(TraceConfig(preset=None, vmm={"guest_ram": 16 << 20}), name="run")
    assert rec.plug(SID) is None and rec.plug(EMU, "emulated") is None
    drv = GuestDriver(rec, rec.mem, alloc_base=0x10_0000, alloc_limit=0x80_0000)
    drv.init()
    fs = FirstStageTable(rec.mem, drv.alloc, levels=4)
    fs.map(GVA, 0x90_0000, 2 * PAGE, R | W | U)
    dom = drv.bind_pasid(SID, PASID, fs.root)
    drv.bind_pasid(EMU, PASID, fs.root, did=dom.did)
    rec.dma_write(SID, GVA + 8, b"passthrough", pasid=PASID)
    assert rec.dma_read(EMU, GVA + 8, 11, pasid=PASID)[0] == b"passthrough"
    fs.unmap(GVA, PAGE)
    fs.map(GVA, 0x98_0000, PAGE, R | W | U)
    drv.flush_sva_range(dom, GVA, PAGE)
    rec.dma_write(SID, GVA + 8, b"new", pasid=PASID)
    assert rec.dma_read(SID, GVA + 5 * PAGE, 4, pasid=PASID)[1]   # a first-stage fault, recorded in the FRCDs
    drv.unbind_pasid(SID, PASID)
    rec.reset()
    rec.checkpoint("end")
    return rec, rec.trace()


@pytest.mark.parametrize("kind", ["yaml", "jsonl", "npz"])
def test_a_recorded_machine_run_replays_bit_for_bit(tmp_path: Path, kind: str) -> None:
    rec, trace = record_run()
    assert rec.vm is not None
    path = tmp_path / f"run.{kind}"
    save_trace(trace, path)
    assert path.read_bytes()[:200].count(FORMAT2.encode()) == 1 or kind == "npz"
    loaded = load_trace(path)
    r = Replayer(loaded).run()
    assert r.mismatches == [] and r.checks > 50
    assert r.machine is not None and r.machine.vmm is not None
    assert state(r.machine.vmm) == state(rec.vm)
    assert r.stats.bridge["binds"] == rec.vm.bridge.stats.binds == 1   # the emulated device needs no host bind


def test_bridge_expectations_catch_a_different_host_side(tmp_path: Path) -> None:
    _, trace = record_run()
    assert trace.config.vmm is not None
    trace.config.vmm["forwarding"] = "one-per-call"
    path = tmp_path / "other-mode.yaml"
    save_trace(trace, path)
    r = Replayer(load_trace(path)).run()
    # Same guest outcome, other host calls: only bridge expectations differ.
    assert r.mismatches and {m.what for m in r.mismatches} == {"bridge"}


def replay_json(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    rc = main(["replay", "--json", *args])
    return rc, json.loads(capsys.readouterr().out)


# The mistakes each shipped trace injects, at the event where it shows (found by reading the trace: the
# event numbers are those of scripts/make_traces.py's recording).
INJECTED = {
    "vmm-forgot-piotlb.yaml": [("stale-host", "dma", SID, PASID)],
    "vmm-forgot-pasid-cache.yaml": [("entry-changed", "mmio_write", SID, PASID)],
    "vmm-torn-update.yaml": [("torn-update", "mem_write", SID, PASID)],
}


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_forgot_to_invalidate_traces_report_exactly_the_injected_mistake(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = TRACES / name
    assert main(["replay", "--check", str(path)]) == 0
    capsys.readouterr()
    rc, doc = replay_json("--sanitize", str(path), capsys=capsys)
    assert rc == 1 and doc["vsva_findings"] == len(INJECTED[name])
    reps = doc["results"][0]["vsva_reports"]
    ops = [load_trace(path).events[r["event"]].op for r in reps]  # type: ignore[union-attr]
    assert [(r["kind"], op, r["sid"], r["pasid"]) for r, op in zip(reps, ops)] == INJECTED[name]


def test_the_other_shipped_vmm_traces_are_clean_under_the_validator(capsys: pytest.CaptureFixture[str]) -> None:
    clean = sorted(p for p in TRACES.glob("vmm-*") if p.name not in INJECTED)
    assert len(clean) == 6
    rc, doc = replay_json("--check", "--sanitize", *map(str, clean), capsys=capsys)
    assert rc == 0 and doc["mismatches"] == 0 and doc["vsva_findings"] == 0


def test_the_summary_compares_forwarding_modes(capsys: pytest.CaptureFixture[str]) -> None:
    out = {}
    for mode in ("", "-one-per-call"):
        rc, doc = replay_json(str(TRACES / f"vmm-unmap-storm{mode}.jsonl"), capsys=capsys)
        assert rc == 0
        out[mode] = doc["results"][0]["stats"]["bridge"]
    # 32 strict unmaps, each a PASID-based IOTLB and a device-TLB descriptor before one wait, plus the
    # PASID-selective flush of the attach: 65 descriptors on one nested HWPT, in 33 waits.
    assert out[""]["descriptors"] == out["-one-per-call"]["descriptors"] == 65
    assert out["-one-per-call"]["invalidate_calls"] == 65 and out[""]["invalidate_calls"] == 33
    assert main(["replay", str(TRACES / "vmm-unmap-storm.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "65 guest invalidations forwarded in 33 ioctls (0.51 per descriptor" in text


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


VMM_HEAD = "format: vtd-trace/2\nconfig: {vmm: {guest_ram: 0x1000000}}\n"


@pytest.mark.parametrize("text, where, what", [
    ("format: vtd-trace/1\nconfig: {vmm: {}}\nevents: []\n", "config.vmm", "needs format: vtd-trace/2"),
    ("format: vtd-trace/1\nevents:\n- {op: vmm.reset}\n", "event 0", "needs format vtd-trace/2"),
    ("format: vtd-trace/2\nevents:\n- {op: note, text: x, expect: {bridge: []}}\n", "event 0", "with config.vmm"),
    ("format: vtd-trace/2\nconfig: {vmm: {forwarding: batched}}\n", "config.vmm.forwarding", "one-per-call"),
    ("format: vtd-trace/2\nconfig: {vmm: {ram: 1}}\n", "config.vmm.ram", "unknown key"),
    ("format: vtd-trace/2\nconfig: {ram_size: 0x1000, vmm: {}}\n", "config.vmm", "remove config.ram_size"),
    ("format: vtd-trace/2\nconfig: {vmm: {viommu: nosuch}}\n", "config.vmm.viommu", "nosuch"),
    (VMM_HEAD + "events:\n- {op: vmm.plug, sid: 0x10, kind: virtual}\n", "(vmm.plug) field 'kind'", "emulated"),
])
def test_bad_vmm_trace_files_are_one_line_trace_errors(tmp_path: Path, text: str, where: str, what: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "bad.yaml", text)
    with pytest.raises(TraceError) as ei:
        load_trace(p)
    assert where in ei.value.where and what in ei.value.message
    assert main(["replay", "--check", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vtd-emu: {p}")


@pytest.mark.parametrize("events, what", [
    ("- {op: dma, sid: 0x10, iova: 0, len: 4, dir: read}\n", "the guest has no device at 0x0010"),
    ("- {op: vmm.plug, sid: 0x10, kind: emulated, pasid_bits: 2}\n"
     "- {op: dma, sid: 0x10, pasid: 0x40, iova: 0, len: 4, dir: read}\n", "2 PASID bits"),
])
def test_replay_errors_of_vmm_traces_exit_2(tmp_path: Path, events: str, what: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "bad.yaml", VMM_HEAD + "events:\n" + events)
    assert main(["replay", "--check", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and what in err[0]


def test_version_1_traces_stay_version_1(tmp_path: Path) -> None:
    t = load_trace(TRACES / "legacy-dma.yaml")
    save_trace(t, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text().startswith(f"format: {FORMAT}\n")
    assert (tmp_path / "again.yaml").read_bytes() == (TRACES / "legacy-dma.yaml").read_bytes()


# -- random flows --------------------------------------------------------------------------------------

Step = tuple[str, int, bool]
STEPS = st.lists(st.tuples(st.sampled_from(["write", "read", "remap", "rebind"]), st.integers(0, 3), st.booleans()),
                 min_size=1, max_size=12)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS, forwarding=st.sampled_from(["coalesced", "one-per-call"]))
def test_random_vsva_flows_replay_bit_for_bit_and_the_validator_matches_a_model(
        steps: list[Step], forwarding: str) -> None:
    """A guest process bound to a PASID; random DMAs, remaps of its four pages (with the PASID-based
    IOTLB invalidation, or — the flag clear — without it) and re-binds to a copy of the table.  The
    recording replays to the same machine state, and the validator reports a stale host translation for
    exactly the DMAs a model of the host IOTLB says hit a page remapped since it was cached."""
    rec = Recorder(TraceConfig(preset=None, vmm={"guest_ram": 16 << 20, "forwarding": forwarding}))
    rec.plug(SID)
    drv = GuestDriver(rec, rec.mem, alloc_base=0x10_0000, alloc_limit=0x80_0000)
    drv.init()
    gpa = {i: 0x90_0000 + i * PAGE for i in range(4)}

    def table() -> FirstStageTable:
        fs = FirstStageTable(rec.mem, drv.alloc, levels=4)
        for i, g in gpa.items():
            fs.map(GVA + i * PAGE, g, PAGE, R | W | U)
        return fs

    fs = table()
    dom = drv.bind_pasid(SID, PASID, fs.root)
    # page -> (the GPA the host IOTLB holds for it, whether that entry allows writes: the builder's PTEs
    # have D clear, so an entry a read filled cannot answer a write, which walks again and sets D)
    cached: dict[int, tuple[int, bool]] = {}
    stale_events: list[int] = []
    for n, (op, i, flag) in enumerate(steps):
        va = GVA + i * PAGE
        if op in ("write", "read"):
            hit = i in cached and (op == "read" or cached[i][1])
            if hit and cached[i][0] != gpa[i]:
                stale_events.append(len(rec.trace().events))
            elif not hit:
                cached[i] = (gpa[i], op == "write")
            if op == "write":
                rec.dma_write(SID, va + 8, bytes([n]) * 8, pasid=PASID)
            else:
                rec.dma_read(SID, va + 8, 8, pasid=PASID)
        elif op == "remap":
            gpa[i] = 0xA0_0000 + n * PAGE
            fs.unmap(va, PAGE)
            fs.map(va, gpa[i], PAGE, R | W | U)
            if flag:
                drv.flush_sva_range(dom, va, PAGE)
                cached.pop(i, None)
        else:
            drv.unbind_pasid(SID, PASID)
            fs = table()
            dom = drv.bind_pasid(SID, PASID, fs.root)
            cached.clear()
    rec.checkpoint("end")
    assert rec.vm is not None
    r = Replayer(rec.trace()).run()
    assert r.mismatches == [] and r.machine is not None and state(r.machine.vmm) == state(rec.vm)
    v = Replayer(rec.trace(), sanitize=True).run()
    assert v.mismatches == []
    assert [(x.kind, x.event, x.sid, x.pasid) for x in v.reports] == [("stale-host", e, SID, PASID)
                                                                     for e in stale_events]


def test_the_documented_vmm_config_builds_the_default_machine(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "trace-format.md").read_text()
    block = doc.split("```yaml\nformat: vtd-trace/2\n", 1)[1].split("```", 1)[0]
    p = write(tmp_path, "doc.yaml", "format: vtd-trace/2\n" + block + "events:\n- {op: vmm.plug, sid: 0x310}\n")
    r = Replayer(load_trace(p)).run()
    assert r.mismatches == [] and r.machine is not None
    vm = r.machine.vmm
    assert list(vm.devices) == [SID] and vm.cfg == Machine().cfg and vm.size == 16 << 20
