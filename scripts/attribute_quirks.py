#!/usr/bin/env python3
"""The spec profile, measured: replay QEMU 7.2 scenarios under the ``spec`` profile and attribute every
mismatched event to the ``qemu-7.2`` quirk toggle that explains it.

For each scenario (on the unit QEMU's options give, so CAP/ECAP are QEMU's):

1. replay under ``spec``; every event with a mismatch is to be explained;
2. replay with each toggle of ``qemu-7.2`` alone switched on: an event that then agrees is attributed to
   that toggle (to each of them, if several alone explain it);
3. an event no single toggle explains, but ``qemu-7.2`` gets right, is attributed to the toggles that
   ``qemu-7.2`` cannot do without for it: replayed under ``qemu-7.2`` minus one toggle, the event
   mismatches again (a combination, shown as ``a + b``);
4. anything left is unattributed: one of the two profiles is wrong there.

    python scripts/attribute_quirks.py ../shared/qemu-oracle/cases tests/data/qemu-sweeps/fidelity.jsonl
    python scripts/attribute_quirks.py --markdown ../shared/qemu-oracle/cases   # the table of docs/quirks.md

Exit status 1 when some mismatch is unattributed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vtd_emu.importers.qemu_scenario import Scenario, replay_scenario, scenario_trace  # noqa: E402
from vtd_emu.memory import HostRAM  # noqa: E402
from vtd_emu.trace.replay import Machine, Replayer, unit_config  # noqa: E402
from vtd_emu.vtd.config import Quirks, quirks_for  # noqa: E402
from vtd_emu.vtd.iommu import VtdIommu  # noqa: E402

PROFILE = "qemu-7.2"


def profile_toggles(profile: str = PROFILE) -> list[str]:
    q = quirks_for(profile)
    return [f.name for f in dataclasses.fields(Quirks) if getattr(q, f.name)]


def _mismatched_events(sc: Scenario, quirks: Quirks, upto: int | None = None) -> set[int]:
    """Events of ``sc`` that mismatch on the QEMU unit with ``quirks``; only events before ``upto`` are
    replayed (what comes later cannot change them)."""
    vc = unit_config(sc.trace.config, "spec", sc.file)
    vc = dataclasses.replace(vc, quirks=quirks, profile="attribution")
    ram = HostRAM(sc.trace.config.ram_size)
    machine = Machine(ram, VtdIommu(ram, vc), vc)
    trace = sc.trace if upto is None else dataclasses.replace(sc.trace, events=sc.trace.events[:upto])
    return {m.event for m in Replayer(trace, machine=machine).run().mismatches}


@dataclass
class Attribution:
    """Mismatched events of the spec profile, by what explains them."""

    scenarios: int = 0
    events: int = 0
    """Events compared (every event with an expectation, in scenarios QEMU started)."""
    mismatched: int = 0
    by_cause: Counter[str] = field(default_factory=Counter)
    unattributed: list[str] = field(default_factory=list)
    refusals: int = 0

    def add(self, other: Attribution) -> None:
        self.scenarios += other.scenarios
        self.events += other.events
        self.mismatched += other.mismatched
        self.by_cause.update(other.by_cause)
        self.unattributed += other.unattributed
        self.refusals += other.refusals


def attribute(sc: Scenario, toggles: list[str] | None = None) -> Attribution:
    """The attribution of one scenario's spec-profile mismatches (see the module docstring)."""
    toggles = profile_toggles() if toggles is None else toggles
    out = Attribution(scenarios=1)
    if sc.start_error is not None:
        # Which options QEMU refuses does not depend on the profile: nothing to attribute.
        res = replay_scenario(sc, profile="spec")
        out.refusals = 1
        if res.mismatches:
            out.mismatched = 1
            out.unattributed.append(f"{sc.id}: {res.mismatches[0]}")
        return out
    out.events = sum(1 for ev in sc.trace.events if getattr(ev, "expect", None))
    base = _mismatched_events(sc, Quirks())
    if not base:
        return out
    out.mismatched = len(base)
    explained: dict[int, list[str]] = {e: [] for e in base}
    upto = max(base) + 1
    for t in toggles:
        still = _mismatched_events(sc, Quirks(**{t: True}), upto)
        for e in base - still:
            explained[e].append(t)
    left = {e for e, ts in explained.items() if not ts}
    needs: dict[int, list[str]] = {e: [] for e in left}
    if left:
        full = {t: True for t in toggles}
        # Only events the whole profile gets right can need a combination of its toggles.
        left -= _mismatched_events(sc, Quirks(**full), max(left) + 1)
    if left:
        for t in toggles:
            broken = _mismatched_events(sc, Quirks(**{**full, t: False}), max(left) + 1)
            for e in left & broken:
                needs[e].append(t)
    for e in sorted(base):
        if explained[e]:
            out.by_cause.update(explained[e])
        elif needs[e]:
            out.by_cause[" + ".join(needs[e])] += 1
        else:
            out.unattributed.append(f"{sc.id}: event {e}")
    return out


def load(paths: list[Path]) -> list[Scenario]:
    """Every scenario of the given files (``.jsonl`` or ``.jsonl.gz``) and directories (their scenario files)."""
    files: list[Path] = []
    for p in paths:
        files += sorted(q for q in p.iterdir() if q.name.endswith((".jsonl", ".jsonl.gz"))) if p.is_dir() else [p]
    out: list[Scenario] = []
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as fh:
            out += [scenario_trace(json.loads(line), str(f), n) for n, line in enumerate(fh, 1) if line.strip()]
    return out


def attribute_all(scenarios: list[Scenario]) -> Attribution:
    total = Attribution()
    toggles = profile_toggles()
    for sc in scenarios:
        total.add(attribute(sc, toggles))
    return total


def markdown(att: Attribution) -> str:
    lines = ["| toggle (or combination) | mismatched events it explains |", "| --- | --- |"]
    for cause, n in sorted(att.by_cause.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| `{cause}` | {n} |".replace(" + ", "` + `"))
    lines.append(f"| unattributed | {len(att.unattributed)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="scenario files or directories")
    ap.add_argument("--markdown", action="store_true", help="print the attribution table as Markdown")
    args = ap.parse_args(argv)
    att = attribute_all(load(args.paths))
    if args.markdown:
        print(markdown(att))
    else:
        for cause, n in sorted(att.by_cause.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"{n:6d}  {cause}")
    print(f"{att.scenarios} scenarios ({att.refusals} refused starts), {att.events} events compared, "
          f"{att.mismatched} mismatched under spec, {len(att.unattributed)} unattributed", file=sys.stderr)
    for u in att.unattributed:
        print(f"unattributed: {u}", file=sys.stderr)
    return 1 if att.unattributed else 0


if __name__ == "__main__":
    sys.exit(main())
