"""Device-TLB (PCIe ATS): endpoints that ask the unit for translations, keep them in their own address
translation cache (ATC) and then issue translated requests that the unit lets through.

The ATC is not the IOMMU's to manage: an IOTLB invalidation leaves it alone, and a device keeps using a
stale translation until a device-TLB (type 3) or PASID-based device-TLB (type 8) invalidation reaches it.
An endpoint can be configured not to answer invalidations (the queue then reports ITE) or to send an
extra, unexpected completion (ICE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

from ..spec.consts import FR
from .access import EXEC, NO_PASID, PRIV, READ, WRITE
from .entries import CTX_LEGACY, DROPPED, FPD_SHIFT, REASON_MASK, TT_DEV_TLB, WALK, Context
from .prq import PageRequestStatus, PageResponse

if TYPE_CHECKING:
    from .iommu import VtdIommu

_ADDR_BITS = 52          # ATS addresses carry bits 63:12
_SM_RTA_INV, _CONTEXT_ENTRY_TT, _SM_DTE_CLEAR = FR.SM_RTA_INV, FR.CONTEXT_ENTRY_TT, FR.SM_DTE_CLEAR


class AtsCompletion(NamedTuple):
    """The unit's answer to a translation request.

    ``status`` is ``"success"`` (then ``read``/``write`` say what the device may do; both False means the
    page is not accessible, e.g. not present: a candidate for a page request) or ``"ur"`` (Unsupported
    Request: the device may not use ATS here, or the unit cannot translate).  ``reason`` is the fault
    reason behind a denial, 0 if none; only UR denials are recorded in the FRCDs."""

    status: str
    addr: int
    size: int
    read: bool
    write: bool
    reason: int = 0

    def __bool__(self) -> bool:
        return self.status == "success" and (self.read or self.write)


class AtcEntry(NamedTuple):
    iova: int
    size: int
    addr: int
    read: bool
    write: bool


class DeviceDma(NamedTuple):
    """Outcome of a translated DMA: bytes read (reads) and one fault reason per failed 4 KiB chunk
    (0 when the translation was simply denied without a fault)."""

    data: bytes
    faults: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not self.faults


def ats_range(addr: int, s: bool) -> tuple[int, int]:
    """(base, size) an ATS invalidation covers: S=0 one 4 KiB page; S=1 a naturally aligned range whose
    size is given by the lowest 0 bit of ADDR[63:12] (bit 12 clear = 8 KiB, ...); all ones = everything."""
    page = (addr >> 12) & ((1 << _ADDR_BITS) - 1)
    if not s:
        return page << 12, 1 << 12
    zeros = ~page & ((1 << _ADDR_BITS) - 1)
    if not zeros:
        return 0, 1 << 64
    k = (zeros & -zeros).bit_length() - 1
    size = 1 << (13 + k)
    return (page << 12) & ~(size - 1), size


def chip_translate(chip: "VtdIommu", sid: int, iova: int, *, write: bool = False, pasid: int | None = None,
                   priv: bool = False, exe: bool = False) -> AtsCompletion:
    """An ATS translation request as the unit processes it: context/PASID problems and a context that
    does not allow device-TLBs (legacy TT != 01, scalable DTE=0) are recorded and answered UR; page-walk
    faults are recoverable and answered with no permission, without a fault record."""
    ptag = NO_PASID if pasid is None else pasid
    base_req = (PRIV if priv else 0) | (EXEC if exe else 0)
    req = (WRITE if write else READ) | base_req
    if not chip.te:
        # Remapping is off: there are no structures that could allow the device a device-TLB.
        return AtsCompletion("ur", 0, 0, False, False)
    ctx = _ats_context(chip, sid)
    if type(ctx) is int:
        reason = -chip.report_fault(sid, ptag, iova, req, ctx)
        return AtsCompletion("ur", 0, 0, False, False, reason)
    r = chip.lookup(sid, ptag, iova, req)
    denied = 0
    if type(r) is int and write and r != DROPPED and r & WALK:
        # Not writable: say what a read could do instead, keeping why the write was refused.
        denied = r & REASON_MASK
        r = chip.lookup(sid, ptag, iova, READ | base_req)
    if type(r) is int:
        if r == DROPPED:
            return AtsCompletion("success", 0, 1 << 12, False, False)
        if r & WALK:
            return AtsCompletion("success", 0, 1 << 12, False, False, r & REASON_MASK)
        reason = -chip.report_fault(sid, ptag, iova, req, r)
        return AtsCompletion("ur", 0, 0, False, False, reason)
    e, _ = r  # type: ignore[misc]
    allowed = e.allowed
    rd = bool((allowed >> (READ | base_req)) & 1)
    wr = bool((allowed >> (WRITE | base_req)) & 1)
    return AtsCompletion("success", e.base, 1 << e.shift, rd, wr, denied)


def chip_translated_access(chip: "VtdIommu", sid: int, addr: int, write: bool, pasid: int | None) -> int:
    """A translated request (AT=10): the address is used as is once the context allows device-TLBs.
    Returns the address, or -reason after recording the fault."""
    if not chip.te:
        return addr
    ctx = _ats_context(chip, sid)
    if type(ctx) is int:
        return chip.report_fault(sid, NO_PASID if pasid is None else pasid, addr, WRITE if write else READ, ctx)
    return addr


def _ats_context(chip: "VtdIommu", sid: int) -> Context | int:
    """The (cached) context of ``sid``, or the fault int when it is unusable or does not allow
    device-TLBs (legacy TT != 01: CONTEXT_ENTRY_TT; scalable DTE=0: SM_DTE_CLEAR)."""
    if chip.root_invalid:
        return _SM_RTA_INV
    ctx = chip.context_entry(sid)
    if isinstance(ctx, int):
        return ctx
    if ctx.kind == CTX_LEGACY:
        if ctx.tt != TT_DEV_TLB:  # type: ignore[union-attr]
            return _CONTEXT_ENTRY_TT | ctx.fpd << FPD_SHIFT
    elif not ctx.dte:  # type: ignore[union-attr]
        return _SM_DTE_CLEAR | ctx.fpd << FPD_SHIFT
    return ctx


class AtsDevice:
    """An endpoint behind the unit with ATS (a device TLB) and optionally PRI (page requests).

    ``respond=False`` makes it ignore invalidation requests (the unit times out: ITE);
    ``spurious_completion=True`` makes it answer each one correctly and then once more with an unknown
    tag (the unit reports ICE)."""

    def __init__(self, chip: "VtdIommu", sid: int, *, ats: bool = True, pri: bool = False, respond: bool = True,
                 spurious_completion: bool = False, atc_size: int = 256) -> None:
        if not 0 <= sid <= 0xFFFF:
            raise ValueError(f"sid must be 0..0xFFFF, got {sid:#x}")
        if atc_size < 1:
            raise ValueError("atc_size must be at least 1")
        self.chip = chip
        self.sid = sid
        self.ats = ats
        self.pri = pri
        self.respond = respond
        self.spurious_completion = spurious_completion
        self.atc_size = atc_size
        self.atc: dict[tuple[int, int, int], AtcEntry] = {}
        """(PASID tag, page-size shift, iova >> shift) → translation."""
        self.invalidations = 0
        self.responses: list[PageResponse] = []
        self.on_response: Callable[[PageResponse], None] | None = None

    # -- translation ---------------------------------------------------------------------------
    def translation_request(self, iova: int, access: str = "r", pasid: int | None = None,
                            priv: bool = False) -> AtsCompletion:
        """Ask the unit to translate ``iova`` (``access`` "r" or "w": the latter asks for write permission)
        and keep a granted translation in the ATC."""
        if not self.ats:
            raise ValueError(f"device {self.sid:#06x} has ATS disabled")
        if access not in ("r", "w", "rw"):
            raise ValueError(f"access must be 'r', 'w' or 'rw', got {access!r}")
        if not 0 <= iova < 1 << 64:
            raise ValueError(f"iova must be a 64-bit address, got {iova:#x}")
        if pasid is not None and not 0 <= pasid < NO_PASID:
            raise ValueError(f"pasid must be 0..0xFFFFF, got {pasid:#x}")
        c = chip_translate(self.chip, self.sid, iova, write="w" in access, pasid=pasid, priv=priv)
        if c:
            shift = c.size.bit_length() - 1
            key = (NO_PASID if pasid is None else pasid, shift, iova >> shift)
            if key not in self.atc and len(self.atc) >= self.atc_size:
                del self.atc[next(iter(self.atc))]
            self.atc[key] = AtcEntry((iova >> shift) << shift, c.size, c.addr, c.read, c.write)
        return c

    def lookup(self, iova: int, pasid: int | None = None) -> AtcEntry | None:
        """The ATC entry covering ``iova`` (stale or not), if any."""
        ptag = NO_PASID if pasid is None else pasid
        for shift in (12, 21, 30):
            e = self.atc.get((ptag, shift, iova >> shift))
            if e is not None:
                return e
        for (tag, shift, page), e in self.atc.items():  # sizes other than the three page sizes
            if tag == ptag and shift not in (12, 21, 30) and page == iova >> shift:
                return e
        return None

    def translated_dma_read(self, iova: int, length: int, pasid: int | None = None) -> DeviceDma:
        """Read through the ATC (asking for a translation on a miss); a failed chunk reads as zeros."""
        out = bytearray(length)
        faults: list[int] = []
        pos = 0
        while pos < length:
            a = iova + pos
            n = min(4096 - (a & 0xFFF), length - pos)
            hpa = self._translated(a, False, pasid, faults)
            if hpa is not None:
                out[pos:pos + n] = self.chip.mem.read(hpa, n)
            pos += n
        return DeviceDma(bytes(out), tuple(faults))

    def translated_dma_write(self, iova: int, data: bytes, pasid: int | None = None) -> DeviceDma:
        """Write through the ATC (asking for a translation on a miss); failed chunks are dropped."""
        faults: list[int] = []
        mv = memoryview(data)
        pos = 0
        while pos < len(data):
            a = iova + pos
            n = min(4096 - (a & 0xFFF), len(data) - pos)
            hpa = self._translated(a, True, pasid, faults)
            if hpa is not None:
                self.chip.mem.write(hpa, mv[pos:pos + n])
            pos += n
        return DeviceDma(b"", tuple(faults))

    def _translated(self, iova: int, write: bool, pasid: int | None, faults: list[int]) -> int | None:
        if iova >> 64:
            # A DMA running past the top of the address space: the unit answers that chunk as it would any
            # address it cannot translate (nothing to keep in the ATC).
            c = chip_translate(self.chip, self.sid, iova, write=write, pasid=pasid)
            faults.append(c.reason)
            return None
        e = self.lookup(iova, pasid)
        if e is None or not (e.write if write else e.read):
            c = self.translation_request(iova, "w" if write else "r", pasid)
            if not (c.write if write else c.read):
                faults.append(c.reason)
                return None
            e = self.lookup(iova, pasid)
            if e is None:
                faults.append(0)
                return None
        hpa = self.chip.translated_access(self.sid, e.addr + (iova - e.iova), write, pasid)
        if hpa < 0:
            faults.append(-hpa)
            return None
        return hpa

    # -- invalidation (from the unit's queue) ----------------------------------------------------
    def invalidate(self, pasid: int | None, addr: int, s: bool) -> bool:
        """An ATS invalidation request: ``pasid`` NO_PASID for entries without PASID, a PASID, or None for
        every PASID (global).  Returns False when the device does not answer."""
        if not self.respond:
            return False
        self.invalidations += 1
        lo, size = ats_range(addr, s)
        hi = lo + size
        dead = [k for k, e in self.atc.items()
                if (k[0] == pasid or (pasid is None and k[0] != NO_PASID))
                and e.iova < hi and e.iova + e.size > lo]
        for k in dead:
            del self.atc[k]
        return True

    # -- page requests -------------------------------------------------------------------------
    def page_request(self, addr: int, *, read: bool = True, write: bool = False, exe: bool = False,
                     priv: bool = False, pasid: int | None = None, last: bool = True, prgi: int = 0,
                     private_data: int | None = None) -> PageRequestStatus:
        """Send a PRI page request for ``addr`` (the device must have PRI enabled)."""
        if not self.pri:
            raise ValueError(f"device {self.sid:#06x} has PRI disabled")
        return self.chip.page_request(self.sid, addr, read=read, write=write, exe=exe, priv=priv, pasid=pasid,
                                      last=last, prgi=prgi, private_data=private_data)

    def receive_response(self, resp: PageResponse) -> None:
        self.responses.append(resp)
        if self.on_response is not None:
            self.on_response(resp)


__all__ = ["AtsDevice", "AtsCompletion", "AtcEntry", "DeviceDma", "ats_range", "chip_translate",
           "chip_translated_access"]
