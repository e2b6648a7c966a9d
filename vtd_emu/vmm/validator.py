"""The vSVA validator: the chip's stale-cache sanitizer extended to whole vIOMMU flows (``docs/vmm.md``,
"Validator").

Off by default and free when off: nothing of it exists until :class:`Validator` is attached to a
:class:`~vtd_emu.vmm.Machine`, which then installs its hooks as instance attributes (the sanitizers'
``xlate``, the machine's ``mmio_write``) and observers; a machine without one runs the plain paths.

Each finding is a :class:`VsvaReport` naming the guest action that caused it (the machine's
``guest_actions`` count, and the trace event number, :attr:`Validator.event`, or the index in a
:class:`~vtd_emu.vmm.GuestDriver`'s log, :attr:`Validator.log`):

=======================  ==================================================================================
kind                     when
=======================  ==================================================================================
``stale-viommu``         the vIOMMU answered an emulated device's DMA from a cache entry memory no longer
                         supports (the chip sanitizer's :class:`~vtd_emu.vtd.results.StaleHit`)
``stale-host``           the physical IOMMU answered a passthrough DMA from a stale nested IOTLB entry (its
                         own sanitizer): the guest changed its first-stage table without the PASID-based
                         IOTLB invalidation the bridge would have forwarded
``entry-changed``        a context or PASID entry in use (bound on the host, or held in the vIOMMU's
                         context / PASID cache) changed and was used by a DMA, or met an invalidation wait,
                         before a context-cache / PASID-cache invalidation covering it
``torn-update``          a present entry in use was rewritten in place by more than one write with P
                         staying 1 (a DMA between the writes could see a mix of old and new), instead of
                         clear P, invalidate, rewrite
``reserved-bits``        a descriptor the guest queued, or a context / PASID (directory) entry the guest made
                         present, has reserved bits set (the chip's own masks and decode)
``wrong-granularity``    a page-selective PASID-based IOTLB invalidation where the change needs PASID scope
                         (the PASID entry itself changed); a page-selective type-2 IOTLB invalidation of a
                         DID bound as first stage (it drops every first-stage entry of the DID: use type 6);
                         AM above CAP.MAMV; an address not aligned to 2^AM pages
``bind-refused``         the host refused a bind (``hwpt_alloc``/``attach``/``replace`` errno)
``forward-failed``       a forwarded invalidation (``hwpt_invalidate``) failed
=======================  ==================================================================================
"""

from __future__ import annotations

import errno as errno_mod
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from ..memory import RecordingMemory
from ..spec import specs
from ..spec.consts import FR, IQA, IQT
from ..vtd.access import NO_PASID
from ..vtd.caches import sid_matches
from ..vtd.descriptors import (ContextInvalidation, ControlEvent, Invalidation, InvalidationWait, IotlbInvalidation,
                               PasidCacheInvalidation, PasidIotlbInvalidation, RootTableLatched,
                               TranslationEnableChanged, UnitReset)
from ..vtd.entries import CTX_LEGACY, REASON_MASK
from ..vtd.faults import reason_name
from ..vtd.qi import T_IOTLB, T_PIOTLB, TYPE_NAMES, InvalidationQueue
from ..vtd.results import StaleHit
from .bridge import KIND_BLOCKED, KIND_NESTED, BridgeAction

if TYPE_CHECKING:
    from .machine import Machine

KINDS = ("stale-viommu", "stale-host", "entry-changed", "torn-update", "reserved-bits", "wrong-granularity",
         "bind-refused", "forward-failed")
_BIND_CALLS = frozenset({"hwpt_alloc", "attach", "replace"})
_RSVD_REASONS = frozenset({FR.ROOT_ENTRY_RSVD, FR.CONTEXT_ENTRY_RSVD, FR.SM_ROOT_ENTRY_RSVD,
                           FR.SM_CONTEXT_ENTRY_RSVD, FR.SM_PASID_DIR_ENTRY_RSVD, FR.SM_PASID_ENTRY_RSVD})
_CTX, _PASID = "context", "pasid"


class VsvaReport(NamedTuple):
    """One validator finding."""

    kind: str
    """One of :data:`KINDS`."""
    action: int
    """The machine's ``guest_actions`` count when it was found (the guest action that caused it)."""
    event: int | None
    """The trace event number (replay), or the index in a GuestDriver's log of the driver action that
    caused it (:attr:`Validator.log`), else None."""
    sid: int | None
    """The guest requester id concerned."""
    pasid: int | None
    details: str
    cached: int | None = None
    """For stale translations: what the cache answered (output address, or -reason)."""
    fresh: int | None = None
    """For stale translations: what memory says now."""

    def text(self) -> str:
        where = f"event {self.event}" if self.event is not None else f"guest action {self.action}"
        who = "" if self.sid is None else f" sid {self.sid:#06x}"
        if self.sid is not None or self.pasid is not None:
            who += f" pasid {'-' if self.pasid is None else hex(self.pasid)}"
        ans = ""
        if self.cached is not None and self.fresh is not None:
            ans = f": cached {_answer(self.cached)}, memory says {_answer(self.fresh)}"
        return f"{where}: {self.kind}:{who}: {self.details}{ans}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self._asdict().items() if v is not None or k in ("sid", "pasid", "event")}


def _answer(value: int) -> str:
    return f"{value:#x}" if value >= 0 else f"fault {-value:#x} {reason_name(-value)}"


class _Sink(list[StaleHit]):
    """A sanitizer's ``stale_hits`` list that also hands every hit to the validator."""

    def __init__(self, on_hit: Callable[[StaleHit], None]) -> None:
        super().__init__()
        self._on_hit = on_hit

    def append(self, hit: StaleHit) -> None:
        super().append(hit)
        self._on_hit(hit)


class _Entry:
    """A context or PASID entry the unit may be using: where it is and what it went through since the
    last point where the unit could have read it."""

    __slots__ = ("kind", "sid", "pasid", "addr", "size", "dids", "dirty", "inplace", "torn")

    def __init__(self, kind: str, sid: int, pasid: int, addr: int, size: int, did: int | None) -> None:
        self.kind, self.sid, self.pasid, self.addr, self.size = kind, sid, pasid, addr, size
        self.dids: set[int] = set() if did is None else {did}
        self.dirty: str | None = None
        self.inplace = 0
        self.torn = False


class Validator:
    """Watches one machine's vSVA flows.  ``Validator(machine)`` attaches it (both sanitizers on, hooks
    installed); give the guest :attr:`mem` as its memory so that its table writes are checked; set
    :attr:`event` to name the current step (replay does, with the event number), or :attr:`log` to a
    guest driver's log."""

    def __init__(self, machine: "Machine") -> None:
        self.m = machine
        self.reports: list[VsvaReport] = []
        self.event: int | None = None
        self.log: list[Any] | None = None
        """A :class:`~vtd_emu.vmm.GuestDriver`'s ``log``: while :attr:`event` is None, reports name the index
        of its last entry (the driver action that caused them)."""
        self.mem = RecordingMemory(machine.mem, self._guest_write, machine.size)
        """The guest memory to hand the guest: guest-physical memory whose writes are watched."""
        v, host = machine.viommu, machine.host
        self._entries: dict[tuple[str, int, int], _Entry] = {}
        self._pages: set[int] = set()
        self._stale = True
        self._seen_rsvd: set[tuple[str, int, int, int]] = set()
        # (did, pasid) whose PASID entry changed: until a PASID-scope IOTLB flush, a page-selective one is
        # the wrong granularity.
        self._needs_pasid_scope: set[tuple[int, int]] = set()
        v.enable_sanitizer()
        v.stale_hits = _Sink(self._viommu_hit)
        host.iommu.enable_sanitizer()
        host.iommu.stale_hits = _Sink(self._host_hit)
        self._wrap_xlate(v, guest=True)
        self._wrap_xlate(host.iommu, guest=False)
        self._iqt, self._iqa = v.regs.offset_of("IQT"), v.regs.offset_of("IQA")
        inner_mmio = machine.mmio_write

        def mmio_write(offset: int, value: int, size: int = 4) -> None:
            # Descriptors are checked as the guest hands them over, before the unit fetches them.
            if offset == self._iqt and v.qi is not None:
                self._check_queue(value)
            inner_mmio(offset, value, size)

        machine.mmio_write = mmio_write  # type: ignore[method-assign]
        v.add_invalidation_observer(self._on_invalidation)
        v.add_control_observer(self._on_control)
        machine.bridge.listeners.append(self._on_action)

    # -- reports -----------------------------------------------------------------------------------
    def _report(self, kind: str, sid: int | None, pasid: int | None, details: str, cached: int | None = None,
                fresh: int | None = None) -> None:
        event = self.event
        if event is None and self.log:
            event = len(self.log) - 1
        self.reports.append(VsvaReport(kind, self.m.guest_actions, event, sid, pasid, details, cached, fresh))

    def summary(self) -> str:
        """One line per report, then the count by kind (or a line saying the flow was clean)."""
        if not self.reports:
            return "validator: no findings"
        lines = [r.text() for r in self.reports]
        by = Counter(r.kind for r in self.reports)
        lines.append(f"validator: {len(self.reports)} findings (" + ", ".join(f"{k} {by[k]}" for k in KINDS if by[k])
                     + ")")
        return "\n".join(lines)

    # -- stale translations ------------------------------------------------------------------------
    def _viommu_hit(self, h: StaleHit) -> None:
        self._report("stale-viommu", h.sid, h.pasid, f"iova {h.iova:#x} ({h.access}) answered from the vIOMMU's "
                                                     "caches", h.cached, h.fresh)

    def _guest_of(self, host_sid: int) -> int | None:
        return next((g for g, h in self.m.sid_map.items() if h == host_sid), None)

    def _host_hit(self, h: StaleHit) -> None:
        sid = self._guest_of(h.sid)
        self._report("stale-host", sid, h.pasid,
                     f"iova {h.iova:#x} ({h.access}) answered from the host's nested IOTLB (host sid {h.sid:#06x})",
                     h.cached, h.fresh)

    def _wrap_xlate(self, unit: Any, guest: bool) -> None:
        inner = unit.xlate

        def xlate(sid: int, ptag: int, iova: int, req: int) -> int:
            # A DMA is a point where the unit may read entries: check the ones it would use, and end any
            # run of in-place writes.
            if self._entries:
                gsid = sid if guest else self._guest_of(sid)
                if gsid is not None:
                    self._used(gsid, ptag)
            if guest:
                self._stale = True  # the vIOMMU may fill its context / PASID caches
            return int(inner(sid, ptag, iova, req))

        unit.xlate = xlate

    # -- entries in use ----------------------------------------------------------------------------
    def _in_use(self) -> list[tuple[int, int, int | None]]:
        """(guest sid, PASID index, DID) of every entry the bridge made host state from or the vIOMMU
        caches hold (PASID index -1: only the context entry is cached)."""
        out: dict[tuple[int, int], int | None] = {}
        for (sid, pasid), b in self.m.bridge.binds.items():
            if b.kind != KIND_BLOCKED:
                out[(sid, pasid)] = b.did
        c = self.m.viommu.caches
        for sid in list(c.context):
            out.setdefault((sid, -1), None)
        for (sid, pasid), pe in list(c.pasid.items()):
            out[(sid, pasid)] = pe.did
        return [(s, p, d) for (s, p), d in out.items()]

    def _refresh(self) -> None:
        """Locate every entry in use (cheap: a few reads each), keeping what was already known of them."""
        v = self.m.viommu
        old = self._entries
        new: dict[tuple[str, int, int], _Entry] = {}
        if v.te and not v.root_invalid:
            rd = v.mem.read_u64
            for sid, pasid, did in self._in_use():
                loc = self._context_addr(sid)
                if loc is None:
                    continue
                ca, csize = loc
                key = (_CTX, sid, 0)
                new[key] = old.get(key) or _Entry(_CTX, sid, 0, ca, csize, None)
                if pasid < 0 or csize == 16:
                    continue
                ctx = v.load_context(sid)
                if isinstance(ctx, int) or ctx.kind == CTX_LEGACY:
                    continue
                de = rd(ctx.pasid_dir + (pasid >> 6) * 8)  # type: ignore[union-attr]
                if de < 0 or not de & 1:
                    continue
                pa = (de & v.pdir_ptr) + (pasid & 63) * 64
                key = (_PASID, sid, pasid)
                e = old.get(key) or _Entry(_PASID, sid, pasid, pa, 64, did)
                if did is not None:
                    e.dids.add(did)
                new[key] = e
        self._entries = new
        self._pages = {a >> 12 for e in new.values() for a in (e.addr, e.addr + e.size - 1)}
        self._stale = False

    def _context_addr(self, sid: int) -> tuple[int, int] | None:
        v = self.m.viommu
        rd = v.mem.read_u64
        bus, devfn = sid >> 8, sid & 0xFF
        ra = v.root_addr + bus * 16
        lo, hi = rd(ra), rd(ra + 8)
        if lo < 0 or hi < 0:
            return None
        if not v.root_scalable:
            return ((lo & v.addr_mask) + devfn * 16, 16) if lo & 1 else None
        half = hi if devfn >= 128 else lo
        return ((half & v.addr_mask) + (devfn & 0x7F) * 32, 32) if half & 1 else None

    def touches(self, addr: int, n: int) -> bool:
        """Whether a write of ``n`` bytes at ``addr`` reaches a page holding an entry in use."""
        if self._stale:
            self._refresh()
        pages = self._pages
        return bool(pages) and any(p in pages for p in range(addr >> 12, ((addr + max(n, 1) - 1) >> 12) + 1))

    def _guest_write(self, addr: int, data: bytes, qword: bool) -> int:
        """One write of the guest (:attr:`mem`): stored, and checked when it reaches an entry in use."""
        mem = self.m.mem
        n = len(data)

        def store() -> int:
            if qword:
                return 8 if mem.write_u64(addr, int.from_bytes(data, "little")) else 0
            return int(mem.write(addr, data))

        if not self.touches(addr, n):
            return store()
        return self.guarded_write(addr, n, store)

    def guarded_write(self, addr: int, n: int, write: Callable[[], Any]) -> int:
        """Do the guest's write ``write`` of ``n`` bytes at ``addr``, checking the entries it changes."""
        hit = [e for e in self._entries.values() if e.addr < addr + n and addr < e.addr + e.size]
        rd = self.m.mem.read
        before = [rd(e.addr, e.size) for e in hit]
        done = int(write())
        for e, old in zip(hit, before):
            new = rd(e.addr, e.size)
            if new == old:
                continue
            if old[0] & 1 and new[0] & 1:
                e.inplace += 1
                if e.inplace == 2 and not e.torn:
                    e.torn = True
                    self._report("torn-update", e.sid, e.pasid if e.kind == _PASID else None,
                                 f"present {e.kind} entry at {e.addr:#x} rewritten in place by more than one write "
                                 "(P stayed 1): clear P, invalidate, then rewrite")
            if e.dirty is None:
                at = f"event {self.event}" if self.event is not None else f"guest action {self.m.guest_actions}"
                e.dirty = f"{e.kind} entry at {e.addr:#x} changed at {at}"
            if e.kind == _PASID and old[0] & 1:
                for did in e.dids:
                    self._needs_pasid_scope.add((did, e.pasid))
            if e.kind == _PASID and new[0] & 1:
                e.dids.add(_PASID_DID.get(int.from_bytes(new, "little")))
        return done

    def _sync_point(self) -> None:
        for e in self._entries.values():
            e.inplace = 0
            e.torn = False

    def _used(self, sid: int, ptag: int) -> None:
        """A DMA of ``sid`` (request PASID ``ptag``): report each of its entries changed and not invalidated."""
        for e in self._entries.values():
            if e.sid != sid:
                continue
            e.inplace = 0
            e.torn = False
            if e.dirty is None:
                continue
            if e.kind == _PASID and e.pasid != (0 if ptag == NO_PASID else ptag):
                continue
            self._dirty_report(e, "used by a DMA")

    def _dirty_report(self, e: _Entry, when: str) -> None:
        inv = "context-cache" if e.kind == _CTX else "PASID-cache"
        self._report("entry-changed", e.sid, e.pasid if e.kind == _PASID else None,
                     f"{e.dirty} and {when} without a {inv} invalidation")
        e.dirty = None

    # -- observers ---------------------------------------------------------------------------------
    def _on_invalidation(self, inv: Invalidation) -> None:
        self._sync_point()
        if isinstance(inv, PasidCacheInvalidation):
            for e in self._entries.values():
                if e.kind == _PASID and (inv.granularity == 3 or (inv.did in e.dids and (
                        inv.granularity == 0 or inv.pasid == e.pasid))):
                    e.dirty = None
            self._check_entries(None if inv.granularity != 1 else inv.pasid)
        elif isinstance(inv, ContextInvalidation):
            for e in self._entries.values():
                if e.kind == _CTX and (inv.done != 3 or sid_matches(e.sid, inv.sid, inv.fm)):
                    e.dirty = None
            self._check_entries(None)
        elif isinstance(inv, PasidIotlbInvalidation):
            key = (inv.did, inv.pasid)
            if inv.granularity == 3:
                self._check_range(inv.addr, inv.am, "PASID-based IOTLB", inv.did, inv.pasid)
                if key in self._needs_pasid_scope:
                    self._report("wrong-granularity", None, inv.pasid,
                                 f"page-selective PASID-based IOTLB invalidation (DID {inv.did}) after the PASID entry "
                                 "changed: the change needs PASID-selective scope")
            self._needs_pasid_scope.discard(key)
        elif isinstance(inv, IotlbInvalidation):
            if inv.granularity == 1:
                self._needs_pasid_scope.clear()
            else:
                self._needs_pasid_scope = {k for k in self._needs_pasid_scope if k[0] != inv.did}
            if inv.granularity == 3:
                self._check_range(inv.addr, inv.am, "IOTLB", inv.did, None)
                fs = [b for b in self.m.bridge.binds.values() if b.kind == KIND_NESTED and b.did == inv.did]
                if fs:
                    self._report("wrong-granularity", fs[0].sid, fs[0].pasid,
                                 f"page-selective type-2 IOTLB invalidation of DID {inv.did}, bound as first stage: it "
                                 "drops every first-stage entry of the DID (use a PASID-based IOTLB invalidation)")
        self._stale = True

    def _on_control(self, ev: ControlEvent) -> None:
        if isinstance(ev, InvalidationWait):
            for e in self._entries.values():
                if e.dirty is not None:
                    self._dirty_report(e, "an invalidation wait was reached")
            self._sync_point()
        elif isinstance(ev, (RootTableLatched, TranslationEnableChanged, UnitReset)):
            # Every bind is reconciled from scratch (the bridge) and nothing is held across these.
            self._entries = {}
            self._needs_pasid_scope.clear()
        self._stale = True

    def _on_action(self, a: BridgeAction) -> None:
        self._stale = True
        if a.errno is None:
            return
        name = errno_mod.errorcode.get(a.errno, str(a.errno))
        if a.call in _BIND_CALLS:
            self._report("bind-refused", a.args.get("sid"), a.args.get("pasid"),
                         f"the host refused {a.call} ({name}) on {a.trigger.kind}")
        elif a.call == "invalidate":
            self._report("forward-failed", None, None,
                         f"hwpt_invalidate of HWPT {a.args.get('hwpt')} failed ({name}) for "
                         f"{len(a.args.get('entries', ()))} entries")

    # -- reserved bits and ranges ------------------------------------------------------------------
    def _check_range(self, addr: int, am: int, what: str, did: int, pasid: int | None) -> None:
        mamv = self.m.viommu.cfg.cap_field("MAMV")
        if am > mamv:
            self._report("wrong-granularity", None, pasid, f"{what} invalidation (DID {did}) with AM {am} above "
                                                           f"CAP.MAMV {mamv}")
        if addr & ((1 << (12 + am)) - 1) & ~0xFFF:
            self._report("wrong-granularity", None, pasid, f"{what} invalidation (DID {did}) at {addr:#x}: not "
                                                           f"aligned to 2^{am} pages")

    def _check_queue(self, new_tail: int) -> None:
        """The descriptors between IQT and the new tail, as the unit will fetch them."""
        qi = self.m.viommu.qi
        assert qi is not None
        v = self.m.viommu
        iqa = v.mmio_read(self._iqa, 8)
        slot = 32 if iqa & _IQA_DW else 16
        base = iqa & _IQA_ADDR
        qbytes = 4096 << (iqa & _IQA_QS)
        off = v.mmio_read(self._iqt, 8) & _IQT_QT
        end = new_tail & _IQT_QT
        mem = self.m.mem
        n = 0
        while off != end and n < qbytes // slot:
            q0, q1 = mem.read_u64(base + off), mem.read_u64(base + (off + 8) % qbytes)
            t = (q0 & 0xF) | (q0 >> 5) & 0x70
            if q0 >= 0 and q1 >= 0 and t in qi.rsvd:
                r0, r1 = qi.rsvd[t]
                bad = (q0 & r0) | (q1 & r1) << 64
                if bad:
                    self._report("reserved-bits", None, None, f"{TYPE_NAMES.get(t, t)} descriptor at {base + off:#x} "
                                                              f"has reserved bits {bad:#x} set")
                if t in (T_PIOTLB, T_IOTLB):
                    self._check_queued_am(qi, t, q0 | q1 << 64)
            off = (off + slot) % qbytes
            n += 1

    def _check_queued_am(self, qi: InvalidationQueue, t: int, v: int) -> None:
        # The unit rejects AM > MAMV with IQE before any observer sees it: check the queued descriptor
        # with the queue's own compiled fields.
        f = qi.f[t]
        if f["G"].get(v) != 3:
            return
        am = f["AM"].get(v)
        mamv = qi.mamv
        if am > mamv:
            pasid = f["PASID"].get(v) if t == T_PIOTLB else None
            self._report("wrong-granularity", None, pasid, f"{TYPE_NAMES[t]} descriptor with AM {am} above CAP.MAMV "
                                                           f"{mamv} (the unit rejects it)")

    def _check_entries(self, pasid: int | None) -> None:
        """Reserved bits in the context and PASID entries of every guest device (only ``pasid`` if given),
        through the vIOMMU's own decoder."""
        v = self.m.viommu
        if not v.te or v.root_invalid:
            return
        for dev in self.m.devices.values():
            ctx = v.load_context(dev.sid)
            if isinstance(ctx, int):
                if ctx & REASON_MASK in _RSVD_REASONS:
                    self._rsvd(_CTX, dev.sid, 0, ctx & REASON_MASK)
                continue
            if ctx.kind == CTX_LEGACY:
                continue
            # The bridge's enumeration of present PASID entries reads only sid and pasid_bits.
            present = self.m.bridge._guest_pasids(dev)  # type: ignore[arg-type]
            pasids = [pasid] if pasid is not None else sorted(present | {0})
            for p in pasids:
                pe = v.load_pasid(ctx.pasid_dir, ctx.pdts, ctx.fpd, p)  # type: ignore[union-attr]
                if isinstance(pe, int) and pe & REASON_MASK in _RSVD_REASONS:
                    self._rsvd(_PASID, dev.sid, p, pe & REASON_MASK)

    def _rsvd(self, kind: str, sid: int, pasid: int, reason: int) -> None:
        key = (kind, sid, pasid, reason)
        if key in self._seen_rsvd:
            return
        self._seen_rsvd.add(key)
        self._report("reserved-bits", sid, pasid if kind == _PASID else None,
                     f"{kind} entry with reserved bits set: the unit answers {reason:#x} {reason_name(reason)}")


_IQA_DW, _IQA_ADDR, _IQA_QS, _IQT_QT = IQA.DW, IQA.IQA, IQA.QS, IQT.QT
_PASID_DID = specs().structure("pasid_entry").field("DID")

__all__ = ["Validator", "VsvaReport", "KINDS"]
