"""Output files that appear whole or not at all.

Every command that writes a file writes it under a temporary name in the same directory and renames it
over the target only when the work succeeded: a failure (bad input, an interrupt, a full disk) leaves no
half-written or empty file behind, and an existing file of that name untouched.  The rename is atomic on
POSIX because source and target are in one directory (one file system).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, TextIO


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path``.

    The temporary name keeps ``path``'s extension, since writers that choose their encoding (or, like
    numpy's ``savez``, append one) from the name must see the same one."""
    target = Path(path)
    directory = target.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=directory)
    except OSError as exc:
        # Name the file the user asked for, not the temporary one.
        raise type(exc)(exc.errno, exc.strerror, str(target)) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            # The writer wrote nothing (or elsewhere): an empty result is still a result.
            tmp.touch()
        # mkstemp creates the file 0600; a written file gets the mode a plain open() would give it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def replacing_text(path: str | Path) -> Iterator[TextIO]:
    """A text stream whose content replaces ``path`` only if the block completes (see :func:`replacing`)."""
    with replacing(path) as tmp:
        with tmp.open("w") as fh:
            yield fh
