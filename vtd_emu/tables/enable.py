"""Turning translation on the way a driver does, through the register file."""

from __future__ import annotations

from typing import Any, Protocol

# The module, not its names: ``from consts import GCMD`` would load the specs when this is imported.
from vtd_emu.spec import consts, specs

from vtd_emu.errors import InternalError

from ._common import _PAGE_MASK, _U64


class Mmio(Protocol):
    """A remapping unit's register block (``VtdIommu``, or a recorder of MMIO steps)."""

    def mmio_write(self, offset: int, value: int, size: int) -> Any: ...

    def mmio_read(self, offset: int, size: int) -> int: ...


def _offset(name: str) -> int:
    offset = specs().register(name).offset
    if offset is None:
        raise InternalError(f"register {name} has no fixed offset in registers.yaml")
    return offset


def gsts_persistent() -> int:
    """The GSTS bits that mirror persistent GCMD controls (TE, EAFL, QIE, IRE, CFI, and the reserved low
    bits): what a driver writes back with each command so that one command does not undo another.  The
    one-shot statuses (RTPS, FLS, WBFS, IRTPS) are left out: writing their commands back would repeat
    them."""
    g = consts.GSTS
    return g.TES | g.AFLS | g.QIES | g.IRES | g.CFIS | g.RSVD


def gcmd_set(iommu: Mmio, command: int) -> None:
    """Issue one GCMD command (a GCMD field mask) on top of the unit's persistent state, reading GSTS
    first as the VT-d programming model asks."""
    gcmd = _offset("GCMD")
    gsts = _offset("GSTS")
    iommu.mmio_write(gcmd, (iommu.mmio_read(gsts, 4) & gsts_persistent()) | command, 4)


def enable_translation(iommu: Mmio, root: int, *, scalable: bool = False) -> None:
    """Program RTADDR, latch it with GCMD.SRTP and set GCMD.TE, as a driver does (read GSTS each time)."""
    if root < 0 or root > _U64 or root & _PAGE_MASK:
        raise ValueError(f"root table {root:#x} is not a 4 KiB-aligned 64-bit address")
    rtaddr = consts.RTADDR
    ttm = (1 if scalable else 0) << rtaddr.TTM_LO
    iommu.mmio_write(_offset("RTADDR"), root | ttm, 8)
    for command in (consts.GCMD.SRTP, consts.GCMD.TE):
        gcmd_set(iommu, command)
