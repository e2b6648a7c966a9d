"""Record a run as a ``vtd-trace/1`` trace with its expectations filled from what actually happened.

Drive the unit through a :class:`Recorder` instead of directly: memory writes (``rec.mem``, a
:class:`~vtd_emu.memory.RecordingMemory` the builders accept), MMIO, queued invalidations, DMA, page
requests, checkpoints.  Every action is run by the same code that replays traces
(:class:`~vtd_emu.trace.replay.Replayer`), so replaying the recording reproduces the run bit for bit:
same memory, same registers, same fault records.

    rec = Recorder(TraceConfig(preset="modern"), name="legacy-dma")
    alloc = PageAllocator(rec.mem)
    ss = SecondStageTable(rec.mem, alloc, levels=4)
    ss.map(0x10000, 0x200000, 0x4000, R | W)
    rt = LegacyRootTable(rec.mem, alloc)
    rt.set_context(0, 0x10, slptptr=ss.root, aw=ss.aw, did=1)
    enable_translation(rec, rt.root)
    rec.dma_write(0x10, 0x10000, b"hello")
    rec.checkpoint("end")
    rec.save("traces/legacy-dma.yaml")

On a vIOMMU machine (``TraceConfig(vmm={...})``, format ``vtd-trace/2``) the recorder is the guest's side:
``rec.mem`` is guest-physical memory, ``rec`` itself the register block a
:class:`~vtd_emu.vmm.GuestDriver` programs (``GuestDriver(rec, rec.mem, ...)``), ``rec.plug`` and
``rec.reset`` are machine actions, DMA goes through the guest device at ``sid``, and every event that made
the bridge call the host records those calls as its ``bridge`` expectation (``rec.vm`` is the machine).

Memory writes are recorded compactly: a write that changes nothing (zero-filling fresh memory) is not
recorded, and consecutive qword writes to adjacent addresses become one ``mem_write``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..memory import RecordingMemory
from ..vtd.iommu import VtdIommu
from .model import Event, Trace, TraceConfig, check_config, parse_event, save_trace
from .replay import Machine, Replayer


def _as_loaded(v: Any) -> Any:
    """A Python value as a loader would see it (tuples are lists), for validating recorded fields."""
    if isinstance(v, (tuple, list)):
        return [_as_loaded(x) for x in v]
    return v


class Recorder:
    """Drives a :class:`~vtd_emu.trace.replay.Machine` (built from ``config``, or given) and records
    every action with the expectations it produced."""

    def __init__(self, config: TraceConfig | None = None, *, name: str = "", description: str = "",
                 machine: Machine | None = None) -> None:
        self.config = config or TraceConfig()
        # What is recorded must be what replay accepts: the config is checked as a loaded trace's is.
        check_config(self.config, "<recorder>")
        self.machine = machine or Machine.build(self.config)
        self.ram = self.machine.ram
        self.vm = self.machine.vmm
        """The ``vtd_emu.vmm.Machine`` of a vIOMMU recording, else None."""
        self._target = self.machine.mem
        self.iommu: VtdIommu = self.machine.iommu
        self.name = name
        self.description = description
        self._replayer = Replayer(Trace(self.config, [], name, description), machine=self.machine, batch=False,
                                  record=True)
        self.mem = RecordingMemory(self._target, self._write, None if self.vm is None else self.vm.size)
        self._pend_addr = -1
        self._pend = bytearray()
        self._pend_qwords = False

    # -- memory --------------------------------------------------------------------------------------
    def _write(self, addr: int, data: bytes, qword: bool) -> int:
        """Bytes stored, as ``HostRAM.write`` counts them."""
        ram = self._target
        if not data:
            return 0
        if self.vm is None and (addr < 0 or addr + len(data) > self.ram.size):
            if qword:
                return 0  # write_u64 stores nothing when the qword is not all memory
            # HostRAM drops the bytes that do not fit; record the write so replay does the same.
            self._flush()
            self._append(Event("mem_write", {"addr": addr, "hex": data}))
            return ram.write(addr, data)
        if ram.read(addr, len(data)) == data:
            return len(data)
        qw = qword and addr % 8 == 0
        if self._pend and addr == self._pend_addr + len(self._pend) and qw == self._pend_qwords:
            self._pend += data
        else:
            self._flush()
            self._pend_addr, self._pend, self._pend_qwords = addr, bytearray(data), qw
        ram.write(addr, data)
        return len(data)

    def _flush(self) -> None:
        if not self._pend:
            return
        a, b = self._pend_addr, bytes(self._pend)
        if self._pend_qwords:
            f: dict[str, Any] = {"addr": a, "qwords": [int.from_bytes(b[i:i + 8], "little")
                                                       for i in range(0, len(b), 8)]}
        else:
            f = {"addr": a, "hex": b}
        self._pend = bytearray()
        self._append(Event("mem_write", f))

    def _append(self, ev: Event) -> None:
        rp = self._replayer
        rp.index += 1
        rp.stats.mem_writes += 1
        rp.out_events.append(ev)

    def write_memory(self, addr: int, data: bytes) -> None:
        self._write(addr, bytes(data), qword=False)

    def write_u64(self, addr: int, value: int) -> None:
        self.mem.write_u64(addr, value)

    # -- everything else goes through the replayer ----------------------------------------------------
    def _run(self, op: str, fields: dict[str, Any], note: str | None = None,
             expect: dict[str, Any] | None = None) -> dict[str, Any]:
        self._flush()
        rp = self._replayer
        # The same validation as an event read from a file (ranges, sizes, op names), before it runs.
        parse_event({"op": op, **{k: _as_loaded(v) for k, v in fields.items() if v is not None}}, "<recorder>",
                    f"event {rp.index}")
        ev = Event(op, fields, expect, note, "")
        before = len(rp.out_events)
        rp.apply(ev)
        rec = rp.out_events[before]
        assert isinstance(rec, Event)
        return rec.expect or {}

    def mem_read(self, addr: int, length: int, note: str | None = None) -> bytes:
        """Read memory (guest-physical on a vIOMMU machine), recording what was there as the expectation."""
        return bytes(self._run("mem_read", {"addr": addr, "len": length}, note)["hex"])

    def mmio_write(self, offset: int, value: int, size: int = 4) -> None:
        self._run("mmio_write", {"offset": offset, "value": value, "size": size})

    def mmio_read(self, offset: int, size: int = 4) -> int:
        return int(self._run("mmio_read", {"offset": offset, "size": size})["value"])

    def qi_submit(self, descriptors: Sequence[Sequence[int]], note: str | None = None) -> None:
        self._run("qi_submit", {"descriptors": [tuple(d) for d in descriptors]}, note)

    def dma_read(self, sid: int, iova: int, length: int, pasid: int | None = None, priv: bool = False,
                 note: str | None = None) -> tuple[bytes, list[int]]:
        """(bytes the device got, fault reasons)."""
        obs = self._run("dma", {"sid": sid, "pasid": pasid, "iova": iova, "len": length, "dir": "read",
                                "priv": priv}, note)
        return obs.get("data", b""), list(obs.get("faults", []))

    def dma_write(self, sid: int, iova: int, data: bytes, pasid: int | None = None, priv: bool = False,
                  note: str | None = None) -> list[int]:
        """Fault reasons of the write (empty when every chunk landed)."""
        obs = self._run("dma", {"sid": sid, "pasid": pasid, "iova": iova, "len": len(data), "dir": "write",
                                "data": bytes(data), "priv": priv}, note)
        return list(obs.get("faults", []))

    def page_request(self, sid: int, addr: int, *, read: bool = True, write: bool = False, exe: bool = False,
                     priv: bool = False, pasid: int | None = None, last: bool = True, prgi: int = 0,
                     private_data: int | None = None, note: str | None = None) -> str:
        return str(self._run("page_request", {"sid": sid, "addr": addr, "read": read, "write": write, "exe": exe,
                                              "priv": priv, "pasid": pasid, "last": last, "prgi": prgi,
                                              "private_data": private_data}, note)["status"])

    def page_response(self, sid: int, prgi: int, code: int = 0, pasid: int | None = None,
                      note: str | None = None) -> None:
        self._run("page_response", {"sid": sid, "pasid": pasid, "prgi": prgi, "code": code}, note)

    def checkpoint(self, name: str | None = None, mem: str | list[tuple[int, int]] = "all",
                   regs: bool = True) -> dict[str, Any]:
        return self._run("checkpoint", {"name": name, "mem": mem, "regs": regs})

    def note(self, text: str) -> None:
        self._run("note", {"text": text})

    def host_call(self, method: str, target: str | None = None, args: dict[str, Any] | None = None,
                  bind: str | None = None, note: str | None = None) -> dict[str, Any]:
        """A host-layer call (``host.<method>``; needs ``config.host``): ``args`` use the trace's argument
        conventions (``"$name"`` for bound objects, ``{"$hex": ...}`` for bytes); ``bind`` names the
        result.  Returns the recorded ``result``/``errno``."""
        return self._run("host." + method, {"target": target, "args": args, "as": bind}, note)

    def plug(self, sid: int, kind: str = "passthrough", *, host_sid: int | None = None, pasid_bits: int = 20,
             ats: bool = False, pri: bool = False, group: int | None = None, note: str | None = None) -> int | None:
        """A guest device at ``sid`` (vIOMMU machines): ``passthrough`` or ``emulated``; the host's errno
        when it refused (the device is then not added), else None."""
        return self._run("vmm.plug", {"sid": sid, "kind": kind, "host_sid": host_sid, "pasid_bits": pasid_bits,
                                      "ats": ats, "pri": pri, "group": group}, note).get("errno")

    def reset(self, note: str | None = None) -> None:
        """System reset of a vIOMMU machine."""
        self._run("vmm.reset", {}, note)

    def expect_registers(self, offsets: Sequence[int], note: str | None = None) -> None:
        """A note event carrying the current values of registers as expectations (read without effects)."""
        regs = {off: (0, 0xFFFF_FFFF_FFFF_FFFF) for off in offsets}
        self._run("note", {"text": note or "registers"}, None, {"regs": regs})

    # -- result --------------------------------------------------------------------------------------
    def trace(self) -> Trace:
        self._flush()
        return Trace(self.config, list(self._replayer.out_events), self.name, self.description)

    def save(self, path: str | Path, kind: str | None = None) -> Trace:
        t = self.trace()
        save_trace(t, path, kind)
        return t
