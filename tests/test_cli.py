"""The command line: walk, dump, replay; bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vtd_emu.tables import R, W, LegacyRootTable, PageAllocator, SecondStageTable
from vtd_emu.cli import main
from vtd_emu.memory import HostRAM


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, int, int]:
    ram = HostRAM()
    alloc = PageAllocator(ram, base=0x10000)
    ss = SecondStageTable(ram, alloc, levels=3)
    ss.map(0x40000, 0x200000, 0x3000, R | W)
    ss.map(0x80000000, 0x40000000, 2 << 20, R, page_size=2 << 20)
    root = LegacyRootTable(ram, alloc)
    root.set_context(0, 0x10, slptptr=ss.root, aw=1, did=3)
    img = tmp_path / "ram.bin"
    img.write_bytes(ram.read(0, alloc.next))
    return img, root.root, ss.root


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_walk_prints_every_entry_decoded(image: tuple[Path, int, int], capsys: pytest.CaptureFixture[str]) -> None:
    img, root, _ = image
    rc, out, _ = run(["walk", "--ram", str(img), "--rtaddr", hex(root), "--sid", "0x10", "--iova", "0x41234",
                      "--preset", "qemu-7.2-default"], capsys)
    assert rc == 0
    assert "legacy_root_entry" in out and "legacy_context_entry" in out and "DID=0x3" in out
    assert out.count("ss_p") == 3
    assert "result: 0x201234" in out


def test_walk_fault_exit_1(image: tuple[Path, int, int], capsys: pytest.CaptureFixture[str]) -> None:
    img, root, _ = image
    rc, out, _ = run(["walk", "--ram", str(img), "--rtaddr", hex(root), "--sid", "0x10", "--iova", "0x80000000",
                      "--access", "w", "--preset", "qemu-7.2-default"], capsys)
    assert rc == 1 and "fault 0x5 WRITE" in out


def test_dump_merges_ranges_and_json(image: tuple[Path, int, int], capsys: pytest.CaptureFixture[str]) -> None:
    img, root, ss_root = image
    rc, out, _ = run(["dump", "--ram", str(img), "--ss-root", hex(ss_root), "--levels", "3"], capsys)
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("0x")]
    assert lines[0].split()[:4] == ["0x0000000000040000", "0x0000000000200000", "0x3000", "4K"]
    assert lines[1].split()[3:] == ["2M", "r--"]
    rc, out, _ = run(["dump", "--ram", str(img), "--rtaddr", hex(root), "--sid", "0x10", "--format", "json",
                      "--leaves", "--preset", "qemu-7.2-default"], capsys)
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert [r["iova"] for r in rows] == ["0x40000", "0x41000", "0x42000", "0x80000000"]


@pytest.mark.parametrize("argv", [
    ["walk", "--ram", "/nonexistent.bin", "--fs-root", "0x1000", "--iova", "0"],
    ["walk", "--ram", "x", "--iova", "not-a-number"],
    ["nosuchcommand"],
    ["dump", "--ram", "x"],
])
def test_bad_input_is_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(argv, capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("vtd-emu")
    assert "Traceback" not in err


def test_replay_oracle_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import shared_dir

    src = shared_dir() / "qemu-oracle" / "cases" / "legacy_xlate.jsonl"
    if not src.exists():
        pytest.skip("shared oracle cases not available")
    rc, out, _ = run(["replay", "--check", str(src)], capsys)
    assert rc == 0 and out.strip().endswith("0 mismatches")
    # corrupt an expectation: --check must report it and exit 1
    lines = src.read_text().splitlines()
    doc = json.loads(lines[0])
    step = next(s for s in doc["steps"] if s["op"] == "mmio_read")
    step["expect"]["value"] = "0xdead"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(doc) + "\n")
    rc, out, _ = run(["replay", "--check", str(bad)], capsys)
    assert rc == 1 and "expected 0xdead" in out and out.strip().endswith("1 mismatches")


def test_replay_sanitize_names_each_stale_translation(capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import REPO

    rc, out, _ = run(["replay", "--sanitize", str(REPO / "traces" / "forgot-to-invalidate.yaml")], capsys)
    stale = [ln for ln in out.splitlines() if "stale translation:" in ln]
    assert rc == 1 and len(stale) == 2
    assert "iova 0x40000 (write): cached 0x3000000, memory says 0x3800000" in stale[0]
    assert "memory says fault 0x6 READ" in stale[1]
    assert "sanitizer: 2 stale translations" in out
    # a trace that invalidates correctly is clean
    rc, out, _ = run(["replay", "--sanitize", "--check", str(REPO / "traces" / "legacy-dma.yaml")], capsys)
    assert rc == 0 and "sanitizer: 0 stale translations" in out


def test_dump_of_a_nested_pasid_composes_both_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every row of the nested dump is what the unit itself translates that address to."""
    from vtd_emu.tables import (PAGE_2M, PGTT_NESTED, U, FirstStageTable, PasidTables,
                                ScalableRootTable)
    from vtd_emu.memory import GuestPhysView
    from vtd_emu.vtd.iommu import VtdIommu

    ram = HostRAM()
    alloc = PageAllocator(ram, base=0x10000, limit=0x10_0000)
    ss = SecondStageTable(ram, alloc, levels=4)
    ss.map(0, 0x100_0000, 4 << 20, R | W, page_size=PAGE_2M)        # guest RAM 0..4M, 2 MiB pages
    ss.map(0x40_0000, 0x150_0000, 0x2000, R)                          # two read-only 4 KiB pages
    guest = GuestPhysView(ram, ss)
    fs = FirstStageTable(guest, PageAllocator(guest, base=0x10_0000, limit=0x20_0000), levels=4)
    fs.map(0x7F00_0000_0000, 0x20_0000, PAGE_2M, W | U, page_size=PAGE_2M)  # one FS 2M leaf over SS 2M
    fs.map(0x7F00_1000_0000, 0x40_0000, 0x2000, W | U)                       # FS 4K over SS read-only 4K
    fs.map(0x7F00_2000_0000, 0x90_0000, 0x1000, W | U)                       # GPA the SS does not map
    pasids = PasidTables(ram, alloc)
    pasids.set_entry(3, pgtt=PGTT_NESTED, did=2, fsptptr=fs.root, ssptptr=ss.root, aw=2)
    root = ScalableRootTable(ram, alloc)
    root.set_context(0, 0x18, pasid_dir=pasids.dir, pdts=pasids.pdts)
    img = tmp_path / "ram.bin"
    img.write_bytes(ram.read(0, 0x150_2000))
    rc, out, _ = run(["dump", "--ram", str(img), "--rtaddr", hex(root.root), "--scalable", "--sid", "0x18",
                      "--pasid", "3", "--leaves", "--format", "json"], capsys)
    assert rc == 0
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert [(r["iova"], r["addr"], r["length"], r["perm"]) for r in rows] == [
        ("0x7f0000000000", "0x1200000", 0x200000, "rw-u"),
        ("0x7f0010000000", "0x1500000", 0x1000, "r--u"),
        ("0x7f0010001000", "0x1501000", 0x1000, "r--u"),
    ]
    from vtd_emu.tables import enable_translation
    io = VtdIommu(ram, "modern")
    enable_translation(io, root.root, scalable=True)
    for r in rows:
        va = int(r["iova"], 16) + 0x10
        assert io.translate(0x18, va, "r", pasid=3).addr == int(r["addr"], 16) + 0x10
    assert io.translate(0x18, 0x7F00_1000_0010, "w", pasid=3).reason == 0x79     # SS read-only


def test_version_and_plain_usage(capsys: pytest.CaptureFixture[str]) -> None:
    from vtd_emu import __version__

    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"vtd-emu {__version__}"
    rc, out, err = run([], capsys)
    assert rc == 2 and out == "" and err.startswith("usage: vtd-emu") and "give a command" in err


@pytest.mark.parametrize("extra,expect", [
    (["--sid", "0x10000"], "--sid: expected a 16-bit requester id"),
    (["--sid", "0x10", "--pasid", "0x100000"], "--pasid: expected a 20-bit PASID"),
    (["--sid", "0x10", "--iova", str(2**80)], "--iova: expected a 64-bit address"),
    (["--sid", "0x10", "--ram-size", "0"], "--ram-size: expected a memory size"),
    (["--sid", "0x10", "--ram-size", str(2**65)], "--ram-size: expected a memory size"),
    (["--sid", "0x10", "--exe"], "give --pasid"),
    (["--sid", "0x10", "--priv"], "give --pasid"),
])
def test_walk_arguments_are_validated(image: tuple[Path, int, int], extra: list[str], expect: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    img, root, _ = image
    rc, out, err = run(["walk", "--ram", str(img), "--rtaddr", hex(root), "--iova", "0x41234", *extra], capsys)
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1 and out == ""


@pytest.mark.parametrize("levels", ["7", "0", "1"])
def test_dump_levels_out_of_range_is_one_line_and_leaves_no_file(image: tuple[Path, int, int], levels: str,
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    img, _, ss_root = image
    out = tmp_path / "out.txt"
    rc, _, err = run(["dump", "--ram", str(img), "--ss-root", hex(ss_root), "--levels", levels, "-o", str(out)],
                     capsys)
    assert rc == 2 and "--levels" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    rc, _, err = run(["dump", "--ram", str(img), "--fs-root", hex(ss_root), "--levels", "3", "-o", str(out)], capsys)
    assert rc == 2 and "first-stage table is 4 or 5" in err and not out.exists()
    rc, _, _ = run(["dump", "--ram", str(img), "--ss-root", hex(ss_root), "--levels", "3", "-o", str(out)], capsys)
    assert rc == 0 and "0x0000000000040000" in out.read_text()


def test_a_corrupt_zstd_image_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("zstandard")
    ram = HostRAM()
    alloc = PageAllocator(ram, base=0x10000)
    ss = SecondStageTable(ram, alloc, levels=3)
    ss.map(0x40000, 0x200000, 0x3000, R | W)
    img = tmp_path / "ram.bin.zst"
    ram.save(img)
    rc, out, _ = run(["dump", "--ram", str(img), "--ss-root", hex(ss.root), "--levels", "3"], capsys)
    assert rc == 0 and "0x0000000000040000" in out
    data = img.read_bytes()
    img.write_bytes(data[: len(data) - 2])
    rc, out, err = run(["dump", "--ram", str(img), "--ss-root", hex(ss.root), "--levels", "3"], capsys)
    assert rc == 2 and str(img) in err and "truncated zstd stream" in err and out == ""
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    img.write_bytes(bytes(corrupt))
    rc, _, err = run(["dump", "--ram", str(img), "--ss-root", hex(ss.root), "--levels", "3"], capsys)
    assert rc == 2 and str(img) in err


def test_hostram_save_round_trips_raw_and_zstd(tmp_path: Path) -> None:
    from vtd_emu.ramimage import load_ram_image

    ram = HostRAM()
    ram.write(0x1_0ff0, b"across a page boundary")
    ram.write_u64(0x8_0000, 0x1122334455667788)
    for name in ("ram.bin", "ram.bin.zst"):
        if name.endswith(".zst"):
            pytest.importorskip("zstandard")
        n = ram.save(tmp_path / name)
        assert n == 0x8_1000
        back = load_ram_image(tmp_path / name)
        assert back.read(0x1_0ff0, 22) == b"across a page boundary" and back.read_u64(0x8_0000) == 0x1122334455667788
        assert sorted(back.pages()) == [0x10, 0x11, 0x80]
    assert (tmp_path / "ram.bin").stat().st_size == 0x8_1000
    part = tmp_path / "part.bin"
    assert ram.save(part, base=0x1_0000, length=0x2000) == 0x2000
    assert load_ram_image(part, base=0x1_0000).read(0x1_0ff0, 6) == b"across"
    with pytest.raises(ValueError):
        HostRAM(0x1000).save(tmp_path / "x.bin", base=0, length=0x2000)
    assert not (tmp_path / "x.bin").exists()
    for bad in (0, -1, 2**64 + 1):
        with pytest.raises(ValueError):
            HostRAM(bad)
