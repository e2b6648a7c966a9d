"""construct-based codecs for spec layouts: the cold path (decode/encode/dump of whole entries).

The hot paths use :class:`~vtd_emu.spec.loader.Field` masks directly; construct is here because it gives
parse/build symmetry, readable ``Container`` dumps and composability (e.g. ``Array(n, construct_for(l))``
for a whole table) for tools and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import construct

if TYPE_CHECKING:
    from vtd_emu.spec.loader import Layout

__all__ = ["LayoutAdapter", "build", "construct_for", "dump", "parse"]


class LayoutAdapter(construct.Adapter):  # type: ignore[misc]
    """``Bytes(size_bits // 8)`` little-endian <-> ``Container`` of every field, reserved ones included.

    Reserved and ignored fields are kept as named values so that ``build(parse(data)) == data`` exactly.
    """

    def __init__(self, layout: Layout) -> None:
        super().__init__(construct.Bytes(layout.size_bits // 8))
        self.layout = layout

    def _decode(self, obj: bytes, context: Any, path: str) -> construct.Container:
        value = int.from_bytes(obj, "little")
        return construct.Container([(f.name, (value & f.mask) >> f.lo) for f in self.layout.fields.values()])

    def _encode(self, obj: Mapping[str, int], context: Any, path: str) -> bytes:
        if not isinstance(obj, Mapping):
            raise ValueError(f"{self.layout.name}: expected a mapping of field values, got {type(obj).__name__}")
        # Containers built by construct may carry bookkeeping keys like "_io"; field names never start with "_".
        value = self.layout.encode(**{k: v for k, v in obj.items() if not k.startswith("_")})
        return value.to_bytes(self.layout.size_bits // 8, "little")


def construct_for(layout: Layout) -> construct.Construct:
    """The (cached) construct object of ``layout``."""
    con = layout._construct
    if con is None:
        con = LayoutAdapter(layout)
        layout._construct = con
    return con


def parse(layout: Layout, data: bytes) -> construct.Container:
    """Decode ``data`` (at least ``size_bits // 8`` bytes, little-endian) into a ``Container``."""
    need = layout.size_bits // 8
    if len(data) < need:
        raise ValueError(f"{layout.name}: need {need} bytes, got {len(data)}")
    return construct_for(layout).parse(bytes(data[:need]))


def build(layout: Layout, fields: Mapping[str, int]) -> bytes:
    """Encode ``fields`` (missing ones are 0) to ``size_bits // 8`` little-endian bytes."""
    return bytes(construct_for(layout).build(dict(fields)))


def dump(layout: Layout, data: bytes) -> str:
    """Multi-line text of every field of ``data``, one ``NAME bits = value`` per line, for debugging."""
    c = parse(layout, data)
    lines = [f"{layout.name} ({layout.size_bits} bits)"]
    for f in layout.fields.values():
        bits = str(f.lo) if f.hi == f.lo else f"{f.hi}:{f.lo}"
        note = f" ({f.kind})" if f.kind in ("reserved", "ignored") else ""
        if f.access == "RsvdZ":
            note = " (RsvdZ)"
        lines.append(f"  {f.name:<14} {bits:>9} = {c[f.name]:#x}{note}")
    return "\n".join(lines)
