"""Named constants generated from ``specs/*.yaml``: the one source of bit and fault-reason numbers.

Every register of ``registers.yaml`` is an attribute in upper case (``GCMD``, ``FSTS``, ``CCMD``), every
structure of ``structures.yaml`` one in upper case too (``PASID_ENTRY``, ``FS_PTE``), and each is a
:class:`Bits` namespace of its fields::

    from vtd_emu.spec.consts import GCMD, FR
    GCMD.TE          # the field's mask, in place (1 << 31)
    GCMD.TE_LO       # its lowest bit (31)
    CCMD.DID_MAX     # its largest value, right-aligned (0xFFFF)
    FR.ROOT_ENTRY_P  # fault reason code (0x01) by its faults.yaml name

Masks of fields above bit 63 of a multi-qword structure are in place in the whole structure value (a
PASID entry's ``FSPTPTR`` is bit 140 and up).  ``Bits.qword(name)`` gives ``(qword index, mask)``
for the hot paths that read qwords one at a time.

Hot paths bind what they need at module level (``TE = GCMD.TE``): a module global is as fast as a
literal.  Nothing is loaded until the first attribute is asked for, so ``import vtd_emu.spec.consts``
alone never reads YAML.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vtd_emu.spec.loader import Layout, specs

if TYPE_CHECKING:
    from vtd_emu.spec.loader import Specs


class Bits:
    """The fields of one register or structure as int attributes (``NAME``, ``NAME_LO``, ``NAME_MAX``)."""

    def __init__(self, layout: Layout) -> None:
        self._name = layout.name
        self._qwords: dict[str, tuple[int, int]] = {}
        for f in layout.fields.values():
            setattr(self, f.name, f.mask)
            setattr(self, f.name + "_LO", f.lo)
            setattr(self, f.name + "_MAX", (1 << f.width) - 1)
            if f.lo // 64 == f.hi // 64:
                self._qwords[f.name] = (f.lo // 64, f.mask >> (64 * (f.lo // 64)))

    def qword(self, name: str) -> tuple[int, int]:
        """``(qword index, mask within that qword)`` of a field that does not straddle a qword."""
        try:
            return self._qwords[name]
        except KeyError:
            raise AttributeError(f"{self._name} has no single-qword field {name!r}") from None

    def __getattr__(self, name: str) -> int:  # only reached for names the layout does not have
        raise AttributeError(f"{self._name} has no field {name!r}")

    def __repr__(self) -> str:
        return f"<Bits of {self._name}>"


class Reasons:
    """Fault reason codes by their ``faults.yaml`` names (plain ints: hot paths compare and OR them)."""

    def __init__(self, spec: Specs) -> None:
        for code, f in spec.faults.items():
            setattr(self, f.name, code)

    def __getattr__(self, name: str) -> int:
        raise AttributeError(f"faults.yaml has no fault named {name!r}")


_table: dict[str, Bits | Reasons] = {}


def _build() -> dict[str, Bits | Reasons]:
    if not _table:
        spec = specs()
        table: dict[str, Bits | Reasons] = {name.upper(): Bits(layout) for name, layout in spec.structures.items()}
        table.update((name.upper(), Bits(reg)) for name, reg in spec.registers.items())
        table["FR"] = Reasons(spec)
        _table.update(table)
    return _table


def __getattr__(name: str) -> Bits:
    try:
        return _build()[name]  # type: ignore[return-value]
    except KeyError:
        raise AttributeError(f"no register or structure named {name!r} in the specs") from None


if TYPE_CHECKING:
    FR: Reasons
