"""pytest fixtures for testing page-walk logic and drivers against vtd-emu (auto-loaded by pytest through
the ``pytest11`` entry point once vtd-emu is installed).

- ``vtd_ram``: a fresh sparse :class:`~vtd_emu.memory.HostRAM` per test.
- ``vtd_iommu``: a *factory*: ``vtd_iommu(preset="modern", profile="spec", overrides=None, **fields)``
  returns a new :class:`~vtd_emu.vtd.iommu.VtdIommu` over ``vtd_ram`` each time it is called.

The library is imported when a fixture is first used, not when pytest loads the plugin, so a test run
that never asks for these fixtures does not load the specs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from .memory import HostRAM
    from .vtd.iommu import VtdIommu


@pytest.fixture
def vtd_ram() -> HostRAM:
    """A fresh sparse 64-bit :class:`~vtd_emu.memory.HostRAM` (never-written memory reads as zeros)."""
    from .memory import HostRAM

    return HostRAM()


@pytest.fixture
def vtd_iommu(vtd_ram: HostRAM) -> Callable[..., VtdIommu]:
    """A factory of VT-d units over ``vtd_ram``, not a unit: call it, as
    ``vtd_iommu(preset="modern", profile="spec", overrides={"cap.NFR": 0}, **fields)``, to get a new
    :class:`~vtd_emu.vtd.iommu.VtdIommu` configured by :meth:`~vtd_emu.vtd.config.VtdConfig.preset`
    (``fields`` are further ``VtdConfig`` fields such as ``iotlb_size``).  Units made in one test share
    that test's ``vtd_ram``."""
    from .vtd.config import VtdConfig
    from .vtd.iommu import VtdIommu

    def make(preset: str = "modern", profile: str = "spec", overrides: dict[str, int] | None = None,
             **kwargs: Any) -> VtdIommu:
        return VtdIommu(vtd_ram, VtdConfig.preset(preset, profile=profile, overrides=overrides, **kwargs))

    return make
