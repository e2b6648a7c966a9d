"""Replay of ``vtd-trace/1`` traces on a fresh unit: run every event, compare every ``expect``, count.

:meth:`Machine.build` makes the RAM and the chip a trace's ``config`` describes; :class:`Replayer` runs
the events through the chip's public API (MMIO, memory, DMA, page requests), compares expectations, and
collects :class:`ReplayStats` (DMAs, bytes, faults by reason, cache hit rates, invalidations by type).
Runs of DMA go through :mod:`vtd_emu.vtd.batch` unless ``batch=False``; the outcome is the same either
way.  With ``record=True`` the replayer also returns the trace again with fresh expectations taken from
what happened (``vtd-emu record``).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, TraceError
from ..memory import HostRAM
from ..vtd.access import NO_PASID, PRIV, READ, WRITE
from ..spec.consts import INV_CONTEXT_CACHE
from ..spec.consts import IQA as IQA_BITS
from ..spec.consts import IQT as IQT_BITS
from ..spec.loader import specs
from ..vtd.config import VtdConfig, qemu72_config
from ..vtd.intremap import IrFault
from ..vtd.iommu import DROPPED, INTR_HI, INTR_LO, VtdIommu
from ..vtd.batch import SKIPPED, BatchEngine, run_block
from ..vtd.qi import TYPE_NAMES
from .model import _GENERIC_EXPECT, HOST_CALLS, DmaBlock, Event, Trace, TraceConfig, blockify

_U64 = (1 << 64) - 1
# Fixed offsets (the CAP/ECAP values only place the FRCD and IOTLB registers).
IQT, IQA = (specs().registers[n].resolve_offset(0, 0) for n in ("IQT", "IQA"))
DESC_TYPE_NAMES = TYPE_NAMES
"""Descriptor type names by type code (``vtd_emu.vtd.qi.TYPE_NAMES``)."""
# Every descriptor has its type where the context-cache one has it: bits 3:0 and 11:9 of qword 0.
_TYPE_LO, _TYPE_HI = INV_CONTEXT_CACHE.TYPE_LO, INV_CONTEXT_CACHE.TYPE_HI
_TYPE_HI_SHIFT = INV_CONTEXT_CACHE.TYPE_HI_LO - 4


def descriptor_type(q0: int) -> int:
    """The type code of a descriptor from its first qword."""
    return (q0 & _TYPE_LO) | (q0 & _TYPE_HI) >> _TYPE_HI_SHIFT
PROGRESS_ROWS = 1 << 18
"""With a progress callback, long DMA blocks are replayed in slices of this many rows."""
BATCH_MIN_RUN = 16
"""Shorter runs of DMA events are replayed one by one (numpy's fixed costs outweigh the gain)."""


# -- the machine -------------------------------------------------------------------------------------


@dataclass
class Machine:
    """What a trace runs on: memory, the unit, and (for host-layer traces) the host and its objects.

    This is the one place the library assembles a replayable machine: replay, recording and timelines get
    theirs from :meth:`build` (from a trace's ``config``), or are handed one.  The seam for machines built
    elsewhere is :meth:`on_host`: anything that composes a :class:`vtd_emu.host.Host` (the host layer
    itself, and the vIOMMU's ``vtd_emu.vmm.Machine`` when it comes, which composes a Host and puts its own
    objects beside it) hands the Host in, and the machine replays on the Host's RAM and physical unit.
    ``objects`` are what host events can name as ``target`` (``host`` and every result bound with ``as``).
    """

    ram: HostRAM
    iommu: VtdIommu
    config: VtdConfig
    host: Any = None
    objects: dict[str, Any] = field(default_factory=dict)
    vmm: Any = None
    """The ``vtd_emu.vmm.Machine`` of a vIOMMU trace (``config.vmm``): ``iommu`` is its vIOMMU, ``ram`` the
    host's RAM (what checkpoints hash), ``mem`` its guest-physical memory (what events address)."""
    mem: Any = None
    """The memory events read and write (``ram`` unless a vIOMMU machine's guest-physical view)."""

    def __post_init__(self) -> None:
        if self.mem is None:
            self.mem = self.ram

    @classmethod
    def build(cls, cfg: TraceConfig, *, profile: str | None = None, base_dir: Path | None = None,
              file: str = "<trace>") -> Machine:
        """The machine ``cfg`` describes (``profile``, if given, replacing the trace's own); a relative
        ``ram_image`` is found in ``base_dir``."""
        if cfg.vmm is not None:
            if profile is not None:
                raise TraceError(file, "config.vmm", f"a vIOMMU machine has no profile to replace (got {profile!r})")
            return cls.on_vmm(_build_vmm(cfg, file))
        if cfg.host is not None:
            return cls.on_host(_build_host(cfg, profile, file))
        vc = unit_config(cfg, profile, file)
        ram = HostRAM(cfg.ram_size)
        if cfg.ram_image is not None:
            from ..ramimage import load_ram_image

            img = Path(cfg.ram_image)
            if not img.is_absolute() and base_dir is not None:
                img = base_dir / img
            load_ram_image(img, base=cfg.ram_base, ram=ram)
        iommu = VtdIommu(ram, vc)
        for d in cfg.devices:
            iommu.attach_device(d["sid"], ats=d["ats"], pri=d["pri"], respond=d["respond"])
        return cls(ram, iommu, vc)

    @classmethod
    def on_host(cls, host: Any) -> Machine:
        """A machine on ``host`` (a :class:`vtd_emu.host.Host`): its RAM and physical unit are the machine's."""
        return cls(host.ram, host.iommu, host.iommu.cfg, host, {"host": host})

    @classmethod
    def on_vmm(cls, vm: Any) -> Machine:
        """A machine on ``vm`` (a :class:`vtd_emu.vmm.Machine`): events drive the guest's side (vIOMMU MMIO
        through ``vm.mmio_write``, guest-physical memory, guest devices' DMA, machine actions)."""
        return cls(vm.host.ram, vm.viommu, vm.cfg, vm.host, {"host": vm.host}, vm, vm.mem)


def unit_config(cfg: TraceConfig, profile: str | None = None, file: str = "<trace>") -> VtdConfig:
    """The ``VtdConfig`` of a trace's config, with ``profile`` (if given) replacing the trace's own."""
    unit = dict(cfg.unit)
    if "fault_collapse" in unit:
        unit["fault_collapse"] = bool(unit["fault_collapse"])  # type: ignore[assignment]
    try:
        if cfg.qemu is not None:
            vc = qemu72_config(cfg.qemu, profile=profile or cfg.profile or "qemu-7.2")
            if unit:
                import dataclasses

                vc = dataclasses.replace(vc, **unit).validated()  # type: ignore[arg-type]
            return vc
        return VtdConfig.preset(cfg.preset or "modern", profile=profile or cfg.profile or "spec",
                                overrides=cfg.overrides, **unit)
    except ConfigError as exc:
        raise TraceError(file, "config", str(exc)) from None


def _host_module() -> Any:
    # Imported on first use: traces without host events never load the host layer.
    import vtd_emu.host as hostmod

    return hostmod


def _build_vmm(cfg: TraceConfig, file: str) -> Any:
    """The ``vtd_emu.vmm.Machine`` of ``config.vmm`` on a fresh ``Host``."""
    from ..vmm import DEFAULT_VIOMMU
    from ..vmm import Machine as VmmMachine

    v = cfg.vmm or {}
    try:
        host = _host_module().Host(**(v.get("host") or {}))
        return VmmMachine(host, v.get("viommu", DEFAULT_VIOMMU), v.get("guest_ram", 64 << 20),
                          forwarding=v.get("forwarding", "coalesced"), dirty_tracking=v.get("dirty_tracking", False))
    except (ConfigError, TypeError, ValueError) as exc:
        raise TraceError(file, "config.vmm", f"cannot build the vIOMMU machine: {exc}") from None


def bridge_record(action: Any) -> dict[str, Any]:
    """A :class:`vtd_emu.vmm.BridgeAction` as a ``bridge`` expectation entry (JSON values, ints as ints)."""
    return {"call": action.call, "on": action.trigger.kind, "args": _jsonable(action.args),
            "result": _jsonable(action.result), "errno": action.errno}


def bridge_stats(bridge: Any) -> dict[str, float]:
    """A bridge's counters, with ioctls per forwarded descriptor."""
    import dataclasses

    d: dict[str, float] = dataclasses.asdict(bridge.stats)
    d["ioctls_per_descriptor"] = bridge.stats.ioctls_per_descriptor
    return d


def _build_host(cfg: TraceConfig, profile: str | None, file: str) -> Any:
    """The ``vtd_emu.host.Host`` of ``config.host`` (its unit from the trace's preset, profile and overrides)."""
    hostmod = _host_module()
    args = dict(cfg.host or {})
    if profile is not None or cfg.profile is not None or cfg.overrides or cfg.unit:
        args["preset"] = unit_config(TraceConfig(preset=str(args.get("preset", "modern")), profile=profile or
                                                 cfg.profile, overrides=cfg.overrides, unit=cfg.unit), None, file)
    try:
        return hostmod.Host(**args)
    except (TypeError, ValueError) as exc:
        raise TraceError(file, "config.host", f"cannot build vtd_emu.host.Host({args}): {exc}") from None


# -- results -----------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "null"
    if isinstance(v, int):
        return hex(v)
    if isinstance(v, (bytes, bytearray)):
        s = bytes(v).hex()
        return s if len(s) <= 64 else f"{s[:64]}... ({len(v)} bytes)"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


@dataclass(slots=True)
class Mismatch:
    event: int
    op: str
    where: str
    what: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        loc = f"event {self.event} ({self.op}{', ' + self.where if self.where else ''})"
        return f"{loc}: {self.what}: expected {_fmt(self.expected)}, got {_fmt(self.actual)}"


@dataclass
class ReplayStats:
    events: int = 0
    dmas: int = 0
    dma_bytes: int = 0
    chunks: int = 0
    faults: Counter[int] = field(default_factory=Counter)
    dropped: int = 0
    untranslated: int = 0
    mmio_reads: int = 0
    mmio_writes: int = 0
    mem_writes: int = 0
    qi_descriptors: Counter[str] = field(default_factory=Counter)
    page_requests: Counter[str] = field(default_factory=Counter)
    checkpoints: int = 0
    host_calls: int = 0
    batched_chunks: int = 0
    scalar_chunks: int = 0
    cache: dict[str, int] = field(default_factory=dict)
    invalidations: dict[str, int] = field(default_factory=dict)
    bridge: dict[str, float] = field(default_factory=dict)
    """A vIOMMU machine's bridge counters (:func:`bridge_stats`); empty for other traces."""
    seconds: float = 0.0
    log_iotlb: Counter[str] = field(default_factory=Counter)
    """DMAs whose ``walks`` expectation says whether the logged run hit its IOTLB or walked: ``qemu_hit``,
    ``qemu_walk``, and what this unit did on them, ``hit``/``walk`` (``hit_where_walked`` and
    ``walk_where_hit`` count the differences)."""
    interrupts: Counter[str] = field(default_factory=Counter)
    """Interrupt requests (``msi`` events) by outcome: ``remapped``, ``passthrough``, ``blocked``."""

    def hit_rates(self) -> dict[str, float | None]:
        c = self.cache

        def rate(h: str, m: str) -> float | None:
            tot = c.get(h, 0) + c.get(m, 0)
            return None if tot == 0 else c.get(h, 0) / tot

        # The front memo answers most IOTLB hits without touching any counter, so the IOTLB's rate is the
        # share of translation requests served without a page walk.
        requests = self.chunks - self.untranslated
        iotlb = None if requests <= 0 else max(0.0, 1.0 - c.get("walks", 0) / requests)
        return {"iotlb": iotlb, "context": rate("context_hits", "context_misses"),
                "pasid": rate("pasid_hits", "pasid_misses")}

    def to_dict(self) -> dict[str, Any]:
        return {"events": self.events, "dmas": self.dmas, "dma_bytes": self.dma_bytes, "chunks": self.chunks,
                "faults": {hex(k): v for k, v in sorted(self.faults.items())}, "dropped": self.dropped,
                "untranslated": self.untranslated, "mmio_reads": self.mmio_reads, "mmio_writes": self.mmio_writes,
                "mem_writes": self.mem_writes, "qi_descriptors": dict(self.qi_descriptors),
                "page_requests": dict(self.page_requests), "checkpoints": self.checkpoints,
                "host_calls": self.host_calls, "batched_chunks": self.batched_chunks,
                "scalar_chunks": self.scalar_chunks, "cache": dict(self.cache), "hit_rates": self.hit_rates(),
                "invalidations": dict(self.invalidations), **({"bridge": dict(self.bridge)} if self.bridge else {}),
                "seconds": round(self.seconds, 6),
                **({"iotlb_vs_log": dict(self.log_iotlb)} if self.log_iotlb else {}),
                **({"interrupt_requests": dict(self.interrupts)} if self.interrupts else {})}

    def merge(self, o: "ReplayStats") -> None:
        for k in ("events", "dmas", "dma_bytes", "chunks", "dropped", "untranslated", "mmio_reads", "mmio_writes",
                  "mem_writes", "checkpoints", "host_calls", "batched_chunks", "scalar_chunks"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        self.seconds += o.seconds
        self.faults.update(o.faults)
        self.qi_descriptors.update(o.qi_descriptors)
        self.page_requests.update(o.page_requests)
        self.log_iotlb.update(o.log_iotlb)
        self.interrupts.update(o.interrupts)
        for k, v in o.cache.items():
            self.cache[k] = self.cache.get(k, 0) + v
        for k, v in o.invalidations.items():
            self.invalidations[k] = self.invalidations.get(k, 0) + v
        for k, b in o.bridge.items():
            self.bridge[k] = self.bridge.get(k, 0) + b
        if self.bridge:
            d = self.bridge.get("descriptors", 0)
            self.bridge["ioctls_per_descriptor"] = self.bridge.get("invalidate_calls", 0) / d if d else 0.0


@dataclass
class ReplayResult:
    name: str
    file: str
    events: int
    checks: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    stats: ReplayStats = field(default_factory=ReplayStats)
    machine: Machine | None = None
    recorded: Trace | None = None
    refused: str | None = None
    """Why the unit refused the trace's configuration, when that was the expected outcome (a QEMU scenario
    whose options QEMU refused too); nothing was replayed then."""
    reports: list[Any] = field(default_factory=list)
    """The vSVA validator's reports (``vtd_emu.vmm.validator.VsvaReport``) of a sanitized vIOMMU trace."""
    validator: Any = None


# -- hashes ------------------------------------------------------------------------------------------


def memory_hash(ram: HostRAM, ranges: str | list[tuple[int, int]] = "all", view: Any = None) -> str:
    """SHA-256 of memory: every non-zero 4 KiB page as (pfn, bytes) in address order, or the given ranges
    as (addr, len, bytes).  Never-written and all-zero pages hash alike, so sparse layouts do not matter."""
    h = hashlib.sha256()
    if isinstance(ranges, str):
        pf = sorted(ram.page_rows().items())
        if pf:
            pfns = np.fromiter((p for p, _ in pf), np.uint64, len(pf))
            rows = np.fromiter((r for _, r in pf), np.int64, len(pf))
            pages = ram.u64_pool()[rows]
            nz = pages.any(axis=1)
            for p, page in zip(pfns[nz].tolist(), pages[nz]):
                h.update(int(p).to_bytes(8, "little"))
                h.update(page.tobytes())
    else:
        # Ranges are addresses of ``view`` (the events' memory) when given.
        src = ram if view is None else view
        for a, n in ranges:
            h.update(a.to_bytes(8, "little") + n.to_bytes(8, "little"))
            h.update(src.read(a, n))
    return h.hexdigest()


def registers_hash(iommu: VtdIommu) -> str:
    """SHA-256 of ``register_dump()`` as ``offset=value`` lines (every register a driver could read)."""
    text = "".join(f"{off:#x}={val:#x}\n" for off, val in sorted(iommu.register_dump().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def memory_changes(ram: HostRAM, watch: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """What the writes ``ram.watch`` logged changed: runs of (address, new bytes) in address order, each
    byte compared with its value before the first write that touched it."""
    first: dict[int, int] = {}
    for addr, old in watch:
        for i, b in enumerate(old):
            first.setdefault(addr + i, b)
    runs: list[tuple[int, bytes]] = []
    start = -1
    cur = bytearray()
    for a in sorted(first):
        new = ram.read(a, 1)[0]
        if new == first[a]:
            continue
        if cur and a == start + len(cur):
            cur.append(new)
        else:
            if cur:
                runs.append((start, bytes(cur)))
            start, cur = a, bytearray([new])
    if cur:
        runs.append((start, bytes(cur)))
    return runs


def fault_list(iommu: VtdIommu) -> list[dict[str, Any]]:
    return [{"reason": f.reason, "sid": f.sid, "addr": f.addr, "write": f.is_write, "pasid": f.pasid}
            for f in iommu.fault_records()]


def reg_size(iommu: VtdIommu, off: int) -> int:
    """The natural access size at ``off``: 8 for a qword of a 64- or 128-bit register, else 4."""
    for slot in iommu.regs.slots.values():
        if slot.offset <= off < slot.offset + slot.width // 8:
            return 8 if slot.width >= 64 and (off - slot.offset) % 8 == 0 else 4
    return 4


# -- the replayer --------------------------------------------------------------------------------------


Progress = Callable[[int, int], None]


class Replayer:
    def __init__(self, trace: Trace, *, profile: str | None = None, batch: bool = True, record: bool = False,
                 progress: Progress | None = None, machine: Machine | None = None, sanitize: bool = False) -> None:
        self.trace = trace
        self.file = trace.source
        base = Path(trace.source).parent if trace.source and not trace.source.startswith("<") else None
        self.m = machine or Machine.build(trace.config, profile=profile, base_dir=base, file=self.file)
        self.io = self.m.iommu
        self.vm = self.m.vmm
        self.mem = self.m.mem
        self.mmio: Any = self.io if self.vm is None else self.vm
        self.validator: Any = None
        if sanitize and self.vm is not None:
            from ..vmm.validator import Validator

            # The vSVA validator: both units' sanitizers, and the guest's writes watched.
            self.validator = Validator(self.vm)
            self.mem = self.validator.mem
        elif sanitize:
            self.io.enable_sanitizer()  # batching sees a sanitizing unit and stays scalar
        self.ram = self.m.ram
        self.batch = batch
        self.engine = BatchEngine(self.io, window=1 << 20) if batch and isinstance(self.io.mem, HostRAM) else None
        self.record = record
        self.progress = progress
        self.result = ReplayResult(trace.name, self.file, trace.event_count(), machine=self.m)
        self.stats = self.result.stats
        self.out_events: list[Event | DmaBlock] = []
        self.index = 0
        # Read DMAs whose bytes a later write's ``data_from`` replays (kept only for those).
        self._keep_reads = {ev.fields["data_from"] for ev in trace.events
                            if isinstance(ev, Event) and ev.op == "dma" and "data_from" in ev.fields}
        self._read_data: dict[int, bytes] = {}

    # -- driver --------------------------------------------------------------------------------------
    def run(self) -> ReplayResult:
        t0 = time.perf_counter()
        c0 = self._cache_snapshot()
        total = self.result.events
        last = t0
        if self.vm is not None:
            # Guest devices DMA through the machine, one event at a time.
            events: Any = list(self.trace.iter_events())
        elif self.engine is not None:
            events = blockify(self.trace.events, BATCH_MIN_RUN)
        else:
            events = self.trace.events
        for ev in events:
            if isinstance(ev, DmaBlock):
                step = PROGRESS_ROWS if self.progress is not None else len(ev)
                if len(ev) <= step:
                    self._block(ev)
                else:
                    # Slices replay exactly like the whole block; they only let progress move.
                    for a in range(0, len(ev), step):
                        self._block(ev.slice(a, min(len(ev), a + step)))
                        self.progress(self.index, total)  # type: ignore[misc]
            else:
                self.apply(ev)
            if self.progress is not None:
                now = time.perf_counter()
                if now - last >= 0.2:
                    self.progress(self.index, total)
                    last = now
        if self.progress is not None:
            self.progress(self.index, total)
        st = self.stats
        st.events = self.index
        c1 = self._cache_snapshot()
        st.cache = {k: c1[0][k] - c0[0].get(k, 0) for k in c1[0]}
        st.invalidations = {k: v - c0[1].get(k, 0) for k, v in c1[1].items() if v - c0[1].get(k, 0)}
        if self.engine is not None:
            st.batched_chunks = self.engine.stats.batched_chunks
            st.scalar_chunks += self.engine.stats.scalar_chunks
        if self.vm is not None:
            st.bridge = bridge_stats(self.vm.bridge)
        if self.validator is not None:
            self.result.reports = list(self.validator.reports)
            self.result.validator = self.validator
        st.seconds = time.perf_counter() - t0
        if self.record:
            t = self.trace
            self.result.recorded = Trace(t.config, self.out_events, t.name, t.description, t.source)
        return self.result

    def _cache_snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        s = self.io.caches.stats
        keys = ("iotlb_hits", "iotlb_misses", "context_hits", "context_misses", "pasid_hits", "pasid_misses",
                "walks")
        return {k: int(getattr(s, k, 0)) for k in keys}, dict(s.invalidations)

    def _mis(self, ev_index: int, op: str, where: str, what: str, exp: Any, act: Any) -> None:
        if where == f"event {ev_index}":
            where = self._yaml_line(ev_index)
        self.result.mismatches.append(Mismatch(ev_index, op, where, what, exp, act))

    def _yaml_line(self, index: int) -> str:
        """``line N`` of event ``index`` in a YAML source (looked up once, on the first mismatch)."""
        if not hasattr(self, "_lines"):
            from .model import _yaml_event_lines, kind_from_name

            src = self.trace.source
            lines: list[int] = []
            if kind_from_name(src) == "yaml":
                try:
                    lines = _yaml_event_lines(Path(src).read_text())
                except OSError:
                    lines = []
            self._lines = lines
        return f"line {self._lines[index]}" if index < len(self._lines) else ""

    def _check(self, i: int, ev: Event, what: str, exp: Any, act: Any) -> None:
        self.result.checks += 1
        if exp != act:
            self._mis(i, ev.op, ev.where, what, exp, act)

    # -- one event -----------------------------------------------------------------------------------
    def apply(self, ev: Event) -> None:
        """Replay one event now and check its expectations (the recorder drives a replay this way)."""
        i = self.index
        self.index = i + 1
        op = ev.op
        handler = _HANDLERS.get(op)
        exp = ev.expect
        vm = self.vm
        if (handler is not None and vm is None and self.validator is None and not self.record
                and (exp is None or _SPECIAL_EXPECT.isdisjoint(exp))):
            # The common event (every DMA, interrupt and memory write of an imported log): nothing to watch
            # or read back, each expected key compared with what the handler observed.
            obs = handler(self, ev)
            if exp:
                result = self.result
                for k, v in exp.items():
                    if k in obs:
                        result.checks += 1
                        if v != obs[k]:
                            self._mis(i, op, ev.where, k, v, obs[k])
            return
        if handler is None and not op.startswith("host."):
            raise TraceError(self.file, ev.where or f"event {i}", f"unknown op {op!r}")
        if self.validator is not None:
            self.validator.event = i
        if vm is None and exp is not None and "bridge" in exp:
            raise TraceError(self.file, ev.where or f"event {i}", "expect.bridge needs a vIOMMU machine (config.vmm)")
        n_actions = len(vm.bridge.actions) if vm is not None else 0
        watch = exp is not None and "mem_changes" in exp
        raises: dict[int, int] | None = exp.get("raises") if exp else None
        before = self.io.register_dump() if raises else {}
        if watch:
            if not isinstance(self.ram, HostRAM) or self.m.mem is not self.ram:
                raise TraceError(self.file, ev.where or f"event {i}", "expect.mem_changes needs host RAM")
            self.ram.watch = []
        try:
            obs = self._host(ev) if handler is None else handler(self, ev)
            if watch:
                assert self.ram.watch is not None
                obs["mem_changes"] = memory_changes(self.ram, self.ram.watch)
        finally:
            if watch:
                self.ram.watch = None
        if vm is not None and op in BRIDGE_OPS:
            obs["bridge"] = [bridge_record(a) for a in vm.bridge.actions[n_actions:]]
        if raises:
            after = self.io.register_dump()
            obs["raises"] = {off: after.get(off, 0) & ~before.get(off, 0) & mask for off, mask in raises.items()}
        if exp:
            for k, v in exp.items():
                if k == "regs":
                    for off, (val, mask) in v.items():
                        act = self.io.mmio_read(off, reg_size(self.io, off))
                        self._check(i, ev, f"register {off:#x}", val & mask, act & mask)
                elif k == "mem":
                    for a, data in v:
                        self._check(i, ev, f"memory at {a:#x}", data, self.mem.read(a, len(data)))
                elif k == "raises":
                    for off, mask in v.items():
                        self._check(i, ev, f"a bit of {mask:#x} newly set in register {off:#x}", True,
                                    bool(obs["raises"][off]))
                elif k in obs:
                    self._check(i, ev, k, v, obs[k])
        if self.record:
            self.out_events.append(Event(op, ev.fields, self._fresh(ev, obs), ev.note, ev.where))

    def _fresh(self, ev: Event, obs: dict[str, Any]) -> dict[str, Any] | None:
        keys = ("result", "errno") if ev.op.startswith("host.") else _RECORDED.get(ev.op, ())
        if "bridge" in obs:
            keys = keys + ("bridge",)
        out: dict[str, Any] = {k: v for k, v in obs.items() if k in keys}
        old = ev.expect or {}
        if "regs" in old:
            out["regs"] = {off: (self.io.mmio_read(off, reg_size(self.io, off)) & mask, mask)
                           for off, (_, mask) in old["regs"].items()}
        if "mem" in old:
            out["mem"] = [(a, self.mem.read(a, len(d))) for a, d in old["mem"]]
        if "raises" in old:
            out.pop("raises", None)
            raised = {off: bits for off, bits in obs["raises"].items() if bits}
            if raised:
                out["raises"] = raised
        for k in old:
            if k not in out and k in obs:
                out[k] = obs[k]
        return out or None

    def _mem_write(self, ev: Event) -> dict[str, Any]:
        f = ev.fields
        self.stats.mem_writes += 1
        mem = self.mem
        if "qwords" in f:
            a = f["addr"]
            for k, q in enumerate(f["qwords"]):
                mem.write_u64(a + 8 * k, q)
        else:
            mem.write(f["addr"], f["hex"])
        return {}

    def _mem_read(self, ev: Event) -> dict[str, Any]:
        return {"hex": self.mem.read(ev.fields["addr"], ev.fields["len"])}

    def _mmio_write(self, ev: Event) -> dict[str, Any]:
        self.stats.mmio_writes += 1
        self.mmio.mmio_write(ev.fields["offset"], ev.fields["value"], ev.fields["size"])
        return {}

    def _mmio_read(self, ev: Event) -> dict[str, Any]:
        self.stats.mmio_reads += 1
        return {"value": self.mmio.mmio_read(ev.fields["offset"], ev.fields["size"])}

    def _qi_submit(self, ev: Event) -> dict[str, Any]:
        self.submit_descriptors(ev.fields["descriptors"], ev.where or f"event {self.index - 1}")
        return {}

    def submit_descriptors(self, descs: list[tuple[int, ...]], where: str) -> None:
        """Write descriptors at the queue tail (from IQA/IQT as software reads them) and advance IQT."""
        io = self.io
        iqa = io.mmio_read(IQA, 8)
        iqt = io.mmio_read(IQT, 8)
        base = iqa & IQA_BITS.IQA & ((1 << io.cfg.haw) - 1)
        slot = 32 if iqa & IQA_BITS.DW else 16
        qbytes = 4096 << (iqa & IQA_BITS.QS)
        off = iqt & IQT_BITS.QT
        for k, d in enumerate(descs):
            if len(d) * 8 > slot:
                raise TraceError(self.file, f"{where} (qi_submit) descriptor {k}",
                                 "a 256-bit descriptor needs a queue with IQA.DW=1 (256-bit slots)")
            qws = list(d) + [0] * (slot // 8 - len(d))
            for j, q in enumerate(qws):
                self.mem.write_u64(base + (off + 8 * j) % qbytes, q)
            off = (off + slot) % qbytes
            t = descriptor_type(d[0])
            self.stats.qi_descriptors[DESC_TYPE_NAMES.get(t, f"type-{t:#x}")] += 1
        self.mmio.mmio_write(IQT, off, 4)

    def _dma(self, ev: Event) -> dict[str, Any]:
        f = ev.fields
        i = self.index - 1
        payload = f.get("data")
        if "data_from" in f:
            payload = self._read_data.get(f["data_from"])
            if payload is None:
                raise TraceError(self.file, f"{ev.where or f'event {i}'} (dma) field 'data_from'",
                                 f"event {f['data_from']} has not run as a read DMA before this one")
        if self.vm is not None:
            return self._guest_dma(ev, i, payload)
        exp = ev.expect
        want_walks = exp is not None and "walks" in exp
        if want_walks:
            cstats = self.io.caches.stats
            w0 = cstats.walks
        # The bytes a read brings are needed only to check, record or replay them.
        want_data = self.record or (exp is not None and "data" in exp) or i in self._keep_reads
        data, faults, addrs = self.dma(f["sid"], f.get("pasid"), f["iova"], f["len"], f["dir"] == "write",
                                       f.get("priv", False), payload, want_data=want_data)
        obs: dict[str, Any] = {"faults": faults, "addrs": addrs}
        if want_walks:
            obs["walks"] = walks = cstats.walks - w0
            expected = exp["walks"]  # type: ignore[index]
            c = self.stats.log_iotlb
            c["qemu_walk" if expected else "qemu_hit"] += 1
            c["walk" if walks else "hit"] += 1
            if bool(expected) != bool(walks):
                c["hit_where_walked" if expected else "walk_where_hit"] += 1
        if data is not None:
            obs["data"] = data
            if i in self._keep_reads:
                self._read_data[i] = data
        return obs

    def _guest_dma(self, ev: Event, i: int, payload: bytes | None) -> dict[str, Any]:
        """A guest device's DMA on a vIOMMU machine (emulated: the vIOMMU's walk; passthrough: the host's)."""
        f = ev.fields
        where = f"{ev.where or f'event {i}'} (dma)"
        dev = self.vm.devices.get(f["sid"])
        if dev is None:
            plugged = [hex(s) for s in sorted(self.vm.devices)]
            raise TraceError(self.file, f"{where} field 'sid'",
                             f"the guest has no device at {f['sid']:#06x}; plugged (vmm.plug): {plugged}")
        if f.get("priv"):
            raise TraceError(self.file, f"{where} field 'priv'", "guest devices send unprivileged requests only")
        st = self.stats
        st.dmas += 1
        st.dma_bytes += f["len"]
        st.chunks += ((f["iova"] + f["len"] - 1) >> 12) - (f["iova"] >> 12) + 1 if f["len"] else 0
        try:
            out = (dev.dma_read(f["iova"], f["len"], f.get("pasid")) if payload is None
                   else dev.dma_write(f["iova"], payload, f.get("pasid")))
        except ValueError as exc:
            raise TraceError(self.file, f"{where} field 'pasid'", str(exc)) from None
        for r in out.faults:
            # 0: blocked with no fault record for the guest (DeviceDma.faults), counted as dropped.
            if r:
                st.faults[r] += 1
            else:
                st.dropped += 1
        obs: dict[str, Any] = {"faults": list(out.faults), "unbacked": out.unbacked, "pending": out.pending}
        if payload is None:
            obs["data"] = out.data
            if i in self._keep_reads:
                self._read_data[i] = out.data
        return obs

    def _plug(self, ev: Event) -> dict[str, Any]:
        """``vmm.plug``: a guest device (a host failure is the expectable ``errno``; the device is not added)."""
        from ..errors import VtdEmuError

        f = ev.fields
        vm = self._need_vm(ev)
        try:
            if f["kind"] == "emulated":
                vm.add_emulated_device(f["sid"], pasid_bits=f["pasid_bits"], ats=f["ats"], pri=f["pri"])
            else:
                vm.add_passthrough_device(f["sid"], f.get("host_sid"), pasid_bits=f["pasid_bits"], pri=f["pri"],
                                          ats=f["ats"], group=f.get("group"))
        except OSError as exc:
            return {"errno": exc.errno}
        except (VtdEmuError, ValueError) as exc:
            raise TraceError(self.file, f"{ev.where or f'event {self.index - 1}'} ({ev.op})", str(exc)) from None
        return {"errno": None}

    def _reset(self, ev: Event) -> dict[str, Any]:
        self._need_vm(ev).reset()
        return {}

    def _need_vm(self, ev: Event) -> Any:
        if self.vm is None:
            raise TraceError(self.file, f"{ev.where or f'event {self.index - 1}'} ({ev.op})",
                             "machine actions need a vIOMMU machine (config.vmm)")
        return self.vm

    def _msi(self, ev: Event) -> dict[str, Any]:
        f = ev.fields
        r = self.io.remap_interrupt(f["sid"], f["addr"], f["data"])
        if isinstance(r, IrFault):
            self.stats.interrupts["blocked"] += 1
            return {"msi_addr": None, "msi_data": None, "ir_fault": r.reason}
        self.stats.interrupts[r.source] += 1
        return {"msi_addr": r.addr, "msi_data": r.data, "ir_fault": None}

    def dma(self, sid: int, pasid: int | None, iova: int, length: int, write: bool, priv: bool,
            data: bytes | None, *, want_data: bool = True) -> tuple[bytes | None, list[int], list[int | None]]:
        """One DMA, chunk by chunk through ``xlate`` (the scalar path): (bytes read, faults, addresses).
        ``want_data`` False: a one-page read does not fetch its bytes (None instead)."""
        io, ram = self.io, self.ram
        st = self.stats
        ptag = NO_PASID if pasid is None else pasid
        req = (WRITE if write else READ) | (PRIV if priv else 0)
        window = io.quirks.interrupt_window_untranslated
        xl = io.xlate
        st.dmas += 1
        st.dma_bytes += length
        if 0 < length <= 4096 - (iova & 0xFFF):
            # Within one page (nearly every DMA of a driver): the loop below, once, without its buffer.
            st.chunks += 1
            st.scalar_chunks += 1
            zeros = None if write or not want_data else bytes(length)
            if window and INTR_LO <= iova < INTR_HI:
                st.untranslated += 1
                return zeros, [], [None]
            hpa = xl(sid, ptag, iova, req)
            if hpa >= 0:
                if write:
                    assert data is not None
                    ram.write(hpa, memoryview(data)[:length])
                    return None, [], [hpa]
                return (ram.read(hpa, length) if want_data else None), [], [hpa]
            if hpa == DROPPED:
                st.dropped += 1
                return zeros, [], [None]
            st.faults[-hpa] += 1
            return zeros, [-hpa], [None]
        out = None if write else bytearray(length)
        faults: list[int] = []
        addrs: list[int | None] = []
        pos = 0
        mv = memoryview(data) if data is not None else None
        while pos < length:
            a = iova + pos
            n = min(4096 - (a & 0xFFF), length - pos)
            st.chunks += 1
            st.scalar_chunks += 1
            if window and INTR_LO <= a < INTR_HI:
                st.untranslated += 1
                addrs.append(None)
                pos += n
                continue
            hpa = xl(sid, ptag, a, req)
            if hpa >= 0:
                addrs.append(hpa)
                if write:
                    assert mv is not None
                    ram.write(hpa, mv[pos:pos + n])
                else:
                    assert out is not None
                    out[pos:pos + n] = ram.read(hpa, n)
            else:
                addrs.append(None)
                if hpa == DROPPED:
                    st.dropped += 1
                else:
                    faults.append(-hpa)
                    st.faults[-hpa] += 1
            pos += n
        return (None if out is None else bytes(out)), faults, addrs

    def _page_request(self, ev: Event) -> dict[str, Any]:
        fn = getattr(self.io, "page_request", None)
        if fn is None:
            raise TraceError(self.file, ev.where or f"event {self.index - 1}",
                             "page_request: this unit model has no page_request (needs vtd_emu.vtd.prq)")
        f = ev.fields
        status = fn(f["sid"], f["addr"], read=f["read"], write=f["write"], exe=f["exe"], priv=f["priv"],
                    pasid=f.get("pasid"), last=f["last"], prgi=f["prgi"], private_data=f.get("private_data"))
        s = str(getattr(status, "value", status))
        self.stats.page_requests[s] += 1
        return {"status": s}

    def _page_response(self, ev: Event) -> dict[str, Any]:
        where = ev.where or f"event {self.index - 1}"
        if getattr(self.io, "page_request", None) is None or getattr(self.io, "qi", None) is None:
            raise TraceError(self.file, where, "page_response: this unit model has no page requests or no "
                                               "invalidation queue to carry the response")
        from ..vtd.qi import T_PAGE_RESPONSE, make_descriptor

        f = ev.fields
        pasid = f.get("pasid")
        desc = make_descriptor(T_PAGE_RESPONSE, PP=int(pasid is not None), RC=f["code"], RID=f["sid"],
                               PASID=pasid or 0, PRGI=f["prgi"])
        self.submit_descriptors([desc], where)
        return {}

    def _checkpoint(self, ev: Event) -> dict[str, Any]:
        self.stats.checkpoints += 1
        f = ev.fields
        view = None if self.vm is None else self.m.mem
        obs: dict[str, Any] = {"mem_sha256": memory_hash(self.ram, f["mem"], view), "faults": fault_list(self.io),
                               "interrupts": len(self.io.interrupts)}
        if f.get("regs", True):
            obs["regs_sha256"] = registers_hash(self.io)
        if self.vm is not None:
            # The host side: the physical unit's registers and the machine's live iommufd objects.
            obs["host_regs_sha256"] = registers_hash(self.vm.host.iommu)
            obs["objects"] = [[o.id, o.kind] for o in self.vm.objects()]
        return obs

    def _note(self, ev: Event) -> dict[str, Any]:
        return {}

    def _host(self, ev: Event) -> dict[str, Any]:
        where = ev.where or f"event {self.index - 1}"
        hostmod = _host_module()
        m = self.m
        if m.host is None:
            raise TraceError(self.file, f"{where} ({ev.op})", "host-layer events run on a host machine: give "
                                                              "config.host (vtd_emu.host.Host arguments)")
        target_name = ev.fields.get("target") or "host"
        target = m.objects.get(target_name)
        if target is None:
            raise TraceError(self.file, f"{where} ({ev.op}) field 'target'",
                             f"no object named {target_name!r}; bound so far: {sorted(m.objects)}")
        method = ev.op[5:]
        cls = next((name for name in HOST_CALLS if isinstance(target, getattr(hostmod, name))), None)
        if cls is None:
            raise TraceError(self.file, f"{where} ({ev.op}) field 'target'",
                             f"{target_name!r} is a {type(target).__name__}; host calls go to a "
                             f"{', '.join(HOST_CALLS)}")
        if method not in HOST_CALLS[cls]:
            raise TraceError(self.file, f"{where} ({ev.op})", f"{cls}.{method} is not a host call a trace may "
                                                              f"make; a {cls} allows {sorted(HOST_CALLS[cls])}")
        fn = getattr(target, method)
        try:
            args = {k: _resolve(v, m.objects, hostmod) for k, v in (ev.fields.get("args") or {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(self.file, f"{where} ({ev.op}) args", str(exc)) from None
        self.stats.host_calls += 1
        try:
            result = fn(**args)
            err = None
        except OSError as exc:
            result, err = None, exc.errno
        except (TypeError, ValueError) as exc:
            # A call the host layer refuses as a programming error (not an errno) is a bad trace.
            raise TraceError(self.file, f"{where} ({ev.op}) args", f"{type(exc).__name__}: {exc}") from None
        if ev.fields.get("as"):
            m.objects[ev.fields["as"]] = result
        return {"result": _jsonable(result), "errno": err}

    # -- DMA blocks ----------------------------------------------------------------------------------
    def _block(self, blk: DmaBlock) -> None:
        i0 = self.index
        n = len(blk)
        self.index += n
        keep = [k for k in self._keep_reads if i0 <= k < i0 + n] if self._keep_reads else []
        want_data = self.record or bool(keep) or (blk.exp_flags is not None and bool((blk.exp_flags & 4).any()))
        st = self.stats
        run = run_block(self.engine, self.io, blk.sid, blk.pasid, blk.iova, blk.length, blk.write, blk.priv,
                        blk.data_off, blk.data, want_data)
        for k in keep:
            r = k - i0
            if not blk.write[r]:
                assert run.read_buf is not None and run.read_off is not None  # want_data asked for them
                o = int(run.read_off[r])
                self._read_data[k] = run.read_buf[o:o + int(blk.length[r])].tobytes()
        if self.engine is None:
            st.scalar_chunks += int(run.res.size)
        res = run.res
        st.dmas += n
        st.dma_bytes += int(blk.length.astype(np.int64).sum())
        st.chunks += int(res.size)
        bad = res < 0
        if bad.any():
            neg = res[bad]
            st.dropped += int((neg == DROPPED).sum())
            st.untranslated += int((neg == SKIPPED).sum())
            real = neg[(neg != DROPPED) & (neg != SKIPPED)]
            if real.size:
                vals, cnts = np.unique(-real, return_counts=True)
                for v, c in zip(vals.tolist(), cnts.tolist()):
                    st.faults[v] += c
        if blk.exp_flags is not None:
            self._check_block(i0, blk, run)
        if self.record:
            self.out_events.append(self._recorded_block(blk, run))

    def _row_obs(self, blk: DmaBlock, run: Any, r: int) -> dict[str, Any]:
        sel = np.flatnonzero(run.row == r)
        res = run.res[sel].tolist()
        obs: dict[str, Any] = {"faults": [-x for x in res if x < 0 and x not in (DROPPED, SKIPPED)],
                               "addrs": [x if x >= 0 else None for x in res]}
        if not blk.write[r] and run.read_buf is not None:
            o = int(run.read_off[r])
            obs["data"] = run.read_buf[o:o + int(blk.length[r])].tobytes()
        return obs

    def _check_block(self, i0: int, blk: DmaBlock, run: Any) -> None:
        flags = blk.exp_flags
        assert flags is not None
        rows_f = np.flatnonzero(flags & 1)
        rows_a = np.flatnonzero(flags & 2)
        rows_d = np.flatnonzero(flags & 4)
        self.result.checks += int(rows_f.size + rows_a.size + rows_d.size)
        suspects: set[int] = set()
        res = run.res
        if rows_a.size:
            assert blk.exp_addrs_ptr is not None and blk.exp_addrs is not None
            exp_cnt = np.diff(blk.exp_addrs_ptr)
            okr = _count_ok(rows_a, np.bincount(run.row, minlength=len(blk)), exp_cnt, suspects)
            sel = okr[run.row]
            act = np.where(res[sel] >= 0, res[sel], -1)
            # Expected values of the selected rows, in chunk order (rows are contiguous in both).
            starts = blk.exp_addrs_ptr[:-1]
            need = np.flatnonzero(okr)
            idx = _ranges(starts[need], exp_cnt[need])
            exp = blk.exp_addrs[idx] if idx.size else np.zeros(0, np.int64)
            diff = np.flatnonzero(act != exp)
            if diff.size:
                suspects.update(np.unique(run.row[sel][diff]).tolist())
        if rows_f.size:
            assert blk.exp_faults_ptr is not None and blk.exp_faults is not None
            fmask = (res < 0) & (res != DROPPED) & (res != SKIPPED)
            exp_cnt = np.diff(blk.exp_faults_ptr)
            okr = _count_ok(rows_f, np.bincount(run.row[fmask], minlength=len(blk)), exp_cnt, suspects)
            sel = fmask & okr[run.row]
            act = -res[sel]
            need = np.flatnonzero(okr & (exp_cnt > 0))
            idx = _ranges(blk.exp_faults_ptr[:-1][need], exp_cnt[need])
            exp = blk.exp_faults[idx].astype(np.int64) if idx.size else np.zeros(0, np.int64)
            diff = np.flatnonzero(act != exp)
            if diff.size:
                suspects.update(np.unique(run.row[sel][diff]).tolist())
        if rows_d.size:
            assert blk.exp_data_ptr is not None and blk.exp_data is not None and run.read_buf is not None
            for r in rows_d.tolist():
                a, b = int(blk.exp_data_ptr[r]), int(blk.exp_data_ptr[r + 1])
                o = int(run.read_off[r])
                if o < 0 or not np.array_equal(run.read_buf[o:o + (b - a)], blk.exp_data[a:b]) \
                        or b - a != int(blk.length[r]):
                    suspects.add(r)
        for r in sorted(suspects):
            exp = blk.row_expect(r) or {}
            obs = self._row_obs(blk, run, r)
            for k in ("faults", "addrs", "data"):
                if k in exp and exp[k] != obs.get(k):
                    # Rows of a block carry no line of their own: the event number locates them.
                    self._mis(i0 + r, "dma", "", k, exp[k], obs.get(k))

    def _recorded_block(self, blk: DmaBlock, run: Any) -> DmaBlock:
        n = len(blk)
        res = run.res
        out = DmaBlock(blk.sid, blk.pasid, blk.iova, blk.length, blk.write, blk.priv, blk.data_off, blk.data,
                       where=blk.where)
        flags = np.where(blk.write, 3, 7).astype(np.uint8)
        ccount = np.bincount(run.row, minlength=n)
        aptr = np.zeros(n + 1, np.int64)
        np.cumsum(ccount, out=aptr[1:])
        fmask = (res < 0) & (res != DROPPED) & (res != SKIPPED)
        fptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(run.row[fmask], minlength=n), out=fptr[1:])
        dl = np.where(blk.write, 0, blk.length.astype(np.int64))
        dptr = np.zeros(n + 1, np.int64)
        np.cumsum(dl, out=dptr[1:])
        out.exp_flags = flags
        out.exp_addrs_ptr, out.exp_addrs = aptr, np.where(res >= 0, res, -1).astype(np.int64)
        out.exp_faults_ptr, out.exp_faults = fptr, (-res[fmask]).astype(np.uint16)
        out.exp_data_ptr = dptr
        out.exp_data = run.read_buf if run.read_buf is not None else np.zeros(0, np.uint8)
        return out


def _count_ok(rows: np.ndarray, cnt: np.ndarray, exp_cnt: np.ndarray, suspects: set[int]) -> np.ndarray:
    """Per block row: checked in ``rows`` with as many values as expected.  Rows with the wrong count
    join ``suspects`` (their values cannot be compared in order)."""
    wrong = rows[cnt[rows] != exp_cnt[rows]]
    suspects.update(wrong.tolist())
    ok = np.zeros(cnt.size, bool)
    ok[rows] = True
    ok[wrong] = False
    return ok


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+c) for each (s, c), vectorised."""
    counts = counts.astype(np.int64)
    tot = int(counts.sum())
    if tot == 0:
        return np.zeros(0, np.int64)
    rep = np.repeat(starts.astype(np.int64) - (np.cumsum(counts) - counts), counts)
    return rep + np.arange(tot, dtype=np.int64)


def _resolve(v: Any, objects: dict[str, Any], hostmod: Any) -> Any:
    """Host-call arguments: ``"$name"`` is an object bound earlier with ``as``; ``{"$hex": "..."}`` bytes;
    ``{"$new": "HwptVtdS1", field: value...}`` an instance of a ``vtd_emu.host`` class; ``"0x..."`` strings
    stay strings unless a ``{"$int": "0x..."}`` asks for an int."""
    if isinstance(v, str) and v.startswith("$"):
        if v[1:] not in objects:
            raise KeyError(f"{v}: no object of that name; bound so far: {sorted(objects)}")
        return objects[v[1:]]
    if isinstance(v, list):
        return [_resolve(x, objects, hostmod) for x in v]
    if isinstance(v, dict):
        if set(v) == {"$hex"}:
            return bytes.fromhex(v["$hex"])
        if set(v) == {"$int"}:
            return int(v["$int"], 0) if isinstance(v["$int"], str) else int(v["$int"])
        if "$new" in v:
            name = str(v["$new"])
            cls = getattr(hostmod, name, None) if name in hostmod.__all__ else None
            if cls is None or not isinstance(cls, type):
                raise ValueError(f"$new: vtd_emu.host exports no class {name!r}")
            return cls(**{k: _resolve(x, objects, hostmod) for k, x in v.items() if k != "$new"})
        return {k: _resolve(x, objects, hostmod) for k, x in v.items()}
    return v


def _jsonable(v: Any) -> Any:
    import dataclasses

    if v is None or isinstance(v, (bool, int, str, float)):
        return v
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if hasattr(v, "_asdict"):
        return {k: _jsonable(x) for k, x in v._asdict().items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return f"<{type(v).__name__}>"


_SPECIAL_EXPECT = frozenset(_GENERIC_EXPECT)
"""Expectation keys ``apply`` does more for than compare with the handler's observation (``bridge``
included: off a vIOMMU machine the general path refuses it rather than skip it)."""

_HANDLERS: dict[str, Callable[[Replayer, Event], dict[str, Any]]] = {
    "mem_write": Replayer._mem_write,
    "mem_read": Replayer._mem_read,
    "mmio_write": Replayer._mmio_write,
    "mmio_read": Replayer._mmio_read,
    "qi_submit": Replayer._qi_submit,
    "dma": Replayer._dma,
    "page_request": Replayer._page_request,
    "page_response": Replayer._page_response,
    "checkpoint": Replayer._checkpoint,
    "note": Replayer._note,
    "vmm.plug": Replayer._plug,
    "vmm.reset": Replayer._reset,
    "msi": Replayer._msi,
}
BRIDGE_OPS = frozenset({"mmio_write", "qi_submit", "page_response", "dma", "vmm.plug", "vmm.reset"})
"""Events that may make a vIOMMU machine's bridge call the host: on such a machine ``record`` gives each
the ``bridge`` expectation (``[]`` when it made none)."""

# Expectations ``record`` fills for every event of an op.
_RECORDED: dict[str, tuple[str, ...]] = {
    "dma": ("faults", "addrs", "data", "unbacked", "pending"),
    "mmio_read": ("value",),
    "mem_read": ("hex",),
    "page_request": ("status",),
    "checkpoint": ("mem_sha256", "regs_sha256", "faults", "interrupts", "host_regs_sha256", "objects"),
    "vmm.plug": ("errno",),
    "msi": ("msi_addr", "msi_data", "ir_fault"),
}


def replay(trace: Trace, **kwargs: Any) -> ReplayResult:
    return Replayer(trace, **kwargs).run()


def replay_file(path: str | Path, **kwargs: Any) -> ReplayResult:
    from .model import load_trace

    return Replayer(load_trace(path), **kwargs).run()
