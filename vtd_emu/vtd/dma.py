"""DMA through the unit: a device's reads and writes, translated one 4 KiB IOVA page at a time."""

from __future__ import annotations

from .access import NO_PASID, PRIV, READ, WRITE
from .entries import DROPPED, INTR_HI, INTR_LO
from .results import DmaResult
from .translate import Translator


class DmaPort(Translator):
    """Untranslated DMA requests (AT=00) from devices behind the unit."""

    def dma_read(self, sid: int, iova: int, length: int, pasid: int | None = None, priv: bool = False) -> DmaResult:
        """Read ``length`` bytes as a device would, translating each 4 KiB IOVA page separately; a faulting
        chunk reads as zeros (as does, under the ``interrupt_window_untranslated`` quirk, the MSI window)."""
        return self._dma(sid, iova, length, None, pasid, READ | (PRIV if priv else 0))

    def dma_write(self, sid: int, iova: int, data: bytes, pasid: int | None = None, priv: bool = False) -> DmaResult:
        """Write ``data`` as a device would; faulting chunks are dropped."""
        return self._dma(sid, iova, len(data), memoryview(data), pasid, WRITE | (PRIV if priv else 0))

    def _dma(self, sid: int, iova: int, length: int, data: memoryview | None, pasid: int | None,
             req: int) -> DmaResult:
        out = bytearray(length if data is None else 0)
        faults: list[int] = []
        ptag = NO_PASID if pasid is None else pasid
        mem = self.mem
        xl = self.xlate
        window = self.quirks.interrupt_window_untranslated
        pos = 0
        while pos < length:
            a = iova + pos
            n = min(4096 - (a & 0xFFF), length - pos)
            if window and INTR_LO <= a < INTR_HI:
                pos += n  # QEMU: never translated; reads give zeros, writes become MSIs, no fault
                continue
            hpa = xl(sid, ptag, a, req)
            if hpa >= 0:
                if data is None:
                    out[pos:pos + n] = mem.read(hpa, n)
                else:
                    mem.write(hpa, data[pos:pos + n])
            elif hpa != DROPPED:
                faults.append(-hpa)
            pos += n
        return DmaResult(bytes(out), tuple(faults))


__all__ = ["DmaPort"]
