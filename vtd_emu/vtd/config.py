"""Configuration of one VT-d unit: CAP/ECAP (from named presets plus per-field overrides), the host
address width, cache sizes and the behaviour profile (spec or a named set of QEMU quirks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping

import yaml

from ..errors import ConfigError, SpecError
from ..spec import specs, specs_dir


@dataclass(frozen=True, slots=True)
class Quirks:
    """Toggles departing from the VT-d specification.  All off = the spec.  See docs/quirks.md."""

    sm_legacy_fault_codes: bool = False
    sm_fault_pp_rid_pasid: bool = False
    fault_pv_16bit: bool = False
    fault_collapse_same_sid: bool = False
    iotlb_before_context: bool = False
    iotlb_capacity_flush: bool = False
    psi_mask_8bit: bool = False
    srtp_te_flush_caches: bool = False
    te_off_resets_fri: bool = False
    domain_cc_as_global: bool = False
    pt_fast_path: bool = False
    intr_range_whole_leaf: bool = False
    pasid_entry_uncached: bool = False
    cached_perm_drop_silently: bool = False
    no_psc: bool = False
    qemu_reserved_bits: bool = False
    qemu_mmio_access: bool = False
    qemu_register_widths: bool = False
    qemu_fault_event_gating: bool = False
    interrupt_window_untranslated: bool = False
    ignore_cfi: bool = False
    rid_pasid_without_rps: bool = False
    pgtt_walked_as_ss: bool = False
    fault_fi_full_address: bool = False
    qemu_qi_registers: bool = False
    qemu_qi_descriptors: bool = False
    rtaddr_smt_bit: bool = False
    sm_root_rsvd_both_halves: bool = False
    ir_faults_unrecorded: bool = False
    irte_qemu_reserved: bool = False


@lru_cache(maxsize=None)
def _profiles() -> dict[str, Quirks]:
    path = specs_dir() / "profiles.yaml"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SpecError(str(path), "", f"cannot read profiles: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"toggles", "profiles"}:
        raise SpecError(str(path), "", "expected exactly the keys 'toggles' and 'profiles'")
    known = {f.name for f in dataclasses.fields(Quirks)}
    toggles = doc["toggles"]
    if not isinstance(toggles, dict) or set(toggles) != known:
        missing = sorted(known - set(toggles or {}))
        extra = sorted(set(toggles or {}) - known)
        raise SpecError(str(path), "toggles", f"must list exactly the toggles the code knows; missing {missing}, unknown {extra}")
    out: dict[str, Quirks] = {}
    for name, sets in (doc["profiles"] or {}).items():
        sets = sets or {}
        if not isinstance(sets, dict):
            raise SpecError(str(path), f"profiles.{name}", "expected a mapping of toggle: bool")
        for key, val in sets.items():
            if key not in known:
                raise SpecError(str(path), f"profiles.{name}.{key}", f"unknown toggle; expected one of {sorted(known)}")
            if not isinstance(val, bool):
                raise SpecError(str(path), f"profiles.{name}.{key}", "expected true or false")
        out[str(name)] = Quirks(**sets)
    if "spec" not in out:
        raise SpecError(str(path), "profiles", "a 'spec' profile is required")
    return out


def profile_names() -> list[str]:
    return sorted(_profiles())


def quirks_for(profile: str) -> Quirks:
    try:
        return _profiles()[profile]
    except KeyError:
        raise ConfigError(f"unknown profile {profile!r}; expected one of {profile_names()}") from None


def _cap(**fields: int) -> int:
    return specs().register("CAP").encode(**fields)


def _ecap(**fields: int) -> int:
    return specs().register("ECAP").encode(**fields)


def _modern() -> tuple[int, int]:
    cap = _cap(ND=6, SAGAW=0b1110, MGAW=56, FRO=0x22, SLLPS=0b11, PSI=1, NFR=7, MAMV=18, DWD=1, DRD=1,
               FL1GP=1, FL5LP=1, ESRTPS=1, ESIRTPS=1)
    ecap = _ecap(QI=1, DT=1, IR=1, EIM=1, PT=1, SC=1, IRO=0xF, MHMV=15, NEST=1, PRS=1, SRS=1, NWFS=1,
                 EAFS=1, PSS=19, PASID=1, PDS=1, SMTS=1, SLADS=1, SLTS=1, FLTS=1, SMPWC=1, RPS=1)
    return cap, ecap


# Values recorded from QEMU 7.2 (shared/qemu-oracle/README.md); `modern` is a scalable unit of the kind
# current server parts expose, with everything this emulator implements switched on.
_PRESETS: dict[str, Any] = {
    "qemu-7.2-default": (0x00D2008C22260206, 0xF00F4A),
    "qemu-7.2-aw48": (0x00D2008C222F0606, 0xF00F4A),
    "qemu-7.2-scalable": (0x00D2008C22260206, 0x480080F00F4A),
    "qemu-7.2-scalable-pasid": (0x00D2008C22260206, 0x490080F00F4A),
    "modern": _modern,
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


@dataclass(frozen=True, slots=True)
class VtdConfig:
    """Everything that makes one VT-d unit differ from another."""

    cap: int
    ecap: int
    ver: int = 0x10
    haw: int = 0
    """Host address width: output-address bits at or above it are reserved.  0 = MGAW + 1, at most 52."""
    profile: str = "spec"
    quirks: Quirks = field(default_factory=Quirks)
    iotlb_size: int = 4096
    context_cache_size: int = 1024
    pasid_cache_size: int = 4096
    psc_size: int = 4096
    fault_collapse: bool = False
    """Spec: hardware *may* collapse faults of one source while its record is pending.  Off by default."""
    dma_translation: bool = True
    """False: an interrupt-remapping-only unit (QEMU's ``dma-translation=off``): GCMD.TE is ignored, so TES
    never sets and DMA is never translated."""
    name: str = "custom"

    @staticmethod
    def preset(name: str = "modern", *, profile: str = "spec", overrides: Mapping[str, int] | None = None,
               **kwargs: Any) -> "VtdConfig":
        """A named preset, with ``overrides`` such as ``{"cap.NFR": 0, "ecap.PRS": 0}`` and other fields
        (``haw``, cache sizes) as keyword arguments."""
        try:
            base = _PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; expected one of {preset_names()}") from None
        cap, ecap = base() if callable(base) else base
        cap, ecap = apply_overrides(cap, ecap, overrides or {})
        quirks = quirks_for(profile)
        try:
            cfg = VtdConfig(cap=cap, ecap=ecap, profile=profile, quirks=quirks, name=name, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"bad configuration argument: {exc}") from None
        return cfg.validated()

    def validated(self) -> "VtdConfig":
        haw = self.haw or min(52, self.mgaw + 1)
        if not 12 < haw <= 64:
            raise ConfigError(f"haw must be in 13..64, got {haw}")
        for n in ("iotlb_size", "context_cache_size", "pasid_cache_size", "psc_size"):
            if getattr(self, n) < 0:
                raise ConfigError(f"{n} must be >= 0")
        return dataclasses.replace(self, haw=haw)

    def with_profile(self, profile: str) -> "VtdConfig":
        return dataclasses.replace(self, profile=profile, quirks=quirks_for(profile))

    # -- decoded capability fields (cold path: read once by the chip at construction) -------------
    def cap_field(self, name: str) -> int:
        return specs().register("CAP").field(name).get(self.cap)

    def ecap_field(self, name: str) -> int:
        return specs().register("ECAP").field(name).get(self.ecap)

    @property
    def mgaw(self) -> int:
        return self.cap_field("MGAW")

    @property
    def scalable(self) -> bool:
        return bool(self.ecap_field("SMTS"))

    @property
    def nfr(self) -> int:
        return self.cap_field("NFR") + 1


def apply_overrides(cap: int, ecap: int, overrides: Mapping[str, int]) -> tuple[int, int]:
    regs = {"cap": specs().register("CAP"), "ecap": specs().register("ECAP")}
    vals = {"cap": cap, "ecap": ecap}
    for key, value in overrides.items():
        reg, _, fname = key.partition(".")
        reg = reg.lower()
        if reg not in regs or not fname:
            raise ConfigError(f"override {key!r}: expected 'cap.FIELD' or 'ecap.FIELD'")
        layout = regs[reg]
        if fname not in layout.fields:
            raise ConfigError(f"override {key!r}: {reg.upper()} has no field {fname}; fields are {sorted(layout.fields)}")
        f = layout.fields[fname]
        if not isinstance(value, int) or value < 0 or value >> f.width:
            raise ConfigError(f"override {key!r}: value {value!r} does not fit {f.width} bits")
        vals[reg] = f.put(vals[reg], value)
    return vals["cap"], vals["ecap"]


_QEMU72_KEYS = {"aw_bits", "caching_mode", "scalable_mode", "pasid", "pt", "device_iotlb", "snoop_control",
                "dma_drain", "dma_translation", "intremap", "eim", "buggy_eim", "version"}


def qemu72_config(options: Mapping[str, Any], *, profile: str = "qemu-7.2") -> VtdConfig:
    """The unit QEMU 7.2 builds for ``-device intel-iommu`` with these options (oracle ``config.iommu``).

    Option sets QEMU refuses raise :class:`ConfigError` with QEMU's reason."""
    unknown = set(options) - _QEMU72_KEYS
    if unknown:
        raise ConfigError(f"unknown QEMU 7.2 intel-iommu options {sorted(unknown)}")
    aw = int(options.get("aw_bits", 39))
    sm = bool(options.get("scalable_mode", False))
    pasid = bool(options.get("pasid", False))
    dt = bool(options.get("device_iotlb", False))
    drain = bool(options.get("dma_drain", True))
    eim = options.get("eim")
    intremap = options.get("intremap", "on")
    # In QEMU's order: vtd_realize refuses PASID with a device IOTLB before vtd_decide_config runs.
    if pasid and dt:
        raise ConfigError("PASID based device IOTLB is not supported")
    ir = intremap not in ("off", False)
    eim_on = eim == "on" or eim is True
    if eim_on and not ir:
        raise ConfigError("eim=on cannot be selected without intremap=on")
    buggy_eim = bool(options.get("buggy_eim", False))
    if eim_on and not buggy_eim:
        raise ConfigError("eim=on requires accel=kvm,kernel-irqchip=split")
    # eim=auto (the default): on only with x-buggy-eim under TCG (no in-kernel irqchip); eim=off wins.
    eim_set = ir and (eim_on or (eim in (None, "auto") and buggy_eim))
    if aw not in (39, 48):
        raise ConfigError("Supported values for aw-bits are: 39, 48")
    if sm and not drain:
        raise ConfigError("Need to set dma_drain for scalable mode")
    if pasid and not sm:
        raise ConfigError("Need to set scalable mode for PASID")
    cap_fields = dict(ND=6, SAGAW=0b0110 if aw == 48 else 0b0010, MGAW=aw - 1, FRO=0x22, SLLPS=0b11, PSI=1,
                      NFR=0, MAMV=18, DWD=1 if drain else 0, DRD=1 if drain else 0,
                      CM=1 if options.get("caching_mode") else 0)
    dma_translation = options.get("dma_translation", True) is not False
    if not dma_translation:
        cap_fields["SAGAW"] = 0
    ecap_fields = dict(QI=1, IRO=0xF, PT=1 if options.get("pt", True) else 0,
                       DT=1 if dt else 0, SC=1 if options.get("snoop_control") else 0)
    if ir:
        ecap_fields.update(IR=1, MHMV=15)
        if eim_set:
            ecap_fields["EIM"] = 1
    if sm:
        ecap_fields.update(SMTS=1, SLTS=1, SRS=1)
        if pasid:
            ecap_fields["PASID"] = 1
    cfg = VtdConfig(cap=_cap(**cap_fields), ecap=_ecap(**ecap_fields), profile=profile,
                    quirks=quirks_for(profile), name="qemu-7.2", haw=aw, iotlb_size=1024,
                    dma_translation=dma_translation)
    return cfg.validated()
