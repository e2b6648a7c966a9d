#!/usr/bin/env python3
"""Sweeps against live QEMU 7.2 (issue 12): generators of ``vtd-oracle-scenario/1`` scenarios, and their
recording into the corpus ``tests/data/qemu-sweeps/<family>.jsonl`` that ``tests/test_qemu_sweeps.py``
replays without QEMU.

Families (every generator is deterministic: string seeds, no clock):

* ``fidelity``: one reproducer per behaviour issue 12 found wrong (RTADDR.TTM, scalable root entry
  reserved bits, ``x-buggy-eim``, ``dma-translation=off``, page-selective invalidation inside a 2 MiB
  entry, wrongly sized register writes);
* ``registers``: every register offset of the map of each QEMU-matching preset (and a few outside it),
  one scenario per (preset, offset): access sizes 1, 2, 4 and 8, each with walking ones, all ones, zero and
  two random values, every write read back at its size (and the rest of the register file in ``final``);
* ``options``: every ``-device intel-iommu,help`` property of QEMU 7.2 alone (each value) and every pair of
  non-default values, with the register file at reset and a short DMA + queued-invalidation scenario;
* ``structures``: for each in-memory structure a valid setup, then each bit flipped alone (written, the
  caches invalidated, a DMA read, the fault record read and cleared, the bit restored, the bytes read
  written back), and each bit of each invalidation descriptor type (queued with a wait descriptor).
* ``irte`` (not a scenario family; ``tests/data/qemu-irte/irte.jsonl``, ``tests/test_qemu_irte_sweep.py``):
  each bit of a valid IRTE flipped alone, in xAPIC and x2APIC mode, and an MSI that device A raises through
  each entry; QEMU's answer is the message delivered (its ``vtd_ir_remap_msi`` trace), FSTS and FRCD0.

    python scripts/qemu_sweeps.py --family registers    # record into tests/data/qemu-sweeps/registers.jsonl.gz
    python scripts/qemu_sweeps.py --family options --list       # ids only, no QEMU

QEMU aborts on some inputs (assertions on wrongly sized accesses): the recorder marks that step
``qemu_crashed`` and the scenario ends there, as in ``shared/qemu-oracle``.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
# The qtest driver and the scenario RAM are a test tool (tests/qemu_harness.py), imported under the
# module name the test suite uses.
sys.path.insert(0, str(REPO / "tests"))

from qemu_harness import FORMAT, QemuMachine, QemuRunner, ScenarioMMIO, ScenarioRAM  # noqa: E402
from vtd_emu.spec.consts import FRCD, GCMD, IRTA  # noqa: E402
from vtd_emu.spec.loader import specs  # noqa: E402
from vtd_emu.tables import (PAGE_2M, PAGE_4K, PGTT_SS, LegacyRootTable, PageAllocator, PasidTables, R,  # noqa: E402
                            ScalableRootTable, SecondStageTable, W, enable_translation, gcmd_set)
from vtd_emu.vtd.config import qemu72_config  # noqa: E402
from vtd_emu.vtd.qi import T_WAIT, make_descriptor  # noqa: E402

DATA_DIR = REPO / "tests" / "data" / "qemu-sweeps"

PRESETS: dict[str, dict[str, Any]] = {
    "default": {}, "aw48": {"aw_bits": 48}, "scalable": {"scalable_mode": True},
    "scalable-pasid": {"scalable_mode": True, "pasid": True},
}
"""QEMU options matching the presets ``qemu-7.2-default``, ``-aw48``, ``-scalable``, ``-scalable-pasid``."""

SID = {"A": 0x10, "B": 0x11, "C": 0x80, "D": 0x500}
DEVFN = {"A": 0x10, "B": 0x11, "C": 0x80, "D": 0x00}
TABLE_BASE, TABLE_LIMIT = 0x10_0000, 0x40_0000
DATA_PAGE = 0x50_0000
QUEUE, STATUS = 0x48_0000, 0x48_8000

_OFF = {n: specs().registers[n].resolve_offset(0, 0) for n in
        ("GCMD", "GSTS", "RTADDR", "CCMD", "FSTS", "FECTL", "IQH", "IQT", "IQA", "IRTA")}
GCMD_OFF, GSTS_OFF, RTADDR_OFF, CCMD_OFF, FSTS_OFF = (_OFF[n] for n in ("GCMD", "GSTS", "RTADDR", "CCMD", "FSTS"))
IQT_OFF, IQA_OFF, IRTA_OFF = _OFF["IQT"], _OFF["IQA"], _OFF["IRTA"]
# QEMU 7.2 places them so: CAP.FRO = 0x22 (one FRCD), ECAP.IRO = 0xf.
FRCD0_HI_DW, IVA_OFF, IOTLB_OFF = 0x22C, 0xF0, 0xF8
OUTSIDE = (0x230, 0x234, 0x400, 0xFFC)
"""Offsets outside QEMU's register map that the register sweep also probes."""


class Scn:
    """One scenario under construction: builders write guest RAM through ``ram`` (each write a step),
    register programming through ``mmio``."""

    def __init__(self, sid: str, family: str, description: str, iommu: dict[str, Any]) -> None:
        self.id = sid
        self.family = family
        self.description = description
        self.iommu = iommu
        self.steps: list[dict[str, Any]] = []
        self.ram = ScenarioRAM(self.steps)
        self.mmio = ScenarioMMIO(self.steps)
        self.alloc = PageAllocator(self.ram, base=TABLE_BASE, limit=TABLE_LIMIT)

    def w(self, off: int, value: int, size: int, note: str | None = None) -> None:
        st: dict[str, Any] = {"op": "mmio_write", "off": hex(off), "size": size, "value": hex(value)}
        if note:
            st["note"] = note
        self.steps.append(st)

    def r(self, off: int, size: int) -> None:
        self.steps.append({"op": "mmio_read", "off": hex(off), "size": size})

    def qw(self, gpa: int, *qwords: int) -> None:
        self.steps.append({"op": "mem_write", "gpa": hex(gpa), "qwords": [hex(q) for q in qwords]})

    def dma_write(self, dev: str, iova: int, data: bytes, note: str | None = None) -> None:
        st: dict[str, Any] = {"op": "dma", "sid": hex(SID[dev]), "dir": "write", "iova": hex(iova),
                              "len": len(data), "data": data.hex()}
        if note:
            st["note"] = note
        self.steps.append(st)

    def dma_read(self, dev: str, iova: int, n: int) -> None:
        self.steps.append({"op": "dma", "sid": hex(SID[dev]), "dir": "read", "iova": hex(iova), "len": n})

    def clear_fault(self) -> None:
        """FRCD0.F, then every FSTS status bit (an FSTS write is what lets QEMU clear FECTL.IP)."""
        self.w(FRCD0_HI_DW, FRCD.F >> 96, 4)
        self.w(FSTS_OFF, 0x7F, 4)

    def gcmd(self, bit: int) -> None:
        """Set one GCMD bit the way a driver does (GSTS & 0x96FFFFFF | bit, GSTS as the builders' register
        shadow has it, see ``ScenarioMMIO``)."""
        gcmd_set(self.mmio, bit)

    def doc(self) -> dict[str, Any]:
        return {"format": FORMAT, "id": self.id, "family": f"sweep-{self.family}", "description": self.description,
                "tags": ["sweep", self.family], "notes": [],
                "config": {"iommu": self.iommu, "ram_size": 128 << 20, "mmio_base": "0xfed90000", "bus_d": "0x5"},
                "steps": self.steps}


def _legacy_domain(s: Scn, devs: tuple[str, ...] = ("A",), did: int = 1, levels: int = 3,
                   huge: bool = False) -> tuple[LegacyRootTable, SecondStageTable]:
    rt = LegacyRootTable(s.ram, s.alloc)
    ss = SecondStageTable(s.ram, s.alloc, levels=levels)
    if huge:
        ss.map(0x20_0000, 0x60_0000, PAGE_2M, R | W, page_size=PAGE_2M)
    else:
        ss.map(0x1000, DATA_PAGE, PAGE_4K, R | W)
    for d in devs:
        rt.set_context(SID[d] >> 8, DEVFN[d], slptptr=ss.root, aw=ss.aw, did=did)
    return rt, ss


def _scalable_domain(s: Scn, devs: tuple[str, ...] = ("A",),
                     did: int = 1) -> tuple[ScalableRootTable, SecondStageTable]:
    rt = ScalableRootTable(s.ram, s.alloc)
    ss = SecondStageTable(s.ram, s.alloc, levels=3)
    ss.map(0x1000, DATA_PAGE, PAGE_4K, R | W)
    for d in devs:
        pt = PasidTables(s.ram, s.alloc)
        rt.set_context(SID[d] >> 8, DEVFN[d], pasid_dir=pt.dir, pdts=pt.pdts)
        pt.set_entry(0, pgtt=PGTT_SS, did=did, ssptptr=ss.root, aw=ss.aw)
    return rt, ss


# -- fidelity: the reproducers of issue 12 ---------------------------------------------------------------


def gen_fidelity() -> Iterator[dict[str, Any]]:
    for name, iommu in (("legacy", {}), ("scalable", {"scalable_mode": True})):
        s = Scn(f"fid_rtaddr_ttm_{name}", "fidelity", f"RTADDR.TTM written and read back ({name} unit)", iommu)
        for v in (0x1000 | 3 << 10, 0x1000 | 1 << 10, 0x1000 | 2 << 10, (1 << 64) - 1, 0x3FF):
            s.w(RTADDR_OFF, v, 8)
            s.r(RTADDR_OFF, 8)
            s.r(RTADDR_OFF, 4)
        s.w(RTADDR_OFF, 0x1000 | 1 << 10, 4)
        s.r(RTADDR_OFF, 8)
        yield s.doc()
    # What SRTP makes of each TTM value: the table is built in the mode the unit would use if it honoured
    # TTM, and a DMA shows which mode it used.
    for iommu_name, iommu in (("legacy", {}), ("scalable", {"scalable_mode": True})):
        for ttm in range(4):
            for built in ("legacy", "scalable"):
                if built == "scalable" and "scalable_mode" not in iommu:
                    continue
                s = Scn(f"fid_srtp_ttm{ttm}_{iommu_name}_{built}_tables", "fidelity",
                        f"SRTP with TTM={ttm:02b} on a {iommu_name} unit over {built} tables", iommu)
                rt = (_scalable_domain(s) if built == "scalable" else _legacy_domain(s))[0]
                s.w(RTADDR_OFF, rt.root | ttm << 10, 8)
                s.gcmd(GCMD.SRTP)
                s.gcmd(GCMD.TE)
                s.dma_write("A", 0x1010, bytes(range(16)))
                s.r(FSTS_OFF, 4)
                yield s.doc()
    # Scalable root entries: a reserved bit of either half, DMA through each half (A: devfn 0x10 lower,
    # C: devfn 0x80 upper).
    for half, bit in (("lo", 1), ("lo", 11), ("hi", 1), ("hi", 11)):
        s = Scn(f"fid_sm_root_rsvd_{half}{bit}", "fidelity",
                f"scalable root entry with reserved bit {bit + (64 if half == 'hi' else 0)} set; DMA through "
                "the lower (A) and the upper (C) context table", {"scalable_mode": True})
        rt, _ = _scalable_domain(s, ("A", "C"))
        addr = rt.root_entry_addr(0) + (8 if half == "hi" else 0)
        s.ram.write_u64(addr, s.ram.read_u64(addr) | 1 << bit)
        enable_translation(s.mmio, rt.root, scalable=True)
        for dev in ("A", "C"):
            s.dma_write(dev, 0x1020, bytes([0xA0 + len(s.steps) % 16]) * 8)
            s.clear_fault()
        yield s.doc()
    # x-buggy-eim and eim, as QEMU 7.2 accepts or refuses them: the register file at reset tells.
    for iommu in ({"eim": "on"}, {"eim": "on", "buggy_eim": True}, {"eim": "off", "buggy_eim": True},
                  {"buggy_eim": True}, {"eim": "on", "intremap": "off"},
                  {"eim": "on", "buggy_eim": True, "intremap": "off"},
                  {"eim": "auto", "buggy_eim": True, "intremap": "off"},
                  # which refusal comes first
                  {"eim": "on", "device_iotlb": True, "pasid": True},
                  {"aw_bits": 50, "device_iotlb": True, "pasid": True},
                  {"aw_bits": 50, "eim": "on"}, {"aw_bits": 50, "dma_drain": False, "scalable_mode": True}):
        tag = "_".join(f"{k}-{v}" for k, v in iommu.items())
        s = Scn(f"fid_eim_{tag}", "fidelity", f"intel-iommu {iommu}", iommu)
        s.r(0x10, 8)
        yield s.doc()
    # dma-translation=off: TE is ignored, DMA goes untranslated.
    for iommu in ({"dma_translation": False}, {"dma_translation": False, "scalable_mode": True}):
        s = Scn(f"fid_dma_translation_off{'_sm' if iommu.get('scalable_mode') else ''}", "fidelity",
                "dma-translation=off: GCMD.TE after SRTP, then DMA", iommu)
        rt = (_scalable_domain(s) if iommu.get("scalable_mode") else _legacy_domain(s))[0]
        enable_translation(s.mmio, rt.root, scalable=bool(iommu.get("scalable_mode")))
        s.r(GSTS_OFF, 4)
        s.dma_write("A", 0x1010, bytes(range(32)), note="identity if untranslated, DATA_PAGE+0x10 if translated")
        s.dma_write("A", 0x30_0000, bytes(range(16)), note="unmapped: a fault if translated")
        s.r(FSTS_OFF, 4)
        s.r(0x10, 8)
        s.r(0x8, 8)
        yield s.doc()
    # Page-selective invalidation at an address inside a cached 2 MiB entry.
    for first, inv, am in ((0x3F_F000, 0x23_4000, 0), (0x20_0000, 0x23_4000, 0), (0x20_1000, 0x3F_E000, 1),
                           (0x30_0000, 0x20_0000, 0), (0x20_0000, 0x40_0000, 0)):
        s = Scn(f"fid_psi_in_2m_{first:x}_{inv:x}_am{am}", "fidelity",
                f"2 MiB entry cached by a DMA at {first:#x}, remapped, PSI at {inv:#x} am={am}, DMA again", {})
        rt, ss = _legacy_domain(s, huge=True)
        enable_translation(s.mmio, rt.root)
        s.dma_write("A", first, b"\x11" * 8, note="caches the 2 MiB entry")
        ss.unmap(0x20_0000, PAGE_2M)
        ss.map(0x20_0000, 0xA0_0000, PAGE_2M, R | W, page_size=PAGE_2M)
        s.w(IVA_OFF, inv | am, 8)
        s.w(IOTLB_OFF, 1 << 63 | 3 << 60 | 1 << 32, 8)
        s.r(IOTLB_OFF, 8)
        s.dma_write("A", first, b"\x22" * 8, note="old frame if the stale entry survived")
        yield s.doc()
    # Wrongly sized writes: an 8-byte write over every 32-bit register (QEMU asserts on some).
    cfg = qemu72_config({})
    for off, reg, _ in specs().register_map(cfg.cap, cfg.ecap):
        if reg.size_bits != 32:
            continue
        s = Scn(f"fid_wide_write_{reg.name.lower()}", "fidelity", f"an 8-byte write at {reg.name} ({off:#x})", {})
        s.r(off, 4)
        s.r(off + 4, 4)
        s.w(off, 0x1234_5678_8000_0000, 8)
        s.r(off, 4)
        s.r(off + 4, 4)
        yield s.doc()


# -- registers ------------------------------------------------------------------------------------------


def register_offsets(iommu: dict[str, Any]) -> list[int]:
    """Every dword of every register of the unit QEMU builds for ``iommu``, and :data:`OUTSIDE`."""
    cfg = qemu72_config(iommu)
    offs = {off + 4 * k for off, reg, _ in specs().register_map(cfg.cap, cfg.ecap) for k in range(reg.size_bits // 32)}
    return sorted(offs | set(OUTSIDE))


def patterns(bits: int, rng: random.Random) -> list[int]:
    ones = (1 << bits) - 1
    return [1 << k for k in range(bits)] + [ones, rng.getrandbits(bits), rng.getrandbits(bits), 0]


def gen_registers(presets: tuple[str, ...] = tuple(PRESETS)) -> Iterator[dict[str, Any]]:
    for preset in presets:
        iommu = PRESETS[preset]
        for off in register_offsets(iommu):
            rng = random.Random(f"registers:{preset}:{off:#x}")
            s = Scn(f"reg_{preset}_{off:03x}", "registers",
                    f"offset {off:#x} of the {preset} unit: sizes 1, 2, 4, 8 x walking ones, all ones, random, 0",
                    dict(iommu))
            for size in (1, 2, 4, 8):
                for v in patterns(8 * size, rng):
                    s.w(off, v, size)
                    s.r(off, size)
            yield s.doc()


# -- options --------------------------------------------------------------------------------------------

OPTION_VALUES: dict[str, tuple[Any, ...]] = {
    "aw_bits": (39, 48, 50), "caching_mode": (False, True), "device_iotlb": (False, True),
    "dma_drain": (True, False), "dma_translation": (True, False), "eim": ("auto", "on", "off"),
    "intremap": ("auto", "on", "off"), "pt": (True, False), "snoop_control": (False, True), "version": (0, 1),
    "buggy_eim": (False, True), "pasid": (False, True), "scalable_mode": (False, True),
}
"""Every property of ``-device intel-iommu,help`` in QEMU 7.2 (oracle names), default value first."""


def option_sets() -> list[dict[str, Any]]:
    """Each property at each value alone, then every pair of non-default values of two properties."""
    out: list[dict[str, Any]] = [{k: v} for k, vals in OPTION_VALUES.items() for v in vals]
    nondefault = [(k, v) for k, vals in OPTION_VALUES.items() for v in vals[1:]]
    for (k1, v1), (k2, v2) in itertools.combinations(nondefault, 2):
        if k1 != k2:
            out.append({k1: v1, k2: v2})
    return out


def _opt_id(iommu: dict[str, Any]) -> str:
    return "opt_" + "__".join(f"{k}-{str(v).lower()}" for k, v in iommu.items())


def gen_options() -> Iterator[dict[str, Any]]:
    for iommu in option_sets():
        s = Scn(_opt_id(iommu), "options", f"intel-iommu {iommu}: registers at reset, DMA, queued invalidation",
                dict(iommu))
        sm = bool(iommu.get("scalable_mode"))
        s.r(0x8, 8)
        s.r(0x10, 8)
        rt = (_scalable_domain(s) if sm else _legacy_domain(s))[0]
        enable_translation(s.mmio, rt.root, scalable=sm)
        s.dma_write("A", 0x1008, bytes(range(24)))
        s.dma_write("A", 0x7F_F000, b"\x5A" * 8, note="unmapped")
        s.r(FSTS_OFF, 4)
        s.clear_fault()
        # Queued invalidation: a 128-bit queue, a global IOTLB invalidation and a wait with status write.
        s.w(IQT_OFF, 0, 8)
        s.w(IQA_OFF, QUEUE, 8)
        s.gcmd(GCMD.QIE)
        s.qw(QUEUE, 0x2 | 1 << 4, 0)
        wait = make_descriptor(T_WAIT, SW=1, STATUS_DATA=0x5EED, STATUS_ADDR=STATUS)
        s.qw(QUEUE + 16, *wait[:2])
        s.w(IQT_OFF, 32, 8)
        s.r(0x80, 8)
        s.r(FSTS_OFF, 4)
        s.steps.append({"op": "mem_read", "gpa": hex(STATUS), "len": 4})
        yield s.doc()


# -- structures -----------------------------------------------------------------------------------------

WB_IOVA, WB_PAGE = 0x2000, 0x51_0000      # where the bytes a swept read obtained are written back
HUGE_2M = (0x20_0000, 0x60_0000)          # iova, hpa of the 2 MiB leaf
HUGE_1G = (0x4000_0000, 0x0)              # iova, hpa of the 1 GiB leaf (guest RAM from 0)
MARKER = 0xEEEE_EEEE_EEEE_EEEE


def _patterns(s: Scn) -> None:
    """Distinct bytes at every output address a swept read may land on (and a few it may reach by a flipped
    frame bit), so the written-back bytes tell where the read went."""
    for k, hpa in enumerate((DATA_PAGE, HUGE_2M[1], HUGE_1G[1] + 0x8000, DATA_PAGE + 0x1000, 0x40_0000)):
        s.qw(hpa + 8, 0x1111_1111_0000_0000 * (k + 1) | 0x0102_0304)


def _invalidate(s: Scn) -> None:
    s.w(CCMD_OFF, 1 << 63 | 1 << 61, 8)
    s.w(IOTLB_OFF, 1 << 63 | 1 << 60, 8)


def _bit_sweep(s: Scn, entries: list[tuple[str, int, int]], dev: str, iova: int) -> None:
    """Each bit of each entry flipped alone: caches invalidated, ``dev`` reads 8 bytes at ``iova`` (the fault
    registers are recorded after it), the entry restored, the read bytes written back to :data:`WB_IOVA`."""
    for _name, addr, nq in entries:
        for q in range(nq):
            a = addr + 8 * q
            orig = s.ram.read_u64(a)
            for k in range(64):
                s.ram.write_u64(a, orig ^ 1 << k)
                _invalidate(s)
                s.qw(WB_PAGE + (iova & 0xFFF), MARKER)  # outside the builders' view: the DMA changed it
                read_step = len(s.steps)
                s.dma_read(dev, iova, 8)
                s.clear_fault()
                s.ram.write_u64(a, orig)
                _invalidate(s)
                s.steps.append({"op": "dma", "sid": hex(SID[dev]), "dir": "write",
                                "iova": hex(WB_IOVA + (iova & 0xFFF)), "len": 8, "data_from_step": read_step})
                s.clear_fault()


def _ss_table(s: Scn, levels: int) -> SecondStageTable:
    ss = SecondStageTable(s.ram, s.alloc, levels=levels)
    ss.map(0x1000, DATA_PAGE, PAGE_4K, R | W)
    ss.map(WB_IOVA, WB_PAGE, PAGE_4K, R | W)
    ss.map(HUGE_2M[0], HUGE_2M[1], PAGE_2M, R | W, page_size=PAGE_2M)
    ss.map(HUGE_1G[0], HUGE_1G[1], 1 << 30, R | W, page_size=1 << 30)
    return ss


def _ss_entries(ss: SecondStageTable, levels: int) -> list[tuple[str, int, int, int]]:
    """(name, address, qwords, iova that walks through it) of the second-stage entries worth sweeping."""
    out = []
    for lvl in range(levels, 1, -1):
        out.append((f"ss_l{lvl}_table", ss.entry_addr(0x1000, lvl), 1, 0x1008))
    out.append(("ss_l1_4k_leaf", ss.entry_addr(0x1000, 1), 1, 0x1008))
    out.append(("ss_l2_2m_leaf", ss.entry_addr(HUGE_2M[0], 2), 1, HUGE_2M[0] + 8))
    out.append(("ss_l3_1g_leaf", ss.entry_addr(HUGE_1G[0], 3), 1, HUGE_1G[0] + 0x8008))
    return out


def gen_structures() -> Iterator[dict[str, Any]]:
    for aw, levels in ((39, 3), (48, 4)):
        iommu = {} if aw == 39 else {"aw_bits": 48}
        probe = Scn("probe", "structures", "", iommu)
        ss = _ss_table(probe, levels)
        names = [("legacy_root_entry", None), ("legacy_context_entry", None)] if aw == 39 else []
        names += [(n, None) for n, *_ in _ss_entries(ss, levels)]
        for name, _ in names:
            s = Scn(f"struct_legacy_aw{aw}_{name}", "structures",
                    f"legacy mode, aw-bits={aw}: each bit of the {name} flipped alone, then a DMA read", dict(iommu))
            rt = LegacyRootTable(s.ram, s.alloc)
            ss = _ss_table(s, levels)
            rt.set_context(0, DEVFN["A"], slptptr=ss.root, aw=ss.aw, did=1)
            _patterns(s)
            enable_translation(s.mmio, rt.root)
            entries = {n: (a, q, v) for n, a, q, v in _ss_entries(ss, levels)}
            entries["legacy_root_entry"] = (rt.root_entry_addr(0), 2, 0x1008)
            entries["legacy_context_entry"] = (rt.context_entry_addr(0, DEVFN["A"]), 2, 0x1008)
            addr, nq, iova = entries[name]
            _bit_sweep(s, [(name, addr, nq)], "A", iova)
            yield s.doc()
    iommu = {"scalable_mode": True}
    for name in ("sm_root_entry_lower", "sm_root_entry_upper", "sm_context_entry", "pasid_dir_entry", "pasid_entry",
                 "sm_ss_l1_4k_leaf", "sm_ss_l2_2m_leaf"):
        s = Scn(f"struct_scalable_{name}", "structures",
                f"scalable mode: each bit of the {name} flipped alone, then a DMA read", dict(iommu))
        rt = ScalableRootTable(s.ram, s.alloc)
        ss = _ss_table(s, 3)
        pts = {}
        for d in ("A", "C"):
            pt = PasidTables(s.ram, s.alloc)
            rt.set_context(0, DEVFN[d], pasid_dir=pt.dir, pdts=pt.pdts)
            pt.set_entry(0, pgtt=PGTT_SS, did=1, ssptptr=ss.root, aw=ss.aw)
            pts[d] = pt
        _patterns(s)
        enable_translation(s.mmio, rt.root, scalable=True)
        dev, iova = "A", 0x1008
        if name == "sm_root_entry_lower":
            addr, nq = rt.root_entry_addr(0), 1
        elif name == "sm_root_entry_upper":
            addr, nq, dev = rt.root_entry_addr(0) + 8, 1, "C"
        elif name == "sm_context_entry":
            addr, nq = rt.context_entry_addr(0, DEVFN["A"]), 4
        elif name == "pasid_dir_entry":
            addr, nq = pts["A"].dir_entry_addr(0), 1
        elif name == "pasid_entry":
            addr, nq = pts["A"].entry_addr(0), 8
        elif name == "sm_ss_l1_4k_leaf":
            addr, nq = ss.entry_addr(0x1000, 1), 1
        else:
            addr, nq, iova = ss.entry_addr(HUGE_2M[0], 2), 1, HUGE_2M[0] + 8
        _bit_sweep(s, [(name, addr, nq)], dev, iova)
        yield s.doc()
    yield from gen_descriptors()


DESCRIPTOR_BASES: dict[str, tuple[int, dict[str, int]]] = {
    "context": (1, {"G": 1}), "iotlb": (2, {"G": 2, "DID": 1}), "dev_tlb": (3, {"SID": 0x10, "ADDR": 0x1000}),
    "iec": (4, {"G": 0}), "wait": (5, {"SW": 1, "STATUS_DATA": 0x5EED, "STATUS_ADDR": STATUS + 0x100}),
    "pasid_iotlb": (6, {"G": 2, "DID": 1, "PASID": 1}), "pasid_cache": (7, {"G": 1, "DID": 1, "PASID": 1}),
}
"""Valid 128-bit descriptors of each type QEMU 7.2 decodes (make_descriptor field values).  Flipping a type bit
can turn one into a wait descriptor whose IF and SW are bits 5:4 of the original: QEMU aborts on both set,
so no base has 11 there."""
ICS_OFF = 0x9C


IQA_DW = 1 << 11
"""IQA.DW: 256-bit descriptors (QEMU 7.2 honours it on a scalable unit only)."""


def gen_descriptors() -> Iterator[dict[str, Any]]:
    """Each bit of each descriptor type flipped alone in a valid descriptor, queued with a wait
    descriptor behind it; FSTS, IQH and ICS read; then the slot rewritten valid, the errors cleared and IQT
    written again (QEMU resumes on that write, the spec when IQE clears).  Once with a 128-bit queue on a
    legacy unit, once with a 256-bit queue (IQA.DW) on a scalable unit: all 256 bits, the upper two qwords
    zero in the valid descriptor."""
    for width, iommu, prefix in ((128, {}, "struct_desc_"), (256, {"scalable_mode": True}, "struct_desc256_")):
        nq, size = width // 64, width // 8
        slots = 4096 // size
        for name, (t, fields) in DESCRIPTOR_BASES.items():
            s = Scn(f"{prefix}{name}", "structures",
                    f"each bit of a valid {name} descriptor flipped alone, then a wait descriptor"
                    + ("" if width == 128 else " (256-bit queue, scalable unit)"), dict(iommu))
            s.w(IQT_OFF, 0, 8)
            s.w(IQA_OFF, QUEUE | (IQA_DW if width == 256 else 0), 8)
            s.gcmd(GCMD.QIE)
            base = make_descriptor(t, **fields) + (0,) * (nq - 2)
            valid = make_descriptor(2, G=1) + (0,) * (nq - 2)
            # QEMU aborts on a wait with SW and IF both set: that bit last, the scenario ends there.
            bits = [b for b in range(width) if not (t == 5 and b == 4)] + ([4] if t == 5 else [])
            slot = 0

            def put(slot: int, qwords: tuple[int, ...]) -> None:
                s.ram.write(QUEUE + size * (slot % slots), b"".join(q.to_bytes(8, "little") for q in qwords))

            for n, b in enumerate(bits):
                desc = tuple(q ^ (1 << b % 64 if b // 64 == k else 0) for k, q in enumerate(base))
                wait = make_descriptor(T_WAIT, SW=1, STATUS_DATA=n + 1, STATUS_ADDR=STATUS) + (0,) * (nq - 2)
                put(slot, desc)
                put(slot + 1, wait)
                tail = (slot + 2) % slots
                s.w(IQT_OFF, tail * size, 8)
                s.r(FSTS_OFF, 4)
                s.r(0x80, 8)
                s.r(ICS_OFF, 4)
                put(slot, valid)
                s.w(FSTS_OFF, 0x70, 4)
                s.w(ICS_OFF, 1, 4)
                s.w(IQT_OFF, tail * size, 8)
                s.r(FSTS_OFF, 4)
                s.r(0x80, 8)
                slot = tail
            yield s.doc()


# -- IRTE: each bit of a valid entry, an MSI from a device through it ------------------------------------

IRT_BASE = 0x60_0000
IRTA_S = 7                        # 2^(S+1) = 256 entries: one per bit, no interrupt-entry cache to invalidate
IRTE_MODES: dict[str, tuple[dict[str, Any], int, int]] = {
    "xapic": ({"intremap": "on"}, 0, 0x03 << 8),
    "x2apic": ({"intremap": "on", "eim": "on", "buggy_eim": True}, IRTA.EIME, 0x0001_0203),
}
"""mode: (QEMU options, IRTA.EIME, IRTE.DST). QEMU 7.2 under TCG takes eim=on only with x-buggy-eim."""
IRTE_SID = "A"


def irte_base(dst: int) -> int:
    """The valid IRTE every swept entry differs from by one bit: fixed delivery to ``dst``, vector 0x41,
    the requester id of :data:`IRTE_SID` verified on all 16 bits (SVT=01, SQ=00)."""
    return specs().structure("irte").encode(P=1, V=0x41, DST=dst, SID=SID[IRTE_SID], SQ=0, SVT=1)


def msi_addr(index: int) -> int:
    """A remappable-format MSI address selecting IRTE ``index`` (no subhandle)."""
    return 0xFEE0_0000 | (index & 0x7FFF) << 5 | 1 << 4 | (index >> 15 & 1) << 2


def gen_irte() -> Iterator[dict[str, Any]]:
    """One sweep per interrupt mode: IRTE 0 is valid, IRTE 1 + k has bit k flipped; device A raises one MSI
    through each (entry 0 first and last: nothing the sweep did changed the unit's state)."""
    for mode, (iommu, eime, dst) in IRTE_MODES.items():
        base = irte_base(dst)
        entries = [(0, base)] + [(1 + k, base ^ 1 << k) for k in range(128)]
        msis = [{"entry": i, "note": "valid" if i == 0 else f"bit {i - 1} flipped", "sid": hex(SID[IRTE_SID]),
                 "addr": hex(msi_addr(i)), "data": "0x0"} for i, _ in entries]
        msis.append(dict(msis[0], note="valid, again"))
        yield {"format": IRTE_FORMAT, "id": f"irte_{mode}", "description": f"each IRTE bit flipped alone ({mode})",
               "iommu": iommu, "irta": hex(IRT_BASE | eime | IRTA_S),
               "entries": [[i, hex(v & (1 << 64) - 1), hex(v >> 64)] for i, v in entries], "msis": msis}


IRTE_FORMAT = "vtd-qemu-irte-sweep/1"
IRTE_CORPUS = REPO / "tests" / "data" / "qemu-irte" / "irte.jsonl"
"""Not under :data:`DATA_DIR`: its documents are not scenarios (``scripts/attribute_quirks.py`` reads that
directory)."""
IR_TRACE = "vtd_ir_remap_msi"
"""QEMU 7.2's trace of a delivered message: ``vtd_ir_remap_msi (addr A, data D) -> (addr A', data D')``, the
message leaving the unit (for every MSI it lets through, remapped or not); a blocked one has none."""


def record_irte(doc: dict[str, Any]) -> dict[str, Any]:
    """QEMU 7.2's answer to each MSI of ``doc``: the message delivered (or null), FSTS and FRCD0 right after
    it, and QEMU's error lines (``error_report_once``: each cause prints once per run)."""
    out = dict(doc, msis=[dict(m) for m in doc["msis"]])
    with QemuMachine(doc["iommu"], extra_args=["-trace", IR_TRACE]) as m:
        m.start()
        q = m.q
        assert q is not None
        irta = int(doc["irta"], 16)
        for i, lo, hi in doc["entries"]:
            q.writeq((irta & ~0xFFF) + 16 * i, int(lo, 16))
            q.writeq((irta & ~0xFFF) + 16 * i + 8, int(hi, 16))
        m.vtd_write(IRTA_OFF, irta, 8)
        m.vtd_write(GCMD_OFF, GCMD.SIRTP, 4)
        m.vtd_write(GCMD_OFF, GCMD.IRE, 4)
        out["gsts"] = hex(m.vtd_read(GSTS_OFF, 4))
        dev = m.device_for_sid(int(doc["msis"][0]["sid"], 16))
        assert dev is not None
        for msi in out["msis"]:
            pos = q.stderr_size()
            m.edu_msi(dev, int(msi["addr"], 16), int(msi["data"], 16))
            lines = q.stderr_since(pos)
            delivered = None
            for ln in lines:
                if ln.startswith(IR_TRACE + " "):
                    a2, d2 = ln.split("-> (addr ")[1].rstrip(")").split(", data ")
                    delivered = {"addr": hex(int(a2, 16)), "data": hex(int(d2, 16))}
            fsts = m.vtd_read(FSTS_OFF, 4)
            frcd = [hex(m.vtd_read(FRCD0_HI_DW - 0xC, 8)), hex(m.vtd_read(FRCD0_HI_DW - 4, 8))]
            msi["expect"] = {"delivered": delivered, "fsts": hex(fsts), "frcd0": frcd,
                             "log": [ln for ln in lines if not ln.startswith("vtd_ir_")]}
            if fsts:
                m.vtd_write(FRCD0_HI_DW, FRCD.F >> 96, 4)
                m.vtd_write(FSTS_OFF, 0x7F, 4)
    return out


FAMILIES: dict[str, Callable[[], Iterator[dict[str, Any]]]] = {
    "fidelity": gen_fidelity, "registers": gen_registers, "options": gen_options, "structures": gen_structures,
}


COMPRESSED = {"registers", "options", "structures"}
"""Families stored gzip-compressed (``<family>.jsonl.gz``): thousands of near-identical steps."""


def corpus_path(family: str) -> Path:
    return DATA_DIR / (f"{family}.jsonl.gz" if family in COMPRESSED else f"{family}.jsonl")


def record(family: str, out: Path, ids: set[str] | None = None) -> int:
    runner = QemuRunner()
    n = 0
    tmp = out.with_name(out.name + ".tmp")
    opener = gzip.open if out.suffix == ".gz" else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        for doc in FAMILIES[family]():
            if ids is not None and doc["id"] not in ids:
                continue
            f.write(json.dumps(runner.record(doc), separators=(",", ":")) + "\n")
            n += 1
    tmp.replace(out)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted([*FAMILIES, "irte"]), required=True)
    ap.add_argument("--list", action="store_true", help="print the scenario ids and step counts, run nothing")
    ap.add_argument("-o", "--output", type=Path,
                    help="default: tests/data/qemu-sweeps/<family>.jsonl (irte: tests/data/qemu-irte/irte.jsonl)")
    args = ap.parse_args(argv)
    gen = gen_irte if args.family == "irte" else FAMILIES[args.family]
    if args.list:
        for doc in gen():
            print(doc["id"], len(doc["msis"] if args.family == "irte" else doc["steps"]))
        return 0
    out = args.output or (IRTE_CORPUS if args.family == "irte" else corpus_path(args.family))
    if args.family == "irte":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(record_irte(d), separators=(",", ":")) + "\n" for d in gen()),
                       encoding="utf-8")
        print(f"{out}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{record(args.family, out)} scenarios -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
