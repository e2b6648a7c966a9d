"""The sweeps of issue 12 against QEMU 7.2: registers x access sizes x patterns, structure bits, and every
``intel-iommu`` option alone and in pairs (generators in ``scripts/qemu_sweeps.py``).

Their QEMU 7.2 answers are recorded in ``tests/data/qemu-sweeps/`` and replayed here without QEMU under the
``qemu-7.2`` profile, every recorded answer compared.  The corpus must be exactly what the generators make
(so a change of generator is re-recorded, not silently stale), and with QEMU 7.2 installed a fixed sample of
every family is recorded again live and must give the recorded answers (QEMU is deterministic here).

Re-record a family: ``python scripts/qemu_sweeps.py --family registers``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import REPO
from vtd_emu.importers.qemu_scenario import Scenario, replay_scenario, scenario_trace

FAMILIES = ("fidelity", "registers", "options", "structures")


@lru_cache(maxsize=None)
def sweeps() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qemu_sweeps", REPO / "scripts" / "qemu_sweeps.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    return mod


@lru_cache(maxsize=None)
def corpus(family: str) -> tuple[Path, tuple[dict[str, Any], ...]]:
    path = sweeps().corpus_path(family)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return path, tuple(json.loads(line) for line in f if line.strip())


def scenarios(family: str) -> list[Scenario]:
    path, docs = corpus(family)
    return [scenario_trace(doc, str(path), n) for n, doc in enumerate(docs, 1)]


def _unrecorded(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A scenario's steps as the generator wrote them (the recorder adds ``expect`` and ``qemu_buf_off``)."""
    return [{k: v for k, v in st.items() if k not in ("expect", "qemu_buf_off")} for st in doc["steps"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_sweep_matches_qemu(family: str) -> None:
    checks = 0
    for sc in scenarios(family):
        res = replay_scenario(sc, profile="qemu-7.2")
        assert not res.mismatches, f"{sc.id}:\n" + "\n".join(str(m) for m in res.mismatches[:10])
        checks += res.checks
    assert checks > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_corpus_is_what_the_generators_make(family: str) -> None:
    _, docs = corpus(family)
    made = list(sweeps().FAMILIES[family]())
    assert [d["id"] for d in docs] == [d["id"] for d in made]
    for rec, gen in zip(docs, made):
        assert rec["config"]["iommu"] == gen["config"]["iommu"], rec["id"]
        assert _unrecorded(rec) == gen["steps"], f"{rec['id']}: re-record with scripts/qemu_sweeps.py"


def test_sweeps_cover_what_the_issue_asks() -> None:
    mod = sweeps()
    # Registers: every dword of every register of each QEMU preset, and a few outside, x sizes 1, 2, 4, 8.
    offsets = {p: mod.register_offsets(o) for p, o in mod.PRESETS.items()}
    _, reg_docs = corpus("registers")
    assert len(reg_docs) == sum(len(v) for v in offsets.values())
    for doc in reg_docs:
        sizes = {st["size"] for st in doc["steps"] if st["op"] == "mmio_write"}
        crashed = any((st.get("expect") or {}).get("qemu_crashed") for st in doc["steps"])
        assert sizes == {1, 2, 4, 8} or crashed, doc["id"]
    # Options: each of the 13 properties of `-device intel-iommu,help` at each value, and the pairs.
    _, opt_docs = corpus("options")
    props = {k for d in opt_docs for k in d["config"]["iommu"]}
    assert props == set(mod.OPTION_VALUES) and len(props) == 13
    assert sum(len(d["config"]["iommu"]) == 2 for d in opt_docs) >= 100
    assert any(d["qemu"].get("start_error") for d in opt_docs) and any(not d["qemu"].get("start_error")
                                                                       for d in opt_docs)
    # Structures: every bit of each structure, legacy and scalable.
    _, st_docs = corpus("structures")
    for kind in ("legacy_root_entry", "legacy_context_entry", "ss_l4_table", "ss_l3_1g_leaf", "ss_l2_2m_leaf",
                 "ss_l1_4k_leaf", "sm_root_entry_lower", "sm_root_entry_upper", "sm_context_entry", "pasid_dir_entry",
                 "_pasid_entry", "desc_context", "desc_iotlb", "desc_dev_tlb", "desc_iec", "desc_wait",
                 "desc_pasid_iotlb", "desc_pasid_cache"):
        assert any(d["id"].endswith(kind) for d in st_docs), kind
    # Descriptors again in a 256-bit queue (IQA.DW) on a scalable unit: every one of the 256 bits.
    wide = [d for d in st_docs if d["id"].startswith("struct_desc256_")]
    assert len(wide) == 7 and all(d["config"]["iommu"] == {"scalable_mode": True} for d in wide)
    for doc in wide:
        iqa = next(st for st in doc["steps"] if st["op"] == "mmio_write" and st["off"] == "0x90")
        assert int(iqa["value"], 16) & 1 << 11, doc["id"]
        assert all(len(st["qwords"]) == 4 for st in doc["steps"] if st["op"] == "mem_write"), doc["id"]
        # IQT is written twice per bit (the flipped descriptor, then the slot made valid), after its reset.
        assert sum(st["op"] == "mmio_write" and st["off"] == "0x88" for st in doc["steps"]) == 1 + 2 * 256


# -- live: a fixed sample of every family, recorded again -----------------------------------------------

LIVE_SAMPLE: dict[str, tuple[str, ...]] = {
    "fidelity": ("fid_rtaddr_ttm_legacy", "fid_srtp_ttm3_scalable_scalable_tables",
                 "fid_srtp_ttm1_legacy_legacy_tables",
                 "fid_sm_root_rsvd_hi1", "fid_sm_root_rsvd_lo11", "fid_eim_eim-on_buggy_eim-True",
                 "fid_eim_eim-off_buggy_eim-True", "fid_dma_translation_off", "fid_psi_in_2m_3ff000_234000_am0",
                 "fid_wide_write_fectl", "fid_wide_write_gsts"),
    "registers": ("reg_default_018", "reg_default_020", "reg_default_028", "reg_default_034", "reg_default_038",
                  "reg_default_088", "reg_default_090", "reg_default_0f8", "reg_default_22c", "reg_default_230",
                  "reg_aw48_008", "reg_scalable_020", "reg_scalable-pasid_010", "reg_scalable_0a0"),
    "options": ("opt_aw_bits-48", "opt_aw_bits-50", "opt_caching_mode-true", "opt_device_iotlb-true",
                "opt_dma_drain-false", "opt_dma_translation-false", "opt_eim-on", "opt_eim-off", "opt_intremap-off",
                "opt_pt-false", "opt_snoop_control-true", "opt_version-1", "opt_buggy_eim-true", "opt_pasid-true",
                "opt_scalable_mode-true", "opt_eim-on__buggy_eim-true", "opt_dma_drain-false__scalable_mode-true",
                "opt_device_iotlb-true__pasid-true", "opt_intremap-off__scalable_mode-true"),
    "structures": ("struct_legacy_aw39_ss_l1_4k_leaf", "struct_scalable_sm_root_entry_upper", "struct_desc256_iotlb"),
}


def _answers(doc: dict[str, Any]) -> dict[str, Any]:
    return {"reset": doc["config"].get("registers_at_reset"), "final": doc.get("final"),
            "start_error": doc["qemu"].get("start_error"), "steps": [st.get("expect") for st in doc["steps"]]}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_live_sample_gives_the_recorded_answers(family: str, tmp_path: Path) -> None:
    from test_qemu_live import SKIP

    if SKIP is not None:
        pytest.skip(SKIP)
    from qemu_harness import QemuRunner

    path, docs = corpus(family)
    want = LIVE_SAMPLE[family]
    sample = [d for d in docs if d["id"] in want]
    assert len(sample) == len(want)
    runner = QemuRunner()
    for n, doc in enumerate(sample, 1):
        live = runner.record({k: v for k, v in doc.items() if k not in ("final", "qemu")})
        res = replay_scenario(scenario_trace(live, f"<live {doc['id']}>", n), profile="qemu-7.2")
        assert not res.mismatches, f"{doc['id']} (live):\n" + "\n".join(str(m) for m in res.mismatches[:10])
        assert _answers(live) == _answers(doc), f"{doc['id']}: QEMU answers differently from {path.name}"
