"""Request encoding shared by the walkers, the caches and the chip.

A request is a 4-bit int: READ, WRITE (both = AtomicOp), EXEC, PRIV.  A cached translation carries an
``allowed`` mask with one bit per request value, so checking a hit is one shift and one AND."""

from __future__ import annotations

from typing import Callable

READ, WRITE, EXEC, PRIV = 1, 2, 4, 8

NO_PASID = 1 << 20
"""Tag of requests without PASID (PASIDs are 20 bits)."""


def _mask(pred: Callable[[int], int]) -> int:
    return sum(1 << r for r in range(16) if pred(r))


REQ_R = _mask(lambda r: r & READ)
REQ_W = _mask(lambda r: r & WRITE)
REQ_X = _mask(lambda r: r & EXEC)
REQ_SUP = _mask(lambda r: r & PRIV)
REQ_USER = 0xFFFF & ~REQ_SUP
ALL_REQ = 0xFFFF


def ss_allowed(perm: int) -> int:
    """Requests a second-stage permission set (R=1, W=2, X=4, accumulated over the walk) allows."""
    allowed = ALL_REQ
    if not perm & 1:
        allowed &= ~REQ_R
    if not perm & 2:
        allowed &= ~REQ_W
    if not perm & 4:
        allowed &= ~REQ_X
    return allowed


def describe(req: int) -> str:
    parts = [n for bit, n in ((READ, "read"), (WRITE, "write"), (EXEC, "exec"), (PRIV, "priv")) if req & bit]
    return "+".join(parts) or "none"
