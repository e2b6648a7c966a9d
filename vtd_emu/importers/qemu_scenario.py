"""QEMU reference scenarios (``vtd-oracle-scenario/1``, see ``shared/qemu-oracle/README.md``) as traces.

Each scenario line becomes one :class:`~vtd_emu.trace.model.Trace` on the QEMU options it names, whose
events carry QEMU's recorded answers as expectations, so the trace replay engine
(:class:`~vtd_emu.trace.replay.Replayer`) compares every one of them:

* ``config.registers_at_reset`` → a ``note`` event expecting those ``regs`` before anything runs;
* ``mem_write`` / ``mem_read`` / ``mmio_read`` → the same events (``hex`` and ``value`` expected);
* ``mmio_write`` → ``mmio_write`` expecting its ``mem_changes`` (invalidation-wait status writes);
* ``dma`` → ``dma`` expecting the ``regs`` QEMU read right after it and, for writes, its ``mem_changes``;
  a write-back (``data_from_step``) becomes ``data_from`` (the event number of that read);
* a step on which QEMU aborted (``{"qemu_crashed": true}``, the only way to say QEMU gave no answer)
  → the same event, and nothing after it (nothing after it was recorded).  QEMU gives no answer there,
  so what is checked is the architectural behaviour documented for that input
  (``docs/quirks.md``): a wrongly sized register write (8 bytes over a 32-bit register or the upper
  half of a 64-bit one; QEMU 7.2 asserts on FECTL, IECTL and IEADDR) is performed as two 4-byte writes
  and must *not* report an invalidation queue error (FSTS.IQE, ICE and ITE stay clear); any other input
  QEMU aborts on (a descriptor it asserts on) must report an invalidation queue error;
* ``final.regs`` → a ``note`` event expecting those ``regs`` at the end.

QEMU's other annotations (``completed``, ``landed``/``not_landed``, ``frcd0``, the observed ``data``) are
derived from those answers and not compared again.  A scenario whose options QEMU refused
(``qemu.start_error``) has no events: :func:`replay_scenario` then requires the unit to refuse them too,
with QEMU's message.

Scenarios are validated strictly on load, every step (also those QEMU never ran): an unknown op, a bad
value, a missing field, or a step without ``expect`` (outside a refused start and after no abort) is a
one-line :class:`~vtd_emu.errors.TraceError` naming the file, line, step and field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TraceError
from ..spec.consts import FSTS
from ..spec.loader import specs
from ..trace.model import ORACLE_FORMAT, DmaBlock, Event, Trace, parse_config, parse_event
from ..trace.replay import Mismatch, Replayer, ReplayResult, unit_config

FORMAT = ORACLE_FORMAT
RAM_SIZE = 128 << 20
"""Guest RAM of a scenario that does not give ``config.ram_size`` (the harness machine's)."""

_FSTS = specs().registers["FSTS"].resolve_offset(0, 0)  # a fixed offset: CAP/ECAP do not move it
_IQ_ERRORS = FSTS.IQE | FSTS.ICE | FSTS.ITE
_STEP_KEYS = {"op", "expect", "note", "intent", "qemu_buf_off"}
_STEP_FIELDS = {"mem_write": ({"gpa"}, {"qwords", "hex"}), "mem_read": ({"gpa", "len"}, set()),
                "mmio_write": ({"off", "value", "size"}, set()), "mmio_read": ({"off", "size"}, set()),
                "dma": ({"sid", "iova", "len", "dir"}, {"data", "data_from_step"})}
"""Per op: the fields a step must have, and the optional ones (``mem_write`` needs one of its two)."""


def _narrow_dwords() -> frozenset[int]:
    """Offsets an 8-byte access may not start at: 32-bit registers and upper halves of 64-bit ones (of
    the register map of any unit: CAP/ECAP only move IVA, IOTLB and FRCD, which are 64-bit)."""
    out = set()
    for reg in specs().registers.values():
        off = reg.resolve_offset(0, 0)
        if reg.size_bits == 32:
            out.add(off)
        elif reg.size_bits == 64:
            out.add(off + 4)
    return frozenset(out)


_NARROW = _narrow_dwords()


@dataclass(slots=True)
class Scenario:
    """One scenario of a file: its ``trace``, and ``start_error`` when QEMU refused its options."""

    id: str
    file: str
    line: int
    steps: int
    trace: Trace
    start_error: str | None = None


def _mapping(v: Any, file: str, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise TraceError(file, where, f"expected a mapping, got {type(v).__name__}")
    return v


def _changes(v: Any, file: str, where: str) -> list[dict[str, Any]]:
    """``[{gpa, hex}]`` runs as the trace's ``[{addr, hex}]``."""
    if not isinstance(v, list) or not all(isinstance(r, dict) and set(r) == {"gpa", "hex"} for r in v):
        raise TraceError(file, where, "mem_changes: expected a list of {gpa, hex}")
    return [{"addr": r["gpa"], "hex": r["hex"]} for r in v]


def _step_event(step: dict[str, Any], exp: dict[str, Any], event_of_step: dict[int, int], file: str,
                where: str) -> dict[str, Any]:
    """The trace event (as a mapping for :func:`parse_event`) of a step, with the answers in ``exp``."""
    op = step.get("op")
    note = step.get("note")
    expect: dict[str, Any] = {}
    try:
        if op == "mem_write":
            d: dict[str, Any] = {"op": op, "addr": step["gpa"]}
            if "qwords" in step:
                d["qwords"] = step["qwords"]
            else:
                d["hex"] = step["hex"]
        elif op == "mem_read":
            d = {"op": op, "addr": step["gpa"], "len": step["len"]}
            if "hex" in exp:
                expect["hex"] = exp["hex"]
        elif op == "mmio_write":
            d = {"op": op, "offset": step["off"], "value": step["value"], "size": step["size"]}
            if "mem_changes" in exp:
                expect["mem_changes"] = _changes(exp["mem_changes"], file, f"{where} expect")
        elif op == "mmio_read":
            d = {"op": op, "offset": step["off"], "size": step["size"]}
            if "value" in exp:
                expect["value"] = exp["value"]
        elif op == "dma":
            d = {"op": op, "sid": step["sid"], "iova": step["iova"], "len": step["len"], "dir": step["dir"]}
            if step["dir"] == "write":
                if "data_from_step" in step:
                    k = step["data_from_step"]
                    if not isinstance(k, int) or k not in event_of_step:
                        raise TraceError(file, f"{where} field 'data_from_step'",
                                         f"expected the number of an earlier read DMA step, got {k!r}")
                    d["data_from"] = event_of_step[k]
                else:
                    d["data"] = step["data"]
                if "mem_changes" in exp:
                    expect["mem_changes"] = _changes(exp["mem_changes"], file, f"{where} expect")
            if exp.get("regs"):
                expect["regs"] = exp["regs"]
        else:
            raise TraceError(file, where, f"unknown op {op!r}; expected mem_write, mem_read, mmio_write, "
                                          "mmio_read or dma")
    except KeyError as exc:
        raise TraceError(file, f"{where} ({op})", f"missing field {exc.args[0]!r}") from None
    if op == "dma" and step["dir"] == "write" and ("data" in step) == ("data_from_step" in step):
        raise TraceError(file, f"{where} (dma)", "a write DMA needs exactly one of 'data' (hex) and 'data_from_step'")
    if exp.get("qemu_crashed"):
        expect = _abort_expectation(d)
    if expect:
        d["expect"] = expect
    if note is not None:
        d["note"] = str(note)
    return d


_TRACE_TO_STEP = {"'offset'": "'off'", "'addr'": "'gpa'"}


def _scenario_names(where: str) -> str:
    """A trace-event location with the step's own field names (``off``, ``gpa``)."""
    for a, b in _TRACE_TO_STEP.items():
        where = where.replace(f"field {a}", f"field {b}")
    return where


def _abort_expectation(d: dict[str, Any]) -> dict[str, Any]:
    """What a step QEMU aborted on must do (see the module docstring)."""
    if d["op"] == "mmio_write" and d["size"] == 8 and _as_offset(d["offset"]) in _NARROW:
        return {"regs": {_FSTS: {"value": 0, "mask": _IQ_ERRORS}}}
    return {"raises": {_FSTS: _IQ_ERRORS}}


def _as_offset(v: Any) -> int | None:
    try:
        return int(v, 0) if isinstance(v, str) else v if isinstance(v, int) and not isinstance(v, bool) else None
    except ValueError:
        return None


def _check_step_keys(step: dict[str, Any], file: str, where: str) -> str:
    """The step's op, once its fields are the ones that op has."""
    op = step.get("op")
    if not isinstance(op, str) or op not in _STEP_FIELDS:
        raise TraceError(file, f"{where} field 'op'", f"unknown op {op!r}; expected one of {', '.join(_STEP_FIELDS)}")
    required, optional = _STEP_FIELDS[op]
    missing = sorted(required - set(step))
    if missing:
        raise TraceError(file, f"{where} ({op}) field '{missing[0]}'",
                         f"missing field '{missing[0]}'; a {op} step has {sorted(required)}")
    unknown = sorted(set(step) - required - optional - _STEP_KEYS)
    if unknown:
        raise TraceError(file, f"{where} ({op}) field '{unknown[0]}'", f"unknown field '{unknown[0]}'; a {op} step "
                                                                      f"has {sorted(required | optional | _STEP_KEYS)}")
    if op == "mem_write" and ("qwords" in step) == ("hex" in step):
        raise TraceError(file, f"{where} (mem_write)", "expected exactly one of 'qwords' and 'hex'")
    return op


def scenario_trace(doc: Any, file: str = "<scenario>", line: int = 0) -> Scenario:
    """One scenario (a decoded JSON object) as a :class:`Scenario`; errors name ``file``, the line and
    the step."""
    at = f"line {line}" if line else "scenario"
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TraceError(file, at, f"expected an object with format {FORMAT!r}")
    sid = str(doc.get("id", "?"))
    cfg = _mapping(doc.get("config"), file, f"{at} config")
    iommu = _mapping(cfg.get("iommu"), file, f"{at} config.iommu")
    tcfg = parse_config({"qemu": dict(iommu), "ram_size": cfg.get("ram_size", RAM_SIZE)}, file, f"{at} config",
                        check=False)
    if "steps" not in doc or not isinstance(doc["steps"], list):
        raise TraceError(file, f"{at} field 'steps'", "expected a list of steps")
    steps = doc["steps"]
    qemu = _mapping(doc.get("qemu"), file, f"{at} qemu")
    start_error = qemu.get("start_error")
    events: list[Event | DmaBlock] = []
    reset = _mapping(cfg.get("registers_at_reset"), file, f"{at} config.registers_at_reset")
    if reset:
        events.append(parse_event({"op": "note", "text": "registers at reset, as QEMU read them",
                                   "expect": {"regs": reset}}, file, f"{at} config.registers_at_reset"))
    event_of_step: dict[int, int] = {}
    crashed_at: int | None = None
    for i, step in enumerate(steps):
        where = f"{at} step {i}"
        if not isinstance(step, dict):
            raise TraceError(file, where, "expected a step mapping with 'op'")
        op = _check_step_keys(step, file, where)
        given = step.get("expect")
        exp = _mapping(given, file, f"{where} ({op}) field 'expect'")
        crashed = exp.get("qemu_crashed", False)
        if crashed is not True and crashed is not False:
            raise TraceError(file, f"{where} ({op}) field 'expect.qemu_crashed'", f"expected true, got {crashed!r}")
        d = _step_event(step, exp, event_of_step, file, where)
        try:
            ev = parse_event(d, file, where)  # every step is validated, also those QEMU never ran
        except TraceError as exc:
            raise TraceError(file, _scenario_names(exc.where), exc.message) from None
        ran = start_error is None and crashed_at is None
        if given is None and ran:
            raise TraceError(file, f"{where} ({op}) field 'expect'",
                             "missing: a recorded step has QEMU's answer ({} when it has none); only "
                             '{"qemu_crashed": true} marks the step QEMU aborted on')
        if given is not None and not ran:
            raise TraceError(file, f"{where} ({op}) field 'expect'",
                             "QEMU never ran this step (" + ("it refused to start" if start_error is not None else
                                                             f"it aborted at step {crashed_at}") + "): no answer")
        if not ran:
            continue
        if d["op"] == "dma" and d["dir"] == "read":
            event_of_step[i] = len(events)
        events.append(ev)
        if exp.get("qemu_crashed"):
            crashed_at = i
    final = doc.get("final")
    if isinstance(final, dict) and isinstance(final.get("regs"), dict) and final["regs"]:
        events.append(parse_event({"op": "note", "text": "final registers, as QEMU read them",
                                   "expect": {"regs": final["regs"]}}, file, f"{at} final.regs"))
    desc = doc.get("description", "")
    trace = Trace(tcfg, events, sid, desc if isinstance(desc, str) else "", file)
    return Scenario(sid, file, line, len(steps), trace, str(start_error) if start_error else None)


def load_scenarios(path: str | Path) -> list[Scenario]:
    """Every scenario of a ``.jsonl`` scenario file, in order."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TraceError(str(p), "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TraceError(str(p), "", "not a text file") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(str(p), f"line {n}", f"invalid JSON: {exc.msg}") from None
        out.append(scenario_trace(doc, str(p), n))
    return out


def replay_scenario(sc: Scenario, *, profile: str | None = "qemu-7.2", batch: bool = True) -> ReplayResult:
    """Replay ``sc`` on the unit QEMU's options give (under ``profile``).  A scenario QEMU refused to start
    checks one answer, that the unit refuses the options too (``refused`` says why it did)."""
    at = f"line {sc.line}" if sc.line else "scenario"
    try:
        unit_config(sc.trace.config, profile, sc.file)
    except TraceError as exc:
        if sc.start_error is None:
            raise TraceError(sc.file, at, f"bad configuration: {exc.message}") from None
        res = ReplayResult(sc.id, sc.file, 0, checks=1, refused=f"refused as QEMU does: {exc.message}")
        if not sc.start_error.endswith(exc.message):
            res.mismatches.append(Mismatch(0, "config", f"{at} config.iommu", "QEMU's reason for refusing the "
                                           "options", sc.start_error, exc.message))
        return res
    if sc.start_error is not None:
        res = ReplayResult(sc.id, sc.file, 0, checks=1)
        res.mismatches.append(Mismatch(0, "config", f"{at} config.iommu", "QEMU refused these options "
                                       f"({sc.start_error}); the unit must refuse them too", "refused", "accepted"))
        return res
    return Replayer(sc.trace, profile=profile, batch=batch).run()


__all__ = ["FORMAT", "RAM_SIZE", "Scenario", "scenario_trace", "load_scenarios", "replay_scenario"]
