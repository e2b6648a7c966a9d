"""Root, context and PASID structure decode (QEMU's ``vtd_ce_*`` / ``vtd_pe_*``), through the context
and PASID caches.

Decoders return a decoded entry (:mod:`.entries`) or a fault int (``reason | FPD << FPD_SHIFT``); with a
``trace`` list they bypass the caches and append every structure they read, for inspection.
"""

from __future__ import annotations

from ..spec.consts import FR
from .entries import (CTX_LEGACY, CTX_SM, FPD_SHIFT, PGTT_FS, PGTT_NESTED, PGTT_SS, TT_DEV_TLB, TT_PT, Context,
                      LegacyContext, PasidEntry, ScalableContext)
from .state import ChipState
from .walk import F_EAFE, F_ERE, F_NXE, F_SMEP, F_SRE, F_WPE

_ROOT_TABLE_INV, _ROOT_ENTRY_P, _ROOT_ENTRY_RSVD = FR.ROOT_TABLE_INV, FR.ROOT_ENTRY_P, FR.ROOT_ENTRY_RSVD
_CONTEXT_TABLE_INV, _CONTEXT_ENTRY_P = FR.CONTEXT_TABLE_INV, FR.CONTEXT_ENTRY_P
_CONTEXT_ENTRY_RSVD, _CONTEXT_ENTRY_INV = FR.CONTEXT_ENTRY_RSVD, FR.CONTEXT_ENTRY_INV
_SM_ROOT_READ_ERR, _SM_ROOT_ENTRY_P, _SM_ROOT_ENTRY_RSVD = FR.SM_ROOT_READ_ERR, FR.SM_ROOT_ENTRY_P, FR.SM_ROOT_ENTRY_RSVD
_SM_CONTEXT_READ_ERR, _SM_CONTEXT_ENTRY_P = FR.SM_CONTEXT_READ_ERR, FR.SM_CONTEXT_ENTRY_P
_SM_CONTEXT_ENTRY_RSVD = FR.SM_CONTEXT_ENTRY_RSVD
_SM_PASID_BEYOND_PDTS, _SM_PASID_DIR_READ_ERR = FR.SM_PASID_BEYOND_PDTS, FR.SM_PASID_DIR_READ_ERR
_SM_PASID_DIR_ENTRY_P, _SM_PASID_DIR_ENTRY_RSVD = FR.SM_PASID_DIR_ENTRY_P, FR.SM_PASID_DIR_ENTRY_RSVD
_SM_PASID_TABLE_READ_ERR, _SM_PASID_ENTRY_P = FR.SM_PASID_TABLE_READ_ERR, FR.SM_PASID_ENTRY_P
_SM_PASID_ENTRY_RSVD, _SM_PASID_ENTRY_INV = FR.SM_PASID_ENTRY_RSVD, FR.SM_PASID_ENTRY_INV
_TT_RESERVED = 3


class StructureDecoder(ChipState):
    """Context and PASID entries of a unit, decoded from memory and cached."""

    def context_entry(self, sid: int, trace: list | None = None) -> Context | int:
        """The decoded context entry of ``sid`` through the context cache (filled on a miss), or a fault
        int.  With ``trace`` the cache is bypassed and the structures read are appended to it."""
        c = self.caches
        if trace is None:
            ctx = c.context.get(sid)
            if ctx is not None:
                c.stats.context_hits += 1
                return ctx
        loaded = self.load_context(sid, trace)
        if trace is None and type(loaded) is not int:
            c.stats.context_misses += 1
            c.put_context(sid, loaded)  # type: ignore[arg-type]
        return loaded

    def pasid_entry(self, sid: int, ctx: Context, pasid: int, trace: list | None = None) -> PasidEntry | int:
        """The decoded PASID entry of (sid, pasid) under ``ctx``, a scalable context, through the PASID
        cache, or a fault int; ``trace`` as for :meth:`context_entry`."""
        c = self.caches
        uncached = self.quirks.pasid_entry_uncached
        if trace is None and not uncached:
            pe = c.pasid.get((sid, pasid))
            if pe is not None:
                c.stats.pasid_hits += 1
                return pe
        sc: ScalableContext = ctx  # type: ignore[assignment]  # callers decide on ctx.kind first
        loaded = self.load_pasid(sc.pasid_dir, sc.pdts, sc.fpd, pasid, trace)
        if trace is None and type(loaded) is not int:
            c.stats.pasid_misses += 1
            if not uncached:
                c.put_pasid(sid, pasid, loaded)  # type: ignore[arg-type]
        return loaded

    def load_context(self, sid: int, trace: list | None = None) -> Context | int:
        """Decode the root and context entry of ``sid`` from memory (no cache involved)."""
        rd = self.mem.read_u64
        bus, devfn = sid >> 8, sid & 0xFF
        ra = self.root_addr + bus * 16
        lo, hi = rd(ra), rd(ra + 8)
        if not self.root_scalable:
            if trace is not None:
                trace.append(("legacy_root_entry", 0, ra, (lo, hi)))
            if lo < 0 or hi < 0:
                return _ROOT_TABLE_INV
            if not lo & 1:
                return _ROOT_ENTRY_P
            if lo & self.lroot_rsvd[0] or hi & self.lroot_rsvd[1]:
                return _ROOT_ENTRY_RSVD
            ca = (lo & self.addr_mask) + devfn * 16
            clo, chi = rd(ca), rd(ca + 8)
            if trace is not None:
                trace.append(("legacy_context_entry", 0, ca, (clo, chi)))
            if clo < 0 or chi < 0:
                return _CONTEXT_TABLE_INV
            fpd = (clo >> 1) & 1
            if not clo & 1:
                return _CONTEXT_ENTRY_P | fpd << FPD_SHIFT
            if clo & self.lctx_rsvd[0] or chi & self.lctx_rsvd[1]:
                return _CONTEXT_ENTRY_RSVD | fpd << FPD_SHIFT
            f = self.lctx
            v = clo | chi << 64
            tt = f["TT"].get(v)
            aw = f["AW"].get(v)
            if tt == _TT_RESERVED or (tt == TT_DEV_TLB and not self.ecap_dt) or (tt == TT_PT and not self.ecap_pt):
                return _CONTEXT_ENTRY_INV | fpd << FPD_SHIFT
            if tt != TT_PT and not (self.sagaw >> aw) & 1:
                return _CONTEXT_ENTRY_INV | fpd << FPD_SHIFT
            return LegacyContext(CTX_LEGACY, f["DID"].get(v), tt, aw + 2, f["SLPTPTR"].get(v) << 12 & self.addr_mask,
                                 fpd)
        if trace is not None:
            trace.append(("sm_root_entry", 0, ra, (lo, hi)))
        if lo < 0 or hi < 0:
            return _SM_ROOT_READ_ERR
        half = hi if devfn >= 128 else lo
        if not half & 1:
            return _SM_ROOT_ENTRY_P
        if self.sroot_rsvd_both:
            if lo & self.sroot_rsvd[0] or hi & self.sroot_rsvd[1]:
                return _SM_ROOT_ENTRY_RSVD
        elif half & self.sroot_rsvd[1 if devfn >= 128 else 0]:
            return _SM_ROOT_ENTRY_RSVD
        ca = (half & self.addr_mask) + (devfn & 0x7F) * 32
        qs = tuple(rd(ca + 8 * i) for i in range(4))
        if trace is not None:
            trace.append(("sm_context_entry", 0, ca, qs))
        if min(qs) < 0:
            return _SM_CONTEXT_READ_ERR
        v = qs[0] | qs[1] << 64 | qs[2] << 128 | qs[3] << 192
        fpd = (qs[0] >> 1) & 1
        if not qs[0] & 1:
            return _SM_CONTEXT_ENTRY_P | fpd << FPD_SHIFT
        if any(x & m for x, m in zip(qs, self.sctx_rsvd)):
            return _SM_CONTEXT_ENTRY_RSVD | fpd << FPD_SHIFT
        f = self.sctx
        return ScalableContext(CTX_SM, fpd, f["PASIDDIRPTR"].get(v) << 12 & self.addr_mask, f["PDTS"].get(v),
                               f["RID_PASID"].get(v), f["PRE"].get(v), f["PASIDE"].get(v), f["DTE"].get(v),
                               f["RID_PRIV"].get(v))

    def load_pasid(self, pdir: int, pdts: int, fpd: int, pasid: int, trace: list | None = None) -> PasidEntry | int:
        """Decode the PASID directory and table entry of ``pasid`` under a PASID directory at ``pdir``
        (no cache involved); ``fpd`` is the context entry's."""
        rd = self.mem.read_u64
        didx = pasid >> 6
        if didx >= 1 << (pdts + 7) and self.enforce_pdts:
            return _SM_PASID_BEYOND_PDTS | fpd << FPD_SHIFT
        da = pdir + didx * 8
        de = rd(da)
        if trace is not None:
            trace.append(("pasid_dir_entry", 0, da, de))
        if de < 0:
            return _SM_PASID_DIR_READ_ERR | fpd << FPD_SHIFT
        fpd |= (de >> 1) & 1
        if not de & 1:
            return _SM_PASID_DIR_ENTRY_P | fpd << FPD_SHIFT
        if de & self.pdir_rsvd:
            return _SM_PASID_DIR_ENTRY_RSVD | fpd << FPD_SHIFT
        pa = (de & self.pdir_ptr) + (pasid & 63) * 64
        qs = tuple(rd(pa + 8 * i) for i in range(8))
        if trace is not None:
            trace.append(("pasid_entry", 0, pa, qs))
        if min(qs) < 0:
            return _SM_PASID_TABLE_READ_ERR | fpd << FPD_SHIFT
        fpd |= (qs[0] >> 1) & 1
        if not qs[0] & 1:
            return _SM_PASID_ENTRY_P | fpd << FPD_SHIFT
        if any(x & m for x, m in zip(qs, self.pe_rsvd)):
            return _SM_PASID_ENTRY_RSVD | fpd << FPD_SHIFT
        f = self.pe
        v = qs[0] | qs[1] << 64 | qs[2] << 128
        pgtt = f["PGTT"].get(v)
        if self.quirks.pgtt_walked_as_ss and pgtt in (PGTT_FS, PGTT_NESTED):
            pgtt = PGTT_SS
        if not self.ecap_pgtt.get(pgtt, False):
            return _SM_PASID_ENTRY_INV | fpd << FPD_SHIFT
        aw = f["AW"].get(v)
        if pgtt in (PGTT_SS, PGTT_NESTED) and not (self.sagaw >> aw) & 1:
            return _SM_PASID_ENTRY_INV | fpd << FPD_SHIFT
        fspm = f["FSPM"].get(v)
        if pgtt in (PGTT_FS, PGTT_NESTED) and (fspm > 1 or (fspm == 1 and not self.fs5)):
            return _SM_PASID_ENTRY_INV | fpd << FPD_SHIFT
        flags = ((F_SRE if f["SRE"].get(v) and self.ecap_srs else 0) | (F_WPE if f["WPE"].get(v) else 0)
                 | (F_NXE if f["NXE"].get(v) else 0) | (F_SMEP if f["SMEP"].get(v) else 0)
                 | (F_ERE if f["ERE"].get(v) else 0) | (F_EAFE if f["EAFE"].get(v) else 0))
        ssade = bool(f["SSADE"].get(v)) and self.ecap_slads
        return PasidEntry(f["DID"].get(v), pgtt, aw + 2, f["SSPTPTR"].get(v) << 12 & self.ssptptr_mask,
                          5 if fspm else 4,
                          f["FSPTPTR"].get(v) << 12 & self.addr_mask, fpd, flags, ssade, f["SSEE"].get(v))


__all__ = ["StructureDecoder"]
