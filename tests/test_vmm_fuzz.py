"""A misbehaving guest (hypothesis): random PASID and context entries (junk, reserved bits, pointers
outside guest RAM, 5-level, SRE/WPE/EAFE), random invalidations of every kind and granularity, TE
toggles, SRTP to random roots, resets and DMA, in random order.  Nothing raises; after every step the
host attachments are what the bridge says they are, every nested HWPT on the host is one the bridge
holds, and a (device, PASID) the bridge blocked faults with the reason it recorded."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtd_emu.spec.consts import GCMD
from vtd_emu.tables import PGTT_FS, PGTT_PT, PGTT_SS, U, W, gcmd_set
from vtd_emu.vmm import Machine, PassthroughDevice
from vtd_emu.vtd.entries import REASON_MASK
from vtd_emu.vtd.qi import T_CONTEXT, T_DEV_TLB, T_IOTLB, T_PASID_CACHE, T_PASID_DEV_TLB, T_PIOTLB, make_descriptor

from vmm_helpers import ITE, RawGuest, reg

SIDS = (0x0310, 0x0318)
RAM = 8 << 20
GVA = 0x7F00_0000_0000
PASIDS = (0, 1, 2, 65)
DIDS = (1, 2)

u64 = st.integers(0, (1 << 64) - 1)
pasid = st.sampled_from(PASIDS)
did = st.sampled_from(DIDS)
sid = st.sampled_from(SIDS)

fs_entry = st.tuples(st.just("fs"), sid, pasid, did, st.sampled_from(["a", "b", "outside"]), st.booleans(),
                     st.sampled_from([0, 1]), st.booleans(), st.booleans())
entry = st.one_of(
    fs_entry, fs_entry, fs_entry,
    st.tuples(st.just("pgtt"), sid, pasid, did, st.sampled_from([PGTT_PT, PGTT_SS, 0, 5, 7])),
    st.tuples(st.just("junk"), sid, pasid, st.lists(u64, min_size=8, max_size=8)),
    st.tuples(st.just("clear"), sid, pasid),
    st.tuples(st.just("context"), sid, st.booleans(), st.booleans()),
)
descriptor = st.one_of(
    st.tuples(st.just("pc"), st.sampled_from([0, 1, 3]), did, pasid),
    st.tuples(st.just("cc"), st.sampled_from([1, 2, 3]), did, sid),
    st.tuples(st.just("iotlb"), st.sampled_from([1, 2, 3]), did),
    st.tuples(st.just("piotlb"), st.sampled_from([2, 3]), did, pasid, st.integers(0, 3)),
    st.tuples(st.just("devtlb"), sid, st.booleans()),
    st.tuples(st.just("pdevtlb"), sid, pasid, st.booleans()),
)
protocol = st.tuples(st.just("entry"), entry, st.booleans())
action = st.one_of(
    protocol, protocol, protocol, protocol,
    st.tuples(st.just("submit"), st.lists(descriptor, min_size=1, max_size=4)),
    st.tuples(st.just("te"), st.sampled_from([True, True, False])),
    st.tuples(st.just("srtp"), st.sampled_from(["own", "own", "own", "outside", "junk"])),
    st.tuples(st.just("reset")),
    st.tuples(st.just("dma"), sid, st.sampled_from([None, *PASIDS]), st.booleans()),
)


def make(desc: tuple[Any, ...]) -> tuple[int, int]:
    kind = desc[0]
    if kind == "pc":
        return make_descriptor(T_PASID_CACHE, G=desc[1], DID=desc[2], PASID=desc[3])
    if kind == "cc":
        return make_descriptor(T_CONTEXT, G=desc[1], DID=desc[2], SID=desc[3], FM=0)
    if kind == "iotlb":
        return make_descriptor(T_IOTLB, G=desc[1], DID=desc[2], ADDR=GVA, AM=0)
    if kind == "piotlb":
        return make_descriptor(T_PIOTLB, G=desc[1], DID=desc[2], PASID=desc[3], ADDR=GVA, AM=desc[4])
    if kind == "devtlb":
        return make_descriptor(T_DEV_TLB, SID=desc[1], ADDR=GVA, S=int(desc[2]))
    return make_descriptor(T_PASID_DEV_TLB, SID=desc[1], PASID=desc[2], G=0, ADDR=GVA, S=int(desc[3]))


def consistent(m: Machine, g: RawGuest) -> None:
    b = m.bridge
    assert {o.id for o in m.objects() if o.kind == "hwpt_nested"} == b.live_hwpts()
    for (s, p), bind in b.binds.items():
        dev = m.devices[s]
        assert isinstance(dev, PassthroughDevice)
        assert dev.vfio.attached_hwpt(p or None) == bind.attached
        if bind.kind == "blocked" and bind.attached is None:
            assert dev.dma_read(GVA, 8, pasid=p or None).faults == (bind.reason & REASON_MASK,)
    if g.fsts() & ITE:
        g.clear_fsts(ITE)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(action, min_size=6, max_size=20), st.sampled_from(["coalesced", "one-per-call"]))
def test_a_misbehaving_guest_never_breaks_the_bridge(actions: list[tuple[Any, ...]], mode: str) -> None:
    m = Machine(guest_ram=RAM, forwarding=mode)
    for s in SIDS:
        m.add_passthrough_device(s, pasid_bits=8)
    g = RawGuest(m, limit=0x40_0000)
    for s in SIDS:
        g.device(s)
    tables = {"a": g.fs_table(), "b": g.fs_table(levels=5)}
    tables["a"].map(GVA, 0x50_0000, 0x1000, W | U)
    tables["b"].map(GVA, 0x60_0000, 0x1000, W | U)
    g.enable()
    # A guest that got something bound first, then misbehaves.
    for s in SIDS:
        g.bind_fs(s, 1, tables["a"], 1, invalidate=False)
    g.submit(make_descriptor(T_PASID_CACHE, G=3))
    for a in actions:
        invalidate_after = False
        if a[0] == "entry":
            _, a, invalidate_after = a
        kind = a[0]
        if kind == "fs":
            _, s, p, d, which, sre, fpd, wpe, eafe = a
            root = RAM + 0x1000 if which == "outside" else tables[which].root
            fspm = 1 if which == "b" else 0
            g.pasids[s].set_entry(p, pgtt=PGTT_FS, did=d, fsptptr=root, fspm=fspm, sre=sre, fpd=bool(fpd),
                                  wpe=wpe and sre, eafe=eafe)
        elif kind == "pgtt":
            _, s, p, d, pgtt = a
            g.pasids[s].set_entry(p, pgtt=pgtt, did=d, ssptptr=0x20_0000, aw=2)
        elif kind == "junk":
            _, s, p, qws = a
            addr = g.pasids[s].entry_addr(p) or g.pasids[s].set_entry(p, pgtt=PGTT_PT, did=1)
            for i, q in enumerate(qws):
                m.mem.write_u64(addr + 8 * i, q)
        elif kind == "clear":
            g.pasids[a[1]].clear_entry(a[2])
        elif kind == "context":
            _, s, paside, present = a
            pt = g.pasids[s]
            g.rt.set_context(s >> 8, s & 0xFF, pasid_dir=pt.dir, pdts=pt.pdts, paside=paside, present=present)
        elif kind == "submit":
            g.submit(*[make(d) for d in a[1]])
        elif kind == "te":
            g.set_te(a[1])
        elif kind == "srtp":
            root = {"own": g.rt.root, "outside": RAM + 0x10_0000, "junk": 0x3000}[a[1]]
            m.mmio_write(reg("RTADDR"), root | 1 << 10, 8)
            gcmd_set(m, GCMD.SRTP)
        elif kind == "reset":
            m.reset()
            g.tail = 0
            g.enable()
        else:
            _, s, p, write = a
            dev = m.devices[s]
            if write:
                dev.dma_write(GVA, b"fuzz", pasid=p)
            else:
                dev.dma_read(GVA, 4, pasid=p)
        if invalidate_after:
            # Following the protocol this time: the entry's PASID cache, the device's context, the IOTLB.
            s0, p0 = a[1], (a[2] if kind != "context" else 0)
            g.submit(make_descriptor(T_PASID_CACHE, G=1, DID=a[3] if kind in ("fs", "pgtt") else 1, PASID=p0),
                     make_descriptor(T_CONTEXT, G=3, SID=s0, FM=0), make_descriptor(T_PIOTLB, G=2, DID=1, PASID=p0))
        consistent(m, g)
    m.close()
    assert m.objects() == [] and m.host.pinned_pages == 0 and m.host.intel._dids == set()
