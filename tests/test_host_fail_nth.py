"""The port rule of iommufd_fail_nth.c (iommufd.md §9.10): any step may fail, and no object, pin, domain
ID or page-table page may leak.

The kernel test injects a failure at the n-th allocation of a run; here the n-th pin of a user page or
the n-th allocation of a driver page (page tables, PASID tables) fails with ENOMEM, for every n until
the sequence runs through.  After each run the context is closed and everything must be back.
"""

from __future__ import annotations

import errno
from typing import Callable

import pytest

from vtd_emu.host import (HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_PASID, Host, HwptVtdS1, IommufdError,
                          VtdS1Invalidate)
from vtd_emu.host.errors import fail
from vtd_emu.host.iommufd import IommuFd

PAGE = 4096
HUGE = 2 << 20


class Injector:
    """Make the n-th call of the hooked functions raise ENOMEM."""

    def __init__(self, host: Host, n: int) -> None:
        self.n = n
        self.calls = 0
        self.fired = False
        proc, pool = host.process, host.driver_pool
        self._pin, self._alloc = proc.pin_user, pool.alloc

        def pin_user(va: int, write: bool) -> int:
            self._tick()
            return self._pin(va, write)

        def alloc(pages: int = 1, align: int = PAGE) -> int:
            self._tick()
            return self._alloc(pages, align)

        proc.pin_user = pin_user  # type: ignore[method-assign]
        pool.alloc = alloc  # type: ignore[method-assign]

    def _tick(self) -> None:
        self.calls += 1
        if self.calls == self.n:
            self.fired = True
            raise fail(errno.ENOMEM, f"injected failure #{self.n}")


def seq_basic(host: Host, ictx: IommuFd) -> None:
    buf = host.mmap(HUGE, huge=True)
    ioas = ictx.ioas_alloc()
    ictx.ioas_iova_ranges(ioas)
    ictx.ioas_allow_iovas(ioas, [(16 << 10, HUGE + (16 << 10) * 600 - 1)])
    iova = ictx.ioas_map(ioas, buf, HUGE)
    dst = ictx.ioas_alloc()
    ictx.ioas_copy(dst, None, ioas, iova, HUGE)
    # Without a domain nothing is pinned or allocated yet: a device on the copy makes both happen.
    dev = host.devices[0x10]
    dev.bind_iommufd(ictx)
    dev.attach_pt(dst)
    ictx.ioas_unmap(ioas, iova, HUGE)
    with pytest.raises(IommufdError):
        ictx.ioas_unmap(ioas, iova, HUGE)


def seq_map_domain(host: Host, ictx: IommuFd) -> None:
    buf = host.mmap(256 << 10)
    ioas = ictx.ioas_alloc()
    dev = host.devices[0x10]
    dev.bind_iommufd(ictx)
    dev.attach_pt(ioas)
    iova = ictx.ioas_map(ioas, buf, 256 << 10)
    assert dev.dma_read(iova, 4).ok
    dev.unbind()
    dev.bind_iommufd(ictx)
    dev.attach_pt(ioas)
    ictx.ioas_unmap(ioas, iova, 256 << 10)


def seq_map_two_domains(host: Host, ictx: IommuFd) -> None:
    buf = host.mmap(64 << 10)
    ioas = ictx.ioas_alloc()
    a, b = host.devices[0x10], host.devices[0x18]
    for d in (a, b):
        d.bind_iommufd(ictx)
        d.attach_pt(ictx.hwpt_alloc(d.dev_id, ioas))
    ictx.ioas_map(ioas, buf, 64 << 10, iova=1 << 30)
    assert b.dma_write(1 << 30, b"ok").ok


def seq_access(host: Host, ictx: IommuFd) -> None:
    buf = host.mmap(32 << 10)
    ioas = ictx.ioas_alloc()
    acc = ictx.access_create(ioas)
    ictx.ioas_map(ioas, buf, 32 << 10, iova=1 << 24)
    acc.write(1 << 24, b"abc")
    assert acc.read(1 << 24, 3) == b"abc"
    item, _ = acc.pin_pages(1 << 24, 8 * PAGE)
    dev = host.devices[0x10]
    dev.bind_iommufd(ictx)
    dev.attach_pt(ioas)
    acc.unpin(item)
    acc.destroy()


def seq_device(host: Host, ictx: IommuFd) -> None:
    buf = host.mmap(64 << 10)
    ioas, ioas2 = ictx.ioas_alloc(), ictx.ioas_alloc()
    ictx.ioas_map(ioas, buf, 64 << 10, iova=0)
    ictx.ioas_map(ioas2, buf, 64 << 10, iova=0)
    dev = host.devices[0x20]
    dev_id = dev.bind_iommufd(ictx)
    ictx.get_hw_info(dev_id)
    hwpt = ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_PASID)
    dev.attach_pt(ioas)
    dev.attach_pt(ioas2)
    dev.attach_pt(hwpt)
    parent = ictx.hwpt_alloc(dev_id, ioas, HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_PASID)
    fault_id, ffile = ictx.fault_queue_alloc()
    nested = ictx.hwpt_alloc(dev_id, parent, HWPT_ALLOC_PASID, HwptVtdS1(0, 0x1000, 48), fault_id=fault_id)
    dev.attach_pt(parent)
    dev.attach_pt(nested, pasid=7)
    dev.attach_pt(hwpt, pasid=9)
    ictx.hwpt_invalidate(nested, [VtdS1Invalidate()])
    dev.detach_pt(pasid=7)
    ffile.close()


SEQUENCES: dict[str, Callable[[Host, IommuFd], None]] = {
    "basic": seq_basic, "map_domain": seq_map_domain, "map_two_domains": seq_map_two_domains,
    "access": seq_access, "device": seq_device,
}


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_fail_nth(name: str) -> None:
    seq = SEQUENCES[name]
    n = 1
    while True:
        host = Host()
        for sid, kw in ((0x10, {}), (0x18, {}), (0x20, {"pasid_bits": 8, "pri": True})):
            host.add_device(sid, **kw)
        baseline = host.driver_pool.in_use
        ictx = host.open_iommufd()
        inj = Injector(host, n)
        try:
            seq(host, ictx)
        except IommufdError as e:
            assert e.errno == errno.ENOMEM and inj.fired, f"step failed without an injection: {e}"
        ictx.close()
        assert ictx._objects == {}
        assert host.pinned_pages == 0 and not host.process.pins
        assert host.intel._dids == set()
        for info in host.intel.devices.values():
            assert info.domains == {}
        # Page-table pages come back; PASID tables stay with their devices, as in the kernel.
        extra = sum(len(i.pasid_table.tables) for i in host.intel.devices.values())
        assert host.driver_pool.in_use <= baseline + extra
        if not inj.fired:
            break
        n += 1
    assert n > 1, "the sequence has no injection point"
