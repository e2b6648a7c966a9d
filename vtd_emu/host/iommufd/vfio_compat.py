"""The VFIO type1 compatibility layer (the kernel's ``vfio_compat.c``): only IOMMU_VFIO_IOAS, which picks
the IOAS type1 ioctls would use.  The type1 ioctls themselves are not modelled (``docs/host.md``)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ..errors import fail
from .ioas import Ioas

if TYPE_CHECKING:
    from .main import IommuFd

VFIO_IOAS_GET, VFIO_IOAS_SET, VFIO_IOAS_CLEAR = 0, 1, 2


def vfio_ioas(ictx: "IommuFd", op: int, ioas_id: int) -> int:
    """``iommufd_vfio_ioas``: CLEAR forgets the IOAS without destroying it."""
    if op == VFIO_IOAS_GET:
        if ictx.vfio_compat_ioas is None:
            raise fail(errno.ENODEV, "no compat IOAS")
        return ictx.vfio_compat_ioas.id
    if op == VFIO_IOAS_SET:
        ictx.vfio_compat_ioas = ictx.get_object(ioas_id, Ioas)
        return ioas_id
    if op == VFIO_IOAS_CLEAR:
        ictx.vfio_compat_ioas = None
        return 0
    raise fail(errno.EOPNOTSUPP, "unknown op")


__all__ = ["VFIO_IOAS_GET", "VFIO_IOAS_SET", "VFIO_IOAS_CLEAR", "vfio_ioas"]
