"""Device-TLB (ATS): translation requests, the device's own cache staying stale until a device-TLB
invalidation reaches it, and the S-bit range encoding of those invalidations."""

from __future__ import annotations

import pytest

from chip_helpers import FSTS, PAGE_4K, PGTT_SS, R, W, Rig
from vtd_emu.tables import PAGE_2M
from vtd_emu.vtd.ats import ats_range
from vtd_emu.vtd.qi import T_DEV_TLB, T_IOTLB, T_PASID_DEV_TLB, make_descriptor

IOVA = 0x4000_0000
P1, P2 = 0x8000_0000, 0x8100_0000
A = 0x0010


def legacy(tt: int = 1) -> tuple[Rig, object]:
    rig = Rig()
    lg = rig.legacy()
    t = lg.table()
    t.map(IOVA, P1, 16 * PAGE_4K, R | W)
    t.map(IOVA + 0x20_0000, P1 + 0x20_0000, PAGE_2M, R, page_size=PAGE_2M)
    lg.attach(A, t, did=1, tt=tt)
    lg.enable()
    rig.enable_qi()
    return rig, t


def test_ats_range_decode() -> None:
    assert ats_range(0x1234_5000, False) == (0x1234_5000, 0x1000)
    assert ats_range(0x1234_4000, True) == (0x1234_4000, 0x2000)           # bit 12 clear: 8 KiB
    assert ats_range(0x1234_5000, True) == (0x1234_4000, 0x4000)           # bits 13:12 = 01: 16 KiB
    assert ats_range(0x1234_3000, True) == (0x1234_0000, 0x8000)           # bits 14:12 = 011: 32 KiB
    assert ats_range(0x7FFF_FFFF_FFFF_F000, True) == (0, 1 << 64)          # everything
    assert ats_range(0xFFFF_FFFF_FFFF_F000, True) == (0, 1 << 64)


def test_translation_request_grants_and_caches() -> None:
    rig, _ = legacy()
    dev = rig.io.attach_device(A)
    c = dev.translation_request(IOVA + 0x123, "w")
    assert c and c.status == "success" and (c.addr, c.size, c.read, c.write) == (P1, PAGE_4K, True, True)
    big = dev.translation_request(IOVA + 0x20_1000)
    assert (big.addr, big.size, big.read, big.write) == (P1 + 0x20_0000, PAGE_2M, True, False)
    assert dev.lookup(IOVA + 0x20_5000) is not None                        # one entry covers the 2 MiB
    assert rig.io.fault_records() == []


def test_write_request_to_read_only_page_grants_read_only() -> None:
    rig, _ = legacy()
    dev = rig.io.attach_device(A)
    c = dev.translation_request(IOVA + 0x20_0000, "w")
    assert c.read and not c.write and c.reason == 0x05
    assert rig.io.fault_records() == []


def test_not_present_is_a_recoverable_denial_without_fault() -> None:
    rig, _ = legacy()
    dev = rig.io.attach_device(A)
    c = dev.translation_request(IOVA + 0x100_0000)
    assert not c and c.status == "success" and not c.read and not c.write and c.reason == 0x06
    assert rig.io.fault_records() == [] and not rig.r32(FSTS)
    assert dev.atc == {}


def test_context_without_device_tlb_is_ur_with_fault_0xd() -> None:
    rig, _ = legacy(tt=0)
    dev = rig.io.attach_device(A)
    c = dev.translation_request(IOVA)
    assert c.status == "ur" and c.reason == 0x0D
    assert [f.reason for f in rig.io.fault_records()] == [0x0D]
    # A translated request is blocked the same way.
    assert rig.io.translated_access(A, P1, True) == -0x0D


def test_scalable_context_needs_dte() -> None:
    for dte, status in ((False, "ur"), (True, "success")):
        rig = Rig()
        sm = rig.scalable()
        pt = sm.device(A, dte=dte)
        ss = sm.ss_table()
        ss.map(IOVA, P1, PAGE_4K)
        pt.set_entry(0, pgtt=PGTT_SS, did=3, ssptptr=ss.root, aw=ss.aw)
        sm.enable()
        c = rig.io.attach_device(A).translation_request(IOVA)
        assert c.status == status
        assert [f.reason for f in rig.io.fault_records()] == ([] if dte else [0x44])


def test_device_tlb_is_stale_until_device_tlb_invalidation() -> None:
    rig, t = legacy()
    dev = rig.io.attach_device(A)
    assert dev.translated_dma_write(IOVA, b"one").ok
    assert rig.ram.read(P1, 3) == b"one"
    t.map(IOVA, P2, PAGE_4K)
    rig.submit(make_descriptor(T_IOTLB, G=1), rig.wait())                 # the IOMMU's caches only
    assert rig.io.translate(A, IOVA).addr == P2
    assert dev.translated_dma_write(IOVA, b"two").ok
    assert rig.ram.read(P1, 3) == b"two" and rig.ram.read(P2, 3) == b"\0\0\0"   # stale ATC entry used
    rig.submit(make_descriptor(T_DEV_TLB, SID=A, ADDR=IOVA), rig.wait())
    assert dev.lookup(IOVA) is None and dev.invalidations == 1
    assert dev.translated_dma_write(IOVA, b"new").ok
    assert rig.ram.read(P2, 3) == b"new"
    assert dev.translated_dma_read(IOVA, 3).data == b"new"


@pytest.mark.parametrize("addr,s,gone", [
    (IOVA + 5 * PAGE_4K, 0, {5}),
    (IOVA + 4 * PAGE_4K, 1, {4, 5}),                       # 8 KiB
    (IOVA + 0x3000, 1, set(range(0, 8))),                   # 32 KiB
    (IOVA + 0xB000, 1, set(range(8, 16))),                  # 32 KiB, upper half
    (0x7FFF_FFFF_FFFF_F000, 1, set(range(16))),             # everything
], ids=["4K", "8K", "32K-low", "32K-high", "all"])
def test_device_tlb_invalidation_ranges(addr: int, s: int, gone: set[int]) -> None:
    rig, _ = legacy()
    dev = rig.io.attach_device(A)
    for i in range(16):
        assert dev.translation_request(IOVA + i * PAGE_4K)
    rig.submit(make_descriptor(T_DEV_TLB, SID=A, ADDR=addr, S=s), rig.wait())
    assert {i for i in range(16) if dev.lookup(IOVA + i * PAGE_4K) is None} == gone


def test_device_tlb_invalidation_for_another_device_leaves_this_one() -> None:
    rig, _ = legacy()
    dev = rig.io.attach_device(A)
    other = rig.io.attach_device(0x0018)
    dev.translation_request(IOVA)
    rig.submit(make_descriptor(T_DEV_TLB, SID=0x0018, ADDR=IOVA), rig.wait())
    assert dev.lookup(IOVA) is not None and other.invalidations == 1


def test_pasid_based_device_tlb_invalidation() -> None:
    rig = Rig()
    sm = rig.scalable()
    pt = sm.device(A, dte=True)
    ss = sm.ss_table()
    ss.map(IOVA, P1, PAGE_4K)
    for pasid in (0, 1, 2):
        pt.set_entry(pasid, pgtt=PGTT_SS, did=3, ssptptr=ss.root, aw=ss.aw)
    sm.enable()
    rig.enable_qi(dw=True)
    dev = rig.io.attach_device(A)

    def fill() -> None:
        assert dev.translation_request(IOVA)
        for p in (1, 2):
            assert dev.translation_request(IOVA, pasid=p)

    def cached() -> set[int | None]:
        return {p for p in (None, 1, 2) if dev.lookup(IOVA, p) is not None}

    fill()
    rig.submit(make_descriptor(T_PASID_DEV_TLB, SID=A, PASID=1, ADDR=IOVA), rig.wait())
    assert cached() == {None, 2}
    rig.submit(make_descriptor(T_DEV_TLB, SID=A, ADDR=IOVA), rig.wait())
    assert cached() == {2}                                  # type 3: requests without PASID only
    fill()
    rig.submit(make_descriptor(T_PASID_DEV_TLB, SID=A, G=1, ADDR=IOVA), rig.wait())
    assert cached() == {None}                               # G: every PASID
    assert not rig.r32(FSTS)


def test_ats_disabled_or_translation_off() -> None:
    rig = Rig()
    dev = rig.io.attach_device(A)
    assert dev.translation_request(IOVA).status == "ur"      # remapping off
    quiet = rig.io.attach_device(0x0030, ats=False)
    with pytest.raises(ValueError):
        quiet.translation_request(IOVA)


def test_ats_translate_passes_execute_through() -> None:
    from chip_helpers import PGTT_FS, U
    from vtd_emu.spec.consts import FR

    rig = Rig()
    sm = rig.scalable()
    pt = sm.device(A, dte=True)
    fs = sm.fs_table()
    fs.map(IOVA, P1, PAGE_4K, W | U)
    pt.set_entry(1, pgtt=PGTT_FS, did=3, fsptptr=fs.root, ere=False)
    pt.set_entry(2, pgtt=PGTT_FS, did=4, fsptptr=fs.root, ere=True)
    sm.enable()
    assert rig.io.ats_translate(A, IOVA, pasid=1).read
    denied = rig.io.ats_translate(A, IOVA, pasid=1, exe=True)     # execute without PASID-entry ERE
    assert denied.status == "success" and not denied and denied.reason == FR.SM_ERE_CLEAR
    granted = rig.io.ats_translate(A, IOVA, pasid=2, exe=True)
    assert granted and (granted.addr, granted.read) == (P1, True)
    assert rig.io.fault_records() == []


def test_translated_dma_past_the_top_of_the_address_space_is_the_architectural_result() -> None:
    rig, _ = legacy()
    dev = rig.io.attach_device(A)
    top = (1 << 64) - 0x800
    got = dev.translated_dma_read(top, 0x1000)
    assert got.data == bytes(0x1000) and not got.ok
    assert got.faults == rig.io.dma_read(A, top, 0x1000).faults          # what the unit's own DMA reports
    assert dev.translated_dma_write(top, b"x" * 0x1000).faults == got.faults
