"""Interrupt remapping: MSI decode, xAPIC and x2APIC destinations, every IR fault reason (0x20-0x26) as
recorded in the FRCDs, FPD, and the interrupt-entry cache staying stale until invalidated."""

from __future__ import annotations

import pytest

from chip_helpers import CFI, FSTS, IRE, IRTA, SIRTP, Rig
from vtd_emu.spec import specs
from vtd_emu.vtd.events import Interrupt
from vtd_emu.vtd.intremap import IrFault
from vtd_emu.vtd.qi import T_IEC, make_descriptor

IRTE = specs().structure("irte")
SID = 0x0310          # bus 3, device 2, function 0
S = 7                 # 256 entries


def msi(handle: int, shv: bool = False) -> int:
    return 0xFEE0_0000 | (handle & 0x7FFF) << 5 | 1 << 4 | int(shv) << 3 | (handle >> 15) << 2


class IrRig(Rig):
    def __init__(self, *, eime: bool = False, profile: str = "spec", preset: str = "modern", **kw: object) -> None:
        super().__init__(preset, profile=profile, **kw)  # type: ignore[arg-type]
        self.table = self.alloc.alloc()
        self.eime = eime
        self.w64(IRTA, self.table | int(eime) << 11 | S)
        self.w32(0x18, SIRTP)
        self.gcmd(IRE)

    def irte(self, index: int, **fields: int) -> None:
        fields.setdefault("P", 1)
        v = IRTE.encode(**fields)
        self.ram.write_u64(self.table + 16 * index, v & (1 << 64) - 1)
        self.ram.write_u64(self.table + 16 * index + 8, v >> 64)

    def remap(self, addr: int, data: int = 0, sid: int = SID) -> Interrupt | IrFault:
        return self.io.remap_interrupt(sid, addr, data)


def test_xapic_remap() -> None:
    rig = IrRig()
    rig.irte(5, V=0x41, DST=0x2A << 8, DM=1, RH=1, TM=1, DLM=1)
    irq = rig.remap(msi(5))
    assert irq == Interrupt("remapped", 0xFEE2_A00C, 0x41 | 1 << 8 | 1 << 14 | 1 << 15, 0x41, 0x2A)
    assert rig.io.interrupts[-1] == irq


def test_x2apic_remap() -> None:
    rig = IrRig(eime=True)
    rig.irte(6, V=0x99, DST=0x1234_5678, DLM=0)
    irq = rig.remap(msi(6))
    assert isinstance(irq, Interrupt)
    assert (irq.vector, irq.dest) == (0x99, 0x1234_5678)
    # Destination bits 31:8 in address bits 63:40 (x86 extended-destination form).
    assert irq.addr == 0x1234_5600 << 32 | 0xFEE7_8000 and irq.data == 0x99 | 1 << 14


def test_subhandle_selects_the_entry() -> None:
    rig = IrRig()
    rig.irte(15, V=0x50, DST=1 << 8)
    rig.irte(10, V=0x60, DST=1 << 8)
    assert rig.remap(msi(10, shv=True), data=5).vector == 0x50
    assert rig.remap(msi(10, shv=False), data=5).vector == 0x60      # without SHV the data is not added


def test_ir_disabled_passes_through() -> None:
    rig = IrRig()
    rig.gcmd(IRE, False)
    irq = rig.remap(0xFEE0_1000, 0x31)
    assert irq == Interrupt("passthrough", 0xFEE0_1000, 0x31, 0x31, 1)


def frcd(rig: Rig) -> tuple[int, int]:
    v = rig.io.regs.get("FRCD")
    return v & (1 << 64) - 1, v >> 64


@pytest.mark.parametrize("case,reason,index", [
    ("upper-address", 0x20, 3), ("data-high-with-shv", 0x20, 3), ("index-over", 0x21, 256),
    ("handle-bit-15", 0x21, 0x8003), ("not-present", 0x22, 3), ("reserved", 0x24, 3),
    ("xapic-dst-low-byte", 0x24, 3), ("posted", 0x24, 3), ("sid", 0x26, 3), ("svt-reserved", 0x26, 3),
    ("bus-range", 0x26, 3),
])
def test_ir_faults_are_recorded(case: str, reason: int, index: int) -> None:
    rig = IrRig()
    fields: dict[str, int] = dict(V=0x30, DST=1 << 8)
    addr, data = msi(3), 0
    if case == "upper-address":
        addr |= 1 << 32
    elif case == "data-high-with-shv":
        addr, data = msi(3, shv=True), 1 << 16
    elif case == "index-over":
        addr = msi(256)
    elif case == "handle-bit-15":
        addr = msi(0x8003)
    elif case == "not-present":
        fields["P"] = 0
    elif case == "reserved":
        fields["RSVD0"] = 1
    elif case == "xapic-dst-low-byte":
        fields["DST"] = 0x0101
    elif case == "posted":
        fields["IM"] = 1
    elif case == "sid":
        fields.update(SVT=1, SID=SID ^ 0x100)
    elif case == "svt-reserved":
        fields.update(SVT=3, SID=SID)
    elif case == "bus-range":
        fields.update(SVT=2, SID=0x0405)                 # buses 4..5, requester is on bus 3
    rig.irte(3, **fields)
    got = rig.remap(addr, data)
    assert isinstance(got, IrFault) and not got and got.recorded
    assert (got.reason, got.index) == (reason, index)
    lo, hi = frcd(rig)
    assert lo == (index & 0xFFFF) << 48
    assert hi & 0xFFFF == SID and (hi >> 32) & 0xFF == reason
    assert hi >> 63 == 1 and (hi >> 62) & 1 == 0 and (hi >> 31) & 1 == 0    # F, T=0, no PASID
    assert rig.r32(FSTS) & 2


def test_irte_read_error_is_0x23() -> None:
    rig = IrRig(ram_size=64 << 20)
    rig.w64(IRTA, 0x1_0000_0000 | S)
    rig.w32(0x18, (rig.r32(0x1C) & 0x96FF_FFFF) | SIRTP)
    got = rig.remap(msi(1))
    assert isinstance(got, IrFault) and got.reason == 0x23


@pytest.mark.parametrize("fields,reason", [(dict(P=0, FPD=1), 0x22), (dict(FPD=1, RSVD1=1), 0x24),
                                           (dict(FPD=1, SVT=1, SID=0x9999), 0x26)])
def test_fpd_suppresses_qualified_ir_faults(fields: dict, reason: int) -> None:
    rig = IrRig()
    rig.irte(2, V=0x30, DST=1 << 8, **fields)
    got = rig.remap(msi(2))
    assert isinstance(got, IrFault) and got.reason == reason and not got.recorded
    assert rig.io.fault_records() == [] and rig.io.suppressed == 1


def test_fpd_does_not_suppress_index_overflow() -> None:
    rig = IrRig()
    got = rig.remap(msi(300))
    assert isinstance(got, IrFault) and got.reason == 0x21 and got.recorded


@pytest.mark.parametrize("sq,requester,ok", [(0, SID, True), (0, SID | 4, False), (1, SID | 4, True),
                                             (1, SID | 2, False), (2, SID | 6, True), (3, SID | 7, True),
                                             (3, SID | 8, False)])
def test_source_id_qualifier(sq: int, requester: int, ok: bool) -> None:
    rig = IrRig()
    rig.irte(4, V=0x30, DST=1 << 8, SVT=1, SQ=sq, SID=SID)
    assert bool(rig.remap(msi(4), sid=requester)) == ok


@pytest.mark.parametrize("requester,ok", [(0x0200, False), (0x0300, True), (0x05FF, True), (0x0600, False)])
def test_bus_range_verification(requester: int, ok: bool) -> None:
    rig = IrRig()
    rig.irte(4, V=0x30, DST=1 << 8, SVT=2, SID=0x0305)
    assert bool(rig.remap(msi(4), sid=requester)) == ok


def test_compatibility_format_needs_cfi_in_xapic_mode() -> None:
    rig = IrRig()
    compat = 0xFEE0_1000
    got = rig.remap(compat, 0x31)
    assert isinstance(got, IrFault) and got.reason == 0x25 and got.recorded
    rig.gcmd(CFI)
    assert rig.remap(compat, 0x31) == Interrupt("passthrough", compat, 0x31, 0x31, 1)
    x2 = IrRig(eime=True)
    x2.gcmd(CFI)
    got = x2.remap(compat, 0x31)
    assert isinstance(got, IrFault) and got.reason == 0x25


def test_compatibility_format_passes_in_qemu() -> None:
    rig = IrRig(profile="qemu-7.2", preset="qemu-7.2-default")
    assert isinstance(rig.remap(0xFEE0_1000, 0x31), Interrupt)


def test_interrupt_entry_cache_is_stale_until_invalidated() -> None:
    rig = IrRig()
    rig.enable_qi()
    rig.irte(3, V=0x30, DST=1 << 8)
    assert rig.remap(msi(3)).vector == 0x30
    rig.irte(3, V=0x31, DST=1 << 8)
    assert rig.remap(msi(3)).vector == 0x30                          # cached IRTE
    rig.submit(make_descriptor(T_IEC, G=1, IIDX=4, IM=2), rig.wait())   # 4..7: not this one
    assert rig.remap(msi(3)).vector == 0x30
    rig.submit(make_descriptor(T_IEC, G=1, IIDX=2, IM=1), rig.wait())   # 2..3
    assert rig.remap(msi(3)).vector == 0x31
    rig.irte(3, V=0x32, DST=1 << 8)
    rig.submit(make_descriptor(T_IEC, G=0), rig.wait())                 # global
    assert rig.remap(msi(3)).vector == 0x32


def test_not_present_entries_are_not_cached() -> None:
    rig = IrRig()
    rig.irte(3, P=0)
    assert not rig.remap(msi(3))
    rig.irte(3, V=0x44, DST=1 << 8)
    assert rig.remap(msi(3)).vector == 0x44


@pytest.mark.parametrize("esirtps,fresh", [(1, True), (0, False)])
def test_sirtp_flushes_the_cache_only_with_esirtps(esirtps: int, fresh: bool) -> None:
    rig = IrRig(overrides={"cap.ESIRTPS": esirtps})
    rig.irte(3, V=0x30, DST=1 << 8)
    rig.remap(msi(3))
    rig.irte(3, V=0x31, DST=1 << 8)
    rig.w32(0x18, (rig.r32(0x1C) & 0x96FF_FFFF) | SIRTP)
    assert rig.remap(msi(3)).vector == (0x31 if fresh else 0x30)
