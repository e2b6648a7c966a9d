"""Page requests (PCIe PRI, I/O page faults): the page request queue (PQA/PQH/PQT, PRS_REG, the
page-request event) and the routing of page group responses back to devices.

A device asks for pages with :meth:`PageRequestUnit.request`; the unit checks the context (PRE) and the
PASID entry, writes a 32-byte page request descriptor at PQA+PQT and advances PQT, or reports overflow.
Software answers each group that ended with LPIG=1 with a page group response descriptor (QI type 9),
which :meth:`PageRequestUnit.respond` matches against the groups still waiting for an answer.

Choices the fact sheet leaves open (auto-responses, out-of-range PQT) are in ``docs/invalidation.md``.
"""

from __future__ import annotations

from collections import Counter
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from ..spec import specs
from ..spec.consts import FR, PQA, PQH, PQT, PRSTS
from .access import NO_PASID
from .descriptors import PageGroupResponse
from .entries import CTX_SM, FPD_SHIFT, PGTT_FS, PGTT_NESTED, REASON_MASK

if TYPE_CHECKING:
    from .iommu import VtdIommu

PPR, PRO = PRSTS.PPR, PRSTS.PRO
_SM_RTA_INV, _SM_RTA_LEGACY_PRQ = FR.SM_RTA_INV, FR.SM_RTA_LEGACY_PRQ
_SM_PRE_CLEAR, _SM_PASIDE_CLEAR = FR.SM_PRE_CLEAR, FR.SM_PASIDE_CLEAR
_DESC_BYTES = 32
_OFFSET_MASK = PQT.PQT
assert PQH.PQH == _OFFSET_MASK

# Page group response codes (PCIe PRG Response)
RC_SUCCESS, RC_INVALID_REQUEST, RC_FAILURE = 0x0, 0x1, 0xF


class PageRequestStatus(StrEnum):
    QUEUED = "queued"            # descriptor written, PQT advanced
    OVERFLOW = "overflow"        # the queue was full: PRO set now, request dropped
    DROPPED = "dropped"          # PRO was already set: dropped without a new event
    FAULTED = "faulted"          # context/PASID checks failed: fault recorded (or suppressed by FPD)
    UNSUPPORTED = "unsupported"  # the unit has no ECAP.PRS, or translation is off


class PageResponse(NamedTuple):
    """A page group response as the device receives it.  ``auto`` marks one the unit generated itself
    (for a request it could not queue) rather than one software wrote."""

    sid: int
    pasid: int | None
    prgi: int
    code: int
    private_data: int | None = None
    auto: bool = False


class PageRequestUnit:
    """The page request queue of one unit (present when ECAP.PRS=1)."""

    def __init__(self, chip: "VtdIommu") -> None:
        self.chip = chip
        self.regs = chip.regs
        self.layout = specs().structure("page_request")
        self.outstanding: Counter[tuple[int, int | None, int]] = Counter()
        """(requester, PASID or None, PRG index) of groups whose last request (LPIG=1) was queued and
        that software has not answered yet."""
        self.delivered: list[PageResponse] = []
        self.queued = 0
        self.overflows = 0
        self.dropped = 0
        self.faulted = 0
        h = self.regs.handlers
        chained = h.get("PRSTS")

        def prs_written(index: int, old: int, new: int, value: int, wmask: int) -> None:
            if chained is not None:
                chained(index, old, new, value, wmask)
            if not new & (PPR | PRO):
                chip.prq_event.clear_pending()

        h["PRSTS"] = prs_written

    # -- requests from devices -------------------------------------------------------------------
    def request(self, sid: int, addr: int, *, read: bool, write: bool, exe: bool = False, priv: bool = False,
                pasid: int | None = None, last: bool = False, prgi: int = 0,
                private_data: int | None = None) -> PageRequestStatus:
        """One PRI page request from requester ``sid``.  A request with ``last`` and neither ``read`` nor
        ``write`` (and a PASID) is a stop marker: queued like others, never answered."""
        if not 0 <= sid <= 0xFFFF:
            raise ValueError(f"sid must be 0..0xFFFF, got {sid:#x}")
        if not 0 <= addr < 1 << 64:
            raise ValueError(f"addr must be a 64-bit address, got {addr:#x}")
        if not 0 <= prgi < 512:
            raise ValueError(f"prgi must be 0..511, got {prgi}")
        if pasid is not None and not 0 <= pasid < NO_PASID:
            raise ValueError(f"pasid must be 0..0xFFFFF, got {pasid:#x}")
        if private_data is not None and not 0 <= private_data < 1 << 128:
            raise ValueError("private_data must fit 128 bits")
        stop_marker = last and not read and not write and pasid is not None
        answer = last and not stop_marker
        chip = self.chip
        if not chip.te:
            # Nothing to resolve the request against: the device is told its request is invalid.
            if answer:
                self._auto(sid, pasid, prgi, RC_INVALID_REQUEST, private_data)
            return PageRequestStatus.UNSUPPORTED
        checked = self._check(sid, addr, pasid, priv, exe)
        if type(checked) is int:
            self.faulted += 1
            if answer:
                self._auto(sid, pasid, prgi, RC_INVALID_REQUEST, private_data)
            return PageRequestStatus.FAULTED
        regs = self.regs
        prs = regs.get("PRSTS")
        if prs & PRO:
            self.dropped += 1
            if answer:
                # Success makes the device retry the access (and fault again) once software has drained
                # the queue; Response Failure would disable its PRI for good.
                self._auto(sid, pasid, prgi, RC_SUCCESS, private_data)
            return PageRequestStatus.DROPPED
        pqa = regs.get("PQA")
        entries = 1 << ((pqa & PQA.PQS) + 7)
        tail = (regs.get("PQT") & _OFFSET_MASK) // _DESC_BYTES % entries
        head = (regs.get("PQH") & _OFFSET_MASK) // _DESC_BYTES % entries
        nxt = (tail + 1) % entries
        if nxt == head:
            regs.set("PRSTS", prs | PRO)
            self.overflows += 1
            if not prs & (PPR | PRO):
                chip.prq_event.fire()
            if answer:
                self._auto(sid, pasid, prgi, RC_SUCCESS, private_data)
            return PageRequestStatus.OVERFLOW
        did, pgtt_fs, eff_pasid = checked  # type: ignore[misc]
        if pgtt_fs:
            # Implicit invalidation: a retried access must not hit a stale first-stage translation.
            chip.caches.piotlb_page(did, eff_pasid, addr & ~0xFFF, 0, False)
        desc = self.layout.encode(
            TYPE=1, PP=int(pasid is not None), PDP=int(private_data is not None), RID=sid,
            PASID=pasid or 0, ER=int(exe), PM=int(priv), RD=int(read), WR=int(write), LPIG=int(last),
            PRGI=prgi, ADDR=addr >> 12, PRIVATE_DATA=private_data or 0)
        base = pqa & PQA.PQA & ((1 << chip.cfg.haw) - 1)
        chip.mem.write(base + tail * _DESC_BYTES, desc.to_bytes(_DESC_BYTES, "little"))
        regs.set("PQT", nxt * _DESC_BYTES)
        self.queued += 1
        if answer:
            self.outstanding[(sid, pasid, prgi)] += 1
        prs = regs.get("PRSTS")
        if not prs & PPR:
            regs.set("PRSTS", prs | PPR)
            if not prs & PRO:
                chip.prq_event.fire()
        return PageRequestStatus.QUEUED

    def _check(self, sid: int, addr: int, pasid: int | None, priv: bool, exe: bool) -> "tuple[int, bool, int] | int":
        """(DID, first-stage translation?, PASID used) of the request's PASID entry, or the fault reason
        after recording it."""
        chip = self.chip
        if chip.root_invalid:
            return self._fault(sid, addr, pasid, priv, exe, _SM_RTA_INV)
        if not chip.root_scalable:
            return self._fault(sid, addr, pasid, priv, exe, _SM_RTA_LEGACY_PRQ)
        ctx = chip.context_entry(sid)
        if type(ctx) is int:
            return self._fault(sid, addr, pasid, priv, exe, ctx)
        if ctx.kind != CTX_SM:  # type: ignore[union-attr]
            # A legacy entry still cached from before the root table changed: a legacy-mode page request.
            return self._fault(sid, addr, pasid, priv, exe, _SM_RTA_LEGACY_PRQ)
        _, cfpd, pdir, pdts, rid_pasid, pre, paside, dte, rid_priv = ctx  # type: ignore[misc]
        if not pre:
            return self._fault(sid, addr, pasid, priv, exe, _SM_PRE_CLEAR | cfpd << FPD_SHIFT)
        if pasid is not None and not paside:
            return self._fault(sid, addr, pasid, priv, exe, _SM_PASIDE_CLEAR | cfpd << FPD_SHIFT)
        eff = pasid if pasid is not None else (rid_pasid if chip.use_rid_pasid else 0)
        pe = chip.pasid_entry(sid, ctx, eff)  # type: ignore[arg-type]
        if type(pe) is int:
            return self._fault(sid, addr, pasid, priv, exe, pe)
        return pe.did, pe.pgtt in (PGTT_FS, PGTT_NESTED), eff  # type: ignore[union-attr]

    def _fault(self, sid: int, addr: int, pasid: int | None, priv: bool, exe: bool, f: int) -> int:
        reason = f & REASON_MASK
        # (T2, T1) = (1, 0) marks a page request in the record.
        self.chip.faults.report(sid, addr, reason, (f >> FPD_SHIFT) & 1, True, pasid, priv, exe, page_request=True)
        return reason

    def _auto(self, sid: int, pasid: int | None, prgi: int, code: int, private: int | None) -> None:
        self._deliver(PageResponse(sid, pasid, prgi, code, private, True))

    # -- responses from software -----------------------------------------------------------------
    def respond(self, sid: int, pasid: int | None, prgi: int, code: int, private_data: int | None = None) -> bool:
        """A page group response descriptor: delivered to the device if it answers a group still waiting
        for one, else reported in ``chip.unmatched_responses``.  Returns whether it matched."""
        resp = PageResponse(sid, pasid, prgi, code, private_data)
        key = (sid, pasid, prgi)
        matched = self.outstanding[key] > 0
        if matched:
            self.outstanding[key] -= 1
            if not self.outstanding[key]:
                del self.outstanding[key]
            self._deliver(resp)
        else:
            self.outstanding.pop(key, None)
            self.chip.unmatched_responses.append(resp)
        if self.chip.invalidation_observers:
            self.chip.notify_invalidation(PageGroupResponse(sid, pasid, prgi, code, private_data, matched))
        return matched

    def _deliver(self, resp: PageResponse) -> None:
        self.delivered.append(resp)
        dev = self.chip.devices.get(resp.sid)
        if dev is not None:
            dev.receive_response(resp)


__all__ = ["PageRequestUnit", "PageRequestStatus", "PageResponse", "RC_SUCCESS", "RC_INVALID_REQUEST",
           "RC_FAILURE"]
