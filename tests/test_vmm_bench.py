"""The vmm section of scripts/bench.py measures what it says: ioctl counts of the unmap storm derived by
hand from the descriptors the guest issues (two ATS devices on one SVA domain, each with its own nested
HWPT), and a rendered section with both modes side by side."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("vtd_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vtd_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_storm_counts_and_section() -> None:
    b = _bench()
    unmaps, per_wait = 8, 4
    row = b.measure_vmm_storm(unmaps, per_wait, 1)
    # Per page: 1 PASID-IOTLB + 2 PASID device-TLB descriptors; 2 waits.  Coalesced: one call per HWPT
    # per wait; one-per-call: the PASID-IOTLB covers both HWPTs (2 calls), each device-TLB one.
    assert row.counts["coalesced"] == {"descriptors": 24, "ioctls": 4, "entries": 32, "ioctls_per_descriptor": 4 / 24}
    assert row.counts["one-per-call"] == {"descriptors": 24, "ioctls": 32, "entries": 32,
                                          "ioctls_per_descriptor": 32 / 24}
    text = "\n".join(b.render_vmm([row]))
    assert "## vIOMMU bridge" in text and "| coalesced | 24 | 4 | 32 | 0.167 |" in text
