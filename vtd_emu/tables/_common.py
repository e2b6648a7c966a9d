"""What every table builder shares: the permission flags of ``perms`` arguments, page sizes, the memory
protocol the builders write through, and the helpers that turn spec layouts into entry values.

Every bit position comes from ``specs/structures.yaml`` (through :mod:`vtd_emu.spec`); nothing here
re-states a layout.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vtd_emu.spec import Layout

# Permission flags of ``perms`` arguments.  Second stage uses R/W/X; first stage uses W, U and NX
# (first-stage entries are always readable once present, so R is accepted there and ignored).
R, W, X = 1, 2, 4
U = 8
NX = 16

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30
_LEAF_LEVEL = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}

_PAGE_MASK = PAGE_4K - 1
_U64 = (1 << 64) - 1


class _Mem(Protocol):
    """What the builders write through: :class:`~vtd_emu.memory.HostRAM` or any view of it."""

    def read_u64(self, addr: int) -> int: ...

    def write_u64(self, addr: int, value: int) -> bool: ...

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> int: ...


# -- spec access -------------------------------------------------------------------------------------


@functools.cache
def _layout(name: str) -> Layout:
    # Imported lazily: the spec module loads YAML, and builders are importable without touching it.
    from vtd_emu.spec import specs

    return specs().structure(name)


def _bits(layout: Layout, name: str) -> int:
    """The field's bits, in place."""
    return int(layout.field(name).mask)


def _ptr(layout: Layout, name: str, addr: int) -> int:
    """The value of address field ``name`` holding ``addr`` (addr fields keep address bits in place
    within their qword, so the low ``lo % 64`` bits of ``addr`` must be 0)."""
    f = layout.field(name)
    shift = f.lo & 63
    if addr < 0 or addr & ((1 << shift) - 1) or (addr >> shift) >> f.width:
        raise ValueError(f"{layout.name}.{name}: {addr:#x} is not an address this field can hold")
    return addr >> shift


def _put64(mem: _Mem, addr: int, value: int) -> None:
    if not mem.write_u64(addr, value):
        raise ValueError(f"cannot write a page-table entry at {addr:#x}: not memory")


def _size_bytes(layout: Layout) -> int:
    return layout.size_bits // 8


def _load(mem: _Mem, addr: int, nbytes: int) -> int:
    return int.from_bytes(mem.read(addr, nbytes), "little")


def _store(mem: _Mem, addr: int, value: int, nbytes: int) -> None:
    if mem.write(addr, value.to_bytes(nbytes, "little")) != nbytes:
        raise ValueError(f"cannot write {nbytes} bytes at {addr:#x}: not memory")


def _check_extra(extra: int, layout: Layout, what: str) -> None:
    if extra < 0 or extra >> layout.size_bits:
        raise ValueError(f"{what}: extra bits {extra:#x} do not fit a {layout.size_bits}-bit entry")

