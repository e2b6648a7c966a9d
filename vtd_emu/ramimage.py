"""RAM images: raw files where byte offset = physical address (what QEMU's ``pmemsave`` and ``dump-guest-
memory -z`` style tools write), optionally zstd-compressed (``.zst``; needs the ``zstandard`` package).

:meth:`vtd_emu.memory.HostRAM.save` writes both forms.  An image is input from anyone: a truncated or
corrupt zstd stream is a :class:`~vtd_emu.errors.TraceError` naming the file and offset, never a silently
shorter memory, and an image (after decompression) is at most :data:`MAX_IMAGE_BYTES` long, so neither
``/dev/zero`` nor a zstd bomb can exhaust the machine.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import BinaryIO

from .errors import TraceError
from .memory import HostRAM

_CHUNK = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_IMAGE_BYTES = 1 << 32
"""Largest image loaded (4 GiB of physical address space, decompressed); larger is refused."""


def _zstd_frames_end(raw: BinaryIO, file: str) -> None:
    """Walk the frame and block headers of a zstd file without decompressing (RFC 8878 section 3.1):
    a stream cut short ends inside a frame, which a streaming decompressor would accept silently."""
    raw.seek(0, 2)
    end = raw.tell()
    pos = 0
    while pos < end:
        raw.seek(pos)
        head = raw.read(4)
        if len(head) < 4:
            raise TraceError(file, f"offset {pos:#x}", "truncated zstd stream (a partial frame magic)")
        magic = int.from_bytes(head, "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame: 4-byte size, then that many bytes
            size = raw.read(4)
            if len(size) < 4:
                raise TraceError(file, f"offset {pos:#x}", "truncated zstd skippable frame")
            pos += 8 + int.from_bytes(size, "little")
            if pos > end:
                raise TraceError(file, f"offset {end:#x}", "truncated zstd skippable frame")
            continue
        if head != ZSTD_MAGIC:
            raise TraceError(file, f"offset {pos:#x}", "not a zstd frame (after the previous frame's end)")
        fhd = raw.read(1)
        if not fhd:
            raise TraceError(file, f"offset {pos + 4:#x}", "truncated zstd frame header")
        d = fhd[0]
        fcs_flag, single, checksum, dict_flag = d >> 6, (d >> 5) & 1, (d >> 2) & 1, d & 3
        header = 1 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
        pos += 4 + header
        while True:
            raw.seek(pos)
            bh = raw.read(3)
            if len(bh) < 3:
                raise TraceError(file, f"offset {end:#x}", "truncated zstd stream (the frame's last block is "
                                                           "missing)")
            v = int.from_bytes(bh, "little")
            last, btype, bsize = v & 1, (v >> 1) & 3, v >> 3
            if btype == 3:
                raise TraceError(file, f"offset {pos:#x}", "corrupt zstd stream (reserved block type)")
            pos += 3 + (1 if btype == 1 else bsize)
            if pos > end:
                raise TraceError(file, f"offset {end:#x}", "truncated zstd stream (a block is cut short)")
            if last:
                break
        pos += 4 if checksum else 0
        if pos > end:
            raise TraceError(file, f"offset {end:#x}", "truncated zstd stream (the frame checksum is cut short)")
    raw.seek(0)


def _open(path: Path) -> BinaryIO:
    raw = path.open("rb")
    try:
        st = path.stat()
        if stat.S_ISREG(st.st_mode) and st.st_size > MAX_IMAGE_BYTES:
            raise TraceError(str(path), "", f"RAM image of {st.st_size:#x} bytes; at most {MAX_IMAGE_BYTES:#x} "
                                            "are loaded")
        magic = raw.read(4)
        raw.seek(0)
        if magic != ZSTD_MAGIC:
            return raw
        try:
            import zstandard
        except ImportError:
            raise TraceError(str(path), "", "zstd-compressed image: install the 'zstandard' package "
                                            "(pip install 'vtd-emu[zstd]') or decompress it first") from None
        _zstd_frames_end(raw, str(path))
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True,  # type: ignore[no-any-return]
                                                          read_across_frames=True)
    except BaseException:
        raw.close()
        raise


def load_ram_image(path: str | Path, *, base: int = 0, ram: HostRAM | None = None, size: int | None = None) -> HostRAM:
    """Load an image at physical address ``base`` into ``ram`` (a new sparse HostRAM by default, whose
    size is ``size`` or, if None, unlimited).  All-zero pages are skipped, so memory stays sparse."""
    p = Path(path)
    if ram is None:
        ram = HostRAM(size)
    try:
        f = _open(p)
    except OSError as exc:
        raise TraceError(str(p), "", f"cannot read RAM image: {exc.strerror or exc}") from None
    addr = base
    try:
        with f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                if addr - base + len(chunk) > MAX_IMAGE_BYTES:
                    raise TraceError(str(p), f"offset {MAX_IMAGE_BYTES:#x}",
                                     f"RAM image longer than {MAX_IMAGE_BYTES:#x} bytes, the most that is loaded")
                ram.load_image(chunk, base=addr)
                addr += len(chunk)
    except OSError as exc:
        raise TraceError(str(p), f"offset {addr - base:#x}", f"read failed: {exc.strerror or exc}") from None
    except TraceError:
        raise
    except Exception as exc:  # zstandard raises its own ZstdError for corrupt input
        if type(exc).__module__.startswith("zstandard"):
            raise TraceError(str(p), f"offset {addr - base:#x}", f"corrupt zstd stream: {exc}") from None
        raise
    return ram
