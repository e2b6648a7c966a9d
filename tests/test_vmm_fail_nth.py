"""Host refusals under the bridge, for every n: the n-th host call the bridge makes fails (an errno at the
call: the kernel fails an ioctl before changing anything), or the n-th host-internal allocation (driver
page or pin) fails with ENOMEM.  Whatever fails, the guest run never raises, every step leaves the
documented architectural result (a refused bind: detached, DMA faults with "invalid PASID entry"; a failed
forward: the next wait aborted with ITE), the host holds exactly the objects the bridge accounts for, and
once the host stops failing the next global PASID-cache invalidation restores everything."""

from __future__ import annotations

import errno
from typing import Any, Callable

from vtd_emu.host import IommufdError
from vtd_emu.spec.consts import FR
from vtd_emu.tables import FirstStageTable, U, W
from vtd_emu.vmm import Machine, PassthroughDevice
from vtd_emu.vtd.entries import REASON_MASK
from vtd_emu.vtd.qi import T_PASID_CACHE, make_descriptor

from test_host_fail_nth import Injector
from vmm_helpers import ITE, RawGuest, expected_hpa, pasid_cache, piotlb

SID = 0x0310
GVA = 0x7F00_0000_0000
PAGE = 4096
ERRNOS = (errno.ENOMEM, errno.EINVAL, errno.EBUSY, errno.EFAULT)


class BridgeCallInjector:
    """The n-th call of the host operations the bridge uses fails with an errno (cycling with n); an
    invalidation array fails half-way (the entries before it are handled, ``entry_num`` says how many)."""

    def __init__(self, m: Machine, dev: PassthroughDevice, n: int) -> None:
        self.n = n
        self.calls = 0
        self.fired = False
        self.err = ERRNOS[n % len(ERRNOS)]
        for obj, name in ((m.vmm, "hwpt_alloc"), (m.vmm, "destroy"), (dev.vfio, "attach_pt"),
                          (dev.vfio, "detach_pt")):
            setattr(obj, name, self._wrap(getattr(obj, name)))
        orig_inv = m.vmm.hwpt_invalidate

        def hwpt_invalidate(hwpt: int, entries: Any, **kw: Any) -> int:
            if self._fires():
                done = len(entries) // 2
                if done:
                    orig_inv(hwpt, entries[:done])
                raise IommufdError(self.err, "injected", entry_num=done)
            return orig_inv(hwpt, entries, **kw)

        m.vmm.hwpt_invalidate = hwpt_invalidate  # type: ignore[method-assign]

    def _fires(self) -> bool:
        self.calls += 1
        if self.calls == self.n:
            self.fired = True
            return True
        return False

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **kw: Any) -> Any:
            if self._fires():
                raise IommufdError(self.err, "injected")
            return fn(*a, **kw)
        return call


def check(m: Machine, g: RawGuest, tables: dict[int, FirstStageTable], seen: list[int]) -> None:
    """The architectural result of everything so far, against the bridge's account and the host."""
    dev = m.devices[SID]
    assert isinstance(dev, PassthroughDevice)
    b = m.bridge
    new = b.actions[seen[0]:]
    seen[0] = len(b.actions)
    # A failed forward aborted the wait after it (ITE): the host may still hold stale translations.  The
    # guest handles ITE as Linux does: clear it and submit the invalidations again.
    failed_inv = any(a.call == "invalidate" and a.errno is not None for a in new)
    assert bool(g.fsts() & ITE) == failed_inv
    if failed_inv:
        g.clear_fsts(ITE)
        again = [piotlb(bd.did or 0, bd.pasid) for bd in b.binds.values() if bd.kind == "nested"]
        assert g.submit(*again)
        seen[0] = len(b.actions)
    nested = {o.id for o in m.objects() if o.kind == "hwpt_nested"}
    assert nested == b.live_hwpts(), "a nested HWPT the bridge does not account for"
    for (sid, pasid), bind in sorted(b.binds.items()):
        assert dev.vfio.attached_hwpt(pasid or None) == bind.attached
        if bind.errno is not None:
            assert bind.kind == "blocked" and bind.reason & REASON_MASK == FR.SM_PASID_ENTRY_INV
        if bind.kind == "nested" and bind.attached == bind.nested:
            assert bind.s1 is not None
            fs = tables[bind.s1.pgtbl_addr]
            out = dev.dma_write(GVA + 8, b"probe", pasid=pasid or None)
            assert out.ok
            hpa = expected_hpa(m, fs, GVA + 8)
            assert hpa is not None and m.host.ram.read(hpa, 5) == b"probe"
        elif bind.kind == "blocked" and bind.attached is None:
            out = dev.dma_write(GVA + 8, b"probe", pasid=pasid or None)
            assert out.faults == (bind.reason & REASON_MASK,)


def scenario(m: Machine, g: RawGuest, tables: dict[int, FirstStageTable], seen: list[int]) -> None:
    a, b = g.fs_table(), g.fs_table()
    a.map(GVA, 0x100_0000, 4 * PAGE, W | U)
    b.map(GVA, 0x120_0000, 4 * PAGE, W | U)
    tables.update({a.root: a, b.root: b})
    g.bind_fs(SID, 1, a, 5)
    check(m, g, tables, seen)
    g.bind_fs(SID, 0, a, 6)
    check(m, g, tables, seen)
    a.unmap(GVA, PAGE)
    a.map(GVA, 0x130_0000, PAGE, W | U)
    g.submit(piotlb(5, 1, GVA), piotlb(5, 1, GVA + PAGE), piotlb(6, 0, GVA))
    check(m, g, tables, seen)
    g.bind_fs(SID, 1, b, 5)                              # replace
    check(m, g, tables, seen)
    g.pasids[SID].clear_entry(0)                          # unbind the RID
    g.submit(pasid_cache(6, 0))
    check(m, g, tables, seen)
    g.set_te(False)
    check(m, g, tables, seen)
    g.set_te(True)
    check(m, g, tables, seen)
    m.reset()
    check(m, g, tables, seen)
    g.tail = 0
    g.enable()
    check(m, g, tables, seen)


def test_fail_nth_under_the_bridge() -> None:
    failed_calls: set[str] = set()
    n = 1
    while True:
        m = Machine(guest_ram=32 << 20)
        dev = m.add_passthrough_device(SID)
        g = RawGuest(m)
        g.device(SID)
        g.enable()
        seen = [len(m.bridge.actions)]
        tables: dict[int, FirstStageTable] = {}
        inj = BridgeCallInjector(m, dev, n)
        scenario(m, g, tables, seen)
        fired = inj.fired
        failed_calls |= {a.call for a in m.bridge.actions if a.errno is not None}
        inj.n = -1                                        # the host stops failing
        g.submit(make_descriptor(T_PASID_CACHE, G=3))
        check(m, g, tables, seen)
        assert not any(bind.refused for bind in m.bridge.binds.values())
        assert m.bridge.live_hwpts() == {bd.nested for bd in m.bridge.binds.values() if bd.nested is not None}
        m.close()
        assert m.objects() == [] and m.host.pinned_pages == 0 and m.host.intel._dids == set()
        if not fired:
            break
        n += 1
    assert failed_calls == {"hwpt_alloc", "attach", "replace", "detach", "destroy", "invalidate"}


def test_fail_nth_at_plug_raises_and_leaks_nothing() -> None:
    """Plugging a device is the VMM's own setup, not a guest action: a host failure there (the n-th pin or
    driver page) raises to the caller, the device is not added, and a retry succeeds.  Every n up to 40
    (the driver's pages and the first pins), then every 61st (the rest are more pins of guest RAM)."""
    n = 1
    while True:
        m = Machine(guest_ram=4 << 20)
        inj = Injector(m.host, n)
        try:
            m.add_passthrough_device(SID, pasid_bits=8)
        except IommufdError as e:
            assert e.errno == errno.ENOMEM and inj.fired
            assert SID not in m.devices and (SID not in m.host.devices or m.host.devices[SID].dev_id is None)
            kinds = sorted(o.kind for o in m.objects())
            assert kinds in (["ioas"], ["hwpt_paging", "ioas"])
        fired = inj.fired
        inj.n = -1
        if fired:
            dev = m.add_passthrough_device(SID, pasid_bits=8)
            assert dev.dma_write(0x1000, b"ok").ok
        m.close()
        assert m.objects() == [] and m.host.pinned_pages == 0 and m.host.intel._dids == set()
        if not fired:
            break
        n += 1 if n < 40 else 61
    assert n > 40
