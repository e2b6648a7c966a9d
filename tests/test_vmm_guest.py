"""The guest driver against a plain VtdIommu: Linux's bring-up order, the invalidations it issues for
map/unmap/attach/bind, what DMA sees afterwards, the PRQ thread and QI error recovery.

Expected register sequences and descriptors are written here from Linux's drivers/iommu/intel code
(init_dmars, qi_submit_sync, cache_tag_flush_range, intel_pasid_tear_down_entry), not read back from the
driver; expected translations come from the test's own arithmetic or a dict model."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtd_emu.memory import HostRAM
from vtd_emu.spec import consts, specs
from vtd_emu.tables import PAGE_2M, PAGE_4K, FirstStageTable, PageAllocator, R, U, W
from vtd_emu.vmm.guest import QI_DONE, RESP_FAILURE, RESP_SUCCESS, GuestDriver, GuestDriverError, PageRequest
from vtd_emu.vtd.config import VtdConfig
from vtd_emu.vtd.iommu import Fault, VtdIommu, Translation
from vtd_emu.vtd.qi import IQEI_RESERVED, IQEI_TYPE, T_CONTEXT, make_descriptor

ALLOC_BASE, ALLOC_LIMIT = 0x10_0000, 0x100_0000
DATA = 0x4000_0000          # guest RAM the tests map DMA onto, far from the driver's tables
G, S = consts.GCMD, consts.GSTS


def off(name: str) -> int:
    o = specs().register(name).offset
    assert o is not None
    return o


NAMES = {off(n): n for n in ("GCMD", "RTADDR", "IQT", "IQA", "FEDATA", "FEADDR", "FEUADDR", "FECTL", "PQH", "PQT",
                             "PQA", "PEDATA", "PEADDR", "PEUADDR", "PECTL", "CCMD", "FSTS", "PMEN", "PRSTS")}


class Recorder:
    """The unit's register block, recording every write (an independent view of what the driver did)."""

    def __init__(self, iommu: VtdIommu) -> None:
        self.iommu = iommu
        self.writes: list[tuple[int, int, int]] = []

    def mmio_read(self, offset: int, size: int) -> int:
        return self.iommu.mmio_read(offset, size)

    def mmio_write(self, offset: int, value: int, size: int) -> None:
        self.writes.append((offset, value, size))
        self.iommu.mmio_write(offset, value, size)

    def named(self) -> list[tuple[str, int]]:
        return [(NAMES.get(o, hex(o)), v) for o, v, _ in self.writes]


def make(preset: str = "modern", overrides: dict[str, int] | None = None, init: bool = True,
         sanitize: bool = False, **kw: Any) -> tuple[HostRAM, VtdIommu, Recorder, GuestDriver]:
    ram = HostRAM()
    iommu = VtdIommu(ram, VtdConfig.preset(preset, overrides=overrides or {}), sanitize=sanitize)
    rec = Recorder(iommu)
    drv = GuestDriver(rec, ram, alloc_base=ALLOC_BASE, alloc_limit=ALLOC_LIMIT, **kw)
    if init:
        drv.init()
    return ram, iommu, rec, drv


def descs(drv: GuestDriver, start: int) -> list[tuple[str, dict[str, int]]]:
    return [(a.name, a.fields) for a in drv.log[start:] if a.kind == "desc"]


def no_waits(d: list[tuple[str, dict[str, int]]]) -> list[tuple[str, dict[str, int]]]:
    return [x for x in d if x[0] != "wait"]


def psi_mask(start: int, end: int) -> tuple[int, int]:
    """(aligned address, AM) of the smallest naturally aligned power-of-two block holding the pages of
    [start, end] — the spec's definition of what a page-selective invalidation covers."""
    first, last = start >> 12, end >> 12
    m = 0
    while first >> m != last >> m:
        m += 1
    return (first >> m) << (m + 12), m


def ats_size_pages(addr: int, s: int) -> int:
    """Pages a device-TLB invalidation covers, decoded as the PCIe ATS spec says: S=0 one page, else the
    lowest clear address bit at or above 12 gives the size."""
    if not s:
        return 1
    b = 12
    while addr >> b & 1:
        b += 1
    return 1 << (b - 12 + 1)


Cfg = tuple[str, dict[str, int]]
SCALABLE: Cfg = ("modern", {})
SCALABLE_CM: Cfg = ("modern", {"cap.CM": 1, "cap.ESRTPS": 0})
LEGACY: Cfg = ("qemu-7.2-default", {})
LEGACY_CM: Cfg = ("qemu-7.2-default", {"cap.CM": 1})


# -- bring-up --------------------------------------------------------------------------------------

def test_bring_up_scalable_follows_init_dmars() -> None:
    ram, iommu, rec, drv = make(*SCALABLE)
    w = rec.named()
    qi_base, root = drv.qi_base, drv.root.root if drv.root else -1
    expected = [
        # __dmar_enable_qi: tail 0, IQA with DW=1 and QS=1 (256 256-bit descriptors), QIE.
        ("IQT", 0), ("IQA", qi_base | consts.IQA.DW | 1), ("GCMD", G.QIE),
        # iommu_set_root_entry: RTADDR with TTM=01b, SRTP (ECAP.ESRTPS: no flushes after it).
        ("RTADDR", root | 1 << consts.RTADDR.TTM_LO), ("GCMD", G.QIE | G.SRTP),
        # intel_iommu_enable_prq: the MSI, unmasked, then PQH, PQT, PQA with PRQ_ORDER 4.
        ("PEDATA", 0x41), ("PEADDR", 0xFEE0_0000), ("PEUADDR", 0), ("PECTL", 0),
        ("PQH", 0), ("PQT", 0), ("PQA", drv.prq_base | 4),
        # dmar_set_interrupt
        ("FEDATA", 0x40), ("FEADDR", 0xFEE0_0000), ("FEUADDR", 0), ("FECTL", 0),
        # iommu_enable_translation
        ("GCMD", G.QIE | G.TE),
    ]
    assert w == expected
    assert qi_base % (2 * PAGE_4K) == 0 and root % PAGE_4K == 0 and drv.prq_base % (16 * PAGE_4K) == 0
    assert iommu.mmio_read(off("GSTS"), 4) & (S.TES | S.QIES | S.RTPS) == S.TES | S.QIES | S.RTPS
    assert iommu.mmio_read(off("GSTS"), 4) & (S.IRES | S.AFLS | S.CFIS) == 0


def test_bring_up_without_esrtps_issues_global_flushes_each_with_a_wait() -> None:
    ram, iommu, rec, drv = make(*SCALABLE_CM)
    d = descs(drv, 0)
    assert [n for n, _ in d] == ["context-cache", "wait", "pasid-cache", "wait", "iotlb", "wait"]
    assert d[0][1]["G"] == 1 and d[2][1]["G"] == 3 and d[4][1]["G"] == 1
    assert d[4][1]["DR"] == 1 and d[4][1]["DW"] == 1          # CAP.DRD/DWD set: drain both ways
    for _, f in d[1::2]:
        assert f["SW"] == 1 and f["STATUS_DATA"] == QI_DONE and f["IF"] == 0
    # One IQT write per qi_submit_sync, each moving the tail by two 256-bit slots, after the SRTP.
    iqt = [v for n, v in rec.named() if n == "IQT"]
    assert iqt == [0, 2 << 5, 4 << 5, 6 << 5]
    names = [n for n, _ in rec.named()]
    assert names.index("RTADDR") < names.index("GCMD", names.index("RTADDR")) < len(names) - 1


def test_bring_up_legacy_uses_128_bit_queue_and_legacy_root() -> None:
    ram, iommu, rec, drv = make(*LEGACY)
    w = rec.named()
    assert w[:3] == [("IQT", 0), ("IQA", drv.qi_base), ("GCMD", G.QIE)]
    assert ("RTADDR", drv.root.root if drv.root else -1) in w
    assert not any(n.startswith("PQ") for n, _ in w)               # no ECAP.PRS
    assert [n for n, _ in descs(drv, 0)] == ["context-cache", "wait", "iotlb", "wait"]
    assert [v for n, v in w if n == "IQT"] == [0, 2 << 4, 4 << 4]
    assert w[-1] == ("GCMD", G.QIE | G.TE)
    assert iommu.mmio_read(off("GSTS"), 4) & (S.TES | S.QIES | S.RTPS) == S.TES | S.QIES | S.RTPS


def test_translation_left_on_by_firmware_is_turned_off_before_the_root_table() -> None:
    ram, iommu, rec, drv = make(*LEGACY, init=False)
    fw_root = 0x80_0000
    iommu.mmio_write(off("RTADDR"), fw_root, 8)
    iommu.mmio_write(off("GCMD"), G.SRTP, 4)
    iommu.mmio_write(off("GCMD"), G.TE, 4)
    drv.init()
    w = rec.named()
    # The shadow starts from GSTS (TE), QI is enabled on top of it, then TE is dropped.
    assert w[:4] == [("IQT", 0), ("IQA", drv.qi_base), ("GCMD", G.TE | G.QIE), ("GCMD", G.QIE)]
    assert w.index(("GCMD", G.QIE)) < [n for n, _ in w].index("RTADDR")
    assert iommu.mmio_read(off("GSTS"), 4) & S.TES


def test_register_based_invalidation_without_qi() -> None:
    ram, iommu, rec, drv = make(*LEGACY, qi=False)
    w = rec.named()
    assert not any(n in ("IQA", "IQT") for n, _ in w)
    C = consts.CCMD
    ccmd = [v for n, v in w if n == "CCMD"]
    assert ccmd == [C.ICC | 1 << C.CIRG_LO]
    iro = ((drv.ecap & consts.ECAP.IRO) >> consts.ECAP.IRO_LO) * 16
    T = consts.IOTLB
    iotlb = [v for o, v, _ in rec.writes if o == iro + 8]
    assert iotlb == [T.IVT | 1 << T.IIRG_LO | T.DR | T.DW]
    # map/unmap go through IVA + IOTLB too.
    dom = drv.domain_alloc("ss")
    drv.attach_device(0x10, dom)
    drv.map(dom, 0x10_0000, DATA, 0x4000, R | W)
    assert iommu.translate(0x10, 0x10_2000, "r").addr == DATA + 0x2000
    n = len(rec.writes)
    drv.unmap(dom, 0x10_0000, 0x4000)
    regs = [(o, v) for o, v, _ in rec.writes[n:]]
    V = consts.IVA
    assert regs[0] == (iro, 0x10_0000 | 2 << V.AM_LO)
    assert regs[1][0] == iro + 8 and regs[1][1] & T.IIRG == 3 << T.IIRG_LO
    assert not iommu.translate(0x10, 0x10_2000, "r")


def test_scalable_without_qi_is_refused() -> None:
    with pytest.raises(Exception, match="queued invalidation"):
        make(*SCALABLE, init=False, qi=False, scalable=True)


# -- map / unmap -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,kind", [(LEGACY, "ss"), (LEGACY_CM, "ss"), (SCALABLE, "ss"), (SCALABLE_CM, "ss"),
                                      (SCALABLE, "fs"), (SCALABLE_CM, "fs")])
def test_map_dma_unmap_strict(cfg: Cfg, kind: str) -> None:
    ram, iommu, rec, drv = make(*cfg)
    sid = 0x0110
    dom = drv.domain_alloc(kind)
    drv.attach_device(sid, dom)
    iova = 0x20_0000
    drv.map(dom, iova, DATA, PAGE_2M + 3 * PAGE_4K, R | W)
    # The 2 MiB part is one large leaf where the unit offers it; the tail is 4 KiB pages.
    t = iommu.translate(sid, iova + 0x1234, "w")
    assert isinstance(t, Translation) and t.addr == DATA + 0x1234 and t.page_size == PAGE_2M
    assert iommu.dma_write(sid, iova + PAGE_2M + 0x10, b"guest").ok
    assert ram.read(DATA + PAGE_2M + 0x10, 5) == b"guest"
    assert iommu.dma_read(sid, iova + PAGE_2M + 0x10, 5).data == b"guest"
    # Unmap two 4 KiB pages not aligned to their own size: AM covers the aligned block holding both.
    start = iova + PAGE_2M + PAGE_4K
    n = len(drv.log)
    drv.unmap(dom, start, 2 * PAGE_4K)
    d = no_waits(descs(drv, n))
    addr, am = psi_mask(start, start + 2 * PAGE_4K - 1)
    assert am == 2 and addr == iova + PAGE_2M
    if kind == "ss":
        assert d == [("iotlb", {"G": 3, "DW": 1, "DR": 1, "DID": dom.did, "AM": am, "IH": 0, "ADDR": addr})]
    else:
        assert d == [("pasid-iotlb", {"G": 3, "DID": dom.did, "PASID": 0, "AM": am, "IH": 1, "ADDR": addr})]
    assert [a.name for a in drv.log[n:] if a.kind == "desc"][-1] == "wait"
    # The IOTLB was dropped: the next DMA walks, and faults.
    r = iommu.dma_write(sid, start + 0x10, b"x")
    assert not r.ok
    assert iommu.dma_read(sid, iova + PAGE_2M + 0x10, 5).data == b"guest"     # first page still mapped


def test_caching_mode_flushes_not_present_to_present_for_second_stage_only() -> None:
    ram, iommu, rec, drv = make(*SCALABLE_CM)
    ss, fs = drv.domain_alloc("ss"), drv.domain_alloc("fs")
    drv.attach_device(0x10, ss)
    drv.attach_device(0x18, fs)
    n = len(drv.log)
    drv.map(ss, 0x5000, DATA, PAGE_4K, R)
    addr, am = psi_mask(0x5000, 0x5FFF)
    assert no_waits(descs(drv, n)) == [("iotlb", {"G": 3, "DW": 1, "DR": 1, "DID": ss.did, "AM": am, "IH": 0,
                                                  "ADDR": addr})]
    n = len(drv.log)
    drv.map(fs, 0x5000, DATA, PAGE_4K, R)
    assert descs(drv, n) == []          # first stage: write-buffer flush only (no RWBF here)
    m = len(drv.log)
    ram2, iommu2, rec2, drv2 = make(*SCALABLE)
    ss2 = drv2.domain_alloc("ss")
    drv2.attach_device(0x10, ss2)
    k = len(drv2.log)
    drv2.map(ss2, 0x5000, DATA, PAGE_4K, R)
    assert descs(drv2, k) == [] and m == len(drv.log)


def test_unmap_above_mamv_falls_back_to_domain_selective() -> None:
    ram, iommu, rec, drv = make("modern", {"cap.MAMV": 2})
    ss, fs = drv.domain_alloc("ss"), drv.domain_alloc("fs")
    drv.attach_device(0x10, ss)
    drv.attach_device(0x18, fs)
    for dom in (ss, fs):
        drv.map(dom, 0x10_0000, DATA, 16 * PAGE_4K, R | W, page_size=PAGE_4K)
        n = len(drv.log)
        drv.unmap(dom, 0x10_0000, 16 * PAGE_4K)          # AM 4 > MAMV 2
        d = no_waits(descs(drv, n))
        assert len(d) == 1 and d[0][1]["G"] == 2 and d[0][1]["DID"] == dom.did
        assert d[0][0] == ("iotlb" if dom is ss else "pasid-iotlb")


def test_map_refuses_overlaps_and_misalignment() -> None:
    ram, iommu, rec, drv = make(*SCALABLE)
    dom = drv.domain_alloc("ss")
    drv.map(dom, 0x10_0000, DATA, 2 * PAGE_4K, R)
    with pytest.raises(GuestDriverError, match="overlaps"):
        drv.map(dom, 0x10_1000, DATA, PAGE_4K, R)
    with pytest.raises(GuestDriverError, match="aligned"):
        drv.map(dom, 0x10_0800, DATA, PAGE_4K, R)
    with pytest.raises(GuestDriverError):
        drv.map(drv.domain_alloc("pt"), 0, 0, PAGE_4K, R)


def test_lazy_unmap_defers_a_domain_selective_flush() -> None:
    ram, iommu, rec, drv = make(*SCALABLE, strict=False, lazy_batch=3)
    assert not drv.strict
    sid = 0x20
    dom = drv.domain_alloc("ss")
    drv.attach_device(sid, dom)
    pages = [0x10_0000 + i * PAGE_4K for i in range(4)]
    for i, p in enumerate(pages):
        drv.map(dom, p, DATA + i * PAGE_4K, PAGE_4K, R | W)
        assert iommu.translate(sid, p, "r").addr == DATA + i * PAGE_4K        # cached now
    n = len(drv.log)
    drv.unmap(dom, pages[0], PAGE_4K)
    drv.unmap(dom, pages[1], PAGE_4K)
    assert descs(drv, n) == []
    # Lazy mode's window: the unit still answers from its IOTLB.
    assert iommu.translate(sid, pages[0], "r").addr == DATA
    with pytest.raises(GuestDriverError, match="lazy flush queue"):
        drv.map(dom, pages[0], DATA, PAGE_4K, R)
    drv.unmap(dom, pages[2], PAGE_4K)                     # the third fills the queue
    assert no_waits(descs(drv, n)) == [("iotlb", {"G": 2, "DW": 1, "DR": 1, "DID": dom.did, "AM": 0, "IH": 0,
                                                  "ADDR": 0})]
    for p in pages[:3]:
        assert not iommu.translate(sid, p, "r")
    drv.map(dom, pages[0], DATA, PAGE_4K, R)              # reusable once flushed
    n = len(drv.log)
    drv.unmap(dom, pages[3], PAGE_4K)
    assert descs(drv, n) == []
    drv.flush_lazy()
    assert [x[0] for x in no_waits(descs(drv, n))] == ["iotlb"]
    assert not iommu.translate(sid, pages[3], "r")


def test_caching_mode_forces_strict_for_second_stage_defaults() -> None:
    drv = make(*LEGACY_CM, strict=False)[3]
    assert drv.strict
    assert not make(*SCALABLE_CM, strict=False)[3].strict      # first level is the default there


@pytest.mark.parametrize("cfg", [LEGACY, SCALABLE])
def test_ats_device_gets_device_tlb_invalidations(cfg: Cfg) -> None:
    ram, iommu, rec, drv = make(cfg[0], {**cfg[1], "ecap.DT": 1})
    sid = 0x0208
    ep = iommu.attach_device(sid, ats=True)
    dom = drv.domain_alloc("ss")
    drv.attach_device(sid, dom, ats=True)
    drv.map(dom, 0x40_0000, DATA, 8 * PAGE_4K, R | W, page_size=PAGE_4K)
    ep.translation_request(0x40_4000, "r")
    assert ep.lookup(0x40_4000) is not None
    n = len(drv.log)
    drv.unmap(dom, 0x40_4000, 4 * PAGE_4K)
    d = no_waits(descs(drv, n))
    assert [x[0] for x in d] == ["iotlb", "device-tlb"]
    dt = d[1][1]
    assert dt["SID"] == sid and dt["S"] == 1
    assert ats_size_pages(dt["ADDR"], dt["S"]) == 4 and dt["ADDR"] & ~0x3FFF == 0x40_4000
    assert ep.lookup(0x40_4000) is None
    if drv.scalable:
        # A first-stage domain on a PASID: PASID-based IOTLB and PASID-based device-TLB (types 6 and 8).
        fs = drv.domain_alloc("fs")
        drv.attach_device(sid, fs, pasid=7, ats=True)
        drv.map(fs, 0x40_0000, DATA, PAGE_4K, R | W)
        n = len(drv.log)
        drv.unmap(fs, 0x40_0000, PAGE_4K)
        d = no_waits(descs(drv, n))
        assert [x[0] for x in d] == ["pasid-iotlb", "pasid-device-tlb"]
        assert d[0][1]["PASID"] == 7 and d[1][1]["PASID"] == 7 and d[1][1]["S"] == 0
        assert d[1][1]["ADDR"] == 0x40_0000


# -- scalable-mode attach, replace, binds ----------------------------------------------------------

def test_scalable_attach_pt_ss_fs_and_replace() -> None:
    ram, iommu, rec, drv = make(*SCALABLE_CM, sanitize=True)
    pt = drv.domain_alloc("pt")
    drv.attach_device(0x30, pt)
    assert iommu.translate(0x30, DATA + 0x123, "w").addr == DATA + 0x123
    ss = drv.domain_alloc("ss")
    drv.map(ss, 0x1000, DATA + 0x10000, PAGE_4K, R | W)
    fs = drv.domain_alloc("fs")
    drv.map(fs, 0x1000, DATA + 0x20000, PAGE_4K, R | W)
    n = len(drv.log)
    drv.attach_device(0x30, ss)                           # replace PT by SS
    d = no_waits(descs(drv, n))
    # Tear-down of the PT entry (PASID cache, PASID-selective P-IOTLB for PGTT=PT), then CM's
    # pasid_flush_caches for the new entry.
    assert d == [("pasid-cache", {"G": 1, "DID": 1, "PASID": 0}),
                 ("pasid-iotlb", {"G": 2, "DID": 1, "PASID": 0, "AM": 0, "IH": 0, "ADDR": 0}),
                 ("pasid-cache", {"G": 1, "DID": ss.did, "PASID": 0}),
                 ("pasid-iotlb", {"G": 2, "DID": ss.did, "PASID": 0, "AM": 0, "IH": 0, "ADDR": 0})]
    assert iommu.translate(0x30, 0x1000, "r").addr == DATA + 0x10000
    n = len(drv.log)
    drv.attach_device(0x30, fs)                           # replace SS by FS: the SS DID is flushed by DSI
    d = no_waits(descs(drv, n))
    assert d[0] == ("pasid-cache", {"G": 1, "DID": ss.did, "PASID": 0})
    assert d[1] == ("iotlb", {"G": 2, "DW": 1, "DR": 1, "DID": ss.did, "AM": 0, "IH": 0, "ADDR": 0})
    assert iommu.translate(0x30, 0x1000, "r").addr == DATA + 0x20000
    drv.detach_device(0x30)
    r = iommu.translate(0x30, 0x1000, "r")
    assert isinstance(r, Fault) and r.reason == consts.FR.SM_PASID_ENTRY_P
    assert iommu.stale_hits == []


def test_pasid_entry_fields_follow_linux() -> None:
    ram, iommu, rec, drv = make(*SCALABLE)
    fs = drv.domain_alloc("fs")
    drv.attach_device(0x31, fs, pasid=9)
    dev = drv.devices[0x31]
    assert dev.pasid_table is not None
    addr = dev.pasid_table.entry_addr(9)
    assert addr is not None
    raw = int.from_bytes(ram.read(addr, 64), "little")
    e = specs().structure("pasid_entry").decode(raw)
    assert e["P"] == 1 and e["PGTT"] == 1 and e["DID"] == fs.did and e["FPD"] == 0
    assert e["FSPTPTR"] << 12 == (fs.table.root if fs.table else -1) and e["PWSNP"] == 1
    ctx_addr = drv.root.context_entry_addr(0, 0x31) if drv.root else None
    assert ctx_addr is not None
    c = specs().structure("sm_context_entry").decode(int.from_bytes(ram.read(ctx_addr, 32), "little"))
    assert c["P"] == 1 and c["PASIDE"] == 1 and c["RID_PASID"] == 0 and c["PRE"] == 0 and c["DTE"] == 0
    assert c["PASIDDIRPTR"] << 12 == dev.pasid_table.dir


def test_bind_pasid_dma_and_unbind() -> None:
    ram, iommu, rec, drv = make(*SCALABLE, sanitize=True)
    sid, pasid = 0x40, 0x21
    # A process page table, built where a guest kernel keeps mm page tables.
    mm = FirstStageTable(ram, PageAllocator(ram, 0x200_0000, 0x300_0000), levels=4)
    va = 0x7F00_0000_0000
    mm.map(va, DATA + 0x30000, PAGE_4K, R | W | U)
    drv.attach_device(sid, drv.domain_alloc("ss"))
    sva = drv.bind_pasid(sid, pasid, mm.root)
    assert iommu.dma_write(sid, va + 8, b"svm", pasid=pasid).ok
    assert ram.read(DATA + 0x30008, 3) == b"svm"
    # The mm changes: the notifier's flush makes the new page visible.
    mm.unmap(va, PAGE_4K)
    mm.map(va, DATA + 0x40000, PAGE_4K, R | W | U)
    n = len(drv.log)
    drv.flush_sva_range(sva, va, PAGE_4K)
    assert no_waits(descs(drv, n))[0][0] == "pasid-iotlb"
    assert iommu.translate(sid, va, "r", pasid=pasid).addr == DATA + 0x40000
    n = len(drv.log)
    drv.unbind_pasid(sid, pasid)
    assert [x[0] for x in no_waits(descs(drv, n))] == ["pasid-cache", "pasid-iotlb"]
    r = iommu.dma_write(sid, va + 8, b"late", pasid=pasid)
    assert r.faults == (consts.FR.SM_PASID_ENTRY_P,)
    assert iommu.fault_records()[-1].reason == consts.FR.SM_PASID_ENTRY_P
    assert iommu.fault_records()[-1].pasid == pasid
    with pytest.raises(GuestDriverError):
        drv.unbind_pasid(sid, pasid)
    assert iommu.stale_hits == []


def test_binds_need_first_stage() -> None:
    drv = make(*LEGACY)[3]
    with pytest.raises(GuestDriverError):
        drv.bind_pasid(0x40, 1, 0x1000)


# -- page requests ---------------------------------------------------------------------------------

def test_service_prq_answers_groups() -> None:
    ram, iommu, rec, drv = make(*SCALABLE)
    sid, pasid = 0x50, 3
    ep = iommu.attach_device(sid, ats=True, pri=True)
    drv.attach_device(sid, drv.domain_alloc("ss"), ats=True, pri=True)
    mm = FirstStageTable(ram, PageAllocator(ram, 0x200_0000, 0x300_0000))
    drv.bind_pasid(sid, pasid, mm.root)
    iommu.page_request(sid, 0x1000, read=True, write=False, pasid=pasid, last=True, prgi=5)
    iommu.page_request(sid, 0x2000, read=True, write=True, pasid=pasid, last=False, prgi=6)
    iommu.page_request(sid, 0x3000, read=True, write=False, pasid=pasid, last=True, prgi=6)
    seen: list[PageRequest] = []

    def handler(req: PageRequest) -> int:
        seen.append(req)
        return RESP_FAILURE if req.addr == 0x2000 else RESP_SUCCESS

    assert drv.service_prq(handler) == 3
    assert [(r.sid, r.addr, r.pasid, r.read, r.write, r.last, r.prgi) for r in seen] == [
        (sid, 0x1000, pasid, True, False, True, 5), (sid, 0x2000, pasid, True, True, False, 6),
        (sid, 0x3000, pasid, True, False, True, 6)]
    assert [(x.sid, x.pasid, x.prgi, x.code) for x in ep.responses] == [(sid, pasid, 5, RESP_SUCCESS),
                                                                         (sid, pasid, 6, RESP_FAILURE)]
    assert iommu.mmio_read(off("PQH"), 8) == iommu.mmio_read(off("PQT"), 8) == 3 * 32
    assert not iommu.mmio_read(off("PRSTS"), 4) & consts.PRSTS.PPR
    assert drv.service_prq(handler) == 0


# -- queued invalidation, raw ----------------------------------------------------------------------

def test_qi_submit_recovers_from_iqe() -> None:
    ram, iommu, rec, drv = make(*SCALABLE)
    good = make_descriptor(T_CONTEXT, G=1)
    bad_type = (0xF, 0)                                  # type 15 does not exist
    bad_rsvd = (make_descriptor(T_CONTEXT, G=1)[0] | consts.INV_CONTEXT_CACHE.RSVD1, 0)
    index = drv.qi_tail
    res = drv.qi_submit([good, bad_type, good])
    assert res.error == "IQE" and not res.completed and res.recovered
    assert res.head == index + 1 and res.iqei == IQEI_TYPE
    assert not iommu.mmio_read(off("FSTS"), 4) & consts.FSTS.IQE
    # The unit resumed: head caught up with the tail, and later submissions complete.
    assert iommu.mmio_read(off("IQH"), 8) == iommu.mmio_read(off("IQT"), 8)
    ok = drv.qi_submit([good])
    assert ok.completed and ok.error is None
    res = drv.qi_submit([bad_rsvd])
    assert res.error == "IQE" and res.iqei == IQEI_RESERVED and res.recovered
    assert drv.qi_submit([drv.invalidate_pasid_cache(3)]).completed


def test_qi_submit_reports_ite_for_an_unanswering_device() -> None:
    ram, iommu, rec, drv = make(*SCALABLE)
    iommu.attach_device(0x60, ats=True, respond=False)
    res = drv.qi_submit([drv.invalidate_devtlb(0x60, 0, 0)])
    assert res.error == "ITE" and not res.completed
    assert not iommu.mmio_read(off("FSTS"), 4) & consts.FSTS.ITE
    assert drv.qi_submit([make_descriptor(T_CONTEXT, G=1)]).completed


def test_log_records_register_writes_and_descriptors_in_order() -> None:
    ram, iommu, rec, drv = make(*SCALABLE_CM)
    writes = [(a.offset, a.value, a.size) for a in drv.log if a.kind == "write"]
    assert writes == rec.writes
    kinds = [a.kind for a in drv.log]
    first_desc = kinds.index("desc")
    assert drv.log[first_desc + 2].name == "IQT"          # descriptor, wait, then the tail write
    assert drv.read_reg("GSTS") & S.TES


# -- strict mode never leaves a stale translation --------------------------------------------------

_PAGES = 12
_op = st.one_of(
    st.tuples(st.just("map"), st.integers(0, _PAGES - 1), st.integers(1, 3), st.integers(0, 63),
              st.sampled_from([R, R | W])),
    st.tuples(st.just("unmap"), st.integers(0, _PAGES - 1), st.integers(1, 3), st.just(0), st.just(0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=st.sampled_from([LEGACY, LEGACY_CM, SCALABLE, SCALABLE_CM]), kind=st.sampled_from(["ss", "fs"]),
       ops=st.lists(_op, min_size=1, max_size=25))
def test_strict_map_unmap_matches_a_dict_model(cfg: Cfg, kind: str,
                                               ops: list[tuple[str, int, int, int, int]]) -> None:
    if kind == "fs" and cfg[0] != "modern":
        kind = "ss"
    # The sanitizer re-walks every translation uncached: a cached answer memory no longer supports is a
    # stale hit, whichever page it is on.
    ram, iommu, rec, drv = make(*cfg, sanitize=True)
    sid = 0x0101
    dom = drv.domain_alloc(kind)
    drv.attach_device(sid, dom)
    base = 0x100_0000
    model: dict[int, tuple[int, int]] = {}            # page -> (output page, perms)
    for op, first, count, target, perms in ops:
        pages = [p for p in range(first, min(first + count, _PAGES))]
        if op == "map":
            if any(p in model for p in pages):
                continue
            drv.map(dom, base + first * PAGE_4K, DATA + target * PAGE_4K, len(pages) * PAGE_4K, perms)
            for i, p in enumerate(pages):
                model[p] = (DATA + (target + i) * PAGE_4K, perms)
        else:
            drv.unmap(dom, base + first * PAGE_4K, len(pages) * PAGE_4K)
            for p in pages:
                model.pop(p, None)
        # Every page is probed after every step, so any cached translation the driver failed to
        # invalidate would be answered here.
        for p in range(_PAGES):
            for access, bit in (("r", R), ("w", W)):
                t = iommu.translate(sid, base + p * PAGE_4K + 0x18, access)
                want = model.get(p)
                if want is None or not want[1] & bit:
                    assert isinstance(t, Fault), (p, access, t)
                else:
                    assert isinstance(t, Translation) and t.addr == want[0] + 0x18, (p, access, t)
    assert iommu.stale_hits == []


def test_tear_down_of_a_pri_device_drains_page_requests() -> None:
    ram, iommu, rec, drv = make(*SCALABLE)
    sid = 0x58
    iommu.attach_device(sid, ats=True, pri=True)
    ss = drv.domain_alloc("ss")
    drv.attach_device(sid, ss, ats=True, pri=True)
    mm = FirstStageTable(ram, PageAllocator(ram, 0x200_0000, 0x300_0000))
    sva = drv.bind_pasid(sid, 4, mm.root)
    n = len(drv.log)
    drv.unbind_pasid(sid, 4)
    d = descs(drv, n)
    # intel_pasid_tear_down_entry, then intel_iommu_drain_pasid_prq: fenced wait, P-IOTLB, PASID
    # device TLB (whole), wait with PD=1.
    names = [x[0] for x in d]
    assert names[-4:] == ["wait", "pasid-iotlb", "pasid-device-tlb", "wait"]
    fence, piotlb, dtlb, wait = (x[1] for x in d[-4:])
    assert fence["FN"] == 1 and fence["SW"] == 0 and wait["PD"] == 1 and wait["SW"] == 1
    assert piotlb["G"] == 2 and piotlb["DID"] == sva.did and piotlb["PASID"] == 4
    assert dtlb["PASID"] == 4 and dtlb["S"] == 1 and dtlb["ADDR"] == (1 << 63) - 1 & ~0xFFF


def test_service_faults_reads_and_clears_fault_records() -> None:
    ram, iommu, rec, drv = make(*LEGACY)
    assert drv.service_faults() == []
    assert not iommu.dma_write(0x0321, 0x5000, b"x").ok          # bus 3 has no root entry
    assert iommu.mmio_read(off("FSTS"), 4) & consts.FSTS.PPF
    got = drv.service_faults()
    assert [(f["SID"], f["FR"], f["FI"] << 12) for f in got] == [(0x0321, consts.FR.ROOT_ENTRY_P, 0x5000)]
    assert not iommu.mmio_read(off("FSTS"), 4) & consts.FSTS.PPF
    assert not iommu.fault_records()


def test_legacy_replace_clears_the_context_then_installs_the_new_domain() -> None:
    ram, iommu, rec, drv = make(*LEGACY_CM)
    sid = 0x0220
    a, b = drv.domain_alloc("ss"), drv.domain_alloc("ss")
    drv.map(a, 0x1000, DATA, PAGE_4K, R | W)
    drv.map(b, 0x1000, DATA + 0x8000, PAGE_4K, R | W)
    n = len(drv.log)
    drv.attach_device(sid, a)
    # Not-present to present under CM: context device-selective in domain 0, IOTLB DSI of the new DID.
    assert no_waits(descs(drv, n)) == [("context-cache", {"G": 3, "DID": 0, "SID": sid, "FM": 0}),
                                       ("iotlb", {"G": 2, "DW": 1, "DR": 1, "DID": a.did, "AM": 0, "IH": 0,
                                                  "ADDR": 0})]
    assert iommu.translate(sid, 0x1000, "r").addr == DATA
    n = len(drv.log)
    drv.attach_device(sid, b)
    assert no_waits(descs(drv, n)) == [
        ("context-cache", {"G": 3, "DID": a.did, "SID": sid, "FM": 0}),
        ("iotlb", {"G": 2, "DW": 1, "DR": 1, "DID": a.did, "AM": 0, "IH": 0, "ADDR": 0}),
        ("context-cache", {"G": 3, "DID": 0, "SID": sid, "FM": 0}),
        ("iotlb", {"G": 2, "DW": 1, "DR": 1, "DID": b.did, "AM": 0, "IH": 0, "ADDR": 0})]
    assert iommu.translate(sid, 0x1000, "r").addr == DATA + 0x8000
    drv.detach_device(sid)
    r = iommu.translate(sid, 0x1000, "r")
    assert isinstance(r, Fault) and r.reason == consts.FR.CONTEXT_ENTRY_P


def test_write_buffer_flushes_on_units_that_ask_for_them() -> None:
    ram, iommu, rec, drv = make("qemu-7.2-default", {"cap.RWBF": 1})
    w = rec.named()
    wbf = [i for i, (n, v) in enumerate(w) if n == "GCMD" and v & G.WBF]
    # iommu_flush_write_buffer before iommu_set_root_entry and again before the PRQ/interrupt loop.
    rtaddr = [n for n, _ in w].index("RTADDR")
    assert len(wbf) == 2 and wbf[0] < rtaddr < wbf[1]
    assert all(w[i][1] == G.QIE | G.WBF for i in wbf)
    dom = drv.domain_alloc("ss")
    n = len(rec.writes)
    drv.attach_device(0x10, dom)                         # not-present to present without CM: WBF only
    drv.map(dom, 0x1000, DATA, PAGE_4K, R)
    assert rec.named()[n:] == [("GCMD", G.QIE | G.TE | G.WBF)] * 2


@pytest.mark.parametrize("preset", ["qemu-7.2-default", "qemu-7.2-scalable-pasid"])
@pytest.mark.parametrize("profile", ["spec", "qemu-7.2"])
def test_drives_units_with_qemu_capabilities_and_quirks(preset: str, profile: str) -> None:
    ram = HostRAM()
    iommu = VtdIommu(ram, VtdConfig.preset(preset, profile=profile))
    drv = GuestDriver(iommu, ram, alloc_base=ALLOC_BASE, alloc_limit=ALLOC_LIMIT)
    drv.init()
    assert drv.scalable == preset.endswith("pasid")
    dom = drv.domain_alloc("ss")
    drv.attach_device(0x10, dom)
    drv.map(dom, 0x4_0000, DATA, 2 * PAGE_4K, R | W)
    assert iommu.dma_write(0x10, 0x4_1010, b"q").ok and ram.read(DATA + 0x1010, 1) == b"q"
    drv.unmap(dom, 0x4_0000, 2 * PAGE_4K)
    assert not iommu.dma_write(0x10, 0x4_1010, b"q").ok
    assert not iommu.mmio_read(off("FSTS"), 4) & (consts.FSTS.IQE | consts.FSTS.ITE)
