"""The ``vtd-emu`` command.

Exit status: 0 success; 1 a translation faulted (``walk``), an expectation differed (``replay --check``)
or the sanitizer found a stale translation; 2 bad input (a file, an argument, a damaged specs directory),
reported as one line on stderr naming the file and position, with no output file left behind.

The library is imported inside :func:`main`'s error handling, never at module import: the chip compiles
``specs/*.yaml`` when it is first imported, and a damaged specs directory must be one line too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TextIO

from . import __version__
from .errors import VtdEmuError
from .outfile import replacing, replacing_text

if TYPE_CHECKING:
    from .memory import HostRAM
    from .vtd.config import VtdConfig
    from .vtd.dump import Leaves
    from .vtd.walk import Geometry

class UsageError(VtdEmuError, ValueError):
    """A bad command line (argument, combination of options)."""


class _Parser(argparse.ArgumentParser):
    """Argument errors become one line (the command's name and what was wrong), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


class _LazyNames:
    """argparse ``choices`` whose names come from the specs, read on first use, not when the parser is
    built: ``vtd-emu --version`` and the usage line work even when the specs cannot be loaded.  (Every
    option using one names a ``metavar``: argparse would iterate the choices to make one.)"""

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self._names = names

    def __contains__(self, item: object) -> bool:
        return item in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def _preset_names() -> list[str]:
    from .vtd.config import preset_names

    return preset_names()


def _profile_names() -> list[str]:
    from .vtd.config import profile_names

    return profile_names()


PRESETS = _LazyNames(_preset_names)
PROFILES = _LazyNames(_profile_names)


def _num(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 0x1000 or 4096, got {text!r}") from None


def _ranged(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An argument type: a number in lo..hi (inclusive), else a one-line error saying the range."""

    def parse(text: str) -> int:
        n = _num(text)
        if not lo <= n <= hi:
            span = f"{lo}..{hi}" if hi < 1024 else f"{lo:#x}..{hi:#x}"
            raise argparse.ArgumentTypeError(f"expected {what} in {span}, got {text}")
        return n

    parse.__name__ = what  # argparse names the type in some messages
    return parse


_U64_MAX = (1 << 64) - 1
_addr = _ranged(0, _U64_MAX, "a 64-bit address")
_sid = _ranged(0, 0xFFFF, "a 16-bit requester id")
_pasid = _ranged(0, 0xFFFFF, "a 20-bit PASID")
_ram_size = _ranged(1, 1 << 64, "a memory size in bytes")
_levels = _ranged(2, 5, "a number of paging levels")


def _load_ram(args: argparse.Namespace) -> HostRAM:
    from .ramimage import load_ram_image

    return load_ram_image(args.ram, base=args.ram_base, size=args.ram_size)


def _config(args: argparse.Namespace) -> VtdConfig:
    from .vtd.config import VtdConfig

    return VtdConfig.preset(args.preset, profile=args.profile)


def _bare_levels(stage: str, levels: int | None) -> int:
    """Paging levels of a bare table given with --fs-root/--ss-root (default 4)."""
    if levels is None:
        return 4
    if stage == "fs" and levels not in (4, 5):
        raise UsageError("--levels for a first-stage table is 4 or 5")
    if stage == "ss" and levels not in (2, 3, 4, 5):
        raise UsageError("--levels for a second-stage table is 2 to 5")
    return levels


def _entry_layout(stage: str, level: int, value: int) -> str:
    from .vtd.walk import FS_NAMES, SS_NAMES

    names = SS_NAMES if stage == "ss" else FS_NAMES
    table, leaf = names[level]
    is_leaf = level == 1 or (level <= 3 and value & 0x80)
    return (leaf if is_leaf else table) or table or leaf or ""


def _describe_step(name: str, level: int, addr: int, value: int | tuple[int, ...]) -> str:
    from .spec import specs

    if name in ("ss", "fs"):
        assert isinstance(value, int)
        lay = _entry_layout(name, level, value)
        return f"  {lay:<22} L{level} @ {addr:#014x} = {value:#018x}  {specs().structure(lay).format(value)}"
    layout = specs().structure(name)
    if isinstance(value, tuple):
        whole = sum((q & ((1 << 64) - 1)) << (64 * i) for i, q in enumerate(value))
        if min(value) < 0:
            return f"  {name:<22}    @ {addr:#014x} = <not memory>"
        qs = " ".join(f"{q:#018x}" for q in value)
        return f"  {name:<22}    @ {addr:#014x} = {qs}\n{'':28}{layout.format(whole)}"
    if value < 0:
        return f"  {name:<22}    @ {addr:#014x} = <not memory>"
    return f"  {name:<22}    @ {addr:#014x} = {value:#018x}  {layout.format(value)}"


def _req(access: str, priv: bool, exe: bool) -> int:
    from .vtd.access import EXEC, PRIV, READ, WRITE

    bits = (READ if "r" in access else 0) | (WRITE if "w" in access else 0)
    if set(access) - set("rw") or not bits:
        raise UsageError(f"--access must be r, w or rw, got {access!r}")
    return bits | (PRIV if priv else 0) | (EXEC if exe else 0)


def _program_root(io: Any, args: argparse.Namespace) -> None:
    """RTADDR and SRTP through MMIO, as a driver would (scalable mode: RTADDR.TTM = 01)."""
    from .spec.consts import GCMD

    ttm_scalable = 1 << 10
    io.mmio_write(0x20, args.rtaddr | (ttm_scalable if args.scalable else 0), 8)
    io.mmio_write(0x18, GCMD.SRTP)


def cmd_walk(args: argparse.Namespace, out: TextIO) -> int:
    from .spec.consts import FR, GCMD
    from .vtd.dump import perm_text
    from .vtd.faults import reason_name
    from .vtd.iommu import Fault, Translation, VtdIommu, allowed_text
    from .vtd.walk import SS_CODES_SM, Geometry, canonical, fs_walk, ss_walk

    req = _req(args.access, args.priv, args.exe)
    if args.rtaddr is not None:
        if args.sid is None:
            raise UsageError("--rtaddr needs --sid")
        if (args.priv or args.exe) and args.pasid is None:
            raise UsageError("--priv and --exe are attributes of a request with PASID: give --pasid")
        if args.levels is not None:
            raise UsageError("--levels is for a bare table (--fs-root, --ss-root); a device's entries give theirs")
    ram = _load_ram(args)
    cfg = _config(args)
    if args.rtaddr is not None:
        io = VtdIommu(ram, cfg)
        _program_root(io, args)
        io.mmio_write(0x18, GCMD.TE)
        rep = io.walk(args.sid, args.iova, args.access, pasid=args.pasid, priv=args.priv, exe=args.exe)
        print(f"walk sid {args.sid:#06x} pasid {args.pasid if args.pasid is not None else '-'} iova {args.iova:#x} "
              f"({args.access}) root {args.rtaddr:#x} {'scalable' if args.scalable else 'legacy'}", file=out)
        for step in rep.steps:
            print(_describe_step(*step), file=out)
        res = rep.result
    else:
        root, stage = (args.fs_root, "fs") if args.fs_root is not None else (args.ss_root, "ss")
        if root is None:
            raise UsageError("give --rtaddr with --sid, or a bare table with --fs-root or --ss-root")
        levels = _bare_levels(stage, args.levels)
        steps: list[Any] = []
        if stage == "fs":
            geo = Geometry.compile("fs", frozenset(), cfg.haw, (True, True))
            if not canonical(args.iova, levels):
                r: Any = FR.SM_NON_CANONICAL
            else:
                r = fs_walk(ram.read_u64, lambda a, v: True, root, levels, args.iova, req, geo, 0x3F, None, 0, 0,
                            steps)
        else:
            geo = Geometry.compile("ss", frozenset({"SC"}), cfg.haw, (True, True))
            r = ss_walk(ram.read_u64, None, root, levels, args.iova, req, geo, SS_CODES_SM, None, 0, 0, steps)
        print(f"walk {stage} table {root:#x} ({levels} levels) iova {args.iova:#x} ({args.access})", file=out)
        for step in steps:
            print(_describe_step(*step), file=out)
        if isinstance(r, int):
            res = Fault(r, reason_name(r), args.iova, False)
        else:
            base, shift, perm = r
            perms = perm_text(perm & 7, "ss") if stage == "ss" else allowed_text(perm)
            res = Translation(base | (args.iova & ((1 << shift) - 1)), 1 << shift, perms,
                              "first-stage" if stage == "fs" else "second-stage")
    if isinstance(res, Fault):
        print(f"result: fault {res.reason:#x} {res.name}", file=out)
        return 1
    print(f"result: {res.addr:#x} (page {res.page_size:#x}, {res.perms}, {res.kind})", file=out)
    return 0


def cmd_dump(args: argparse.Namespace, out: TextIO) -> int:
    from .vtd.dump import leaves, nested_leaves

    if args.fs_root is not None:
        stage, root, levels = "fs", args.fs_root, _bare_levels("fs", args.levels)
    elif args.ss_root is not None:
        stage, root, levels = "ss", args.ss_root, _bare_levels("ss", args.levels)
    elif args.rtaddr is not None and args.sid is not None:
        if args.levels is not None:
            raise UsageError("--levels is for a bare table (--fs-root, --ss-root); a device's entries give theirs")
        stage, root, levels = "", 0, 0
    else:
        raise UsageError("give --fs-root, --ss-root, or --rtaddr with --sid")
    ram = _load_ram(args)
    cfg = _config(args)
    if not stage:
        stage, root, levels, nested = _device_root(ram, cfg, args)
        if nested is not None:
            lv = nested_leaves(ram, root, levels, nested[0], nested[1], _geometry("fs", cfg), _geometry("ss", cfg))
            _print_mappings(lv, "fs", args.format, args.leaves, out)
            return 0
    _print_mappings(leaves(ram, root, levels, stage, _geometry(stage, cfg)), stage, args.format, args.leaves, out)
    return 0


def _geometry(stage: str, cfg: VtdConfig) -> Geometry:
    from .vtd.walk import Geometry

    # Inspection reports what is mapped: feature-dependent bits (SNP, TM) and every page size are accepted.
    return Geometry.compile(stage, frozenset({"SC", "TM"}) if stage == "ss" else frozenset(), cfg.haw, (True, True))


def _device_root(ram: HostRAM, cfg: VtdConfig,
                 args: argparse.Namespace) -> tuple[str, int, int, tuple[int, int] | None]:
    """(stage, table root, levels, (second-stage root, levels) for a nested entry) of one device/PASID."""
    from .vtd.faults import reason_name
    from .vtd.iommu import VtdIommu

    io = VtdIommu(ram, cfg)
    _program_root(io, args)
    ctx = io.context_entry(args.sid, [])
    if isinstance(ctx, int):
        raise UsageError(f"sid {args.sid:#x}: context lookup faults with {ctx & 0xFF:#x} {reason_name(ctx & 0xFF)}")
    if ctx[0] == 0:
        if ctx[2] == 2:
            raise UsageError(f"sid {args.sid:#x} is pass-through: every address maps to itself")
        return "ss", ctx[4], ctx[3], None
    pasid = args.pasid if args.pasid is not None else ctx[4]
    pe = io.pasid_entry(args.sid, ctx, pasid, [])
    if isinstance(pe, int):
        raise UsageError(f"sid {args.sid:#x} pasid {pasid:#x}: PASID lookup faults with {pe & 0xFF:#x} "
                         f"{reason_name(pe & 0xFF)}")
    pgtt = pe[1]
    if pgtt == 2:
        return "ss", pe[3], pe[2], None
    if pgtt == 1:
        return "fs", pe[5], pe[4], None
    if pgtt == 3:
        return "fs", pe[5], pe[4], (pe[3], pe[2])
    raise UsageError(f"PASID entry {pasid:#x} is pass-through: every address maps to itself")


def _print_mappings(lv: Leaves, stage: str, fmt: str, as_leaves: bool, out: TextIO) -> None:
    from .vtd.dump import merge, perm_text

    if as_leaves:
        rows: list[tuple[int, int, int, int, int, bool]] = [(va, pa, sz, sz, p, r) for va, pa, sz, p, r in lv.rows()]
    else:
        rows = [(r.va, r.pa, r.length, r.page_size, r.perm, r.rsvd) for r in merge(lv)]
    write = out.write
    if fmt == "json":
        for va, pa, length, ps, perm, rsvd in rows:
            write(json.dumps({"iova": hex(va), "addr": hex(pa), "length": length, "page_size": ps,
                              "perm": perm_text(perm, stage), **({"reserved_bits": True} if rsvd else {})}) + "\n")
        return
    write(f"{'input':>18}  {'output':>18}  {'length':>12}  {'page':>6}  perm\n")
    names = {4096: "4K", 2 << 20: "2M", 1 << 30: "1G", 512 << 30: "512G"}
    for va, pa, length, ps, perm, rsvd in rows:
        write(f"{va:#018x}  {pa:#018x}  {length:#12x}  {names.get(ps, hex(ps)):>6}  {perm_text(perm, stage)}"
              f"{'  RESERVED-BITS' if rsvd else ''}\n")
    write(f"# {len(lv)} leaves, {len(rows)} {'leaves' if as_leaves else 'ranges'}, "
          f"{int(lv.size.sum()) if len(lv) else 0:#x} bytes mapped\n")


def _progress_printer(path: str, enabled: bool) -> Callable[[int, int], None] | None:
    if not enabled:
        return None
    state = {"shown": False}

    def show(done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        sys.stderr.write(f"\rreplay {path}: {done:,}/{total:,} events ({pct:.0f}%)")
        sys.stderr.flush()
        state["shown"] = True
        if done >= total:
            sys.stderr.write("\n")

    return show


def _import_progress(path: str, enabled: bool) -> Callable[[int], None] | None:
    if not enabled:
        return None
    t0 = time.perf_counter()

    def show(lines: int) -> None:
        dt = time.perf_counter() - t0
        sys.stderr.write(f"\rimport {path}: {lines:,} lines ({lines / dt if dt > 0 else 0:,.0f} lines/s)")
        sys.stderr.flush()

    return show


def _summary_table(st: Any, out: TextIO) -> None:
    """The human summary of replayed traces (DMAs, bytes, faults, cache hit rates, invalidations)."""
    from .vtd.faults import reason_name

    w = out.write
    faulted = sum(st.faults.values())
    translated = st.chunks - faulted - st.dropped - st.untranslated
    w(f"DMAs            {st.dmas:,} ({st.dma_bytes:,} bytes in {st.chunks:,} page chunks: {translated:,} translated, "
      f"{faulted:,} faulted, {st.dropped:,} dropped, {st.untranslated:,} untranslated)\n")
    if st.faults:
        w("faults          " + ", ".join(f"{r:#x} {reason_name(r)}: {c:,}" for r, c in sorted(st.faults.items()))
          + "\n")
    rates = st.hit_rates()
    c = st.cache

    def rate(name: str, h: str, m: str) -> str:
        r = rates[name]
        return f"{name} -" if r is None else f"{name} {100 * r:.1f} % ({c.get(h, 0):,}/{c.get(h, 0) + c.get(m, 0):,})"

    req = st.chunks - st.untranslated
    iot = rates["iotlb"]
    iotlb_text = "iotlb -" if iot is None else f"iotlb {100 * iot:.1f} % ({req - c.get('walks', 0):,}/{req:,} without a walk)"
    w("cache hit rates " + ", ".join((iotlb_text,
                                       rate("context", "context_hits", "context_misses"),
                                       rate("pasid", "pasid_hits", "pasid_misses"))) + "\n")
    lc = st.log_iotlb
    if lc:
        w(f"IOTLB vs log    QEMU hit {lc['qemu_hit']:,}, walked {lc['qemu_walk']:,}; this unit hit {lc['hit']:,}, "
          f"walked {lc['walk']:,} ({lc['hit_where_walked']:,} hits where QEMU walked, {lc['walk_where_hit']:,} walks "
          "where QEMU hit)\n")
    if st.interrupts:
        w("interrupts      " + ", ".join(f"{k} {v:,}" for k, v in sorted(st.interrupts.items())) + "\n")
    if st.invalidations:
        w("invalidations   " + ", ".join(f"{k} {v:,}" for k, v in sorted(st.invalidations.items())) + "\n")
    if st.qi_descriptors:
        w("QI descriptors  " + ", ".join(f"{k} {v:,}" for k, v in sorted(st.qi_descriptors.items())) + "\n")
    if st.page_requests:
        w("page requests   " + ", ".join(f"{k} {v:,}" for k, v in sorted(st.page_requests.items())) + "\n")
    if st.bridge:
        b = st.bridge
        w(f"bridge          {b['binds']:,.0f} binds, {b['unbinds']:,.0f} unbinds, {b['refusals']:,.0f} refused; "
          f"{b['descriptors']:,.0f} guest invalidations forwarded in {b['invalidate_calls']:,.0f} ioctls "
          f"({b['ioctls_per_descriptor']:.2f} per descriptor, {b['invalidate_entries']:,.0f} entries, "
          f"{b['failed_forwards']:,.0f} failed); {b['host_calls']:,.0f} host calls ({b['failed_calls']:,.0f} failed)\n")
    rate_s = f"{st.events / st.seconds:,.0f} events/s" if st.seconds > 0 else "-"
    w(f"replay          {st.events:,} events in {st.seconds:.3f} s ({rate_s}); page chunks batched {st.batched_chunks:,}, "
      f"scalar {st.scalar_chunks:,}\n")


TRACE_SUFFIXES = (".yaml", ".yml", ".jsonl", ".json", ".npz")
"""What ``replay DIR`` takes for a trace or scenario file (RAM images and logs beside them are skipped)."""


def _replay_inputs(names: Iterable[str]) -> list[str]:
    """The files named, a directory standing for every trace file under it (sorted, recursively)."""
    files: list[str] = []
    for name in names:
        p = Path(name)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in TRACE_SUFFIXES and f.is_file())
            if not found:
                raise UsageError(f"{name}: no trace files ({', '.join(TRACE_SUFFIXES)}) under this directory")
            files.extend(found)
        else:
            files.append(name)
    return files


class _Tally:
    """What ``replay`` reports over all its files: per-file results, mismatch lines and files that failed."""

    def __init__(self) -> None:
        self.scenarios = 0
        self.events = 0
        self.mismatches = 0
        self.stale = 0
        self.findings = 0
        """vSVA validator reports (vIOMMU machine traces under --sanitize)."""
        self.validated = 0
        self.traces = 0
        self.results: list[dict[str, Any]] = []
        self.failed: list[dict[str, str]] = []

    def merge(self, other: "_Tally") -> None:
        """Add another file's tally (``replay -j``), keeping the files' order."""
        self.scenarios += other.scenarios
        self.events += other.events
        self.mismatches += other.mismatches
        self.stale += other.stale
        self.findings += other.findings
        self.validated += other.validated
        self.traces += other.traces
        self.results += other.results
        self.failed += other.failed


def _replay_oracle(path: str, args: argparse.Namespace, tally: _Tally, out: TextIO) -> None:
    from .importers.qemu_scenario import load_scenarios, replay_scenario

    rows: list[dict[str, Any]] = []
    scenarios = load_scenarios(path)  # raises before anything is counted
    for sc in scenarios:
        res = replay_scenario(sc, profile=args.profile or "qemu-7.2", batch=not args.no_batch)
        tally.scenarios += 1
        tally.events += sc.steps
        if res.refused:
            rows.append({"file": path, "id": sc.id, "skipped": res.refused})
            continue
        tally.mismatches += len(res.mismatches)
        texts = [f"{path}: {sc.id}: {m}" for m in res.mismatches]
        if args.check and not args.json:
            for t in texts:
                print(t, file=out)
        row: dict[str, Any] = {"file": path, "id": sc.id, "steps": sc.steps, "checks": res.checks,
                               "mismatches": len(res.mismatches)}
        if args.json and texts:
            row["mismatch_list"] = texts
        rows.append(row)
    tally.results.extend(rows)


def _replay_trace(path: str, args: argparse.Namespace, tally: _Tally, stats: Any, out: TextIO) -> None:
    from .trace.model import load_trace
    from .trace.replay import Replayer

    trace = load_trace(path)
    r = Replayer(trace, profile=args.profile, batch=not args.no_batch,
                 progress=_progress_printer(path, args.progress or sys.stderr.isatty()),
                 sanitize=args.sanitize).run()
    stale: list[str] = []
    findings = [f"{path}: {rep.text()}" for rep in r.reports]
    if args.sanitize and r.validator is not None:
        tally.validated += 1
    elif args.sanitize and r.machine is not None:
        for h in r.machine.iommu.stale_hits:
            stale.append(f"{path}: stale translation: sid {h.sid:#06x} pasid "
                         f"{'-' if h.pasid is None else hex(h.pasid)} iova {h.iova:#x} ({h.access}): cached "
                         f"{_answer(h.cached)}, memory says {_answer(h.fresh)}")
    texts = [f"{path}: {m}" for m in r.mismatches]
    if not args.json:
        for t in stale + findings + (texts if args.check else []):
            print(t, file=out)
    tally.stale += len(stale)
    tally.findings += len(findings)
    tally.traces += 1
    tally.scenarios += 1
    tally.events += r.events
    tally.mismatches += len(r.mismatches)
    stats.merge(r.stats)
    row: dict[str, Any] = {"file": path, "id": trace.name or Path(path).stem, "events": r.events, "checks": r.checks,
                           "mismatches": len(r.mismatches), "stats": _stats_dict(r.stats, args.timing)}
    if args.json:
        if texts:
            row["mismatch_list"] = texts
        if stale:
            row["stale_translations"] = stale
        if r.validator is not None:
            row["vsva_reports"] = [rep.to_dict() for rep in r.reports]
    tally.results.append(row)


def _stats_dict(stats: Any, timing: bool) -> dict[str, Any]:
    # Wall-clock time differs from run to run: the JSON of two replays of one trace must be the same bytes.
    d: dict[str, Any] = stats.to_dict()
    if not timing:
        d.pop("seconds", None)
    return d


def _replay_one(path: str, args: argparse.Namespace, tally: _Tally, stats: Any, out: TextIO) -> None:
    """Replay one file into ``tally``/``stats``; a file that is bad input is reported and counted failed."""
    from .trace.model import detect_kind

    try:
        if detect_kind(path) == "oracle":
            _replay_oracle(path, args, tally, out)
        else:
            _replay_trace(path, args, tally, stats, out)
    except VtdEmuError as exc:
        _report(exc)
        tally.failed.append({"file": path, "error": str(exc)})
    except OSError as exc:
        _report(exc)
        tally.failed.append({"file": path, "error": _os_error_text(exc)})


def _replay_file(path: str, args: argparse.Namespace) -> tuple[_Tally, Any, str, str]:
    """``replay -j``'s job: one file replayed in a worker process; (tally, stats, stdout text, stderr text)."""
    import contextlib
    import io

    from .trace.replay import ReplayStats

    tally, stats = _Tally(), ReplayStats()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        _replay_one(path, args, tally, stats, out)
    return tally, stats, out.getvalue(), err.getvalue()


def cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    """Replay every file; a file that is bad input is reported (one stderr line) and the others still run.

    Exit status: 2 if any file was bad input, else 1 if ``--check`` found a mismatch or ``--sanitize`` a
    stale translation (or, on a vIOMMU machine trace, any vSVA validator finding), else 0."""
    from .trace.model import detect_kind
    from .trace.replay import ReplayStats

    files = _replay_inputs(args.files)
    tally = _Tally()
    stats = ReplayStats()
    if args.jobs > 1 and len(files) > 1:
        # One process per file at a time; results are merged in the files' order, so the output is the
        # same bytes as a sequential run's.
        from concurrent.futures import ProcessPoolExecutor
        from itertools import repeat

        args.progress = False
        with ProcessPoolExecutor(max_workers=min(args.jobs, len(files))) as pool:
            for part, part_stats, text, errors in pool.map(_replay_file, files, repeat(args)):
                out.write(text)
                sys.stderr.write(errors)
                tally.merge(part)
                stats.merge(part_stats)
    else:
        for path in files:
            _replay_one(path, args, tally, stats, out)
    if args.json:
        doc: dict[str, Any] = {"files": len(files), "scenarios": tally.scenarios, "events": tally.events,
                               "mismatches": tally.mismatches, "results": tally.results}
        if args.sanitize:
            doc["stale_translations"] = tally.stale
            if tally.validated:
                doc["vsva_findings"] = tally.findings
        if tally.traces:
            doc["stats"] = _stats_dict(stats, args.timing)
        doc["failed"] = tally.failed
        out.write(json.dumps(doc, sort_keys=False) + "\n")
    else:
        if tally.traces:
            _summary_table(stats, out)
        if args.sanitize:
            print(f"sanitizer: {tally.stale} stale translations", file=out)
            if tally.validated:
                print(f"validator: {tally.findings} findings in {tally.validated} vIOMMU machine traces", file=out)
        if tally.failed:
            print(f"failed: {len(tally.failed)} of {len(files)} files: "
                  + ", ".join(f["file"] for f in tally.failed), file=out)
        print(f"checked: {tally.scenarios} scenarios, {tally.events} events, {tally.mismatches} mismatches", file=out)
    if tally.failed:
        return 2
    return 1 if (args.check and tally.mismatches) or tally.stale or tally.findings else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of jobs, got {text!r}")
    return value


def _answer(value: int) -> str:
    from .vtd.faults import reason_name

    return f"{value:#x}" if value >= 0 else f"fault {-value:#x} {reason_name(-value)}"


def _encoding(path: str, to: str | None) -> str:
    """The encoding of an output trace, decided before any work so a bad name fails first."""
    from .trace.model import kind_from_name

    kind = to or kind_from_name(path)
    if kind is None:
        raise UsageError(f"{path}: cannot tell the encoding from the name: use .yaml, .jsonl or .npz (or --to)")
    return kind


def cmd_record(args: argparse.Namespace, out: TextIO) -> int:
    from .trace.model import load_trace, save_trace
    from .trace.replay import Replayer

    kind = _encoding(args.out_path, args.to)
    trace = load_trace(args.input)
    res = Replayer(trace, profile=args.profile, batch=not args.no_batch, record=True).run()
    if res.recorded is None:
        from .errors import InternalError

        raise InternalError("a recording replay returned no recorded trace")
    rec = res.recorded
    if args.profile:
        rec.config.profile = args.profile
    with replacing(args.out_path) as tmp:
        save_trace(rec, tmp, kind)
    print(f"recorded {res.events} events of {args.input} with fresh expectations to {args.out_path} "
          f"({len(res.mismatches)} expectations of the input differed)", file=out)
    return 0


def cmd_convert(args: argparse.Namespace, out: TextIO) -> int:
    from .trace.model import load_trace, save_trace

    kind = _encoding(args.out_path, args.to)
    trace = load_trace(args.input)
    with replacing(args.out_path) as tmp:
        save_trace(trace, tmp, kind)
    print(f"converted {trace.event_count()} events: {args.input} -> {args.out_path}", file=out)
    return 0


def _qemu_options(items: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for it in items:
        k, eq, v = it.partition("=")
        if not eq or not k:
            raise UsageError(f"--qemu-option expects KEY=VALUE (e.g. aw_bits=48), got {it!r}")
        k = k.replace("-", "_")
        if k in ("intremap", "eim"):
            opts[k] = v
        elif v.lower() in ("on", "true", "yes"):
            opts[k] = True
        elif v.lower() in ("off", "false", "no"):
            opts[k] = False
        else:
            try:
                opts[k] = int(v, 0)
            except ValueError:
                opts[k] = v
    return opts


def cmd_import_qemu(args: argparse.Namespace, out: TextIO) -> int:
    from .errors import TraceError
    from .importers.qemu_log import import_log, import_log_to
    from .trace.model import check_trace, save_trace

    kind = _encoding(args.out_path, args.to)
    opts = dict(ram=args.ram, qemu=_qemu_options(args.qemu_option) or None, preset=args.preset, profile=args.profile,
                ram_size=args.ram_size)
    seconds = None
    if kind == "jsonl":
        # JSON Lines is written as the log is read: memory stays bounded whatever the log's size.
        show = _import_progress(args.log, args.progress or sys.stderr.isatty())
        with replacing(args.out_path) as tmp:
            count, s, seconds = import_log_to(args.log, tmp, ram_ref=args.out_path, progress=show, **opts)
        if show is not None:
            sys.stderr.write("\n")
    else:
        trace, s = import_log(args.log, out=args.out_path, **opts)
        # What is written must be what replay accepts: the same validation as a trace loaded from a file.
        check_trace(trace)
        with replacing(args.out_path) as tmp:
            save_trace(trace, tmp, kind)
        count = trace.event_count()
    if not s.trace_lines:
        raise TraceError(args.log, "", "no QEMU trace line (like 'vtd_...' from -trace 'vtd_*') in this file")
    if args.json:
        print(json.dumps({"events": count, **s.to_dict()}), file=out)
        return 0
    rate = f"; {s.lines / seconds:,.0f} lines/s" if seconds else ""
    print(f"imported {args.log} -> {args.out_path}: {count} events "
          f"({s.trace_lines} trace lines, {s.other_lines} other lines; styles {dict(s.styles)}{rate})", file=out)
    if s.reconstruction:
        print("reconstruction  " + ", ".join(f"{k} {v}" for k, v in sorted(s.reconstruction.items())), file=out)
    print("converted       " + (", ".join(f"{k} {v}" for k, v in sorted(s.converted.items())) or "-"), file=out)
    if s.descriptors:
        print(f"descriptors     {s.descriptors} written into the invalidation queue from vtd_inv_desc", file=out)
    if s.informational:
        print(f"informational   {sum(s.informational.values())} ("
              + ", ".join(f"{k} {v}" for k, v in sorted(s.informational.items())) + ")", file=out)
    print(f"unknown events  {sum(s.unknown.values())}" + (" (" + ", ".join(f"{k} {v}" for k, v in
                                                                         sorted(s.unknown.items())) + ")"
                                                           if s.unknown else ""), file=out)
    for n in s.notes:
        print(f"note: {n}", file=out)
    return 0


def cmd_timeline(args: argparse.Namespace, out: TextIO) -> int:
    from .trace.model import load_trace
    from .trace.timeline import write_timeline

    trace = load_trace(args.trace)
    with replacing(args.out_path) as tmp:
        doc = write_timeline(trace, tmp, profile=args.profile, batch=not args.no_batch)
    print(f"wrote {len(doc['traceEvents']):,} trace events to {args.out_path} "
          "(open in https://ui.perfetto.dev or chrome://tracing)", file=out)
    return 0


def _ram_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram", required=True, help="RAM image: raw (offset = physical address) or .zst")
    p.add_argument("--ram-base", type=_addr, default=0, help="physical address of the image's first byte")
    p.add_argument("--ram-size", type=_ram_size, default=None,
                   help="memory size in bytes (1..2**64); addresses beyond are not memory")
    p.add_argument("--preset", default="modern", choices=PRESETS, metavar="PRESET",
                   help="unit preset: %(choices)s (default %(default)s)")
    p.add_argument("--profile", default="spec", choices=PROFILES, metavar="PROFILE",
                   help="behaviour profile: %(choices)s (default %(default)s)")


def _where_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtaddr", type=_addr, help="root table address (as in RTADDR)")
    p.add_argument("--scalable", action="store_true", help="the root table is a scalable-mode one")
    p.add_argument("--sid", type=_sid, help="requester id (bus << 8 | dev << 3 | fn), 0..0xffff")
    p.add_argument("--pasid", type=_pasid, help="PASID of the request, 0..0xfffff")
    p.add_argument("--fs-root", type=_addr, help="a bare first-stage table (like a CR3)")
    p.add_argument("--ss-root", type=_addr, help="a bare second-stage table")
    p.add_argument("--levels", type=_levels, help="paging levels of a bare table (first stage 4 or 5, second 2..5)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="vtd-emu", description="Intel VT-d (IOMMU) emulator",
                 epilog="exit status: 0 ok; 1 a fault (walk), a mismatch (replay --check) or a stale translation "
                        "(replay --sanitize); 2 bad input (one line on stderr)")
    ap.add_argument("--version", action="version", version=f"vtd-emu {__version__}")
    sub = ap.add_subparsers(dest="cmd", parser_class=_Parser, metavar="COMMAND")
    w = sub.add_parser("walk", help="show every structure and entry one translation touches")
    _ram_args(w)
    _where_args(w)
    w.add_argument("--iova", type=_addr, required=True)
    w.add_argument("--access", default="r", help="r, w or rw")
    w.add_argument("--priv", action="store_true", help="supervisor request (needs --pasid with --rtaddr)")
    w.add_argument("--exe", action="store_true", help="execute request (needs --pasid with --rtaddr)")
    w.set_defaults(func=cmd_walk)
    d = sub.add_parser("dump", help="list every mapping of a table or of one device/PASID")
    _ram_args(d)
    _where_args(d)
    d.add_argument("--format", choices=("text", "json"), default="text")
    d.add_argument("--leaves", action="store_true", help="one row per leaf instead of merged ranges")
    d.add_argument("-o", "--output", help="write to this file instead of standard output (only on success)")
    d.set_defaults(func=cmd_dump)
    r = sub.add_parser("replay", help="replay traces (vtd-trace/1) or QEMU reference scenarios")
    r.add_argument("files", nargs="+", metavar="FILE|DIR",
                   help="traces or scenario files; a directory stands for every trace file under it")
    r.add_argument("--check", action="store_true", help="compare every expectation; exit 1 on a mismatch")
    r.add_argument("--profile", default=None, choices=PROFILES, metavar="PROFILE",
                   help="behaviour profile, %(choices)s (default: the trace's own; QEMU scenarios: qemu-7.2)")
    r.add_argument("--json", action="store_true",
                   help="print one JSON document (results, mismatches, failed files) and nothing else")
    r.add_argument("--timing", action="store_true", help="include wall-clock seconds in --json stats")
    r.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a terminal")
    r.add_argument("--no-batch", action="store_true", help="translate DMA chunk by chunk (no numpy batching)")
    r.add_argument("--sanitize", action="store_true",
                   help="re-walk every translation and report each cached answer memory no longer supports "
                        "(a guest that forgot an invalidation); on vIOMMU machine traces, the vSVA validator "
                        "(docs/vmm.md); exit 1 if any")
    r.add_argument("-j", "--jobs", type=_positive_int, default=1, metavar="N",
                   help="replay up to N files at once in worker processes (output in the files' order)")
    r.set_defaults(func=cmd_replay)
    rc = sub.add_parser("record", help="replay a trace and write it again with fresh expectations")
    rc.add_argument("input")
    rc.add_argument("-o", dest="out_path", required=True, help="trace to write (.yaml, .jsonl or .npz)")
    rc.add_argument("--to", choices=("yaml", "jsonl", "npz"), help="encoding (default: from the name)")
    rc.add_argument("--profile", default=None, choices=PROFILES, metavar="PROFILE",
                    help="behaviour profile, %(choices)s (default: the trace's own)")
    rc.add_argument("--no-batch", action="store_true")
    rc.set_defaults(func=cmd_record)
    cv = sub.add_parser("convert", help="convert a trace between YAML, JSON Lines and .npz")
    cv.add_argument("input")
    cv.add_argument("out_path", metavar="output")
    cv.add_argument("--to", choices=("yaml", "jsonl", "npz"), help="encoding (default: from the name)")
    cv.set_defaults(func=cmd_convert)
    iq = sub.add_parser("import-qemu", help="turn a QEMU -trace 'vtd_*' log into a trace")
    iq.add_argument("log")
    iq.add_argument("-o", dest="out_path", required=True, help="trace to write (.yaml, .jsonl or .npz)")
    iq.add_argument("--ram", help="RAM image (raw or .zst) with the guest's tables, stored relative to the trace")
    iq.add_argument("--ram-size", type=_ram_size,
                    help="guest RAM size (default: the image's size, else unlimited)")
    iq.add_argument("--qemu-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a QEMU 7.2 intel-iommu option of the logged run (aw_bits=48, scalable_mode=on, ...)")
    iq.add_argument("--preset", choices=PRESETS, metavar="PRESET",
                    help="use one of our presets instead of QEMU options: %(choices)s")
    iq.add_argument("--profile", default=None, choices=PROFILES, metavar="PROFILE",
                    help="behaviour profile, %(choices)s")
    iq.add_argument("--to", choices=("yaml", "jsonl", "npz"))
    iq.add_argument("--json", action="store_true", help="print the import summary as JSON")
    iq.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a terminal")
    iq.set_defaults(func=cmd_import_qemu)
    tl = sub.add_parser("timeline", help="Chrome/Perfetto trace-event JSON of a trace's replay")
    tl.add_argument("trace")
    tl.add_argument("-o", dest="out_path", required=True, help="JSON file to write")
    tl.add_argument("--profile", default=None, choices=PROFILES, metavar="PROFILE",
                    help="behaviour profile, %(choices)s (default: the trace's own)")
    tl.add_argument("--no-batch", action="store_true")
    tl.set_defaults(func=cmd_timeline)
    return ap


def _os_error_text(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else ""
    return f"{name}: {exc.strerror or exc}" if name else str(exc.strerror or exc)


def _report(exc: BaseException) -> None:
    """One line on stderr: the error's own message is already 'file: position: what was wrong'."""
    text = _os_error_text(exc) if isinstance(exc, OSError) else str(exc)
    text = " ".join(text.split())  # a message must never span lines
    print(text if text.startswith("vtd-emu") else f"vtd-emu: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 1 or 2, see the module docstring)."""
    try:
        ap = build_parser()
        try:
            args = ap.parse_args(argv)
        except SystemExit as exc:  # --help, --version
            return int(exc.code or 0)
        func: Callable[[argparse.Namespace, TextIO], int] | None = getattr(args, "func", None)
        if func is None:
            # No command: the usage, as argparse prints it for a missing argument.
            ap.print_usage(sys.stderr)
            print("vtd-emu: error: give a command (vtd-emu --help lists them)", file=sys.stderr)
            return 2
        output = getattr(args, "output", None)
        if output:
            with replacing_text(output) as fh:
                return func(args, fh)
        return func(args, sys.stdout)
    except VtdEmuError as exc:
        _report(exc)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as exc:
        _report(exc)
        return 2
