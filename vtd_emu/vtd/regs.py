"""The MMIO register file: storage and the access semantics every register shares (RO, RW, RW1C, WO,
reserved), compiled once from ``specs/registers.yaml`` for the configured CAP/ECAP.

Side effects (GCMD handshakes, invalidations, fault-record clearing...) are not here: the chip registers
a handler per register name and is called after the generic update.  Nothing a guest writes can raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from ..spec import Register, Specs, specs
from .config import VtdConfig

_M64 = (1 << 64) - 1

WriteHandler = Callable[[int, int, int, int, int], None]
"""handler(index, old, new, value, wmask): the register's value before and after the generic update, the
value written (shifted into place) and the mask of the bits the access covered."""


@dataclass(slots=True)
class RegSlot:
    name: str
    index: int          # element of a register array (FRCD), else 0
    offset: int
    width: int          # bits
    rw: int             # plain read/write bits
    rw1c: int
    wo: int             # write-only: the write is seen by the handler, reads return 0
    readable: int       # bits a read returns (RO | RW | RW1C)


_Layout = tuple[dict[tuple[str, int], RegSlot], dict[int, tuple[RegSlot, int]], int, dict[tuple[str, int], int]]


@lru_cache(maxsize=64)
def _layout(cfg: VtdConfig, sp: Specs) -> _Layout:
    """Slots by (name, index), the slot and bit shift of every dword offset, the size, and reset values."""
    slots: dict[tuple[str, int], RegSlot] = {}
    by_dword: dict[int, tuple[RegSlot, int]] = {}
    reset: dict[tuple[str, int], int] = {}
    size = 0
    for offset, reg, index in sp.register_map(cfg.cap, cfg.ecap):
        slot = RegisterFile._compile(cfg, reg, offset, index)
        key = (reg.name, index)
        slots[key] = slot
        reset[key] = RegisterFile._reset_value(cfg, reg)
        for dw in range(0, slot.width // 32):
            by_dword[offset + 4 * dw] = (slot, 32 * dw)
        size = max(size, offset + slot.width // 8)
    return slots, by_dword, size, reset


class RegisterFile:
    """Values of every register by (name, index), and MMIO decode of offsets to registers."""

    def __init__(self, cfg: VtdConfig) -> None:
        self.cfg = cfg
        self.handlers: dict[str, WriteHandler] = {}
        # The layout depends on the configuration alone: units of one configuration share it (read-only).
        slots, by_dword, size, reset = _layout(cfg, specs())
        self.slots: dict[tuple[str, int], RegSlot] = slots
        self._by_dword: dict[int, tuple[RegSlot, int]] = by_dword
        self.size = size
        self.values: dict[tuple[str, int], int] = dict(reset)

    @staticmethod
    def _reset_value(cfg: VtdConfig, reg: Register) -> int:
        if reg.name == "VER":
            return cfg.ver
        if reg.name == "CAP":
            return cfg.cap
        if reg.name == "ECAP":
            return cfg.ecap
        return reg.reset or 0

    @staticmethod
    def _compile(cfg: VtdConfig, reg: Register, offset: int, index: int) -> RegSlot:
        m = reg.masks()
        rw, rw1c, wo, ro = m.get("RW", 0), m.get("RW1C", 0), m.get("WO", 0), m.get("RO", 0)
        if not RegisterFile._register_implemented(cfg, reg.name):
            # Registers of features the unit lacks read as zero and ignore writes.
            rw = rw1c = wo = ro = 0
        # RTADDR.TTM stays read/write on every unit (as in QEMU): what an unsupported mode does is decided
        # when SRTP latches it (control.py).
        if cfg.quirks.qemu_register_widths:
            # QEMU keeps 32 bits of IEDATA and no upper MSI address.
            if reg.name == "IEDATA":
                rw |= 0xFFFF_FFFF
            elif reg.name in ("FEUADDR", "IEUADDR"):
                rw = ro = 0
            elif reg.name == "CCMD":
                sid_fm = reg.field("SID").mask | reg.field("FM").mask
                rw &= ~sid_fm
                wo |= sid_fm
        return RegSlot(reg.name, index, offset, reg.size_bits, rw, rw1c, wo, ro | rw | rw1c)

    @staticmethod
    def _register_implemented(cfg: VtdConfig, name: str) -> bool:
        if name.startswith("MTRR"):
            return bool(cfg.ecap_field("MTS"))
        if name in ("PLMBASE", "PLMLIMIT"):
            return bool(cfg.cap_field("PLMR"))
        if name in ("PHMBASE", "PHMLIMIT"):
            return bool(cfg.cap_field("PHMR"))
        if name == "PMEN":
            return bool(cfg.cap_field("PLMR") or cfg.cap_field("PHMR"))
        if name in ("PQH", "PQT", "PQA", "PRSTS", "PECTL", "PEDATA", "PEADDR", "PEUADDR"):
            return bool(cfg.ecap_field("PRS"))
        if name in ("IQH", "IQT", "IQA", "ICS", "IECTL", "IEDATA", "IEADDR", "IEUADDR", "IQERCD"):
            return bool(cfg.ecap_field("QI"))
        if name == "AFLOG":
            return bool(cfg.cap_field("AFL"))
        return True

    # -- named access for the chip (no side effects) ---------------------------------------------
    def get(self, name: str, index: int = 0) -> int:
        return self.values[(name, index)]

    def set(self, name: str, value: int, index: int = 0) -> None:
        self.values[(name, index)] = value

    def offset_of(self, name: str, index: int = 0) -> int:
        return self.slots[(name, index)].offset

    # -- MMIO ------------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """A 4- or 8-byte read; anything else (or an unmapped offset) reads 0."""
        if size == 4:
            if offset & 3:
                return 0
            return self._read_dword(offset)
        if size == 8:
            if offset & 7:
                if not self.cfg.quirks.qemu_mmio_access or offset & 3:
                    return 0
            ent = self._by_dword.get(offset)
            if ent is not None and ent[0].width >= 64 and ent[1] % 64 == 0:
                slot, shift = ent
                return (self._visible(slot) >> shift) & _M64
            return self._read_dword(offset) | (self._read_dword(offset + 4) << 32)
        return 0

    def _read_dword(self, offset: int) -> int:
        ent = self._by_dword.get(offset)
        if ent is None:
            return 0
        slot, shift = ent
        return (self._visible(slot) >> shift) & 0xFFFF_FFFF

    def _visible(self, slot: RegSlot) -> int:
        return self.values[(slot.name, slot.index)] & slot.readable

    def write(self, offset: int, value: int, size: int) -> None:
        """A 4- or 8-byte write; others are dropped.  8-byte writes to a pair of 32-bit registers act as
        two 4-byte writes, low first."""
        if size == 4:
            if offset & 3:
                return
            self._write_part(offset, value & 0xFFFF_FFFF, 32)
        elif size == 8:
            if offset & 7 and (not self.cfg.quirks.qemu_mmio_access or offset & 3):
                return
            ent = self._by_dword.get(offset)
            value &= _M64
            if ent is not None and ent[0].width >= 64 and ent[1] % 64 == 0:
                self._write_part(offset, value, 64)
            else:
                self._write_part(offset, value & 0xFFFF_FFFF, 32)
                self._write_part(offset + 4, value >> 32, 32)

    def _write_part(self, offset: int, value: int, bits: int) -> None:
        ent = self._by_dword.get(offset)
        if ent is None:
            return
        slot, shift = ent
        wmask = ((1 << bits) - 1) << shift
        val = value << shift
        key = (slot.name, slot.index)
        old = self.values[key]
        rw = slot.rw & wmask
        new = (old & ~rw) | (val & rw)
        new &= ~(val & slot.rw1c & wmask)
        self.values[key] = new
        handler = self.handlers.get(slot.name)
        if handler is not None:
            handler(slot.index, old, new, val, wmask)

