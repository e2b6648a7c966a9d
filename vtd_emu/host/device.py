"""A physical PCI device handed to the VMM through the VFIO device cdev (``/dev/vfio/devices/vfioX``):
bind to an iommufd, attach/replace/detach page tables per RID or PASID, and DMA through the physical
IOMMU.

DMA from a device without ATS is untranslated: each 4 KiB chunk goes through the unit's translation
and a faulting chunk is dropped (and recorded in the FRCDs).  A device with ATS asks the unit for
translations, keeps them in its device TLB and issues translated requests; with PRI (which PCIe builds
on ATS) a denied translation becomes a page request and the DMA waits for the page group response:
SUCCESS retries it, anything else ends it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..vtd.faults import reason_name
from .errors import fail
from .uapi import IOMMU_NO_PASID

if TYPE_CHECKING:
    from ..vtd.prq import PageRequestStatus, PageResponse
    from .host import Host
    from .iommufd import Device, IommuFd

_PAGE = 4096


@dataclass(eq=False)
class DmaOutcome:
    """What a DMA did.  ``ok`` once every byte went through; ``faults`` holds the fault reason of each
    failed chunk (0 when a translation was denied without a fault record); ``pending`` while the device
    waits for a page group response.  The object is updated in place when a stalled DMA resumes."""

    op: str
    iova: int
    length: int
    pasid: int | None
    payload: bytes = b""
    buffer: bytearray = field(default_factory=bytearray)
    pos: int = 0
    faults: list[int] = field(default_factory=list)
    pending: bool = False
    page_requests: int = 0
    responses: list[int] = field(default_factory=list)
    stall_reason: int = 0

    @property
    def ok(self) -> bool:
        return not self.pending and not self.faults and self.pos >= self.length

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        state = "pending" if self.pending else ("ok" if self.ok else f"faults={self.faults}")
        where = f" pasid={self.pasid:#x}" if self.pasid is not None else ""
        return f"DmaOutcome({self.op} {self.iova:#x}+{self.length:#x}{where}: {state})"

    @property
    def data(self) -> bytes:
        """Bytes read (failed chunks read as zeros)."""
        return bytes(self.buffer)

    @property
    def fault(self) -> int | None:
        return self.faults[0] if self.faults else None

    @property
    def fault_name(self) -> str | None:
        return reason_name(self.faults[0]) if self.faults else None


class VfioDevice:
    """A host PCI device (requester id ``sid``) behind the physical IOMMU, owned by VFIO."""

    def __init__(self, host: "Host", sid: int, group: int, pasid_bits: int, pri: bool, ats: bool) -> None:
        self.host = host
        self.sid = sid
        self.group = group
        self.info = host.intel.probe_device(sid, group, pasid_bits, ats, pri)
        self.endpoint = None
        if self.info.ats or self.info.pri:
            self.endpoint = host.iommu.attach_device(sid, ats=self.info.ats, pri=self.info.pri)
            self.endpoint.on_response = self._on_response
        self.ictx: "IommuFd | None" = None
        self.idev: "Device | None" = None
        self._rid_attached = False
        self._pasids: set[int] = set()
        self._stalled: dict[tuple[int | None, int], DmaOutcome] = {}
        self.responses: list["PageResponse"] = []

    def __repr__(self) -> str:
        return f"VfioDevice({self.sid:#06x})"

    @property
    def dev_id(self) -> int | None:
        return self.idev.id if self.idev is not None else None

    # -- VFIO_DEVICE_BIND_IOMMUFD ----------------------------------------------------------------
    def bind_iommufd(self, ictx: "IommuFd") -> int:
        """Bind to ``ictx``; returns the device object id (``out_devid``)."""
        if self.idev is not None:
            raise fail(errno.EINVAL, "already bound")
        self.idev = ictx.device_bind(self)
        self.ictx = ictx
        return self.idev.id

    def unbind(self) -> None:
        """Close the device fd: PASIDs detached, then the RID, then the device object destroyed."""
        if self.idev is None or self.ictx is None:
            return
        for pasid in sorted(self._pasids):
            self.ictx.device_detach(self.idev, pasid)
        self._pasids.clear()
        if self._rid_attached:
            self.ictx.device_detach(self.idev, IOMMU_NO_PASID)
            self._rid_attached = False
        self.ictx.device_unbind(self.idev)
        self.idev = None
        self.ictx = None

    close = unbind

    def _bound(self) -> tuple["IommuFd", "Device"]:
        if self.idev is None or self.ictx is None:
            raise fail(errno.EINVAL, "device not bound to an iommufd")
        return self.ictx, self.idev

    @staticmethod
    def _check_pasid(pasid: int | None) -> None:
        if pasid is not None and not 0 < pasid < 1 << 20:
            raise fail(errno.EINVAL, f"PASID {pasid!r} is not 1..0xFFFFF")

    # -- VFIO_DEVICE_ATTACH/DETACH_IOMMUFD_PT ------------------------------------------------------
    def attach_pt(self, pt_id: int, pasid: int | None = None) -> int:
        """Attach the RID (or ``pasid``) to an IOAS (automatic domain) or a HWPT; a second attach
        replaces.  Returns the HWPT id now attached."""
        ictx, idev = self._bound()
        self._check_pasid(pasid)
        if pasid is None:
            if self._rid_attached:
                return ictx.device_replace(idev, IOMMU_NO_PASID, pt_id)
            out = ictx.device_attach(idev, IOMMU_NO_PASID, pt_id)
            self._rid_attached = True
            return out
        if pasid in self._pasids:
            return ictx.device_replace(idev, pasid, pt_id)
        out = ictx.device_attach(idev, pasid, pt_id)
        self._pasids.add(pasid)
        return out

    def detach_pt(self, pasid: int | None = None) -> None:
        """Back to blocked DMA; detaching something not attached is a silent success."""
        ictx, idev = self._bound()
        self._check_pasid(pasid)
        if pasid is None:
            if self._rid_attached:
                ictx.device_detach(idev, IOMMU_NO_PASID)
                self._rid_attached = False
            return
        if pasid in self._pasids:
            ictx.device_detach(idev, pasid)
            self._pasids.discard(pasid)

    # The kernel-internal calls the selftest drives directly (no VFIO replace-on-second-attach).
    def iommufd_attach(self, pt_id: int, pasid: int | None = None) -> int:
        ictx, idev = self._bound()
        self._check_pasid(pasid)
        out = ictx.device_attach(idev, pasid or IOMMU_NO_PASID, pt_id)
        if pasid is None:
            self._rid_attached = True
        else:
            self._pasids.add(pasid)
        return out

    def iommufd_replace(self, pt_id: int, pasid: int | None = None) -> int:
        ictx, idev = self._bound()
        self._check_pasid(pasid)
        return ictx.device_replace(idev, pasid or IOMMU_NO_PASID, pt_id)

    def attached_hwpt(self, pasid: int | None = None) -> int | None:
        """The HWPT id attached to the RID or ``pasid`` (the selftest's PASID_CHECK_HWPT), or None."""
        ictx, idev = self._bound()
        hwpt = ictx.device_attached_hwpt(idev, pasid or IOMMU_NO_PASID)
        return hwpt.id if hwpt is not None else None

    # -- DMA ---------------------------------------------------------------------------------------
    def dma_read(self, iova: int, n: int, pasid: int | None = None) -> DmaOutcome:
        out = DmaOutcome("read", iova, n, pasid, buffer=bytearray(n))
        self._run(out)
        self.host.drain()
        return out

    def dma_write(self, iova: int, data: bytes, pasid: int | None = None) -> DmaOutcome:
        out = DmaOutcome("write", iova, len(data), pasid, payload=bytes(data))
        self._run(out)
        self.host.drain()
        return out

    def _run(self, op: DmaOutcome) -> None:
        chip = self.host.iommu
        ep = self.endpoint
        write = op.op == "write"
        if ep is None or not self.info.ats:
            rest = op.length - op.pos
            if write:
                r = chip.dma_write(self.sid, op.iova + op.pos, op.payload[op.pos:], pasid=op.pasid)
            else:
                r = chip.dma_read(self.sid, op.iova + op.pos, rest, pasid=op.pasid)
                op.buffer[op.pos:] = r.data
            op.faults.extend(r.faults)
            op.pos = op.length
            return
        mem = chip.mem
        while op.pos < op.length:
            a = op.iova + op.pos
            n = min(_PAGE - (a & (_PAGE - 1)), op.length - op.pos)
            e = ep.lookup(a, op.pasid)
            if e is None or not (e.write if write else e.read):
                c = ep.translation_request(a, "w" if write else "r", op.pasid)
                if c.status != "success":
                    op.faults.append(c.reason)
                    op.pos += n
                    continue
                if not (c.write if write else c.read):
                    if self.info.iopf_users:
                        self._stall(op, a, c.reason)
                        return
                    op.faults.append(c.reason)
                    op.pos += n
                    continue
                e = ep.lookup(a, op.pasid)
                assert e is not None
            hpa = chip.translated_access(self.sid, e.addr + (a - e.iova), write, op.pasid)
            if hpa < 0:
                op.faults.append(-hpa)
            elif write:
                mem.write(hpa, op.payload[op.pos:op.pos + n])
            else:
                op.buffer[op.pos:op.pos + n] = mem.read(hpa, n)
            op.pos += n

    def _stall(self, op: DmaOutcome, addr: int, reason: int) -> None:
        prgi = next(i for i in range(512) if (op.pasid, i) not in self._stalled)
        op.pending = True
        op.stall_reason = reason
        op.page_requests += 1
        self._stalled[(op.pasid, prgi)] = op
        write = op.op == "write"
        assert self.endpoint is not None
        self.endpoint.page_request(addr & ~(_PAGE - 1), read=not write, write=write, pasid=op.pasid, last=True,
                                   prgi=prgi)

    def page_request(self, addr: int, *, pasid: int | None = None, read: bool = True, write: bool = False,
                     last: bool = True, prgi: int = 0) -> "PageRequestStatus":
        """Send one PRI page request by hand (what the selftest's TRIGGER_IOPF does)."""
        if self.endpoint is None or not self.info.pri:
            raise ValueError(f"{self!r} has no PRI")
        return self.endpoint.page_request(addr, read=read, write=write, pasid=pasid, last=last, prgi=prgi)

    def _on_response(self, resp: "PageResponse") -> None:
        # Responses arrive while the unit processes its invalidation queue: the device acts on them
        # afterwards, as real hardware would, never re-entering the unit.
        self.responses.append(resp)
        self.host.defer(lambda: self._resume(resp))

    def _resume(self, resp: "PageResponse") -> None:
        op = self._stalled.pop((resp.pasid, resp.prgi), None)
        if op is None:
            return
        op.responses.append(resp.code)
        op.pending = False
        if resp.code == 0:
            self._run(op)
            return
        # The group was refused: the device gives up on the rest of the transfer.
        op.faults.append(op.stall_reason)
        op.pos = op.length

    @property
    def stalled(self) -> list[DmaOutcome]:
        return list(self._stalled.values())
