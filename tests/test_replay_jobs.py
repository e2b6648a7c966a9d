"""``vtd-emu replay -j N``: worker processes over files give the same output, bytes for bytes, as a
sequential replay (summary but its wall-clock line, per-file JSON results in the files' order, failed
files and exit status)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtd_emu", "replay", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _untimed(text: str) -> list[str]:
    """The output without the summary's wall-clock line (the only part that differs run to run)."""
    return [line for line in text.splitlines() if not line.startswith("replay ")]


def test_jobs_output_equals_sequential(tmp_path: Path) -> None:
    traces = sorted(str(p) for p in (REPO / "traces").glob("*.yaml"))[:6]
    bad = tmp_path / "bad.yaml"
    bad.write_text("this: is not a trace\n", encoding="utf-8")
    files = traces[:3] + [str(bad)] + traces[3:]
    for extra in ([], ["--json", "--check"]):
        seq = _replay(*files, *extra)
        par = _replay("-j", "3", *files, *extra)
        assert seq.returncode == par.returncode == 2  # the bad file
        assert _untimed(par.stdout) == _untimed(seq.stdout) and par.stderr == seq.stderr
        assert str(bad) in seq.stderr and seq.stdout


def test_jobs_must_be_positive() -> None:
    proc = _replay("-j", "0", "traces")
    assert proc.returncode == 2 and "positive number of jobs" in proc.stderr
