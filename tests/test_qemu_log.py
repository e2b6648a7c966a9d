"""Import of QEMU -trace 'vtd_*' logs: both timestamp styles, unknown events, malformed lines, and the
shipped log captured from Debian's QEMU 7.2 replaying with every expectation met."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtd_emu.errors import TraceError
from vtd_emu.trace.model import Event, load_trace, save_trace
from vtd_emu.importers.qemu_log import EVENTS, import_log, parse_log
from vtd_emu.trace.replay import Replayer

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "traces" / "qemu-import"

# The same session in the 7.2 style and in the 10.1+ style (hand-written from qemu-model.md §6.1/§6.2).
BODY = [
    ("vtd_reg_write", "addr 0x20 size 0x8 value 0x100000"),
    ("vtd_reg_write", "addr 0x18 size 0x4 value 0x40000000"),
    ("vtd_reg_write_gcmd", "status 0x0 value 0x40000000"),
    ("vtd_reg_dmar_root", "addr 0x100000 scalable 0"),
    ("vtd_context_cache_reset", ""),
    ("vtd_reg_write", "addr 0x90 size 0x8 value 0x110000"),
    ("vtd_reg_write", "addr 0x18 size 0x4 value 0x4000000"),
    ("vtd_inv_qi_enable", "enabled 1"),
    ("vtd_reg_write", "addr 0x88 size 0x4 value 0x20"),
    ("vtd_inv_qi_head", "read head 0"),
    ("vtd_inv_desc", "invalidate desc type iotlb high 0x0 low 0x12"),
    ("vtd_inv_desc_iotlb_global", "iotlb invalidate global"),
    ("vtd_inv_desc", "invalidate desc type wait high 0x111000 low 0x100000025"),
    ("vtd_inv_desc_wait_sw", "wait invalidate status write addr 0x111000 data 0x1"),
    ("vtd_reg_write", "addr 0x18 size 0x4 value 0x84000000"),
    ("vtd_dmar_enable", "enable 1"),
    ("vtd_iotlb_page_update", "IOTLB page update sid 0x10 iova 0x40100 slpte 0x200003 domain 0x1"),
    ("vtd_dmar_translate", "dev 00:02.00 iova 0x40000 -> gpa 0x200000 mask 0xfff"),
    ("vtd_dmar_fault", "sid 0x10 fault 6 addr 0x60000 write 0"),
    ("vtd_frr_new", "index 0 high 0x40ffff0600000010 low 0x60000"),
    ("vtd_dmar_fault", "sid 0x10 fault 6 addr 0x60004 write 0"),
    ("vtd_made_up_event", "whatever 1"),
    ("vtd_pasid_cache_reset", ""),
]


def log_72() -> str:
    lines = [f"123@1700000000.{i:06d}:{n} {t}" for i, (n, t) in enumerate(BODY)]
    lines.insert(5, "2026-11-22T01:28:44.721788Z qemu-system-x86_64: some QEMU message")
    return "\n".join(lines) + "\n"


def log_101() -> str:
    return "\n".join(f"2025-09-01T12:00:{i:02d}.{i:06d}Z {n} {t}" for i, (n, t) in enumerate(BODY)) + "\n"


def log_bare() -> str:
    return "\n".join(f"{n} {t}" for n, t in BODY) + "\n"


@pytest.mark.parametrize("text,style", [(log_72(), "7.2"), (log_101(), "10.1"), (log_bare(), "bare")])
def test_both_timestamp_styles_parse_alike(text: str, style: str) -> None:
    evs, s = parse_log(text, "x.log")
    assert s.styles == {style: len(BODY)}
    assert [e.name for e in evs] == [n for n, _ in BODY if n != "vtd_made_up_event"]
    assert s.unknown == {"vtd_made_up_event": 1}
    assert s.other_lines == (1 if style == "7.2" else 0)
    fault = next(e for e in evs if e.name == "vtd_dmar_fault")
    assert fault.args == {"sid": 0x10, "fault": 6, "addr": 0x60000, "is_write": 0}
    tr = next(e for e in evs if e.name == "vtd_dmar_translate")
    assert tr.args == {"bus": 0, "slot": 2, "func": 0, "iova": 0x40000, "gpa": 0x200000, "mask": 0xFFF}
    if style != "bare":
        assert all(e.ts is not None for e in evs)


@pytest.mark.parametrize("text", [log_72(), log_101()])
def test_import_converts_registers_descriptors_dma_and_faults(tmp_path: Path, text: str) -> None:
    p = tmp_path / "q.log"
    p.write_text(text)
    trace, s = import_log(p, out=tmp_path / "q.yaml")
    evs = [e for e in trace.events if isinstance(e, Event)]
    ops = [e.op for e in evs]
    assert ops.count("mmio_write") == 6 and ops.count("dma") == 2
    # the two descriptors QEMU fetched are written at the queue head before the IQT write
    iqt = next(i for i, e in enumerate(evs) if e.op == "mmio_write" and e.fields["offset"] == 0x88)
    assert [(e.fields["addr"], e.fields["qwords"]) for e in evs[iqt - 2:iqt]] == [
        (0x110000, [0x12, 0]), (0x110010, [0x100000025, 0x111000])]
    assert "iotlb invalidate global" in (evs[iqt].note or "")
    gcmd_srtp = evs[1]
    assert gcmd_srtp.expect == {"regs": {0x20: (0x100000, 0xFFFF_FFFF_FFFF_FC00)}}
    te = next(e for e in evs if e.op == "mmio_write" and e.fields["value"] == 0x84000000)
    assert te.expect == {"regs": {0x1C: (1 << 31, 1 << 31)}}
    dma = [e for e in evs if e.op == "dma"]
    # the IOTLB line before the translation gives the exact address, and QEMU walked for it
    assert dma[0].fields["iova"] == 0x40100 and dma[0].expect == {"faults": [], "addrs": [0x200100], "walks": 1}
    # without a RAM image the tables are placed by the import; the leaf written is the one QEMU read
    writes = [e for e in evs[:evs.index(dma[0])] if e.op == "mem_write" and e.note is None]
    assert writes[-1].fields["qwords"] == [0x200003]
    # the 4-byte retry of the faulting access is folded into one DMA; the record's F bit is expected set
    assert dma[1].expect["faults"] == [6]
    assert dma[1].expect["regs"][0x228] == (0xC0FF_FF06_0000_0010, (1 << 64) - 1)
    assert s.unknown == {"vtd_made_up_event": 1} and s.descriptors == 2
    save_trace(trace, tmp_path / "q.yaml")
    assert load_trace(tmp_path / "q.yaml").event_count() == trace.event_count()


def test_malformed_known_event_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.log"
    p.write_text("123@1.000001:vtd_reg_write addr 0x20 size 0x8 value 0x100000\n"
                 "123@1.000002:vtd_reg_write addr 0x20 size eight\n")
    with pytest.raises(TraceError) as ei:
        import_log(p)
    assert ei.value.where == "line 2" and "vtd_reg_write" in ei.value.message and "size eight" in ei.value.message


def test_event_table_matches_the_reference() -> None:
    ref = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qemu-model.md"
    if not ref.exists():
        pytest.skip("shared reference not available")
    rows = [ln for ln in ref.read_text().splitlines() if ln.startswith("| vtd_")]
    names = {r.split("|")[1].strip() for r in rows}
    assert names == {n for n in EVENTS if n.startswith("vtd_")}
    for r in rows:
        cells = [c.strip() for c in r.strip().strip("|").split("|")]
        text = cells[2].strip("`") if cells[2] != "(empty)" else ""
        assert EVENTS[cells[0]][0] == text, cells[0]


def test_shipped_qemu_log_reimports_and_replays(tmp_path: Path) -> None:
    log = SHIPPED / "edu-legacy.log"
    if not log.exists():
        pytest.skip("shipped QEMU log missing")
    pytest.importorskip("zstandard")
    out = tmp_path / "edu.yaml"
    trace, s = import_log(log, ram=SHIPPED / "edu-legacy.ram.zst", out=out)
    save_trace(trace, out)
    assert s.styles == {"7.2": s.trace_lines} and not s.unknown and s.descriptors == 7
    res = Replayer(load_trace(out)).run()
    assert res.mismatches == [] and res.checks >= 14
    shipped = load_trace(SHIPPED / "edu-legacy.yaml")
    from vtd_emu.trace.model import canonical_events

    assert canonical_events(shipped) == canonical_events(load_trace(out))


@pytest.mark.parametrize("line,expect", [
    ("vtd_dmar_fault sid 0x12345678 fault 6 addr 0x60000 write 0", "sid 0x12345678 does not fit: expected a 16-bit"),
    ("vtd_translate_pt source id 0x10000, iova 0x1000", "sid 0x10000 does not fit"),
    ("vtd_dmar_fault sid 0x10 fault 300 addr 0x60000 write 0", "fault 0x12c does not fit: expected a 8-bit"),
    ("vtd_dmar_fault sid 0x10 fault 6 addr 0x60000 write 2", "is_write 0x2 does not fit"),
    ("vtd_reg_write addr 0x20 size 0x3 value 0x1", "expected an access size of 1, 2, 4 or 8"),
    ("vtd_reg_write addr 0x18 size 0x4 value 0x100000000", "does not fit a 4-byte access"),
    ("vtd_reg_read addr 0x100000000 size 0x4", "addr 0x100000000 does not fit: expected a 32-bit"),
    ("vtd_dmar_translate dev 00:20.00 iova 0x0 -> gpa 0x0 mask 0xfff", "slot 0x20 does not fit"),
    ("vtd_dmar_translate dev 00:02.00 iova 0x10000000000000000 -> gpa 0x0 mask 0xfff", "iova"),
    ("vtd_frr_new index 5 high 0x0 low 0x0", "index 5: expected 0..0"),
])
def test_out_of_range_log_values_name_the_line(tmp_path: Path, line: str, expect: str) -> None:
    """What replay would refuse is refused while importing, naming the log file and line."""
    p = tmp_path / "bad.log"
    p.write_text("123@1.000001:vtd_reg_write addr 0x20 size 0x8 value 0x100000\n"
                 "123@1.000002:vtd_dmar_fault sid 0x10 fault 6 addr 0x1000 write 0\n"
                 f"123@1.000003:{line}\n")
    with pytest.raises(TraceError) as ei:
        import_log(p)
    assert ei.value.file == str(p) and ei.value.where == "line 3", str(ei.value)
    assert expect in ei.value.message


@pytest.mark.parametrize("text", ["", "qemu-system-x86_64: -device edu: some message\n\n",
                                  "123@1.000001:pci_cfg_read bus 0 dev 2\n"])
def test_a_log_without_vtd_trace_lines_is_an_error(tmp_path: Path, text: str) -> None:
    p = tmp_path / "empty.log"
    p.write_text(text)
    with pytest.raises(TraceError, match="no VT-d trace line") as ei:
        import_log(p)
    assert ei.value.file == str(p)


@pytest.mark.parametrize("size", [-1, 0, (1 << 64) + 1])
def test_import_refuses_a_bad_ram_size(tmp_path: Path, size: int) -> None:
    p = tmp_path / "q.log"
    p.write_text(log_72())
    with pytest.raises(TraceError, match="memory size") as ei:
        import_log(p, ram_size=size)
    assert ei.value.file == str(p)


def test_import_writes_only_what_replay_accepts(tmp_path: Path) -> None:
    p = tmp_path / "q.log"
    p.write_text(log_72())
    trace, _ = import_log(p, ram_size=128 << 20)
    for kind in ("yaml", "jsonl", "npz"):
        out = tmp_path / f"q.{kind}"
        save_trace(trace, out)
        assert Replayer(load_trace(out)).run().events == trace.event_count()
