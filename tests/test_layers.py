"""The import direction of docs/architecture.md's layer table, enforced on every module of the package.

Each package may import only its own layer and the layers below it.  Lazy imports inside functions count
too: a cycle hidden in a function body is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vtd_emu"

# Lowest first; docs/architecture.md has the same table with what each layer holds.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "outfile"),
    ("spec",),
    ("memory", "ramimage"),
    ("vtd",),
    ("tables",),
    ("host",),
    ("vmm",),
    ("trace",),
    ("importers",),
    ("cli", "pytest_plugin", "__main__", "__init__"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _layer_of(module: str) -> str:
    """``vtd_emu.vtd.iommu`` -> ``vtd``; ``vtd_emu`` (the package itself) -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1 and parts[-2] != "vtd_emu":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    return _imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute vtd_emu module) for every import statement of the source, wherever it stands."""
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "vtd_emu")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "vtd_emu":
                continue
            if target == "vtd_emu":  # `from vtd_emu import x`: x is a subpackage or a re-export
                out.extend((node.lineno, f"vtd_emu.{a.name}") for a in node.names)
            else:
                out.append((node.lineno, target))
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "_specs" not in p.parts)


def test_every_module_has_a_layer() -> None:
    unknown = sorted({_layer_of(_module_name(p)) for p in _modules()} - RANK.keys())
    assert not unknown, f"packages missing from the layer table: {unknown}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    own = _layer_of(_module_name(path))
    if own == "__init__":
        return  # the package's own lazy re-exports may name any layer
    upward = []
    for line, target in _imports(path):
        layer = _layer_of(target)
        if layer in RANK and RANK[layer] > RANK[own]:
            upward.append(f"{path.name}:{line} imports {target} ({layer} is above {own})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_lazy_relative_and_absolute_imports() -> None:
    # The rule must not be vacuous: imports inside functions, relative ones and `from vtd_emu import x`
    # resolve to the modules they name.
    src = ("import numpy\nfrom . import caches\nfrom ..memory import HostRAM\n"
           "def f():\n    from ..host import Host\n    from vtd_emu import trace\n")
    assert _imports_of(src, "vtd_emu.vtd.iommu", False) == [
        (2, "vtd_emu.vtd"), (3, "vtd_emu.memory"), (5, "vtd_emu.host"), (6, "vtd_emu.trace")]
    assert _imports_of("from .loader import specs\n", "vtd_emu.spec", True) == [(1, "vtd_emu.spec.loader")]
