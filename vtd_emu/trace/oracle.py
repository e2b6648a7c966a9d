"""Replay of QEMU reference scenarios (format ``vtd-oracle-scenario/1``) and comparison with the answers
QEMU recorded.  See ``shared/qemu-oracle/README.md`` for the format; ``docs/quirks.md`` for where the spec
and QEMU differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError, TraceError
from ..memory import HostRAM
from ..vtd.config import VtdConfig, qemu72_config
from ..vtd.iommu import VtdIommu

FORMAT = "vtd-oracle-scenario/1"


@dataclass(slots=True)
class Mismatch:
    scenario: str
    step: int | str
    what: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        return f"{self.scenario} step {self.step}: {self.what}: expected {self.expected}, got {self.actual}"


@dataclass(slots=True)
class ScenarioResult:
    id: str
    steps: int
    checks: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    skipped: str | None = None
    iommu: VtdIommu | None = None


def _int(v: Any, file: str, where: str) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            pass
    raise TraceError(file, where, f"expected an integer or a '0x...' string, got {v!r}")


def load_scenarios(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, scenario) for every line of a ``.jsonl`` scenario file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TraceError(str(p), "", f"cannot read: {exc.strerror}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(str(p), f"line {n}", f"invalid JSON: {exc.msg}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise TraceError(str(p), f"line {n}", f"expected an object with format {FORMAT!r}")
        yield n, doc


def _changes(ram: HostRAM, watch: list[tuple[int, bytes]]) -> list[dict[str, str]]:
    first: dict[int, int] = {}
    for addr, old in watch:
        for i, b in enumerate(old):
            first.setdefault(addr + i, b)
    runs: list[dict[str, str]] = []
    cur_start = -1
    cur = bytearray()
    for a in sorted(first):
        new = ram.read(a, 1)[0]
        if new == first[a]:
            continue
        if cur and a == cur_start + len(cur):
            cur.append(new)
        else:
            if cur:
                runs.append({"gpa": hex(cur_start), "hex": cur.hex()})
            cur_start, cur = a, bytearray([new])
    if cur:
        runs.append({"gpa": hex(cur_start), "hex": cur.hex()})
    return runs


class ScenarioRunner:
    """Replays one scenario on a fresh unit and collects mismatches with the recorded expectations."""

    def __init__(self, scenario: dict[str, Any], file: str = "<scenario>", line: int = 0,
                 profile: str = "qemu-7.2") -> None:
        self.doc = scenario
        self.file = file
        self.where = f"line {line}" if line else ""
        self.id = str(scenario.get("id", "?"))
        self.profile = profile
        cfg = scenario.get("config") or {}
        self.ram = HostRAM(size=_int(cfg.get("ram_size", 128 << 20), file, f"{self.where} config.ram_size"))
        self.vt_cfg: VtdConfig = qemu72_config(cfg.get("iommu") or {}, profile=profile)
        self.iommu = VtdIommu(self.ram, self.vt_cfg)
        self.read_data: dict[int, bytes] = {}
        self.result = ScenarioResult(self.id, len(scenario.get("steps") or []), iommu=self.iommu)

    def _mis(self, step: int | str, what: str, exp: Any, act: Any) -> None:
        self.result.mismatches.append(Mismatch(self.id, step, what, exp, act))

    def _check(self, step: int | str, what: str, exp: Any, act: Any) -> None:
        self.result.checks += 1
        if exp != act:
            self._mis(step, what, exp, act)

    def run(self) -> ScenarioResult:
        doc = self.doc
        cfg = doc.get("config") or {}
        for off, val in (cfg.get("registers_at_reset") or {}).items():
            o = int(off, 16)
            size = 8 if o in (0x8, 0x10) else 4
            self._check("reset", f"register {off}", _int(val, self.file, "reset"), self.iommu.mmio_read(o, size))
        for i, step in enumerate(doc.get("steps") or []):
            exp = step.get("expect")
            if exp is None:
                break  # QEMU crashed before this step: nothing left to compare
            if exp.get("qemu_crashed"):
                self._crashed_step(i, step)
                break
            self._step(i, step, exp)
        final = doc.get("final")
        if isinstance(final, dict) and isinstance(final.get("regs"), dict):
            for off, val in final["regs"].items():
                o = int(off, 16)
                self._check("final", f"register {off}", _int(val, self.file, "final"), self._read_reg(o))
        return self.result

    def _crashed_step(self, i: int, step: dict[str, Any]) -> None:
        """QEMU hit an assertion on this step (e.g. a wait descriptor with both SW and IF, quirk 14).  The
        model cannot abort; it agrees with QEMU when it reports the architectural error for the input that
        crashed QEMU: a new invalidation-queue error (FSTS.IQE, ITE or ICE) raised by this very step."""
        errors = 0x70  # FSTS.IQE | ICE | ITE
        before = self.iommu.regs.get("FSTS") & errors
        self._step(i, step, {})
        raised = self.iommu.regs.get("FSTS") & errors & ~before
        self._check(i, "QEMU aborted here; the model must report an invalidation queue error (FSTS.IQE/ICE/ITE)",
                    True, bool(raised))

    def _read_reg(self, off: int) -> int:
        slot = next((s for s in self.iommu.regs.slots.values() if s.offset <= off < s.offset + s.width // 8), None)
        size = 8 if slot is not None and slot.width >= 64 and off % 8 == 0 else 4
        return self.iommu.mmio_read(off, size)

    def _step(self, i: int, step: dict[str, Any], exp: dict[str, Any]) -> None:
        op = step.get("op")
        f, w = self.file, f"{self.where} step {i}"
        ram = self.ram
        if op == "mem_write":
            gpa = _int(step["gpa"], f, w)
            if "qwords" in step:
                for k, qv in enumerate(step["qwords"]):
                    ram.write_u64(gpa + 8 * k, _int(qv, f, w))
            else:
                ram.write(gpa, bytes.fromhex(step["hex"]))
        elif op == "mem_read":
            data = ram.read(_int(step["gpa"], f, w), int(step["len"]))
            if "hex" in exp:
                self._check(i, "mem_read", exp["hex"], data.hex())
        elif op == "mmio_write":
            ram.watch = []
            self.iommu.mmio_write(_int(step["off"], f, w), _int(step["value"], f, w), int(step["size"]))
            changes = _changes(ram, ram.watch)
            ram.watch = None
            if "mem_changes" in exp:
                self._check(i, "mem_changes", exp["mem_changes"], changes)
        elif op == "mmio_read":
            val = self.iommu.mmio_read(_int(step["off"], f, w), int(step["size"]))
            if "value" in exp:
                self._check(i, f"mmio_read {step['off']}", _int(exp["value"], f, w), val)
        elif op == "dma":
            self._dma(i, step, exp)
        else:
            raise TraceError(f, w, f"unknown op {op!r}; expected mem_write, mem_read, mmio_write, mmio_read or dma")

    def _dma(self, i: int, step: dict[str, Any], exp: dict[str, Any]) -> None:
        f, w = self.file, f"{self.where} step {i}"
        sid = _int(step["sid"], f, w)
        iova = _int(step["iova"], f, w)
        length = int(step["len"])
        is_write = step.get("dir") == "write"
        if is_write:
            if "data_from_step" in step:
                data = self.read_data.get(int(step["data_from_step"]), bytes(length))
            else:
                data = bytes.fromhex(step.get("data", ""))
            self.ram.watch = []
            self.device_dma(sid, iova, length, data)
            changes = _changes(self.ram, self.ram.watch)
            self.ram.watch = None
            if "mem_changes" in exp:
                self._check(i, "dma mem_changes", exp["mem_changes"], changes)
        else:
            got = self.device_dma(sid, iova, length, None)
            self.read_data[i] = got
        for off, val in (exp.get("regs") or {}).items():
            o = int(off, 16)
            self._check(i, f"register {off} after dma", _int(val, f, w), self._read_reg(o))

    def device_dma(self, sid: int, iova: int, length: int, data: bytes | None) -> bytes:
        """What QEMU's edu device sees (the chip's DMA: per 4 KiB of IOVA, faulting chunks read as zeros)."""
        if data is not None:
            self.iommu.dma_write(sid, iova, data)
            return b""
        return self.iommu.dma_read(sid, iova, length).data

def run_scenario(scenario: dict[str, Any], file: str = "<scenario>", line: int = 0,
                 profile: str = "qemu-7.2") -> ScenarioResult:
    try:
        runner = ScenarioRunner(scenario, file, line, profile)
    except ConfigError as exc:
        # QEMU refused this option set too: the scenario records start_error and no expectations.
        if (scenario.get("qemu") or {}).get("start_error"):
            return ScenarioResult(str(scenario.get("id", "?")), 0, skipped=f"refused as QEMU does: {exc}")
        raise TraceError(file, f"line {line}", f"bad configuration: {exc}") from None
    return runner.run()


def run_file(path: str | Path, profile: str = "qemu-7.2") -> list[ScenarioResult]:
    return [run_scenario(doc, str(path), n, profile) for n, doc in load_scenarios(path)]
