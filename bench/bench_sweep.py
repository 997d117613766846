"""``sevcore sweep`` on Dask against the same points run one after another (issue 16).

The grid: 16 points of a 64 MiB guest (dirty rate 0..1750 pages/s in steps of 250, both paths).
The peer is the serial run in this process; the two-worker LocalCluster (one thread per worker
process) is timed twice: started inside the timed region (what ``sevcore sweep`` pays for one
sweep) and already running (a notebook's cluster, or a sweep long enough to amortise the start).
Target: >= 1.7x the serial rate on the 2-core machine.

The engine's own cost per point (submit, gather, write the row to the store) is timed with a
point that does no work (``dict``: the row is the parameters), 200 points through a running
two-worker cluster, and in process. Target: under 50 ms a point.

    pytest bench/bench_sweep.py --benchmark-enable
"""
import os
import time

import pytest

import sevcore
from benchutil import per_item
from sevcore import cli
from sevcore.migration import sweep

pytest.importorskip("distributed")

GRID = ["dirty-rate=0:1750:250", "path=both"]
GROUP = "sweep 16 points of a 64 MiB guest"
OVERHEAD = "sweep engine per point (a point that does no work)"
NOOP_POINTS = 200


@pytest.fixture(scope="module")
def points():
    pts = cli.sweep_points(GRID, cli.sweep_base(mem="64M"))
    assert len(pts) == 16
    return pts


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    c = sweep.open_client(workers=2, memory_limit="2GiB", quiet=True)
    # Running: each worker has run a point already (a notebook's cluster after its first sweep).
    warm = cli.sweep_points(["dirty-rate=0,250"], cli.sweep_base(mem="16M", path="psp"))
    cli.sweep_run(warm, c, store=_fresh(tmp_path_factory), quiet=True)
    yield c
    sweep.close_client(c)


def _fresh(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


def _check(rows, n):
    assert len(rows) == n and all(r["status"] == "completed" for r in rows), \
        [r["error"] for r in rows if r["status"] != "completed"]


@pytest.mark.parametrize("how", ["serial", "2 workers, cluster start included",
                                 "2 workers, cluster running"])
def test_sweep(benchmark, points, tmp_path_factory, how, request):
    benchmark.group = GROUP
    out = {}

    def setup():
        kw = {"workers": 0} if how == "serial" else {"workers": 2}
        if how.endswith("running"):
            kw = {"scheduler": request.getfixturevalue("client")}
        return (), {"store": _fresh(tmp_path_factory), **kw}

    def run(store, workers=None, scheduler=None):
        cpu0 = _cpu(scheduler, workers)
        wall = time.perf_counter()
        out["rows"] = cli.sweep_run(points, scheduler, workers, store, quiet=True)
        out["wall"] = time.perf_counter() - wall
        out["cpu"] = _cpu(scheduler, workers) - cpu0 if cpu0 is not None else None
    benchmark.pedantic(run, setup=setup, rounds=1)
    per_item(benchmark, len(points), "point")
    benchmark.extra_info["cpus"] = len(os.sched_getaffinity(0))
    benchmark.extra_info["loadavg"] = os.getloadavg()[0]
    if out["cpu"] is not None:
        # Cores the points kept busy (this process, or the running cluster's workers): above 1
        # serially, a point is parallel in itself (source and target threads), which caps two
        # workers; the CPU time per point is the figure the machine's other load hardly moves.
        benchmark.extra_info["cores_busy"] = round(out["cpu"] / out["wall"], 2)
        benchmark.extra_info["cpu_ms_per_point"] = round(out["cpu"] / len(points) * 1e3, 1)
    _check(out["rows"], len(points))


def _cpu(client, workers):
    """CPU seconds so far of this process (serial) or of a running cluster's workers; None for
    a cluster the sweep starts itself."""
    if workers == 0:
        return time.process_time()
    if client is None:
        return None
    return sum(client.run(time.process_time).values())


@pytest.mark.parametrize("where", ["in process", "2 workers"])
def test_engine_overhead(benchmark, tmp_path_factory, where, request):
    benchmark.group = OVERHEAD
    pts = [{"n": i} for i in range(NOOP_POINTS)]
    out = {}
    c = request.getfixturevalue("client") if where == "2 workers" else None

    def setup():
        return (_fresh(tmp_path_factory),), {}

    def run(store):
        out["rows"] = sweep.execute(pts, dict, sweep.Store(store), sevcore.__version__, c)
    benchmark.pedantic(run, setup=setup, rounds=3)
    per_item(benchmark, NOOP_POINTS, "point")
    rows = out["rows"]
    assert [r["n"] for r in rows] == list(range(NOOP_POINTS))
    assert all(r["status"] == "" and r["point"] for r in rows)
