"""Tests of vtd_emu.tables (and the guest-physical view of vtd_emu.memory) against an independent page-table walker written here with plain bit
arithmetic (it deliberately shares nothing with the builders or the chip)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtd_emu.tables import (
    NX,
    PGTT_NESTED,
    PGTT_SS,
    AllocatorExhausted,
    FirstStageTable,
    LegacyRootTable,
    Mapping,
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
from vtd_emu.memory import NO_MEMORY, GuestPhysView, HostRAM
from vtd_emu.spec import specs
from vtd_emu.spec.consts import FR
from vtd_emu.vtd.iommu import Fault, Translation, VtdIommu

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
ADDR_51_12 = 0x000F_FFFF_FFFF_F000
U64 = (1 << 64) - 1

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- independent reference walkers -------------------------------------------------------------------


def ss_walk(mem, root: int, levels: int, iova: int):
    """(hpa, page size, effective R/W/X) or None when not present.  Also checks entry hygiene."""
    if iova >> (12 + 9 * levels):
        return None
    table, perms = root, R | W | X
    for lvl in range(levels, 0, -1):
        shift = 12 + 9 * (lvl - 1)
        e = mem.read_u64(table + 8 * ((iova >> shift) & 511))
        if e & 3 == 0:  # present = R|W
            return None
        perms &= e & 7
        leaf = lvl == 1 or (lvl in (2, 3) and e & 0x80)
        if not leaf:
            # A table entry holds only R/W/X and the address: no PS, no reserved bits 11 and 62.
            assert e & ~(ADDR_51_12 | 7) == 0, f"stray bits in level-{lvl} table entry {e:#x}"
            table = e & ADDR_51_12
            continue
        size = 1 << shift
        # Leaves hold R/W/X, PS (large only) and the page frame; page-frame bits below the page are 0.
        assert e & ~(ADDR_51_12 | 0x87) == 0, f"stray bits in leaf {e:#x}"
        assert e & (size - 1) & ADDR_51_12 == 0, f"reserved low address bits in leaf {e:#x}"
        return ((e & ADDR_51_12) | (iova & (size - 1)), size, perms)
    raise AssertionError("unreachable")


def fs_walk(mem, root: int, levels: int, va: int, *, leaf_bits: list | None = None):
    """(addr, page size, W/U/NX) or None when not present or non-canonical."""
    width = 12 + 9 * levels
    top = va >> (width - 1)
    if top not in (0, (1 << (65 - width)) - 1):
        return None
    writable = user = True
    nx = False
    table = root
    for lvl in range(levels, 0, -1):
        shift = 12 + 9 * (lvl - 1)
        e = mem.read_u64(table + 8 * ((va >> shift) & 511))
        if not e & 1:
            return None
        writable &= bool(e & 2)
        user &= bool(e & 4)
        nx |= bool(e >> 63)
        if lvl >= 4:
            assert not e & 0x80, "PS is reserved in PML4E/PML5E"
        leaf = lvl == 1 or (lvl in (2, 3) and e & 0x80)
        if not leaf:
            assert e & ~(ADDR_51_12 | 7 | 1 << 63) == 0, f"stray bits in level-{lvl} table entry {e:#x}"
            table = e & ADDR_51_12
            continue
        size = 1 << shift
        if leaf_bits is not None:
            leaf_bits.append(e)
        assert e & (size - 1) & ADDR_51_12 == 0, f"reserved low address bits in leaf {e:#x}"
        perms = (W if writable else 0) | (U if user else 0) | (NX if nx else 0)
        return ((e & ADDR_51_12) | (va & (size - 1)), size, perms)
    raise AssertionError("unreachable")


def canon(lin: int, width: int) -> int:
    return lin | (U64 ^ ((1 << width) - 1)) if lin >> (width - 1) & 1 else lin


# -- expected model, computed by the test from the requests ------------------------------------------


@dataclass(frozen=True)
class Leaf:
    lin: int  # linear (table-indexed) address
    addr: int
    size: int
    perms: int


def add_leaves(model: dict[int, Leaf], lin: int, addr: int, size: int, page: int, perms: int) -> None:
    """Builder semantics: each new leaf replaces every leaf it overlaps (the whole old leaf)."""
    for off in range(0, size, page):
        a = lin + off
        for k in [k for k, lf in model.items() if lf.lin < a + page and a < lf.lin + lf.size]:
            del model[k]
        model[a] = Leaf(a, addr + off, page, perms)


def expect(model: dict[int, Leaf], lin: int):
    for lf in model.values():
        if lf.lin <= lin < lf.lin + lf.size:
            return (lf.addr + lin - lf.lin, lf.size, lf.perms)
    return None


def probes_for(model: dict[int, Leaf], extra: list[int], width: int) -> list[int]:
    out = set(extra)
    for lf in model.values():
        for a in (lf.lin - 1, lf.lin, lf.lin + lf.size // 2 + 8, lf.lin + lf.size - 1, lf.lin + lf.size):
            if 0 <= a < 1 << width:
                out.add(a)
    return sorted(out)


# -- strategies --------------------------------------------------------------------------------------


@st.composite
def requests(draw, width: int, max_page: int, perms_st, *, overlapping: bool):
    """A list of (linear address, output address, size, page size, perms) map requests."""
    anchors = draw(st.lists(st.integers(0, (1 << width) // G1 - 1), min_size=1, max_size=3))
    n = draw(st.integers(1, 8))
    out: list[tuple[int, int, int, int, int]] = []
    taken: list[tuple[int, int]] = []
    for _ in range(n):
        page = draw(st.sampled_from([p for p in (K4, M2, G1) if p <= max_page]))
        count = draw(st.integers(1, 3))
        size = page * count
        if draw(st.booleans()):
            # Near an anchor: requests share tables and (with 600 slots) cross table boundaries.
            lin = draw(st.sampled_from(anchors)) * G1 + draw(st.integers(0, 600 if page < G1 else 3)) * page
        else:
            lin = draw(st.integers(0, (1 << width) // page - 1)) * page
        if lin + size > 1 << width:
            continue
        if not overlapping:
            if any(lin < hi and lo < lin + size for lo, hi in taken):
                continue
            taken.append((lin, lin + size))
        addr = draw(st.integers(0, (1 << 52) // page - count)) * page
        out.append((lin, addr, size, page, draw(perms_st)))
    return out


SS_PERMS = st.sampled_from([R, W, R | W, R | X, W | X, R | W | X])
FS_PERMS = st.sampled_from([0, W, U, NX, W | U, W | NX, U | NX, W | U | NX])


def ss_level_cases():
    return st.sampled_from([2, 3, 4, 5]).flatmap(
        lambda lv: st.tuples(
            st.just(lv),
            requests(12 + 9 * lv, min(G1, 1 << (12 + 9 * (lv - 1))), SS_PERMS, overlapping=False),
            st.lists(st.integers(0, (1 << (12 + 9 * lv)) - 1), max_size=10),
            st.randoms(use_true_random=False),
        )
    )


def fs_level_cases(overlapping: bool = False):
    return st.sampled_from([4, 5]).flatmap(
        lambda lv: st.tuples(
            st.just(lv),
            requests(12 + 9 * lv, G1, FS_PERMS, overlapping=overlapping),
            st.lists(st.integers(0, U64), max_size=10),
            st.randoms(use_true_random=False),
        )
    )


# -- second stage ------------------------------------------------------------------------------------


def check_ss(ram: HostRAM, ss: SecondStageTable, model: dict[int, Leaf], probes: list[int]) -> None:
    for a in probes_for(model, probes, ss.width):
        want = expect(model, a)
        assert ss.lookup(a) == want, hex(a)
        assert ss_walk(ram, ss.root, ss.levels, a) == want, hex(a)
    assert {m.iova for m in ss.mappings.values()} == set(model)
    assert all(isinstance(m, Mapping) and m.size == model[k].size for k, m in ss.mappings.items())


@SETTINGS
@given(ss_level_cases())
def test_ss_map_unmap_protect_match_walk(case) -> None:
    levels, reqs, probes, rnd = case
    ram = HostRAM()
    ss = SecondStageTable(ram, PageAllocator(ram), levels=levels)
    assert ss.aw == levels - 2
    model: dict[int, Leaf] = {}
    for lin, addr, size, page, perms in reqs:
        ss.map(lin, addr, size, perms, page_size=page)
        add_leaves(model, lin, addr, size, page, perms)
    check_ss(ram, ss, model, probes)

    # Unmap a random subset of the requests (whole requests: never a partial large leaf).
    gone = [r for r in reqs if rnd.random() < 0.4]
    for lin, _addr, size, _page, _perms in gone:
        ss.unmap(lin, size)
        for k in [k for k in model if lin <= k < lin + size]:
            del model[k]
    check_ss(ram, ss, model, probes)
    for lin, _addr, size, _page, _perms in gone:
        assert ss_walk(ram, ss.root, levels, lin) is None

    # Protect another subset; the walk must see the new permissions.
    for lin, _addr, size, _page, _perms in reqs:
        if lin in model and rnd.random() < 0.5:
            new = rnd.choice([R, W, R | W, R | X, R | W | X])
            ss.protect(lin, size, new)
            for k in [k for k in model if lin <= k < lin + size]:
                model[k] = Leaf(k, model[k].addr, model[k].size, new)
    check_ss(ram, ss, model, probes)


@SETTINGS
@given(
    st.sampled_from([3, 4, 5]).flatmap(
        lambda lv: st.tuples(
            st.just(lv), requests(12 + 9 * lv, G1, SS_PERMS, overlapping=True),
            st.lists(st.integers(0, 1 << 39), max_size=10),
        )
    )
)
def test_ss_overwrites_replace_whole_leaves_and_subtrees(case) -> None:
    levels, reqs, probes = case
    ram = HostRAM()
    ss = SecondStageTable(ram, PageAllocator(ram), levels=levels)
    model: dict[int, Leaf] = {}
    for lin, addr, size, page, perms in reqs:
        ss.map(lin, addr, size, perms, page_size=page)
        add_leaves(model, lin, addr, size, page, perms)
    check_ss(ram, ss, model, [p for p in probes if p < 1 << ss.width])


def test_ss_large_leaf_and_table_replace_each_other() -> None:
    ram = HostRAM()
    ss = SecondStageTable(ram, PageAllocator(ram), levels=4)
    ss.map(0x4020_0000, 0x9000_0000, M2, R, page_size=M2)
    ss.map(0x4020_3000, 0x1234_5000, K4, R | W)  # a table replaces the 2M leaf: nothing else survives
    assert ss.lookup(0x4020_0000) is None
    assert ss_walk(ram, ss.root, 4, 0x4020_0000) is None
    assert ss_walk(ram, ss.root, 4, 0x4020_3010) == (0x1234_5010, K4, R | W)
    ss.map(0x4000_0000, 0x8000_0000, G1, R | W | X, page_size=G1)  # a 1G leaf replaces the subtree
    assert list(ss.mappings) == [0x4000_0000]
    assert ss_walk(ram, ss.root, 4, 0x4020_3010) == (0x8020_3010, G1, R | W | X)
    assert ss.entry_addr(0x4020_3010, 1) is None and ss.entry_addr(0x4020_3010, 2) is None


def test_ss_unmap_partial_large_leaf_is_an_error_and_changes_nothing() -> None:
    ram = HostRAM()
    ss = SecondStageTable(ram, PageAllocator(ram), levels=3)
    ss.map(0, 0x10_0000, 2 * K4)
    ss.map(M2, 0x4000_0000, M2, page_size=M2)
    with pytest.raises(ValueError):
        ss.unmap(0, M2 + K4)  # ends inside the 2M leaf
    assert ss_walk(ram, ss.root, 3, 0) == (0x10_0000, K4, R | W)
    with pytest.raises(ValueError):
        ss.protect(0, 3 * K4, R)  # the third page is a hole
    assert ss_walk(ram, ss.root, 3, 0)[2] == R | W
    ss.unmap(0, 2 * M2)  # holes are fine for unmap
    assert ss.mappings == {} and ss_walk(ram, ss.root, 3, M2 + 5) is None


def test_ss_protect_keeps_other_leaf_bits() -> None:
    ram = HostRAM()
    ss = SecondStageTable(ram, PageAllocator(ram), levels=4)
    snp_d = specs().structure("ss_pte").field("SNP").mask | specs().structure("ss_pte").field("D").mask
    ss.map(0x5000, 0x7000, K4, R | W, extra_leaf_bits=snp_d)
    addr = ss.entry_addr(0x5000, 1)
    assert ram.read_u64(addr) == 0x7000 | R | W | snp_d
    ss.protect(0x5000, K4, R | X)
    assert ram.read_u64(addr) == 0x7000 | R | X | snp_d
    assert ss.lookup(0x5abc) == (0x7abc, K4, R | X)


def test_ss_entry_addr_and_set_entry_bits_follow_the_walk() -> None:
    ram = HostRAM()
    ss = SecondStageTable(ram, PageAllocator(ram), levels=4)
    iova = 0x12_3456_7000
    ss.map(iova, 0xabc000, K4, R | W, table_perms=R | W)
    table = ss.root
    for lvl in range(4, 0, -1):
        a = table + 8 * ((iova >> (12 + 9 * (lvl - 1))) & 511)
        assert ss.entry_addr(iova, lvl) == a
        e = ram.read_u64(a)
        if lvl > 1:
            assert e & 7 == R | W  # table_perms
        table = e & ADDR_51_12
    before = ss.lookup(iova)
    a = ss.set_entry_bits(iova, 2, set_bits=1 << 62, clear_bits=W)
    assert a == ss.entry_addr(iova, 2)
    assert ram.read_u64(a) & (1 << 62 | W) == 1 << 62
    assert ss.lookup(iova) == before  # a raw poke is not part of the reference model
    assert ss.entry_addr(0x99_0000_0000, 1) is None
    with pytest.raises(ValueError):
        ss.set_entry_bits(0x99_0000_0000, 1, set_bits=1)


@pytest.mark.parametrize(
    "call",
    [
        lambda ss: ss.map(0x1000, 0x2000, 0x1800),  # size not a page multiple
        lambda ss: ss.map(0x1800, 0x2000, K4),  # misaligned iova
        lambda ss: ss.map(M2, M2 + K4, M2, page_size=M2),  # misaligned addr
        lambda ss: ss.map(0, 0, K4, page_size=0x8000),  # unsupported page size
        lambda ss: ss.map(1 << 39, 0, K4),  # beyond a 3-level table
        lambda ss: ss.map(0, 1 << 52, K4),  # beyond the address field
        lambda ss: ss.map(0, 0, K4, perms=8),  # not an SS permission
    ],
)
def test_ss_map_rejects_bad_requests(call) -> None:
    ram = HostRAM()
    ss = SecondStageTable(ram, PageAllocator(ram), levels=3)
    with pytest.raises(ValueError):
        call(ss)
    assert ss.mappings == {}


def test_ss_levels_bounds() -> None:
    ram = HostRAM()
    for bad in (1, 6):
        with pytest.raises(ValueError):
            SecondStageTable(ram, PageAllocator(ram), levels=bad)
    ss2 = SecondStageTable(ram, PageAllocator(ram, base=0x4000_0000), levels=2)
    with pytest.raises(ValueError):
        ss2.map(0, 0, G1, page_size=G1)  # no 1G leaf in a 2-level table
    ss2.map(M2, 0x20_0000, M2, page_size=M2)
    assert ss_walk(ram, ss2.root, 2, M2 + 0x1234) == (0x20_1234, M2, R | W)


# -- first stage -------------------------------------------------------------------------------------


def check_fs(mem, fs: FirstStageTable, model: dict[int, Leaf], probes: list[int]) -> None:
    width = fs.width
    for lin in probes_for(model, [], width):
        va = canon(lin, width)
        want = expect(model, lin)
        assert fs.lookup(va) == want, hex(va)
        assert fs_walk(mem, fs.root, fs.levels, va) == want, hex(va)
    for va in probes:
        top = va >> (width - 1)
        want = expect(model, va & ((1 << width) - 1)) if top in (0, (1 << (65 - width)) - 1) else None
        assert fs.lookup(va) == want, hex(va)
        assert fs_walk(mem, fs.root, fs.levels, va) == want, hex(va)
    assert set(fs.mappings) == {canon(k, width) for k in model}


@SETTINGS
@given(fs_level_cases())
def test_fs_map_unmap_protect_match_walk(case) -> None:
    levels, reqs, probes, rnd = case
    ram = HostRAM()
    fs = FirstStageTable(ram, PageAllocator(ram), levels=levels)
    assert fs.fspm == levels - 4
    width = fs.width
    model: dict[int, Leaf] = {}
    for lin, addr, size, page, perms in reqs:
        va = canon(lin, width)
        if canon(lin + size - 1, width) - va != size - 1:  # crosses the canonical hole
            with pytest.raises(ValueError):
                fs.map(va, addr, size, perms, page_size=page)
            continue
        fs.map(va, addr, size, perms | R, page_size=page)  # R is accepted and ignored
        add_leaves(model, lin, addr, size, page, perms)
    check_fs(ram, fs, model, probes)

    for lin, _addr, size, _page, _perms in reqs:
        if lin in model and rnd.random() < 0.4:
            fs.unmap(canon(lin, width), size)
            for k in [k for k in model if lin <= k < lin + size]:
                del model[k]
            assert fs_walk(ram, fs.root, levels, canon(lin, width)) is None
    check_fs(ram, fs, model, probes)

    for lin, _addr, size, _page, _perms in reqs:
        if lin in model and rnd.random() < 0.5:
            new = rnd.choice([0, W, U, W | U, W | U | NX])
            fs.protect(canon(lin, width), size, new)
            for k in [k for k in model if lin <= k < lin + size]:
                model[k] = Leaf(k, model[k].addr, model[k].size, new)
    check_fs(ram, fs, model, probes)


@SETTINGS
@given(fs_level_cases(overlapping=True))
def test_fs_overwrites_replace_whole_leaves_and_subtrees(case) -> None:
    levels, reqs, probes, _rnd = case
    ram = HostRAM()
    fs = FirstStageTable(ram, PageAllocator(ram), levels=levels)
    model: dict[int, Leaf] = {}
    for lin, addr, size, page, perms in reqs:
        va = canon(lin, fs.width)
        if canon(lin + size - 1, fs.width) - va == size - 1:
            fs.map(va, addr, size, perms, page_size=page)
            add_leaves(model, lin, addr, size, page, perms)
    check_fs(ram, fs, model, probes)


def test_fs_upper_half_canonical_and_flags() -> None:
    ram = HostRAM()
    fs = FirstStageTable(ram, PageAllocator(ram), levels=4)
    va = 0xFFFF_8000_0000_0000
    fs.map(va, 0x20_0000, M2, W, page_size=M2, accessed=True, dirty=True)
    leaf: list[int] = []
    assert fs_walk(ram, fs.root, 4, va + 0x1234, leaf_bits=leaf) == (0x20_1234, M2, W)
    # P | RW | A | D | PS, no US, no XD: the upper half is indexed by va bits 47:0 (PML4 index 256).
    assert leaf == [0x20_0000 | 1 | 2 | 0x20 | 0x40 | 0x80]
    assert ram.read_u64(fs.root + 8 * 256) & 1
    assert list(fs.mappings) == [va]
    for bad in (0x0000_8000_0000_0000, 0xFFFF_0000_0000_0000, 1 << 64):
        with pytest.raises(ValueError):
            fs.map(bad, 0, K4)
        assert fs.lookup(bad) is None
    with pytest.raises(ValueError):
        fs.map(0x7FFF_FFFF_F000, 0, 2 * K4)  # runs into the non-canonical hole
    with pytest.raises(ValueError):
        fs.map(0, 0, K4, perms=X)  # X is a second-stage flag
    fs5 = FirstStageTable(ram, PageAllocator(ram, base=0x1000_0000), levels=5)
    fs5.map(0x0000_8000_0000_0000, 0x5000, K4, W | U | NX)  # canonical with 57 bits
    assert fs_walk(ram, fs5.root, 5, 0x0000_8000_0000_0123) == (0x5123, K4, W | U | NX)


def test_fs_table_perms_and_extra_bits() -> None:
    ram = HostRAM()
    fs = FirstStageTable(ram, PageAllocator(ram), levels=4)
    g = specs().structure("fs_pte").field("G").mask
    fs.map(0x40_0000, 0x9000, K4, W | U, extra_leaf_bits=g, table_perms=W)
    leaf: list[int] = []
    assert fs_walk(ram, fs.root, 4, 0x40_0000, leaf_bits=leaf) == (0x9000, K4, W)  # tables lack US
    assert leaf == [0x9000 | 1 | 2 | 4 | g]
    fs.protect(0x40_0000, K4, U)
    assert ram.read_u64(fs.entry_addr(0x40_0000, 1)) == 0x9000 | 1 | 4 | g


# -- nested: first-stage tables in guest-physical memory ---------------------------------------------


def test_guest_phys_view_places_fs_tables_where_ss_maps_them() -> None:
    ram = HostRAM()
    halloc = PageAllocator(ram)
    ss = SecondStageTable(ram, halloc, levels=4)
    gpa_base = 0x8000_0000
    # Scatter the guest pages holding FS tables over host memory, one 4K page each, out of order.
    hosts = [0x7_0000_0000 + k * 0x3000 for k in (5, 1, 7, 3, 0, 2, 6, 4)]
    for i, hpa in enumerate(hosts):
        ss.map(gpa_base + i * K4, hpa, K4, R | W)
        ram.write(hpa, b"\xff" * K4)  # dirty: the allocator must zero-fill through the view
    ss.map(0, 0x1_0000_0000, 4 * M2, R | W, page_size=M2)  # guest RAM that FS leaves point at
    gview = GuestPhysView(ram, ss)
    fs = FirstStageTable(gview, PageAllocator(gview, base=gpa_base, limit=gpa_base + len(hosts) * K4))
    fs.map(0x7F00_0000_0000, 0x3000, 2 * K4, W | U)
    fs.map(0xFFFF_FFFF_C000_0000, 0x20_0000, M2, W, page_size=M2)

    assert gpa_base <= fs.root < gpa_base + len(hosts) * K4  # table pointers are GPAs
    assert gview.hpa(fs.root) == hosts[0]

    class Nested:
        """Reads GPAs through the test's own SS walker."""

        def read_u64(self, gpa: int) -> int:
            hit = ss_walk(ram, ss.root, 4, gpa)
            assert hit is not None, hex(gpa)
            return ram.read_u64(hit[0])

    for va in (0x7F00_0000_0000, 0x7F00_0000_1FFF, 0xFFFF_FFFF_C001_2345, 0x7F00_0000_2000, 0x1000):
        assert fs_walk(Nested(), fs.root, 4, va) == fs.lookup(va)
    assert fs.lookup(0xFFFF_FFFF_C001_2345) == (0x21_2345, M2, W)
    # The FS root in host memory holds exactly the two PML4 entries the maps need; the rest was zeroed.
    top = [ram.read_u64(hosts[0] + 8 * i) for i in range(512)]
    assert [i for i, e in enumerate(top) if e] == [0xFE, 0x1FF]
    # Six guest pages were used (root, 3 tables for the 4K pages, 2 for the 2M page), all zero-filled:
    # only the entries the two maps wrote are non-zero.
    used = (fs.alloc.next - gpa_base) // K4
    assert used == 6
    nonzero = sum(1 for h in hosts[:used] for i in range(512) if ram.read_u64(h + 8 * i))
    assert nonzero == 2 + 2 + 2 + 2
    assert all(ram.read_u64(h) == U64 for h in hosts[used:])  # untouched pages stay dirty
    assert gview.read_u64(0x7000_0000) == NO_MEMORY  # unmapped GPA: not memory, like HostRAM past its end
    with pytest.raises(ValueError):
        # ... but a builder told to put a table there is a setup error.
        FirstStageTable(gview, PageAllocator(gview, base=0x7000_0000))
    with pytest.raises(AllocatorExhausted):
        fs.map(0x100_0000_0000, 0, K4)  # a new PML4 slot needs 3 tables; 2 guest pages are left


def test_guest_phys_view_unaligned_access_crosses_pages() -> None:
    ram = HostRAM()
    ss = SecondStageTable(ram, PageAllocator(ram), levels=3)
    ss.map(0x1000, 0x90_0000, K4)
    ss.map(0x2000, 0x50_0000, K4)
    gview = GuestPhysView(ram, ss)
    gview.write_u64(0x1FFC, 0x1122_3344_5566_7788)
    assert ram.read(0x90_0FFC, 4) == bytes.fromhex("88776655")
    assert ram.read(0x50_0000, 4) == bytes.fromhex("44332211")
    assert gview.read_u64(0x1FFC) == 0x1122_3344_5566_7788
    assert gview.read(0x1FFE, 4) == ram.read(0x90_0FFE, 2) + ram.read(0x50_0000, 2)
    assert gview.is_ram(0x1000) and not gview.is_ram(0x3000)


def test_guest_phys_view_reads_unmapped_gpas_as_non_memory() -> None:
    ram = HostRAM()
    ss = SecondStageTable(ram, PageAllocator(ram), levels=3)
    ss.map(0x1000, 0x90_0000, K4)
    ram.write(0x90_0000, b"\x11" * K4)
    gview = GuestPhysView(ram, ss)
    assert gview.hpa(0x1234) == 0x90_0234 and gview.hpa(0x2000) is None
    assert gview.read_u64(0x2000) == NO_MEMORY == ram.read_u64(1 << 64)
    # A u64 straddling a mapped and an unmapped page is unreadable as a whole, as HostRAM's last u64 is.
    assert gview.read_u64(0x1FFC) == NO_MEMORY
    # Bytes: the unmapped part reads as zeros, as HostRAM reads bytes that are not memory.
    assert gview.read(0x1FFE, 4) == b"\x11\x11\x00\x00"
    assert gview.read(0x5000, 3) == bytes(3)
    # Writes: dropped where nothing is mapped; only the bytes that landed are counted.
    assert gview.write_u64(0x2000, 5) is False
    assert gview.write_u64(0x1FFC, 5) is False and ram.read(0x90_0FFC, 4) == b"\x11" * 4
    assert gview.write(0x1FFE, b"abcd") == 2 and ram.read(0x90_0FFE, 2) == b"ab"
    assert gview.write(0x7000, b"zz") == 0
    assert ram.pages_used == len(set(ram.pages()))  # nothing was written anywhere else
    assert not gview.is_ram(0x2000)


def test_guest_phys_view_backs_a_viommu() -> None:
    """A VT-d unit over guest memory (a vIOMMU) meets an unmapped GPA as the architectural read error."""
    ram = HostRAM()
    host_alloc = PageAllocator(ram, base=0x100_0000)
    gpa_map = SecondStageTable(ram, host_alloc, levels=4)  # the VMM's GPA -> HPA mapping of guest RAM
    gpa_map.map(0, 0x4000_0000, 2 * M2, R | W, page_size=M2)  # guest RAM: GPA [0, 4 MiB)
    guest = GuestPhysView(ram, gpa_map)
    galloc = PageAllocator(guest, base=0x10_0000, limit=0x20_0000)
    gss = SecondStageTable(guest, galloc, levels=3)  # the guest's own IOMMU page table, in guest RAM
    gss.map(0x8000, 0x30_0000, K4, R | W)
    gss.map(0x9000, 0x80_0000, K4, R | W)  # a GPA outside guest RAM
    root = LegacyRootTable(guest, galloc)
    root.set_context(0, 0x08, slptptr=gss.root, aw=gss.aw, did=1)
    # Bus 1's root entry points at a context table beyond guest RAM: the guest's own mistake.
    guest.write_u64(root.root_entry_addr(1), 0x90_0000 | 1)
    viommu = VtdIommu(guest, "qemu-7.2-aw48")
    enable_translation(viommu, root.root)

    guest.write(0x30_0010, b"guest data")
    tr = viommu.translate(0x0008, 0x8010)
    assert isinstance(tr, Translation) and (tr.addr, tr.page_size) == (0x30_0010, K4)
    assert viommu.dma_read(0x0008, 0x8010, 10).data == b"guest data"
    assert ram.read(0x4030_0010, 10) == b"guest data"  # where the GPA really lives
    # The leaf maps a GPA nothing backs: the DMA reads zeros and its write goes nowhere, no exception.
    out = viommu.dma_write(0x0008, 0x9000, b"lost")
    assert out.faults == () and guest.read(0x9000, 4) == bytes(4)
    assert viommu.dma_read(0x0008, 0x9000, 4).data == bytes(4)
    # Reading the context entry from an unmapped GPA is a context-table read error, recorded.
    f = viommu.translate(0x0100, 0x1000)
    assert isinstance(f, Fault) and f.reason == FR.CONTEXT_TABLE_INV and f.recorded


# -- allocator ---------------------------------------------------------------------------------------


def test_page_allocator_alignment_zeroing_and_exhaustion() -> None:
    ram = HostRAM(size=0x20_0000)
    ram.write(0x10_2000, b"\xaa" * 64)
    alloc = PageAllocator(ram, base=0x10_0000)
    assert alloc.alloc() == 0x10_0000
    assert alloc.next == 0x10_1000
    a = alloc.alloc(2, align=0x4000)
    assert a == 0x10_4000 and alloc.next == 0x10_6000
    ram.write(0x10_6008, b"\x55")
    b = alloc.alloc()
    assert b == 0x10_6000 and ram.read(b, K4) == bytes(K4)
    c = alloc.alloc(pages=1, align=0x2000)
    assert c == 0x10_8000
    with pytest.raises(ValueError):
        alloc.alloc(align=0x1800)
    with pytest.raises(ValueError):  # limit defaults to the memory size
        alloc.alloc(pages=0x100)
    assert alloc.next == 0x10_9000  # a failed alloc takes nothing
    with pytest.raises(ValueError):
        PageAllocator(ram, base=0x1234)


# -- root, context and PASID structures --------------------------------------------------------------


def decode(mem: HostRAM, addr: int, layout_name: str) -> dict[str, int]:
    lay = specs().structure(layout_name)
    return lay.decode(int.from_bytes(mem.read(addr, lay.size_bits // 8), "little"))


@SETTINGS
@given(
    bus=st.integers(0, 255),
    devfn=st.integers(0, 255),
    slpt=st.integers(0, (1 << 40) - 1),
    aw=st.integers(0, 7),
    did=st.integers(0, 0xFFFF),
    tt=st.integers(0, 3),
    fpd=st.booleans(),
    present=st.booleans(),
)
def test_legacy_context_entry_decodes_to_arguments(bus, devfn, slpt, aw, did, tt, fpd, present) -> None:
    ram = HostRAM()
    rt = LegacyRootTable(ram, PageAllocator(ram))
    addr = rt.set_context(bus, devfn, slptptr=slpt << 12, aw=aw, did=did, tt=tt, fpd=fpd, present=present)
    root = decode(ram, rt.root + 16 * bus, "legacy_root_entry")
    assert root["P"] == 1
    assert addr == (root["CTP"] << 12) + 16 * devfn == rt.context_entry_addr(bus, devfn)
    assert rt.root_entry_addr(bus) == rt.root + 16 * bus
    ctx = decode(ram, addr, "legacy_context_entry")
    assert ctx == {"P": int(present), "FPD": int(fpd), "TT": tt, "SLPTPTR": slpt, "AW": aw, "DID": did}
    # The same bus reuses its context table; a neighbour entry is independent.
    other = rt.set_context(bus, devfn ^ 1, did=7)
    assert other == addr ^ 16
    assert decode(ram, addr, "legacy_context_entry")["DID"] == did
    rt.clear_context(bus, devfn)
    assert ram.read(addr, 16) == bytes(16)
    rt.set_root_present(bus, False)
    assert decode(ram, rt.root + 16 * bus, "legacy_root_entry") == {"P": 0, "CTP": root["CTP"]}


def test_legacy_context_extra_bits_and_validation() -> None:
    ram = HostRAM()
    rt = LegacyRootTable(ram, PageAllocator(ram))
    addr = rt.set_context(3, 0x10, slptptr=0x5000, extra=1 << 100)  # a reserved bit, for fault tests
    assert int.from_bytes(ram.read(addr, 16), "little") >> 100 & 1
    with pytest.raises(ValueError):
        rt.set_context(3, 0x10, slptptr=0x5800)
    with pytest.raises(ValueError):
        rt.set_context(256, 0)
    with pytest.raises(ValueError):
        rt.set_context(0, 0, did=1 << 16)
    assert rt.context_entry_addr(4, 0) is None
    rt.set_root_present(4, True)  # root present, pointing at an empty context table
    assert decode(ram, rt.root_entry_addr(4), "legacy_root_entry")["P"] == 1
    assert ram.read(rt.context_entry_addr(4, 0), 16) == bytes(16)


@SETTINGS
@given(
    bus=st.integers(0, 255),
    devfns=st.lists(st.integers(0, 255), min_size=1, max_size=4, unique=True),
    pdir=st.integers(1, (1 << 40) - 1),
    pdts=st.integers(0, 7),
    rid_pasid=st.integers(0, (1 << 20) - 1),
    flags=st.tuples(*[st.booleans()] * 5),
)
def test_scalable_context_entry_decodes_to_arguments(bus, devfns, pdir, pdts, rid_pasid, flags) -> None:
    ram = HostRAM()
    rt = ScalableRootTable(ram, PageAllocator(ram))
    paside, pre, dte, fpd, present = flags
    addrs = {}
    for devfn in devfns:
        addrs[devfn] = rt.set_context(
            bus, devfn, pasid_dir=pdir << 12, pdts=pdts, rid_pasid=rid_pasid ^ devfn,
            paside=paside, pre=pre, dte=dte, fpd=fpd, present=present,
        )
    root = decode(ram, rt.root_entry_addr(bus), "sm_root_entry")
    lower = [d for d in devfns if d < 128]
    upper = [d for d in devfns if d >= 128]
    assert root["LP"] == int(bool(lower)) and root["UP"] == int(bool(upper))
    assert (root["LCTP"] != 0) == bool(lower) and (root["UCTP"] != 0) == bool(upper)
    for devfn in devfns:
        ctp = root["UCTP"] if devfn >= 128 else root["LCTP"]
        assert addrs[devfn] == (ctp << 12) + 32 * (devfn & 0x7F) == rt.context_entry_addr(bus, devfn)
        assert decode(ram, addrs[devfn], "sm_context_entry") == {
            "P": int(present), "FPD": int(fpd), "DTE": int(dte), "PASIDE": int(paside), "PRE": int(pre),
            "PDTS": pdts, "PASIDDIRPTR": pdir, "RID_PASID": rid_pasid ^ devfn, "RID_PRIV": 0,
        }
    for devfn in devfns:
        rt.clear_context(bus, devfn)
        assert ram.read(addrs[devfn], 32) == bytes(32)


def test_scalable_root_halves_are_independent() -> None:
    ram = HostRAM()
    rt = ScalableRootTable(ram, PageAllocator(ram))
    lo = rt.set_context(7, 0x7F, pasid_dir=0x8000)
    hi = rt.set_context(7, 0x80, pasid_dir=0x9000)
    assert lo >> 12 != hi >> 12 and hi & 0xFFF == 0 and lo & 0xFFF == 0x7F * 32
    rt.set_root_present(7, False, upper=True)
    root = decode(ram, rt.root_entry_addr(7), "sm_root_entry")
    assert root["LP"] == 1 and root["UP"] == 0 and root["UCTP"] << 12 == hi
    assert root["LCTP"] << 12 == lo & ~0xFFF
    assert rt.context_entry_addr(8, 0x80) is None


@SETTINGS
@given(
    pasid=st.integers(0, (1 << 20) - 1),
    dir_log=st.integers(7, 14),
    pgtt=st.integers(0, 7),
    did=st.integers(0, 0xFFFF),
    sspt=st.integers(0, (1 << 40) - 1),
    fspt=st.integers(0, (1 << 40) - 1),
    aw=st.integers(0, 7),
    fspm=st.integers(0, 3),
    flags=st.tuples(*[st.booleans()] * 11),
)
def test_pasid_entry_decodes_to_arguments(pasid, dir_log, pgtt, did, sspt, fspt, aw, fspm, flags) -> None:
    ram = HostRAM()
    pt = PasidTables(ram, PageAllocator(ram), dir_entries=1 << dir_log)
    assert pt.pdts == dir_log - 7
    sre, wpe, eafe, ssade, ssee, ere, nxe, fpd, present, dir_fpd, pwsnp = flags
    if pasid >> 6 >= 1 << dir_log:
        with pytest.raises(ValueError):
            pt.set_entry(pasid, pgtt=pgtt, did=did)
        return
    addr = pt.set_entry(
        pasid, pgtt=pgtt, did=did, ssptptr=sspt << 12, aw=aw, fsptptr=fspt << 12, fspm=fspm, sre=sre,
        wpe=wpe, eafe=eafe, ssade=ssade, ssee=ssee, ere=ere, nxe=nxe, fpd=fpd, present=present,
        dir_fpd=dir_fpd, extra={"PWSNP": int(pwsnp), "PAT": 0x0607_0406},
    )
    d = decode(ram, pt.dir + 8 * (pasid >> 6), "pasid_dir_entry")
    assert pt.dir_entry_addr(pasid) == pt.dir + 8 * (pasid >> 6)
    assert d["P"] == 1 and d["FPD"] == int(dir_fpd)
    assert addr == (d["SMPTBLPTR"] << 12) + 64 * (pasid & 63) == pt.entry_addr(pasid)
    want = {name: 0 for name in decode(ram, addr, "pasid_entry")}
    want.update(
        P=int(present), FPD=int(fpd), AW=aw, SSEE=int(ssee), PGTT=pgtt, SSADE=int(ssade), SSPTPTR=sspt,
        DID=did, PWSNP=int(pwsnp), PAT=0x0607_0406, SRE=int(sre), ERE=int(ere), FSPM=fspm, WPE=int(wpe),
        NXE=int(nxe), EAFE=int(eafe), FSPTPTR=fspt,
    )
    assert decode(ram, addr, "pasid_entry") == want
    # A PASID in the same 64-entry block shares the table; clear_entry zeroes only its entry.
    buddy = pt.set_entry(pasid ^ 1, pgtt=PGTT_SS, did=1)
    assert buddy == addr ^ 64
    pt.clear_entry(pasid)
    assert ram.read(addr, 64) == bytes(64) and ram.read(buddy, 64) != bytes(64)


def test_pasid_directory_sizes() -> None:
    ram = HostRAM()
    alloc = PageAllocator(ram)
    big = PasidTables(ram, alloc, dir_entries=1 << 14)  # 128 KiB directory
    small = PasidTables(ram, alloc)
    assert big.pdts == 7 and small.pdts == 0
    assert small.dir >= big.dir + (1 << 17)  # the directory got all its pages
    for bad in (64, 200, 1 << 15):
        with pytest.raises(ValueError):
            PasidTables(ram, alloc, dir_entries=bad)
    assert small.entry_addr(5) is None
    with pytest.raises(ValueError):
        small.set_entry(128 * 64, pgtt=PGTT_NESTED, did=1)


# -- enable_translation ------------------------------------------------------------------------------


class FakeIommu:
    """GCMD/GSTS per the fact sheet: persistent bits mirror, one-shot bits set their status bit."""

    def __init__(self, gsts: int = 0) -> None:
        self.gsts = gsts
        self.writes: list[tuple[int, int, int]] = []

    def mmio_write(self, offset: int, value: int, size: int) -> None:
        self.writes.append((offset, value, size))
        if offset == 0x18:
            persistent = 0x96FF_FFFF & 0xFF80_0000
            self.gsts = (self.gsts & ~persistent) | (value & persistent)
            if value & 1 << 30:
                self.gsts |= 1 << 30

    def mmio_read(self, offset: int, size: int) -> int:
        assert (offset, size) == (0x1C, 4)
        return self.gsts


@pytest.mark.parametrize("scalable", [False, True])
def test_enable_translation_programs_like_a_driver(scalable: bool) -> None:
    iommu = FakeIommu(gsts=1 << 26)  # queued invalidation already on: must stay on
    enable_translation(iommu, 0x12_3000, scalable=scalable)
    assert iommu.writes == [
        (0x20, 0x12_3000 | (1 << 10 if scalable else 0), 8),
        (0x18, 1 << 26 | 1 << 30, 4),
        (0x18, 1 << 26 | 1 << 31, 4),  # RTPS (one-shot) is not written back
    ]
    with pytest.raises(ValueError):
        enable_translation(FakeIommu(), 0x12_3800)
