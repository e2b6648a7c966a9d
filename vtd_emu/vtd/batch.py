"""Batched replay: translate runs of DMA chunks with numpy, exactly as the scalar path would.

The scalar path translates one 4 KiB chunk at a time (``VtdIommu.xlate``) and moves its bytes.  A *run* is
a sequence of chunks with no event in between that touches registers, tables or caches (only DMA).  Inside
a run memory changes only through the DMA payloads, so this module can:

1. **Dedupe.**  Chunks are keyed by (source id, PASID tag, 4 KiB page, request) and sorted once (packed
   ``key << 20 | position`` in one ``np.sort``): every distinct key is handled once, in first-use order,
   and repeats cost a gather.  Windows are at most 2**20 chunks.
2. **Walk with numpy.**  For the distinct keys the front memo does not answer, the root/context/PASID
   structures are decoded once per (source id, PASID) stream (through the chip's own decoders) and the
   page tables are walked for all keys of a stream at once, one gather per level over the u64 rows of
   ``HostRAM`` (pfn → row through :class:`PageIndex`: a dense lookup slice when the pages are close, else
   ``searchsorted``).
3. **Fill the caches in first-use order** with the chip's own calls (``probe_iotlb``, ``put_context``,
   ``put_pasid``, ``fill`` → ``put_iotlb``, ``put_front``), replaying the paging-structure-cache probes
   and inserts and first-stage A/D updates the walkers would have done.  So the caches end in the state,
   and the FIFO order, the scalar path leaves, and the hit counters agree too.

Exactness rules (why the result equals the scalar path's, chunk for chunk):

* A cache entry filled inside the run is coherent with memory (memory does not change), so only entries
  that existed before can be stale, and the scalar path prefers them: the front memo and the IOTLB are
  probed first, exactly as ``xlate`` does, and a paging-structure-cache entry that would be used is
  compared with what memory says; if they differ, that key takes the scalar path (tier B below).
* A key's repeats are answered from the key's first result only while the key is *stable*: its front-memo
  slot holds a live entry that allows the request.  Whatever could end that — an IOTLB eviction or
  replacement (FIFO past capacity, a refill of the same IOTLB key), a front-memo slot rewritten for
  another request type, a context/PASID-cache eviction or front-memo overflow (both clear the memo) — is
  observed as it happens (the window is the caches' :class:`~vtd_emu.vtd.caches.EvictionObserver` while it
  runs), and the run is cut
  at the next occurrence of every key that depended on what was lost.  A key whose first result is not
  stable (a fault, a drop, an uncached translation) cuts the run at its second occurrence.
* Anything the numpy walker does not cover — faults, pass-through, nested, second-stage A/D, privileged
  requests, quirk profiles that change the lookup order, a stale paging-structure entry, tables modified
  earlier in the run — goes through ``iommu.xlate`` itself (tier B) at the key's first use, after the
  payloads of every earlier chunk have been written, so it sees memory exactly as the scalar path would.
* A DMA write that lands on a page a walk of the run read from (a table, a context or PASID entry) cuts
  the run right after it.  Everything after a cut is replayed by the scalar loop for a while, then
  batching resumes.
* Payloads are written after the run's translations, in chunk order semantics: exact duplicates keep
  the last write, partial overlaps (or reads overlapping writes, when read data is wanted) fall back to
  a sequential copy.  ``HostRAM.generation`` advances by one per chunk written, as with ``HostRAM.write``.

Anything that makes batching unsafe as a whole — ``HostRAM.watch`` in use, a sanitizing unit, memory that
is not a ``HostRAM`` — sends the whole run through the scalar loop.  The property test in
``tests/test_batch.py`` checks batched == scalar on random tables and traces, stale caches included.

This module uses the chip's public decode/fill interface (``load_context``, ``load_pasid``,
``probe_iotlb``, ``fill``, the caches and their eviction observer, ``HostRAM.page_rows``/``u64_pool``) and
mirrors ``lookup``'s order of operations; the property test is what keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable

import numpy as np

from ..errors import InternalError
from ..memory import PAGE_SIZE, HostRAM
from .access import NO_PASID, READ, REQ_X, WRITE, ss_allowed
from .entries import (CTX_LEGACY, DROPPED, INTR_HI, INTR_LO, KIND_FS, KIND_SS, PGTT_FS, PGTT_SS, TT_PT, Context,
                      IotlbEntry, PasidEntry)
from .iommu import VtdIommu
from .walk import ADDR_MASK, F_EAFE, FS_A, FS_D, FS_EA, canonical, fs_allowed, set_ad

SKIPPED = -(1 << 17)
"""Chunk result of a DMA to the interrupt window under ``interrupt_window_untranslated`` (not translated)."""

MAX_WINDOW = 1 << 20
_POS_BITS = 20
_KEY_BITS = 64 - _POS_BITS
_DENSE_MAX = 1 << 22

# Stream kinds
_IDENTITY, _SCALAR, _SS, _FS = 0, 1, 2, 3


class PageIndex:
    """pfn → row of ``HostRAM.u64_pool()``, vectorised.  Rows are only ever added, in insertion order of
    ``HostRAM.page_rows()``, so the index grows incrementally from its tail."""

    def __init__(self, ram: HostRAM) -> None:
        self.ram = ram
        self.count = 0
        self.pfns = np.zeros(0, np.uint64)
        self.rows = np.zeros(0, np.int64)

    def refresh(self) -> None:
        rows = self.ram.page_rows()
        n = len(rows)
        if n == self.count:
            return
        new = n - self.count
        # The newest pages are the dict's last keys (rows are handed out in insertion order).
        tail = list(islice(reversed(rows), new))
        pf = np.array(tail, dtype=np.uint64)
        rw = np.fromiter((rows[p] for p in tail), np.int64, new)
        pfns = np.concatenate([self.pfns, pf])
        allrows = np.concatenate([self.rows, rw])
        order = np.argsort(pfns, kind="stable")
        self.pfns, self.rows = pfns[order], allrows[order]
        self.count = n

    def lookup(self, pfns: np.ndarray) -> np.ndarray:
        """Row of each pfn, -1 where the page was never written."""
        self.refresh()
        out = np.full(pfns.shape, -1, np.int64)
        if not self.pfns.size or not pfns.size:
            return out
        lo, hi = int(pfns.min()), int(pfns.max())
        a = int(np.searchsorted(self.pfns, np.uint64(lo)))
        b = int(np.searchsorted(self.pfns, np.uint64(hi), side="right"))
        if a == b:
            return out
        span = hi - lo + 1
        if span <= max(4 * pfns.size, 1 << 16):
            # Dense slice: one gather, no search (table pages come from one allocator and sit together).
            lut = np.full(span, -1, np.int64)
            lut[(self.pfns[a:b] - np.uint64(lo)).astype(np.int64)] = self.rows[a:b]
            return lut[(pfns - np.uint64(lo)).astype(np.int64)]
        pos = np.searchsorted(self.pfns[a:b], pfns)
        pos = np.minimum(pos, b - a - 1)
        hit = self.pfns[a:b][pos] == pfns
        out[hit] = self.rows[a:b][pos[hit]]
        return out

    def gather(self, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, not-memory mask) of 8-byte-aligned u64 reads, as ``HostRAM.read_u64`` would give."""
        ram = self.ram
        rows = self.lookup(addrs >> np.uint64(12))
        cols = ((addrs >> np.uint64(3)) & np.uint64(511)).astype(np.int64)
        vals = np.zeros(addrs.shape, np.uint64)
        have = rows >= 0
        vals[have] = ram.u64_pool()[rows[have], cols[have]]
        if ram.size >= 1 << 64:
            nomem = np.zeros(addrs.shape, bool)
        else:
            nomem = addrs > np.uint64(ram.size - 8)
        return vals, nomem


@dataclass(slots=True)
class _Stream:
    kind: int
    sid: int
    ptag: int
    ctx: Context | None = None
    pe: PasidEntry | None = None
    pasid: int = 0
    tag: int = 0
    did: int = 0
    levels: int = 0
    root: int = 0
    flags: int = 0
    ssee: int = 0
    sm: bool = False


@dataclass(slots=True)
class _Walk:
    """Per-level numpy walk results of one stream's keys (arrays indexed [level][i])."""

    ok: np.ndarray
    leaf: np.ndarray
    base: np.ndarray
    ea: np.ndarray
    e: np.ndarray
    c1: np.ndarray     # SS: cumulative perm after level l; FS: cumulative R/W
    c2: np.ndarray | None = None   # FS: cumulative U/S
    c3: np.ndarray | None = None   # FS: cumulative XD
    read: np.ndarray | None = None  # [level][i]: whether the walk read that level
    # Per key (index i) Python lists of the same, for phase 2 (numpy scalar access is slow per element).
    okl: list[bool] = field(default_factory=list)
    leafl: list[int] = field(default_factory=list)
    basel: list[int] = field(default_factory=list)
    el: list[list[int]] = field(default_factory=list)
    eal: list[list[int]] = field(default_factory=list)
    c1l: list[list[int]] = field(default_factory=list)
    c2l: list[list[int]] = field(default_factory=list)
    c3l: list[list[int]] = field(default_factory=list)
    index: dict[int, int] = field(default_factory=dict)   # key rank -> column


@dataclass
class RunStats:
    batched_chunks: int = 0
    scalar_chunks: int = 0
    windows: int = 0
    tier_a: int = 0
    tier_b: int = 0
    front_hits: int = 0


class BatchEngine:
    """Runs chunk sequences on one unit; see the module docstring for the rules."""

    def __init__(self, iommu: VtdIommu, *, window: int = 1 << 16) -> None:
        if not isinstance(iommu.mem, HostRAM):
            raise InternalError("BatchEngine needs a unit over HostRAM")
        self.iommu = iommu
        self.ram: HostRAM = iommu.mem
        self.index = PageIndex(self.ram)
        self.max_window = min(window, MAX_WINDOW)
        self.stats = RunStats()

    # -- eligibility ---------------------------------------------------------------------------------
    def usable(self) -> bool:
        io = self.iommu
        return (io.mem is self.ram and self.ram.watch is None and "xlate" not in io.__dict__
                and io.front_ok)

    # -- public entry points -------------------------------------------------------------------------
    def translate(self, sid: np.ndarray, ptag: np.ndarray, iova: np.ndarray, req: np.ndarray) -> np.ndarray:
        """``[iommu.xlate(s, p, i, r) for ...]`` with the same effects on the unit (no data moves)."""
        n = int(iova.shape[0])
        res = np.empty(n, np.int64)
        z = np.zeros(n, np.int64)
        self._run(np.asarray(sid, np.int64), np.asarray(ptag, np.int64), np.asarray(iova, np.uint64),
                  np.asarray(req, np.int64), res, z, z, None, None, None)
        return res

    def run_chunks(self, sid: np.ndarray, ptag: np.ndarray, iova: np.ndarray, req: np.ndarray, clen: np.ndarray,
                   src: np.ndarray, blob: np.ndarray, read_dst: np.ndarray | None,
                   read_buf: np.ndarray | None) -> np.ndarray:
        """Translate chunks and move their bytes: writes copy ``blob[src:src+clen]``; reads, when
        ``read_buf`` is given, land at ``read_buf[read_dst:...]``.  Returns each chunk's result."""
        n = int(iova.shape[0])
        res = np.empty(n, np.int64)
        self._run(sid, ptag, iova, req, res, clen, src, blob, read_dst, read_buf)
        return res

    # -- the loop over windows -----------------------------------------------------------------------
    def _run(self, sid: np.ndarray, ptag: np.ndarray, iova: np.ndarray, req: np.ndarray, res: np.ndarray,
             clen: np.ndarray, src: np.ndarray, blob: np.ndarray | None, read_dst: np.ndarray | None,
             read_buf: np.ndarray | None) -> None:
        n = int(iova.shape[0])
        skip = np.zeros(n, bool)
        if self.iommu.quirks.interrupt_window_untranslated:
            skip = (iova >= np.uint64(INTR_LO)) & (iova < np.uint64(INTR_HI))
            res[skip] = SKIPPED
        pos = 0
        w = self.max_window
        backoff = 1
        data = _Data(self, sid, ptag, iova, req, res, clen, src, blob, read_dst, read_buf, skip)
        while pos < n:
            if not self.usable() or n - pos < 16:
                end = n
                self._scalar(data, pos, end)
                pos = end
                continue
            end = min(n, pos + w)
            cut = self._window(data, pos, end)
            self.stats.windows += 1
            self.stats.batched_chunks += cut - pos
            if cut >= end:
                pos = end
                w = min(w * 2, self.max_window)
                backoff = 1
                continue
            progress = cut - pos
            w = max(1024, min(self.max_window, 2 * progress))
            backoff = min(backoff * 2, 8192) if progress < 64 else 1
            stop = min(n, cut + backoff)
            self._scalar(data, cut, stop)
            pos = stop

    def _scalar(self, d: "_Data", a: int, b: int) -> None:
        """The scalar path, chunk by chunk (what replay does without batching)."""
        io = self.iommu
        ram = self.ram
        xl = io.xlate
        sid, ptag, iova, req, res = d.sid, d.ptag, d.iova, d.req, d.res
        self.stats.scalar_chunks += b - a
        sl = slice(a, b)
        sids, ptags, iovas, reqs = sid[sl].tolist(), ptag[sl].tolist(), iova[sl].tolist(), req[sl].tolist()
        skips = d.skip[sl].tolist()
        lens = d.clen[sl].tolist()
        srcs = d.src[sl].tolist()
        dsts = d.read_dst[sl].tolist() if d.read_buf is not None and d.read_dst is not None else None
        blob = d.blob
        buf = d.read_buf
        out = [0] * (b - a)
        for k in range(b - a):
            if skips[k]:
                out[k] = SKIPPED
                continue
            r = xl(sids[k], ptags[k], iovas[k], reqs[k])
            out[k] = r
            if r >= 0 and blob is not None:
                n = lens[k]
                if reqs[k] & WRITE:
                    s = srcs[k]
                    ram.write(r, blob[s:s + n].data)
                elif buf is not None and dsts is not None:
                    t = dsts[k]
                    buf[t:t + n] = np.frombuffer(ram.read(r, n), np.uint8)
        res[sl] = out
        d.done = b

    # -- one window ----------------------------------------------------------------------------------
    def _window(self, d: "_Data", a: int, b: int) -> int:
        """Translate chunks [a, b) and apply their data; returns the position it stopped at (== b when the
        whole window was batched).  Everything before the returned position is done, exactly."""
        io = self.iommu
        if not io.te:
            # Translation off: every request is untranslated, nothing is cached or recorded.
            live = ~d.skip[a:b]
            d.res[a:b][live] = d.iova[a:b][live].astype(np.int64)
            d.apply(a, b)
            return b
        keys = _dedupe(d.sid[a:b], d.ptag[a:b], d.iova[a:b], d.req[a:b], d.skip[a:b])
        if keys is None:
            return a
        return _Window(self, d, a, b, keys).run()


class _Data:
    """The chunk arrays of one run and the data side of it (payload writes, read copies)."""

    def __init__(self, eng: BatchEngine, sid: np.ndarray, ptag: np.ndarray, iova: np.ndarray, req: np.ndarray,
                 res: np.ndarray, clen: np.ndarray, src: np.ndarray, blob: np.ndarray | None,
                 read_dst: np.ndarray | None, read_buf: np.ndarray | None, skip: np.ndarray) -> None:
        self.eng = eng
        self.sid, self.ptag, self.iova, self.req, self.res = sid, ptag, iova, req, res
        self.clen, self.src, self.blob, self.read_dst, self.read_buf, self.skip = clen, src, blob, read_dst, read_buf, skip
        self.done = 0

    def apply(self, a: int, b: int) -> None:
        """Move the bytes of chunks [a, b), whose results are final, as the scalar loop would."""
        if self.blob is None or a >= b:
            self.done = max(self.done, b)
            return
        ram = self.eng.ram
        res = self.res[a:b]
        ok = res >= 0
        wr = ok & ((self.req[a:b] & WRITE) != 0)
        rd = ok & ~wr if self.read_buf is not None else np.zeros(b - a, bool)
        widx = np.flatnonzero(wr)
        ridx = np.flatnonzero(rd)
        if not widx.size and not ridx.size:
            self.done = b
            return
        lens = self.clen[a:b].astype(np.int64)
        out = res.astype(np.int64)
        size = ram.size
        if size < 1 << 64 and ((out + lens) > size)[ok].any():
            self._sequential(a, b)
            return
        # Rows for every page a write lands on must exist before the pool is viewed (it may grow).
        if widx.size:
            pages = np.unique(out[widx] >> 12)
            for p in pages.tolist():
                ram.ensure_page(p)
        pool = ram.u64_pool().reshape(-1).view(np.uint8)
        idx = self.eng.index
        if widx.size:
            wrow = idx.lookup((out[widx] >> 12).astype(np.uint64))
            wdst = wrow * PAGE_SIZE + (out[widx] & 0xFFF)
            wlen = lens[widx]
            wsrc = self.src[a:b].astype(np.int64)[widx]
        if ridx.size:
            rrow = idx.lookup((out[ridx] >> 12).astype(np.uint64))
            rsrc = np.where(rrow >= 0, rrow * PAGE_SIZE + (out[ridx] & 0xFFF), -1)
            rlen = lens[ridx]
            assert self.read_dst is not None
            rdst = self.read_dst[a:b].astype(np.int64)[ridx]
        if ridx.size and widx.size and _reads_meet_writes(rsrc, rlen, wdst, wlen):
            self._sequential(a, b)
            return
        if widx.size:
            keep = _last_writes(wdst, wlen)
            if keep is None:
                self._sequential(a, b, reads=False)
            else:
                assert self.blob is not None
                _copy(pool, wdst[keep], self.blob, wsrc[keep], wlen[keep])
                ram.generation += int(widx.size)  # one per chunk, as HostRAM.write counts
        if ridx.size:
            assert self.read_buf is not None
            have = rsrc >= 0
            _copy(self.read_buf, rdst[have], pool, rsrc[have], rlen[have])
            # Never-written pages read as zeros; the buffer starts zeroed.
        self.done = b

    def _sequential(self, a: int, b: int, reads: bool = True) -> None:
        ram = self.eng.ram
        res = self.res[a:b].tolist()
        reqs = self.req[a:b].tolist()
        lens = self.clen[a:b].tolist()
        srcs = self.src[a:b].tolist()
        blob = self.blob
        buf = self.read_buf if reads else None
        dsts = self.read_dst[a:b].tolist() if buf is not None and self.read_dst is not None else None
        for k, r in enumerate(res):
            if r < 0:
                continue
            n = lens[k]
            if reqs[k] & WRITE:
                if blob is not None:
                    s = srcs[k]
                    ram.write(r, blob[s:s + n].data)
            elif buf is not None and dsts is not None:
                t = dsts[k]
                buf[t:t + n] = np.frombuffer(ram.read(r, n), np.uint8)
        self.done = b


def _reads_meet_writes(rs: np.ndarray, rl: np.ndarray, ws: np.ndarray, wl: np.ndarray) -> bool:
    """Whether any read byte range intersects any write byte range (then order matters)."""
    live = rs >= 0
    rs, rl = rs[live], rl[live]
    if not rs.size:
        return False
    starts = np.concatenate([rs, ws])
    ends = np.concatenate([rs + rl, ws + wl])
    is_w = np.concatenate([np.zeros(rs.size, bool), np.ones(ws.size, bool)])
    o = np.argsort(starts, kind="stable")
    starts, ends, is_w = starts[o], ends[o], is_w[o]
    wend = np.maximum.accumulate(np.where(is_w, ends, -1))
    rend = np.maximum.accumulate(np.where(~is_w, ends, -1))
    prev_w = np.concatenate([[-1], wend[:-1]])
    prev_r = np.concatenate([[-1], rend[:-1]])
    return bool(((~is_w) & (starts < prev_w)).any() or (is_w & (starts < prev_r)).any())


def _last_writes(dst: np.ndarray, ln: np.ndarray) -> np.ndarray | None:
    """Indices of the writes to keep (the last of exact duplicates), None if ranges partly overlap.

    NumPy leaves the order of repeated fancy-index assignments unspecified, so duplicates are resolved
    here: one sort of ``dst << 20 | position`` puts each destination's last write at the end of its group."""
    n = dst.size
    if n == 0:
        return np.zeros(0, np.int64)
    if int(dst.max()) >> 43 or n > 1 << 20:
        o = np.lexsort((np.arange(n), dst))
    else:
        packed = (dst.astype(np.uint64) << np.uint64(20)) | np.arange(n, dtype=np.uint64)
        packed.sort()
        o = (packed & np.uint64((1 << 20) - 1)).view(np.int64)
    sd, sl = dst[o], ln[o]
    last = np.ones(n, bool)
    same = sd[1:] == sd[:-1]
    if same.any():
        if (same & (sl[1:] != sl[:-1])).any():
            return None  # same start, different lengths: the earlier, longer write partly survives
        last[:-1] = ~same
    keep = o[last]
    kd, kl = sd[last], sl[last]
    if kd.size > 1 and ((kd[:-1] + kl[:-1]) > kd[1:]).any():
        return None
    return keep


_COPY_BYTES = 1 << 22


def _copy(dst: np.ndarray, doff: np.ndarray, src: np.ndarray, soff: np.ndarray, ln: np.ndarray) -> None:
    """dst[doff[i]:+ln[i]] = src[soff[i]:+ln[i]] for all i (byte arrays; the dst ranges are disjoint).

    Per group of equal lengths L: whole rows of a (-1, L) view when every offset is a multiple of L (one
    memcpy per row), else fancy indexing in the widest word that divides L and every offset, a few MiB of
    indices at a time."""
    if not ln.size:
        return
    lens = np.unique(ln)
    for L in lens.tolist():
        sel = np.flatnonzero(ln == L) if lens.size > 1 else np.arange(ln.size)
        d, s_ = doff[sel], soff[sel]
        if dst.size % L == 0 and src.size >= L and not (d % L).any() and not (s_ % L).any():
            dv = dst.reshape(-1, L)
            sv = src[:src.size - src.size % L].reshape(-1, L)
            step = max(1, _COPY_BYTES // L)
            for j in range(0, sel.size, step):
                dv[d[j:j + step] // L] = sv[s_[j:j + step] // L]
            continue
        w = 8
        while w > 1 and (L % w or (d % w).any() or (s_ % w).any() or dst.size % w or src.size % w):
            w //= 2
        dt = {8: np.uint64, 4: np.uint32, 2: np.uint16, 1: np.uint8}[w]
        dv, sv = dst.view(dt), src.view(dt)
        ar = np.arange(L // w, dtype=np.int64)
        step = max(1, _COPY_BYTES // L)
        for j in range(0, sel.size, step):
            dv[((d[j:j + step] // w)[:, None] + ar).reshape(-1)] = sv[((s_[j:j + step] // w)[:, None] + ar).reshape(-1)]


class _Keys:
    """The distinct keys of a window, numbered by *rank* (first-use order).  Two layouts: sorted (``occ``
    lists chunk positions grouped by key, from one sort of packed keys) and dense (a small code per chunk
    when the keys fit a lookup table, so no chunk-sized random access is ever needed)."""

    n: int
    first: np.ndarray   # per rank: window-relative position of its first use
    u: int

    def second(self) -> np.ndarray:
        """Per rank: the position of its second use, or ``n``."""
        raise NotImplementedError

    def next_occ(self, r: int, after: int) -> int:
        raise NotImplementedError

    def rank_at(self, a: int, b: int) -> np.ndarray:
        """Ranks of the chunks at window positions [a, b)."""
        raise NotImplementedError

    def assemble(self, page: np.ndarray, off: np.ndarray, cut: int) -> np.ndarray:
        """Per chunk of [0, cut): its key's page | offset (or the page value when negative)."""
        raise NotImplementedError


class _SortedKeys(_Keys):
    def __init__(self, n: int, occ: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        self.n = n
        self.occ = occ
        self.counts = counts
        order = np.argsort(occ[starts], kind="stable")
        self.u = int(order.size)
        self.rank_of_gid = np.empty(self.u, np.int64)
        self.rank_of_gid[order] = np.arange(self.u)
        self.gstart = starts[order]
        self.gend = self.gstart + counts[order]
        self.first = occ[self.gstart]
        self._second: np.ndarray | None = None
        self._rank: np.ndarray | None = None

    def second(self) -> np.ndarray:
        if self._second is None:
            self._second = np.where(self.gend - self.gstart > 1, self.occ[np.minimum(self.gstart + 1, self.n - 1)],
                                    self.n)
        return self._second

    def next_occ(self, r: int, after: int) -> int:
        s, e = int(self.gstart[r]), int(self.gend[r])
        i = int(np.searchsorted(self.occ[s:e], after, side="right"))
        return int(self.occ[s + i]) if i < e - s else self.n

    def rank_at(self, a: int, b: int) -> np.ndarray:
        if self._rank is None:
            gid = np.repeat(np.arange(self.counts.size), self.counts)
            r = np.empty(self.n, np.int64)
            r[self.occ] = self.rank_of_gid[gid]
            self._rank = r
        return self._rank[a:b]

    def assemble(self, page: np.ndarray, off: np.ndarray, cut: int) -> np.ndarray:
        vals = np.repeat(page[self.rank_of_gid], self.counts)
        occ = self.occ
        if cut < self.n:
            keep = occ < cut
            vals, occ = vals[keep], occ[keep]
        o = off[occ]
        out = np.empty(cut, np.int64)
        out[occ] = np.where(vals >= 0, vals | o, vals)
        return out


class _DenseKeys(_Keys):
    def __init__(self, n: int, code: np.ndarray, size: int) -> None:
        self.n = n
        self.code = code
        pos = np.arange(n, dtype=np.int64)
        first = np.full(size, n, np.int64)
        np.minimum.at(first, code, pos)
        present = np.flatnonzero(first < n)
        order = np.argsort(first[present], kind="stable")
        self.codes = present[order]          # per rank
        self.first = first[self.codes]
        self.u = int(self.codes.size)
        self.size = size
        self.lut = np.full(size, -1, np.int64)
        self.lut[self.codes] = np.arange(self.u)
        self._second: np.ndarray | None = None

    def second(self) -> np.ndarray:
        if self._second is None:
            pos = np.arange(self.n, dtype=np.int64)
            rest = pos != self.first[self.lut[self.code]]
            sec = np.full(self.size, self.n, np.int64)
            np.minimum.at(sec, self.code[rest], pos[rest])
            self._second = sec[self.codes]
        return self._second

    def next_occ(self, r: int, after: int) -> int:
        hits = np.flatnonzero(self.code[after + 1:] == self.codes[r])
        return after + 1 + int(hits[0]) if hits.size else self.n

    def rank_at(self, a: int, b: int) -> np.ndarray:
        return self.lut[self.code[a:b]]

    def assemble(self, page: np.ndarray, off: np.ndarray, cut: int) -> np.ndarray:
        by_code = np.full(self.size, -1, np.int64)
        by_code[self.codes] = page
        vals = by_code[self.code[:cut]]
        if (page >= 0).all():
            vals |= off[:cut]
            return vals
        return np.where(vals >= 0, vals | off[:cut], vals)


def _stream_index(sr: np.ndarray) -> tuple[np.ndarray, int]:
    """Small dense ids for the distinct (source id, PASID tag, request) values of a window."""
    lo, hi = int(sr.min()), int(sr.max())
    if lo == hi:
        return np.zeros(sr.size, np.int64), 1
    if hi - lo < 1 << 22:
        present = np.flatnonzero(np.bincount(sr - lo))
        lut = np.zeros(hi - lo + 1, np.int64)
        lut[present] = np.arange(present.size)
        return lut[sr - lo], int(present.size)
    u, inv = np.unique(sr, return_inverse=True)
    return inv.astype(np.int64), int(u.size)


_HASH_MULTS = (0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0xD6E8_FEB8_6659_FD93)


def _dedupe(sid: np.ndarray, ptag: np.ndarray, iova: np.ndarray, req: np.ndarray, skip: np.ndarray) -> _Keys | None:
    n = int(iova.shape[0])
    if n > MAX_WINDOW:
        raise InternalError("window larger than MAX_WINDOW")
    has_skip = bool(skip.any())
    if not has_skip and sid.min() == sid.max() and ptag.min() == ptag.max():
        # One requester and PASID (the common case): the request type alone separates streams.
        lo_r = int(req.min())
        s_idx, ns = (req - lo_r).astype(np.int64), int(req.max()) - lo_r + 1
    else:
        sr = sid.astype(np.int64) << 25
        sr |= ptag.astype(np.int64) << 4
        sr |= req
        if has_skip:
            # Skipped chunks (interrupt window) get a stream of their own: never a key shared with a translation.
            sr[skip] = -1
        s_idx, ns = _stream_index(sr)
    pg = iova >> np.uint64(12)
    lo = pg.min()
    span = int(pg.max() - lo) + 1
    if span * ns <= max(4 * n, 1 << 16) and span * ns <= _DENSE_MAX:
        code = (pg - lo).view(np.int64)
        if ns > 1:
            code += s_idx * span
        return _DenseKeys(n, code, span * ns)
    dense = _region_codes(pg, s_idx, ns)
    if dense is not None:
        return _DenseKeys(n, dense[0], dense[1])
    pbits = (span - 1).bit_length()
    sbits = (ns - 1).bit_length()
    if pbits + sbits > _KEY_BITS:
        return None
    pg -= lo
    if ns > 1:
        pg |= s_idx.astype(np.uint64) << np.uint64(pbits)
    pg <<= np.uint64(_POS_BITS)
    pg |= np.arange(n, dtype=np.uint64)
    pg.sort()
    occ = (pg & np.uint64((1 << _POS_BITS) - 1)).view(np.int64)
    pg >>= np.uint64(_POS_BITS)
    newk = np.empty(n, bool)
    newk[0] = True
    np.not_equal(pg[1:], pg[:-1], out=newk[1:])
    starts = np.flatnonzero(newk)
    counts = np.diff(np.append(starts, n))
    return _SortedKeys(n, occ, starts, counts)


def _region_codes(pg: np.ndarray, s_idx: np.ndarray, ns: int) -> tuple[np.ndarray, int] | None:
    """Dense key codes for pages scattered over few 2 MiB regions: a perfect hash of the distinct regions
    (checked, several multipliers tried) numbers them, the page's index in its region does the rest.  No
    chunk-sized sort or scatter is needed, only gathers from small tables."""
    reg = pg >> np.uint64(9)
    ureg = np.unique(reg)
    nreg = int(ureg.size)
    if nreg * 512 * ns > _DENSE_MAX:
        return None
    # A table of about 2·n² slots makes a random multiplier collision-free with probability ~0.8; capped
    # at 4 Mi slots (past ~1,400 regions the sort path takes over).
    bits = min(22, max(4, (2 * nreg * nreg).bit_length()))
    shift = np.uint64(64 - bits)
    for mult in _HASH_MULTS:
        m = np.uint64(mult)
        h = (ureg * m) >> shift
        if np.unique(h).size == nreg:
            lut = np.full(1 << bits, -1, np.int32)
            lut[h.view(np.int64)] = np.arange(nreg, dtype=np.int32)
            reg *= m
            reg >>= shift
            code = lut[reg.view(np.int64)].astype(np.int64)
            code <<= 9
            code |= (pg & np.uint64(511)).view(np.int64)
            size = nreg * 512
            if ns > 1:
                code += s_idx * size
            return code, size * ns
    return None


class _Window:
    """Phase 1 (numpy walks, per stream, on first need) and phase 2 (per distinct key, first-use order) of
    one window."""

    def __init__(self, eng: BatchEngine, d: _Data, a: int, b: int, keys: _Keys) -> None:
        self.eng, self.d, self.a, self.b, self.k = eng, d, a, b, keys
        self.io = eng.iommu
        self.cut = keys.n           # window-relative position the run ends at
        self.cur = 0                # first-use position of the key being processed
        # Keys answered so far, with the front-memo slot and IOTLB entry their repeats rely on.
        self.done_r: list[int] = []
        self.done_fkey: list[int] = []
        self.done_entry: list[IotlbEntry] = []
        self.kills = 0
        self.overlay: dict[int, int] = {}          # table entries written during this window
        self.r0: set[int] = set()                   # pages the precomputed walks and decodes read
        self.wpages: dict[int, int] = {}            # page -> first position a DMA write of the run lands on it
        self.writes_before: np.ndarray | None = None  # lazily: cumulative count of write chunks

    # -- cut bookkeeping -----------------------------------------------------------------------------
    def _next_occ(self, r: int, after: int) -> int:
        return self.k.next_occ(r, after)

    def _lose_entry(self, entry: IotlbEntry) -> None:
        """``entry`` is leaving the IOTLB: every key answered by it ends being stable at its next use."""
        self.kills += 1
        if self.kills > 64:
            self._lose_all()  # a thrashing IOTLB: the scalar path is as good and the scans would not be
            return
        de = self.done_entry
        for i in range(len(de)):
            if de[i] is entry:
                self.cut = min(self.cut, self._next_occ(self.done_r[i], self.cur))

    def _lose_slot(self, fkey: int) -> None:
        """The front-memo slot of ``fkey`` is being rewritten (another request type of the same page)."""
        self.kills += 1
        if self.kills > 64:
            self._lose_all()
            return
        df = self.done_fkey
        for i in range(len(df)):
            if df[i] == fkey:
                self.cut = min(self.cut, self._next_occ(self.done_r[i], self.cur))

    def _lose_all(self) -> None:
        self.cut = min(self.cut, self.cur + 1)

    def _add_r0(self, pages: set[int] | list[int]) -> None:
        """New pages a precomputed walk read: a DMA write already processed that lands there ends the run."""
        new = set(pages) - self.r0
        self.r0 |= new
        for p in new:
            f = self.wpages.get(p)
            if f is not None:
                self.cut = min(self.cut, f + 1)

    # -- the caches' eviction observer (set while the window runs) ------------------------------------
    def entry_lost(self, entry: IotlbEntry) -> None:
        self._lose_entry(entry)

    def memo_cleared(self) -> None:
        self._lose_all()

    def slot_replaced(self, key: int) -> None:
        self._lose_slot(key)

    # -- run ---------------------------------------------------------------------------------------------
    def run(self) -> int:
        io, k, d, a = self.io, self.k, self.d, self.a
        front_get = io.caches.front.get
        fpos = k.first + a
        self.f_iova_arr = d.iova[fpos]
        self.f_req_arr = d.req[fpos]
        f_sid = d.sid[fpos].tolist()
        f_ptag = d.ptag[fpos].tolist()
        f_iova = self.f_iova_arr.tolist()
        f_req = self.f_req_arr.tolist()
        f_skip = d.skip[fpos].tolist()
        u = len(f_sid)
        # Streams: distinct (source id, PASID tag) of the keys, classified and walked on first need.
        sp = (d.sid[fpos].astype(np.int64) << 21) | d.ptag[fpos].astype(np.int64)
        _, sidx = np.unique(sp, return_inverse=True)
        self.key_sidx = sidx.reshape(-1)
        key_sidx = self.key_sidx.tolist()
        self.streams: dict[int, _Stream] = {}
        self.walks: dict[int, _Walk] = {}
        self.page = page = np.full(u, -1, np.int64)
        self.first_res = first_res = np.zeros(u, np.int64)
        self.unstable = np.zeros(u, bool)
        firsts = k.first.tolist()
        done_r, done_fkey, done_entry = self.done_r, self.done_fkey, self.done_entry
        wpages = self.wpages
        stats = self.eng.stats
        caches = io.caches
        if caches.observer is not None:
            raise InternalError("batch: the caches already have an eviction observer")
        caches.observer = self
        try:
            for r in range(u):
                f = firsts[r]
                if f >= self.cut:
                    break
                self.cur = f
                if f_skip[r]:
                    first_res[r] = SKIPPED
                    page[r] = SKIPPED
                    continue
                sid, ptag, iova, req = f_sid[r], f_ptag[r], f_iova[r], f_req[r]
                fkey = (((sid << 21) | ptag) << 52) | (iova >> 12)
                hit = front_get(fkey)
                if hit is not None and hit[1].alive and (hit[1].allowed >> req) & 1:
                    out = hit[0] | (iova & 0xFFF)
                    first_res[r] = out
                    page[r] = hit[0]
                    stats.front_hits += 1
                    done_r.append(r)
                    done_fkey.append(fkey)
                    done_entry.append(hit[1])
                else:
                    si = key_sidx[r]
                    st = self.streams.get(si)
                    if st is None:
                        st = self.streams[si] = self._stream(sid, ptag)
                    res_a = None
                    if st.kind in (_SS, _FS) and req in (READ, WRITE):
                        w = self.walks.get(si)
                        if w is None:
                            w = self._walk_stream(si, st, r)
                        if f >= self.cut:
                            break  # a write already processed landed on a table this walk read
                        res_a = self._tier_a(r, st, w, sid, iova, req, fkey)
                    out = res_a if res_a is not None else self._tier_b(r, sid, ptag, iova, req, fkey)
                    first_res[r] = out
                if req & WRITE and out >= 0:
                    pg = out >> 12
                    if pg in self.r0:
                        self.cut = min(self.cut, f + 1)
                    wpages.setdefault(pg, f)
        finally:
            caches.observer = None
        cut = self.cut
        # Results of [a, a+cut): repeats of stable keys from their key's page, first uses as computed.
        off = (d.iova[a:a + k.n] & np.uint64(0xFFF)).view(np.int64)
        out_arr = k.assemble(page, off, cut)
        done = k.first < cut
        out_arr[k.first[done]] = first_res[done]
        d.res[a:a + cut] = out_arr
        d.apply(max(d.done, a), a + cut)
        return a + cut

    def _settle_stable(self, r: int, fkey: int, entry: IotlbEntry, page: int) -> None:
        self.page[r] = page
        self.done_r.append(r)
        self.done_fkey.append(fkey)
        self.done_entry.append(entry)

    # -- tier B: the scalar path for one key -------------------------------------------------------------
    def _tier_b(self, r: int, sid: int, ptag: int, iova: int, req: int, fkey: int) -> int:
        io = self.io
        self.eng.stats.tier_b += 1
        # Memory must be exactly what the scalar path would see: write every earlier chunk's payload.
        self._flush(self.a + self.cur)
        ram = self.eng.ram
        ram.watch = []
        try:
            out = io.xlate(sid, ptag, iova, req)
        finally:
            watched, ram.watch = ram.watch, None
        for addr, old in watched:
            for q in range(addr & ~7, addr + len(old), 8):
                self.overlay[q] = ram.read_u64(q)
        if out >= 0:
            hit = io.caches.front.get(fkey)
            if hit is not None and hit[1].alive and (hit[1].allowed >> req) & 1:
                self._settle_stable(r, fkey, hit[1], hit[0])
                return out
            if not io.te or sid in io.pt_bypass:
                self.page[r] = iova & ~0xFFF
                return out
        self.unstable[r] = True
        self.cut = min(self.cut, int(self.k.second()[r]))
        return out

    def _flush(self, upto: int) -> None:
        d = self.d
        if d.done >= upto or d.blob is None:
            d.done = max(d.done, upto)
            return
        if self.writes_before is None:
            w = (d.req[self.a:self.b] & WRITE) != 0
            self.writes_before = np.concatenate([[0], np.cumsum(w)])
        wb = self.writes_before
        if wb[upto - self.a] == wb[d.done - self.a] and d.read_buf is None:
            return  # nothing pending changes memory; reads are not wanted
        a0 = d.done
        k = self.k
        lo, hi = a0 - self.a, upto - self.a
        rank = k.rank_at(lo, hi)
        # Every chunk before the current key is a first use already done or a repeat of a stable key.
        pg = self.page[rank]
        off = (d.iova[a0:upto] & np.uint64(0xFFF)).astype(np.int64)
        res = np.where(pg >= 0, pg | off, pg)
        fr = k.first[rank] + self.a
        firstpos = fr == np.arange(a0, upto)
        res[firstpos] = self.first_res[rank[firstpos]]
        res[d.skip[a0:upto]] = SKIPPED
        d.res[a0:upto] = res
        d.apply(a0, upto)

    # -- phase 1: streams and numpy walks -------------------------------------------------------------
    def _walk_stream(self, si: int, st: _Stream, r: int) -> _Walk:
        """Walk, with numpy, every key of stream ``si`` from rank ``r`` on (the ones before were answered)."""
        members = np.flatnonzero(self.key_sidx[r:] == si) + r
        rq = self.f_req_arr[members]
        members = members[(rq == READ) | (rq == WRITE)]
        # One walk per page: the read and write keys of a page share it (permissions are checked per key).
        pages, pidx = np.unique(self.f_iova_arr[members] >> np.uint64(12), return_inverse=True)
        iv = pages << np.uint64(12)
        w = self._walk_ss(st, iv) if st.kind == _SS else self._walk_fs(st, iv)
        w.index = dict(zip(members.tolist(), pidx.reshape(-1).tolist()))
        w.okl, w.leafl, w.basel = w.ok.tolist(), w.leaf.tolist(), w.base.tolist()
        w.el, w.eal, w.c1l = w.e.T.tolist(), w.ea.T.tolist(), w.c1.T.tolist()
        if w.c2 is not None and w.c3 is not None:
            w.c2l, w.c3l = w.c2.T.tolist(), w.c3.T.tolist()
        self.walks[si] = w
        assert w.read is not None
        self._add_r0(np.unique(w.ea[w.read] >> np.uint64(12)).tolist())
        return w

    def _stream(self, sid: int, ptag: int) -> _Stream:
        io = self.io
        q = io.quirks
        if not io.te or sid in io.pt_bypass:
            return _Stream(_IDENTITY, sid, ptag)
        if io.root_invalid or q.iotlb_before_context or q.pasid_entry_uncached:
            return _Stream(_SCALAR, sid, ptag)
        c = io.caches
        ctx: Context | int | None = c.context.get(sid)
        if ctx is None:
            ctx = self._load(lambda: io.load_context(sid))
        if type(ctx) is int:
            return _Stream(_SCALAR, sid, ptag)
        if ctx.kind == CTX_LEGACY:  # type: ignore[union-attr]
            _, did, tt, levels, slptptr, fpd = ctx  # type: ignore[misc]
            if ptag != NO_PASID or tt == TT_PT:
                return _Stream(_SCALAR, sid, ptag)
            return _Stream(_SS, sid, ptag, ctx, None, 0, did, did, levels, slptptr, 0, 1, False)  # type: ignore[arg-type]
        _, cfpd, pdir, pdts, rid_pasid, pre, paside, dte, rid_priv = ctx  # type: ignore[misc]
        if ptag == NO_PASID:
            pasid = rid_pasid if io.use_rid_pasid else 0
        else:
            if not paside:
                return _Stream(_SCALAR, sid, ptag)
            pasid = ptag
        pe: PasidEntry | int | None = c.pasid.get((sid, pasid))
        if pe is None:
            pe = self._load(lambda: io.load_pasid(pdir, pdts, cfpd, pasid))
        if type(pe) is int:
            return _Stream(_SCALAR, sid, ptag)
        did, pgtt, ss_levels, ssptptr, fs_levels, fsptptr, fpd, flags, ssade, ssee = pe  # type: ignore[misc]
        if pgtt == PGTT_SS and not ssade:
            return _Stream(_SS, sid, ptag, ctx, pe, pasid, did, did, ss_levels, ssptptr, flags, ssee, True)  # type: ignore[arg-type]
        if pgtt == PGTT_FS:
            return _Stream(_FS, sid, ptag, ctx, pe, pasid, did, did, fs_levels, fsptptr, flags, 0, True)  # type: ignore[arg-type]
        return _Stream(_SCALAR, sid, ptag)

    def _load(self, fn: Callable[[], Any]) -> Any:
        """Run a pure structure decoder of the chip, noting the pages it reads (they join the hazard set)."""
        io = self.io
        saved = io.mem
        rec = _Recording(saved)
        io.mem = rec  # type: ignore[assignment]
        try:
            return fn()
        finally:
            io.mem = saved
            self._add_r0(rec.pages)

    def _walk_levels(self, geo: Any, st: _Stream, iv: np.ndarray, ok: np.ndarray,
                     step: Callable[[int, np.ndarray, np.ndarray], np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The level loop both stages share (``geo`` is the stage's geometry, ``ok`` the keys whose address
        may be walked).  ``step(lvl, e, active)`` folds the level's entries into the caller's permission
        accumulators and returns where they are not present.  Returns (ok, leaf level, base, entry
        addresses, entries, read) with the per-level arrays indexed [level][i]."""
        levels = st.levels
        n = iv.size
        L = levels + 1
        ea_a = np.zeros((L, n), np.uint64)
        e_a = np.zeros((L, n), np.uint64)
        rd_a = np.zeros((L, n), bool)
        leaf_lv = np.zeros(n, np.int64)
        base = np.zeros(n, np.uint64)
        table = np.full(n, st.root, np.uint64)
        active = ok.copy()
        for lvl in range(levels, 0, -1):
            ea = table | (((iv >> np.uint64(3 + 9 * lvl)) & np.uint64(0x1FF)) << np.uint64(3))
            e, nomem = self.eng.index.gather(ea)
            ea_a[lvl], e_a[lvl], rd_a[lvl] = ea, e, active
            bad = nomem | step(lvl, e, active)
            leaf = np.full(n, lvl == 1) | (((e & np.uint64(0x80)) != 0) & (lvl <= 3))
            bad |= leaf & (((e & np.uint64(geo.rsvd_leaf[lvl])) != 0) | (not geo.large_ok[lvl]))
            bad |= ~leaf & ((e & np.uint64(geo.rsvd_table[lvl])) != 0)
            bad &= active
            done = active & leaf & ~bad
            base = np.where(done, e & np.uint64(geo.leaf_addr[lvl]), base)
            leaf_lv = np.where(done, lvl, leaf_lv)
            ok &= ~bad
            active &= ~bad & ~leaf
            table = np.where(active, e & np.uint64(ADDR_MASK), table)
        return ok & (leaf_lv > 0), leaf_lv, base, ea_a, e_a, rd_a

    def _walk_ss(self, st: _Stream, iv: np.ndarray) -> _Walk:
        """Structure of each page's walk (present bits, reserved bits, leaf sizes, widths); the request's
        permissions are checked per key in tier A against the walk's cumulative permissions, which is
        equivalent because they only ever shrink down the levels."""
        io = self.io
        levels = st.levels
        n = iv.size
        if st.sm:
            ok = ((iv >> np.uint64(io.mgaw + 1)) == 0) & ((iv >> np.uint64(9 * levels + 12)) == 0)
        else:
            ok = (iv >> np.uint64(min(9 * levels + 12, io.mgaw + 1))) == 0
        p_a = np.zeros((levels + 1, n), np.int64)
        perm = np.full(n, 7, np.int64)

        def step(lvl: int, e: np.ndarray, active: np.ndarray) -> np.ndarray:
            nonlocal perm
            p = (e & np.uint64(7)).astype(np.int64)
            perm = np.where(active, perm & p, perm)
            p_a[lvl] = perm
            return (p & 3) == 0

        ok, leaf_lv, base, ea_a, e_a, rd_a = self._walk_levels(io.ss_geo, st, iv, ok, step)
        return _Walk(ok, leaf_lv, base, ea_a, e_a, p_a, read=rd_a)

    def _walk_fs(self, st: _Stream, iv: np.ndarray) -> _Walk:
        levels = st.levels
        n = iv.size
        ok = np.fromiter((canonical(v, levels) for v in iv.tolist()), bool, n)
        L = levels + 1
        rw_a = np.zeros((L, n), np.int64)
        us_a = np.zeros((L, n), np.int64)
        xd_a = np.zeros((L, n), np.int64)
        rw = np.ones(n, np.int64)
        us = np.ones(n, np.int64)
        xd = np.zeros(n, np.int64)

        def step(lvl: int, e: np.ndarray, active: np.ndarray) -> np.ndarray:
            nonlocal rw, us, xd
            rw = np.where(active, rw & ((e >> np.uint64(1)) & np.uint64(1)).astype(np.int64), rw)
            us = np.where(active, us & ((e >> np.uint64(2)) & np.uint64(1)).astype(np.int64), us)
            xd = np.where(active, xd | (e >> np.uint64(63)).astype(np.int64), xd)
            rw_a[lvl], us_a[lvl], xd_a[lvl] = rw, us, xd
            return (e & np.uint64(1)) == 0

        ok, leaf_lv, base, ea_a, e_a, rd_a = self._walk_levels(self.io.fs_geo, st, iv, ok, step)
        return _Walk(ok, leaf_lv, base, ea_a, e_a, rw_a, us_a, xd_a, rd_a)

    # -- tier A: commit a numpy walk through the chip's own cache calls ------------------------------
    def _tier_a(self, r: int, st: _Stream, w: _Walk, sid: int, iova: int, req: int,
                fkey: int) -> int | None:
        i = w.index.get(r)
        if i is None:
            return None
        io = self.io
        c = io.caches
        ctx = c.context.get(sid)
        ctx_miss = ctx is None
        if ctx_miss:
            ctx = st.ctx
        elif ctx != st.ctx:
            return None
        pe_miss = False
        if st.sm:
            pe = c.pasid.get((sid, st.pasid))
            pe_miss = pe is None
            if not pe_miss and pe != st.pe:
                return None
        hitr = io.probe_iotlb(st.tag, st.pasid, iova, req)
        if hitr == DROPPED:
            return None
        st_ = c.stats
        if hitr is not None:
            e, out = hitr  # type: ignore[misc]
            self._commit_structs(st, sid, ctx_miss, pe_miss)
            if e.alive and e.allowed and io.front_ok:
                c.put_front(fkey, out & ~0xFFF, e)
            self.eng.stats.tier_a += 1
            return self._settle(r, fkey, req, out)
        if not w.okl[i]:
            return None
        e_, ea_, c1_ = w.el[i], w.eal[i], w.c1l[i]
        leaf = w.leafl[i]
        shift = 3 + 9 * leaf
        mask = (1 << shift) - 1
        base = w.basel[i]
        if base < INTR_HI and base + mask >= INTR_LO:
            return None
        levels = st.levels
        ov = self.overlay
        if st.kind == _SS:
            psc: Any = c.psc_ss if c.psc_size else None
            start = levels
            if psc is not None:
                for probe in range(2, levels + 1):
                    h = psc.get(((st.did << 3 | probe) << 56) | (iova >> (3 + 9 * probe)))
                    if h is not None:
                        if h != (e_[probe] & ADDR_MASK, c1_[probe]):
                            return None
                        start = probe - 1
                        break
            if ov and any(ea_[lv] in ov for lv in range(start, leaf - 1, -1)):
                return None
            perm = c1_[leaf]
            if (req & WRITE and not perm & 2) or (req & READ and not perm & 1):
                return None  # the walk faults: the scalar path records it
            allowed = ss_allowed(perm & 7)
            if st.sm and not st.ssee:
                allowed &= ~REQ_X
            # commit
            self._commit_structs(st, sid, ctx_miss, pe_miss)
            st_.iotlb_misses += 1
            st_.walks += 1
            if psc is not None:
                limit = c.psc_size
                for lv in range(start, leaf, -1):
                    if len(psc) >= limit:
                        psc.popitem(last=False)
                    psc[((st.did << 3 | lv) << 56) | (iova >> (3 + 9 * lv))] = (e_[lv] & ADDR_MASK,
                                                                              c1_[lv])
            kind = KIND_SS
        else:
            psc = c.psc_fs if c.psc_size else None
            tag = st.did << 20 | st.pasid
            c2_, c3_ = w.c2l[i], w.c3l[i]
            start = levels
            if psc is not None:
                for probe in range(2, levels + 1):
                    h = psc.get(((tag << 3 | probe) << 56) | ((iova >> (3 + 9 * probe)) & ((1 << (54 - 9 * probe)) - 1)))
                    if h is not None:
                        if h != (e_[probe] & ADDR_MASK, c1_[probe], c2_[probe],  # type: ignore[index]
                                 c3_[probe]):  # type: ignore[index]
                            return None
                        start = probe - 1
                        break
            rw, us, xd = c1_[leaf], c2_[leaf], c3_[leaf]
            flags = st.flags
            if not (fs_allowed(rw, us, xd, True, flags) >> req) & 1:
                return None
            touched = []
            for lv in range(start, leaf - 1, -1):
                ea = ea_[lv]
                touched.append((ea, ov.get(ea, e_[lv])))
            a_bit = FS_A | (FS_EA if flags & F_EAFE else 0)
            d_bit = FS_D if req & WRITE else 0
            e_leaf = touched[-1][1]
            # commit
            self._commit_structs(st, sid, ctx_miss, pe_miss)
            st_.iotlb_misses += 1
            st_.walks += 1
            if psc is not None:
                limit = c.psc_size
                for lv in range(start, leaf, -1):
                    if len(psc) >= limit:
                        psc.popitem(last=False)
                    psc[((tag << 3 | lv) << 56) | ((iova >> (3 + 9 * lv)) & ((1 << (54 - 9 * lv)) - 1))] = (
                        e_[lv] & ADDR_MASK, c1_[lv], c2_[lv], c3_[lv])  # type: ignore[index]
            last = len(touched) - 1
            if not set_ad(io.mem.write_u64, touched, a_bit, d_bit):
                raise InternalError("batch: A/D update of a readable table entry failed")
            for j, (ea, e) in enumerate(touched):
                want = e | a_bit | (d_bit if j == last else 0)
                if want != e:
                    ov[ea] = want
            allowed = fs_allowed(rw, us, xd, bool(e_leaf & FS_D or d_bit), flags)
            kind = KIND_FS
        res = io.fill(st.tag, st.pasid, st.did, kind, iova, base, shift, allowed, 0, st.sm, True)
        if type(res) is int:
            raise InternalError("batch: fill refused a leaf the batch checked")
        e, out = res  # type: ignore[misc]
        self.eng.stats.tier_a += 1
        if e.alive and e.allowed and io.front_ok and (e.allowed >> req) & 1:
            c.put_front(fkey, out & ~0xFFF, e)
            # The memo now holds this live entry, which allows the request: the key is stable.
            self._settle_stable(r, fkey, e, out & ~0xFFF)
            return out
        if e.alive and e.allowed and io.front_ok:
            c.put_front(fkey, out & ~0xFFF, e)
        return self._settle(r, fkey, req, out)

    def _commit_structs(self, st: _Stream, sid: int, ctx_miss: bool, pe_miss: bool) -> None:
        c = self.io.caches
        s = c.stats
        if ctx_miss:
            s.context_misses += 1
            c.put_context(sid, st.ctx)  # type: ignore[arg-type]
        else:
            s.context_hits += 1
        if st.sm:
            if pe_miss:
                s.pasid_misses += 1
                c.put_pasid(sid, st.pasid, st.pe)  # type: ignore[arg-type]
            else:
                s.pasid_hits += 1

    def _settle(self, r: int, fkey: int, req: int, out: int) -> int:
        """After tier A: the key is stable if the memo now answers it (it always does when the unit has a
        front memo; anything else is handled like an unstable scalar result)."""
        hit = self.io.caches.front.get(fkey)
        if hit is None or not hit[1].alive or not (hit[1].allowed >> req) & 1:
            self.unstable[r] = True
            self.cut = min(self.cut, int(self.k.second()[r]))
            return out
        self._settle_stable(r, fkey, hit[1], hit[0])
        return out


class _Recording:
    """A memory proxy noting the page of every u64 read (for the hazard set of a window)."""

    def __init__(self, mem: Any) -> None:
        self._mem = mem
        self.pages: set[int] = set()
        self.read = mem.read
        self.is_ram = mem.is_ram
        self.write_u64 = mem.write_u64
        self.write = mem.write

    def read_u64(self, addr: int) -> int:
        self.pages.add(addr >> 12)
        return self._mem.read_u64(addr)


# -- DMA blocks ------------------------------------------------------------------------------------------


def expand_chunks(iova: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, chunk IOVA, chunk length, offset in its DMA) of every chunk: a DMA is translated once per
    4 KiB page of IOVA it touches, as ``VtdIommu.dma_read``/``dma_write`` do."""
    iova = iova.astype(np.uint64)
    ln = length.astype(np.uint64)
    n = iova.size
    first = iova >> np.uint64(12)
    last = (iova + ln - np.uint64(1)) >> np.uint64(12)
    nck = (last - first + np.uint64(1)).astype(np.int64)
    if n == 0 or (nck == 1).all():
        return np.arange(n, dtype=np.int64), iova, ln.astype(np.int64), np.zeros(n, np.int64)
    row = np.repeat(np.arange(n, dtype=np.int64), nck)
    k = np.arange(row.size, dtype=np.int64) - np.repeat(np.cumsum(nck) - nck, nck)
    riova = iova[row]
    ciova = np.where(k == 0, riova, (first[row] + k.astype(np.uint64)) << np.uint64(12))
    cend = np.minimum((ciova >> np.uint64(12)) + np.uint64(1) << np.uint64(12), riova + ln[row])
    return row, ciova, (cend - ciova).astype(np.int64), (ciova - riova).astype(np.int64)


@dataclass(slots=True)
class BlockRun:
    """Per-chunk outcome of a DMA block: ``res`` is an address, ``-reason``, ``DROPPED`` or ``SKIPPED``."""

    row: np.ndarray
    res: np.ndarray
    clen: np.ndarray
    read_buf: np.ndarray | None
    read_off: np.ndarray | None     # per row: offset of a read's bytes in read_buf, -1 for writes


def chunk_requests(write: np.ndarray, priv: np.ndarray) -> np.ndarray:
    return np.where(write, WRITE, READ).astype(np.int64) | np.where(priv, 8, 0).astype(np.int64)


def run_block(engine: BatchEngine | None, iommu: VtdIommu, sid: np.ndarray, pasid: np.ndarray, iova: np.ndarray,
              length: np.ndarray, write: np.ndarray, priv: np.ndarray, data_off: np.ndarray, data: np.ndarray,
              want_read_data: bool) -> BlockRun:
    """Replay DMA rows (batched when ``engine`` is given, else chunk by chunk through ``iommu.xlate``)."""
    row, ciova, clen, coff = expand_chunks(iova, length)
    req = chunk_requests(write, priv)[row]
    ptag = np.where(pasid < 0, NO_PASID, pasid).astype(np.int64)[row]
    csid = sid.astype(np.int64)[row]
    src = np.where(write, data_off, 0).astype(np.int64)[row] + coff
    read_buf = read_off = None
    rdst = np.zeros(row.size, np.int64)
    if want_read_data:
        lens = np.where(write, 0, length.astype(np.int64))
        starts = np.cumsum(lens) - lens
        read_off = np.where(write, -1, starts)
        read_buf = np.zeros(int(lens.sum()), np.uint8)
        rdst = starts[row] + coff
    if engine is None:
        engine = _ScalarOnly(iommu)
    res = engine.run_chunks(csid, ptag, ciova, req, clen, src, data, rdst, read_buf)
    return BlockRun(row, res, clen, read_buf, read_off)


class _ScalarOnly(BatchEngine):
    """The same chunk loop with batching off (``--no-batch`` and memories that are not HostRAM)."""

    def __init__(self, iommu: VtdIommu) -> None:  # noqa: D107 - no numpy state needed
        self.iommu = iommu
        self.ram = iommu.mem  # type: ignore[assignment]
        self.max_window = MAX_WINDOW
        self.stats = RunStats()

    def usable(self) -> bool:
        return False
