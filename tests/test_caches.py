"""Stale-cache scenarios: a guest that changes a structure in memory keeps getting the old translation
until it issues an invalidation of the right granularity; an invalidation of the wrong granularity,
domain, device or PASID leaves the stale entry in place.

Legacy-mode invalidations go through the registers (CCMD at 0x28, IVA/IOTLB_REG at ECAP.IRO*16 and
+8) so the register path and the CAIG/IAIG readback are covered; PASID-granular ones (PASID cache,
PASID-based IOTLB) use the cache methods.  Default: the ``modern`` preset, ``spec`` profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtd_emu.tables import (
    PAGE_1G,
    PAGE_2M,
    PGTT_FS,
    PGTT_SS,
    FirstStageTable,
    LegacyRootTable,
    PageAllocator,
    PasidTables,
    R,
    ScalableRootTable,
    SecondStageTable,
    U,
    W,
    enable_translation,
)
from vtd_emu.memory import HostRAM
from vtd_emu.vtd.caches import Caches, iotlb_key
from vtd_emu.vtd.config import VtdConfig
from vtd_emu.vtd.entries import CTX_LEGACY, KIND_FS, KIND_NESTED, KIND_PT, KIND_SS, IotlbEntry, LegacyContext
from vtd_emu.vtd.iommu import Fault, Translation, VtdIommu

K4 = 0x1000
ADDR_51_12 = 0x000F_FFFF_FFFF_F000
BUS = 2
GCMD, GSTS, RTADDR, CCMD = 0x18, 0x1C, 0x20, 0x28
ICC, IVT = 1 << 63, 1 << 63
X = 0x1000_0000
OLD, NEW = 0x3_0000_0000, 0x5_0000_0000  # output bases before and after the guest's edit


def sid(devfn: int, bus: int = BUS) -> int:
    return bus << 8 | devfn


# -- register-based invalidation ------------------------------------------------------------------


def ccmd(io: VtdIommu, cirg: int, *, did: int = 0, sid_: int = 0, fm: int = 0) -> int:
    """Context-cache invalidation through CCMD; returns CAIG (and checks ICC was cleared)."""
    io.mmio_write(CCMD, ICC | cirg << 61 | fm << 32 | sid_ << 16 | did, 8)
    v = io.mmio_read(CCMD, 8)
    assert not v & ICC, "ICC must read 0 once the invalidation is done"
    return (v >> 59) & 3


def iotlb_regs(io: VtdIommu) -> tuple[int, int]:
    iro = (io.mmio_read(0x10, 8) >> 8) & 0x3FF
    return iro * 16, iro * 16 + 8


def iotlb(io: VtdIommu, iirg: int, *, did: int = 0, addr: int = 0, am: int = 0, ih: bool = False) -> int:
    """IOTLB invalidation through IVA/IOTLB_REG; returns IAIG (and checks IVT was cleared)."""
    iva, reg = iotlb_regs(io)
    io.mmio_write(iva, addr | int(ih) << 6 | am, 8)
    io.mmio_write(reg, IVT | iirg << 60 | did << 32, 8)
    v = io.mmio_read(reg, 8)
    assert not v & IVT, "IVT must read 0 once the invalidation is done"
    return (v >> 57) & 3


def gcmd(io: VtdIommu, bit: int) -> None:
    io.mmio_write(GCMD, (io.mmio_read(GSTS, 4) & 0x96FF_FFFF) | bit, 4)


def out(io: VtdIommu, s: int, iova: int, access: str = "r", pasid: int | None = None) -> int:
    res = io.translate(s, iova, access, pasid=pasid)
    assert isinstance(res, Translation), res
    return res.addr


# -- legacy environment ---------------------------------------------------------------------------


@dataclass
class Legacy:
    io: VtdIommu
    ram: HostRAM
    alloc: PageAllocator
    rt: LegacyRootTable
    tables: dict[int, SecondStageTable] = field(default_factory=dict)

    def table(self) -> SecondStageTable:
        return SecondStageTable(self.ram, self.alloc, 4)

    def attach(self, s: int, ss: SecondStageTable, did: int) -> None:
        self.rt.set_context(s >> 8, s & 0xFF, slptptr=ss.root, aw=ss.aw, did=did)
        self.tables[s] = ss


def legacy(preset: str = "modern", *, profile: str = "spec", overrides: dict[str, int] | None = None,
           **cfg_kw: Any) -> Legacy:
    ram = HostRAM()
    alloc = PageAllocator(ram)
    rt = LegacyRootTable(ram, alloc)
    io = VtdIommu(ram, VtdConfig.preset(preset, profile=profile, overrides=overrides or {}, **cfg_kw))
    env = Legacy(io, ram, alloc, rt)
    enable_translation(io, rt.root)
    return env


# -- context cache ----------------------------------------------------------------------------------


def _context_scenario() -> tuple[Legacy, int]:
    """Device sid(0x0D) (DID 1) on table A (X -> OLD), then its context entry is rewritten in memory to
    table B (X -> NEW) without invalidation; the IOTLB is flushed so only the context cache is stale."""
    env = legacy()
    a, b = env.table(), env.table()
    a.map(X, OLD, K4)
    b.map(X, NEW, K4)
    s = sid(0x0D)
    env.attach(s, a, did=1)
    assert out(env.io, s, X) == OLD
    env.rt.set_context(BUS, 0x0D, slptptr=b.root, aw=b.aw, did=1)
    assert iotlb(env.io, 1) == 1
    assert out(env.io, s, X) == OLD, "context entry must be served from the context cache"
    return env, s


def _after_context_inv(env: Legacy, s: int) -> int:
    iotlb(env.io, 1)  # the spec requires an IOTLB invalidation after a context-cache invalidation
    return out(env.io, s, X)


def test_context_global() -> None:
    env, s = _context_scenario()
    assert ccmd(env.io, 1) == 1
    assert _after_context_inv(env, s) == NEW


def test_context_domain() -> None:
    env, s = _context_scenario()
    assert ccmd(env.io, 2, did=2) == 2  # another domain: stays stale
    assert _after_context_inv(env, s) == OLD
    assert ccmd(env.io, 2, did=1) == 2
    assert _after_context_inv(env, s) == NEW


@pytest.mark.parametrize("inv_sid,fm,hit", [
    (sid(0x0D), 0, True),
    (sid(0x09), 0, False),   # differs in bit 2
    (sid(0x09), 1, True),    # FM=1 ignores bit 2
    (sid(0x0B), 1, False),   # differs in bit 1 too
    (sid(0x0B), 2, True),    # FM=2 ignores bits 2:1
    (sid(0x0C), 2, False),   # differs in bit 0
    (sid(0x0C), 3, True),    # FM=3 ignores bits 2:0
    (sid(0x08), 3, True),
    (sid(0x15), 3, False),   # another device number
    (sid(0x0D, bus=3), 3, False),  # another bus
])
def test_context_device_function_mask(inv_sid: int, fm: int, hit: bool) -> None:
    env, s = _context_scenario()
    assert ccmd(env.io, 3, sid_=inv_sid, fm=fm) == 3
    assert _after_context_inv(env, s) == (NEW if hit else OLD)


def test_context_not_present_change_is_cached_until_invalidated() -> None:
    """Clearing P of a cached context entry does not stop translation until the context cache is
    invalidated; afterwards the device faults 0x2."""
    env = legacy()
    a = env.table()
    a.map(X, OLD, 2 * K4)
    s = sid(0x10)
    env.attach(s, a, did=7)
    assert out(env.io, s, X) == OLD
    env.rt.clear_context(BUS, 0x10)
    assert out(env.io, s, X + K4) == OLD + K4  # IOTLB miss, context hit
    assert ccmd(env.io, 3, sid_=s) == 3
    iotlb(env.io, 2, did=7)
    res = env.io.translate(s, X)
    assert isinstance(res, Fault) and res.reason == 0x02


def test_ccmd_readback_keeps_request_fields() -> None:
    env = legacy()
    v = ICC | 3 << 61 | 2 << 32 | 0x1234 << 16 | 0x55
    env.io.mmio_write(CCMD, v, 8)
    back = env.io.mmio_read(CCMD, 8)
    assert back == (v & ~ICC) | 3 << 59  # CIRG/FM/SID/DID read back; CAIG = device; ICC cleared


def test_ccmd_written_as_two_halves_acts_on_high_half() -> None:
    env, s = _context_scenario()
    env.io.mmio_write(CCMD, s << 16, 4)  # low half: SID, no ICC yet
    iotlb(env.io, 1)
    assert out(env.io, s, X) == OLD
    env.io.mmio_write(CCMD + 4, (ICC | 3 << 61) >> 32, 4)  # high half: ICC + device granularity
    assert (env.io.mmio_read(CCMD, 8) >> 59) & 3 == 3
    assert _after_context_inv(env, s) == NEW


# -- IOTLB (legacy, register-based) ---------------------------------------------------------------------


def _mapped(env: Legacy, s: int, did: int, pages: int, base: int = X, page: int = K4,
            old: int = OLD) -> SecondStageTable:
    ss = env.table()
    ss.map(base, old, pages * page, R | W, page_size=page)
    env.attach(s, ss, did)
    for i in range(pages):
        assert out(env.io, s, base + i * page) == old + i * page
    return ss


def test_iotlb_global() -> None:
    env = legacy()
    s = sid(0x10)
    ss = _mapped(env, s, 1, 1)
    ss.map(X, NEW, K4)
    assert out(env.io, s, X) == OLD
    assert iotlb(env.io, 1) == 1
    assert out(env.io, s, X) == NEW


def test_iotlb_domain_selective() -> None:
    env = legacy()
    s1, s2 = sid(0x10), sid(0x18)
    t1 = _mapped(env, s1, 1, 1)
    t2 = _mapped(env, s2, 2, 1)
    t1.map(X, NEW, K4)
    t2.map(X, NEW, K4)
    assert iotlb(env.io, 2, did=2) == 2
    assert out(env.io, s1, X) == OLD
    assert out(env.io, s2, X) == NEW
    assert iotlb(env.io, 2, did=1) == 2
    assert out(env.io, s1, X) == NEW


@pytest.mark.parametrize("addr_page,am,fresh", [
    (5, 0, {5}),
    (4, 2, {4, 5, 6, 7}),
    (6, 2, {4, 5, 6, 7}),        # ADDR's low AM page bits are ignored
    (0, 3, set(range(8))),
    (8, 3, set(range(8, 16))),
    (0, 4, set(range(16))),
])
def test_iotlb_page_selective_am(addr_page: int, am: int, fresh: set[int]) -> None:
    env = legacy()
    s = sid(0x10)
    ss = _mapped(env, s, 3, 16)
    ss.map(X, NEW, 16 * K4)
    assert iotlb(env.io, 3, did=4, addr=X + addr_page * K4, am=am) == 3  # another domain: nothing
    assert all(out(env.io, s, X + i * K4) == OLD + i * K4 for i in range(16))
    assert iotlb(env.io, 3, did=3, addr=X + addr_page * K4, am=am) == 3
    for i in range(16):
        want = (NEW if i in fresh else OLD) + i * K4
        assert out(env.io, s, X + i * K4) == want, i


@pytest.mark.parametrize("page,am", [(PAGE_2M, 9), (PAGE_1G, 18)])
def test_iotlb_page_selective_large_leaves(page: int, am: int) -> None:
    env = legacy()
    s = sid(0x10)
    base = 0x40_0000_0000
    ss = _mapped(env, s, 5, 2, base=base, page=page, old=0x80_0000_0000)
    ss.map(base, 0xC0_0000_0000, 2 * page, R | W, page_size=page)
    probe = 0x12_3000
    assert out(env.io, s, base + probe) == 0x80_0000_0000 + probe
    # An invalidation of the neighbouring range leaves both.
    assert iotlb(env.io, 3, did=5, addr=base + 2 * page, am=am) == 3
    assert out(env.io, s, base + probe) == 0x80_0000_0000 + probe
    assert out(env.io, s, base + page + probe) == 0x80_0000_0000 + page + probe
    # Exactly the first leaf.
    assert iotlb(env.io, 3, did=5, addr=base, am=am) == 3
    assert out(env.io, s, base + probe) == 0xC0_0000_0000 + probe
    assert out(env.io, s, base + page + probe) == 0x80_0000_0000 + page + probe
    # A 4 KiB invalidation of one page inside the second leaf removes the whole leaf caching it.
    assert iotlb(env.io, 3, did=5, addr=base + page + 7 * K4, am=0) == 3
    assert out(env.io, s, base + page + probe) == 0xC0_0000_0000 + page + probe


def test_iotlb_page_selective_am_above_mamv_fails() -> None:
    env = legacy()  # modern: MAMV = 18
    s = sid(0x10)
    ss = _mapped(env, s, 1, 1)
    ss.map(X, NEW, K4)
    assert iotlb(env.io, 3, did=1, addr=0, am=19) == 0
    assert out(env.io, s, X) == OLD
    assert iotlb(env.io, 3, did=1, addr=0, am=18) == 3  # 1 GiB range around X
    assert out(env.io, s, X) == NEW


def _psc_scenario() -> tuple[Legacy, int, SecondStageTable]:
    """X is cached through page table PT_A.  Then the PDE on X's path is pointed (in memory) at a new
    page table PT_B mapping X -> NEW: a non-leaf change."""
    env = legacy()
    s = sid(0x10)
    ss = _mapped(env, s, 9, 1)
    pt_b = env.alloc.alloc()
    pte_a = env.ram.read_u64(ss.entry_addr(X, 1))
    env.ram.write_u64(pt_b + 8 * ((X >> 12) & 511), (pte_a & ~ADDR_51_12) | NEW)
    ss.set_entry_bits(X, 2, pt_b, ADDR_51_12)
    assert out(env.io, s, X) == OLD
    return env, s, ss


def test_iotlb_ih1_keeps_paging_structure_cache() -> None:
    env, s, _ = _psc_scenario()
    assert iotlb(env.io, 3, did=9, addr=X, am=0, ih=True) == 3
    assert out(env.io, s, X) == OLD, "IH=1: the cached PDE (-> PT_A) is kept, so PT_A is walked"
    assert iotlb(env.io, 3, did=9, addr=X, am=0, ih=False) == 3
    assert out(env.io, s, X) == NEW


@pytest.mark.parametrize("inv", ["domain", "global"])
def test_iotlb_domain_and_global_drop_paging_structure_cache(inv: str) -> None:
    env, s, _ = _psc_scenario()
    if inv == "domain":
        assert iotlb(env.io, 2, did=8) == 2
        assert out(env.io, s, X) == OLD
        assert iotlb(env.io, 2, did=9) == 2
    else:
        assert iotlb(env.io, 1) == 1
    assert out(env.io, s, X) == NEW


def test_iotlb_ih1_still_drops_leaves() -> None:
    env = legacy()
    s = sid(0x10)
    ss = _mapped(env, s, 9, 2)
    ss.map(X, NEW, 2 * K4)
    assert iotlb(env.io, 3, did=9, addr=X, am=0, ih=True) == 3
    assert out(env.io, s, X) == NEW
    assert out(env.io, s, X + K4) == OLD + K4


def test_iotlb_size_limit_evicts() -> None:
    env = legacy(iotlb_size=2)
    s = sid(0x10)
    ss = _mapped(env, s, 1, 3)  # pages 0, 1, 2 translated in that order: page 0 no longer fits
    ss.map(X, NEW, 3 * K4)
    assert out(env.io, s, X + 2 * K4) == OLD + 2 * K4  # the most recent entry is still cached
    assert out(env.io, s, X) == NEW  # the oldest was evicted and is walked again
    assert len(env.io.caches.iotlb) <= 2


def test_two_devices_in_one_domain_share_iotlb_entries() -> None:
    env = legacy()
    a, b = sid(0x10), sid(0x11)
    ss = _mapped(env, a, 4, 1)
    env.attach(b, ss, did=4)
    ss.map(X, NEW, K4)
    assert out(env.io, b, X) == OLD, "the IOTLB is tagged by DID: b hits a's entry"
    assert iotlb(env.io, 2, did=4) == 2
    assert out(env.io, a, X) == NEW and out(env.io, b, X) == NEW


def test_iotlb_tag_is_the_domain_not_the_table() -> None:
    """Software must give different tables different DIDs: the IOTLB trusts the DID alone."""
    env = legacy()
    a, b = sid(0x10), sid(0x11)
    _mapped(env, a, 4, 1)
    other = env.table()
    other.map(X, NEW, K4)
    env.attach(b, other, did=4)
    assert out(env.io, b, X) == OLD
    env.rt.set_context(BUS, 0x11, slptptr=other.root, aw=other.aw, did=5)
    assert ccmd(env.io, 3, sid_=b) == 3
    assert out(env.io, b, X) == NEW  # its own domain now: walked


def test_iotlb_page_selective_without_psi_is_done_as_domain() -> None:
    """CAP.PSI=0: a page-selective request is carried out (and reported in IAIG) as domain-selective."""
    env = legacy(overrides={"cap.PSI": 0})
    s = sid(0x10)
    ss = _mapped(env, s, 3, 4)
    ss.map(X, NEW, 4 * K4)
    assert iotlb(env.io, 3, did=3, addr=X, am=0) == 2
    assert [out(env.io, s, X + i * K4) for i in range(4)] == [NEW + i * K4 for i in range(4)]


def test_invalid_granularity_reports_failure() -> None:
    env = legacy()
    s = sid(0x10)
    ss = _mapped(env, s, 3, 1)
    ss.map(X, NEW, K4)
    assert ccmd(env.io, 0) == 0
    assert iotlb(env.io, 0, did=3) == 0
    assert out(env.io, s, X) == OLD


@pytest.mark.parametrize("preset,flushes", [("modern", True), ("qemu-7.2-default", False)])
def test_te_off_flushes_caches_on_scalable_capable_units(preset: str, flushes: bool) -> None:
    """Disabling translation on a unit with ECAP.SMTS globally invalidates its caches; a legacy-only
    unit (spec profile) keeps them."""
    env = legacy(preset)
    s = sid(0x10)
    ss = SecondStageTable(env.ram, env.alloc, 3)
    ss.map(X, OLD, K4)
    env.attach(s, ss, 1)
    assert out(env.io, s, X) == OLD
    ss.map(X, NEW, K4)
    env.io.mmio_write(GCMD, env.io.mmio_read(GSTS, 4) & 0x96FF_FFFF & ~(1 << 31), 4)
    assert out(env.io, s, X) == X  # translation off
    gcmd(env.io, 1 << 31)
    assert out(env.io, s, X) == (NEW if flushes else OLD)


@pytest.mark.parametrize("esrtps", [1, 0])
def test_srtp_context_cache(esrtps: int) -> None:
    """With ESRTPS, SRTP invalidates the context cache too; without, a changed context entry stays stale
    even across an IOTLB flush."""
    env = legacy(overrides={"cap.ESRTPS": esrtps})
    a, b = env.table(), env.table()
    a.map(X, OLD, K4)
    b.map(X, NEW, K4)
    s = sid(0x0D)
    env.attach(s, a, did=1)
    assert out(env.io, s, X) == OLD
    env.rt.set_context(BUS, 0x0D, slptptr=b.root, aw=b.aw, did=1)
    gcmd(env.io, 1 << 30)
    iotlb(env.io, 1)
    assert out(env.io, s, X) == (NEW if esrtps else OLD)


def test_register_invalidation_ignored_while_qi_enabled() -> None:
    env = legacy()
    s = sid(0x10)
    ss = _mapped(env, s, 1, 1)
    ss.map(X, NEW, K4)
    gcmd(env.io, 1 << 26)  # QIE
    assert env.io.mmio_read(GSTS, 4) & 1 << 26
    iva, reg = iotlb_regs(env.io)
    env.io.mmio_write(reg, IVT | 1 << 60, 8)
    assert out(env.io, s, X) == OLD


def test_iotlb_registers_follow_iro() -> None:
    env = legacy(overrides={"ecap.IRO": 0x50})
    assert iotlb_regs(env.io) == (0x500, 0x508)
    s = sid(0x10)
    ss = _mapped(env, s, 1, 1)
    ss.map(X, NEW, K4)
    env.io.mmio_write(0xF8, IVT | 1 << 60, 8)  # where IOTLB_REG would be with IRO=0xF: nothing there
    assert out(env.io, s, X) == OLD
    assert iotlb(env.io, 1) == 1
    assert out(env.io, s, X) == NEW


# -- SRTP and ESRTPS ----------------------------------------------------------------------------------


@pytest.mark.parametrize("esrtps", [1, 0])
def test_srtp_flushes_only_with_esrtps(esrtps: int) -> None:
    env = legacy(overrides={"cap.ESRTPS": esrtps})
    s = sid(0x10)
    ss = _mapped(env, s, 1, 1)
    ss.map(X, NEW, K4)
    gcmd(env.io, 1 << 30)  # SRTP with the same root table
    assert env.io.mmio_read(GSTS, 4) & 1 << 30
    assert out(env.io, s, X) == (NEW if esrtps else OLD)


# -- cached read-only entries and writes ---------------------------------------------------------


def test_write_hitting_cached_read_only_entry_is_rewalked() -> None:
    env = legacy()
    s = sid(0x10)
    ss = env.table()
    ss.map(X, OLD, 2 * K4, R)
    env.attach(s, ss, 1)
    assert out(env.io, s, X) == OLD
    assert out(env.io, s, X + K4) == OLD + K4
    ss.protect(X, K4, R | W)  # upgraded in memory, no invalidation (allowed by the spec)
    assert out(env.io, s, X, "w") == OLD
    res = env.io.translate(s, X + K4, "w")  # still read-only in memory: a real fault
    assert isinstance(res, Fault) and res.reason == 0x05 and res.recorded


def test_qemu_profile_drops_write_hitting_cached_read_only_entry() -> None:
    env = legacy("qemu-7.2-default", profile="qemu-7.2")
    s = sid(0x10)
    ss = SecondStageTable(env.ram, env.alloc, 3)
    ss.map(X, OLD, K4, R)
    env.attach(s, ss, 1)
    assert out(env.io, s, X) == OLD
    ss.protect(X, K4, R | W)
    res = env.io.translate(s, X, "w")
    assert isinstance(res, Fault) and res.reason == 0 and not res.recorded
    assert env.io.mmio_read(0x34, 4) & 2 == 0  # no PPF
    assert env.io.dma_write(s, X, b"\xAA" * 8).faults == ()
    assert env.ram.read(OLD, 8) == bytes(8)  # the write went nowhere


def test_qemu_profile_iotlb_keyed_by_source_id() -> None:
    """Contrast with the spec: in QEMU 7.2 two devices of one domain do not share IOTLB entries."""
    env = legacy("qemu-7.2-default", profile="qemu-7.2")
    a, b = sid(0x10), sid(0x11)
    ss = SecondStageTable(env.ram, env.alloc, 3)
    ss.map(X, OLD, K4)
    env.attach(a, ss, 4)
    env.attach(b, ss, 4)
    assert out(env.io, a, X) == OLD
    ss.map(X, NEW, K4)
    assert out(env.io, b, X) == NEW
    assert out(env.io, a, X) == OLD


# -- scalable mode: PASID cache and PASID-based IOTLB ------------------------------------------------

P1, P2, P3 = 0x41, 0x42, 0x43
DID_FS, DID_OTHER = 0x21, 0x22
SHIFT = {P1: 0, P2: 1 << 36, P3: 2 << 36}  # every PASID maps X somewhere else: entries are PASID-tagged


@dataclass
class Sm:
    io: VtdIommu
    ram: HostRAM
    alloc: PageAllocator
    pt: PasidTables
    fs: dict[int, FirstStageTable]
    ss: SecondStageTable
    s: int


def scalable(iotlb_size: int = 4096) -> Sm:
    """One device; P1 and P2 first-stage (own tables), P3 second-stage only, all in domain DID_FS."""
    ram = HostRAM()
    alloc = PageAllocator(ram)
    pt = PasidTables(ram, alloc)
    fs = {}
    for p in (P1, P2):
        t = FirstStageTable(ram, alloc, 4)
        t.map(X, OLD + SHIFT[p], 4 * K4, W | U)
        t.map(X + 0x100_0000, OLD + SHIFT[p] + 0x100_0000, K4, W | U)
        pt.set_entry(p, pgtt=PGTT_FS, did=DID_FS, fsptptr=t.root)
        fs[p] = t
    ss = SecondStageTable(ram, alloc, 4)
    ss.map(X, OLD + SHIFT[P3], 4 * K4, R | W)
    pt.set_entry(P3, pgtt=PGTT_SS, did=DID_FS, ssptptr=ss.root, aw=ss.aw)
    rt = ScalableRootTable(ram, alloc)
    rt.set_context(BUS, 0x08, pasid_dir=pt.dir, pdts=pt.pdts)
    io = VtdIommu(ram, VtdConfig.preset("modern", iotlb_size=iotlb_size))
    enable_translation(io, rt.root, scalable=True)
    env = Sm(io, ram, alloc, pt, fs, ss, sid(0x08))
    for p in (P1, P2, P3):
        for i in range(4):
            assert out(io, env.s, X + i * K4, pasid=p) == OLD + SHIFT[p] + i * K4
    for p in (P1, P2):
        assert out(io, env.s, X + 0x100_0000, pasid=p) == OLD + SHIFT[p] + 0x100_0000
    return env


def _remap_all(env: Sm) -> None:
    for p, t in env.fs.items():
        t.map(X, NEW + SHIFT[p], 4 * K4, W | U)
        t.map(X + 0x100_0000, NEW + SHIFT[p] + 0x100_0000, K4, W | U)
    env.ss.map(X, NEW + SHIFT[P3], 4 * K4, R | W)


def _state(env: Sm, p: int, page: int = 0) -> str:
    a = out(env.io, env.s, X + page * K4, pasid=p) - SHIFT[p]
    assert a in (OLD + page * K4, NEW + page * K4), hex(a)
    return "new" if a == NEW + page * K4 else "old"


def test_piotlb_page_selective() -> None:
    env = scalable()
    _remap_all(env)
    c = env.io.caches
    c.piotlb_page(DID_OTHER, P1, X, 0, False)  # wrong domain
    c.piotlb_page(DID_FS, P2 + 10, X, 0, False)  # wrong PASID
    c.piotlb_page(DID_FS, P1, X + 2 * K4, 0, False)  # page 2 only
    assert [_state(env, P1, i) for i in range(4)] == ["old", "old", "new", "old"]
    assert _state(env, P2, 2) == "old"
    c.piotlb_page(DID_FS, P1, X, 1, False)  # pages 0-1
    assert [_state(env, P1, i) for i in range(4)] == ["new", "new", "new", "old"]
    assert [_state(env, P2, i) for i in range(4)] == ["old"] * 4


def test_piotlb_page_selective_does_not_remove_second_stage_entries() -> None:
    env = scalable()
    _remap_all(env)
    env.io.caches.piotlb_page(DID_FS, P3, X, 2, False)
    assert [_state(env, P3, i) for i in range(4)] == ["old"] * 4
    env.io.caches.piotlb_pasid(DID_FS, P3)
    assert [_state(env, P3, i) for i in range(4)] == ["new"] * 4


def test_piotlb_pasid_selective() -> None:
    env = scalable()
    _remap_all(env)
    c = env.io.caches
    c.piotlb_pasid(DID_OTHER, P1)
    c.piotlb_pasid(DID_FS, P2 + 10)
    assert _state(env, P1) == "old"
    c.piotlb_pasid(DID_FS, P1)
    assert [_state(env, P1, i) for i in range(4)] == ["new"] * 4
    assert out(env.io, env.s, X + 0x100_0000, pasid=P1) == NEW + 0x100_0000
    assert _state(env, P2) == "old" and _state(env, P3) == "old"


def test_iotlb_page_selective_removes_first_stage_entries_of_the_domain_anywhere() -> None:
    env = scalable()
    _remap_all(env)
    far = X + 0x4000_0000  # nothing is mapped or cached near it
    assert env.io.invalidate_iotlb(3, DID_OTHER, far, 0) == 3
    assert _state(env, P1) == "old"
    assert iotlb(env.io, 3, did=DID_FS, addr=far, am=0) == 3
    # every first-stage entry of the domain, whatever its address and PASID ...
    for p in (P1, P2):
        assert [_state(env, p, i) for i in range(4)] == ["new"] * 4
        assert out(env.io, env.s, X + 0x100_0000, pasid=p) == NEW + SHIFT[p] + 0x100_0000
    # ... but second-stage-only entries only in the range
    assert [_state(env, P3, i) for i in range(4)] == ["old"] * 4
    assert iotlb(env.io, 3, did=DID_FS, addr=X + K4, am=0) == 3
    assert [_state(env, P3, i) for i in range(4)] == ["old", "new", "old", "old"]


def test_iotlb_domain_selective_removes_every_pasid() -> None:
    env = scalable()
    _remap_all(env)
    assert iotlb(env.io, 2, did=DID_OTHER) == 2
    assert _state(env, P1) == _state(env, P3) == "old"
    assert iotlb(env.io, 2, did=DID_FS) == 2
    assert _state(env, P1) == _state(env, P2) == _state(env, P3) == "new"


def test_piotlb_page_ih_keeps_first_stage_paging_structure_cache() -> None:
    """As for the IOTLB: a PASID-based page invalidation with IH=1 keeps cached FS non-leaf entries."""
    env = scalable()
    t = env.fs[P1]
    pt_b = env.alloc.alloc()
    pte = env.ram.read_u64(t.entry_addr(X, 1))
    env.ram.write_u64(pt_b + 8 * ((X >> 12) & 511), (pte & ~ADDR_51_12) | NEW)
    t.set_entry_bits(X, 2, pt_b, ADDR_51_12)
    assert _state(env, P1) == "old"
    env.io.caches.piotlb_page(DID_FS, P1, X, 0, True)
    assert _state(env, P1) == "old"
    env.io.caches.piotlb_page(DID_FS, P1, X, 0, False)
    assert _state(env, P1) == "new"


def _pasid_entry_scenario() -> Sm:
    """P1's and P2's PASID entries are rewritten in memory to new FS tables (X -> NEW); the IOTLB is
    flushed so only the PASID cache is stale."""
    env = scalable()
    for p in (P1, P2):
        t = FirstStageTable(env.ram, env.alloc, 4)
        t.map(X, NEW + SHIFT[p], 4 * K4, W | U)
        env.pt.set_entry(p, pgtt=PGTT_FS, did=DID_FS, fsptptr=t.root)
    iotlb(env.io, 1)
    assert _state(env, P1) == "old" and _state(env, P2) == "old"
    return env


def _after_pasid_inv(env: Sm, p: int) -> str:
    env.io.caches.piotlb_pasid(DID_FS, p)
    return _state(env, p)


def test_pasid_cache_selective() -> None:
    env = _pasid_entry_scenario()
    c = env.io.caches
    c.pasid_selective(DID_OTHER, P1)  # wrong domain
    c.pasid_selective(DID_FS, P1 + 0x100)  # wrong PASID
    assert _after_pasid_inv(env, P1) == "old"
    c.pasid_selective(DID_FS, P1)
    assert _after_pasid_inv(env, P1) == "new"
    assert _after_pasid_inv(env, P2) == "old"


def test_pasid_cache_domain() -> None:
    env = _pasid_entry_scenario()
    c = env.io.caches
    c.pasid_domain(DID_OTHER)
    assert _after_pasid_inv(env, P1) == "old"
    c.pasid_domain(DID_FS)
    assert _after_pasid_inv(env, P1) == "new" and _after_pasid_inv(env, P2) == "new"


def test_pasid_cache_global() -> None:
    env = _pasid_entry_scenario()
    env.io.caches.pasid_global()
    assert _after_pasid_inv(env, P1) == "new" and _after_pasid_inv(env, P2) == "new"


def test_pasid_cache_survives_context_and_iotlb_invalidation() -> None:
    env = _pasid_entry_scenario()
    assert ccmd(env.io, 1) == 1
    iotlb(env.io, 1)
    assert _state(env, P1) == "old", "context and IOTLB invalidations do not touch the PASID cache"


def test_pasid_entry_cleared_stays_cached() -> None:
    env = scalable()
    env.pt.clear_entry(P1)
    env.io.caches.piotlb_pasid(DID_FS, P1)
    assert _state(env, P1) == "old"
    env.io.caches.pasid_selective(DID_FS, P1)
    res = env.io.translate(env.s, X, pasid=P1)
    assert isinstance(res, Fault) and res.reason == 0x59


def test_scalable_iotlb_size_limit() -> None:
    env = scalable(iotlb_size=2)
    _remap_all(env)
    # The last two translations of the set-up were P1 and P2 at X+16M: P2's is the newest entry.
    assert out(env.io, env.s, X + 0x100_0000, pasid=P2) == OLD + SHIFT[P2] + 0x100_0000
    # Every page translated earlier was evicted and is walked again.
    assert [_state(env, P1, i) for i in range(4)] == ["new"] * 4
    assert [_state(env, P3, i) for i in range(4)] == ["new"] * 4


def test_eviction_observer_is_told_before_fills_lose_anything() -> None:
    c = Caches(iotlb_size=2, context_size=1, pasid_size=1, psc_size=0)
    log: list[tuple[str, object]] = []

    class Obs:
        def entry_lost(self, entry: IotlbEntry) -> None:
            log.append(("lost", entry.iova))

        def memo_cleared(self) -> None:
            log.append(("cleared", None))

        def slot_replaced(self, key: int) -> None:
            log.append(("slot", key))

    c.observer = Obs()
    e = [IotlbEntry(0x1000 * i, 0xFFF, 0xFFFF, 1, 1, 0, KIND_SS, 0x1000 * i, 12) for i in range(4)]
    c.put_iotlb(1, e[0])
    c.put_iotlb(2, e[1])
    assert log == []
    c.put_iotlb(2, e[2])                     # refill of a key: the old entry is lost
    c.put_iotlb(3, e[3])                     # FIFO eviction of the oldest
    assert log == [("lost", 0x1000), ("lost", 0)] and not e[0].alive and not e[1].alive and e[2].alive
    log.clear()
    c.put_front(7, 0x5000, e[2])
    c.put_front(7, 0x5000, e[3])             # the same slot rewritten
    c.put_context(1, LegacyContext(CTX_LEGACY, 1, 0, 4, 0, 0))
    c.put_context(2, LegacyContext(CTX_LEGACY, 2, 0, 4, 0, 0))  # an eviction clears the memo
    assert log == [("slot", 7), ("cleared", None)] and c.front == {}


# -- the IOTLB's indexes against a plain list of entries ---------------------------------------------

_KINDS = (KIND_SS, KIND_PT, KIND_FS, KIND_NESTED)
_OPS = st.one_of(
    st.tuples(st.just("fill"), st.integers(1, 3), st.integers(0, 2), st.integers(0, 3),
              st.sampled_from((0, 0, 0, 1, 2)), st.integers(0, 600)),
    st.tuples(st.just("page"), st.integers(1, 3), st.integers(0, 600), st.sampled_from((0, 0, 1, 3, 9, 10, 20))),
    st.tuples(st.just("ppage"), st.integers(1, 3), st.integers(0, 2), st.integers(0, 600), st.sampled_from((0, 1, 9))),
    st.tuples(st.just("domain"), st.integers(1, 3)),
    st.tuples(st.just("pasid"), st.integers(1, 3), st.integers(0, 2)))


def _spec_page_hit(e: IotlbEntry, did: int, addr: int, am: int) -> bool:
    """Spec: an IOTLB page-selective request drops DID's first-stage and nested entries, and its other entries
    overlapping the 2^AM-page window around the address."""
    lo = addr & ~((K4 << am) - 1)
    return e.did == did and (e.kind in (KIND_FS, KIND_NESTED)
                             or (e.iova < lo + (K4 << am) and e.iova + (1 << e.shift) > lo))


def _qemu_page_hit(e: IotlbEntry, did: int, addr: int, am: int) -> bool:
    """QEMU 7.2 vtd_hash_remove_by_page: page numbers compared through 8 bits above AM, or the address inside
    the entry's own page."""
    if e.did != did:
        return False
    if e.kind in (KIND_FS, KIND_NESTED):
        return True
    mask = (0xFF & ~((1 << am) - 1)) if am < 8 else 0
    return ((e.iova >> 12) & mask) == ((addr >> 12) & mask) or e.iova == addr & ~((1 << e.shift) - 1)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.booleans(), st.integers(4, 40), st.lists(_OPS, max_size=80))
def test_iotlb_invalidations_remove_what_a_scan_would(qemu: bool, size: int, ops: list[tuple[Any, ...]]) -> None:
    # The caches index entries by DID and page; the reference is a list in fill order filtered by the
    # invalidation's rule, with FIFO eviction and in-place refills.
    c = Caches(iotlb_size=size, context_size=0, pasid_size=0, psc_size=0, psi_mask_bits=8 if qemu else None)
    model: list[tuple[int, IotlbEntry]] = []
    gone: list[IotlbEntry] = []
    for op in ops:
        if op[0] == "fill":
            _, did, pasid, kind, size_idx, page = op
            shift = 12 + 9 * size_idx
            iova = (page << 12) & ~((1 << shift) - 1)
            e = IotlbEntry(iova, (1 << shift) - 1, 0xFFFF, 1, did, pasid, _KINDS[kind], iova, shift)
            key = iotlb_key(did, pasid, size_idx, iova)
            at = [j for j, kv in enumerate(model) if kv[0] == key]
            if at:  # a refill takes its key's place in the FIFO order
                gone.append(model[at[0]][1])
                model[at[0]] = (key, e)
            else:
                if len(model) >= size:
                    gone.append(model.pop(0)[1])
                model.append((key, e))
            c.put_iotlb(key, e)
            continue
        if op[0] == "page":
            _, did, page, am = op
            hit = _qemu_page_hit if qemu else _spec_page_hit
            pred: Callable[[IotlbEntry], bool] = lambda e: hit(e, did, page << 12, am)  # noqa: E731
            c.iotlb_page(did, page << 12, am, True)
        elif op[0] == "ppage":
            _, did, pasid, page, am = op
            lo = (page << 12) & ~((K4 << am) - 1)
            pred = lambda e: (e.did == did and e.pasid == pasid and e.kind in (KIND_FS, KIND_NESTED)  # noqa: E731
                              and e.iova < lo + (K4 << am) and e.iova + (1 << e.shift) > lo)
            c.piotlb_page(did, pasid, page << 12, am, True)
        elif op[0] == "domain":
            pred = lambda e: e.did == op[1]  # noqa: E731
            c.iotlb_domain(op[1])
        else:
            pred = lambda e: e.did == op[1] and e.pasid == op[2]  # noqa: E731
            c.piotlb_pasid(op[1], op[2])
        gone.extend(e for _, e in model if pred(e))
        model = [(k, e) for k, e in model if not pred(e)]
        assert [(k, id(e)) for k, e in c.iotlb.items()] == [(k, id(e)) for k, e in model]
    assert [(k, id(e)) for k, e in c.iotlb.items()] == [(k, id(e)) for k, e in model]
    assert all(e.alive == 0 for e in gone) and all(e.alive == 1 for _, e in model)


def test_translate_goes_through_an_instance_xlate_on_memo_hits_too() -> None:
    # Wrappers of the DMA path (the sanitizer, the vIOMMU validator) shadow xlate on the instance; a
    # translation answered from the front memo must still pass through them.
    env = legacy()
    s = sid(0x0D)
    ss = env.table()
    ss.map(X, OLD, K4)
    env.attach(s, ss, 1)
    assert out(env.io, s, X + 0x18) == OLD + 0x18  # fills the IOTLB and the front memo
    inner = env.io.xlate
    calls: list[int] = []

    def xlate(sid_: int, ptag: int, iova: int, req: int) -> int:
        calls.append(iova)
        return inner(sid_, ptag, iova, req)

    env.io.xlate = xlate  # type: ignore[method-assign]
    assert out(env.io, s, X + 0x20) == OLD + 0x20
    assert out(env.io, s, X + 0x28, "w") == OLD + 0x28
    assert calls == [X + 0x20, X + 0x28]


@pytest.mark.parametrize("sanitize", [False, True])
def test_reset_keeps_an_instance_xlate_and_the_sanitizer_as_they_were(sanitize: bool) -> None:
    # A validator's wrapper survives a system reset, and does not turn the sanitizer on (nor off).
    env = legacy()
    io = env.io
    if sanitize:
        io.enable_sanitizer()
    inner = io.xlate
    calls: list[int] = []

    def xlate(sid_: int, ptag: int, iova: int, req: int) -> int:
        calls.append(iova)
        return inner(sid_, ptag, iova, req)

    io.xlate = xlate  # type: ignore[method-assign]
    io.reset()
    s = sid(0x0D)
    ss = env.table()
    ss.map(X, OLD, K4)
    env.attach(s, ss, 1)
    enable_translation(io, env.rt.root)
    assert out(io, s, X) == OLD
    ss.unmap(X, K4)
    ss.map(X, NEW, K4)
    assert out(io, s, X + 8) == OLD + 8  # a stale IOTLB hit: no invalidation
    assert calls == [X, X + 8]
    assert len(io.stale_hits) == (1 if sanitize else 0)
