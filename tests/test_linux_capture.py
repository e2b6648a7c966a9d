"""Walkers proven on tables nobody here wrote: a real Linux guest's page tables (first-stage format =
IA-32e) and the second-stage tables its intel-iommu driver built, captured under QEMU."""

from __future__ import annotations

import json

import pytest

from conftest import shared_dir
from vtd_emu import HostRAM, VtdConfig, VtdIommu
from vtd_emu.vtd.dump import leaves, merge
from vtd_emu.vtd.walk import Geometry

CAP = shared_dir() / "linux-capture" / "legacy-io"
pytestmark = pytest.mark.skipif(not (CAP / "ram.bin.zst").exists(), reason="linux-capture not available")
zstandard = pytest.importorskip("zstandard")


@pytest.fixture(scope="module")
def ram() -> HostRAM:
    from vtd_emu.ramimage import load_ram_image

    return load_ram_image(CAP / "ram.bin.zst", size=256 << 20)


def _tlb() -> list[dict]:
    data = zstandard.ZstdDecompressor().stream_reader((CAP / "cpu0" / "tlb.jsonl.zst").open("rb")).read()
    return [json.loads(line) for line in data.decode().splitlines()]


def _first_stage_unit(cr3: int) -> tuple[HostRAM, VtdIommu]:
    """A unit whose PASID 1 of device 00:02.0 translates through the guest's CPU page tables (PGTT=FS,
    FSPTPTR = CR3): the DMA walker then walks exactly the tables QEMU's ``info tlb`` walked."""
    from vtd_emu.tables import PGTT_FS, PageAllocator, PasidTables, ScalableRootTable, enable_translation
    from vtd_emu.ramimage import load_ram_image

    ram = load_ram_image(CAP / "ram.bin.zst")
    io = VtdIommu(ram, "modern")
    alloc = PageAllocator(ram, base=0x4000_0000)
    pasids = PasidTables(ram, alloc)
    pasids.set_entry(1, pgtt=PGTT_FS, did=1, fsptptr=cr3, sre=True, ere=True, nxe=True)
    root = ScalableRootTable(ram, alloc)
    root.set_context(0, 0x10, pasid_dir=pasids.dir, pdts=pasids.pdts)
    enable_translation(io, root.root, scalable=True)
    return ram, io


def test_first_stage_walk_reproduces_qemu_info_tlb(ram: HostRAM) -> None:
    """The DMA walker (``translate``/``xlate``/``dma_read``) against every leaf of QEMU's own walk of the
    guest's page tables; the dumper (``leaves``) must list the same leaves."""
    from vtd_emu.vtd.access import PRIV, READ

    cpu = json.loads((CAP / "cpu.json").read_text())["cpus"][0]
    cr3 = int(cpu["CR3"], 16) & ~0xFFF
    tlb = _tlb()
    theirs = sorted((int(t["va"], 16), int(t["pa"], 16), t["size"]) for t in tlb)
    assert len(theirs) == cpu["tlb_entries"]
    # The chip's DMA path, leaf by leaf: address, page size and the permissions QEMU printed.
    fs_ram, io = _first_stage_unit(cr3)
    for t in tlb:
        va, pa, size = int(t["va"], 16), int(t["pa"], 16), t["size"]
        off = 0x358 % size
        priv = not t["us"]
        tr = io.translate(0x10, va + off, "r", pasid=1, priv=priv)
        if 0xFEE0_0000 <= pa < 0xFEF0_0000:
            assert not tr and tr.reason == 0x87, t    # the local-APIC mapping: never a DMA target
            continue
        assert tr and (tr.addr, tr.page_size) == (pa + off, size), (t, tr)
        # the hot path answers the same from the front memo, and a DMA reads the bytes QEMU's walk names
        assert io.xlate(0x10, 1, va + off, READ | (PRIV if priv else 0)) == pa + off
        assert io.dma_read(0x10, va + off, 16, pasid=1, priv=priv).data == fs_ram.read(pa + off, 16)
        user_w = io.translate(0x10, va + off, "w", pasid=1)
        if t["us"] and t["rw"]:
            assert user_w and user_w.addr == pa + off, (t, user_w)
        else:
            assert not user_w and user_w.reason in (0x81, 0x85), (t, user_w)   # U/S clear, or read-only
        # execute follows XD as QEMU printed it (the PASID entry has ERE=1 and NXE=1)
        exe = io.translate(0x10, va + off, "r", pasid=1, priv=priv, exe=True)
        if t["nx"]:
            assert not exe and exe.reason == 0x82, (t, exe)
        else:
            assert exe and exe.addr == pa + off, (t, exe)
    # The dumper lists exactly the same leaves, with the leaf entries' own bits as QEMU printed them.
    geo = Geometry.compile("fs", frozenset(), 52, (True, True))
    lv = leaves(ram, cr3, 4, "fs", geo)
    ours = [(int(v), int(p), int(s)) for v, p, s in zip(lv.va, lv.pa, lv.size)]
    assert ours == theirs
    by_va = {int(t["va"], 16): t for t in tlb}
    for va, e in zip(lv.va.tolist(), lv.entry.tolist()):
        t = by_va[va]
        assert bool(e >> 63) == t["nx"] and bool(e & 2) == t["rw"] and bool(e & 4) == t["us"]
        assert bool(e & 0x20) == t["a"] and bool(e & 0x40) == t["d"] and bool(e & 0x100) == t["g"]
    assert not lv.rsvd.any()
    # merged ranges cover exactly the leaves
    ranges = merge(lv)
    assert sum(r.length for r in ranges) == int(lv.size.sum())
    assert len(ranges) < len(lv)


def test_espfix_alias_is_one_page_mapped_65536_times(ram: HostRAM) -> None:
    cpu = json.loads((CAP / "cpu.json").read_text())["cpus"][0]
    lv = leaves(ram, int(cpu["CR3"], 16) & ~0xFFF, 4, "fs", Geometry.compile("fs", frozenset(), 52, (True, True)))
    pas, counts = __import__("numpy").unique(lv.pa, return_counts=True)
    assert counts.max() >= 65536


def test_second_stage_walk_reaches_the_leaves_qemu_used(ram: HostRAM) -> None:
    guest = json.loads((CAP / "guest.json").read_text())
    d = guest["iommu"]["dmar0"]
    cfg = VtdConfig(cap=int(d["cap"], 16), ecap=int(d["ecap"], 16)).validated()
    io = VtdIommu(ram, cfg)
    io.mmio_write(0x20, 0x247B000, 8)
    io.mmio_write(0x18, 1 << 30)
    io.mmio_write(0x18, 1 << 31)
    rows = [json.loads(line) for line in (CAP / "iommu-translations.jsonl").read_text().splitlines()]
    assert len(rows) > 500
    for row in rows:
        sid, iova = int(row["sid"], 16), int(row["iova_page"], 16)
        rep = io.walk(sid, iova, "r")
        leaf = [s for s in rep.steps if s[0] == "ss"][-1]
        assert leaf[3] == int(row["slpte"], 16), row
        assert hex(leaf[2]) in [hex(int(a, 16)) for a in row["slpte_at_gpa"]], row
        slpte = int(row["slpte"], 16)
        assert rep.result.addr == (slpte & 0x7F_FFFF_F000) | (iova & 0xFFF)
        # the cached path agrees with the inspection walk
        tr = io.translate(sid, iova, "r")
        assert tr.addr == rep.result.addr
    assert io.fault_records() == []


def test_chip_first_stage_translation_agrees_with_qemu() -> None:
    """The chip's own PGTT=first-stage path, with FSPTPTR = the guest's CR3, over a sample of leaves."""
    import random

    from vtd_emu.tables import PGTT_FS, PageAllocator, PasidTables, ScalableRootTable, enable_translation
    from vtd_emu.ramimage import load_ram_image

    ram = load_ram_image(CAP / "ram.bin.zst")
    cpu = json.loads((CAP / "cpu.json").read_text())["cpus"][0]
    io = VtdIommu(ram, "modern")
    alloc = PageAllocator(ram, base=0x4000_0000)
    pasids = PasidTables(ram, alloc)
    pasids.set_entry(1, pgtt=PGTT_FS, did=1, fsptptr=int(cpu["CR3"], 16) & ~0xFFF, sre=True)
    root = ScalableRootTable(ram, alloc)
    root.set_context(0, 0x10, pasid_dir=pasids.dir, pdts=pasids.pdts)
    enable_translation(io, root.root, scalable=True)
    tlb = _tlb()
    random.seed(7)
    sample = [t for t in tlb if not t["va"].startswith("0xfffffe")] + random.sample(tlb, 500)
    for t in sample:
        va = int(t["va"], 16) + 0x123 % t["size"]
        user = t["us"]
        tr = io.translate(0x10, va, "r", pasid=1, priv=not user)
        if 0xFEE0_0000 <= int(t["pa"], 16) < 0xFEF0_0000:
            # the kernel's local-APIC mapping: DMA may never reach the interrupt range
            assert not tr and tr.reason == 0x87
            continue
        assert tr, (t, tr)
        assert tr.addr == int(t["pa"], 16) + 0x123 % t["size"]
        assert tr.page_size == t["size"]
    # a kernel-only page refuses a user request with the spec's U/S fault
    kernel = next(t for t in tlb if not t["us"])
    f = io.translate(0x10, int(kernel["va"], 16), "r", pasid=1)
    assert not f and f.reason == 0x81
