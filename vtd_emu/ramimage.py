"""RAM images: raw files where byte offset = physical address (what QEMU's ``pmemsave`` and ``dump-guest-
memory -z`` style tools write), optionally zstd-compressed (``.zst``; needs the ``zstandard`` package)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO


from .errors import TraceError
from .memory import HostRAM

_CHUNK = 1 << 20


def _open(path: Path) -> BinaryIO:
    raw = path.open("rb")
    magic = raw.read(4)
    raw.seek(0)
    if magic == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise TraceError(str(path), "", "zstd-compressed image: install the 'zstandard' package "
                                            "(pip install 'vtd-emu[zstd]') or decompress it first") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)  # type: ignore[return-value]
    return raw


def load_ram_image(path: str | Path, *, base: int = 0, ram: HostRAM | None = None, size: int | None = None) -> HostRAM:
    """Load an image at physical address ``base`` into ``ram`` (a new sparse HostRAM by default, whose
    size is ``size`` or, if None, unlimited).  All-zero pages are skipped, so memory stays sparse."""
    p = Path(path)
    if ram is None:
        ram = HostRAM(size)
    try:
        f = _open(p)
    except OSError as exc:
        raise TraceError(str(p), "", f"cannot read RAM image: {exc.strerror}") from None
    addr = base
    try:
        with f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                ram.load_image(chunk, base=addr)
                addr += len(chunk)
    except OSError as exc:
        raise TraceError(str(p), f"offset {addr - base:#x}", f"read failed: {exc}") from None
    except Exception as exc:  # zstandard raises its own ZstdError for corrupt input
        if type(exc).__module__.startswith("zstandard"):
            raise TraceError(str(p), f"offset {addr - base:#x}", f"corrupt zstd stream: {exc}") from None
        raise
    return ram
