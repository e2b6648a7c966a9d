"""Tests of the spec loader (specs/*.yaml -> compiled layouts) and its construct codec.

Expected values are written out by hand from the VT-d fact sheet (vtd-facts.md), never derived from the
YAML under test.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtd_emu.errors import SpecError
from vtd_emu.spec import FaultSpec, Field, Layout, Register, Specs, load_specs, specs, specs_dir
from vtd_emu.spec import codec

QEMU_CAP = 0x00D2008C22260206
QEMU_ECAP = 0xF00F4A
QEMU_ECAP_SCALABLE = 0x480080F00F4A
SHIPPED = Path(__file__).resolve().parents[1] / "specs"


def bits(hi: int, lo: int) -> int:
    return ((1 << (hi - lo + 1)) - 1) << lo


def bit(n: int) -> int:
    return 1 << n


@pytest.fixture(scope="module")
def s() -> Specs:
    return specs()


# ------------------------------------------------------------------------------------------------
# The shipped specs


def test_default_specs_load_and_are_cached(s: Specs, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(s, Specs)
    assert specs() is s
    monkeypatch.delenv("VTD_EMU_SPECS", raising=False)
    # Source checkout: specs/ next to the package; wheel: vtd_emu/_specs.
    assert specs_dir() in (SHIPPED, Path(codec.__file__).resolve().parents[1] / "_specs")
    assert load_specs(specs_dir()).registers.keys() == s.registers.keys()


def test_specs_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VTD_EMU_SPECS", str(tmp_path))
    assert specs_dir() == tmp_path


def test_qemu_cap_decodes(s: Specs) -> None:
    d = s.register("CAP").decode(QEMU_CAP)
    expected = {"ND": 6, "SAGAW": 2, "MGAW": 38, "FRO": 0x22, "SLLPS": 3, "PSI": 1, "NFR": 0,
                "MAMV": 18, "DWD": 1, "DRD": 1, "CM": 0, "RWBF": 0, "ZLR": 0, "PI": 0}
    assert {k: d[k] for k in expected} == expected
    # RsvdZ fields are not part of decode().
    assert not any(k.startswith("RSVD") for k in d)


def test_qemu_ecap_decodes(s: Specs) -> None:
    d = s.register("ECAP").decode(QEMU_ECAP)
    expected = {"QI": 1, "IR": 1, "PT": 1, "IRO": 0xF, "MHMV": 15, "C": 0, "DT": 0, "EIM": 0, "SC": 0,
                "SMTS": 0}
    assert {k: d[k] for k in expected} == expected
    d = s.register("ECAP").decode(QEMU_ECAP_SCALABLE)
    assert (d["SMTS"], d["SLTS"], d["SRS"], d["FLTS"], d["PASID"], d["IRO"]) == (1, 1, 1, 0, 0, 0xF)


def test_all_registers_at_their_offsets(s: Specs) -> None:
    fixed = {
        "VER": (0x000, 32), "CAP": (0x008, 64), "ECAP": (0x010, 64), "GCMD": (0x018, 32),
        "GSTS": (0x01C, 32), "RTADDR": (0x020, 64), "CCMD": (0x028, 64), "FSTS": (0x034, 32),
        "FECTL": (0x038, 32), "FEDATA": (0x03C, 32), "FEADDR": (0x040, 32), "FEUADDR": (0x044, 32),
        "AFLOG": (0x058, 64), "PMEN": (0x064, 32), "PLMBASE": (0x068, 32), "PLMLIMIT": (0x06C, 32),
        "PHMBASE": (0x070, 64), "PHMLIMIT": (0x078, 64), "IQH": (0x080, 64), "IQT": (0x088, 64),
        "IQA": (0x090, 64), "ICS": (0x09C, 32), "IECTL": (0x0A0, 32), "IEDATA": (0x0A4, 32),
        "IEADDR": (0x0A8, 32), "IEUADDR": (0x0AC, 32), "IQERCD": (0x0B0, 64), "IRTA": (0x0B8, 64),
        "PQH": (0x0C0, 64), "PQT": (0x0C8, 64), "PQA": (0x0D0, 64), "PRSTS": (0x0DC, 32),
        "PECTL": (0x0E0, 32), "PEDATA": (0x0E4, 32), "PEADDR": (0x0E8, 32), "PEUADDR": (0x0EC, 32),
        "MTRRCAP": (0x100, 64), "MTRRDEF": (0x108, 64),
    }
    fix_names = ["MTRR_FIX64K_00000", "MTRR_FIX16K_80000", "MTRR_FIX16K_A0000"] + [
        f"MTRR_FIX4K_{base:05X}" for base in range(0xC0000, 0x100000, 0x8000)
    ]
    for i, name in enumerate(fix_names):
        fixed[name] = (0x120 + 8 * i, 64)
    for n in range(10):
        fixed[f"MTRR_PHYSBASE{n}"] = (0x180 + 16 * n, 64)
        fixed[f"MTRR_PHYSMASK{n}"] = (0x188 + 16 * n, 64)
    for name, (offset, size) in fixed.items():
        reg = s.register(name)
        assert (reg.offset, reg.size_bits, reg.offset_expr) == (offset, size, None), name
    assert set(s.registers) == set(fixed) | {"IVA", "IOTLB", "FRCD"}


def test_computed_offsets(s: Specs) -> None:
    assert s.register("FRCD").resolve_offset(QEMU_CAP, QEMU_ECAP) == 0x220
    assert s.register("IVA").resolve_offset(QEMU_CAP, QEMU_ECAP) == 0xF0
    assert s.register("IOTLB").resolve_offset(QEMU_CAP, QEMU_ECAP) == 0xF8
    assert s.register("IVA").offset is None and s.register("IVA").offset_expr == "ecap.IRO*16"
    # VirtualBox's layout: IRO=0xE5, FRO=0xE7, NFR=7.
    vbox_cap = (0xE7 << 24) | (7 << 40)
    vbox_ecap = 0xE5 << 8
    assert s.register("IVA").resolve_offset(vbox_cap, vbox_ecap) == 0xE50
    assert s.register("IOTLB").resolve_offset(vbox_cap, vbox_ecap) == 0xE58
    assert s.register("FRCD").resolve_offset(vbox_cap, vbox_ecap) == 0xE70
    assert s.register("FRCD").resolve_count(vbox_cap, vbox_ecap) == 8
    assert s.register("FRCD").resolve_count(QEMU_CAP, QEMU_ECAP) == 1
    assert s.register("VER").resolve_offset(vbox_cap, vbox_ecap) == 0


def test_register_map_has_no_overlaps(s: Specs) -> None:
    cap = QEMU_CAP | (3 << 40)  # NFR=3 -> four FRCDs
    rmap = s.register_map(cap, QEMU_ECAP)
    frcds = [(off, i) for off, reg, i in rmap if reg.name == "FRCD"]
    assert frcds == [(0x220, 0), (0x230, 1), (0x240, 2), (0x250, 3)]
    assert [off for off, _, _ in rmap] == sorted(off for off, _, _ in rmap)
    assert len(rmap) == len(s.registers) + 3
    for (a_off, a, _), (b_off, b, _) in zip(rmap, rmap[1:]):
        assert a_off + a.size_bits // 8 <= b_off, f"{a.name}@{a_off:#x} overlaps {b.name}@{b_off:#x}"
    offsets = {reg.name: off for off, reg, i in rmap if i == 0}
    assert (offsets["IVA"], offsets["IOTLB"], offsets["PEUADDR"]) == (0xF0, 0xF8, 0xEC)


def test_register_access_masks(s: Specs) -> None:
    fsts = s.register("FSTS").masks()
    assert fsts["RW1C"] == 0b0111_1101  # PFO AFO APF IQE ICE ITE
    assert fsts["RO"] == bit(1) | bits(15, 8)  # PPF FRI
    assert fsts["RsvdZ"] == bit(7) | bits(31, 16)
    gcmd = s.register("GCMD").masks()
    assert (gcmd["WO"], gcmd["RsvdZ"], gcmd["RW"]) == (bits(31, 23), bits(22, 0), 0)
    assert s.register("GSTS").masks()["RO"] == bits(31, 23)
    ccmd = s.register("CCMD").masks()
    assert ccmd["RO"] == bits(60, 59) and ccmd["RW"] == bit(63) | bits(62, 61) | bits(33, 0)
    iotlb = s.register("IOTLB").masks()
    assert iotlb["RO"] == bits(58, 57)
    assert iotlb["RW"] == bit(63) | bits(61, 60) | bits(49, 48) | bits(47, 32)
    frcd = s.register("FRCD").masks()
    assert frcd["RW1C"] == bit(127) and frcd["RsvdZ"] == bits(11, 0) | bits(91, 80)
    assert s.register("ICS").masks()["RW1C"] == 1
    assert s.register("PRSTS").masks()["RW1C"] == 0b11
    fectl = s.register("FECTL").masks()
    assert (fectl["RW"], fectl["RO"]) == (bit(31), bit(30))
    assert s.register("CAP").masks()["RsvdZ"] == bits(15, 13) | bit(23) | bit(38) | bits(58, 57)
    assert s.register("IVA").masks()["WO"] == bits(63, 12) | bits(6, 0)
    # masks() is a copy: callers cannot corrupt the compiled table.
    s.register("FSTS").masks()["RO"] = 0
    assert s.register("FSTS").masks()["RO"] == fsts["RO"]


def test_every_register_is_partitioned_by_access(s: Specs) -> None:
    for reg in s.registers.values():
        masks = reg.masks()
        assert set(masks) == {"RO", "RW", "RW1C", "WO", "RsvdZ"}
        union = 0
        for m in masks.values():
            assert union & m == 0, reg.name
            union |= m
        assert union == (1 << reg.size_bits) - 1, reg.name


def test_resets(s: Specs) -> None:
    assert s.register("VER").reset == 0x10
    assert s.register("CAP").reset is None and s.register("ECAP").reset is None
    assert s.register("FECTL").reset == 0x8000_0000
    assert s.register("IECTL").reset == 0x8000_0000
    assert s.register("GSTS").reset == 0 and s.register("FRCD").reset == 0


def test_named_fields_from_fact_sheet(s: Specs) -> None:
    f = s.register("FRCD").fields
    assert (f["FI"].hi, f["FI"].lo) == (63, 12)
    assert (f["SID"].hi, f["SID"].lo) == (79, 64)
    assert [f[n].lo for n in ("T2", "PRIV", "EXE", "PP", "T", "F")] == [92, 93, 94, 95, 126, 127]
    assert (f["FR"].hi, f["FR"].lo, f["PV"].hi, f["PV"].lo, f["AT"].hi, f["AT"].lo) == (103, 96, 123, 104, 125, 124)
    rt = s.register("RTADDR").fields
    assert (rt["TTM"].mask, rt["RTA"].mask) == (bits(11, 10), bits(63, 12))
    iqa = s.register("IQA").fields
    assert (iqa["IQA"].mask, iqa["DW"].mask, iqa["QS"].mask) == (bits(63, 12), bit(11), bits(2, 0))
    assert s.register("IQH").field("QH").mask == bits(18, 4)
    assert s.register("PQH").field("PQH").mask == bits(18, 5)
    irta = s.register("IRTA").fields
    assert (irta["IRTA"].mask, irta["EIME"].mask, irta["S"].mask) == (bits(63, 12), bit(11), bits(3, 0))
    iqercd = s.register("IQERCD").fields
    assert (iqercd["ICESID"].mask, iqercd["ITESID"].mask, iqercd["IQEI"].mask) == (
        bits(63, 48), bits(47, 32), bits(3, 0))
    gsts = s.register("GSTS").fields
    assert [gsts[n].lo for n in ("TES", "RTPS", "FLS", "AFLS", "WBFS", "QIES", "IRES", "IRTPS", "CFIS")] == list(
        range(31, 22, -1))


# ------------------------------------------------------------------------------------------------
# Reserved masks (expected values written out from vtd-facts.md sections 2-4)


def test_reserved_mask_ss_pte(s: Specs) -> None:
    pte = s.structure("ss_pte")
    assert pte.reserved_mask(haw=39) == bits(51, 39) | bit(11) | bit(62)
    assert pte.reserved_mask({"SC", "TM"}, haw=39) == bits(51, 39)
    assert pte.reserved_mask(frozenset({"SC"}), haw=48) == bits(51, 48) | bit(62)
    assert pte.reserved_mask() == bit(11) | bit(62)
    assert pte.reserved_mask(haw=52) == bit(11) | bit(62)


def test_reserved_mask_ss_levels(s: Specs) -> None:
    assert s.structure("ss_pdpe_1g").reserved_mask(haw=39) == bits(51, 39) | bits(29, 12) | bit(11) | bit(62)
    assert s.structure("ss_pdpe_1g").reserved_mask({"SC", "TM"}, haw=46) == bits(51, 46) | bits(29, 12)
    assert s.structure("ss_pde_2m").reserved_mask({"SC", "TM"}, haw=39) == bits(51, 39) | bits(20, 12)
    for name in ("ss_pml5e", "ss_pml4e"):
        # bit 7 reserved, SNP and TM reserved in non-leaf entries whatever the features
        assert s.structure(name).reserved_mask({"SC", "TM"}, haw=39) == bits(51, 39) | bit(7) | bit(11) | bit(62)
    for name in ("ss_pdpe", "ss_pde"):
        assert s.structure(name).reserved_mask({"SC", "TM"}, haw=39) == bits(51, 39) | bit(11) | bit(62)


def test_reserved_mask_fs_levels(s: Specs) -> None:
    assert s.structure("fs_pml4e").reserved_mask(haw=39) == bits(51, 39) | bit(7)
    assert s.structure("fs_pml5e").reserved_mask(haw=48) == bits(51, 48) | bit(7)
    assert s.structure("fs_pdpe").reserved_mask(haw=39) == bits(51, 39)
    assert s.structure("fs_pdpe_1g").reserved_mask(haw=39) == bits(51, 39) | bits(29, 13)
    assert s.structure("fs_pde_2m").reserved_mask(haw=39) == bits(51, 39) | bits(20, 13)
    assert s.structure("fs_pte").reserved_mask(haw=39) == bits(51, 39)


def test_reserved_mask_legacy_entries(s: Specs) -> None:
    root = s.structure("legacy_root_entry")
    assert root.qword_masks(root.reserved_mask(haw=39)) == (bits(11, 1) | bits(63, 39), (1 << 64) - 1)
    ctx = s.structure("legacy_context_entry")
    # Same values as QEMU's VTD_CONTEXT_ENTRY_RSVD_LO(39) / _HI.
    assert ctx.qword_masks(ctx.reserved_mask(haw=39)) == (0xFFFF_FF80_0000_0FF0, 0xFFFF_FFFF_FF00_0080)
    assert ctx.reserved_mask() == bits(11, 4) | bit(71) | bits(127, 88)


def test_reserved_mask_scalable_entries(s: Specs) -> None:
    root = s.structure("sm_root_entry")
    assert root.reserved_mask(haw=39) == bits(11, 1) | bits(63, 39) | bits(75, 65) | bits(127, 64 + 39)
    ctx = s.structure("sm_context_entry")
    assert ctx.size_bits == 256
    assert ctx.reserved_mask({"RPS", "RPRIVS"}, haw=39) == bits(8, 5) | bits(63, 39) | bits(255, 85)
    assert ctx.reserved_mask(haw=39) == bits(8, 5) | bits(63, 39) | bits(255, 64)
    assert ctx.reserved_mask({"RPS"}) == bits(8, 5) | bits(255, 84)
    pde = s.structure("pasid_dir_entry")
    assert pde.reserved_mask(haw=39) == bits(11, 2) | bits(63, 39)
    pe = s.structure("pasid_entry")
    assert pe.size_bits == 512
    expected = bits(11, 10) | bits(63, 39) | bits(86, 80) | bits(139, 136) | bits(191, 128 + 39) | bits(511, 192)
    assert pe.reserved_mask(haw=39) == expected
    assert pe.qword_masks(expected) == (
        0xFFFF_FF80_0000_0C00, 0x7F_0000, 0xFFFF_FF80_0000_0F00, *([(1 << 64) - 1] * 5))


def test_reserved_mask_descriptors(s: Specs) -> None:
    wait = s.structure("inv_wait")
    # QEMU: VTD_INV_DESC_WAIT_RSVD_LO 0xfffff180 (PD reserved), _HI 0x3
    assert wait.qword_masks(wait.reserved_mask()) == (0xFFFF_F180, 0x3)
    assert wait.qword_masks(wait.reserved_mask({"PDS"}, haw=39)) == (0xFFFF_F100, 0x3)
    cc = s.structure("inv_context_cache")
    assert cc.reserved_mask() == bits(8, 6) | bits(15, 12) | bits(63, 50) | bits(127, 64)
    iotlb = s.structure("inv_iotlb")
    assert iotlb.reserved_mask() == bit(8) | bits(15, 12) | bits(63, 32) | bits(75, 71)
    iec = s.structure("inv_iec")
    assert iec.reserved_mask() == bits(8, 5) | bits(26, 12) | bits(63, 48) | bits(127, 64)
    dev = s.structure("inv_dev_tlb")
    assert dev.reserved_mask() == bits(8, 4) | bits(31, 21) | bits(51, 48) | bits(75, 65)
    pgr = s.structure("inv_page_group_response")
    assert pgr.reserved_mask() == bits(8, 5) | bits(63, 52) | bits(65, 64) | bits(127, 76)
    for name in ("inv_context_cache", "inv_iotlb", "inv_dev_tlb", "inv_iec", "inv_wait", "inv_pasid_iotlb",
                 "inv_pasid_cache", "inv_pasid_dev_tlb", "inv_page_group_response"):
        d = s.structure(name)
        assert (d.size_bits, d.field("TYPE_LO").mask, d.field("TYPE_HI").mask) == (128, 0xF, bits(11, 9)), name


def test_reserved_mask_rejects_bad_haw(s: Specs) -> None:
    with pytest.raises(ValueError):
        s.structure("ss_pte").reserved_mask(haw=0)


def test_register_reserved_mask_is_rsvdz(s: Specs) -> None:
    assert s.register("IQA").reserved_mask() == bits(10, 3)


# ------------------------------------------------------------------------------------------------
# Field / Layout behaviour


def test_field_get_put(s: Specs) -> None:
    tt = s.structure("legacy_context_entry").field("TT")
    assert isinstance(tt, Field)
    assert (tt.lo, tt.hi, tt.width, tt.mask, tt.kind, tt.access) == (2, 3, 2, 0b1100, "value", "")
    assert tt.get(0b1011) == 0b10
    assert tt.put(0xFFFF, 0) == 0xFFF3
    assert tt.put(0, 0b111) == 0b1100  # truncated to the width
    p = s.structure("legacy_context_entry").field("P")
    assert p.kind == "flag" and p.width == 1
    aw = s.structure("legacy_context_entry").field("AW")
    assert aw.get(2 << 64) == 2 and aw.put(0, 3) == 3 << 64
    assert s.structure("ss_pte").field("SNP").reserved_unless == "SC"
    assert s.structure("ss_pte").field("ADDR").kind == "addr"
    assert s.register("FRCD").field("F").access == "RW1C"


def test_layout_field_unknown_raises_spec_error(s: Specs) -> None:
    with pytest.raises(SpecError, match="ss_pte"):
        s.structure("ss_pte").field("NOPE")
    with pytest.raises(SpecError, match="NOPE"):
        s.register("NOPE")
    with pytest.raises(SpecError):
        s.structure("nope")
    with pytest.raises(SpecError):
        s.fault_by_name("NOPE")


def test_encode_decode(s: Specs) -> None:
    ctx = s.structure("legacy_context_entry")
    v = ctx.encode(P=1, TT=2, SLPTPTR=0x1234, AW=2, DID=0xBEEF)
    assert v == 1 | (2 << 2) | (0x1234 << 12) | (2 << 64) | (0xBEEF << 72)
    assert ctx.decode(v) == {"P": 1, "FPD": 0, "TT": 2, "SLPTPTR": 0x1234, "AW": 2, "DID": 0xBEEF}
    assert ctx.encode(RSVD1=1) == bit(71)  # reserved fields can be named to build bad entries
    with pytest.raises(ValueError, match="NOPE"):
        ctx.encode(NOPE=1)
    with pytest.raises(ValueError, match="TT"):
        ctx.encode(TT=4)
    with pytest.raises(ValueError):
        ctx.encode(DID=-1)


def test_format(s: Specs) -> None:
    ctx = s.structure("legacy_context_entry")
    v = ctx.encode(P=1, TT=2, SLPTPTR=0x1234, AW=2, DID=5, AVAIL=0xF)
    assert ctx.format(v) == "P=1 FPD=0 TT=0x2 SLPTPTR=0x1234000 AW=0x2 DID=0x5"
    assert ctx.format(v | bit(71) | bit(100)) == "P=1 FPD=0 TT=0x2 SLPTPTR=0x1234000 AW=0x2 RSVD1!=0 DID=0x5 RSVD2!=0"
    root = s.structure("sm_root_entry")
    assert root.format(root.encode(UP=1, UCTP=0x5)) == "LP=0 LCTP=0x0 UP=1 UCTP=0x5000"
    assert s.register("FECTL").format(0x8000_0001) == "RSVD!=0 IP=0 IM=1"


def test_parse_and_build(s: Specs) -> None:
    ctx = s.structure("legacy_context_entry")
    data = ctx.build(P=1, TT=2, SLPTPTR=0x1234, DID=5)
    assert isinstance(data, bytes) and len(data) == 16
    assert int.from_bytes(data, "little") == ctx.encode(P=1, TT=2, SLPTPTR=0x1234, DID=5)
    c = ctx.parse(data)
    assert (c.P, c.TT, c.SLPTPTR, c.DID, c.RSVD2) == (1, 2, 0x1234, 5, 0)
    assert list(c) == list(ctx.fields)  # every field, reserved included, in bit order
    with pytest.raises(ValueError):
        ctx.build(NOPE=1)
    with pytest.raises(ValueError):
        ctx.build(TT=7)
    with pytest.raises(ValueError):
        ctx.parse(b"\x00" * 15)
    assert "RSVD2" in codec.dump(ctx, data) and "SLPTPTR" in codec.dump(ctx, data)


_ALL_LAYOUT_NAMES = sorted(specs().structures) + [f"reg:{n}" for n in sorted(specs().registers)]


def _layout(name: str) -> Layout:
    return specs().register(name[4:]) if name.startswith("reg:") else specs().structure(name)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(_ALL_LAYOUT_NAMES), raw=st.binary(min_size=64, max_size=64))
def test_round_trip(name: str, raw: bytes) -> None:
    layout = _layout(name)
    data = raw[: layout.size_bits // 8]
    value = int.from_bytes(data, "little")
    c = layout.parse(data)
    assert layout.build(**c) == data
    assert layout.encode(**c) == value
    visible = layout.decode(value)
    assert set(visible) <= set(c) and all(c[k] == v for k, v in visible.items())
    # re-assemble from get() of every field
    rebuilt = 0
    for f in layout.fields.values():
        rebuilt = f.put(rebuilt, f.get(value))
    assert rebuilt == value


def test_structures_present_and_sized(s: Specs) -> None:
    sizes = {
        "legacy_root_entry": 128, "legacy_context_entry": 128, "sm_root_entry": 128, "sm_context_entry": 256,
        "pasid_dir_entry": 64, "pasid_entry": 512, "fault_record": 128, "irte": 128, "page_request": 256,
        **{n: 64 for n in ("ss_pml5e", "ss_pml4e", "ss_pdpe", "ss_pdpe_1g", "ss_pde", "ss_pde_2m", "ss_pte",
                           "fs_pml5e", "fs_pml4e", "fs_pdpe", "fs_pdpe_1g", "fs_pde", "fs_pde_2m", "fs_pte")},
        **{n: 128 for n in ("inv_context_cache", "inv_iotlb", "inv_dev_tlb", "inv_iec", "inv_wait",
                            "inv_pasid_iotlb", "inv_pasid_cache", "inv_pasid_dev_tlb", "inv_page_group_response")},
    }
    assert {n: l.size_bits for n, l in s.structures.items()} == sizes
    irte = s.structure("irte").fields
    assert [(irte[n].hi, irte[n].lo) for n in ("DLM", "V", "DST", "SID", "SQ", "SVT")] == [
        (7, 5), (23, 16), (63, 32), (79, 64), (81, 80), (83, 82)]
    pr = s.structure("page_request").fields
    assert [(pr[n].hi, pr[n].lo) for n in ("RID", "PASID", "PRGI", "ADDR", "PRIVATE_DATA")] == [
        (31, 16), (51, 32), (75, 67), (127, 76), (255, 128)]
    fr = s.structure("fault_record").fields
    assert {n: (f.hi, f.lo) for n, f in fr.items() if f.kind != "reserved"} == {
        n: (f.hi, f.lo) for n, f in s.register("FRCD").fields.items() if f.access != "RsvdZ"}
    pe = s.structure("pasid_entry").fields
    assert (pe["PGTT"].mask, pe["FSPTPTR"].mask, pe["FSPM"].mask, pe["DID"].mask) == (
        bits(8, 6), bits(191, 140), bits(131, 130), bits(79, 64))


# ------------------------------------------------------------------------------------------------
# Faults

FAULT_NAMES = {
    0x01: "ROOT_ENTRY_P", 0x02: "CONTEXT_ENTRY_P", 0x03: "CONTEXT_ENTRY_INV", 0x04: "ADDR_BEYOND_MGAW",
    0x05: "WRITE", 0x06: "READ", 0x07: "PAGING_ENTRY_INV", 0x08: "ROOT_TABLE_INV", 0x09: "CONTEXT_TABLE_INV",
    0x0A: "ROOT_ENTRY_RSVD", 0x0B: "CONTEXT_ENTRY_RSVD", 0x0C: "PAGING_ENTRY_RSVD", 0x0D: "CONTEXT_ENTRY_TT",
    0x0E: "INTERRUPT_ADDR",
    0x20: "IR_REQ_RSVD", 0x21: "IR_INDEX_OVER", 0x22: "IR_ENTRY_P", 0x23: "IR_ROOT_INVAL", 0x24: "IR_IRTE_RSVD",
    0x25: "IR_REQ_COMPAT", 0x26: "IR_SID_ERR", 0x27: "IR_PDA_INVAL", 0x28: "IR_PDA_RSVD", 0x29: "IR_PID_INVAL",
    0x30: "SM_RTA_INV", 0x31: "SM_RTA_LEGACY_PASID", 0x32: "SM_RTA_LEGACY_PRQ", 0x33: "SM_RTA_4",
    0x38: "SM_ROOT_READ_ERR", 0x39: "SM_ROOT_ENTRY_P", 0x3A: "SM_ROOT_ENTRY_RSVD",
    0x40: "SM_CONTEXT_READ_ERR", 0x41: "SM_CONTEXT_ENTRY_P", 0x42: "SM_CONTEXT_ENTRY_RSVD",
    0x43: "SM_CONTEXT_ENTRY_INV", 0x44: "SM_DTE_CLEAR", 0x45: "SM_PASIDE_CLEAR", 0x46: "SM_PASID_BEYOND_PDTS",
    0x47: "SM_PRE_CLEAR", 0x48: "SM_RID_PASID_ERR",
    0x50: "SM_PASID_DIR_READ_ERR", 0x51: "SM_PASID_DIR_ENTRY_P", 0x52: "SM_PASID_DIR_ENTRY_RSVD",
    0x58: "SM_PASID_TABLE_READ_ERR", 0x59: "SM_PASID_ENTRY_P", 0x5A: "SM_PASID_ENTRY_RSVD",
    0x5B: "SM_PASID_ENTRY_INV", 0x5C: "SM_ERE_CLEAR", 0x5D: "SM_SRE_CLEAR",
    0x70: "SM_FS_READ_ERR", 0x71: "SM_FS_ENTRY_P", 0x72: "SM_FS_ENTRY_RSVD", 0x73: "SM_FSPTPTR_READ_ERR",
    0x74: "SM_NESTED_FS_TABLE_BEYOND_SS", 0x75: "SM_NESTED_FS_ROOT_SS_DENIED",
    0x76: "SM_NESTED_FS_TABLE_SS_DENIED", 0x77: "SM_NESTED_FS_AD_SS_DENIED",
    0x78: "SM_SS_READ_ERR", 0x79: "SM_SS_ENTRY_NP", 0x7A: "SM_SS_ENTRY_RSVD", 0x7B: "SM_SSPTPTR_INV",
    0x7C: "SM_SS_AD_NONSNOOP", 0x7D: "SM_SSL_6",
    0x80: "SM_NON_CANONICAL", 0x81: "SM_US_CLEAR", 0x82: "SM_EXEC_DENIED", 0x83: "SM_BEYOND_HW_MAX",
    0x84: "SM_BEYOND_SS_MAX", 0x85: "SM_WRITE", 0x86: "SM_READ", 0x87: "SM_INTERRUPT_ADDR", 0x88: "SM_SGN_9",
    0x89: "SM_SGN_10", 0x90: "SM_FS_AD_NONSNOOP", 0x91: "SM_FS_AD_WRITE_FAIL",
}

# Qualification pinned down by the fact sheet (plus the 0xB choice: QEMU's "no").
FAULT_QUALIFIED = {
    0x01: False, 0x02: True, 0x03: True, 0x04: True, 0x05: True, 0x06: True, 0x07: True, 0x08: False,
    0x09: False, 0x0A: False, 0x0B: False, 0x0C: True, 0x0D: True, 0x0E: True,
    0x20: False, 0x21: False, 0x22: True, 0x23: False, 0x24: True, 0x25: False, 0x26: True, 0x27: True,
    0x28: True,
    0x30: False, 0x31: False, 0x38: False, 0x39: False, 0x3A: False, 0x47: True, 0x50: False, 0x51: True,
    0x58: False, 0x59: True, 0x5B: True, 0x70: True, 0x71: True, 0x72: True, 0x73: True, 0x80: True,
    0x81: True, 0x85: True, 0x87: True, 0x91: True,
}


def test_fault_codes_and_names(s: Specs) -> None:
    assert {code: f.name for code, f in s.faults.items()} == FAULT_NAMES
    for code, f in s.faults.items():
        assert isinstance(f, FaultSpec) and f.code == code
        assert s.fault_by_name(f.name) is f
        expected_mode = "legacy" if code < 0x20 else "ir" if code < 0x30 else "scalable"
        assert f.mode == expected_mode, hex(code)


def test_fault_qualification(s: Specs) -> None:
    assert {code: s.faults[code].qualified for code in FAULT_QUALIFIED} == FAULT_QUALIFIED


def test_fault_ids(s: Specs) -> None:
    ids = {0x01: "LRT.2", 0x02: "LCT.2", 0x03: "LCT.4", 0x04: "LGN.1", 0x07: "LSL.1", 0x08: "LRT.1",
           0x0B: "LCT.3", 0x0D: "LCT.5", 0x0E: "LGN.4", 0x30: "RTA.1", 0x3A: "SRT.3", 0x48: "SCT.9",
           0x52: "SPD.3", 0x5D: "SPT.6", 0x77: "SFL.8", 0x7D: "SSL.6", 0x89: "SGN.10", 0x90: "SFL.9",
           0x91: "SFL.10"}
    assert {code: s.faults[code].id for code in ids} == ids


# ------------------------------------------------------------------------------------------------
# Validation errors

MINIMAL_REGISTERS = """\
registers:
  A:
    offset: 0x0
    size: 32
    reset: 0
    fields:
      X: {bits: "15:0", access: RW}
      RSVD: {bits: "31:16", access: RsvdZ}
"""


def _spec_dir(tmp_path: Path, **files: str) -> Path:
    """A copy of the shipped specs with some files replaced by the given text."""
    # A fresh directory per call, so one test can check several bad variants.
    d = tmp_path / f"specs{sum(1 for _ in tmp_path.iterdir())}"
    d.mkdir()
    for name in ("registers.yaml", "structures.yaml", "faults.yaml"):
        shutil.copy(SHIPPED / name, d / name)
    for stem, text in files.items():
        (d / f"{stem}.yaml").write_text(textwrap.dedent(text))
    return d


def _error(tmp_path: Path, **files: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_specs(_spec_dir(tmp_path, **files))
    return info.value


def test_minimal_files_load(tmp_path: Path) -> None:
    sp = load_specs(_spec_dir(tmp_path, registers=MINIMAL_REGISTERS))
    assert list(sp.registers) == ["A"]
    assert isinstance(sp.register("A"), Register)


def test_error_overlap(tmp_path: Path) -> None:
    e = _error(tmp_path, structures="""\
        structures:
          s:
            size: 64
            fields:
              A: {bits: "7:0"}
              B: {bits: "9:4"}
              C: {bits: "63:10", kind: reserved}
        """)
    assert e.file.endswith("structures.yaml") and "structures.yaml" in str(e)
    assert e.path == "structures.s.fields.B.bits" and e.path in str(e)
    assert "A" in e.message and "B" in e.message and "overlap" in e.message


def test_error_gap(tmp_path: Path) -> None:
    e = _error(tmp_path, structures="""\
        structures:
          s:
            size: 64
            fields:
              A: {bits: "7:0"}
              C: {bits: "63:12", kind: addr}
        """)
    assert e.path == "structures.s.fields"
    assert "11:8" in e.message and "not covered" in e.message


def test_error_gap_at_top(tmp_path: Path) -> None:
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace('"31:16"', '"30:16"'))
    assert e.path == "registers.A.fields" and "31" in e.message and "registers.yaml" in str(e)


@pytest.mark.parametrize("bad", ['"7-0"', '"0:7"', "-1", '"x"', "true", "[1, 2]"])
def test_error_bad_bits(tmp_path: Path, bad: str) -> None:
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace('"15:0"', bad))
    assert e.path == "registers.A.fields.X.bits"
    assert "registers.A.fields.X.bits" in str(e)


def test_error_bits_outside(tmp_path: Path) -> None:
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace('"31:16"', '"32:16"'))
    assert e.path == "registers.A.fields.RSVD.bits" and "32-bit" in e.message


def test_error_unknown_access(tmp_path: Path) -> None:
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace("access: RW}", "access: RWX}"))
    assert e.path == "registers.A.fields.X.access" and "RWX" in e.message and "RW1C" in e.message


def test_error_unknown_kind_and_flag_width(tmp_path: Path) -> None:
    text = """\
        structures:
          s:
            size: 64
            fields:
              A: {bits: "7:0", kind: %s}
              C: {bits: "63:8", kind: reserved}
        """
    e = _error(tmp_path, structures=text % "bogus")
    assert e.path == "structures.s.fields.A.kind" and "bogus" in e.message
    e = _error(tmp_path, structures=text % "flag")
    assert e.path == "structures.s.fields.A.kind" and "one bit" in e.message


def test_error_unknown_feature(tmp_path: Path) -> None:
    e = _error(tmp_path, structures="""\
        structures:
          s:
            size: 64
            fields:
              A: {bits: 0, reserved_unless: WARP}
              C: {bits: "63:1", kind: reserved}
        """)
    assert e.path == "structures.s.fields.A.reserved_unless" and "WARP" in e.message


def test_error_misaligned_offset(tmp_path: Path) -> None:
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace("offset: 0x0", "offset: 0x6"))
    assert e.path == "registers.A.offset" and "aligned" in e.message and "registers.yaml" in str(e)
    wide = MINIMAL_REGISTERS.replace("size: 32", "size: 64").replace('"31:16"', '"63:16"')
    e = _error(tmp_path, registers=wide.replace("offset: 0x0", "offset: 0x4"))
    assert e.path == "registers.A.offset" and "8-byte" in e.message


def test_error_overlapping_registers(tmp_path: Path) -> None:
    text = MINIMAL_REGISTERS + """\
  B:
    offset: 0x0
    size: 32
    reset: 0
    fields:
      Y: {bits: "31:0", access: RO}
"""
    e = _error(tmp_path, registers=text)
    assert e.path.endswith(".offset") and "overlaps" in e.message
    assert "A" in e.message and "B" in e.message


@pytest.mark.parametrize("expr", ["cap.FRO*16+", "__import__('os').getcwd()", "cap.FRO**16", "dmar.FRO*16"])
def test_error_bad_offset_expression(tmp_path: Path, expr: str) -> None:
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace("offset: 0x0", f'offset: "{expr}"'))
    assert e.path == "registers.A.offset" and "expression" in e.message


def test_error_offset_expression_unknown_field(tmp_path: Path) -> None:
    text = (SHIPPED / "registers.yaml").read_text().replace('"ecap.IRO*16"', '"ecap.IROX*16"')
    e = _error(tmp_path, registers=text)
    assert e.path == "registers.IVA.offset" and "IROX" in e.message


def test_error_reset(tmp_path: Path) -> None:
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace("reset: 0", "reset: 0x10000"))
    assert e.path == "registers.A.reset" and "RSVD" in e.message
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace("reset: 0", "reset: 0x100000000"))
    assert e.path == "registers.A.reset" and "wider" in e.message
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace("reset: 0", "reset: later"))
    assert e.path == "registers.A.reset" and "config" in e.message


def test_error_unknown_and_missing_keys(tmp_path: Path) -> None:
    e = _error(tmp_path, registers=MINIMAL_REGISTERS + "extra: 1\n")
    assert e.path == "extra" and "unknown key" in e.message
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace("    reset: 0\n", ""))
    assert e.path == "registers.A.reset" and "missing" in e.message
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace("access: RW}", "access: RW, acess: RO}"))
    assert e.path == "registers.A.fields.X.acess"


def test_error_duplicate_yaml_key(tmp_path: Path) -> None:
    e = _error(tmp_path, registers=MINIMAL_REGISTERS + "      X: {bits: 3, access: RW}\n")
    assert "duplicate key" in e.message and "registers.yaml" in str(e)


def test_error_bad_size(tmp_path: Path) -> None:
    e = _error(tmp_path, registers=MINIMAL_REGISTERS.replace("size: 32", "size: 16"))
    assert e.path == "registers.A.size"


FAULT = "  - {code: %s, name: %s, id: X.1, qualified: false, mode: legacy}\n"


def test_error_duplicate_fault_code(tmp_path: Path) -> None:
    e = _error(tmp_path, faults="faults:\n" + FAULT % ("0x01", "A") + FAULT % ("1", "B"))
    assert e.path == "faults[1].code" and "duplicate" in e.message and "faults.yaml" in str(e)


def test_error_duplicate_fault_name(tmp_path: Path) -> None:
    e = _error(tmp_path, faults="faults:\n" + FAULT % ("0x01", "A") + FAULT % ("0x02", "A"))
    assert e.path == "faults[1].name" and "duplicate" in e.message


def test_error_bad_fault_fields(tmp_path: Path) -> None:
    e = _error(tmp_path, faults="faults:\n" + FAULT.replace("legacy", "dma") % ("0x01", "A"))
    assert e.path == "faults[0].mode"
    e = _error(tmp_path, faults="faults:\n" + FAULT.replace("false", "maybe") % ("0x01", "A"))
    assert e.path == "faults[0].qualified"


def test_error_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_specs(tmp_path)
    assert "registers.yaml" in str(info.value) and "not found" in info.value.message
