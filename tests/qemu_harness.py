"""Test harness (not part of the library): live differential recording against QEMU 7.2's ``intel-iommu``:
run ``vtd-oracle-scenario/1`` steps on a real ``qemu-system-x86_64`` and fill in QEMU's answers
(``expect``), exactly like the scenarios of ``shared/qemu-oracle`` (see its README for the format).

QEMU runs a q35 machine under TCG with 128 MiB of RAM, a firmware that only halts, ``-device
intel-iommu,<options>`` and four ``edu`` devices: A = 00:02.0, B = 00:02.1, C = 00:10.0 and D = bus_d:00.0
behind a ``pcie-root-port`` at 00:03.0.  It is driven through the ``-qtest`` text protocol on stdin/stdout:
this module is the "guest".  Nothing else touches PCI or the IOMMU, so the code here assigns the BARs and
bus numbers itself through configuration cycles (``outl 0xcf8`` / ``0xcfc``).

The edu's DMA engine (QEMU ``docs/specs/edu.rst``): BAR0 + 0x80 source, + 0x88 destination, + 0x90 count,
+ 0x98 command (bit 0 start/busy, bit 1 direction: 1 = from the device buffer to RAM, i.e. a device
*write*; 0 = RAM to buffer, a device *read*).  Its 4 KiB buffer is at device address 0x40000.  The
transfer runs from a virtual-clock timer 100 ms after the start; Debian's QEMU has no qtest accelerator
(no ``clock_step``), so by default the machine runs with ``-icount shift=0,sleep=off``: with the CPU
halted, virtual time jumps straight to the next timer and a DMA completes in about a millisecond.  The
command register is polled until the busy bit clears either way.  ``dma_mask`` is opened to 64 bits so
that the edu does not clamp IOVAs to 28 bits.

Payloads of write DMAs must be in the edu buffer before the DMA.  The only way in is a read DMA, so before
the first step (translation is off at reset) each device reads its planned buffer image from scratch RAM,
which is zeroed again afterwards: guest RAM is all-zero when step 0 runs.  Every write payload of a
device must therefore fit its 4 KiB buffer together with the read areas (``qemu_buf_off`` is honoured when
given, otherwise assigned: payloads from offset 0, reads at 2048).

What is recorded (the oracle's conventions):

* ``mmio_read``: ``value``; ``mem_read``: ``hex``;
* ``mmio_write`` to GCMD or IQT: ``mem_changes`` over the status addresses of every invalidation-wait
  descriptor (SW=1) written to guest RAM;
* ``dma``: ``completed``; for writes ``mem_changes`` (a byte diff of guest RAM, before/after, over every
  place the payload can land: the IOVA itself and, for each 4 KiB chunk, every 4 KiB/2 MiB/1 GiB-aligned
  address any present entry ever written to RAM points to, at the chunk's offset), ``landed``,
  ``not_landed`` (and ``unexplained_changes`` when not empty); ``regs`` (FSTS, FECTL, FRCD0 low/high read
  right after the DMA) and ``frcd0``; for reads with a later write-back, ``data`` as observed through it;
* ``final.regs``: the register dump of the oracle.

Interrupts: :meth:`QemuMachine.edu_msi` has an edu raise its own MSI (requester id included); QEMU's
``-trace vtd_ir_remap_msi`` lines on stderr (:meth:`QTest.stderr_since`) tell what the unit delivered.

A write DMA landing anywhere else (somewhere no entry ever pointed to) would go unnoticed: the diff does
not cover all 128 MiB.

``tests/test_qemu_live.py`` uses it, and ``scripts/qemu_capture.py`` (with the repository root on
``sys.path``); ``python tests/qemu_harness.py IN.jsonl -o OUT.jsonl`` records QEMU's answers for a file of
scenarios.  The recorded files replay with ``vtd-emu replay --check`` (see
:mod:`vtd_emu.importers.qemu_scenario`).
"""

from __future__ import annotations

import base64
import copy
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from vtd_emu.errors import TraceError, VtdEmuError
from vtd_emu.spec.consts import FRCD, GCMD, GSTS, INV_WAIT
from vtd_emu.spec.loader import specs
from vtd_emu.trace.model import ORACLE_FORMAT
from vtd_emu.vtd.qi import T_WAIT

QEMU_BINARY = "qemu-system-x86_64"
FORMAT = ORACLE_FORMAT

VTD_BASE = 0xFED9_0000
RAM_SIZE = 128 << 20
EDU_ID = 0x11E8_1234            # vendor 0x1234, device 0x11e8
EDU_DMA_START = 0x4_0000        # device address of the edu's buffer
EDU_BUF_SIZE = 4096
EDU_CMD_RUN, EDU_CMD_TO_RAM = 1, 2
EDU_INTR_RAISE, EDU_INTR_ACK = 0x60, 0x64
PCI_CAP_ID_MSI = 0x05
MSI_ENABLE = 1 << 16            # message control bit 0, in the capability's first dword
SCRATCH = 0x1_0000              # guest RAM used (then zeroed) to load the edu buffers before step 0
ROOT_PORT_BDF = (0, 3, 0)



def _off(name: str) -> int:
    """Offset of a register at a fixed place (only FRCD and the IOTLB registers move with CAP/ECAP)."""
    return specs().registers[name].resolve_offset(0, 0)


FSTS, FECTL, GCMD_OFF, GSTS_OFF, IQT = _off("FSTS"), _off("FECTL"), _off("GCMD"), _off("GSTS"), _off("IQT")
# QEMU 7.2 places them so: CAP.FRO = 0x22 (one FRCD), ECAP.IRO = 0xf.
FRCD0_LO, FRCD0_HI, IVA, IOTLB_REG = 0x220, 0x228, 0xF0, 0xF8
DMA_REGS = ((FSTS, 4), (FECTL, 4), (FRCD0_LO, 8), (FRCD0_HI, 8))
RESET_REGS = tuple((_off(n), s) for n, s in (("VER", 4), ("CAP", 8), ("ECAP", 8), ("GSTS", 4), ("FSTS", 4),
                                             ("FECTL", 4), ("IECTL", 4)))
FINAL_REGS = tuple((_off(n), s) for n, s in (
    ("VER", 4), ("CAP", 8), ("ECAP", 8), ("GSTS", 4), ("RTADDR", 8), ("CCMD", 8), ("FSTS", 4), ("FECTL", 4),
    ("FEDATA", 4), ("FEADDR", 4), ("FEUADDR", 4), ("PMEN", 4), ("IQH", 8), ("IQT", 8), ("IQA", 8), ("ICS", 4),
    ("IECTL", 4), ("IEDATA", 4), ("IEADDR", 4), ("IEUADDR", 4), ("IRTA", 8))) + (
    (IVA, 8), (IOTLB_REG, 8), (FRCD0_LO, 8), (FRCD0_HI, 8))

# oracle config.iommu key -> QEMU intel-iommu property
IOMMU_PROPS = {
    "aw_bits": "aw-bits", "caching_mode": "caching-mode", "scalable_mode": "x-scalable-mode",
    "pasid": "x-pasid-mode", "pt": "pt", "device_iotlb": "device-iotlb", "snoop_control": "snoop-control",
    "dma_drain": "dma-drain", "dma_translation": "dma-translation", "intremap": "intremap", "eim": "eim",
    "buggy_eim": "x-buggy-eim", "version": "version",
}


class QemuError(VtdEmuError, RuntimeError):
    """QEMU could not be driven: a qtest command failed, timed out, or QEMU went away."""


class QemuNotFound(QemuError):
    """``qemu-system-x86_64`` is not installed (or not at the given path)."""


class QemuTimeout(QemuError):
    """QEMU did not answer a qtest command (or finish a DMA) in time; it has been killed."""


class QemuExited(QemuError):
    """QEMU exited (refused its options, or aborted on an assertion) while a command was pending."""

    def __init__(self, message: str, stderr_tail: list[str], returncode: int | None) -> None:
        super().__init__(message)
        self.stderr_tail = stderr_tail
        self.returncode = returncode


def find_qemu(binary: str | None = None) -> str | None:
    """Full path of the QEMU binary (``$VTD_EMU_QEMU`` or ``qemu-system-x86_64`` on PATH), None if absent."""
    name = binary or os.environ.get("VTD_EMU_QEMU") or QEMU_BINARY
    return shutil.which(name)


def qemu_version(binary: str | None = None) -> str | None:
    """First line of ``qemu-system-x86_64 --version``, None if QEMU is missing."""
    path = find_qemu(binary)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0] if out.stdout else None


def halting_bios() -> bytes:
    """A 64 KiB firmware whose reset vector is ``cli; hlt; jmp $-3``: the CPU never touches a device."""
    return b"\xf4" * (0x10000 - 16) + b"\xfa\xf4\xeb\xfd" + b"\xf4" * 12


def _onoff(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def device_arg(iommu: Mapping[str, Any]) -> str:
    """``intel-iommu,...`` for an oracle ``config.iommu`` object (keys in their given order)."""
    parts = ["intel-iommu"]
    for key, val in iommu.items():
        prop = IOMMU_PROPS.get(key)
        if prop is None:
            raise TraceError("<scenario>", "config.iommu", f"unknown intel-iommu option {key!r}; "
                             f"expected one of {sorted(IOMMU_PROPS)}")
        parts.append(f"{prop}={_onoff(val)}")
    return ",".join(parts)


# -- the qtest protocol ------------------------------------------------------------------------------------


class QTest:
    """One QEMU process driven over ``-qtest stdio``.  Every command has a timeout; QEMU is killed on
    :meth:`close` (also as a context manager) and on a timeout."""

    def __init__(self, argv: Sequence[str], *, stderr_path: Path, timeout: float = 10.0) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.stderr_path = Path(stderr_path)
        self._err = self.stderr_path.open("wb")
        try:
            self.p = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                      bufsize=0)
        except FileNotFoundError:
            self._err.close()
            raise QemuNotFound(f"{self.argv[0]}: not found; install it (Debian: apt-get install "
                               "qemu-system-x86)") from None
        except OSError as exc:
            self._err.close()
            raise QemuError(f"cannot start {self.argv[0]}: {exc.strerror}") from None
        assert self.p.stdout is not None
        self._fd = self.p.stdout.fileno()
        self._buf = bytearray()

    # -- plumbing
    def stderr_tail(self, n: int = 8) -> list[str]:
        try:
            self._err.flush()
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if ln.strip()][-n:]

    def stderr_size(self) -> int:
        """Where QEMU's stderr (its trace log included) ends now: the start for :meth:`stderr_since`."""
        self._err.flush()
        try:
            return self.stderr_path.stat().st_size
        except OSError:
            return 0

    def stderr_since(self, pos: int) -> list[str]:
        """The lines QEMU wrote to stderr after :meth:`stderr_size` returned ``pos``."""
        self._err.flush()
        try:
            with self.stderr_path.open("rb") as f:
                f.seek(pos)
                return f.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def _exited(self, line: str) -> QemuExited:
        try:
            rc = self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            rc = None
        tail = self.stderr_tail()
        why = tail[-1] if tail else f"exit status {rc}"
        return QemuExited(f"QEMU exited during {line!r}: {why}", tail, rc)

    def _readline(self, line: str, deadline: float) -> bytes:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                out = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise QemuTimeout(f"QEMU did not answer {line!r} within {self.timeout:g} s (killed)")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._fd, 1 << 20)
            if not chunk:
                raise self._exited(line)
            self._buf += chunk

    def cmd(self, line: str, timeout: float | None = None) -> str:
        """Send one qtest command; returns what follows ``OK`` in the answer."""
        assert self.p.stdin is not None
        if self.p.poll() is not None:
            raise self._exited(line)
        try:
            self.p.stdin.write(line.encode() + b"\n")
            self.p.stdin.flush()
        except (BrokenPipeError, ConnectionResetError):
            raise self._exited(line) from None
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            resp = self._readline(line, deadline).decode(errors="replace")
            if resp.startswith("IRQ"):
                continue  # asynchronous interrupt notices (only with irq_intercept_*)
            if resp == "OK" or resp.startswith("OK "):
                return resp[3:].strip()
            raise QemuError(f"qtest {line!r}: {resp.strip()}")

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self.kill()
        for f in (self.p.stdin, self.p.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._err.close()

    def __enter__(self) -> QTest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- accesses
    def _read(self, width: str, addr: int) -> int:
        return int(self.cmd(f"read{width} {addr:#x}"), 16)

    def readb(self, addr: int) -> int:
        return self._read("b", addr)

    def readw(self, addr: int) -> int:
        return self._read("w", addr)

    def readl(self, addr: int) -> int:
        return self._read("l", addr)

    def readq(self, addr: int) -> int:
        return self._read("q", addr)

    def mmio_read(self, addr: int, size: int) -> int:
        return self._read({1: "b", 2: "w", 4: "l", 8: "q"}[size], addr)

    def mmio_write(self, addr: int, value: int, size: int) -> None:
        self.cmd(f"write{ {1: 'b', 2: 'w', 4: 'l', 8: 'q'}[size]} {addr:#x} {value:#x}")

    def writel(self, addr: int, value: int) -> None:
        self.mmio_write(addr, value, 4)

    def writeq(self, addr: int, value: int) -> None:
        self.mmio_write(addr, value, 8)

    def read(self, addr: int, n: int) -> bytes:
        if n <= 0:
            return b""
        return base64.b64decode(self.cmd(f"b64read {addr:#x} {n:#x}"))

    def write(self, addr: int, data: bytes) -> None:
        if data:
            self.cmd(f"b64write {addr:#x} {len(data):#x} {base64.b64encode(data).decode()}")

    def memset(self, addr: int, n: int, byte: int = 0) -> None:
        if n > 0:
            self.cmd(f"memset {addr:#x} {n:#x} {byte:#x}")

    def outl(self, port: int, value: int) -> None:
        self.cmd(f"outl {port:#x} {value:#x}")

    def inl(self, port: int) -> int:
        return int(self.cmd(f"inl {port:#x}"), 16)

    @staticmethod
    def _cf8(bus: int, dev: int, fn: int, reg: int) -> int:
        return 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC)

    def pci_cfg_writel(self, bdf: tuple[int, int, int], reg: int, value: int) -> None:
        self.outl(0xCF8, self._cf8(*bdf, reg))
        self.outl(0xCFC, value)

    def pci_cfg_readl(self, bdf: tuple[int, int, int], reg: int) -> int:
        self.outl(0xCF8, self._cf8(*bdf, reg))
        return self.inl(0xCFC)


# -- the machine -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EduDevice:
    name: str
    bdf: tuple[int, int, int]
    bar: int

    @property
    def sid(self) -> int:
        bus, dev, fn = self.bdf
        return bus << 8 | dev << 3 | fn

    def describe(self) -> dict[str, str]:
        bus, dev, fn = self.bdf
        return {"name": self.name, "bdf": f"{bus:02x}:{dev:02x}.{fn}", "sid": hex(self.sid)}


class QemuMachine:
    """The q35 + intel-iommu + four-edu machine of the oracle, set up and ready for DMA."""

    BARS = (0xE000_0000, 0xE010_0000, 0xE020_0000, 0xE100_0000)  # D's is behind the root port's window

    def __init__(self, iommu: Mapping[str, Any], *, bus_d: int = 5, ram_size: int = RAM_SIZE,
                 qemu: str | None = None, timeout: float = 10.0, icount: bool = True,
                 extra_args: Iterable[str] = ()) -> None:
        if not 1 <= bus_d <= 0xFF:
            raise TraceError("<scenario>", "config.bus_d", f"bus {bus_d:#x} is not 1..0xff")
        path = find_qemu(qemu)
        if path is None:
            raise QemuNotFound(f"{qemu or os.environ.get('VTD_EMU_QEMU') or QEMU_BINARY} not found on PATH; "
                               "install it (Debian: apt-get install qemu-system-x86)")
        self.qemu = path
        self.iommu_arg = device_arg(iommu)
        self.bus_d = bus_d
        self.ram_size = ram_size
        self.devices = (EduDevice("A", (0, 2, 0), self.BARS[0]), EduDevice("B", (0, 2, 1), self.BARS[1]),
                        EduDevice("C", (0, 0x10, 0), self.BARS[2]), EduDevice("D", (bus_d, 0, 0), self.BARS[3]))
        self._tmp = tempfile.TemporaryDirectory(prefix="vtd-qemu-")
        bios = Path(self._tmp.name) / "halt.bin"
        bios.write_bytes(halting_bios())
        edu = "edu,dma_mask=0xffffffffffffffff"
        argv = [path, "-machine", "q35", "-accel", "tcg", "-bios", str(bios), "-m", f"{ram_size >> 20}M",
                "-display", "none", "-nodefaults", "-device", self.iommu_arg,
                "-device", f"{edu},addr=02.0,multifunction=on", "-device", f"{edu},addr=02.1",
                "-device", f"{edu},addr=10.0",
                "-device", "pcie-root-port,id=rp0,bus=pcie.0,addr=03.0,chassis=1,slot=1",
                "-device", f"{edu},bus=rp0,addr=00.0",
                "-qtest", "stdio", "-qtest-log", "/dev/null"]
        if icount:
            argv += ["-icount", "shift=0,sleep=off"]
        argv += list(extra_args)
        self.argv = argv
        self.q: QTest | None = None
        self.timeout = timeout

    def start(self) -> None:
        """Start QEMU and set up PCI.  Raises :class:`QemuExited` if QEMU refuses its options."""
        self.q = QTest(self.argv, stderr_path=Path(self._tmp.name) / "stderr.log", timeout=self.timeout)
        self.q.readl(VTD_BASE)  # QEMU answers once the machine is built; refused options end it here
        self._setup_pci()

    def _setup_pci(self) -> None:
        q = self.q
        assert q is not None
        # Root port: primary 0, secondary = subordinate = bus_d; memory window = D's BAR (1 MiB); no
        # prefetchable window; memory decode and bus mastering (DMA from below needs it).
        d = self.devices[3]
        q.pci_cfg_writel(ROOT_PORT_BDF, 0x18, self.bus_d << 8 | self.bus_d << 16)
        q.pci_cfg_writel(ROOT_PORT_BDF, 0x20, (d.bar >> 16 & 0xFFF0) | ((d.bar + (1 << 20) - 1) >> 16 & 0xFFF0) << 16)
        q.pci_cfg_writel(ROOT_PORT_BDF, 0x24, 0x0000_FFF0)
        q.pci_cfg_writel(ROOT_PORT_BDF, 0x04, 0x6)
        for dev in self.devices:
            got = q.pci_cfg_readl(dev.bdf, 0)
            if got != EDU_ID:
                raise QemuError(f"edu {dev.name} not found at {dev.describe()['bdf']} (id {got:#x})")
            q.pci_cfg_writel(dev.bdf, 0x10, dev.bar)
            q.pci_cfg_writel(dev.bdf, 0x04, 0x6)  # memory space + bus master
            ident = q.readl(dev.bar)
            if ident & 0xFF != 0xED:
                raise QemuError(f"edu {dev.name}: BAR0 at {dev.bar:#x} does not answer (id {ident:#x})")

    def device_for_sid(self, sid: int) -> EduDevice | None:
        return next((d for d in self.devices if d.sid == sid), None)

    def vtd_read(self, off: int, size: int) -> int:
        assert self.q is not None
        return self.q.mmio_read(VTD_BASE + off, size)

    def vtd_write(self, off: int, value: int, size: int) -> None:
        assert self.q is not None
        self.q.mmio_write(VTD_BASE + off, value, size)

    def edu_dma(self, dev: EduDevice, addr: int, length: int, buf_off: int, to_ram: bool,
                timeout: float | None = None) -> None:
        """One edu transfer of ``length`` bytes between bus address ``addr`` and buffer offset ``buf_off``:
        ``to_ram`` = buffer -> RAM (a device write), else RAM -> buffer (a read).  Waits for completion."""
        q = self.q
        assert q is not None
        if not (1 <= length and 0 <= buf_off and buf_off + length <= EDU_BUF_SIZE):
            raise TraceError("<scenario>", "dma", f"edu transfer of {length} bytes at buffer offset {buf_off} "
                             f"does not fit the {EDU_BUF_SIZE}-byte buffer (QEMU would abort)")
        buf = EDU_DMA_START + buf_off
        q.writeq(dev.bar + 0x80, buf if to_ram else addr)
        q.writeq(dev.bar + 0x88, addr if to_ram else buf)
        q.writeq(dev.bar + 0x90, length)
        q.writeq(dev.bar + 0x98, EDU_CMD_RUN | (EDU_CMD_TO_RAM if to_ram else 0))
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        delay = 0.0005
        while q.readq(dev.bar + 0x98) & EDU_CMD_RUN:
            if time.monotonic() > deadline:
                q.kill()
                raise QemuTimeout(f"edu {dev.name}: DMA at {addr:#x} did not complete within {limit:g} s (killed)")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def edu_msi(self, dev: EduDevice, addr: int, data: int) -> None:
        """``dev`` raises its MSI with address ``addr`` and 16-bit ``data`` (the edu's MSI capability is
        64-bit, without masking): a write from the device itself, so the IOMMU sees its requester id, as
        it does not for a DMA to 0xFEEx_xxxx (QEMU issues those with unspecified attributes)."""
        q = self.q
        assert q is not None
        cap = q.pci_cfg_readl(dev.bdf, 0x34) & 0xFC
        if q.pci_cfg_readl(dev.bdf, cap) & 0xFF != PCI_CAP_ID_MSI:
            raise QemuError(f"edu {dev.name}: no MSI capability at {cap:#x}")
        q.pci_cfg_writel(dev.bdf, cap + 4, addr & 0xFFFF_FFFF)
        q.pci_cfg_writel(dev.bdf, cap + 8, addr >> 32)
        q.pci_cfg_writel(dev.bdf, cap + 12, data & 0xFFFF)
        q.pci_cfg_writel(dev.bdf, cap, q.pci_cfg_readl(dev.bdf, cap) | MSI_ENABLE)
        q.writel(dev.bar + EDU_INTR_RAISE, 1)   # sends the message
        q.writel(dev.bar + EDU_INTR_ACK, 1)

    def load_buffer(self, dev: EduDevice, image: bytes) -> None:
        """Fill the start of ``dev``'s buffer with ``image``: a read DMA from scratch RAM, which is zeroed
        again.  Only valid while translation is off (at reset)."""
        assert self.q is not None
        if not image:
            return
        self.q.write(SCRATCH, image)
        self.edu_dma(dev, SCRATCH, len(image), 0, to_ram=False)
        self.q.memset(SCRATCH, len(image), 0)

    def stderr_tail(self, n: int = 8) -> list[str]:
        return self.q.stderr_tail(n) if self.q is not None else []

    def close(self) -> None:
        if self.q is not None:
            self.q.close()
        self._tmp.cleanup()

    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- recording ---------------------------------------------------------------------------------------------


def _int(v: Any) -> int:
    return v if isinstance(v, int) else int(str(v), 0)


def decode_frcd(lo: int, hi: int) -> dict[str, Any] | None:
    """The oracle's ``frcd0`` decode of FRCD0 (low, high qwords); None when F is clear."""
    v = hi << 64 | lo

    def field(name: str) -> int:
        return (v & getattr(FRCD, name)) >> getattr(FRCD, name + "_LO")

    if not field("F"):
        return None
    return {"F": 1, "type": "read" if field("T") else "write", "reason": hex(field("FR")), "sid": hex(field("SID")),
            "pasid_present": field("PP"), "pasid": hex(field("PV")), "fault_addr": hex(v & FRCD.FI)}


def _runs(changed: dict[int, int]) -> list[dict[str, str]]:
    runs: list[dict[str, str]] = []
    start, cur = -1, bytearray()
    for a in sorted(changed):
        if cur and a == start + len(cur):
            cur.append(changed[a])
        else:
            if cur:
                runs.append({"gpa": hex(start), "hex": cur.hex()})
            start, cur = a, bytearray([changed[a]])
    if cur:
        runs.append({"gpa": hex(start), "hex": cur.hex()})
    return runs


def _merge(ranges: Iterable[tuple[int, int]], gap: int = 0) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1] + gap:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


class _Shadow:
    """What the scenario's ``mem_write`` steps put in guest RAM: every qword value ever written (the
    possible page-table entries DMA may be translated through) and invalidation-wait status addresses."""

    def __init__(self, ram_size: int) -> None:
        self.ram_size = ram_size
        self.pages: dict[int, bytearray] = {}
        self.targets: set[int] = set()      # 4 KiB-aligned addresses present entries ever pointed to
        self.status: set[int] = set()       # wait-descriptor status addresses (SW=1)

    def _qword(self, addr: int) -> int:
        page = self.pages.get(addr & ~0xFFF)
        return 0 if page is None else int.from_bytes(page[addr & 0xFFF:(addr & 0xFFF) + 8], "little")

    def write(self, addr: int, data: bytes) -> None:
        for i in range(len(data)):
            a = addr + i
            page = self.pages.setdefault(a & ~0xFFF, bytearray(4096))
            page[a & 0xFFF] = data[i]
        for q in range(addr & ~7, addr + len(data), 8):
            v = self._qword(q)
            if v & 3:  # present (R or W) second-stage entry, or anything that looks like one
                for mask in ((1 << 39) - 1, (1 << 48) - 1, (1 << 52) - 1):
                    a = v & mask & ~0xFFF
                    if a < self.ram_size:
                        self.targets.add(a)
        for d in range(addr & ~15, addr + len(data), 16):
            lo = self._qword(d)
            if lo & 0xF == T_WAIT and not lo & INV_WAIT.TYPE_HI and lo & INV_WAIT.SW:
                sa = self._qword(d + 8) & ~3
                if sa + 4 <= self.ram_size:
                    self.status.add(sa)

    def dma_ranges(self, iova: int, length: int) -> list[tuple[int, int, int, int]]:
        """(chunk data offset, chunk length, candidate start, candidate end) for every 4 KiB chunk."""
        out = []
        pos = 0
        while pos < length:
            a = iova + pos
            n = min(4096 - (a & 0xFFF), length - pos)
            cands = {a} if a + n <= self.ram_size else set()
            for t in self.targets:
                for size in (1 << 12, 1 << 21, 1 << 30):
                    if t % size == 0:
                        cands.add(t + (a & (size - 1)))
            for c in cands:
                if c + n <= self.ram_size:
                    out.append((pos, n, c, c + n))
            pos += n
        return out


@dataclass
class _Snapshot:
    ranges: list[tuple[int, int]]
    data: dict[int, bytes]

    def byte(self, addr: int) -> int | None:
        for s, e in self.ranges:
            if s <= addr < e:
                return self.data[s][addr - s]
        return None

    def slice(self, start: int, n: int) -> bytes | None:
        for s, e in self.ranges:
            if s <= start and start + n <= e:
                return self.data[s][start - s:start - s + n]
        return None


def _snapshot(q: QTest, ranges: list[tuple[int, int]]) -> _Snapshot:
    return _Snapshot(ranges, {s: q.read(s, e - s) for s, e in ranges})


def _diff(before: _Snapshot, after: _Snapshot) -> dict[int, int]:
    changed: dict[int, int] = {}
    for s, _e in before.ranges:
        old, new = before.data[s], after.data[s]
        if old != new:
            for i in range(len(old)):
                if old[i] != new[i]:
                    changed[s + i] = new[i]
    return changed


def _plan_buffers(doc_id: str, steps: list[dict[str, Any]], sid_dev: dict[int, str]) -> tuple[dict[int, int],
                                                                                               dict[str, bytes]]:
    """Buffer offset of every dma step and the image each device's buffer starts with."""
    offsets: dict[int, int] = {}
    images: dict[str, dict[int, int]] = {}
    payload_end: dict[str, int] = {}
    owner: dict[str, dict[int, int]] = {}   # device -> buffer byte -> read step that last filled it
    read_off: dict[int, int] = {}
    where = lambda i: f"step {i}"  # noqa: E731
    # Payloads with a given offset first; the others are appended after them.
    for st in steps:
        if st.get("op") == "dma" and st.get("dir") == "write" and "data_from_step" not in st \
                and "qemu_buf_off" in st and _int(st["sid"]) in sid_dev:
            name = sid_dev[_int(st["sid"])]
            end = int(st["qemu_buf_off"]) + int(st["len"])
            if end <= 2048:
                payload_end[name] = max(payload_end.get(name, 0), end)
    for i, st in enumerate(steps):
        if st.get("op") != "dma":
            continue
        sid = _int(st["sid"])
        found = sid_dev.get(sid)
        if found is None:
            raise TraceError(doc_id, where(i), f"no edu device has requester id {sid:#x} "
                             f"(known: {', '.join(hex(s) for s in sid_dev)})")
        dev = found
        length = int(st["len"])
        if not 1 <= length < EDU_BUF_SIZE:
            raise TraceError(doc_id, where(i), f"len {length} is not 1..{EDU_BUF_SIZE - 1}")
        is_write = st.get("dir") == "write"
        if st.get("dir") not in ("read", "write"):
            raise TraceError(doc_id, where(i), f"dir {st.get('dir')!r} is not 'read' or 'write'")
        own = owner.setdefault(dev, {})
        img = images.setdefault(dev, {})
        if is_write and "data_from_step" in st:
            k = int(st["data_from_step"])
            if k not in read_off:
                raise TraceError(doc_id, where(i), f"data_from_step {k} is not an earlier read DMA")
            off = int(st.get("qemu_buf_off", read_off[k]))
            if any(own.get(b) != k for b in range(off, off + length)):
                raise TraceError(doc_id, where(i), f"the bytes read at step {k} are no longer in the buffer "
                                 f"at {off}..{off + length} (another read overwrote them)")
        elif is_write:
            data = bytes.fromhex(st.get("data", ""))
            if len(data) != length:
                raise TraceError(doc_id, where(i), f"data has {len(data)} bytes, len is {length}")
            if "qemu_buf_off" in st:
                off = int(st["qemu_buf_off"])
            else:
                # Reuse an identical payload already placed, else append.
                off = -1
                for o in range(0, payload_end.get(dev, 0) - length + 1):
                    if all(img.get(o + j) == data[j] and (o + j) not in own for j in range(length)):
                        off = o
                        break
                if off < 0:
                    off = payload_end.get(dev, 0)
                    payload_end[dev] = off + length
            for j in range(length):
                if off + j in own:
                    raise TraceError(doc_id, where(i), f"payload at buffer offset {off + j} was overwritten by "
                                     f"the read at step {own[off + j]}; give this write another qemu_buf_off")
                if img.get(off + j, data[j]) != data[j]:
                    raise TraceError(doc_id, where(i), f"payload conflicts with another one at buffer offset "
                                     f"{off + j}")
                img[off + j] = data[j]
        else:
            if "qemu_buf_off" in st:
                off = int(st["qemu_buf_off"])
            else:
                off = max(2048, payload_end.get(dev, 0)) if length <= 2048 else payload_end.get(dev, 0)
            for b in range(off, off + length):
                own[b] = i
            read_off[i] = off
        if off < 0 or off + length > EDU_BUF_SIZE:
            raise TraceError(doc_id, where(i), f"buffer offset {off} + len {length} exceeds the edu buffer "
                             f"({EDU_BUF_SIZE} bytes): too many payloads for device {dev}")
        offsets[i] = off
    out_images = {}
    for dev, img in images.items():
        if img:
            end = max(img) + 1
            out_images[dev] = bytes(img.get(b, 0) for b in range(end))
    return offsets, out_images


class QemuRunner:
    """Records scenarios on live QEMU: ``runner.record(doc)`` returns a copy of ``doc`` with every step's
    ``expect``, ``config.devices``, ``config.registers_at_reset``, ``final`` and ``qemu`` filled in.

    ``doc`` needs ``steps`` (oracle format; ``expect`` is ignored) and may give ``id``, ``config.iommu``,
    ``config.bus_d`` (default 5) and ``config.ram_size`` (default 128 MiB).  Raises :class:`QemuNotFound`
    if QEMU is missing, :class:`QemuTimeout` if it hangs, :class:`~vtd_emu.errors.TraceError` for a
    scenario the harness cannot run (unknown requester id, payloads not fitting an edu buffer).  A QEMU
    refusing the options or aborting mid-scenario is recorded (``qemu.start_error``, ``qemu_crashed``).
    """

    def __init__(self, qemu: str | None = None, *, timeout: float = 10.0, icount: bool = True) -> None:
        path = find_qemu(qemu)
        if path is None:
            raise QemuNotFound(f"{qemu or os.environ.get('VTD_EMU_QEMU') or QEMU_BINARY} not found on PATH; "
                               "install it (Debian: apt-get install qemu-system-x86)")
        self.qemu = path
        self.timeout = timeout
        self.icount = icount
        self._harness_ok: bool | None = None
        self._harness_error = ""

    def record(self, scenario: Mapping[str, Any]) -> dict[str, Any]:
        doc = copy.deepcopy(dict(scenario))
        doc.setdefault("format", FORMAT)
        doc_id = str(doc.setdefault("id", "live"))
        cfg = doc.setdefault("config", {})
        iommu = cfg.setdefault("iommu", {})
        ram_size = _int(cfg.setdefault("ram_size", RAM_SIZE))
        cfg.setdefault("mmio_base", hex(VTD_BASE))
        bus_d = _int(cfg.setdefault("bus_d", "0x5"))
        steps: list[dict[str, Any]] = doc.setdefault("steps", [])
        for st in steps:
            st.pop("expect", None)
        for key in ("final", "qemu"):
            doc.pop(key, None)
        cfg.pop("registers_at_reset", None)
        m = QemuMachine(iommu, bus_d=bus_d, ram_size=ram_size, qemu=self.qemu, timeout=self.timeout,
                        icount=self.icount)
        cfg["devices"] = [d.describe() for d in m.devices]
        sid_dev = {d.sid: d.name for d in m.devices}
        offsets, images = _plan_buffers(doc_id, steps, sid_dev)
        doc["qemu"] = {"device_arg": m.iommu_arg}
        try:
            try:
                m.start()
            except QemuExited as exc:
                self._check_harness(exc)
                doc["qemu"].update(stderr_tail=exc.stderr_tail, start_error=exc.stderr_tail[-1] if exc.stderr_tail
                                   else str(exc))
                return doc
            cfg["registers_at_reset"] = {hex(off): hex(m.vtd_read(off, size)) for off, size in RESET_REGS}
            for dev in m.devices:
                if dev.name in images:
                    m.load_buffer(dev, images[dev.name])
            self._run_steps(m, doc_id, steps, offsets, ram_size, doc)
            doc["qemu"]["stderr_tail"] = m.stderr_tail()
        finally:
            m.close()
        return doc

    def _check_harness(self, exc: QemuExited) -> None:
        """QEMU refused to start: the scenario's intel-iommu options, or the harness itself?  The machine with
        a plain ``intel-iommu`` must start, else this is not an answer to record."""
        if self._harness_ok is None:
            probe = QemuMachine({}, qemu=self.qemu, timeout=self.timeout, icount=self.icount)
            try:
                probe.start()
                self._harness_ok = True
            except QemuError as probe_exc:
                self._harness_error = str(probe_exc)
                self._harness_ok = False
            finally:
                probe.close()
        if not self._harness_ok:
            hint = " (try icount=False)" if self.icount and "icount" in self._harness_error else ""
            raise QemuError(f"QEMU cannot run the harness machine at all{hint}: {self._harness_error}") from exc

    def _run_steps(self, m: QemuMachine, doc_id: str, steps: list[dict[str, Any]], offsets: dict[int, int],
                   ram_size: int, doc: dict[str, Any]) -> None:
        q = m.q
        assert q is not None
        shadow = _Shadow(ram_size)
        writeback_of: dict[int, int] = {}
        for i, st in enumerate(steps):
            if st.get("op") == "dma" and "data_from_step" in st:
                writeback_of.setdefault(int(st["data_from_step"]), i)
        for i, st in enumerate(steps):
            try:
                st["expect"] = self._step(m, q, shadow, doc_id, i, st, offsets, steps, writeback_of)
            except QemuExited as exc:
                st["expect"] = {"qemu_crashed": True}
                for later in steps[i + 1:]:
                    later.pop("expect", None)
                doc["final"] = {"qemu_crashed": {"step": i, "error": exc.stderr_tail[-1] if exc.stderr_tail
                                                 else str(exc)}}
                doc["qemu"]["stderr_tail"] = exc.stderr_tail
                return
        doc["final"] = {"regs": {hex(off): hex(m.vtd_read(off, size)) for off, size in FINAL_REGS},
                        "mem_changes": []}

    def _step(self, m: QemuMachine, q: QTest, shadow: _Shadow, doc_id: str, i: int, st: dict[str, Any],
              offsets: dict[int, int], steps: list[dict[str, Any]], writeback_of: dict[int, int]) -> dict[str, Any]:
        op = st.get("op")
        if op == "mem_write":
            gpa = _int(st["gpa"])
            if "qwords" in st:
                data = b"".join(_int(v).to_bytes(8, "little") for v in st["qwords"])
            else:
                data = bytes.fromhex(st["hex"])
            q.write(gpa, data)
            shadow.write(gpa, data)
            return {}
        if op == "mem_read":
            return {"hex": q.read(_int(st["gpa"]), int(st["len"])).hex()}
        if op == "mmio_read":
            return {"value": hex(m.vtd_read(_int(st["off"]), int(st["size"])))}
        if op == "mmio_write":
            off, size = _int(st["off"]), int(st["size"])
            watch = off <= GCMD_OFF < off + size or (off < IQT + 8 and off + size > IQT)
            if not watch:
                m.vtd_write(off, _int(st["value"]), size)
                return {}
            ranges = _merge((a, a + 4) for a in shadow.status)
            before = _snapshot(q, ranges)
            m.vtd_write(off, _int(st["value"]), size)
            return {"mem_changes": _runs(_diff(before, _snapshot(q, ranges)))}
        if op == "dma":
            return self._dma(m, q, shadow, doc_id, i, st, offsets[i], steps, writeback_of)
        raise TraceError(doc_id, f"step {i}", f"unknown op {op!r}; expected mem_write, mem_read, mmio_write, "
                         "mmio_read or dma")

    def _dma(self, m: QemuMachine, q: QTest, shadow: _Shadow, doc_id: str, i: int, st: dict[str, Any],
             buf_off: int, steps: list[dict[str, Any]], writeback_of: dict[int, int]) -> dict[str, Any]:
        sid, iova, length = _int(st["sid"]), _int(st["iova"]), int(st["len"])
        dev = m.device_for_sid(sid)
        assert dev is not None  # checked by _plan_buffers
        is_write = st["dir"] == "write"
        st["qemu_buf_off"] = buf_off
        exp: dict[str, Any] = {"completed": True}
        if is_write:
            cand = shadow.dma_ranges(iova, length)
            ranges = _merge(((s, e) for _p, _n, s, e in cand), gap=256)
            before = _snapshot(q, ranges)
            m.edu_dma(dev, iova, length, buf_off, to_ram=True)
            after = _snapshot(q, ranges)
            changed = _diff(before, after)
            exp["mem_changes"] = _runs(changed)
            payload = None if "data_from_step" in st else bytes.fromhex(st["data"])
            landed, not_landed, unexplained, observed = _attribute(iova, length, payload, changed, after)
            exp["landed"] = landed
            exp["not_landed"] = not_landed
            if unexplained:
                exp["unexplained_changes"] = unexplained
            if payload is None:
                k = int(st["data_from_step"])
                rexp = steps[k].get("expect")
                if writeback_of.get(k) == i and isinstance(rexp, dict):
                    if observed is None:
                        rexp["data"] = None
                        rexp["data_note"] = ("some 4 KiB chunk of the write-back left no trace in RAM (it faulted "
                                             "or wrote the bytes already there)")
                    else:
                        rexp["data"] = observed.hex()
                    rexp["data_observed_at_step"] = i
        else:
            m.edu_dma(dev, iova, length, buf_off, to_ram=False)
        regs = {off: m.vtd_read(off, size) for off, size in DMA_REGS}
        exp["regs"] = {hex(off): hex(v) for off, v in regs.items()}
        exp["frcd0"] = decode_frcd(regs[FRCD0_LO], regs[FRCD0_HI])
        return exp


def _attribute(iova: int, length: int, payload: bytes | None, changed: dict[int, int],
               after: _Snapshot) -> tuple[list[dict[str, Any]], list[dict[str, int]], list[dict[str, str]],
                                          bytes | None]:
    """landed / not_landed / unexplained_changes of a write DMA (and, when ``payload`` is unknown because it
    is a write-back, the bytes observed in RAM).  A 4 KiB chunk of IOVA lands in one page at the IOVA's
    page offset, so changed bytes are attributed to chunks by page offset."""
    landed: list[dict[str, Any]] = []
    missing: list[tuple[int, int]] = []
    explained: set[int] = set()
    observed = bytearray(length)
    complete = True
    pos = 0
    while pos < length:
        a = iova + pos
        lo = a & 0xFFF
        n = min(4096 - lo, length - pos)
        pages = sorted({g & ~0xFFF for g in changed if lo <= (g & 0xFFF) < lo + n})
        hit = [False] * n
        for page in pages:
            dest = page + lo
            got = after.slice(dest, n)
            if got is None:
                continue
            want = got if payload is None else payload[pos:pos + n]
            if payload is None and len(pages) == 1:
                observed[pos:pos + n] = got
            k = 0
            while k < n:
                if got[k] != want[k]:
                    k += 1
                    continue
                j = k
                while j < n and got[j] == want[j]:
                    j += 1
                # A run of equal bytes counts only when the payload really went there (a changed byte in it).
                if any(dest + x in changed for x in range(k, j)):
                    prev = landed[-1] if landed else None
                    if (prev and prev["data_off"] + prev["len"] == pos + k
                            and int(prev["gpa"], 16) + prev["len"] == dest + k):
                        prev["len"] += j - k  # contiguous in payload and RAM: one run, as the oracle records it
                    else:
                        landed.append({"data_off": pos + k, "gpa": hex(dest + k), "len": j - k})
                    explained.update(range(dest + k, dest + j))
                    for x in range(k, j):
                        hit[x] = True
                k = j
        if payload is None and len(pages) != 1:
            complete = False
        k = 0
        while k < n:
            if hit[k]:
                k += 1
                continue
            j = k
            while j < n and not hit[j]:
                j += 1
            missing.append((pos + k, j - k))
            k = j
        pos += n
    not_landed: list[dict[str, int]] = []
    for off, n in missing:
        if not_landed and not_landed[-1]["data_off"] + not_landed[-1]["len"] == off:
            not_landed[-1]["len"] += n
        else:
            not_landed.append({"data_off": off, "len": n})
    unexplained = _runs({g: v for g, v in changed.items() if g not in explained})
    return landed, not_landed, unexplained, (bytes(observed) if payload is None and complete else None)


# -- building scenarios ------------------------------------------------------------------------------------


class ScenarioRAM:
    """A guest RAM for the builders (:mod:`vtd_emu.tables`) that turns every write into a ``mem_write``
    step, so page tables built in Python become scenario steps.  Writes that change nothing (zero-filling
    never-written pages) produce no step."""

    def __init__(self, steps: list[dict[str, Any]], size: int = RAM_SIZE) -> None:
        self.steps = steps
        self.size = size
        self._pages: dict[int, bytearray] = {}
        self.note: str | None = None

    def read(self, addr: int, length: int) -> bytes:
        out = bytearray()
        for a in range(addr, addr + length):
            page = self._pages.get(a >> 12)
            out.append(0 if page is None else page[a & 0xFFF])
        return bytes(out)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> int:
        data = bytes(data)
        if addr < 0 or addr + len(data) > self.size:
            return 0
        if self.read(addr, len(data)) == data:
            return len(data)
        for k, b in enumerate(data):
            a = addr + k
            self._pages.setdefault(a >> 12, bytearray(4096))[a & 0xFFF] = b
        step: dict[str, Any] = {"op": "mem_write", "gpa": hex(addr)}
        if addr % 8 == 0 and len(data) % 8 == 0 and len(data) <= 64:
            step["qwords"] = [hex(int.from_bytes(data[k:k + 8], "little")) for k in range(0, len(data), 8)]
        else:
            step["hex"] = data.hex()
        if self.note:
            step["note"] = self.note
        self.steps.append(step)
        return len(data)

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u64(self, addr: int, value: int) -> bool:
        return self.write(addr, (value & (1 << 64) - 1).to_bytes(8, "little")) == 8


class ScenarioMMIO:
    """The VT-d register block as the builders see it (``mmio_write`` / ``mmio_read``, e.g. for
    :func:`vtd_emu.tables.enable_translation`), turning every access into a scenario step.  Reads
    return a shadow: GSTS follows the GCMD writes (TE, QIE, IRE, CFI persist; SRTP/SIRTP set RTPS/IRTPS),
    every other register reads 0."""

    # GSTS mirrors GCMD bit for bit: TE, QIE, IRE and CFI stay as written; SRTP and SIRTP latch RTPS, IRTPS.
    _GCMD_PERSIST = GCMD.TE | GCMD.QIE | GCMD.IRE | GCMD.CFI
    _LATCHED = GSTS.RTPS | GSTS.IRTPS

    def __init__(self, steps: list[dict[str, Any]]) -> None:
        self.steps = steps
        self.gsts = 0

    def mmio_write(self, offset: int, value: int, size: int) -> None:
        self.steps.append({"op": "mmio_write", "off": hex(offset), "size": size, "value": hex(value)})
        if offset == GCMD_OFF and size == 4:
            self.gsts = (value & self._GCMD_PERSIST) | (self.gsts & self._LATCHED)
            if value & GCMD.SRTP:
                self.gsts |= GSTS.RTPS
            if value & GCMD.SIRTP:
                self.gsts |= GSTS.IRTPS

    def mmio_read(self, offset: int, size: int) -> int:
        self.steps.append({"op": "mmio_read", "off": hex(offset), "size": size})
        return self.gsts if offset == GSTS_OFF else 0


def main(argv: list[str] | None = None) -> int:
    """``python tests/qemu_harness.py IN.jsonl -o OUT.jsonl``: record QEMU's answers for every scenario."""
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("input", type=Path, help="scenarios (vtd-oracle-scenario/1 JSON Lines; expect ignored)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--qemu", default=None, help="QEMU binary (default: $VTD_EMU_QEMU or qemu-system-x86_64)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per qtest command or DMA")
    ap.add_argument("--real-time", action="store_true", help="no -icount: each DMA waits the edu's 100 ms")
    args = ap.parse_args(argv)
    try:
        runner = QemuRunner(args.qemu, timeout=args.timeout, icount=not args.real_time)
        docs = [json.loads(line) for line in args.input.read_text().splitlines() if line.strip()]
        out = [runner.record(d) for d in docs]
    except (VtdEmuError, OSError, ValueError) as exc:
        print(f"qemu_harness: {exc}", file=sys.stderr)
        return 1
    args.output.write_text("".join(json.dumps(d, separators=(",", ":")) + "\n" for d in out))
    print(f"recorded {len(out)} scenario(s) -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
