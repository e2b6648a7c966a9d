"""What every iommufd object file shares (the kernel's ``iommufd_private.h``): the object base with its
per-type destroy operation, the object table entry seen by tests, user-data copies, and the check that
turns a Python value outside its C type into ``ValueError``."""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

from ..errors import fail
from ..uapi import HWPT_DATA_NONE, HWPT_DATA_VTD_S1, HwptVtdS1

if TYPE_CHECKING:
    from .main import IommuFd


def check_u(name: str, value: int, bits: int) -> int:
    """``value`` if it fits a ``bits``-bit unsigned C field; ``ValueError`` otherwise (a caller's mistake:
    no kernel could ever see such a value)."""
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"{name} must be a {bits}-bit unsigned value, got {value!r}")
    return value


class Obj(ABC):
    """``struct iommufd_object``: an id in the context's table and a count of users."""

    kind: ClassVar[str] = "object"

    def __init__(self, ictx: "IommuFd") -> None:
        self.ictx = ictx
        self.id = 0
        self.users = 1
        """The table's reference plus one per holder (``iommufd.md`` §3.1)."""

    @abstractmethod
    def release(self) -> None:
        """``iommufd_object_ops.destroy`` of this type: give back what the object holds, once it has left
        the table (the context removes it, then calls this)."""


@dataclass
class ObjectInfo:
    id: int
    kind: str
    users: int


class UserData:
    """Driver data as the kernel sees it: a type, a length and a user pointer read on demand (a read
    that faults is EFAULT at the point the kernel would copy it)."""

    def __init__(self, data_type: int, length: int, read: Callable[[int, int], bytes]) -> None:
        self.type = data_type
        self.len = length
        self._read = read

    @staticmethod
    def of(data: "HwptVtdS1 | bytes | None", data_type: int | None, data_len: int | None) -> "UserData":
        """The user data of a Python call: a :class:`HwptVtdS1` (packed as the kernel would read it) or
        raw bytes; ``data_len`` past the bytes models a pointer that faults there."""
        raw: bytes | None = data.pack() if isinstance(data, HwptVtdS1) else data
        if data_type is None:
            data_type = HWPT_DATA_NONE if raw is None else HWPT_DATA_VTD_S1
        length = len(raw) if data_len is None and raw is not None else (data_len or 0)

        def read(off: int, n: int) -> bytes:
            if raw is None or off + n > len(raw):
                raise fail(errno.EFAULT, "bad user pointer")
            return raw[off:off + n]
        return UserData(data_type, length, read)

    def copy_struct(self, data_type: int, size: int, min_size: int) -> bytes:
        """``iommu_copy_struct_from_user``: exactly ``size`` bytes (zero-extended)."""
        if self.type != data_type:
            raise fail(errno.EINVAL, "data type mismatch")
        if self.len < min_size:
            raise fail(errno.EINVAL, "user data too short")
        head = self._read(0, min(self.len, size))
        if self.len > size and any(self._read(size, self.len - size)):
            raise fail(errno.E2BIG, "non-zero bytes past the structure")
        return head + bytes(size - len(head))


__all__ = ["Obj", "ObjectInfo", "UserData", "check_u"]
