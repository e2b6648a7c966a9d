"""Random sequences of the iommufd API (hypothesis state machine) against the object-model invariants:

- every object's ``users`` equals one plus the holders the object graph says it has (§3.1);
- pins: the host's pinned pages are exactly what areas in IOASes with a domain and access pins hold;
- isolation: a passthrough DMA writes host memory only inside a page an area of the IOAS its device is
  attached to maps, at the place an independent model of the maps predicts, and faults otherwise;
- after ``close()`` no object, pin, DID or present PASID entry is left.

Every step's outcome is predicted before it runs, from the state and the kernel's rules
(``iommufd.md`` §2, §3; the order of checks where it decides): a step must fail with exactly the errno
predicted, or succeed when success is predicted.  A failure must change nothing the invariants can see (the
port rule of iommufd_fail_nth.c).  Across the run, most maps, unmaps, copies, HWPT allocations and
attaches must succeed (:data:`MIN_SUCCESS`): a machine whose every step fails would prove nothing.
"""

from __future__ import annotations

import errno
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from vtd_emu.host import (HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID, Host, HwptVtdS1, IommufdError,
                          IOAS_MAP_READABLE, IOAS_MAP_WRITEABLE)
from vtd_emu.host.host import VMM_POOL
from vtd_emu.host.iommufd import MSI_RANGE, Access, Device, Fault, Hwpt, HwptNested, HwptPaging, Ioas
from vtd_emu.host.iopt import IOMMU_WRITE

PAGE = 4096
BUF_PAGES = 8
IOVA_SLOTS = [0x10_0000 + i * 0x1_0000 for i in range(6)]
MIN_SUCCESS = {"ioas_map": 0.5, "ioas_unmap": 0.25, "ioas_copy": 0.5, "hwpt_alloc": 0.6, "nested_alloc": 0.9,
               "attach": 0.2, "access_pin": 0.2, "destroy": 0.05}
"""The least fraction of attempts of each operation that must succeed over a whole run (each about half what
runs of the machine are seen to reach at their worst)."""
MIN_ATTEMPTS = 15
ALWAYS_TRIED = {"ioas_map", "ioas_unmap", "hwpt_alloc", "attach", "destroy"}
"""Operations every run must try at least MIN_ATTEMPTS times (the others need objects a run may lack)."""
OUTCOMES: Counter[tuple[str, str]] = Counter()
"""(operation, "ok" or the errno's name) -> how often, over every example of the run."""


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
    def _try(self, op: str, predicted: int | None, fn, *args, **kwargs):
        """Run one step; it must end as ``predicted`` (an errno, or None for success)."""
        try:
            out = fn(*args, **kwargs)
        except IommufdError as e:
            OUTCOMES[op, e.name] += 1
            assert e.errno == predicted, (f"{op}: predicted "
                                          f"{errno.errorcode[predicted] if predicted else 'success'}, got {e.name}: {e}")
            return None
        OUTCOMES[op, "ok"] += 1
        assert predicted is None, f"{op}: predicted {errno.errorcode[predicted]}, but it succeeded"
        return out

    def _obj(self, obj_id: int):
        return self.ictx._objects[obj_id]

    # -- the kernel's rules, as predictions ----------------------------------------------------------
    def _pin_fails(self, area, first: int, last: int) -> bool:
        """Pinning pages ``first..last`` of an area faults: a page nobody pins any more whose VA is gone."""
        pages = area.pages
        return any(pages.pin_count[i] == 0 and not self._alive(pages.base + i * PAGE) for i in range(first, last + 1))

    def _fill_errno(self, ioas: Ioas, nest_parent: bool) -> int | None:
        """Adding a domain to ``ioas`` fills it area by area in IOVA order: pin (EFAULT) then map (a
        read-only area in a nest parent: EINVAL, errata 772415)."""
        for area in ioas.iopt.areas:
            if not area.domain_pinned and self._pin_fails(area, area.first_index, area.last_index):
                return errno.EFAULT
            if nest_parent and not area.prot & IOMMU_WRITE:
                return errno.EINVAL
        return None

    def _new_area_errno(self, ioas: Ioas, area_pages_dead: bool, writable: bool) -> int | None:
        """A new area is filled into every domain of the IOAS at once (none: nothing pinned yet)."""
        if not ioas.iopt.domains:
            return None
        if area_pages_dead:
            return errno.EFAULT
        if not writable and any(h.nest_parent for h in ioas.hwpts):
            return errno.EINVAL
        return None

    def _msi_conflict(self, ioas: Ioas) -> bool:
        return any(a.iova <= MSI_RANGE.last and a.last >= MSI_RANGE.start for a in ioas.iopt.areas)

    def _compat_errno(self, hwpt: Hwpt, idev: Device, pasid: int) -> int | None:
        """The PASID rules of §3.7 and the device's own PASID support."""
        attach = idev.igroup.attach
        if pasid == 0:
            if not hwpt.pasid_compat and any(p != 0 for p in attach):
                return errno.EINVAL
            return None
        if not hwpt.pasid_compat:
            return errno.EINVAL
        rid = attach.get(0)
        if rid is not None and rid.hwpt is not None and not rid.hwpt.pasid_compat:
            return errno.EINVAL
        if not idev.info.max_pasids:
            return errno.EINVAL
        return None

    def _attach_errno(self, hwpt: Hwpt, idev: Device, pasid: int) -> int | None:
        """``iommufd_hw_pagetable_attach``: a group uses one HWPT per PASID (a second device joins it with
        no further check); a RID on a paging HWPT reserves the MSI window first."""
        attach = idev.igroup.attach.get(pasid)
        if attach is not None and attach.hwpt is not hwpt:
            return errno.EINVAL
        if isinstance(hwpt, HwptPaging) and pasid == 0 and self._msi_conflict(hwpt.ioas):
            return errno.EADDRINUSE
        if attach is not None:
            return None
        return self._compat_errno(hwpt, idev, pasid)

    def _replace_errno(self, hwpt: Hwpt, idev: Device, pasid: int) -> int | None:
        """``iommufd_device_do_replace``: the whole group moves, or nothing does."""
        old = self.ictx.device_attached_hwpt(idev, pasid)
        if hwpt is old:
            return None
        if (isinstance(hwpt, HwptPaging) and pasid == 0
                and not (isinstance(old, HwptPaging) and old.ioas is hwpt.ioas) and self._msi_conflict(hwpt.ioas)):
            return errno.EADDRINUSE
        return self._compat_errno(hwpt, idev, pasid)

    def _auto_errno(self, ioas: Ioas, idev: Device, pasid: int, replace: bool) -> int | None:
        """``iommufd_device_auto_get_domain``: the IOAS's automatic domains are tried in turn (EINVAL means
        incompatible: try the next), else a new one (flags 0: no PASID) is made."""
        for hwpt in ioas.hwpts:
            if not hwpt.auto_domain:
                continue
            err = self._replace_errno(hwpt, idev, pasid) if replace else self._attach_errno(hwpt, idev, pasid)
            if err != errno.EINVAL:
                return err
        fresh = HwptPaging(self.ictx, ioas)   # a stand-in with the new domain's properties, never entered
        fresh.pasid_compat = False
        if replace:
            # Allocated and filled first, then swapped in.
            return self._fill_errno(ioas, False) or self._replace_errno(fresh, idev, pasid)
        # Attached first (immediate_attach), then filled.
        return self._attach_errno(fresh, idev, pasid) or self._fill_errno(ioas, False)

    def _predict_attach(self, dev, target: int, pasid: int | None) -> int | None:
        idev = dev.idev
        index = pasid or 0
        attached = (3 in dev._pasids) if pasid is not None else dev._rid_attached
        obj = self.ictx._objects.get(target)
        if obj is None:
            return errno.ENOENT
        if isinstance(obj, Ioas):
            return self._auto_errno(obj, idev, index, attached)
        if not isinstance(obj, Hwpt):
            return errno.EINVAL
        return self._replace_errno(obj, idev, index) if attached else self._attach_errno(obj, idev, index)

    def _ids(self, cls: type) -> list[int]:
        return [o.id for o in self.ictx._objects.values() if isinstance(o, cls)]

    # -- rules -------------------------------------------------------------------------------------
    @rule()
    def ioas_alloc(self) -> None:
        self.model[self.ictx.ioas_alloc()] = {}

    @rule(data=st.data())
    def destroy(self, data) -> None:
        ids = list(self.ictx._objects) + [99]
        # Half the time an object nothing holds: most objects are held, and EBUSY alone proves little.
        free = [i for i, o in self.ictx._objects.items() if o.users == 1]
        obj_id = data.draw(st.sampled_from(free if free and data.draw(st.booleans()) else ids))
        obj = self.ictx._objects.get(obj_id)
        predicted = errno.ENOENT if obj is None else (errno.EBUSY if obj.users != 1 else None)
        self._try("destroy", predicted, self.ictx.destroy, obj_id)
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
        start = va + first * PAGE
        obj = self._obj(ioas)
        predicted = None
        if iova is not None and any(a.iova < iova + npages * PAGE and a.last >= iova for a in obj.iopt.areas):
            predicted = errno.EEXIST
        if predicted is None:
            dead = any(not self._alive(start + i * PAGE) for i in range(npages))
            predicted = self._new_area_errno(obj, dead, writable)
        out = self._try("ioas_map", predicted, self.ictx.ioas_map, ioas, start, npages * PAGE, iova, flags)
        if out is not None:
            self.model[ioas][out] = (npages * PAGE, va + first * PAGE, flags)

    @rule(data=st.data(), whole=st.booleans())
    def ioas_unmap(self, data, whole: bool) -> None:
        ioas_ids = self._ids(Ioas)
        if not ioas_ids:
            return
        mapping = [i for i in ioas_ids if self.model[i]]
        ioas = data.draw(st.sampled_from(mapping if mapping and data.draw(st.integers(0, 3)) else ioas_ids))
        if whole:
            # Everything, even nothing; accesses unpin what they hold through the default callback.
            if self._try("ioas_unmap", None, self.ictx.ioas_unmap, ioas, 0, (1 << 64) - 1) is not None:
                self.model[ioas].clear()
            return
        areas = sorted(self.model[ioas].items())
        if not areas:
            self._try("ioas_unmap", errno.ENOENT, self.ictx.ioas_unmap, ioas, 0x10_0000, PAGE)
            return
        iova, (length, _, _) = data.draw(st.sampled_from(areas))
        if self._try("ioas_unmap", None, self.ictx.ioas_unmap, ioas, iova, length) is not None:
            del self.model[ioas][iova]

    @rule(data=st.data())
    def ioas_copy(self, data) -> None:
        ioas_ids = self._ids(Ioas)
        srcs = [(i, a) for i in ioas_ids for a in self.model[i].items()]
        if not srcs:
            return
        src, (iova, (length, va, flags)) = data.draw(st.sampled_from(srcs))
        dst = data.draw(st.sampled_from(ioas_ids))
        area = self._obj(src).iopt.area_at(iova)
        # The copy shares the source's pages: only those nobody pins need their VA.
        dead = self._pin_fails(area, area.index_of(iova)[0], area.index_of(iova + length - 1)[0])
        predicted = self._new_area_errno(self._obj(dst), dead, bool(flags & IOAS_MAP_WRITEABLE))
        out = self._try("ioas_copy", predicted, self.ictx.ioas_copy, dst, None, src, iova, length, flags)
        if out is not None:
            self.model[dst][out] = (length, va, flags)

    @rule(data=st.data(), flags=st.sampled_from([0, HWPT_ALLOC_PASID, HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_PASID]))
    def hwpt_alloc(self, data, flags: int) -> None:
        dev = data.draw(st.sampled_from(self.devs))
        ioas_ids = self._ids(Ioas)
        if ioas_ids:
            ioas = data.draw(st.sampled_from(ioas_ids))
            predicted = self._fill_errno(self._obj(ioas), bool(flags & HWPT_ALLOC_NEST_PARENT))
            self._try("hwpt_alloc", predicted, self.ictx.hwpt_alloc, dev.dev_id, ioas, flags)

    @rule(data=st.data())
    def nested_alloc(self, data) -> None:
        parents = [h for h in self._ids(HwptPaging) if self.ictx._objects[h].nest_parent]
        if parents:
            dev = data.draw(st.sampled_from(self.devs))
            # Stage-1 data is not checked at allocation (iommufd.md §6.1): an explicit parent always takes it.
            self._try("nested_alloc", None, self.ictx.hwpt_alloc, dev.dev_id, data.draw(st.sampled_from(parents)),
                      HWPT_ALLOC_PASID, HwptVtdS1(0, 0x1000, 48))

    @rule(data=st.data(), pasid=st.sampled_from([None, None, 3]))
    def attach(self, data, pasid: int | None) -> None:
        dev = data.draw(st.sampled_from(self.devs))
        targets = self._ids(Ioas) * 2 + self._ids(HwptPaging) + self._ids(HwptNested)
        if not targets:
            return   # nothing to attach to (an unknown id is still tried below, one time in ten)
        target = data.draw(st.sampled_from(targets)) if data.draw(st.integers(0, 9)) else 99
        self._try("attach", self._predict_attach(dev, target, pasid), dev.attach_pt, target, pasid)

    @rule(data=st.data(), pasid=st.sampled_from([None, 3]))
    def detach(self, data, pasid: int | None) -> None:
        self._try("detach", None, data.draw(st.sampled_from(self.devs)).detach_pt, pasid)

    @rule(data=st.data())
    def access_create(self, data) -> None:
        ioas_ids = self._ids(Ioas)
        mapping = [i for i in ioas_ids if self.model[i]]
        if ioas_ids:
            ioas = data.draw(st.sampled_from(mapping if mapping and data.draw(st.integers(0, 3)) else ioas_ids))
            acc = self._try("access_create", None, self.ictx.access_create, ioas)
            if acc is not None:
                self.accesses.append(acc)

    def _useful_accesses(self) -> list[Access]:
        return [a for a in self.accesses if a.ioas is not None and self.model[a.ioas.id]]

    @precondition(lambda self: bool(self._useful_accesses()))
    @rule(data=st.data(), npages=st.integers(1, 2))
    def access_pin(self, data, npages: int) -> None:
        # Mostly an access whose IOAS maps something: pins of nothing would only ever test ENOENT.
        useful = self._useful_accesses()
        acc = data.draw(st.sampled_from(useful if data.draw(st.integers(0, 4)) else self.accesses))
        if acc.ioas is None:
            return
        areas = sorted(self.model[acc.ioas.id].items())
        iova = 0x10_0000
        if areas:
            iova, (length, _, _) = data.draw(st.sampled_from(areas))
            if data.draw(st.integers(0, 3)):
                npages = min(npages, length // PAGE)   # mostly inside the area; sometimes past it
        out = self._try("access_pin", self._predict_pin(acc.ioas, iova, npages * PAGE), acc.pin_pages, iova,
                        npages * PAGE)
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
        # What translates is the group's HWPT: the first attach programs every device of the IOMMU group
        # (docs/host.md), attached through iommufd or not.
        group_attach = idev.igroup.attach.get(0)
        hwpt = group_attach.hwpt if group_attach is not None else None
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

    def _predict_pin(self, ioas: Ioas, iova: int, length: int) -> int | None:
        """``iommufd_access_pin_pages``: slice by slice along the run of adjacent areas from ``iova``
        (a slice whose pages cannot be pinned: EFAULT), and the run must reach the end (ENOENT)."""
        last = iova + length - 1
        cur = iova
        while True:
            area = next((a for a in ioas.iopt.areas if a.iova <= cur <= a.last), None)
            if area is None or (cur != iova and area.iova != cur):
                return errno.ENOENT
            end = min(last, area.last)
            if self._pin_fails(area, area.index_of(cur)[0], area.index_of(end)[0]):
                return errno.EFAULT
            if end == last:
                return None
            cur = end + 1

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


def test_iommufd_state_machine() -> None:
    OUTCOMES.clear()
    run_state_machine_as_test(IommufdMachine, settings=settings(
        max_examples=120, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]))
    for op, fraction in MIN_SUCCESS.items():
        tries = sum(n for (o, _), n in OUTCOMES.items() if o == op)
        ok = OUTCOMES[op, "ok"]
        assert tries >= MIN_ATTEMPTS or op not in ALWAYS_TRIED, f"{op} tried only {tries} times"
        if tries < MIN_ATTEMPTS:
            continue   # too few to judge a fraction (each attempt's errno was still checked)
        assert ok >= fraction * tries, (f"{op}: {ok} of {tries} succeeded, fewer than {fraction:.0%}; "
                                        f"failures {[(k[1], n) for k, n in OUTCOMES.items() if k[0] == op]}")

