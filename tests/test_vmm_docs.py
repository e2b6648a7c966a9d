"""The examples of docs/vmm.md run as written, in a fresh interpreter (the README-ready one included), and
print what the flows they show imply."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "vmm.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), re.S | re.M)
# The machine example: one bind; two forwarded invalidations (caching mode's PASID-selective PASID-IOTLB
# after the bind, the remap's page-selective one), coalesced into one call each; a clean flow, no report.
# The guest-driver example: a descriptor of reserved type 0xF is an IQE, repaired as qi_check_fault does.
EXPECTED = ["1 2 []\n", "error='IQE'"]


def test_the_readme_example_is_under_30_lines() -> None:
    assert BLOCKS and len(BLOCKS[0].strip().splitlines()) < 30


def test_every_example_has_its_expectation() -> None:
    assert len(BLOCKS) == len(EXPECTED)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index: int) -> None:
    repo = str(DOC.parents[1])
    r = subprocess.run([sys.executable, "-c", BLOCKS[index]], capture_output=True, text=True, cwd=repo,
                       env={"PYTHONPATH": repo, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    if index == 0:
        assert r.stdout == EXPECTED[0]
    else:
        assert EXPECTED[index] in r.stdout and "recovered=True" in r.stdout, r.stdout
