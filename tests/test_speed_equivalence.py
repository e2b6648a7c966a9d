"""The fast miss path equals the reference path: same results, caches, fault records and memory.

A cached miss over a :class:`HostRAM` walks with generated per-geometry walkers (``walk.ss_fast_walker``,
``walk.fs_fast_walker``) and, when those decline, with the inlined loop walkers (``ss_walk_ram``,
``fs_walk_ram``); ``VtdIommu.fast_walk = False`` makes every walk take the reference walkers
(``ss_walk``/``fs_walk`` through ``read_u64``).  Two units are built from the same random tables —
builder-made, then with random bits flipped in random entries (present, permission, A/D/EA, PS, reserved
and address bits) so that faults, reserved-bit checks, unsupported leaf sizes and A/D writes all happen —
and fed the same requests with invalidations in between; after every request the results must agree, and
at the end the IOTLB, paging-structure, context, PASID and front caches (contents and order), the
statistics, the fault records and every byte of memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtd_emu.memory import GuestPhysView, HostRAM
from vtd_emu.tables import (
    NX,
    PGTT_FS,
    PGTT_NESTED,
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
    X,
    enable_translation,
)
from vtd_emu.vtd.access import EXEC, NO_PASID, PRIV, READ, WRITE
from vtd_emu.vtd.config import VtdConfig
from vtd_emu.vtd.iommu import VtdIommu

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
SID = 0x0310
DID = 5
PASID = 0x99
RID_PASID = 0x7
HPA_BASE = 1 << 40
TABLE_GPA = 0x7F00_0000
# Entry bits worth flipping: R/P, W/RW, X/US, A (FS), D (FS), PS, SS A, SS D, EA, bit 11, bits above any
# host width, the SS bit 62 (TM/SNP area), XD.
FLIP_BITS = (0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 40, 47, 51, 52, 58, 62, 63)
REQS_NO_PASID = (READ, WRITE, READ | WRITE)
REQS_PASID = (READ, WRITE, READ | WRITE, READ | EXEC, READ | PRIV, WRITE | PRIV, READ | EXEC | PRIV)

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class Env:
    mode: str
    ss_levels: int
    fs_levels: int
    psc_size: int
    iotlb_size: int
    flags: tuple[bool, ...]
    """ssade, eafe, sre, wpe, nxe, ere, ssee"""
    maps: tuple[tuple[int, int, int, int], ...]
    """(region, page size, count, perms)"""
    flips: tuple[tuple[int, int, int, int], ...]
    """(which table: 0 the walked one, 1 the second stage; leaf pick; level; bit)"""


def _regions(mode: str, env_levels: int) -> list[int]:
    w = 12 + 9 * env_levels
    if mode in ("fs", "nested"):
        return [0, G1, 7 * G1, (1 << 64) - (1 << (w - 1)), (1 << 64) - G1]
    return [0, G1, 5 * G1, 1 << (w - 1), (1 << w) - G1]


def build(env: Env) -> tuple[VtdIommu, list[int], Callable[[], None]]:
    """A unit over fresh memory with ``env``'s tables, addresses inside every leaf mapped, and what
    applies ``env.flips`` to the tables (a guest editing them without invalidating)."""
    ram = HostRAM()
    alloc = PageAllocator(ram)
    ss = SecondStageTable(ram, alloc, env.ss_levels)
    ssade, eafe, sre, wpe, nxe, ere, ssee = env.flags
    cfg = VtdConfig.preset("modern", iotlb_size=env.iotlb_size, psc_size=env.psc_size)
    levels = env.fs_levels if env.mode in ("fs", "nested") else env.ss_levels
    regions = _regions(env.mode, levels)
    table = ss
    if env.mode == "legacy":
        rt = LegacyRootTable(ram, alloc)
        rt.set_context(SID >> 8, SID & 0xFF, slptptr=ss.root, aw=ss.aw, did=DID)
        root, scalable = rt.root, False
    else:
        fs: FirstStageTable | None = None
        if env.mode == "nested":
            host = alloc.alloc(32)
            ss.map(TABLE_GPA, host, 32 * K4, R | W)
            ss.map(4 * G1, HPA_BASE, G1, R | W, page_size=G1 if env.ss_levels > 2 else K4)
            fs = FirstStageTable(GuestPhysView(ram, ss), PageAllocator(GuestPhysView(ram, ss), base=TABLE_GPA,
                                                                      limit=TABLE_GPA + 32 * K4), env.fs_levels)
            table = fs
        elif env.mode == "fs":
            fs = FirstStageTable(ram, alloc, env.fs_levels)
            table = fs
        pt = PasidTables(ram, alloc)
        pgtt = {"ss": PGTT_SS, "fs": PGTT_FS, "nested": PGTT_NESTED}[env.mode]
        for p in (PASID, RID_PASID):
            pt.set_entry(p, pgtt=pgtt, did=DID, ssptptr=ss.root, aw=ss.aw, fsptptr=fs.root if fs else 0,
                         fspm=fs.fspm if fs else 0, ssade=ssade, eafe=eafe, sre=sre, wpe=wpe, nxe=nxe, ere=ere,
                         ssee=ssee)
        rt2 = ScalableRootTable(ram, alloc)
        rt2.set_context(SID >> 8, SID & 0xFF, pasid_dir=pt.dir, pdts=pt.pdts, rid_pasid=RID_PASID)
        root, scalable = rt2.root, True
    for region, page, count, perms in env.maps:
        base = regions[region % len(regions)]
        out = (4 * G1 + (region % 4) * 4 * M2) if env.mode == "nested" else HPA_BASE + region * 4 * G1
        if page == G1:
            count = 1
        ss_perms = perms & (R | W) | (X if perms & NX == 0 and perms & U else 0)
        try:
            table.map(base, out, count * page, ss_perms if table is ss else perms & ~X, page_size=page)
        except ValueError:
            pass  # a leaf the builder refuses (over a different-size one): both units see the same tables
    addrs = [m.iova + (m.size // 3 & ~7) for m in table.mappings.values()]
    addrs += [r + 5 * K4 for r in regions]
    # Bit flips in entries on the walks' paths (which=1: the second stage, under a nested first stage).
    targets = []
    for which, pick, level, bit in env.flips:
        t: SecondStageTable | FirstStageTable = ss if which else table
        leaves = sorted(m.iova for m in t.mappings.values())
        if leaves and level <= t.levels:
            addr = t.entry_addr(leaves[pick % len(leaves)], level)
            if addr is not None:
                targets.append((t, addr, bit))
    io = VtdIommu(ram, cfg)
    enable_translation(io, root, scalable=scalable)

    def flip() -> None:
        for t, addr, bit in targets:
            t.mem.write_u64(addr, t.mem.read_u64(addr) ^ (1 << bit))
    return io, addrs, flip


def state(io: VtdIommu) -> tuple[object, ...]:
    c = io.caches
    ram = io.mem
    assert isinstance(ram, HostRAM)
    memory = {pfn: ram.read(pfn << 12, K4) for pfn in ram.pages()}
    return ([(k, e.fields()) for k, e in c.iotlb.items()], list(c.psc_ss.items()), list(c.psc_fs.items()),
            list(c.context.items()), list(c.pasid.items()), [(k, o, e.fields()) for k, (o, e) in c.front.items()],
            c.stats, c.sizes_held, io.fault_records(), io.faults.recorded, io.suppressed, memory, ram.generation)


def envs(mode: str) -> st.SearchStrategy[Env]:
    return st.builds(
        Env,
        mode=st.just(mode),
        ss_levels=st.sampled_from([3, 4, 5]),
        fs_levels=st.sampled_from([4, 5]),
        psc_size=st.sampled_from([0, 0, 2, 64]),
        iotlb_size=st.sampled_from([4096, 4096, 3]),
        flags=st.tuples(*[st.sampled_from([True, True, False])] * 7),
        maps=st.lists(st.tuples(st.integers(0, 9), st.sampled_from([K4, K4, M2, G1]), st.integers(1, 3),
                                st.sampled_from([R, W, R | W, R | W | U, W | U, R | U | NX, R | W | U | NX, R | W | U])),
                      min_size=1, max_size=6).map(tuple),
        flips=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1 << 16), st.integers(1, 5), st.sampled_from(FLIP_BITS)),
                       max_size=8).map(tuple),
    )


@pytest.mark.parametrize("mode", ["legacy", "ss", "fs", "nested"])
@SETTINGS
@given(data=st.data())
def test_fast_walkers_equal_reference(mode: str, data: st.DataObject) -> None:
    env = data.draw(envs(mode), label="env")
    fast, addrs, flip_fast = build(env)
    ref, _, flip_ref = build(env)
    ref.fast_walk = False
    assert state(fast) == state(ref)
    with_pasid = env.mode in ("fs", "nested") or data.draw(st.booleans(), label="with pasid")
    for round_ in range(3):
        # Every mapped leaf (and the page after it) once per round, then random requests: the first
        # round's walks find A/D bits clear, later rounds find them set by the first.
        extra = data.draw(st.lists(st.sampled_from(addrs), max_size=8), label="extra")
        for iova in [a + k for a in addrs for k in (0, K4)] + extra:
            pasid = data.draw(st.sampled_from([PASID, NO_PASID]), label="pasid") if with_pasid else NO_PASID
            req = data.draw(st.sampled_from(REQS_PASID if pasid != NO_PASID else REQS_NO_PASID), label="req")
            assert fast.xlate(SID, pasid, iova, req) == ref.xlate(SID, pasid, iova, req), (hex(iova), req, round_)
        for io in (fast, ref):
            io.invalidate_iotlb(1)  # global: empties the IOTLB and the paging-structure caches
        if round_ == 0:
            flip_fast()
            flip_ref()
    assert state(fast) == state(ref)


def _run_same(env: Env, reqs: tuple[int, ...], pasid: int) -> None:
    fast, addrs, flip_fast = build(env)
    ref, _, flip_ref = build(env)
    ref.fast_walk = False
    for round_ in range(3):
        for iova in addrs:
            for req in reqs:
                assert fast.xlate(SID, pasid, iova, req) == ref.xlate(SID, pasid, iova, req), (env, hex(iova), req)
        for io in (fast, ref):
            io.invalidate_iotlb(1)
        if round_ == 0:
            flip_fast()
            flip_ref()
    assert state(fast) == state(ref), env


@pytest.mark.parametrize("mode", ["legacy", "ss", "fs", "nested"])
@pytest.mark.parametrize("flags, psc", [((True,) * 7, 0), ((True, False, True, False, False, True, False), 64)])
def test_fast_walkers_equal_reference_every_bit(mode: str, flags: tuple[bool, ...], psc: int) -> None:
    """A sweep the random property may miss: every bit flipped at every level of a walk to leaves of
    every size (with NX), with every request type, without and with paging-structure caches: before the flip (A/D bits clear), then twice after
    it (A/D bits set by the first round where the walk still succeeds)."""
    maps = ((0, K4, 1, R | W | U | NX), (1, M2, 1, R | W | U), (2, G1, 1, R | U))
    levels = 5 if mode in ("fs", "nested") else 4
    reqs = REQS_PASID if mode in ("fs", "nested") else REQS_NO_PASID
    pasid = PASID if mode in ("fs", "nested") else NO_PASID
    for level in range(1, levels + 1):
        for bit in FLIP_BITS:
            for pick in range(3):
                _run_same(Env(mode, 4, levels, psc, 4096, flags, maps, ((0, pick, level, bit),)), reqs, pasid)
    _run_same(Env(mode, 4, levels, psc, 4096, flags, maps, ()), reqs, pasid)
