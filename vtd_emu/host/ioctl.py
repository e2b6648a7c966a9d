"""``ioctl(2)`` on an iommufd, byte for byte: the command is a request number and a buffer laid out as
the kernel's structure (leading ``u32 size``); pointers inside it are user VAs of the VMM process.

The dispatcher reproduces ``iommufd_fops_ioctl`` (``iommufd.md`` §1): unknown numbers ENOTTY, an
unreadable argument EFAULT, ``size`` below the last mandatory field EINVAL, non-zero bytes past the
kernel's structure E2BIG, shorter structures zero-extended, and the output written back as
``min(size, sizeof)`` bytes.  Each command then calls the matching :class:`IommuFd` method.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import IommufdError, fail
from .iommufd import UserData, VFIO_IOAS_GET
from .uapi import (CMD_STRUCTS, COMMANDS, HW_INFO_FLAG_INPUT_TYPE, HWPT_FAULT_ID_VALID, IOAS_MAP_FIXED_IOVA,
                   IOMMUFD_TYPE, VIOMMU_TYPE_DEFAULT, IommuIovaRange)

if TYPE_CHECKING:
    from .iommufd import IommuFd

_BY_NR = {c.nr: c for c in COMMANDS}


class _User:
    """User-memory accessors that turn an unmapped address into EFAULT."""

    def __init__(self, ictx: "IommuFd") -> None:
        self.proc = ictx.host.process

    def read(self, va: int, n: int) -> bytes:
        if n == 0:
            return b""
        if not va:
            raise fail(errno.EFAULT, "NULL pointer")
        try:
            return self.proc.read(va, n)
        except ValueError:
            raise fail(errno.EFAULT, f"user VA {va:#x} not mapped") from None

    def write(self, va: int, data: bytes) -> None:
        if not data:
            return
        if not va:
            raise fail(errno.EFAULT, "NULL pointer")
        try:
            self.proc.write(va, data)
        except ValueError:
            raise fail(errno.EFAULT, f"user VA {va:#x} not writable") from None


def ioctl(ictx: "IommuFd", request: int, arg: bytearray | None) -> int:
    """Run one iommufd ioctl; the output is written into ``arg``.  Returns 0 or raises
    :class:`IommufdError` (after writing back what the kernel writes back on that error)."""
    nr = request & 0xFF
    if (request >> 8) & 0xFF != IOMMUFD_TYPE or nr not in _BY_NR or request != (IOMMUFD_TYPE << 8 | nr):
        # Below the table: the VFIO type1 compatibility handler, not modelled (it knows no such command).
        raise fail(errno.ENOTTY, f"unknown ioctl {request:#x}")
    if arg is None or len(arg) < 4:
        raise fail(errno.EFAULT, "bad argument pointer")
    cmd = _BY_NR[nr]
    size = int.from_bytes(arg[:4], "little")
    if size > len(arg):
        raise fail(errno.EFAULT, "size runs past the argument")
    if size < cmd.min_size:
        raise fail(errno.EINVAL, f"size {size} below {cmd.min_size}")
    if size > cmd.size and any(arg[cmd.size:size]):
        raise fail(errno.E2BIG, "non-zero bytes past the structure")
    raw = bytes(arg[:min(size, cmd.size)]) + bytes(max(0, cmd.size - size))
    layout = CMD_STRUCTS[cmd.name]
    fields = dict(layout.parse(raw))
    fields.pop("_io", None)
    user = _User(ictx)
    handler = _HANDLERS[cmd.name]

    def respond(out: dict[str, Any]) -> None:
        fields.update(out)
        data = layout.build(fields)
        n = min(size, cmd.size)
        arg[:n] = data[:n]

    handler(ictx, fields, user, respond)
    return 0


# -- command handlers ---------------------------------------------------------------------------------

Respond = Callable[[dict[str, Any]], None]


def _destroy(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    ictx.destroy(f["id"])


def _ioas_alloc(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    respond({"out_ioas_id": ictx.ioas_alloc(f["flags"])})


def _allow_iovas(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["__reserved"]:
        raise fail(errno.EOPNOTSUPP, "__reserved")
    ptr, num = f["allowed_iovas"], f["num_iovas"]

    def ranges() -> Iterator[tuple[int, int]]:
        for i in range(num):
            r = IommuIovaRange.parse(user.read(ptr + 16 * i, 16))
            yield r.start, r.last
    ictx.ioas_allow_iovas(f["ioas_id"], ranges())


def _iova_ranges(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["__reserved"]:
        raise fail(errno.EOPNOTSUPP, "__reserved")
    res = ictx.ioas_iova_ranges(f["ioas_id"])
    cap = f["num_iovas"]
    for i, r in enumerate(res.ranges[:cap]):
        user.write(f["allowed_iovas"] + 16 * i, IommuIovaRange.build(dict(start=r.start, last=r.last)))
    respond({"num_iovas": len(res.ranges), "out_iova_alignment": res.alignment})
    if len(res.ranges) > cap:
        raise fail(errno.EMSGSIZE, f"{len(res.ranges)} ranges, room for {cap}")


def _map(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["__reserved"]:
        raise fail(errno.EOPNOTSUPP, "__reserved")
    flags = f["flags"]
    iova = f["iova"] if flags & IOAS_MAP_FIXED_IOVA else None
    respond({"iova": ictx.ioas_map(f["ioas_id"], f["user_va"], f["length"], iova, flags)})


def _map_file(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    flags = f["flags"]
    iova = f["iova"] if flags & IOAS_MAP_FIXED_IOVA else None
    respond({"iova": ictx.ioas_map_file(f["ioas_id"], f["fd"], f["start"], f["length"], iova, flags)})


def _copy(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    flags = f["flags"]
    dst = f["dst_iova"] if flags & IOAS_MAP_FIXED_IOVA else None
    respond({"dst_iova": ictx.ioas_copy(f["dst_ioas_id"], dst, f["src_ioas_id"], f["src_iova"], f["length"],
                                        flags)})


def _unmap(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    respond({"length": ictx.ioas_unmap(f["ioas_id"], f["iova"], f["length"])})


def _option(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["__reserved"]:
        raise fail(errno.EOPNOTSUPP, "__reserved")
    respond({"val64": ictx.option(f["option_id"], f["op"], f["object_id"], f["val64"])})


def _vfio_ioas(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["__reserved"]:
        raise fail(errno.EOPNOTSUPP, "__reserved")
    out = ictx.vfio_ioas(f["op"], f["ioas_id"])
    if f["op"] == VFIO_IOAS_GET:
        respond({"ioas_id": out})


def _hwpt_alloc(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["__reserved"]:
        raise fail(errno.EOPNOTSUPP, "__reserved")
    ptr = f["data_uptr"]
    data = UserData(f["data_type"], f["data_len"], lambda o, n: user.read(ptr + o, n) if ptr else _null())
    fault_id = f["fault_id"] if f["flags"] & HWPT_FAULT_ID_VALID else None
    respond({"out_hwpt_id": ictx.hwpt_alloc(f["dev_id"], f["pt_id"], f["flags"], data, fault_id)})


def _null() -> bytes:
    raise fail(errno.EFAULT, "NULL pointer")


def _hw_info(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["flags"] & ~HW_INFO_FLAG_INPUT_TYPE or any(f["__reserved"]):
        raise fail(errno.EOPNOTSUPP, "flags or __reserved")
    info = ictx.get_hw_info(f["dev_id"], f["data_len"], flags=f["flags"], data_type=f["data_type"])
    if f["data_len"]:
        user.write(f["data_uptr"], info.data)
    respond({"data_len": info.data_len, "data_type": info.out_data_type,
             "out_capabilities": info.capabilities, "out_max_pasid_log2": info.max_pasid_log2})


def _set_dirty(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["__reserved"]:
        raise fail(errno.EOPNOTSUPP, "__reserved")
    ictx.hwpt_set_dirty_tracking(f["hwpt_id"], flags=f["flags"])


def _get_dirty(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["__reserved"]:
        raise fail(errno.EOPNOTSUPP, "__reserved")
    bitmap = ictx.hwpt_get_dirty_bitmap(f["hwpt_id"], f["iova"], f["length"], f["page_size"], f["flags"])
    # The kernel sets bits in the user's bitmap; it never clears the others.
    old = user.read(f["data"], len(bitmap))
    user.write(f["data"], bytes(a | b for a, b in zip(old, bitmap)))


def _invalidate(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    done = 0
    try:
        if f["__reserved"]:
            raise fail(errno.EOPNOTSUPP, "__reserved")
        ptr = f["data_uptr"]
        done = ictx.invalidate_user(f["hwpt_id"], f["data_type"], f["entry_len"], f["entry_num"], bool(ptr),
                                   lambda o, n: user.read(ptr + o, n))
    except IommufdError as e:
        respond({"entry_num": e.entry_num or 0})
        raise
    respond({"entry_num": done})


def _fault_alloc(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    fid, file = ictx.fault_queue_alloc(f["flags"])
    respond({"out_fault_id": fid, "out_fault_fd": file.fd})


def _viommu_alloc(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["flags"] or f["type"] == VIOMMU_TYPE_DEFAULT:
        raise fail(errno.EOPNOTSUPP, "flags or DEFAULT type")
    ictx.viommu_alloc(f["dev_id"], f["hwpt_id"], f["type"], f["flags"])


def _vdevice_alloc(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    ictx.vdevice_alloc(f["viommu_id"], f["dev_id"], f["virt_id"])


def _change_process(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["__reserved"]:
        raise fail(errno.EOPNOTSUPP, "__reserved")
    ictx.ioas_change_process()


def _veventq_alloc(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["flags"] or f["__reserved"] or f["type"] == 0:
        raise fail(errno.EOPNOTSUPP, "flags, __reserved or DEFAULT type")
    if not f["veventq_depth"]:
        raise fail(errno.EINVAL, "depth 0")
    raise fail(errno.ENOENT, f"no vIOMMU {f['viommu_id']}")


def _hw_queue_alloc(ictx: "IommuFd", f: dict, user: _User, respond: Respond) -> None:
    if f["flags"] or f["type"] == 0:
        raise fail(errno.EOPNOTSUPP, "flags or DEFAULT type")
    if not f["length"]:
        raise fail(errno.EINVAL, "length 0")
    if f["nesting_parent_iova"] + f["length"] - 1 > (1 << 64) - 1:
        raise fail(errno.EOVERFLOW, "range overflows")
    raise fail(errno.ENOENT, f"no vIOMMU {f['viommu_id']}")


_HANDLERS: dict[str, Callable[["IommuFd", dict, _User, Respond], None]] = {
    "DESTROY": _destroy, "IOAS_ALLOC": _ioas_alloc, "IOAS_ALLOW_IOVAS": _allow_iovas, "IOAS_COPY": _copy,
    "IOAS_IOVA_RANGES": _iova_ranges, "IOAS_MAP": _map, "IOAS_UNMAP": _unmap, "OPTION": _option,
    "VFIO_IOAS": _vfio_ioas, "HWPT_ALLOC": _hwpt_alloc, "GET_HW_INFO": _hw_info,
    "HWPT_SET_DIRTY_TRACKING": _set_dirty, "HWPT_GET_DIRTY_BITMAP": _get_dirty, "HWPT_INVALIDATE": _invalidate,
    "FAULT_QUEUE_ALLOC": _fault_alloc, "IOAS_MAP_FILE": _map_file, "VIOMMU_ALLOC": _viommu_alloc,
    "VDEVICE_ALLOC": _vdevice_alloc, "IOAS_CHANGE_PROCESS": _change_process, "VEVENTQ_ALLOC": _veventq_alloc,
    "HW_QUEUE_ALLOC": _hw_queue_alloc,
}

__all__ = ["ioctl"]
