"""A trace's replay as Chrome / Perfetto trace-event JSON (``vtd-emu timeline``).

Time is the event number (one microsecond per event), so timelines are deterministic and line up with
the event numbers ``replay --check`` prints.  Tracks (``tid``) in process 1 ("vtd-emu"):

* one per requester id: DMAs as complete events (``ph: "X"``) named ``dma read`` / ``dma write``;
* ``faults``: one instant (``ph: "i"``) per faulting chunk, named by reason;
* ``invalidations``: one instant per queued descriptor (by type) and per register-based invalidation;
* ``page requests``: page requests (with the queue's answer) and page responses;
* ``mmio``: register writes; checkpoints are global instants.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..vtd.faults import reason_name
from .model import DmaBlock, Event, Trace
from ..spec.loader import specs
from .replay import DESC_TYPE_NAMES, Replayer, descriptor_type

_PID = 1
TID_FAULTS, TID_INV, TID_PRQ, TID_MMIO = 1 << 20, (1 << 20) + 1, (1 << 20) + 2, (1 << 20) + 3
_CCMD = specs().registers["CCMD"].resolve_offset(0, 0)  # fixed; the IOTLB registers move with ECAP.IRO


def build_timeline(trace: Trace, *, profile: str | None = None, batch: bool = True) -> dict[str, Any]:
    rp = Replayer(trace, profile=profile, batch=batch, record=True)
    res = rp.run()
    rec = res.recorded
    assert rec is not None
    io = rp.io
    iotlb_reg = io.cfg.ecap_field("IRO") * 16 + 8
    out: list[dict[str, Any]] = []
    sids: set[int] = set()
    ts = 0

    def instant(tid: int, name: str, t: int, args: dict[str, Any], scope: str = "t") -> None:
        out.append({"name": name, "ph": "i", "s": scope, "ts": t, "pid": _PID, "tid": tid, "args": args})

    for ev in rec.events:
        if isinstance(ev, DmaBlock):
            ts = _block(ev, ts, out, sids)
            continue
        _event(ev, ts, out, sids, instant, iotlb_reg)
        ts += 1
    meta = [{"name": "process_name", "ph": "M", "pid": _PID, "tid": 0, "args": {"name": "vtd-emu"}}]
    names = {TID_FAULTS: "faults", TID_INV: "invalidations", TID_PRQ: "page requests", TID_MMIO: "mmio"}
    for tid, name in names.items():
        meta.append({"name": "thread_name", "ph": "M", "pid": _PID, "tid": tid, "args": {"name": name}})
    for sid in sorted(sids):
        meta.append({"name": "thread_name", "ph": "M", "pid": _PID, "tid": sid,
                     "args": {"name": f"dma {sid >> 8:02x}:{(sid >> 3) & 31:02x}.{sid & 7} (sid {sid:#06x})"}})
    st = res.stats
    return {"traceEvents": meta + out, "displayTimeUnit": "ms",
            "otherData": {"trace": trace.name, "source": trace.source, "events": res.events,
                          "dmas": st.dmas, "faults": sum(st.faults.values())}}


def _event(ev: Event, ts: int, out: list[dict[str, Any]], sids: set[int], instant: Any, iotlb_reg: int) -> None:
    f = ev.fields
    op = ev.op
    exp = ev.expect or {}
    if op == "dma":
        sid = f["sid"]
        sids.add(sid)
        args: dict[str, Any] = {"event": ts, "iova": hex(f["iova"]), "len": f["len"]}
        if f.get("pasid") is not None:
            args["pasid"] = hex(f["pasid"])
        faults = exp.get("faults", [])
        if faults:
            args["faults"] = [hex(x) for x in faults]
        out.append({"name": f"dma {f['dir']}", "ph": "X", "ts": ts, "dur": 0.8, "pid": _PID, "tid": sid,
                    "args": args})
        for r in faults:
            instant(TID_FAULTS, f"fault {r:#x} {reason_name(r)}", ts,
                    {"event": ts, "sid": hex(sid), "iova": hex(f["iova"])})
    elif op == "qi_submit":
        for d in f["descriptors"]:
            t = descriptor_type(d[0])
            instant(TID_INV, DESC_TYPE_NAMES.get(t, f"type {t:#x}"), ts,
                    {"event": ts, "qwords": [hex(q) for q in d]})
    elif op == "mmio_write":
        off, val, size = f["offset"], f["value"], f["size"]
        instant(TID_MMIO, f"write {off:#x}", ts, {"event": ts, "value": hex(val), "size": size})
        if _covers_bit63(off, size, val, _CCMD):
            instant(TID_INV, "context-cache (register)", ts, {"event": ts, "value": hex(val)})
        if _covers_bit63(off, size, val, iotlb_reg):
            instant(TID_INV, "iotlb (register)", ts, {"event": ts, "value": hex(val)})
    elif op == "page_request":
        instant(TID_PRQ, f"page request {exp.get('status', '')}".strip(), ts,
                {"event": ts, "sid": hex(f["sid"]), "addr": hex(f["addr"]), "prgi": f["prgi"], "last": f["last"]})
    elif op == "page_response":
        instant(TID_PRQ, "page response", ts, {"event": ts, "sid": hex(f["sid"]), "prgi": f["prgi"],
                                               "code": f["code"]})
    elif op == "checkpoint":
        instant(TID_MMIO, f"checkpoint {f.get('name') or ''}".strip(), ts, {"event": ts}, "g")


def _covers_bit63(off: int, size: int, val: int, reg: int) -> bool:
    """Whether an MMIO write sets bit 63 of the 64-bit register at ``reg`` (the ICC / IVT bits)."""
    if size == 8 and off == reg:
        return bool(val >> 63 & 1)
    if size == 4 and off == reg + 4:
        return bool(val >> 31 & 1)
    return False


def _block(blk: DmaBlock, ts0: int, out: list[dict[str, Any]], sids: set[int]) -> int:
    n = len(blk)
    sid = blk.sid.tolist()
    iova = blk.iova.tolist()
    ln = blk.length.tolist()
    wr = blk.write.tolist()
    pasid = blk.pasid.tolist()
    sids.update(set(sid))
    fptr = blk.exp_faults_ptr
    fv = blk.exp_faults
    for i in range(n):
        ts = ts0 + i
        args: dict[str, Any] = {"event": ts, "iova": hex(iova[i]), "len": ln[i]}
        if pasid[i] >= 0:
            args["pasid"] = hex(pasid[i])
        faults: list[int] = []
        if fptr is not None and fv is not None and fptr[i + 1] > fptr[i]:
            faults = [int(x) for x in fv[int(fptr[i]):int(fptr[i + 1])]]
            args["faults"] = [hex(x) for x in faults]
        out.append({"name": "dma write" if wr[i] else "dma read", "ph": "X", "ts": ts, "dur": 0.8, "pid": _PID,
                    "tid": sid[i], "args": args})
        for r in faults:
            out.append({"name": f"fault {r:#x} {reason_name(r)}", "ph": "i", "s": "t", "ts": ts, "pid": _PID,
                        "tid": TID_FAULTS, "args": {"event": ts, "sid": hex(sid[i]), "iova": hex(iova[i])}})
    return ts0 + n


def write_timeline(trace: Trace, path: str | Path, **kwargs: Any) -> dict[str, Any]:
    doc = build_timeline(trace, **kwargs)
    with Path(path).open("w") as fh:
        json.dump(doc, fh, separators=(",", ":"))
    return doc


__all__ = ["build_timeline", "write_timeline"]
