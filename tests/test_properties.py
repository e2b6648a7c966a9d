"""Hypothesis properties: random builder-made tables translate exactly as the builders' own reference
models (``lookup()``) say.

* second stage, legacy (3/4/5 levels) and scalable SS-only (3/4/5 levels);
* first stage, 4 and 5 levels, lower and upper canonical halves;
* nested (FS 4/5 levels in guest memory over SS 3/4/5 levels);

with mixed 4 KiB / 2 MiB / 1 GiB leaves, overlapping remaps, unmaps and permission changes, for mapped
and unmapped addresses, reads, writes and AtomicOps (expected fault reason when denied).  Nested output
never leaves the second stage's mapped ranges.  Invalidation: after random edits every translation
that was cached is served stale until an IOTLB invalidation, and fresh afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    enable_translation,
)
from vtd_emu.memory import GuestPhysView, HostRAM
from vtd_emu.vtd.iommu import Fault, Translation, VtdIommu

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
HPA_BASE = 1 << 40  # outputs: far from the page tables and the interrupt window
SID = 0x0310
DID = 5
PASID = 0x99
RID_PASID = 0x7
ACCESSES = ("r", "w", "rw")

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_AnyTable = SecondStageTable | FirstStageTable
Expected = int | tuple[int, int]  # a fault reason, or (output address, page size)


@dataclass(frozen=True)
class Op:
    kind: str
    region: int
    page: int
    off: int
    count: int
    perms: int
    slot: int
    pick: int


def ops(perm_choices: list[int], max_size: int = 10) -> st.SearchStrategy[list[Op]]:
    op = st.builds(
        Op,
        kind=st.sampled_from(["map", "map", "map", "unmap", "protect"]),
        region=st.integers(0, 15),
        page=st.sampled_from([K4, K4, M2, G1]),
        off=st.integers(0, 7),
        count=st.integers(1, 3),
        perms=st.sampled_from(perm_choices),
        slot=st.integers(0, 63),
        pick=st.integers(0, 1 << 16),
    )
    return st.lists(op, min_size=1, max_size=max_size)


SS_PERMS = [R, W, R | W, R | W, 0]
FS_PERMS = [U, W | U, W | U, W | U | NX, W, 0]


def apply(table: _AnyTable, op_list: list[Op], regions: list[int], out: Callable[[Op], int],
          keep_below: int = 0) -> None:
    """Apply mapping operations; whole leaves are unmapped/re-protected, so the builder never refuses.
    Leaves below ``keep_below`` (nested: the guest's own FS tables) are never picked."""
    for op in op_list:
        if op.kind == "map":
            base = regions[op.region % len(regions)]
            if op.page == G1:
                iova, count = base, 1
            elif op.page == M2:
                iova, count = base + (op.off % 4) * M2, op.count
            else:
                iova, count = base + (op.off % 2) * M2 + (op.off // 2) * K4, op.count
            table.map(iova, out(op), count * op.page, op.perms, page_size=op.page)
        else:
            leaves = sorted((m for m in table.mappings.values() if m.iova >= keep_below), key=lambda m: m.iova)
            if not leaves:
                continue
            m = leaves[op.pick % len(leaves)]
            if op.kind == "unmap":
                table.unmap(m.iova, m.size)
            else:
                table.protect(m.iova, m.size, op.perms)


def hpa_out(op: Op) -> int:
    return HPA_BASE + op.slot * op.page


def ss_regions(levels: int) -> list[int]:
    w = 12 + 9 * levels
    return [0, G1, 5 * G1, 1 << (w - 1), (1 << w) - G1]


def fs_regions(levels: int) -> list[int]:
    w = 12 + 9 * levels
    upper = (1 << 64) - (1 << (w - 1))  # lowest canonical upper-half address
    return [0, G1, 7 * G1, upper, (1 << 64) - G1]


# -- expectations from the reference models ----------------------------------------------------------


def expect_ss(hit: tuple[int, int, int] | None, access: str, read_code: int, write_code: int) -> Expected:
    perms = hit[2] if hit is not None else 0
    if "w" in access and not perms & W:
        return write_code
    if "r" in access and not perms & R:
        return read_code
    assert hit is not None
    return hit[0], hit[1]


def expect_fs(hit: tuple[int, int, int] | None, access: str) -> Expected:
    if hit is None:
        return 0x71
    if not hit[2] & U:
        return 0x81
    if "w" in access and not hit[2] & W:
        return 0x85
    return hit[0], hit[1]


def result(res: Translation | Fault) -> Expected:
    if isinstance(res, Fault):
        return res.reason
    return res.addr, res.page_size


def probes(data: st.DataObject, table: _AnyTable, regions: list[int], n_random: int = 6) -> list[int]:
    """Addresses inside every mapped leaf (at a random offset) and random ones near the regions."""
    addrs = []
    for m in sorted(table.mappings.values(), key=lambda m: m.iova):
        addrs.append(m.iova + data.draw(st.integers(0, m.size - 1), label="offset"))
    for _ in range(n_random):
        base = data.draw(st.sampled_from(regions), label="region")
        addrs.append(base + data.draw(st.integers(0, 4 * M2 - 1), label="near"))
    return addrs


# -- environments -------------------------------------------------------------------------------------


def legacy_env(levels: int) -> tuple[VtdIommu, SecondStageTable]:
    ram = HostRAM()
    alloc = PageAllocator(ram)
    ss = SecondStageTable(ram, alloc, levels)
    rt = LegacyRootTable(ram, alloc)
    rt.set_context(SID >> 8, SID & 0xFF, slptptr=ss.root, aw=ss.aw, did=DID)
    io = VtdIommu(ram, "modern")
    enable_translation(io, rt.root)
    return io, ss


def scalable_env(pgtt: int, *, ss_levels: int = 4, fs_levels: int = 4,
                 table_gpa: int = 0x7F00_0000) -> tuple[VtdIommu, SecondStageTable, FirstStageTable | None]:
    ram = HostRAM()
    alloc = PageAllocator(ram)
    ss = SecondStageTable(ram, alloc, ss_levels)
    fs: FirstStageTable | None = None
    if pgtt == PGTT_NESTED:
        host = alloc.alloc(256)
        ss.map(table_gpa, host, 256 * K4, R | W)
        gview = GuestPhysView(ram, ss)
        fs = FirstStageTable(gview, PageAllocator(gview, base=table_gpa, limit=table_gpa + 256 * K4), fs_levels)
    elif pgtt == PGTT_FS:
        fs = FirstStageTable(ram, alloc, fs_levels)
    pt = PasidTables(ram, alloc)
    for p in (PASID, RID_PASID):
        pt.set_entry(p, pgtt=pgtt, did=DID, ssptptr=ss.root, aw=ss.aw,
                     fsptptr=fs.root if fs else 0, fspm=fs.fspm if fs else 0)
    rt = ScalableRootTable(ram, alloc)
    rt.set_context(SID >> 8, SID & 0xFF, pasid_dir=pt.dir, pdts=pt.pdts, rid_pasid=RID_PASID)
    io = VtdIommu(ram, "modern")
    enable_translation(io, rt.root, scalable=True)
    return io, ss, fs


# -- properties ---------------------------------------------------------------------------------------


@SETTINGS
@given(levels=st.sampled_from([3, 4, 5]), op_list=ops(SS_PERMS), data=st.data())
def test_legacy_second_stage_matches_model(levels: int, op_list: list[Op], data: st.DataObject) -> None:
    io, ss = legacy_env(levels)
    regions = ss_regions(levels)
    apply(ss, op_list, regions, hpa_out)
    for iova in probes(data, ss, regions):
        for access in ACCESSES:
            want = expect_ss(ss.lookup(iova), access, 0x06, 0x05)
            assert result(io.translate(SID, iova, access)) == want, (hex(iova), access)
    beyond = 1 << (12 + 9 * levels)
    assert result(io.translate(SID, beyond + 0x1000)) == 0x04


@SETTINGS
@given(levels=st.sampled_from([3, 4, 5]), op_list=ops(SS_PERMS), with_pasid=st.booleans(), data=st.data())
def test_scalable_second_stage_matches_model(levels: int, op_list: list[Op], with_pasid: bool,
                                             data: st.DataObject) -> None:
    io, ss, _ = scalable_env(PGTT_SS, ss_levels=levels)
    regions = ss_regions(levels)
    apply(ss, op_list, regions, hpa_out)
    pasid = PASID if with_pasid else None
    for iova in probes(data, ss, regions):
        for access in ACCESSES:
            want = expect_ss(ss.lookup(iova), access, 0x79, 0x79)
            assert result(io.translate(SID, iova, access, pasid=pasid)) == want, (hex(iova), access)
    beyond = 1 << (12 + 9 * levels)
    assert result(io.translate(SID, beyond, pasid=pasid)) == (0x84 if levels < 5 else 0x83)


@SETTINGS
@given(levels=st.sampled_from([4, 5]), op_list=ops(FS_PERMS), data=st.data())
def test_first_stage_matches_model(levels: int, op_list: list[Op], data: st.DataObject) -> None:
    io, _, fs = scalable_env(PGTT_FS, fs_levels=levels)
    assert fs is not None
    regions = fs_regions(levels)
    apply(fs, op_list, regions, hpa_out)
    for va in probes(data, fs, regions):
        for access in ACCESSES:
            want = expect_fs(fs.lookup(va), access)
            assert result(io.translate(SID, va, access, pasid=PASID)) == want, (hex(va), access)
    w = 12 + 9 * levels
    assert result(io.translate(SID, 1 << (w - 1), pasid=PASID)) == 0x80  # non-canonical


def nested_out(gpa_regions: list[int], ss: SecondStageTable) -> Callable[[Op], int]:
    """First-stage outputs (GPAs): mostly inside something the second stage maps, else anywhere in the
    GPA regions (often unmapped)."""
    def out(op: Op) -> int:
        leaves = sorted((m for m in ss.mappings.values() if m.iova >= gpa_regions[0]), key=lambda m: m.iova)
        if leaves and op.slot % 4:
            return leaves[op.pick % len(leaves)].iova & ~(op.page - 1)
        base = gpa_regions[op.slot % len(gpa_regions)]
        return base + ((op.slot // len(gpa_regions)) % 4) * op.page
    return out


@SETTINGS
@given(fs_levels=st.sampled_from([4, 5]), ss_levels=st.sampled_from([3, 4, 5]), ss_ops=ops(SS_PERMS),
       fs_ops=ops(FS_PERMS), data=st.data())
def test_nested_matches_models_and_isolates(fs_levels: int, ss_levels: int, ss_ops: list[Op],
                                            fs_ops: list[Op], data: st.DataObject) -> None:
    io, ss, fs = scalable_env(PGTT_NESTED, ss_levels=ss_levels, fs_levels=fs_levels)
    assert fs is not None
    gpa_regions = [4 * G1, 5 * G1, 6 * G1, 7 * G1]
    apply(ss, ss_ops, gpa_regions, hpa_out, keep_below=gpa_regions[0])
    apply(fs, fs_ops, fs_regions(fs_levels), nested_out(gpa_regions, ss))
    ss_ranges = [(m.addr, m.addr + m.size) for m in ss.mappings.values()]
    for va in probes(data, fs, fs_regions(fs_levels)):
        for access in ACCESSES:
            hit = fs.lookup(va)
            want = expect_fs(hit, access)
            if not isinstance(want, int):
                gpa, fs_size = want
                ss_hit = ss.lookup(gpa)
                want = expect_ss(ss_hit, access, 0x79, 0x79)
                if not isinstance(want, int):
                    want = (want[0], min(fs_size, want[1]))
            res = io.translate(SID, va, access, pasid=PASID)
            assert result(res) == want, (hex(va), access)
            if isinstance(res, Translation):
                # isolation: whatever the first stage says, the output is memory the SS maps
                assert any(lo <= res.addr < hi for lo, hi in ss_ranges)


# -- invalidation property ----------------------------------------------------------------------------


@SETTINGS
@given(kind=st.sampled_from(["legacy-ss", "scalable-ss", "fs"]), levels=st.sampled_from([3, 4, 5]),
       first=ops(SS_PERMS), edits=ops(SS_PERMS, max_size=6), fs_first=ops(FS_PERMS),
       fs_edits=ops(FS_PERMS, max_size=6), inv=st.sampled_from(["global", "domain", "page"]), data=st.data())
def test_cached_translations_stay_stale_until_invalidated(kind: str, levels: int, first: list[Op], edits: list[Op],
                                                          fs_first: list[Op], fs_edits: list[Op], inv: str,
                                                          data: st.DataObject) -> None:
    pasid: int | None = None
    table: _AnyTable
    if kind == "legacy-ss":
        io, table = legacy_env(levels)
        regions = ss_regions(levels)
        expect = lambda a, acc: expect_ss(table.lookup(a), acc, 0x06, 0x05)  # noqa: E731
        first_ops, edit_ops = first, edits
    elif kind == "scalable-ss":
        io, table, _ = scalable_env(PGTT_SS, ss_levels=levels)
        regions = ss_regions(levels)
        pasid = PASID
        expect = lambda a, acc: expect_ss(table.lookup(a), acc, 0x79, 0x79)  # noqa: E731
        first_ops, edit_ops = first, edits
    else:
        fs_levels = 4 if levels < 5 else 5
        io, _, fs = scalable_env(PGTT_FS, fs_levels=fs_levels)
        assert fs is not None
        table = fs
        regions = fs_regions(fs_levels)
        pasid = PASID
        expect = lambda a, acc: expect_fs(table.lookup(a), acc)  # noqa: E731
        first_ops, edit_ops = fs_first, fs_edits
    apply(table, first_ops, regions, hpa_out)
    addrs = probes(data, table, regions, n_random=3)
    before = {}
    for a in addrs:
        got = result(io.translate(SID, a, "r", pasid=pasid))
        assert got == expect(a, "r")
        before[a] = got
    apply(table, edit_ops, regions, lambda op: hpa_out(op) + (1 << 45))  # every edit changes outputs
    for a in addrs:
        if not isinstance(before[a], int):
            assert result(io.translate(SID, a, "r", pasid=pasid)) == before[a], f"{a:#x} must be stale"
    if inv == "global":
        io.invalidate_iotlb(1)
    elif inv == "domain":
        io.invalidate_iotlb(2, DID)
    else:
        # page-selective covering every probe: one AM-sized window per address
        for a in addrs:
            io.invalidate_iotlb(3, DID, a & ~(G1 - 1), 18)
    for a in addrs:
        for access in ACCESSES:
            assert result(io.translate(SID, a, access, pasid=pasid)) == expect(a, access), (hex(a), access)
