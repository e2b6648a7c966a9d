"""The host's Intel IOMMU driver: programs a physical :class:`~vtd_emu.vtd.iommu.VtdIommu` the way
``drivers/iommu/intel`` does, through MMIO and structures in host memory.

- Scalable-mode root and context tables, one PASID directory/table per device (sized for its PASIDs),
  context entries written at probe (DTE for ATS, PASIDE for PASID, PRE for PRI, RID_PASID 0).
- Paging domains are second-stage tables in host memory (5 levels when SAGAW offers 57 bits); a nested
  domain is a PASID entry with PGTT=nested pointing at a guest first-stage table and its parent's table.
- Every change is followed by the invalidations Linux issues, submitted through the invalidation queue
  like ``qi_submit_sync`` (256-bit descriptors, then a wait descriptor whose status write says done).
- The page request queue is consumed on the page-request interrupt: descriptors between PQH and PQT are
  turned into faults for the attach handle they hit, or answered INVALID when nothing can handle them.
- DMAR faults are read out of the FRCDs and cleared on the fault interrupt, as ``dmar_fault`` does.

Driver-internal choices that differ from Linux are listed in ``docs/host.md``.
"""

from __future__ import annotations

import errno
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError, InternalError
from ..spec import consts, specs
from ..tables import (PGTT_FS, PGTT_NESTED, PGTT_PT, PGTT_SS, PasidTables, R, ScalableRootTable, SecondStageTable,
                      W, gcmd_set)
from ..vtd.events import Interrupt
from ..vtd.faults import FaultRecord, reason_name
from ..vtd.qi import (LAYOUTS, T_CONTEXT, T_DEV_TLB, T_IOTLB, T_PAGE_RESPONSE, T_PASID_CACHE, T_PASID_DEV_TLB,
                      T_PIOTLB, T_WAIT, TYPE_NAMES, make_descriptor)
from .errors import IommufdError, fail
from .iopt import IOMMU_READ, IOMMU_WRITE
from .process import PagePool
from .uapi import (HPAGE_SIZE, HWPT_INVALIDATE_DATA_VTD_S1, PAGE_RESP_INVALID, PAGE_SIZE,
                   PGFAULT_FLAGS_LAST_PAGE, PGFAULT_FLAGS_PASID_VALID, PGFAULT_PERM_EXEC, PGFAULT_PERM_PRIV,
                   PGFAULT_PERM_READ, PGFAULT_PERM_WRITE, U64_MAX, VTD_INV_FLAGS_LEAF, VTD_S1_EAFE, VTD_S1_SRE,
                   VTD_S1_WPE, HwptVtdS1, VtdS1Invalidate)

if TYPE_CHECKING:
    from ..vtd.iommu import VtdIommu

# Register and structure bits come from the specs (``vtd_emu.spec.consts``); what stays here are the
# driver's own choices.
_QI_QS = 0                    # one 4 KiB page: 128 256-bit descriptors
_QI_DONE, _QI_IN_USE = 1, 2   # the values Linux's wait descriptors write (QI_DONE, QI_IN_USE)
_PRQ_ORDER = 4                # Linux: 16 pages, 2048 32-byte descriptors
_FAULT_MSI_ADDR, _FAULT_MSI_DATA = 0xFEE0_0000, 0x40
_PRQ_MSI_DATA = 0x41
_MAX_AGAW_PFN_WIDTH = 52
_FIRST_DID = 2                # 0 is CM's "invalid" tag and 1 Linux's identity/blocking domain


def calculate_psi_aligned_address(start: int, end: int) -> tuple[int, int, int]:
    """Linux ``calculate_psi_aligned_address``: (aligned address, pages, mask) of the smallest naturally
    aligned power-of-two range covering [start, end]."""
    pfn = start >> 12
    pages = ((end >> 12) - pfn) + 1
    aligned = 1 << (pages - 1).bit_length()
    bitmask = aligned - 1
    mask = aligned.bit_length() - 1
    if bitmask & pfn:
        end_pfn = pfn + pages - 1
        shared = ~(pfn ^ end_pfn) & ~bitmask & ((1 << 64) - 1)
        mask = (shared & -shared).bit_length() - 1 if shared else _MAX_AGAW_PFN_WIDTH
        aligned = 1 << mask
    return (start & ~((PAGE_SIZE << mask) - 1)) & ((1 << 64) - 1), aligned, mask


def _ats_addr(addr: int, order: int) -> tuple[int, int]:
    """(ADDR, S) of a device-TLB invalidation of 2**order pages at ``addr`` (ATS size encoding)."""
    if not order:
        return addr & ~0xFFF, 0
    bits = ((1 << (order + 12)) - 1) & ~0xFFF
    return ((addr | bits) & ~(1 << (order + 11))) & ((1 << 64) - 1), 1


@dataclass
class InvRecord:
    """One descriptor the driver submitted, decoded (``fields`` as the spec layout names them)."""

    type: str
    fields: dict[str, int]


class DevInfo:
    """``struct device_domain_info``: what the driver keeps per physical device."""

    def __init__(self, sid: int, group: int, max_pasids: int, ats: bool, pri: bool,
                 pasid_table: PasidTables) -> None:
        self.sid = sid
        self.group = group
        self.max_pasids = max_pasids
        self.ats = ats
        self.pri = pri
        self.pasid_table = pasid_table
        self.domains: dict[int, "IntelDomain"] = {}
        """PASID table index (0 = requests without PASID) -> domain programmed there."""
        self.iopf_users = 0

    @property
    def bus(self) -> int:
        return self.sid >> 8

    @property
    def devfn(self) -> int:
        return self.sid & 0xFF


class _DomainPages:
    """Allocator handed to a domain's page-table builder, remembering its pages to free them."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.pages: list[int] = []

    def alloc(self, pages: int = 1, align: int = PAGE_SIZE) -> int:
        addr = self.pool.alloc(pages, align)
        self.pages.extend(addr + i * PAGE_SIZE for i in range(pages))
        return addr

    def free_all(self) -> None:
        for p in self.pages:
            self.pool.free(p)
        self.pages.clear()


class IntelDomain:
    """What paging and nested domains share: a DID while attached, attachments, an IOPF handler."""

    kind = "domain"

    def __init__(self, drv: "IntelIommu") -> None:
        self.drv = drv
        self.did = 0
        self.attachments: set[tuple[DevInfo, int]] = set()
        self.iopf_handler: Callable[..., None] | None = None
        self.freed = False

    def _get_did(self) -> int:
        if not self.attachments:
            self.did = self.drv._alloc_did()
        return self.did

    def _put_did(self) -> None:
        if not self.attachments and self.did:
            self.drv._free_did(self.did)
            self.did = 0


class PagingDomain(IntelDomain):
    """A second-stage paging domain (``dmar_domain`` with ``use_first_level`` false)."""

    kind = "paging"

    def __init__(self, drv: "IntelIommu", *, nest_parent: bool, dirty_ops: bool) -> None:
        super().__init__(drv)
        self.nest_parent = nest_parent
        self.dirty_ops = dirty_ops
        self.dirty_tracking = False
        self.force_snooping = drv.ecap_sc
        self.gaw = drv.gaw
        self.pgsize_min = PAGE_SIZE
        self.aperture = (0, (1 << self.gaw) - 1)
        self._pages = _DomainPages(drv.pool)
        self.table = SecondStageTable(drv.ram, self._pages, levels=(self.gaw - 12) // 9)  # type: ignore[arg-type]
        self.children: list[NestedDomain] = []

    # -- mapping ----------------------------------------------------------------------------------
    def map_pages(self, iova: int, pfns: list[int], prot: int, large_ok: bool) -> None:
        if self.nest_parent and not prot & IOMMU_WRITE:
            # ERRATA_772415_SPR17: read-only mappings in a nesting parent are refused.
            raise fail(errno.EINVAL, "read-only mapping in a nest parent (errata 772415)")
        perms = (R if prot & IOMMU_READ else 0) | (W if prot & IOMMU_WRITE else 0)
        snp = consts.SS_PTE.SNP if self.force_snooping else 0
        n = len(pfns)
        big = HPAGE_SIZE // PAGE_SIZE
        done = 0
        i = 0
        try:
            while i < n:
                a = iova + i * PAGE_SIZE
                if (large_ok and self.drv.sllps_2m and a % HPAGE_SIZE == 0 and i + big <= n
                        and pfns[i] % HPAGE_SIZE == 0
                        and all(pfns[i + k] == pfns[i] + k * PAGE_SIZE for k in range(big))):
                    self.table.map(a, pfns[i], HPAGE_SIZE, perms, page_size=HPAGE_SIZE, extra_leaf_bits=snp,
                                   table_perms=R | W)
                    i += big
                else:
                    self.table.map(a, pfns[i], PAGE_SIZE, perms, extra_leaf_bits=snp, table_perms=R | W)
                    i += 1
                done = i
        except IommufdError:
            # All or nothing: a table page that could not be allocated leaves no partial mapping.
            if done:
                self.table.unmap(iova, done * PAGE_SIZE)
            raise
        # Not-present to present needs no invalidation without caching mode (Linux flushes the write
        # buffer only); with CM the caches may hold the not-present entries.
        if self.drv.caching_mode and self.attachments:
            self.drv.flush_range(self, iova, iova + n * PAGE_SIZE - 1, False)

    def unmap_pages(self, iova: int, length: int) -> None:
        self.table.unmap(iova, length)
        self.drv.flush_range(self, iova, iova + length - 1, False)

    # -- dirty tracking --------------------------------------------------------------------------
    def _leaf(self, iova: int) -> tuple[int, int] | None:
        """(entry address, leaf size) of the leaf mapping ``iova``."""
        hit = self.table.lookup(iova)
        if hit is None:
            return None
        size = hit[1]
        level = {PAGE_SIZE: 1, HPAGE_SIZE: 2, 1 << 30: 3}[size]
        addr = self.table.entry_addr(iova, level)
        return None if addr is None else (addr, size)

    def read_and_clear_dirty(self, iova: int, length: int, clear: bool,
                             record: Callable[[int, int], None] | None) -> None:
        """``intel_iommu_read_and_clear_dirty``: test (and clear) D in every leaf of the range; ``record``
        is told (iova, size) of each dirty leaf.  Cleared bits are flushed from the IOTLB, since cached
        translations would never set D again."""
        if not self.dirty_tracking and record is not None:
            raise fail(errno.EINVAL, "dirty tracking is not enabled")
        ram = self.drv.ram
        rw = consts.SS_PTE.R | consts.SS_PTE.W
        dirty = consts.SS_PTE.D
        end = iova + length
        pos = iova
        lo, hi = None, None
        while pos < end:
            leaf = self._leaf(pos)
            if leaf is None:
                pos = (pos & ~(PAGE_SIZE - 1)) + PAGE_SIZE
                continue
            addr, size = leaf
            base = pos & ~(size - 1)
            e = ram.read_u64(addr)
            if e & rw and e & dirty:
                if record is not None:
                    record(base, size)
                if clear:
                    ram.write_u64(addr, e & ~dirty)
                    lo = base if lo is None else min(lo, base)
                    hi = base + size - 1 if hi is None else max(hi, base + size - 1)
            pos = base + size
        if lo is not None and hi is not None:
            self.drv.flush_range(self, lo, hi, False)

    def set_dirty_tracking(self, enable: bool) -> None:
        """``intel_iommu_set_dirty_tracking``: SSADE in every PASID entry using this table (its own and
        its nested children's), each followed by the invalidations the spec asks for."""
        if self.dirty_tracking == enable:
            return
        self.dirty_tracking = enable
        for d in [self, *self.children]:
            for info, index in sorted(d.attachments, key=lambda t: (t[0].sid, t[1])):
                self.drv._set_ssade(info, index, enable)

    def free(self) -> None:
        self._pages.free_all()
        self.freed = True


class NestedDomain(IntelDomain):
    """A nested domain: a guest stage-1 table (``pgtbl_addr``, a GPA) over a nest-parent paging domain."""

    kind = "nested"

    def __init__(self, drv: "IntelIommu", parent: PagingDomain, s1: HwptVtdS1) -> None:
        super().__init__(drv)
        self.parent = parent
        self.s1 = s1
        parent.children.append(self)

    def cache_invalidate_user(self, entries: list["_EntryReader"], data_type: int) -> int:
        """``intel_nested_cache_invalidate_user``: how many entries were handled; raises with
        ``entry_num`` set on the first bad one."""
        if data_type != HWPT_INVALIDATE_DATA_VTD_S1:
            raise fail(errno.EINVAL, "invalidation data type is not VTD_S1")
        processed = 0
        for reader in entries:
            try:
                inv = reader()
                if inv.flags & ~VTD_INV_FLAGS_LEAF or inv.reserved:
                    raise fail(errno.EOPNOTSUPP, "unknown invalidation flags")
                if inv.addr % PAGE_SIZE or (inv.npages == U64_MAX and inv.addr):
                    raise fail(errno.EINVAL, "misaligned address, or a full flush with an address")
            except OSError as e:
                e.entry_num = processed  # type: ignore[attr-defined]
                raise
            if inv.npages == U64_MAX:
                self.drv.flush_all(self)
            elif inv.npages:
                last = inv.addr + inv.npages * PAGE_SIZE - 1
                self.drv.flush_range(self, inv.addr, min(last, U64_MAX), bool(inv.flags & VTD_INV_FLAGS_LEAF))
            processed += 1
        return processed

    def free(self) -> None:
        self.parent.children.remove(self)
        self.freed = True


_EntryReader = Callable[[], VtdS1Invalidate]


@dataclass
class IopfFault:
    """One page request as the IOMMU core sees it (``iommu_fault_page_request``)."""

    flags: int
    pasid: int
    grpid: int
    perm: int
    addr: int


@dataclass
class IopfGroup:
    """Faults of one page request group, delivered once its last request arrived."""

    sid: int
    pasid: int | None
    grpid: int
    faults: list[IopfFault]
    handle: object
    cookie: int = 0
    answered: bool = False


@dataclass
class DmarFault:
    """A fault read out of an FRCD by the driver's fault handler."""

    record: FaultRecord

    @property
    def name(self) -> str:
        return reason_name(self.record.reason)


class IntelIommu:
    """The Intel IOMMU driver instance for one physical unit."""

    def __init__(self, chip: "VtdIommu", pool: PagePool) -> None:
        cfg = chip.cfg
        self.chip = chip
        self.ram = chip.mem
        self.pool = pool
        if not (cfg.scalable and cfg.ecap_field("QI") and cfg.ecap_field("SLTS")):
            raise ConfigError("the host driver needs a scalable-mode unit with queued invalidation and "
                              "second-stage translation (ECAP.SMTS, QI, SLTS)")
        self.cap, self.ecap = cfg.cap, cfg.ecap
        self.ecap_sc = bool(cfg.ecap_field("SC"))
        self.ecap_srs = bool(cfg.ecap_field("SRS"))
        self.ecap_eafs = bool(cfg.ecap_field("EAFS"))
        self.ecap_dt = bool(cfg.ecap_field("DT"))
        self.ecap_prs = bool(cfg.ecap_field("PRS"))
        self.ecap_pds = bool(cfg.ecap_field("PDS"))
        self.nesting = bool(cfg.ecap_field("NEST")) and bool(cfg.ecap_field("FLTS"))
        self.ssads = bool(cfg.ecap_field("SLADS"))
        self.pasid_supported = bool(cfg.ecap_field("PASID"))
        self.pasid_bits = cfg.ecap_field("PSS") + 1 if self.pasid_supported else 0
        self.fl5lp = bool(cfg.cap_field("FL5LP"))
        self.caching_mode = bool(cfg.cap_field("CM"))
        self.psi = bool(cfg.cap_field("PSI"))
        self.mamv = cfg.cap_field("MAMV")
        self.drain_r, self.drain_w = cfg.cap_field("DRD"), cfg.cap_field("DWD")
        self.sllps_2m = bool(cfg.cap_field("SLLPS") & 1)
        self.smpwc = bool(cfg.ecap_field("SMPWC"))
        self.ndoms = 1 << (4 + 2 * cfg.cap_field("ND"))
        sagaw = cfg.cap_field("SAGAW")
        agaw = max((a for a in (1, 2, 3) if sagaw >> a & 1), default=0)
        if not agaw:
            raise ConfigError("the unit supports no 3-, 4- or 5-level second-stage table")
        self.gaw = min(30 + 9 * agaw, cfg.mgaw + 1)
        if (self.gaw - 12) % 9:
            raise ConfigError(f"MGAW {cfg.mgaw} does not allow a whole second-stage table")
        self.frcd_base = cfg.cap_field("FRO") * 16
        self.nfr = cfg.nfr
        self._off = {n: chip.regs.offset_of(n) for n in
                     ("GCMD", "GSTS", "RTADDR", "FSTS", "FECTL", "FEDATA", "FEADDR", "IQT", "IQA", "IQH",
                      "PQH", "PQT", "PQA", "PRSTS", "PECTL", "PEDATA", "PEADDR")}
        self._prq_layout = specs().structure("page_request")
        self.root = ScalableRootTable(self.ram, pool)  # type: ignore[arg-type]
        self._dids: set[int] = set()
        self.devices: dict[int, DevInfo] = {}
        self.inv_log: list[InvRecord] = []
        self.dmar_faults: list[DmarFault] = []
        self.handles: dict[tuple[int, int], object] = {}
        """(IOMMU group, PASID index) -> the iommufd attach handle page requests are reported to."""
        self._partial: dict[int, list[IopfFault]] = defaultdict(list)
        self._in_prq = False
        self._prq_again = False
        self.prq_bad = 0
        self._chained_irq = chip.on_interrupt
        chip.on_interrupt = self._interrupt
        self._enable()

    # -- bring-up ---------------------------------------------------------------------------------
    def _w(self, reg: str, value: int, size: int = 8) -> None:
        self.chip.mmio_write(self._off[reg], value, size)

    def _r(self, reg: str, size: int = 8) -> int:
        return self.chip.mmio_read(self._off[reg], size)

    def _gcmd(self, command: int, status: int) -> None:
        gcmd_set(self.chip, command)
        if not self._r("GSTS", 4) & status:
            raise InternalError(f"GSTS did not acknowledge GCMD {command:#x} (status bit {status:#x})")

    def _enable(self) -> None:
        # Queued invalidation first: every later invalidation goes through it (dmar_enable_qi).
        self.qi_base = self.pool.alloc()
        self.qi_status = self.pool.alloc()
        self.qi_entries = 1 << (_QI_QS + 7)
        self.qi_tail = 0
        self._w("IQT", 0)
        self._w("IQA", self.qi_base | consts.IQA.DW | _QI_QS << consts.IQA.QS_LO)
        self._gcmd(consts.GCMD.QIE, consts.GSTS.QIES)
        # TTM = 01b: scalable-mode root table.
        self._w("RTADDR", self.root.root | 1 << consts.RTADDR.TTM_LO)
        self._gcmd(consts.GCMD.SRTP, consts.GSTS.RTPS)
        if not self.chip.cfg.cap_field("ESRTPS"):
            self.submit([make_descriptor(T_CONTEXT, G=1), make_descriptor(T_PASID_CACHE, G=3),
                         make_descriptor(T_IOTLB, G=1, DR=self.drain_r, DW=self.drain_w)])
        self._w("FEDATA", _FAULT_MSI_DATA, 4)
        self._w("FEADDR", _FAULT_MSI_ADDR, 4)
        self._w("FECTL", 0, 4)
        if self.ecap_prs:
            self.prq_base = self.pool.alloc(1 << _PRQ_ORDER)
            self.prq_entries = (1 << (_PRQ_ORDER + 7))
            self._w("PQH", 0)
            self._w("PQT", 0)
            self._w("PQA", self.prq_base | _PRQ_ORDER)
            self._w("PEDATA", _PRQ_MSI_DATA, 4)
            self._w("PEADDR", _FAULT_MSI_ADDR, 4)
            self._w("PECTL", 0, 4)
        self._gcmd(consts.GCMD.TE, consts.GSTS.TES)

    # -- interrupts -------------------------------------------------------------------------------
    def _interrupt(self, irq: Interrupt) -> None:
        if irq.source == "fault":
            self._fault_handler()
        elif irq.source == "page-request":
            self.prq_handler()
        if self._chained_irq is not None:
            self._chained_irq(irq)

    def _fault_handler(self) -> None:
        """``dmar_fault``: read and clear every pending FRCD, then the overflow bit."""
        frcd = specs().register("FRCD")
        f_bit = consts.FRCD.F
        for i in range(self.nfr):
            off = self.frcd_base + 16 * i
            hi = self.chip.mmio_read(off + 8, 8)
            if not (hi << 64) & f_bit:
                continue
            d = frcd.decode(self.chip.mmio_read(off, 8) | hi << 64)
            rec = FaultRecord(d["FR"], d["SID"], d["FI"] << consts.FRCD.FI_LO, not d["T"],
                              d["PV"] if d["PP"] else None, bool(d["PRIV"]), bool(d["EXE"]))
            self.dmar_faults.append(DmarFault(rec))
            # F is RW1C in the last dword of the record.
            self.chip.mmio_write(off + 12, f_bit >> 96, 4)
        fsts = self._r("FSTS", 4)
        if fsts & consts.FSTS.PFO:
            self._w("FSTS", consts.FSTS.PFO, 4)

    # -- invalidation queue -----------------------------------------------------------------------
    def submit(self, descs: list[tuple[int, int]]) -> None:
        """``qi_submit_sync``: queue the descriptors and a wait descriptor, advance IQT, and check the
        status write (the unit processes the queue synchronously on the IQT write)."""
        if not descs:
            return
        ram = self.ram
        status_addr = self.qi_status
        ram.write(status_addr, _QI_IN_USE.to_bytes(4, "little"))
        wait = make_descriptor(T_WAIT, SW=1, FN=1, STATUS_DATA=_QI_DONE, STATUS_ADDR=status_addr)
        for qw0, qw1 in [*descs, wait]:
            self._log(qw0, qw1)
            slot = self.qi_base + self.qi_tail * 32
            ram.write(slot, (qw0 | qw1 << 64).to_bytes(32, "little"))
            self.qi_tail = (self.qi_tail + 1) % self.qi_entries
        self._w("IQT", self.qi_tail << 5)
        fsts = self._r("FSTS", 4)
        if fsts & (consts.FSTS.IQE | consts.FSTS.ITE | consts.FSTS.ICE):
            head = self._r("IQH") >> 5
            raise InternalError(f"invalidation queue error FSTS={fsts:#x} at descriptor {head}")
        if int.from_bytes(ram.read(status_addr, 4), "little") != _QI_DONE:
            raise InternalError("the wait descriptor's status was not written")

    def _log(self, qw0: int, qw1: int) -> None:
        w = consts.INV_WAIT
        t = (qw0 & w.TYPE_LO) | (qw0 & w.TYPE_HI) >> w.TYPE_HI_LO << 4
        if t == T_WAIT:
            return
        lay = specs().structure(LAYOUTS[t])
        fields = {k: v for k, v in lay.decode(qw0 | qw1 << 64).items()
                  if not k.startswith(("TYPE", "RSVD"))}
        if "ADDR" in fields:
            fields["ADDR"] <<= lay.field("ADDR").lo & 63
        self.inv_log.append(InvRecord(TYPE_NAMES[t], fields))

    def _iotlb_desc(self, did: int, addr: int, mask: int, ih: bool, dsi: bool) -> tuple[int, int]:
        if dsi:
            return make_descriptor(T_IOTLB, G=2, DID=did, DR=self.drain_r, DW=self.drain_w)
        return make_descriptor(T_IOTLB, G=3, DID=did, DR=self.drain_r, DW=self.drain_w, ADDR=addr, IH=int(ih),
                               AM=mask)

    def _piotlb_desc(self, did: int, pasid: int, addr: int, mask: int | None, ih: bool) -> tuple[int, int]:
        if mask is None or mask > self.mamv:
            return make_descriptor(T_PIOTLB, G=2, DID=did, PASID=pasid)
        return make_descriptor(T_PIOTLB, G=3, DID=did, PASID=pasid, ADDR=addr, IH=int(ih), AM=mask)

    def _devtlb_desc(self, info: DevInfo, index: int, addr: int, order: int) -> tuple[int, int]:
        a, s = _ats_addr(addr, order)
        pf = info.sid
        if index == 0:
            return make_descriptor(T_DEV_TLB, SID=info.sid, MIP=0, PFSID_LO=pf & 0xF, PFSID_HI=pf >> 4, S=s, ADDR=a)
        return make_descriptor(T_PASID_DEV_TLB, SID=info.sid, PASID=index, MIP=0, PFSID_LO=pf & 0xF,
                               PFSID_HI=pf >> 4, G=0, S=s, ADDR=a)

    def flush_range(self, domain: IntelDomain, start: int, end: int, ih: bool) -> None:
        """``cache_tag_flush_range``: every cache that may hold [start, end] of ``domain``."""
        addr, pages, mask = calculate_psi_aligned_address(start, end)
        descs: list[tuple[int, int]] = []
        if isinstance(domain, PagingDomain):
            if domain.attachments:
                dsi = not self.psi or mask > self.mamv
                descs.append(self._iotlb_desc(domain.did, addr, mask, ih, dsi))
            for info, index in sorted(domain.attachments, key=lambda t: (t[0].sid, t[1])):
                if info.ats:
                    descs.append(self._devtlb_desc(info, index, addr, mask))
            for child in domain.children:
                if not child.attachments:
                    continue
                dsi = not self.psi or mask > self.mamv
                descs.append(self._iotlb_desc(child.did, addr, mask, ih, dsi))
                for info, index in sorted(child.attachments, key=lambda t: (t[0].sid, t[1])):
                    if info.ats:
                        # What a device cached from a nested walk cannot be tied to S2 addresses.
                        descs.append(self._devtlb_desc(info, index, 0, _MAX_AGAW_PFN_WIDTH))
        else:
            seen: set[tuple[int, int]] = set()
            for info, index in sorted(domain.attachments, key=lambda t: (t[0].sid, t[1])):
                if (domain.did, index) not in seen:
                    seen.add((domain.did, index))
                    descs.append(self._piotlb_desc(domain.did, index, addr, mask, ih))
                if info.ats:
                    descs.append(self._devtlb_desc(info, index, addr, mask))
        self.submit(descs)

    def flush_all(self, domain: IntelDomain) -> None:
        """``cache_tag_flush_all``."""
        descs: list[tuple[int, int]] = []
        if isinstance(domain, PagingDomain):
            if domain.attachments:
                descs.append(self._iotlb_desc(domain.did, 0, 0, False, True))
        seen: set[tuple[int, int]] = set()
        for info, index in sorted(domain.attachments, key=lambda t: (t[0].sid, t[1])):
            if isinstance(domain, NestedDomain) and (domain.did, index) not in seen:
                seen.add((domain.did, index))
                descs.append(self._piotlb_desc(domain.did, index, 0, None, False))
            if info.ats:
                descs.append(self._devtlb_desc(info, index, 0, _MAX_AGAW_PFN_WIDTH))
        self.submit(descs)

    # -- DIDs -------------------------------------------------------------------------------------
    def _alloc_did(self) -> int:
        for did in range(_FIRST_DID, self.ndoms):
            if did not in self._dids:
                self._dids.add(did)
                return did
        raise fail(errno.ENOSPC, "no free domain ID")

    def _free_did(self, did: int) -> None:
        self._dids.discard(did)

    # -- devices ----------------------------------------------------------------------------------
    def probe_device(self, sid: int, group: int, pasid_bits: int, ats: bool, pri: bool) -> DevInfo:
        """``intel_iommu_probe_device`` + the scalable-mode context entry with its PASID table."""
        if sid in self.devices:
            raise ValueError(f"device {sid:#06x} already probed")
        max_pasids = min(1 << pasid_bits, 1 << self.pasid_bits) if pasid_bits and self.pasid_supported else 0
        ats = ats and self.ecap_dt
        pri = pri and self.ecap_prs and ats
        dir_entries = 128
        while dir_entries * 64 < max_pasids:
            dir_entries *= 2
        table = PasidTables(self.ram, self.pool, dir_entries=dir_entries)  # type: ignore[arg-type]
        info = DevInfo(sid, group, max_pasids, ats, pri, table)
        self.root.set_context(info.bus, info.devfn, pasid_dir=table.dir, pdts=table.pdts, rid_pasid=0,
                              paside=bool(max_pasids), pre=pri, dte=ats)
        if self.caching_mode:
            self.submit([make_descriptor(T_CONTEXT, G=3, SID=sid, DID=0),
                         make_descriptor(T_PASID_CACHE, G=0, DID=0),
                         make_descriptor(T_IOTLB, G=2, DID=0, DR=self.drain_r, DW=self.drain_w)])
        self.devices[sid] = info
        return info

    def release_device(self, info: DevInfo) -> None:
        """``intel_iommu_release_device``: the context entry goes, then its caches."""
        for index in list(info.domains):
            self.detach(info, index)
        self.root.clear_context(info.bus, info.devfn)
        self.submit([make_descriptor(T_CONTEXT, G=3, SID=info.sid, DID=0),
                     make_descriptor(T_PASID_CACHE, G=0, DID=0),
                     make_descriptor(T_IOTLB, G=1, DR=self.drain_r, DW=self.drain_w)])
        del self.devices[info.sid]

    # -- PASID entries ----------------------------------------------------------------------------
    def _entry_qwords(self, info: DevInfo, index: int) -> tuple[int, ...] | None:
        addr = info.pasid_table.entry_addr(index)
        if addr is None:
            return None
        return tuple(self.ram.read_u64(addr + 8 * i) for i in range(8))

    def _present(self, info: DevInfo, index: int) -> bool:
        q = self._entry_qwords(info, index)
        return q is not None and bool(q[0] & consts.PASID_ENTRY.P)

    def _program(self, info: DevInfo, index: int, domain: IntelDomain, did: int) -> None:
        extra = {"PWSNP": int(self.smpwc)}
        if isinstance(domain, PagingDomain):
            info.pasid_table.set_entry(index, pgtt=PGTT_SS, did=did, ssptptr=domain.table.root,
                                       aw=domain.table.aw, ssade=domain.dirty_tracking, extra=extra)
            return
        assert isinstance(domain, NestedDomain)
        s1, parent = domain.s1, domain.parent
        sre = bool(s1.flags & VTD_S1_SRE)
        if parent.force_snooping:
            extra["PGSNP"] = 1
        info.pasid_table.set_entry(index, pgtt=PGTT_NESTED, did=did, ssptptr=parent.table.root,
                                   aw=parent.table.aw, fsptptr=s1.pgtbl_addr & ~(PAGE_SIZE - 1) & U64_MAX,
                                   fspm=1 if s1.addr_width == 57 else 0, sre=sre,
                                   wpe=sre and bool(s1.flags & VTD_S1_WPE), eafe=bool(s1.flags & VTD_S1_EAFE),
                                   ssade=parent.dirty_tracking, extra=extra)

    def _did_pgtt(self, info: DevInfo, index: int) -> tuple[int, int]:
        q = self._entry_qwords(info, index)
        assert q is not None
        e = consts.PASID_ENTRY
        (dq, dmask), (pq, pmask) = e.qword("DID"), e.qword("PGTT")
        return (q[dq] & dmask) >> (e.DID_LO & 63), (q[pq] & pmask) >> (e.PGTT_LO & 63)

    def _flush_present(self, info: DevInfo, index: int, old_did: int) -> None:
        """``intel_pasid_flush_present``: after rewriting a present entry."""
        descs = [make_descriptor(T_PASID_CACHE, G=1, DID=old_did, PASID=index),
                 make_descriptor(T_PIOTLB, G=2, DID=old_did, PASID=index)]
        if info.ats:
            descs.append(self._devtlb_desc(info, index, 0, _MAX_AGAW_PFN_WIDTH))
        self.submit(descs)

    def _tear_down(self, info: DevInfo, index: int) -> None:
        """``intel_pasid_tear_down_entry``: P off, PASID cache, IOTLB, device TLB, entry cleared, PRQ
        drained for that PASID."""
        addr = info.pasid_table.entry_addr(index)
        assert addr is not None
        did, pgtt = self._did_pgtt(info, index)
        q0 = self.ram.read_u64(addr)
        self.ram.write_u64(addr, q0 & ~consts.PASID_ENTRY.P)
        descs = [make_descriptor(T_PASID_CACHE, G=1, DID=did, PASID=index)]
        if pgtt in (PGTT_FS, PGTT_PT):
            descs.append(make_descriptor(T_PIOTLB, G=2, DID=did, PASID=index))
        else:
            descs.append(make_descriptor(T_IOTLB, G=2, DID=did, DR=self.drain_r, DW=self.drain_w))
        if info.ats:
            descs.append(self._devtlb_desc(info, index, 0, _MAX_AGAW_PFN_WIDTH))
        self.submit(descs)
        info.pasid_table.clear_entry(index)
        self.drain_prq()

    def _set_ssade(self, info: DevInfo, index: int, enable: bool) -> None:
        """``intel_pasid_setup_dirty_tracking``."""
        addr = info.pasid_table.entry_addr(index)
        if addr is None:
            return
        ssade = consts.PASID_ENTRY.SSADE
        q0 = self.ram.read_u64(addr)
        if bool(q0 & ssade) == enable:
            return
        self.ram.write_u64(addr, q0 | ssade if enable else q0 & ~ssade)
        did, _ = self._did_pgtt(info, index)
        descs = [make_descriptor(T_PASID_CACHE, G=1, DID=did, PASID=index),
                 make_descriptor(T_IOTLB, G=2, DID=did, DR=self.drain_r, DW=self.drain_w)]
        if info.ats:
            descs.append(self._devtlb_desc(info, index, 0, _MAX_AGAW_PFN_WIDTH))
        self.submit(descs)

    # -- attach / detach --------------------------------------------------------------------------
    def check_attach(self, info: DevInfo, index: int, domain: IntelDomain) -> None:
        """Everything ``attach_dev`` / ``set_dev_pasid`` can refuse, in the driver's order, checked before
        anything changes (so a failed replace leaves the old entry working)."""
        if index:
            if not self.pasid_supported:
                raise fail(errno.EOPNOTSUPP, "the IOMMU has no PASID support")
            if isinstance(domain, PagingDomain) and domain.dirty_ops:
                raise fail(errno.EINVAL, "a dirty-tracking domain cannot be attached to a PASID")
            if isinstance(domain, NestedDomain) and domain.parent.dirty_ops:
                raise fail(errno.EINVAL, "the nest parent tracks dirty pages")
        if isinstance(domain, PagingDomain) and domain.dirty_ops and not self.ssads:
            raise fail(errno.EINVAL, "the IOMMU cannot track dirty pages")
        if domain.iopf_handler is not None and not info.pri:
            raise fail(errno.ENODEV, "the device has no PRI for a fault-capable domain")
        if isinstance(domain, NestedDomain):
            s1 = domain.s1
            if s1.addr_width == 57:
                if not self.fl5lp:
                    raise fail(errno.EINVAL, "5-level stage-1 table but no CAP.FL5LP")
            elif s1.addr_width != 48:
                raise fail(errno.EINVAL, f"stage-1 address width {s1.addr_width}")
            if s1.flags & VTD_S1_SRE and not self.ecap_srs:
                raise fail(errno.EINVAL, "SRE without ECAP.SRS")
            if s1.flags & VTD_S1_EAFE and not self.ecap_eafs:
                raise fail(errno.EINVAL, "EAFE without ECAP.EAFS")
        if index >= info.pasid_table.dir_entries * 64:
            raise fail(errno.ENODEV, "no PASID entry for that PASID")

    def attach(self, info: DevInfo, index: int, domain: IntelDomain, handle: object | None = None) -> None:
        """Program (device, PASID index) for ``domain``, replacing what was there.  Requests without
        PASID are torn down first (Linux blocks translation before a RID attach); PASID entries are
        replaced in place and the old DID flushed."""
        self.check_attach(info, index, domain)
        old = info.domains.get(index)
        if old is domain:
            return
        if info.pasid_table.entry_addr(index) is None:
            # The leaf PASID table is allocated before anything changes, so running out of memory
            # leaves the old attachment in place (Linux: intel_pasid_get_entry fails first).
            info.pasid_table.set_dir_entry(index)
        if old is not None and index == 0:
            self._tear_down(info, 0)
            old.attachments.discard((info, 0))
            old._put_did()
            old = None
        did = domain._get_did()
        domain.attachments.add((info, index))
        if old is not None:
            old_did, _ = self._did_pgtt(info, index)
            self._program(info, index, domain, did)
            self._flush_present(info, index, old_did)
            old.attachments.discard((info, index))
            old._put_did()
        else:
            if self._present(info, index):
                domain.attachments.discard((info, index))
                domain._put_did()
                raise fail(errno.EBUSY, "PASID entry already present")
            self._program(info, index, domain, did)
            if self.caching_mode:
                self._flush_present(info, index, did)
        info.domains[index] = domain
        self._update_iopf(info)

    def detach(self, info: DevInfo, index: int) -> None:
        """Back to blocked: the entry is torn down (``blocking_domain``)."""
        old = info.domains.pop(index, None)
        if old is None:
            return
        self._tear_down(info, index)
        old.attachments.discard((info, index))
        old._put_did()
        self._update_iopf(info)

    def _update_iopf(self, info: DevInfo) -> None:
        # PRI is enabled on the endpoint while a domain with a fault handler is attached (iopf_for_domain_set).
        users = sum(1 for d in info.domains.values() if d.iopf_handler is not None)
        info.iopf_users = users

    # -- page requests ----------------------------------------------------------------------------
    def prq_handler(self) -> None:
        """``prq_event_thread``: consume PQH..PQT, report each request, advance PQH, clear PRO when empty."""
        if self._in_prq:
            self._prq_again = True
            return
        self._in_prq = True
        try:
            while True:
                self._prq_again = False
                self._w("PRSTS", consts.PRSTS.PPR, 4)
                mask = self.prq_entries * 32 - 1
                tail = self._r("PQT") & mask
                head = self._r("PQH") & mask
                while head != tail:
                    raw = int.from_bytes(self.ram.read(self.prq_base + head, 32), "little")
                    self._prq_one(self._prq_layout.decode(raw))
                    head = (head + 32) & mask
                self._w("PQH", tail)
                if self._r("PRSTS", 4) & consts.PRSTS.PRO:
                    if (self._r("PQH") & mask) == (self._r("PQT") & mask):
                        self._partial.clear()
                        self._w("PRSTS", consts.PRSTS.PRO, 4)
                if not self._prq_again:
                    break
        finally:
            self._in_prq = False

    def drain_prq(self) -> None:
        """``intel_iommu_drain_pasid_prq``: nothing may stay queued for a torn-down PASID."""
        if self.ecap_prs:
            self.prq_handler()

    def _prq_one(self, d: dict[str, int]) -> None:
        addr = d["ADDR"] << (self._prq_layout.field("ADDR").lo & 63)
        pasid = d["PASID"] if d["PP"] else None
        rd, wr, last = d["RD"], d["WR"], d["LPIG"]
        if addr >> 47 not in (0, (1 << 17) - 1):
            # Not a canonical address: answered at once, nothing to fault in.
            self._bad_prq(d)
            return
        if d["PM"] and (rd or wr):
            self._bad_prq(d)
            return
        if last and not rd and not wr:
            return  # a stop marker: no response
        info = self.devices.get(d["RID"])
        if info is None:
            self._bad_prq(d)
            return
        flags = (PGFAULT_FLAGS_PASID_VALID if pasid is not None else 0) | (PGFAULT_FLAGS_LAST_PAGE if last else 0)
        perm = ((PGFAULT_PERM_READ if rd else 0) | (PGFAULT_PERM_WRITE if wr else 0)
                | (PGFAULT_PERM_EXEC if d["ER"] else 0) | (PGFAULT_PERM_PRIV if d["PM"] else 0))
        fault = IopfFault(flags, pasid or 0, d["PRGI"], perm, addr)
        handle = self.handles.get((info.group, pasid if pasid is not None else 0))
        domain = info.domains.get(pasid if pasid is not None else 0)
        if handle is None or domain is None or domain.iopf_handler is None:
            if last:
                self.page_response(info.sid, pasid, d["PRGI"], PAGE_RESP_INVALID)
            return
        if not last:
            self._partial[info.sid].append(fault)
            return
        same = [f for f in self._partial[info.sid] if f.grpid == fault.grpid]
        self._partial[info.sid] = [f for f in self._partial[info.sid] if f.grpid != fault.grpid]
        group = IopfGroup(info.sid, pasid, fault.grpid, same + [fault], handle)
        domain.iopf_handler(group)

    def _bad_prq(self, d: dict[str, int]) -> None:
        self.prq_bad += 1
        if d["LPIG"]:
            self.page_response(d["RID"], d["PASID"] if d["PP"] else None, d["PRGI"], PAGE_RESP_INVALID)

    def page_response(self, sid: int, pasid: int | None, prgi: int, code: int) -> None:
        """``intel_iommu_page_response``: a page group response descriptor (QI type 9)."""
        self.submit([make_descriptor(T_PAGE_RESPONSE, PP=int(pasid is not None), PASID=pasid or 0, RID=sid,
                                     RC=code, PRGI=prgi)])


__all__ = ["IntelIommu", "PagingDomain", "NestedDomain", "DevInfo", "IopfGroup", "IopfFault", "InvRecord",
           "DmarFault", "calculate_psi_aligned_address"]

