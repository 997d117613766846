"""Parameter sweeps from Python: the engine behind ``sevcore sweep``, returning a DataFrame.

>>> import sevcore.sweep
>>> df = sevcore.sweep.run({"dirty-rate": "0:8000:2000", "path": "both"},
...                        base={"mem": "64M"})                         # doctest: +SKIP
>>> df.pivot_table("total-time", "dirty-rate", "path")                  # doctest: +SKIP

Grid keys are those of ``sevcore sweep --grid``: every ``sevcore migrate`` option that describes
a migration (``mem``, ``dirty-rate``, ``workload``, ``path``, ``max-iterations``, ...) and every
cost-model parameter (``psp_bytes_per_s``, ``helper_vcpus``, ...). Values are lists, single
values, or the command line's text (``"0:16000:2000"``, ``"64M,256M"``).
"""
from sevcore import cli
from sevcore.migration import sweep as engine

#: What a bad grid raises, before anything runs.
SweepError = engine.SweepError

__all__ = ["SweepError", "keys", "points", "run"]


def keys():
    """The grid keys: migrate options, then cost-model parameters."""
    return list(cli.sweep_options())


def points(grid, base=None, repeat=1):
    """The points ``grid`` expands to over ``base`` (the sweep command's defaults, with
    ``base``'s values on top): a list of dicts of every grid key. Raises SweepError."""
    return cli.sweep_points(grid, cli.sweep_base(**(base or {})), repeat)


def run(grid, scheduler=None, *, base=None, repeat=1, workers=None, store=cli.DEFAULT_STORE,
        progress=False):
    """Run every point of ``grid`` and return a pandas DataFrame, one row per point and path
    with every parameter and every query-migrate statistic as a column.

    ``scheduler``: None for a LocalCluster sized to this machine (``workers`` processes; 0 runs
    in this process), ``"tcp://HOST:PORT"`` for a running Dask cluster, or a
    ``distributed.Client``. Finished points are kept in ``store`` and not run again. Raises
    SweepError for a bad grid before anything runs."""
    pts = points(grid, base, repeat)
    return engine.frame(cli.sweep_run(pts, scheduler, workers, store, progress))
