"""Smoke test of ``scripts/bench.py``: a ``--quick`` run writes a report with the four kinds of figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench.py"

# Row title prefixes of the scalar table; second stage has a scalable and a legacy row.
KINDS = ("IOTLB hits", "cold first-stage 4-level walk", "cold second-stage 4-level walk", "cold nested 4×4 walk")


def _rate(cell: str) -> float:
    return float(cell.strip().replace(",", ""))


def test_quick_bench_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "BENCH.md"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--output", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text(encoding="utf-8")

    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    header, body = rows[0], rows[1:]
    assert "emulator (translations/s)" in header and "baseline (translations/s)" in header
    for kind in KINDS:
        matching = [r for r in body if r[2:].startswith(kind)]
        assert matching, f"no row for {kind!r} in:\n{text}"
        for r in matching:
            cells = r.strip("|").split("|")
            emu, base, ratio = _rate(cells[2]), _rate(cells[4]), float(cells[5])
            assert emu > 0 and base > 0 and ratio > 0, r
    assert sum(r[2:].startswith(KINDS[2]) for r in body) == 2  # scalable and legacy second stage

    for needle in ("Python", "numpy", "CPUs", "median of", "## Method", "## Batched replay"):
        assert needle in text, needle
    data = json.loads(re.search(r"<!-- bench-data (.*) -->", text).group(1))  # type: ignore[union-attr]
    assert data["quick"] is True
    assert {r["key"] for r in data["rows"]} == {"hit", "fs", "ss-sm", "ss-legacy", "nested"}
    assert all(r["walks_per_translation"] == (0 if r["key"] == "hit" else 1) for r in data["rows"])
