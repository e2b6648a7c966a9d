#!/usr/bin/env python3
"""Generate the RAM images in ``traces/images/`` that the README's ``walk`` and ``dump`` examples read
(reproducibly: same code, same bytes), written with :meth:`vtd_emu.memory.HostRAM.save`.

- ``guest-ram.bin.zst`` (zstd): a legacy-mode root table at 0x1000 for a ``qemu-7.2-default`` unit
  (39-bit, three-level second stage) with devices 00:02.0 (sid 0x10) and 00:01.0 (sid 0x8), and a bare
  four-level first-stage table (like a process's CR3) at :data:`FS_ROOT`.
- ``host-ram.bin`` (raw, offset = physical address): a scalable-mode root table at 0x1000 whose device
  00:03.0 (sid 0x18) has PASID 3 nested: a first-stage table in guest memory over a second stage.

Only table pages are memory: data pages are never written, so both images stay a few KiB (the raw one
is as long as its highest table page).

    .venv/bin/python scripts/make_images.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vtd_emu.builders import (  # noqa: E402
    PAGE_2M,
    PGTT_NESTED,
    R,
    U,
    W,
    FirstStageTable,
    GuestPhysView,
    LegacyRootTable,
    PageAllocator,
    PasidTables,
    ScalableRootTable,
    SecondStageTable,
)
from vtd_emu.memory import HostRAM  # noqa: E402

OUT = REPO / "traces" / "images"
ROOT = 0x1000
FS_ROOT = 0x10000
"""Where the first page the bare first-stage table's allocator hands out lands (its root)."""


def guest_image() -> HostRAM:
    ram = HostRAM()
    alloc = PageAllocator(ram, base=ROOT, limit=FS_ROOT)
    root = LegacyRootTable(ram, alloc)
    assert root.root == ROOT
    ss = SecondStageTable(ram, alloc, levels=3)                        # AW=1: 39-bit, 3 levels
    ss.map(0xFFFF_F000, 0x3F_F000, 0x1000, R | W)                       # the page below 4 GiB
    ss.map(0x10_0000, 0x80_0000, 0x4000, R)                             # four read-only pages
    root.set_context(0, 0x10, slptptr=ss.root, aw=1, did=1)             # 00:02.0
    ss2 = SecondStageTable(ram, alloc, levels=3)
    ss2.map(0x4000_0000, 0x4000_0000, 2 * PAGE_2M, R | W, page_size=PAGE_2M)   # identity, 2 MiB pages
    ss2.map(0x20_0000, 0x60_0000, 0x2000, R | W)
    root.set_context(0, 0x08, slptptr=ss2.root, aw=1, did=2)            # 00:01.0
    fs_alloc = PageAllocator(ram, base=FS_ROOT, limit=FS_ROOT + 0x8000)
    fs = FirstStageTable(ram, fs_alloc, levels=4)
    assert fs.root == FS_ROOT
    fs.map(0x1000_4000_0000, 0x2000_0000, 0x4000, W | U)                # four user pages
    fs.map(0x7FFF_FFE0_0000, 0x3000_0000, PAGE_2M, W, page_size=PAGE_2M)  # a supervisor 2 MiB page
    return ram


def host_image() -> HostRAM:
    ram = HostRAM()
    alloc = PageAllocator(ram, base=ROOT, limit=0x10000)
    root = ScalableRootTable(ram, alloc)
    assert root.root == ROOT
    ss = SecondStageTable(ram, alloc, levels=4)
    ss.map(0, 0x1_0000, 0x10_0000, R | W)                               # guest RAM: GPA 0..1M at HPA 64K
    ss.map(0x40_0000, 0x50_0000, 0x2000, R)                             # two read-only guest pages
    guest = GuestPhysView(ram, ss)
    fs = FirstStageTable(guest, PageAllocator(guest, base=0x1000, limit=0x10000), levels=4)
    fs.map(0x7F00_0000_0000, 0x2_0000, 0x4000, W | U)                   # four user pages
    fs.map(0x7F00_1000_0000, 0x40_0000, 0x2000, W | U)                  # writable in FS, read-only in SS
    pasids = PasidTables(ram, alloc)
    pasids.set_entry(3, pgtt=PGTT_NESTED, did=2, fsptptr=fs.root, ssptptr=ss.root, aw=2)
    root.set_context(0, 0x18, pasid_dir=pasids.dir, pdts=pasids.pdts)   # 00:03.0
    return ram


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, ram in (("guest-ram.bin.zst", guest_image()), ("host-ram.bin", host_image())):
        n = ram.save(OUT / name)
        print(f"{OUT / name}: {n:#x} bytes of memory, {(OUT / name).stat().st_size:,} bytes on disk")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
