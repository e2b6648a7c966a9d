"""Parsed QEMU log events → ``vtd-trace/1`` events, streamed (the package docstring says what becomes what)."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from ...errors import TraceError
from ...memory import HostRAM
from ...spec.consts import FRCD, GSTS, IQA, RTADDR
from ...spec.loader import specs
from ...trace.model import Event, Trace, TraceConfig, event_to_dict, parse_event, write_jsonl
from .parse import _FIELD, EVENTS, LogEvent, LogSummary, iter_log, open_log
from .reconstruct import Reconstructor

# Fixed offsets (the CAP/ECAP values only place the FRCD and IOTLB registers).
_RTADDR, _GSTS, _IQA = (specs().registers[n].resolve_offset(0, 0) for n in ("RTADDR", "GSTS", "IQA"))
_TES, _QIES, _IRES = GSTS.TES, GSTS.QIES, GSTS.IRES
_RTADDR_CHECKED = RTADDR.RTA | RTADDR.TTM   # what vtd_reg_dmar_root tells: the address and the mode
_FRCD_F = FRCD.qword("F")[1]                # F in the record's high qword
_FRCD_FR_HI, _FRCD_FR_SHIFT = FRCD.qword("FR")[1], FRCD.FR_LO - 64
_U64 = (1 << 64) - 1

# Widths of the logged fields that become trace fields: a value beyond them is not something QEMU prints,
# and would make a trace replay refuses.
_WIDTHS: dict[str, dict[str, int]] = {
    "vtd_inv_desc": {"lo": 64, "hi": 64},
    "vtd_reg_write": {"addr": 32, "size": 4, "val": 64},
    "vtd_reg_read": {"addr": 32, "size": 4},
    "vtd_reg_dmar_root": {"addr": 64, "scalable": 1},
    "vtd_reg_ir_root": {"addr": 64},
    "vtd_inv_qi_enable": {"enable": 1},
    "vtd_dmar_enable": {"en": 1},
    "vtd_ir_enable": {"en": 1},
    "vtd_dmar_translate": {"bus": 8, "slot": 5, "func": 3, "iova": 64, "gpa": 64, "mask": 64},
    "vtd_translate_pt": {"sid": 16, "addr": 64},
    "vtd_dmar_fault": {"sid": 16, "fault": 8, "addr": 64, "is_write": 1},
    "vtd_frr_new": {"index": 16, "hi": 64, "lo": 64},
    "vtd_iotlb_page_update": {"sid": 16, "addr": 64, "slpte": 64},
    "vtd_iotlb_page_hit": {"sid": 16, "addr": 64, "slpte": 64},
    "vtd_iotlb_cc_update": {"bus": 8, "devfn": 8, "high": 64, "low": 64},
    "vtd_iotlb_cc_hit": {"bus": 8, "devfn": 8, "high": 64, "low": 64},
    "vtd_ir_irte_get": {"index": 16, "lo": 64, "hi": 64},
    "vtd_ir_remap_msi_req": {"addr": 64, "data": 32},
    "vtd_ir_remap_msi": {"addr": 64, "data": 32, "addr2": 64, "data2": 64},
    "vtd_inv_desc_wait_sw": {"addr": 64},
}
_LIMITS = {name: tuple((k, 1 << bits) for k, bits in w.items()) for name, w in _WIDTHS.items()}
_INV_DETAIL = {"vtd_inv_desc_cc_domain", "vtd_inv_desc_cc_global", "vtd_inv_desc_cc_device",
               "vtd_inv_desc_cc_devices", "vtd_inv_desc_iotlb_global", "vtd_inv_desc_iotlb_domain",
               "vtd_inv_desc_iotlb_pages", "vtd_inv_desc_iotlb_pasid_pages", "vtd_inv_desc_iotlb_pasid",
               "vtd_inv_desc_wait_sw", "vtd_inv_desc_wait_irq", "vtd_inv_desc_wait_write_fail", "vtd_inv_desc_iec",
               "vtd_inv_desc_pasid_cache_gsi", "vtd_inv_desc_pasid_cache_dsi", "vtd_inv_desc_pasid_cache_psi",
               "vtd_pasid_cache_devsi"}
_CONVERTED = frozenset({
    "vtd_inv_desc", "vtd_reg_write", "vtd_reg_read", "vtd_inv_qi_enable", "vtd_reg_dmar_root", "vtd_dmar_enable",
    "vtd_ir_enable", "vtd_reg_ir_root", "vtd_dmar_translate", "vtd_translate_pt", "vtd_dmar_fault", "vtd_frr_new",
    "vtd_iotlb_page_update", "vtd_iotlb_page_hit", "vtd_iotlb_cc_update", "vtd_iotlb_cc_hit", "vtd_ir_irte_get",
    "vtd_ir_remap_msi_req", "vtd_ir_remap_msi"}) | _INV_DETAIL
"""The events whose fields the import uses (the others are only counted, as informational)."""

Progress = Callable[[int], None]
"""Called with the number of log lines read so far."""
PROGRESS_LINES = 1 << 16
_HOLD_LIMIT = 4096
_MAX_NOTES = 20
"""QEMU prints the descriptors a register write made it fetch right after that write (other threads may
interleave a few lines): after this many events the write is no longer held for them."""


class _Converter:
    def __init__(self, file: str, frcd_base: int, frcd_count: int, rec: Reconstructor) -> None:
        self.file = file
        self.frcd_base = frcd_base
        self.frcd_count = frcd_count
        self.rec = rec
        self.ready: list[Event] = []
        # The last register write and what followed it: descriptors QEMU fetched because of that write are
        # inserted before it, so it is held until the next register access or DMA.
        self.held: list[Event] = []
        self.last_reg: Event | None = None
        self.last_check: Event | None = None      # the DMA or MSI a vtd_frr_new belongs to
        self.iqa = 0
        self.head = 0
        self.pending_desc: list[tuple[int, int]] = []
        self.fault_key: tuple[Any, ...] | None = None
        # vtd_iotlb_page_update/_hit before a vtd_dmar_translate: (sid, iova, leaf, walked, domain)
        self.leaf: tuple[int, int, int, bool, int] | None = None
        # vtd_ir_remap_msi_req not yet answered: [addr, data, irte (lo, hi) or None]
        self.msi: list[Any] | None = None
        self.s = LogSummary()
        self.unused: Counter[str] = Counter()     # events of _CONVERTED that turned out to change nothing

    # -- output ------------------------------------------------------------------------------------
    def take(self) -> list[Event]:
        out, self.ready = self.ready, []
        return out

    def _emit(self, ev: Event) -> None:
        if not self.held:
            self.ready.append(ev)
            return
        self.held.append(ev)
        if len(self.held) > _HOLD_LIMIT:
            self._release()

    def _release(self) -> None:
        self._flush_desc()
        if self.held:
            self.ready.extend(self.held)
            self.held = []

    def _checked(self, ev: Event) -> Event:
        # Events built from cold-path values go through the trace loader's own checks, so an import never
        # writes what replay would refuse; what was wrong is told against the log line the event came from.
        try:
            parse_event(event_to_dict(ev), self.file, ev.where)
        except TraceError as exc:
            raise TraceError(self.file, ev.where.removeprefix("log "), exc.message) from None
        return ev

    def _memory_writes(self, where: str) -> None:
        for addr, value in self.rec.take():
            self._emit(Event("mem_write", {"addr": addr, "qwords": [value]}, where=where))

    # -- helpers ---------------------------------------------------------------------------------------
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
        if not self.pending_desc:
            return
        if not self.held:
            self.pending_desc.clear()
            return
        base = self.iqa & IQA.IQA
        slot = 32 if self.iqa & IQA.DW else 16
        qbytes = 4096 << (self.iqa & IQA.QS)
        where = self.held[0].where
        ins: list[Event] = []
        for lo, hi in self.pending_desc:
            qw = [lo, hi] + ([0, 0] if slot == 32 else [])
            ins.append(Event("mem_write", {"addr": base + self.head, "qwords": qw},
                             note="invalidation descriptor (from vtd_inv_desc)", where=where))
            self.rec.note_write(base + self.head, qw)
            self.head = (self.head + slot) % qbytes
            self.s.descriptors += 1
        self.ready.extend(ins)
        self.pending_desc.clear()

    def _bad(self, line: int, name: str, what: str) -> TraceError:
        return TraceError(self.file, f"line {line}", f"{name}: {what}")

    # -- events --------------------------------------------------------------------------------------
    def check(self, line: int, name: str, a: dict[str, Any]) -> None:
        """What replay would refuse, refused naming the line (the parser calls this once per distinct text)."""
        for k, limit in _LIMITS.get(name, ()):
            if not 0 <= a[k] < limit:
                raise self._bad(line, name, f"{k} {a[k]:#x} does not fit: expected a {limit.bit_length() - 1}-bit "
                                            "value")
        if name in ("vtd_reg_write", "vtd_reg_read") and a["size"] not in (1, 2, 4, 8):
            raise self._bad(line, name, f"size {a['size']:#x}: expected an access size of 1, 2, 4 or 8 bytes")
        if name == "vtd_reg_write" and a["val"] >> (8 * a["size"]):
            raise self._bad(line, name, f"value {a['val']:#x} does not fit a {a['size']}-byte access")
        if name == "vtd_frr_new" and a["index"] >= self.frcd_count:
            raise self._bad(line, name, f"index {a['index']}: expected 0..{self.frcd_count - 1} (this unit has "
                                        f"{self.frcd_count} fault recording registers)")

    def feed(self, ev: LogEvent) -> None:
        """One event of :data:`_CONVERTED`, its fields already passed :meth:`check`."""
        name = ev.name
        a = ev.args
        if name == "vtd_iotlb_page_hit" or name == "vtd_iotlb_page_update":
            self.leaf = (a["sid"], a["addr"], a["slpte"], name == "vtd_iotlb_page_update", a["domain"])
            return
        if name == "vtd_dmar_translate":
            self._translate(a, ev.line)
            return
        if name == "vtd_iotlb_cc_hit" or name == "vtd_iotlb_cc_update":
            self.rec.context(a["bus"] << 8 | a["devfn"], a["low"], a["high"])
            return
        if name == "vtd_ir_remap_msi_req":
            if self.msi is not None:
                self._msi_done(None, ev.line)
            self.msi = [a["addr"], a["data"], None]
            return
        if name == "vtd_ir_irte_get":
            # QEMU passes the IRTE's qwords swapped (trace_vtd_ir_irte_get(index, data[1], data[0])): what
            # it prints as "low" is bits 127:64 (SID, SQ, SVT), "high" bits 63:0 (P, vector, destination).
            lo, hi = a["hi"], a["lo"]
            self.rec.irte(a["index"], lo, hi)
            if self.msi is not None:
                self.msi[2] = (lo, hi)
            return
        if name == "vtd_ir_remap_msi":
            if self.msi is None:
                self.msi = [a["addr"], a["data"], None]
            self._msi_done((a["addr2"], a["data2"]), ev.line)
            return
        where = f"log line {ev.line}"
        if name == "vtd_inv_desc":
            self.pending_desc.append((a["lo"], a["hi"]))
            return
        if name in _INV_DETAIL:
            if name == "vtd_inv_desc_wait_sw":
                self.rec.note_use(a["addr"])
            if self.last_reg is not None:
                self._add_note(self.last_reg, f"{name[4:]}: {_text(name, a)}")
            return
        if name == "vtd_reg_write":
            self._release()
            off, size, val = a["addr"], a["size"], a["val"]
            e = self._checked(Event("mmio_write", {"offset": off, "value": val, "size": size}, where=where))
            self.held = [e]
            self.last_reg = e
            self.fault_key = None
            if off == _IQA and size == 8:
                self.iqa = val
            elif off == _IQA and size == 4:
                self.iqa = (self.iqa & ~0xFFFF_FFFF) | val
            elif off == _IQA + 4 and size == 4:
                self.iqa = (self.iqa & 0xFFFF_FFFF) | val << 32
            else:
                return
            base, qbytes = self.iqa & IQA.IQA, 4096 << (self.iqa & IQA.QS)
            for page in range(base, base + qbytes, 4096):
                self.rec.note_use(page)
            return
        if name == "vtd_reg_read":
            self._release()
            self.ready.append(self._checked(Event("mmio_read", {"offset": a["addr"], "size": a["size"]},
                                                  where=where)))
            self.fault_key = None
            return
        if name == "vtd_inv_qi_enable":
            self.head = 0
            if self.last_reg is not None:
                self._expect_reg(self.last_reg, _GSTS, _QIES if a["enable"] else 0, _QIES)
            return
        if name == "vtd_reg_dmar_root":
            self.rec.set_root(a["addr"], bool(a["scalable"]))
            if self.last_reg is not None:
                self._expect_reg(self.last_reg, _RTADDR, a["addr"] | a["scalable"] << RTADDR.TTM_LO,
                                 _RTADDR_CHECKED)
            return
        if name == "vtd_dmar_enable" and self.last_reg is not None:
            self._expect_reg(self.last_reg, _GSTS, _TES if a["en"] else 0, _TES)
            return
        if name == "vtd_ir_enable" and self.last_reg is not None:
            self._expect_reg(self.last_reg, _GSTS, _IRES if a["en"] else 0, _IRES)
            return
        if name == "vtd_reg_ir_root":
            self.rec.set_irta(a["addr"])
            if self.last_reg is not None:
                self._add_note(self.last_reg, f"interrupt remapping table at {a['addr']:#x}, {a['size']:#x} entries")
            return
        if name == "vtd_translate_pt" or name == "vtd_dmar_fault":
            self._fault_or_pt(name, a, where)
            return
        if name == "vtd_frr_new":
            target = self.last_check
            if self.msi is not None:
                # An interrupt request QEMU blocked: the record is its answer (FR in the record's high qword).
                target = self._msi_done(None, ev.line, (a["hi"] & _FRCD_FR_HI) >> _FRCD_FR_SHIFT)
            if target is None:
                self.unused[name] += 1
                return
            off = self.frcd_base + 16 * a["index"]
            self._expect_reg(target, off, a["lo"], _U64)
            # QEMU prints the record before it sets F (bit 127 of the FRCD), which it always does next.
            self._expect_reg(target, off + 8, a["hi"] | _FRCD_F, _U64)
            return
        self.unused[name] += 1

    def _translate(self, a: dict[str, Any], line: int) -> None:
        sid = a["bus"] << 8 | a["slot"] << 3 | a["func"]
        iova, mask, gpa = a["iova"], a["mask"], a["gpa"]
        expect: dict[str, Any]
        write = False
        lf = self.leaf
        if lf is None or lf[0] != sid or lf[1] & ~mask != iova & ~mask:
            expect = {"faults": [], "addrs": [gpa | (iova & mask)]}
        else:
            # The IOTLB line before it has the exact address and the leaf QEMU used.
            iova, leaf, walked = lf[1], lf[2], lf[3]
            expect = {"faults": [], "addrs": [gpa | (iova & mask)], "walks": int(walked)}
            shift = (mask + 1).bit_length() - 1
            if walked and mask == (1 << shift) - 1 and shift >= 12 and (shift - 12) % 9 == 0:
                if not self.rec.leaf(sid, iova, shift, leaf, lf[4]) and len(self.s.notes) < _MAX_NOTES:
                    # The first few are named; reconstruction["unreconstructed"] counts them all.
                    self.s.notes.append(f"log line {line}: the tables could not be rebuilt to reach the leaf "
                                        f"{leaf:#x} QEMU read for sid {sid:#x} iova {iova:#x}")
                self._memory_writes(f"log line {line}")
            # Reads need R; a leaf without it was walked for a write (the log does not tell the direction).
            write = not leaf & 1
            self.leaf = None
        self.rec.note_use(gpa)
        self.fault_key = None
        length = min(4, 4096 - (iova & 0xFFF))
        f: dict[str, Any] = {"sid": sid, "pasid": None, "iova": iova, "len": length,
                             "dir": "write" if write else "read", "priv": False}
        if write:
            f["data"] = bytes(length)
        e = Event("dma", f, expect, None, f"log line {line}")
        self._emit(e)
        self.last_check = e

    def _msi_done(self, out: tuple[int, int] | None, line: int, fault: int | None = None) -> Event:
        assert self.msi is not None
        addr, data, irte = self.msi
        self.msi = None
        self._memory_writes(f"log line {line}")
        sid = Reconstructor.irte_requester(*irte) if irte is not None else 0
        if out is not None:
            exp: dict[str, Any] = {"msi_addr": out[0], "msi_data": out[1]}
        elif fault is not None:
            exp = {"msi_addr": None, "msi_data": None, "ir_fault": fault}
        else:
            # Blocked with no record QEMU printed (FPD, or fault logging full): delivered nothing.
            exp = {"msi_addr": None, "msi_data": None}
            self.s.reconstruction["msi_blocked_unrecorded"] = self.s.reconstruction.get("msi_blocked_unrecorded", 0) + 1
        e = Event("msi", {"sid": sid, "addr": addr, "data": data}, exp, None, f"log line {line}")
        self._emit(e)
        self.last_check = e
        return e

    def _fault_or_pt(self, name: str, a: dict[str, Any], where: str) -> None:
        if name == "vtd_translate_pt":
            sid, iova, write = a["sid"], a["addr"], False
            expect: dict[str, Any] = {"faults": [], "addrs": [a["addr"]]}
            key = None
        else:
            sid, iova, write = a["sid"], a["addr"], bool(a["is_write"])
            expect = {"faults": [a["fault"]], "addrs": [None]}
            key = (sid, iova >> 12, write, a["fault"])
            if key == self.fault_key:
                # QEMU retries the rest of a faulting access in 4-byte steps; repeats add nothing to replay.
                return
        self.fault_key = key
        self.leaf = None
        length = min(4, 4096 - (iova & 0xFFF))
        f: dict[str, Any] = {"sid": sid, "pasid": None, "iova": iova, "len": length,
                             "dir": "write" if write else "read", "priv": False}
        if write:
            f["data"] = bytes(length)
        e = self._checked(Event("dma", f, expect, f"from {name}", where))
        self._emit(e)
        self.last_check = e

    def finish(self) -> None:
        if self.msi is not None:
            # The log ends before QEMU answered (a log cut short): nothing to expect of it.
            self.msi = None
            self.s.reconstruction["msi_cut_off"] = 1
        self._memory_writes("end of log")
        self._release()
        self.s.reconstruction.update(self.rec.stats)


def _text(name: str, a: dict[str, Any]) -> str:
    """The event's text again (as QEMU printed it), for notes."""
    def field_text(m: Any) -> str:
        v = a[m.group(1)]
        return format(v, (m.group(2) or "") + m.group(3)) if m.group(3) else str(v)

    return _FIELD.sub(field_text, EVENTS[name][0])


# -- the import ------------------------------------------------------------------------------------------


def _first_root_scalable(path: Path) -> bool:
    """Whether the first root table the log latches is scalable-mode (read up to that line only)."""
    with open_log(path) as fh:
        for line in fh:
            if "vtd_reg_dmar_root" in line:
                return line.rstrip().endswith("scalable 1")
    return False


class _Import:
    """One import's setup: the trace config, the unit's FRCD layout and the memory model."""

    def __init__(self, path: str | Path, *, ram: str | Path | None, out: str | Path | None,
                 qemu: dict[str, Any] | None, preset: str | None, profile: str | None, ram_size: int | None) -> None:
        p = Path(path)
        self.path = p
        if ram_size is not None and not 1 <= ram_size <= 1 << 64:
            raise TraceError(str(p), "ram_size", f"expected a memory size in 1..2**64 bytes, got {ram_size}")
        if preset is not None and qemu is not None:
            raise TraceError(str(p), "", "give QEMU options or a preset, not both")
        if not p.is_file():
            raise TraceError(str(p), "", "cannot read: No such file")
        if preset is None:
            opts = dict(qemu or {})
            # What the log itself tells: a scalable root table means the unit was x-scalable-mode=on.
            if "scalable_mode" not in opts and _first_root_scalable(p):
                opts["scalable_mode"] = True
            cfg = TraceConfig(preset=None, qemu=opts, profile=profile)
        else:
            cfg = TraceConfig(preset=preset, profile=profile)
        from ...trace.replay import unit_config

        vc = unit_config(cfg, None, str(p))
        self.frcd = (vc.cap_field("FRO") * 16, vc.cap_field("NFR") + 1)
        self.notes: list[str] = []
        if ram is not None:
            rp = Path(ram)
            if out is not None:
                try:
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
            from ...ramimage import load_ram_image

            model = load_ram_image(rp, size=ram_size)
        else:
            self.notes.append("no RAM image: every table a walk needs is placed in memory by the import (only "
                              "leaf and context entries are QEMU's; see docs/qemu-import.md)")
            model = HostRAM(ram_size)
        cfg.ram_size = ram_size
        self.cfg = cfg
        self.rec = Reconstructor(model, vc)

    def events(self, s: LogSummary, progress: Progress | None) -> Iterator[Event]:
        """The trace's events, converted while the log is read (nothing but the pending ones is held)."""
        conv = _Converter(str(self.path), *self.frcd, self.rec)
        conv.s = s
        feed = conv.feed
        n = 0
        with open_log(self.path) as fh:
            for ev in iter_log(fh, str(self.path), s, _CONVERTED, conv.check):
                feed(ev)
                if conv.ready:
                    yield from conv.take()
                if progress is not None:
                    n += 1
                    if not n & (PROGRESS_LINES - 1):
                        progress(ev.line)
        conv.finish()
        yield from conv.take()
        for name, k in s.events.items():
            used = k - conv.unused[name] if name in _CONVERTED else 0
            if used:
                s.converted[name] += used
            if k - used:
                s.informational[name] += k - used
        if not s.events:
            raise TraceError(str(self.path), "", f"no VT-d trace line in {s.lines} line(s): expected QEMU -trace "
                                                 "'vtd_*' output such as 'PID@SEC.USEC:vtd_reg_write addr 0x20 "
                                                 "size 0x8 value 0x100000'")
        s.notes[:0] = self.notes
        if progress is not None:
            progress(s.lines)


def import_log(path: str | Path, *, ram: str | Path | None = None, out: str | Path | None = None,
               qemu: dict[str, Any] | None = None, preset: str | None = None, profile: str | None = None,
               ram_size: int | None = None) -> tuple[Trace, LogSummary]:
    """A trace of the log held in memory (see the package docstring); ``ram`` is stored relative to
    ``out``'s folder.  For logs of any size, :func:`import_log_to` streams to a JSON Lines file instead."""
    imp = _Import(path, ram=ram, out=out, qemu=qemu, preset=preset, profile=profile, ram_size=ram_size)
    s = LogSummary()
    events: list[Event] = list(imp.events(s, None))
    desc = (f"imported from {imp.path.name}: {sum(s.converted.values())} QEMU trace events converted, "
            f"{sum(s.informational.values())} informational, {sum(s.unknown.values())} unknown")
    return Trace(imp.cfg, list(events), imp.path.stem, desc, str(out or path)), s


def import_log_to(path: str | Path, out: str | Path, *, ram: str | Path | None = None, ram_ref: str | Path | None = None,
                  qemu: dict[str, Any] | None = None, preset: str | None = None, profile: str | None = None,
                  ram_size: int | None = None, progress: Progress | None = None) -> tuple[int, LogSummary, float]:
    """Stream the log's trace into the JSON Lines file ``out`` (memory bounded by the guest's RAM, not by
    the log): (events written, summary, seconds spent converting after the RAM image was loaded).
    ``ram_ref`` is where the trace will live if ``out`` is a temporary name (the RAM image's path is
    stored relative to it)."""
    imp = _Import(path, ram=ram, out=ram_ref or out, qemu=qemu, preset=preset, profile=profile, ram_size=ram_size)
    s = LogSummary()
    t0 = time.perf_counter()
    n = write_jsonl(out, imp.cfg, imp.events(s, progress), imp.path.stem.removesuffix(".log"),
                    f"imported from {imp.path.name} by vtd-emu import-qemu")
    return n, s, time.perf_counter() - t0


def _image_size(p: Path) -> int:
    with p.open("rb") as fh:
        magic = fh.read(4)
    if magic == b"\x28\xb5\x2f\xfd":
        import zstandard

        with p.open("rb") as fh:
            params = zstandard.get_frame_parameters(fh.read(64))
        if params.content_size > 0:
            return int(params.content_size)
        from ...ramimage import load_ram_image

        return load_ram_image(p).pages_used * 4096
    return p.stat().st_size
