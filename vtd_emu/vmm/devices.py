"""The guest's DMA-capable devices behind the vIOMMU, of two kinds with one DMA API.

- :class:`EmulatedDevice`: the VMM emulates it; its DMA is translated by the vIOMMU's own walk of the
  guest tables (:meth:`VtdIommu.xlate`, faults recorded in the guest's FRCDs by the vIOMMU) and then lands
  in guest RAM.
- :class:`PassthroughDevice`: a host :class:`~vtd_emu.host.VfioDevice`; its DMA goes through the physical
  IOMMU (first stage: the guest's table, in GPAs; second stage: the guest-RAM IOAS).  The VMM sees none
  of it, except the faults the host reports, which it injects into the guest's FRCDs as the vIOMMU would
  have recorded them (:func:`guest_reason`).

Both return a :class:`DeviceDma`: the bytes read, the guest-visible fault reason of every faulting 4 KiB
chunk, and how many chunks reached a guest-physical address that is not guest RAM (no IOMMU fault on the
guest's side: the request ends at the bus, as an emulated device's access to unassigned memory does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from ..host.device import DmaOutcome, VfioDevice
from ..spec.consts import FR
from ..vtd.access import NO_PASID, READ, WRITE
from ..vtd.ats import AtsDevice
from ..vtd.entries import DROPPED, REASON_MASK

if TYPE_CHECKING:
    from .machine import Machine

_PAGE = 4096

# Host faults met while the physical IOMMU walked the guest's first-stage table through the second stage:
# the guest sees its own table unreadable at that GPA, which is what its vIOMMU reports for a table outside
# guest RAM.
_NESTED_TO_GUEST = {
    FR.SM_NESTED_FS_ROOT_SS_DENIED: FR.SM_FSPTPTR_READ_ERR,
    FR.SM_NESTED_FS_TABLE_SS_DENIED: FR.SM_FS_READ_ERR,
    FR.SM_NESTED_FS_TABLE_BEYOND_SS: FR.SM_FS_READ_ERR,
    FR.SM_NESTED_FS_AD_SS_DENIED: FR.SM_FS_AD_WRITE_FAIL,
}
# Second-stage faults on the final GPA: the guest has no second stage, the address is just not guest RAM.
UNBACKED_REASONS = frozenset({FR.SM_SS_READ_ERR, FR.SM_SS_ENTRY_NP, FR.SM_SS_ENTRY_RSVD, FR.SM_SSPTPTR_INV,
                              FR.SM_BEYOND_SS_MAX, FR.SM_SS_AD_NONSNOOP, FR.SM_SSL_6})


def guest_reason(host_reason: int) -> int | None:
    """The fault the guest's vIOMMU would have recorded for what the host IOMMU reported while translating
    through a guest table bound as a nested HWPT (or the parent); None when the guest-physical address
    the guest's translation gave is not guest RAM (no guest-side IOMMU fault)."""
    if host_reason in UNBACKED_REASONS:
        return None
    return _NESTED_TO_GUEST.get(host_reason, host_reason)


class DeviceDma(NamedTuple):
    """What one DMA of a guest device did."""

    data: bytes
    """Bytes read (chunks that failed read as zeros; empty for writes)."""
    faults: tuple[int, ...]
    """The guest-visible fault reason of each faulting chunk (0: blocked without a guest fault record)."""
    unbacked: int
    """Chunks translated to a guest-physical address outside guest RAM (read as zeros, writes dropped)."""
    pending: int = 0
    """Chunks waiting for the guest to answer a page request (PRI passthrough devices): they complete
    when the guest's page group response arrives (``PassthroughDevice.stalled`` until then)."""

    @property
    def ok(self) -> bool:
        return not self.faults and not self.unbacked and not self.pending


def _chunks(addr: int, length: int) -> list[tuple[int, int, int]]:
    """(offset in the transfer, address, bytes) per 4 KiB page."""
    out = []
    pos = 0
    while pos < length:
        a = addr + pos
        n = min(_PAGE - (a & (_PAGE - 1)), length - pos)
        out.append((pos, a, n))
        pos += n
    return out


class EmulatedDevice:
    """A device the VMM emulates: DMA through the vIOMMU's translation, then guest RAM."""

    kind = "emulated"

    def __init__(self, machine: "Machine", sid: int, pasid_bits: int, ats: bool, pri: bool) -> None:
        self.machine = machine
        self.sid = sid
        self.pasid_bits = pasid_bits
        self.ats = ats or pri
        self.pri = pri
        self.endpoint: AtsDevice | None = None
        """The device's side of ATS/PRI at the vIOMMU (device-TLB invalidations, page requests)."""
        if self.ats:
            self.endpoint = machine.viommu.attach_device(sid, ats=True, pri=pri)

    def __repr__(self) -> str:
        return f"EmulatedDevice({self.sid:#06x})"

    def _ptag(self, pasid: int | None) -> int:
        if pasid is None:
            return NO_PASID
        if not 0 <= pasid < 1 << self.pasid_bits:
            raise ValueError(f"{self!r} has {self.pasid_bits} PASID bits: cannot send PASID {pasid:#x}")
        return pasid

    def dma_read(self, addr: int, n: int, pasid: int | None = None) -> DeviceDma:
        return self._dma(addr, n, None, pasid)

    def dma_write(self, addr: int, data: bytes, pasid: int | None = None) -> DeviceDma:
        return self._dma(addr, len(data), bytes(data), pasid)

    def _dma(self, addr: int, length: int, data: bytes | None, pasid: int | None) -> DeviceDma:
        ptag = self._ptag(pasid)
        viommu, mem = self.machine.viommu, self.machine.mem
        req = READ if data is None else WRITE
        out = bytearray(length if data is None else 0)
        faults: list[int] = []
        unbacked = 0
        for pos, a, n in _chunks(addr, length):
            gpa = viommu.xlate(self.sid, ptag, a, req)
            if gpa < 0:
                if gpa != DROPPED:
                    faults.append(-gpa)
                continue
            if not (mem.is_ram(gpa) and mem.is_ram(gpa + n - 1)):
                unbacked += 1
                continue
            if data is None:
                out[pos:pos + n] = mem.read(gpa, n)
            else:
                mem.write(gpa, data[pos:pos + n])
        return DeviceDma(bytes(out), tuple(faults), unbacked)


class PassthroughDevice:
    """A host PCI device assigned to the guest: DMA through the physical IOMMU, nothing shadowed."""

    kind = "passthrough"

    def __init__(self, machine: "Machine", sid: int, vfio: VfioDevice, dev_id: int, pasid_bits: int, ats: bool,
                 pri: bool) -> None:
        self.machine = machine
        self.sid = sid
        """The requester id the guest sees (its tables are indexed by it)."""
        self.vfio = vfio
        self.dev_id = dev_id
        self.pasid_bits = pasid_bits
        self.ats = ats or pri
        self.pri = pri

    @property
    def host_sid(self) -> int:
        return self.vfio.sid

    def __repr__(self) -> str:
        return f"PassthroughDevice({self.sid:#06x} -> host {self.host_sid:#06x})"

    def dma_read(self, addr: int, n: int, pasid: int | None = None) -> DeviceDma:
        return self._dma(addr, n, None, pasid)

    def dma_write(self, addr: int, data: bytes, pasid: int | None = None) -> DeviceDma:
        return self._dma(addr, len(data), bytes(data), pasid)

    def _dma(self, addr: int, length: int, data: bytes | None, pasid: int | None) -> DeviceDma:
        if pasid is not None and not 0 <= pasid < 1 << self.pasid_bits:
            raise ValueError(f"{self!r} has {self.pasid_bits} PASID bits: cannot send PASID {pasid:#x}")
        # Guest PASID 0 is the RID_PASID (ECAP.RPS is off): the host sees the request on the RID.
        host_pasid = pasid or None
        bridge = self.machine.bridge
        ptag = NO_PASID if pasid is None else pasid
        req = READ if data is None else WRITE
        out = bytearray(length if data is None else 0)
        faults: list[int] = []
        unbacked = 0
        stalled: list[DmaOutcome] = []
        for pos, a, n in _chunks(addr, length):
            if data is None:
                r = self.vfio.dma_read(a, n, pasid=host_pasid)
                out[pos:pos + n] = r.data
            else:
                r = self.vfio.dma_write(a, data[pos:pos + n], pasid=host_pasid)
            if r.pending:
                stalled.append(r)
                continue
            if r.ok:
                continue
            guest = bridge.guest_fault(self, pasid or 0, r.fault or 0)
            if guest is None:
                unbacked += 1
                continue
            reason = guest & REASON_MASK
            faults.append(reason)
            if reason:
                self.machine.viommu.report_fault(self.sid, ptag, a, req, guest)
        if stalled:
            # The VMM's fault-queue reader wakes up: the requests go to the guest's page request queue.
            bridge.service_faults()
            for r in stalled:
                if not r.pending and not r.ok:
                    # Answered for the guest already (the vIOMMU could not queue the request, and recorded
                    # why): the chunk failed.
                    faults.append(0)
        return DeviceDma(bytes(out), tuple(faults), unbacked, sum(r.pending for r in stalled))

    @property
    def stalled(self) -> list[DmaOutcome]:
        """Host DMAs of this device waiting for a page group response (updated in place when it comes)."""
        return self.vfio.stalled


GuestDevice = EmulatedDevice | PassthroughDevice

__all__ = ["DeviceDma", "EmulatedDevice", "PassthroughDevice", "GuestDevice", "guest_reason", "UNBACKED_REASONS"]
