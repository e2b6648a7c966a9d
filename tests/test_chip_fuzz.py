"""Random guest behaviour against the whole chip: MMIO writes of any size at any offset, random and
half-valid invalidation descriptors, random bytes in every in-memory structure, DMA, ATS, page requests
and MSIs.  Nothing may raise or hang, and the registers keep their architectural invariants."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vtd_emu.tables import PGTT_SS, LegacyRootTable, PageAllocator, PasidTables, ScalableRootTable, SecondStageTable
from vtd_emu.memory import HostRAM
from vtd_emu.spec import specs
from vtd_emu.vtd.config import VtdConfig
from vtd_emu.vtd.iommu import VtdIommu
from vtd_emu.vtd.qi import LAYOUTS, make_descriptor

RAM = 16 << 20
TABLES, TABLES_END = 0x10_0000, 0x14_0000
QUEUE, STATUS, IRT, PRQ = 0x20_0000, 0x21_0000, 0x22_0000, 0x23_0000
AREA_END = 0x24_0000
DATA = 0x40_0000          # where the mapped IOVAs land
MAPPED_PAGES = 64
GCMD, GSTS, FSTS, IQH, IQT, IQA = 0x18, 0x1C, 0x34, 0x80, 0x88, 0x90
TE, SRTP, SFL, EAFL, WBF, QIE, IRE, SIRTP, CFI = (1 << 31, 1 << 30, 1 << 29, 1 << 28, 1 << 27, 1 << 26, 1 << 25,
                                                  1 << 24, 1 << 23)
PERSISTENT = TE | EAFL | QIE | IRE | CFI
IQE, ITE = 1 << 4, 1 << 6
SIDS = [0x0010, 0x0011, 0x0080, 0x0100, 0x0500, 0xFFFF]
U64 = (1 << 64) - 1
STEP_LIMIT_S = 2.0
CONFIGS = [("modern", "spec"), ("modern", "spec"), ("modern", "qemu-7.2"), ("qemu-7.2-default", "qemu-7.2"),
           ("qemu-7.2-scalable", "qemu-7.2"), ("qemu-7.2-scalable", "spec")]
REG_OFFSETS = sorted({0x0, 0x8, 0x10, 0x18, 0x1C, 0x20, 0x24, 0x28, 0x2C, 0x34, 0x38, 0x3C, 0x40, 0x44, 0x58,
                      0x64, 0x68, 0x6C, 0x70, 0x78, 0x80, 0x84, 0x88, 0x8C, 0x90, 0x94, 0x9C, 0xA0, 0xA4, 0xA8,
                      0xAC, 0xB0, 0xB8, 0xBC, 0xC0, 0xC8, 0xD0, 0xD4, 0xDC, 0xE0, 0xE4, 0xE8, 0xEC, 0xF0, 0xF4,
                      0xF8, 0xFC, 0x100, 0x108, 0x220, 0x224, 0x228, 0x22C, 0x230, 0x238, 0x2A8})
RSVD = {t: specs().structure(name).qword_masks(specs().structure(name).reserved_mask()) for t, name in
        LAYOUTS.items()}

u64 = st.integers(0, U64)
table_page = st.integers(TABLES >> 12, (TABLES_END >> 12) - 1).map(lambda p: p << 12)


small = st.integers(0, 4)
page_addr = st.integers(0, MAPPED_PAGES + 4).map(lambda p: p << 12)
VALID_FIELDS = {
    1: dict(G=st.integers(1, 3), DID=small, SID=st.sampled_from(SIDS), FM=st.integers(0, 3)),
    2: dict(G=st.integers(1, 3), DID=small, AM=st.integers(0, 9), IH=st.integers(0, 1), ADDR=page_addr),
    3: dict(SID=st.sampled_from(SIDS[:3]), S=st.integers(0, 1), ADDR=page_addr),
    4: dict(G=st.integers(0, 1), IIDX=st.integers(0, 20), IM=st.integers(0, 4)),
    5: dict(SW=st.integers(0, 1), IF=st.integers(0, 1), FN=st.integers(0, 1),
            STATUS_ADDR=st.integers(0, 255).map(lambda i: STATUS + 4 * i), STATUS_DATA=st.integers(0, 0xFFFF_FFFF)),
    6: dict(G=st.integers(2, 3), DID=small, PASID=small, AM=st.integers(0, 9), IH=st.integers(0, 1),
            ADDR=page_addr),
    7: dict(G=st.sampled_from([0, 1, 3]), DID=small, PASID=small),
    8: dict(SID=st.sampled_from(SIDS[:3]), PASID=small, G=st.integers(0, 1), S=st.integers(0, 1), ADDR=page_addr),
    9: dict(PP=st.integers(0, 1), RID=st.sampled_from(SIDS[:3]), PASID=small, PRGI=st.integers(0, 7),
            RC=st.sampled_from([0, 1, 0xF])),
}


@st.composite
def descriptor(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """Mostly a well-formed descriptor with small fields (so it hits real cache entries), else random
    bits with a chosen type, reserved bits cleared or not."""
    if draw(st.integers(0, 4)):
        t = draw(st.sampled_from(sorted(VALID_FIELDS)))
        q0, q1 = make_descriptor(t, **draw(st.fixed_dictionaries(VALID_FIELDS[t])))
        return q0, q1, 0, 0
    t = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0xA, 0xF, 0x15]))
    q0, q1 = draw(u64), draw(u64)
    if t in RSVD and draw(st.booleans()):
        q0 &= ~RSVD[t][0]
        q1 &= ~RSVD[t][1]
    q0 = (q0 & ~0xE0F) | (t & 0xF) | (t >> 4) << 9
    upper = (0, 0) if draw(st.booleans()) else (draw(u64), draw(u64))
    return q0, q1, upper[0], upper[1]


class ChipMachine(RuleBasedStateMachine):
    """One unit over 16 MiB of RAM with its structures in fixed regions the rules scribble over."""

    io: VtdIommu
    ram: HostRAM

    @initialize(cfg=st.sampled_from(CONFIGS), dw=st.booleans())
    def setup(self, cfg: tuple[str, str], dw: bool) -> None:
        preset, profile = cfg
        self.ram = HostRAM(RAM)
        self.cfg = VtdConfig.preset(preset, profile=profile)
        self.io = VtdIommu(self.ram, self.cfg)
        self.stail = 0
        self.dw = dw and self.cfg.scalable
        self.io.attach_device(0x0010, pri=True)
        self.io.attach_device(0x0011, respond=False)
        self.io.attach_device(0x0080, spurious_completion=True, pri=True)
        # Valid structures (built like a driver would) for the random writes to perturb.
        alloc = PageAllocator(self.ram, base=TABLES, limit=TABLES_END)
        ss = SecondStageTable(self.ram, alloc, levels=3)
        ss.map(0, DATA, MAPPED_PAGES << 12)
        sm = self.cfg.scalable
        if sm:
            rt: LegacyRootTable | ScalableRootTable = ScalableRootTable(self.ram, alloc)
            for i, sid in enumerate(SIDS[:3]):
                pt = PasidTables(self.ram, alloc)
                for pasid in range(4):
                    pt.set_entry(pasid, pgtt=PGTT_SS, did=1 + (pasid & 1), ssptptr=ss.root, aw=ss.aw)
                rt.set_context(sid >> 8, sid & 0xFF, pasid_dir=pt.dir, pdts=pt.pdts, pre=i != 1, dte=True)
        else:
            rt = LegacyRootTable(self.ram, alloc)
            dt = 1 if self.cfg.ecap_field("DT") else 0
            for i, sid in enumerate(SIDS[:3]):
                rt.set_context(sid >> 8, sid & 0xFF, slptptr=ss.root, aw=ss.aw, did=1 + i, tt=dt)
        self.tables_end = alloc.next
        irte = specs().structure("irte")
        for i in range(16):
            v = irte.encode(P=1, V=0x20 + i, DST=i << 8, SVT=i & 1, SID=SIDS[i % 3])
            self.ram.write_u64(IRT + 16 * i, v & U64)
            self.ram.write_u64(IRT + 16 * i + 8, v >> 64)
        # The ring holds valid descriptors from an earlier lap: fetching past IQT would execute them.
        old = make_descriptor(5, SW=1, STATUS_ADDR=STATUS + 0x800, STATUS_DATA=0xDEAD)
        for slot in range(0, 0x2000, 16):
            self.ram.write_u64(QUEUE + slot, old[0])
            self.ram.write_u64(QUEUE + slot + 8, old[1])
        w = self.io.mmio_write
        w(0x20, rt.root | (1 << 10 if sm else 0), 8)
        w(IQA, QUEUE | (1 << 11 if self.dw else 0) | 1, 8)
        w(0xB8, IRT | 1 << 11 | 7, 8)
        w(0xD0, PRQ, 8)
        for bit in (SRTP, TE, QIE, SIRTP, IRE):
            self._gcmd(bit, True)

    # -- helpers -----------------------------------------------------------------------------------
    def _timed(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        r = fn(*args, **kwargs)
        assert time.perf_counter() - t0 < STEP_LIMIT_S, f"{fn.__name__} took too long (hang?)"
        return r

    def _gcmd(self, bit: int, on: bool) -> None:
        io = self.io
        gsts = io.mmio_read(GSTS, 4)
        value = (gsts & 0x96FF_FFFF & ~bit) | (bit if on else 0)
        qi = io.qi
        qi_state = (qi.head, qi.tail, qi.last_type) if qi is not None else None
        self._timed(io.mmio_write, GCMD, value, 4)
        after = io.mmio_read(GSTS, 4)
        cfg, q = self.cfg, self.cfg.quirks
        if bit & PERSISTENT:
            accepted = {
                TE: True,
                QIE: bool(cfg.ecap_field("QI")) and not (
                    not on and q.qemu_qi_registers and qi_state is not None
                    and not (qi_state[0] == qi_state[1] and qi_state[2] == 5)),
                IRE: bool(cfg.ecap_field("IR")),
                CFI: not q.ignore_cfi,
                EAFL: bool(cfg.cap_field("AFL")),
            }[bit]
            if accepted:
                assert bool(after & bit) == on, f"GSTS {after:#x} does not mirror GCMD bit {bit:#x}={on}"
            else:
                assert after & bit == gsts & bit
        # Only the one targeted bit may change among the persistent ones.
        assert (after ^ gsts) & PERSISTENT & ~bit == 0

    # -- rules -------------------------------------------------------------------------------------
    @rule(bit=st.sampled_from([TE, SRTP, SFL, EAFL, WBF, QIE, IRE, SIRTP, CFI]), on=st.booleans())
    def gcmd(self, bit: int, on: bool) -> None:
        self._gcmd(bit, on)

    @rule(off=st.one_of(st.sampled_from(REG_OFFSETS), st.integers(0, 0x1100)), value=u64,
          size=st.sampled_from([4, 4, 8, 8, 1, 2]))
    def mmio_write(self, off: int, value: int, size: int) -> None:
        self._timed(self.io.mmio_write, off, value, size)

    @rule(off=st.one_of(st.sampled_from(REG_OFFSETS), st.integers(0, 0x1100)), size=st.sampled_from([4, 8, 1]))
    def mmio_read(self, off: int, size: int) -> None:
        v = self.io.mmio_read(off, size)
        assert 0 <= v < 1 << (8 * size if size in (4, 8) else 64)

    @rule(descs=st.lists(descriptor(), min_size=1, max_size=4), recover=st.booleans(), fence=st.booleans())
    def submit_descriptors(self, descs: list[tuple[int, int, int, int]], recover: bool, fence: bool) -> None:
        qi = self.io.qi
        if qi is None:
            return
        if fence:
            # As drivers do: end the batch with a status-writing wait.
            descs = descs + [make_descriptor(5, SW=1, STATUS_ADDR=STATUS, STATUS_DATA=len(descs)) + (0, 0)]
        if recover:
            # A driver's error handler: clear IQE/ITE/ICE before queueing more.
            self._timed(self.io.mmio_write, FSTS, IQE | ITE | 1 << 5, 4)
        slot = 32 if qi.dw else 16
        slots = max(qi.entries, 1)
        base = qi.base if qi.enabled else QUEUE
        for d in descs:
            addr = base + self.stail * slot
            for i, q in enumerate(d[: slot // 8]):
                self.ram.write_u64(addr + 8 * i, q)
            self.stail = (self.stail + 1) % slots
        self._timed(self.io.mmio_write, IQT, self.stail * slot, 8)

    @rule(where=st.one_of(st.integers(TABLES >> 3, (AREA_END >> 3) - 1), st.integers(0, 0x2000)),
          value=st.one_of(u64, table_page.flatmap(lambda p: st.integers(0, 0xFFF).map(lambda lo: p | lo)),
                          st.integers(0, 7).map(lambda b: 1 << b)), flip=st.booleans())
    def scribble(self, where: int, value: int, flip: bool) -> None:
        # Either anywhere in the structure regions, or within the tables actually built.
        addr = where << 3 if where >= TABLES >> 3 else TABLES + 8 * (where % ((self.tables_end - TABLES) >> 3))
        self.ram.write_u64(addr, self.ram.read_u64(addr) ^ value if flip else value)

    @rule(bits=st.sampled_from([IQE, ITE, 1 << 5, IQE | ITE | 1 << 5 | 1]))
    def clear_errors(self, bits: int) -> None:
        self._timed(self.io.mmio_write, FSTS, bits, 4)

    @rule(index=st.integers(0, 7), fri=st.booleans())
    def clear_fault_record(self, index: int, fri: bool) -> None:
        # A driver's fault handler: clear F (bit 127) of the record FRI names, or of any record.
        nfr = self.cfg.nfr
        if fri:
            index = (self.io.mmio_read(FSTS, 4) >> 8) & 0xFF
        off = self.io.regs.offset_of("FRCD", index % nfr)
        self._timed(self.io.mmio_write, off + 12, 1 << 31, 4)

    @rule(sid=st.sampled_from(SIDS), iova=st.one_of(st.integers(0, (MAPPED_PAGES + 2) << 12), u64),
          write=st.booleans(), pasid=st.one_of(st.none(), st.integers(0, 3), st.integers(0, 0xFFFFF)),
          priv=st.booleans(),
          length=st.integers(1, 64))
    def dma(self, sid: int, iova: int, write: bool, pasid: int | None, priv: bool, length: int) -> None:
        priv = priv and pasid is not None
        iova = min(iova, U64 - length)
        if write:
            r = self._timed(self.io.dma_write, sid, iova, b"\xa5" * length, pasid, priv)
        else:
            r = self._timed(self.io.dma_read, sid, iova, length, pasid, priv)
            assert len(r.data) == length

    @rule(sid=st.sampled_from([0x0010, 0x0011, 0x0080]),
          iova=st.one_of(st.integers(0, (MAPPED_PAGES + 2) << 12), st.integers(0, 1 << 40)),
          write=st.booleans(), pasid=st.one_of(st.none(), st.integers(0, 3)))
    def ats(self, sid: int, iova: int, write: bool, pasid: int | None) -> None:
        dev = self.io.devices[sid]
        self._timed(dev.translation_request, iova, "w" if write else "r", pasid)
        if write:
            self._timed(dev.translated_dma_write, iova, b"\x5a" * 8, pasid)
        else:
            self._timed(dev.translated_dma_read, iova, 8, pasid)

    @rule(sid=st.one_of(st.sampled_from(SIDS[:3]), st.sampled_from(SIDS)), addr=u64, read=st.booleans(),
          write=st.booleans(), pasid=st.one_of(st.none(), st.integers(0, 3), st.integers(0, 0xFFFFF)),
          last=st.booleans(),
          prgi=st.integers(0, 7),
          private=st.one_of(st.none(), st.integers(0, (1 << 128) - 1)))
    def page_request(self, sid: int, addr: int, read: bool, write: bool, pasid: int | None, last: bool,
                     prgi: int, private: int | None) -> None:
        self._timed(self.io.page_request, sid, addr, read=read, write=write, pasid=pasid, last=last, prgi=prgi,
                    private_data=private)

    @rule(sid=st.sampled_from(SIDS), handle=st.integers(0, 20), shv=st.booleans(), raw=st.booleans(),
          lo=st.integers(0, (1 << 20) - 1), hi=st.sampled_from([0, 0, 0, 1]), data=st.integers(0, 0xFFFF_FFFF))
    def interrupt(self, sid: int, handle: int, shv: bool, raw: bool, lo: int, hi: int, data: int) -> None:
        if raw:
            addr = hi << 32 | 0xFEE0_0000 | lo
        else:
            addr = 0xFEE0_0000 | handle << 5 | 1 << 4 | int(shv) << 3
            data &= 0x7  # a small subhandle: index within the valid IRTEs
        self._timed(self.io.remap_interrupt, sid, addr, data)

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def registers_hold(self) -> None:
        io = self.io
        regs = io.regs
        gsts = regs.get("GSTS")
        assert gsts & 0x7F_FFFF == 0
        assert bool(gsts & TE) == io.te
        fsts = regs.get("FSTS")
        pending = any(regs.get("FRCD", i) >> 127 for i in range(self.cfg.nfr))
        assert bool(fsts & 2) == pending, "PPF must be the OR of the FRCD F bits"
        assert (fsts >> 8) & 0xFF < self.cfg.nfr, "FRI must name an FRCD"
        qi = io.qi
        if qi is None:
            return
        assert bool(gsts & QIE) == qi.enabled
        if not qi.enabled:
            assert regs.get("IQH") == 0
            self.seen = None
            return
        shift = 5 if qi.dw else 4
        assert 0 <= qi.head < qi.entries, "IQH must stay inside the queue"
        if not self.cfg.quirks.qemu_qi_registers:
            # (QEMU re-decodes DW at IQA writes while enabled; its IQH keeps the old encoding until the
            # next descriptor completes.)
            assert regs.get("IQH") == (qi.head << shift) & 0x7FFF0
        tail = qi.tail if self.cfg.quirks.qemu_qi_registers else (regs.get("IQT") & 0x7FFF0) >> shift
        ring = (qi.base, qi.entries, qi.dw)
        seen = getattr(self, "seen", None)
        if seen is not None and seen[0] == ring and tail < qi.entries:
            # IQH never passes IQT: since the last step it advanced at most up to the tail.
            last_head = seen[1]
            assert (qi.head - last_head) % qi.entries <= (tail - last_head) % qi.entries, "IQH passed IQT"
        self.seen = (ring, qi.head)
        if fsts & (IQE | ITE) or qi.dw_refused or self.cfg.quirks.qemu_qi_registers:
            return
        iqt = regs.get("IQT") & 0x7FFF0
        if qi.dw and iqt & 0x10:
            return
        tail = iqt >> shift
        if tail < qi.entries:
            assert qi.head == tail, "an idle queue has fetched everything up to IQT"


TestChipFuzz = ChipMachine.TestCase
TestChipFuzz.settings = settings(max_examples=120, stateful_step_count=80, deadline=None,
                                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
