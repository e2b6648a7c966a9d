"""Queued invalidation: every descriptor type and granularity (stale before, gone after), every IQE /
ITE / ICE path, wrap-around, 128- and 256-bit queues, enable/disable rules."""

from __future__ import annotations

import pytest

from chip_helpers import (FECTL, FSTS, GSTS, ICE, ICS, IECTL, IQA, IQE, IQERCD, IQH, IQT, ITE, PAGE_4K, PGTT_FS,
                          PGTT_SS, QIE, R, U, W, Rig)
from vtd_emu.vtd.iommu import Fault
from vtd_emu.vtd.qi import (IQEI_DW, IQEI_FETCH, IQEI_NO_INFO, IQEI_RESERVED, IQEI_TAIL, IQEI_TAIL_ALIGN,
                            IQEI_TYPE, T_CONTEXT, T_DEV_TLB, T_IEC, T_IOTLB, T_PAGE_RESPONSE, T_PASID_CACHE,
                            T_PASID_DEV_TLB, T_PIOTLB, T_WAIT, make_descriptor)

IOVA = 0x4000_0000
P1, P2, P3 = 0x8000_0000, 0x8100_0000, 0x8200_0000
A, A4, B = 0x0010, 0x0014, 0x0020   # A and A4 differ only in function bit 2


def out(rig: Rig, sid: int, iova: int, access: str = "r", pasid: int | None = None) -> int | None:
    t = rig.io.translate(sid, iova, access, pasid=pasid)
    return None if isinstance(t, Fault) else t.addr


def iqei(rig: Rig) -> int:
    return rig.r64(IQERCD) & 0xF


@pytest.fixture(params=[False, True], ids=["128bit", "256bit"])
def legacy(request: pytest.FixtureRequest) -> tuple[Rig, object, object]:
    """A in domain 1 and B in domain 2, each with its own table mapping IOVA (4 pages) to P1."""
    rig = Rig()
    lg = rig.legacy()
    t1, t2 = lg.table(), lg.table()
    for t in (t1, t2):
        t.map(IOVA, P1, 4 * PAGE_4K, R | W)
    lg.attach(A, t1, did=1)
    lg.attach(A4, t1, did=1)
    lg.attach(B, t2, did=2)
    lg.enable()
    rig.enable_qi(dw=request.param)
    return rig, lg, (t1, t2)


# -- IOTLB ---------------------------------------------------------------------------------------------


def test_iotlb_global(legacy: tuple) -> None:
    rig, _, (t1, t2) = legacy
    assert out(rig, A, IOVA) == P1 and out(rig, B, IOVA) == P1
    t1.map(IOVA, P2, PAGE_4K)
    t2.map(IOVA, P2, PAGE_4K)
    assert out(rig, A, IOVA) == P1 and out(rig, B, IOVA) == P1      # stale
    rig.submit(make_descriptor(T_IOTLB, G=1), rig.wait(7))
    assert rig.status_word() == 7 and rig.head() == 2 and not rig.r32(FSTS)
    assert out(rig, A, IOVA) == P2 and out(rig, B, IOVA) == P2


def test_iotlb_domain_selective(legacy: tuple) -> None:
    rig, _, (t1, t2) = legacy
    out(rig, A, IOVA), out(rig, B, IOVA)
    t1.map(IOVA, P2, PAGE_4K)
    t2.map(IOVA, P2, PAGE_4K)
    rig.submit(make_descriptor(T_IOTLB, G=2, DID=1, DR=1, DW=1), rig.wait())
    assert out(rig, A, IOVA) == P2
    assert out(rig, B, IOVA) == P1                                    # domain 2 untouched: still stale


def test_iotlb_page_selective_with_am(legacy: tuple) -> None:
    rig, _, (t1, _) = legacy
    pages = [IOVA + i * PAGE_4K for i in range(4)]
    assert [out(rig, A, p) for p in pages] == [P1 + i * PAGE_4K for i in range(4)]
    t1.map(IOVA, P2, 4 * PAGE_4K)
    # AM=1: two pages, the address's low page bit is ignored, so this covers pages 2 and 3.
    rig.submit(make_descriptor(T_IOTLB, G=3, DID=1, AM=1, ADDR=pages[3]), rig.wait())
    assert [out(rig, A, p) for p in pages] == [P1, P1 + PAGE_4K, P2 + 2 * PAGE_4K, P2 + 3 * PAGE_4K]
    rig.submit(make_descriptor(T_IOTLB, G=3, DID=1, AM=0, ADDR=pages[0]), rig.wait())
    assert out(rig, A, pages[0]) == P2 and out(rig, A, pages[1]) == P1 + PAGE_4K


def test_iotlb_page_selective_ih_keeps_paging_structure_caches() -> None:
    rig = Rig()
    lg = rig.legacy()
    t = lg.table()
    t.map(IOVA, P1, PAGE_4K)
    lg.attach(A, t, did=1)
    lg.enable()
    rig.enable_qi()
    assert out(rig, A, IOVA) == P1
    # Point the PDE at a new page table mapping the page elsewhere (a non-leaf change).
    pde = t.entry_addr(IOVA, 2)
    assert pde is not None
    new_pt = rig.alloc.alloc()
    rig.ram.write_u64(new_pt + 8 * ((IOVA >> 12) & 511), P3 | 3)
    rig.ram.write_u64(pde, new_pt | 7)
    rig.submit(make_descriptor(T_IOTLB, G=3, DID=1, AM=0, IH=1, ADDR=IOVA), rig.wait())
    assert out(rig, A, IOVA) == P1          # leaf gone, but the cached PDE still leads to the old table
    rig.submit(make_descriptor(T_IOTLB, G=3, DID=1, AM=0, IH=0, ADDR=IOVA), rig.wait())
    assert out(rig, A, IOVA) == P3


@pytest.mark.parametrize("g,am", [(0, 0), (3, 19)], ids=["G0", "AM>MAMV"])
def test_iotlb_invalid_fields_are_iqe(legacy: tuple, g: int, am: int) -> None:
    rig, _, _ = legacy
    rig.submit(make_descriptor(T_IOTLB, G=g, DID=1, AM=am, ADDR=IOVA), rig.wait())
    assert rig.r32(FSTS) & IQE and iqei(rig) == IQEI_RESERVED
    assert rig.head() == 0 and rig.status_word() == 0


# -- context cache -------------------------------------------------------------------------------------


def _move_contexts(rig: Rig, lg: object, sids: list[int], did: int) -> None:
    """Point ``sids`` at a fresh table (mapping IOVA to P2) in domain ``did``, then flush the IOTLB so only
    the context cache can still hold the old context."""
    t = lg.table()  # type: ignore[attr-defined]
    t.map(IOVA, P2, PAGE_4K)
    for s in sids:
        lg.attach(s, t, did=did)  # type: ignore[attr-defined]
    rig.submit(make_descriptor(T_IOTLB, G=1), rig.wait())


def test_context_global(legacy: tuple) -> None:
    rig, lg, _ = legacy
    out(rig, A, IOVA), out(rig, B, IOVA)
    _move_contexts(rig, lg, [A, B], did=5)
    assert out(rig, A, IOVA) == P1 and out(rig, B, IOVA) == P1      # cached contexts
    rig.submit(make_descriptor(T_CONTEXT, G=1), rig.wait())
    assert out(rig, A, IOVA) == P2 and out(rig, B, IOVA) == P2


def test_context_domain(legacy: tuple) -> None:
    rig, lg, _ = legacy
    out(rig, A, IOVA), out(rig, B, IOVA)
    _move_contexts(rig, lg, [A, B], did=5)
    rig.submit(make_descriptor(T_CONTEXT, G=2, DID=1), rig.wait())
    assert out(rig, A, IOVA) == P2
    assert out(rig, B, IOVA) == P1          # its cached context belongs to domain 2


@pytest.mark.parametrize("fm,a4_fresh", [(0, False), (1, True), (3, True)])
def test_context_device_with_function_mask(legacy: tuple, fm: int, a4_fresh: bool) -> None:
    rig, lg, _ = legacy
    out(rig, A, IOVA), out(rig, A4, IOVA), out(rig, B, IOVA)
    _move_contexts(rig, lg, [A, A4, B], did=5)
    rig.submit(make_descriptor(T_CONTEXT, G=3, SID=A, FM=fm), rig.wait())
    assert out(rig, A, IOVA) == P2
    assert out(rig, A4, IOVA) == (P2 if a4_fresh else P1)
    assert out(rig, B, IOVA) == P1


def test_context_g0_is_iqe(legacy: tuple) -> None:
    rig, _, _ = legacy
    rig.submit(make_descriptor(T_CONTEXT, G=0), rig.wait())
    assert iqei(rig) == IQEI_RESERVED and rig.head() == 0


# -- scalable mode: PASID cache and PASID-based IOTLB --------------------------------------------------


@pytest.fixture
def scalable() -> tuple[Rig, object, object, object, object]:
    """Device A: PASID 3 first-stage (domain 9), PASID 4 second-stage (domain 9), PASID 5 second-stage
    (domain 7); all map IOVA to P1.  256-bit queue."""
    rig = Rig()
    sm = rig.scalable()
    pt = sm.device(A)
    fs = sm.fs_table()
    fs.map(IOVA, P1, PAGE_4K, W | U)
    ss9, ss7 = sm.ss_table(), sm.ss_table()
    ss9.map(IOVA, P1, PAGE_4K)
    ss7.map(IOVA, P1, PAGE_4K)
    pt.set_entry(3, pgtt=PGTT_FS, did=9, fsptptr=fs.root)
    pt.set_entry(4, pgtt=PGTT_SS, did=9, ssptptr=ss9.root, aw=ss9.aw)
    pt.set_entry(5, pgtt=PGTT_SS, did=7, ssptptr=ss7.root, aw=ss7.aw)
    sm.enable()
    rig.enable_qi(dw=True)
    return rig, sm, pt, fs, (ss9, ss7)


def test_pasid_iotlb_page_selective_hits_first_stage_only(scalable: tuple) -> None:
    rig, sm, pt, fs, (ss9, _) = scalable
    assert out(rig, A, IOVA, pasid=3) == P1 and out(rig, A, IOVA, pasid=4) == P1
    fs.map(IOVA, P2, PAGE_4K, W | U)
    ss9.map(IOVA, P2, PAGE_4K)
    assert out(rig, A, IOVA, pasid=3) == P1
    rig.submit(make_descriptor(T_PIOTLB, G=3, DID=9, PASID=3, AM=0, ADDR=IOVA), rig.wait())
    assert out(rig, A, IOVA, pasid=3) == P2
    rig.submit(make_descriptor(T_PIOTLB, G=3, DID=9, PASID=4, AM=0, ADDR=IOVA), rig.wait())
    assert out(rig, A, IOVA, pasid=4) == P1      # second-stage-only entries survive a PASID-based PSI
    rig.submit(make_descriptor(T_IOTLB, G=3, DID=9, AM=0, ADDR=IOVA), rig.wait())
    assert out(rig, A, IOVA, pasid=4) == P2


def test_pasid_iotlb_pasid_selective(scalable: tuple) -> None:
    rig, sm, pt, fs, (ss9, _) = scalable
    out(rig, A, IOVA, pasid=3), out(rig, A, IOVA, pasid=4)
    fs.map(IOVA, P2, PAGE_4K, W | U)
    ss9.map(IOVA, P2, PAGE_4K)
    rig.submit(make_descriptor(T_PIOTLB, G=2, DID=9, PASID=3), rig.wait())
    assert out(rig, A, IOVA, pasid=3) == P2
    assert out(rig, A, IOVA, pasid=4) == P1      # another PASID of the same domain


def test_pasid_iotlb_page_selective_ih(scalable: tuple) -> None:
    rig, sm, pt, fs, _ = scalable
    assert out(rig, A, IOVA, pasid=3) == P1
    pde = fs.entry_addr(IOVA, 2)
    assert pde is not None
    new_pt = rig.alloc.alloc()
    rig.ram.write_u64(new_pt + 8 * ((IOVA >> 12) & 511), P3 | 0x7)          # P, R/W, U/S
    rig.ram.write_u64(pde, (rig.ram.read_u64(pde) & 0xFFF) | new_pt)
    rig.submit(make_descriptor(T_PIOTLB, G=3, DID=9, PASID=3, AM=0, IH=1, ADDR=IOVA), rig.wait())
    assert out(rig, A, IOVA, pasid=3) == P1
    rig.submit(make_descriptor(T_PIOTLB, G=3, DID=9, PASID=3, AM=0, IH=0, ADDR=IOVA), rig.wait())
    assert out(rig, A, IOVA, pasid=3) == P3


def _repoint_pasid_entries(rig: Rig, sm: object, pt: object) -> None:
    """Point PASIDs 4 and 5 at a table mapping IOVA to P2 (same DIDs), and flush their IOTLB entries."""
    t = sm.ss_table()  # type: ignore[attr-defined]
    t.map(IOVA, P2, PAGE_4K)
    pt.set_entry(4, pgtt=PGTT_SS, did=9, ssptptr=t.root, aw=t.aw)  # type: ignore[attr-defined]
    pt.set_entry(5, pgtt=PGTT_SS, did=7, ssptptr=t.root, aw=t.aw)  # type: ignore[attr-defined]
    rig.submit(make_descriptor(T_IOTLB, G=1), rig.wait())


@pytest.mark.parametrize("desc,fresh4,fresh5", [
    (dict(G=0, DID=9), True, False),
    (dict(G=1, DID=9, PASID=4), True, False),
    (dict(G=1, DID=9, PASID=5), False, False),    # PASID 5 lives in domain 7
    (dict(G=3), True, True),
], ids=["domain", "pasid", "pasid-other-domain", "global"])
def test_pasid_cache(scalable: tuple, desc: dict, fresh4: bool, fresh5: bool) -> None:
    rig, sm, pt, _, _ = scalable
    out(rig, A, IOVA, pasid=4), out(rig, A, IOVA, pasid=5)
    _repoint_pasid_entries(rig, sm, pt)
    assert out(rig, A, IOVA, pasid=4) == P1 and out(rig, A, IOVA, pasid=5) == P1   # cached PASID entries
    # As software must: PASID-cache invalidation, then the IOTLB (the stale check above refilled it).
    rig.submit(make_descriptor(T_PASID_CACHE, **desc), make_descriptor(T_IOTLB, G=1), rig.wait())
    assert out(rig, A, IOVA, pasid=4) == (P2 if fresh4 else P1)
    assert out(rig, A, IOVA, pasid=5) == (P2 if fresh5 else P1)


@pytest.mark.parametrize("t,fields", [
    (T_PIOTLB, dict(G=0, DID=9)), (T_PIOTLB, dict(G=1, DID=9)), (T_PIOTLB, dict(G=3, DID=9, AM=19)),
    (T_PASID_CACHE, dict(G=2, DID=9)),
], ids=["piotlb-G0", "piotlb-G1", "piotlb-AM", "pc-G2"])
def test_pasid_descriptor_invalid_granularity(scalable: tuple, t: int, fields: dict) -> None:
    rig = scalable[0]
    rig.submit(make_descriptor(t, **fields), rig.wait())
    assert iqei(rig) == IQEI_RESERVED and rig.head() == 0


# -- invalidation wait ---------------------------------------------------------------------------------


def test_wait_status_write_is_exactly_32_bits() -> None:
    rig = Rig()
    rig.enable_qi()
    rig.ram.write(rig.status, b"\xee" * 12)
    rig.submit(rig.wait(0x11223344, offset=4))
    assert rig.ram.read(rig.status, 12) == b"\xee" * 4 + bytes.fromhex("44332211") + b"\xee" * 4


def test_wait_interrupt_flag_and_completion_event() -> None:
    rig = Rig()
    rig.w32(0xA4, 0x55)                   # IEDATA
    rig.w32(0xA8, 0xFEE01000)             # IEADDR
    rig.enable_qi()
    assert rig.r32(IECTL) == 0x8000_0000  # masked at reset
    rig.submit(make_descriptor(T_WAIT, IF=1))
    assert rig.r32(ICS) == 1 and rig.r32(IECTL) == 0xC000_0000 and not rig.io.interrupts
    rig.w32(IECTL, 0)                     # unmasking delivers the pending event
    assert [(i.source, i.addr, i.data) for i in rig.io.interrupts] == [("invalidation", 0xFEE01000, 0x55)]
    assert rig.r32(IECTL) == 0
    rig.submit(make_descriptor(T_WAIT, IF=1))        # IWC still set: no new event
    assert len(rig.io.interrupts) == 1
    rig.w32(ICS, 1)
    rig.submit(make_descriptor(T_WAIT, IF=1))
    assert len(rig.io.interrupts) == 2 and rig.r32(ICS) == 1


def test_wait_sw_and_if_together_spec_does_both() -> None:
    rig = Rig()
    rig.enable_qi()
    rig.submit(make_descriptor(T_WAIT, SW=1, IF=1, STATUS_DATA=9, STATUS_ADDR=rig.status))
    assert rig.status_word() == 9 and rig.r32(ICS) == 1 and not rig.r32(FSTS)


@pytest.mark.parametrize("fields", [dict(SW=1, IF=1), dict(FN=1), dict()], ids=["SW+IF", "FN-only", "none"])
def test_wait_flag_combinations_qemu_profile(fields: dict) -> None:
    rig = Rig("qemu-7.2-default", profile="qemu-7.2")
    rig.enable_qi()
    rig.submit(make_descriptor(T_WAIT, STATUS_ADDR=rig.status, STATUS_DATA=1, **fields))
    assert rig.r32(FSTS) & IQE and rig.head() == 0 and rig.status_word() == 0
    spec = Rig()
    spec.enable_qi()
    spec.submit(make_descriptor(T_WAIT, STATUS_ADDR=spec.status, STATUS_DATA=1, **fields))
    assert not spec.r32(FSTS) & IQE and spec.head() == 1


def test_wait_page_drain_needs_pds() -> None:
    rig = Rig()
    rig.enable_qi()
    rig.submit(make_descriptor(T_WAIT, PD=1, SW=1, STATUS_DATA=3, STATUS_ADDR=rig.status))
    assert rig.status_word() == 3
    no_pds = Rig(overrides={"ecap.PDS": 0})
    no_pds.enable_qi()
    no_pds.submit(make_descriptor(T_WAIT, PD=1, SW=1, STATUS_DATA=3, STATUS_ADDR=no_pds.status))
    assert iqei(no_pds) == IQEI_RESERVED and no_pds.status_word() == 0


@pytest.mark.parametrize("profile,preset,iqe", [("spec", "modern", False),
                                                ("qemu-7.2", "qemu-7.2-default", True)])
def test_wait_status_write_outside_memory(profile: str, preset: str, iqe: bool) -> None:
    rig = Rig(preset, profile=profile, ram_size=64 << 20)
    rig.enable_qi()
    rig.submit(make_descriptor(T_WAIT, SW=1, STATUS_DATA=1, STATUS_ADDR=0x1_0000_0000), rig.wait(5))
    assert bool(rig.r32(FSTS) & IQE) == iqe
    assert rig.head() == (0 if iqe else 2) and rig.status_word() == (0 if iqe else 5)


# -- IQE: type, reserved bits, tail, width, fetch -------------------------------------------------------


@pytest.mark.parametrize("qw0", [0x0, 0xA, 0xF, 0x200, 0xE05], ids=["t0", "tA", "tF", "t10", "t75"])
def test_unknown_type_is_iqe_and_stops_at_the_descriptor(qw0: int) -> None:
    rig = Rig()
    rig.enable_qi()
    rig.submit(rig.wait(1), (qw0, 0), rig.wait(2, offset=4))
    assert rig.r32(FSTS) & IQE and iqei(rig) == IQEI_TYPE
    assert rig.head() == 1 and rig.status_word() == 1 and rig.status_word(4) == 0
    rig.w64(IQT, rig.tail * 16)          # more IQT writes do nothing while IQE is set
    assert rig.head() == 1 and rig.status_word(4) == 0


@pytest.mark.parametrize("override,t,dw", [
    ("ecap.DT", T_DEV_TLB, True), ("ecap.IR", T_IEC, True), ("ecap.PRS", T_PAGE_RESPONSE, True),
    (None, T_PIOTLB, False), (None, T_PASID_CACHE, False), (None, T_PASID_DEV_TLB, False),
], ids=["devtlb-noDT", "iec-noIR", "pgresp-noPRS", "piotlb-128", "pc-128", "pdevtlb-128"])
def test_types_the_unit_does_not_support_are_invalid(override: str | None, t: int, dw: bool) -> None:
    rig = Rig(overrides={override: 0} if override else None)
    rig.enable_qi(dw=dw)
    rig.submit(make_descriptor(t), rig.wait())
    assert iqei(rig) == IQEI_TYPE and rig.head() == 0


RESERVED = [
    (T_CONTEXT, (1 << 6, 0)), (T_CONTEXT, (0, 1)), (T_IOTLB, (1 << 8, 0)), (T_IOTLB, (1 << 32, 0)),
    (T_IOTLB, (0, 1 << 7)), (T_DEV_TLB, (1 << 4, 0)), (T_DEV_TLB, (0, 1 << 1)), (T_IEC, (1 << 5, 0)),
    (T_IEC, (1 << 48, 0)), (T_WAIT, (1 << 8, 0)), (T_WAIT, (0, 1)), (T_PIOTLB, (1 << 6, 0)),
    (T_PIOTLB, (0, 1 << 8)), (T_PASID_CACHE, (0, 1)), (T_PASID_DEV_TLB, (0, 1 << 1)),
    (T_PAGE_RESPONSE, (1 << 5, 0)), (T_PAGE_RESPONSE, (0, 1 << 12)),
]


@pytest.mark.parametrize("t,bits", RESERVED, ids=[f"t{t}-{b[0]:x}-{b[1]:x}" for t, b in RESERVED])
def test_reserved_bits_are_iqe(t: int, bits: tuple[int, int]) -> None:
    rig = Rig()
    rig.enable_qi(dw=True)
    fields = {T_CONTEXT: dict(G=1), T_IOTLB: dict(G=1), T_PIOTLB: dict(G=2), T_PASID_CACHE: dict(G=3),
              T_WAIT: dict(SW=1, STATUS_ADDR=rig.status, STATUS_DATA=1)}.get(t, {})
    q0, q1 = make_descriptor(t, **fields)
    rig.submit((q0 | bits[0], q1 | bits[1]))
    assert iqei(rig) == IQEI_RESERVED and rig.head() == 0 and rig.status_word() == 0
    # The same descriptor without the bit goes through.
    good = Rig()
    good.enable_qi(dw=True)
    good.submit((q0, q1))
    assert not good.r32(FSTS) and good.head() == 1


def test_upper_half_of_a_256_bit_slot_is_reserved() -> None:
    rig = Rig()
    rig.enable_qi(dw=True)
    rig.submit(make_descriptor(T_IOTLB, G=1) + (0, 1))
    assert iqei(rig) == IQEI_RESERVED and rig.head() == 0


def test_iec_index_mask_beyond_mhmv_is_iqe() -> None:
    rig = Rig()
    rig.enable_qi()
    rig.submit(make_descriptor(T_IEC, G=1, IM=15, IIDX=0), make_descriptor(T_IEC, G=1, IM=16, IIDX=0))
    assert iqei(rig) == IQEI_RESERVED and rig.head() == 1


def test_tail_beyond_the_queue_is_iqe() -> None:
    rig = Rig()
    rig.enable_qi(qs=0)                  # 256 slots of 16 bytes
    rig.w64(IQT, 256 * 16)
    assert rig.r32(FSTS) & IQE and iqei(rig) == IQEI_TAIL and rig.head() == 0


def test_misaligned_tail_in_a_256_bit_queue_is_iqe() -> None:
    rig = Rig()
    rig.enable_qi(dw=True)
    rig.put(rig.wait())
    rig.w64(IQT, 0x10)
    assert iqei(rig) == IQEI_TAIL_ALIGN and rig.status_word() == 0


def test_misaligned_tail_qemu_ignores_the_write() -> None:
    rig = Rig("qemu-7.2-scalable", profile="qemu-7.2")
    rig.enable_qi(dw=True)
    rig.put(rig.wait())
    rig.w64(IQT, 0x10)
    assert rig.r64(IQT) == 0x10 and not rig.r32(FSTS) and rig.status_word() == 0
    rig.w64(IQT, 0x20)
    assert rig.status_word() == 1 and rig.r64(IQH) == 0x20


def test_256_bit_descriptors_unsupported_is_iqe() -> None:
    rig = Rig(overrides={"ecap.SMTS": 0})
    rig.enable_qi(dw=True)
    rig.submit(rig.wait())
    assert iqei(rig) == IQEI_DW and rig.status_word() == 0


def test_descriptor_fetch_error_is_iqe() -> None:
    rig = Rig(ram_size=64 << 20)
    rig.w64(IQA, 0x1_0000_0000)
    rig.gcmd(QIE)
    rig.w64(IQT, 0x10)
    assert iqei(rig) == IQEI_FETCH and rig.r64(IQH) == 0


def test_iqe_raises_the_fault_event() -> None:
    rig = Rig()
    rig.w32(0x3C, 0x66)
    rig.w32(0x40, 0xFEE02000)
    rig.w32(FECTL, 0)
    rig.enable_qi()
    rig.submit((0xF, 0))
    assert [(i.source, i.addr, i.data) for i in rig.io.interrupts] == [("fault", 0xFEE02000, 0x66)]


def test_clearing_iqe_resumes_at_the_faulting_descriptor() -> None:
    rig = Rig()
    rig.enable_qi()
    rig.submit(rig.wait(1), (0xF, 0), rig.wait(3, offset=4))
    assert rig.head() == 1
    # Linux's recovery: overwrite the bad slot (here with a wait), then clear IQE.
    w = rig.wait(2, offset=8)
    rig.ram.write_u64(rig.qbase + 16, w[0])
    rig.ram.write_u64(rig.qbase + 24, w[1])
    rig.clear_fsts(IQE)
    assert rig.head() == 3 and [rig.status_word(o) for o in (0, 8, 4)] == [1, 2, 3]


def test_clearing_iqe_qemu_waits_for_the_next_tail_write() -> None:
    rig = Rig("qemu-7.2-default", profile="qemu-7.2")
    rig.enable_qi()
    rig.submit((0xF, 0), rig.wait(3))
    w = rig.wait(2, offset=8)
    rig.ram.write_u64(rig.qbase, w[0])
    rig.ram.write_u64(rig.qbase + 8, w[1])
    rig.clear_fsts(IQE)
    assert rig.head() == 0 and rig.status_word() == 0
    rig.w64(IQT, rig.tail * 16)
    assert rig.head() == 2 and rig.status_word() == 3 and rig.status_word(8) == 2


# -- ITE / ICE (device-TLB invalidations) --------------------------------------------------------------


def test_device_tlb_timeout_aborts_the_wait_and_stops_fetching() -> None:
    rig = Rig()
    rig.io.attach_device(A, respond=False)
    rig.enable_qi()
    rig.submit(make_descriptor(T_DEV_TLB, SID=A, ADDR=IOVA), rig.wait(1))
    fsts = rig.r32(FSTS)
    assert fsts & ITE and not fsts & IQE
    assert (rig.r64(IQERCD) >> 32) & 0xFFFF == A
    assert rig.status_word() == 0                     # the wait was aborted
    assert rig.head() == 2                            # ... but fetched: IQH is past it
    rig.submit(rig.wait(2))
    assert rig.head() == 2 and rig.status_word() == 0  # nothing fetched while ITE is set
    rig.clear_fsts(ITE)
    assert rig.head() == 3 and rig.status_word() == 2


def test_device_tlb_timeout_without_wait_is_reported_at_the_end_of_the_batch() -> None:
    rig = Rig()
    rig.io.attach_device(B, respond=False)
    rig.enable_qi()
    rig.submit(make_descriptor(T_DEV_TLB, SID=B, ADDR=IOVA, S=1))
    assert rig.r32(FSTS) & ITE and rig.head() == 1 and (rig.r64(IQERCD) >> 32) & 0xFFFF == B


def test_spurious_completion_is_ice_and_processing_continues() -> None:
    rig = Rig()
    rig.io.attach_device(A4, spurious_completion=True)
    rig.enable_qi()
    rig.submit(make_descriptor(T_DEV_TLB, SID=A4, ADDR=IOVA), rig.wait(4))
    assert rig.r32(FSTS) & ICE and rig.r64(IQERCD) >> 48 == A4
    assert rig.status_word() == 4 and rig.head() == 2


def test_device_tlb_invalidation_to_nobody_completes() -> None:
    rig = Rig()
    rig.enable_qi()
    rig.submit(make_descriptor(T_DEV_TLB, SID=0x1234, ADDR=IOVA), rig.wait(6))
    assert not rig.r32(FSTS) and rig.status_word() == 6


# -- ring mechanics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dw,slots", [(False, 256), (True, 128)], ids=["128bit", "256bit"])
def test_wrap_around(dw: bool, slots: int) -> None:
    rig = Rig()
    rig.enable_qi(dw=dw)
    for i in range(slots - 3):
        rig.put(rig.wait(i))
    rig.w64(IQT, rig.tail * rig.slot)
    assert rig.head() == slots - 3 and rig.status_word() == slots - 4
    rig.submit(*(rig.wait(1000 + i) for i in range(6)))
    assert rig.tail == 3 and rig.head() == 3 and rig.r64(IQH) == 3 * rig.slot
    assert rig.status_word() == 1005 and not rig.r32(FSTS)


def test_enabling_with_a_pending_tail_processes_at_once() -> None:
    rig = Rig()
    rig.qbase = rig.alloc.alloc()
    rig.qslots = 256
    rig.put(rig.wait(1))
    rig.put(rig.wait(2))
    rig.w64(IQA, rig.qbase)
    rig.w64(IQT, 0x20)
    assert rig.status_word() == 0
    rig.gcmd(QIE)
    assert rig.status_word() == 2 and rig.r64(IQH) == 0x20


def test_disable_resets_head_spec() -> None:
    rig = Rig()
    rig.enable_qi()
    rig.submit(rig.wait(1), (0xF, 0))
    assert rig.head() == 1
    rig.gcmd(QIE, False)
    assert not rig.r32(GSTS) & QIE and rig.r64(IQH) == 0


def test_disable_qemu_needs_a_drained_queue_ending_with_a_wait() -> None:
    rig = Rig("qemu-7.2-default", profile="qemu-7.2")
    rig.enable_qi()
    rig.submit(make_descriptor(T_IOTLB, G=1))
    rig.gcmd(QIE, False)
    assert rig.r32(GSTS) & QIE
    rig.submit(rig.wait())
    rig.gcmd(QIE, False)
    assert not rig.r32(GSTS) & QIE and rig.r64(IQH) == 0


def test_iqa_is_latched_when_qi_is_enabled() -> None:
    rig = Rig()
    rig.enable_qi()
    other = rig.alloc.alloc()
    rig.w64(IQA, other | 1 << 11)
    assert rig.r64(IQA) == other | 1 << 11           # the register holds what was written ...
    rig.submit(rig.wait(8))                           # ... the unit still uses the latched queue
    assert rig.status_word() == 8 and rig.r64(IQH) == 0x10


def test_iqa_reads_back_the_latched_base_in_qemu() -> None:
    rig = Rig("qemu-7.2-scalable", profile="qemu-7.2")
    rig.w64(IQA, 0x123000 | 1 << 11 | 2)
    assert rig.r64(IQA) == 2
    rig.gcmd(QIE)
    assert rig.r64(IQA) == 0x123002


def test_register_invalidation_is_ignored_while_qi_is_on(legacy: tuple) -> None:
    rig, _, (t1, _) = legacy
    out(rig, A, IOVA)
    t1.map(IOVA, P2, PAGE_4K)
    rig.w64(0xF8, 1 << 63 | 1 << 60)                  # IOTLB_REG global
    assert out(rig, A, IOVA) == P1


def test_qemu_accepts_pasid_descriptors_as_no_ops() -> None:
    rig = Rig("qemu-7.2-default", profile="qemu-7.2")
    rig.enable_qi()
    rig.submit((T_PIOTLB | 2 << 4, 0), (T_PASID_CACHE, 0), rig.wait(5))
    assert rig.status_word() == 5 and not rig.r32(FSTS)
    assert iqei(rig) == IQEI_NO_INFO


def test_register_writes_from_an_interrupt_callback_wait_for_the_current_pass() -> None:
    rig = Rig()
    rig.enable_qi()
    rig.w32(IECTL, 0)

    def on_interrupt(irq: object) -> None:
        if rig.tail == 1:                    # the completion event of the first wait: queue one more
            rig.submit(rig.wait(9, offset=4))

    rig.io.on_interrupt = on_interrupt
    rig.submit(make_descriptor(T_WAIT, IF=1))
    assert rig.head() == 2 and rig.status_word(4) == 9 and not rig.r32(FSTS)


def test_disabling_qi_from_an_interrupt_callback_stops_the_pass() -> None:
    rig = Rig()
    rig.enable_qi()
    rig.w32(IECTL, 0)
    rig.io.on_interrupt = lambda irq: rig.gcmd(QIE, False)
    rig.submit(make_descriptor(T_WAIT, IF=1), rig.wait(3))
    assert not rig.r32(GSTS) & QIE and rig.r64(IQH) == 0 and rig.status_word() == 0


# -- invalidation observers ------------------------------------------------------------------------------


def test_invalidation_observer_sees_exactly_the_invalidations_performed() -> None:
    from vtd_emu.vtd.access import NO_PASID
    from vtd_emu.vtd.descriptors import (ContextInvalidation, DeviceTlbInvalidation, IecInvalidation,
                                         IotlbInvalidation, PageGroupResponse, PasidCacheInvalidation,
                                         PasidIotlbInvalidation)
    rig = Rig()
    sc = rig.scalable()
    sc.device(A, dte=True, pre=True)
    sc.enable()
    rig.io.attach_device(A)
    seen: list[object] = []
    rig.io.add_invalidation_observer(seen.append)
    # Register-based: a global context invalidation, then a page-selective IOTLB one through IVA.
    rig.w64(0x28, 1 << 63 | 1 << 61)
    iva, iotlb = (rig.io.regs.slots[(name, 0)].offset for name in ("IVA", "IOTLB"))
    rig.w64(iva, 0x7654_3000 | 1 << 6 | 1)
    rig.w64(iotlb, 1 << 63 | 3 << 60 | 5 << 32)
    assert (rig.r64(iotlb) >> 57) & 3 == 3
    assert seen == [ContextInvalidation(1, 0, 0, 0, 1, False),
                    IotlbInvalidation(3, 5, 0x7654_3000, 1, True, 3, False)]
    seen.clear()
    rig.enable_qi(dw=True)
    rig.submit(make_descriptor(T_CONTEXT, G=3, DID=0, SID=A, FM=1),
               make_descriptor(T_IOTLB, G=2, DID=3),
               make_descriptor(T_PIOTLB, G=3, DID=4, PASID=5, ADDR=0x7000, AM=0, IH=1),
               make_descriptor(T_PIOTLB, G=2, DID=4, PASID=6),
               make_descriptor(T_PASID_CACHE, G=1, DID=4, PASID=5),
               make_descriptor(T_DEV_TLB, SID=A, ADDR=0x5000, S=0),
               make_descriptor(T_PASID_DEV_TLB, SID=A, PASID=5, G=0, ADDR=0x6000, S=1),
               make_descriptor(T_PASID_DEV_TLB, SID=B, PASID=0, G=1, ADDR=0, S=0),
               make_descriptor(T_IEC, G=1, IIDX=8, IM=2),
               make_descriptor(T_PAGE_RESPONSE, RID=A, PP=1, PASID=5, PRGI=3, RC=0),
               rig.wait(9))
    assert rig.status_word() == 9 and not rig.r32(FSTS) & (IQE | ITE | ICE)
    assert seen == [ContextInvalidation(3, 0, A, 1, 3, True),
                    IotlbInvalidation(2, 3, 0, 0, False, 2, True),
                    PasidIotlbInvalidation(3, 4, 5, 0x7000, 0, True),
                    PasidIotlbInvalidation(2, 4, 6, 0, 0, False),
                    PasidCacheInvalidation(1, 4, 5),
                    DeviceTlbInvalidation(A, NO_PASID, 0x5000, False, True),
                    DeviceTlbInvalidation(A, 5, 0x6000, True, True),
                    DeviceTlbInvalidation(B, None, 0, False, True),
                    IecInvalidation(False, 8, 2),
                    PageGroupResponse(A, 5, 3, 0, 0, False)]
    # An observer that was removed hears nothing more.
    seen.clear()
    rig.io.remove_invalidation_observer(seen.append)
    rig.submit(make_descriptor(T_IOTLB, G=1), rig.wait(10))
    assert rig.status_word() == 10 and seen == []
    # A descriptor the queue refuses (IOTLB G=0) was not performed: the observer is not told.
    rig.io.add_invalidation_observer(seen.append)
    rig.submit(make_descriptor(T_IOTLB, G=0, DID=3))
    assert rig.r32(FSTS) & IQE and seen == []
