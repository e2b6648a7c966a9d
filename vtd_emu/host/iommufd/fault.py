"""Fault queues (the kernel's ``eventq.c``, formerly ``fault.c``): the FAULT object, its file, the IOPF
handler a fault-capable HWPT installs, and the automatic INVALID answers of detach, replace and destroy
(``iommufd.md`` §5)."""

from __future__ import annotations

import errno
from collections import deque
from typing import TYPE_CHECKING, Callable, NamedTuple

from ..errors import IommufdError, fail
from ..intel import IopfGroup
from ..uapi import (PAGE_RESP_INVALID, PAGE_RESP_SUCCESS, PAGE_RESPONSE_SIZE, PGFAULT_SIZE, U32_MAX,
                    IommuHwptPageResponse, IommuHwptPgfault)
from .core import Obj

if TYPE_CHECKING:
    from .device import AttachHandle
    from .hw_pagetable import Hwpt
    from .main import IommuFd


class Fault(Obj):
    """A fault queue: groups waiting to be read, and groups read but not answered (by cookie)."""

    kind = "fault"

    def __init__(self, ictx: "IommuFd") -> None:
        super().__init__(ictx)
        self.deliver: deque[IopfGroup] = deque()
        self.response: dict[int, IopfGroup] = {}

    def next_cookie(self) -> int:
        c = 1
        while c in self.response:
            c += 1
        if c > U32_MAX:
            raise fail(errno.ENOSPC, "no free fault cookie")
        return c

    def release(self) -> None:
        """``iommufd_fault_destroy``: every group still pending, read or not, is answered INVALID."""
        for group in list(self.deliver) + list(self.response.values()):
            respond(self.ictx, group, PAGE_RESP_INVALID)
        self.deliver.clear()
        self.response.clear()
        self.ictx.host.drain()


class FaultFile:
    """The fault queue's file descriptor ("[iommufd-pgfault]"): ``read`` returns whole groups of 40-byte
    ``iommu_hwpt_pgfault`` records (b"" when none is queued), ``write`` takes 8-byte
    ``iommu_hwpt_page_response`` records."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.closed = False
        self.fd = fault.ictx.host.process.alloc_fd(self)

    def _check(self) -> None:
        if self.closed:
            raise fail(errno.EBADF, "fault file closed")

    def poll(self) -> bool:
        """EPOLLIN: something to read."""
        self._check()
        return bool(self.fault.deliver)

    def read(self, count: int) -> bytes:
        self._check()
        if count % PGFAULT_SIZE:
            raise fail(errno.ESPIPE, "count is not a multiple of the record size")
        f = self.fault
        out = bytearray()
        while f.deliver:
            group = f.deliver[0]
            if len(out) >= count or len(group.faults) * PGFAULT_SIZE > count - len(out):
                break
            f.deliver.popleft()
            group.cookie = f.next_cookie()
            f.response[group.cookie] = group
            handle: "AttachHandle" = group.handle  # type: ignore[assignment]
            for flt in group.faults:
                out += IommuHwptPgfault.build(dict(flags=flt.flags, dev_id=handle.idev.id, pasid=flt.pasid,
                                                   grpid=flt.grpid, perm=flt.perm, __reserved=0, addr=flt.addr,
                                                   length=0, cookie=group.cookie))
        return bytes(out)

    def write(self, data: bytes) -> int:
        self._check()
        if len(data) % PAGE_RESPONSE_SIZE:
            raise fail(errno.ESPIPE, "length is not a multiple of the response size")
        f = self.fault
        done = 0
        err: IommufdError | None = None
        while done < len(data):
            r = _parse_response(data[done:done + PAGE_RESPONSE_SIZE])
            if r.code not in (PAGE_RESP_SUCCESS, PAGE_RESP_INVALID):
                err = fail(errno.EINVAL, f"response code {r.code}")
                break
            group = f.response.pop(r.cookie, None)
            if group is None:
                err = fail(errno.EINVAL, f"no group waits for cookie {r.cookie}")
                break
            respond(f.ictx, group, r.code)
            done += PAGE_RESPONSE_SIZE
        f.ictx.host.drain()
        if done == 0 and err is not None:
            raise err
        return done

    def close(self) -> None:
        """Closing drops the file's references; its pending groups stay until the fault object dies."""
        if self.closed:
            return
        self.closed = True
        self.fault.users -= 1
        self.fault.ictx.files.discard(self)
        self.fault.ictx.host.process.files.pop(self.fd, None)


class _Resp(NamedTuple):
    cookie: int
    code: int


def _parse_response(raw: bytes) -> _Resp:
    c = IommuHwptPageResponse.parse(raw)
    return _Resp(c.cookie, c.code)


def fault_queue_alloc(ictx: "IommuFd", flags: int) -> tuple[int, FaultFile]:
    """``iommufd_fault_alloc``."""
    if flags:
        raise fail(errno.EOPNOTSUPP, "FAULT_QUEUE_ALLOC flags")
    fault = Fault(ictx)
    fid = ictx.add_object(fault)
    f = FaultFile(fault)
    fault.users += 1
    ictx.files.add(f)
    return fid, f


def iopf_handler_for(ictx: "IommuFd", hwpt: "Hwpt") -> Callable[[IopfGroup], None]:
    """``iommufd_fault_iopf_handler``: a complete group joins the HWPT's queue (INVALID if it has none)."""
    def handler(group: IopfGroup) -> None:
        fault = hwpt.fault
        if fault is None or not ictx.is_live(fault):
            respond(ictx, group, PAGE_RESP_INVALID)
            return
        fault.deliver.append(group)
    return handler


def respond(ictx: "IommuFd", group: IopfGroup, code: int) -> None:
    """``iopf_group_response``: each group is answered once."""
    if group.answered:
        return
    group.answered = True
    ictx.drv.page_response(group.sid, group.pasid, group.grpid, code)


def auto_response(ictx: "IommuFd", hwpt: "Hwpt", handle: "AttachHandle | None") -> None:
    """``iommufd_auto_response_faults``: every group that came through ``handle`` gets INVALID."""
    fault = hwpt.fault
    if fault is None or handle is None:
        return
    for group in [g for g in fault.deliver if g.handle is handle]:
        fault.deliver.remove(group)
        respond(ictx, group, PAGE_RESP_INVALID)
    for cookie, group in list(fault.response.items()):
        if group.handle is handle:
            del fault.response[cookie]
            respond(ictx, group, PAGE_RESP_INVALID)


__all__ = ["Fault", "FaultFile", "fault_queue_alloc", "iopf_handler_for", "respond", "auto_response"]
