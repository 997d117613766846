"""``sevcore sweep``: grids over migrate options and cost parameters, run on Dask (a LocalCluster,
a real scheduler and workers on loopback) or in process, resumable, with tidy tables and plots.

Guests are 2-8 MiB so each point takes a fraction of a second; what is compared is the rows the
engine writes, never timings."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import sevcore
from sevcore import cli
from sevcore.hw.costmodel import CostModel
from sevcore.migration import sweep
from sevcore.migration.engine import PATHS

TINY = ["--mem", "2M", "--shared", "64K", "--max-iterations", "3", "--quiet"]
TINY_BASE = {"mem": "2M", "shared": "64K", "max-iterations": 3}


def _points(grid, **base):
    return cli.sweep_points(grid, cli.sweep_base(**{**TINY_BASE, **base}))


def _same(a, b):
    """Rows equal but for wall time (the one statistic that is not simulated)."""
    drop = {"sev.wall-time-s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]


STARTED = {}


@pytest.fixture(scope="module")
def pd():
    # Imported when a test needs it, not when the module is collected: the other test modules
    # run without pandas, pyarrow and Dask loaded, as they do without this one.
    return pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("distributed")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        c = sweep.open_client(workers=2, memory_limit="2GiB")
    STARTED["stderr"] = err.getvalue()
    yield c
    sweep.close_client(c)


# -- the grid -------------------------------------------------------------------------------------

def test_grid_keys_are_the_migrate_options_and_every_cost_parameter():
    """Every migrate option that describes a migration, and every cost parameter, is a grid key."""
    ap = cli._migrate_options()
    longs = {max(a.option_strings, key=len).lstrip("-") for a in ap._actions
             if a.option_strings and a.dest not in ("help", "json", "plot", "quiet", "set",
                                                     "list_costs")}
    keys = set(cli.sweep_options())
    assert longs | set(CostModel.parameters()) == keys
    assert {"mem", "dirty-rate", "workload", "path", "seed", "ring-buffer"} <= keys


@pytest.mark.parametrize("spec, values", [
    ("dirty-rate=0:16000:2000", [float(v) for v in range(0, 16001, 2000)]),
    ("mem=2M:8M:*2", [2 << 20, 4 << 20, 8 << 20]),
    ("mem=2M,4M:8M:4M", [2 << 20, 4 << 20, 8 << 20]),
    ("path=both", list(PATHS)),
    ("ring-buffer=no,yes", [False, True]),
    ("helper_vcpus=1:4:1", [1, 2, 3, 4]),
    ("psp_bytes_per_s=8e6,32e6", [8e6, 32e6]),
    ("workload=idle,hotset", ["idle", "hotset"]),
])
def test_grid_values_lists_and_ranges(spec, values):
    """A grid value is a list, a step range (inclusive) or a geometric one, parsed as by migrate."""
    grid = sweep.parse_grid(cli.sweep_options(), [spec])
    assert list(grid.values()) == [values]


def test_points_cover_the_grid_with_recorded_seeds():
    """--repeat runs every point once per seed 1..N and records the seed; path both is two paths."""
    pts = cli.sweep_points(["dirty-rate=0,500"], cli.sweep_base(**TINY_BASE), repeat=3)
    assert len(pts) == 2 * 3 * len(PATHS)
    assert {(p["dirty-rate"], p["seed"], p["path"]) for p in pts} == \
        {(r, s, p) for r in (0.0, 500.0) for s in (1, 2, 3) for p in PATHS}
    assert len({sweep.point_key(p, "v") for p in pts}) == len(pts)


def test_a_point_key_changes_with_any_parameter_and_the_version():
    """The store key hashes every parameter (cost model included) and the sevcore version."""
    p = _points(["path=psp"])[0]
    k = sweep.point_key(p, "0.1.0")
    assert sweep.point_key({**p, "psp_bytes_per_s": 9e6}, "0.1.0") != k
    assert sweep.point_key({**p, "seed": 2}, "0.1.0") != k
    assert sweep.point_key(p, "0.2.0") != k
    assert sweep.point_key(dict(reversed(list(p.items()))), "0.1.0") == k


@pytest.mark.parametrize("argv, msg", [
    (["--grid", "dirty-rat=1,2"], "did you mean dirty-rate"),
    (["--grid", "psp_bytes=1"], "did you mean psp_bytes_per_s"),
    (["--grid", "mem=3000"], "multiple of 4 KiB"),
    (["--grid", "path=psp,tcp"], "'tcp' is not one of"),
    (["--grid", "dirty-rate=1,x"], "numbers"),
    (["--grid", "dirty-rate=5:1:1"], "stop is below its start"),
    (["--grid", "dirty-rate=0:10:0"], "step must be > 0"),
    (["--grid", "ring-buffer=maybe"], "not a boolean"),
    (["--grid", "helper_vcpus=0"], "must be >= 1"),
    (["--grid", "hot-fraction=0,2"], "hot_fraction must be in (0, 1]"),
    (["--grid", "mem=2M", "--grid", "mem=4M"], "given twice"),
    (["--grid", "nokey"], "expected KEY=V1,V2"),
    (["--grid", "seed=1,2", "--repeat", "2"], "--repeat sets seed"),
    (["--dirty-rates", "1,2", "--grid", "dirty_rate=3"], "give one of them"),
    (["--grid", "mem=2M", "--x", "colour"], "--grid colour"),
])
def test_a_bad_grid_is_one_error_before_anything_runs(tmp_path, capsys, argv, msg):
    """A bad grid key or value exits 2 with one line naming it, and runs and stores nothing."""
    store = tmp_path / "store"
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", *TINY, "--workers", "0", "--store", str(store), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and msg in err[0], err
    assert not store.exists()


# -- running --------------------------------------------------------------------------------------

def test_local_cluster_rows_equal_serial_rows(tmp_path, client):
    """A LocalCluster of two worker processes gives the rows the same points give in process."""
    pts = _points(["dirty-rate=0,800", "workload=random,hotset"])
    serial = cli.sweep_run(pts, workers=0, store=tmp_path / "serial")
    parallel = cli.sweep_run(pts, client, store=tmp_path / "dask")
    assert len(serial) == len(pts) == 8
    assert all(r["status"] == "completed" for r in serial)
    assert _same(serial, parallel)
    assert len(client.scheduler_info()["workers"]) == 2


def test_heavier_points_start_first_on_dask(tmp_path):
    """On a one-worker cluster the points start in the order of their weight, heaviest first,
    whatever order the grid lists them in, and the rows come back in the grid's order."""
    pytest.importorskip("distributed")

    def run_point(params):
        import time as t                     # runs on the worker, pickled by value
        return {**params, "started": t.monotonic_ns()}
    points = [{"w": w} for w in (3, 9, 1, 7, 5)]
    with contextlib.redirect_stderr(io.StringIO()):
        c = sweep.open_client(workers=1, memory_limit="1GiB")
    try:
        rows = sweep.execute(points, run_point, sweep.Store(tmp_path / "s"),
                             sevcore.__version__, c, weight=lambda p: p["w"])
    finally:
        sweep.close_client(c)
    assert [r["w"] for r in rows] == [3, 9, 1, 7, 5]
    assert [r["w"] for r in sorted(rows, key=lambda r: r["started"])] == [9, 7, 5, 3, 1]
    assert cli.sweep_weight({"mem": 64 << 20, "path": "psp", "dirty-rate": 0.0}) > \
        cli.sweep_weight({"mem": 32 << 20, "path": "psp", "dirty-rate": 9e3}) > \
        cli.sweep_weight({"mem": 32 << 20, "path": "helper", "dirty-rate": 9e3})


def test_python_run_returns_the_table_as_a_dataframe(tmp_path, client, pd):
    """sevcore.sweep.run gives a DataFrame of the rows the command line gives for the grid."""
    import sevcore.sweep
    df = sevcore.sweep.run({"dirty-rate": [0, 400], "path": "psp"}, client, base=TINY_BASE,
                           store=tmp_path / "s")
    assert isinstance(df, pd.DataFrame)
    assert list(df["dirty-rate"]) == [0.0, 400.0] and list(df["path"]) == ["psp", "psp"]
    rows = cli.sweep_run(_points(["dirty-rate=0,400", "path=psp"]), workers=0,
                         store=tmp_path / "serial")
    assert list(df["total-time"]) == [r["total-time"] for r in rows]
    with pytest.raises(sevcore.sweep.SweepError, match="did you mean"):
        sevcore.sweep.run({"dirty_rat": [1]}, client, store=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_the_dashboard_link_is_printed(client):
    """Starting the LocalCluster prints the link of the dashboard its scheduler serves."""
    pytest.importorskip("bokeh")
    assert f"dask dashboard: {client.dashboard_link}" in STARTED["stderr"]
    assert client.dashboard_link.startswith("http://")


def test_a_user_error_is_a_failed_row_not_a_crash(tmp_path, client):
    """A point whose migration is refused (a NOSEND guest) is a failed row with its message."""
    pts = _points(["policy=0,0x8", "path=psp"])
    rows = cli.sweep_run(pts, client, store=tmp_path / "s")
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert "SEV_RET_POLICY_FAILURE" in rows[1]["error"]
    again = []
    cli.sweep_run(pts, client, store=tmp_path / "s", on_row=again.append)
    assert again == []


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    """A sweep stopped after two points keeps them; the re-run runs only the others."""
    pts = _points(["dirty-rate=0,200,400"])
    seen = []

    def stop_after_two(row):
        seen.append(row["point"])
        if len(seen) == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        cli.sweep_run(pts, workers=0, store=tmp_path / "s", on_row=stop_after_two)
    rerun = []
    rows = cli.sweep_run(pts, workers=0, store=tmp_path / "s", on_row=rerun.append)
    assert len(rerun) == len(pts) - 2
    assert not {r["point"] for r in rerun} & set(seen)
    assert _same(rows, cli.sweep_run(pts, workers=0, store=tmp_path / "fresh"))


def test_a_changed_parameter_runs_again(tmp_path):
    """Only points whose full parameters match a stored one are skipped."""
    store = tmp_path / "s"
    cli.sweep_run(_points(["dirty-rate=0,200"], path="psp"), workers=0, store=store)
    ran = []
    cli.sweep_run(_points(["dirty-rate=0,200"], path="psp", psp_bytes_per_s="16e6"),
                  workers=0, store=store, on_row=ran.append)
    assert len(ran) == 2


def test_cli_writes_csv_and_parquet_that_pandas_loads(tmp_path, pd):
    """--out writes the tidy table: one row per point and path, parameters and statistics as
    columns, the same in CSV and Parquet."""
    store = str(tmp_path / "s")
    base = ["sweep", *TINY, "--workers", "0", "--store", store, "--grid", "dirty-rate=0,400"]
    assert cli.main([*base, "--out", str(tmp_path / "r.csv")]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "r.parquet")]) == 0
    c = pd.read_csv(tmp_path / "r.csv")
    p = pd.read_parquet(tmp_path / "r.parquet")
    assert len(c) == len(p) == 2 * len(PATHS)
    for col in ("point", "path", "dirty-rate", "mem", "psp_bytes_per_s", "total-time",
                "downtime", "ram.transferred", "sev.converged", "seed"):
        assert col in c.columns and col in p.columns
    assert list(c["total-time"]) == list(p["total-time"])
    assert set(c["path"]) == set(PATHS)


def test_cli_plot_draws_against_any_key(tmp_path):
    """--plot with --x, --hue and --col draws total time, downtime and bytes in one PNG."""
    png = tmp_path / "s.png"
    rc = cli.main(["sweep", *TINY, "--workers", "0", "--store", str(tmp_path / "s"),
                   "--grid", "dirty-rate=0,400", "--grid", "workload=idle,random",
                   "--plot", str(png), "--x", "dirty-rate", "--hue", "path", "--col", "workload"])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_migrate_and_sweep_plots_give_a_path_the_same_colour(tmp_path):
    """Each path has one colour in both the migrate and the sweep plot, and the two differ."""
    rows = cli.sweep_run(_points(["dirty-rate=0"]), workers=0, store=tmp_path / "s")
    swept = cli.plot_sweep(rows, tmp_path / "a.png", x="dirty-rate")
    results = {}
    for p in ("psp", "helper"):
        args, cost = cli._point_args(_points([f"path={p}"])[0])
        r = cli._one(args, cost, p)
        results[p] = (r.stats, r.samples)
    migrated = cli.plot_remaining(results, tmp_path / "b.png")
    assert swept["psp"] == migrated["psp"] and swept["helper"] == migrated["helper"]
    assert swept["psp"] != swept["helper"]


def test_progress_shows_points_and_an_eta(tmp_path, capsys):
    """--progress reports points done / total, those taken from the store, and an ETA."""
    argv = ["sweep", *TINY, "--workers", "0", "--store", str(tmp_path / "s"), "--path", "psp",
            "--grid", "dirty-rate=0,400", "--progress"]
    cli.main(argv)
    assert "points 2/2" in capsys.readouterr().err
    cli.main(argv)
    err = capsys.readouterr().err
    assert "points 2/2 (2 from the store)" in err and "ETA" in err


def test_without_the_extra_points_run_in_process_with_a_note(tmp_path):
    """Without dask and pandas, sweep runs in process, writes CSV and says once what the extra
    brings."""
    code = textwrap.dedent(f"""
        import sys
        for m in ("distributed", "dask", "pandas", "pyarrow"):
            sys.modules[m] = None           # as if the sweep extra were not installed
        from sevcore.cli import main
        sys.exit(main(["sweep", *{TINY!r}, "--store", {str(tmp_path / 's')!r},
                       "--grid", "dirty-rate=0,400", "--out", {str(tmp_path / 'r.csv')!r}]))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("sevcore[sweep]") == 1
    assert (tmp_path / "r.csv").read_text().count("\n") == 1 + 2 * len(PATHS)


def test_a_killed_worker_loses_and_duplicates_no_row(tmp_path, client):
    """SIGKILL of a worker in the middle of a point: the point runs again elsewhere, and every
    point has exactly one row."""
    pts = _points([f"dirty-rate={','.join(str(r) for r in range(0, 3000, 500))}"], path="psp",
                  mem="8M")
    killed = []

    def kill_a_busy_worker(row):
        if killed:
            return
        busy = [w for w, tasks in client.processing().items() if tasks]
        if busy:
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    rows = cli.sweep_run(pts, client, store=tmp_path / "s", on_row=kill_a_busy_worker)
    assert killed
    assert [r["status"] for r in rows] == ["completed"] * len(pts)
    assert len({r["point"] for r in rows}) == len(pts)
    assert len(os.listdir(tmp_path / "s")) == len(pts)
    assert _same(rows, cli.sweep_run(pts, workers=0, store=tmp_path / "serial"))


# -- a real cluster -------------------------------------------------------------------------------

def _start(argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "dask", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **kw)


def test_a_scheduler_and_two_workers_on_loopback_run_a_grid(tmp_path, pd):
    """`dask scheduler` and two `dask worker` processes run a grid given --scheduler tcp://..."""
    distributed = pytest.importorskip("distributed")
    sched_file = tmp_path / "scheduler.json"
    procs = [_start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(sched_file)])]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for i in range(2):
            procs.append(_start(["worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                 "--no-dashboard", "--name", f"w{i}"]))
        with distributed.Client(address, timeout="60s") as c:
            c.wait_for_workers(2, timeout=60)
        out = tmp_path / "r.csv"
        rc = cli.main(["sweep", *TINY, "--scheduler", address, "--store", str(tmp_path / "s"),
                       "--grid", "dirty-rate=0,400", "--out", str(out)])
        assert rc == 0
        rows = pd.read_csv(out)
        assert list(rows["status"]) == ["completed"] * 2 * len(PATHS)
        serial = cli.sweep_run(_points(["dirty-rate=0,400"]), workers=0,
                               store=tmp_path / "serial")
        assert list(rows["total-time"]) == [r["total-time"] for r in serial]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
