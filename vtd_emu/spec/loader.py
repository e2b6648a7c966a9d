"""Load, validate and compile ``specs/*.yaml`` into integer shift/mask tables.

The YAML files are the single description of every register and in-memory structure.  They are checked
completely at load time (every bit covered exactly once, offsets aligned, ...) so that a typo in a spec
fails loudly with the file and YAML path instead of silently mis-decoding guest data.  After loading,
nothing works on strings any more: each field is a :class:`Field` carrying ``lo``/``mask`` ints that the
hot paths use directly.  The construct-based :meth:`Layout.parse`/:meth:`Layout.build` are cold-path
conveniences (see :mod:`vtd_emu.spec.codec`).

The format is documented for users in ``docs/specs.md``.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, TypeVar

import yaml

from vtd_emu.errors import SpecError

if TYPE_CHECKING:
    import construct

__all__ = [
    "ACCESS_TYPES",
    "FAULT_MODES",
    "FEATURES",
    "FaultSpec",
    "Field",
    "KINDS",
    "Layout",
    "Register",
    "Specs",
    "load_specs",
    "specs",
    "specs_dir",
]

_T = TypeVar("_T")

ACCESS_TYPES: tuple[str, ...] = ("RO", "RW", "RW1C", "WO", "RsvdZ")
KINDS: tuple[str, ...] = ("value", "flag", "addr", "reserved", "ignored")
FEATURES: frozenset[str] = frozenset({"SC", "TM", "PDS", "RPS", "RPRIVS"})
"""Names allowed in ``reserved_unless``; the chip decides which are on (see docs/specs.md)."""
FAULT_MODES: tuple[str, ...] = ("legacy", "ir", "scalable")

REGISTERS_FILE = "registers.yaml"
STRUCTURES_FILE = "structures.yaml"
FAULTS_FILE = "faults.yaml"

_REGISTER_SIZES = (32, 64, 128)
_BITS_RE = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*)?$")
_NUM = r"(0[xX][0-9a-fA-F]+|\d+)"
# Only these shapes are accepted; the expression is never evaluated as Python.
_OFFSET_RE = re.compile(rf"^\s*(cap|ecap)\.([A-Za-z][A-Za-z0-9_]*)\s*\*\s*{_NUM}\s*(?:\+\s*{_NUM}\s*)?$")
_COUNT_RE = re.compile(rf"^\s*(cap|ecap)\.([A-Za-z][A-Za-z0-9_]*)\s*(?:\+\s*{_NUM}\s*)?$")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------------------
# Compiled objects


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a register or structure, compiled to ints."""

    name: str
    lo: int
    hi: int
    width: int
    mask: int
    kind: str
    access: str
    reserved_unless: str | None
    doc: str

    def get(self, value: int) -> int:
        """The field's value (right-aligned) taken out of the whole register/structure ``value``."""
        return (value & self.mask) >> self.lo

    def put(self, value: int, field_value: int) -> int:
        """``value`` with this field replaced by ``field_value`` (truncated to the field's width)."""
        return (value & ~self.mask) | ((field_value << self.lo) & self.mask)


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One fault reason (FRCD.FR code)."""

    code: int
    name: str
    id: str
    qualified: bool
    mode: str
    doc: str


class Layout:
    """A bit layout of ``size_bits`` bits: an in-memory structure (and the base of :class:`Register`)."""

    __slots__ = (
        "name",
        "size_bits",
        "doc",
        "fields",
        "file",
        "yaml_path",
        "_visible",
        "_always_reserved",
        "_reserved_unless",
        "_addr_fields",
        "_reserved_cache",
        "_construct",
    )

    def __init__(
        self,
        name: str,
        size_bits: int,
        doc: str,
        fields: Iterable[Field],
        *,
        file: str = "",
        yaml_path: str = "",
    ) -> None:
        self.name = name
        self.size_bits = size_bits
        self.doc = doc
        self.fields: dict[str, Field] = {f.name: f for f in sorted(fields, key=lambda f: f.lo)}
        self.file = file
        self.yaml_path = yaml_path or f"structures.{name}"
        self._visible: tuple[Field, ...] = tuple(f for f in self.fields.values() if not self._hidden(f))
        always = 0
        unless: dict[str, int] = {}
        for f in self.fields.values():
            if self._always_reserved_field(f):
                always |= f.mask
            elif f.reserved_unless is not None:
                unless[f.reserved_unless] = unless.get(f.reserved_unless, 0) | f.mask
        self._always_reserved = always
        self._reserved_unless: tuple[tuple[str, int], ...] = tuple(sorted(unless.items()))
        self._addr_fields: tuple[Field, ...] = tuple(f for f in self.fields.values() if f.kind == "addr")
        self._reserved_cache: dict[tuple[frozenset[str], int | None], int] = {}
        self._construct: construct.Construct | None = None

    # Registers override these two: their reserved bits are RsvdZ fields, not kind "reserved".
    @staticmethod
    def _hidden(f: Field) -> bool:
        return f.kind in ("reserved", "ignored")

    @staticmethod
    def _always_reserved_field(f: Field) -> bool:
        return f.kind == "reserved"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.size_bits} bits, {len(self.fields)} fields)>"

    def field(self, name: str) -> Field:
        """The field called ``name``; :class:`SpecError` naming this layout if there is none."""
        try:
            return self.fields[name]
        except KeyError:
            raise SpecError(
                self.file, f"{self.yaml_path}.fields", f"{self.name} has no field {name!r}"
            ) from None

    def decode(self, value: int) -> dict[str, int]:
        """Every non-reserved, non-ignored field of ``value`` by name (cold path)."""
        return {f.name: (value & f.mask) >> f.lo for f in self._visible}

    def encode(self, **fields: int) -> int:
        """The integer with the named fields set (others 0).  Reserved fields may be named too."""
        value = 0
        for name, field_value in fields.items():
            f = self.fields.get(name)
            if f is None:
                raise ValueError(f"{self.name}: no field {name!r}")
            if not isinstance(field_value, int):
                raise ValueError(f"{self.name}.{name}: expected an int, got {type(field_value).__name__}")
            if field_value < 0 or field_value >> f.width:
                raise ValueError(f"{self.name}.{name}: {field_value:#x} does not fit in {f.width} bits")
            value |= field_value << f.lo
        return value

    def reserved_mask(self, features: frozenset[str] | set[str] = frozenset(), haw: int | None = None) -> int:
        """Absolute mask of bits that must be 0, given the enabled ``features`` and host address width.

        Reserved fields always count; ``reserved_unless`` fields count when their feature is not in
        ``features``; with ``haw``, the bits of every ``addr`` field whose address-bit index (position
        within its qword) is ``>= haw`` count too.  Results are memoised per (features, haw).
        """
        key_features = features if isinstance(features, frozenset) else frozenset(features)
        key = (key_features, haw)
        cached = self._reserved_cache.get(key)
        if cached is not None:
            return cached
        mask = self._always_reserved
        for feature, feature_mask in self._reserved_unless:
            if feature not in key_features:
                mask |= feature_mask
        if haw is not None:
            if not 1 <= haw <= 64:
                raise ValueError(f"haw must be in 1..64, got {haw}")
            for f in self._addr_fields:
                cut = (f.lo & ~63) + haw
                # -(1 << cut) has every bit from ``cut`` upwards set.
                mask |= f.mask & -(1 << cut)
        self._reserved_cache[key] = mask
        return mask

    def qword_masks(self, mask: int) -> tuple[int, ...]:
        """Split an absolute mask into one mask per 64-bit qword (qw0 first)."""
        return tuple((mask >> (64 * q)) & _MASK64 for q in range((self.size_bits + 63) // 64))

    def parse(self, data: bytes) -> construct.Container:
        """Decode little-endian ``data`` into a construct ``Container`` of every field (cold path)."""
        from vtd_emu.spec import codec

        return codec.parse(self, data)

    def build(self, **fields: int) -> bytes:
        """Encode the named fields (others 0) to ``size_bits // 8`` little-endian bytes (cold path)."""
        from vtd_emu.spec import codec

        return codec.build(self, fields)

    def format(self, value: int) -> str:
        """One line of text: every visible field, then ``NAME!=0`` for each reserved field that is set."""
        parts: list[str] = []
        for f in self.fields.values():
            v = (value & f.mask) >> f.lo
            if self._always_reserved_field(f):
                if v:
                    parts.append(f"{f.name}!=0")
            elif not self._hidden(f):
                if f.kind == "addr":
                    parts.append(f"{f.name}={v << (f.lo & 63):#x}")
                elif f.width == 1:
                    parts.append(f"{f.name}={v}")
                else:
                    parts.append(f"{f.name}={v:#x}")
        return " ".join(parts)


class Register(Layout):
    """A memory-mapped register (or an array of them, like FRCD)."""

    __slots__ = ("offset", "offset_expr", "count", "stride", "reset", "_masks", "_offset_ref", "_count_ref")

    def __init__(
        self,
        name: str,
        size_bits: int,
        doc: str,
        fields: Iterable[Field],
        *,
        offset: int | None,
        offset_expr: str | None,
        count: int | str,
        stride: int,
        reset: int | None,
        file: str = "",
    ) -> None:
        super().__init__(name, size_bits, doc, fields, file=file, yaml_path=f"registers.{name}")
        self.offset = offset
        self.offset_expr = offset_expr
        self.count = count
        self.stride = stride
        self.reset = reset
        masks = dict.fromkeys(ACCESS_TYPES, 0)
        for f in self.fields.values():
            masks[f.access] |= f.mask
        self._masks = masks
        # (use ECAP?, source field, multiplier, addend); bound by Specs once CAP/ECAP are known.
        self._offset_ref: tuple[bool, Field, int, int] | None = None
        self._count_ref: tuple[bool, Field, int] | None = None

    @staticmethod
    def _hidden(f: Field) -> bool:
        return f.access == "RsvdZ"

    @staticmethod
    def _always_reserved_field(f: Field) -> bool:
        return f.access == "RsvdZ"

    def resolve_offset(self, cap: int, ecap: int) -> int:
        """MMIO offset of the register (of element 0 for arrays) for the given CAP/ECAP values."""
        if self.offset is not None:
            return self.offset
        assert self._offset_ref is not None, "offset expression not bound (Specs was not built)"
        use_ecap, f, mul, add = self._offset_ref
        return (((ecap if use_ecap else cap) & f.mask) >> f.lo) * mul + add

    def resolve_count(self, cap: int, ecap: int) -> int:
        """Number of elements (1 for plain registers) for the given CAP/ECAP values."""
        if isinstance(self.count, int):
            return self.count
        assert self._count_ref is not None, "count expression not bound (Specs was not built)"
        use_ecap, f, add = self._count_ref
        return (((ecap if use_ecap else cap) & f.mask) >> f.lo) + add

    def masks(self) -> dict[str, int]:
        """Per access type, the OR of the masks of the fields with that access (a fresh dict)."""
        return dict(self._masks)


class Specs:
    """Every register, structure and fault reason of one spec directory."""

    __slots__ = ("directory", "registers", "structures", "faults", "_faults_by_name")

    def __init__(
        self,
        directory: Path,
        registers: dict[str, Register],
        structures: dict[str, Layout],
        faults: dict[int, FaultSpec],
    ) -> None:
        self.directory = directory
        self.registers = registers
        self.structures = structures
        self.faults = faults
        self._faults_by_name = {f.name: f for f in faults.values()}

    def __repr__(self) -> str:
        return (
            f"<Specs {self.directory}: {len(self.registers)} registers, "
            f"{len(self.structures)} structures, {len(self.faults)} faults>"
        )

    def _named(self, table: Mapping[str, _T], file: str, section: str, what: str, name: str) -> _T:
        try:
            return table[name]
        except KeyError:
            raise SpecError(str(self.directory / file), section, f"no {what} named {name!r}") from None

    def register(self, name: str) -> Register:
        return self._named(self.registers, REGISTERS_FILE, "registers", "register", name)

    def structure(self, name: str) -> Layout:
        return self._named(self.structures, STRUCTURES_FILE, "structures", "structure", name)

    def fault_by_name(self, name: str) -> FaultSpec:
        return self._named(self._faults_by_name, FAULTS_FILE, "faults", "fault", name)

    def register_map(self, cap: int, ecap: int) -> list[tuple[int, Register, int]]:
        """``(offset, register, index)`` for every register element, sorted by offset.

        Array registers (FRCD) appear once per element; registers placed by CAP/ECAP (IVA, IOTLB, FRCD)
        at the offsets those values give.
        """
        out: list[tuple[int, Register, int]] = []
        for reg in self.registers.values():
            base = reg.resolve_offset(cap, ecap)
            for i in range(reg.resolve_count(cap, ecap)):
                out.append((base + i * reg.stride, reg, i))
        out.sort(key=lambda t: t[0])
        return out


# ------------------------------------------------------------------------------------------------
# YAML reading


_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """Safe loader that rejects duplicate mapping keys (plain YAML keeps the last one silently)."""


def _construct_mapping_unique(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=False)  # type: ignore[no-untyped-call]
        try:
            hashable = hash(key) is not None
        except TypeError:
            hashable = False
        if hashable and key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark,
            )
        if hashable:
            seen[key] = key_node
    # SafeConstructor.construct_mapping resolves "<<" merge keys itself.
    return loader.construct_mapping(node, deep=True)  # type: ignore[no-untyped-call]


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_unique)


def _read_yaml(path: Path) -> Any:
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file, "(file)", "file not found") from None
    except OSError as exc:
        raise SpecError(file, "(file)", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(file, f"byte {exc.start}", "not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise SpecError(file, where, f"not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(file, "(file)", f"not valid YAML: {exc}") from None


# ------------------------------------------------------------------------------------------------
# Validation helpers


def _fmt_bits(hi: int, lo: int) -> str:
    return str(lo) if hi == lo else f"{hi}:{lo}"


def _bits_phrase(hi: int, lo: int) -> str:
    return f"bit {lo}" if hi == lo else f"bits {hi}:{lo}"


def _expect_mapping(value: Any, file: str, path: str, what: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise SpecError(file, path, f"expected {what} (a mapping), got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_keys(
    data: Mapping[Any, Any], file: str, path: str, required: Iterable[str], optional: Iterable[str]
) -> None:
    required = tuple(required)
    allowed = set(required) | set(optional)
    for key in data:
        if key not in allowed:
            raise SpecError(
                file, _join(path, key), f"unknown key {key!r}; expected one of {', '.join(sorted(allowed))}"
            )
    for key in required:
        if key not in data:
            raise SpecError(file, _join(path, key), f"missing required key {key!r}")


def _check_name(name: Any, file: str, path: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpecError(
            file, path, f"bad name {name!r}: expected letters, digits and '_', starting with a letter"
        )
    return name


def _int(value: Any, file: str, path: str, what: str, *, minimum: int = 0) -> int:
    # bool is an int subclass; YAML "true" where a number belongs is a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(file, path, f"expected {what} (an integer), got {_describe(value)}")
    if value < minimum:
        raise SpecError(file, path, f"expected {what} >= {minimum}, got {value}")
    return value


def _str(value: Any, file: str, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SpecError(file, path, f"expected a string, got {_describe(value)}")
    return value


def _parse_bits(raw: Any, file: str, path: str) -> tuple[int, int]:
    """``N`` or ``"HI:LO"`` -> (hi, lo)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw < 0:
            raise SpecError(file, path, f"bit number must be >= 0, got {raw}")
        return raw, raw
    if isinstance(raw, str):
        m = _BITS_RE.match(raw)
        if m:
            hi = int(m.group(1))
            lo = int(m.group(2)) if m.group(2) is not None else hi
            if hi < lo:
                raise SpecError(file, path, f"bits {raw!r}: HI must be >= LO (write \"{lo}:{hi}\")")
            return hi, lo
    raise SpecError(file, path, f'expected a bit number N or a string "HI:LO", got {_describe(raw)}')


def _parse_num(text: str) -> int:
    return int(text, 0)


def _compile_fields(
    raw: Any, size: int, file: str, path: str, *, register: bool
) -> list[Field]:
    fields_path = f"{path}.fields"
    raw_fields = _expect_mapping(raw, file, fields_path, "the fields")
    if not raw_fields:
        raise SpecError(file, fields_path, "expected at least one field")
    fields: list[Field] = []
    for name, spec in raw_fields.items():
        fpath = f"{fields_path}.{name}"
        _check_name(name, file, fpath)
        spec = _expect_mapping(spec, file, fpath, "a field")
        if register:
            _check_keys(spec, file, fpath, ("bits", "access"), ("doc",))
        else:
            _check_keys(spec, file, fpath, ("bits",), ("kind", "reserved_unless", "doc"))
        hi, lo = _parse_bits(spec["bits"], file, f"{fpath}.bits")
        if hi >= size:
            raise SpecError(
                file,
                f"{fpath}.bits",
                f"{_bits_phrase(hi, lo)} outside the {size}-bit layout (expected bits {size - 1}:0 at most)",
            )
        width = hi - lo + 1
        doc = _str(spec.get("doc"), file, f"{fpath}.doc")
        reserved_unless: str | None = None
        if register:
            access = spec["access"]
            if access not in ACCESS_TYPES:
                raise SpecError(
                    file, f"{fpath}.access", f"unknown access {access!r}; expected one of {', '.join(ACCESS_TYPES)}"
                )
            kind = "flag" if width == 1 else "value"
        else:
            access = ""
            kind = spec.get("kind", "flag" if width == 1 else "value")
            if kind not in KINDS:
                raise SpecError(file, f"{fpath}.kind", f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
            if kind == "flag" and width != 1:
                raise SpecError(file, f"{fpath}.kind", f"kind flag needs exactly one bit, {name} has {width}")
            if kind == "addr" and lo // 64 != hi // 64:
                raise SpecError(
                    file,
                    f"{fpath}.bits",
                    f"an addr field must lie within one 64-bit qword, {_fmt_bits(hi, lo)} does not",
                )
            if "reserved_unless" in spec:
                reserved_unless = spec["reserved_unless"]
                if not isinstance(reserved_unless, str) or reserved_unless not in FEATURES:
                    raise SpecError(
                        file,
                        f"{fpath}.reserved_unless",
                        f"unknown feature {reserved_unless!r}; expected one of {', '.join(sorted(FEATURES))}",
                    )
                if kind in ("reserved", "ignored"):
                    raise SpecError(
                        file, f"{fpath}.reserved_unless", f"reserved_unless makes no sense on a {kind} field"
                    )
        mask = ((1 << width) - 1) << lo
        fields.append(Field(name, lo, hi, width, mask, kind, access, reserved_unless, doc))

    # Coverage: sorted by lo, each field must start right after the previous one ends.
    ordered = sorted(fields, key=lambda f: (f.lo, f.hi))
    gaps: list[str] = []
    next_bit = 0
    prev: Field | None = None
    for f in ordered:
        if prev is not None and f.lo <= prev.hi:
            raise SpecError(
                file,
                f"{fields_path}.{f.name}.bits",
                f"{f.name} ({_bits_phrase(f.hi, f.lo)}) overlaps {prev.name} ({_bits_phrase(prev.hi, prev.lo)})",
            )
        if f.lo > next_bit:
            gaps.append(_bits_phrase(f.lo - 1, next_bit))
        next_bit = f.hi + 1
        prev = f
    if next_bit < size:
        gaps.append(_bits_phrase(size - 1, next_bit))
    if gaps:
        raise SpecError(
            file,
            fields_path,
            f"{', '.join(gaps)} {'is' if len(gaps) == 1 and gaps[0].startswith('bit ') else 'are'} not covered"
            f" by any field (every bit needs exactly one field; use a"
            f" {'RsvdZ' if register else 'reserved or ignored'} field)",
        )
    return fields


# ------------------------------------------------------------------------------------------------
# Per-file loaders


def _top_level(data: Any, file: str, key: str) -> Any:
    if data is None:
        raise SpecError(file, "(top level)", f"file is empty; expected a mapping with the key {key!r}")
    top = _expect_mapping(data, file, "(top level)", f"a mapping with the key {key!r}")
    _check_keys(top, file, "", (key,), ())
    return top[key]


def _load_registers(path: Path) -> dict[str, Register]:
    file = str(path)
    raw = _expect_mapping(_top_level(_read_yaml(path), file, "registers"), file, "registers", "the registers")
    registers: dict[str, Register] = {}
    for name, spec in raw.items():
        rpath = f"registers.{name}"
        _check_name(name, file, rpath)
        spec = _expect_mapping(spec, file, rpath, "a register")
        _check_keys(spec, file, rpath, ("offset", "size", "reset", "fields"), ("doc", "count", "stride"))
        size = spec["size"]
        if isinstance(size, bool) or size not in _REGISTER_SIZES:
            raise SpecError(file, f"{rpath}.size", f"expected 32, 64 or 128, got {_describe(size)}")
        align = 4 if size == 32 else 8

        offset: int | None = None
        offset_expr: str | None = None
        raw_offset = spec["offset"]
        if isinstance(raw_offset, str):
            m = _OFFSET_RE.match(raw_offset)
            if not m:
                raise SpecError(
                    file,
                    f"{rpath}.offset",
                    f"bad offset expression {raw_offset!r}; expected an integer or"
                    " 'cap.FIELD*N' / 'ecap.FIELD*N+M'",
                )
            mul = _parse_num(m.group(3))
            add = _parse_num(m.group(4)) if m.group(4) else 0
            if mul % align or add % align:
                raise SpecError(
                    file,
                    f"{rpath}.offset",
                    f"{raw_offset!r} is not always {align}-byte aligned for a {size}-bit register",
                )
            offset_expr = raw_offset.strip()
        else:
            offset = _int(raw_offset, file, f"{rpath}.offset", "an offset")
            if offset % align:
                raise SpecError(
                    file, f"{rpath}.offset", f"offset {offset:#x} is not {align}-byte aligned (a {size}-bit register)"
                )

        count: int | str = 1
        if "count" in spec:
            raw_count = spec["count"]
            if isinstance(raw_count, str):
                if not _COUNT_RE.match(raw_count):
                    raise SpecError(
                        file,
                        f"{rpath}.count",
                        f"bad count expression {raw_count!r}; expected 'cap.FIELD' or 'cap.FIELD+N'",
                    )
                count = raw_count.strip()
            else:
                count = _int(raw_count, file, f"{rpath}.count", "a count", minimum=1)
        stride = size // 8
        if "stride" in spec:
            stride = _int(spec["stride"], file, f"{rpath}.stride", "a stride", minimum=size // 8)
            if stride % align:
                raise SpecError(file, f"{rpath}.stride", f"stride {stride} is not {align}-byte aligned")

        fields = _compile_fields(spec["fields"], size, file, rpath, register=True)
        rsvdz = 0
        for f in fields:
            if f.access == "RsvdZ":
                rsvdz |= f.mask

        reset: int | None
        raw_reset = spec["reset"]
        if raw_reset == "config":
            reset = None
        else:
            if isinstance(raw_reset, str):
                raise SpecError(file, f"{rpath}.reset", f"expected an integer or 'config', got {raw_reset!r}")
            reset = _int(raw_reset, file, f"{rpath}.reset", "a reset value or 'config'")
            if reset >> size:
                raise SpecError(file, f"{rpath}.reset", f"reset {reset:#x} is wider than {size} bits")
            if reset & rsvdz:
                bad = [f.name for f in fields if f.access == "RsvdZ" and reset & f.mask]
                raise SpecError(
                    file, f"{rpath}.reset", f"reset {reset:#x} sets bits of RsvdZ field(s) {', '.join(bad)}"
                )

        registers[name] = Register(
            name,
            size,
            _str(spec.get("doc"), file, f"{rpath}.doc"),
            fields,
            offset=offset,
            offset_expr=offset_expr,
            count=count,
            stride=stride,
            reset=reset,
            file=file,
        )
    _bind_expressions(registers, file)
    _check_fixed_overlaps(registers, file)
    return registers


def _bind_expressions(registers: dict[str, Register], file: str) -> None:
    def source(reg_name: str, src: str, field_name: str, path: str) -> tuple[bool, Field]:
        target = registers.get(src.upper())
        if target is None:
            raise SpecError(file, path, f"{src}.{field_name}: there is no {src.upper()} register")
        f = target.fields.get(field_name)
        if f is None:
            raise SpecError(file, path, f"{src}.{field_name}: register {src.upper()} has no field {field_name}")
        if target.offset_expr is not None or not isinstance(target.count, int):
            raise SpecError(file, path, f"{src.upper()} must have a fixed offset to be used in an expression")
        return src == "ecap", f

    for reg in registers.values():
        if reg.offset_expr is not None:
            m = _OFFSET_RE.match(reg.offset_expr)
            assert m is not None
            use_ecap, f = source(reg.name, m.group(1), m.group(2), f"registers.{reg.name}.offset")
            reg._offset_ref = (use_ecap, f, _parse_num(m.group(3)), _parse_num(m.group(4)) if m.group(4) else 0)
        if isinstance(reg.count, str):
            m = _COUNT_RE.match(reg.count)
            assert m is not None
            use_ecap, f = source(reg.name, m.group(1), m.group(2), f"registers.{reg.name}.count")
            reg._count_ref = (use_ecap, f, _parse_num(m.group(3)) if m.group(3) else 0)


def _check_fixed_overlaps(registers: dict[str, Register], file: str) -> None:
    extents: list[tuple[int, int, Register]] = []
    for reg in registers.values():
        if reg.offset is None or not isinstance(reg.count, int):
            continue
        end = reg.offset + (reg.count - 1) * reg.stride + reg.size_bits // 8
        extents.append((reg.offset, end, reg))
    extents.sort(key=lambda e: (e[0], e[1]))
    for (a_start, a_end, a), (b_start, b_end, b) in zip(extents, extents[1:]):
        if b_start < a_end:
            raise SpecError(
                file,
                f"registers.{b.name}.offset",
                f"{b.name} ({b_start:#x}-{b_end - 1:#x}) overlaps {a.name} ({a_start:#x}-{a_end - 1:#x})",
            )


def _load_structures(path: Path) -> dict[str, Layout]:
    file = str(path)
    raw = _expect_mapping(_top_level(_read_yaml(path), file, "structures"), file, "structures", "the structures")
    structures: dict[str, Layout] = {}
    for name, spec in raw.items():
        spath = f"structures.{name}"
        _check_name(name, file, spath)
        spec = _expect_mapping(spec, file, spath, "a structure")
        _check_keys(spec, file, spath, ("size", "fields"), ("doc",))
        size = _int(spec["size"], file, f"{spath}.size", "a size in bits", minimum=8)
        if size % 8:
            raise SpecError(file, f"{spath}.size", f"size must be a whole number of bytes, got {size} bits")
        fields = _compile_fields(spec["fields"], size, file, spath, register=False)
        structures[name] = Layout(
            name, size, _str(spec.get("doc"), file, f"{spath}.doc"), fields, file=file, yaml_path=spath
        )
    return structures


def _load_faults(path: Path) -> dict[int, FaultSpec]:
    file = str(path)
    raw = _top_level(_read_yaml(path), file, "faults")
    if not isinstance(raw, list):
        raise SpecError(file, "faults", f"expected a list of faults, got {_describe(raw)}")
    faults: dict[int, FaultSpec] = {}
    where_code: dict[int, int] = {}
    where_name: dict[str, int] = {}
    for i, spec in enumerate(raw):
        fpath = f"faults[{i}]"
        spec = _expect_mapping(spec, file, fpath, "a fault")
        _check_keys(spec, file, fpath, ("code", "name", "id", "qualified", "mode"), ("doc",))
        code = _int(spec["code"], file, f"{fpath}.code", "a fault code")
        if code > 0xFF:
            raise SpecError(file, f"{fpath}.code", f"fault code {code:#x} does not fit FRCD.FR (8 bits)")
        name = _check_name(spec["name"], file, f"{fpath}.name")
        fid = spec["id"]
        if not isinstance(fid, str) or not fid:
            raise SpecError(file, f"{fpath}.id", f"expected an identifier string like 'LRT.2', got {_describe(fid)}")
        qualified = spec["qualified"]
        if not isinstance(qualified, bool):
            raise SpecError(file, f"{fpath}.qualified", f"expected true or false, got {_describe(qualified)}")
        mode = spec["mode"]
        if mode not in FAULT_MODES:
            raise SpecError(file, f"{fpath}.mode", f"unknown mode {mode!r}; expected one of {', '.join(FAULT_MODES)}")
        if code in where_code:
            raise SpecError(
                file, f"{fpath}.code", f"duplicate fault code {code:#x} (also faults[{where_code[code]}])"
            )
        if name in where_name:
            raise SpecError(file, f"{fpath}.name", f"duplicate fault name {name} (also faults[{where_name[name]}])")
        where_code[code] = i
        where_name[name] = i
        faults[code] = FaultSpec(code, name, fid, qualified, mode, _str(spec.get("doc"), file, f"{fpath}.doc"))
    return faults


# ------------------------------------------------------------------------------------------------
# Entry points


def specs_dir() -> Path:
    """Where the default specs live: ``$VTD_EMU_SPECS``, else the wheel's ``vtd_emu/_specs``, else the
    source checkout's ``specs/``."""
    env = os.environ.get("VTD_EMU_SPECS")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent.parent  # the vtd_emu package directory
    bundled = package / "_specs"
    if bundled.is_dir():
        return bundled
    return package.parent / "specs"


def load_specs(directory: str | Path | None = None) -> Specs:
    """Load and validate ``registers.yaml``, ``structures.yaml`` and ``faults.yaml`` from ``directory``."""
    root = Path(directory) if directory is not None else specs_dir()
    return Specs(
        root,
        _load_registers(root / REGISTERS_FILE),
        _load_structures(root / STRUCTURES_FILE),
        _load_faults(root / FAULTS_FILE),
    )


@functools.lru_cache(maxsize=1)
def specs() -> Specs:
    """The default specs, loaded once per process."""
    return load_specs()
