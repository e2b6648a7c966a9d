"""The guest's intel-iommu driver: what a Linux guest kernel does on a (virtual) VT-d unit.

:class:`GuestDriver` programs any remapping unit with ``mmio_read``/``mmio_write`` (a ``VtdIommu``, a
vIOMMU, a recorder wrapping one) and builds its tables, with the :mod:`vtd_emu.tables` builders, in a
guest-physical memory.  It follows ``drivers/iommu/intel`` closely enough that the flows are realistic:

- bring-up in ``init_dmars`` order (queued invalidation, translation left on by firmware turned off, root
  table with the global flushes ``iommu_set_root_entry`` issues unless ECAP.ESRTPS, page request queue,
  fault interrupt, translation on);
- legacy and scalable-mode attach (``domain_context_mapping_one``, ``intel_pasid_setup_*`` with
  ``pasid_flush_caches``), replace as tear-down then set-up (``intel_pasid_tear_down_entry``), SVA binds;
- map/unmap with the invalidations of ``cache_tag_flush_range`` (strict) or a flush queue drained by
  ``cache_tag_flush_all`` (lazy), caching mode's not-present → present flush (``cache_tag_flush_range_np``);
- ``qi_submit_sync`` with wait descriptors and ``qi_check_fault``'s recovery; the PRQ thread.

Tests that misbehave on purpose use the raw level: :meth:`GuestDriver.qi_submit`, the
``invalidate_*`` builders, :meth:`read_reg` / :meth:`write_reg`.  Everything the driver writes is in
:attr:`GuestDriver.log`.  Where it departs from Linux is listed in ``docs/vmm.md``, "Guest driver".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from ..errors import ConfigError, VtdEmuError
from ..host.intel import calculate_psi_aligned_address
from ..spec import consts, specs
from ..tables import (NX, PAGE_1G, PAGE_2M, PAGE_4K, PGTT_FS, PGTT_PT, PGTT_SS, FirstStageTable, LegacyRootTable,
                      PageAllocator, PasidTables, ScalableRootTable, SecondStageTable, U)
from ..vtd.qi import (LAYOUTS, T_CONTEXT, T_DEV_TLB, T_IOTLB, T_PAGE_RESPONSE, T_PASID_CACHE, T_PASID_DEV_TLB,
                      T_PIOTLB, T_WAIT, TYPE_NAMES, make_descriptor)

# Linux's choices (drivers/iommu/intel/*.h), not the spec's.
QI_FREE, QI_IN_USE, QI_DONE, QI_ABORT = 0, 1, 2, 3    # wait-descriptor status values (dmar.c)
QI_LENGTH = 256                                       # descriptors in the queue, either width
QI_MAX_BATCHED_DESC_COUNT = 16                        # qi_batch flushes when it holds this many
PRQ_ORDER = 4                                         # 16 pages: 2048 page requests
MAX_AGAW_PFN_WIDTH = 52                               # "the whole address space" AM for device TLBs
IOMMU_NO_PASID = 0                                    # requests without PASID use PASID-table index 0
FLPT_DEFAULT_DID = 1                                  # the identity (pass-through) domain's DID
IDA_START_DID = 2                                     # first DID handed to paging domains
RESP_SUCCESS, RESP_INVALID, RESP_FAILURE = 0, 1, 0xF  # page group response codes (spec)
_MSI_ADDR = 0xFEE0_0000                               # the guest's local-APIC MSI window
_FAULT_VECTOR, _PRQ_VECTOR = 0x40, 0x41
_POLL_LIMIT = 4                                       # status polls before giving up on a queue


class Mmio(Protocol):
    """A remapping unit's register block."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, value: int, size: int) -> Any: ...


class GuestMemory(Protocol):
    """Guest-physical memory: the builders' memory protocol."""

    def read_u64(self, addr: int) -> int: ...

    def write_u64(self, addr: int, value: int) -> bool: ...

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> int: ...


class GuestDriverError(VtdEmuError, ValueError):
    """A request the guest driver refuses, as Linux's would (an API misuse, not guest-visible behaviour):
    an overlapping map, an IOVA still waiting in the lazy flush queue, a mode the unit lacks."""


@dataclass(frozen=True)
class GuestAction:
    """One thing the driver did to the unit: a register write (``kind="write"``, ``name`` the register) or
    a descriptor placed in the invalidation queue (``kind="desc"``, ``name`` its type, ``fields`` decoded
    with the spec layout's names, addresses in place)."""

    kind: str
    name: str
    offset: int
    value: int
    size: int
    fields: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class QiResult:
    """How one :meth:`GuestDriver.qi_submit` ended.  ``error`` is the FSTS error seen ("IQE", "ITE",
    "ICE") or None; ``head`` the descriptor index IQH pointed at when it was seen; ``iqei`` IQERCD.IQEI
    for an IQE; ``recovered`` whether the driver cleared it the way ``qi_check_fault`` does."""

    completed: bool
    error: str | None = None
    fsts: int = 0
    head: int | None = None
    iqei: int = 0
    recovered: bool = False


@dataclass(frozen=True)
class PageRequest:
    """A page request descriptor read from the page request queue."""

    sid: int
    addr: int
    pasid: int | None
    read: bool
    write: bool
    exe: bool
    priv: bool
    last: bool
    prgi: int
    private_data: int | None


@dataclass(eq=False)
class Domain:
    """A guest domain: its DID on this unit, its page table (None for pass-through), what is attached
    (``(sid, pasid)`` with pasid 0 for requests without PASID) and Linux's cache tags."""

    did: int
    kind: str
    table: SecondStageTable | FirstStageTable | None
    devices: list[tuple[int, int]] = field(default_factory=list)
    # ("iotlb", did, pasid) and ("devtlb", sid, pasid), in assignment order (cache_tag_assign).
    tags: list[tuple[str, int, int]] = field(default_factory=list)
    lazy_ranges: list[tuple[int, int]] = field(default_factory=list)


@dataclass(eq=False)
class _Device:
    sid: int
    ats: bool = False
    pri: bool = False
    pasid_table: PasidTables | None = None
    context: bool = False
    # PASID index -> the domain there (a bind is a Domain of kind "sva" without a table of ours).
    attached: dict[int, Domain] = field(default_factory=dict)


_Desc = tuple[int, ...]


def _off(name: str) -> int:
    o = specs().register(name).offset
    assert o is not None, name
    return o


def _reg_size(name: str) -> int:
    return specs().register(name).size_bits // 8


class GuestDriver:
    """Linux's intel-iommu driver for one (virtual) remapping unit, running in the guest."""

    def __init__(self, iommu: Mmio, mem: GuestMemory, *, alloc_base: int, alloc_limit: int,
                 strict: bool = True, scalable: bool | None = None, qi: bool = True,
                 lazy_batch: int = 250) -> None:
        if lazy_batch < 1:
            raise ConfigError(f"lazy_batch must be >= 1, got {lazy_batch}")
        self.iommu = iommu
        self.mem = mem
        self.alloc = PageAllocator(mem, alloc_base, alloc_limit)  # type: ignore[arg-type]
        self.lazy_batch = lazy_batch
        self.log: list[GuestAction] = []
        C, E = consts.CAP, consts.ECAP
        self.cap = cap = iommu.mmio_read(_off("CAP"), 8)
        self.ecap = ecap = iommu.mmio_read(_off("ECAP"), 8)

        def capf(name: str) -> int:
            return (cap & getattr(C, name)) >> getattr(C, name + "_LO")

        def ecapf(name: str) -> int:
            return (ecap & getattr(E, name)) >> getattr(E, name + "_LO")

        self._capf, self._ecapf = capf, ecapf
        self.cm = bool(capf("CM"))
        self.rwbf = bool(capf("RWBF"))
        self.psi = bool(capf("PSI"))
        self.mamv = capf("MAMV")
        self.drain_r, self.drain_w = capf("DRD"), capf("DWD")
        self.ndoms = 1 << (4 + 2 * capf("ND"))
        self.frcd_base = capf("FRO") * 16
        self.nfr = capf("NFR") + 1
        self.iro = ecapf("IRO") * 16
        self.qi = qi and bool(ecapf("QI"))
        smts = bool(ecapf("SMTS"))
        if scalable is None:
            # Linux drops scalable mode when the unit cannot queue invalidations.
            scalable = smts and self.qi
        elif scalable and not (smts and self.qi):
            raise ConfigError("scalable mode needs ECAP.SMTS and queued invalidation "
                              f"(SMTS={int(smts)}, QI={int(self.qi)})")
        self.scalable = scalable
        self.flts = scalable and bool(ecapf("FLTS"))
        self.slts = not scalable or bool(ecapf("SLTS"))
        self.pasid_bits = ecapf("PSS") + 1 if scalable and ecapf("PASID") else 0
        self.ats_ok = self.qi and bool(ecapf("DT"))
        self.prs = bool(ecapf("PRS"))
        self.pri_ok = scalable and self.prs
        sagaw = capf("SAGAW")
        # iommu->agaw (__iommu_calculate_agaw): the deepest second-stage table SAGAW offers, up to 5 levels.
        self.agaw = max((a for a in (1, 2, 3) if sagaw >> a & 1), default=2)
        # Caching mode with second-stage DMA domains disallows batching (intel_iommu_init).
        first_level_default = self.flts
        self.strict = strict or (self.cm and not first_level_default)
        self.gcmd = 0
        self.te = False
        self._dids: set[int] = set()
        self.devices: dict[int, _Device] = {}
        self.root: LegacyRootTable | ScalableRootTable | None = None
        self.qi_base = self.qi_status = 0
        self.qi_tail = 0
        self.qi_shift = 5 if scalable else 4
        self.prq_base = 0
        self.prq_mask = 0
        self._groups: dict[tuple[int, int | None, int], list[int]] = {}
        self._pr_layout = specs().structure("page_request")

    # -- raw register level ------------------------------------------------------------------------
    def reg_offset(self, name: str) -> int:
        """The register's offset on this unit (IVA/IOTLB at ECAP.IRO, FRCD at CAP.FRO)."""
        if name == "IVA":
            return self.iro
        if name == "IOTLB":
            return self.iro + 8
        if name == "FRCD":
            return self.frcd_base
        return _off(name)

    def read_reg(self, name: str) -> int:
        return self.iommu.mmio_read(self.reg_offset(name), _reg_size(name) if name != "FRCD" else 8)

    def write_reg(self, name: str, value: int, size: int | None = None) -> None:
        self._w(name, value, size)

    def _w(self, name: str, value: int, size: int | None = None, offset: int | None = None) -> None:
        n = size if size is not None else min(8, _reg_size(name))
        o = self.reg_offset(name) if offset is None else offset
        self.log.append(GuestAction("write", name, o, value, n))
        self.iommu.mmio_write(o, value, n)

    def _r(self, name: str, size: int = 4) -> int:
        return self.iommu.mmio_read(self.reg_offset(name), size)

    def _wait_gsts(self, bit: int, set_: bool) -> bool:
        # IOMMU_WAIT_OP: the emulated unit answers at once; a unit that never does is reported by False.
        for _ in range(_POLL_LIMIT):
            if bool(self._r("GSTS") & bit) == set_:
                return True
        return False

    def _gcmd_oneshot(self, command: int, status: int, done_when_set: bool) -> bool:
        self._w("GCMD", self.gcmd | command, 4)
        return self._wait_gsts(status, done_when_set)

    # -- bring-up ----------------------------------------------------------------------------------
    def init(self, *, enable_translation: bool = True) -> None:
        """Bring the unit up as ``intel_iommu_init`` / ``init_dmars`` do."""
        G, S = consts.GCMD, consts.GSTS
        gsts = self._r("GSTS")
        # alloc_iommu: the command shadow starts from what firmware left enabled.
        for st, cmd in ((S.IRES, G.IRE), (S.TES, G.TE), (S.QIES, G.QIE)):
            if gsts & st:
                self.gcmd |= cmd
        if self.qi:
            self.service_faults()
            self._disable_qi()
            self._enable_qi()
        if self._r("GSTS") & S.TES:
            self._set_te(False)
        self.root = ScalableRootTable(self.mem, self.alloc) if self.scalable else LegacyRootTable(self.mem, self.alloc)  # type: ignore[arg-type]
        self.flush_write_buffer()
        self._set_root_entry()
        self.flush_write_buffer()
        if self.prs:
            self._enable_prq()
        self._set_fault_interrupt()
        if enable_translation:
            self._set_te(True)
            self._disable_pmr()

    def _disable_qi(self) -> None:
        # dmar_disable_qi: only if firmware left it on; wait for the queue to drain first.
        if not self._r("GSTS") & consts.GSTS.QIES:
            return
        for _ in range(_POLL_LIMIT):
            if self._r("IQT", 8) == self._r("IQH", 8):
                break
        self.gcmd &= ~consts.GCMD.QIE
        self._w("GCMD", self.gcmd, 4)
        self._wait_gsts(consts.GSTS.QIES, False)

    def _enable_qi(self) -> None:
        """``__dmar_enable_qi``: IQT=0, IQA (DW and QS=1 in scalable mode), GCMD.QIE, wait QIES."""
        pages = 2 if self.scalable else 1
        if not self.qi_base:
            # Page allocations of order n are naturally aligned (the buddy allocator), as below.
            self.qi_base = self.alloc.alloc(pages, align=pages * PAGE_4K)
            self.qi_status = self.alloc.alloc()
        self.qi_tail = 0
        iqa = self.qi_base
        if self.scalable:
            iqa |= consts.IQA.DW | 1 << consts.IQA.QS_LO
        self._w("IQT", 0, 4)
        self._w("IQA", iqa, 8)
        self.gcmd |= consts.GCMD.QIE
        self._w("GCMD", self.gcmd, 4)
        self._wait_gsts(consts.GSTS.QIES, True)

    def _set_te(self, on: bool) -> None:
        if on:
            self.gcmd |= consts.GCMD.TE
        else:
            self.gcmd &= ~consts.GCMD.TE
        self._w("GCMD", self.gcmd, 4)
        self._wait_gsts(consts.GSTS.TES, on)
        self.te = on

    def _set_root_entry(self) -> None:
        """``iommu_set_root_entry``."""
        assert self.root is not None
        addr = self.root.root
        if self.scalable:
            addr |= 1 << consts.RTADDR.TTM_LO
        self._w("RTADDR", addr, 8)
        self._gcmd_oneshot(consts.GCMD.SRTP, consts.GSTS.RTPS, True)
        if self._capf("ESRTPS"):
            return  # the unit invalidates its caches as part of SRTP
        self.flush_context(0, 0, 0, 1)
        if self.scalable:
            self.qi_submit([self.invalidate_pasid_cache(3)])
        self.flush_iotlb(0, 0, 0, 1)

    def _enable_prq(self) -> None:
        """``intel_iommu_enable_prq``: the interrupt is set up, then PQH, PQT, PQA."""
        self.prq_base = self.alloc.alloc(1 << PRQ_ORDER, align=PAGE_4K << PRQ_ORDER)
        self.prq_mask = (PAGE_4K << PRQ_ORDER) - 32
        self._w("PEDATA", _PRQ_VECTOR, 4)
        self._w("PEADDR", _MSI_ADDR, 4)
        self._w("PEUADDR", 0, 4)
        self._w("PECTL", 0, 4)
        self._w("PQH", 0, 8)
        self._w("PQT", 0, 8)
        self._w("PQA", self.prq_base | PRQ_ORDER, 8)

    def _set_fault_interrupt(self) -> None:
        """``dmar_set_interrupt``: the MSI message, unmasked, then pending faults cleared."""
        self._w("FEDATA", _FAULT_VECTOR, 4)
        self._w("FEADDR", _MSI_ADDR, 4)
        self._w("FEUADDR", 0, 4)
        self._w("FECTL", 0, 4)
        self.service_faults()

    def _disable_pmr(self) -> None:
        """``iommu_disable_protect_mem_regions``."""
        if not (self._capf("PLMR") or self._capf("PHMR")):
            return
        pmen = self._r("PMEN")
        self._w("PMEN", pmen & ~consts.PMEN.EPM, 4)

    def flush_write_buffer(self) -> None:
        """``iommu_flush_write_buffer``: only on units that ask for it (CAP.RWBF)."""
        if not self.rwbf:
            return
        self._gcmd_oneshot(consts.GCMD.WBF, consts.GSTS.WBFS, False)

    # -- faults ------------------------------------------------------------------------------------
    def service_faults(self) -> list[dict[str, int]]:
        """``dmar_fault``: read and clear the pending fault records (decoded FRCDs), then the overflow."""
        fsts = self._r("FSTS")
        out: list[dict[str, int]] = []
        F = consts.FSTS
        if not fsts & F.PPF:
            return out
        frcd = specs().register("FRCD")
        f_bit = consts.FRCD.F >> 96
        index = (fsts & F.FRI) >> F.FRI_LO
        for _ in range(self.nfr):
            off = self.frcd_base + 16 * index
            hi = self.iommu.mmio_read(off + 12, 4)
            if not hi & f_bit:
                break
            raw = self.iommu.mmio_read(off, 8) | self.iommu.mmio_read(off + 8, 8) << 64
            out.append(frcd.decode(raw))
            self._w("FRCD", f_bit, 4, off + 12)
            index = (index + 1) % self.nfr
        self._w("FSTS", F.PFO | F.PPF | F.PRO, 4)
        return out

    # -- queued invalidation -----------------------------------------------------------------------
    def _slot_bytes(self) -> int:
        return 1 << self.qi_shift

    def _log_desc(self, slot: int, qs: _Desc) -> None:
        t = (qs[0] & 0xF) | ((qs[0] >> 5) & 0x70)
        value = sum(q << (64 * i) for i, q in enumerate(qs[:2]))
        name = TYPE_NAMES.get(t, f"type-{t}")
        fields: dict[str, int] = {}
        if t in LAYOUTS:
            lay = specs().structure(LAYOUTS[t])
            fields = {k: v for k, v in lay.decode(value).items() if not k.startswith(("TYPE", "RSVD"))}
            for a in ("ADDR", "STATUS_ADDR"):
                if a in fields:
                    fields[a] <<= lay.field(a).lo & 63
        self.log.append(GuestAction("desc", name, slot, value, self._slot_bytes(), fields))

    def _put_desc(self, index: int, qs: _Desc) -> None:
        width = self._slot_bytes()
        if len(qs) * 8 > width:
            raise GuestDriverError(f"a {len(qs) * 64}-bit descriptor does not fit {width * 8}-bit slots")
        addr = self.qi_base + (index << self.qi_shift)
        data = b"".join(q.to_bytes(8, "little") for q in qs).ljust(width, b"\0")
        self.mem.write(addr, data)
        self._log_desc(addr, qs)

    def _status(self, index: int) -> int:
        return int.from_bytes(self.mem.read(self.qi_status + 4 * index, 4), "little")

    def _set_status(self, index: int, value: int) -> None:
        self.mem.write(self.qi_status + 4 * index, value.to_bytes(4, "little"))

    def qi_submit(self, descs: Sequence[_Desc], *, wait: bool = True, drain: bool = False) -> QiResult:
        """``qi_submit_sync``: place ``descs`` at the tail (plus a wait descriptor writing QI_DONE to its
        status slot, with PD=1 if ``drain``: QI_OPT_WAIT_DRAIN), advance IQT and poll the status,
        handling errors as ``qi_check_fault`` does.  Never raises for what the unit does; returns how it
        ended."""
        if not self.qi or not self.qi_base:
            raise GuestDriverError("queued invalidation is not enabled (init() with qi=True first)")
        if len(descs) + 1 >= QI_LENGTH:
            raise GuestDriverError(f"{len(descs)} descriptors do not fit a {QI_LENGTH}-entry queue")
        index = self.qi_tail
        n = len(descs)
        for i, d in enumerate(descs):
            slot = (index + i) % QI_LENGTH
            self._set_status(slot, QI_IN_USE)
            self._put_desc(slot, tuple(d))
        wait_index = (index + n) % QI_LENGTH
        wait_desc: _Desc = ()
        if wait:
            self._set_status(wait_index, QI_IN_USE)
            wait_desc = make_descriptor(T_WAIT, SW=1, PD=int(drain), STATUS_DATA=QI_DONE,
                                        STATUS_ADDR=self.qi_status + 4 * wait_index)
            self._put_desc(wait_index, wait_desc)
            n += 1
        self.qi_tail = (index + n) % QI_LENGTH
        self._w("IQT", self.qi_tail << self.qi_shift, 4)
        if not wait:
            fsts = self._r("FSTS")
            return self._result(fsts, self._r("IQH", 8) >> self.qi_shift == self.qi_tail)
        members = {(index + i) % QI_LENGTH for i in range(n)}
        result: QiResult | None = None
        for _ in range(_POLL_LIMIT):
            if self._status(wait_index) == QI_DONE:
                break
            result = self._check_fault(members, wait_index, wait_desc)
            if result is not None:
                break
        done = self._status(wait_index) == QI_DONE
        for i in members:
            self._set_status(i, QI_FREE)
        if result is None:
            return QiResult(completed=done, fsts=self._r("FSTS"))
        return result

    def _result(self, fsts: int, done: bool) -> QiResult:
        F = consts.FSTS
        err = "IQE" if fsts & F.IQE else "ITE" if fsts & F.ITE else "ICE" if fsts & F.ICE else None
        return QiResult(completed=done and err is None, error=err, fsts=fsts)

    def _check_fault(self, members: set[int], wait_index: int, wait_desc: _Desc) -> QiResult | None:
        """``qi_check_fault``: None to keep polling, else how the submission ended."""
        F = consts.FSTS
        fsts = self._r("FSTS")
        if fsts & F.IQE:
            head = (self._r("IQH", 8) >> self.qi_shift) % QI_LENGTH
            iqei = (self._r("IQERCD", 8) & consts.IQERCD.IQEI) >> consts.IQERCD.IQEI_LO
            if head in members:
                # The bad descriptor is overwritten with this submission's wait descriptor, IQE cleared:
                # the unit resumes at IQH and completes the rest.
                self._put_desc(head, wait_desc)
                self._w("FSTS", F.IQE, 4)
                return QiResult(False, "IQE", fsts, head, iqei, True)
            return QiResult(False, "IQE", fsts, head, iqei, False)
        if fsts & F.ITE:
            head = (self._r("IQH", 8) >> self.qi_shift) % QI_LENGTH
            self._w("FSTS", F.ITE, 4)
            # Pending waits were aborted; Linux would resubmit (-EAGAIN), the caller decides here.
            for i in members:
                if self._status(i) == QI_IN_USE:
                    self._set_status(i, QI_ABORT)
            return QiResult(False, "ITE", fsts, head, 0, True)
        if fsts & F.ICE:
            self._w("FSTS", F.ICE, 4)
            if self._status(wait_index) == QI_DONE:
                return QiResult(True, "ICE", fsts, None, 0, True)
        return None

    def _sync(self, descs: Sequence[_Desc]) -> None:
        """Submit as ``qi_batch`` does: up to 16 descriptors per ``qi_submit_sync``."""
        for i in range(0, len(descs), QI_MAX_BATCHED_DESC_COUNT):
            self.qi_submit(descs[i:i + QI_MAX_BATCHED_DESC_COUNT])

    # descriptor builders (names from the spec layouts)
    def invalidate_context(self, g: int, did: int = 0, sid: int = 0, fm: int = 0) -> _Desc:
        return make_descriptor(T_CONTEXT, G=g, DID=did, SID=sid, FM=fm)

    def invalidate_iotlb(self, g: int, did: int = 0, addr: int = 0, am: int = 0, ih: bool = False) -> _Desc:
        return make_descriptor(T_IOTLB, G=g, DID=did, DR=self.drain_r, DW=self.drain_w, ADDR=addr, AM=am, IH=int(ih))

    def invalidate_piotlb(self, g: int, did: int, pasid: int, addr: int = 0, am: int = 0,
                          ih: bool = False) -> _Desc:
        return make_descriptor(T_PIOTLB, G=g, DID=did, PASID=pasid, ADDR=addr, AM=am, IH=int(ih))

    def invalidate_pasid_cache(self, g: int, did: int = 0, pasid: int = 0) -> _Desc:
        return make_descriptor(T_PASID_CACHE, G=g, DID=did, PASID=pasid)

    def invalidate_devtlb(self, sid: int, addr: int, mask: int, pasid: int | None = None,
                          pfsid: int | None = None) -> _Desc:
        """``qi_desc_dev_iotlb`` / ``qi_desc_dev_iotlb_pasid``: 2**mask pages at ``addr`` (ATS size
        encoding: S=1 and the low address bits up to the size set, the top one clear)."""
        if mask:
            addr = (addr | ((1 << (12 + mask - 1)) - 1)) & ~0xFFF & ((1 << 64) - 1)
        s = int(bool(mask))
        pf = sid if pfsid is None else pfsid
        if pasid is None:
            return make_descriptor(T_DEV_TLB, SID=sid, PFSID_LO=pf & 0xF, PFSID_HI=pf >> 4, S=s, ADDR=addr)
        return make_descriptor(T_PASID_DEV_TLB, SID=sid, PASID=pasid, PFSID_LO=pf & 0xF, PFSID_HI=pf >> 4,
                               S=s, ADDR=addr)

    # register-or-queue flushes (iommu->flush.flush_context / flush_iotlb)
    def flush_context(self, did: int, sid: int, fm: int, g: int) -> None:
        """Context-cache invalidation; g: 1 global, 2 domain, 3 device."""
        if self.qi:
            self.qi_submit([self.invalidate_context(g, did, sid, fm)])
            return
        C = consts.CCMD
        val = C.ICC | g << C.CIRG_LO | did << C.DID_LO | sid << C.SID_LO | fm << C.FM_LO
        self._w("CCMD", val, 8)
        for _ in range(_POLL_LIMIT):
            if not self._r("CCMD", 8) & C.ICC:
                break

    def flush_iotlb(self, did: int, addr: int, am: int, g: int, ih: bool = False) -> None:
        """IOTLB invalidation; g: 1 global, 2 domain, 3 page-selective."""
        if self.qi:
            self.qi_submit([self.invalidate_iotlb(g, did, addr, am, ih)])
            return
        self._register_iotlb(did, addr, am, g, ih)

    def _register_iotlb(self, did: int, addr: int, am: int, g: int, ih: bool) -> None:
        """``__iommu_flush_iotlb``: IVA for page-selective, then the IOTLB register, wait IVT."""
        T = consts.IOTLB
        if g == 3:
            V = consts.IVA
            self._w("IVA", addr | am << V.AM_LO | int(ih) << V.IH_LO, 8)
        val = T.IVT | g << T.IIRG_LO | did << T.DID_LO | self.drain_r << T.DR_LO | self.drain_w << T.DW_LO
        self._w("IOTLB", val, 8)
        for _ in range(_POLL_LIMIT):
            if not self._r("IOTLB", 8) & T.IVT:
                break

    # -- domains -----------------------------------------------------------------------------------
    def _alloc_did(self) -> int:
        for did in range(IDA_START_DID, self.ndoms):
            if did not in self._dids:
                self._dids.add(did)
                return did
        raise GuestDriverError(f"no free domain ID below {self.ndoms}")

    def domain_alloc(self, kind: str = "ss", *, levels: int | None = None) -> Domain:
        """A paging domain ("ss" second stage, "fs" first stage) or the identity domain ("pt")."""
        if kind == "pt":
            return Domain(FLPT_DEFAULT_DID, "pt", None)
        if kind == "ss":
            if not self.slts:
                raise GuestDriverError("the unit has no second-stage translation (ECAP.SLTS)")
            table: SecondStageTable | FirstStageTable = SecondStageTable(
                self.mem, self.alloc, levels=levels or self.agaw + 2)  # type: ignore[arg-type]
        elif kind == "fs":
            if not self.flts:
                raise GuestDriverError("first-stage domains need scalable mode with ECAP.FLTS")
            lv = levels or 4
            if lv == 5 and not self._capf("FL5LP"):
                raise GuestDriverError("5-level first stage without CAP.FL5LP")
            table = FirstStageTable(self.mem, self.alloc, levels=lv)  # type: ignore[arg-type]
        else:
            raise GuestDriverError(f"domain kind {kind!r}: expected 'ss', 'fs' or 'pt'")
        return Domain(self._alloc_did(), kind, table)

    def _device(self, sid: int, ats: bool, pri: bool) -> _Device:
        if not 0 <= sid <= 0xFFFF:
            raise GuestDriverError(f"source id {sid:#x} is not 16 bits")
        dev = self.devices.get(sid)
        if dev is None:
            dev = self.devices[sid] = _Device(sid)
        if ats and not self.ats_ok:
            raise GuestDriverError("ATS needs ECAP.DT and queued invalidation")
        if pri and not (self.pri_ok and ats):
            raise GuestDriverError("PRI needs scalable mode with ECAP.PRS and ATS")
        dev.ats = dev.ats or ats
        dev.pri = dev.pri or pri
        return dev

    def _tag_assign(self, domain: Domain, dev: _Device, pasid: int) -> None:
        """``__cache_tag_assign_domain``: an IOTLB tag per (DID, PASID), a device-TLB tag per ATS device."""
        t = ("iotlb", domain.did, pasid)
        if t not in domain.tags:
            domain.tags.append(t)
        if dev.ats:
            domain.tags.append(("devtlb", dev.sid, pasid))
        domain.devices.append((dev.sid, pasid))

    def _tag_unassign(self, domain: Domain, dev: _Device, pasid: int) -> None:
        domain.devices.remove((dev.sid, pasid))
        if dev.ats:
            domain.tags.remove(("devtlb", dev.sid, pasid))
        if not any(p == pasid for _, p in domain.devices):
            domain.tags.remove(("iotlb", domain.did, pasid))

    def attach_device(self, sid: int, domain: Domain, *, pasid: int | None = None, pri: bool = False,
                      ats: bool = False) -> None:
        """Attach ``sid`` (or its ``pasid``) to ``domain``, replacing what was attached there."""
        if domain.kind == "sva":
            raise GuestDriverError("SVA domains are attached with bind_pasid")
        if not self.scalable:
            if pasid not in (None, IOMMU_NO_PASID):
                raise GuestDriverError("PASIDs need scalable mode")
            self._attach_legacy(self._device(sid, ats, pri), domain)
            return
        index = IOMMU_NO_PASID if pasid is None else pasid
        dev = self._device(sid, ats, pri)
        self._check_pasid(index)
        self._sm_context(dev)
        self._set_pasid_entry(dev, index, domain)

    def _check_pasid(self, index: int) -> None:
        if index and not 0 < index < 1 << self.pasid_bits:
            raise GuestDriverError(f"PASID {index:#x} is beyond the unit's {self.pasid_bits}-bit PASIDs")

    def _attach_legacy(self, dev: _Device, domain: Domain) -> None:
        """``domain_context_mapping_one``, after ``device_block_translation`` for a replace."""
        if dev.attached.get(0) is domain:
            return
        if 0 in dev.attached:
            self._detach_legacy(dev)
        if domain.kind == "fs":
            raise GuestDriverError("legacy mode has no first-stage domains")
        assert isinstance(self.root, LegacyRootTable)
        bus, devfn = dev.sid >> 8, dev.sid & 0xFF
        if domain.kind == "pt":
            if not self._ecapf("PT"):
                raise GuestDriverError("pass-through needs ECAP.PT")
            self.root.set_context(bus, devfn, tt=2, aw=self.agaw, did=domain.did)
        else:
            assert domain.table is not None
            tt = 1 if dev.ats else 0
            self.root.set_context(bus, devfn, slptptr=domain.table.root, aw=domain.table.levels - 2,
                                  did=domain.did, tt=tt)
        dev.attached[0] = domain
        self._tag_assign(domain, dev, 0)
        if self.cm:
            self.flush_context(0, dev.sid, 0, 3)
            self.flush_iotlb(domain.did, 0, 0, 2)
        else:
            self.flush_write_buffer()

    def _detach_legacy(self, dev: _Device) -> None:
        """``domain_context_clear_one`` + ``intel_context_flush_no_pasid`` (legacy half)."""
        domain = dev.attached.pop(0)
        assert isinstance(self.root, LegacyRootTable)
        self.root.clear_context(dev.sid >> 8, dev.sid & 0xFF)
        self.flush_context(domain.did, dev.sid, 0, 3)
        self.flush_iotlb(domain.did, 0, 0, 2)
        if dev.ats and self.te:
            self.qi_submit([self.invalidate_devtlb(dev.sid, 0, MAX_AGAW_PFN_WIDTH)])
        self._tag_unassign(domain, dev, 0)

    def _sm_context(self, dev: _Device) -> None:
        """``device_pasid_table_setup``: the device's PASID table and scalable-mode context entry."""
        if dev.context:
            return
        assert isinstance(self.root, ScalableRootTable)
        max_pasids = 1 << max(self.pasid_bits, 1)
        dir_entries = max(128, min(1 << 14, max_pasids // PasidTables.TABLE_ENTRIES))
        dev.pasid_table = PasidTables(self.mem, self.alloc, dir_entries=dir_entries)  # type: ignore[arg-type]
        self.root.set_context(dev.sid >> 8, dev.sid & 0xFF, pasid_dir=dev.pasid_table.dir,
                              pdts=dev.pasid_table.pdts, rid_pasid=IOMMU_NO_PASID, paside=bool(self.pasid_bits),
                              pre=dev.pri, dte=dev.ats)
        dev.context = True
        if self.cm:
            self.flush_context(0, dev.sid, 0, 3)
            self.flush_iotlb(0, 0, 0, 2)
        else:
            self.flush_write_buffer()

    def _set_pasid_entry(self, dev: _Device, index: int, domain: Domain, *, fs_root: int = 0,
                         fspm: int = 0, sre: bool = False, wpe: bool = False, eafe: bool = False) -> None:
        """``intel_pasid_setup_{second_level,first_level,pass_through}`` after tearing down what was
        there (Linux's replace), then ``pasid_flush_caches``."""
        if dev.attached.get(index) is domain:
            return
        if index in dev.attached:
            self._tear_down(dev, index)
        pt = dev.pasid_table
        assert pt is not None
        extra = {"PWSNP": self._ecapf("SMPWC")}
        if domain.kind == "ss":
            assert domain.table is not None
            pt.set_entry(index, pgtt=PGTT_SS, did=domain.did, ssptptr=domain.table.root,
                         aw=domain.table.levels - 2, extra=extra)
        elif domain.kind == "pt":
            pt.set_entry(index, pgtt=PGTT_PT, did=domain.did, aw=self.agaw, extra=extra)
        else:
            if domain.kind == "fs":
                assert isinstance(domain.table, FirstStageTable)
                fs_root, fspm = domain.table.root, domain.table.fspm
            pt.set_entry(index, pgtt=PGTT_FS, did=domain.did, aw=self.agaw, fsptptr=fs_root, fspm=fspm,
                         sre=sre, wpe=wpe, eafe=eafe, extra=extra)
        dev.attached[index] = domain
        self._tag_assign(domain, dev, index)
        if self.cm:
            self.qi_submit([self.invalidate_pasid_cache(1, domain.did, index)])
            self.qi_submit([self.invalidate_piotlb(2, domain.did, index)])
        else:
            self.flush_write_buffer()

    def _tear_down(self, dev: _Device, index: int) -> None:
        """``intel_pasid_tear_down_entry``: P cleared, PASID cache, IOTLB by PGTT, device TLB, entry
        cleared."""
        domain = dev.attached.pop(index)
        pt = dev.pasid_table
        assert pt is not None
        addr = pt.entry_addr(index)
        assert addr is not None
        q0 = self.mem.read_u64(addr)
        self.mem.write_u64(addr, q0 & ~consts.PASID_ENTRY.P)
        self.qi_submit([self.invalidate_pasid_cache(1, domain.did, index)])
        if domain.kind in ("fs", "pt", "sva"):
            self.qi_submit([self.invalidate_piotlb(2, domain.did, index)])
        else:
            self.qi_submit([self.invalidate_iotlb(2, domain.did)])
        if dev.ats and self.te:
            p = None if index == IOMMU_NO_PASID else index
            self.qi_submit([self.invalidate_devtlb(dev.sid, 0, 64 - 12, pasid=p)])
        pt.clear_entry(index)
        self._tag_unassign(domain, dev, index)
        if dev.pri:
            self._drain_prq(dev, index, domain.did)

    def _drain_prq(self, dev: _Device, index: int, did: int) -> None:
        """``intel_iommu_drain_pasid_prq``: a fenced wait, the IOTLB and device TLB of the PASID, and a
        wait with PD=1 that completes only once the unit has drained its page requests.  (Linux first
        waits for its PRQ thread to consume queued requests of the PASID and retries while PRSTS.PRO is
        set; here the caller services the queue with :meth:`service_prq`.)"""
        fence = make_descriptor(T_WAIT, FN=1, STATUS_DATA=QI_DONE)
        if index == IOMMU_NO_PASID:
            flush = [self.invalidate_iotlb(2, did), self.invalidate_devtlb(dev.sid, 0, MAX_AGAW_PFN_WIDTH)]
        else:
            flush = [self.invalidate_piotlb(2, did, index),
                     self.invalidate_devtlb(dev.sid, 0, MAX_AGAW_PFN_WIDTH, pasid=index)]
        self.qi_submit([fence, *flush], drain=True)

    def detach_device(self, sid: int, *, pasid: int | None = None) -> None:
        """Back to blocking: the context entry (legacy) or the PASID entry (scalable) torn down."""
        dev = self.devices.get(sid)
        index = IOMMU_NO_PASID if pasid is None else pasid
        if dev is None or index not in dev.attached:
            raise GuestDriverError(f"device {sid:#06x} PASID {index:#x} is not attached")
        if self.scalable:
            self._tear_down(dev, index)
        else:
            self._detach_legacy(dev)

    # -- vSVA --------------------------------------------------------------------------------------
    def bind_pasid(self, sid: int, pasid: int, fs_root: int, *, levels: int = 4, sre: bool = False,
                   wpe: bool = False, eafe: bool = False, did: int | None = None) -> Domain:
        """``intel_svm_set_dev_pasid``: a first-stage PASID entry for a process's table at ``fs_root``."""
        if not self.flts:
            raise GuestDriverError("binds need scalable mode with first-stage translation (ECAP.FLTS)")
        if levels not in (4, 5) or (levels == 5 and not self._capf("FL5LP")):
            raise GuestDriverError(f"{levels}-level first stage is not supported by this unit")
        if not pasid:
            raise GuestDriverError("PASID 0 is RID_PASID; bind a process to a PASID above 0")
        self._check_pasid(pasid)
        dev = self._device(sid, False, False)
        self._sm_context(dev)
        domain = Domain(self._alloc_did() if did is None else did, "sva", None)
        self._set_pasid_entry(dev, pasid, domain, fs_root=fs_root, fspm=int(levels == 5), sre=sre, wpe=wpe,
                              eafe=eafe)
        return domain

    def unbind_pasid(self, sid: int, pasid: int) -> None:
        """``intel_pasid_tear_down_entry`` for the bound PASID."""
        dev = self.devices.get(sid)
        if dev is None or pasid not in dev.attached or dev.attached[pasid].kind != "sva":
            raise GuestDriverError(f"device {sid:#06x} PASID {pasid:#x} is not bound")
        domain = dev.attached[pasid]
        self._tear_down(dev, pasid)
        if not domain.devices:
            self._dids.discard(domain.did)

    def flush_sva_range(self, domain: Domain, va: int, size: int) -> None:
        """What the mm notifier does when a bound process's mapping changes (``cache_tag_flush_range``
        with IH=0)."""
        self._flush_range(domain, va, va + size - 1, False)

    # -- map / unmap -------------------------------------------------------------------------------
    def _page_sizes(self, domain: Domain) -> list[int]:
        if domain.kind == "fs":
            return [PAGE_1G] * self._capf("FL1GP") + [PAGE_2M, PAGE_4K]
        sllps = self._capf("SLLPS")
        return [PAGE_1G] * (sllps >> 1 & 1) + [PAGE_2M] * (sllps & 1) + [PAGE_4K]

    def map(self, domain: Domain, iova: int, paddr: int, size: int, perms: int, *,
            page_size: int | None = None) -> None:
        """``intel_iommu_map_pages`` + ``iotlb_sync_map``: leaves of the largest page size that fits
        (or ``page_size``), then caching mode's flush of what may have been cached not-present."""
        table = domain.table
        if table is None:
            raise GuestDriverError(f"a {domain.kind} domain has no page table to map into")
        if size <= 0 or (iova | paddr | size) & (PAGE_4K - 1):
            raise GuestDriverError(f"map {iova:#x}->{paddr:#x}+{size:#x}: not 4 KiB aligned")
        end = iova + size
        for m in table.mappings.values():
            if m.iova < end and iova < m.iova + m.size:
                raise GuestDriverError(f"map {iova:#x}+{size:#x}: overlaps the mapping at {m.iova:#x}")
        for lo, hi in domain.lazy_ranges:
            if lo < end and iova < hi:
                raise GuestDriverError(f"IOVA {iova:#x}+{size:#x} is still in the lazy flush queue")
        sizes = [page_size] if page_size is not None else self._page_sizes(domain)
        extra_perms = U | NX if domain.kind == "fs" else 0
        pos = 0
        while pos < size:
            for ps in sizes:
                if not (iova + pos) % ps and not (paddr + pos) % ps and size - pos >= ps:
                    break
            else:
                raise GuestDriverError(f"map {iova:#x}+{size:#x}: not aligned to page size {sizes[-1]:#x}")
            table.map(iova + pos, paddr + pos, ps, perms | extra_perms, page_size=ps)
            pos += ps
        self._flush_range_np(domain, iova, end - 1)

    def _flush_range_np(self, domain: Domain, start: int, end: int) -> None:
        """``cache_tag_flush_range_np``."""
        if not domain.devices:
            return
        if not self.cm or domain.kind == "fs":
            self.flush_write_buffer()
            return
        addr, pages, mask = calculate_psi_aligned_address(start, end)
        descs = [self._iotlb_tag(domain, pasid, addr, mask, False)
                 for kind, _, pasid in domain.tags if kind == "iotlb"]
        self._issue(descs)

    def _iotlb_tag(self, domain: Domain, pasid: int, addr: int, mask: int | None, ih: bool) -> _Desc:
        """``cache_tag_flush_iotlb``: PASID-based for first-stage domains, else page-selective IOTLB
        (domain-selective without PSI, above MAMV, or for everything)."""
        if domain.kind in ("fs", "sva"):
            if mask is None or mask > self.mamv:
                return self.invalidate_piotlb(2, domain.did, pasid)
            return self.invalidate_piotlb(3, domain.did, pasid, addr, mask, ih)
        if mask is None or not self.psi or mask > self.mamv:
            return self.invalidate_iotlb(2, domain.did)
        # Linux passes the hint as bit 0 of the address (``addr | ih``), which QI_IOTLB_ADDR masks off:
        # its page-selective IOTLB descriptors always carry IH=0.
        return self.invalidate_iotlb(3, domain.did, addr, mask, False)

    def _issue(self, descs: list[_Desc]) -> None:
        if self.qi:
            self._sync(descs)
            return
        f = specs().structure("inv_iotlb")
        for d in descs:
            v = d[0] | d[1] << 64
            addr = (v & f.field("ADDR").mask) >> (f.field("ADDR").lo & ~63)
            self._register_iotlb(f.field("DID").get(v), addr, f.field("AM").get(v), f.field("G").get(v),
                                 bool(f.field("IH").get(v)))

    def _flush_range(self, domain: Domain, start: int, end: int, ih: bool) -> None:
        """``cache_tag_flush_range``."""
        addr, pages, mask = calculate_psi_aligned_address(start, end)
        descs: list[_Desc] = []
        for kind, ident, pasid in domain.tags:
            if kind == "iotlb":
                descs.append(self._iotlb_tag(domain, pasid, addr, mask, ih))
            elif self.te:
                descs.append(self.invalidate_devtlb(ident, addr, mask,
                                                    pasid=None if pasid == IOMMU_NO_PASID else pasid))
        self._issue(descs)

    def _flush_all(self, domain: Domain) -> None:
        """``cache_tag_flush_all``: domain/PASID-selective IOTLB, whole device TLBs."""
        descs: list[_Desc] = []
        for kind, ident, pasid in domain.tags:
            if kind == "iotlb":
                descs.append(self._iotlb_tag(domain, pasid, 0, None, False))
            elif self.te:
                descs.append(self.invalidate_devtlb(ident, 0, MAX_AGAW_PFN_WIDTH))
        self._issue(descs)

    def unmap(self, domain: Domain, iova: int, size: int) -> None:
        """``intel_iommu_unmap_pages`` + ``iotlb_sync`` (strict: the range flushed now, IH=1 since no
        table page is freed) or the flush queue (lazy: flushed whole after ``lazy_batch`` unmaps)."""
        table = domain.table
        if table is None:
            raise GuestDriverError(f"a {domain.kind} domain has no page table to unmap from")
        if size <= 0 or (iova | size) & (PAGE_4K - 1):
            raise GuestDriverError(f"unmap {iova:#x}+{size:#x}: not 4 KiB aligned")
        table.unmap(iova, size)
        if self.strict:
            self._flush_range(domain, iova, iova + size - 1, True)
            return
        domain.lazy_ranges.append((iova, iova + size))
        if len(domain.lazy_ranges) >= self.lazy_batch:
            self._flush_lazy_domain(domain)

    def _flush_lazy_domain(self, domain: Domain) -> None:
        domain.lazy_ranges.clear()
        if domain.devices:
            self._flush_all(domain)

    def flush_lazy(self) -> None:
        """Drain every domain's flush queue (the flush-queue timer firing)."""
        seen: list[Domain] = []
        for dev in self.devices.values():
            for d in dev.attached.values():
                if d.lazy_ranges and d not in seen:
                    seen.append(d)
        for d in seen:
            self._flush_lazy_domain(d)

    # -- page requests -----------------------------------------------------------------------------
    def service_prq(self, handler: Callable[[PageRequest], int]) -> int:
        """``prq_event_thread``: PPR cleared, PQH..PQT decoded and handled, PQH advanced, PRO cleared once
        the queue is empty.  ``handler`` returns a response code for each request; the group's response
        (the first code that is not SUCCESS, else SUCCESS) goes out with its last request.  Returns how
        many requests were read."""
        if not self.prq_base:
            return 0
        P = consts.PRSTS
        self._w("PRSTS", P.PPR, 4)
        mask = self.prq_mask
        tail = self._r("PQT", 8) & mask
        head = self._r("PQH", 8) & mask
        count = 0
        while head != tail:
            raw = int.from_bytes(self.mem.read(self.prq_base + head, 32), "little")
            self._prq_one(self._pr_layout.decode(raw), handler)
            count += 1
            head = (head + 32) & mask
        self._w("PQH", tail, 8)
        if self._r("PRSTS") & P.PRO:
            if self._r("PQH", 8) & mask == self._r("PQT", 8) & mask:
                self._groups.clear()
                self._w("PRSTS", P.PRO, 4)
        return count

    def _prq_one(self, d: dict[str, int], handler: Callable[[PageRequest], int]) -> None:
        addr = d["ADDR"] << (self._pr_layout.field("ADDR").lo & 63)
        req = PageRequest(d["RID"], addr, d["PASID"] if d["PP"] else None, bool(d["RD"]), bool(d["WR"]),
                          bool(d["ER"]), bool(d["PM"]), bool(d["LPIG"]), d["PRGI"],
                          d["PRIVATE_DATA"] if d["PDP"] else None)
        canonical = addr >> 47 in (0, (1 << 17) - 1)
        if not canonical or (req.priv and (req.read or req.write)) or (req.exe and req.read):
            self._bad_prq(req)
            return
        if req.last and not req.read and not req.write:
            return  # a stop marker: no response
        if req.sid not in self.devices:
            self._bad_prq(req)
            return
        key = (req.sid, req.pasid, req.prgi)
        codes = self._groups.setdefault(key, [])
        codes.append(handler(req))
        if req.last:
            del self._groups[key]
            code = next((c for c in codes if c != RESP_SUCCESS), RESP_SUCCESS)
            self.page_response(req.sid, req.pasid, req.prgi, code)

    def _bad_prq(self, req: PageRequest) -> None:
        """``handle_bad_prq_event``: INVALID for a last request or one with private data."""
        if req.last or req.private_data is not None:
            self.page_response(req.sid, req.pasid, req.prgi, RESP_INVALID)

    def page_response(self, sid: int, pasid: int | None, prgi: int, code: int) -> QiResult:
        """``intel_iommu_page_response``: a page group response descriptor."""
        return self.qi_submit([make_descriptor(T_PAGE_RESPONSE, PP=int(pasid is not None), PASID=pasid or 0,
                                               RID=sid, RC=code, PRGI=prgi)])


__all__ = ["GuestDriver", "GuestDriverError", "GuestAction", "QiResult", "PageRequest", "Domain", "Mmio",
           "GuestMemory", "QI_DONE", "RESP_SUCCESS", "RESP_INVALID", "RESP_FAILURE"]
