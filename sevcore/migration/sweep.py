"""The sweep engine: many migrations over a grid of parameters, on Dask or one after another.

A *point* is one migration: a flat dict of parameter values (every option of ``sevcore migrate``
and every cost-model parameter, resolved), keyed by a hash of those values and the sevcore
version. The engine knows nothing of what the values mean: the caller gives it the option table
to parse a grid with (:func:`expand`) and the function that runs a point (``run_point(params) ->
row``); ``sevcore.cli`` and ``sevcore.sweep`` give it the ``migrate`` command's.

Execution (:func:`execute`): each point not already in the :class:`Store` is one Dask task (key =
the point's hash, so a grid that names a point twice runs it once). A task that raises is retried
(``retries``); a worker process that dies has its points re-run on another worker by the
scheduler (``distributed.scheduler.allowed-failures``). A point that fails with a user error
(a guest the workload cannot run, a migration the target refused) is not an exception: its row
says ``failed`` and carries the message. Rows are written to the store as they arrive, one file
per point, so a sweep stopped at any moment loses only the points in flight, and a point that
ran twice (its worker died after finishing it) is still one row.

Without Dask (``client=None``) the same points run in this process, one after another.
"""
import csv
import difflib
import hashlib
import importlib.util
import itertools
import json
import math
import os
import sys
import time

import sevcore
from sevcore.migration import engine

#: Columns every row has before its parameters and statistics.
ID_COLUMNS = ("point", "sevcore-version", "status", "error")

#: What a LocalCluster's workers import as they start.
PRELOAD = "sevcore.cli"

#: Dask's settings of the environment its nanny starts worker processes with.
NANNY_ENV = "distributed.nanny.pre-spawn-environ"

#: The words a boolean option's grid values may use.
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SweepError(ValueError):
    """A grid key or value that cannot be run; raised before anything runs."""


class PointFailed(Exception):
    """What a point runner raises for a user error: recorded as a failed row, not retried."""


# -- the grid -------------------------------------------------------------------------------------

class Option:
    """One grid key: its name as the user writes it and how to parse a value of it. ``parse``
    takes a string and returns a JSON value or raises ValueError/TypeError; ``numeric`` says
    whether ranges ``a:b:step`` make sense; ``expand`` turns one value into the values it stands
    for (a path of ``both``); ``dest`` is the caller's own name for it."""

    def __init__(self, name, parse, numeric=False, expand=None, dest=None):
        self.name, self.parse, self.numeric, self.dest = name, parse, numeric, dest
        self.expand = expand or (lambda v: [v])

    def __repr__(self):
        return f"Option({self.name!r})"


def parse_bool(text):
    """'yes'/'no', 'true'/'false', 'on'/'off', '1'/'0' -> bool."""
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r} (use one of {', '.join(_TRUE + _FALSE)})")


def lookup(options, key):
    """The Option a grid key names: exact, then with ``_`` and ``-`` swapped. Raises SweepError
    with the nearest names for an unknown key."""
    for k in (key, key.replace("_", "-"), key.replace("-", "_")):
        if k in options:
            return options[k]
    near = difflib.get_close_matches(key, list(options), n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise SweepError(f"--grid {key}: not a migrate option or cost-model parameter{hint} "
                     f"(keys: {', '.join(options)})")


def _range(opt, text):
    """``start:stop:step`` (inclusive of ``stop``) or ``start:stop:*factor`` (geometric)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError("a range is start:stop:step or start:stop:*factor")
    start, stop = opt.parse(parts[0]), opt.parse(parts[1])
    geometric = parts[2].startswith("*")
    step = float(parts[2][1:]) if geometric else opt.parse(parts[2])
    if geometric and not (step > 1 and start > 0):
        raise ValueError("a geometric range needs start > 0 and a factor > 1")
    if not geometric and not step > 0:
        raise ValueError("a range's step must be > 0")
    if stop < start:
        raise ValueError("a range's stop is below its start")
    out, i = [], 0
    while True:
        v = start * step ** i if geometric else start + i * step
        if v > stop * (1 + 1e-12):
            break
        out.append(v)
        i += 1
        if i > 10_000:
            raise ValueError("a range of more than 10,000 values")
    integral = all(isinstance(x, int) and not isinstance(x, bool) for x in (start, stop)) and \
        (geometric or isinstance(step, int))
    # Re-parse each value so a size range keeps its checks (multiples of 4 KiB ...).
    return [opt.parse(str(int(round(v)) if integral else repr(float(v)))) for v in out]


def parse_values(opt, text):
    """The values of ``KEY=text``: comma-separated, each a value or a range."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise SweepError(f"--grid {opt.name}: an empty value in {text!r}")
        try:
            if ":" in item and opt.numeric:
                values += _range(opt, item)
            else:
                values.append(opt.parse(item))
        except (ValueError, TypeError, ArithmeticError) as e:
            raise SweepError(f"--grid {opt.name}={item}: {e}") from None
    out = []
    for v in values:
        out += [x for x in opt.expand(v) if x not in out]
    return out


def parse_grid(options, spec):
    """``["KEY=V1,V2", ...]`` or ``{key: "V1,V2" | value | [values]}`` -> ``{key: [values]}`` in
    the order given. Raises SweepError for an unknown key, a key given twice, or a value its
    option rejects."""
    items = []
    if hasattr(spec, "items"):
        items = list(spec.items())
    else:
        for text in spec:
            key, sep, values = str(text).partition("=")
            if not sep or not key.strip():
                raise SweepError(f"--grid {text!r}: expected KEY=V1,V2,...")
            items.append((key.strip(), values))
    grid = {}
    for key, values in items:
        opt = lookup(options, key)
        if opt.name in grid:
            raise SweepError(f"--grid {opt.name} is given twice")
        grid[opt.name] = parse_values(opt, values) if isinstance(values, str) \
            else _typed(opt, values)
        if not grid[opt.name]:
            raise SweepError(f"--grid {opt.name} has no values")
    return grid


def expand(grid, base, repeat=1, seed_key="seed"):
    """Every point of ``grid`` (``{key: [values]}``) over ``base`` (the values of everything not
    in the grid), the last key varying fastest; ``repeat`` > 1 runs each point with seeds
    1..repeat (``seed_key``). Returns a list of param dicts."""
    grid = dict(grid)
    if repeat < 1:
        raise SweepError(f"--repeat must be >= 1, not {repeat}")
    if repeat > 1:
        if seed_key in grid:
            raise SweepError(f"--repeat sets {seed_key}; do not also put it in the grid")
        grid[seed_key] = list(range(1, repeat + 1))
    keys = list(grid)
    return [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*grid.values())]


def _typed(opt, values):
    """Grid values given as Python objects (the notebook API): each checked as if typed."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        values = [values]
    out = []
    for v in values:
        try:
            parsed = opt.parse(v if isinstance(v, str) else _text(v))
        except (ValueError, TypeError) as e:
            raise SweepError(f"grid {opt.name}={v!r}: {e}") from None
        out += [x for x in opt.expand(parsed) if x not in out]
    return out


def _text(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def point_key(params, version):
    """The point's identity: SHA-256 (first 16 hex digits) of its parameters and the version."""
    blob = json.dumps({"params": params, "version": version}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- the results store ----------------------------------------------------------------------------

class Store:
    """Finished points, one JSON file per point named by its key, in ``directory``. A file
    appears whole (written aside, then renamed) or not at all."""

    def __init__(self, directory):
        self.dir = os.fspath(directory)
        os.makedirs(self.dir, exist_ok=True)

    def path(self, key):
        return os.path.join(self.dir, f"{key}.json")

    def get(self, key):
        """The row stored for ``key``, or None."""
        try:
            with open(self.path(key)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def put(self, key, row):
        tmp = self.path(key) + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(row, f)
        os.replace(tmp, self.path(key))

    def pending(self, points, version):
        """The keys of ``points`` not yet stored, each once, in order."""
        out = []
        for p in points:
            k = point_key(p, version)
            if k not in out and not os.path.exists(self.path(k)):
                out.append(k)
        return out


# -- running ---------------------------------------------------------------------------------------

class Eta:
    """``points done/total`` with an estimate of the time left, on one line of ``stream``."""

    def __init__(self, total, skipped=0, stream=None, enabled=True):
        self.total, self.done, self.skipped = total, skipped, skipped
        self.stream, self.enabled = stream, enabled
        self.t0 = time.perf_counter()

    def line(self):
        ran = self.done - self.skipped
        elapsed = time.perf_counter() - self.t0
        left = self.total - self.done
        eta = f"{elapsed / ran * left:,.0f} s" if ran else "?"
        return (f"points {self.done}/{self.total}"
                + (f" ({self.skipped} from the store)" if self.skipped else "")
                + f"  elapsed {elapsed:,.0f} s  ETA {eta}")

    def show(self):
        if self.enabled:
            end = "\n" if self.done == self.total else ""
            stream = self.stream or sys.stderr
            stream.write("\r" + self.line() + end)
            stream.flush()

    def step(self):
        self.done += 1
        self.show()


def execute(points, run_point, store, version, client=None, retries=1, on_row=None,
            progress=None, weight=None):
    """Run every point of ``points`` not already in ``store``; return the rows of all of them in
    the order of ``points``. ``client``: a ``distributed.Client`` or None (in process).
    ``on_row(row)`` is called as each new row is stored; ``progress`` is an :class:`Eta`.
    ``weight(params)``: a sort key, larger for a point expected to take longer; on Dask the
    heaviest points go first (task priorities), so that the last ones to finish are short and
    the workers end together (longest processing time first)."""
    keys = [point_key(p, version) for p in points]
    todo = {}
    for k, p in zip(keys, points):
        if k not in todo and store.get(k) is None:
            todo[k] = p

    unstored = {}

    def finish(key, row):
        row = {**_id_row(key, version, row), **row}
        if row["sevcore-version"] == version:
            store.put(key, row)
        else:                        # not this version's result: the next run tries again
            unstored[key] = row
        if on_row:
            on_row(row)
        if progress:
            progress.step()

    if progress:
        progress.show()
    if client is None:
        for key, params in todo.items():
            finish(key, run_task(run_point, params, version))
    else:
        _on_dask(client, todo, run_point, version, retries, finish, weight)
    rows = []
    for k in keys:
        row = store.get(k) or unstored.get(k)
        if row is None:              # only when Dask gave up on it: reported, not stored
            row = {**_id_row(k, version, {}), "status": "lost",
                   "error": "not run: its workers kept dying"}
        rows.append(row)
    return rows


def _id_row(key, version, row):
    return {"point": key, "sevcore-version": row.get("sevcore-version", version),
            "status": row.get("status", ""), "error": row.get("error", "")}


def run_task(run_point, params, version, inline=False):
    """One point, on a worker or in process: its row, with the version of sevcore that made it.
    A user error (PointFailed) becomes a failed row; anything else propagates, so Dask may
    retry it. ``inline``: the point's migrations keep to one core (engine.set_inline), as a
    worker that runs one point per core wants; in process the point overlaps its source and
    target on two."""
    if inline:
        engine.set_inline(True)
    if sevcore.__version__ != version:
        return {**params, "status": "failed", "sevcore-version": sevcore.__version__,
                "error": f"this worker runs sevcore {sevcore.__version__}, the sweep "
                         f"{version}"}
    try:
        row = run_point(params)
    except PointFailed as e:
        row = {**params, "status": "failed", "error": str(e)}
    row.setdefault("sevcore-version", version)
    return row


def _on_dask(client, todo, run_point, version, retries, finish, weight=None):
    """Submit each point as one task, heaviest first by ``weight`` (its priority: Dask runs
    higher ones first), and store rows as they complete."""
    # the optional extra: only on this path
    from distributed import as_completed
    from distributed.scheduler import KilledWorker
    order = list(todo)
    if weight is not None:
        order.sort(key=lambda k: weight(todo[k]), reverse=True)
    futures = {client.submit(run_task, run_point, todo[k], version, True,
                             key=f"sevcore-point-{k}", retries=retries, pure=False,
                             priority=len(order) - i): k
               for i, k in enumerate(order)}
    for fut in as_completed(list(futures)):
        key = futures[fut]
        if fut.status == "finished":
            finish(key, fut.result())
        else:
            exc = fut.exception()
            if isinstance(exc, KilledWorker):
                print(f"sevcore: point {key}: {exc}", file=sys.stderr)
            else:
                finish(key, {**todo[key], "status": "failed",
                             "error": f"{type(exc).__name__}: {exc} "
                                      f"(after {retries + 1} tries)"})
        fut.release()


# -- Dask clusters ---------------------------------------------------------------------------------

def have(*modules):
    """Whether every one of ``modules`` is installed (found, not imported)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except (ImportError, ValueError):        # ValueError: blocked in sys.modules
        return False


def have_dask():
    """Whether the ``sweep`` extra (dask[distributed]) is installed."""
    return have("distributed")


def local_workers(npoints, memory_per_point, workers=None):
    """How many one-thread worker processes a LocalCluster gets: ``workers`` if given, else one
    per CPU this process may use, no more than fit in memory and no more than points."""
    if workers is not None:
        if workers < 1:
            raise SweepError(f"--workers must be >= 1, not {workers}")
        return workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 0
    fit = max(1, avail // memory_per_point) if avail else cpus
    return max(1, min(cpus or 1, fit, npoints))


def open_client(scheduler=None, workers=1, memory_limit="auto", quiet=False):
    """A ``distributed.Client``: to ``scheduler`` (``tcp://HOST:PORT``) or to a new LocalCluster
    of ``workers`` processes with one thread each. Prints the dashboard link when there is one."""
    import logging
    # the optional extra: only on this path
    import dask
    from distributed import Client, LocalCluster
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise SweepError(f"--scheduler {scheduler}: cannot connect: {e}") from None
    else:
        # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins
        # glibc's mmap threshold at 128 KiB: every page buffer of a migration is then a fresh
        # mmap whose pages fault in, and a 64 MiB point took 2x as long (bench/bench_sweep.py).
        # The workers keep glibc's adaptive defaults instead.
        with dask.config.set({f"{NANNY_ENV}.MALLOC_TRIM_THRESHOLD_": None}):
            # Each worker imports sevcore as it starts (a Dask preload), not in its first point.
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   memory_limit=memory_limit, dashboard_address=":0",
                                   silence_logs=logging.ERROR, preload=[PRELOAD])
        client = Client(cluster)
    # A local scheduler serves a real dashboard only with bokeh (the extra brings it); a
    # remote one is its owner's business, so its link is printed as it is.
    served = "dashboard" in client.scheduler_info().get("services", {}) and \
        (scheduler or have("bokeh"))
    if not quiet and served:
        print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
    return client


def close_client(client):
    """Close ``client`` and the LocalCluster it started, if any."""
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


# -- tables ----------------------------------------------------------------------------------------

def flatten(d, prefix=""):
    """``{"ram": {"total": 1}}`` -> ``{"ram.total": 1}``."""
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def columns(rows):
    """Every column of ``rows`` in first-seen order, the identity columns first."""
    cols = list(ID_COLUMNS)
    for r in rows:
        cols += [c for c in r if c not in cols]
    return cols


def write_table(rows, path):
    """Write ``rows`` as CSV, or as Parquet when ``path`` ends in ``.parquet`` (needs pandas and
    pyarrow)."""
    if str(path).endswith(".parquet"):
        frame(rows).to_parquet(path, index=False)
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns(rows), restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                        for k, v in r.items()})


def frame(rows):
    """``rows`` as a pandas DataFrame, one column per key."""
    import pandas as pd          # the optional extra: only for DataFrames and Parquet
    return pd.DataFrame(rows, columns=columns(rows))
