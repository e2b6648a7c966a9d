"""vtd-emu: a register-level Intel VT-d (IOMMU) emulator, an iommufd-style host layer and a vIOMMU.

The public names are re-exported lazily (PEP 562): the chip's modules compile ``specs/*.yaml`` when they
are imported, so importing ``vtd_emu`` (or ``vtd_emu.cli``) must not import them yet.  That way a damaged
specs directory is reported by whoever first needs the specs (the command line: one line, exit 2), not as
an import-time traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, InternalError, SpecError, TraceError, VtdEmuError

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "HostRAM": ".memory", "NO_MEMORY": ".memory",
    "READ": ".vtd.access", "WRITE": ".vtd.access", "EXEC": ".vtd.access", "PRIV": ".vtd.access",
    "VtdConfig": ".vtd.config",
    "FaultReason": ".vtd.faults",
    "DmaResult": ".vtd.iommu", "Fault": ".vtd.iommu", "Translation": ".vtd.iommu", "VtdIommu": ".vtd.iommu",
}

__all__ = ["VtdIommu", "VtdConfig", "HostRAM", "NO_MEMORY", "Translation", "Fault", "DmaResult", "FaultReason",
           "READ", "WRITE", "EXEC", "PRIV", "VtdEmuError", "SpecError", "TraceError", "ConfigError",
           "InternalError", "__version__"]

if TYPE_CHECKING:
    from .memory import NO_MEMORY, HostRAM
    from .vtd.access import EXEC, PRIV, READ, WRITE
    from .vtd.config import VtdConfig
    from .vtd.faults import FaultReason
    from .vtd.iommu import DmaResult, Fault, Translation, VtdIommu


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
