"""Decoded translation structures and the result codes every part of the unit shares.

A context entry, a PASID entry and an IOTLB entry are decoded once (on a cache miss) and then read on
every translation, so they are NamedTuples (as fast to unpack as the plain tuples they replace) except
the IOTLB entry, which invalidation marks dead in place and is a ``__slots__`` object (as fast to read as
a list on the hot path).  The names follow QEMU's ``intel_iommu.c`` (``vtd_ce_*``, ``vtd_pe_*``).

Faults travel inside the unit as ints: ``reason | FPD << FPD_SHIFT | WALK | PASID used << PASID_SHIFT``.
``WALK`` marks faults met once the translation structures were decoded (paging faults), which is what the
ATS path and QEMU's PP/PV quirks key on.  :func:`vtd_emu.vtd.faults.FaultPath.report` turns one into a
record (or a suppression).
"""

from __future__ import annotations

from typing import NamedTuple

# -- fault ints ------------------------------------------------------------------------------------------
FPD_SHIFT = 8
WALK = 1 << 9
PASID_SHIFT = 10
REASON_MASK = 0xFF

DROPPED = -(1 << 16)
"""xlate result of a request dropped without a fault (QEMU's cached-permission quirk)."""

INTR_LO, INTR_HI = 0xFEE0_0000, 0xFEF0_0000
"""The interrupt-address range: never a DMA target (fact sheet: interrupt requests)."""

# -- context entry kinds and translation types -----------------------------------------------------------
CTX_LEGACY, CTX_SM = 0, 1
TT_PT = 2
"""Legacy context TT: 0 untranslated only, 1 also translated (device-TLB), 2 pass-through."""
TT_DEV_TLB = 1
PGTT_FS, PGTT_SS, PGTT_NESTED, PGTT_PT = 1, 2, 3, 4

# -- IOTLB entry kinds -----------------------------------------------------------------------------------
KIND_SS, KIND_FS, KIND_NESTED, KIND_PT = 0, 1, 2, 3
KIND_NAMES = {KIND_SS: "second-stage", KIND_FS: "first-stage", KIND_NESTED: "nested", KIND_PT: "pass-through"}


class LegacyContext(NamedTuple):
    """A decoded legacy-mode context entry (QEMU ``vtd_ce_*``)."""

    kind: int
    """Always :data:`CTX_LEGACY` (first, so both context kinds are told apart by ``ctx[0]``)."""
    did: int
    tt: int
    levels: int
    """Second-stage paging levels (AW + 2)."""
    slptptr: int
    """Second-stage page-table pointer, an address."""
    fpd: int


class ScalableContext(NamedTuple):
    """A decoded scalable-mode context entry (QEMU ``vtd_sm_ce_*``); it carries no DID."""

    kind: int
    """Always :data:`CTX_SM`."""
    fpd: int
    pasid_dir: int
    """PASID directory pointer, an address."""
    pdts: int
    rid_pasid: int
    pre: int
    paside: int
    dte: int
    rid_priv: int


Context = LegacyContext | ScalableContext


class PasidEntry(NamedTuple):
    """A decoded scalable-mode PASID-table entry (QEMU ``vtd_pe_*``)."""

    did: int
    pgtt: int
    ss_levels: int
    ssptptr: int
    fs_levels: int
    fsptptr: int
    fpd: int
    """FPD of the PASID directory entry or of this entry."""
    flags: int
    """First-stage walk flags (``walk.F_*``) from SRE, WPE, NXE, SMEP, ERE, EAFE."""
    ssade: bool
    ssee: int


class IotlbEntry:
    """One IOTLB entry (or the leaf of an uncached translation).  ``alive`` is cleared in place when the
    IOTLB loses it, so every front-memo slot that points at it stops answering at once."""

    __slots__ = ("base", "mask", "allowed", "alive", "did", "pasid", "kind", "iova", "shift")

    def __init__(self, base: int, mask: int, allowed: int, alive: int, did: int, pasid: int, kind: int,
                 iova: int, shift: int) -> None:
        self.base = base
        self.mask = mask
        self.allowed = allowed
        """Bit ``req`` set: a request with those access bits (``access.READ | WRITE | EXEC | PRIV``) is allowed."""
        self.alive = alive
        self.did = did
        self.pasid = pasid
        self.kind = kind
        self.iova = iova
        self.shift = shift

    def fields(self) -> tuple[int, ...]:
        return (self.base, self.mask, self.allowed, self.alive, self.did, self.pasid, self.kind, self.iova,
                self.shift)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IotlbEntry) and self.fields() == other.fields()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (f"IotlbEntry(base={self.base:#x}, shift={self.shift}, allowed={self.allowed:#x}, alive={self.alive}, "
                f"did={self.did}, pasid={self.pasid:#x}, kind={KIND_NAMES[self.kind]}, iova={self.iova:#x})")


__all__ = ["FPD_SHIFT", "WALK", "PASID_SHIFT", "REASON_MASK", "DROPPED", "INTR_LO", "INTR_HI", "CTX_LEGACY",
           "CTX_SM", "TT_PT", "TT_DEV_TLB", "PGTT_FS", "PGTT_SS", "PGTT_NESTED", "PGTT_PT", "KIND_SS", "KIND_FS",
           "KIND_NESTED", "KIND_PT", "KIND_NAMES", "LegacyContext", "ScalableContext", "Context", "PasidEntry",
           "IotlbEntry"]
