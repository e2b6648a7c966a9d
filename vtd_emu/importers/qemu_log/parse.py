"""QEMU ``-trace 'vtd_*'`` log lines (log backend) as events, streamed.

Line styles (``shared/reference/qemu-model.md`` §6.1):

* QEMU 7.2 … 10.0 with ``-msg timestamp=on``: ``PID@SEC.USEC:event_name text``;
* QEMU 10.1 and later with timestamps: ``2025-09-01T12:34:56.123456Z event_name text``;
* without timestamps: ``event_name text``.

``text`` follows the event's format string (§6.2, transcribed in :data:`EVENTS`).  Lines that are not
trace lines (QEMU messages, qtest chatter) are counted and skipped; trace events this module does not
know (other subsystems, newer QEMUs) are counted by name and skipped; a known event whose text does not
match its format is an error naming the line.

:func:`iter_log` is a generator over any iterable of lines (:func:`open_log` gives one for a plain or
zstd-compressed file), so a log of any size is parsed in constant memory.  Only the events a caller asks
for (``args_for``) are yielded, with their fields as ints; the others are still matched against their
format (a malformed line is an error wherever it is) and counted.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from ...errors import TraceError

# name -> (format text, first QEMU version printing it); transcribed from qemu-model.md §6.2.
EVENTS: dict[str, tuple[str, str]] = {
    "vtd_inv_desc": ("invalidate desc type {type} high 0x{hi:x} low 0x{lo:x}", "7.2"),
    "vtd_inv_desc_cc_domain": ("context invalidate domain 0x{domain:x}", "7.2"),
    "vtd_inv_desc_cc_global": ("context invalidate globally", "7.2"),
    "vtd_inv_desc_cc_device": ("context invalidate device {bus:02x}:{dev:02x}.{fn:02x}", "7.2"),
    "vtd_inv_desc_cc_devices": ("context invalidate devices sid 0x{sid:x} fmask 0x{fmask:x}", "7.2"),
    "vtd_inv_desc_iotlb_global": ("iotlb invalidate global", "7.2"),
    "vtd_inv_desc_iotlb_domain": ("iotlb invalidate whole domain 0x{domain:x}", "7.2"),
    "vtd_inv_desc_iotlb_pages": ("iotlb invalidate domain 0x{domain:x} addr 0x{addr:x} mask 0x{mask:x}", "7.2"),
    "vtd_inv_desc_iotlb_pasid_pages": ("iotlb invalidate domain 0x{domain:x} addr 0x{addr:x} mask 0x{mask:x} "
                                       "pasid 0x{pasid:x}", "7.2"),
    "vtd_inv_desc_iotlb_pasid": ("iotlb invalidate domain 0x{domain:x} pasid 0x{pasid:x}", "7.2"),
    "vtd_inv_desc_wait_sw": ("wait invalidate status write addr 0x{addr:x} data 0x{data:x}", "7.2"),
    "vtd_inv_desc_wait_irq": ("{msg}", "7.2"),
    "vtd_inv_desc_wait_write_fail": ("write fail for wait desc hi 0x{hi:x} lo 0x{lo:x}", "7.2"),
    "vtd_inv_desc_iec": ("granularity 0x{granularity:x} index 0x{index:x} mask 0x{mask:x}", "7.2"),
    "vtd_inv_qi_enable": ("enabled {enable:d}", "7.2"),
    "vtd_inv_qi_setup": ("addr 0x{addr:x} size {size:d}", "7.2"),
    "vtd_inv_qi_head": ("read head {head:d}", "7.2"),
    "vtd_inv_qi_tail": ("write tail {head:d}", "7.2"),
    "vtd_inv_qi_fetch": ("", "7.2"),
    "vtd_context_cache_reset": ("", "7.2"),
    "vtd_pasid_cache_reset": ("", "10.2"),
    "vtd_inv_desc_pasid_cache_gsi": ("", "10.2"),
    "vtd_inv_desc_pasid_cache_dsi": ("Domain selective PC invalidation domain 0x{domain:x}", "10.2"),
    "vtd_inv_desc_pasid_cache_psi": ("PASID selective PC invalidation domain 0x{domain:x} pasid 0x{pasid:x}",
                                     "10.2"),
    "vtd_pasid_cache_devsi": ("Dev selective PC invalidation dev: {bus:02x}:{dev:02x}.{fn:02x}", "11.0"),
    "vtd_re_not_present": ("Root entry bus {bus:d} not present", "7.2"),
    "vtd_ce_not_present": ("Context entry bus {bus:d} devfn {devfn:d} not present", "7.2"),
    "vtd_iotlb_page_hit": ("IOTLB page hit sid 0x{sid:x} iova 0x{addr:x} slpte 0x{slpte:x} domain 0x{domain:x}",
                           "7.2"),
    "vtd_iotlb_page_update": ("IOTLB page update sid 0x{sid:x} iova 0x{addr:x} slpte 0x{slpte:x} "
                              "domain 0x{domain:x}", "7.2"),
    "vtd_iotlb_cc_hit": ("IOTLB context hit bus 0x{bus:x} devfn 0x{devfn:x} high 0x{high:x} low 0x{low:x} "
                         "gen {gen:d}", "7.2"),
    "vtd_iotlb_cc_update": ("IOTLB context update bus 0x{bus:x} devfn 0x{devfn:x} high 0x{high:x} "
                            "low 0x{low:x} gen {gen1:d} -> gen {gen2:d}", "7.2"),
    "vtd_iotlb_reset": ("IOTLB reset (reason: {reason})", "7.2"),
    "vtd_fault_disabled": ("Fault processing disabled for context entry", "7.2"),
    "vtd_replay_ce_valid": ("{mode}: replay valid context device {bus:02x}:{dev:02x}.{fn:02x} "
                            "domain 0x{domain:x} hi 0x{hi:x} lo 0x{lo:x}", "7.2"),
    "vtd_replay_ce_invalid": ("replay invalid context device {bus:02x}:{dev:02x}.{fn:02x}", "7.2"),
    "vtd_page_walk_level": ("walk (base=0x{addr:x}, level={level:d}) iova range 0x{start:x} - 0x{end:x}", "7.2"),
    "vtd_page_walk_one": ("domain 0x{domain:x} iova 0x{iova:x} -> gpa 0x{gpa:x} mask 0x{mask:x} perm {perm:d}",
                          "7.2"),
    "vtd_page_walk_one_skip_map": ("iova 0x{iova:x} mask 0x{mask:x} translated 0x{translated:x}", "7.2"),
    "vtd_page_walk_one_skip_unmap": ("iova 0x{iova:x} mask 0x{mask:x}", "7.2"),
    "vtd_page_walk_skip_read": ("Page walk skip iova 0x{iova:x} - 0x{next:x} due to unable to read", "7.2"),
    "vtd_page_walk_skip_reserve": ("Page walk skip iova 0x{iova:x} - 0x{next:x} due to rsrv set", "7.2"),
    "vtd_switch_address_space": ("Device {bus:02x}:{slot:02x}.{fn:x} switching address space "
                                 "(iommu enabled={on:d})", "7.2"),
    "vtd_as_unmap_whole": ("Device {bus:02x}:{slot:02x}.{fn:x} start 0x{iova:x} size 0x{size:x}", "7.2"),
    "vtd_translate_pt": ("source id 0x{sid:x}, iova 0x{addr:x}", "7.2"),
    "vtd_pt_enable_fast_path": ("sid 0x{sid:x} {success:d}", "7.2"),
    "vtd_irq_generate": ("addr 0x{addr:x} data 0x{data:x}", "7.2"),
    "vtd_reg_read": ("addr 0x{addr:x} size 0x{size:x}", "7.2"),
    "vtd_reg_write": ("addr 0x{addr:x} size 0x{size:x} value 0x{val:x}", "7.2"),
    "vtd_reg_dmar_root": ("addr 0x{addr:x} scalable {scalable:d}", "7.2"),
    "vtd_reg_ir_root": ("addr 0x{addr:x} size 0x{size:x}", "7.2"),
    "vtd_reg_write_gcmd": ("status 0x{status:x} value 0x{val:x}", "7.2"),
    "vtd_reg_write_fectl": ("value 0x{value:x}", "7.2"),
    "vtd_reg_write_iectl": ("value 0x{value:x}", "7.2"),
    "vtd_reg_ics_clear_ip": ("", "7.2"),
    "vtd_dmar_translate": ("dev {bus:02x}:{slot:02x}.{func:02x} iova 0x{iova:x} -> gpa 0x{gpa:x} mask 0x{mask:x}",
                           "7.2"),
    "vtd_dmar_enable": ("enable {en:d}", "7.2"),
    "vtd_dmar_fault": ("sid 0x{sid:x} fault {fault:d} addr 0x{addr:x} write {is_write:d}", "7.2"),
    "vtd_ir_enable": ("enable {en:d}", "7.2"),
    "vtd_ir_irte_get": ("index {index:d} low 0x{lo:x} high 0x{hi:x}", "7.2"),
    "vtd_ir_remap": ("index {index:d} trigger {tri:d} vector {vec:d} deliver {deliver:d} dest 0x{dest:x} "
                     "mode {dest_mode:d}", "7.2"),
    "vtd_ir_remap_type": ("{type}", "7.2"),
    "vtd_ir_remap_msi": ("(addr 0x{addr:x}, data 0x{data:x}) -> (addr 0x{addr2:x}, data 0x{data2:x})", "7.2"),
    "vtd_ir_remap_msi_req": ("addr 0x{addr:x} data 0x{data:x}", "7.2"),
    "vtd_fsts_ppf": ("FSTS PPF bit set to {set:d}", "7.2"),
    "vtd_fsts_clear_ip": ("", "7.2"),
    "vtd_frr_new": ("index {index:d} high 0x{hi:x} low 0x{lo:x}", "7.2"),
    "vtd_warn_invalid_qi_tail": ("tail 0x{tail:x}", "7.2"),
    "vtd_warn_ir_vector": ("sid 0x{sid:x} index {index:d} vec {vec:d} (should be: {target:d})", "7.2"),
    "vtd_warn_ir_trigger": ("sid 0x{sid:x} index {index:d} trigger {trig:d} (should be: {target:d})", "7.2"),
    "vtd_reset_exit": ("", "10.0"),
    "vtd_device_attach_hwpt": ("dev_id {dev_id:d} pasid {pasid:d} hwpt_id {hwpt_id:d}, ret: {ret:d}", "11.0"),
    "vtd_device_detach_hwpt": ("dev_id {dev_id:d} pasid {pasid:d} ret: {ret:d}", "11.0"),
    "vtd_device_reattach_def_hwpt": ("dev_id {dev_id:d} pasid {pasid:d} hwpt_id {hwpt_id:d}, ret: {ret:d}",
                                     "11.0"),
    "x86_iommu_iec_notify": ("Notify IEC invalidation: global={global:d} index={index:d} mask={mask:d}", "7.2"),
}

_FIELD = re.compile(r"\{(\w+)(?::(0?\d*)([xd]))?\}")


def _compile(fmt: str) -> tuple[re.Pattern[str], dict[str, str]]:
    parts: list[str] = []
    kinds: dict[str, str] = {}
    pos = 0
    fields = list(_FIELD.finditer(fmt))
    for i, m in enumerate(fields):
        parts.append(re.escape(fmt[pos:m.start()]))
        name, kind = m.group(1), m.group(3) or "s"
        kinds[name] = kind
        if kind == "x":
            parts.append(f"(?P<{name}>[0-9a-f]+)")
        elif kind == "d":
            parts.append(f"(?P<{name}>-?[0-9]+)")
        else:
            parts.append(f"(?P<{name}>.*)" if i == len(fields) - 1 else f"(?P<{name}>.*?)")
        pos = m.end()
    parts.append(re.escape(fmt[pos:]))
    return re.compile("".join(parts) + r"\Z"), kinds


_COMPILED = {name: _compile(fmt) for name, (fmt, _) in EVENTS.items()}
# Per event: the compiled text pattern, and its fields as (name, base) with base 16, 10 or 0 (a string).
_PARSERS: dict[str, tuple[re.Pattern[str], tuple[tuple[str, int], ...]]] = {
    name: (rx, tuple((k, 16 if kind == "x" else 10 if kind == "d" else 0) for k, kind in kinds.items()))
    for name, (rx, kinds) in _COMPILED.items()}
# The log backend prints "name " + text: an empty format leaves a trailing space.
_EMPTY = frozenset(name for name, (fmt, _) in EVENTS.items() if not fmt)

_HEAD_72 = re.compile(r"\d+@\d+\.\d+\Z")
_LINE_101 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?) "
                       r"([A-Za-z_][A-Za-z0-9_]*)(?: (.*))?\Z")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TRACE_PREFIXES = ("vtd_", "x86_iommu_")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MEMO = 4096


@dataclass(slots=True)
class LogEvent:
    """One known trace event: its line number, name, fields (ints for hex/decimal fields; shared between
    events of the same text, so read-only) and the line's timestamp text (``stamp``; None without one)."""

    line: int
    name: str
    args: dict[str, Any]
    stamp: str | None = None

    @property
    def ts(self) -> float | None:
        """Seconds since the epoch of the line's timestamp."""
        st = self.stamp
        if st is None:
            return None
        if "@" in st:
            sec = st.split("@", 1)[1]
            whole, _, frac = sec.partition(".")
            return int(whole) + int(frac or 0) / 10 ** len(frac or "0")
        return _iso_seconds(st)

    @property
    def pid(self) -> int | None:
        """The QEMU process id of a 7.2-style line."""
        st = self.stamp
        return int(st.split("@", 1)[0]) if st is not None and "@" in st else None


@dataclass
class LogSummary:
    """What a parse or import met: lines by kind, unknown events by name, what each known event became."""

    lines: int = 0
    trace_lines: int = 0
    other_lines: int = 0
    styles: Counter[str] = field(default_factory=Counter)
    unknown: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    converted: Counter[str] = field(default_factory=Counter)
    informational: Counter[str] = field(default_factory=Counter)
    descriptors: int = 0
    reconstruction: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "trace_lines": self.trace_lines, "other_lines": self.other_lines,
                "styles": dict(self.styles), "unknown_events": dict(self.unknown), "events": dict(self.events),
                "converted": dict(self.converted), "informational": dict(self.informational),
                "descriptors_reconstructed": self.descriptors, "reconstruction": dict(self.reconstruction),
                "notes": self.notes}


def open_log(path: str | Path) -> IO[str]:
    """The log as a text stream: a plain file, or a zstd-compressed one (by its magic number), decoded
    as it is read.  Undecodable bytes become U+FFFD (QEMU messages may carry anything)."""
    p = Path(path)
    try:
        fh = p.open("rb")
    except OSError as exc:
        raise TraceError(str(p), "", f"cannot read: {exc.strerror}") from None
    magic = fh.read(4)
    fh.seek(0)
    raw: IO[bytes] = fh
    if magic == _ZSTD_MAGIC:
        try:
            import zstandard
        except ImportError:
            fh.close()
            raise TraceError(str(p), "", "a zstd-compressed log needs the zstandard package "
                                         "(pip install 'vtd-emu[zstd]')") from None
        # max_window_size: logs compressed with --long (up to 2 GiB windows) decode too.
        raw = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(fh, closefd=True)  # type: ignore[assignment]
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=None)  # type: ignore[arg-type]


def iter_log(lines: Iterable[str], file: str = "<log>", summary: LogSummary | None = None,
             args_for: frozenset[str] | None = None,
             check: Callable[[int, str, dict[str, Any]], None] | None = None) -> Iterator[LogEvent]:
    """Every known trace event of ``lines``, in order; ``summary`` (if given) counts what was met.
    ``args_for``: the events wanted (None: all); the others are checked and counted in ``summary.events``
    only.  ``check(line, name, fields)`` is called once for each distinct text of a wanted event (it
    raises to refuse one)."""
    s = summary if summary is not None else LogSummary()
    # Lines repeat (the same interrupt, the same cached context, the same page hit): a text (the line
    # after its timestamp) seen recently has already been matched and converted, so one probe gives its
    # event and fields (shared, never mutated by consumers).
    memo: dict[str, tuple[str, bool, dict[str, Any]]] = {}
    wanted = {name: args_for is None or name in args_for for name in _PARSERS}
    parsers, empty = _PARSERS, _EMPTY
    head72 = _HEAD_72.match
    # Counted in locals, added to the summary when the stream ends (however it ends).
    per_style = {"7.2": 0, "10.1": 0, "bare": 0}
    per_event: dict[str, int] = {}
    n = 0
    try:
        for n, raw in enumerate(lines, 1):
            line = raw.rstrip("\r\n")
            head, sep, rest = line.partition(":")
            # PID@SEC.USEC before the first colon.
            if sep and head72(head):
                stamp: str | None = head
                hit = memo.get(rest)
                if hit is not None:
                    name = hit[0]
                    per_style["7.2"] += 1
                    per_event[name] += 1
                    if hit[1]:
                        yield LogEvent(n, name, hit[2], stamp)
                    continue
                name, _, body = rest.partition(" ")
                style = "7.2"
            else:
                m = _LINE_101.match(line)
                if m:
                    stamp, name, body, style = m.group(1), m.group(2), m.group(3) or "", "10.1"
                else:
                    name, _, body = line.partition(" ")
                    if not name.startswith(_TRACE_PREFIXES) or not _NAME.match(name):
                        s.other_lines += 1
                        continue
                    stamp, style = None, "bare"
                rest = f"{name} {body}"
                hit = memo.get(rest)
            if hit is None:
                p = parsers.get(name)
                if p is None:
                    if style != "bare" and _NAME.match(name) or name.startswith(_TRACE_PREFIXES):
                        s.unknown[name] += 1
                        per_style[style] += 1
                    else:
                        s.other_lines += 1
                    continue
                mm = p[0].match(body.rstrip(" ") if name in empty else body)
                if mm is None:
                    raise TraceError(file, f"line {n}", f"{name}: expected text like {EVENTS[name][0]!r}, "
                                                        f"got {body!r}")
                args: dict[str, Any] = {}
                want = wanted[name]
                if want:
                    for (key, base), v in zip(p[1], mm.groups()):
                        args[key] = int(v, base) if base else v
                    if check is not None:
                        check(n, name, args)
                if len(memo) >= _MEMO:
                    memo.clear()
                hit = memo[rest] = (name, want, args)
            per_style[style] += 1
            per_event[name] = per_event.get(name, 0) + 1
            if hit[1]:
                yield LogEvent(n, name, hit[2], stamp)
    finally:
        s.lines += n
        s.trace_lines += sum(per_style.values())
        s.styles.update({st: c for st, c in per_style.items() if c})
        s.events.update(per_event)


def parse_log(text: str, file: str = "<log>") -> tuple[list[LogEvent], LogSummary]:
    """Every known trace event of a log held in memory, in order, with its arguments (small logs, tests)."""
    s = LogSummary()
    return list(iter_log(text.splitlines(), file, s)), s


def _iso_seconds(stamp: str) -> float:
    from datetime import datetime

    st = stamp.replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(st).timestamp()
    except ValueError:
        return 0.0
