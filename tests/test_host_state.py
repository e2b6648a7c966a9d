"""Random sequences of the iommufd API (hypothesis state machine) against the object-model invariants:

- every object's ``users`` equals one plus the holders the object graph says it has (§3.1);
- pins: the host's pinned pages are exactly what areas in IOASes with a domain and access pins hold;
- isolation: a passthrough DMA writes host memory only inside a page an area of the IOAS its device is
  attached to maps, at the place an independent model of the maps predicts, and faults otherwise;
- after ``close()`` no object, pin, DID or present PASID entry is left.

Any step may fail with an errno; a failure must change nothing the invariants can see (the port rule of
iommufd_fail_nth.c).
"""

from __future__ import annotations

import errno

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vtd_emu.host import (HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID, Host, HwptVtdS1, IommufdError,
                          IOAS_MAP_READABLE, IOAS_MAP_WRITEABLE)
from vtd_emu.host.host import VMM_POOL
from vtd_emu.host.iommufd import Access, Device, Fault, HwptNested, HwptPaging, Ioas

PAGE = 4096
BUF_PAGES = 8
IOVA_SLOTS = [0x10_0000 + i * 0x1_0000 for i in range(6)]
OK_ERRNOS = {errno.ENOENT, errno.EINVAL, errno.EBUSY, errno.EEXIST, errno.EFAULT, errno.EPERM, errno.ENOSPC,
             errno.EADDRINUSE, errno.EOPNOTSUPP, errno.EDEADLOCK, errno.ENODEV, errno.EOVERFLOW}


class IommufdMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.host = Host()
        self.ictx = self.host.open_iommufd()
        self.buffers: list[tuple[int, bool]] = []   # (va, still mapped)
        for _ in range(2):
            va = self.host.mmap(BUF_PAGES * PAGE)
            self.host.write_user(va, bytes(range(256)) * (BUF_PAGES * PAGE // 256))
            self.buffers.append((va, True))
        self.devs = [self.host.add_device(0x10), self.host.add_device(0x18, pasid_bits=8),
                     self.host.add_device(0x20, group=5), self.host.add_device(0x21, group=5)]
        for d in self.devs:
            d.bind_iommufd(self.ictx)
        self.model: dict[int, dict[int, tuple[int, int, int]]] = {self.ictx.ioas_alloc(): {}}
        self.accesses: list[Access] = []
        self.pins: list[tuple[Access, int]] = []
        # self.model: the independent model of the maps, IOAS id -> {iova: (length, user VA, prot)}.

    # -- helpers -----------------------------------------------------------------------------------
    def _try(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except IommufdError as e:
            assert e.errno in OK_ERRNOS, f"unexpected {e.name}: {e}"
            return None

    def _ids(self, cls: type) -> list[int]:
        return [o.id for o in self.ictx._objects.values() if isinstance(o, cls)]

    # -- rules -------------------------------------------------------------------------------------
    @rule()
    def ioas_alloc(self) -> None:
        self.model[self.ictx.ioas_alloc()] = {}

    @rule(data=st.data())
    def destroy(self, data) -> None:
        ids = list(self.ictx._objects) + [99]
        obj_id = data.draw(st.sampled_from(ids))
        self._try(self.ictx.destroy, obj_id)
        if obj_id not in self.ictx._objects:
            self.model.pop(obj_id, None)

    @rule(data=st.data(), npages=st.integers(1, 3), first=st.integers(0, BUF_PAGES - 1), fixed=st.booleans(),
          writable=st.booleans())
    def ioas_map(self, data, npages: int, first: int, fixed: bool, writable: bool) -> None:
        ioas_ids = self._ids(Ioas)
        if not ioas_ids:
            return
        ioas = data.draw(st.sampled_from(ioas_ids))
        live = [b for b in self.buffers if b[1]]
        va, _ = data.draw(st.sampled_from(live if data.draw(st.integers(0, 7)) else self.buffers))
        npages = min(npages, BUF_PAGES - first)
        iova = data.draw(st.sampled_from(IOVA_SLOTS)) if fixed else None
        flags = IOAS_MAP_READABLE | (IOAS_MAP_WRITEABLE if writable else 0)
        out = self._try(self.ictx.ioas_map, ioas, va + first * PAGE, npages * PAGE, iova, flags)
        if out is not None:
            self.model[ioas][out] = (npages * PAGE, va + first * PAGE, flags)

    @rule(data=st.data(), whole=st.booleans())
    def ioas_unmap(self, data, whole: bool) -> None:
        ioas_ids = self._ids(Ioas)
        if not ioas_ids:
            return
        ioas = data.draw(st.sampled_from(ioas_ids))
        if whole:
            if self._try(self.ictx.ioas_unmap, ioas, 0, (1 << 64) - 1) is not None:
                self.model[ioas].clear()
            return
        areas = sorted(self.model[ioas].items())
        if not areas:
            self._try(self.ictx.ioas_unmap, ioas, 0x10_0000, PAGE)
            return
        iova, (length, _, _) = data.draw(st.sampled_from(areas))
        if self._try(self.ictx.ioas_unmap, ioas, iova, length) is not None:
            del self.model[ioas][iova]

    @rule(data=st.data())
    def ioas_copy(self, data) -> None:
        ioas_ids = self._ids(Ioas)
        srcs = [(i, a) for i in ioas_ids for a in self.model[i].items()]
        if not srcs:
            return
        src, (iova, (length, va, flags)) = data.draw(st.sampled_from(srcs))
        dst = data.draw(st.sampled_from(ioas_ids))
        out = self._try(self.ictx.ioas_copy, dst, None, src, iova, length, flags)
        if out is not None:
            self.model[dst][out] = (length, va, flags)

    @rule(data=st.data(), flags=st.sampled_from([0, HWPT_ALLOC_PASID, HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_PASID]))
    def hwpt_alloc(self, data, flags: int) -> None:
        dev = data.draw(st.sampled_from(self.devs))
        ioas_ids = self._ids(Ioas)
        if ioas_ids:
            self._try(self.ictx.hwpt_alloc, dev.dev_id, data.draw(st.sampled_from(ioas_ids)), flags)

    @rule(data=st.data())
    def nested_alloc(self, data) -> None:
        parents = [h for h in self._ids(HwptPaging) if self.ictx._objects[h].nest_parent]
        if parents:
            dev = data.draw(st.sampled_from(self.devs))
            self._try(self.ictx.hwpt_alloc, dev.dev_id, data.draw(st.sampled_from(parents)), HWPT_ALLOC_PASID,
                      HwptVtdS1(0, 0x1000, 48))

    @rule(data=st.data(), pasid=st.sampled_from([None, None, 3]))
    def attach(self, data, pasid: int | None) -> None:
        dev = data.draw(st.sampled_from(self.devs))
        targets = self._ids(Ioas) * 2 + self._ids(HwptPaging) + self._ids(HwptNested)
        target = data.draw(st.sampled_from(targets)) if targets and data.draw(st.integers(0, 9)) else 99
        self._try(dev.attach_pt, target, pasid)

    @rule(data=st.data(), pasid=st.sampled_from([None, 3]))
    def detach(self, data, pasid: int | None) -> None:
        self._try(data.draw(st.sampled_from(self.devs)).detach_pt, pasid)

    @rule(data=st.data())
    def access_create(self, data) -> None:
        ioas_ids = self._ids(Ioas)
        if ioas_ids:
            acc = self._try(self.ictx.access_create, data.draw(st.sampled_from(ioas_ids)))
            if acc is not None:
                self.accesses.append(acc)

    @precondition(lambda self: bool(self.accesses))
    @rule(data=st.data(), npages=st.integers(1, 2))
    def access_pin(self, data, npages: int) -> None:
        acc = data.draw(st.sampled_from(self.accesses))
        if acc.ioas is None:
            return
        areas = sorted(self.model[acc.ioas.id])
        iova = data.draw(st.sampled_from(areas)) if areas else 0x10_0000
        out = self._try(acc.pin_pages, iova, npages * PAGE)
        if out is not None:
            self.pins.append((acc, out[0]))

    @precondition(lambda self: bool(self.pins))
    @rule(data=st.data())
    def access_unpin(self, data) -> None:
        acc, item = data.draw(st.sampled_from(self.pins))
        self.pins.remove((acc, item))
        if item in acc.items:
            acc.unpin(item)

    @precondition(lambda self: bool(self.accesses))
    @rule(data=st.data())
    def access_destroy(self, data) -> None:
        acc = data.draw(st.sampled_from(self.accesses))
        self.accesses.remove(acc)
        self.pins = [(a, i) for a, i in self.pins if a is not acc]
        acc.destroy()

    @rule(data=st.data())
    def munmap(self, data) -> None:
        i = data.draw(st.integers(0, len(self.buffers) - 1))
        va, alive = self.buffers[i]
        if alive:
            self.host.munmap(va, BUF_PAGES * PAGE)
            self.buffers[i] = (va, False)
            fresh = self.host.mmap(BUF_PAGES * PAGE)
            self.buffers.append((fresh, True))

    @rule()
    def fault_queue(self) -> None:
        fid, f = self.ictx.fault_queue_alloc()
        f.close()

    @rule(data=st.data(), write=st.booleans())
    def dma(self, data, write: bool) -> None:
        attached = [d for d in self.devs if d.idev is not None and self.ictx.device_attached_hwpt(d.idev, 0) is not None]
        dev = data.draw(st.sampled_from(attached if attached and data.draw(st.integers(0, 9)) else self.devs))
        idev = dev.idev
        assert idev is not None
        hwpt = self.ictx.device_attached_hwpt(idev, 0)
        mapped = []
        if isinstance(hwpt, HwptPaging):
            mapped = [iova + off for iova, (n, _, _) in self.model[hwpt.ioas.id].items() for off in (0, n - 8)]
        iova = data.draw(st.sampled_from(mapped if mapped and data.draw(st.integers(0, 4)) else IOVA_SLOTS))
        expect = None
        if isinstance(hwpt, HwptPaging):
            for start, (n, va, flags) in self.model[hwpt.ioas.id].items():
                if start <= iova < start + n:
                    ok = flags & (IOAS_MAP_WRITEABLE if write else IOAS_MAP_READABLE)
                    expect = (va + iova - start) if ok else None
        allowed = self._ioas_pages(hwpt.ioas) if isinstance(hwpt, HwptPaging) else set()
        ram = self.host.ram
        ram.watch = []
        payload = bytes([0xA5, iova & 0xFF, 0x5A, 7])
        out = dev.dma_write(iova, payload) if write else dev.dma_read(iova, 4)
        writes, ram.watch = ram.watch, None
        lo, hi = VMM_POOL
        for addr, old in writes:
            if lo <= addr < hi:
                assert addr & ~(PAGE - 1) in allowed, f"DMA wrote {addr:#x}, outside the IOAS's pages"
        if isinstance(hwpt, HwptNested):
            return   # a nested HWPT's stage 1 is a fake table here: only isolation is checked
        if expect is None:
            assert not out.ok
            assert not [a for a, _ in writes if lo <= a < hi]
            return
        assert out.ok, out
        page = self.host.process._page(expect & ~(PAGE - 1), create=False) if self._alive(expect) else None
        if write:
            assert len([a for a, _ in writes if lo <= a < hi]) == 1
            if page is not None:
                assert self.host.read_user(expect, 4) == payload
        elif page is not None:
            assert out.data == self.host.read_user(expect, 4)

    def _alive(self, va: int) -> bool:
        return any(alive and v <= va < v + BUF_PAGES * PAGE for v, alive in self.buffers)

    def _ioas_pages(self, ioas: Ioas) -> set[int]:
        out = set()
        for area in ioas.iopt.areas:
            for i in range(area.first_index, area.last_index + 1):
                if i in area.pages.pfns:
                    out.add(area.pages.pfns[i])
        return out

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def refcounts(self) -> None:
        if not hasattr(self, "ictx"):
            return
        objs = self.ictx._objects
        holders: dict[int, int] = {i: 1 for i in objs}
        for o in objs.values():
            if isinstance(o, HwptPaging):
                holders[o.ioas.id] += 1
            if isinstance(o, HwptNested):
                holders[o.parent.id] += 1
            if isinstance(o, (HwptPaging, HwptNested)) and o.fault is not None:
                holders[o.fault.id] += 1
            if isinstance(o, Access):
                holders[o.id] += 1
                if o.ioas is not None:
                    holders[o.ioas.id] += 1
            if isinstance(o, Device):
                holders[o.id] += 1   # VFIO's binding
        for f in self.ictx.files:
            holders[f.fault.id] += 1
        for g in self.ictx.groups.values():
            for attach in g.attach.values():
                assert attach.hwpt is not None
                holders[attach.hwpt.id] += len(attach.devices)
                for d in attach.devices.values():
                    holders[d.id] += 1
        assert {i: o.users for i, o in objs.items()} == holders
        assert all(i >= 1 for i in objs)
        assert not any(isinstance(o, Fault) and o.deliver for o in objs.values())

    @invariant()
    def pins_match_holders(self) -> None:
        if not hasattr(self, "ictx"):
            return
        expected: dict[int, int] = {}
        for o in self.ictx._objects.values():
            if not isinstance(o, Ioas):
                continue
            for area in o.iopt.areas:
                assert area.domain_pinned == bool(o.iopt.domains)
                for i in range(area.first_index, area.last_index + 1):
                    assert (i in area.pages.pfns) == (area.pages.pin_count[i] > 0)
        # Each pages object (shared by copies) pins each of its pinned pages once.
        seen: dict[int, object] = {}
        for o in self.ictx._objects.values():
            if isinstance(o, Ioas):
                for area in o.iopt.areas:
                    seen[id(area.pages)] = area.pages
        for pages in seen.values():
            for pfn in pages.pfns.values():  # type: ignore[attr-defined]
                expected[pfn] = expected.get(pfn, 0) + 1
        assert dict(self.host.process.pins) == expected

    def teardown(self) -> None:
        if not hasattr(self, "ictx"):
            return
        self.ictx.close()
        assert self.ictx._objects == {}
        assert self.host.pinned_pages == 0
        assert self.host.intel._dids == set()
        for info in self.host.intel.devices.values():
            assert info.domains == {}
            for index in (0, 3):
                addr = info.pasid_table.entry_addr(index) if index < info.pasid_table.dir_entries * 64 else None
                assert addr is None or self.host.ram.read_u64(addr) & 1 == 0


IommufdMachine.TestCase.settings = settings(max_examples=35, stateful_step_count=30, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestIommufdStateMachine = IommufdMachine.TestCase

