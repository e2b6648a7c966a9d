"""Exception types.

Guest-visible problems are never exceptions: they are architectural results (fault records, FSTS bits,
ignored writes).  Exceptions are for the *user* of the emulator (bad files, bad arguments), for the host
layer (``OSError`` subclasses with the kernel's errno, in :mod:`vtd_emu.host`), and for bugs of the
emulator itself (:class:`InternalError`, never caught to hide it).
"""

from __future__ import annotations


class VtdEmuError(Exception):
    """Base of every exception vtd-emu raises on purpose."""


class SpecError(VtdEmuError, ValueError):
    """A ``specs/*.yaml`` file is malformed: names the file, the YAML path and what was expected."""

    def __init__(self, file: str, path: str, message: str) -> None:
        self.file = file
        self.path = path
        self.message = message
        super().__init__(f"{file}: {path}: {message}" if path else f"{file}: {message}")


class TraceError(VtdEmuError, ValueError):
    """A trace, scenario or RAM image is malformed: names the file, the line or event and the problem."""

    def __init__(self, file: str, where: str, message: str) -> None:
        self.file = file
        self.where = where
        self.message = message
        super().__init__(f"{file}: {where}: {message}" if where else f"{file}: {message}")


class ConfigError(VtdEmuError, ValueError):
    """A configuration or argument given by the user is invalid (unknown preset, bad override, ...)."""


class InternalError(VtdEmuError, RuntimeError):
    """The emulator itself is wrong.  Never raised for anything a guest or a user can do."""
