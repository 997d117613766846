"""The plots sevcore draws, with one colour per migration path in all of them.

``PATH_COLOURS`` is the only place a path's colour is chosen: ``sevcore migrate --plot`` (pages
remaining over time) and ``sevcore sweep --plot`` (statistics against a grid key) both take it
from here, so the PSP path is the same colour in every figure.
"""
import itertools
import math

#: A path's colour in every plot (matplotlib's tab10 blue and orange).
PATH_COLOURS = {"psp": "#1f77b4", "helper": "#ff7f0e"}
_SPARE = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

#: What ``sevcore sweep --plot`` draws: (column, axis label, scale from the column's unit).
METRICS = (("total-time", "total time, simulated (s)", 1e-3),
           ("downtime", "downtime, simulated (s)", 1e-3),
           ("ram.transferred", "transferred (MiB)", 2.0 ** -20))

#: Grid keys in bytes, drawn in MiB (and written as sizes in the sweep table).
BYTE_KEYS = frozenset({"mem", "shared"})
#: Units of the x axis for the grid keys that have one.
_UNITS = {"mem": "MiB", "shared": "MiB", "dirty-rate": "pages/s", "downtime_limit_ms": "ms"}


def pyplot():
    """matplotlib.pyplot on the Agg backend; exits with a hint when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install 'sevcore[plot]'") from None
    return plt


def path_colour(path):
    """The colour of migration path ``path`` (a spare colour for a path not named here)."""
    if path not in PATH_COLOURS:
        PATH_COLOURS[path] = _SPARE[(len(PATH_COLOURS) - 2) % len(_SPARE)]
    return PATH_COLOURS[path]


def _values(rows, key):
    out = []
    for r in rows:
        if r.get(key) not in out:
            out.append(r.get(key))
    return out


def _label(key, value):
    if key in BYTE_KEYS and isinstance(value, (int, float)):
        return f"{key} {value / 2**20:g} MiB"
    return f"{key} {value}"


def _log_helps(values):
    """A log axis when positive values span more than 20x."""
    pos = [v for v in values if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
    return len(pos) == len([v for v in values if v is not None]) and len(pos) > 1 and \
        max(pos) / min(pos) > 20


def plot_sweep(rows, out, x, hue="path", col=None):
    """Total time, downtime and bytes transferred against grid key ``x``: one line per value of
    ``hue`` (mean over repeats and any key not drawn, each run a dot), one column of panels per
    value of ``col``; hollow markers did not converge. Writes a PNG to ``out``; returns the
    colour of each value of ``hue``."""
    plt = pyplot()
    done = [r for r in rows if r.get("status") == "completed"]
    if not done:
        raise SystemExit("sevcore: no completed point to plot")
    cols = _values(done, col) if col else [None]
    hues = _values(done, hue)
    xs = _values(done, x)
    categorical = not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    scale = 2.0 ** -20 if x in BYTE_KEYS else 1.0
    pos = {v: i for i, v in enumerate(xs)} if categorical else None
    colours = _hue_colours(hue, hues, plt)
    # Colour is the path's when hue is the path; otherwise each path keeps a line style.
    paths = _values(done, "path") if hue != "path" else [None]
    styles = dict(zip(paths, ("-", "--", ":", "-.") * len(paths)))
    fig, axes = plt.subplots(len(METRICS), len(cols), figsize=(4.6 * len(cols) + 1.2, 9.5),
                             squeeze=False, sharex=True)
    for j, c in enumerate(cols):
        in_col = [r for r in done if col is None or r.get(col) == c]
        for i, (metric, ylabel, unit) in enumerate(METRICS):
            ax = axes[i][j]
            ys_all = []
            for h, p in itertools.product(hues, paths):
                pts = [r for r in in_col
                       if r.get(hue) == h and (p is None or r.get("path") == p)]
                if not pts:
                    continue
                line_x, line_y, converged = [], [], []
                for xv in sorted({r[x] for r in pts}, key=lambda v: pos[v] if pos else v):
                    at = [r for r in pts if r[x] == xv]
                    ys = [r[metric] * unit for r in at]
                    ys_all += ys
                    px = pos[xv] if pos else xv * scale
                    line_x.append(px)
                    line_y.append(sum(ys) / len(ys))
                    converged.append(all(r.get("sev.converged", True) for r in at))
                    if len(at) > 1:
                        ax.plot([px] * len(ys), ys, ".", color=colours[h], alpha=0.35, ms=4)
                label = h if hue == "path" else _label(hue, h)
                ax.plot(line_x, line_y, color=colours[h], ls=styles[p], marker="o",
                        markevery=[i for i, c in enumerate(converged) if c],
                        label=label + (f", {p}" if len(paths) > 1 else ""))
                hollow = [i for i, c in enumerate(converged) if not c]
                ax.plot([line_x[i] for i in hollow], [line_y[i] for i in hollow], "o",
                        mfc="white", mec=colours[h], ms=7)
            if metric == "downtime":
                limits = {r.get("downtime_limit_ms") for r in in_col}
                if len(limits) == 1 and None not in limits:
                    ax.axhline(limits.pop() * 1e-3, ls="--", lw=0.8, color="grey",
                               label="downtime limit")
            if _log_helps(ys_all):
                ax.set_yscale("log")
            if not categorical and _log_helps(xs):
                ax.set_xscale("log")
            if j == 0:
                ax.set_ylabel(ylabel)
            if i == 0 and col:
                ax.set_title(_label(col, c))
            if i == len(METRICS) - 1:
                ax.set_xlabel(f"{x} ({_UNITS[x]})" if x in _UNITS else x)
                if categorical:
                    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
            ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    fig.suptitle("hollow markers: pre-copy did not converge; dashed: the downtime limit",
                 fontsize="medium")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return colours


def _hue_colours(hue, values, plt):
    """Paths keep their colours; any other key is coloured along viridis."""
    if hue == "path":
        return {v: path_colour(v) for v in values}
    cmap = plt.get_cmap("viridis")
    n = max(1, len(values) - 1)
    return {v: cmap(0.9 * i / n) for i, v in enumerate(values)}
