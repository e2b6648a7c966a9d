"""Interrupt events of the unit: fault events (FECTL...), invalidation-completion events (IECTL...) and
page-request events (PECTL...).  Each is a message-signalled interrupt gated by IM with IP pending
state; a delivered interrupt becomes an :class:`Interrupt` record the caller can observe."""

from __future__ import annotations

from typing import Callable, NamedTuple

from ..spec.consts import FECTL
from .regs import RegisterFile

IM, IP = FECTL.IM, FECTL.IP  # the same in IECTL and PECTL


class Interrupt(NamedTuple):
    """An MSI the unit sent: ``source`` is ``fault``, ``invalidation``, ``page-request``, ``remapped``
    (through an IRTE) or ``passthrough`` (a device MSI delivered unchanged: remapping off, or an allowed
    compatibility-format interrupt)."""

    source: str
    addr: int
    data: int
    vector: int | None = None
    dest: int | None = None


InterruptSink = Callable[[Interrupt], None]


class EventUnit:
    """One event source: the control/data/address registers named ``<prefix>CTL`` etc."""

    def __init__(self, regs: RegisterFile, prefix: str, source: str, sink: InterruptSink,
                 data_bits: int = 32, uaddr_used: bool = True) -> None:
        self.regs = regs
        self.ctl = prefix + "CTL"
        self.data = prefix + "DATA"
        self.addr = prefix + "ADDR"
        self.uaddr = prefix + "UADDR"
        self.source = source
        self.sink = sink
        self.data_mask = (1 << data_bits) - 1
        self.uaddr_used = uaddr_used

    def fire(self) -> None:
        """A new condition: set IP; if not masked, deliver and clear IP at once."""
        ctl = self.regs.get(self.ctl)
        if ctl & IM:
            self.regs.set(self.ctl, ctl | IP)
        else:
            self.regs.set(self.ctl, ctl & ~IP)
            self._deliver()

    def ctl_written(self, old: int, new: int) -> None:
        # IP survives the generic write (it is RO); unmasking with IP pending delivers the message.
        if new & IP and not new & IM:
            self.regs.set(self.ctl, new & ~IP)
            self._deliver()

    def clear_pending(self) -> None:
        self.regs.set(self.ctl, self.regs.get(self.ctl) & ~IP)

    def _deliver(self) -> None:
        addr = self.regs.get(self.addr)
        if self.uaddr_used:
            addr |= self.regs.get(self.uaddr) << 32
        self.sink(Interrupt(self.source, addr, self.regs.get(self.data) & self.data_mask))
