"""Every reachable DMA-remapping fault reason, per mode, from real structures made with the builders.

Each case builds a scenario that breaks exactly one rule and checks the fault the chip records in
the FRCD registers, read through MMIO and decoded here with the bit positions of the fact sheet
(§1.9) — nothing of the chip's own decoding is used.  Every case runs twice: once without FPD and
once with the FPD bit that applies set, where qualified faults must vanish and non-qualified ones must
still be recorded (qualification per vtd-facts §7 / specs/faults.yaml).

Then fault recording itself: FRCD round robin with FRI, PFO overflow, PPF, the fault event (FECTL
IM/IP, FEDATA/FEADDR/FEUADDR), and same-source collapse only when configured.

Default configuration: the ``modern`` preset under the ``spec`` profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from vtd_emu.tables import (
    NX,
    PAGE_1G,
    PAGE_2M,
    PGTT_FS,
    PGTT_NESTED,
    PGTT_PT,
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
from vtd_emu.memory import GuestPhysView, HostRAM
from vtd_emu.spec import specs
from vtd_emu.vtd.config import VtdConfig
from vtd_emu.vtd.iommu import Fault, Translation, VtdIommu

K4 = 0x1000
ADDR_51_12 = 0x000F_FFFF_FFFF_F000
BUS, DEVFN = 0x3, 0x21
SID = BUS << 8 | DEVFN
DID = 0x2A
PASID = 0x45  # directory index 1, table index 5: exercises both PASID levels
RID_PASID = 0x81
IOVA = 0x1234_5000
HPA = 0x2_4680_0000
SMALL_RAM = 0x400_0000  # 64 MiB: addresses at or above are not memory
NOT_MEMORY = 0x1_0000_0000  # a 4 GiB address: below HAW, above SMALL_RAM
GPA_BASE = 0x4000_0000  # nested: where the guest keeps its first-stage tables

# FECTL / FSTS bits (fact sheet §1.8)
IM, IP = 1 << 31, 1 << 30
PFO, PPF = 1 << 0, 1 << 1
GCMD, GSTS, RTADDR = 0x18, 0x1C, 0x20
FSTS, FECTL, FEDATA, FEADDR, FEUADDR = 0x34, 0x38, 0x3C, 0x40, 0x44


# -- FRCD decode (independent of the chip's FaultUnit.records) ------------------------------------


@dataclass(frozen=True)
class Frcd:
    index: int
    fi: int
    sid: int
    priv: int
    exe: int
    pp: int
    fr: int
    pv: int
    t: int


def frcd_geometry(io: VtdIommu) -> tuple[int, int]:
    """(offset of FRCD[0], number of FRCDs) from CAP as read through MMIO."""
    cap = io.mmio_read(0x08, 8)
    return ((cap >> 24) & 0x3FF) * 16, ((cap >> 40) & 0xFF) + 1


def frcds(io: VtdIommu) -> list[Frcd]:
    """Every FRCD with F=1, decoded from MMIO reads."""
    base, n = frcd_geometry(io)
    out = []
    for i in range(n):
        lo = io.mmio_read(base + 16 * i, 8)
        hi = io.mmio_read(base + 16 * i + 8, 8)
        if hi >> 63:
            out.append(Frcd(i, lo & ~0xFFF, hi & 0xFFFF, (hi >> 29) & 1, (hi >> 30) & 1, (hi >> 31) & 1,
                            (hi >> 32) & 0xFF, (hi >> 40) & 0xFFFFF, (hi >> 62) & 1))
    return out


def clear_frcd(io: VtdIommu, index: int) -> None:
    base, _ = frcd_geometry(io)
    io.mmio_write(base + 16 * index + 12, 1 << 31, 4)  # F is bit 127: bit 31 of the top dword


def gcmd(io: VtdIommu, bit: int, on: bool = True) -> None:
    """One GCMD change with the documented protocol (GSTS & 0x96FFFFFF, then set/clear one bit)."""
    v = io.mmio_read(GSTS, 4) & 0x96FF_FFFF
    io.mmio_write(GCMD, (v | bit) if on else (v & ~bit), 4)


# -- scenarios ------------------------------------------------------------------------------------


@dataclass
class Scn:
    io: VtdIommu
    ram: HostRAM
    alloc: PageAllocator
    sid: int = SID
    iova: int = IOVA
    access: str = "r"
    pasid: int | None = None
    priv: bool = False
    exe: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def go(self) -> Translation | Fault:
        return self.io.translate(self.sid, self.iova, self.access, pasid=self.pasid, priv=self.priv, exe=self.exe)


class ProtectedRAM(HostRAM):
    """Host RAM with a write-protected range (a ROM / write-locked region): reads work, ``write_u64``
    into the range fails.  Needed for 0x91: with plain HostRAM a table that can be read can always be
    written, so an A/D update never fails."""

    def __init__(self) -> None:
        super().__init__()
        self.protected: tuple[int, int] = (0, 0)

    def write_u64(self, addr: int, value: int) -> bool:
        lo, hi = self.protected
        if lo <= addr < hi:
            return False
        return super().write_u64(addr, value)


def _cfg(preset: str = "modern", overrides: dict[str, int] | None = None, **kw: Any) -> VtdConfig:
    return VtdConfig.preset(preset, overrides=overrides or {}, **kw)


def legacy(*, fpd: bool = False, preset: str = "modern", overrides: dict[str, int] | None = None,
           ram_size: int | None = None, levels: int = 4, perms: int = R | W, ctx: dict[str, Any] | None = None,
           map_: bool = True, cfg_kw: dict[str, Any] | None = None) -> Scn:
    ram = HostRAM(size=ram_size) if ram_size else HostRAM()
    alloc = PageAllocator(ram)
    ss = SecondStageTable(ram, alloc, levels)
    if map_:
        ss.map(IOVA, HPA, K4, perms)
    rt = LegacyRootTable(ram, alloc)
    kw: dict[str, Any] = dict(slptptr=ss.root, aw=ss.aw, did=DID, fpd=fpd)
    kw.update(ctx or {})
    rt.set_context(BUS, DEVFN, **kw)
    io = VtdIommu(ram, _cfg(preset, overrides, **(cfg_kw or {})))
    enable_translation(io, rt.root)
    return Scn(io, ram, alloc, extra={"ss": ss, "rt": rt})


def scalable(*, pgtt: int = PGTT_FS, fpd_ctx: bool = False, fpd_dir: bool = False, fpd_pe: bool = False,
             overrides: dict[str, int] | None = None, ram: HostRAM | None = None, fs_levels: int = 4,
             ss_levels: int = 4, fs_perms: int = W | U, ss_perms: int = R | W, pe: dict[str, Any] | None = None,
             ctx: dict[str, Any] | None = None, pasid: int | None = PASID, map_: bool = True,
             cfg_kw: dict[str, Any] | None = None) -> Scn:
    ram = ram if ram is not None else HostRAM()
    alloc = PageAllocator(ram)
    ss = SecondStageTable(ram, alloc, ss_levels)
    fs: FirstStageTable
    if pgtt == PGTT_NESTED:
        # First-stage tables live in guest memory: GPA_BASE.. maps to 64 host pages (read/write).
        ss.map(GPA_BASE, alloc.alloc(64), 64 * K4, R | W)
        gview = GuestPhysView(ram, ss)
        fs = FirstStageTable(gview, PageAllocator(gview, base=GPA_BASE, limit=GPA_BASE + 64 * K4), fs_levels)
        if map_:
            fs.map(IOVA, 0x5000_0000, K4, fs_perms)  # IOVA -> GPA 0x5000_0000
            ss.map(0x5000_0000, HPA, K4, ss_perms)  # GPA -> HPA
    else:
        fs = FirstStageTable(ram, alloc, fs_levels)
        if map_:
            fs.map(IOVA, HPA, K4, fs_perms)
            ss.map(IOVA, HPA, K4, ss_perms)
    pt = PasidTables(ram, alloc)
    kw: dict[str, Any] = dict(pgtt=pgtt, did=DID, ssptptr=ss.root, aw=ss.aw, fsptptr=fs.root, fspm=fs.fspm,
                              fpd=fpd_pe, dir_fpd=fpd_dir)
    kw.update(pe or {})
    for p in (PASID, RID_PASID):
        pt.set_entry(p, **kw)
    rt = ScalableRootTable(ram, alloc)
    ckw: dict[str, Any] = dict(pasid_dir=pt.dir, pdts=pt.pdts, rid_pasid=RID_PASID, fpd=fpd_ctx)
    ckw.update(ctx or {})
    rt.set_context(BUS, DEVFN, **ckw)
    io = VtdIommu(ram, _cfg("modern", overrides, **(cfg_kw or {})))
    enable_translation(io, rt.root, scalable=True)
    return Scn(io, ram, alloc, pasid=pasid, extra={"ss": ss, "fs": fs, "pt": pt, "rt": rt})


def _poke(ram: HostRAM, addr: int, set_bits: int = 0, clear_bits: int = 0) -> None:
    ram.write_u64(addr, (ram.read_u64(addr) & ~clear_bits) | set_bits)


def _retarget(addr_bits: int) -> tuple[int, int]:
    """(set, clear) bits that make a table entry point at ``addr_bits``."""
    return addr_bits, ADDR_51_12


# ---- legacy-mode cases ----
# Each maker takes ``fpd`` (set the FPD bit that applies) and returns the scenario.


def l_root_p(fpd: bool) -> Scn:
    s = legacy(fpd=fpd)
    s.extra["rt"].set_root_present(BUS, False)
    return s


def l_ctx_p(fpd: bool) -> Scn:
    return legacy(fpd=fpd, ctx={"present": False})


def l_aw_not_sagaw(fpd: bool) -> Scn:
    # modern SAGAW = 0b1110: AW=0 (2-level, 30-bit) is not supported
    return legacy(fpd=fpd, ctx={"aw": 0})


def l_aw4_not_sagaw(fpd: bool) -> Scn:
    return legacy(fpd=fpd, ctx={"aw": 4})


def l_aw48_on_39bit_unit(fpd: bool) -> Scn:
    # qemu-7.2-default (spec profile): SAGAW = 39-bit only; a 4-level context is invalid
    return legacy(fpd=fpd, preset="qemu-7.2-default", ctx={"aw": 2})


def l_tt3(fpd: bool) -> Scn:
    return legacy(fpd=fpd, ctx={"tt": 3})


def l_tt1_without_dt(fpd: bool) -> Scn:
    return legacy(fpd=fpd, ctx={"tt": 1}, overrides={"ecap.DT": 0})


def l_tt2_without_pt(fpd: bool) -> Scn:
    return legacy(fpd=fpd, ctx={"tt": 2}, overrides={"ecap.PT": 0})


def l_top_table_not_memory(fpd: bool) -> Scn:
    return legacy(fpd=fpd, ram_size=SMALL_RAM, ctx={"slptptr": NOT_MEMORY})


def l_beyond_agaw(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, levels=3)  # 39-bit table
    s.iova = 1 << 39
    return s


def l_beyond_mgaw(fpd: bool) -> Scn:
    # 4-level (48-bit) context on a unit whose MGAW is 41 bits: the smaller width applies
    s = legacy(fpd=fpd, overrides={"cap.MGAW": 40})
    s.iova = 1 << 41
    return s


def l_write_no_w(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, perms=R)
    s.access = "w"
    return s


def l_atomic_no_w(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, perms=R)
    s.access = "rw"
    return s


def l_read_no_r(fpd: bool) -> Scn:
    return legacy(fpd=fpd, perms=W)


def l_read_not_present(fpd: bool) -> Scn:
    return legacy(fpd=fpd, map_=False)


def l_write_not_present(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, map_=False)
    s.access = "w"
    return s


def l_write_denied_in_table(fpd: bool) -> Scn:
    # permissions are checked at every level: W=0 in the PDPE denies the write whatever the leaf says
    s = legacy(fpd=fpd)
    s.extra["ss"].set_entry_bits(IOVA, 3, 0, 1 << 1)
    s.access = "w"
    return s


def l_read_denied_in_table(fpd: bool) -> Scn:
    s = legacy(fpd=fpd)
    s.extra["ss"].set_entry_bits(IOVA, 4, 0, 1 << 0)
    return s


def l_ps_in_pml5e(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, levels=5)
    s.extra["ss"].set_entry_bits(IOVA, 5, 1 << 7)
    return s


def l_lower_read_err(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, ram_size=SMALL_RAM)
    s.extra["ss"].set_entry_bits(IOVA, 3, *_retarget(NOT_MEMORY))  # PDPE -> page directory not memory
    return s


def l_root_read_err(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, ram_size=SMALL_RAM)
    enable_translation(s.io, NOT_MEMORY)
    return s


def l_ctx_read_err(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, ram_size=SMALL_RAM)
    _poke(s.ram, s.extra["rt"].root_entry_addr(BUS), *_retarget(NOT_MEMORY))
    return s


def l_root_rsvd_lo(fpd: bool) -> Scn:
    s = legacy(fpd=fpd)
    _poke(s.ram, s.extra["rt"].root_entry_addr(BUS), 1 << 1)
    return s


def l_root_rsvd_hi(fpd: bool) -> Scn:
    s = legacy(fpd=fpd)
    _poke(s.ram, s.extra["rt"].root_entry_addr(BUS) + 8, 1 << 20)
    return s


def l_ctx_rsvd_lo(fpd: bool) -> Scn:
    return legacy(fpd=fpd, ctx={"extra": 1 << 4})


def l_ctx_rsvd_bit71(fpd: bool) -> Scn:
    return legacy(fpd=fpd, ctx={"extra": 1 << 71})


def l_ctx_rsvd_hi(fpd: bool) -> Scn:
    return legacy(fpd=fpd, ctx={"extra": 1 << 100})


def l_ctx_ptr_above_haw(fpd: bool) -> Scn:
    return legacy(fpd=fpd, cfg_kw={"haw": 40}, ctx={"extra": 1 << 45})


def l_1g_without_sllps(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, overrides={"cap.SLLPS": 0b01}, map_=False)
    s.extra["ss"].map(0x4000_0000, 0x1_4000_0000, PAGE_1G, R | W, page_size=PAGE_1G)
    s.iova = 0x4000_0000 + 0x12_3000
    return s


def l_2m_without_sllps(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, overrides={"cap.SLLPS": 0}, map_=False)
    s.extra["ss"].map(0x20_0000, 0x4060_0000, PAGE_2M, R | W, page_size=PAGE_2M)
    s.iova = 0x20_0000 + 0x5000
    return s


def l_ps_in_pml4e(fpd: bool) -> Scn:
    s = legacy(fpd=fpd)
    s.extra["ss"].set_entry_bits(IOVA, 4, 1 << 7)
    return s


def l_snp_without_sc(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, overrides={"ecap.SC": 0})
    s.extra["ss"].set_entry_bits(IOVA, 1, 1 << 11)
    return s


def l_snp_in_nonleaf(fpd: bool) -> Scn:
    # SNP exists only in leaves: bit 11 of a table entry stays reserved even with ECAP.SC
    s = legacy(fpd=fpd)
    s.extra["ss"].set_entry_bits(IOVA, 2, 1 << 11)
    return s


def l_tm_without_dt(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, overrides={"ecap.DT": 0})
    s.extra["ss"].set_entry_bits(IOVA, 1, 1 << 62)
    return s


def l_leaf_addr_above_haw(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, cfg_kw={"haw": 40})
    s.extra["ss"].set_entry_bits(IOVA, 1, 1 << 45)
    return s


def l_table_addr_above_haw(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, cfg_kw={"haw": 40})
    s.extra["ss"].set_entry_bits(IOVA, 3, 1 << 44)
    return s


def l_2m_leaf_low_addr_bits(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, map_=False)
    s.extra["ss"].map(0x20_0000, 0x4060_0000, PAGE_2M, R | W, page_size=PAGE_2M)
    s.extra["ss"].set_entry_bits(0x20_0000, 2, 1 << 13)
    s.iova = 0x20_0000
    return s


def l_intr_range(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, map_=False)
    s.extra["ss"].map(IOVA, 0xFEE0_0000, K4, R | W)
    return s


def l_intr_range_in_2m_leaf(fpd: bool) -> Scn:
    s = legacy(fpd=fpd, map_=False)
    s.extra["ss"].map(0x4000_0000, 0xFEE0_0000, PAGE_2M, R | W, page_size=PAGE_2M)
    s.iova = 0x4000_0000 + 0xF_F000  # -> 0xFEEF_F000
    s.access = "w"
    return s


def l_pasid_request(fpd: bool) -> Scn:
    s = legacy(fpd=fpd)
    s.pasid = 0x77
    return s


def l_ttm_reserved(fpd: bool) -> Scn:
    s = legacy(fpd=fpd)
    s.io.mmio_write(RTADDR, s.extra["rt"].root | (2 << 10), 8)
    gcmd(s.io, 1 << 30)
    return s


def l_ttm_abort_without_adms(fpd: bool) -> Scn:
    s = legacy(fpd=fpd)
    s.io.mmio_write(RTADDR, s.extra["rt"].root | (3 << 10), 8)
    gcmd(s.io, 1 << 30)
    return s


# ---- scalable-mode cases ----


def s_root_read_err(fpd: bool) -> Scn:
    s = scalable(fpd_ctx=fpd, ram=HostRAM(size=SMALL_RAM))
    enable_translation(s.io, NOT_MEMORY, scalable=True)
    return s


def s_lp_clear(fpd: bool) -> Scn:
    s = scalable(fpd_ctx=fpd)
    s.extra["rt"].set_root_present(BUS, False)
    return s


def s_up_clear(fpd: bool) -> Scn:
    s = scalable(fpd_ctx=fpd)  # only the lower context table exists
    s.sid = BUS << 8 | 0x80 | DEVFN
    return s


def s_root_rsvd(fpd: bool) -> Scn:
    s = scalable(fpd_ctx=fpd)
    _poke(s.ram, s.extra["rt"].root_entry_addr(BUS), 1 << 3)
    return s


def s_root_rsvd_upper(fpd: bool) -> Scn:
    s = scalable(fpd_ctx=fpd)
    rt = s.extra["rt"]
    rt.set_context(BUS, 0x80 | DEVFN, pasid_dir=s.extra["pt"].dir, pdts=s.extra["pt"].pdts, fpd=fpd)
    _poke(s.ram, rt.root_entry_addr(BUS) + 8, 1 << 5)  # abs bit 69: reserved in the upper half
    s.sid = BUS << 8 | 0x80 | DEVFN
    return s


def s_ctx_read_err(fpd: bool) -> Scn:
    s = scalable(fpd_ctx=fpd, ram=HostRAM(size=SMALL_RAM))
    _poke(s.ram, s.extra["rt"].root_entry_addr(BUS), *_retarget(NOT_MEMORY))
    return s


def s_ctx_p(fpd: bool) -> Scn:
    return scalable(fpd_ctx=fpd, ctx={"present": False})


def s_ctx_rsvd(fpd: bool) -> Scn:
    return scalable(fpd_ctx=fpd, ctx={"extra": 1 << 6})


def s_ctx_rsvd_qw3(fpd: bool) -> Scn:
    return scalable(fpd_ctx=fpd, ctx={"extra": 1 << 200})


def s_ctx_rid_pasid_without_rps(fpd: bool) -> Scn:
    # RID_PASID is reserved unless ECAP.RPS
    return scalable(fpd_ctx=fpd, overrides={"ecap.RPS": 0})


def s_paside_clear(fpd: bool) -> Scn:
    return scalable(fpd_ctx=fpd, ctx={"paside": False})


def s_pasid_beyond_pdts(fpd: bool) -> Scn:
    s = scalable(fpd_ctx=fpd)  # pdts=0: 128 directory entries cover PASIDs < 0x2000
    s.pasid = 0x2000
    return s


def s_pdir_read_err(fpd: bool) -> Scn:
    return scalable(fpd_ctx=fpd, ram=HostRAM(size=SMALL_RAM), ctx={"pasid_dir": NOT_MEMORY})


def s_pdir_p(fpd: bool) -> Scn:
    s = scalable()
    s.extra["pt"].set_dir_entry(PASID, present=False, fpd=fpd)
    return s


def s_pdir_rsvd(fpd: bool) -> Scn:
    s = scalable(fpd_ctx=fpd)
    _poke(s.ram, s.extra["pt"].dir_entry_addr(PASID), 1 << 5)
    return s


def s_ptable_read_err(fpd: bool) -> Scn:
    s = scalable(fpd_ctx=fpd, fpd_dir=fpd, ram=HostRAM(size=SMALL_RAM))
    _poke(s.ram, s.extra["pt"].dir_entry_addr(PASID), *_retarget(NOT_MEMORY))
    return s


def s_pe_p(fpd: bool) -> Scn:
    return scalable(fpd_pe=fpd, pe={"present": False})


def s_pe_rsvd(fpd: bool) -> Scn:
    return scalable(fpd_dir=fpd, pe={"extra": {"RSVD0": 1}})


def s_pe_rsvd_high(fpd: bool) -> Scn:
    return scalable(fpd_dir=fpd, pe={"extra": {"RSVD3": 1 << 100}})


def s_pgtt0(fpd: bool) -> Scn:
    return scalable(fpd_pe=fpd, pe={"pgtt": 0})


def s_pgtt5(fpd: bool) -> Scn:
    return scalable(fpd_pe=fpd, pe={"pgtt": 5})


def s_pgtt_fs_without_flts(fpd: bool) -> Scn:
    return scalable(fpd_pe=fpd, overrides={"ecap.FLTS": 0})


def s_pgtt_ss_without_slts(fpd: bool) -> Scn:
    return scalable(pgtt=PGTT_SS, fpd_pe=fpd, overrides={"ecap.SLTS": 0})


def s_pgtt_nested_without_nest(fpd: bool) -> Scn:
    return scalable(pgtt=PGTT_NESTED, fpd_pe=fpd, overrides={"ecap.NEST": 0})


def s_pgtt_pt_without_pt(fpd: bool) -> Scn:
    return scalable(pgtt=PGTT_PT, fpd_pe=fpd, overrides={"ecap.PT": 0})


def s_aw_not_sagaw(fpd: bool) -> Scn:
    return scalable(pgtt=PGTT_SS, fpd_pe=fpd, pe={"aw": 0})


def s_fspm5_without_fl5lp(fpd: bool) -> Scn:
    return scalable(fpd_pe=fpd, fs_levels=5, overrides={"cap.FL5LP": 0})


def s_fspm_reserved(fpd: bool) -> Scn:
    return scalable(fpd_pe=fpd, pe={"fspm": 2})


def s_ere_clear(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd)
    s.exe = True
    return s


def s_sre_clear(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd)
    s.priv = True
    return s


def s_fs_lower_read_err(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd, ram=HostRAM(size=SMALL_RAM))
    s.extra["fs"].set_entry_bits(IOVA, 4, *_retarget(NOT_MEMORY))
    return s


def s_fs_not_present(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd)
    s.iova = IOVA + K4
    return s


def s_fs_not_present_pml4e(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd)
    s.iova = 0x7F00_0000_0000
    s.access = "w"
    return s


def s_fs_ps_in_pml4e(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd)
    s.extra["fs"].set_entry_bits(IOVA, 4, 1 << 7)
    return s


def s_fs_1g_without_fl1gp(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd, overrides={"cap.FL1GP": 0}, map_=False)
    s.extra["fs"].map(0x4000_0000, 0x1_4000_0000, PAGE_1G, W | U, page_size=PAGE_1G)
    s.iova = 0x4000_0000 + 0x7000
    return s


def s_fs_2m_rsvd(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd, map_=False)
    s.extra["fs"].map(0x20_0000, 0x4060_0000, PAGE_2M, W | U, page_size=PAGE_2M)
    s.extra["fs"].set_entry_bits(0x20_0000, 2, 1 << 15)
    s.iova = 0x20_0000
    return s


def s_fs_addr_above_haw(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd, cfg_kw={"haw": 40})
    s.extra["fs"].set_entry_bits(IOVA, 1, 1 << 47)
    return s


def s_fsptptr_read_err(fpd: bool) -> Scn:
    return scalable(fpd_pe=fpd, ram=HostRAM(size=SMALL_RAM), pe={"fsptptr": NOT_MEMORY})


def s_nested_fs_root_beyond_ss(fpd: bool) -> Scn:
    return scalable(pgtt=PGTT_NESTED, fpd_pe=fpd, pe={"fsptptr": 1 << 48})  # 4-level SS: 48-bit GPAs


def s_nested_fs_root_ss_denied(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_NESTED, fpd_pe=fpd)
    s.extra["ss"].protect(s.extra["fs"].root, K4, W)  # the FS root page: write-only in the SS
    return s


def s_nested_fs_root_ss_unmapped(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_NESTED, fpd_pe=fpd)
    s.extra["ss"].unmap(s.extra["fs"].root, K4)
    return s


def s_nested_fs_table_ss_denied(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_NESTED, fpd_pe=fpd)
    fs = s.extra["fs"]
    pt_gpa = fs.mem.read_u64(fs.entry_addr(IOVA, 2)) & ADDR_51_12  # the last-level FS table's GPA
    s.extra["ss"].protect(pt_gpa, K4, W)
    return s


def s_nested_fs_ad_ss_denied(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_NESTED, fpd_pe=fpd)
    s.extra["ss"].protect(GPA_BASE, 64 * K4, R)  # every FS table read-only in the SS; A bits are clear
    return s


def s_nested_final_gpa_beyond_ss(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_NESTED, fpd_pe=fpd, ss_levels=4)
    s.extra["fs"].map(IOVA + K4, 1 << 49, K4, W | U)  # GPA beyond the 48-bit second stage
    s.iova = IOVA + K4
    return s


def s_nested_final_gpa_unmapped(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_NESTED, fpd_pe=fpd)
    s.extra["fs"].map(IOVA + K4, 0x6000_0000, K4, W | U)  # GPA the SS does not map
    s.iova = IOVA + K4
    return s


def s_ss_lower_read_err(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_SS, fpd_pe=fpd, ram=HostRAM(size=SMALL_RAM))
    s.extra["ss"].set_entry_bits(IOVA, 3, *_retarget(NOT_MEMORY))
    return s


def s_ss_not_present(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_SS, fpd_pe=fpd)
    s.iova = IOVA + K4
    return s


def s_ss_write_ro(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_SS, fpd_pe=fpd, ss_perms=R)
    s.access = "w"
    return s


def s_ss_read_wo(fpd: bool) -> Scn:
    return scalable(pgtt=PGTT_SS, fpd_pe=fpd, ss_perms=W)


def s_ss_rsvd(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_SS, fpd_pe=fpd)
    s.extra["ss"].set_entry_bits(IOVA, 4, 1 << 7)  # PS in an SS PML4E
    return s


def s_ss_rsvd_1g_without_sllps(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_SS, fpd_pe=fpd, overrides={"cap.SLLPS": 0b01}, map_=False)
    s.extra["ss"].map(0x4000_0000, 0x1_4000_0000, PAGE_1G, R | W, page_size=PAGE_1G)
    s.iova = 0x4000_0000
    return s


def s_ssptptr_invalid(fpd: bool) -> Scn:
    return scalable(pgtt=PGTT_SS, fpd_pe=fpd, ram=HostRAM(size=SMALL_RAM), pe={"ssptptr": NOT_MEMORY})


def s_non_canonical(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd)
    s.iova = 0x0000_8000_0000_0000  # bit 47 set, 63:48 clear
    return s


def s_non_canonical_5level(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd, fs_levels=5)
    s.iova = 0x0100_0000_0000_0000  # bit 56 set, 63:57 clear
    return s


def s_us_clear(fpd: bool) -> Scn:
    return scalable(fpd_pe=fpd, fs_perms=W)


def s_us_clear_in_table(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd)
    s.extra["fs"].set_entry_bits(IOVA, 3, 0, 1 << 2)  # U/S=0 in the PDPE only
    return s


def s_ss_exec_without_ssee(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_SS, fpd_pe=fpd, ss_perms=R | W | X)
    s.exe = True
    return s


def s_fs_exec_xd(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd, fs_perms=W | U | NX, pe={"ere": True, "nxe": True})
    s.exe = True
    return s


def s_beyond_hw_max(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_SS, fpd_pe=fpd, ss_levels=5)  # modern MGAW: 57 bits
    s.iova = 1 << 57
    return s


def s_pt_beyond_haw(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_PT, fpd_pe=fpd)  # HAW 52
    s.iova = 1 << 52
    return s


def s_beyond_ss_max(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_SS, fpd_pe=fpd, ss_levels=3)  # a 39-bit SS table on a 57-bit unit
    s.iova = 1 << 40
    return s


def s_fs_write_ro(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd, fs_perms=U)
    s.access = "w"
    return s


def s_fs_write_ro_in_table(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd)
    s.extra["fs"].set_entry_bits(IOVA, 2, 0, 1 << 1)  # R/W=0 in the PDE only
    s.access = "rw"
    return s


def s_fs_intr_range(fpd: bool) -> Scn:
    s = scalable(fpd_pe=fpd, map_=False)
    s.extra["fs"].map(IOVA, 0xFEE0_1000, K4, W | U)
    return s


def s_ss_intr_range(fpd: bool) -> Scn:
    s = scalable(pgtt=PGTT_SS, fpd_pe=fpd, map_=False)
    s.extra["ss"].map(IOVA, 0xFEEF_F000, K4, R | W)
    s.access = "w"
    return s


def s_ad_write_fail(fpd: bool) -> Scn:
    ram = ProtectedRAM()
    s = scalable(fpd_pe=fpd, ram=ram)
    fs = s.extra["fs"]
    leaf = fs.entry_addr(IOVA, 1)
    ram.protected = (leaf & ~0xFFF, (leaf & ~0xFFF) + K4)  # the leaf FS table page: A cannot be set
    return s


def s_no_pasid_uses_rid_pasid(fpd: bool) -> Scn:
    # A request without PASID walks RID_PASID's entry; the fault record has PP=0.
    s = scalable(fpd_pe=fpd, pasid=None)
    s.iova = IOVA + K4
    return s


@dataclass(frozen=True)
class Case:
    make: Callable[[bool], Scn]
    code: int
    qualified: bool


# Qualification per vtd-facts §7 (QEMU's table) and docs/specs.md for codes without a source value.
LEGACY_CASES: dict[str, Case] = {
    "0x01-root-p": Case(l_root_p, 0x01, False),
    "0x02-ctx-p": Case(l_ctx_p, 0x02, True),
    "0x03-aw-0-not-in-sagaw": Case(l_aw_not_sagaw, 0x03, True),
    "0x03-aw-4-not-in-sagaw": Case(l_aw4_not_sagaw, 0x03, True),
    "0x03-aw-48-on-39-bit-unit": Case(l_aw48_on_39bit_unit, 0x03, True),
    "0x03-tt-3": Case(l_tt3, 0x03, True),
    "0x03-tt-1-without-dt": Case(l_tt1_without_dt, 0x03, True),
    "0x03-tt-2-without-pt": Case(l_tt2_without_pt, 0x03, True),
    "0x03-top-table-not-memory": Case(l_top_table_not_memory, 0x03, True),
    "0x04-beyond-agaw": Case(l_beyond_agaw, 0x04, True),
    "0x04-beyond-mgaw": Case(l_beyond_mgaw, 0x04, True),
    "0x05-write-without-w": Case(l_write_no_w, 0x05, True),
    "0x05-atomic-without-w": Case(l_atomic_no_w, 0x05, True),
    "0x05-write-not-present": Case(l_write_not_present, 0x05, True),
    "0x06-read-without-r": Case(l_read_no_r, 0x06, True),
    "0x06-read-not-present": Case(l_read_not_present, 0x06, True),
    "0x05-write-denied-in-pdpe": Case(l_write_denied_in_table, 0x05, True),
    "0x06-read-denied-in-pml4e": Case(l_read_denied_in_table, 0x06, True),
    "0x0c-ps-in-pml5e": Case(l_ps_in_pml5e, 0x0C, True),
    "0x07-lower-table-not-memory": Case(l_lower_read_err, 0x07, True),
    "0x08-root-table-not-memory": Case(l_root_read_err, 0x08, False),
    "0x09-context-table-not-memory": Case(l_ctx_read_err, 0x09, False),
    "0x0a-root-rsvd-qw0": Case(l_root_rsvd_lo, 0x0A, False),
    "0x0a-root-rsvd-qw1": Case(l_root_rsvd_hi, 0x0A, False),
    "0x0b-ctx-rsvd-bit4": Case(l_ctx_rsvd_lo, 0x0B, False),
    "0x0b-ctx-rsvd-bit71": Case(l_ctx_rsvd_bit71, 0x0B, False),
    "0x0b-ctx-rsvd-bit100": Case(l_ctx_rsvd_hi, 0x0B, False),
    "0x0b-ctx-slptptr-above-haw": Case(l_ctx_ptr_above_haw, 0x0B, False),
    "0x0c-1g-leaf-without-sllps-1g": Case(l_1g_without_sllps, 0x0C, True),
    "0x0c-2m-leaf-without-sllps": Case(l_2m_without_sllps, 0x0C, True),
    "0x0c-ps-in-pml4e": Case(l_ps_in_pml4e, 0x0C, True),
    "0x0c-snp-without-sc": Case(l_snp_without_sc, 0x0C, True),
    "0x0c-snp-in-non-leaf": Case(l_snp_in_nonleaf, 0x0C, True),
    "0x0c-tm-without-dt": Case(l_tm_without_dt, 0x0C, True),
    "0x0c-leaf-addr-above-haw": Case(l_leaf_addr_above_haw, 0x0C, True),
    "0x0c-table-addr-above-haw": Case(l_table_addr_above_haw, 0x0C, True),
    "0x0c-2m-leaf-low-addr-bits": Case(l_2m_leaf_low_addr_bits, 0x0C, True),
    "0x0e-interrupt-range": Case(l_intr_range, 0x0E, True),
    "0x0e-interrupt-range-2m-leaf": Case(l_intr_range_in_2m_leaf, 0x0E, True),
    "0x30-ttm-reserved": Case(l_ttm_reserved, 0x30, False),
    "0x30-ttm-abort-without-adms": Case(l_ttm_abort_without_adms, 0x30, False),
    "0x31-pasid-request-in-legacy-mode": Case(l_pasid_request, 0x31, False),
}

SCALABLE_CASES: dict[str, Case] = {
    "0x38-root-table-not-memory": Case(s_root_read_err, 0x38, False),
    "0x39-lp-clear": Case(s_lp_clear, 0x39, False),
    "0x39-up-clear": Case(s_up_clear, 0x39, False),
    "0x3a-root-rsvd-lower": Case(s_root_rsvd, 0x3A, False),
    "0x3a-root-rsvd-upper": Case(s_root_rsvd_upper, 0x3A, False),
    "0x40-context-table-not-memory": Case(s_ctx_read_err, 0x40, False),
    "0x41-ctx-p": Case(s_ctx_p, 0x41, False),
    "0x42-ctx-rsvd-bit6": Case(s_ctx_rsvd, 0x42, False),
    "0x42-ctx-rsvd-qw3": Case(s_ctx_rsvd_qw3, 0x42, False),
    "0x42-ctx-rid-pasid-without-rps": Case(s_ctx_rid_pasid_without_rps, 0x42, False),
    "0x45-paside-clear": Case(s_paside_clear, 0x45, False),
    "0x46-pasid-beyond-pdts": Case(s_pasid_beyond_pdts, 0x46, False),
    "0x50-pasid-dir-not-memory": Case(s_pdir_read_err, 0x50, False),
    "0x51-pasid-dir-p": Case(s_pdir_p, 0x51, True),
    "0x52-pasid-dir-rsvd": Case(s_pdir_rsvd, 0x52, True),
    "0x58-pasid-table-not-memory": Case(s_ptable_read_err, 0x58, False),
    "0x59-pasid-entry-p": Case(s_pe_p, 0x59, True),
    "0x5a-pasid-entry-rsvd-bit10": Case(s_pe_rsvd, 0x5A, True),
    "0x5a-pasid-entry-rsvd-bit292": Case(s_pe_rsvd_high, 0x5A, True),
    "0x5b-pgtt-0": Case(s_pgtt0, 0x5B, True),
    "0x5b-pgtt-5": Case(s_pgtt5, 0x5B, True),
    "0x5b-pgtt-fs-without-flts": Case(s_pgtt_fs_without_flts, 0x5B, True),
    "0x5b-pgtt-ss-without-slts": Case(s_pgtt_ss_without_slts, 0x5B, True),
    "0x5b-pgtt-nested-without-nest": Case(s_pgtt_nested_without_nest, 0x5B, True),
    "0x5b-pgtt-pt-without-pt": Case(s_pgtt_pt_without_pt, 0x5B, True),
    "0x5b-aw-not-in-sagaw": Case(s_aw_not_sagaw, 0x5B, True),
    "0x5b-fspm-5-level-without-fl5lp": Case(s_fspm5_without_fl5lp, 0x5B, True),
    "0x5b-fspm-reserved": Case(s_fspm_reserved, 0x5B, True),
    "0x5c-ere-clear": Case(s_ere_clear, 0x5C, True),
    "0x5d-sre-clear": Case(s_sre_clear, 0x5D, True),
    "0x70-fs-table-not-memory": Case(s_fs_lower_read_err, 0x70, True),
    "0x71-fs-pte-not-present": Case(s_fs_not_present, 0x71, True),
    "0x71-fs-pml4e-not-present": Case(s_fs_not_present_pml4e, 0x71, True),
    "0x72-fs-ps-in-pml4e": Case(s_fs_ps_in_pml4e, 0x72, True),
    "0x72-fs-1g-without-fl1gp": Case(s_fs_1g_without_fl1gp, 0x72, True),
    "0x72-fs-2m-leaf-rsvd": Case(s_fs_2m_rsvd, 0x72, True),
    "0x72-fs-addr-above-haw": Case(s_fs_addr_above_haw, 0x72, True),
    "0x73-fsptptr-not-memory": Case(s_fsptptr_read_err, 0x73, True),
    "0x74-nested-fs-root-beyond-ss": Case(s_nested_fs_root_beyond_ss, 0x74, True),
    "0x75-nested-fs-root-ss-no-read": Case(s_nested_fs_root_ss_denied, 0x75, True),
    "0x75-nested-fs-root-ss-unmapped": Case(s_nested_fs_root_ss_unmapped, 0x75, True),
    "0x76-nested-fs-table-ss-no-read": Case(s_nested_fs_table_ss_denied, 0x76, True),
    "0x77-nested-fs-ad-ss-no-write": Case(s_nested_fs_ad_ss_denied, 0x77, True),
    "0x78-ss-table-not-memory": Case(s_ss_lower_read_err, 0x78, True),
    "0x79-ss-not-present": Case(s_ss_not_present, 0x79, True),
    "0x79-ss-write-read-only": Case(s_ss_write_ro, 0x79, True),
    "0x79-ss-read-write-only": Case(s_ss_read_wo, 0x79, True),
    "0x79-nested-final-gpa-unmapped": Case(s_nested_final_gpa_unmapped, 0x79, True),
    "0x7a-ss-ps-in-pml4e": Case(s_ss_rsvd, 0x7A, True),
    "0x7a-ss-1g-without-sllps-1g": Case(s_ss_rsvd_1g_without_sllps, 0x7A, True),
    "0x7b-ssptptr-not-memory": Case(s_ssptptr_invalid, 0x7B, True),
    "0x80-non-canonical-4-level": Case(s_non_canonical, 0x80, True),
    "0x80-non-canonical-5-level": Case(s_non_canonical_5level, 0x80, True),
    "0x81-us-clear-leaf": Case(s_us_clear, 0x81, True),
    "0x81-us-clear-table": Case(s_us_clear_in_table, 0x81, True),
    "0x82-ss-exec-without-ssee": Case(s_ss_exec_without_ssee, 0x82, True),
    "0x82-fs-exec-xd": Case(s_fs_exec_xd, 0x82, True),
    "0x83-beyond-mgaw": Case(s_beyond_hw_max, 0x83, True),
    "0x83-pass-through-beyond-haw": Case(s_pt_beyond_haw, 0x83, True),
    "0x84-beyond-ss-width": Case(s_beyond_ss_max, 0x84, True),
    "0x84-nested-final-gpa-beyond-ss": Case(s_nested_final_gpa_beyond_ss, 0x84, True),
    "0x85-fs-write-read-only": Case(s_fs_write_ro, 0x85, True),
    "0x85-fs-atomic-read-only-table": Case(s_fs_write_ro_in_table, 0x85, True),
    "0x87-fs-interrupt-range": Case(s_fs_intr_range, 0x87, True),
    "0x87-ss-interrupt-range": Case(s_ss_intr_range, 0x87, True),
    "0x91-fs-ad-write-fails": Case(s_ad_write_fail, 0x91, True),
    "0x71-request-without-pasid": Case(s_no_pasid_uses_rid_pasid, 0x71, True),
}

ALL_CASES = {**LEGACY_CASES, **SCALABLE_CASES}


def test_fault_reason_table_agrees_with_cases() -> None:
    """The qualification this file expects (fact sheet) is what specs/faults.yaml says."""
    table = specs().faults
    for name, case in ALL_CASES.items():
        assert case.code in table, name
        assert table[case.code].qualified == case.qualified, f"{name}: {case.code:#x}"


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_fault_recorded(name: str) -> None:
    case = ALL_CASES[name]
    s = case.make(False)
    res = s.go()
    assert isinstance(res, Fault), f"expected fault {case.code:#x}, got {res}"
    assert res.reason == case.code, f"got {res.reason:#x} ({res.name}), expected {case.code:#x}"
    assert res.recorded
    recs = frcds(s.io)
    assert len(recs) == 1
    r = recs[0]
    assert r.fr == case.code
    assert r.sid == s.sid
    # FI is the page address; bits above the guest address width (MGAW + 1) read as zero
    assert r.fi == s.iova & ~0xFFF & ((1 << (s.io.mgaw + 1)) - 1)
    # T: 0 = write, 1 = read or AtomicOp
    assert r.t == (0 if s.access == "w" else 1)
    if s.pasid is None:
        assert (r.pp, r.pv) == (0, 0)
    else:
        assert (r.pp, r.pv) == (1, s.pasid)
    assert r.priv == int(s.priv)
    assert r.exe == int(s.exe)
    fsts = s.io.mmio_read(FSTS, 4)
    assert fsts & PPF
    assert (fsts >> 8) & 0xFF == r.index == 0
    # A DMA through the same faulting path records the same reason per chunk (here: one more record,
    # unless it is dropped because the same source is already pending — not by default).
    if s.access == "r" and not s.exe:  # dma_read issues plain reads
        out = s.io.dma_read(s.sid, s.iova, 16, pasid=s.pasid, priv=s.priv)
        assert out.faults == (case.code,)
        assert out.data == bytes(16)


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_fpd(name: str) -> None:
    """With FPD set, qualified faults are neither recorded nor signalled; others still are."""
    case = ALL_CASES[name]
    s = case.make(True)
    s.io.mmio_write(FECTL, 0, 4)  # unmask: a recorded fault would send an interrupt
    res = s.go()
    assert isinstance(res, Fault)
    assert res.reason == case.code
    if case.qualified:
        assert not res.recorded
        assert frcds(s.io) == []
        assert s.io.mmio_read(FSTS, 4) & PPF == 0
        assert s.io.interrupts == []
    else:
        assert res.recorded
        assert [r.fr for r in frcds(s.io)] == [case.code]
        assert len(s.io.interrupts) == 1


# -- positive controls: the knobs the fault cases turn are the only thing wrong ----------------------


@pytest.mark.parametrize("kind,kw", [
    ("legacy-tt1-with-dt", dict(ctx={"tt": 1})),
    ("legacy-tt2", dict(ctx={"tt": 2})),
    ("legacy-snp-with-sc", dict()),
    ("legacy-3-level", dict(levels=3)),
    ("legacy-5-level", dict(levels=5)),
])
def test_legacy_controls_translate(kind: str, kw: dict[str, Any]) -> None:
    s = legacy(**kw)
    if kind == "legacy-snp-with-sc":
        s.extra["ss"].set_entry_bits(IOVA, 1, 1 << 11)
    res = s.go()
    assert isinstance(res, Translation), res
    assert res.addr == (IOVA if kind == "legacy-tt2" else HPA)
    assert frcds(s.io) == []


@pytest.mark.parametrize("pgtt", [PGTT_FS, PGTT_SS, PGTT_NESTED, PGTT_PT])
@pytest.mark.parametrize("pasid", [PASID, None])
def test_scalable_controls_translate(pgtt: int, pasid: int | None) -> None:
    s = scalable(pgtt=pgtt, pasid=pasid)
    res = s.go()
    assert isinstance(res, Translation), res
    assert res.addr == (IOVA if pgtt == PGTT_PT else HPA)
    assert frcds(s.io) == []


def test_1g_leaf_translates_with_sllps() -> None:
    s = legacy(map_=False)
    s.extra["ss"].map(0x4000_0000, 0x1_4000_0000, PAGE_1G, R | W, page_size=PAGE_1G)
    res = s.io.translate(SID, 0x4000_0000 + 0x12_3456)
    assert isinstance(res, Translation) and res.addr == 0x1_4012_3456 and res.page_size == PAGE_1G


def test_interrupt_range_only_for_pages_inside_it() -> None:
    """A 2 MiB leaf overlapping the interrupt window: pages outside 0xFEE00000-0xFEEFFFFF translate."""
    s = legacy(map_=False)
    s.extra["ss"].map(0x4000_0000, 0xFEE0_0000, PAGE_2M, R | W, page_size=PAGE_2M)
    ok = s.io.translate(SID, 0x4000_0000 + 0x10_0000)  # -> 0xFEF0_0000
    assert isinstance(ok, Translation) and ok.addr == 0xFEF0_0000
    bad = s.io.translate(SID, 0x4000_0000 + 0x8_0000)
    assert isinstance(bad, Fault) and bad.reason == 0x0E


@pytest.mark.parametrize("where", ["ctx", "dir", "pe"])
def test_scalable_fpd_is_or_of_three_levels(where: str) -> None:
    s = scalable(fpd_ctx=where == "ctx", fpd_dir=where == "dir", fpd_pe=where == "pe")
    s.iova = IOVA + K4  # not mapped: 0x71
    res = s.go()
    assert isinstance(res, Fault) and res.reason == 0x71 and not res.recorded
    assert frcds(s.io) == []
    # The same walk for a PASID whose entry has no FPD (and a directory entry without FPD) records,
    # unless the FPD that applies is the context's.
    s2 = scalable(fpd_ctx=where == "ctx", fpd_dir=where == "dir", fpd_pe=where == "pe")
    pt = s2.extra["pt"]
    other = 0x1000  # a different directory entry and PASID table
    pt.set_entry(other, pgtt=PGTT_FS, did=DID, fsptptr=s2.extra["fs"].root)
    res2 = s2.io.translate(SID, IOVA + K4, pasid=other)
    assert isinstance(res2, Fault) and res2.reason == 0x71
    assert res2.recorded == (where != "ctx")


def test_t_bit_per_access() -> None:
    s = legacy(map_=False)
    for i, access in enumerate(["r", "w", "rw"]):
        res = s.io.translate(SID, IOVA + i * K4, access)
        assert isinstance(res, Fault)
    recs = frcds(s.io)
    assert [(r.fi, r.t, r.fr) for r in recs] == [(IOVA, 1, 0x06), (IOVA + K4, 0, 0x05), (IOVA + 2 * K4, 1, 0x05)]


def test_supervisor_fault_records_priv() -> None:
    s = scalable(pe={"sre": True}, fs_perms=U)  # read-only page; WPE=1 makes supervisor writes honour R/W
    s.io.translate(SID, IOVA, "w", pasid=PASID, priv=True)  # WPE=0: a supervisor write is allowed
    assert frcds(s.io) == []
    s2 = scalable(pe={"sre": True, "wpe": True}, fs_perms=U)
    res = s2.io.translate(SID, IOVA, "w", pasid=PASID, priv=True)
    assert isinstance(res, Fault) and res.reason == 0x85
    (r,) = frcds(s2.io)
    assert (r.priv, r.pp, r.pv, r.t) == (1, 1, PASID, 0)


def test_ad_update_happens_when_memory_is_writable() -> None:
    """Control for 0x91: the same walk on plain RAM sets A in every FS entry and D in the leaf on write."""
    s = scalable()
    fs = s.extra["fs"]
    assert isinstance(s.io.translate(SID, IOVA, "w", pasid=PASID), Translation)
    for lvl in (4, 3, 2, 1):
        assert s.ram.read_u64(fs.entry_addr(IOVA, lvl)) & 0x20, lvl
    assert s.ram.read_u64(fs.entry_addr(IOVA, 1)) & 0x40


def test_ad_write_fail_not_reached_when_bits_already_set() -> None:
    """With A already set in every entry, a read needs no A/D write: protected tables are fine."""
    ram = ProtectedRAM()
    s = scalable(ram=ram)
    fs = s.extra["fs"]
    for lvl in (4, 3, 2, 1):
        fs.set_entry_bits(IOVA, lvl, 0x20)
    leaf = fs.entry_addr(IOVA, 1)
    ram.protected = (leaf & ~0xFFF, (leaf & ~0xFFF) + K4)
    assert isinstance(s.io.translate(SID, IOVA, "r", pasid=PASID), Translation)
    res = s.io.translate(SID, IOVA, "w", pasid=PASID)  # needs D in the protected leaf
    assert isinstance(res, Fault) and res.reason == 0x91


# -- fault recording ------------------------------------------------------------------------------


def faulting_legacy(nfr: int | None = None, overrides: dict[str, int] | None = None, **cfg_kw: Any) -> Scn:
    """Legacy unit where every device on bus 0 has P=0 context entries (each request faults 0x2)."""
    ram = HostRAM()
    alloc = PageAllocator(ram)
    rt = LegacyRootTable(ram, alloc)
    rt.set_root_present(0, True)
    overrides = dict(overrides or {})
    if nfr is not None:
        overrides["cap.NFR"] = nfr - 1
    io = VtdIommu(ram, VtdConfig.preset("modern", overrides=overrides, **cfg_kw))
    enable_translation(io, rt.root)
    return Scn(io, ram, alloc)


def fault(io: VtdIommu, sid: int, page: int = 0) -> Fault:
    res = io.translate(sid, page * K4)
    assert isinstance(res, Fault)
    return res


def test_frcd_round_robin_and_fri() -> None:
    s = faulting_legacy()  # modern: NFR+1 = 8
    io = s.io
    base, n = frcd_geometry(io)
    assert (base, n) == (0x220, 8)
    for i in range(3):
        assert fault(io, 0x10 + i, i).recorded
    recs = frcds(io)
    assert [(r.index, r.sid, r.fi) for r in recs] == [(i, 0x10 + i, i * K4) for i in range(3)]
    fsts = io.mmio_read(FSTS, 4)
    assert fsts & PPF and (fsts >> 8) & 0xFF == 0
    # Clearing one record keeps PPF (others pending); writing 0 to F changes nothing.
    io.mmio_write(base + 12, 0, 4)
    assert len(frcds(io)) == 3
    clear_frcd(io, 0)
    assert [r.index for r in frcds(io)] == [1, 2]
    assert io.mmio_read(FSTS, 4) & PPF
    clear_frcd(io, 1)
    clear_frcd(io, 2)
    assert frcds(io) == []
    assert io.mmio_read(FSTS, 4) & PPF == 0
    # The next fault goes to the next record in turn (3), not back to 0, and FRI points at it.
    assert fault(io, 0x20, 9).recorded
    assert [(r.index, r.sid) for r in frcds(io)] == [(3, 0x20)]
    assert (io.mmio_read(FSTS, 4) >> 8) & 0xFF == 3
    # ... and the index wraps after NFR: fill 4..7, then 0.
    for i in range(5):
        assert fault(io, 0x30 + i, i).recorded
    assert [r.index for r in frcds(io)] == [0, 3, 4, 5, 6, 7]
    assert (io.mmio_read(FSTS, 4) >> 8) & 0xFF == 3  # FRI stays at the first pending record


def test_pfo_overflow_and_recovery() -> None:
    s = faulting_legacy(nfr=2)
    io = s.io
    base, n = frcd_geometry(io)
    assert n == 2
    assert fault(io, 0x10).recorded and fault(io, 0x11).recorded
    assert io.mmio_read(FSTS, 4) & PFO == 0
    third = fault(io, 0x12)
    assert not third.recorded
    assert io.mmio_read(FSTS, 4) & PFO
    assert [r.sid for r in frcds(io)] == [0x10, 0x11]  # the records are untouched
    # While PFO is set nothing is recorded, even into a free record.
    clear_frcd(io, 0)
    assert not fault(io, 0x13).recorded
    assert [r.sid for r in frcds(io)] == [0x11]
    # PFO is RW1C: writing 0 keeps it, writing 1 clears it; then recording resumes at the next index.
    io.mmio_write(FSTS, 0, 4)
    assert io.mmio_read(FSTS, 4) & PFO
    io.mmio_write(FSTS, PFO, 4)
    assert io.mmio_read(FSTS, 4) & PFO == 0
    assert fault(io, 0x14).recorded
    assert {r.sid for r in frcds(io)} == {0x11, 0x14}


def test_ppf_is_or_of_f_and_read_only() -> None:
    s = faulting_legacy(nfr=4)
    io = s.io
    io.mmio_write(FSTS, PPF, 4)  # RO: no effect
    assert io.mmio_read(FSTS, 4) & PPF == 0
    fault(io, 0x10)
    fault(io, 0x11)
    io.mmio_write(FSTS, 0xFFFF_FFFF, 4)  # RW1C bits cleared, PPF stays (records still pending)
    assert io.mmio_read(FSTS, 4) & PPF
    clear_frcd(io, 1)
    assert io.mmio_read(FSTS, 4) & PPF
    clear_frcd(io, 0)
    assert io.mmio_read(FSTS, 4) & PPF == 0


def test_fault_event_unmasked_sends_msi() -> None:
    s = faulting_legacy()
    io = s.io
    assert io.mmio_read(FECTL, 4) == IM  # reset: masked
    io.mmio_write(FEDATA, 0x4321, 4)
    io.mmio_write(FEADDR, 0xFEE0_1000, 4)
    io.mmio_write(FEUADDR, 0x12, 4)  # modern has ECAP.EIM: the upper address is used
    io.mmio_write(FECTL, 0, 4)
    fault(io, 0x10)
    assert len(io.interrupts) == 1
    irq = io.interrupts[0]
    assert irq.source == "fault"
    assert irq.addr == 0x12_FEE0_1000
    assert irq.data == 0x4321
    assert io.mmio_read(FECTL, 4) & IP == 0
    # Another fault while PPF is still set: recorded but no new event.
    assert fault(io, 0x11).recorded
    assert len(io.interrupts) == 1
    # Once everything is cleared, the next fault is a new event.
    clear_frcd(io, 0)
    clear_frcd(io, 1)
    fault(io, 0x12)
    assert len(io.interrupts) == 2


def test_fault_event_masked_sets_ip_then_delivers_on_unmask() -> None:
    s = faulting_legacy()
    io = s.io
    io.mmio_write(FEDATA, 0x55, 4)
    io.mmio_write(FEADDR, 0xFEE0_0000, 4)
    fault(io, 0x10)
    assert io.interrupts == []
    assert io.mmio_read(FECTL, 4) == IM | IP
    io.mmio_write(FECTL, IM, 4)  # writing IP (RO) or keeping the mask changes nothing
    io.mmio_write(FECTL, IM | IP, 4)
    assert io.interrupts == [] and io.mmio_read(FECTL, 4) == IM | IP
    io.mmio_write(FECTL, 0, 4)  # unmask: the pending message goes out, IP clears
    assert len(io.interrupts) == 1
    assert (io.interrupts[0].addr & 0xFFFF_FFFF, io.interrupts[0].data) == (0xFEE0_0000, 0x55)
    assert io.mmio_read(FECTL, 4) == 0


def test_fault_event_ip_cleared_when_software_clears_the_faults() -> None:
    s = faulting_legacy()
    io = s.io
    fault(io, 0x10)
    assert io.mmio_read(FECTL, 4) & IP
    clear_frcd(io, 0)
    assert io.mmio_read(FECTL, 4) & IP == 0
    io.mmio_write(FECTL, 0, 4)
    assert io.interrupts == []  # nothing left to deliver


def test_fault_event_on_overflow() -> None:
    """An overflow while a record is pending (PPF=1) sets PFO but raises no second event."""
    s = faulting_legacy(nfr=1)
    io = s.io
    io.mmio_write(FECTL, 0, 4)
    fault(io, 0x10)
    assert len(io.interrupts) == 1
    fault(io, 0x11)  # overflow while PPF is pending: no new event
    assert io.mmio_read(FSTS, 4) & PFO and len(io.interrupts) == 1


@pytest.mark.parametrize("collapse", [False, True])
def test_same_source_collapse_only_when_configured(collapse: bool) -> None:
    s = faulting_legacy(fault_collapse=collapse)
    io = s.io
    assert fault(io, 0x10, 0).recorded
    second = fault(io, 0x10, 1)
    assert second.recorded == (not collapse)
    assert fault(io, 0x11, 2).recorded  # another source always records
    sids = [r.sid for r in frcds(io)]
    assert sids == ([0x10, 0x11] if collapse else [0x10, 0x10, 0x11])
    # Once the source's record is cleared, the source records again.
    clear_frcd(io, 0)
    assert fault(io, 0x10, 3).recorded


def test_dma_records_one_fault_per_faulting_page() -> None:
    s = legacy()
    # [IOVA, IOVA+4K) is mapped; the next two pages are not.
    out = s.io.dma_write(SID, IOVA + 0x800, bytes(range(256)) * 32)  # 8 KiB from the middle of the page
    assert out.faults == (0x05, 0x05)
    assert s.ram.read(HPA + 0x800, 0x800) == (bytes(range(256)) * 8)
    assert [r.fi for r in frcds(s.io)] == [IOVA + K4, IOVA + 2 * K4]


def test_without_rps_requests_without_pasid_use_pasid_0() -> None:
    """Without ECAP.RPS the RID_PASID field is reserved and requests without PASID use PASID 0."""
    s = scalable(overrides={"ecap.RPS": 0}, ctx={"rid_pasid": 0}, pasid=None)
    res = s.go()
    assert isinstance(res, Fault) and res.reason == 0x51  # PASID 0's directory entry is not present
    other = FirstStageTable(s.ram, s.alloc, 4)
    other.map(IOVA, 0x7_0000_0000, K4, W | U)
    s.extra["pt"].set_entry(0, pgtt=PGTT_FS, did=DID + 1, fsptptr=other.root)
    res = s.go()
    assert isinstance(res, Translation) and res.addr == 0x7_0000_0000
    # with RPS (modern) the context's RID_PASID entry is used instead
    res = scalable(pasid=None).go()
    assert isinstance(res, Translation) and res.addr == HPA


@pytest.mark.parametrize("pasid,ok", [(0x1FFF, True), (0x2000, False)])
def test_pdts_boundary(pasid: int, ok: bool) -> None:
    s = scalable()
    if ok:
        s.extra["pt"].set_entry(pasid, pgtt=PGTT_FS, did=DID, fsptptr=s.extra["fs"].root)
    res = s.io.translate(SID, IOVA, pasid=pasid)
    assert isinstance(res, Translation) == ok
    if not ok:
        assert isinstance(res, Fault) and res.reason == 0x46


def test_fault_event_ip_stays_while_pfo_set() -> None:
    """FECTL.IP clears only when PPF and PFO (and the other status bits) are all clear."""
    s = faulting_legacy(nfr=1)
    io = s.io
    fault(io, 0x10)
    fault(io, 0x11)  # overflow
    assert io.mmio_read(FSTS, 4) & (PFO | PPF) == PFO | PPF
    assert io.mmio_read(FECTL, 4) & IP
    clear_frcd(io, 0)
    assert io.mmio_read(FSTS, 4) & (PFO | PPF) == PFO
    assert io.mmio_read(FECTL, 4) & IP
    io.mmio_write(FSTS, PFO, 4)
    assert io.mmio_read(FECTL, 4) & IP == 0


# -- bugs these tests found, now fixed -----------------------------------------------------------------


def test_feuaddr_ignored_without_eim() -> None:
    """Fact sheet §1.8: FEUADDR is the upper MSI address, used only with ECAP.EIM (QEMU, VirtualBox)."""
    io = faulting_legacy(overrides={"ecap.EIM": 0}).io
    io.mmio_write(FEADDR, 0xFEE0_1000, 4)
    io.mmio_write(FEUADDR, 0x12, 4)
    io.mmio_write(FECTL, 0, 4)
    fault(io, 0x10)
    assert [irq.addr for irq in io.interrupts] == [0xFEE0_1000]


def test_fi_drops_bits_above_guest_address_width() -> None:
    s = legacy(overrides={"cap.MGAW": 40})  # guest address width 41
    s.iova = (1 << 41) | 0x5000
    res = s.go()
    assert isinstance(res, Fault) and res.reason == 0x04
    (r,) = frcds(s.io)
    assert r.fi == 0x5000  # QEMU keeps the whole address: profile toggle, covered by the oracle
