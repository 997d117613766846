"""The migration helper's seal and open (sevcore.migration.helper) against the raw packet crypto
they run on, same run.

The helper's SEAL reads the guest's private pages through the C-bit (the memory engine decrypts
them), seals them on the sevpkt kernel, and hands them over through the shared packet buffer;
OPEN does the reverse and writes the plaintext back through the C-bit. Around the crypto come
those two copies and decryptions, the guest program's steps (about ten operations per request)
and one vCPU exit per request. The peer is ``sevpkt.seal`` / ``sevpkt.open`` of the same pages,
256 pages per call, into buffers allocated once (what the helper's caller can do with
``seal(packets=)``). Target (issue: migration helper): within 2x of the raw crypto at 256-page
batches, on every tier (issue: cpu tiers), so both sides run on each tier the CPU has. Rates are
pages/s (bench/report.py).
"""
import numpy as np
import pytest

from benchutil import on_tier, per_item, tier_params
import sevcore
from sevcore.core import pages as guestmem
from sevcore.core import sevpkt
from sevcore.vmm.kvm_util import vm_sev_create_with_one_vcpu, vm_sev_launch
from sevcore.migration.helper import PACKET_SIZE, HelperLayout, MigrationHelper, helper_boot
from sevcore.uapi import KVM_X86_SEV_VM
from sevcore.vmm.shared_pages import SharedPagesTracker

BATCH = 256
NPAGES = 4096                 # 16 MiB of data pages, sealed 256 at a time
SEED = 0xbe7c
TEK, TIK = bytes(range(16)), bytes(range(16, 32))
SIZES = [pytest.param(BATCH, id="256-pages"), pytest.param(NPAGES, id="4096-pages")]


def boot(g, layout, c_bit):
    yield from helper_boot(g, layout, c_bit)
    yield g.write_pattern(1 << c_bit, NPAGES, SEED)
    yield g.sync("booted")


def reset_counter(g, layout, c_bit):
    """The guest rewinds its helper's sequence counter, so the same packets open again."""
    yield g.write(layout.state_gfn << 12 | 1 << c_bit, b"SCMHSTA2" + bytes(8))
    yield g.sync("reset")


def run(vcpu, tracker=None):
    while True:
        vcpu.run()
        if tracker is None or not tracker.handle_exit(vcpu):
            return vcpu.get_ucall()


@pytest.fixture(scope="module")
def guest():
    """A launched SEV guest of NPAGES data pages (the pattern) with its helper booted, and the
    helper on one vCPU, which has sealed every page once (its mirror's NPT is mapped)."""
    kvm = sevcore.Kvm()
    layout = HelperLayout.for_guest((NPAGES + 512) << 12, batch_pages=BATCH)
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SEV_VM, boot, layout, kvm.host.c_bit,
                                           npages=NPAGES + 512)
    tracker = SharedPagesTracker(vm)
    tracker.setup([vcpu])
    vm_sev_launch(vm, 0)
    assert run(vcpu, tracker) == ("sync", ("booted",))
    helper = MigrationHelper(vm, layout)
    helper.seal(np.arange(NPAGES))
    yield helper, vcpu, layout, kvm.host.c_bit
    helper.close()


def group(benchmark, n):
    benchmark.group = f"migration helper, {n} pages of 4 KiB"


def plaintext(n):
    return np.stack([np.frombuffer(guestmem.pattern(SEED, gfn), np.uint8) for gfn in range(n)])


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.parametrize("n", SIZES)
def test_helper_seal(benchmark, guest, n, tier):
    group(benchmark, n)
    helper = guest[0]
    gfns = np.arange(n, dtype=np.uint64)
    packets = np.empty((n, PACKET_SIZE), np.uint8)
    per_item(benchmark, n, "pages")
    with on_tier(benchmark, tier):
        batch = benchmark.pedantic(helper.seal, (gfns, packets),
                                   rounds=30 if n == BATCH else 8, iterations=1, warmup_rounds=1)
    assert np.all(np.diff(batch.seqs.astype(np.int64)) == 1)
    assert not np.array_equal(batch.packets[:, 32:], plaintext(n))


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.parametrize("n", SIZES)
def test_helper_open(benchmark, guest, n, tier):
    """Each round opens the same packets after the guest rewound its counter (not timed)."""
    group(benchmark, n)
    helper, vcpu, layout, c_bit = guest
    batch = helper.seal(np.arange(n, dtype=np.uint64))

    def setup():
        vcpu.set_guest_code(reset_counter, layout, c_bit)
        assert run(vcpu) == ("sync", ("reset",))
        return (batch.gfns, batch.seqs, batch.packets), {}
    per_item(benchmark, n, "pages")
    with on_tier(benchmark, tier):
        benchmark.pedantic(helper.open, setup=setup, rounds=30 if n == BATCH else 8,
                           warmup_rounds=1)

    def check(g):
        yield g.sync((yield g.check_pattern(1 << c_bit, n, SEED)))
    vcpu.set_guest_code(check)
    assert run(vcpu) == ("sync", ((0, None),))


def raw_batches(fn, n, *arrays, out):
    """``fn`` over ``n`` pages, BATCH per call, each call writing into ``out`` (reused)."""
    for s in range(0, n, BATCH):
        fn(TEK, TIK, *(a[s * k:(s + BATCH) * k] for a, k in arrays), out=out)


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.parametrize("n", SIZES)
def test_sevpkt_seal(benchmark, n, tier):
    """The peer: sevpkt.seal of the same pages, 256 per call, into buffers allocated once."""
    group(benchmark, n)
    pt = plaintext(n).reshape(-1)
    ivs = np.frombuffer(np.random.default_rng(1).bytes(16 * n), np.uint8)
    out = (np.empty(52 * BATCH, np.uint8), np.empty(BATCH * 4096, np.uint8))
    per_item(benchmark, n, "pages")
    with on_tier(benchmark, tier):
        benchmark.pedantic(raw_batches, (sevpkt.seal, n, (pt, 4096), (ivs, 16)), {"out": out},
                           rounds=30 if n == BATCH else 8, iterations=1, warmup_rounds=1)
    k = min(n, BATCH)
    assert np.array_equal(sevpkt.open(TEK, TIK, out[0][:52 * k], out[1][:4096 * k]),
                          pt[(n - k) * 4096:])


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.parametrize("n", SIZES)
def test_sevpkt_open(benchmark, n, tier):
    """The peer: sevpkt.open of the same pages, 256 per call, into one buffer."""
    group(benchmark, n)
    pt = plaintext(n).reshape(-1)
    ivs = np.frombuffer(np.random.default_rng(1).bytes(16 * n), np.uint8)
    hdrs, ct = sevpkt.seal(TEK, TIK, pt, ivs)
    hdrs, ct = np.frombuffer(hdrs, np.uint8), np.frombuffer(ct, np.uint8)
    out = np.empty(BATCH * 4096, np.uint8)
    per_item(benchmark, n, "pages")
    with on_tier(benchmark, tier):
        benchmark.pedantic(raw_batches, (sevpkt.open, n, (hdrs, 52), (ct, 4096)), {"out": out},
                           rounds=30 if n == BATCH else 8, iterations=1, warmup_rounds=1)
    k = min(n, BATCH)
    assert np.array_equal(out[:4096 * k], pt[(n - k) * 4096:])
