"""The host layer's one exception type: an ``OSError`` carrying the errno the Linux kernel returns.

``IommufdError(errno.ENOENT, "IOAS 7")`` behaves like the ``OSError`` an ioctl raises in Python
(``e.errno``, ``e.strerror``); ``entry_num`` carries what ``IOMMU_HWPT_INVALIDATE`` writes back when some
entries were handled before the failing one.
"""

from __future__ import annotations

import errno as _errno
import os

from ..errors import VtdEmuError


class IommufdError(VtdEmuError, OSError):
    """An iommufd / VFIO operation failed with ``errno`` (the kernel's value, from the ``errno`` module)."""

    def __init__(self, err: int, detail: str = "", *, entry_num: int | None = None) -> None:
        text = os.strerror(err)
        super().__init__(err, f"{text} ({detail})" if detail else text)
        self.detail = detail
        self.entry_num = entry_num

    @property
    def name(self) -> str:
        """The symbolic errno (``"ENOENT"``)."""
        return _errno.errorcode.get(self.errno or 0, str(self.errno))


def fail(err: int, detail: str = "") -> IommufdError:
    """The exception to ``raise``: ``raise fail(errno.EINVAL, "why")``."""
    return IommufdError(err, detail)


__all__ = ["IommufdError", "fail"]
