"""What the unit's public calls answer: translations, faults, DMA outcomes, sanitizer and walk reports,
and the request encoding those calls accept."""

from __future__ import annotations

from typing import NamedTuple

from .access import EXEC, NO_PASID, PRIV, READ, WRITE


class Translation(NamedTuple):
    """A successful translation of one address."""

    addr: int
    page_size: int
    perms: str
    kind: str


class Fault(NamedTuple):
    """A translation that faulted.  ``recorded`` is False when FPD suppressed it or logging dropped it."""

    reason: int
    name: str
    addr: int
    recorded: bool

    def __bool__(self) -> bool:  # a Fault is falsy so `if iommu.translate(...)` reads naturally
        return False


class DmaResult(NamedTuple):
    """Outcome of a DMA: bytes read (reads), and every fault reason met, one per faulting chunk."""

    data: bytes
    faults: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not self.faults


class StaleHit(NamedTuple):
    """Sanitizer report: a translation whose cached answer differs from what memory says now — a guest
    changed a structure without the invalidation the spec requires (or relies on one it never did)."""

    sid: int
    pasid: int | None
    iova: int
    access: str
    cached: int
    """What the unit answered: output address, or -reason."""
    fresh: int
    """What an uncached walk of memory answers now: output address, or -reason."""


class WalkReport(NamedTuple):
    """Everything one uncached walk touched, for inspection (``vtd-emu walk``)."""

    steps: list[tuple[str, int, int, int | tuple[int, ...]]]
    """(structure name, level or 0, address, value or qwords)"""
    result: Translation | Fault


def request_bits(access: str | int, priv: bool, exe: bool, pasid: int | None) -> int:
    """The request bits (``access.READ | WRITE | EXEC | PRIV``) of a public translation call."""
    if isinstance(access, str):
        bits = 0
        for ch in access.lower():
            if ch == "r":
                bits |= READ
            elif ch == "w":
                bits |= WRITE
            elif ch == "x":
                bits |= EXEC
            else:
                raise ValueError(f"access must be made of 'r', 'w', 'x'; got {access!r}")
    else:
        bits = int(access)
    if not bits & (READ | WRITE):
        bits |= READ  # an execute request is a read
    if exe:
        bits |= EXEC
    if priv:
        bits |= PRIV
    if bits & (EXEC | PRIV) and pasid is None:
        raise ValueError("execute and privileged requests carry a PASID; pass pasid=")
    if pasid is not None and not 0 <= pasid < NO_PASID:
        raise ValueError(f"pasid must be 0..0xFFFFF, got {pasid:#x}")
    return bits & 15


def allowed_text(allowed: int) -> str:
    """Human text of an ``allowed``-request mask: "rw", "r", or "r/s:rw" when supervisor requests differ."""
    # Read, write, exec as allowed for a user request; "s" marks supervisor-only differences.
    user = "".join(c for bit, c in ((READ, "r"), (WRITE, "w"), (EXEC | READ, "x")) if (allowed >> bit) & 1)
    sup = "".join(c for bit, c in ((READ, "r"), (WRITE, "w"), (EXEC | READ, "x")) if (allowed >> (bit | PRIV)) & 1)
    return user if user == sup or not sup else f"{user or '-'}/s:{sup}"


__all__ = ["Translation", "Fault", "DmaResult", "StaleHit", "WalkReport", "request_bits", "allowed_text"]
