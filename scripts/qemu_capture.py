#!/usr/bin/env python3
"""Capture a QEMU ``-trace 'vtd_*'`` log of a small guest-less session, for ``vtd-emu import-qemu``.

QEMU (``qemu-system-x86_64``, Debian's 7.2 here) runs a q35 machine with ``intel-iommu`` and an ``edu``
device at 00:02.0 (requester id 0x10) under qtest: this script is the "guest".  Over the qtest socket it
writes a legacy root/context table and a 3-level second-stage table into guest RAM, programs the VT-d
registers (root table, queued invalidation, translation enable), queues invalidations, and has the edu
device DMA through the IOMMU: mapped reads and writes, a read of an unmapped page and a write to a
read-only page (faults), with the fault record cleared in between.  Tables do not change after setup, so
the RAM image taken before the first DMA is enough to replay the whole log.

Writes, next to ``--out PREFIX``: ``PREFIX.log`` (the trace, 7.2 ``pid@sec.usec:`` lines) and
``PREFIX.ram.zst`` (guest RAM before the first DMA, zstd-compressed raw image).  Then::

    vtd-emu import-qemu PREFIX.log --ram PREFIX.ram.zst -o PREFIX.yaml
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the qtest driver is a test harness (tests/qemu_harness.py), not library code

from tests.qemu_harness import QTest, find_qemu, halting_bios  # noqa: E402

RAM = 128 << 20
VTD = 0xFED9_0000
EDU_BAR = 0xFEA0_0000
EDU_BDF = (0, 2, 0)

ROOT, CTX, SL3, SL2, SL1 = 0x100000, 0x101000, 0x102000, 0x103000, 0x104000
QUEUE, STATUS = 0x110000, 0x111000
DATA = 0x200000           # four data pages mapped at IOVA 0x40000 (RW) and one at 0x50000 (read-only)


def build_tables(q: QTest) -> None:
    # Legacy root entry for bus 0 -> context table; context entry devfn 0x10 (00:02.0): P, AW=1 (39-bit,
    # 3 levels), DID 1, SLPTPTR = SL3.
    q.writeq(ROOT, CTX | 1)
    q.writeq(CTX + 0x10 * 16, SL3 | 1)
    q.writeq(CTX + 0x10 * 16 + 8, 1 | 1 << 8)
    q.writeq(SL3, SL2 | 3)
    q.writeq(SL2, SL1 | 3)
    for i in range(4):
        q.writeq(SL1 + (0x40 + i) * 8, (DATA + i * 0x1000) | 3)
    q.writeq(SL1 + 0x50 * 8, (DATA + 0x4000) | 1)


def qi(q: QTest, descs: list[tuple[int, int]], tail: int) -> int:
    for lo, hi in descs:
        q.writeq(QUEUE + tail, lo)
        q.writeq(QUEUE + tail + 8, hi)
        tail = (tail + 16) % 0x1000
    q.writel(VTD + 0x88, tail)
    return tail


def wait_desc(data: int) -> tuple[int, int]:
    return (5 | 1 << 5 | data << 32, STATUS)


def edu_dma(q: QTest, iova: int, count: int, to_ram: bool) -> None:
    """One edu DMA: to_ram copies edu buffer -> IOVA (a device write), else IOVA -> buffer (a read)."""
    if to_ram:
        q.writeq(EDU_BAR + 0x80, 0x40000)
        q.writeq(EDU_BAR + 0x88, iova)
    else:
        q.writeq(EDU_BAR + 0x80, iova)
        q.writeq(EDU_BAR + 0x88, 0x40000)
    q.writeq(EDU_BAR + 0x90, count)
    q.writeq(EDU_BAR + 0x98, 1 | (2 if to_ram else 0))
    # The edu runs its DMA from a virtual-clock timer 100 ms later; without a qtest accelerator (Debian's
    # QEMU has none) the clock runs in real time, so wait for the RUN bit to clear.
    deadline = time.monotonic() + 5
    while q.readq(EDU_BAR + 0x98) & 1:
        if time.monotonic() > deadline:
            raise RuntimeError("edu DMA did not complete")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output prefix (PREFIX.log, PREFIX.ram.zst)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    args = ap.parse_args(argv)
    import zstandard

    log = args.out.with_suffix(".log")
    with tempfile.TemporaryDirectory() as tmp:
        raw_log = Path(tmp) / "trace.log"
        # A firmware that only halts: nothing but this script touches PCI or the IOMMU.
        bios = Path(tmp) / "halt.bin"
        bios.write_bytes(halting_bios())
        qemu = find_qemu(args.qemu) or args.qemu
        q = QTest([qemu, "-machine", "q35", "-bios", str(bios), "-m", str(RAM >> 20), "-display", "none", "-nodefaults",
                   "-device", "intel-iommu", "-device", "edu,addr=2.0", "-qtest", "stdio", "-qtest-log", "/dev/null",
                   "-trace", "vtd_*", "-msg", "timestamp=on"], stderr_path=raw_log)
        try:
            q.pci_cfg_writel(EDU_BDF, 0x10, EDU_BAR)
            q.pci_cfg_writel(EDU_BDF, 0x04, 0x6)         # memory space + bus master
            build_tables(q)
            for i in range(4):
                q.cmd(f"write {DATA + i * 0x1000:#x} 0x10 0x{bytes(range(16 * i, 16 * i + 16)).hex()}")
            image = bytearray(RAM)
            for base, n in ((ROOT, 0x5000), (DATA, 0x5000)):
                image[base:base + n] = q.read(base, n)
            # Root table, queued invalidation, then translation.
            q.writeq(VTD + 0x20, ROOT)
            q.writel(VTD + 0x18, 1 << 30)
            q.readl(VTD + 0x1C)
            q.writeq(VTD + 0x90, QUEUE)
            q.writel(VTD + 0x18, 1 << 26)
            q.readl(VTD + 0x1C)
            tail = qi(q, [(1 | 1 << 4, 0), (2 | 1 << 4, 0), wait_desc(1)], 0)
            q.writel(VTD + 0x18, 1 << 31 | 1 << 26)
            q.readl(VTD + 0x1C)
            # DMA: reads and writes through the mapping, across a page boundary.
            edu_dma(q, 0x40100, 0x100, to_ram=False)
            edu_dma(q, 0x41000, 0x40, to_ram=True)
            edu_dma(q, 0x42F80, 0x100, to_ram=False)
            # A read of an unmapped page: fault 6 (READ), recorded in FRCD0.
            edu_dma(q, 0x60000, 0x8, to_ram=False)
            q.readl(VTD + 0x34)
            q.readq(VTD + 0x228)
            q.writel(VTD + 0x22C, 1 << 31)       # clear F
            q.writel(VTD + 0x34, 1 << 1)
            # A write to the read-only page: fault 5 (WRITE).
            edu_dma(q, 0x50000, 0x8, to_ram=True)
            q.readl(VTD + 0x34)
            q.writel(VTD + 0x22C, 1 << 31)
            # Page- and domain-selective IOTLB invalidations, a device-selective context invalidation.
            tail = qi(q, [(2 | 3 << 4 | 1 << 16, 0x41000), (2 | 2 << 4 | 1 << 16, 0),
                          (1 | 3 << 4 | 1 << 16 | 0x10 << 32, 0), wait_desc(2)], tail)
            edu_dma(q, 0x41000, 0x40, to_ram=False)
            edu_dma(q, 0x43000, 0x20, to_ram=True)
            q.readl(VTD + 0x34)
        finally:
            q.close()
        lines = raw_log.read_text().splitlines()
    log.write_text("\n".join(lines) + "\n")
    ram_path = args.out.with_suffix(".ram.zst")
    ram_path.write_bytes(zstandard.ZstdCompressor(level=19).compress(bytes(image)))
    print(f"wrote {log} ({len(lines)} lines) and {ram_path} ({ram_path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
