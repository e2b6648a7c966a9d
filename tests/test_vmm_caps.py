"""The vIOMMU's capabilities against the host's: a combination the host cannot back is refused when the
passthrough device is added, naming the field and both values; emulated-only machines keep any preset.
The expected messages are written out by hand from the rules in docs/vmm.md."""

from __future__ import annotations

from typing import Any

import pytest

from vtd_emu.errors import ConfigError
from vtd_emu.host import Host
from vtd_emu.vmm import CapabilityError, Machine
from vtd_emu.vtd.config import VtdConfig

SID = 0x0310
VMM_DEFAULT = {"cap.CM": 1, "ecap.NEST": 0, "ecap.RPS": 0}



CASES: list[tuple[dict[str, int], dict[str, Any], dict[str, Any], str]] = [
    # host overrides, vIOMMU config, device, expected message start
    ({"cap.FL1GP": 0}, {}, {}, "FL1GP: vIOMMU 1, host 0"),
    ({"cap.FL5LP": 0}, {}, {}, "FL5LP: vIOMMU 1, host 0"),
    ({"ecap.PSS": 9}, {}, {"pasid_bits": 10}, "PSS: vIOMMU 19, host 9"),
    ({"ecap.NEST": 0}, {}, {}, "FLTS: vIOMMU 1, host NEST 0"),
    ({"ecap.FLTS": 0}, {}, {}, "FLTS: vIOMMU 1, host 0"),
    ({"ecap.SRS": 0}, {}, {}, "SRS: vIOMMU 1, host 0"),
    ({"ecap.EAFS": 0}, {}, {}, "EAFS: vIOMMU 1, host 0"),
    ({"ecap.SC": 0}, {}, {}, "SC: vIOMMU 1, host 0"),
    ({"ecap.PRS": 0}, {}, {"pri": True}, "PRS: vIOMMU 1, host 0"),
    ({"ecap.DT": 0}, {}, {"ats": True}, "DT: vIOMMU 1, host 0"),
    ({"cap.MGAW": 47, "cap.SAGAW": 0b0110, "cap.FL5LP": 0}, {}, {}, "MGAW: vIOMMU 56, host 47"),
    ({}, {"preset": "modern", "overrides": {"ecap.NEST": 0, "ecap.RPS": 0}}, {}, "CM: vIOMMU 0, required 1"),
    ({}, {"preset": "modern", "overrides": {"cap.CM": 1, "ecap.RPS": 0}}, {}, "NEST: vIOMMU 1, required 0"),
    ({}, {"preset": "modern", "overrides": {"cap.CM": 1, "ecap.NEST": 0}}, {}, "RPS: vIOMMU 1, required 0"),
    ({}, {"preset": "qemu-7.2-default", "overrides": {"cap.CM": 1}}, {"pasid_bits": 0},
     "SMTS: vIOMMU 0, host ERRATA_772415_SPR17 1"),
]


@pytest.mark.parametrize("host_over, viommu, device, message", CASES)
def test_refused_combinations_name_the_field_and_both_values(host_over: dict[str, int], viommu: dict[str, Any],
                                                             device: dict[str, Any], message: str) -> None:
    host = Host(VtdConfig.preset("modern", overrides=host_over))
    m = Machine(host, viommu or {"preset": "modern", "overrides": VMM_DEFAULT}, guest_ram=4 << 20)
    with pytest.raises(CapabilityError) as exc:
        m.add_passthrough_device(SID, **device)
    assert str(exc.value).startswith(message)
    assert isinstance(exc.value, ConfigError) and exc.value.field == message.split(":")[0]
    # Refused at attach, as QEMU does: the device is not the guest's, nothing is left on the host.
    assert SID not in m.devices and m.host.devices[SID].dev_id is None
    assert [o.kind for o in m.objects()] == ["ioas"]
    m.close()


def test_device_dependent_rules_apply_only_to_such_devices() -> None:
    # A host without PRS or DT backs the default vIOMMU for a device that has neither PRI nor ATS.
    host = Host(VtdConfig.preset("modern", overrides={"ecap.PRS": 0, "ecap.DT": 0}))
    m = Machine(host, guest_ram=4 << 20)
    assert m.add_passthrough_device(SID).dma_write(0x1000, b"ok").ok
    m.close()


def test_a_vIOMMU_reduced_to_what_the_host_has_is_accepted() -> None:
    host = Host(VtdConfig.preset("modern", overrides={"cap.FL1GP": 0, "ecap.SRS": 0}))
    m = Machine(host, {"preset": "modern", "overrides": {**VMM_DEFAULT, "cap.FL1GP": 0, "ecap.SRS": 0}},
                guest_ram=4 << 20)
    dev = m.add_passthrough_device(SID)
    assert dev.dma_write(0x1000, b"ok").ok
    m.close()


def test_emulated_only_machines_keep_any_preset_and_refuse_passthrough_later() -> None:
    host = Host(VtdConfig.preset("modern", overrides={"cap.FL1GP": 0}))
    m = Machine(host, "modern", guest_ram=4 << 20)     # CM=0, NEST=1, RPS=1: fine without passthrough
    emu = m.add_emulated_device(0x0008)
    assert emu.dma_write(0x2000, b"ok").ok and m.mem.read(0x2000, 2) == b"ok"
    with pytest.raises(CapabilityError, match=r"^CM: vIOMMU 0, required 1"):
        m.add_passthrough_device(SID)
    m.close()


def test_bad_machine_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="forwarding must be one of"):
        Machine(forwarding="batched")
    with pytest.raises(ConfigError, match="guest_ram"):
        Machine(guest_ram=0)
    with pytest.raises(ConfigError, match="unknown preset"):
        Machine(viommu="nope")
    m = Machine(guest_ram=4 << 20)
    m.add_emulated_device(0x10)
    with pytest.raises(ConfigError, match="already has a device"):
        m.add_passthrough_device(0x10)
    m.host.add_device(0x20, pasid_bits=8)
    with pytest.raises(ConfigError, match="host device 0x0020 has pri=False"):
        m.add_passthrough_device(0x28, 0x20, pri=True)
    assert m.add_passthrough_device(0x28, 0x20, pasid_bits=8).host_sid == 0x20
    m.close()
