#!/usr/bin/env python3
"""Generate the shipped traces in ``traces/`` (reproducibly: same code, same bytes).

Each trace is recorded with :class:`vtd_emu.trace.recorder.Recorder` while this script plays the guest
driver: it builds the tables with :mod:`vtd_emu.tables` (through the recorder's memory, so every table
write is in the trace), programs the unit by MMIO, queues invalidations and issues device DMA.  The
expectations in the files are what the emulator did; ``make test`` (``tests/test_traces.py``) and
``make run`` replay every file with ``--check``.

    .venv/bin/python scripts/make_traces.py            # rewrite traces/*.yaml, *.jsonl, *.npz
    .venv/bin/python scripts/make_traces.py --only legacy-dma

The QEMU-imported trace (``traces/qemu-import/``) comes from ``scripts/qemu_capture.py`` and
``vtd-emu import-qemu``; this script re-imports the committed log.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vtd_emu.tables import (  # noqa: E402
    NX,
    PAGE_2M,
    PGTT_FS,
    PGTT_NESTED,
    PGTT_SS,
    R,
    U,
    W,
    FirstStageTable,
    LegacyRootTable,
    PageAllocator,
    PasidTables,
    ScalableRootTable,
    SecondStageTable,
    enable_translation,
)
from vtd_emu.memory import GuestPhysView  # noqa: E402
from vtd_emu.spec import specs  # noqa: E402
from vtd_emu.vmm import GuestDriver  # noqa: E402
from vtd_emu.trace.model import Trace, TraceConfig, blockify, save_trace  # noqa: E402
from vtd_emu.trace.recorder import Recorder  # noqa: E402
from vtd_emu.vtd.qi import (  # noqa: E402
    T_CONTEXT,
    T_DEV_TLB,
    T_IEC,
    T_IOTLB,
    T_PAGE_RESPONSE,
    T_PASID_CACHE,
    T_PASID_DEV_TLB,
    T_PIOTLB,
    T_WAIT,
    make_descriptor,
)

OUT = REPO / "traces"
GCMD, GSTS, FSTS, FECTL, FRCD0 = 0x18, 0x1C, 0x34, 0x38, 0x220
IQH, IQT, IQA, ICS, IECTL, IEDATA, IEADDR = 0x80, 0x88, 0x90, 0x9C, 0xA0, 0xA4, 0xA8
PQH, PQT, PQA, PRSTS = 0xC0, 0xC8, 0xD0, 0xDC
IVA, IOTLB_REG, CCMD = 0xF0, 0xF8, 0x28
KEEP = 0x96FF_FFFF           # persistent GSTS bits written back to GCMD
QIE, IRE = 1 << 26, 1 << 25


def gcmd_set(rec: Recorder, bit: int) -> None:
    rec.mmio_write(GCMD, (rec.mmio_read(GSTS) & KEEP) | bit)


def fault_status(rec: Recorder, index: int = 0) -> None:
    """Read FSTS and the fault record like a driver's fault handler, then clear it (FRCD.F, PPF)."""
    rec.mmio_read(FSTS)
    rec.mmio_read(FRCD0 + 16 * index, 8)
    rec.mmio_read(FRCD0 + 16 * index + 8, 8)
    rec.mmio_write(FRCD0 + 16 * index + 12, 1 << 31)
    rec.mmio_write(FSTS, 0x2)


def pattern(n: int, seed: int) -> bytes:
    return bytes((seed * 37 + i * 11) & 0xFF for i in range(n))


# -- traces ----------------------------------------------------------------------------------------------


def legacy_dma() -> Trace:
    rec = Recorder(TraceConfig(preset="modern"), name="legacy-dma",
                   description="legacy-mode root/context tables, 4-level second stage; two devices of one "
                               "domain, 4K and 2M leaves, a DMA across a page boundary, read/write faults and "
                               "a device with no context entry")
    alloc = PageAllocator(rec.mem, base=0x100000)
    ss = SecondStageTable(rec.mem, alloc, levels=4)
    ss.map(0x10000, 0x4000000, 0x4000, R | W)
    ss.map(0x200000, 0x4200000, PAGE_2M, R, page_size=PAGE_2M)
    rt = LegacyRootTable(rec.mem, alloc)
    rt.set_context(0, 0x10, slptptr=ss.root, aw=ss.aw, did=1)
    rt.set_context(0, 0x18, slptptr=ss.root, aw=ss.aw, did=1)
    enable_translation(rec, rt.root)
    rec.dma_write(0x10, 0x10000, pattern(256, 1), note="device 00:02.0 fills a buffer")
    rec.dma_read(0x18, 0x10000, 256, note="device 00:03.0 (same domain) reads it back")
    rec.dma_write(0x10, 0x10F80, pattern(0x100, 2), note="crosses from IOVA page 0x10000 to 0x11000")
    rec.dma_read(0x10, 0x280000, 64, note="inside the read-only 2 MiB leaf")
    rec.dma_write(0x18, 0x280000, pattern(16, 3), note="write to the read-only leaf: WRITE fault")
    fault_status(rec)
    rec.dma_read(0x10, 0x90000, 16, note="unmapped: READ fault")
    fault_status(rec)
    rec.dma_read(0x20, 0x10000, 16, note="00:04.0 has no context entry: fault 0x2")
    rec.checkpoint("end")
    return rec.trace()


def scalable_ss() -> Trace:
    rec = Recorder(TraceConfig(preset="modern"), name="scalable-ss",
                   description="scalable mode, PGTT=second-stage: requests without PASID (RID_PASID 0) and "
                               "with PASID 7 (another domain), a device in the upper half of the root entry, "
                               "a 1 GiB leaf and a PASID with no entry")
    alloc = PageAllocator(rec.mem, base=0x100000)
    ss_a = SecondStageTable(rec.mem, alloc, levels=4)
    ss_a.map(0x100000, 0x8000000, 0x8000, R | W)
    ss_b = SecondStageTable(rec.mem, alloc, levels=4)
    ss_b.map(0x40000000, 0x40000000, 1 << 30, R | W, page_size=1 << 30)
    rt = ScalableRootTable(rec.mem, alloc)
    pt = PasidTables(rec.mem, alloc)
    pt.set_entry(0, pgtt=PGTT_SS, did=3, ssptptr=ss_a.root, aw=ss_a.aw)
    pt.set_entry(7, pgtt=PGTT_SS, did=4, ssptptr=ss_b.root, aw=ss_b.aw)
    rt.set_context(1, 0x08, pasid_dir=pt.dir, pdts=pt.pdts, rid_pasid=0, paside=True)
    rt.set_context(1, 0x88, pasid_dir=pt.dir, pdts=pt.pdts, rid_pasid=0, paside=True)
    enable_translation(rec, rt.root, scalable=True)
    rec.dma_write(0x108, 0x100000, pattern(512, 4))
    rec.dma_read(0x188, 0x100100, 128, note="upper-half device, same RID_PASID domain")
    rec.dma_write(0x108, 0x40201000, pattern(64, 5), pasid=7, note="PASID 7: identity 1 GiB leaf")
    rec.dma_read(0x188, 0x7FFFF000, 0x1000, pasid=7)
    rec.dma_read(0x108, 0x200000, 8, note="beyond the RID_PASID mapping")
    fault_status(rec)
    rec.dma_read(0x108, 0x1000, 8, pasid=9, note="PASID 9 has no entry")
    fault_status(rec, 1)
    rec.checkpoint("end")
    return rec.trace()


def first_stage(levels: int) -> Trace:
    base = 0x7F12_3450_0000 if levels == 4 else 0x00AB_CDE0_1230_0000
    rec = Recorder(TraceConfig(preset="modern", devices=[{"sid": 0x300, "ats": False, "pri": True,
                                                          "respond": True}]),
                   name=f"first-stage-{levels}level",
                   description=f"scalable mode, PGTT=first-stage with a {levels}-level table, requests with "
                               "PASID from a PRI-capable device: user and supervisor accesses, A/D updates, "
                               "a page request for a missing page answered by a page group response, then "
                               "the retried DMA")
    alloc = PageAllocator(rec.mem, base=0x100000)
    fs = FirstStageTable(rec.mem, alloc, levels=levels)
    fs.map(base, 0x10000000, 0x4000, W | U)
    fs.map(base + 0x4000, 0x10004000, 0x1000, U)                # read-only user page
    fs.map(base + 0x200000, 0x10200000, 0x1000, W | NX)         # supervisor page
    rt = ScalableRootTable(rec.mem, alloc)
    pt = PasidTables(rec.mem, alloc)
    pasid = 0x42
    pt.set_entry(pasid, pgtt=PGTT_FS, did=5, fsptptr=fs.root, fspm=fs.fspm, sre=True, wpe=True)
    rt.set_context(3, 0x00, pasid_dir=pt.dir, pdts=pt.pdts, paside=True, pre=True)
    # Page request queue: 1 page (128 descriptors), event unmasked.
    prq = alloc.alloc()
    rec.mmio_write(PQA, prq, 8)
    rec.mmio_write(0xE0, 0)  # PECTL: unmask the page-request event
    enable_translation(rec, rt.root, scalable=True)
    rec.dma_write(0x300, base + 0x10, pattern(200, 6), pasid=pasid, note="sets A and D in the leaf")
    rec.dma_read(0x300, base + 0x3FF0, 32, pasid=pasid, note="across two first-stage pages")
    rec.dma_read(0x300, base + 0x4000, 16, pasid=pasid, note="read-only page: read works")
    rec.dma_write(0x300, base + 0x4000, pattern(16, 7), pasid=pasid, note="read-only page: write faults")
    fault_status(rec)
    rec.dma_write(0x300, base + 0x200000, pattern(32, 8), pasid=pasid, priv=True,
                  note="supervisor write to a supervisor page (SRE=1)")
    rec.dma_read(0x300, base + 0x200000, 8, pasid=pasid, note="user read of a supervisor page: fault")
    fault_status(rec, 1)
    missing = base + 0x300000
    rec.dma_read(0x300, missing, 8, pasid=pasid, note="not mapped yet: the device asks for the page")
    fault_status(rec, 2)
    rec.page_request(0x300, missing, read=True, pasid=pasid, last=True, prgi=5, note="PRI page request")
    rec.mmio_read(PQT, 8)
    rec.mmio_read(PRSTS)
    # Software handles the request: maps the page, answers, and moves the head past the descriptor.
    fs.map(missing, 0x10300000, 0x1000, W | U)
    iqueue = alloc.alloc()
    rec.mmio_write(IQA, iqueue | 1 << 11, 8)
    gcmd_set(rec, QIE)
    rec.page_response(0x300, prgi=5, code=0, pasid=pasid, note="page group response: success")
    rec.mmio_write(PQH, 32, 8)
    rec.mmio_write(PRSTS, 1)
    rec.dma_read(0x300, missing, 8, pasid=pasid, note="the retried DMA now translates")
    rec.checkpoint("end")
    return rec.trace()


def nested() -> Trace:
    rec = Recorder(TraceConfig(preset="modern"), name="nested",
                   description="scalable mode, PGTT=nested: a guest first-stage table living in guest-physical "
                               "memory, walked through the second stage that maps guest RAM; a guest mapping to "
                               "a GPA the second stage lacks faults")
    alloc = PageAllocator(rec.mem, base=0x100000)
    ss = SecondStageTable(rec.mem, alloc, levels=4)
    gram = 0x2000000                     # guest RAM [0, 16 MiB) lives at HPA 32 MiB
    ss.map(0, gram, 0x1000000, R | W)
    gview = GuestPhysView(rec.mem, ss)
    fs = FirstStageTable(gview, PageAllocator(gview, base=0x100000, limit=0x200000), levels=4)
    fs.map(0x7000_0000, 0x400000, 0x4000, W | U)
    fs.map(0x7000_4000, 0x2000000, 0x1000, W | U)  # GPA beyond what the second stage maps
    rt = ScalableRootTable(rec.mem, alloc)
    pt = PasidTables(rec.mem, alloc)
    pt.set_entry(3, pgtt=PGTT_NESTED, did=9, ssptptr=ss.root, aw=ss.aw, fsptptr=fs.root, fspm=fs.fspm)
    rt.set_context(0, 0x20, pasid_dir=pt.dir, pdts=pt.pdts, paside=True)
    enable_translation(rec, rt.root, scalable=True)
    rec.dma_write(0x20, 0x7000_0100, pattern(300, 9), pasid=3, note="GVA -> GPA 0x400100 -> HPA 0x2400100")
    rec.dma_read(0x20, 0x7000_2FF0, 64, pasid=3)
    rec.dma_read(0x20, 0x7000_4000, 8, pasid=3, note="the GPA has no second-stage mapping")
    fault_status(rec)
    rec.checkpoint("end")
    return rec.trace()


def qi_heavy() -> Trace:
    rec = Recorder(TraceConfig(preset="modern", devices=[{"sid": 0x10, "ats": True, "pri": True, "respond": True}]),
                   name="qi-heavy",
                   description="queued invalidation with a 256-bit queue and every descriptor type: context-"
                               "cache, IOTLB, device-TLB, interrupt-entry cache, wait (status write and "
                               "interrupt), PASID-based IOTLB, PASID cache, PASID-based device-TLB and page "
                               "group response; DMA between them shows a stale entry before and the new "
                               "translation after each invalidation")
    alloc = PageAllocator(rec.mem, base=0x100000)
    ss = SecondStageTable(rec.mem, alloc, levels=4)
    ss.map(0x10000, 0x1000000, 0x4000, R | W)
    fs = FirstStageTable(rec.mem, alloc, levels=4)
    fs.map(0x5000_0000, 0x1100000, 0x2000, W | U)
    rt = ScalableRootTable(rec.mem, alloc)
    pt = PasidTables(rec.mem, alloc)
    pt.set_entry(0, pgtt=PGTT_SS, did=1, ssptptr=ss.root, aw=ss.aw)
    pt.set_entry(8, pgtt=PGTT_FS, did=2, fsptptr=fs.root, fspm=fs.fspm)
    rt.set_context(0, 0x10, pasid_dir=pt.dir, pdts=pt.pdts, paside=True, pre=True, dte=True)
    irt = alloc.alloc()
    queue = alloc.alloc()
    status = alloc.alloc()
    prq = alloc.alloc()
    rec.mmio_write(0xB8, irt | 7, 8)                       # IRTA: 256 entries
    gcmd_set(rec, 1 << 24)                                 # SIRTP
    rec.mmio_write(IQA, queue | 1 << 11, 8)                # 256-bit descriptors
    gcmd_set(rec, QIE)
    rec.mmio_write(PQA, prq, 8)
    rec.mmio_write(IEDATA, 0x4321)
    rec.mmio_write(IEADDR, 0xFEE0_0000)
    rec.mmio_write(IECTL, 0)                               # unmask the invalidation-completion event
    enable_translation(rec, rt.root, scalable=True)
    gcmd_set(rec, IRE)
    seq = [0]

    def wait(sw: bool = True, iflag: bool = False) -> tuple[int, int]:
        seq[0] += 1
        return make_descriptor(T_WAIT, SW=int(sw), IF=int(iflag), FN=1, STATUS_DATA=seq[0], STATUS_ADDR=status)

    def submit(*descs: tuple[int, int], note: str) -> None:
        rec.qi_submit(list(descs), note=note)
        rec.mmio_read(IQH, 8)
        rec.mmio_read(FSTS)

    def remap(table: SecondStageTable | FirstStageTable, iova: int, new: int, perms: int) -> None:
        table.unmap(iova, 0x1000)
        table.map(iova, new, 0x1000, perms)

    def stale_then_fresh(table: SecondStageTable | FirstStageTable, iova: int, new: int, perms: int,
                         pasid: int | None, descs: list[tuple[int, int]], what: str) -> None:
        rec.dma_read(0x10, iova, 16, pasid=pasid, note="fills the IOTLB")
        remap(table, iova, new, perms)
        rec.dma_read(0x10, iova, 16, pasid=pasid, note="stale: the IOTLB still has the old page")
        submit(*descs, wait(), note=what)
        rec.dma_read(0x10, iova, 16, pasid=pasid, note="the new page after the invalidation")

    stale_then_fresh(ss, 0x10000, 0x1800000, R | W, None, [make_descriptor(T_IOTLB, G=3, DID=1, ADDR=0x10000, AM=0)],
                     "IOTLB page-selective")
    stale_then_fresh(ss, 0x11000, 0x1801000, R | W, None, [make_descriptor(T_IOTLB, G=2, DID=1)],
                     "IOTLB domain-selective")
    stale_then_fresh(ss, 0x12000, 0x1802000, R | W, None, [make_descriptor(T_IOTLB, G=1)], "IOTLB global")
    stale_then_fresh(fs, 0x5000_0000, 0x1180000, W | U, 8,
                     [make_descriptor(T_PIOTLB, G=3, DID=2, PASID=8, ADDR=0x5000_0000, AM=0)],
                     "PASID-based IOTLB, page-selective")
    stale_then_fresh(fs, 0x5000_1000, 0x1181000, W | U, 8, [make_descriptor(T_PIOTLB, G=2, DID=2, PASID=8)],
                     "PASID-based IOTLB, PASID-selective")
    # PASID cache: point PASID 0 at another domain's table, invalidate the PASID cache and the IOTLB.
    ss2 = SecondStageTable(rec.mem, alloc, levels=4)
    ss2.map(0x10000, 0x1900000, 0x1000, R | W)
    pt.set_entry(0, pgtt=PGTT_SS, did=6, ssptptr=ss2.root, aw=ss2.aw)
    rec.dma_read(0x10, 0x10000, 16, note="stale: the cached PASID entry (and IOTLB) still say domain 1")
    submit(make_descriptor(T_PASID_CACHE, G=1, DID=1, PASID=0), make_descriptor(T_IOTLB, G=2, DID=1), wait(),
           note="PASID cache PASID-selective, then the IOTLB of the old domain")
    rec.dma_read(0x10, 0x10000, 16, note="domain 6 now")
    submit(make_descriptor(T_PASID_CACHE, G=0, DID=6), make_descriptor(T_PASID_CACHE, G=3), wait(),
           note="PASID cache domain-selective and global")
    # Context cache: make the context entry not present; the cached one keeps working until invalidated.
    rec.dma_read(0x10, 0x10000, 16)
    rt.set_context(0, 0x10, pasid_dir=pt.dir, pdts=pt.pdts, paside=True, pre=True, dte=True, present=False)
    rec.dma_read(0x10, 0x10000, 16, note="stale: the cached context entry still translates")
    submit(make_descriptor(T_CONTEXT, G=3, SID=0x10, FM=0), wait(), note="context-cache device-selective")
    rec.dma_read(0x10, 0x10000, 16, note="context entry not present now")
    fault_status(rec)
    rt.set_context(0, 0x10, pasid_dir=pt.dir, pdts=pt.pdts, paside=True, pre=True, dte=True)
    submit(make_descriptor(T_CONTEXT, G=2, DID=6), make_descriptor(T_CONTEXT, G=1), wait(),
           note="context-cache domain-selective and global")
    rec.dma_read(0x10, 0x10000, 16)
    # Device-TLB, interrupt entry cache, page group response, wait with interrupt.
    submit(make_descriptor(T_DEV_TLB, SID=0x10, ADDR=0x10000, S=0), wait(), note="device-TLB")
    submit(make_descriptor(T_PASID_DEV_TLB, SID=0x10, PASID=8, G=0, ADDR=0x5000_0000, S=0),
           make_descriptor(T_PASID_DEV_TLB, SID=0x10, G=1, ADDR=0, S=1), wait(), note="PASID-based device-TLB")
    submit(make_descriptor(T_IEC, G=0), make_descriptor(T_IEC, G=1, IIDX=4, IM=2), wait(),
           note="interrupt entry cache: global, then 4 entries")
    rec.page_request(0x10, 0x5000_1000, read=True, write=True, pasid=8, last=True, prgi=3)
    submit(make_descriptor(T_PAGE_RESPONSE, PP=1, RID=0x10, PASID=8, PRGI=3, RC=0), wait(),
           note="page group response")
    submit(wait(sw=False, iflag=True), note="wait with interrupt: ICS.IWC and an invalidation event")
    rec.mmio_read(ICS)
    rec.mmio_write(ICS, 1)
    rec.mmio_read(IECTL)
    rec.checkpoint("end")
    return rec.trace()


def stale_tlb() -> Trace:
    rec = Recorder(TraceConfig(preset="modern"), name="forgot-to-invalidate",
                   description="a driver changes and removes mappings without invalidating: the IOTLB keeps "
                               "answering with the old translations (the spec allows it), until a register-"
                               "based IOTLB invalidation; the expectations record the stale addresses")
    alloc = PageAllocator(rec.mem, base=0x100000)
    ss = SecondStageTable(rec.mem, alloc, levels=4)
    ss.map(0x40000, 0x3000000, 0x2000, R | W)
    rt = LegacyRootTable(rec.mem, alloc)
    rt.set_context(0, 0x10, slptptr=ss.root, aw=ss.aw, did=2)
    enable_translation(rec, rt.root)
    rec.dma_write(0x10, 0x40000, pattern(64, 10), note="cached: IOVA 0x40000 -> 0x3000000")
    rec.dma_read(0x10, 0x41000, 64, note="cached: IOVA 0x41000 -> 0x3001000")
    ss.unmap(0x40000, 0x1000)
    ss.map(0x40000, 0x3800000, 0x1000, R | W)
    ss.unmap(0x41000, 0x1000)
    rec.note("page tables changed: 0x40000 now maps 0x3800000, 0x41000 is unmapped; no invalidation")
    rec.dma_write(0x10, 0x40000, pattern(64, 11), note="stale: lands at the old page 0x3000000")
    rec.dma_read(0x10, 0x41000, 64, note="stale: the unmapped page still translates")
    rec.mmio_write(IVA, 0x40000 | 1, 8)  # AM=1: two pages
    rec.mmio_write(IOTLB_REG, 1 << 63 | 3 << 60 | 2 << 32, 8)
    rec.mmio_read(IOTLB_REG, 8)
    rec.dma_write(0x10, 0x40000, pattern(64, 12), note="after the page-selective invalidation: the new page")
    rec.dma_read(0x10, 0x41000, 64, note="and the removed page faults")
    fault_status(rec)
    rec.checkpoint("end")
    return rec.trace()


def bulk_dma() -> Trace:
    """Enough DMA for batched replay to matter, small enough to ship: the binary form."""
    rec = Recorder(TraceConfig(preset="modern"), name="bulk-dma",
                   description="scalable second stage, 12,000 DMAs of 64 bytes (reads and writes) over a "
                               "512-page working set, recorded with the output address of every chunk")
    alloc = PageAllocator(rec.mem, base=0x100000)
    ss = SecondStageTable(rec.mem, alloc, levels=4)
    ss.map(0x8000_0000, 0x1_0000_0000, 512 * 0x1000, R | W)
    rt = ScalableRootTable(rec.mem, alloc)
    pt = PasidTables(rec.mem, alloc)
    pt.set_entry(0, pgtt=PGTT_SS, did=1, ssptptr=ss.root, aw=ss.aw)
    rt.set_context(0, 0x40, pasid_dir=pt.dir, pdts=pt.pdts)
    enable_translation(rec, rt.root, scalable=True)
    rng = random.Random(5)
    payload = pattern(64, 13)
    for _ in range(12_000):
        iova = 0x8000_0000 + rng.randrange(512) * 0x1000 + rng.randrange(64) * 64
        if rng.random() < 0.5:
            rec.dma_write(0x40, iova, payload)
        else:
            rec._run("dma", {"sid": 0x40, "pasid": None, "iova": iova, "len": 64, "dir": "read", "priv": False})
    rec.checkpoint("end")
    t = rec.trace()
    # Reads keep the address expectations only: their data would dominate the file and the end checkpoint
    # already pins memory down.
    for ev in t.events:
        if getattr(ev, "op", None) == "dma" and ev.expect:  # type: ignore[union-attr]
            ev.expect.pop("data", None)  # type: ignore[union-attr]
    return Trace(t.config, blockify(t.events), t.name, t.description)


def host_passthrough() -> Trace:
    """Host-layer events: a VMM maps memory into an IOAS and a passthrough device DMAs through the
    physical IOMMU the host's Intel driver programmed (needs vtd_emu.host)."""
    rec = Recorder(TraceConfig(preset=None, host={"preset": "modern"}), name="host-passthrough",
                   description="iommufd-style host layer: an IOAS mapping VMM memory, a VFIO device attached "
                               "to it, DMA through the physical IOMMU (host calls and raw DMA events agree), "
                               "an unmap, and the fault that follows")
    rec.host_call("open_iommufd", bind="ictx")
    rec.host_call("add_device", args={"sid": 0x10}, bind="dev")
    rec.host_call("bind_iommufd", target="dev", args={"ictx": "$ictx"}, bind="dev_id")
    rec.host_call("ioas_alloc", target="ictx", bind="ioas")
    rec.host_call("mmap", args={"length": 0x4000}, bind="va")
    rec.host_call("write_user", args={"va": "$va", "data": {"$hex": pattern(64, 14).hex()}})
    rec.host_call("ioas_map", target="ictx", args={"ioas_id": "$ioas", "user_va": "$va", "length": 0x4000,
                                               "iova": 0x100000})
    rec.host_call("attach_pt", target="dev", args={"pt_id": "$ioas"})
    rec.host_call("dma_read", target="dev", args={"iova": 0x100000, "n": 64}, note="through the host layer")
    rec.dma_read(0x10, 0x100000, 64, note="the same, as a raw DMA event on the physical unit")
    rec.host_call("dma_write", target="dev", args={"iova": 0x101000, "data": {"$hex": pattern(32, 15).hex()}})
    rec.host_call("dma_read", target="dev", args={"iova": 0x101000, "n": 32}, note="the device's write landed")
    rec.host_call("ioas_unmap", target="ictx", args={"ioas_id": "$ioas", "iova": 0x100000, "length": 0x4000})
    rec.dma_read(0x10, 0x100000, 8, note="unmapped now: the physical unit faults")
    rec.checkpoint("end")
    return rec.trace()


# -- vIOMMU machines (format vtd-trace/2) --------------------------------------------------------------

VSID = 0x0310           # the passthrough device, at the same requester id on host and guest
VPASID = 0x42           # the PASID a guest process is bound to
GVA = 0x7F12_3400_0000  # a user address of that process
PAGE = 0x1000


def vmm_recorder(name: str, description: str, *, forwarding: str = "coalesced", ats: bool = False,
                 strict: bool = True) -> tuple[Recorder, GuestDriver]:
    """A recorder on a vIOMMU machine with one passthrough device, and the guest's (Linux-like) driver
    brought up on it."""
    rec = Recorder(TraceConfig(preset=None, vmm={"guest_ram": 16 << 20, "forwarding": forwarding}), name=name,
                   description=description)
    rec.plug(VSID, ats=ats)
    drv = GuestDriver(rec, rec.mem, alloc_base=0x10_0000, alloc_limit=0x80_0000, strict=strict)
    drv.init()
    return rec, drv


def process_table(rec: Recorder, drv: GuestDriver, gpa: int, pages: int = 4) -> FirstStageTable:
    """A guest process's first-stage table: ``pages`` user pages at GVA → guest-physical ``gpa``."""
    fs = FirstStageTable(rec.mem, drv.alloc, levels=4)
    fs.map(GVA, gpa, pages * PAGE, R | W | U)
    return fs


def bound(name: str, description: str) -> tuple[Recorder, GuestDriver, FirstStageTable, int]:
    """A machine whose guest bound a process (table at GPA 0x90_0000) to VPASID and DMAd once; returns the DID."""
    rec, drv = vmm_recorder(name, description)
    fs = process_table(rec, drv, 0x90_0000)
    dom = drv.bind_pasid(VSID, VPASID, fs.root)
    rec.dma_write(VSID, GVA + 0x10, pattern(32, 40), pasid=VPASID, note="through the nested HWPT")
    return rec, drv, fs, dom.did


def vmm_vsva() -> Trace:
    rec, drv = vmm_recorder("vmm-vsva", "vSVA: a guest process bound to a PASID of a passthrough device becomes a "
                                        "nested HWPT; DMA through guest FS + host SS; a remap with the PASID-based "
                                        "IOTLB invalidation the mm notifier sends, forwarded to the host")
    fs = process_table(rec, drv, 0x90_0000)
    dom = drv.bind_pasid(VSID, VPASID, fs.root)
    rec.dma_write(VSID, GVA + 0x10, pattern(48, 41), pasid=VPASID, note="GVA -> GPA 0x900010 -> host page")
    rec.dma_read(VSID, GVA + 0x10, 48, pasid=VPASID)
    rec.dma_read(VSID, GVA + 8 * PAGE, 8, pasid=VPASID, note="not mapped by the process: a first-stage fault")
    fs.unmap(GVA, PAGE)
    fs.map(GVA, 0x98_0000, PAGE, R | W | U)
    drv.flush_sva_range(dom, GVA, PAGE)
    rec.dma_write(VSID, GVA + 0x10, pattern(16, 42), pasid=VPASID, note="the new mapping")
    rec.note("the old page kept what the first write put there; the new one has the second")
    rec.mem_read(0x90_0010, 16)
    rec.mem_read(0x98_0010, 16)
    drv.service_faults()
    rec.checkpoint("end")
    return rec.trace()


def vmm_replace() -> Trace:
    rec, drv, a, did = bound("vmm-replace", "hitless replace: the bound PASID entry rewritten in one store to a second "
                                            "process table, then the PASID-cache invalidation; the bridge attaches the "
                                            "new nested HWPT before freeing the old one, and DMA before, between the "
                                            "invalidation and its wait, and after all succeed")
    b = process_table(rec, drv, 0xA0_0000)
    pt = drv.devices[VSID].pasid_table
    assert pt is not None
    pt.set_entry(VPASID, pgtt=PGTT_FS, did=did, aw=drv.agaw, fsptptr=b.root, extra={"PWSNP": drv._ecapf("SMPWC")})
    drv.qi_submit([drv.invalidate_pasid_cache(1, did, VPASID)], wait=False)
    rec.dma_write(VSID, GVA + 0x20, pattern(16, 43), pasid=VPASID, note="replaced, before the wait")
    drv.qi_submit([drv.invalidate_piotlb(2, did, VPASID)])
    rec.dma_write(VSID, GVA + 0x30, pattern(16, 44), pasid=VPASID, note="after")
    rec.checkpoint("end")
    return rec.trace()


def vmm_unbind() -> Trace:
    rec, drv, fs, did = bound("vmm-unbind", "unbind (intel_pasid_tear_down_entry): the nested HWPT is detached and "
                                            "freed; DMA on the PASID then faults in the guest's fault records")
    rec.checkpoint("bound")
    drv.unbind_pasid(VSID, VPASID)
    rec.dma_read(VSID, GVA + 0x10, 8, pasid=VPASID, note="unbound: blocked")
    drv.service_faults()
    rec.checkpoint("unbound")
    return rec.trace()


def vmm_reset() -> Trace:
    rec, drv, fs, did = bound("vmm-reset", "system reset drops every bind (the device back on the nest parent); the "
                                           "guest's tables are still in RAM, and SRTP + TE re-bind everything")
    root = drv.root
    assert root is not None
    rec.reset(note="translation off: PASIDs detached, nested HWPT freed")
    rec.dma_read(VSID, GVA + 0x10, 8, pasid=VPASID, note="no PASID attachment after reset")
    rec.dma_read(VSID, 0x90_0010, 8, note="requests without PASID: GPA = IOVA through the nest parent")
    enable_translation(rec, root.root, scalable=True)
    rec.dma_read(VSID, GVA + 0x10, 32, pasid=VPASID, note="re-bound at SRTP / TE from the tables in guest RAM")
    rec.checkpoint("end")
    return rec.trace()


def vmm_unmap_storm(forwarding: str) -> Trace:
    name = "vmm-unmap-storm" + ("" if forwarding == "coalesced" else "-one-per-call")
    rec, drv = vmm_recorder(name, f"a Linux-like unmap storm ({forwarding} forwarding): a first-stage DMA domain of "
                                  "an ATS passthrough device, 32 pages mapped and unmapped one by one in strict mode: "
                                  "each unmap is a PASID-based IOTLB and a device-TLB invalidation before one wait",
                            forwarding=forwarding, ats=True)
    dom = drv.domain_alloc("fs")
    drv.attach_device(VSID, dom, ats=True)
    base = 0x1000_0000
    drv.map(dom, base, 0xC0_0000, 32 * PAGE, R | W)
    for i in range(0, 32, 8):
        rec.dma_write(VSID, base + i * PAGE, pattern(64, 50 + i))
    for i in range(32):
        drv.unmap(dom, base + i * PAGE, PAGE)
    rec.dma_read(VSID, base, 8, note="unmapped: a first-stage fault")
    drv.service_faults()
    rec.checkpoint("end")
    return rec.trace()


def vmm_forgot_piotlb() -> Trace:
    rec, drv, fs, did = bound("vmm-forgot-piotlb", "forgot to invalidate: the process's page is remapped without "
                                                   "the PASID-based IOTLB invalidation, so the host's nested IOTLB "
                                                   "keeps the old translation (the expectations record the stale "
                                                   "write; replay --sanitize reports it)")
    fs.unmap(GVA, PAGE)
    fs.map(GVA, 0x98_0000, PAGE, R | W | U)
    rec.dma_write(VSID, GVA + 0x10, pattern(8, 45), pasid=VPASID, note="stale: lands in the old page")
    rec.mem_read(0x90_0010, 8)
    rec.checkpoint("end")
    return rec.trace()


def vmm_forgot_pasid_cache() -> Trace:
    rec, drv, fs, did = bound("vmm-forgot-pasid-cache", "forgot to invalidate: the bound PASID entry is pointed at "
                                                        "another process table, followed by a PASID-based IOTLB "
                                                        "invalidation but no PASID-cache invalidation: the bridge "
                                                        "never re-binds and DMA keeps the old table")
    b = process_table(rec, drv, 0xA0_0000)
    pt = drv.devices[VSID].pasid_table
    assert pt is not None
    pt.set_entry(VPASID, pgtt=PGTT_FS, did=did, aw=drv.agaw, fsptptr=b.root, extra={"PWSNP": drv._ecapf("SMPWC")})
    drv.qi_submit([drv.invalidate_piotlb(2, did, VPASID)])
    rec.dma_write(VSID, GVA + 0x10, pattern(8, 46), pasid=VPASID, note="still the old process's page")
    rec.mem_read(0x90_0010, 8)
    rec.checkpoint("end")
    return rec.trace()


def vmm_torn_update() -> Trace:
    rec, drv, fs, did = bound("vmm-torn-update", "torn update: the present, bound PASID entry is rewritten in place "
                                                 "by two stores (FSPTPTR, then PGSNP) with P staying 1, then "
                                                 "invalidated properly; between the stores the unit could have read a "
                                                 "mix of the two entries")
    b = process_table(rec, drv, 0xA0_0000)
    pt = drv.devices[VSID].pasid_table
    assert pt is not None
    addr = pt.entry_addr(VPASID)
    assert addr is not None
    q = [rec.mem.read_u64(addr + 8 * i) for i in range(3)]
    fsp = specs().structure("pasid_entry").field("FSPTPTR")
    pgsnp = specs().structure("pasid_entry").field("PGSNP")
    value = q[0] | q[1] << 64 | q[2] << 128
    value = fsp.put(value, b.root >> 12)
    rec.mem.write_u64(addr + 16, (value >> 128) & (1 << 64) - 1)
    value = pgsnp.put(value, 1)
    rec.mem.write_u64(addr + 8, (value >> 64) & (1 << 64) - 1)
    drv.qi_submit([drv.invalidate_pasid_cache(1, did, VPASID), drv.invalidate_piotlb(2, did, VPASID)])
    rec.dma_write(VSID, GVA + 0x10, pattern(8, 47), pasid=VPASID, note="the new table, once invalidated")
    rec.checkpoint("end")
    return rec.trace()


TRACES: dict[str, tuple[str, Callable[[], Trace]]] = {
    "legacy-dma": ("yaml", legacy_dma),
    "scalable-ss": ("yaml", scalable_ss),
    "first-stage-4level": ("yaml", lambda: first_stage(4)),
    "first-stage-5level": ("jsonl", lambda: first_stage(5)),
    "nested": ("yaml", nested),
    "qi-heavy": ("yaml", qi_heavy),
    "forgot-to-invalidate": ("yaml", stale_tlb),
    "bulk-dma": ("npz", bulk_dma),
    "host-passthrough": ("yaml", host_passthrough),
    "vmm-vsva": ("yaml", vmm_vsva),
    "vmm-replace": ("yaml", vmm_replace),
    "vmm-unbind": ("yaml", vmm_unbind),
    "vmm-reset": ("yaml", vmm_reset),
    "vmm-unmap-storm": ("jsonl", lambda: vmm_unmap_storm("coalesced")),
    "vmm-unmap-storm-one-per-call": ("jsonl", lambda: vmm_unmap_storm("one-per-call")),
    "vmm-forgot-piotlb": ("yaml", vmm_forgot_piotlb),
    "vmm-forgot-pasid-cache": ("yaml", vmm_forgot_pasid_cache),
    "vmm-torn-update": ("yaml", vmm_torn_update),
}


def qemu_import() -> None:
    from vtd_emu.importers.qemu_log import import_log

    d = OUT / "qemu-import"
    log = d / "edu-legacy.log"
    if not log.exists():
        print(f"make_traces: {log} missing (run scripts/qemu_capture.py --out {d / 'edu-legacy'})", file=sys.stderr)
        return
    out = d / "edu-legacy.yaml"
    trace, _ = import_log(log, ram=d / "edu-legacy.ram.zst", out=out)
    save_trace(trace, out)
    print(f"wrote {out.relative_to(REPO)} ({trace.event_count()} events)")
    linux_slice(d)


LINUX_LINES = 230_000
"""Lines of the shared Linux capture's log in the shipped slice (boot, then the first ~12,600 DMAs)."""


def linux_slice(d: Path) -> None:
    """The first LINUX_LINES lines of ../shared/linux-capture/legacy-io's log imported without the RAM
    snapshot: every table is rebuilt from the log (docs/qemu-import.md), so the trace needs nothing else."""
    import os
    import tempfile

    from vtd_emu.importers.qemu_log import import_log, open_log

    shared = Path(os.environ.get("VTD_EMU_SHARED") or REPO.parent / "shared")
    log = shared / "linux-capture" / "legacy-io" / "vtd-trace.log.zst"
    if not log.exists():
        print(f"make_traces: {log} missing (the Linux slice is left as it is)", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "linux-6.1-legacy-io.log"
        with open_log(log) as fh, part.open("w") as w:
            for _, line in zip(range(LINUX_LINES), fh):
                w.write(line)
        trace, _ = import_log(part)
    trace.description = (f"the first {LINUX_LINES:,} lines of a Linux 6.1 guest's QEMU 7.2 log (strict mode, "
                         "virtio-blk, NVMe, e1000e, interrupt remapping), imported without a RAM snapshot")
    out = d / "linux-6.1-legacy-io.npz"
    save_trace(trace, out)
    print(f"wrote {out.relative_to(REPO)} ({trace.event_count()} events, {out.stat().st_size:,} bytes)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(TRACES) + ["qemu-import"])
    args = ap.parse_args(argv)
    for name, (kind, make) in TRACES.items():
        if args.only and name not in args.only:
            continue
        path = OUT / f"{name}.{kind}"
        t = make()
        save_trace(t, path)
        print(f"wrote {path.relative_to(REPO)} ({t.event_count()} events, {path.stat().st_size:,} bytes)")
    if not args.only or "qemu-import" in args.only:
        qemu_import()
    return 0


if __name__ == "__main__":
    sys.exit(main())
