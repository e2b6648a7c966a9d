"""Properties of the machine over random guest first-stage tables (hypothesis):

- an emulated device and a passthrough device of one guest, given the same tables, PASIDs and DMAs, give
  the same result: the same bytes, the same guest-visible fault reasons, the same chunks ending outside
  guest RAM (the emulated device's DMA is the vIOMMU's own walk; the passthrough one the host IOMMU's
  nested walk, its faults mapped to the guest's as docs/vmm.md says); and a DMA that succeeds lands where
  the first-stage builder's own model says;
- isolation: whatever the guest's tables say (leaves and table pointers outside guest RAM included), no
  passthrough DMA reads or writes a host page outside the guest-RAM mapping.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtd_emu.memory import HostRAM
from vtd_emu.tables import PGTT_FS, FirstStageTable, U, W
from vtd_emu.vmm import Machine
from vtd_emu.vtd.qi import T_PASID_CACHE, make_descriptor

from vmm_helpers import RawGuest

PT_SID, EMU_SID = 0x0310, 0x0320
RAM = 8 << 20
PAGE = 4096
DATA_BASE = 0x40_0000            # guest pages DMA may target (the tables live below)
GVA_BASES = (0x7F00_0000_0000, 0x0000_5555_0000_0000)
OUTSIDE = (RAM, RAM + 0x3000, 0x1_0000_0000, 0x40_0000_0000)     # GPAs that are not guest RAM
NON_CANONICAL = 0x0000_8000_0000_0000


class Mapping(NamedTuple):
    gva: int
    gpa: int
    perms: int


class Dma(NamedTuple):
    pasid: int | None
    gva: int
    length: int
    write: bool


Scenario = tuple[list[Mapping], str, list[int], list[Dma], bool]


@st.composite
def scenarios(draw: Any) -> tuple[list[Mapping], str, list[int], list[Dma], bool]:
    vpns = draw(st.lists(st.tuples(st.sampled_from(GVA_BASES), st.integers(0, 31)), min_size=1, max_size=6,
                         unique=True))
    maps = []
    for base, vpn in vpns:
        if draw(st.integers(0, 3)):
            gpa = DATA_BASE + draw(st.integers(0, (RAM - DATA_BASE) // PAGE - 1)) * PAGE
        else:
            gpa = draw(st.sampled_from(OUTSIDE))
        maps.append(Mapping(base + vpn * PAGE, gpa, draw(st.sampled_from([W | U, U, W]))))
    corrupt = draw(st.sampled_from(["none", "none", "table", "root"]))
    pasids = sorted(draw(st.sets(st.integers(1, 300), min_size=1, max_size=2)))
    dmas = []
    for _ in range(draw(st.integers(1, 8))):
        target = draw(st.sampled_from([m.gva for m in maps] + [GVA_BASES[0] + 40 * PAGE, NON_CANONICAL]))
        pasid = draw(st.sampled_from([None, *pasids]))
        dmas.append(Dma(pasid, target + draw(st.integers(0, PAGE - 1)), draw(st.integers(1, PAGE + 64)),
                        draw(st.booleans())))
    return maps, corrupt, pasids, dmas, draw(st.booleans())


def build(maps: list[Mapping], corrupt: str, pasids: list[int], fpd: bool) -> tuple[Machine, FirstStageTable, RawGuest]:
    m = Machine(guest_ram=RAM)
    m.add_passthrough_device(PT_SID)
    m.add_emulated_device(EMU_SID)
    g = RawGuest(m, limit=DATA_BASE)
    fs = g.fs_table()
    for mp in maps:
        fs.map(mp.gva, mp.gpa, PAGE, mp.perms)
    root = fs.root
    if corrupt == "table":
        # A page-directory entry of the first mapping points outside guest RAM.
        addr = fs.entry_addr(maps[0].gva, 2)
        assert addr is not None
        m.mem.write_u64(addr, (m.mem.read_u64(addr) & 0xFFF) | OUTSIDE[0])
    elif corrupt == "root":
        root = OUTSIDE[2]
    for sid in (PT_SID, EMU_SID):
        pt = g.device(sid)
        for pasid in [0, *pasids]:
            pt.set_entry(pasid, pgtt=PGTT_FS, did=3, fsptptr=root, fpd=fpd and pasid != 0)
    g.enable()
    g.submit(make_descriptor(T_PASID_CACHE, G=3))   # Linux-like: the PASID entries were made present
    return m, fs, g


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(scenarios())
def test_emulated_and_passthrough_devices_give_the_same_results(s: Scenario) -> None:
    maps, corrupt, pasids, dmas, fpd = s
    m, fs, g = build(maps, corrupt, pasids, fpd)
    pt, emu = m.devices[PT_SID], m.devices[EMU_SID]
    faults = m.viommu.faults
    for i, d in enumerate(dmas):
        counts = []
        if d.write:
            payloads = (bytes([1 + i]) * d.length, bytes([0x80 + i]) * d.length)
            results = []
            for dev, data in zip((pt, emu), payloads):
                g.clear_faults()                     # room in the FRCDs for either device's records
                before = (faults.recorded, faults.suppressed)
                r = dev.dma_write(d.gva, data, pasid=d.pasid)
                counts.append((faults.recorded - before[0], faults.suppressed - before[1]))
                results.append(r)
                hit = fs.lookup(d.gva)
                if r.ok and corrupt == "none":
                    # Landed where the builder's model says (first page of the transfer).
                    assert hit is not None
                    n = min(d.length, PAGE - (d.gva & (PAGE - 1)))
                    assert m.mem.read(hit[0], n) == data[:n]
            p, e = results
        else:
            reads = []
            for dev in (pt, emu):
                g.clear_faults()
                before = (faults.recorded, faults.suppressed)
                reads.append(dev.dma_read(d.gva, d.length, pasid=d.pasid))
                counts.append((faults.recorded - before[0], faults.suppressed - before[1]))
            p, e = reads
            assert p.data == e.data
        assert (p.faults, p.unbacked) == (e.faults, e.unbacked), d
        # The guest's fault log sees the same: as many records (FPD: as many suppressions) for either device.
        assert counts[0] == counts[1], d
    m.close()


class AccessLog:
    """Host RAM as the physical IOMMU sees it, noting every host page a data access (``read``/``write``)
    or a 64-bit store (A/D updates) touches."""

    def __init__(self, ram: HostRAM) -> None:
        self.ram = ram
        self.data: set[int] = set()
        self.stores: set[int] = set()
        self.read_u64 = ram.read_u64
        self.is_ram = ram.is_ram
        self.size = ram.size

    def read(self, addr: int, n: int) -> bytes:
        self.data.update(range(addr >> 12, ((addr + max(n, 1) - 1) >> 12) + 1))
        return self.ram.read(addr, n)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> int:
        self.data.update(range(addr >> 12, ((addr + max(len(data), 1) - 1) >> 12) + 1))
        return self.ram.write(addr, data)

    def write_u64(self, addr: int, value: int) -> bool:
        self.stores.add(addr >> 12)
        return self.ram.write_u64(addr, value)


@SETTINGS
@given(scenarios())
def test_passthrough_dma_never_leaves_guest_ram(s: Scenario) -> None:
    maps, corrupt, pasids, dmas, fpd = s
    m, _, _ = build(maps, corrupt, pasids, fpd)
    pt = m.devices[PT_SID]
    guest_pages = {(m.hpa_of(g) or 0) >> 12 for g in range(0, m.size, PAGE)}
    log = AccessLog(m.host.ram)
    chip = m.host.iommu
    chip.mem = log  # type: ignore[assignment]
    driver_pool = range(m.host.driver_pool.base >> 12, m.host.driver_pool.limit >> 12)
    for i, d in enumerate(dmas):
        if d.write:
            pt.dma_write(d.gva, bytes([i]) * d.length, pasid=d.pasid)
        else:
            pt.dma_read(d.gva, d.length, pasid=d.pasid)
    chip.mem = m.host.ram
    assert log.data <= guest_pages, "a DMA reached a host page outside guest RAM"
    # A/D updates go to the guest's first-stage tables (guest RAM) or the host's own second stage.
    assert all(p in guest_pages or p in driver_pool for p in log.stores)
    m.close()
