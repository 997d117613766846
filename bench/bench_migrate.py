"""Wall time and memory of a whole migration, against the raw cryptography it performs.

A fully touched SEV guest (idle workload: every page written at boot, nothing dirtied after, so
one pass moves every page once) is migrated between two Hosts in this process, by each path.
Its floor (issue 5) is the cryptography a migration cannot avoid, measured in the same run on
the same number of pages in batches of 256: the memory engine decrypting the guest's pages with
its key, the packet seal (AES-128-CTR + HMAC-SHA256), the packet open, and the engine encrypting
them into the target's pages with the target's key. Target: a migration within 3x of it.

The target's memory is fresh: a second peer does the same cryptography into a fresh Host's
never-touched frames, as the target must, so that the host OS's first touch of them (on a
virtual machine, the hypervisor backing them: several microseconds a page when the memory has
not been used lately) is in the floor; and the first touch alone is timed as a third.

Memory: a migration of the same size runs in a subprocess and reports its peak RSS growth (VmHWM) over
the guest size; target <= 2.3x for source and target together.

    pytest bench/bench_migrate.py --benchmark-enable               # 256 MiB
    SEVCORE_BENCH_MIGRATE_GIB=4 pytest bench/bench_migrate.py --benchmark-enable
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import sevcore
from benchutil import per_item
from sevcore.core import sevpkt
from sevcore.migration.engine import MigrationParams, migrate
from sevcore.migration.machine import Machine
from sevcore.migration.workload import GuestConfig

SIZE = int(float(os.environ.get("SEVCORE_BENCH_MIGRATE_GIB", "0.25")) * (1 << 30))
BATCH = 256
GROUP = f"migrate a fully touched {SIZE >> 20} MiB SEV guest"


def guest(path):
    cfg = GuestConfig(mem_size=SIZE, workload="idle", shared_size=1 << 20,
                      helper_vcpus=1 if path == "helper" else 0)
    return Machine.launch(sevcore.Kvm(), cfg)


@pytest.mark.parametrize("path", ["psp", "helper"])
def test_migrate(benchmark, path):
    benchmark.group = GROUP
    holder = {}

    def setup():
        holder["m"] = guest(path)
        return (holder["m"], sevcore.Kvm()), {}

    def run(m, dst):
        holder["r"] = migrate(m, dst, MigrationParams(path=path, max_iterations=1,
                                                      batch_pages=BATCH, timeout_s=600))
    benchmark.pedantic(run, setup=setup, rounds=1)
    per_item(benchmark, SIZE >> 12, "page")
    st = holder["r"].stats
    assert st.status == "completed" and st.bad_pages == 0
    assert st.verified_pages >= holder["m"].config.layout.data_pages
    benchmark.extra_info["simulated_total_ms"] = st.total_ns / 1e6


def guest_spas(m):
    """The SPAs of every page of ``m``'s guest, in gfn order."""
    hvas = m.gfn_hvas(np.arange(m.npages, dtype=np.uint64))
    return np.array([m.kvm.hva_to_pfn(int(h), False) for h in hvas], np.uint64) << np.uint64(12)


def crypto_pass(src, dst_umc, dst_spas, dst_asid):
    """What a migration's cryptography is, without the migration: the source guest's pages
    decrypted by the engine, sealed and opened as SEV packets, and encrypted by the engine with
    another key into ``dst_spas``, BATCH pages at a time. Returns the function that runs it."""
    host, asid, spas = src.host, src.vm.sev.asid, guest_spas(src)
    tek, tik = bytes(range(16)), bytes(range(16, 32))
    ivs = np.random.default_rng(3).bytes(16 * BATCH)
    plain = np.empty(BATCH * 4096, np.uint8)

    def run(dst_spas=dst_spas):
        for s in range(0, len(spas), BATCH):
            e = min(len(spas), s + BATCH)
            pt = host.umc.read_pages(spas[s:e], asid, out=plain[:(e - s) * 4096])
            hdrs, ct = sevpkt.seal(tek, tik, pt, ivs[:16 * (e - s)])
            out = sevpkt.open(tek, tik, hdrs, ct)
            dst_umc.write_pages(dst_spas[s:e], out, dst_asid)
    return run, spas


def test_raw_crypto_peer(benchmark):
    """Engine decrypt + seal + open + engine encrypt of the guest's pages, 256 at a time."""
    benchmark.group = GROUP
    m = guest("psp")
    dst = guest("psp")          # another Host, another key: where the pages land
    dst_spas, dst_asid = guest_spas(dst), dst.vm.sev.asid
    run, spas = crypto_pass(m, dst.host.umc, dst_spas, dst_asid)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    per_item(benchmark, len(spas), "page")
    assert dst.host.umc.read(int(dst_spas[-1]), 4096, dst_asid) == \
        m.host.umc.read(int(spas[-1]), 4096, m.vm.sev.asid)


def test_raw_crypto_fresh_target_peer(benchmark):
    """The same cryptography, but the engine encrypts into a fresh Host's never-touched frames
    (allocated, as pinning allocates them, and not yet written), as a migration target must:
    the floor a migration cannot go under on this machine, first touch included."""
    benchmark.group = GROUP
    m = guest("psp")
    holder = {}

    def setup():
        holder["dst"] = dst = sevcore.Host()
        dst.umc.install_key(1, bytes(range(32, 48)))
        holder["run"], _ = crypto_pass(m, dst.umc, None, 1)
        holder["spas"] = dst.mem.alloc(m.npages) << np.uint64(12)
        return (holder["spas"],), {}
    benchmark.pedantic(lambda dst_spas: holder["run"](dst_spas), setup=setup, rounds=1)
    per_item(benchmark, m.npages, "page")
    assert holder["dst"].umc.read(int(holder["spas"][-1]), 4096, 1) == \
        m.host.umc.read(int(guest_spas(m)[-1]), 4096, m.vm.sev.asid)


def test_first_touch_peer(benchmark):
    """Not cryptography, but a floor a migration also pays: the target Host touching the
    guest's worth of fresh frames for the first time (the host OS's page faults), 256 pages
    per store, as the target's page writes do."""
    benchmark.group = GROUP
    n = SIZE >> 12
    data = np.zeros((BATCH, 4096), np.uint8)
    holder = {}

    def setup():
        holder["host"] = host = sevcore.Host()
        return (host, host.mem.alloc(n) << np.uint64(12)), {}

    def run(host, spas):
        for s in range(0, n, BATCH):
            host.umc.write_pages(spas[s:s + BATCH], data[:min(BATCH, n - s)], 0)
    benchmark.pedantic(run, setup=setup, rounds=1)
    per_item(benchmark, n, "page")


MEMORY = textwrap.dedent("""
    import json, sys
    import sevcore
    from sevcore.migration.engine import MigrationParams, migrate
    from sevcore.migration.machine import Machine
    from sevcore.migration.workload import GuestConfig

    def hwm():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

    size, path = int(sys.argv[1]), sys.argv[2]
    base = hwm()
    cfg = GuestConfig(mem_size=size, workload="idle", shared_size=1 << 20,
                      helper_vcpus=1 if path == "helper" else 0)
    m = Machine.launch(sevcore.Kvm(), cfg)
    r = migrate(m, sevcore.Kvm(), MigrationParams(path=path, max_iterations=1, timeout_s=900))
    assert r.stats.bad_pages == 0, r.stats.bad_pages
    print(json.dumps({"peak_growth": hwm() - base, "guest": size}))
""")


@pytest.mark.parametrize("path", ["psp", "helper"])
def test_memory_source_and_target(benchmark, path):
    """Peak RSS growth of a whole migration over the guest size (budget 2.3x)."""
    benchmark.group = f"memory of a {SIZE >> 20} MiB migration"

    def measure():
        out = subprocess.run([sys.executable, "-c", MEMORY, str(SIZE), path], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out.splitlines()[-1])
    r = benchmark.pedantic(measure, rounds=1)
    ratio = r["peak_growth"] / r["guest"]
    benchmark.extra_info.update(r, ratio=ratio)
    assert r["peak_growth"] >= 2 * r["guest"], r       # it saw both guests' memory
    assert ratio <= 2.3, r
