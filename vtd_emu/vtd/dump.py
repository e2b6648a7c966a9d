"""Enumerate every mapping of a first-stage or second-stage table (or of one device/PASID), as leaves or
as merged address ranges.  Tables are read a page at a time with numpy, so a full 4-level table of a
real process (hundreds of thousands of pages) lists in a fraction of a second.

This is an inspection tool: it reads memory only, sets no A/D bits and consults no cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

from ..memory import Memory
from .walk import ADDR_MASK, Geometry

_ADDR = np.uint64(ADDR_MASK)


class TableSource(Protocol):
    """All enumeration needs of memory (HostRAM also offers ``page_array`` for zero-copy tables)."""

    def read(self, addr: int, length: int) -> bytes: ...


@dataclass(slots=True)
class Leaves:
    """Columns of leaf mappings, in ascending input-address order."""

    va: np.ndarray      # uint64 input address (canonical form for first-stage upper-half addresses)
    pa: np.ndarray      # uint64 output address
    size: np.ndarray    # uint64 page size
    perm: np.ndarray    # uint8: R=1 W=2 X=4 U=8 (first stage: R always, X = not XD, U = user)
    rsvd: np.ndarray    # bool: the leaf or a table entry above it has reserved bits set
    entry: np.ndarray   # uint64: the leaf entry itself

    def __len__(self) -> int:
        return int(self.va.size)

    def rows(self) -> Iterator[tuple[int, int, int, int, bool]]:
        for i in range(len(self)):
            yield int(self.va[i]), int(self.pa[i]), int(self.size[i]), int(self.perm[i]), bool(self.rsvd[i])


@dataclass(frozen=True, slots=True)
class Range:
    va: int
    pa: int
    length: int
    page_size: int
    perm: int
    rsvd: bool


def perm_text(perm: int, stage: str) -> str:
    if stage == "fs":
        return ("r" + ("w" if perm & 2 else "-") + ("x" if perm & 4 else "-") + ("u" if perm & 8 else "s"))
    return "".join(c if perm & b else "-" for b, c in ((1, "r"), (2, "w"), (4, "x")))


def _table(mem: TableSource, addr: int) -> np.ndarray | None:
    page_array = getattr(mem, "page_array", None)
    if page_array is not None and addr & 0xFFF == 0:
        row = page_array(addr >> 12)
        return None if row is None else row
    data = mem.read(addr, 4096)
    arr = np.frombuffer(data, dtype="<u8").astype(np.uint64)
    return arr if arr.any() else None


def leaves(mem: TableSource, root: int, levels: int, stage: str, geo: Geometry) -> Leaves:
    """Every present leaf reachable from ``root`` (``stage`` is ``"fs"`` or ``"ss"``)."""
    cols: list[list[np.ndarray]] = [[], [], [], [], [], []]
    top_bits = 12 + 9 * levels
    _descend(mem, root, levels, 0, 0xF, False, stage, geo, cols)
    if not cols[0]:
        z = np.zeros(0, dtype=np.uint64)
        return Leaves(z, z, z, np.zeros(0, np.uint8), np.zeros(0, bool), z)
    va = np.concatenate(cols[0])
    if stage == "fs":
        # canonical form: sign-extend the top input bit
        sign = np.uint64(1 << (top_bits - 1))
        ext = np.uint64(((1 << 64) - 1) ^ ((1 << top_bits) - 1))
        va = np.where(va & sign, va | ext, va)
    order = np.argsort(va, kind="stable")
    return Leaves(va[order], np.concatenate(cols[1])[order], np.concatenate(cols[2])[order],
                  np.concatenate(cols[3]).astype(np.uint8)[order], np.concatenate(cols[4])[order],
                  np.concatenate(cols[5])[order])


def _descend(mem: TableSource, table: int, level: int, va_base: int, perm: int, rsvd: bool, stage: str, geo: Geometry,
             cols: list[list[np.ndarray]]) -> None:
    arr = _table(mem, table)
    if arr is None:
        return
    if stage == "fs":
        present = (arr & np.uint64(1)) != 0
        eperm = (np.uint64(1) | (arr & np.uint64(2)) | np.where((arr >> np.uint64(63)) & np.uint64(1), np.uint64(0),
                                                                   np.uint64(4))
                 | ((arr & np.uint64(4)) << np.uint64(1)))
    else:
        present = (arr & np.uint64(3)) != 0
        eperm = (arr & np.uint64(7)) | np.uint64(8)
    if not present.any():
        return
    shift = 3 + 9 * level
    if level == 1:
        is_leaf = present
    elif level <= 3:
        is_leaf = present & ((arr & np.uint64(0x80)) != 0) & bool(geo.large_ok[level])
    else:
        is_leaf = np.zeros(512, dtype=bool)
    idx = np.nonzero(is_leaf)[0]
    if idx.size:
        e = arr[idx]
        cols[0].append(np.uint64(va_base) + (idx.astype(np.uint64) << np.uint64(shift)))
        cols[1].append(e & np.uint64(geo.leaf_addr[level]))
        cols[2].append(np.full(idx.size, 1 << shift, dtype=np.uint64))
        cols[3].append(eperm[idx] & np.uint64(perm))
        cols[4].append(((e & np.uint64(geo.rsvd_leaf[level])) != 0) | rsvd)
        cols[5].append(e)
    if level > 1:
        for i in np.nonzero(present & ~is_leaf)[0].tolist():
            entry = int(arr[i])
            _descend(mem, entry & ADDR_MASK, level - 1, va_base + (i << shift), perm & int(eperm[i]),
                     rsvd or bool(entry & geo.rsvd_table[level]), stage, geo, cols)


def merge(lv: Leaves) -> list[Range]:
    """Merge runs of leaves contiguous in input and output address with equal page size and permissions."""
    n = len(lv)
    if n == 0:
        return []
    va, pa, size, perm, rsvd = lv.va, lv.pa, lv.size, lv.perm, lv.rsvd
    cont = np.zeros(n, dtype=bool)
    cont[1:] = ((va[1:] == va[:-1] + size[:-1]) & (pa[1:] == pa[:-1] + size[:-1]) & (size[1:] == size[:-1])
                & (perm[1:] == perm[:-1]) & (rsvd[1:] == rsvd[:-1]))
    starts = np.nonzero(~cont)[0]
    ends = np.append(starts[1:], n)
    out = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        out.append(Range(int(va[s]), int(pa[s]), int(va[e - 1] + size[e - 1] - va[s]), int(size[s]), int(perm[s]),
                         bool(rsvd[s])))
    return out


class _ThroughSecondStage:
    """Guest-physical reads through a second stage's leaves: how the first-stage tables of a nested
    PASID entry (whose pointers are GPAs) are read.  Unmapped GPAs read as zero (no table there)."""

    def __init__(self, mem: Memory, ss: Leaves) -> None:
        self.mem = mem
        self.starts = ss.va
        self.ends = ss.va + ss.size
        self.pa = ss.pa

    def read(self, gpa: int, length: int) -> bytes:
        i = int(np.searchsorted(self.starts, np.uint64(gpa), side="right")) - 1
        if i < 0 or gpa + length > int(self.ends[i]):
            return bytes(length)
        return self.mem.read(int(self.pa[i]) + gpa - int(self.starts[i]), length)


def nested_leaves(mem: Memory, fs_root: int, fs_levels: int, ss_root: int, ss_levels: int, fs_geo: Geometry,
                  ss_geo: Geometry) -> Leaves:
    """A nested translation's mappings: first-stage leaves (GVA → GPA, tables read through the second
    stage) composed with the second stage (GPA → HPA); one row per overlap of a first-stage leaf with a
    second-stage leaf, permissions intersected, in GVA order.  GPAs the second stage does not map are
    left out (a DMA there faults)."""
    ss = leaves(mem, ss_root, ss_levels, "ss", ss_geo)
    fs = leaves(_ThroughSecondStage(mem, ss), fs_root, fs_levels, "fs", fs_geo)
    starts = [int(v) for v in ss.va]
    ends = [int(v + s) for v, s in zip(ss.va, ss.size)]
    cols: list[list[int]] = [[], [], [], [], [], []]
    for va, gpa, size, perm, rsvd, entry in zip(fs.va.tolist(), fs.pa.tolist(), fs.size.tolist(), fs.perm.tolist(),
                                                fs.rsvd.tolist(), fs.entry.tolist()):
        i = max(int(np.searchsorted(ss.va, np.uint64(gpa), side="right")) - 1, 0)
        while i < len(starts) and starts[i] < gpa + size:
            lo, hi = max(gpa, starts[i]), min(gpa + size, ends[i])
            if lo < hi:
                cols[0].append(va + lo - gpa)
                cols[1].append(int(ss.pa[i]) + lo - starts[i])
                cols[2].append(hi - lo)
                cols[3].append(perm & (int(ss.perm[i]) | 8))  # the user bit comes from the first stage
                cols[4].append(bool(rsvd) or bool(ss.rsvd[i]))
                cols[5].append(entry)
            i += 1
    u64 = np.uint64
    return Leaves(np.array(cols[0], u64), np.array(cols[1], u64), np.array(cols[2], u64),
                  np.array(cols[3], np.uint8), np.array(cols[4], bool), np.array(cols[5], u64))
