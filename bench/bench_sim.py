"""What SimPy costs: the SimPy driver against the default driver on one migration, and an
evacuation of 8 guests against the raw cryptography of their 8 migrations.

One fully touched SEV guest (idle workload: one pass moves every page once, as in
bench_migrate.py) is migrated by the PSP path with the default driver and with the SimPy
driver (its own PSPs and link); target: the SimPy driver within 1.15x of the default.

Eight such guests on one source Host are then evacuated at once to one target Host over one
link (shared PSPs: their batches alternate on them), and the peer is the cryptography those 8
migrations cannot avoid (bench_migrate.crypto_pass, 8 times over a guest's pages); target:
the evacuation within 3x of it.

    pytest bench/bench_sim.py --benchmark-enable                 # 256 MiB guests
    SEVCORE_BENCH_SIM_MIB=64 pytest bench/bench_sim.py --benchmark-enable
"""
import os
import time

import pytest
import simpy

import sevcore
import sevcore.sim as sim
from bench_migrate import crypto_pass, guest_spas
from benchutil import per_item
from sevcore.migration.engine import MigrationParams, migrate
from sevcore.migration.machine import Machine
from sevcore.migration.workload import GuestConfig

SIZE = int(os.environ.get("SEVCORE_BENCH_SIM_MIB", "256")) << 20
GUESTS = 8
PARAMS = MigrationParams(path="psp", max_iterations=1, timeout_s=900)
CONFIG = GuestConfig(mem_size=SIZE, workload="idle", shared_size=1 << 20)


def check(result):
    st = result.stats
    assert st.status == "completed" and st.bad_pages == 0 and st.verified_pages > 0
    return st


@pytest.mark.parametrize("driver", ["default", "simpy"])
def test_one_migration(benchmark, driver):
    """One migration of a fully touched guest by the PSP path, by each driver."""
    benchmark.group = f"one {SIZE >> 20} MiB migration: SimPy driver vs default driver"
    holder = {}

    def setup():
        return (Machine.launch(sevcore.Kvm(), CONFIG), sevcore.Kvm()), {}

    def run(m, dst):
        cpu0 = time.process_time()
        if driver == "default":
            holder["r"] = migrate(m, dst, PARAMS)
        else:
            env = simpy.Environment()
            proc = env.process(sim.migrate(env, m, dst, PARAMS))
            env.run()
            holder["r"] = proc.value
        holder.setdefault("cpu_s", []).append(time.process_time() - cpu0)
    benchmark.pedantic(run, setup=setup, rounds=3)
    # The process's CPU time (all threads) beside the wall time: steadier when the machine
    # is shared.
    benchmark.extra_info["cpu_s_median"] = sorted(holder["cpu_s"])[1]
    per_item(benchmark, SIZE >> 12, "page")
    benchmark.extra_info["simulated_total_ms"] = check(holder["r"]).total_ns / 1e6


def test_evacuation(benchmark):
    """8 guests of one Host migrated at once to another over one link, on shared PSPs."""
    benchmark.group = f"evacuate {GUESTS} x {SIZE >> 20} MiB"
    holder = {}

    def setup():
        holder.clear()
        src = sevcore.Kvm()
        return ([Machine.launch(src, CONFIG) for _ in range(GUESTS)], sevcore.Kvm()), {}

    def run(machines, dst):
        cpu0 = time.process_time()
        env = simpy.Environment()
        psps, link = sim.Psps(env), sim.Link(env, 1.25e9)
        migs = [sim.Migration(env, m, dst, PARAMS, psp=psps, link=link, name=f"g{i}")
                for i, m in enumerate(machines)]
        for mig in migs:
            mig.start()
        env.run()
        holder["migs"], holder["env"] = migs, env
        holder["cpu_s"] = time.process_time() - cpu0
    benchmark.pedantic(run, setup=setup, rounds=1)
    per_item(benchmark, GUESTS * (SIZE >> 12), "page")
    for mig in holder["migs"]:
        check(mig.result)
    benchmark.extra_info["simulated_s"] = holder["env"].now
    benchmark.extra_info["cpu_s"] = holder["cpu_s"]


def test_evacuation_raw_crypto_peer(benchmark):
    """The cryptography of the 8 migrations: 8 passes of engine decrypt, seal, open and
    engine encrypt over a guest's pages, 256 at a time."""
    benchmark.group = f"evacuate {GUESTS} x {SIZE >> 20} MiB"
    m = Machine.launch(sevcore.Kvm(), CONFIG)
    dst = Machine.launch(sevcore.Kvm(), CONFIG)
    run, spas = crypto_pass(m, dst.host.umc, guest_spas(dst), dst.vm.sev.asid)

    def eight():
        cpu0 = time.process_time()
        for _ in range(GUESTS):
            run()
        benchmark.extra_info["cpu_s"] = time.process_time() - cpu0
    benchmark.pedantic(eight, rounds=1, warmup_rounds=1)
    per_item(benchmark, GUESTS * len(spas), "page")
