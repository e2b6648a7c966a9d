"""Import QEMU ``-trace 'vtd_*'`` logs (log backend) into ``vtd-trace/1``.

Line styles (``shared/reference/qemu-model.md`` §6.1):

* QEMU 7.2 … 10.0 with ``-msg timestamp=on``: ``PID@SEC.USEC:event_name text``;
* QEMU 10.1 and later with timestamps: ``2025-09-01T12:34:56.123456Z event_name text``;
* without timestamps: ``event_name text``.

``text`` follows the event's format string (§6.2, transcribed in :data:`EVENTS`).  Lines that are not
trace lines (QEMU messages, qtest chatter) are counted and skipped; trace events this module does not
know (other subsystems, newer QEMUs) are counted by name and skipped; a known event whose text does not
match its format is an error naming the line.

What becomes what:

* ``vtd_reg_write`` → ``mmio_write`` (same offset, size, value); ``vtd_reg_read`` → ``mmio_read``.
* ``vtd_inv_desc`` (which prints the whole 128-bit descriptor) → the descriptor is written into the queue
  memory, at the head QEMU was fetching from, *before* the register write that made QEMU fetch it (the
  queue's contents are not otherwise in the log).  ``vtd_inv_desc_*`` details become the note of that
  register write.  Descriptor types QEMU 7.2 does not trace (PASID-cache, PASID-IOTLB) cannot be
  reconstructed; replay then needs them in the RAM image.
* Root / translation / queue / interrupt-remapping setup (``vtd_reg_dmar_root``, ``vtd_dmar_enable``,
  ``vtd_inv_qi_enable``, ``vtd_ir_enable``) → register expectations (RTADDR, GSTS bits) on the register
  write that caused them; ``vtd_reg_ir_root`` → a note.
* ``vtd_dmar_translate`` (with the ``vtd_iotlb_page_hit/update`` before it) → a 4-byte ``dma`` read of the
  page expecting the output address; ``vtd_translate_pt`` likewise (identity); ``vtd_dmar_fault`` → a
  4-byte ``dma`` of the faulting address in the logged direction expecting that fault.  Consecutive
  identical lines (QEMU's memory core retries a faulting access in 4-byte steps) become one DMA.
* ``vtd_frr_new`` → expectations of the fault recording register (with F set, which QEMU does right after
  printing) on the DMA that caused it.
* Everything else QEMU prints about its internals (page walks, context cache, address-space switches,
  interrupt remapping) is informational and counted.

The log does not contain guest memory: give the RAM image (``--ram``, e.g. from ``pmemsave``) so the
translation structures exist when the trace replays.

Everything the import writes is what ``replay`` accepts: a logged value that does not fit the trace field
it becomes (a 32-bit number as a 16-bit source id, an access size of 3) is a
:class:`~vtd_emu.errors.TraceError` naming the log file and line, and so is a log with no VT-d trace line
at all (the wrong file, or QEMU started without ``-trace 'vtd_*'``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TraceError
from ..spec.consts import FRCD, GSTS, IQA, RTADDR
from ..spec.loader import specs
from ..trace.model import Event, Trace, TraceConfig, event_to_dict, parse_event

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

_LINE_72 = re.compile(r"(\d+)@(\d+)\.(\d+):([A-Za-z_][A-Za-z0-9_]*)(?: (.*))?\Z")
_LINE_101 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?) "
                       r"([A-Za-z_][A-Za-z0-9_]*)(?: (.*))?\Z")
_LINE_BARE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?: (.*))?\Z")
_TRACE_PREFIXES = ("vtd_", "x86_iommu_")


@dataclass(slots=True)
class LogEvent:
    line: int
    name: str
    args: dict[str, Any]
    ts: float | None = None
    pid: int | None = None


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
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "trace_lines": self.trace_lines, "other_lines": self.other_lines,
                "styles": dict(self.styles), "unknown_events": dict(self.unknown), "events": dict(self.events),
                "converted": dict(self.converted), "informational": dict(self.informational),
                "descriptors_reconstructed": self.descriptors, "notes": self.notes}


def parse_log(text: str, file: str = "<log>") -> tuple[list[LogEvent], LogSummary]:
    """Every known trace event of a log, in order, with its arguments (ints for hex/decimal fields)."""
    out: list[LogEvent] = []
    s = LogSummary()
    for n, raw in enumerate(text.splitlines(), 1):
        s.lines += 1
        line = raw.rstrip("\r\n")
        ts: float | None = None
        pid: int | None = None
        m = _LINE_72.match(line)
        if m:
            pid, ts = int(m.group(1)), int(m.group(2)) + int(m.group(3)) / 1e6
            name, body, style = m.group(4), m.group(5) or "", "7.2"
        else:
            m = _LINE_101.match(line)
            if m:
                name, body, style = m.group(2), m.group(3) or "", "10.1"
                ts = _iso_seconds(m.group(1))
            else:
                m = _LINE_BARE.match(line)
                if not m or not m.group(1).startswith(_TRACE_PREFIXES):
                    s.other_lines += 1
                    continue
                name, body, style = m.group(1), m.group(2) or "", "bare"
        if name not in _COMPILED:
            if name.startswith(_TRACE_PREFIXES) or style != "bare":
                s.unknown[name] += 1
                s.trace_lines += 1
                s.styles[style] += 1
            else:
                s.other_lines += 1
            continue
        s.trace_lines += 1
        s.styles[style] += 1
        rx, kinds = _COMPILED[name]
        # The log backend prints "name " + text: an empty format leaves a trailing space.
        mm = rx.match(body.rstrip(" ") if not EVENTS[name][0] else body)
        if mm is None:
            raise TraceError(file, f"line {n}", f"{name}: expected text like {EVENTS[name][0]!r}, got {body!r}")
        args: dict[str, Any] = {}
        for k, v in mm.groupdict().items():
            kind = kinds[k]
            args[k] = int(v, 16) if kind == "x" else int(v) if kind == "d" else v
        s.events[name] += 1
        out.append(LogEvent(n, name, args, ts, pid))
    return out, s


def _iso_seconds(stamp: str) -> float:
    from datetime import datetime

    st = stamp.replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(st).timestamp()
    except ValueError:
        return 0.0


# -- conversion ----------------------------------------------------------------------------------------


# Fixed offsets (the CAP/ECAP values only place the FRCD and IOTLB registers).
_RTADDR, _GSTS, _IQA = (specs().registers[n].resolve_offset(0, 0) for n in ("RTADDR", "GSTS", "IQA"))
_TES, _QIES, _IRES = GSTS.TES, GSTS.QIES, GSTS.IRES
_RTADDR_CHECKED = RTADDR.RTA | RTADDR.TTM   # what vtd_reg_dmar_root tells: the address and the mode
_FRCD_F = FRCD.qword("F")[1]                # F in the record's high qword
_U64 = (1 << 64) - 1

# Widths of the logged fields that become trace fields: a value beyond them is not something QEMU prints,
# and would make a trace replay refuses.
_WIDTHS: dict[str, dict[str, int]] = {
    "vtd_inv_desc": {"lo": 64, "hi": 64},
    "vtd_reg_write": {"addr": 32, "size": 4, "val": 64},
    "vtd_reg_read": {"addr": 32, "size": 4},
    "vtd_reg_dmar_root": {"addr": 64, "scalable": 1},
    "vtd_inv_qi_enable": {"enable": 1},
    "vtd_dmar_enable": {"en": 1},
    "vtd_ir_enable": {"en": 1},
    "vtd_dmar_translate": {"bus": 8, "slot": 5, "func": 3, "iova": 64, "gpa": 64, "mask": 64},
    "vtd_translate_pt": {"sid": 16, "addr": 64},
    "vtd_dmar_fault": {"sid": 16, "fault": 8, "addr": 64, "is_write": 1},
    "vtd_frr_new": {"index": 16, "hi": 64, "lo": 64},
}
_INFORMATIONAL = {
    "vtd_inv_qi_setup", "vtd_inv_qi_head", "vtd_inv_qi_tail", "vtd_inv_qi_fetch", "vtd_context_cache_reset",
    "vtd_pasid_cache_reset", "vtd_re_not_present", "vtd_ce_not_present", "vtd_iotlb_cc_hit", "vtd_iotlb_cc_update",
    "vtd_iotlb_reset", "vtd_fault_disabled", "vtd_replay_ce_valid", "vtd_replay_ce_invalid", "vtd_page_walk_level",
    "vtd_page_walk_one", "vtd_page_walk_one_skip_map", "vtd_page_walk_one_skip_unmap", "vtd_page_walk_skip_read",
    "vtd_page_walk_skip_reserve", "vtd_switch_address_space", "vtd_as_unmap_whole", "vtd_pt_enable_fast_path",
    "vtd_irq_generate", "vtd_reg_write_gcmd", "vtd_reg_write_fectl", "vtd_reg_write_iectl", "vtd_reg_ics_clear_ip",
    "vtd_ir_irte_get", "vtd_ir_remap", "vtd_ir_remap_type", "vtd_ir_remap_msi", "vtd_ir_remap_msi_req",
    "vtd_fsts_ppf", "vtd_fsts_clear_ip", "vtd_warn_invalid_qi_tail", "vtd_warn_ir_vector", "vtd_warn_ir_trigger",
    "vtd_reset_exit", "vtd_device_attach_hwpt", "vtd_device_detach_hwpt", "vtd_device_reattach_def_hwpt",
    "vtd_iotlb_page_hit", "vtd_iotlb_page_update", "x86_iommu_iec_notify",
}
_INV_DETAIL = {"vtd_inv_desc_cc_domain", "vtd_inv_desc_cc_global", "vtd_inv_desc_cc_device",
               "vtd_inv_desc_cc_devices", "vtd_inv_desc_iotlb_global", "vtd_inv_desc_iotlb_domain",
               "vtd_inv_desc_iotlb_pages", "vtd_inv_desc_iotlb_pasid_pages", "vtd_inv_desc_iotlb_pasid",
               "vtd_inv_desc_wait_sw", "vtd_inv_desc_wait_irq", "vtd_inv_desc_wait_write_fail", "vtd_inv_desc_iec",
               "vtd_inv_desc_pasid_cache_gsi", "vtd_inv_desc_pasid_cache_dsi", "vtd_inv_desc_pasid_cache_psi",
               "vtd_pasid_cache_devsi"}


class _Converter:
    def __init__(self, file: str, frcd_base: int, frcd_count: int) -> None:
        self.file = file
        self.events: list[Event] = []
        self.frcd_base = frcd_base
        self.frcd_count = frcd_count
        self.last_reg: Event | None = None        # the register write QEMU's reactions belong to
        self.last_reg_pos = 0
        self.last_dma: Event | None = None
        self.iqa = 0
        self.head = 0
        self.pending_desc: list[tuple[int, int]] = []
        self.dma_key: tuple[Any, ...] | None = None
        self.s = LogSummary()

    def _add_note(self, ev: Event, text: str) -> None:
        ev.note = text if not ev.note else f"{ev.note}; {text}"

    def _expect_reg(self, ev: Event, off: int, value: int, mask: int) -> None:
        exp = ev.expect if ev.expect is not None else {}
        regs = exp.setdefault("regs", {})
        old = regs.get(off)
        if old is not None:
            v0, m0 = old
            value, mask = (v0 & m0 & ~mask) | (value & mask), m0 | mask
        regs[off] = (value & mask, mask)
        ev.expect = exp

    def _flush_desc(self) -> None:
        """Insert the descriptors QEMU fetched during the last register write before that write."""
        if not self.pending_desc or self.last_reg is None:
            self.pending_desc.clear()
            return
        base = self.iqa & IQA.IQA
        slot = 32 if self.iqa & IQA.DW else 16
        qbytes = 4096 << (self.iqa & IQA.QS)
        idx = self.last_reg_pos
        ins: list[Event] = []
        for lo, hi in self.pending_desc:
            qw = [lo, hi] + ([0, 0] if slot == 32 else [])
            ins.append(Event("mem_write", {"addr": base + self.head, "qwords": qw},
                             note="invalidation descriptor (from vtd_inv_desc)", where=self.last_reg.where))
            self.head = (self.head + slot) % qbytes
            self.s.descriptors += 1
        self.events[idx:idx] = ins
        self.last_reg_pos += len(ins)
        self.pending_desc.clear()

    def _bad(self, ev: LogEvent, what: str) -> TraceError:
        return TraceError(self.file, f"line {ev.line}", f"{ev.name}: {what}")

    def _validate(self, ev: LogEvent) -> None:
        for k, bits in _WIDTHS.get(ev.name, {}).items():
            v = ev.args[k]
            if v < 0 or v >> bits:
                raise self._bad(ev, f"{k} {v:#x} does not fit: expected a {bits}-bit value")
        a = ev.args
        if ev.name in ("vtd_reg_write", "vtd_reg_read") and a["size"] not in (1, 2, 4, 8):
            raise self._bad(ev, f"size {a['size']:#x}: expected an access size of 1, 2, 4 or 8 bytes")
        if ev.name == "vtd_reg_write" and a["val"] >> (8 * a["size"]):
            raise self._bad(ev, f"value {a['val']:#x} does not fit a {a['size']}-byte access")
        if ev.name == "vtd_frr_new" and a["index"] >= self.frcd_count:
            raise self._bad(ev, f"index {a['index']}: expected 0..{self.frcd_count - 1} (this unit has "
                                f"{self.frcd_count} fault recording registers)")

    def feed(self, ev: LogEvent) -> None:
        self._validate(ev)
        name, a, where = ev.name, ev.args, f"log line {ev.line}"
        s = self.s
        if name == "vtd_inv_desc":
            self.pending_desc.append((a["lo"], a["hi"]))
            s.converted[name] += 1
            return
        if name in _INV_DETAIL:
            if self.last_reg is not None:
                self._add_note(self.last_reg, f"{name[4:]}: {_text(name, a)}")
            s.converted[name] += 1
            return
        if name == "vtd_reg_write":
            self._flush_desc()
            off, size, val = a["addr"], a["size"], a["val"]
            e = Event("mmio_write", {"offset": off, "value": val, "size": size}, where=where)
            self.last_reg_pos = len(self.events)
            self.events.append(e)
            self.last_reg = e
            self.dma_key = None
            if off == _IQA and size == 8:
                self.iqa = val
            elif off == _IQA and size == 4:
                self.iqa = (self.iqa & ~0xFFFF_FFFF) | val
            elif off == _IQA + 4 and size == 4:
                self.iqa = (self.iqa & 0xFFFF_FFFF) | val << 32
            s.converted[name] += 1
            return
        if name == "vtd_reg_read":
            self._flush_desc()
            self.events.append(Event("mmio_read", {"offset": a["addr"], "size": a["size"]}, where=where))
            self.dma_key = None
            s.converted[name] += 1
            return
        if name == "vtd_inv_qi_enable":
            self.head = 0
            if self.last_reg is not None:
                self._expect_reg(self.last_reg, _GSTS, _QIES if a["enable"] else 0, _QIES)
            s.converted[name] += 1
            return
        if name == "vtd_reg_dmar_root" and self.last_reg is not None:
            self._expect_reg(self.last_reg, _RTADDR, a["addr"] | a["scalable"] << RTADDR.TTM_LO, _RTADDR_CHECKED)
            s.converted[name] += 1
            return
        if name == "vtd_dmar_enable" and self.last_reg is not None:
            self._expect_reg(self.last_reg, _GSTS, _TES if a["en"] else 0, _TES)
            s.converted[name] += 1
            return
        if name == "vtd_ir_enable" and self.last_reg is not None:
            self._expect_reg(self.last_reg, _GSTS, _IRES if a["en"] else 0, _IRES)
            s.converted[name] += 1
            return
        if name == "vtd_reg_ir_root" and self.last_reg is not None:
            self._add_note(self.last_reg, f"interrupt remapping table at {a['addr']:#x}, {a['size']:#x} entries")
            s.converted[name] += 1
            return
        if name in ("vtd_dmar_translate", "vtd_translate_pt", "vtd_dmar_fault"):
            self._flush_desc()
            self._dma(name, a, where)
            s.converted[name] += 1
            return
        if name == "vtd_frr_new" and self.last_dma is not None:
            off = self.frcd_base + 16 * a["index"]
            self._expect_reg(self.last_dma, off, a["lo"], _U64)
            # QEMU prints the record before it sets F (bit 127 of the FRCD), which it always does next.
            self._expect_reg(self.last_dma, off + 8, a["hi"] | _FRCD_F, _U64)
            s.converted[name] += 1
            return
        s.informational[name] += 1

    def _dma(self, name: str, a: dict[str, Any], where: str) -> None:
        if name == "vtd_dmar_translate":
            sid = a["bus"] << 8 | a["slot"] << 3 | a["func"]
            iova, write, expect = a["iova"], False, {"faults": [], "addrs": [a["gpa"] | (a["iova"] & a["mask"])]}
        elif name == "vtd_translate_pt":
            sid, iova, write = a["sid"], a["addr"], False
            expect = {"faults": [], "addrs": [a["addr"]]}
        else:
            sid, iova, write = a["sid"], a["addr"], bool(a["is_write"])
            expect = {"faults": [a["fault"]], "addrs": [None]}
        key = (name, sid, iova >> 12, write, a.get("fault"))
        if key == self.dma_key:
            # QEMU retries the rest of a faulting access in 4-byte steps; repeats add nothing to replay.
            return
        self.dma_key = key
        length = min(4, 4096 - (iova & 0xFFF))
        f: dict[str, Any] = {"sid": sid, "pasid": None, "iova": iova, "len": length,
                             "dir": "write" if write else "read", "priv": False}
        if write:
            f["data"] = bytes(length)
        e = Event("dma", f, expect, f"from {name}", where)
        self.events.append(e)
        self.last_dma = e

    def finish(self) -> list[Event]:
        self._flush_desc()
        for e in self.events:
            # The events go through the trace loader's own checks, so an import never writes what replay
            # would refuse; what was wrong is told against the log line the event came from.
            try:
                parse_event(event_to_dict(e), self.file, e.where)
            except TraceError as exc:
                raise TraceError(self.file, e.where.removeprefix("log "), exc.message) from None
        return self.events


def _text(name: str, a: dict[str, Any]) -> str:
    """The event's text again (as QEMU printed it), for notes."""
    def field_text(m: re.Match[str]) -> str:
        v = a[m.group(1)]
        return format(v, (m.group(2) or "") + m.group(3)) if m.group(3) else str(v)

    return _FIELD.sub(field_text, EVENTS[name][0])


def import_log(path: str | Path, *, ram: str | Path | None = None, out: str | Path | None = None,
               qemu: dict[str, Any] | None = None, preset: str | None = None, profile: str | None = None,
               ram_size: int | None = None) -> tuple[Trace, LogSummary]:
    """A trace of the log (see the module docstring); ``ram`` is stored relative to ``out``'s folder."""
    p = Path(path)
    try:
        text = p.read_text(errors="replace")
    except OSError as exc:
        raise TraceError(str(p), "", f"cannot read: {exc.strerror}") from None
    evs, summary = parse_log(text, str(p))
    if not evs:
        raise TraceError(str(p), "", f"no VT-d trace line in {summary.lines} line(s): expected QEMU "
                                     "-trace 'vtd_*' output such as 'PID@SEC.USEC:vtd_reg_write addr 0x20 "
                                     "size 0x8 value 0x100000'")
    if ram_size is not None and not 1 <= ram_size <= 1 << 64:
        raise TraceError(str(p), "ram_size", f"expected a memory size in 1..2**64 bytes, got {ram_size}")
    if preset is not None and qemu is not None:
        raise TraceError(str(p), "", "give QEMU options or a preset, not both")
    opts = dict(qemu or {})
    if preset is None:
        # What the log itself tells: a scalable root table means the unit was x-scalable-mode=on.
        if any(e.name == "vtd_reg_dmar_root" and e.args.get("scalable") for e in evs):
            opts.setdefault("scalable_mode", True)
        cfg = TraceConfig(preset=None, qemu=opts, profile=profile)
    else:
        cfg = TraceConfig(preset=preset, profile=profile)
    from ..trace.replay import unit_config

    vc = unit_config(cfg, None, str(p))
    conv = _Converter(str(p), vc.cap_field("FRO") * 16, vc.cap_field("NFR") + 1)
    for e in evs:
        conv.feed(e)
    events = conv.finish()
    s = conv.s
    s.lines, s.trace_lines, s.other_lines = summary.lines, summary.trace_lines, summary.other_lines
    s.styles, s.unknown, s.events = summary.styles, summary.unknown, summary.events
    if ram is not None:
        rp = Path(ram)
        if out is not None:
            try:
                import os

                cfg.ram_image = os.path.relpath(rp.resolve(), Path(out).resolve().parent)
            except ValueError:
                cfg.ram_image = str(rp.resolve())
        else:
            cfg.ram_image = str(rp)
        if ram_size is None:
            try:
                ram_size = _image_size(rp)
            except OSError as exc:
                raise TraceError(str(rp), "", f"cannot read RAM image: {exc.strerror}") from None
            if not 1 <= ram_size <= 1 << 64:
                raise TraceError(str(rp), "", f"a RAM image of {ram_size} bytes: expected 1..2**64 bytes "
                                              "(give --ram-size)")
    else:
        s.notes.append("no RAM image: the translation structures are not in the log, so DMA expectations "
                       "only hold if the trace gets memory some other way")
    cfg.ram_size = ram_size
    desc = (f"imported from {p.name}: {sum(s.converted.values())} QEMU trace events converted, "
            f"{sum(s.informational.values())} informational, {sum(s.unknown.values())} unknown")
    return Trace(cfg, list(events), p.stem, desc, str(out or p)), s


def _image_size(p: Path) -> int:
    with p.open("rb") as fh:
        magic = fh.read(4)
    if magic == b"\x28\xb5\x2f\xfd":
        import zstandard

        with p.open("rb") as fh:
            params = zstandard.get_frame_parameters(fh.read(64))
        if params.content_size > 0:
            return int(params.content_size)
        from ..ramimage import load_ram_image

        return load_ram_image(p).pages_used * 4096
    return p.stat().st_size
