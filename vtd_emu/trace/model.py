"""The ``vtd-trace/1`` format: one event vocabulary, three encodings (YAML, JSON Lines, ``.npz``).

A trace is a :class:`TraceConfig` (which unit, which profile, how much RAM) and a list of events.  Every
event is validated once, at load, into an :class:`Event` (an op name, normalised fields, an optional
``expect`` and ``note``); bulk DMA from the binary form stays columnar as a :class:`DmaBlock` so a million
DMAs never become a million Python objects.  Errors name the file, the line or event and the field, and
say what was expected (:class:`~vtd_emu.errors.TraceError`).

Canonical dict form (what JSON and YAML hold): addresses, register values, ids and anything that can
exceed 2**53 are ``"0x..."`` strings; sizes and lengths are ints; byte strings are hex.  Loaders also
accept plain ints for any of them, so hand-written YAML can say ``iova: 0x1000``.  The format is
documented in ``docs/trace-format.md``.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import TraceError

FORMAT = "vtd-trace/1"
FORMAT2 = "vtd-trace/2"
"""Version 2: version 1 plus vIOMMU machines (``config.vmm``, ``vmm.*`` events, ``bridge``, ``unbacked``,
``pending``, ``host_regs_sha256`` and ``objects`` expectations); written only for traces that use them, so
version-1 traces keep their bytes."""
FORMATS = (FORMAT, FORMAT2)
ORACLE_FORMAT = "vtd-oracle-scenario/1"

_U64 = (1 << 64) - 1
NO_PASID_COL = -1
"""``DmaBlock.pasid`` value of a request without PASID."""

# -- limits (docs/trace-format.md, "Limits") ----------------------------------------------------------
# A trace is input from anyone: each bound keeps one event from needing more memory than a machine has,
# and is refused at load (TraceError naming the file and event) instead of ending in MemoryError.
MAX_ACCESS_BYTES = 1 << 26
"""Largest single DMA, ``mem_read``, ``mem_write`` payload or host-layer read/DMA length (64 MiB)."""
MAX_CHECKPOINT_BYTES = 1 << 28
"""Largest total of the memory ranges one ``checkpoint`` hashes (256 MiB)."""
MAX_NPZ_BYTES = 1 << 31
"""Largest total of the uncompressed arrays of a ``.npz`` trace (2 GiB)."""

# -- field kinds -------------------------------------------------------------------------------------
# Each validator turns a loaded value into the normalised Python value or raises ValueError with what was
# expected; the caller adds file, location and field name.


def _as_int(v: Any, bits: int = 64, what: str = "an integer") -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected {what}, got {v!r}")
    if isinstance(v, int):
        n = v
    elif isinstance(v, str):
        try:
            n = int(v, 0)
        except ValueError:
            raise ValueError(f"expected {what} (a number or a '0x...' string), got {v!r}") from None
    else:
        raise ValueError(f"expected {what}, got {type(v).__name__} {v!r}")
    if n < 0 or n >> bits:
        raise ValueError(f"expected {what} of at most {bits} bits, got {v!r}")
    return n


def _u64(v: Any) -> int:
    return _as_int(v, 64, "a 64-bit value")


def _u16(v: Any) -> int:
    return _as_int(v, 16, "a 16-bit value")


def _u32(v: Any) -> int:
    return _as_int(v, 32, "a 32-bit value")


def _u128(v: Any) -> int:
    return _as_int(v, 128, "a 128-bit value")


def _pasid(v: Any) -> int | None:
    if v is None:
        return None
    return _as_int(v, 20, "a 20-bit PASID or null")


def _length(v: Any) -> int:
    n = _as_int(v, 32, "a length in bytes")
    if n == 0:
        raise ValueError("expected a length of at least 1 byte, got 0")
    if n > MAX_ACCESS_BYTES:
        raise ValueError(f"expected a length of at most {MAX_ACCESS_BYTES:#x} bytes (the limit of one access), "
                         f"got {n:#x}")
    return n


def _count(v: Any) -> int:
    return _as_int(v, 63, "a non-negative integer")


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise ValueError(f"expected true or false, got {v!r}")


def _str(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise ValueError(f"expected a string, got {v!r}")


def _hex(v: Any) -> bytes:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if not isinstance(v, str):
        raise ValueError(f"expected a hex string of bytes, got {type(v).__name__}")
    if len(v) > 2 * MAX_ACCESS_BYTES:
        raise ValueError(f"expected at most {MAX_ACCESS_BYTES:#x} bytes (the limit of one access)")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise ValueError("expected a hex string of bytes (two hex digits per byte)") from None


def _qwords(v: Any) -> list[int]:
    if not isinstance(v, list) or not v:
        raise ValueError("expected a non-empty list of 64-bit values")
    return [_u64(x) for x in v]


def _size(v: Any) -> int:
    n = _as_int(v, 8, "an access size")
    if n not in (1, 2, 4, 8):
        raise ValueError(f"expected an access size of 1, 2, 4 or 8 bytes, got {v!r}")
    return n


def _dir(v: Any) -> str:
    if v in ("read", "write"):
        return v
    raise ValueError(f"expected 'read' (device reads memory) or 'write' (device writes memory), got {v!r}")


_RC_NAMES = {"success": 0x0, "invalid": 0x1, "failure": 0xF}


def _rc(v: Any) -> int:
    if isinstance(v, str) and v in _RC_NAMES:
        return _RC_NAMES[v]
    n = _as_int(v, 4, "a response code (success, invalid, failure or 0..15)")
    return n


def _descriptors(v: Any) -> list[tuple[int, ...]]:
    """Each descriptor: a list of 2 (128-bit) or 4 (256-bit) qwords, or ``{type: NAME, FIELD: value...}``
    built from the spec layouts (``vtd_emu.vtd.qi.make_descriptor``)."""
    if not isinstance(v, list) or not v:
        raise ValueError("expected a non-empty list of descriptors")
    out: list[tuple[int, ...]] = []
    for i, d in enumerate(v):
        if isinstance(d, list):
            if len(d) not in (2, 4):
                raise ValueError(f"descriptor {i}: expected 2 qwords (128-bit) or 4 (256-bit), got {len(d)}")
            try:
                out.append(tuple(_u64(x) for x in d))
            except ValueError as exc:
                raise ValueError(f"descriptor {i}: {exc}") from None
        elif isinstance(d, dict):
            out.append(_symbolic_descriptor(i, d))
        else:
            raise ValueError(f"descriptor {i}: expected a list of qwords or a mapping with 'type'")
    return out


def _symbolic_descriptor(i: int, d: dict[str, Any]) -> tuple[int, ...]:
    # The chip's own table of names and layouts: the format has no second copy of them.
    from ..vtd.qi import TYPE_NAMES, make_descriptor

    codes = {name: code for code, name in TYPE_NAMES.items()}
    t = d.get("type")
    if t not in codes:
        raise ValueError(f"descriptor {i}: 'type' must be one of {sorted(codes)}, got {t!r}")
    fields = {}
    for k, val in d.items():
        if k == "type":
            continue
        try:
            fields[str(k)] = _as_int(val, 64, f"field {k}")
        except ValueError as exc:
            raise ValueError(f"descriptor {i}: {exc}") from None
    try:
        lo, hi = make_descriptor(codes[t], **fields)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"descriptor {i} ({t}): {exc}") from None
    return (lo, hi)


def _mem_ranges(v: Any) -> str | list[tuple[int, int]]:
    if v == "all":
        return "all"
    if not isinstance(v, list):
        raise ValueError("expected 'all' or a list of {addr, len}")
    out = []
    for i, r in enumerate(v):
        if not isinstance(r, dict) or set(r) != {"addr", "len"}:
            raise ValueError(f"range {i}: expected {{addr, len}}")
        out.append((_u64(r["addr"]), _count(r["len"])))
    return out


def _pasid_bits(v: Any) -> int:
    n = _as_int(v, 5, "0..20 PASID bits")
    if n > 20:
        raise ValueError(f"expected 0..20 PASID bits, got {n}")
    return n


def _device_kind(v: Any) -> str:
    if v not in ("passthrough", "emulated"):
        raise ValueError(f"expected 'passthrough' (a host device assigned to the guest) or 'emulated', got {v!r}")
    return str(v)


def _mapping(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError("expected a mapping")
    return dict(v)


# op -> {field: (validator, required, default)}
_Field = tuple[Callable[[Any], Any], bool, Any]
OPS: dict[str, dict[str, _Field]] = {
    "mem_write": {"addr": (_u64, True, None), "qwords": (_qwords, False, None), "hex": (_hex, False, None)},
    "mem_read": {"addr": (_u64, True, None), "len": (_length, True, None)},
    "mmio_write": {"offset": (_u32, True, None), "value": (_u64, True, None), "size": (_size, False, 4)},
    "mmio_read": {"offset": (_u32, True, None), "size": (_size, False, 4)},
    "qi_submit": {"descriptors": (_descriptors, True, None)},
    "dma": {"sid": (_u16, True, None), "pasid": (_pasid, False, None), "iova": (_u64, True, None),
            "len": (_length, True, None), "dir": (_dir, True, None), "data": (_hex, False, None),
            "fill": (lambda v: _as_int(v, 8, "a byte value"), False, None),
            "data_from": (_count, False, None), "priv": (_bool, False, False)},
    "page_request": {"sid": (_u16, True, None), "addr": (_u64, True, None), "pasid": (_pasid, False, None),
                     "read": (_bool, False, True), "write": (_bool, False, False), "exe": (_bool, False, False),
                     "priv": (_bool, False, False), "last": (_bool, False, True),
                     "prgi": (lambda v: _as_int(v, 9, "a PRG index 0..511"), False, 0),
                     "private_data": (_u128, False, None)},
    "page_response": {"sid": (_u16, True, None), "pasid": (_pasid, False, None),
                      "prgi": (lambda v: _as_int(v, 9, "a PRG index 0..511"), True, None),
                      "code": (_rc, False, 0)},
    "checkpoint": {"name": (_str, False, None), "mem": (_mem_ranges, False, "all"), "regs": (_bool, False, True)},
    "note": {"text": (_str, True, None)},
    "vmm.plug": {"sid": (_u16, True, None), "kind": (_device_kind, False, "passthrough"),
                 "host_sid": (_u16, False, None), "pasid_bits": (_pasid_bits, False, 20),
                 "ats": (_bool, False, False), "pri": (_bool, False, False), "group": (_count, False, None)},
    "vmm.reset": {},
    # An interrupt request (a device's MSI write) through interrupt remapping (QEMU logs: vtd_ir_remap_msi).
    "msi": {"sid": (_u16, True, None), "addr": (_u64, True, None), "data": (_u32, True, None)},
}
VMM_OPS = frozenset(op for op in OPS if op.startswith("vmm."))
"""Machine actions of a vIOMMU machine (version 2, ``config.vmm``)."""
HOST_FIELDS: dict[str, _Field] = {"target": (_str, False, None), "args": (_mapping, False, None),
                                  "as": (_str, False, None)}
"""Fields of every ``host.<method>`` event (the reserved host-layer vocabulary)."""

HOST_CALLS: dict[str, frozenset[str]] = {
    "Host": frozenset({"mmap", "munmap", "write_user", "read_user", "memfd_create", "open_iommufd", "add_device",
                       "group_devices"}),
    "IommuFd": frozenset({"destroy", "objects", "users", "ioas_alloc", "ioas_iova_ranges", "ioas_allow_iovas",
                          "ioas_add_reserved", "ioas_map", "ioas_map_file", "ioas_copy", "ioas_unmap",
                          "ioas_change_process", "option", "vfio_ioas", "hwpt_alloc", "get_hw_info",
                          "hwpt_set_dirty_tracking", "hwpt_get_dirty_bitmap", "hwpt_invalidate",
                          "fault_queue_alloc", "viommu_alloc", "vdevice_alloc", "access_create", "close"}),
    "VfioDevice": frozenset({"bind_iommufd", "unbind", "attach_pt", "detach_pt", "iommufd_attach",
                             "iommufd_replace", "attached_hwpt", "dma_read", "dma_write", "page_request"}),
    "FaultFile": frozenset({"poll", "read", "write", "close"}),
    "Access": frozenset({"replace_ioas", "pin_pages", "unpin", "read", "write", "destroy"}),
}
"""The host-layer calls a trace may make: ``host.<method>`` on a ``target`` of the ``vtd_emu.host`` class
named here.  These are the uAPI-level operations of the host layer (ioctls, VMM memory, device DMA);
nothing else of it (internals, underscore methods, properties, callbacks) is reachable from a trace."""
HOST_METHODS = frozenset().union(*HOST_CALLS.values())

# Expectation keys per op, beyond the generic ``regs`` and ``mem`` every event may carry.
EXPECT_KEYS: dict[str, tuple[str, ...]] = {
    "dma": ("faults", "addrs", "data", "unbacked", "pending", "walks"),
    "msi": ("msi_addr", "msi_data", "ir_fault"),
    "mmio_read": ("value",),
    "mem_read": ("hex",),
    "page_request": ("status",),
    "checkpoint": ("mem_sha256", "regs_sha256", "faults", "interrupts", "host_regs_sha256", "objects"),
    "vmm.plug": ("errno",),
}
VMM_EXPECT = ("bridge", "unbacked", "pending", "host_regs_sha256", "objects")
"""Expectations only a vIOMMU machine answers (version 2)."""
_GENERIC_EXPECT = ("regs", "mem", "mem_changes", "raises", "bridge")
_HOST_EXPECT = ("result", "errno")


@dataclass(slots=True)
class Event:
    """One validated event.  ``fields`` hold normalised values (ints, bytes, bools, lists); ``where`` says
    where it came from (``line 12``) for messages."""

    op: str
    fields: dict[str, Any]
    expect: dict[str, Any] | None = None
    note: str | None = None
    where: str = ""

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


@dataclass(slots=True)
class DmaBlock:
    """Consecutive DMA events as columns (one row per DMA), with optional per-row expectations in CSR
    form: row ``i``'s faults are ``exp_faults[exp_faults_ptr[i]:exp_faults_ptr[i+1]]`` and so on; the
    ``exp_flags`` bits say which expectations row ``i`` has (1 faults, 2 addrs, 4 data)."""

    sid: np.ndarray        # uint32
    pasid: np.ndarray      # int32, -1 = no PASID
    iova: np.ndarray       # uint64
    length: np.ndarray     # uint32
    write: np.ndarray      # bool
    priv: np.ndarray       # bool
    data_off: np.ndarray   # int64 offset of a write's payload in ``data``, -1 for reads
    data: np.ndarray       # uint8 payload blob
    exp_flags: np.ndarray | None = None
    exp_faults_ptr: np.ndarray | None = None
    exp_faults: np.ndarray | None = None
    exp_addrs_ptr: np.ndarray | None = None
    exp_addrs: np.ndarray | None = None     # int64, -1 = no address (faulted, dropped or not translated)
    exp_data_ptr: np.ndarray | None = None
    exp_data: np.ndarray | None = None
    where: str = ""

    def __len__(self) -> int:
        return int(self.sid.shape[0])

    @property
    def has_expect(self) -> bool:
        return self.exp_flags is not None and bool(self.exp_flags.any())

    def row_event(self, i: int) -> Event:
        """Row ``i`` as an :class:`Event` (slow: for writers and tests)."""
        f: dict[str, Any] = {"sid": int(self.sid[i]), "pasid": None if self.pasid[i] < 0 else int(self.pasid[i]),
                             "iova": int(self.iova[i]), "len": int(self.length[i]),
                             "dir": "write" if self.write[i] else "read", "priv": bool(self.priv[i])}
        if self.write[i]:
            o = int(self.data_off[i])
            f["data"] = self.data[o:o + int(self.length[i])].tobytes()
        return Event("dma", f, self.row_expect(i), None, self.where)

    def row_expect(self, i: int) -> dict[str, Any] | None:
        if self.exp_flags is None or not self.exp_flags[i]:
            return None
        fl = int(self.exp_flags[i])
        out: dict[str, Any] = {}
        if fl & 1:
            assert self.exp_faults_ptr is not None and self.exp_faults is not None
            a, b = int(self.exp_faults_ptr[i]), int(self.exp_faults_ptr[i + 1])
            out["faults"] = [int(x) for x in self.exp_faults[a:b]]
        if fl & 2:
            assert self.exp_addrs_ptr is not None and self.exp_addrs is not None
            a, b = int(self.exp_addrs_ptr[i]), int(self.exp_addrs_ptr[i + 1])
            out["addrs"] = [None if x < 0 else int(x) for x in self.exp_addrs[a:b]]
        if fl & 4:
            assert self.exp_data_ptr is not None and self.exp_data is not None
            a, b = int(self.exp_data_ptr[i]), int(self.exp_data_ptr[i + 1])
            out["data"] = self.exp_data[a:b].tobytes()
        return out

    def slice(self, a: int, b: int) -> "DmaBlock":
        """Rows [a, b) as a new block sharing the payload blob."""
        def csr(ptr: np.ndarray | None, vals: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
            if ptr is None or vals is None:
                return None, None
            lo, hi = int(ptr[a]), int(ptr[b])
            return ptr[a:b + 1] - lo, vals[lo:hi]
        fp, fv = csr(self.exp_faults_ptr, self.exp_faults)
        ap, av = csr(self.exp_addrs_ptr, self.exp_addrs)
        dp, dv = csr(self.exp_data_ptr, self.exp_data)
        return DmaBlock(self.sid[a:b], self.pasid[a:b], self.iova[a:b], self.length[a:b], self.write[a:b],
                        self.priv[a:b], self.data_off[a:b], self.data,
                        None if self.exp_flags is None else self.exp_flags[a:b], fp, fv, ap, av, dp, dv, self.where)


@dataclass(slots=True)
class TraceConfig:
    """Which unit a trace runs on and how much memory it has.

    Either ``preset`` (one of ``VtdConfig.preset``'s names, with ``overrides`` of CAP/ECAP fields) or
    ``qemu`` (QEMU 7.2 ``-device intel-iommu`` options, as in oracle scenarios).  ``profile`` None means
    the natural one: ``spec`` for a preset, ``qemu-7.2`` for QEMU options."""

    preset: str | None = "modern"
    qemu: dict[str, Any] | None = None
    profile: str | None = None
    overrides: dict[str, int] = field(default_factory=dict)
    unit: dict[str, int] = field(default_factory=dict)
    """Further ``VtdConfig`` fields: haw, iotlb_size, context_cache_size, pasid_cache_size, psc_size,
    fault_collapse (0/1)."""
    ram_size: int | None = None
    ram_image: str | None = None
    ram_base: int = 0
    devices: list[dict[str, Any]] = field(default_factory=list)
    """Endpoints attached to the unit (``attach_device``): ``{sid, ats, pri, respond}``."""
    host: dict[str, Any] | None = None
    """Arguments of ``vtd_emu.host.Host`` for traces with host-layer events."""
    vmm: dict[str, Any] | None = None
    """A vIOMMU machine (``vtd_emu.vmm.Machine``, version 2): ``host`` (Host arguments), ``viommu`` (a
    preset name or ``{preset, ...}``), ``guest_ram``, ``forwarding``, ``dirty_tracking``."""


_UNIT_KEYS = {"haw", "iotlb_size", "context_cache_size", "pasid_cache_size", "psc_size", "fault_collapse"}
_CONFIG_KEYS = {"preset", "qemu", "profile", "overrides", "unit", "ram_size", "ram_image", "ram_base", "devices",
                "host", "vmm"}
VMM_KEYS = ("host", "viommu", "guest_ram", "forwarding", "dirty_tracking")


@dataclass(slots=True)
class Trace:
    config: TraceConfig
    events: list[Event | DmaBlock]
    name: str = ""
    description: str = ""
    source: str = "<memory>"

    def event_count(self) -> int:
        return sum(len(e) if isinstance(e, DmaBlock) else 1 for e in self.events)

    def iter_events(self) -> Iterator[Event]:
        """Every event, DMA blocks expanded row by row (slow; for writers and comparisons)."""
        for ev in self.events:
            if isinstance(ev, DmaBlock):
                for i in range(len(ev)):
                    yield ev.row_event(i)
            else:
                yield ev


# -- validation --------------------------------------------------------------------------------------


def parse_config(doc: Any, file: str, where: str = "config", *, check: bool = True) -> TraceConfig:
    """Validate a trace's ``config`` mapping.  With ``check`` the unit it describes must also be one replay
    can build (:func:`check_config`); QEMU scenarios pass False, since a unit QEMU refused to start is
    what some of them check."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise TraceError(file, where, "expected a mapping")
    unknown = set(doc) - _CONFIG_KEYS
    if unknown:
        raise TraceError(file, f"{where}.{sorted(unknown)[0]}", f"unknown key; expected some of {sorted(_CONFIG_KEYS)}")
    cfg = TraceConfig()

    def fail(key: str, msg: str) -> TraceError:
        return TraceError(file, f"{where}.{key}", msg)

    if doc.get("preset", "") is None:
        doc = {k: v for k, v in doc.items() if k != "preset"}
    if "qemu" in doc and doc["qemu"] is not None:
        if not isinstance(doc["qemu"], dict):
            raise fail("qemu", "expected a mapping of QEMU 7.2 intel-iommu options")
        if doc.get("preset") is not None or doc.get("overrides"):
            raise fail("qemu", "give either 'qemu' options or a 'preset' (with 'overrides'), not both")
        cfg.qemu = dict(doc["qemu"])
        cfg.preset = None
    elif "preset" in doc:
        if not isinstance(doc["preset"], str) or not doc["preset"]:
            raise fail("preset", f"expected a preset name, got {doc['preset']!r}")
        cfg.preset = doc["preset"]
    if doc.get("profile") is not None:
        if not isinstance(doc["profile"], str) or not doc["profile"]:
            raise fail("profile", f"expected a profile name (spec, qemu-7.2), got {doc['profile']!r}")
        cfg.profile = doc["profile"]
    ov = doc.get("overrides") or {}
    if not isinstance(ov, dict):
        raise fail("overrides", "expected a mapping like {cap.NFR: 0}")
    for k, v in ov.items():
        try:
            cfg.overrides[str(k)] = _as_int(v, 64, "an integer field value")
        except ValueError as exc:
            raise fail(f"overrides.{k}", str(exc)) from None
    unit = doc.get("unit") or {}
    if not isinstance(unit, dict):
        raise fail("unit", f"expected a mapping of {sorted(_UNIT_KEYS)}")
    for k, v in unit.items():
        if k not in _UNIT_KEYS:
            raise fail(f"unit.{k}", f"unknown unit setting; expected one of {sorted(_UNIT_KEYS)}")
        try:
            cfg.unit[k] = _as_int(v, 1 if k == "fault_collapse" else 32,
                                  "0 or 1" if k == "fault_collapse" else "a non-negative integer")
        except ValueError as exc:
            raise fail(f"unit.{k}", str(exc)) from None
    if doc.get("ram_size") is not None:
        try:
            cfg.ram_size = _as_int(doc["ram_size"], 65, "a memory size in bytes")
        except ValueError as exc:
            raise fail("ram_size", str(exc)) from None
        if cfg.ram_size == 0 or cfg.ram_size > 1 << 64:
            raise fail("ram_size", "expected a memory size in 1..2**64 bytes")
    if doc.get("ram_base") is not None:
        try:
            cfg.ram_base = _u64(doc["ram_base"])
        except ValueError as exc:
            raise fail("ram_base", str(exc)) from None
    if doc.get("ram_image") is not None:
        if not isinstance(doc["ram_image"], str):
            raise fail("ram_image", "expected a path (relative to the trace file)")
        cfg.ram_image = doc["ram_image"]
    devs = doc.get("devices") or []
    if not isinstance(devs, list):
        raise fail("devices", "expected a list of {sid, ats, pri, respond}")
    for i, d in enumerate(devs):
        if not isinstance(d, dict) or "sid" not in d:
            raise fail(f"devices[{i}]", "expected a mapping with 'sid'")
        extra = set(d) - {"sid", "ats", "pri", "respond"}
        if extra:
            raise fail(f"devices[{i}].{sorted(extra)[0]}", "unknown key; expected sid, ats, pri, respond")
        try:
            cfg.devices.append({"sid": _u16(d["sid"]), "ats": _bool(d.get("ats", True)),
                                "pri": _bool(d.get("pri", False)), "respond": _bool(d.get("respond", True))})
        except ValueError as exc:
            raise fail(f"devices[{i}]", str(exc)) from None
    if doc.get("host") is not None:
        if not isinstance(doc["host"], dict):
            raise fail("host", "expected a mapping of vtd_emu.host.Host arguments")
        cfg.host = dict(doc["host"])
    if doc.get("vmm") is not None:
        cfg.vmm = _parse_vmm(doc, fail)
        cfg.preset = None
    if check:
        check_config(cfg, file, where)
    return cfg


def _parse_vmm(doc: dict[str, Any], fail: Callable[[str, str], TraceError]) -> dict[str, Any]:
    v = doc["vmm"]
    if not isinstance(v, dict):
        raise fail("vmm", f"expected a mapping of {list(VMM_KEYS)}")
    others = sorted(k for k in doc if k not in ("vmm", "preset") and doc[k] not in (None, {}, []))
    if others or doc.get("preset") is not None:
        first = (others or ["preset"])[0]
        raise fail("vmm", f"a vIOMMU machine is configured in config.vmm only; remove config.{first}")
    out: dict[str, Any] = {}
    for k, val in v.items():
        if k not in VMM_KEYS:
            raise fail(f"vmm.{k}", f"unknown key; expected some of {list(VMM_KEYS)}")
        try:
            if k == "host":
                out[k] = _mapping(val)
            elif k == "viommu":
                if not (isinstance(val, str) and val) and not isinstance(val, dict):
                    raise ValueError("expected a preset name or a mapping {preset, ...VtdConfig.preset arguments}")
                out[k] = val if isinstance(val, str) else dict(val)
            elif k == "guest_ram":
                out[k] = _as_int(val, 64, "a guest RAM size in bytes")
            elif k == "forwarding":
                out[k] = _str(val)
            else:
                out[k] = _bool(val)
        except ValueError as exc:
            raise fail(f"vmm.{k}", str(exc)) from None
    return out


def _check_vmm(cfg: TraceConfig, file: str, where: str) -> None:
    """What ``vtd_emu.vmm.Machine`` would refuse about ``config.vmm``, without building it."""
    from ..errors import ConfigError
    from ..vmm.bridge import FORWARDING_MODES
    from ..vmm.caps import viommu_config

    v = cfg.vmm or {}
    if v.get("forwarding", "coalesced") not in FORWARDING_MODES:
        raise TraceError(file, f"{where}.vmm.forwarding", f"expected one of {list(FORWARDING_MODES)}, "
                                                          f"got {v['forwarding']!r}")
    allowed = _host_arguments()
    for k in (v.get("host") or {}):
        if k not in allowed:
            raise TraceError(file, f"{where}.vmm.host.{k}", f"unknown vtd_emu.host.Host argument; expected {allowed}")
    try:
        vc = viommu_config(v["viommu"]) if "viommu" in v else None
    except (ConfigError, TypeError) as exc:
        raise TraceError(file, f"{where}.vmm.viommu", str(exc)) from None
    ram = v.get("guest_ram", 64 << 20)
    if ram <= 0 or ram > 0xFEE0_0000 or (vc is not None and ram > 1 << (vc.mgaw + 1)):
        raise TraceError(file, f"{where}.vmm.guest_ram", f"expected 1..0xfee00000 bytes within the vIOMMU's MGAW, "
                                                         f"got {ram:#x}")


def check_config(cfg: TraceConfig, file: str, where: str = "config") -> None:
    """Refuse what replay would refuse about a unit: preset, QEMU options, profile, overrides, unit
    settings, host arguments.  It builds the unit's configuration exactly as replay does, so a trace that
    loads (and so anything ``convert``, ``record`` or ``import-qemu`` writes) is one replay accepts."""
    from .replay import unit_config

    if cfg.vmm is not None:
        _check_vmm(cfg, file, where)
        return
    if cfg.host is None:
        unit_config(cfg, None, file)
        return
    allowed = _host_arguments()
    for k, v in cfg.host.items():
        if k not in allowed:
            raise TraceError(file, f"{where}.host.{k}", f"unknown vtd_emu.host.Host argument; expected {allowed}")
        if k == "preset" and (not isinstance(v, str) or not v):
            raise TraceError(file, f"{where}.host.preset", f"expected a preset name, got {v!r}")
    unit_config(TraceConfig(preset=str(cfg.host.get("preset", "modern")), profile=cfg.profile,
                            overrides=cfg.overrides, unit=cfg.unit), None, file)


def _host_arguments() -> list[str]:
    import inspect

    from ..host import Host

    return [n for n in inspect.signature(Host).parameters if n != "self"]


_HOST_LENGTH_ARGS = ("n", "length", "len", "count", "size")


def config_to_dict(cfg: TraceConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.qemu is not None:
        out["qemu"] = dict(cfg.qemu)
    elif cfg.preset is not None:
        out["preset"] = cfg.preset
    if cfg.profile is not None:
        out["profile"] = cfg.profile
    if cfg.overrides:
        out["overrides"] = dict(cfg.overrides)
    if cfg.unit:
        out["unit"] = dict(cfg.unit)
    if cfg.ram_size is not None:
        out["ram_size"] = hex(cfg.ram_size)
    if cfg.ram_image is not None:
        out["ram_image"] = cfg.ram_image
    if cfg.ram_base:
        out["ram_base"] = hex(cfg.ram_base)
    if cfg.devices:
        out["devices"] = [{"sid": hex(d["sid"]), "ats": d["ats"], "pri": d["pri"], "respond": d["respond"]}
                          for d in cfg.devices]
    if cfg.host is not None:
        out["host"] = dict(cfg.host)
    if cfg.vmm is not None:
        out["vmm"] = {k: (hex(v) if k == "guest_ram" else v) for k, v in cfg.vmm.items()}
    return out


def _parse_regs_expect(v: Any) -> dict[int, tuple[int, int]]:
    if not isinstance(v, dict):
        raise ValueError("expected a mapping of register offset to value (or {value, mask})")
    out: dict[int, tuple[int, int]] = {}
    for k, val in v.items():
        off = _as_int(k, 32, "a register offset")
        if isinstance(val, dict):
            if set(val) - {"value", "mask"} or "value" not in val:
                raise ValueError(f"register {k}: expected a value or {{value, mask}}")
            out[off] = (_u64(val["value"]), _u64(val.get("mask", _U64)))
        else:
            out[off] = (_u64(val), _U64)
    return out


def _parse_expect(op: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError("expected a mapping")
    keys = EXPECT_KEYS.get(op, ()) + _GENERIC_EXPECT + (_HOST_EXPECT if op.startswith("host.") else ())
    out: dict[str, Any] = {}
    for k, val in v.items():
        if k not in keys:
            raise ValueError(f"unknown expectation {k!r}; a {op} event may expect {list(keys)}")
        try:
            if k == "regs":
                out[k] = _parse_regs_expect(val)
            elif k in ("mem", "mem_changes"):
                if not isinstance(val, list):
                    raise ValueError("expected a list of {addr, hex}")
                out[k] = [(_u64(m["addr"]), _hex(m["hex"])) if isinstance(m, dict) and set(m) == {"addr", "hex"}
                          else _bad("expected {addr, hex}") for m in val]
            elif k == "raises":
                if not isinstance(val, dict) or not val:
                    raise ValueError("expected a mapping of register offset to a mask of bits")
                out[k] = {_as_int(off, 32, "a register offset"): _u64(mask) for off, mask in val.items()}
            elif k == "faults":
                if not isinstance(val, list):
                    raise ValueError("expected a list of fault reasons")
                if op == "checkpoint":
                    out[k] = [_fault_record(x) for x in val]
                else:
                    out[k] = [_as_int(x, 8, "a fault reason") for x in val]
            elif k == "addrs":
                if not isinstance(val, list):
                    raise ValueError("expected a list of addresses (null for a chunk with none)")
                out[k] = [None if x is None else _u64(x) for x in val]
            elif k in ("data", "hex"):
                out[k] = _hex(val)
            elif k == "value":
                out[k] = _u64(val)
            elif k in ("interrupts", "walks"):
                out[k] = _count(val)
            elif k in ("msi_addr", "msi_data"):
                out[k] = None if val is None else _u64(val)
            elif k == "ir_fault":
                out[k] = None if val is None else _as_int(val, 8, "a fault reason")
            elif k in ("status", "mem_sha256", "regs_sha256"):
                out[k] = _str(val)
            elif k == "errno":
                out[k] = None if val is None else _count(val)
            elif k == "bridge":
                out[k] = _bridge_expect(val)
            elif k in ("unbacked", "pending"):
                out[k] = _count(val)
            elif k == "host_regs_sha256":
                out[k] = _str(val)
            elif k == "objects":
                if not isinstance(val, list):
                    raise ValueError("expected a list of [id, kind]")
                out[k] = [[_count(o[0]), _str(o[1])] if isinstance(o, list) and len(o) == 2
                          else _bad("expected [id, kind]") for o in val]
            else:
                out[k] = val
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{k}: {exc}") from None
    return out


BRIDGE_KEYS = ("call", "on", "args", "result", "errno")


def _json_ints(v: Any) -> Any:
    """Canonical host-call values: ``"0x..."`` strings become ints, everything else stays (lists of lists)."""
    if isinstance(v, str) and v.startswith("0x"):
        try:
            return int(v, 16)
        except ValueError:
            return v
    if isinstance(v, (list, tuple)):
        return [_json_ints(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_ints(x) for k, x in v.items()}
    return v


def _hex_ints(v: Any) -> Any:
    """The written form of :func:`_json_ints` values: ints as ``"0x..."``."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return _hexs(v)
    if isinstance(v, (list, tuple)):
        return [_hex_ints(x) for x in v]
    if isinstance(v, dict):
        return {k: _hex_ints(x) for k, x in v.items()}
    return v


def _bridge_expect(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise ValueError("expected a list of host calls {call, on, args, result, errno}")
    out = []
    for i, a in enumerate(v):
        if not isinstance(a, dict) or "call" not in a or set(a) - set(BRIDGE_KEYS):
            raise ValueError(f"[{i}]: expected a host call {{{', '.join(BRIDGE_KEYS)}}}")
        out.append({"call": _str(a["call"]), "on": _str(a.get("on", "")), "args": _json_ints(a.get("args") or {}),
                    "result": _json_ints(a.get("result")),
                    "errno": None if a.get("errno") is None else _count(a["errno"])})
    return out


def _bad(msg: str) -> Any:
    raise ValueError(msg)


_FAULT_KEYS = ("reason", "sid", "addr", "write", "pasid")


def _fault_record(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or set(v) - set(_FAULT_KEYS) or "reason" not in v:
        raise ValueError(f"expected a fault record {{{', '.join(_FAULT_KEYS)}}}")
    return {"reason": _as_int(v["reason"], 8, "a fault reason"), "sid": _u16(v.get("sid", 0)),
            "addr": _u64(v.get("addr", 0)), "write": _bool(v.get("write", False)), "pasid": _pasid(v.get("pasid"))}


def parse_event(doc: Any, file: str, where: str) -> Event:
    """Validate one event mapping (see :data:`OPS`)."""
    if not isinstance(doc, dict):
        raise TraceError(file, where, "expected an event mapping with 'op'")
    op = doc.get("op")
    if not isinstance(op, str):
        raise TraceError(file, where, f"expected 'op', one of {sorted(OPS)} or host.<method>")
    if op.startswith("host.") and op[5:] in HOST_METHODS:
        spec = HOST_FIELDS
    elif op in OPS:
        spec = OPS[op]
    elif op.startswith("host."):
        raise TraceError(file, where, f"unknown host call {op!r}; expected host.<method> with a method of "
                                      "HOST_CALLS (docs/trace-format.md, host-layer events)")
    else:
        raise TraceError(file, where, f"unknown op {op!r}; expected one of {sorted(OPS)} or host.<method>")
    fields: dict[str, Any] = {}
    for k, v in doc.items():
        if k in ("op", "expect", "note"):
            continue
        if k not in spec:
            raise TraceError(file, f"{where} ({op})", f"unknown field {k!r}; a {op} event has {sorted(spec)}")
        try:
            fields[k] = spec[k][0](v)
        except ValueError as exc:
            raise TraceError(file, f"{where} ({op}) field '{k}'", str(exc)) from None
    for k, (_, required, default) in spec.items():
        if k not in fields:
            if required:
                raise TraceError(file, f"{where} ({op})", f"missing field '{k}'")
            if default is not None:
                fields[k] = default
    _check_event(op, fields, file, where)
    expect = None
    if doc.get("expect") is not None:
        try:
            expect = _parse_expect(op, doc["expect"])
        except ValueError as exc:
            raise TraceError(file, f"{where} ({op}) expect", str(exc)) from None
    note = doc.get("note")
    if note is not None and not isinstance(note, str):
        raise TraceError(file, f"{where} ({op}) field 'note'", "expected a string")
    return Event(op, fields, expect, note, where)


def _check_event(op: str, f: dict[str, Any], file: str, where: str) -> None:
    w = f"{where} ({op})"
    if op == "mem_write":
        if ("qwords" in f) == ("hex" in f):
            raise TraceError(file, w, "expected exactly one of 'qwords' (64-bit values) or 'hex' (bytes)")
        if "hex" in f and not f["hex"]:
            raise TraceError(file, w, "field 'hex': expected at least one byte")
    elif op == "dma":
        if f["dir"] == "write":
            if sum(k in f for k in ("data", "fill", "data_from")) > 1:
                raise TraceError(file, w, "give one of 'data', 'fill' or 'data_from'")
            if "fill" in f:
                f["data"] = bytes([f.pop("fill")]) * f["len"]
            if "data" not in f and "data_from" not in f:
                raise TraceError(file, w, "a write DMA needs 'data' (hex payload), 'fill' (a byte value) or "
                                          "'data_from' (the event number of an earlier read DMA)")
            if "data" in f and len(f["data"]) != f["len"]:
                raise TraceError(file, f"{w} field 'data'", f"expected {f['len']} bytes (len), got {len(f['data'])}")
        elif "data" in f or "fill" in f or "data_from" in f:
            raise TraceError(file, w, "a read DMA carries no 'data'; put the bytes expected in expect.data")
        if f.get("priv") and f.get("pasid") is None:
            raise TraceError(file, w, "a privileged request carries a PASID; give 'pasid'")
        if f["iova"] + f["len"] > 1 << 64:
            raise TraceError(file, w, "iova + len goes beyond the 64-bit address space")
    elif op == "checkpoint" and f["mem"] != "all":
        total = 0
        for a, n in f["mem"]:
            if a + n > 1 << 64:
                raise TraceError(file, f"{w} field 'mem'", "range beyond the 64-bit address space")
            total += n
        if total > MAX_CHECKPOINT_BYTES:
            raise TraceError(file, f"{w} field 'mem'", f"ranges of {total:#x} bytes; a checkpoint hashes at most "
                                                      f"{MAX_CHECKPOINT_BYTES:#x}")
    elif op.startswith("host."):
        for k, v in (f.get("args") or {}).items():
            if isinstance(v, dict) and set(v) == {"$hex"} and isinstance(v["$hex"], str) \
                    and len(v["$hex"]) > 2 * MAX_ACCESS_BYTES:
                raise TraceError(file, f"{w} args.{k}", f"expected at most {MAX_ACCESS_BYTES:#x} bytes (the limit "
                                                        "of one access)")
            if "read" not in op and "dma" not in op:
                continue
            n = v.get("$int") if isinstance(v, dict) and set(v) == {"$int"} else v
            if isinstance(n, str):
                try:
                    n = int(n, 0)
                except ValueError:
                    continue
            if k in _HOST_LENGTH_ARGS and isinstance(n, int) and n > MAX_ACCESS_BYTES:
                raise TraceError(file, f"{w} args.{k}", f"expected at most {MAX_ACCESS_BYTES:#x} bytes (the limit of "
                                                        f"one access), got {n:#x}")


# -- canonical dicts ---------------------------------------------------------------------------------


def _hexs(n: int) -> str:
    return hex(n)


def event_to_dict(ev: Event) -> dict[str, Any]:
    """The canonical JSON-able mapping of an event (inverse of :func:`parse_event`)."""
    op, f = ev.op, ev.fields
    d: dict[str, Any] = {"op": op}
    if op == "mem_write":
        d["addr"] = _hexs(f["addr"])
        if "qwords" in f:
            d["qwords"] = [_hexs(q) for q in f["qwords"]]
        else:
            d["hex"] = f["hex"].hex()
    elif op == "mem_read":
        d.update(addr=_hexs(f["addr"]), len=f["len"])
    elif op == "mmio_write":
        d.update(offset=_hexs(f["offset"]), value=_hexs(f["value"]), size=f["size"])
    elif op == "mmio_read":
        d.update(offset=_hexs(f["offset"]), size=f["size"])
    elif op == "qi_submit":
        d["descriptors"] = [[_hexs(q) for q in desc] for desc in f["descriptors"]]
    elif op == "dma":
        d.update(sid=_hexs(f["sid"]))
        if f.get("pasid") is not None:
            d["pasid"] = _hexs(f["pasid"])
        d.update(iova=_hexs(f["iova"]), len=f["len"], dir=f["dir"])
        if f.get("priv"):
            d["priv"] = True
        if "data_from" in f:
            d["data_from"] = f["data_from"]
        elif f["dir"] == "write":
            d["data"] = f["data"].hex()
    elif op == "page_request":
        d.update(sid=_hexs(f["sid"]), addr=_hexs(f["addr"]))
        if f.get("pasid") is not None:
            d["pasid"] = _hexs(f["pasid"])
        for k in ("read", "write", "exe", "priv", "last"):
            d[k] = f[k]
        d["prgi"] = f["prgi"]
        if f.get("private_data") is not None:
            d["private_data"] = _hexs(f["private_data"])
    elif op == "page_response":
        d["sid"] = _hexs(f["sid"])
        if f.get("pasid") is not None:
            d["pasid"] = _hexs(f["pasid"])
        d.update(prgi=f["prgi"], code=f["code"])
    elif op == "checkpoint":
        if f.get("name") is not None:
            d["name"] = f["name"]
        d["mem"] = "all" if f["mem"] == "all" else [{"addr": _hexs(a), "len": n} for a, n in f["mem"]]
        d["regs"] = f["regs"]
    elif op == "note":
        d["text"] = f["text"]
    elif op == "vmm.plug":
        d.update(sid=_hexs(f["sid"]), kind=f["kind"])
        if f.get("host_sid") is not None:
            d["host_sid"] = _hexs(f["host_sid"])
        d.update(pasid_bits=f["pasid_bits"], ats=f["ats"], pri=f["pri"])
        if f.get("group") is not None:
            d["group"] = f["group"]
    elif op in VMM_OPS:
        pass
    elif op == "msi":
        d.update(sid=_hexs(f["sid"]), addr=_hexs(f["addr"]), data=_hexs(f["data"]))
    else:  # host.*
        for k in ("target", "args", "as"):
            if f.get(k) is not None:
                d[k] = f[k]
    if ev.expect is not None:
        d["expect"] = expect_to_dict(ev.expect)
    if ev.note is not None:
        d["note"] = ev.note
    return d


def expect_to_dict(exp: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in exp.items():
        if k == "regs":
            out[k] = {_hexs(off): (_hexs(val) if mask == _U64 else {"value": _hexs(val), "mask": _hexs(mask)})
                      for off, (val, mask) in v.items()}
        elif k in ("mem", "mem_changes"):
            out[k] = [{"addr": _hexs(a), "hex": b.hex()} for a, b in v]
        elif k == "raises":
            out[k] = {_hexs(off): _hexs(mask) for off, mask in v.items()}
        elif k == "addrs":
            out[k] = [None if a is None else _hexs(a) for a in v]
        elif k in ("data", "hex"):
            out[k] = v.hex()
        elif k in ("value", "msi_addr", "msi_data", "ir_fault"):
            out[k] = None if v is None else _hexs(v)
        elif k == "faults" and v and isinstance(v[0], dict):
            out[k] = [{"reason": _hexs(r["reason"]), "sid": _hexs(r["sid"]), "addr": _hexs(r["addr"]),
                       "write": r["write"], "pasid": None if r["pasid"] is None else _hexs(r["pasid"])} for r in v]
        elif k == "faults":
            out[k] = [_hexs(r) for r in v]
        elif k == "bridge":
            out[k] = [{"call": a["call"], "on": a["on"], "args": _hex_ints(a["args"]), "result": _hex_ints(a["result"]),
                       "errno": a["errno"]} for a in v]
        else:
            out[k] = v
    return out


# -- DMA blocks --------------------------------------------------------------------------------------


def _is_plain_dma(ev: Event) -> bool:
    """A DMA whose whole content fits the columns (no note, no generic expectations, its own payload)."""
    return (ev.op == "dma" and ev.note is None and "data_from" not in ev.fields
            and (ev.expect is None or ev.expect.keys() <= _BLOCK_EXPECT))


_BLOCK_EXPECT = frozenset(("faults", "addrs", "data"))


def uses_v2(trace: Trace) -> bool:
    """Whether the trace needs version 2 (a vIOMMU machine)."""
    return trace.config.vmm is not None


def _check_version(trace: Trace, fmt: str) -> None:
    """A version-1 file may use nothing of version 2; a version-2 one with vIOMMU vocabulary needs config.vmm."""
    vmm = trace.config.vmm is not None
    n = 0
    for ev in trace.events:
        if isinstance(ev, DmaBlock):
            n += len(ev)
            continue
        used = sorted(set(ev.expect or ()) & set(VMM_EXPECT))
        if (ev.op in VMM_OPS or used) and not vmm:
            what = f"format {FORMAT2} with config.vmm" if fmt == FORMAT2 else f"format {FORMAT2} (this file says {fmt})"
            name = ev.op if ev.op in VMM_OPS else f"expect.{used[0]}"
            raise TraceError(trace.source, f"{ev.where or f'event {n}'} ({ev.op})",
                             f"vIOMMU machine vocabulary ({name}) needs {what}")
        n += 1
    if vmm and fmt == FORMAT:
        raise TraceError(trace.source, "config.vmm", f"a vIOMMU machine needs format: {FORMAT2} (this file says {fmt})")


def block_from_events(events: Sequence[Event], where: str = "") -> DmaBlock:
    """Columns of plain DMA events (see :func:`_is_plain_dma`)."""
    n = len(events)
    sid = np.fromiter((e.fields["sid"] for e in events), np.uint32, n)
    pasid = np.fromiter((-1 if e.fields.get("pasid") is None else e.fields["pasid"] for e in events), np.int32, n)
    iova = np.fromiter((e.fields["iova"] for e in events), np.uint64, n)
    length = np.fromiter((e.fields["len"] for e in events), np.uint32, n)
    write = np.fromiter((e.fields["dir"] == "write" for e in events), bool, n)
    priv = np.fromiter((bool(e.fields.get("priv")) for e in events), bool, n)
    data_off = np.full(n, -1, np.int64)
    chunks: list[bytes] = []
    pos = 0
    for i, e in enumerate(events):
        if write[i]:
            data_off[i] = pos
            chunks.append(e.fields["data"])
            pos += len(e.fields["data"])
    data = np.frombuffer(b"".join(chunks), np.uint8).copy() if chunks else np.zeros(0, np.uint8)
    blk = DmaBlock(sid, pasid, iova, length, write, priv, data_off, data, where=where)
    if any(e.expect for e in events):
        _set_block_expects(blk, [e.expect for e in events])
    return blk


def _set_block_expects(blk: DmaBlock, exps: Sequence[dict[str, Any] | None]) -> None:
    n = len(exps)
    flags = np.zeros(n, np.uint8)
    fptr = np.zeros(n + 1, np.int64)
    aptr = np.zeros(n + 1, np.int64)
    dptr = np.zeros(n + 1, np.int64)
    fv: list[int] = []
    av: list[int] = []
    dv: list[bytes] = []
    for i, e in enumerate(exps):
        if e:
            if "faults" in e:
                flags[i] |= 1
                fv.extend(e["faults"])
            if "addrs" in e:
                flags[i] |= 2
                av.extend(-1 if a is None else a for a in e["addrs"])
            if "data" in e:
                flags[i] |= 4
                dv.append(e["data"])
        fptr[i + 1] = len(fv)
        aptr[i + 1] = len(av)
        dptr[i + 1] = dptr[i] + (len(e["data"]) if e and "data" in e else 0)
    blk.exp_flags = flags
    blk.exp_faults_ptr, blk.exp_faults = fptr, np.array(fv, np.uint16)
    blk.exp_addrs_ptr, blk.exp_addrs = aptr, np.array(av, np.int64)
    blk.exp_data_ptr = dptr
    blk.exp_data = np.frombuffer(b"".join(dv), np.uint8).copy() if dv else np.zeros(0, np.uint8)


def blockify(events: Iterable[Event | DmaBlock], min_run: int = 1) -> list[Event | DmaBlock]:
    """Runs of at least ``min_run`` consecutive plain DMA events become :class:`DmaBlock` s."""
    out: list[Event | DmaBlock] = []
    run: list[Event] = []

    def flush() -> None:
        if len(run) >= min_run:
            out.append(block_from_events(run, run[0].where))
        else:
            out.extend(run)
        run.clear()

    for ev in events:
        if isinstance(ev, Event) and _is_plain_dma(ev):
            run.append(ev)
            continue
        if run:
            flush()
        out.append(ev)
    flush()
    return out


# -- files -------------------------------------------------------------------------------------------


def detect_kind(path: str | Path) -> str:
    """``yaml``, ``jsonl``, ``npz`` or ``oracle`` (a ``vtd-oracle-scenario/1`` file), from the content."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise TraceError(str(p), "", f"cannot read: {exc.strerror}") from None
    if head.startswith(b"PK"):
        return "npz"
    first = head.split(b"\n", 1)[0].strip()
    if first.startswith(b"{"):
        # Scenario lines are long: the format key comes first, so the head of line 1 is enough.
        if ORACLE_FORMAT.encode() in first and FORMAT.encode() not in first:
            return "oracle"
        return "jsonl"
    return "yaml"


def kind_from_name(path: str | Path) -> str | None:
    s = str(path).lower()
    if s.endswith((".yaml", ".yml")):
        return "yaml"
    if s.endswith((".jsonl", ".json")):
        return "jsonl"
    if s.endswith(".npz"):
        return "npz"
    return None


def load_trace(path: str | Path) -> Trace:
    """Load a trace in any of the three encodings (chosen by content)."""
    p = Path(path)
    kind = detect_kind(p)
    if kind == "oracle":
        raise TraceError(str(p), "line 1", f"this is a {ORACLE_FORMAT} file (several scenarios): load it with "
                                           "vtd_emu.importers.qemu_scenario.load_scenarios")
    if kind == "npz":
        trace = _load_npz(p)
    elif kind == "jsonl":
        trace = _load_jsonl(p)
    else:
        trace = _load_yaml(p)
    check_references(trace)
    return trace


def check_references(trace: Trace) -> None:
    """Every ``data_from`` of a write DMA names an earlier read DMA of the same ``len``; else a
    :class:`TraceError` at the write."""
    refs: dict[int, Event] = {}
    n = 0
    for ev in trace.events:
        if isinstance(ev, DmaBlock):
            n += len(ev)
            continue
        k = ev.fields.get("data_from") if ev.op == "dma" else None
        if k is not None:
            if k >= n:
                raise TraceError(trace.source, f"{ev.where or f'event {n}'} (dma) field 'data_from'",
                                 f"expected the number of an earlier event (< {n}), got {k}")
            refs.setdefault(k, ev)
        n += 1
    if not refs:
        return
    lengths: dict[int, int | None] = {}   # referenced event number -> its len if it is a read DMA
    n = 0
    for ev in trace.events:
        if isinstance(ev, DmaBlock):
            for k in refs:
                if n <= k < n + len(ev):
                    lengths[k] = None if ev.write[k - n] else int(ev.length[k - n])
            n += len(ev)
            continue
        if n in refs:
            lengths[n] = ev.fields["len"] if ev.op == "dma" and ev.fields["dir"] == "read" else None
        n += 1
    for k, ev in refs.items():
        if lengths.get(k) != ev.fields["len"]:
            raise TraceError(trace.source, f"{ev.where or 'event'} (dma) field 'data_from'",
                             f"event {k} is not a read DMA of len {ev.fields['len']}")


def _header(doc: Any, file: str, where: str) -> tuple[TraceConfig, str, str, str]:
    if not isinstance(doc, dict):
        raise TraceError(file, where, f"expected a mapping with format: {FORMAT}")
    fmt = doc.get("format")
    if fmt not in FORMATS:
        if isinstance(fmt, str) and fmt.startswith("vtd-trace/"):
            readable = " and ".join(FORMATS)
            raise TraceError(file, where, f"format {fmt!r} is not supported; this version reads {readable}")
        raise TraceError(file, where, f"expected format: {FORMAT}, got {fmt!r}")
    name = doc.get("name", "")
    desc = doc.get("description", "")
    if not isinstance(name, str) or not isinstance(desc, str):
        raise TraceError(file, where, "'name' and 'description' must be strings")
    return parse_config(doc.get("config"), file, f"{where} config" if where else "config"), name, desc, fmt


def _read_text(p: Path) -> str:
    try:
        return p.read_text()
    except OSError as exc:
        raise TraceError(str(p), "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TraceError(str(p), "", "not a text file") from None


def _load_jsonl(p: Path) -> Trace:
    file = str(p)
    text = _read_text(p)
    lines = text.splitlines()
    events: list[Event | DmaBlock] = []
    header = None
    n_ev = 0
    # An imported log repeats lines by the thousand (the same interrupt, the same hit): a line seen recently
    # is the same event again, only its place differs (its dicts are copied, their values shared).
    memo: dict[str, Event] = {}
    for ln, line in enumerate(lines, 1):
        seen = memo.get(line)
        if seen is not None:
            events.append(Event(seen.op, dict(seen.fields), None if seen.expect is None else dict(seen.expect),
                                seen.note, f"line {ln} (event {n_ev})"))
            n_ev += 1
            continue
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(file, f"line {ln}", f"invalid JSON: {exc.msg} at column {exc.colno}") from None
        if header is None:
            header = _header(doc, file, f"line {ln}")
            extra = set(doc) - {"format", "name", "description", "config"}
            if extra:
                raise TraceError(file, f"line {ln}", f"unknown header key {sorted(extra)[0]!r}; events follow "
                                                    "on their own lines")
            continue
        ev = parse_event(doc, file, f"line {ln} (event {n_ev})")
        events.append(ev)
        n_ev += 1
        if len(memo) >= JSONL_MEMO_LINES:
            memo.clear()
        memo[line] = ev
    if header is None:
        raise TraceError(file, "line 1", f"empty file; expected a header line with format: {FORMAT}")
    cfg, name, desc, fmt = header
    t = Trace(cfg, events, name, desc, file)
    _check_version(t, fmt)
    return t


JSONL_MEMO_LINES = 4096
"""Distinct event lines :func:`_load_jsonl` remembers the validated event of (then it starts over)."""


def _yaml_load(text: str) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader


def _yaml_event_lines(text: str) -> list[int]:
    """1-based line of each item of the top-level ``events`` list (for messages only)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return []
    if not isinstance(node, yaml.MappingNode):
        return []
    for k, v in node.value:
        if getattr(k, "value", None) == "events" and isinstance(v, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in v.value]
    return []


def _load_yaml(p: Path) -> Trace:
    import yaml

    file = str(p)
    text = _read_text(p)
    try:
        doc = _yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise TraceError(file, where, f"invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    cfg, name, desc, fmt = _header(doc, file, "")
    extra = set(doc) - {"format", "name", "description", "config", "events"}
    if extra:
        raise TraceError(file, str(sorted(extra)[0]), "unknown top-level key; expected format, name, description, "
                                                      "config, events")
    raw = doc.get("events") or []
    if not isinstance(raw, list):
        raise TraceError(file, "events", "expected a list of events")
    lines: list[int] | None = None
    events: list[Event | DmaBlock] = []
    for i, ev in enumerate(raw):
        try:
            events.append(parse_event(ev, file, f"event {i}"))
        except TraceError as exc:
            if lines is None:
                lines = _yaml_event_lines(text)
            if i < len(lines):
                raise TraceError(file, f"line {lines[i]} {exc.where}", exc.message) from None
            raise
    t = Trace(cfg, events, name, desc, file)
    _check_version(t, fmt)
    return t


def _npz_arrays(p: Path) -> dict[str, np.ndarray]:
    file = str(p)
    try:
        with zipfile.ZipFile(p) as zf:
            total = sum(i.file_size for i in zf.infolist())
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise TraceError(file, "", f"not a readable .npz trace: {exc}") from None
    if total > MAX_NPZ_BYTES:
        raise TraceError(file, "", f"arrays of {total:#x} bytes uncompressed; a .npz trace holds at most "
                                   f"{MAX_NPZ_BYTES:#x}")
    arrays: dict[str, np.ndarray] = {}
    name = ""
    try:
        with np.load(p, allow_pickle=False) as z:
            for name in z.files:
                arrays[name] = z[name]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, KeyError) as exc:
        # A damaged member (bad deflate data, a CRC mismatch, a bad .npy header) names the array.
        raise TraceError(file, name, f"not a readable .npz trace: {type(exc).__name__}: {exc}") from None
    unknown = sorted(set(arrays) - _NPZ_ARRAYS)
    if unknown:
        raise TraceError(file, unknown[0], f"unknown array; a vtd-trace .npz holds {sorted(_NPZ_ARRAYS)}")
    for k, a in arrays.items():
        if a.ndim != 1:
            raise TraceError(file, k, f"expected a one-dimensional array, got shape {a.shape}")
    return arrays


_COLS = {"dma_sid": np.uint32, "dma_pasid": np.int32, "dma_iova": np.uint64, "dma_len": np.uint32,
         "dma_write": np.bool_, "dma_priv": np.bool_, "dma_data_off": np.int64, "dma_data": np.uint8}
_EXP_COLS = {"exp_flags": np.uint8, "exp_faults_ptr": np.int64, "exp_faults": np.uint16, "exp_addrs_ptr": np.int64,
             "exp_addrs": np.int64, "exp_data_ptr": np.int64, "exp_data": np.uint8}
_NPZ_ARRAYS = frozenset({"header", *_COLS, *_EXP_COLS})


def _load_npz(p: Path) -> Trace:
    file = str(p)
    arrs = _npz_arrays(p)
    if "header" not in arrs:
        raise TraceError(file, "", "missing the 'header' array (JSON); not a vtd-trace .npz")
    try:
        doc = json.loads(arrs["header"].tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(file, "header", f"invalid JSON: {exc}") from None
    cfg, name, desc, fmt = _header(doc, file, "header")
    for k, dt in {**_COLS, **_EXP_COLS}.items():
        if k in arrs and arrs[k].dtype != dt:
            raise TraceError(file, k, f"expected dtype {np.dtype(dt).name}, got {arrs[k].dtype.name}")
    missing = [k for k in _COLS if k not in arrs]
    if missing:
        raise TraceError(file, missing[0], "missing DMA column")
    n = arrs["dma_sid"].shape[0]
    for k in _COLS:
        if k != "dma_data" and arrs[k].shape != (n,):
            raise TraceError(file, k, f"expected {n} rows like dma_sid, got shape {arrs[k].shape}")
    has_exp = any(k in arrs for k in _EXP_COLS)
    if has_exp:
        miss = [k for k in _EXP_COLS if k not in arrs]
        if miss:
            raise TraceError(file, miss[0], "missing expectation column")
        if arrs["exp_flags"].shape != (n,):
            raise TraceError(file, "exp_flags", f"expected {n} rows like dma_sid, got shape {arrs['exp_flags'].shape}")
        for k in ("exp_faults_ptr", "exp_addrs_ptr", "exp_data_ptr"):
            ptr = arrs[k]
            vals = arrs[k.replace("_ptr", "")]
            if ptr.shape != (n + 1,) or ptr[0] != 0 or ptr[-1] != vals.shape[0] or (n and (np.diff(ptr) < 0).any()):
                raise TraceError(file, k, f"expected {n + 1} non-decreasing offsets from 0 to {vals.shape[0]}")
    length = arrs["dma_len"]
    off = arrs["dma_data_off"]
    wr = arrs["dma_write"]
    blob = arrs["dma_data"]
    bad = np.flatnonzero((length == 0) | (length > MAX_ACCESS_BYTES) | (wr & ((off < 0) | (off + length.astype(np.int64) > blob.shape[0])))
                         | (~wr & (off != -1)) | (arrs["dma_pasid"] < -1) | (arrs["dma_pasid"] >= 1 << 20)
                         | (arrs["dma_sid"] > 0xFFFF) | (arrs["dma_priv"] & (arrs["dma_pasid"] < 0))
                         | (arrs["dma_iova"] > np.uint64(_U64) - length.astype(np.uint64) + np.uint64(1)))
    raw = doc.get("events")
    if not isinstance(raw, list):
        raise TraceError(file, "header events", "expected a list of events")
    events: list[Event | DmaBlock] = []
    idx = 0
    used = 0
    for j, ev in enumerate(raw):
        if isinstance(ev, dict) and ev.get("op") == "dma_rows":
            rows = ev.get("rows")
            if not (isinstance(rows, list) and len(rows) == 2 and all(isinstance(x, int) for x in rows)):
                raise TraceError(file, f"header event {j}", "dma_rows: expected rows: [start, count]")
            a, cnt = rows
            if a != used or cnt <= 0 or a + cnt > n:
                raise TraceError(file, f"header event {j}", f"dma_rows: expected rows [{used}, 1..{n - used}], got {rows}")
            if bad.size and a <= bad[0] < a + cnt:
                r = int(bad[0])
                raise TraceError(file, f"event {idx + r - a} (dma row {r})", _bad_row_reason(arrs, r))
            blk = DmaBlock(arrs["dma_sid"][a:a + cnt], arrs["dma_pasid"][a:a + cnt], arrs["dma_iova"][a:a + cnt],
                           length[a:a + cnt], wr[a:a + cnt], arrs["dma_priv"][a:a + cnt], off[a:a + cnt], blob,
                           where=f"event {idx}")
            if has_exp:
                whole = DmaBlock(blk.sid, blk.pasid, blk.iova, blk.length, blk.write, blk.priv, blk.data_off, blob,
                                 arrs["exp_flags"], arrs["exp_faults_ptr"], arrs["exp_faults"], arrs["exp_addrs_ptr"],
                                 arrs["exp_addrs"], arrs["exp_data_ptr"], arrs["exp_data"])
                part = whole.slice(a, a + cnt)
                blk.exp_flags, blk.exp_faults_ptr, blk.exp_faults = part.exp_flags, part.exp_faults_ptr, part.exp_faults
                blk.exp_addrs_ptr, blk.exp_addrs = part.exp_addrs_ptr, part.exp_addrs
                blk.exp_data_ptr, blk.exp_data = part.exp_data_ptr, part.exp_data
            events.append(blk)
            used += cnt
            idx += cnt
        else:
            events.append(parse_event(ev, file, f"event {idx}"))
            idx += 1
    if used != n:
        raise TraceError(file, "header events", f"dma_rows cover {used} of the {n} DMA rows")
    t = Trace(cfg, events, name, desc, file)
    _check_version(t, fmt)
    return t


def _bad_row_reason(arrs: dict[str, np.ndarray], r: int) -> str:
    if arrs["dma_len"][r] == 0:
        return "len: expected at least 1 byte"
    if arrs["dma_len"][r] > MAX_ACCESS_BYTES:
        return f"len: expected at most {MAX_ACCESS_BYTES:#x} bytes (the limit of one access)"
    if arrs["dma_sid"][r] > 0xFFFF:
        return "sid: expected a 16-bit value"
    if not -1 <= arrs["dma_pasid"][r] < 1 << 20:
        return "pasid: expected -1 (none) or a 20-bit PASID"
    if arrs["dma_priv"][r] and arrs["dma_pasid"][r] < 0:
        return "priv: a privileged request carries a PASID"
    if int(arrs["dma_iova"][r]) + int(arrs["dma_len"][r]) > 1 << 64:
        return "iova + len goes beyond the 64-bit address space"
    if arrs["dma_write"][r]:
        return "data_off: a write's payload must lie inside dma_data"
    return "data_off: a read has no payload (expected -1)"


def check_trace(trace: Trace) -> None:
    """Validate a trace built in memory (by an importer) exactly as loading it from a file would: its
    config and every event, through their canonical form.  A trace that passes is one replay accepts."""
    file = trace.source
    parse_config(config_to_dict(trace.config), file)
    idx = 0
    for ev in trace.events:
        if isinstance(ev, DmaBlock):
            idx += len(ev)
            continue
        parse_event(event_to_dict(ev), file, ev.where or f"event {idx}")
        idx += 1


def _header_doc(trace: Trace) -> dict[str, Any]:
    d: dict[str, Any] = {"format": FORMAT2 if uses_v2(trace) else FORMAT}
    if trace.name:
        d["name"] = trace.name
    if trace.description:
        d["description"] = trace.description
    d["config"] = config_to_dict(trace.config)
    return d


def save_trace(trace: Trace, path: str | Path, kind: str | None = None) -> None:
    """Write ``trace`` as YAML, JSON Lines or ``.npz`` (from ``kind``, else the file name's extension)."""
    p = Path(path)
    kind = kind or kind_from_name(p)
    if kind is None:
        raise TraceError(str(p), "", "cannot tell the encoding from the name: use .yaml, .jsonl or .npz")
    if kind == "npz":
        _save_npz(trace, p)
        return
    if kind == "jsonl":
        with p.open("w") as fh:
            fh.write(json.dumps(_header_doc(trace), separators=(",", ":")) + "\n")
            for ev in trace.iter_events():
                fh.write(json.dumps(event_to_dict(ev), separators=(",", ":")) + "\n")
        return
    if kind == "yaml":
        p.write_text(dump_yaml(trace))
        return
    raise TraceError(str(p), "", f"unknown encoding {kind!r}; expected yaml, jsonl or npz")


# -- streaming JSON Lines ------------------------------------------------------------------------------


def _hex_list(v: list[int | None]) -> str:
    return ",".join("null" if a is None else f'"{a:#x}"' for a in v)


_LINE_DMA_EXPECT = frozenset(("faults", "addrs", "walks"))
_LINE_DMA_WALKED = ("faults", "addrs", "walks")
_LINE_MSI_EXPECT = frozenset(("msi_addr", "msi_data", "ir_fault"))


def event_line(ev: Event) -> str:
    """``json.dumps(event_to_dict(ev), separators=(",", ":"))``, written directly for what a log import
    emits by the hundred thousand (qword writes, reads with translation expectations, MSIs)."""
    f, op, exp = ev.fields, ev.op, ev.expect
    if ev.note is None:
        if op == "mem_write" and "qwords" in f and exp is None:
            return f'{{"op":"mem_write","addr":"{f["addr"]:#x}","qwords":[{_hex_list(f["qwords"])}]}}'
        if op == "dma" and f["dir"] == "read" and f.get("pasid") is None and not f.get("priv") \
                and "data_from" not in f and exp is not None and exp.keys() <= _LINE_DMA_EXPECT:
            if tuple(exp) == _LINE_DMA_WALKED and not exp["faults"] and len(exp["addrs"]) == 1 \
                    and exp["addrs"][0] is not None:
                # A translated read with its IOTLB outcome: the import's most common line.
                return (f'{{"op":"dma","sid":"{f["sid"]:#x}","iova":"{f["iova"]:#x}","len":{f["len"]},'
                        f'"dir":"read","expect":{{"faults":[],"addrs":["{exp["addrs"][0]:#x}"],'
                        f'"walks":{exp["walks"]}}}}}')
            parts = []
            for k, v in exp.items():
                parts.append(f'"{k}":{v}' if k == "walks" else f'"{k}":[{_hex_list(v)}]')
            return (f'{{"op":"dma","sid":"{f["sid"]:#x}","iova":"{f["iova"]:#x}","len":{f["len"]},"dir":"read",'
                    f'"expect":{{{",".join(parts)}}}}}')
        if op == "msi" and exp is not None and exp.keys() <= _LINE_MSI_EXPECT:
            ex = ",".join(f'"{k}":' + ("null" if v is None else f'"{v:#x}"') for k, v in exp.items())
            return f'{{"op":"msi","sid":"{f["sid"]:#x}","addr":"{f["addr"]:#x}","data":"{f["data"]:#x}","expect":{{{ex}}}}}'
    return json.dumps(event_to_dict(ev), separators=(",", ":"))


JSONL_BUFFER_LINES = 4096
"""Lines :func:`write_jsonl` gathers before each write."""


def write_jsonl(path: str | Path, config: TraceConfig, events: Iterable[Event], name: str = "",
                description: str = "") -> int:
    """Write a JSON Lines trace from an event stream (constant memory: nothing is held); the number of
    events written."""
    head: dict[str, Any] = {"format": FORMAT}
    if name:
        head["name"] = name
    if description:
        head["description"] = description
    head["config"] = config_to_dict(config)
    n = 0
    with Path(path).open("w") as fh:
        fh.write(json.dumps(head, separators=(",", ":")) + "\n")
        buf: list[str] = []
        for ev in events:
            buf.append(event_line(ev))
            if len(buf) >= JSONL_BUFFER_LINES:
                fh.write("\n".join(buf) + "\n")
                n += len(buf)
                buf.clear()
        if buf:
            fh.write("\n".join(buf) + "\n")
            n += len(buf)
    return n


def dump_yaml(trace: Trace) -> str:
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    head = yaml.dump(_header_doc(trace), Dumper=dumper, sort_keys=False, width=120)
    buf = io.StringIO()
    buf.write(head)
    buf.write("events:\n")
    # One event per line (flow style): diffs stay readable and hand edits local.
    for ev in trace.iter_events():
        line = yaml.dump(event_to_dict(ev), Dumper=dumper, sort_keys=False, default_flow_style=True,
                         width=1 << 30).strip()
        buf.write(f"- {line}\n")
    return buf.getvalue()


def _save_npz(trace: Trace, p: Path) -> None:
    blocks: list[DmaBlock] = []
    header_events: list[dict[str, Any]] = []
    rows = 0
    for ev in blockify(trace.events):
        if isinstance(ev, DmaBlock):
            blocks.append(ev)
            header_events.append({"op": "dma_rows", "rows": [rows, len(ev)]})
            rows += len(ev)
        else:
            header_events.append(event_to_dict(ev))
    head = _header_doc(trace)
    head["events"] = header_events
    cols: dict[str, np.ndarray] = {"header": np.frombuffer(json.dumps(head).encode(), np.uint8)}
    if blocks:
        datas = []
        offs = []
        base = 0
        for b in blocks:
            # Keep only each block's own payload bytes, in row order, so files never carry dead bytes.
            wr = b.write
            lens = b.length.astype(np.int64)
            src = b.data_off
            new_off = np.full(len(b), -1, np.int64)
            if wr.any():
                wl = np.where(wr, lens, 0)
                starts = np.cumsum(wl) - wl
                new_off[wr] = base + starts[wr]
                datas.append(_gather_payload(b.data, src[wr], lens[wr]))
                base += int(wl.sum())
            offs.append(new_off)
        cols["dma_sid"] = np.concatenate([b.sid for b in blocks]).astype(np.uint32)
        cols["dma_pasid"] = np.concatenate([b.pasid for b in blocks]).astype(np.int32)
        cols["dma_iova"] = np.concatenate([b.iova for b in blocks]).astype(np.uint64)
        cols["dma_len"] = np.concatenate([b.length for b in blocks]).astype(np.uint32)
        cols["dma_write"] = np.concatenate([b.write for b in blocks]).astype(np.bool_)
        cols["dma_priv"] = np.concatenate([b.priv for b in blocks]).astype(np.bool_)
        cols["dma_data_off"] = np.concatenate(offs)
        cols["dma_data"] = np.concatenate(datas) if datas else np.zeros(0, np.uint8)
        if any(b.has_expect for b in blocks):
            _concat_expects(blocks, cols)
    else:
        for k, dt in _COLS.items():
            cols[k] = np.zeros(0, dt)
    with p.open("wb") as fh:
        np.savez_compressed(fh, **cols)  # type: ignore[arg-type]


def _gather_payload(blob: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    if not len(starts):
        return np.zeros(0, np.uint8)
    if (lens == lens[0]).all():
        idx = starts[:, None] + np.arange(int(lens[0]))[None, :]
        return blob[idx].reshape(-1)
    return np.concatenate([blob[s:s + n] for s, n in zip(starts.tolist(), lens.tolist())])


def _concat_expects(blocks: list[DmaBlock], cols: dict[str, np.ndarray]) -> None:
    flags, fps, fvs, aps, avs, dps, dvs = [], [], [], [], [], [], []
    fbase = abase = dbase = 0
    for b in blocks:
        n = len(b)
        if b.exp_flags is None:
            flags.append(np.zeros(n, np.uint8))
            fps.append(np.full(n, fbase, np.int64))
            aps.append(np.full(n, abase, np.int64))
            dps.append(np.full(n, dbase, np.int64))
            continue
        assert b.exp_faults_ptr is not None and b.exp_addrs_ptr is not None and b.exp_data_ptr is not None
        assert b.exp_faults is not None and b.exp_addrs is not None and b.exp_data is not None
        flags.append(b.exp_flags)
        fps.append(b.exp_faults_ptr[:-1] + fbase)
        aps.append(b.exp_addrs_ptr[:-1] + abase)
        dps.append(b.exp_data_ptr[:-1] + dbase)
        fvs.append(b.exp_faults)
        avs.append(b.exp_addrs)
        dvs.append(b.exp_data)
        fbase += int(b.exp_faults_ptr[-1])
        abase += int(b.exp_addrs_ptr[-1])
        dbase += int(b.exp_data_ptr[-1])
    cols["exp_flags"] = np.concatenate(flags).astype(np.uint8)
    cols["exp_faults_ptr"] = np.concatenate(fps + [np.array([fbase], np.int64)])
    cols["exp_faults"] = np.concatenate(fvs).astype(np.uint16) if fvs else np.zeros(0, np.uint16)
    cols["exp_addrs_ptr"] = np.concatenate(aps + [np.array([abase], np.int64)])
    cols["exp_addrs"] = np.concatenate(avs).astype(np.int64) if avs else np.zeros(0, np.int64)
    cols["exp_data_ptr"] = np.concatenate(dps + [np.array([dbase], np.int64)])
    cols["exp_data"] = np.concatenate(dvs).astype(np.uint8) if dvs else np.zeros(0, np.uint8)


def canonical_events(trace: Trace) -> list[dict[str, Any]]:
    """Every event as its canonical mapping: equal lists mean semantically equal traces."""
    return [event_to_dict(ev) for ev in trace.iter_events()]


__all__ = ["FORMAT", "FORMAT2", "FORMATS", "VMM_OPS", "VMM_EXPECT", "ORACLE_FORMAT", "Event", "DmaBlock", "Trace",
           "TraceConfig", "OPS", "EXPECT_KEYS", "HOST_CALLS",
           "parse_event", "parse_config", "event_to_dict", "expect_to_dict", "config_to_dict", "block_from_events",
           "blockify", "load_trace", "check_references", "save_trace", "detect_kind", "kind_from_name",
           "canonical_events", "dump_yaml"]
