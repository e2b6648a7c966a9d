"""Root and context tables, legacy and scalable mode."""

from __future__ import annotations

from typing import Any, ClassVar

from ._common import _check_extra, _layout, _load, _Mem, _ptr, _size_bytes, _store
from .alloc import PageAllocator


def _check_bdf(bus: int, devfn: int | None = None) -> None:
    if not 0 <= bus <= 255:
        raise ValueError(f"bus {bus} is not 0..255")
    if devfn is not None and not 0 <= devfn <= 255:
        raise ValueError(f"devfn {devfn} is not 0..255")


class _RootTable:
    """What legacy and scalable root tables share: context tables are allocated on first use, keyed by
    :meth:`_key`, each holding ``_TABLE_SLOTS`` context entries."""

    _ROOT_LAYOUT: ClassVar[str]
    _CTX_LAYOUT: ClassVar[str]
    _TABLE_SLOTS: ClassVar[int]
    context_tables: dict[Any, int]

    def __init__(self, mem: _Mem, alloc: PageAllocator) -> None:
        self.mem = mem
        self.alloc = alloc
        self._root = _layout(self._ROOT_LAYOUT)
        self._ctx = _layout(self._CTX_LAYOUT)
        self.root: int = alloc.alloc()
        self.context_tables = {}

    def _key(self, bus: int, devfn: int) -> Any:
        raise NotImplementedError

    def _write_root(self, key: Any, present: bool) -> None:
        raise NotImplementedError

    def root_entry_addr(self, bus: int) -> int:
        _check_bdf(bus)
        return self.root + bus * _size_bytes(self._root)

    def context_entry_addr(self, bus: int, devfn: int) -> int | None:
        """Address of the context entry, None while the context table covering it does not exist."""
        _check_bdf(bus, devfn)
        table = self.context_tables.get(self._key(bus, devfn))
        return None if table is None else table + (devfn % self._TABLE_SLOTS) * _size_bytes(self._ctx)

    def _context_table(self, key: Any) -> int:
        table = self.context_tables.get(key)
        if table is None:
            table = self.alloc.alloc()
            self.context_tables[key] = table
            self._write_root(key, True)
        return table

    def _put_context(self, bus: int, devfn: int, value: int) -> int:
        self._context_table(self._key(bus, devfn))
        addr = self.context_entry_addr(bus, devfn)
        assert addr is not None
        _store(self.mem, addr, value, _size_bytes(self._ctx))
        return addr

    def clear_context(self, bus: int, devfn: int) -> None:
        addr = self.context_entry_addr(bus, devfn)
        if addr is not None:
            _store(self.mem, addr, 0, _size_bytes(self._ctx))


class LegacyRootTable(_RootTable):
    """A legacy-mode root table (256 × 16 B) with 256-entry context tables allocated per bus."""

    _ROOT_LAYOUT = "legacy_root_entry"
    _CTX_LAYOUT = "legacy_context_entry"
    _TABLE_SLOTS = 256
    # bus → context table address.
    context_tables: dict[int, int]

    def _key(self, bus: int, devfn: int) -> int:
        return bus

    def _write_root(self, key: int, present: bool) -> None:
        value = self._root.encode(P=int(present), CTP=_ptr(self._root, "CTP", self.context_tables[key]))
        _store(self.mem, self.root_entry_addr(key), value, _size_bytes(self._root))

    def set_root_present(self, bus: int, present: bool) -> None:
        """Set or clear the root entry's P (allocating an empty context table if the bus has none)."""
        _check_bdf(bus)
        self._context_table(bus)
        self._write_root(bus, present)

    def set_context(
        self,
        bus: int,
        devfn: int,
        *,
        slptptr: int = 0,
        aw: int = 2,
        did: int = 1,
        tt: int = 0,
        fpd: bool = False,
        present: bool = True,
        extra: int = 0,
    ) -> int:
        """Write the context entry (``extra`` ORed in raw); returns its address."""
        _check_bdf(bus, devfn)
        _check_extra(extra, self._ctx, "set_context")
        value = self._ctx.encode(
            P=int(present), FPD=int(fpd), TT=tt, SLPTPTR=_ptr(self._ctx, "SLPTPTR", slptptr), AW=aw, DID=did
        )
        return self._put_context(bus, devfn, value | extra)


class ScalableRootTable(_RootTable):
    """A scalable-mode root table: each bus has a lower (devfn 0–127) and an upper (128–255) context table
    of 128 × 32 B, allocated on first use."""

    _ROOT_LAYOUT = "sm_root_entry"
    _CTX_LAYOUT = "sm_context_entry"
    _TABLE_SLOTS = 128
    # (bus, upper half?) → context table address.
    context_tables: dict[tuple[int, bool], int]

    def _key(self, bus: int, devfn: int) -> tuple[int, bool]:
        return (bus, devfn >= 128)

    def _write_root(self, key: tuple[int, bool], present: bool) -> None:
        # Read-modify-write: the other half of the root entry belongs to the other 128 devfns.
        bus, upper = key
        addr = self.root_entry_addr(bus)
        n = _size_bytes(self._root)
        value = _load(self.mem, addr, n)
        p_name, ctp_name = ("UP", "UCTP") if upper else ("LP", "LCTP")
        value = self._root.field(p_name).put(value, int(present))
        ctp = _ptr(self._root, ctp_name, self.context_tables[key])
        value = self._root.field(ctp_name).put(value, ctp)
        _store(self.mem, addr, value, n)

    def set_root_present(self, bus: int, present: bool, *, upper: bool = False) -> None:
        """Set or clear LP (or UP), allocating an empty context table for that half if needed."""
        _check_bdf(bus)
        self._context_table((bus, upper))
        self._write_root((bus, upper), present)

    def set_context(
        self,
        bus: int,
        devfn: int,
        *,
        pasid_dir: int,
        pdts: int = 0,
        rid_pasid: int = 0,
        paside: bool = True,
        pre: bool = False,
        dte: bool = False,
        fpd: bool = False,
        present: bool = True,
        extra: int = 0,
    ) -> int:
        """Write the scalable-mode context entry (``extra`` ORed in raw); returns its address."""
        _check_bdf(bus, devfn)
        _check_extra(extra, self._ctx, "set_context")
        value = self._ctx.encode(
            P=int(present),
            FPD=int(fpd),
            DTE=int(dte),
            PASIDE=int(paside),
            PRE=int(pre),
            PDTS=pdts,
            PASIDDIRPTR=_ptr(self._ctx, "PASIDDIRPTR", pasid_dir),
            RID_PASID=rid_pasid,
        )
        return self._put_context(bus, devfn, value | extra)

