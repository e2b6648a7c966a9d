"""The reconciler between the vIOMMU and the host: guest table binds become HWPT attachments, guest
invalidations become ``IOMMU_HWPT_INVALIDATE`` calls.

The bridge observes the vIOMMU (:meth:`VtdIommu.add_invalidation_observer` and
:meth:`~VtdIommu.add_control_observer`).  On every bind trigger — PASID-cache invalidation (global,
domain, PASID-selective), context-cache invalidation (global, domain, device), SRTP, TE on/off, reset,
and a device being plugged — it decodes the guest's context and PASID entries of the passthrough
devices concerned with the vIOMMU's own decoder (``load_context`` / ``load_pasid``, uncached) and makes
the host attachment of each (device, PASID) what the entry asks for (:class:`BindState`):

=============================  =========================================================================
guest entry                    host
=============================  =========================================================================
TE off (PASID 0)               the nest parent (GPA = IOVA), as QEMU re-attaches its default HWPT
TE off (other PASIDs)          detached
PGTT = first stage             a nested ``VTD_S1`` HWPT (FSPTPTR, 48 + 9·FSPM, SRE/WPE/EAFE) on the parent
PGTT = pass-through            the nest parent
not present / invalid          detached; DMA faults with the reason the vIOMMU's decode gave
PGTT = second stage, legacy    detached, refused: caching-mode shadowing of second-stage guests is not
                               built yet; DMA faults with "invalid PASID entry" (legacy: "invalid
                               context entry")
host refuses (errno)           detached, refused: DMA faults with "invalid PASID entry" (0x5B); the
                               errno is in :attr:`BindState.errno` and the action log
=============================  =========================================================================

A change allocates and attaches the new HWPT first (a replace when something is attached) and destroys
the old nested HWPT only once the new one is in place.  Every host call is appended to
:attr:`Bridge.actions` as a :class:`BridgeAction`, naming the guest action that caused it
(:class:`Trigger`); ``listeners`` are called with each.  Nothing here raises for anything a guest does.

Forwarding (``docs/vmm.md``): PASID-based IOTLB (type 6), IOTLB (type 2 and the register interface: in
scalable mode they drop every first-stage entry of the DID), device-TLB (types 3 and 8) invalidations
become invalidation entries of the nested HWPTs they cover.  ``coalesced`` collects them per HWPT until
the next invalidation wait (or the end of the queue batch, or at once for a register-based one) and
sends one array per HWPT; ``one-per-call`` sends one entry per ioctl as each descriptor is executed (what
QEMU does).  An entry the host fails aborts the guest's next wait with ITE (ITESID = the device).

Page requests of PRI passthrough devices travel from the host's fault queue to the guest's page request
queue and the guest's page group responses back (:meth:`Bridge.service_faults`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, TypeVar

from ..host.iommufd import FaultFile
from ..host.uapi import (HWPT_ALLOC_PASID, PAGE_RESP_INVALID, PAGE_RESP_SUCCESS, PGFAULT_FLAGS_LAST_PAGE,
                         PGFAULT_FLAGS_PASID_VALID, PGFAULT_PERM_EXEC, PGFAULT_PERM_PRIV, PGFAULT_PERM_READ,
                         PGFAULT_PERM_WRITE, PGFAULT_SIZE, U64_MAX, VTD_INV_FLAGS_LEAF, VTD_S1_EAFE, VTD_S1_SRE,
                         VTD_S1_WPE, HwptVtdS1, PageFault, VtdS1Invalidate, page_response)
from ..spec.consts import FR
from ..vtd.access import NO_PASID
from ..vtd.ats import ats_range
from ..vtd.caches import sid_matches
from ..vtd.descriptors import (ContextInvalidation, ControlEvent, DeviceTlbInvalidation, Invalidation,
                               InvalidationWait, IotlbInvalidation, PasidCacheInvalidation, PasidIotlbInvalidation,
                               QueueIdle, RootTableLatched, TranslationEnableChanged, UnitReset)
from ..vtd.entries import FPD_SHIFT, PGTT_FS, PGTT_PT, TT_PT, LegacyContext, ScalableContext
from ..vtd.prq import PageResponse
from ..vtd.walk import F_EAFE, F_SRE, F_WPE
from .devices import PassthroughDevice, guest_reason

if TYPE_CHECKING:
    from .machine import Machine

T = TypeVar("T")

FORWARDING_MODES = ("coalesced", "one-per-call")
KIND_PARENT, KIND_NESTED, KIND_BLOCKED = "parent", "nested", "blocked"
_FULL = VtdS1Invalidate(0, U64_MAX, 0)


class Trigger(NamedTuple):
    """The guest action a bridge action answers."""

    action: int
    """The machine's count of guest actions (register writes through :meth:`Machine.mmio_write`, resets,
    device plugs) when it happened."""
    kind: str
    """``context-cache``, ``pasid-cache``, ``iotlb``, ``pasid-iotlb``, ``device-tlb``, ``srtp``, ``te``,
    ``wait``, ``queue-idle``, ``reset``, ``plug``, ``close``, ``page-request`` or ``page-response``."""
    slot: int | None
    """The invalidation-queue slot of the descriptor, None for a register write or a machine action."""
    event: object | None
    """The decoded invalidation or control event (``vtd.descriptors``)."""


class BridgeAction(NamedTuple):
    """One host call the bridge made."""

    seq: int
    trigger: Trigger
    call: str
    """``hwpt_alloc``, ``attach``, ``replace``, ``detach``, ``destroy``, ``invalidate`` (and at plug time
    ``bind``, ``get_hw_info``, ``set_dirty_tracking``)."""
    args: dict[str, Any]
    result: Any
    """What the call returned (an id, an entry count), None when it failed."""
    errno: int | None


@dataclass
class BridgeStats:
    """Counters of what the bridge did (compare forwarding modes with them)."""

    host_calls: int = 0
    failed_calls: int = 0
    binds: int = 0
    """Nested HWPTs attached."""
    unbinds: int = 0
    """Nested HWPTs taken down (detached or replaced)."""
    refusals: int = 0
    """Binds the host refused (or that need what the bridge does not do: second-stage shadowing)."""
    descriptors: int = 0
    """Guest invalidations that covered at least one nested HWPT."""
    invalidate_calls: int = 0
    invalidate_entries: int = 0
    """Entries the host handled."""
    failed_forwards: int = 0

    @property
    def ioctls_per_descriptor(self) -> float:
        return self.invalidate_calls / self.descriptors if self.descriptors else 0.0


class Desired(NamedTuple):
    """What a guest entry asks of the host for one (device, PASID)."""

    kind: str
    s1: HwptVtdS1 | None
    did: int | None
    fpd: int
    reason: int
    """For ``blocked``: the fault int a DMA meets (reason | FPD << FPD_SHIFT), 0 for none."""
    note: str
    iopf: bool = False
    """``nested`` for a PRI device whose guest context has PRE set (and a vIOMMU with PRS): the HWPT gets
    the machine's fault queue, so the device's page requests reach the guest's page request queue."""


@dataclass
class BindState:
    """What is attached on the host for guest device ``sid``, PASID ``pasid`` (0 = requests without
    PASID: the host RID), and why."""

    sid: int
    pasid: int
    kind: str
    """``parent``, ``nested`` or ``blocked`` (what the bridge made of the guest's entry)."""
    attached: int | None
    """The host HWPT attached (None: detached, DMA blocked)."""
    nested: int | None = None
    """The nested HWPT the bridge allocated for this bind (attached, owned by the bridge)."""
    s1: HwptVtdS1 | None = None
    did: int | None = None
    fpd: int = 0
    reason: int = 0
    errno: int | None = None
    """The host's errno when the bind was refused."""
    note: str = ""
    iopf: bool = False
    """The nested HWPT has the machine's fault queue (page requests forwarded to the guest)."""

    @property
    def refused(self) -> bool:
        return self.errno is not None or self.note.startswith("refused")


class _Pending(NamedTuple):
    entry: VtdS1Invalidate
    sid: int
    trigger: Trigger


class Bridge:
    """The vIOMMU ↔ host reconciler of one :class:`~vtd_emu.vmm.Machine`."""

    def __init__(self, machine: "Machine", forwarding: str) -> None:
        self.machine = machine
        self.forwarding = forwarding
        self.binds: dict[tuple[int, int], BindState] = {}
        self.actions: list[BridgeAction] = []
        self.listeners: list[Callable[[BridgeAction], None]] = []
        self.stats = BridgeStats()
        self._pending: dict[int, list[_Pending]] = {}
        self._zombies: list[int] = []
        self._trigger = Trigger(0, "plug", None, None)
        self.fault_id: int | None = None
        self.fault_file: FaultFile | None = None
        """The machine's fault queue (allocated with the first bind that forwards page requests)."""
        self._unsent: list[tuple[int, int]] = []
        """Responses the host refused to take: sent again at the next trigger."""
        self._cookies: dict[tuple[int, int | None, int], int] = {}
        """(guest sid, PASID, PRGI) of a page group the guest was asked about → the host's cookie."""
        machine.viommu.add_invalidation_observer(self._on_invalidation)
        machine.viommu.add_control_observer(self._on_control)

    # -- host calls --------------------------------------------------------------------------------
    def host_call(self, call: str, args: dict[str, Any], fn: Callable[[], T]) -> T:
        """Make one host call and log it; its ``OSError`` (logged with the errno) is re-raised."""
        st = self.stats
        st.host_calls += 1
        try:
            result = fn()
        except OSError as e:
            st.failed_calls += 1
            self._log(call, args, None, e.errno)
            raise
        self._log(call, args, result, None)
        return result

    def _try(self, call: str, args: dict[str, Any], fn: Callable[[], object]) -> bool:
        """A host call whose failure the caller handles by state alone: True when it succeeded."""
        try:
            self.host_call(call, args, fn)
        except OSError:
            return False
        return True

    def _log(self, call: str, args: dict[str, Any], result: Any, err: int | None) -> None:
        a = BridgeAction(len(self.actions), self._trigger, call, args, result, err)
        self.actions.append(a)
        for listener in list(self.listeners):
            listener(a)

    def begin(self, kind: str, event: object | None = None, queued: bool = False) -> None:
        qi = self.machine.viommu.qi
        slot = qi.head if queued and qi is not None else None
        self._trigger = Trigger(self.machine.guest_actions, kind, slot, event)
        if self._zombies:
            self._reap()
        if self._unsent:
            unsent, self._unsent = self._unsent, []
            for cookie, code in unsent:
                self._respond(cookie, code)

    def _reap(self) -> None:
        zombies, self._zombies = self._zombies, []
        for hwpt in zombies:
            self._destroy(hwpt)

    def _destroy(self, hwpt: int) -> None:
        self._pending.pop(hwpt, None)
        vmm = self.machine.vmm
        if not self._try("destroy", {"hwpt": hwpt}, lambda: vmm.destroy(hwpt)):
            self._zombies.append(hwpt)

    # -- observers ---------------------------------------------------------------------------------
    def _passthrough(self) -> list[PassthroughDevice]:
        return [d for d in self.machine.devices.values() if isinstance(d, PassthroughDevice)]

    def _on_invalidation(self, inv: Invalidation) -> None:
        if isinstance(inv, PasidCacheInvalidation):
            self.begin("pasid-cache", inv, True)
            for dev in self._passthrough():
                if inv.granularity == 3:
                    self.reconcile(dev)
                elif inv.granularity == 0:
                    self.reconcile(dev, did=inv.did)
                else:
                    self.reconcile(dev, [inv.pasid], did=inv.did)
        elif isinstance(inv, ContextInvalidation):
            self.begin("context-cache", inv, inv.queued)
            for dev in self._passthrough():
                if inv.done != 3 or sid_matches(dev.sid, inv.sid, inv.fm):
                    self.reconcile(dev)
        elif isinstance(inv, PasidIotlbInvalidation):
            self.begin("pasid-iotlb", inv, True)
            if inv.granularity == 3:
                span = 4096 << inv.am
                entry = VtdS1Invalidate(inv.addr & ~(span - 1), 1 << inv.am, VTD_INV_FLAGS_LEAF if inv.ih else 0)
            else:
                entry = _FULL
            self._forward([b for b in self._nested() if b.did == inv.did and b.pasid == inv.pasid], entry)
        elif isinstance(inv, IotlbInvalidation):
            # Scalable mode: global drops everything; domain and page-selective drop every first-stage
            # entry of the DID whatever the address (vtd-facts §6.5).
            self.begin("iotlb", inv, inv.queued)
            targets = [b for b in self._nested() if inv.done == 1 or b.did == inv.did]
            self._forward(targets, _FULL)
            if not inv.queued:
                self.flush()
        elif isinstance(inv, DeviceTlbInvalidation):
            self.begin("device-tlb", inv, True)
            if inv.pasid is None:
                targets = [b for b in self._nested() if b.sid == inv.sid]
            else:
                pasid = 0 if inv.pasid == NO_PASID else inv.pasid
                targets = [b for b in self._nested() if b.sid == inv.sid and b.pasid == pasid]
            base, size = ats_range(inv.addr, inv.s)
            entry = _FULL if size >= 1 << 64 else VtdS1Invalidate(base, size >> 12, 0)
            self._forward(targets, entry)

    def _on_control(self, ev: ControlEvent) -> None:
        if isinstance(ev, InvalidationWait):
            self.begin("wait", ev, True)
            self.flush()
        elif isinstance(ev, QueueIdle):
            if self._pending:
                self.begin("queue-idle", ev, False)
                self.flush()
        elif isinstance(ev, (RootTableLatched, TranslationEnableChanged, UnitReset)):
            kind = {RootTableLatched: "srtp", TranslationEnableChanged: "te", UnitReset: "reset"}[type(ev)]
            self.begin(kind, ev, False)
            self.flush()
            for dev in self._passthrough():
                self.reconcile(dev)

    # -- binds -------------------------------------------------------------------------------------
    def _nested(self) -> list[BindState]:
        return [b for b in self.binds.values() if b.nested is not None and b.attached == b.nested]

    def desired(self, dev: PassthroughDevice, pasid: int) -> Desired:
        """What the guest's current entries (read from guest memory, no cache) ask for (dev, pasid)."""
        v = self.machine.viommu
        if not v.te:
            if pasid == 0:
                return Desired(KIND_PARENT, None, None, 0, 0, "translation disabled: GPA = IOVA")
            return Desired(KIND_BLOCKED, None, None, 0, 0, "translation disabled: PASID attachments dropped")
        if v.root_invalid:
            return Desired(KIND_BLOCKED, None, None, 0, FR.SM_RTA_INV, "invalid root table type")
        ctx = v.load_context(dev.sid)
        if isinstance(ctx, int):
            return Desired(KIND_BLOCKED, None, None, (ctx >> FPD_SHIFT) & 1, ctx, "context entry unusable")
        if isinstance(ctx, LegacyContext):
            if pasid:
                return Desired(KIND_BLOCKED, None, None, 0, FR.SM_RTA_LEGACY_PASID, "legacy mode has no PASIDs")
            if ctx.tt == TT_PT:
                return Desired(KIND_PARENT, None, ctx.did, ctx.fpd, 0, "legacy pass-through")
            return Desired(KIND_BLOCKED, None, ctx.did, ctx.fpd, FR.CONTEXT_ENTRY_INV | ctx.fpd << FPD_SHIFT,
                           "refused: legacy second-stage translation needs caching-mode shadowing")
        if pasid and not ctx.paside:
            return Desired(KIND_BLOCKED, None, None, ctx.fpd, FR.SM_PASIDE_CLEAR | ctx.fpd << FPD_SHIFT,
                           "PASIDE clear")
        pe = v.load_pasid(ctx.pasid_dir, ctx.pdts, ctx.fpd, pasid)
        if isinstance(pe, int):
            return Desired(KIND_BLOCKED, None, None, (pe >> FPD_SHIFT) & 1, pe, "PASID entry unusable")
        if pe.pgtt == PGTT_FS:
            flags = ((VTD_S1_SRE if pe.flags & F_SRE else 0) | (VTD_S1_WPE if pe.flags & F_WPE else 0)
                     | (VTD_S1_EAFE if pe.flags & F_EAFE else 0))
            s1 = HwptVtdS1(flags, pe.fsptptr, 48 + 9 * (pe.fs_levels - 4))
            iopf = dev.pri and bool(ctx.pre) and v.prq is not None
            return Desired(KIND_NESTED, s1, pe.did, pe.fpd, 0, "first stage", iopf)
        if pe.pgtt == PGTT_PT:
            return Desired(KIND_PARENT, None, pe.did, pe.fpd, 0, "pass-through")
        return Desired(KIND_BLOCKED, None, pe.did, pe.fpd, FR.SM_PASID_ENTRY_INV | pe.fpd << FPD_SHIFT,
                       "refused: second-stage translation needs caching-mode shadowing")

    def _guest_pasids(self, dev: PassthroughDevice) -> set[int]:
        """PASIDs whose guest PASID entry has P set (directory entries present), within the device's
        PASID width."""
        v = self.machine.viommu
        out: set[int] = set()
        if not (v.te and v.root_scalable and not v.root_invalid) or not dev.pasid_bits:
            return out
        ctx = v.load_context(dev.sid)
        if not isinstance(ctx, ScalableContext):
            return out
        mem = v.mem
        n_dir = min(1 << (ctx.pdts + 7), max(1, (1 << dev.pasid_bits) >> 6))
        raw = mem.read(ctx.pasid_dir, n_dir * 8)
        for d in range(n_dir):
            de = int.from_bytes(raw[8 * d:8 * d + 8], "little")
            if not de & 1:
                continue
            table = mem.read(de & v.pdir_ptr, 64 * 64)
            for i in range(64):
                if table[64 * i] & 1:
                    pasid = d << 6 | i
                    if pasid < 1 << dev.pasid_bits:
                        out.add(pasid)
        return out

    def reconcile(self, dev: PassthroughDevice, pasids: list[int] | None = None, did: int | None = None) -> None:
        """Make the host attachments of ``dev`` (``pasids``, or every PASID bound or present) follow the
        guest's entries; with ``did`` only those whose entry or bind has that DID (a domain- or
        PASID-selective PASID-cache invalidation)."""
        if pasids is None:
            cand = {0} | {p for (s, p) in self.binds if s == dev.sid} | self._guest_pasids(dev)
        else:
            cand = {p for p in pasids if p < max(1, 1 << dev.pasid_bits)}
        for pasid in sorted(cand):
            d = self.desired(dev, pasid)
            if did is not None:
                cur = self.binds.get((dev.sid, pasid))
                if d.did != did and (cur is None or cur.did != did):
                    continue
            self._apply(dev, pasid, d)

    def _apply(self, dev: PassthroughDevice, pasid: int, d: Desired) -> None:
        key = (dev.sid, pasid)
        cur = self.binds.get(key) or BindState(dev.sid, pasid, KIND_BLOCKED, None)
        parent = self.machine.parent_hwpt
        if d.kind == KIND_BLOCKED:
            self._block(dev, cur, d, None)
            return
        if d.kind == KIND_NESTED:
            if (cur.kind == KIND_NESTED and cur.s1 == d.s1 and cur.iopf == d.iopf and cur.nested is not None
                    and cur.attached == cur.nested):
                cur.did, cur.fpd = d.did, d.fpd
                return
            assert d.s1 is not None and parent is not None
            s1 = d.s1
            vmm = self.machine.vmm
            try:
                fault_id = self._fault_queue() if d.iopf else None
                target = self.host_call("hwpt_alloc", {"dev_id": dev.dev_id, "pt_id": parent,
                                                       "flags": HWPT_ALLOC_PASID, "s1_flags": s1.flags,
                                                       "pgtbl_addr": s1.pgtbl_addr, "addr_width": s1.addr_width,
                                                       "fault_id": fault_id, "sid": dev.sid, "pasid": pasid},
                                        lambda: vmm.hwpt_alloc(dev.dev_id, parent, HWPT_ALLOC_PASID, s1,
                                                               fault_id=fault_id))
            except OSError as e:
                self._refuse(dev, cur, d, e)
                return
        else:
            if cur.attached == parent and cur.nested is None:
                cur.kind, cur.did, cur.fpd, cur.reason, cur.errno, cur.note = d.kind, d.did, d.fpd, 0, None, d.note
                self.binds[key] = cur
                return
            assert parent is not None
            target = parent
        host_pasid = pasid or None
        try:
            self.host_call("replace" if cur.attached is not None else "attach",
                           {"dev_id": dev.dev_id, "sid": dev.sid, "pasid": pasid, "hwpt": target},
                           lambda: dev.vfio.attach_pt(target, pasid=host_pasid))
        except OSError as e:
            if d.kind == KIND_NESTED:
                self._destroy(target)
            self._refuse(dev, cur, d, e)
            return
        old = cur.nested
        nested = target if d.kind == KIND_NESTED else None
        self.binds[key] = BindState(dev.sid, pasid, d.kind, target, nested, d.s1, d.did, d.fpd, 0, None, d.note,
                                    d.iopf and nested is not None)
        if nested is not None:
            self.stats.binds += 1
        if old is not None:
            self.stats.unbinds += 1
            self._destroy(old)

    def _refuse(self, dev: PassthroughDevice, cur: BindState, d: Desired, exc: OSError) -> None:
        self.stats.refusals += 1
        reason = FR.SM_PASID_ENTRY_INV | d.fpd << FPD_SHIFT
        note = f"refused by the host: {exc.strerror or exc}"
        self._block(dev, cur, Desired(KIND_BLOCKED, d.s1, d.did, d.fpd, reason, note), exc.errno)

    def _block(self, dev: PassthroughDevice, cur: BindState, d: Desired, err: int | None) -> None:
        key = (cur.sid, cur.pasid)
        if d.note.startswith("refused") and err is None and not (cur.kind == KIND_BLOCKED and cur.refused):
            self.stats.refusals += 1
        attached, old = cur.attached, cur.nested
        if attached is not None:
            host_pasid = cur.pasid or None
            if self._try("detach", {"dev_id": dev.dev_id, "sid": dev.sid, "pasid": cur.pasid},
                         lambda: dev.vfio.detach_pt(pasid=host_pasid)):
                attached = None
        if attached is None and old is not None:
            self.stats.unbinds += 1
            self._destroy(old)
            old = None
        state = BindState(cur.sid, cur.pasid, KIND_BLOCKED, attached, old, d.s1, d.did, d.fpd, d.reason, err, d.note)
        if attached is None and not state.refused and not d.reason:
            self.binds.pop(key, None)
        else:
            self.binds[key] = state

    # -- faults of passthrough DMA -----------------------------------------------------------------
    def guest_fault(self, dev: PassthroughDevice, pasid: int, host_reason: int) -> int | None:
        """The fault int the guest gets for a passthrough DMA the host faulted (reason 0: blocked without
        a guest fault record), or None when the DMA only reached a GPA outside guest RAM."""
        b = self.binds.get((dev.sid, pasid))
        if b is None:
            d = self.desired(dev, pasid)
            if d.kind == KIND_BLOCKED:
                return d.reason
            # The guest made the entry usable without the invalidation that would have bound it.
            return FR.SM_PASID_ENTRY_P | d.fpd << FPD_SHIFT
        if b.kind == KIND_BLOCKED:
            return b.reason
        r = guest_reason(host_reason)
        return None if r is None else r | b.fpd << FPD_SHIFT

    # -- forwarding --------------------------------------------------------------------------------
    def _forward(self, targets: list[BindState], entry: VtdS1Invalidate) -> None:
        if not targets:
            return
        self.stats.descriptors += 1
        trig = self._trigger
        for b in targets:
            assert b.nested is not None
            item = _Pending(entry, b.sid, trig)
            if self.forwarding == "one-per-call":
                self._invalidate(b.nested, [item])
            else:
                self._pending.setdefault(b.nested, []).append(item)

    def flush(self) -> None:
        """Send every collected invalidation: one array per nested HWPT."""
        while self._pending:
            hwpt, items = next(iter(self._pending.items()))
            del self._pending[hwpt]
            self._invalidate(hwpt, items)

    def _invalidate(self, hwpt: int, items: list[_Pending]) -> None:
        vmm = self.machine.vmm
        st = self.stats
        i = 0
        while i < len(items):
            chunk = items[i:]
            entries = [p.entry for p in chunk]
            args = {"hwpt": hwpt, "entries": [(e.addr, e.npages, e.flags) for e in entries],
                    "descriptors": [(p.trigger.action, p.trigger.slot, p.trigger.kind) for p in chunk]}
            st.invalidate_calls += 1
            try:
                self.host_call("invalidate", args, lambda: vmm.hwpt_invalidate(hwpt, entries))
            except OSError as e:
                done = getattr(e, "entry_num", None) or 0
            else:
                st.invalidate_entries += len(chunk)
                return
            st.invalidate_entries += done
            st.failed_forwards += 1
            qi = self.machine.viommu.qi
            # Only the queue reports errors: a register-based invalidation has nowhere to say it failed.
            if qi is not None and qi.enabled:
                qi.report_timeout(chunk[done].sid)
            i += done + 1

    # -- page requests of passthrough devices ------------------------------------------------------
    def _fault_queue(self) -> int:
        if self.fault_id is None:
            vmm = self.machine.vmm
            files: list[FaultFile] = []

            def alloc() -> int:
                fault_id, file = vmm.fault_queue_alloc()
                files.append(file)
                return fault_id

            self.fault_id = self.host_call("fault_queue_alloc", {}, alloc)
            self.fault_file = files[0]
        return self.fault_id

    def service_faults(self) -> int:
        """Read the host fault queue and hand each page request to the vIOMMU as the device's request to
        the guest (its page request queue); returns the requests forwarded.  The guest's page group
        response (or the vIOMMU's own, for a request it could not queue) goes back to the host."""
        f = self.fault_file
        if f is None or not f.poll():
            return 0
        self.begin("page-request")
        by_dev = {d.dev_id: d for d in self._passthrough()}
        try:
            raw = self.host_call("read_faults", {}, lambda: f.read(PGFAULT_SIZE * 512))
        except OSError:
            return 0  # the groups stay queued in the host: the next wake-up reads them
        records = PageFault.parse_all(raw)
        for r in records:
            dev = by_dev.get(r.dev_id)
            pasid = r.pasid if r.flags & PGFAULT_FLAGS_PASID_VALID else None
            last = bool(r.flags & PGFAULT_FLAGS_LAST_PAGE)
            if dev is None:
                if last:
                    self._respond(r.cookie, PAGE_RESP_INVALID)
                continue
            if last:
                # Before the request: a vIOMMU that cannot queue it answers at once.
                self._cookies[(dev.sid, pasid, r.grpid)] = r.cookie
            self.machine.viommu.page_request(dev.sid, r.addr, read=bool(r.perm & PGFAULT_PERM_READ),
                                             write=bool(r.perm & PGFAULT_PERM_WRITE),
                                             exe=bool(r.perm & PGFAULT_PERM_EXEC),
                                             priv=bool(r.perm & PGFAULT_PERM_PRIV), pasid=pasid, last=last,
                                             prgi=r.grpid)
        return len(records)

    def guest_response(self, dev: PassthroughDevice, resp: PageResponse) -> None:
        """The guest (or the vIOMMU) answered a page group of ``dev``: answer the host's group."""
        cookie = self._cookies.pop((dev.sid, resp.pasid, resp.prgi), None)
        if cookie is None:
            return
        self.begin("page-response", resp, not resp.auto)
        # The host takes SUCCESS or INVALID; a guest's Response Failure also ends the device's wait.
        self._respond(cookie, PAGE_RESP_SUCCESS if resp.code == 0 else PAGE_RESP_INVALID)

    def _respond(self, cookie: int, code: int) -> None:
        f = self.fault_file
        assert f is not None
        if not self._try("page_response", {"cookie": cookie, "code": code},
                         lambda: f.write(page_response(cookie, code))):
            self._unsent.append((cookie, code))

    # -- devices -----------------------------------------------------------------------------------
    def plugged(self, dev: PassthroughDevice) -> None:
        """``dev`` was just attached (RID) to the nest parent: record it, and bind whatever the guest's
        tables already say for it (a device hot-plugged into a running guest)."""
        self.binds[(dev.sid, 0)] = BindState(dev.sid, 0, KIND_PARENT, self.machine.parent_hwpt, note="plugged")
        if dev.pri:
            # The device's side of PRI at the vIOMMU: where the guest's page group responses arrive.
            ep = self.machine.viommu.attach_device(dev.sid, ats=False, pri=True)
            ep.on_response = lambda resp: self.guest_response(dev, resp)
        self.reconcile(dev)

    def unplug(self, dev: PassthroughDevice) -> None:
        """Detach and free everything bound for ``dev`` (the machine then unbinds it)."""
        for key in sorted(k for k in self.binds if k[0] == dev.sid):
            b = self.binds.pop(key)
            if b.attached is not None:
                host_pasid = b.pasid or None
                self._try("detach", {"dev_id": dev.dev_id, "sid": dev.sid, "pasid": b.pasid},
                          lambda: dev.vfio.detach_pt(pasid=host_pasid))
            if b.nested is not None:
                self._destroy(b.nested)
        self._reap()

    def close(self) -> None:
        """Drop the fault queue's file (the iommufd's close frees the rest)."""
        if self.fault_file is not None:
            self.fault_file.close()

    def live_hwpts(self) -> set[int]:
        """The nested HWPTs the bridge holds (bound, or waiting to be destroyed again)."""
        return {b.nested for b in self.binds.values() if b.nested is not None} | set(self._zombies)


__all__ = ["Bridge", "BridgeAction", "BridgeStats", "BindState", "Trigger", "Desired", "FORWARDING_MODES",
           "KIND_PARENT", "KIND_NESTED", "KIND_BLOCKED"]
