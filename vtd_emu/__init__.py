"""vtd-emu: a register-level Intel VT-d (IOMMU) emulator, an iommufd-style host layer and a vIOMMU."""

from __future__ import annotations

from .errors import ConfigError, InternalError, SpecError, TraceError, VtdEmuError
from .memory import NO_MEMORY, HostRAM
from .vtd.access import EXEC, PRIV, READ, WRITE
from .vtd.config import VtdConfig
from .vtd.faults import FaultReason
from .vtd.iommu import DmaResult, Fault, Translation, VtdIommu

__version__ = "0.1.0"

__all__ = ["VtdIommu", "VtdConfig", "HostRAM", "NO_MEMORY", "Translation", "Fault", "DmaResult", "FaultReason",
           "READ", "WRITE", "EXEC", "PRIV", "VtdEmuError", "SpecError", "TraceError", "ConfigError",
           "InternalError", "__version__"]
