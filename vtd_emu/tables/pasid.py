"""Scalable-mode PASID directories and tables."""

from __future__ import annotations

from ._common import PAGE_4K, _layout, _Mem, _ptr, _size_bytes, _store
from .alloc import PageAllocator

# PASID-entry PGTT encodings (structures.yaml, pasid_entry.PGTT).
PGTT_FS, PGTT_SS, PGTT_NESTED, PGTT_PT = 1, 2, 3, 4


class PasidTables:
    """A PASID directory of ``dir_entries`` (2**(pdts+7)) entries, each pointing at a 64-entry PASID table
    allocated on first use."""

    TABLE_ENTRIES = 64

    def __init__(self, mem: _Mem, alloc: PageAllocator, dir_entries: int = 128) -> None:
        if dir_entries < 128 or dir_entries > 1 << 14 or dir_entries & (dir_entries - 1):
            raise ValueError(f"dir_entries {dir_entries} is not a power of two in 128..16384")
        self.mem = mem
        self.alloc = alloc
        self._dir = _layout("pasid_dir_entry")
        self._entry = _layout("pasid_entry")
        self.dir_entries = dir_entries
        self.pdts: int = dir_entries.bit_length() - 1 - 7
        dir_bytes = dir_entries * _size_bytes(self._dir)
        self.dir: int = alloc.alloc(max(1, -(-dir_bytes // PAGE_4K)))
        # directory index → PASID table address.
        self.tables: dict[int, int] = {}

    def _dir_index(self, pasid: int) -> int:
        if not 0 <= pasid < 1 << 20:
            raise ValueError(f"PASID {pasid:#x} is not a 20-bit value")
        index = pasid >> 6
        if index >= self.dir_entries:
            raise ValueError(f"PASID {pasid:#x} is beyond a {self.dir_entries}-entry directory")
        return index

    def dir_entry_addr(self, pasid: int) -> int:
        return self.dir + self._dir_index(pasid) * _size_bytes(self._dir)

    def entry_addr(self, pasid: int) -> int | None:
        """Address of the PASID entry, None while its PASID table does not exist."""
        table = self.tables.get(self._dir_index(pasid))
        return None if table is None else table + (pasid & 63) * _size_bytes(self._entry)

    def set_dir_entry(self, pasid: int, *, present: bool = True, fpd: bool = False) -> int:
        """Rewrite the directory entry covering ``pasid`` (allocating its table); returns its address."""
        index = self._dir_index(pasid)
        table = self.tables.get(index)
        if table is None:
            table = self.alloc.alloc()
            self.tables[index] = table
        value = self._dir.encode(P=int(present), FPD=int(fpd), SMPTBLPTR=_ptr(self._dir, "SMPTBLPTR", table))
        addr = self.dir_entry_addr(pasid)
        _store(self.mem, addr, value, _size_bytes(self._dir))
        return addr

    def set_entry(
        self,
        pasid: int,
        *,
        pgtt: int,
        did: int,
        ssptptr: int = 0,
        aw: int = 2,
        fsptptr: int = 0,
        fspm: int = 0,
        sre: bool = False,
        wpe: bool = False,
        eafe: bool = False,
        ssade: bool = False,
        ssee: bool = False,
        ere: bool = False,
        nxe: bool = False,
        fpd: bool = False,
        present: bool = True,
        dir_fpd: bool = False,
        extra: dict[str, int] | None = None,
    ) -> int:
        """Write the PASID entry; returns its address.

        The directory entry is rewritten too (P=1, FPD=``dir_fpd``).  ``extra`` maps further spec field
        names (e.g. ``PWSNP``, ``PAT``) to values and overrides the named arguments.
        """
        fields: dict[str, int] = {
            "P": int(present),
            "FPD": int(fpd),
            "AW": aw,
            "SSEE": int(ssee),
            "PGTT": pgtt,
            "SSADE": int(ssade),
            "SSPTPTR": _ptr(self._entry, "SSPTPTR", ssptptr),
            "DID": did,
            "SRE": int(sre),
            "ERE": int(ere),
            "FSPM": fspm,
            "WPE": int(wpe),
            "NXE": int(nxe),
            "EAFE": int(eafe),
            "FSPTPTR": _ptr(self._entry, "FSPTPTR", fsptptr),
        }
        if extra:
            fields.update(extra)
        value = self._entry.encode(**fields)
        self.set_dir_entry(pasid, present=True, fpd=dir_fpd)
        addr = self.entry_addr(pasid)
        assert addr is not None
        _store(self.mem, addr, value, _size_bytes(self._entry))
        return addr

    def clear_entry(self, pasid: int) -> None:
        addr = self.entry_addr(pasid)
        if addr is not None:
            _store(self.mem, addr, 0, _size_bytes(self._entry))

