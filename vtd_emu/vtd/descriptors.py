"""Decoded invalidations, as the unit performs them: what an invalidation observer receives.

Every invalidation the unit carries out — register-based (CCMD, IOTLB) or queued (descriptor types 1-4
and 6-9 of the invalidation queue) — is described by one of these NamedTuples and handed to each callable
registered with :meth:`VtdIommu.add_invalidation_observer`, after the unit's own caches were invalidated
(cold path only).  A vIOMMU bridge forwards them to the host.  A descriptor the queue refuses (IQE) was
not performed and is not reported.

The unit's other state changes a vIOMMU reconciles on — the root table pointer latched, translation
switched on or off, an invalidation wait reached, the queue run dry, a system reset — are
:data:`ControlEvent` NamedTuples handed to the callables registered with
:meth:`VtdIommu.add_control_observer` (cold path too).
"""

from __future__ import annotations

from typing import NamedTuple


class ContextInvalidation(NamedTuple):
    """Context-cache invalidation: ``granularity`` 1 global, 2 domain (``did``), 3 device (``sid`` under
    function mask ``fm``); ``done`` is the granularity actually performed (CCMD.CAIG)."""

    granularity: int
    did: int
    sid: int
    fm: int
    done: int
    queued: bool


class IotlbInvalidation(NamedTuple):
    """IOTLB invalidation: ``granularity`` 1 global, 2 domain, 3 page-selective (``addr``, 2^``am``
    pages, invalidation hint ``ih``); ``done`` as IOTLB.IAIG."""

    granularity: int
    did: int
    addr: int
    am: int
    ih: bool
    done: int
    queued: bool


class PasidIotlbInvalidation(NamedTuple):
    """PASID-based IOTLB invalidation (queued type 6): ``granularity`` 2 all of ``pasid`` in ``did``,
    3 page-selective within it."""

    granularity: int
    did: int
    pasid: int
    addr: int
    am: int
    ih: bool


class PasidCacheInvalidation(NamedTuple):
    """PASID-cache invalidation (queued type 7): ``granularity`` 0 domain, 1 PASID-selective, 3 global."""

    granularity: int
    did: int
    pasid: int


class DeviceTlbInvalidation(NamedTuple):
    """Device-TLB invalidation sent to endpoint ``sid`` (queued types 3 and 8): ``pasid`` is
    ``access.NO_PASID`` for entries without PASID, a PASID, or None for every PASID; ``answered`` False
    when no endpoint answered (the queue then reports ITE)."""

    sid: int
    pasid: int | None
    addr: int
    s: bool
    answered: bool


class IecInvalidation(NamedTuple):
    """Interrupt-entry-cache invalidation (queued type 4): every entry, or ``iidx`` .. ``iidx + 2^im - 1``."""

    all_entries: bool
    iidx: int
    im: int


class PageGroupResponse(NamedTuple):
    """A page group response (queued type 9); ``matched`` whether it answered an outstanding group."""

    sid: int
    pasid: int | None
    prgi: int
    code: int
    private_data: int | None
    matched: bool


class RootTableLatched(NamedTuple):
    """GCMD.SRTP latched RTADDR: the root table at ``root`` (``scalable``: TTM selected scalable mode)."""

    root: int
    scalable: bool


class TranslationEnableChanged(NamedTuple):
    """GCMD.TE changed: DMA remapping is now ``enabled`` (GSTS.TES already reflects it)."""

    enabled: bool


class InvalidationWait(NamedTuple):
    """The queue reached the invalidation-wait descriptor in slot ``slot`` and is about to perform it:
    every earlier descriptor has been carried out.  An observer that still has work to complete for those
    descriptors does it now (and may report its failure with ``InvalidationQueue.report_timeout``, which
    makes this wait abort with ITE)."""

    slot: int
    sw: bool
    interrupt: bool


class QueueIdle(NamedTuple):
    """The queue stopped fetching with IQH at slot ``head`` (it reached IQT, or an error or a disable
    stopped it): the end of a batch of queued descriptors."""

    head: int


class UnitReset(NamedTuple):
    """The unit was reset (:meth:`VtdIommu.reset`): registers at their defaults, caches empty, translation
    and the queue off."""


ControlEvent = RootTableLatched | TranslationEnableChanged | InvalidationWait | QueueIdle | UnitReset

Invalidation = (ContextInvalidation | IotlbInvalidation | PasidIotlbInvalidation | PasidCacheInvalidation
                | DeviceTlbInvalidation | IecInvalidation | PageGroupResponse)

__all__ = ["ContextInvalidation", "IotlbInvalidation", "PasidIotlbInvalidation", "PasidCacheInvalidation",
           "DeviceTlbInvalidation", "IecInvalidation", "PageGroupResponse", "Invalidation", "RootTableLatched",
           "TranslationEnableChanged", "InvalidationWait", "QueueIdle", "UnitReset", "ControlEvent"]
