"""A small "guest driver" for the chip tests: the GCMD handshake, an invalidation queue that software
fills, and legacy / scalable domains built with vtd_emu.tables.  Everything goes through MMIO and guest
memory writes, as a driver would; nothing pokes the chip's internals."""

from __future__ import annotations

from typing import Any, Mapping

from vtd_emu.tables import (PAGE_4K, PGTT_FS, PGTT_SS, FirstStageTable, LegacyRootTable, PageAllocator,
                            PasidTables, R, ScalableRootTable, SecondStageTable, U, W, enable_translation)
from vtd_emu.memory import HostRAM
from vtd_emu.vtd.config import VtdConfig
from vtd_emu.vtd.iommu import VtdIommu
from vtd_emu.vtd.qi import T_WAIT, make_descriptor

GCMD, GSTS, FSTS, FECTL, IQH, IQT, IQA, ICS, IECTL, IQERCD = (0x18, 0x1C, 0x34, 0x38, 0x80, 0x88, 0x90, 0x9C,
                                                              0xA0, 0xB0)
IRTA, PQH, PQT, PQA, PRSTS, PECTL, PEDATA, PEADDR = 0xB8, 0xC0, 0xC8, 0xD0, 0xDC, 0xE0, 0xE4, 0xE8
TE, QIE, IRE, SIRTP, CFI = 1 << 31, 1 << 26, 1 << 25, 1 << 24, 1 << 23
IQE, ICE, ITE = 1 << 4, 1 << 5, 1 << 6
KEEP = 0x96FF_FFFF


class Rig:
    """One unit over fresh RAM plus the bookkeeping a driver keeps."""

    def __init__(self, preset: str = "modern", profile: str = "spec", overrides: Mapping[str, int] | None = None,
                 ram_size: int | None = None, **kwargs: Any) -> None:
        self.ram = HostRAM(ram_size)
        self.alloc = PageAllocator(self.ram)
        self.cfg = VtdConfig.preset(preset, profile=profile, overrides=overrides or {}, **kwargs)
        self.io = VtdIommu(self.ram, self.cfg)
        self.qbase = 0
        self.qslots = 0
        self.dw = False
        self.tail = 0
        self.status = self.alloc.alloc()

    # -- registers -------------------------------------------------------------------------------
    def r32(self, off: int) -> int:
        return self.io.mmio_read(off, 4)

    def r64(self, off: int) -> int:
        return self.io.mmio_read(off, 8)

    def w32(self, off: int, v: int) -> None:
        self.io.mmio_write(off, v, 4)

    def w64(self, off: int, v: int) -> None:
        self.io.mmio_write(off, v, 8)

    def gcmd(self, bit: int, on: bool = True) -> None:
        cur = self.r32(GSTS) & KEEP
        self.w32(GCMD, (cur | bit) if on else (cur & ~bit))

    # -- invalidation queue ----------------------------------------------------------------------
    def enable_qi(self, *, dw: bool = False, qs: int = 0) -> None:
        self.qbase = self.alloc.alloc(1 << qs)
        self.dw = dw
        self.qslots = (1 << (qs + 8)) // (2 if dw else 1)
        self.tail = 0
        self.w64(IQT, 0)
        self.w64(IQA, self.qbase | (1 << 11 if dw else 0) | qs)
        self.gcmd(QIE)

    @property
    def slot(self) -> int:
        return 32 if self.dw else 16

    def put(self, desc: tuple[int, ...]) -> None:
        """Write one descriptor at the software tail (without telling the unit)."""
        qws = list(desc) + [0] * ((self.slot // 8) - len(desc))
        for i, q in enumerate(qws):
            self.ram.write_u64(self.qbase + self.tail * self.slot + 8 * i, q)
        self.tail = (self.tail + 1) % self.qslots

    def submit(self, *descs: tuple[int, ...]) -> None:
        """Queue descriptors and advance IQT once."""
        for d in descs:
            self.put(d)
        self.w64(IQT, self.tail * self.slot)

    def head(self) -> int:
        return self.r64(IQH) // self.slot

    def wait(self, data: int = 1, offset: int = 0) -> tuple[int, int]:
        return make_descriptor(T_WAIT, SW=1, STATUS_DATA=data, STATUS_ADDR=self.status + offset)

    def status_word(self, offset: int = 0) -> int:
        return int.from_bytes(self.ram.read(self.status + offset, 4), "little")

    def clear_fsts(self, bits: int) -> None:
        self.w32(FSTS, bits)

    # -- domains ---------------------------------------------------------------------------------
    def legacy(self) -> "Legacy":
        return Legacy(self)

    def scalable(self) -> "Scalable":
        return Scalable(self)


class Legacy:
    """A legacy root table; ``domain`` builds a second-stage table and points devices at it."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.rt = LegacyRootTable(rig.ram, rig.alloc)
        self.tables: dict[int, SecondStageTable] = {}

    def table(self) -> SecondStageTable:
        return SecondStageTable(self.rig.ram, self.rig.alloc, levels=4)

    def attach(self, sid: int, ss: SecondStageTable, did: int, tt: int = 0, fpd: bool = False) -> None:
        self.rt.set_context(sid >> 8, sid & 0xFF, slptptr=ss.root, aw=ss.aw, did=did, tt=tt, fpd=fpd)
        self.tables[sid] = ss

    def enable(self) -> None:
        enable_translation(self.rig.io, self.rt.root)


class Scalable:
    """A scalable-mode root table with one PASID table set per device."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.rt = ScalableRootTable(rig.ram, rig.alloc)
        self.pasids: dict[int, PasidTables] = {}

    def device(self, sid: int, *, pre: bool = False, dte: bool = False, paside: bool = True,
               fpd: bool = False, rid_pasid: int = 0) -> PasidTables:
        pt = PasidTables(self.rig.ram, self.rig.alloc)
        self.rt.set_context(sid >> 8, sid & 0xFF, pasid_dir=pt.dir, pdts=pt.pdts, pre=pre, dte=dte, paside=paside,
                            fpd=fpd, rid_pasid=rid_pasid)
        self.pasids[sid] = pt
        return pt

    def ss_table(self) -> SecondStageTable:
        return SecondStageTable(self.rig.ram, self.rig.alloc, levels=4)

    def fs_table(self) -> FirstStageTable:
        return FirstStageTable(self.rig.ram, self.rig.alloc, levels=4)

    def enable(self) -> None:
        enable_translation(self.rig.io, self.rt.root, scalable=True)


__all__ = ["Rig", "Legacy", "Scalable", "PAGE_4K", "PGTT_FS", "PGTT_SS", "R", "W", "U"]
