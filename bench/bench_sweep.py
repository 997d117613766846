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
def client():
    c = sweep.open_client(workers=2, memory_limit="2GiB", quiet=True)
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
        wall, cpu = time.perf_counter(), time.process_time()
        out["rows"] = cli.sweep_run(points, scheduler, workers, store, quiet=True)
        out["busy"] = (time.process_time() - cpu) / (time.perf_counter() - wall)
    benchmark.pedantic(run, setup=setup, rounds=1)
    per_item(benchmark, len(points), "point")
    benchmark.extra_info["cpus"] = len(os.sched_getaffinity(0))
    if how == "serial":
        # Cores this process kept busy: above 1, the points are already parallel in themselves
        # (source and target threads; the C core releases the GIL), which caps two workers.
        benchmark.extra_info["cores_busy"] = round(out["busy"], 2)
    _check(out["rows"], len(points))


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
