"""The vIOMMU's capabilities against the host's: what a passthrough device needs the physical IOMMU to back.

The vIOMMU's CAP/ECAP are the user's configuration (:func:`viommu_config`; :data:`DEFAULT_VIOMMU` when
nothing is given).  When a passthrough device is added, its IOMMU's ``IOMMU_GET_HW_INFO`` is compared with
them (:func:`check_host`): every guest-visible feature the nested path depends on must be backed by the
host, and the first one that is not raises :class:`CapabilityError` naming the field and both values.
Emulated-only machines are never checked (their DMA never reaches the host IOMMU).  The rules are the rows
of :data:`CHECKS` (documented in ``docs/vmm.md``).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

from ..errors import ConfigError
from ..host.uapi import HW_INFO_VTD_ERRATA_772415_SPR17, HwInfo
from ..spec import specs
from ..vtd.config import VtdConfig


class CapabilityError(ConfigError):
    """The vIOMMU's configuration asks for something the host IOMMU cannot back (``field``, the vIOMMU's
    value, and what the host has or what passthrough requires)."""

    def __init__(self, field: str, viommu: int, host: int | str, why: str) -> None:
        self.field = field
        self.viommu = viommu
        self.host = host
        self.why = why
        host_text = f"host {host}" if isinstance(host, int) else host
        super().__init__(f"{field}: vIOMMU {viommu}, {host_text} ({why})")


DEFAULT_VIOMMU: Mapping[str, Any] = MappingProxyType({
    "preset": "modern",
    "overrides": MappingProxyType({"cap.CM": 1, "ecap.NEST": 0, "ecap.RPS": 0}),
})
"""The vIOMMU a :class:`~vtd_emu.vmm.Machine` builds by default: the ``modern`` unit with caching mode
(required for passthrough devices, as QEMU requires it), without guest-visible nesting (a host of two
stages cannot back a third) and without RID_PASID selection (requests without PASID always use PASID 0,
which the host sees as the device's RID attachment)."""


def viommu_config(spec: "VtdConfig | str | Mapping[str, Any]") -> VtdConfig:
    """The vIOMMU configuration from a :class:`VtdConfig`, a preset name, or a mapping with ``preset``
    (default ``modern``) and the keyword arguments of :meth:`VtdConfig.preset` (``overrides``,
    ``profile``, cache sizes, ``haw``)."""
    if isinstance(spec, VtdConfig):
        return spec.validated()
    if isinstance(spec, str):
        return VtdConfig.preset(spec)
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = kwargs.pop("preset", "modern")
        if not isinstance(name, str):
            raise ConfigError(f"viommu preset must be a preset name, got {name!r}")
        return VtdConfig.preset(name, **kwargs)
    raise ConfigError(f"viommu must be a VtdConfig, a preset name or a mapping, got {type(spec).__name__}")


class HostCaps(NamedTuple):
    """What ``IOMMU_GET_HW_INFO`` told about one device's IOMMU."""

    cap: int
    ecap: int
    errata_772415: bool
    dirty_tracking: bool
    max_pasid_log2: int

    @staticmethod
    def of(info: HwInfo) -> "HostCaps":
        vtd = info.vtd
        if vtd is None:
            raise ConfigError("the passthrough device's IOMMU is not an Intel VT-d unit (IOMMU_GET_HW_INFO type)")
        return HostCaps(vtd.cap_reg, vtd.ecap_reg, bool(vtd.flags & HW_INFO_VTD_ERRATA_772415_SPR17),
                        bool(info.capabilities & 1), info.max_pasid_log2)

    def field(self, name: str) -> int:
        reg, _, fname = name.partition(".")
        return specs().register(reg.upper()).field(fname).get(self.cap if reg == "cap" else self.ecap)


class DeviceNeeds(NamedTuple):
    """The passthrough device as the guest will see it."""

    pasid_bits: int
    ats: bool
    pri: bool


class Check(NamedTuple):
    """One rule, checked when ``applies(vIOMMU value, device)``: with ``required`` the vIOMMU's value must
    equal it whatever the host has; otherwise it must not exceed ``host(HostCaps)`` (named ``host_name``
    in the error), or with ``at_least`` must not be below it."""

    field: str
    why: str
    applies: Callable[[int, DeviceNeeds], bool]
    host: Callable[[HostCaps], int] | None
    required: int | None = None
    host_name: str = ""
    at_least: bool = False


def _on(v: int, d: DeviceNeeds) -> bool:
    return v != 0


def _always(v: int, d: DeviceNeeds) -> bool:
    return True


def _f(name: str) -> Callable[[HostCaps], int]:
    return lambda h: h.field(name)


CHECKS: tuple[Check, ...] = (
    Check("cap.CM", "caching mode is required for passthrough devices (not-present to present changes are "
          "invalidated, so binds follow the guest)", _always, None, required=1),
    Check("ecap.NEST", "guest nested translation (PGTT=011b) cannot be backed by a two-stage host",
          _on, None, required=0),
    Check("ecap.RPS", "RID_PASID selection: requests without PASID map to the host RID attachment of PASID 0",
          _on, None, required=0),
    Check("ecap.SMTS", "a host with ERRATA_772415_SPR17 cannot back legacy-mode guests", _always,
          lambda h: 1 if h.errata_772415 else 0, host_name="ERRATA_772415_SPR17", at_least=True),
    Check("cap.MGAW", "guest-physical addresses are the second stage's input", _always, _f("cap.MGAW")),
    Check("ecap.FLTS", "first-stage binds are nested HWPTs: the host needs ECAP.NEST", _on, _f("ecap.NEST"),
          host_name="NEST"),
    Check("ecap.FLTS", "first-stage tables are walked by the host", _on, _f("ecap.FLTS")),
    Check("cap.FL1GP", "1 GiB first-stage pages are walked by the host", _on, _f("cap.FL1GP")),
    Check("cap.FL5LP", "5-level first-stage tables (FSPM=1) are walked by the host", _on, _f("cap.FL5LP")),
    Check("ecap.PSS", "guest PASIDs are host PASIDs", lambda v, d: d.pasid_bits > 0, _f("ecap.PSS")),
    Check("ecap.PASID", "PASID-granular binds need host PASID support", lambda v, d: v != 0 and d.pasid_bits > 0,
          _f("ecap.PASID")),
    Check("ecap.SRS", "supervisor requests (SRE) are a nested HWPT flag the host must honour", _on, _f("ecap.SRS")),
    Check("ecap.EAFS", "extended accessed flags (EAFE) are a nested HWPT flag the host must honour", _on,
          _f("ecap.EAFS")),
    Check("ecap.PRS", "page requests of a PRI device are handled by the host unit",
          lambda v, d: v != 0 and d.pri, _f("ecap.PRS")),
    Check("ecap.DT", "device-TLB invalidations of an ATS device are forwarded to the host unit",
          lambda v, d: v != 0 and d.ats, _f("ecap.DT")),
    Check("ecap.SC", "snoop control: the guest's SNP/PGSNP must be enforceable by the host", _on, _f("ecap.SC")),
)


def viommu_field(cfg: VtdConfig, name: str) -> int:
    reg, _, fname = name.partition(".")
    return cfg.cap_field(fname) if reg == "cap" else cfg.ecap_field(fname)


def check_host(cfg: VtdConfig, host: HostCaps, device: DeviceNeeds) -> None:
    """Raise :class:`CapabilityError` for the first rule of :data:`CHECKS` the host cannot back."""
    for c in CHECKS:
        v = viommu_field(cfg, c.field)
        if not c.applies(v, device):
            continue
        name = c.field.split(".")[1]
        if c.required is not None:
            if v != c.required:
                raise CapabilityError(name, v, f"required {c.required}", c.why)
            continue
        assert c.host is not None
        h = c.host(host)
        if (v < h) if c.at_least else (v > h):
            raise CapabilityError(name, v, f"host {c.host_name} {h}" if c.host_name else h, c.why)
    if device.pasid_bits > host.max_pasid_log2:
        raise CapabilityError("pasid_bits", device.pasid_bits, host.max_pasid_log2,
                              "the device's PASID width is the host's max_pasid_log2")


__all__ = ["CapabilityError", "DEFAULT_VIOMMU", "viommu_config", "HostCaps", "DeviceNeeds", "Check", "CHECKS",
           "check_host", "viommu_field"]
