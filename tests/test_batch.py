"""Batched replay agrees exactly with the scalar path: results, faults, memory, registers, cache contents
(and their FIFO order), hit counters — on random tables and random DMA runs, stale caches included."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtd_emu.tables import (PAGE_2M, PGTT_FS, PGTT_NESTED, PGTT_SS, R, U, W, X, FirstStageTable, LegacyRootTable,
                            PageAllocator, PasidTables, ScalableRootTable, SecondStageTable, enable_translation)
from vtd_emu.memory import GuestPhysView, HostRAM
from vtd_emu.vtd.batch import SKIPPED, BatchEngine, PageIndex, expand_chunks, run_block
from vtd_emu.trace.replay import memory_hash
from vtd_emu.vtd.access import NO_PASID, READ, WRITE
from vtd_emu.vtd.config import VtdConfig
from vtd_emu.vtd.iommu import VtdIommu

SID_L, SID_S = 0x0110, 0x0218
PASID_FS, PASID_NEST = 5, 6


@dataclass
class Rig:
    ram: HostRAM
    io: VtdIommu
    tables: dict[str, Any]
    alloc: PageAllocator
    pages: list[tuple[int, int]]     # (sid, ptag, iova page) candidates
    table_pages: list[int]


def build(seed: int, mode: str, cfg: dict[str, Any]) -> Rig:
    """A unit and random tables (the same for the same seed)."""
    rng = random.Random(seed)
    ram = HostRAM()
    profile = cfg.pop("profile", "spec")
    io = VtdIommu(ram, VtdConfig.preset("modern", profile=profile, **cfg))
    alloc = PageAllocator(ram, base=0x100000)
    tables: dict[str, Any] = {}
    cands: list[tuple[int, int, int]] = []

    def fill(table: Any, sid: int, ptag: int, base: int, out: int, fs: bool) -> None:
        for r in range(3):
            va = base + r * (4 << 20)
            perms = rng.choice([R | W, R, W | U, U] if fs else [R | W, R, W, R | W | X])
            if fs and perms & ~(W | U):
                perms = W | U
            if rng.random() < 0.3:
                table.map(va, out + r * (4 << 20), PAGE_2M, perms, page_size=PAGE_2M)
                cands.extend((sid, ptag, va + k * 0x1000) for k in range(0, 512, 97))
            else:
                n = rng.randrange(1, 6)
                table.map(va, out + r * (4 << 20), n * 0x1000, perms)
                cands.extend((sid, ptag, va + k * 0x1000) for k in range(n + 1))  # one past: unmapped

    if mode == "legacy":
        ss = SecondStageTable(ram, alloc, levels=4)
        fill(ss, SID_L, NO_PASID, 0x4000_0000, 0x10_0000_0000, False)
        rt = LegacyRootTable(ram, alloc)
        rt.set_context(SID_L >> 8, SID_L & 0xFF, slptptr=ss.root, aw=ss.aw, did=1)
        enable_translation(io, rt.root)
        tables["ss"] = ss
    else:
        ss = SecondStageTable(ram, alloc, levels=4)
        fill(ss, SID_S, NO_PASID, 0x4000_0000, 0x10_0000_0000, False)
        fs = FirstStageTable(ram, alloc, levels=rng.choice([4, 5]))
        fill(fs, SID_S, PASID_FS, 0x7F00_0000_0000 if fs.levels == 4 else 0x00AB_0000_0000_0000, 0x20_0000_0000, True)
        gss = SecondStageTable(ram, alloc, levels=4)
        gtab = alloc.alloc(16)
        gss.map(0x80_0000, gtab, 16 * 0x1000, R | W)
        gss.map(0x100_0000, 0x30_0000_0000, 64 << 20, R | W)
        gview = GuestPhysView(ram, gss)
        nfs = FirstStageTable(gview, PageAllocator(gview, base=0x80_0000, limit=0x90_0000), levels=4)
        nfs.map(0x5000_0000, 0x100_0000, 0x4000, W | U)
        cands.extend((SID_S, PASID_NEST, 0x5000_0000 + k * 0x1000) for k in range(5))
        rt = ScalableRootTable(ram, alloc)
        pt = PasidTables(ram, alloc)
        pt.set_entry(0, pgtt=PGTT_SS, did=2, ssptptr=ss.root, aw=ss.aw)
        pt.set_entry(PASID_FS, pgtt=PGTT_FS, did=3, fsptptr=fs.root, fspm=fs.fspm, sre=True)
        pt.set_entry(PASID_NEST, pgtt=PGTT_NESTED, did=4, ssptptr=gss.root, aw=gss.aw, fsptptr=nfs.root,
                     fspm=nfs.fspm)
        rt.set_context(SID_S >> 8, SID_S & 0xFF, pasid_dir=pt.dir, pdts=pt.pdts, paside=True)
        enable_translation(io, rt.root, scalable=True)
        tables.update(ss=ss, fs=fs, gss=gss, nfs=nfs)
    tpages = list(range(0x100, alloc.next >> 12))
    return Rig(ram, io, tables, alloc, [(s, p, a) for s, p, a in cands], tpages)


def snapshot(rig: Rig) -> dict[str, Any]:
    c = rig.io.caches
    return {"iotlb": list(c.iotlb.items()), "context": list(c.context.items()), "pasid": list(c.pasid.items()),
            "psc_ss": list(c.psc_ss.items()), "psc_fs": list(c.psc_fs.items()), "front": sorted(c.front.items()),
            "stats": (c.stats.iotlb_hits, c.stats.iotlb_misses, c.stats.walks, c.stats.context_hits,
                      c.stats.context_misses, c.stats.pasid_hits, c.stats.pasid_misses),
            "faults": rig.io.fault_records(), "regs": rig.io.register_dump(), "mem": memory_hash(rig.ram),
            "interrupts": list(rig.io.interrupts), "gen": rig.ram.generation, "bypass": sorted(rig.io.pt_bypass)}


def make_ops(seed: int, rig: Rig, n_runs: int) -> list[tuple[str, Any]]:
    """A random program: DMA runs, table edits without invalidation (stale caches), DMA writes onto
    table pages, invalidations."""
    rng = random.Random(seed * 7 + 1)
    ops: list[tuple[str, Any]] = []
    for _ in range(n_runs):
        k = rng.random()
        if k < 0.15:
            ops.append(("edit", rng.randrange(1 << 30)))
        elif k < 0.22:
            ops.append(("inv", rng.choice(["global", "psc", "context"])))
        n = rng.randrange(16, 400)
        pool = rng.sample(rig.pages, min(len(rig.pages), rng.choice([2, 8, 40, 400])))
        rows = []
        for _ in range(n):
            sid, ptag, page = rng.choice(pool)
            off = rng.randrange(0, 4096, 4)
            length = rng.choice([4, 16, 64, 256, 4096, 6000]) if rng.random() < 0.3 else rng.choice([4, 8, 64])
            write = rng.random() < 0.45
            if rng.random() < 0.01 and rig.table_pages:
                # A DMA whose target page is a table page would need an identity mapping; instead aim a
                # write at a page some translation lands on (data hazards between chunks of the run).
                off = 0
            rows.append((sid, ptag, page + off, length, write))
        ops.append(("dma", rows))
    return ops


def run_ops(rig: Rig, ops: list[tuple[str, Any]], batch: bool, window: int, seed: int) -> list[np.ndarray]:
    eng = BatchEngine(rig.io, window=window) if batch else None
    rng = random.Random(seed * 13 + 5)
    out = []
    for kind, arg in ops:
        if kind == "edit":
            r2 = random.Random(arg)
            name = r2.choice(sorted(rig.tables))
            t = rig.tables[name]
            if t.mappings:
                m = r2.choice(sorted(t.mappings.values(), key=lambda m: m.iova))
                lvl = {0x1000: 1, PAGE_2M: 2, 1 << 30: 3}[m.size]
                ea = t.entry_addr(m.iova, lvl)
                if ea is not None:
                    e = t.mem.read_u64(ea)
                    # Move the leaf to another page, or drop permissions, or clear it: memory only.
                    choice = r2.randrange(3)
                    new = (e ^ (0x10 << 12)) if choice == 0 else (e & ~2 if choice == 1 else 0)
                    t.mem.write_u64(ea, new)
        elif kind == "inv":
            if arg == "global":
                rig.io.invalidate_iotlb(1)
            elif arg == "psc":
                rig.io.invalidate_iotlb(2, did=rng.choice([1, 2, 3, 4]))
            else:
                rig.io.invalidate_context(1)
        else:
            rows = arg
            n = len(rows)
            sid = np.array([r[0] for r in rows], np.uint32)
            pasid = np.array([-1 if r[1] == NO_PASID else r[1] for r in rows], np.int32)
            iova = np.array([r[2] for r in rows], np.uint64)
            length = np.array([r[3] for r in rows], np.uint32)
            write = np.array([r[4] for r in rows], bool)
            priv = np.zeros(n, bool)
            lens = np.where(write, length.astype(np.int64), 0)
            data_off = np.where(write, np.cumsum(lens) - lens, -1)
            data = np.frombuffer(bytes((i * 7 + 3) & 0xFF for i in range(int(lens.sum()))), np.uint8)
            res = run_block(eng, rig.io, sid, pasid, iova, length, write, priv, data_off, data, True)
            out.append(res.res)
            out.append(res.read_buf)
    return out


CONFIGS = [
    {"psc_size": 4096},
    {"psc_size": 0},
    {"psc_size": 3, "iotlb_size": 16},
    {"iotlb_size": 8, "context_cache_size": 1, "pasid_cache_size": 1},
    {"profile": "qemu-7.2"},
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["legacy", "scalable"]),
       cfg=st.sampled_from(range(len(CONFIGS))), window=st.sampled_from([64, 1024, 1 << 16]))
def test_batched_equals_scalar(seed: int, mode: str, cfg: int, window: int) -> None:
    a = build(seed, mode, dict(CONFIGS[cfg]))
    b = build(seed, mode, dict(CONFIGS[cfg]))
    ops = make_ops(seed, a, 6)
    ra = run_ops(a, ops, False, window, seed)
    rb = run_ops(b, ops, True, window, seed)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert np.array_equal(x, y)
    sa, sb = snapshot(a), snapshot(b)
    for k in sa:
        assert sa[k] == sb[k], k


def test_stale_iotlb_entry_wins_in_batch() -> None:
    """A translation cached before the run is stale against memory; the batch must use it like xlate."""
    for batch in (False, True):
        rig = build(3, "legacy", {"psc_size": 4096})
        ss = rig.tables["ss"]
        m = sorted(ss.mappings.values(), key=lambda m: m.iova)[0]
        rig.io.xlate(SID_L, NO_PASID, m.iova, READ)
        lvl = {0x1000: 1, PAGE_2M: 2}[m.size]
        ea = ss.entry_addr(m.iova, lvl)
        ss.mem.write_u64(ea, ss.mem.read_u64(ea) ^ (0x40 << 12))
        n = 500
        eng = BatchEngine(rig.io) if batch else None
        res = run_block(eng, rig.io, np.full(n, SID_L, np.uint32), np.full(n, -1, np.int32),
                        np.full(n, m.iova, np.uint64) + np.arange(n, dtype=np.uint64) * np.uint64(4) % np.uint64(4096),
                        np.full(n, 4, np.uint32), np.zeros(n, bool), np.zeros(n, bool), np.full(n, -1, np.int64),
                        np.zeros(0, np.uint8), False)
        assert (res.res >> 12 == m.addr >> 12).all(), "the stale cached page, not memory's"


def test_fault_keys_are_recorded_in_order() -> None:
    outs = []
    for batch in (False, True):
        rig = build(11, "legacy", {"psc_size": 0})
        bad = 0x7000_0000
        good = sorted(rig.tables["ss"].mappings.values(), key=lambda m: m.iova)[0].iova
        iova = np.array([good, bad, good + 8, bad + 0x1000, bad, good] * 50, np.uint64)
        n = iova.size
        eng = BatchEngine(rig.io) if batch else None
        res = run_block(eng, rig.io, np.full(n, SID_L, np.uint32), np.full(n, -1, np.int32), iova,
                        np.full(n, 8, np.uint32), np.zeros(n, bool), np.zeros(n, bool), np.full(n, -1, np.int64),
                        np.zeros(0, np.uint8), False)
        outs.append((res.res.tolist(), rig.io.fault_records(), rig.io.register_dump(), rig.io.faults.recorded,
                     rig.io.faults.dropped))
    assert outs[0] == outs[1]


def test_dma_write_onto_a_table_page_cuts_the_run() -> None:
    """A DMA that rewrites a page-table entry mid-run changes later translations: the batch must see it."""
    outs = []
    for batch in (False, True):
        ram = HostRAM()
        io = VtdIommu(ram, VtdConfig.preset("modern"))
        alloc = PageAllocator(ram, base=0x100000)
        ss = SecondStageTable(ram, alloc, levels=4)
        ss.map(0x10000, 0x800000, 0x4000, R | W)
        leaf_page = ss.entry_addr(0x10000, 1) & ~0xFFF  # type: ignore[operator]
        ss.map(0x20000, leaf_page, 0x1000, R | W)       # the device can write its own page table
        rt = LegacyRootTable(ram, alloc)
        rt.set_context(0, 0x10, slptptr=ss.root, aw=ss.aw, did=1)
        enable_translation(io, rt.root)
        off = ss.entry_addr(0x13000, 1) & 0xFFF  # type: ignore[operator]
        new_pte = (0x900000 | 3).to_bytes(8, "little")
        rows = [(0x10000, 4, False)] * 30 + [(0x20000 + off, 8, True)] + [(0x13000, 4, False)] * 30
        n = len(rows)
        data = np.frombuffer(new_pte, np.uint8).copy()
        eng = BatchEngine(io) if batch else None
        res = run_block(eng, io, np.full(n, 0x10, np.uint32), np.full(n, -1, np.int32),
                        np.array([r[0] for r in rows], np.uint64), np.array([r[1] for r in rows], np.uint32),
                        np.array([r[2] for r in rows]), np.zeros(n, bool),
                        np.array([0 if r[2] else -1 for r in rows], np.int64), data, False)
        outs.append((res.res.tolist(), memory_hash(ram)))
    assert outs[0] == outs[1]
    assert outs[1][0][-1] == 0x900000  # the last reads use the entry the DMA wrote


def test_interrupt_window_skipped_like_scalar() -> None:
    outs = []
    for batch in (False, True):
        rig = build(5, "legacy", {"profile": "qemu-7.2"})
        iova = np.array([0xFEE0_0000, 0x4000_0000, 0xFEE0_1000] * 40, np.uint64)
        n = iova.size
        eng = BatchEngine(rig.io) if batch else None
        res = run_block(eng, rig.io, np.full(n, SID_L, np.uint32), np.full(n, -1, np.int32), iova,
                        np.full(n, 4, np.uint32), np.zeros(n, bool), np.zeros(n, bool), np.full(n, -1, np.int64),
                        np.zeros(0, np.uint8), True)
        outs.append((res.res.tolist(), snapshot(rig)["regs"]))
    assert outs[0] == outs[1]
    assert outs[1][0][0] == SKIPPED


def test_expand_chunks_splits_at_4k() -> None:
    row, ci, cl, co = expand_chunks(np.array([0xFF0, 0x2000, 0x1_0000_1FFF], np.uint64),
                                    np.array([0x20, 0x10, 0x2002], np.uint32))
    assert row.tolist() == [0, 0, 1, 2, 2, 2, 2]
    assert ci.tolist() == [0xFF0, 0x1000, 0x2000, 0x1_0000_1FFF, 0x1_0000_2000, 0x1_0000_3000, 0x1_0000_4000]
    assert cl.tolist() == [0x10, 0x10, 0x10, 1, 0x1000, 0x1000, 1]
    assert co.tolist() == [0, 0x10, 0, 0, 1, 0x1001, 0x2001]


def test_page_index_dense_and_sparse() -> None:
    ram = HostRAM()
    for p in (5, 6, 7, 1 << 30, 3):
        ram.write_u64(p << 12, p)
    idx = PageIndex(ram)
    got = idx.gather(np.array([5 << 12, 3 << 12, 4 << 12, (1 << 30) << 12], np.uint64))[0]
    assert got.tolist() == [5, 3, 0, 1 << 30]
    ram.write_u64(9 << 12, 9)  # grows incrementally
    assert idx.gather(np.array([9 << 12], np.uint64))[0].tolist() == [9]


@pytest.mark.parametrize("mode", ["legacy", "scalable"])
def test_large_run_batches_most_chunks(mode: str) -> None:
    rig = build(21, mode, {"psc_size": 4096})
    good = [(s, p, a) for s, p, a in rig.pages
            if p in (NO_PASID, PASID_FS) and rig.io.translate(s, a, "r", None if p == NO_PASID else p)]
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(good), 50_000)
    sid = np.array([good[i][0] for i in pick], np.uint32)
    pasid = np.array([-1 if good[i][1] == NO_PASID else good[i][1] for i in pick], np.int32)
    iova = np.array([good[i][2] for i in pick], np.uint64) + rng.integers(0, 4000, pick.size).astype(np.uint64)
    eng = BatchEngine(rig.io)
    n = pick.size
    run_block(eng, rig.io, sid, pasid, iova, np.full(n, 8, np.uint32), np.zeros(n, bool), np.zeros(n, bool),
              np.full(n, -1, np.int64), np.zeros(0, np.uint8), False)
    assert eng.stats.batched_chunks > 0.9 * n


def test_translate_matches_xlate_with_requests_mixed() -> None:
    rig_a = build(8, "scalable", {"psc_size": 4096})
    rig_b = build(8, "scalable", {"psc_size": 4096})
    rng = random.Random(1)
    rows = [rng.choice(rig_a.pages) for _ in range(3000)]
    req = [rng.choice([READ, WRITE]) for _ in rows]
    want = [rig_a.io.xlate(s, p, a + 16, q) for (s, p, a), q in zip(rows, req)]
    got = BatchEngine(rig_b.io).translate(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                                          np.array([r[2] + 16 for r in rows], np.uint64), np.array(req))
    assert got.tolist() == want
    assert snapshot(rig_a) == snapshot(rig_b)


@pytest.mark.parametrize("layout", ["dense", "regions", "sorted"])
def test_key_layouts_agree_with_a_naive_dedupe(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from vtd_emu.vtd import batch as B

    if layout != "dense":
        monkeypatch.setattr(B, "_DENSE_MAX", 1 << 22 if layout == "regions" else 0)
    rng = np.random.default_rng(7)
    n = 5000
    pages = rng.integers(0, 1 << 35, 40).astype(np.uint64) << np.uint64(12)
    if layout == "dense":
        pages = np.uint64(0x1234_5000) + np.arange(40, dtype=np.uint64) * np.uint64(0x1000)
    iova = pages[rng.integers(0, 40, n)] + rng.integers(0, 4096, n).astype(np.uint64)
    sid = rng.choice([0x10, 0x18], n).astype(np.int64)
    ptag = np.where(rng.random(n) < 0.5, NO_PASID, 3).astype(np.int64)
    req = rng.choice([READ, WRITE], n).astype(np.int64)
    k = B._dedupe(sid, ptag, iova, req, np.zeros(n, bool))
    assert k is not None
    assert isinstance(k, B._SortedKeys if layout == "sorted" else B._DenseKeys)
    keys = list(zip(sid.tolist(), ptag.tolist(), (iova >> np.uint64(12)).tolist(), req.tolist()))
    order: dict[tuple[int, int, int, int], list[int]] = {}
    for pos, key in enumerate(keys):
        order.setdefault(key, []).append(pos)
    firsts = sorted(v[0] for v in order.values())
    assert k.first.tolist() == firsts
    by_first = {v[0]: v for v in order.values()}
    assert k.second().tolist() == [by_first[f][1] if len(by_first[f]) > 1 else n for f in firsts]
    rank_of = {f: r for r, f in enumerate(firsts)}
    assert k.rank_at(0, n).tolist() == [rank_of[order[key][0]] for key in keys]
    r = 3
    occ = by_first[firsts[r]]
    assert k.next_occ(r, occ[0]) == (occ[1] if len(occ) > 1 else n)
    page = np.arange(len(firsts), dtype=np.int64) << 12
    off = (iova & np.uint64(0xFFF)).view(np.int64)
    assert k.assemble(page, off, n).tolist() == [(rank_of[order[key][0]] << 12) | o for key, o in
                                                 zip(keys, off.tolist())]
