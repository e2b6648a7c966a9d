"""Every shipped trace replays with --check and no mismatch, batched and not, and stays small."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtd_emu.cli import main
from vtd_emu.trace.model import detect_kind

TRACES = Path(__file__).resolve().parents[1] / "traces"
FILES = sorted(p for p in TRACES.rglob("*") if p.suffix in (".yaml", ".yml", ".jsonl", ".npz"))


def test_the_required_traces_are_shipped() -> None:
    names = {p.name for p in FILES}
    for want in ("legacy-dma.yaml", "scalable-ss.yaml", "first-stage-4level.yaml", "first-stage-5level.jsonl",
                 "nested.yaml", "qi-heavy.yaml", "forgot-to-invalidate.yaml", "edu-legacy.yaml", "bulk-dma.npz"):
        assert want in names


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(TRACES)) for p in FILES])
@pytest.mark.parametrize("batch", [True, False], ids=["batched", "scalar"])
def test_trace_replays_clean(path: Path, batch: bool, capsys: pytest.CaptureFixture[str]) -> None:
    if path.name.endswith(".zst") or (path.suffix == ".yaml" and "ram_image" in path.read_text()):
        pytest.importorskip("zstandard")
    argv = ["replay", "--check", str(path)] + ([] if batch else ["--no-batch"])
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    last = out.strip().splitlines()[-1]
    assert last.endswith(" 0 mismatches") and not last.startswith("checked: 0 scenarios")
    if detect_kind(path) != "oracle":
        assert "DMAs" in out


OURS = [p for p in TRACES.rglob("*") if p.is_file() and p.parent.name != "qemu-7.2"]


@pytest.mark.parametrize("path", OURS, ids=[str(p.relative_to(TRACES)) for p in OURS])
def test_generated_trace_files_are_small(path: Path) -> None:
    # The QEMU reference scenarios under qemu-7.2/ are copied as they are; everything generated is small.
    assert path.stat().st_size < 200_000
