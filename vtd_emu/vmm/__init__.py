"""The vIOMMU machine: a guest with a virtual VT-d whose passthrough devices get nested translation on the
(modelled) physical VT-d, as QEMU + Linux iommufd do it (``docs/vmm.md``).

:class:`Machine` composes a :class:`~vtd_emu.host.Host`, guest RAM mapped into one IOAS, a
:class:`~vtd_emu.vtd.iommu.VtdIommu` over that RAM and guest devices (:class:`EmulatedDevice`,
:class:`PassthroughDevice`); :class:`Bridge` reconciles the guest's binds and forwards its invalidations,
logging every host call as a :class:`BridgeAction`; :mod:`.caps` checks the vIOMMU against the host.
:class:`GuestDriver` is the guest's Linux-like intel-iommu driver and :class:`Validator` the vSVA
validator reporting :class:`VsvaReport` findings.
"""

from __future__ import annotations

from .bridge import (FORWARDING_MODES, BindState, Bridge, BridgeAction, BridgeStats, Desired, Trigger)
from .caps import CHECKS, DEFAULT_VIOMMU, CapabilityError, viommu_config
from .devices import DeviceDma, EmulatedDevice, GuestDevice, PassthroughDevice
from .guest import Domain, GuestAction, GuestDriver, GuestDriverError, PageRequest, QiResult
from .machine import GuestRam, Machine
from .validator import Validator, VsvaReport

__all__ = ["Machine", "GuestRam", "Bridge", "BridgeAction", "BridgeStats", "BindState", "Trigger", "Desired",
           "FORWARDING_MODES", "CapabilityError", "CHECKS", "DEFAULT_VIOMMU", "viommu_config", "DeviceDma",
           "EmulatedDevice", "PassthroughDevice", "GuestDevice", "GuestDriver", "GuestDriverError", "GuestAction",
           "QiResult", "PageRequest", "Domain", "Validator", "VsvaReport"]
