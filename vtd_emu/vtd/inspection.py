"""Uncached inspection of the unit: walk reports (``vtd-emu walk``) and the stale-cache sanitizer.

Both walk memory through a :class:`~vtd_emu.memory.ReadOnlyView` with every cache bypassed — including
the pass-through bypass set, which is itself a cache of a context entry — so they see what memory says
now, and change nothing (no A/D bits, no fills, no fault records).
"""

from __future__ import annotations

from typing import Any

from ..memory import ReadOnlyView
from ..spec.consts import FR
from .access import NO_PASID, describe
from .entries import DROPPED, KIND_NAMES, KIND_PT, REASON_MASK, IotlbEntry
from .faults import reason_name
from .results import Fault, StaleHit, Translation, WalkReport, allowed_text, request_bits
from .translate import Lookup, Translator

_SM_RTA_INV = FR.SM_RTA_INV


class Inspector(Translator):
    """Walk reports and the sanitizer."""

    stale_hits: list[StaleHit]

    def walk(self, sid: int, iova: int, access: str | int = "r", pasid: int | None = None, priv: bool = False,
             exe: bool = False) -> WalkReport:
        """Walk memory for one request bypassing every cache, recording each structure and entry read.
        Nothing is cached, recorded or written (A/D bits are not set)."""
        req = request_bits(access, priv, exe, pasid)
        steps: list = []
        ptag = NO_PASID if pasid is None else pasid
        if not self.te:
            page = iova & ~0xFFF
            res: Lookup = (IotlbEntry(page, 0xFFF, 0xFFFF, 0, 0, 0, KIND_PT, page, 12), iova)
        else:
            res = self._uncached(sid, ptag, iova, req, steps)
        if type(res) is int:
            reason = res & REASON_MASK
            return WalkReport(steps, Fault(reason, reason_name(reason), iova, False))
        e, out = res  # type: ignore[misc]
        return WalkReport(steps, Translation(out, 1 << e.shift, allowed_text(e.allowed), KIND_NAMES[e.kind]))

    def _uncached(self, sid: int, ptag: int, iova: int, req: int, steps: list[Any]) -> Lookup:
        """The lookup chain over a read-only view of memory with every cache bypassed (translation on)."""
        if self.root_invalid:
            return _SM_RTA_INV
        saved = self.mem
        self.mem = ReadOnlyView(saved)
        try:
            return self.lookup(sid, ptag, iova, req, steps)
        finally:
            self.mem = saved

    # -- sanitizer ---------------------------------------------------------------------------------
    def enable_sanitizer(self) -> None:
        """From now on re-walk every translation uncached and append each one whose cached answer memory
        no longer supports to :attr:`stale_hits`."""
        # An instance attribute shadows the method: the plain hot path pays nothing for the option.
        self.xlate = self._xlate_sanitized  # type: ignore[method-assign]

    def _xlate_sanitized(self, sid: int, ptag: int, iova: int, req: int) -> int:
        out = Translator.xlate(self, sid, ptag, iova, req)
        fresh = self.fresh(sid, ptag, iova, req)
        if fresh != out and out != DROPPED:
            self.stale_hits.append(StaleHit(sid, None if ptag == NO_PASID else ptag, iova, describe(req), out, fresh))
        return out

    def fresh(self, sid: int, ptag: int, iova: int, req: int) -> int:
        """What memory says now for this request (output address or -reason as the unit would report it),
        bypassing and not touching any cache or memory."""
        if not self.te:
            return iova
        r = self._uncached(sid, ptag, iova, req, [])
        if type(r) is int:
            return -self.faults.reason(r & REASON_MASK, req)
        return r[1]  # type: ignore[index]


__all__ = ["Inspector"]
