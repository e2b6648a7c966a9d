#!/usr/bin/env python3
"""Translation throughput of the VT-d emulator against a naive reference walker, measured in one run.

``make bench`` runs ``.venv/bin/python scripts/bench.py --output BENCHMARKS.md``.

Measured, each as translations per second of ``VtdIommu.xlate`` (the hot path DMA and replay use):

* IOTLB hits: a small working set translated again and again once warm;
* cold walks: every mapped page of a large, sparse 4-level table once, in random order, after a global
  IOTLB invalidation (which also empties the paging-structure caches); paging-structure caches are
  configured off (``psc_size=0``) so every translation is a complete 4-level walk — first stage
  (scalable, PGTT=FS), second stage (scalable PGTT=SS, and legacy) and nested 4×4 (PGTT=NESTED).

Each figure comes with a baseline measured in the same run, over the same tables and the same
addresses: a plain-Python walker defined below that goes root table → context entry → (PASID
directory → PASID entry) → page tables through ``HostRAM.read_u64``, with no caches and no checks
beyond present bits.  Every result of every pass, emulator and baseline, is compared with the address
the builders mapped; any difference aborts the run (exit 1) before anything is written.

``--quick`` is a seconds-long smoke run (small tables, 3 repetitions); ``--profile NAME`` profiles the
emulator on one cold pass of a scenario and prints the top functions instead of writing a report.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import gc
import io
import json
import os
import platform
import pstats
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from vtd_emu.tables import (  # noqa: E402
    PGTT_FS,
    PGTT_NESTED,
    PGTT_SS,
    R,
    U,
    W,
    FirstStageTable,
    LegacyRootTable,
    PageAllocator,
    PasidTables,
    ScalableRootTable,
    SecondStageTable,
    enable_translation,
)
from vtd_emu.memory import GuestPhysView, HostRAM  # noqa: E402
from vtd_emu.vtd.access import NO_PASID, READ  # noqa: E402
from vtd_emu.vtd.config import VtdConfig  # noqa: E402
from vtd_emu.vtd.iommu import VtdIommu  # noqa: E402

if TYPE_CHECKING:
    from vtd_emu.vmm import GuestDriver, Machine

# -- parameters -----------------------------------------------------------------------------------

REGION_PAGES = 256
"""Mappings come in 1 MiB regions of 256 contiguous 4 KiB pages, scattered over the address space."""
IOTLB_SIZE = 4096
"""The emulator's IOTLB size for every scenario (the modern preset's default)."""
HIT_WORKING_SET = 256
"""Distinct pages of the IOTLB-hit working set (well under IOTLB_SIZE)."""
DATA_BASE = 0x10_0000_0000
"""Output (host-physical) addresses of the mapped pages start here, one distinct page per mapping."""
GPA_TABLES = 0x8000_0000
"""Nested: guest-physical base of the guest's first-stage tables."""
GPA_DATA = 0x1_0000_0000
"""Nested: guest-physical base of the pages the first stage maps to."""

PASID_FS, PASID_NESTED = 0x42, 0x43
SID_LEGACY, SID_SM = 0x0310, 0x0418  # bus 3 devfn 0x10; bus 4 devfn 0x18


@dataclass(frozen=True)
class Params:
    pages: int
    """Mapped 4 KiB pages per table (a multiple of REGION_PAGES) = translations per cold pass."""
    reps: int
    hit_translations: int
    """Translations per timed IOTLB-hit pass (the working set, repeated)."""
    seed: int = 2024


FULL = Params(pages=65_536, reps=5, hit_translations=262_144)
QUICK = Params(pages=4_096, reps=3, hit_translations=32_768)


# -- the naive reference walkers ------------------------------------------------------------------
# Plain Python, specialised to what the bench builds (4-level tables, 4 KiB leaves): one read per
# structure, a present test, the next pointer.  No caches, no reserved-bit, permission or width checks,
# no A/D updates.  -1 = not present somewhere.  Each walker is written once below with READ(a) for
# "the u64 at a" and compiled twice: over a plain memoryview of the HostRAM pool (the baseline:
# ``q[rows[a >> 12] << 9 | (a >> 3) & 511]``, what a walker over a flat image costs plus one dict
# subscript for the sparse page map) and through ``HostRAM.read_u64`` (the second column).

M = 0x000F_FFFF_FFFF_F000
"""Bits 51:12: every pointer and leaf address the walkers follow."""

Walker = Callable[[int, int, int, int], int]
"""(sid, ptag, iova, req) → output address or -1; the same arguments ``xlate`` takes."""
Read = Callable[[int], int]

_SM_PASID_ENTRY = """
    devfn = sid & 0xFF
    a = root + (sid >> 8) * 16 + (8 if devfn >= 128 else 0)
    e = READ(a)
    if not e & 1:
        return -1
    ctx = (e & M) + (devfn & 0x7F) * 32
    c = READ(ctx)
    if not c & 1:
        return -1
    if ptag == NO_PASID:  # RID_PASID for requests without PASID
        a = ctx + 8
        pasid = READ(a) & 0xFFFFF
    else:
        pasid = ptag
    a = (c & M) + (pasid >> 6) * 8
    d = READ(a)
    if not d & 1:
        return -1
    pe = (d & M) + (pasid & 63) * 64
    if not READ(pe) & 1:
        return -1
"""


def _levels(table: str, va: str, present: int, out: str = "return") -> str:
    lines = [f"    t = {table}"]
    for shift in (36, 27, 18, 9):
        lines += [f"    a = t | ({va} >> {shift}) & 0xFF8", "    e = READ(a)", f"    if not e & {present}:",
                  "        return -1", "    t = e & M"]
    lines.append(f"    {out} t | ({va} & 0xFFF)")
    return "\n".join(lines) + "\n"


_WALKERS = {
    # Legacy mode: root entry → context entry (SLPTPTR) → 4 second-stage levels.
    "ss-legacy": ("def walk(sid, ptag, iova, req):\n    a = root + (sid >> 8) * 16\n    e = READ(a)\n"
                  "    if not e & 1:\n        return -1\n    a = (e & M) + (sid & 0xFF) * 16\n    e = READ(a)\n"
                  "    if not e & 1:\n        return -1\n" + _levels("e & M", "iova", 3)),
    # Scalable mode, PGTT=SS: PASID entry (SSPTPTR) → 4 second-stage levels.
    "ss-sm": "def walk(sid, ptag, iova, req):" + _SM_PASID_ENTRY + "    e = READ(pe)\n" + _levels("e & M", "iova", 3),
    # Scalable mode, PGTT=FS: PASID entry (FSPTPTR, qword 2) → 4 first-stage levels.
    "fs": ("def walk(sid, ptag, va, req):" + _SM_PASID_ENTRY + "    a = pe + 16\n    e = READ(a)\n"
           + _levels("e & M", "va", 1)),
    # Scalable mode, PGTT=NESTED: every first-stage table pointer (GPA) and the final GPA go through a
    # 4-level second-stage walk: 4 × (4 + 1) + 4 = 24 table reads.
    "nested": ("def ss(ssroot, gpa):\n" + _levels("ssroot", "gpa", 3)
               + "def walk(sid, ptag, va, req):" + _SM_PASID_ENTRY
               + "    ssroot = READ(pe) & M\n    a = pe + 16\n    table = READ(a) & M\n"
               + "    for shift in (36, 27, 18, 9):\n        h = ss(ssroot, table)\n        if h < 0:\n"
               + "            return -1\n        a = h | (va >> shift) & 0xFF8\n        e = READ(a)\n"
               + "        if not e & 1:\n            return -1\n        table = e & M\n"
               + "    return ss(ssroot, table | (va & 0xFFF))\n"),
}


def make_walker(key: str, root: int, rd: Read | None = None, ram: HostRAM | None = None) -> Walker:
    """The plain walker of scenario ``key`` reading through ``rd`` or, without it, a memoryview of
    ``ram``'s pool."""
    src = _WALKERS[key]
    scope: dict[str, object] = {"root": root, "M": M, "NO_PASID": NO_PASID}
    if rd is None:
        assert ram is not None
        _, q = ram.qword_rows()
        scope["q"], scope["rows"] = q, dict(ram.page_rows())  # the tables add no page while the bench runs
        src = src.replace("READ(a)", "q[rows[a >> 12] << 9 | (a >> 3) & 511]").replace(
            "READ(pe)", "q[rows[pe >> 12] << 9 | (pe >> 3) & 511]").replace(
            "READ(ctx)", "q[rows[ctx >> 12] << 9 | (ctx >> 3) & 511]")
    else:
        scope["rd"] = rd
        src = src.replace("READ(", "rd(")
    assert "READ" not in src
    exec(compile(src, f"<bench walker {key}>", "exec"), scope)
    return scope["walk"]  # type: ignore[return-value]


# -- scenarios ------------------------------------------------------------------------------------


@dataclass
class Scenario:
    key: str
    title: str
    iommu: VtdIommu
    ram: HostRAM
    sid: int
    ptag: int
    make_walker: Callable[[Read | None], Walker]
    """The plain walker through a read function, or (None) over a memoryview of the pool."""
    addrs: list[int]
    """Every mapped page once, a random offset in each, in random order."""
    expected: list[int]
    """What the builders mapped each address to."""
    table_pages: int = 0


def _regions(rng: random.Random, count: int, top_bits: int) -> list[int]:
    """``count`` distinct 2 MiB-aligned region bases spread over [0, 2**top_bits)."""
    seen: set[int] = set()
    while len(seen) < count:
        seen.add(rng.randrange(1 << (top_bits - 21)) << 21)
    return sorted(seen)


def _addresses(rng: random.Random, bases: list[int], outs: list[int]) -> tuple[list[int], list[int]]:
    pairs = []
    for base, out in zip(bases, outs):
        for i in range(REGION_PAGES):
            off = rng.randrange(0, 0x1000, 8)
            pairs.append((base + i * 0x1000 + off, out + i * 0x1000 + off))
    rng.shuffle(pairs)
    return [a for a, _ in pairs], [b for _, b in pairs]


def _new_unit() -> tuple[HostRAM, PageAllocator, VtdIommu]:
    ram = HostRAM()
    cfg = VtdConfig.preset("modern", iotlb_size=IOTLB_SIZE, psc_size=0)
    iommu = VtdIommu(ram, cfg)
    return ram, PageAllocator(ram), iommu


def build_legacy_ss(p: Params, rng: random.Random) -> Scenario:
    ram, alloc, iommu = _new_unit()
    ss = SecondStageTable(ram, alloc, levels=4)
    bases = _regions(rng, p.pages // REGION_PAGES, 48)
    outs = [DATA_BASE + i * REGION_PAGES * 0x1000 for i in range(len(bases))]
    for b, o in zip(bases, outs):
        ss.map(b, o, REGION_PAGES * 0x1000, R | W)
    rt = LegacyRootTable(ram, alloc)
    rt.set_context(SID_LEGACY >> 8, SID_LEGACY & 0xFF, slptptr=ss.root, aw=ss.aw, did=1)
    # Legacy translation on a scalable-capable unit: RTADDR.TTM = legacy.
    enable_translation(iommu, rt.root)
    addrs, expected = _addresses(rng, bases, outs)
    return Scenario("ss-legacy", "cold second-stage 4-level walk (legacy)", iommu, ram, SID_LEGACY, NO_PASID,
                    lambda rd: make_walker("ss-legacy", rt.root, rd, ram), addrs, expected, (alloc.next - alloc.base) // 0x1000)


def _sm_common(ram: HostRAM, alloc: PageAllocator) -> tuple[ScalableRootTable, PasidTables]:
    rt = ScalableRootTable(ram, alloc)
    pt = PasidTables(ram, alloc)
    rt.set_context(SID_SM >> 8, SID_SM & 0xFF, pasid_dir=pt.dir, pdts=pt.pdts, rid_pasid=0, paside=True)
    return rt, pt


def build_sm_ss(p: Params, rng: random.Random) -> Scenario:
    ram, alloc, iommu = _new_unit()
    ss = SecondStageTable(ram, alloc, levels=4)
    bases = _regions(rng, p.pages // REGION_PAGES, 48)
    outs = [DATA_BASE + i * REGION_PAGES * 0x1000 for i in range(len(bases))]
    for b, o in zip(bases, outs):
        ss.map(b, o, REGION_PAGES * 0x1000, R | W)
    rt, pt = _sm_common(ram, alloc)
    pt.set_entry(0, pgtt=PGTT_SS, did=2, ssptptr=ss.root, aw=ss.aw)  # RID_PASID 0
    enable_translation(iommu, rt.root, scalable=True)
    addrs, expected = _addresses(rng, bases, outs)
    return Scenario("ss-sm", "cold second-stage 4-level walk (scalable, PGTT=SS)", iommu, ram, SID_SM, NO_PASID,
                    lambda rd: make_walker("ss-sm", rt.root, rd, ram), addrs, expected, (alloc.next - alloc.base) // 0x1000)


def build_sm_fs(p: Params, rng: random.Random) -> Scenario:
    ram, alloc, iommu = _new_unit()
    fs = FirstStageTable(ram, alloc, levels=4)
    bases = _regions(rng, p.pages // REGION_PAGES, 47)  # lower canonical half
    outs = [DATA_BASE + i * REGION_PAGES * 0x1000 for i in range(len(bases))]
    for b, o in zip(bases, outs):
        fs.map(b, o, REGION_PAGES * 0x1000, W | U)
    rt, pt = _sm_common(ram, alloc)
    pt.set_entry(PASID_FS, pgtt=PGTT_FS, did=3, fsptptr=fs.root, fspm=fs.fspm)
    enable_translation(iommu, rt.root, scalable=True)
    addrs, expected = _addresses(rng, bases, outs)
    return Scenario("fs", "cold first-stage 4-level walk (scalable, PGTT=FS, with PASID)", iommu, ram, SID_SM,
                    PASID_FS, lambda rd: make_walker("fs", rt.root, rd, ram), addrs, expected, (alloc.next - alloc.base) // 0x1000)


def build_nested(p: Params, rng: random.Random) -> Scenario:
    ram, alloc, iommu = _new_unit()
    nregions = p.pages // REGION_PAGES
    ss = SecondStageTable(ram, alloc, levels=4)
    # Guest pages for the guest's first-stage tables (root + at most 3 per region), backed by host pages.
    gtable_pages = 1 + 3 * nregions + 8
    host_tables = alloc.alloc(gtable_pages)
    ss.map(GPA_TABLES, host_tables, gtable_pages * 0x1000, R | W)
    gview = GuestPhysView(ram, ss)
    fs = FirstStageTable(gview, PageAllocator(gview, base=GPA_TABLES, limit=GPA_TABLES + gtable_pages * 0x1000))
    bases = _regions(rng, nregions, 47)
    gpas = [GPA_DATA + i * REGION_PAGES * 0x1000 for i in range(nregions)]
    outs = [DATA_BASE + i * REGION_PAGES * 0x1000 for i in range(nregions)]
    for b, g, o in zip(bases, gpas, outs):
        fs.map(b, g, REGION_PAGES * 0x1000, W | U)
        ss.map(g, o, REGION_PAGES * 0x1000, R | W)
    rt, pt = _sm_common(ram, alloc)
    pt.set_entry(PASID_NESTED, pgtt=PGTT_NESTED, did=4, ssptptr=ss.root, aw=ss.aw, fsptptr=fs.root, fspm=fs.fspm)
    enable_translation(iommu, rt.root, scalable=True)
    addrs, expected = _addresses(rng, bases, outs)
    return Scenario("nested", "cold nested 4×4 walk (scalable, PGTT=NESTED, with PASID)", iommu, ram, SID_SM,
                    PASID_NESTED, lambda rd: make_walker("nested", rt.root, rd, ram), addrs, expected, (alloc.next - alloc.base) // 0x1000)


BUILDERS: dict[str, Callable[[Params, random.Random], Scenario]] = {
    "fs": build_sm_fs,
    "ss-sm": build_sm_ss,
    "ss-legacy": build_legacy_ss,
    "nested": build_nested,
}


# -- measurement ----------------------------------------------------------------------------------


class BenchError(Exception):
    pass


def fail(msg: str) -> NoReturn:
    raise BenchError(msg)


class CountingRAM:
    """Forwards to a HostRAM and counts ``read_u64`` calls (used on untimed passes only)."""

    def __init__(self, ram: HostRAM) -> None:
        self.ram = ram
        self.reads = 0
        self.write_u64 = ram.write_u64
        self.read = ram.read
        self.write = ram.write
        self.is_ram = ram.is_ram

    def read_u64(self, addr: int) -> int:
        self.reads += 1
        return self.ram.read_u64(addr)


@dataclass
class Row:
    key: str
    title: str
    translations: int
    """Per timed pass."""
    emu_rates: list[float] = field(default_factory=list)
    base_rates: list[float] = field(default_factory=list)
    """The plain walker through ``HostRAM.read_u64``."""
    mv_rates: list[float] = field(default_factory=list)
    """The plain walker over a memoryview of the pool: the baseline the ratio is taken against."""
    emu_reads: float = 0.0
    base_reads: float = 0.0
    walks_per_xlate: float = 0.0

    @property
    def emu(self) -> float:
        return statistics.median(self.emu_rates)

    @property
    def base(self) -> float:
        return statistics.median(self.base_rates)

    @property
    def mv(self) -> float:
        return statistics.median(self.mv_rates)

    @property
    def ratios(self) -> list[float]:
        return [e / b for e, b in zip(self.emu_rates, self.mv_rates)]

    @property
    def ratio(self) -> float:
        """Median of the per-pass ratios against the memoryview baseline (each pass times every side over
        the same interleaved chunks)."""
        return statistics.median(self.ratios)

    @property
    def ratio_hostram(self) -> float:
        return statistics.median([e / b for e, b in zip(self.emu_rates, self.base_rates)])


def _check(sc: Scenario, what: str, addrs: list[int], got: list[int], want: list[int]) -> None:
    if got == want:
        return
    for i, (a, g, w) in enumerate(zip(addrs, got, want)):
        if g != w:
            pasid = "none" if sc.ptag == NO_PASID else f"{sc.ptag:#x}"
            fail(f"{sc.key}: {what} disagrees at translation {i}: sid={sc.sid:#06x} pasid={pasid} iova={a:#x}: "
                 f"got {g:#x}, expected {w:#x}")
    fail(f"{sc.key}: {what}: {len(got)} results for {len(want)} addresses")


def _run_emu(sc: Scenario, addrs: list[int]) -> tuple[float, list[int]]:
    x = sc.iommu.xlate
    sid, ptag = sc.sid, sc.ptag
    t0 = time.perf_counter()
    out = [x(sid, ptag, a, READ) for a in addrs]
    return time.perf_counter() - t0, out


def _run_base(sc: Scenario, walk: Walker, addrs: list[int]) -> tuple[float, list[int]]:
    sid, ptag = sc.sid, sc.ptag
    t0 = time.perf_counter()
    out = [walk(sid, ptag, a, READ) for a in addrs]
    return time.perf_counter() - t0, out


CHUNK = 2048
"""Timed passes alternate emulator and baseline every CHUNK translations, so that both sides see the same
machine (the shared VMs drift in speed over seconds)."""


def _timed_pass(sc: Scenario, walk: Walker, mv_walk: Walker,
                addrs: list[int]) -> tuple[float, list[int], float, list[int], float, list[int]]:
    """(seconds, results) of the emulator, the HostRAM walker and the memoryview walker over ``addrs``."""
    x = sc.iommu.xlate
    sid, ptag = sc.sid, sc.ptag
    clock = time.perf_counter
    t_emu = t_base = t_mv = 0.0
    got_emu: list[int] = []
    got_base: list[int] = []
    got_mv: list[int] = []
    for i in range(0, len(addrs), CHUNK):
        part = addrs[i:i + CHUNK]
        t0 = clock()
        r = [x(sid, ptag, a, READ) for a in part]
        t1 = clock()
        b = [walk(sid, ptag, a, READ) for a in part]
        t2 = clock()
        m = [mv_walk(sid, ptag, a, READ) for a in part]
        t3 = clock()
        t_emu += t1 - t0
        t_base += t2 - t1
        t_mv += t3 - t2
        got_emu += r
        got_base += b
        got_mv += m
    return t_emu, got_emu, t_base, got_base, t_mv, got_mv


def _flush(sc: Scenario) -> None:
    """Global IOTLB invalidation: empties the IOTLB, the paging-structure caches and the front memo;
    the context and PASID caches stay warm."""
    if sc.iommu.invalidate_iotlb(1) != 1:
        fail(f"{sc.key}: global IOTLB invalidation not performed")


def _counted_pass(sc: Scenario, addrs: list[int], expected: list[int], cold: bool) -> tuple[float, float]:
    """One untimed pass of each side through a counting memory: checks every result and returns memory
    reads per translation (emulator, baseline)."""
    if cold:
        _flush(sc)
    counting = CountingRAM(sc.ram)
    sc.iommu.mem = counting  # type: ignore[assignment]
    try:
        _, got = _run_emu(sc, addrs)
    finally:
        sc.iommu.mem = sc.ram
    _check(sc, "emulator (counted pass)", addrs, got, expected)
    emu_reads = counting.reads / len(addrs)
    counting.reads = 0
    _, got = _run_base(sc, sc.make_walker(counting.read_u64), addrs)
    _check(sc, "reference walker", addrs, got, expected)
    return emu_reads, counting.reads / len(addrs)


def _faults_guard(sc: Scenario) -> None:
    if sc.iommu.faults.recorded or sc.iommu.suppressed:
        fail(f"{sc.key}: the emulator recorded faults during the bench")


def measure_cold(sc: Scenario, reps: int) -> Row:
    row = Row(sc.key, sc.title, len(sc.addrs))
    row.emu_reads, row.base_reads = _counted_pass(sc, sc.addrs, sc.expected, cold=True)
    walk = sc.make_walker(sc.ram.read_u64)
    mv_walk = sc.make_walker(None)
    stats = sc.iommu.caches.stats
    for _ in range(reps):
        _flush(sc)
        gc.collect()
        walks0 = stats.walks
        t_emu, got, t_base, got_base, t_mv, got_mv = _timed_pass(sc, walk, mv_walk, sc.addrs)
        walks = stats.walks - walks0
        _check(sc, "reference walker", sc.addrs, got_base, sc.expected)
        _check(sc, "memoryview walker", sc.addrs, got_mv, sc.expected)
        _check(sc, "emulator", sc.addrs, got, sc.expected)
        if walks != len(sc.addrs):
            fail(f"{sc.key}: a cold pass of {len(sc.addrs)} translations did {walks} walks (caches not cold)")
        row.emu_rates.append(len(sc.addrs) / t_emu)
        row.base_rates.append(len(sc.addrs) / t_base)
        row.mv_rates.append(len(sc.addrs) / t_mv)
        row.walks_per_xlate = walks / len(sc.addrs)
    _faults_guard(sc)
    return row


def measure_hits(sc: Scenario, p: Params) -> Row:
    ws = sc.addrs[:HIT_WORKING_SET]
    ws_expected = sc.expected[:HIT_WORKING_SET]
    if HIT_WORKING_SET > IOTLB_SIZE // 2:
        fail("the IOTLB-hit working set must fit the IOTLB")
    repeat = max(1, p.hit_translations // len(ws))
    addrs, expected = ws * repeat, ws_expected * repeat
    row = Row("hit", f"IOTLB hits ({len(ws)}-page working set, warm; legacy second stage)", len(addrs))
    _flush(sc)
    _, got = _run_emu(sc, ws)  # warm
    _check(sc, "emulator (warm-up)", ws, got, ws_expected)
    row.emu_reads, row.base_reads = _counted_pass(sc, ws, ws_expected, cold=False)
    walk = sc.make_walker(sc.ram.read_u64)
    mv_walk = sc.make_walker(None)
    stats = sc.iommu.caches.stats
    for _ in range(p.reps):
        gc.collect()
        walks0 = stats.walks
        t_emu, got, t_base, got_base, t_mv, got_mv = _timed_pass(sc, walk, mv_walk, addrs)
        walks = stats.walks - walks0
        _check(sc, "reference walker", addrs, got_base, expected)
        _check(sc, "memoryview walker", addrs, got_mv, expected)
        _check(sc, "emulator", addrs, got, expected)
        if walks:
            fail(f"{sc.key}: {walks} walks during a warm IOTLB-hit pass")
        row.emu_rates.append(len(addrs) / t_emu)
        row.base_rates.append(len(addrs) / t_base)
        row.mv_rates.append(len(addrs) / t_mv)
    _faults_guard(sc)
    return row


@dataclass
class ApiRow:
    key: str
    title: str
    translations: int
    translate_rates: list[float] = field(default_factory=list)
    xlate_rates: list[float] = field(default_factory=list)

    @property
    def cost(self) -> float:
        """Median over passes of translate's time per translation over xlate's."""
        return statistics.median([x / t for t, x in zip(self.translate_rates, self.xlate_rates)])


def measure_api(sc: Scenario, cold: bool, reps: int, addrs: list[int], expected: list[int], title: str) -> ApiRow:
    """``translate()`` against ``xlate`` on the same addresses, alternating chunks."""
    io = sc.iommu
    x, tr = io.xlate, io.translate
    sid, ptag = sc.sid, sc.ptag
    pasid = None if ptag == NO_PASID else ptag
    row = ApiRow(f"api-{sc.key}-{'cold' if cold else 'hit'}", title, len(addrs))
    clock = time.perf_counter
    if not cold:
        _flush(sc)
        [x(sid, ptag, a, READ) for a in addrs[:HIT_WORKING_SET]]  # warm
    for _ in range(reps):
        gc.collect()
        t_x = t_t = 0.0
        got_x: list[int] = []
        got_t: list[int] = []
        for i in range(0, len(addrs), CHUNK):
            part = addrs[i:i + CHUNK]
            if cold:
                _flush(sc)
            t0 = clock()
            rx = [x(sid, ptag, a, READ) for a in part]
            t1 = clock()
            if cold:
                _flush(sc)
            t2 = clock()
            rt = [tr(sid, a, "r", pasid) for a in part]
            t3 = clock()
            t_x += t1 - t0
            t_t += t3 - t2
            got_x += rx
            got_t += [t.addr if t else -1 for t in rt]
        _check(sc, "xlate (API row)", addrs, got_x, expected)
        _check(sc, "translate() (API row)", addrs, got_t, expected)
        row.xlate_rates.append(len(addrs) / t_x)
        row.translate_rates.append(len(addrs) / t_t)
    _faults_guard(sc)
    return row


def measure_apis(scenarios: dict[str, Scenario], p: Params) -> list[ApiRow]:
    out = []
    for key in ("ss-legacy", "fs"):
        sc = scenarios[key]
        ws, ws_exp = sc.addrs[:HIT_WORKING_SET], sc.expected[:HIT_WORKING_SET]
        repeat = max(1, p.hit_translations // len(ws))
        out.append(measure_api(sc, False, p.reps, ws * repeat, ws_exp * repeat,
                               f"on IOTLB hits ({len(ws)}-page working set; {sc.title.split('(')[-1].rstrip(')')})"))
        n = min(len(sc.addrs), 16_384)
        out.append(measure_api(sc, True, p.reps, sc.addrs[:n], sc.expected[:n], f"on a {sc.title}"))
    return out


# -- batched replay (vtd_emu.vtd.batch) ------------------------------------------------------------

BATCH_DMAS = 1_000_000
"""DMAs (64 bytes each, so one translation each) in the batched-replay segment and trace."""
BATCH_WORKING_SET = 4096
"""Distinct 4 KiB pages the segment touches (the IOTLB holds them all: no eviction inside the run)."""
BATCH_SID = 0x0418


@dataclass
class BatchRow:
    key: str
    title: str
    translations: int
    scalar_rates: list[float] = field(default_factory=list)
    batched_cold_rates: list[float] = field(default_factory=list)
    batched_warm_rates: list[float] = field(default_factory=list)


@dataclass
class ReplayRow:
    title: str
    events: int
    file_bytes: int
    batched_rates: list[float] = field(default_factory=list)
    scalar_rates: list[float] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)


def _batch_unit(layout: str, rng: random.Random) -> tuple[HostRAM, VtdIommu, np.ndarray]:
    """A scalable unit (modern preset, spec profile, default cache sizes) with a 4-level second stage
    mapping BATCH_WORKING_SET pages, either in one compact IOVA range (as an IOVA allocator hands them
    out) or in 16 regions at random 2 MiB-aligned IOVAs over the 48-bit space."""
    ram = HostRAM()
    io = VtdIommu(ram, VtdConfig.preset("modern"))
    alloc = PageAllocator(ram)
    ss = SecondStageTable(ram, alloc, levels=4)
    if layout == "compact":
        bases, per = [0x7_F000_0000], BATCH_WORKING_SET
    else:
        bases, per = _regions(rng, 16, 48), BATCH_WORKING_SET // 16
    pages: list[int] = []
    for i, b in enumerate(bases):
        ss.map(b, DATA_BASE + i * per * 0x1000, per * 0x1000, R | W)
        pages += [b + k * 0x1000 for k in range(per)]
    rt = ScalableRootTable(ram, alloc)
    pt = PasidTables(ram, alloc)
    pt.set_entry(0, pgtt=PGTT_SS, did=1, ssptptr=ss.root, aw=ss.aw)
    rt.set_context(BATCH_SID >> 8, BATCH_SID & 0xFF, pasid_dir=pt.dir, pdts=pt.pdts)
    enable_translation(io, rt.root, scalable=True)
    return ram, io, np.array(pages, np.uint64)


def _batch_segment(pages: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    iova = pages[g.integers(0, pages.size, n)] + g.integers(0, 64, n).astype(np.uint64) * np.uint64(64)
    req = np.where(g.random(n) < 0.5, READ, 2).astype(np.int64)
    return iova, req


def _cache_state(io: VtdIommu) -> tuple[object, ...]:
    c = io.caches
    st = c.stats
    return (list(c.iotlb.items()), list(c.context.items()), list(c.pasid.items()), list(c.psc_ss.items()),
            (st.iotlb_hits, st.iotlb_misses, st.walks, st.context_hits, st.pasid_hits), io.register_dump())


def measure_batched_translation(layout: str, n: int, reps: int, rng: random.Random) -> BatchRow:
    from vtd_emu.vtd.batch import BatchEngine

    title = ("compact working set (one IOVA range)" if layout == "compact"
             else "scattered working set (16 regions over 48 bits)")
    row = BatchRow(layout, f"{n:,}-DMA segment, {BATCH_WORKING_SET:,} pages, {title}", n)
    seed = rng.randrange(1 << 30)
    _, _, pages = _batch_unit(layout, random.Random(seed))
    iova, req = _batch_segment(pages, n, seed)
    sid = np.full(n, BATCH_SID, np.int64)
    ptag = np.full(n, NO_PASID, np.int64)
    iovas, reqs = iova.tolist(), req.tolist()
    want: list[int] | None = None
    want_state: tuple[object, ...] | None = None
    for k in range(reps):
        # Scalar: a fresh unit, every chunk through xlate (what replay does without batching).
        _, io_s, _ = _batch_unit(layout, random.Random(seed))
        x = io_s.xlate
        gc.collect()
        t0 = time.perf_counter()
        got = [x(BATCH_SID, NO_PASID, a, q) for a, q in zip(iovas, reqs)]
        row.scalar_rates.append(n / (time.perf_counter() - t0))
        if want is None:
            want, want_state = got, _cache_state(io_s)
        elif got != want:
            fail(f"batched/{layout}: two scalar passes disagree")
        # Batched: a fresh unit (cold caches), then the same segment again (warm).
        _, io_b, _ = _batch_unit(layout, random.Random(seed))
        eng = BatchEngine(io_b, window=1 << 20)
        gc.collect()
        t0 = time.perf_counter()
        res = eng.translate(sid, ptag, iova, req)
        row.batched_cold_rates.append(n / (time.perf_counter() - t0))
        if res.tolist() != want:
            bad = int(np.flatnonzero(res != np.array(want, np.int64))[0])
            fail(f"batched/{layout}: batched result {int(res[bad]):#x} != scalar {want[bad]:#x} at chunk {bad} "
                 f"(iova {iovas[bad]:#x})")
        if _cache_state(io_b) != want_state:
            fail(f"batched/{layout}: caches or registers differ from the scalar path's after the segment")
        if eng.stats.scalar_chunks:
            fail(f"batched/{layout}: {eng.stats.scalar_chunks} chunks fell back to the scalar path")
        gc.collect()
        t0 = time.perf_counter()
        res2 = eng.translate(sid, ptag, iova, req)
        row.batched_warm_rates.append(n / (time.perf_counter() - t0))
        if res2.tolist() != want:
            fail(f"batched/{layout}: warm batched pass disagrees with the scalar path")
        print(f"bench: batched {layout} pass {k + 1}: scalar {row.scalar_rates[-1]:,.0f}/s, batched cold "
              f"{row.batched_cold_rates[-1]:,.0f}/s, warm {row.batched_warm_rates[-1]:,.0f}/s", file=sys.stderr)
    return row


def measure_replay(n: int, reps: int, rng: random.Random) -> ReplayRow:
    """End to end: load a .npz trace of ``n`` DMAs (half 64-byte writes with payload, half reads) plus its
    table set-up, replay it with --check semantics (batched; and once scalar), compare the memory."""
    import tempfile

    from vtd_emu.trace.model import DmaBlock, Trace, TraceConfig, load_trace, save_trace
    from vtd_emu.trace.recorder import Recorder
    from vtd_emu.trace.replay import Replayer, memory_hash

    seed = rng.randrange(1 << 30)
    rec = Recorder(TraceConfig(preset="modern"), name="bench-replay")
    alloc = PageAllocator(rec.mem)
    ss = SecondStageTable(rec.mem, alloc, levels=4)
    base = 0x7_F000_0000
    ss.map(base, DATA_BASE, BATCH_WORKING_SET * 0x1000, R | W)
    rt = ScalableRootTable(rec.mem, alloc)
    pt = PasidTables(rec.mem, alloc)
    pt.set_entry(0, pgtt=PGTT_SS, did=1, ssptptr=ss.root, aw=ss.aw)
    rt.set_context(BATCH_SID >> 8, BATCH_SID & 0xFF, pasid_dir=pt.dir, pdts=pt.pdts)
    enable_translation(rec, rt.root, scalable=True)
    setup = rec.trace()
    pages = np.uint64(base) + np.arange(BATCH_WORKING_SET, dtype=np.uint64) * np.uint64(0x1000)
    iova, req = _batch_segment(pages, n, seed)
    write = req == 2
    payload = np.frombuffer(bytes(range(64)) * 16, np.uint8).copy()
    data_off = np.where(write, (np.arange(n) % 16) * 64, -1).astype(np.int64)
    blk = DmaBlock(np.full(n, BATCH_SID, np.uint32), np.full(n, -1, np.int32), iova, np.full(n, 64, np.uint32),
                   write, np.zeros(n, bool), data_off, payload)
    trace = Trace(setup.config, setup.events + [blk], "bench-replay")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.npz"
        save_trace(trace, path)
        row = ReplayRow(f"{n:,} DMAs of 64 bytes (half writes) over {BATCH_WORKING_SET:,} pages, 4-level "
                        f"second stage, from `.npz`", trace.event_count(), path.stat().st_size)
        want_mem = None
        for k in range(reps):
            gc.collect()
            t0 = time.perf_counter()
            t = load_trace(path)
            t1 = time.perf_counter()
            res = Replayer(t).run()
            t2 = time.perf_counter()
            row.load_seconds.append(t1 - t0)
            row.batched_rates.append(row.events / (t2 - t0))
            assert res.machine is not None
            mem = memory_hash(res.machine.ram)
            if res.stats.scalar_chunks:
                fail(f"replay: {res.stats.scalar_chunks} chunks fell back to the scalar path")
            if want_mem is None:
                gc.collect()
                t0 = time.perf_counter()
                sres = Replayer(load_trace(path), batch=False).run()
                row.scalar_rates.append(row.events / (time.perf_counter() - t0))
                assert sres.machine is not None
                want_mem = memory_hash(sres.machine.ram)
                if sres.machine.iommu.register_dump() != res.machine.iommu.register_dump():
                    fail("replay: registers differ between batched and scalar replay")
            if mem != want_mem:
                fail("replay: memory after batched replay differs from the scalar replay's")
            print(f"bench: replay pass {k + 1}: {row.batched_rates[-1]:,.0f} events/s (load "
                  f"{row.load_seconds[-1]:.2f} s)", file=sys.stderr)
    return row


def render_batched(rows: list[BatchRow], replay: ReplayRow | None) -> list[str]:
    out: list[str] = []
    w = out.append
    w("## Batched replay (`vtd_emu.vtd.batch`)")
    w("")
    w("| segment | translations per pass | scalar `xlate` loop (translations/s) | batched, cold caches | "
      "batched, warm caches | batched (cold) / scalar |")
    w("| --- | --: | --: | --: | --: | --: |")
    for r in rows:
        sc, co, wa = (statistics.median(r.scalar_rates), statistics.median(r.batched_cold_rates),
                      statistics.median(r.batched_warm_rates))
        w(f"| {r.title} | {r.translations:,} | {_rate(sc)} | {_rate(co)} ({_spread(r.batched_cold_rates)}) | "
          f"{_rate(wa)} ({_spread(r.batched_warm_rates)}) | {co / sc:.1f} |")
    w("")
    if replay is not None:
        w("| replay (load + replay, `vtd-emu replay` semantics) | events | file | batched (events/s) | "
          "scalar (events/s) | load time |")
        w("| --- | --: | --: | --: | --: | --: |")
        w(f"| {replay.title} | {replay.events:,} | {replay.file_bytes / 1e6:.1f} MB | "
          f"{_rate(statistics.median(replay.batched_rates))} ({_spread(replay.batched_rates)}) | "
          f"{_rate(statistics.median(replay.scalar_rates))} | {statistics.median(replay.load_seconds):.2f} s |")
        w("")
    w("- Unit: `VtdConfig.preset(\"modern\")` with its default caches (IOTLB 4,096 entries, paging-structure "
      "caches on), scalable mode, PGTT=second-stage 4-level, requests without PASID; each DMA is 64 bytes at a "
      "random 64-byte slot of a random working-set page, half reads, half writes: one translation per DMA.")
    w("- Scalar: a list comprehension over `iommu.xlate` on a fresh unit. Batched: `BatchEngine.translate` "
      "on a fresh unit (cold: every page walked once, with numpy, then the caches filled in first-use order) "
      "and again on the now-warm unit. Every pass is checked equal to the scalar results, and after the cold "
      "pass the IOTLB, context, PASID and paging-structure caches (contents and order), the hit counters and "
      "the registers are checked equal to the scalar unit's; any difference aborts the bench.")
    w("- The compact layout keys chunks with a dense lookup table; the scattered one with a perfect hash of "
      "the 2 MiB regions (no chunk-sized sort). Working sets larger than the IOTLB, faults and other unusual "
      "chunks make the engine fall back to the scalar path for a while (exactness first); the figures are "
      "for the case it is built for.")
    w("- Replay: the trace file holds the table set-up as events and the DMAs as columns; the time includes "
      "loading the file, translating, moving every payload byte into memory (vectorised copies) and the "
      "statistics. The memory hash and registers after replay are compared with a scalar replay.")
    w("")
    return out


# -- the vIOMMU bridge (vtd_emu.vmm) --------------------------------------------------------------

VMM_SID, VMM_SID2 = 0x0310, 0x0318
VMM_GVA = 0x7F00_0000_0000
VMM_DATA = 0x90_0000
"""Guest-physical base of the pages the guest's first-stage tables map (the tables live below)."""
VMM_RAM = 16 << 20


VMM_DID = 3
"""The DID of the first-stage PASID entries the guest writes (above the identity domain's)."""


def _vmm_guest(m: "Machine", sids: tuple[int, ...], ats: bool = False) -> "GuestDriver":
    """Linux's intel-iommu in the guest: brought up (QI, scalable root table, TE), each device's
    scalable-mode context and PASID table made by attaching its RID_PASID to the identity domain."""
    from vtd_emu.vmm import GuestDriver

    drv = GuestDriver(m, m.mem, alloc_base=0x10_0000, alloc_limit=0x80_0000)
    drv.init()
    identity = drv.domain_alloc("pt")
    for sid in sids:
        drv.attach_device(sid, identity, ats=ats)
    return drv


def _write_fs_entry(drv: "GuestDriver", sid: int, pasid: int, fs_root: int) -> None:
    """A first-stage PASID entry written into the device's PASID table with no invalidation: the
    PASID-cache invalidation that makes it visible is what the bind figure times."""
    table = drv.devices[sid].pasid_table
    assert table is not None
    table.set_entry(pasid, pgtt=PGTT_FS, did=VMM_DID, fsptptr=fs_root)


def _submit(drv: "GuestDriver", descs: list[tuple[int, ...]]) -> None:
    if not drv.qi_submit(descs).completed:
        fail("vmm: an invalidation wait did not complete")


@dataclass
class VmmRow:
    key: str
    title: str
    unit: str
    coalesced: list[float] = field(default_factory=list)
    one_per_call: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    counts: dict[str, dict[str, float]] = field(default_factory=dict)


def _vmm_machine(mode: str, sids: tuple[int, ...], ats: bool = False) -> "tuple[Machine, GuestDriver]":
    from vtd_emu.vmm import Machine

    m = Machine(guest_ram=VMM_RAM, forwarding=mode)
    for sid in sids:
        m.add_passthrough_device(sid, ats=ats)
    return m, _vmm_guest(m, sids, ats)


def measure_vmm_bind(n: int, reps: int) -> VmmRow:
    """PASID-cache invalidation → nested HWPT attached: guest binds of ``n`` PASIDs, against the same
    host work done by hand (hwpt_alloc + attach, what a VMM calls)."""
    from vtd_emu.host import HWPT_ALLOC_PASID, HwptVtdS1

    row = VmmRow("bind", f"bind: PASID-cache invalidation (PASID-selective) + wait → nested HWPT attached, "
                         f"{n} PASIDs", "binds/s")
    for _ in range(reps):
        m, g = _vmm_machine("coalesced", (VMM_SID, VMM_SID2))
        fs = FirstStageTable(m.mem, g.alloc)
        fs.map(VMM_GVA, VMM_DATA, 0x1000, W | U)
        for k in range(1, n + 1):
            _write_fs_entry(g, VMM_SID, k, fs.root)
        dev, other = m.devices[VMM_SID], m.devices[VMM_SID2]
        gc.collect()
        t0 = time.perf_counter()
        for k in range(1, n + 1):
            _submit(g, [g.invalidate_pasid_cache(1, VMM_DID, k)])
        t1 = time.perf_counter()
        parent = m.parent_hwpt
        assert parent is not None
        s1 = HwptVtdS1(0, fs.root, 48)
        for k in range(1, n + 1):
            other.vfio.attach_pt(m.vmm.hwpt_alloc(other.dev_id, parent, HWPT_ALLOC_PASID, s1), pasid=k)
        t2 = time.perf_counter()
        for k in range(1, n + 1):
            b = m.bridge.binds.get((VMM_SID, k))
            if b is None or b.nested is None or dev.vfio.attached_hwpt(k) != b.nested:  # type: ignore[union-attr]
                fail(f"vmm: PASID {k} was not bound")
        if not dev.dma_write(VMM_GVA, b"x", pasid=n).ok:  # type: ignore[union-attr]
            fail("vmm: DMA through a bound PASID failed")
        row.coalesced.append(n / (t1 - t0))
        row.baseline.append(n / (t2 - t1))
        m.close()
    return row


def measure_vmm_forwarding(batch: int, batches: int, reps: int) -> VmmRow:
    """Page-selective PASID-IOTLB invalidations of a bound PASID, ``batch`` per wait, forwarded in each
    mode; baseline: the same queue on an emulated-only machine (the vIOMMU's own work, no host)."""
    from vtd_emu.vmm import Machine

    row = VmmRow("forward", f"forwarded invalidations: {batches} × ({batch} page-selective PASID-IOTLB + wait)",
                 "descriptors/s")
    for _ in range(reps):
        for mode, rates in (("coalesced", row.coalesced), ("one-per-call", row.one_per_call), (None, row.baseline)):
            if mode is None:
                m = Machine(guest_ram=VMM_RAM)
                m.add_emulated_device(VMM_SID)
                g = _vmm_guest(m, (VMM_SID,))
            else:
                m, g = _vmm_machine(mode, (VMM_SID,))
            descs = [g.invalidate_piotlb(3, VMM_DID, 1, VMM_GVA + i * 0x1000) for i in range(batch)]
            fs = FirstStageTable(m.mem, g.alloc)
            fs.map(VMM_GVA, VMM_DATA, batch * 0x1000, W | U)
            _write_fs_entry(g, VMM_SID, 1, fs.root)
            _submit(g, [g.invalidate_pasid_cache(1, VMM_DID, 1)])
            st = m.bridge.stats
            calls0 = st.invalidate_calls
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(batches):
                _submit(g, descs)
            rates.append(batch * batches / (time.perf_counter() - t0))
            want = {"coalesced": batches, "one-per-call": batch * batches, None: 0}[mode]
            if st.invalidate_calls - calls0 != want or st.failed_forwards:
                fail(f"vmm: {mode} forwarding made {st.invalidate_calls - calls0} ioctls, expected {want}")
            m.close()
    return row


def measure_vmm_storm(unmaps: int, per_wait: int, reps: int) -> VmmRow:
    """A Linux-like unmap storm on an SVA domain shared by two ATS devices (one DID, one PASID): each
    unmapped page is a page-selective PASID-IOTLB invalidation and a PASID device-TLB invalidation per
    device (cache_tag_flush_range), ``per_wait`` pages per invalidation wait (1: strict; more: a batched
    flush)."""
    row = VmmRow(f"storm-{per_wait}", f"unmap storm: {unmaps} pages, {per_wait} per wait, 2 ATS devices on one "
                                      "SVA domain", "unmaps/s")
    for _ in range(reps):
        for mode, rates in (("coalesced", row.coalesced), ("one-per-call", row.one_per_call)):
            m, g = _vmm_machine(mode, (VMM_SID, VMM_SID2), ats=True)
            fs = FirstStageTable(m.mem, g.alloc)
            fs.map(VMM_GVA, VMM_DATA, unmaps * 0x1000, W | U)
            for sid in (VMM_SID, VMM_SID2):
                _write_fs_entry(g, sid, 1, fs.root)
            _submit(g, [g.invalidate_pasid_cache(1, VMM_DID, 1)])
            st = m.bridge.stats
            c0, d0, e0 = st.invalidate_calls, st.descriptors, st.invalidate_entries
            gc.collect()
            t0 = time.perf_counter()
            guest_descs = 0
            for start in range(0, unmaps, per_wait):
                descs = []
                for p in range(start, min(start + per_wait, unmaps)):
                    va = VMM_GVA + p * 0x1000
                    fs.unmap(va, 0x1000)
                    descs.append(g.invalidate_piotlb(3, VMM_DID, 1, va))
                    descs += [g.invalidate_devtlb(sid, va, 0, pasid=1) for sid in (VMM_SID, VMM_SID2)]
                guest_descs += len(descs)
                _submit(g, descs)
            rates.append(unmaps / (time.perf_counter() - t0))
            calls, entries = st.invalidate_calls - c0, st.invalidate_entries - e0
            waits = -(-unmaps // per_wait)
            want = 2 * waits if mode == "coalesced" else 4 * unmaps
            if calls != want or st.descriptors - d0 != guest_descs or st.failed_forwards:
                fail(f"vmm: storm in {mode} mode made {calls} ioctls, expected {want}")
            row.counts[mode] = {"descriptors": guest_descs, "ioctls": calls, "entries": entries,
                                "ioctls_per_descriptor": calls / guest_descs}
            m.close()
    return row


def measure_vmm(quick: bool, reps: int) -> list[VmmRow]:
    n = 10 if quick else 200
    return [measure_vmm_bind(n, reps),
            measure_vmm_forwarding(16, 4 if quick else 100, reps),
            measure_vmm_storm(16 if quick else 512, 1, reps),
            measure_vmm_storm(16 if quick else 512, 16, reps)]


def render_vmm(rows: list[VmmRow]) -> list[str]:
    out: list[str] = []
    w = out.append
    w("## vIOMMU bridge (`vtd_emu.vmm`)")
    w("")
    w("| measurement | unit | coalesced | one-per-call | baseline | coalesced / baseline |")
    w("| --- | --- | --: | --: | --: | --: |")
    for r in rows:
        co = statistics.median(r.coalesced)
        opc = f"{_rate(statistics.median(r.one_per_call))}" if r.one_per_call else "—"
        base = statistics.median(r.baseline) if r.baseline else None
        w(f"| {r.title} | {r.unit} | {_rate(co)} ({_spread(r.coalesced)}) | {opc} | "
          f"{_rate(base) if base else '—'} | {f'{co / base:.2f}' if base else '—'} |")
    w("")
    storms = [r for r in rows if r.counts]
    if storms:
        w("| unmap storm | mode | guest descriptors | `HWPT_INVALIDATE` calls | entries | ioctls per descriptor |")
        w("| --- | --- | --: | --: | --: | --: |")
        for r in storms:
            for mode, c in r.counts.items():
                w(f"| {r.title} | {mode} | {c['descriptors']:,.0f} | {c['ioctls']:,.0f} | {c['entries']:,.0f} | "
                  f"{c['ioctls_per_descriptor']:.3f} |")
        w("")
    w("- Machine: `vtd_emu.vmm.Machine` (guest RAM 16 MiB, default vIOMMU) on `Host(\"modern\")`; the guest "
      "side is `vtd_emu.vmm.GuestDriver` (Linux's intel-iommu: scalable tables in guest RAM, each device's "
      "RID_PASID on the identity domain); the timed descriptors go through its `qi_submit`, each batch "
      "followed by a status-writing wait whose completion the bench checks. The timed part includes the "
      "driver's own work per descriptor (its status slots and descriptor log), as a real guest's would.")
    w("- Bind: per PASID, the guest writes the PASID entry (first stage) beforehand; the timed part is the "
      "PASID-cache invalidation + wait (the vIOMMU runs the queue, the bridge decodes the entry, allocates "
      "the nested HWPT and attaches it). Baseline: the same `hwpt_alloc` + `attach_pt` made by hand for "
      "another device, in the same run. Every bind is checked attached and a DMA through the last one.")
    w("- Forwarding: page-selective PASID-IOTLB descriptors of a bound PASID. Coalesced: one "
      "`HWPT_INVALIDATE` array per HWPT per wait; one-per-call: one ioctl per descriptor (QEMU's way). "
      "Baseline: the same queue on an emulated-only machine (the vIOMMU's own invalidation work). The bench "
      "aborts unless the ioctl counts are exactly what the mode implies.")
    w("- Unmap storm: what Linux's `cache_tag_flush_range` issues for an SVA domain with two ATS devices: "
      "per unmapped page a PASID-IOTLB (type 6) and a PASID device-TLB (type 8) descriptor per device. "
      "Each device has its own nested HWPT: coalesced makes one call per HWPT per wait, one-per-call one per "
      "(descriptor, HWPT).")
    w("")
    return out


# -- a real Linux run: QEMU log import and replay ------------------------------------------------------


def _shared_dir() -> Path:
    env = os.environ.get("VTD_EMU_SHARED")
    return Path(env) if env else REPO.parent / "shared"


LINUX_CAPTURE = _shared_dir() / "linux-capture" / "legacy-io"
LINUX_IMPORT_TARGET = 300_000
LINUX_REPLAY_TARGET = 200_000


@dataclass
class LinuxRow:
    lines: int
    events: int
    import_rates: list[float] = field(default_factory=list)
    read_rates: list[float] = field(default_factory=list)
    replay_rates: list[float] = field(default_factory=list)
    naive_rates: list[float] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)
    ram_seconds: float = 0.0
    peak_mib: float = 0.0
    iotlb: dict[str, int] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)
    """1-minute load average at the start of each pass (the figures are only as quiet as the machine)."""


def legacy_walker_any_depth(rd: Read, root: int) -> Walker:
    """Legacy mode at the depth the context entry gives (AW+2 levels), large leaves included: the naive
    walker of the other sections, not specialised to 4 levels."""

    def walk(sid: int, ptag: int, iova: int, req: int) -> int:
        e = rd(root + (sid >> 8) * 16)
        if not e & 1:
            return -1
        ca = (e & M) + (sid & 0xFF) * 16
        e, hi = rd(ca), rd(ca + 8)
        if not e & 1:
            return -1
        lvl = (hi & 7) + 2
        while True:
            shift = 3 + 9 * lvl
            e = rd((e & M) | ((iova >> shift) & 0x1FF) << 3)
            if not e & 3:
                return -1
            if lvl == 1 or e & 0x80:
                mask = (1 << shift) - 1
                return (e & M & ~mask) | (iova & mask)
            lvl -= 1

    return walk


def _naive_replay(trace: object, ram: HostRAM) -> tuple[float, int]:
    """The floor of a replay: apply the memory writes, walk every DMA with the naive walker (no caches,
    no registers, no interrupts) and compare with the log's answer; (seconds, events)."""
    from vtd_emu.trace.model import Event

    events = [e for e in trace.events if isinstance(e, Event)]  # type: ignore[attr-defined]
    root = next(e.fields["value"] for e in events if e.op == "mmio_write" and e.fields["offset"] == 0x20)
    walk = legacy_walker_any_depth(ram.read_u64, root & M)
    wr = ram.write_u64
    gc.collect()
    t0 = time.perf_counter()
    for e in events:
        op = e.op
        if op == "mem_write":
            a = e.fields["addr"]
            for k, q in enumerate(e.fields["qwords"]):
                wr(a + 8 * k, q)
        elif op == "dma":
            got = walk(e.fields["sid"], 0, e.fields["iova"], READ)
            if got != e.expect["addrs"][0]:
                fail(f"linux-run: the naive walker translated {e.fields['iova']:#x} to {got:#x}, the log says "
                     f"{e.expect['addrs'][0]:#x}")
    return time.perf_counter() - t0, len(events)


def measure_linux_run(reps: int) -> LinuxRow | None:
    """Import the shared capture's log (streamed, .zst) and replay it under qemu-7.2 with every check;
    baselines from the same run: reading the log's lines (decompress and split, nothing parsed) and the
    naive replay loop.  None when the capture is not there."""
    import resource
    import tempfile

    from vtd_emu.importers.qemu_log import import_log_to, open_log
    from vtd_emu.ramimage import load_ram_image
    from vtd_emu.trace.model import load_trace
    from vtd_emu.trace.replay import Replayer

    log, ram = LINUX_CAPTURE / "vtd-trace.log.zst", LINUX_CAPTURE / "ram.bin.zst"
    if not (log.exists() and ram.exists()):
        return None
    row = LinuxRow(0, 0)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run.jsonl"
        for k in range(reps):
            gc.collect()
            row.load.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
            t0 = time.perf_counter()
            n = 0
            with open_log(log) as fh:
                for line in fh:
                    line.partition(":")[2].partition(" ")
                    n += 1
            row.read_rates.append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            events, s, seconds = import_log_to(log, out, ram=ram)
            row.ram_seconds = time.perf_counter() - t0 - seconds
            row.import_rates.append(s.lines / seconds)
            row.lines, row.events = s.lines, events
            t0 = time.perf_counter()
            trace = load_trace(out)
            row.load_seconds.append(time.perf_counter() - t0)
            res = Replayer(trace, profile="qemu-7.2").run()
            if res.mismatches:
                fail(f"linux-run: {len(res.mismatches)} mismatches, first: {res.mismatches[0]}")
            row.replay_rates.append(res.stats.events / res.stats.seconds)
            row.iotlb = dict(res.stats.log_iotlb)
            sec, evs = _naive_replay(trace, load_ram_image(ram))
            row.naive_rates.append(evs / sec)
            print(f"bench: linux-run pass {k + 1}: import {row.import_rates[-1]:,.0f} lines/s (reading "
                  f"{row.read_rates[-1]:,.0f}), replay {row.replay_rates[-1]:,.0f} events/s (naive "
                  f"{row.naive_rates[-1]:,.0f})", file=sys.stderr)
    row.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def render_linux(row: LinuxRow | None) -> list[str]:
    out = ["## A real Linux run (`vtd-emu import-qemu` + `replay --check --profile qemu-7.2`)", ""]
    w = out.append
    if row is None:
        w(f"Not measured: the capture is not at {LINUX_CAPTURE} (set VTD_EMU_SHARED), or `--quick`.")
        w("")
        return out
    med = statistics.median
    w("| measurement | per pass | vtd-emu | spread | baseline | vtd-emu / baseline |")
    w("| --- | --: | --: | --: | --: | --: |")
    w(f"| import (log lines/s; baseline: reading the lines) | {row.lines:,} lines | {_rate(med(row.import_rates))} | "
      f"{_spread(row.import_rates)} | {_rate(med(row.read_rates))} | {med(row.import_rates) / med(row.read_rates):.2f} |")
    w(f"| replay (events/s; baseline: the naive walk loop) | {row.events:,} events | {_rate(med(row.replay_rates))} | "
      f"{_spread(row.replay_rates)} | {_rate(med(row.naive_rates))} | "
      f"{med(row.replay_rates) / med(row.naive_rates):.2f} |")
    w("")
    w(f"- Targets (issue 11): {LINUX_IMPORT_TARGET:,} lines/s import, {LINUX_REPLAY_TARGET:,} events/s replay. "
      f"1-minute load average at the passes: {', '.join(f'{x:.1f}' for x in row.load)} (on a busy machine "
      "the ratios to the baselines, measured in the same pass, are the figures to compare).")
    w(f"- The capture: `{LINUX_CAPTURE.name}` (Linux 6.1 boot to power-off, strict mode, virtio-blk, NVMe, "
      f"e1000e, interrupt remapping), log `.zst` read directly. IOTLB against the log: {row.iotlb}.")
    w(f"- Import: streamed into JSON Lines; the rate excludes loading the RAM snapshot into the memory model "
      f"({row.ram_seconds:.2f} s, once per import whatever the log's size). Trace load before replay: "
      f"{med(row.load_seconds):.2f} s. Peak RSS of the bench process: {row.peak_mib:,.0f} MiB.")
    w("- Replay: scalar (every DMA expects its IOTLB walk or hit, so none is batched), every expectation "
      "checked, 0 mismatches required. The naive loop applies the memory writes and walks each DMA with a "
      "plain walker (no caches, registers, invalidations or interrupts) and compares with the log.")
    w("")
    return out


# -- report ---------------------------------------------------------------------------------------


def machine_info() -> dict[str, object]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "numpy": np.__version__,
        "cpus": os.cpu_count() or 0,
        "cpus_usable": usable,
        "cpu_model": cpu or "unknown",
        "machine": platform.machine(),
        "os": platform.platform(),
    }


def _rate(v: float) -> str:
    return f"{v:,.0f}"


def _spread(rates: list[float]) -> str:
    med = statistics.median(rates)
    return f"±{(max(rates) - min(rates)) / 2 / med * 100:.0f} %"


def _target(key: str, ratio: float) -> str:
    """Issue 13's target for a row: IOTLB hits ≥ 2× the baseline's walk, cold walks ≥ 0.5×."""
    want = 2.0 if key == "hit" else 0.5
    return f"≥ {want}: {'met' if ratio >= want else 'not met'}"


def render(rows: list[Row], p: Params, quick: bool, info: dict[str, object], date: str, elapsed: float,
           table_pages: dict[str, int],
           batched: "tuple[list[BatchRow], ReplayRow | None] | None" = None,
           api: "list[ApiRow] | None" = None, vmm: "list[VmmRow] | None" = None,
           linux: "LinuxRow | None" = None) -> str:
    out: list[str] = []
    w = out.append
    w("# Benchmarks")
    w("")
    w("Written by `make bench` (`scripts/bench.py`); do not edit by hand — the next run overwrites it."
      + (" **This is a `--quick` smoke run: small tables, few repetitions; do not quote its figures.**"
         if quick else ""))
    w("")
    w(f"- Date: {date}")
    w(f"- Machine: {info['cpu_model']} ({info['machine']}), {info['cpus']} CPUs "
      f"({info['cpus_usable']} usable by this process), {info['os']}")
    w(f"- Python: {info['python']}; numpy {info['numpy']}")
    w(f"- Repetitions: median of {p.reps} timed passes per figure; bench wall time {elapsed:.1f} s")
    w("")
    w("## Scalar translation (`VtdIommu.xlate`)")
    w("")
    w("| measurement | translations per pass | emulator (translations/s) | spread | memoryview baseline "
      "(translations/s) | emulator / baseline | ns per translation (emulator / baseline) | memory reads per "
      "translation (emulator / baseline) | walks per translation | `read_u64` baseline (translations/s) "
      "| emulator / `read_u64` baseline | target |")
    w("| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --- |")
    for r in rows:
        target = _target(r.key, r.ratio)
        w(f"| {r.title} | {r.translations:,} | {_rate(r.emu)} | {_spread(r.emu_rates)} | {_rate(r.mv)} "
          f"| {r.ratio:.2f} | {1e9 / r.emu:,.0f} / {1e9 / r.mv:,.0f} | {r.emu_reads:.1f} / {r.base_reads:.1f} "
          f"| {r.walks_per_xlate:.2f} | {_rate(r.base)} | {r.ratio_hostram:.2f} | {target} |")
    w("")
    if api:
        w("## Public API (`VtdIommu.translate`) against `xlate`")
        w("")
        w("| measurement | translations per pass | `translate()` (translations/s) | `xlate` (translations/s) "
          "| `translate` / `xlate` time | target |")
        w("| --- | --: | --: | --: | --: | --- |")
        for a in api:
            cost = a.cost
            w(f"| {a.title} | {a.translations:,} | {_rate(statistics.median(a.translate_rates))} "
              f"| {_rate(statistics.median(a.xlate_rates))} | {cost:.2f} "
              f"| ≤ 1.5: {'met' if cost <= 1.5 else 'not met'} |")
        w("")
        w("Both calls translate the same addresses in alternating chunks (a global IOTLB invalidation before "
          "each chunk for the cold rows, outside the timed region); `translate` builds the `Translation` "
          "named tuple (page size, permission text, kind) that `xlate` does not.")
        w("")
    w("Reading the figures: absolute rates move with the machine (on the shared 2-CPU VMs this project "
      "runs on they drift by up to 2× between runs); the emulator / baseline ratio, taken from alternating "
      "passes in one run, is the figure to compare across runs. For scale, `../shared/reference/"
      "performance.md` quotes hardware at ≈ 0 ns per IOTLB hit and ≈ 280–320 ns per IOTLB miss + walk.")
    w("")
    w("## Method")
    w("")
    w(f"- Tables: built with `vtd_emu.tables` in a `HostRAM`: {p.pages:,} mapped 4 KiB pages per table, in "
      f"1 MiB regions of {REGION_PAGES} pages at random 2 MiB-aligned addresses over the whole 48-bit "
      "(second stage) or lower-half 47-bit (first stage) space, so upper levels are spread too "
      f"(pages of structures allocated per scenario: {', '.join(f'{k} {v:,}' for k, v in table_pages.items())}). "
      "Nested: the first-stage tables live in guest-physical memory (`GuestPhysView`), the second stage "
      "maps those guest pages and every guest data page with 4 KiB pages.")
    w(f"- Unit: `VtdConfig.preset(\"modern\", iotlb_size={IOTLB_SIZE}, psc_size=0)`, spec profile; translation "
      "enabled the way a driver does it (`enable_translation`). Requests are reads; first-stage and nested "
      f"requests carry a PASID, second-stage ones do not (scalable mode uses RID_PASID 0).")
    w("- Cold walks: each pass translates every mapped page once (a random offset in each page, random order) "
      "after a global IOTLB invalidation, which empties the IOTLB, the paging-structure caches and the "
      "front memo; paging-structure caches are configured off, so every translation is a complete walk "
      "(the bench aborts unless the emulator's walk counter shows exactly one walk per translation). "
      "The context and PASID caches stay warm, as they would in a steady DMA stream; each emulator "
      "translation also pays for filling the IOTLB (FIFO eviction past its size) and the front memo.")
    w(f"- IOTLB hits: the first {HIT_WORKING_SET} addresses of the legacy second-stage scenario, translated "
      "once to warm the caches, then repeated; the bench aborts if any timed hit pass walks.")
    w("- Baseline: the plain-Python reference walker in `scripts/bench.py`, over the same memory and the same "
      "addresses, timed in the same run: root entry → context "
      "entry → (scalable: PASID directory entry → PASID entry) → the page-table levels, one read per "
      "structure — inlined as `q[rows[a >> 12] << 9 | (a >> 3) & 511]` over a `memoryview(...).cast(\"Q\")` "
      "of the HostRAM pool and a plain dict of its page map (the baseline the ratio is taken against), and "
      "through `HostRAM.read_u64` (second column) —, present bits only, no caches, no reserved-bit/permission/width "
      "checks, no A/D updates, unrolled for 4-level tables of 4 KiB leaves. It re-reads the root, context "
      "and PASID structures on every translation, which the emulator serves from its caches: the "
      "'memory reads' column shows both sides' work. Nested: 4 × (4 + 1) + 4 = 24 table reads plus the "
      "root/context/PASID structures.")
    w(f"- Timing: `time.perf_counter` around list comprehensions calling `iommu.xlate(sid, ptag, iova, READ)` "
      f"(emulator) and `walk(sid, ptag, iova, READ)` (baseline), alternating every {CHUNK:,} translations "
      "within each pass so that both sides see the same machine speed; a full garbage collection runs before "
      "each pass and the collector stays enabled during it, as in normal runs. Rates are translations per "
      "second of one pass (each side's chunk times summed); the table shows the median over passes, half "
      "the min–max range of the emulator's rates as the spread, and the median of the per-pass ratios.")
    w("- Correctness: every result of every pass, emulator and baseline, is compared with the address the "
      "builders mapped (so the emulator equals the baseline for every address); any difference, any fault, or any cache state that is not what the row claims "
      "aborts the bench with a message naming the scenario and address, and nothing is written.")
    w("- Memory reads per translation are counted on a separate untimed pass through a counting wrapper.")
    w("")
    if batched is not None:
        out += render_batched(batched[0], batched[1])
    else:
        w("## Batched replay")
        w("")
        w("Not measured in this run (`--no-batched`).")
        w("")
    if vmm is not None:
        out += render_vmm(vmm)
    out += render_linux(linux)
    data = {
        "date": date,
        "quick": quick,
        "machine": info,
        "params": {"pages": p.pages, "reps": p.reps, "hit_translations": p.hit_translations,
                   "iotlb_size": IOTLB_SIZE, "psc_size": 0},
        "rows": [{"key": r.key, "title": r.title, "translations": r.translations, "emulator": r.emu,
                  "baseline": r.mv, "ratio": r.ratio, "ratio_runs": r.ratios, "emulator_runs": r.emu_rates,
                  "baseline_runs": r.mv_rates, "read_u64_baseline_runs": r.base_rates,
                  "ratio_read_u64": r.ratio_hostram,
                  "emulator_reads": r.emu_reads, "baseline_reads": r.base_reads,
                  "walks_per_translation": r.walks_per_xlate} for r in rows],
    }
    if api:
        data["api"] = [{"key": a.key, "translations": a.translations, "translate_runs": a.translate_rates,
                        "xlate_runs": a.xlate_rates} for a in api]
    if batched is not None:
        data["batched"] = [{"key": r.key, "translations": r.translations, "scalar_runs": r.scalar_rates,
                            "batched_cold_runs": r.batched_cold_rates, "batched_warm_runs": r.batched_warm_rates}
                           for r in batched[0]]
        rp = batched[1]
        if rp is not None:
            data["replay"] = {"events": rp.events, "file_bytes": rp.file_bytes, "batched_runs": rp.batched_rates,
                              "scalar_runs": rp.scalar_rates, "load_seconds": rp.load_seconds}
    if vmm is not None:
        data["vmm"] = [{"key": r.key, "unit": r.unit, "coalesced_runs": r.coalesced, "one_per_call_runs": r.one_per_call,
                        "baseline_runs": r.baseline, "counts": r.counts} for r in vmm]
    if linux is not None:
        data["linux_run"] = {"lines": linux.lines, "events": linux.events, "import_runs": linux.import_rates,
                             "read_runs": linux.read_rates, "replay_runs": linux.replay_rates,
                             "naive_runs": linux.naive_rates, "load_seconds": linux.load_seconds,
                             "peak_mib": linux.peak_mib, "iotlb_vs_log": linux.iotlb}
    w(f"<!-- bench-data {json.dumps(data, sort_keys=True)} -->")
    return "\n".join(out) + "\n"


# -- main -----------------------------------------------------------------------------------------


def profile(sc: Scenario, top: int) -> None:
    _flush(sc)
    _run_emu(sc, sc.addrs)  # as the timed passes: caches cold, first-stage A bits already set
    _flush(sc)
    prof = cProfile.Profile()
    prof.enable()
    _run_emu(sc, sc.addrs)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    print(f"cProfile of one cold pass ({len(sc.addrs):,} translations) of {sc.title}:")
    print(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", "-o", type=Path, default=REPO / "BENCHMARKS.md",
                    help="Markdown report to write (overwritten); default BENCHMARKS.md in the repository")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run: small tables, 3 repetitions")
    ap.add_argument("--reps", type=int, help="timed passes per figure (default 5, 3 with --quick)")
    ap.add_argument("--pages", type=int, help=f"mapped pages per table, a multiple of {REGION_PAGES}")
    ap.add_argument("--profile", choices=sorted(BUILDERS), metavar="SCENARIO",
                    help=f"profile one cold emulator pass of a scenario ({', '.join(sorted(BUILDERS))}) "
                         "and print the top functions instead of writing a report")
    ap.add_argument("--no-batched", action="store_true", help="skip the batched-replay figures")
    ap.add_argument("--no-vmm", action="store_true", help="skip the vIOMMU bridge figures")
    ap.add_argument("--only-vmm", action="store_true",
                    help="measure only the vIOMMU bridge figures and print their section (no report written)")
    ap.add_argument("--no-linux-run", action="store_true", help="skip the real Linux run (import and replay)")
    ap.add_argument("--linux-run-only", action="store_true",
                    help="measure only the real Linux run and print its figures (no report written)")
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    if args.reps is not None:
        if args.reps < 1:
            ap.error("--reps must be at least 1")
        p = Params(p.pages, args.reps, p.hit_translations, p.seed)
    if args.pages is not None:
        if args.pages < REGION_PAGES or args.pages % REGION_PAGES:
            ap.error(f"--pages must be a positive multiple of {REGION_PAGES}")
        p = Params(args.pages, p.reps, p.hit_translations, p.seed)

    start = time.perf_counter()
    rng = random.Random(p.seed)
    try:
        if args.profile:
            profile(BUILDERS[args.profile](p, rng), 30)
            return 0
        if args.only_vmm:
            print("\n".join(render_vmm(measure_vmm(args.quick, p.reps))))
            return 0
        if args.linux_run_only:
            only = measure_linux_run(args.reps or 3)
            if only is None:
                print(f"bench: no capture at {LINUX_CAPTURE}", file=sys.stderr)
                return 1
            print("\n".join(render_linux(only)))
            return 0
        log = sys.stderr
        scenarios: dict[str, Scenario] = {}
        for key, build in BUILDERS.items():
            t0 = time.perf_counter()
            scenarios[key] = build(p, rng)
            print(f"bench: built {key}: {p.pages:,} pages in {time.perf_counter() - t0:.1f} s", file=log)
        rows = []
        t0 = time.perf_counter()
        rows.append(measure_hits(scenarios["ss-legacy"], p))
        print(f"bench: hit: {time.perf_counter() - t0:.1f} s", file=log)
        for key in ("fs", "ss-sm", "ss-legacy", "nested"):
            t0 = time.perf_counter()
            rows.append(measure_cold(scenarios[key], p.reps))
            print(f"bench: {key}: {time.perf_counter() - t0:.1f} s", file=log)
        t0 = time.perf_counter()
        api = measure_apis(scenarios, p)
        print(f"bench: translate(): {time.perf_counter() - t0:.1f} s", file=log)
        batched = None
        if not args.no_batched:
            t0 = time.perf_counter()
            n = BATCH_DMAS // 10 if args.quick else BATCH_DMAS
            breps = 1 if args.quick else min(p.reps, 3)
            brows = [measure_batched_translation(layout, n, breps, rng) for layout in ("compact", "scattered")]
            batched = (brows, measure_replay(n, breps, rng))
            print(f"bench: batched replay: {time.perf_counter() - t0:.1f} s", file=log)
        vmm = None
        if not args.no_vmm:
            t0 = time.perf_counter()
            vmm = measure_vmm(args.quick, 1 if args.quick else min(p.reps, 3))
            print(f"bench: vmm: {time.perf_counter() - t0:.1f} s", file=log)
        linux = None
        if not args.quick and not args.no_linux_run:
            t0 = time.perf_counter()
            linux = measure_linux_run(min(p.reps, 3))
            print(f"bench: linux-run: {time.perf_counter() - t0:.1f} s", file=log)
    except BenchError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    info = machine_info()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = render(rows, p, args.quick, info, date, time.perf_counter() - start,
                  {k: s.table_pages for k, s in scenarios.items()}, batched, api, vmm, linux)
    args.output.write_text(text, encoding="utf-8")
    for r in rows:
        print(f"{r.key:10s} emulator {_rate(r.emu):>12s}/s  memoryview baseline {_rate(r.mv):>12s}/s  ratio "
              f"{r.ratio:.2f}  (read_u64 baseline {_rate(r.base)}/s, ratio {r.ratio_hostram:.2f})")
    for a in api:
        print(f"{a.key:20s} translate/xlate time {a.cost:.2f}")
    if batched is not None:
        for b in batched[0]:
            print(f"batched {b.key:9s} scalar {_rate(statistics.median(b.scalar_rates)):>12s}/s  batched cold "
                  f"{_rate(statistics.median(b.batched_cold_rates)):>12s}/s  warm "
                  f"{_rate(statistics.median(b.batched_warm_rates)):>12s}/s")
        if batched[1] is not None:
            print(f"replay   {_rate(statistics.median(batched[1].batched_rates)):>12s} events/s (batched), "
                  f"{_rate(statistics.median(batched[1].scalar_rates)):>12s} events/s (scalar)")
    if linux is not None:
        print(f"linux-run import {_rate(statistics.median(linux.import_rates)):>12s} lines/s, replay "
              f"{_rate(statistics.median(linux.replay_rates)):>12s} events/s")
    print(f"bench: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
