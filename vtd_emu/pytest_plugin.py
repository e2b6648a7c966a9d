"""pytest fixtures for testing page-walk logic and drivers against vtd-emu (auto-loaded by pytest).

- ``vtd_ram``: a fresh sparse :class:`~vtd_emu.memory.HostRAM`.
- ``vtd_iommu``: a factory ``vtd_iommu(preset="modern", profile="spec", **overrides)`` returning a
  :class:`~vtd_emu.vtd.iommu.VtdIommu` over ``vtd_ram``.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from .memory import HostRAM
from .vtd.config import VtdConfig
from .vtd.iommu import VtdIommu


@pytest.fixture
def vtd_ram() -> HostRAM:
    return HostRAM()


@pytest.fixture
def vtd_iommu(vtd_ram: HostRAM) -> Callable[..., VtdIommu]:
    def make(preset: str = "modern", profile: str = "spec", overrides: dict[str, int] | None = None,
             **kwargs: Any) -> VtdIommu:
        return VtdIommu(vtd_ram, VtdConfig.preset(preset, profile=profile, overrides=overrides, **kwargs))

    return make
