"""The examples of docs/vmm.md run as written, in a fresh interpreter (the README-ready one included)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "vmm.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), re.S | re.M)


def test_the_readme_example_is_under_30_lines() -> None:
    assert BLOCKS and len(BLOCKS[0].strip().splitlines()) < 30


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index: int) -> None:
    repo = str(DOC.parents[1])
    r = subprocess.run([sys.executable, "-c", BLOCKS[index]], capture_output=True, text=True, cwd=repo,
                       env={"PYTHONPATH": repo, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "('invalidate', 'wait')" in r.stdout
