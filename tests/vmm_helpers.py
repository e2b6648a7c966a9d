"""A raw guest for the vIOMMU machine tests: tables built in guest RAM with vtd_emu.tables, registers
written through the machine's MMIO, a 256-bit invalidation queue in guest RAM filled by hand.  It issues
only what a test asks for (tests that misbehave on purpose need exactly that), and it checks nothing
against the bridge: the tests do.  It is not built on ``GuestDriver``: that driver's ``qi_submit`` is
Linux's ``qi_submit_sync`` (it repairs IQE and clears ITE itself, per-slot QI_DONE statuses) and its
``init`` is Linux's bring-up (its own root table, global flushes, caching-mode flushes at attach), while
these tests watch FSTS.ITE stay set until they clear it, reset the tail by hand after a machine reset,
read increasing wait tokens from a bridge listener, and write entries with no invalidation at all.

Also an independent reference for passthrough DMA: where a GVA lands in host memory, computed from the
first-stage builder's own model of what it mapped and the VMM's page table (never from the bridge or the
host IOMMU)."""

from __future__ import annotations

from vtd_emu.spec import specs
from vtd_emu.spec.consts import CAP, FSTS, GCMD, IQA
from vtd_emu.tables import (PGTT_FS, FirstStageTable, PageAllocator, PasidTables, ScalableRootTable, enable_translation,
                            gcmd_set)
from vtd_emu.vmm import Machine
from vtd_emu.vtd.qi import T_PASID_CACHE, T_PIOTLB, T_WAIT, T_CONTEXT, T_IOTLB, make_descriptor


def reg(name: str) -> int:
    off = specs().register(name).offset
    assert off is not None
    return off


IQT, IQA_OFF, IQH, FSTS_OFF = reg("IQT"), reg("IQA"), reg("IQH"), reg("FSTS")
PAGE = 4096


class RawGuest:
    """Scalable-mode tables and a queue of 128 256-bit slots in guest RAM [base, limit)."""

    def __init__(self, m: Machine, base: int = 0x10_0000, limit: int = 0x80_0000) -> None:
        self.m = m
        self.alloc = PageAllocator(m.mem, base=base, limit=limit)
        self.rt = ScalableRootTable(m.mem, self.alloc)
        self.pasids: dict[int, PasidTables] = {}
        self.qbase = self.alloc.alloc()
        self.slots = PAGE // 32
        self.tail = 0
        self.status = self.alloc.alloc()
        self.waits = 0

    def device(self, sid: int, *, paside: bool = True, fpd: bool = False, pre: bool = False) -> PasidTables:
        pt = PasidTables(self.m.mem, self.alloc)
        self.rt.set_context(sid >> 8, sid & 0xFF, pasid_dir=pt.dir, pdts=pt.pdts, paside=paside, fpd=fpd, pre=pre,
                            dte=pre)
        self.pasids[sid] = pt
        return pt

    def fs_table(self, levels: int = 4) -> FirstStageTable:
        return FirstStageTable(self.m.mem, self.alloc, levels=levels)

    def bind_fs(self, sid: int, pasid: int, fs: FirstStageTable, did: int, *, invalidate: bool = True,
                **kw: object) -> None:
        """Point (sid, pasid) at ``fs`` and, as Linux does under caching mode, invalidate the PASID cache."""
        self.pasids[sid].set_entry(pasid, pgtt=PGTT_FS, did=did, fsptptr=fs.root, fspm=fs.fspm, **kw)  # type: ignore[arg-type]
        if invalidate:
            self.submit(pasid_cache(did, pasid))

    def enable(self, *, qi: bool = True) -> None:
        if qi:
            self.enable_qi()
        enable_translation(self.m, self.rt.root, scalable=True)

    def enable_qi(self) -> None:
        self.m.mmio_write(IQT, 0, 8)
        self.m.mmio_write(IQA_OFF, self.qbase | IQA.DW, 8)
        gcmd_set(self.m, GCMD.QIE)

    def put(self, desc: tuple[int, ...]) -> None:
        qws = list(desc) + [0] * (4 - len(desc))
        for i, q in enumerate(qws):
            self.m.mem.write_u64(self.qbase + self.tail * 32 + 8 * i, q)
        self.tail = (self.tail + 1) % self.slots

    def submit(self, *descs: tuple[int, ...], wait: bool = True) -> bool:
        """Queue ``descs`` (and a status-writing wait), advance IQT once; True when the wait's status was
        written (the invalidations completed)."""
        for d in descs:
            self.put(d)
        token = 0
        if wait:
            self.waits += 1
            token = self.waits
            self.put(make_descriptor(T_WAIT, SW=1, STATUS_DATA=token, STATUS_ADDR=self.status))
        self.m.mmio_write(IQT, self.tail * 32, 8)
        return not wait or self.status_word() == token

    def status_word(self) -> int:
        return int.from_bytes(self.m.mem.read(self.status, 4), "little")

    def fsts(self) -> int:
        return self.m.mmio_read(FSTS_OFF, 4)

    def clear_fsts(self, bits: int) -> None:
        self.m.mmio_write(FSTS_OFF, bits, 4)

    def clear_faults(self) -> None:
        """The guest's fault handler: clear every FRCD holding a fault (F is write-1-to-clear), then PFO."""
        cap = self.m.mmio_read(reg("CAP"), 8)
        fro = ((cap & CAP.FRO) >> CAP.FRO_LO) * 16
        for i in range(((cap & CAP.NFR) >> CAP.NFR_LO) + 1):
            hi = fro + 16 * i + 8
            if self.m.mmio_read(hi, 8) >> 63:
                self.m.mmio_write(hi, 1 << 63, 8)
        self.m.mmio_write(FSTS_OFF, FSTS.PFO, 4)

    def set_te(self, on: bool) -> None:
        cur = self.m.mmio_read(reg("GSTS"), 4) & 0x96FF_FFFF
        self.m.mmio_write(reg("GCMD"), (cur | GCMD.TE) if on else (cur & ~GCMD.TE), 4)


def pasid_cache(did: int, pasid: int | None = None) -> tuple[int, int]:
    """PASID-selective (``pasid`` given) or domain-selective PASID-cache invalidation."""
    if pasid is None:
        return make_descriptor(T_PASID_CACHE, G=0, DID=did)
    return make_descriptor(T_PASID_CACHE, G=1, DID=did, PASID=pasid)


def piotlb(did: int, pasid: int, addr: int | None = None, am: int = 0, ih: bool = False) -> tuple[int, int]:
    """PASID-based IOTLB invalidation: PASID-selective, or page-selective from ``addr``."""
    if addr is None:
        return make_descriptor(T_PIOTLB, G=2, DID=did, PASID=pasid)
    return make_descriptor(T_PIOTLB, G=3, DID=did, PASID=pasid, ADDR=addr, AM=am, IH=int(ih))


def context_global() -> tuple[int, int]:
    return make_descriptor(T_CONTEXT, G=1)


def iotlb_domain(did: int) -> tuple[int, int]:
    return make_descriptor(T_IOTLB, G=2, DID=did)


def expected_hpa(m: Machine, fs: FirstStageTable, gva: int) -> int | None:
    """Where the two stages put ``gva``: the builder's model (GVA → GPA), then the VMM's page table
    (GPA → host page), both independent of the IOMMUs."""
    hit = fs.lookup(gva)
    if hit is None:
        return None
    gpa = hit[0]
    if not 0 <= gpa < m.size:
        return None
    page = m.host.process.ptes.get((m.ram_va + gpa) >> 12)
    return None if page is None else page + (gpa & (PAGE - 1))


ITE = FSTS.ITE
__all__ = ["RawGuest", "pasid_cache", "piotlb", "context_global", "iotlb_domain", "expected_hpa", "reg", "ITE"]
