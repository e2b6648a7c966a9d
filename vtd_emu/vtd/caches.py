"""The unit's translation caches and what each invalidation removes from them.

Context cache (by source id), PASID cache (by source id + PASID, tagged with the entry's DID), IOTLB
(tagged DID + PASID + page + page size) and first/second-stage paging-structure caches hold entries
until an invalidation of the right granularity, or a size limit, removes them: a guest that forgets to
invalidate sees stale translations as on hardware.

``front`` is a memo in front of all of them, keyed by (source id, request PASID, 4 KiB page): it only
ever holds what the caches behind it would answer, and is cleared whenever any of them loses an entry
that a memo entry could depend on, so an IOTLB hit costs one dict probe.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .access import NO_PASID
from .entries import (KIND_FS, KIND_NAMES, KIND_NESTED, KIND_PT, KIND_SS, Context, IotlbEntry, PasidEntry,
                      ScalableContext)

FRONT_LIMIT = 1 << 18
"""Front-memo slots; a fill past this clears the memo."""


def iotlb_key(did: int, ptag: int, size_idx: int, iova: int) -> int:
    """Packed key; ``size_idx`` 0/1/2/3 = 4K/2M/1G/512G page, ``iova`` page-aligned for that size."""
    return (((((did << 21) | ptag) << 2) | size_idx) << 52) | (iova >> 12)


_FM_MASKS = (0xFFFF, 0xFFFB, 0xFFF9, 0xFFF8)


def sid_matches(entry_sid: int, sid: int, fm: int) -> bool:
    """Device-selective match under a function mask: FM 1, 2, 3 ignore SID bit 2, bits 2:1, bits 2:0."""
    mask = _FM_MASKS[fm & 3]
    return (entry_sid & mask) == (sid & mask)


@dataclass(slots=True)
class CacheStats:
    iotlb_hits: int = 0
    iotlb_misses: int = 0
    context_hits: int = 0
    context_misses: int = 0
    pasid_hits: int = 0
    pasid_misses: int = 0
    walks: int = 0
    invalidations: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.invalidations[kind] = self.invalidations.get(kind, 0) + 1


class EvictionObserver(Protocol):
    """Told, before it happens, whenever a fill makes the caches lose something a front-memo answer could
    rest on (capacity evictions and replacements; invalidations are not fills and are not reported here).
    The batch engine uses it to know which of its answers stop being repeatable."""

    def entry_lost(self, entry: IotlbEntry) -> None:
        """``entry`` leaves the IOTLB (FIFO eviction, or a refill of its key)."""

    def memo_cleared(self) -> None:
        """The whole front memo is about to be cleared (an eviction from a cache without per-entry
        tracking, a flush of a full IOTLB, or memo overflow)."""

    def slot_replaced(self, key: int) -> None:
        """The front-memo slot ``key`` is rewritten (another request type of the same page)."""


class Caches:
    def __init__(self, *, iotlb_size: int, context_size: int, pasid_size: int, psc_size: int,
                 flush_when_full: bool = False, psi_mask_bits: int | None = None) -> None:
        self.iotlb_size = iotlb_size
        self.context_size = context_size
        self.pasid_size = pasid_size
        self.psc_size = psc_size
        self.flush_when_full = flush_when_full
        self.psi_mask_bits = psi_mask_bits
        self.front: dict[int, tuple[int, IotlbEntry]] = {}
        # OrderedDict: FIFO eviction with popitem(last=False) is O(1); next(iter(dict)) after many
        # deletions is not.
        self.context: OrderedDict[int, Context] = OrderedDict()
        self.pasid: OrderedDict[tuple[int, int], PasidEntry] = OrderedDict()
        self.iotlb: OrderedDict[int, IotlbEntry] = OrderedDict()
        # The IOTLB indexed so that an invalidation touches only what it can remove (the FIFO order stays
        # in ``iotlb``): every entry by DID; first-stage and nested entries by DID again (a page-selective
        # request drops them whatever their address); second-stage and pass-through entries by
        # (DID << 52 | page bucket), the bucket being the page number, or under ``psi_mask_bits`` its low
        # bits (the only ones QEMU compares).
        self._by_did: dict[int, dict[int, IotlbEntry]] = {}
        self._fs_by_did: dict[int, dict[int, IotlbEntry]] = {}
        self._by_page: dict[int, dict[int, IotlbEntry]] = {}
        self._bucket_mask = -1 if psi_mask_bits is None else (1 << psi_mask_bits) - 1
        # Paging-structure caches, filled by the walkers (walk.py) under packed keys
        # ((tag << 3 | level) << 56 | region); tag = DID (second stage) or DID << 20 | PASID (first stage).
        self.psc_ss: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self.psc_fs: OrderedDict[int, tuple[int, int, int, int]] = OrderedDict()
        self.stats = CacheStats()
        # Bit i set: the IOTLB may hold entries of page-size index i; lookups probe only those sizes.
        self.sizes_held = 0
        self.observer: EvictionObserver | None = None

    # -- fills -----------------------------------------------------------------------------------
    def put_context(self, sid: int, ctx: Context) -> None:
        if self.context_size == 0:
            return
        if len(self.context) >= self.context_size:
            if self.observer is not None:
                self.observer.memo_cleared()
            self.context.popitem(last=False)
            self.front.clear()
        self.context[sid] = ctx

    def put_pasid(self, sid: int, pasid: int, pe: PasidEntry) -> None:
        if self.pasid_size == 0:
            return
        if len(self.pasid) >= self.pasid_size:
            if self.observer is not None:
                self.observer.memo_cleared()
            self.pasid.popitem(last=False)
            self.front.clear()
        self.pasid[(sid, pasid)] = pe

    def put_iotlb(self, key: int, entry: IotlbEntry) -> None:
        if self.iotlb_size == 0:
            return
        iotlb = self.iotlb
        obs = self.observer
        if len(iotlb) >= self.iotlb_size and key not in iotlb:
            if self.flush_when_full:
                if obs is not None:
                    obs.memo_cleared()
                self._kill_all()
            else:
                if obs is not None:
                    obs.entry_lost(next(iter(iotlb.values())))
                old_key, old = iotlb.popitem(last=False)
                old.alive = 0
                self._unlink(old_key, old)
        prev = iotlb.get(key)
        if prev is not None:
            if obs is not None:
                obs.entry_lost(prev)
            prev.alive = 0
            self._unlink(key, prev)
        iotlb[key] = entry
        self.sizes_held |= 1 << ((key >> 52) & 3)
        did = entry.did
        d = self._by_did.get(did)
        if d is None:
            self._by_did[did] = {key: entry}
        else:
            d[key] = entry
        if entry.kind == KIND_FS or entry.kind == KIND_NESTED:
            d = self._fs_by_did.get(did)
            if d is None:
                self._fs_by_did[did] = {key: entry}
            else:
                d[key] = entry
        else:
            pk = (did << 52) | ((entry.iova >> 12) & self._bucket_mask)
            d = self._by_page.get(pk)
            if d is None:
                self._by_page[pk] = {key: entry}
            else:
                d[key] = entry

    def _unlink(self, key: int, entry: IotlbEntry) -> None:
        """Drop ``entry`` (stored under ``key``) from the indexes; the caller removes it from ``iotlb``."""
        did = entry.did
        d = self._by_did[did]
        del d[key]
        if not d:
            del self._by_did[did]
        if entry.kind == KIND_FS or entry.kind == KIND_NESTED:
            index, ik = self._fs_by_did, did
        else:
            index, ik = self._by_page, (did << 52) | ((entry.iova >> 12) & self._bucket_mask)
        d = index[ik]
        del d[key]
        if not d:
            del index[ik]

    def put_front(self, key: int, out4k: int, entry: IotlbEntry) -> None:
        front = self.front
        if self.observer is not None:
            if len(front) >= FRONT_LIMIT:
                self.observer.memo_cleared()
            elif key in front:
                self.observer.slot_replaced(key)
        if len(front) >= FRONT_LIMIT:
            front.clear()
        front[key] = (out4k, entry)

    # -- invalidation ----------------------------------------------------------------------------
    def _kill_all(self) -> None:
        for e in self.iotlb.values():
            e.alive = 0
        self.iotlb.clear()
        self._by_did.clear()
        self._fs_by_did.clear()
        self._by_page.clear()
        self.front.clear()
        self.sizes_held = 0

    def _kill_where(self, candidates: list[tuple[int, IotlbEntry]] | None,
                    pred: Callable[[IotlbEntry], bool]) -> int:
        """Remove the entries among ``candidates`` ((key, entry) pairs, a superset of what ``pred``
        accepts) that ``pred`` accepts."""
        if not candidates:
            return 0
        dead = [(k, e) for k, e in candidates if pred(e)]
        iotlb = self.iotlb
        for k, e in dead:
            del iotlb[k]
            e.alive = 0
            self._unlink(k, e)
        return len(dead)

    def _page_candidates(self, did: int, buckets: set[int] | None) -> list[tuple[int, IotlbEntry]] | None:
        """Entries of DID a page-selective request can remove: its first-stage and nested entries, and its
        other entries in ``buckets`` (page buckets; None: all of them)."""
        if buckets is None:
            d = self._by_did.get(did)
            return None if d is None else list(d.items())
        out = list(self._fs_by_did.get(did, {}).items())
        by_page = self._by_page
        for b in buckets:
            d = by_page.get((did << 52) | b)
            if d is not None:
                out.extend(d.items())
        return out

    def _spec_buckets(self, did: int, lo: int, hi: int) -> set[int] | None:
        """Pages at which an entry of a held size overlapping [lo, hi) starts; None when there are more of
        them than entries of DID (scanning those is cheaper)."""
        limit = len(self._by_did.get(did, ()))
        out: set[int] = set()
        for size_idx in range(4):
            if self.sizes_held >> size_idx & 1:
                shift = 12 + 9 * size_idx
                first, last = lo >> shift, (hi - 1) >> shift
                if last - first + 1 + len(out) > limit:
                    return None
                out.update((n << shift) >> 12 for n in range(first, last + 1))
        return out

    def _qemu_buckets(self, did: int, addr: int, am: int, bits: int) -> set[int] | None:
        """Buckets QEMU 7.2's comparison can hit: low page-number bits equal to the address's above AM, or
        the address's page at each held size (an entry containing it); None: every bucket."""
        if am >= bits or (1 << am) > len(self._by_did.get(did, ())):
            return None
        page = (addr >> 12) & ((1 << bits) - 1) & ~((1 << am) - 1)
        out = set(range(page, page + (1 << am)))
        for size_idx in range(4):
            if self.sizes_held >> size_idx & 1:
                shift = 12 + 9 * size_idx
                out.add(((addr & ~((1 << shift) - 1)) >> 12) & ((1 << bits) - 1))
        return out

    def context_global(self) -> None:
        self.stats.count("context-global")
        self.context.clear()
        self.front.clear()

    def context_domain(self, did: int) -> None:
        self.stats.count("context-domain")
        # Scalable-mode context entries carry no DID: a domain-selective request drops all of them.
        for sid in [s for s, c in self.context.items() if isinstance(c, ScalableContext) or c.did == did]:
            del self.context[sid]
        self.front.clear()

    def context_device(self, sid: int, fm: int) -> None:
        self.stats.count("context-device")
        for s in [s for s in self.context if sid_matches(s, sid, fm)]:
            del self.context[s]
        self.front.clear()

    def pasid_global(self) -> None:
        self.stats.count("pasid-global")
        self.pasid.clear()
        self.front.clear()

    def pasid_domain(self, did: int) -> None:
        self.stats.count("pasid-domain")
        for k in [k for k, pe in self.pasid.items() if pe.did == did]:
            del self.pasid[k]
        self.front.clear()

    def pasid_selective(self, did: int, pasid: int) -> None:
        self.stats.count("pasid-selective")
        for k in [k for k, pe in self.pasid.items() if pe.did == did and k[1] == pasid]:
            del self.pasid[k]
        self.front.clear()

    def iotlb_global(self) -> None:
        self.stats.count("iotlb-global")
        self._kill_all()
        self.psc_ss.clear()
        self.psc_fs.clear()

    def iotlb_domain(self, did: int) -> None:
        self.stats.count("iotlb-domain")
        d = self._by_did.get(did)
        self._kill_where(None if d is None else list(d.items()), lambda e: True)
        self._drop_psc(did, None)

    def iotlb_page(self, did: int, addr: int, am: int, ih: bool) -> None:
        """IOTLB page-selective: second-stage and pass-through entries of DID overlapping the range, and
        every first-stage and nested entry of DID whatever its address."""
        self.stats.count("iotlb-page")
        lo, hi = self._range(addr, am)
        bits = self.psi_mask_bits

        def hit(e: IotlbEntry) -> bool:
            if e.did != did:
                return False
            if e.kind in (KIND_FS, KIND_NESTED):
                return True
            if bits is not None:
                # QEMU 7.2 (vtd_hash_remove_by_page): page numbers compared through an 8-bit mask
                # (over-invalidation), or the invalidated address falls inside the entry's own page
                # (a 2 MiB or 1 GiB entry hit anywhere but at its start).
                mask = ((1 << bits) - 1) & ~((1 << am) - 1) if am < bits else 0
                return (((e.iova >> 12) & mask) == ((addr >> 12) & mask)
                        or e.iova == addr & ~((1 << e.shift) - 1))
            return e.iova < hi and e.iova + (1 << e.shift) > lo

        if did in self._by_did:
            buckets = (self._spec_buckets(did, lo, hi) if bits is None
                       else self._qemu_buckets(did, addr, am, bits))
            self._kill_where(self._page_candidates(did, buckets), hit)
        if not ih:
            self._drop_psc(did, None)

    def piotlb_pasid(self, did: int, pasid: int) -> None:
        self.stats.count("piotlb-pasid")
        d = self._by_did.get(did)
        self._kill_where(None if d is None else list(d.items()), lambda e: e.pasid == pasid)
        self._drop_psc(did, pasid)

    def piotlb_page(self, did: int, pasid: int, addr: int, am: int, ih: bool) -> None:
        """PASID-based page-selective: first-stage and nested entries of DID+PASID in the range; never
        second-stage-only or pass-through entries."""
        self.stats.count("piotlb-page")
        lo, hi = self._range(addr, am)
        d = self._fs_by_did.get(did)
        self._kill_where(None if d is None else list(d.items()),
                         lambda e: e.pasid == pasid and e.iova < hi and e.iova + (1 << e.shift) > lo)
        if not ih:
            self._drop_psc(did, pasid, fs_only=True)

    @staticmethod
    def _range(addr: int, am: int) -> tuple[int, int]:
        size = 1 << (12 + am)
        lo = addr & ~(size - 1) & 0xFFFF_FFFF_FFFF_F000
        return lo, lo + size

    def _drop_psc(self, did: int, pasid: int | None, fs_only: bool = False) -> None:
        if not fs_only:
            for k in [k for k in self.psc_ss if k >> 59 == did]:
                del self.psc_ss[k]
        for k in [k for k in self.psc_fs
                  if k >> 79 == did and (pasid is None or (k >> 59) & 0xFFFFF == pasid)]:
            del self.psc_fs[k]

    def flush_all(self) -> None:
        self.context.clear()
        self.pasid.clear()
        self._kill_all()
        self.psc_ss.clear()
        self.psc_fs.clear()

    def sizes(self) -> dict[str, int]:
        return {"context": len(self.context), "pasid": len(self.pasid), "iotlb": len(self.iotlb),
                "psc_ss": len(self.psc_ss), "psc_fs": len(self.psc_fs)}


__all__ = ["Caches", "CacheStats", "EvictionObserver", "FRONT_LIMIT", "iotlb_key", "sid_matches", "NO_PASID",
           "KIND_SS", "KIND_FS", "KIND_NESTED", "KIND_PT", "KIND_NAMES"]
