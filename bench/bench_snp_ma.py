"""SNP migration through migration agents (sevcore.migration.ma), against the raw packet crypto
it performs, same run.

One migration of a 64 MiB guest, everything for real: the agents' reports and channel, the
guest's worker sealing its pages through the C-bit (the memory engine decrypts them) in 256-page
requests, three pages swapped out and in through the firmware (AES-256-GCM), the context
exported and imported, and on the target the private memory pre-faulted, PVALIDATEd page by
page and filled by the worker's OPEN. The guest's launch and work happen before the timed
region, its own check after it. The peer is ``sevpkt.seal`` then ``sevpkt.open`` of the same
number of pages, 256 pages per call, into buffers allocated once: the cryptography the
migration cannot avoid. Rates are pages/s (bench/report.py).
"""
import numpy as np
import pytest

from benchutil import on_tier, per_item, tier_params
import sevcore
from sevcore.core import sevpkt
from sevcore.migration import ma

MEM = 64 << 20
BATCH = 256
TEK, TIK = bytes(range(16)), bytes(range(16, 32))


def _npages():
    return int(ma.SnpMaGuest(sevcore.Kvm(), MEM, BATCH).sealed_gfns().size)


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.benchmark(group="SNP migration through agents, 64 MiB")
def test_migrate_ma(benchmark, tier):
    done = []

    def setup():
        src, dst = sevcore.Kvm(), sevcore.Kvm()
        a, b = ma.Agent(src), ma.Agent(dst)
        guest = ma.SnpMaGuest.launch(src, MEM, a, seed=1, batch_pages=BATCH)
        guest.run_workload(rounds=1, seed=2)
        return (guest, a, dst, b), {}

    def migrate(guest, a, dst, b):
        done.append(ma.migrate(guest, a, dst, b))

    per_item(benchmark, _npages(), "pages")
    with on_tier(benchmark, tier):
        benchmark.pedantic(migrate, setup=setup, rounds=3)
    target, stats = done[-1]             # outside the timed region: the guest checks itself
    out = target.check()
    assert out["data_ok"] and out["key_ok"] and stats.pages_sealed == _npages()


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.parametrize("passes", [1, 30], ids=["stop-and-copy", "pre-copy"])
@pytest.mark.benchmark(group="SNP migration through agents, 64 MiB, a working guest")
def test_migrate_ma_working(benchmark, tier, passes):
    """A guest whose work is under way when the migration starts, stopped at once
    (``max_passes`` 1) or pre-copied (30: the out-of-tree dirty log of its guest_memfd slot, a
    round of its work, BATCH // 4 pages, after each of the worker's requests). Both timed
    regions hold the guest's last step, its ledger (the SHA-256 of its 64 MiB through the
    memory engine), and pre-copy's its rounds between the passes; the rate counts the pages
    of one full pass, as the stop-and-copy row does."""
    done = []

    def setup():
        src, dst = sevcore.Kvm(), sevcore.Kvm()
        a, b = ma.Agent(src), ma.Agent(dst)
        guest = ma.SnpMaGuest.launch(src, MEM, a, seed=1, batch_pages=BATCH)
        guest.start_work(seed=2, dirty_pages=BATCH // 4)
        guest.work()
        return (guest, a, dst, b), {}

    def migrate(guest, a, dst, b):
        if passes == 1:
            guest.write_ledger()
        done.append(ma.migrate(guest, a, dst, b, max_passes=passes))

    per_item(benchmark, _npages(), "pages")
    with on_tier(benchmark, tier):
        benchmark.pedantic(migrate, setup=setup, rounds=3)
    target, stats = done[-1]
    out = target.check()
    assert out["data_ok"] and out["key_ok"] and (len(stats.passes) > 1) == (passes > 1)
    benchmark.extra_info["passes"] = len(stats.passes)
    benchmark.extra_info["pages_sealed"] = stats.pages_sealed


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.benchmark(group="SNP migration through agents, 64 MiB")
def test_peer_sevpkt_seal_then_open(benchmark, tier):
    n = _npages()
    pages = np.random.default_rng(3).integers(0, 256, (n, 4096), np.uint8)
    ct = np.empty_like(pages)
    hdrs = np.empty((n, sevpkt.HDR_SIZE), np.uint8)
    out = np.empty_like(pages)
    ivs = np.arange(2 * n, dtype=">u8").view(np.uint8)

    def peer():
        for s in range(0, n, BATCH):
            e = min(n, s + BATCH)
            sevpkt.seal(TEK, TIK, pages[s:e], ivs[16 * s:16 * e], out=(hdrs[s:e], ct[s:e]))
            sevpkt.open(TEK, TIK, hdrs[s:e], ct[s:e], out=out[s:e])

    per_item(benchmark, n, "pages")
    with on_tier(benchmark, tier):
        benchmark.pedantic(peer, rounds=5)
    assert np.array_equal(out, pages)
