"""The ``vtd-emu`` command.  Bad input (files, arguments) prints one line and exits 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from .errors import VtdEmuError
from .memory import HostRAM
from .spec import specs
from .vtd.access import EXEC, PRIV, READ, WRITE
from .vtd.config import VtdConfig, preset_names, profile_names
from .vtd.dump import Leaves, leaves, merge, nested_leaves, perm_text
from .vtd.faults import reason_name
from .vtd.iommu import Fault, Translation, VtdIommu, allowed_text
from .vtd.walk import FS_NAMES, SS_CODES_SM, SS_NAMES, Geometry, canonical, fs_walk, ss_walk


class UsageError(VtdEmuError, ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    """Argument errors become one line (the command's name and what was wrong), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _num(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 0x1000 or 4096, got {text!r}") from None


def _load_ram(args: argparse.Namespace) -> HostRAM:
    from .ramimage import load_ram_image

    return load_ram_image(args.ram, base=args.ram_base, size=args.ram_size)


def _config(args: argparse.Namespace) -> VtdConfig:
    return VtdConfig.preset(args.preset, profile=args.profile)


def _entry_layout(stage: str, level: int, value: int) -> str:
    names = SS_NAMES if stage == "ss" else FS_NAMES
    table, leaf = names[level]
    is_leaf = level == 1 or (level <= 3 and value & 0x80)
    return (leaf if is_leaf else table) or table or leaf or ""


def _describe_step(name: str, level: int, addr: int, value: int | tuple[int, ...]) -> str:
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
    bits = (READ if "r" in access else 0) | (WRITE if "w" in access else 0)
    if set(access) - set("rw") or not bits:
        raise UsageError(f"--access must be r, w or rw, got {access!r}")
    return bits | (PRIV if priv else 0) | (EXEC if exe else 0)


def cmd_walk(args: argparse.Namespace, out: TextIO) -> int:
    ram = _load_ram(args)
    cfg = _config(args)
    req = _req(args.access, args.priv, args.exe)
    if args.rtaddr is not None:
        if args.sid is None:
            raise UsageError("--rtaddr needs --sid")
        io = VtdIommu(ram, cfg)
        io.mmio_write(0x20, args.rtaddr | (1 << 10 if args.scalable else 0), 8)
        io.mmio_write(0x18, 1 << 30)
        io.mmio_write(0x18, 1 << 31)
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
        levels = args.levels or 4
        steps: list[Any] = []
        if stage == "fs":
            if levels not in (4, 5):
                raise UsageError("--levels for a first-stage table is 4 or 5")
            geo = Geometry.compile("fs", frozenset(), cfg.haw, (True, True))
            if not canonical(args.iova, levels):
                r: Any = 0x80
            else:
                r = fs_walk(ram.read_u64, lambda a, v: True, root, levels, args.iova, req, geo, 0x3F, None, 0, 0,
                            steps)
        else:
            if levels not in (2, 3, 4, 5):
                raise UsageError("--levels for a second-stage table is 2 to 5")
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
    ram = _load_ram(args)
    cfg = _config(args)
    if args.fs_root is not None:
        stage, root, levels = "fs", args.fs_root, args.levels or 4
    elif args.ss_root is not None:
        stage, root, levels = "ss", args.ss_root, args.levels or 4
    elif args.rtaddr is not None and args.sid is not None:
        stage, root, levels, nested = _device_root(ram, cfg, args)
        if nested is not None:
            lv = nested_leaves(ram, root, levels, nested[0], nested[1], _geometry("fs", cfg), _geometry("ss", cfg))
            _print_mappings(lv, "fs", args.format, args.leaves, out)
            return 0
    else:
        raise UsageError("give --fs-root, --ss-root, or --rtaddr with --sid")
    _print_mappings(leaves(ram, root, levels, stage, _geometry(stage, cfg)), stage, args.format, args.leaves, out)
    return 0


def _geometry(stage: str, cfg: VtdConfig) -> Geometry:
    # Inspection reports what is mapped: feature-dependent bits (SNP, TM) and every page size are accepted.
    return Geometry.compile(stage, frozenset({"SC", "TM"}) if stage == "ss" else frozenset(), cfg.haw, (True, True))


def _device_root(ram: HostRAM, cfg: VtdConfig,
                 args: argparse.Namespace) -> tuple[str, int, int, tuple[int, int] | None]:
    """(stage, table root, levels, (second-stage root, levels) for a nested entry) of one device/PASID."""
    io = VtdIommu(ram, cfg)
    io.mmio_write(0x20, args.rtaddr | (1 << 10 if args.scalable else 0), 8)
    io.mmio_write(0x18, 1 << 30)
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


def _summary_table(st: Any, out: TextIO) -> None:
    """The human summary of replayed traces (DMAs, bytes, faults, cache hit rates, invalidations)."""
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
    if st.invalidations:
        w("invalidations   " + ", ".join(f"{k} {v:,}" for k, v in sorted(st.invalidations.items())) + "\n")
    if st.qi_descriptors:
        w("QI descriptors  " + ", ".join(f"{k} {v:,}" for k, v in sorted(st.qi_descriptors.items())) + "\n")
    if st.page_requests:
        w("page requests   " + ", ".join(f"{k} {v:,}" for k, v in sorted(st.page_requests.items())) + "\n")
    rate_s = f"{st.events / st.seconds:,.0f} events/s" if st.seconds > 0 else "-"
    w(f"replay          {st.events:,} events in {st.seconds:.3f} s ({rate_s}); page chunks batched {st.batched_chunks:,}, "
      f"scalar {st.scalar_chunks:,}\n")


def cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    from .importers.qemu_scenario import load_scenarios, replay_scenario
    from .trace.model import detect_kind, load_trace
    from .trace.replay import ReplayStats, Replayer

    total = events = bad = stale = 0
    summary = []
    stats = ReplayStats()
    traces = 0
    show = args.progress or sys.stderr.isatty()
    for path in args.files:
        if detect_kind(path) == "oracle":
            for sc in load_scenarios(path):
                res = replay_scenario(sc, profile=args.profile or "qemu-7.2", batch=not args.no_batch)
                total += 1
                events += sc.steps
                if res.refused:
                    summary.append({"file": path, "id": sc.id, "skipped": res.refused})
                    continue
                bad += len(res.mismatches)
                if args.check:
                    for m in res.mismatches:
                        print(f"{path}: {sc.id}: {m}", file=out)
                summary.append({"file": path, "id": sc.id, "steps": sc.steps, "checks": res.checks,
                                "mismatches": len(res.mismatches)})
            continue
        trace = load_trace(path)
        r = Replayer(trace, profile=args.profile, batch=not args.no_batch,
                     progress=_progress_printer(path, show), sanitize=args.sanitize).run()
        if args.sanitize and r.machine is not None:
            for h in r.machine.iommu.stale_hits:
                stale += 1
                print(f"{path}: stale translation: sid {h.sid:#06x} pasid "
                      f"{'-' if h.pasid is None else hex(h.pasid)} iova {h.iova:#x} ({h.access}): cached "
                      f"{_answer(h.cached)}, memory says {_answer(h.fresh)}", file=out)
        traces += 1
        total += 1
        events += r.events
        bad += len(r.mismatches)
        if args.check:
            for mismatch in r.mismatches:
                print(f"{path}: {mismatch}", file=out)
        stats.merge(r.stats)
        summary.append({"file": path, "id": trace.name or Path(path).stem, "events": r.events, "checks": r.checks,
                        "mismatches": len(r.mismatches), "stats": r.stats.to_dict()})
    if args.json:
        doc: dict[str, Any] = {"scenarios": total, "events": events, "mismatches": bad, "results": summary}
        if args.sanitize:
            doc["stale_translations"] = stale
        if traces:
            doc["stats"] = stats.to_dict()
        print(json.dumps(doc), file=out)
    elif traces:
        _summary_table(stats, out)
    if args.sanitize:
        print(f"sanitizer: {stale} stale translations", file=out)
    print(f"checked: {total} scenarios, {events} events, {bad} mismatches", file=out)
    return 1 if (args.check and bad) or stale else 0


def _answer(value: int) -> str:
    return f"{value:#x}" if value >= 0 else f"fault {-value:#x} {reason_name(-value)}"


def cmd_record(args: argparse.Namespace, out: TextIO) -> int:
    from .trace.model import load_trace, save_trace
    from .trace.replay import Replayer

    trace = load_trace(args.input)
    res = Replayer(trace, profile=args.profile, batch=not args.no_batch, record=True).run()
    assert res.recorded is not None
    rec = res.recorded
    if args.profile:
        rec.config.profile = args.profile
    save_trace(rec, args.out_path, args.to)
    print(f"recorded {res.events} events of {args.input} with fresh expectations to {args.out_path} "
          f"({len(res.mismatches)} expectations of the input differed)", file=out)
    return 0


def cmd_convert(args: argparse.Namespace, out: TextIO) -> int:
    from .trace.model import load_trace, save_trace

    trace = load_trace(args.input)
    save_trace(trace, args.out_path, args.to)
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
    from .trace.model import save_trace
    from .importers.qemu_log import import_log

    trace, s = import_log(args.log, ram=args.ram, out=args.out_path, qemu=_qemu_options(args.qemu_option) or None,
                          preset=args.preset, profile=args.profile, ram_size=args.ram_size)
    save_trace(trace, args.out_path, args.to)
    if args.json:
        print(json.dumps({"events": trace.event_count(), **s.to_dict()}), file=out)
        return 0
    print(f"imported {args.log} -> {args.out_path}: {trace.event_count()} events "
          f"({s.trace_lines} trace lines, {s.other_lines} other lines; styles {dict(s.styles)})", file=out)
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

    doc = write_timeline(load_trace(args.trace), args.out_path, profile=args.profile, batch=not args.no_batch)
    print(f"wrote {len(doc['traceEvents']):,} trace events to {args.out_path} "
          "(open in https://ui.perfetto.dev or chrome://tracing)", file=out)
    return 0


def _ram_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram", required=True, help="RAM image: raw (offset = physical address) or .zst")
    p.add_argument("--ram-base", type=_num, default=0, help="physical address of the image's first byte")
    p.add_argument("--ram-size", type=_num, default=None, help="memory size; addresses beyond are not memory")
    p.add_argument("--preset", default="modern", choices=preset_names())
    p.add_argument("--profile", default="spec", choices=profile_names())


def _where_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtaddr", type=_num, help="root table address (as in RTADDR)")
    p.add_argument("--scalable", action="store_true", help="the root table is a scalable-mode one")
    p.add_argument("--sid", type=_num, help="requester id (bus << 8 | dev << 3 | fn)")
    p.add_argument("--pasid", type=_num, help="PASID of the request")
    p.add_argument("--fs-root", type=_num, help="a bare first-stage table (like a CR3)")
    p.add_argument("--ss-root", type=_num, help="a bare second-stage table")
    p.add_argument("--levels", type=int, help="paging levels of a bare table")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="vtd-emu", description="Intel VT-d (IOMMU) emulator")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    w = sub.add_parser("walk", help="show every structure and entry one translation touches")
    _ram_args(w)
    _where_args(w)
    w.add_argument("--iova", type=_num, required=True)
    w.add_argument("--access", default="r", help="r, w or rw")
    w.add_argument("--priv", action="store_true", help="supervisor request")
    w.add_argument("--exe", action="store_true", help="execute request")
    w.set_defaults(func=cmd_walk)
    d = sub.add_parser("dump", help="list every mapping of a table or of one device/PASID")
    _ram_args(d)
    _where_args(d)
    d.add_argument("--format", choices=("text", "json"), default="text")
    d.add_argument("--leaves", action="store_true", help="one row per leaf instead of merged ranges")
    d.add_argument("-o", "--output", help="write to this file instead of standard output")
    d.set_defaults(func=cmd_dump)
    r = sub.add_parser("replay", help="replay traces (vtd-trace/1) or QEMU reference scenarios")
    r.add_argument("files", nargs="+")
    r.add_argument("--check", action="store_true", help="compare every expectation; exit 1 on a mismatch")
    r.add_argument("--profile", default=None, choices=profile_names(),
                   help="behaviour profile (default: the trace's own; QEMU scenarios: qemu-7.2)")
    r.add_argument("--json", action="store_true", help="print a JSON summary")
    r.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a terminal")
    r.add_argument("--no-batch", action="store_true", help="translate DMA chunk by chunk (no numpy batching)")
    r.add_argument("--sanitize", action="store_true",
                   help="re-walk every translation and report each cached answer memory no longer supports "
                        "(a guest that forgot an invalidation); exit 1 if any")
    r.set_defaults(func=cmd_replay)
    rc = sub.add_parser("record", help="replay a trace and write it again with fresh expectations")
    rc.add_argument("input")
    rc.add_argument("-o", dest="out_path", required=True, help="trace to write (.yaml, .jsonl or .npz)")
    rc.add_argument("--to", choices=("yaml", "jsonl", "npz"), help="encoding (default: from the name)")
    rc.add_argument("--profile", default=None, choices=profile_names())
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
    iq.add_argument("--ram-size", type=_num, help="guest RAM size (default: the image's size, else unlimited)")
    iq.add_argument("--qemu-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a QEMU 7.2 intel-iommu option of the logged run (aw_bits=48, scalable_mode=on, ...)")
    iq.add_argument("--preset", choices=preset_names(), help="use one of our presets instead of QEMU options")
    iq.add_argument("--profile", default=None, choices=profile_names())
    iq.add_argument("--to", choices=("yaml", "jsonl", "npz"))
    iq.add_argument("--json", action="store_true", help="print the import summary as JSON")
    iq.set_defaults(func=cmd_import_qemu)
    tl = sub.add_parser("timeline", help="Chrome/Perfetto trace-event JSON of a trace's replay")
    tl.add_argument("trace")
    tl.add_argument("-o", dest="out_path", required=True, help="JSON file to write")
    tl.add_argument("--profile", default=None, choices=profile_names())
    tl.add_argument("--no-batch", action="store_true")
    tl.set_defaults(func=cmd_timeline)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except UsageError as exc:
        print(f"vtd-emu: {exc}" if not str(exc).startswith("vtd-emu") else str(exc), file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    func: Callable[[argparse.Namespace, TextIO], int] = args.func
    try:
        output = getattr(args, "output", None)
        if output:
            with Path(output).open("w") as fh:
                return func(args, fh)
        return func(args, sys.stdout)
    except VtdEmuError as exc:
        print(f"vtd-emu: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"vtd-emu: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
