"""Differential test against QEMU 7.2: every recorded scenario replays with QEMU's answers under the
``qemu-7.2`` profile.  Differences that are QEMU-specific and not worth a toggle are listed with why."""

from __future__ import annotations

import json

import pytest

from conftest import shared_dir
from vtd_emu.trace.oracle import run_scenario

CASES = shared_dir() / "qemu-oracle" / "cases"


def _scenarios() -> list[tuple[str, int, dict]]:
    out = []
    if CASES.is_dir():
        for f in sorted(CASES.glob("*.jsonl")):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if line.strip():
                    doc = json.loads(line)
                    out.append((str(f), n, doc))
    return out


SCENARIOS = _scenarios()


@pytest.mark.skipif(not SCENARIOS, reason="shared/qemu-oracle not available")
@pytest.mark.parametrize("file,line,doc", SCENARIOS, ids=[d["id"] for _, _, d in SCENARIOS])
def test_matches_qemu(file: str, line: int, doc: dict) -> None:
    res = run_scenario(doc, file, line, profile="qemu-7.2")
    if res.skipped:
        assert (doc.get("qemu") or {}).get("start_error"), res.skipped
        return
    assert res.checks > 0
    assert not res.mismatches, "\n".join(str(m) for m in res.mismatches[:10])
