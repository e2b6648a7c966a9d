"""The trace commands of vtd-emu: replay (our traces and oracle scenarios), record, convert, import-qemu,
timeline; bad input is one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vtd_emu.cli import main
from vtd_emu.trace.model import canonical_events, load_trace

TRACES = Path(__file__).resolve().parents[1] / "traces"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_replay_summary_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["replay", "--check", str(TRACES / "legacy-dma.yaml"), str(TRACES / "qi-heavy.yaml")], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[-1] == f"checked: 2 scenarios, {31 + 120} events, 0 mismatches"
    text = "\n".join(lines)
    for word in ("DMAs", "faults", "cache hit rates", "invalidations", "QI descriptors", "iotlb-page"):
        assert word in text
    rc, out, _ = run(["replay", "--json", str(TRACES / "legacy-dma.yaml")], capsys)
    doc = json.loads(out.splitlines()[0])
    assert doc["scenarios"] == 1 and doc["stats"]["dmas"] == 7 and doc["stats"]["faults"]


def test_replay_check_reports_each_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (TRACES / "forgot-to-invalidate.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("addrs: ['0x3000000']}, note: 'stale", "addrs: ['0x3800000']}, note: 'stale", 1))
    rc, out, _ = run(["replay", "--check", str(bad)], capsys)
    assert rc == 1
    mism = [ln for ln in out.splitlines() if ln.startswith(str(bad))]
    assert len(mism) == 1 and "(dma, line" in mism[0]
    assert "addrs: expected [0x3800000], got [0x3000000]" in mism[0]
    assert out.strip().endswith("1 mismatches")
    rc, _, _ = run(["replay", str(bad)], capsys)
    assert rc == 0  # without --check mismatches are counted, not fatal


def test_replay_mixes_oracle_scenarios_and_traces(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["replay", "--check", str(TRACES / "qemu-7.2" / "scalable.jsonl"),
                      str(TRACES / "nested.yaml")], capsys)
    assert rc == 0 and out.strip().endswith(" 0 mismatches")


def test_profile_flag_overrides_the_trace(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["replay", "--check", "--profile", "qemu-7.2", str(TRACES / "scalable-ss.yaml")], capsys)
    assert rc == 1  # QEMU 7.2 reports scalable-mode faults with legacy codes


@pytest.mark.parametrize("to", ["yaml", "jsonl", "npz"])
def test_convert_round_trips(tmp_path: Path, to: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = TRACES / "first-stage-5level.jsonl"
    out = tmp_path / f"c.{to}"
    rc, _, _ = run(["convert", str(src), str(out)], capsys)
    assert rc == 0
    back = tmp_path / "back.jsonl"
    assert run(["convert", str(out), str(back)], capsys)[0] == 0
    assert canonical_events(load_trace(back)) == canonical_events(load_trace(src))
    assert back.read_text() == src.read_text()


def test_record_writes_fresh_expectations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = TRACES / "legacy-dma.yaml"
    stale = tmp_path / "stale.yaml"
    stale.write_text(src.read_text().replace("'0x4000000'", "'0x4444000'"))
    assert run(["replay", "--check", str(stale)], capsys)[0] == 1
    out = tmp_path / "fresh.npz"
    rc, msg, _ = run(["record", str(stale), "-o", str(out)], capsys)
    assert rc == 0 and "expectations of the input differed" in msg
    assert run(["replay", "--check", str(out)], capsys)[0] == 0
    assert canonical_events(load_trace(out)) == canonical_events(load_trace(src))


def test_import_qemu_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("zstandard")
    d = TRACES / "qemu-import"
    out = tmp_path / "edu.jsonl"
    rc, text, _ = run(["import-qemu", str(d / "edu-legacy.log"), "--ram", str(d / "edu-legacy.ram.zst"),
                       "-o", str(out)], capsys)
    assert rc == 0 and "vtd_dmar_translate" in text and "unknown events  0" in text
    assert run(["replay", "--check", str(out)], capsys)[0] == 0
    rc, text, _ = run(["import-qemu", str(d / "edu-legacy.log"), "-o", str(tmp_path / "x.yaml"), "--json",
                       "--qemu-option", "aw_bits=48"], capsys)
    s = json.loads(text)
    assert s["descriptors_reconstructed"] == 7 and s["notes"]
    assert load_trace(tmp_path / "x.yaml").config.qemu == {"aw_bits": 48}


def test_progress_line_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["replay", "--progress", str(TRACES / "bulk-dma.npz")], capsys)
    assert rc == 0 and "replay " in err and "12,014/12,014 events (100%)" in err


@pytest.mark.parametrize("content,argv_tail,expect", [
    ("format: vtd-trace/1\nevents:\n  - {op: dma, sid: 1, iova: 0, len: 4, dir: up}\n", [], "line 3 event 0 (dma)"),
    ('{"format": "vtd-trace/1"}\n{"op": "mmio_write"}\n', [], "line 2 (event 0) (mmio_write)"),
    ("format: vtd-trace/1\nconfig: {preset: nosuch}\n", [], "unknown preset"),
    ("123@1.000001:vtd_reg_write addr 0x20 size bogus\n", ["import-qemu"], "line 1"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, content: str, argv_tail: list[str], expect: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / ("bad.log" if argv_tail else "bad.yaml")
    p.write_text(content)
    argv = ["import-qemu", str(p), "-o", str(tmp_path / "o.yaml")] if argv_tail else ["replay", str(p)]
    rc, _, err = run(argv, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("vtd-emu: ") and expect in err
    assert str(p) in err


def test_convert_refuses_unknown_extension(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["convert", str(TRACES / "nested.yaml"), str(tmp_path / "x.txt")], capsys)
    assert rc == 2 and "use .yaml, .jsonl or .npz" in err


def test_replay_json_is_one_document_and_the_same_bytes_every_run(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["replay", "--check", "--json", "--sanitize", str(TRACES / "forgot-to-invalidate.yaml"),
            str(TRACES / "legacy-dma.yaml"), str(TRACES / "qemu-7.2" / "legacy_faults.jsonl")]
    rc, first, _ = run(argv, capsys)
    rc2, second, _ = run(argv, capsys)
    assert rc == rc2 == 1  # the forgotten invalidation: two stale translations
    assert first == second
    doc = json.loads(first)  # the whole of stdout is one document
    assert doc["stale_translations"] == 2 and doc["failed"] == [] and "seconds" not in doc["stats"]
    assert len(doc["results"][0]["stale_translations"]) == 2
    rc, timed, _ = run(argv + ["--timing"], capsys)
    assert "seconds" in json.loads(timed)["stats"]


def test_replay_json_carries_the_mismatches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (TRACES / "forgot-to-invalidate.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("addrs: ['0x3000000']}, note: 'stale", "addrs: ['0x3800000']}, note: 'stale", 1))
    rc, out, _ = run(["replay", "--check", "--json", str(bad)], capsys)
    doc = json.loads(out)
    assert rc == 1 and doc["mismatches"] == 1
    assert "addrs: expected [0x3800000], got [0x3000000]" in doc["results"][0]["mismatch_list"][0]


def test_replay_of_a_directory_reports_bad_files_and_runs_the_others(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("legacy-dma.yaml", "first-stage-5level.jsonl"):
        (tmp_path / name).write_bytes((TRACES / name).read_bytes())
    (tmp_path / "sub").mkdir()
    bad = tmp_path / "sub" / "broken.yaml"
    bad.write_text("format: vtd-trace/1\nconfig: {preset: ''}\n")
    (tmp_path / "sub" / "notes.txt").write_text("not a trace, skipped")
    rc, out, err = run(["replay", "--check", str(tmp_path)], capsys)
    assert rc == 2
    assert err.strip().splitlines() == [f"vtd-emu: {bad}: config.preset: expected a preset name, got ''"]
    assert f"failed: 1 of 3 files: {bad}" in out and out.strip().endswith("0 mismatches")
    assert "checked: 2 scenarios" in out
    rc, out, _ = run(["replay", "--json", str(tmp_path)], capsys)
    doc = json.loads(out)
    assert rc == 2 and doc["files"] == 3 and [f["file"] for f in doc["failed"]] == [str(bad)]
    assert len(doc["results"]) == 2
    (tmp_path / "empty").mkdir()
    rc, _, err = run(["replay", str(tmp_path / "empty")], capsys)
    assert rc == 2 and "no trace files" in err


@pytest.mark.parametrize("config,expect", [
    ("{preset: ''}", "config.preset: expected a preset name"),
    ("{preset: nope}", "unknown preset 'nope'"),
    ("{profile: nope}", "unknown profile 'nope'"),
    ("{overrides: {cap.NFR: 0x10000}}", "does not fit"),
    ("{unit: {fault_collapse: 2}}", "config.unit.fault_collapse"),
    ("{ram_size: -1}", "config.ram_size"),
])
def test_convert_and_record_refuse_what_replay_refuses(tmp_path: Path, config: str, expect: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "t.yaml"
    src.write_text(f"format: vtd-trace/1\nconfig: {config}\nevents: []\n")
    out = tmp_path / "o.jsonl"
    for argv in (["replay", str(src)], ["convert", str(src), str(out)], ["record", str(src), "-o", str(out)]):
        rc, _, err = run(argv, capsys)
        assert rc == 2 and expect in err and not out.exists(), (argv, err)


def test_sizes_are_bounded_at_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = "format: vtd-trace/1\nevents:\n"
    for event, expect in (("{op: dma, sid: 1, iova: 0, len: 0xFFFFFFFF, dir: read}", "at most 0x4000000"),
                          ("{op: mem_read, addr: 0, len: 0xFFFFFFFF}", "at most 0x4000000"),
                          ("{op: checkpoint, mem: [{addr: 0, len: 0x10000000000}]}", "a checkpoint hashes at most")):
        src = tmp_path / "big.yaml"
        src.write_text(head + f"  - {event}\n")
        rc, _, err = run(["replay", str(src)], capsys)
        assert rc == 2 and "line 3 event 0" in err and expect in err, err


def test_outputs_appear_only_on_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: vtd-trace/1\nevents:\n  - {op: dma}\n")
    for argv, out in ((["convert", str(bad), str(tmp_path / "o.npz")], tmp_path / "o.npz"),
                      (["record", str(bad), "-o", str(tmp_path / "r.yaml")], tmp_path / "r.yaml"),
                      (["timeline", str(bad), "-o", str(tmp_path / "t.json")], tmp_path / "t.json")):
        rc, _, _ = run(argv, capsys)
        assert rc == 2 and not out.exists()
    keep = tmp_path / "keep.yaml"
    keep.write_text("precious")
    assert run(["convert", str(bad), str(keep)], capsys)[0] == 2
    assert keep.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "keep.yaml"]  # no temporary left
