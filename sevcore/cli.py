"""The ``sevcore`` command: migrate an SEV guest between two simulated hosts and compare paths.

    sevcore migrate                         # default guest, PSP path and helper path side by side
    sevcore migrate --mem 1G --dirty-rate 5000 --path psp --json out.json --plot out.png
    sevcore migrate --type sev-es --path psp --out-of-tree-vmsa   # an SEV-ES guest
    sevcore migrate --listen 4444           # target process
    sevcore migrate --to 127.0.0.1:4444     # source process
    sevcore sweep --dirty-rates 0,2500,10000 --plot sweep.png
    sevcore info                            # the CPU, its tiers and each C kernel's path

Times are simulated (the declared cost model, ``sevcore.hw.costmodel``) except "wall", which is
how long this machine took to do the work for real.
"""
import argparse
import json
import os
import sys
import time

import sevcore
from sevcore.core import cpu
from sevcore.hw.costmodel import CostModel, CostModelError
from sevcore.migration.engine import PATHS, MigrationError, MigrationParams, migrate
from sevcore.migration.machine import Machine
from sevcore.migration.remote import send_to, serve
from sevcore.migration.workload import VM_TYPES, WORKLOADS, GuestConfig, WorkloadError
from sevcore.uapi import SEV_POLICY_ES

DEFAULT_RATES = "0,1000,2000,4000,8000,16000"


def parse_size(text):
    """'256M', '1G', '4096' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMGT" else t
    try:
        value = float(num) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G)") from None
    if value <= 0 or value % 4096:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 4 KiB")
    return int(value)


# -- progress and tables -------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (only on a terminal, at most 10 updates a second)."""

    def __init__(self, label, enabled=None, stream=sys.stderr):
        self.label, self.stream = label, stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self.t0 = time.perf_counter()

    def __call__(self, ev):
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.1 and ev["sent"] < ev["pages"]):
            return
        self._last = now
        frac = ev["sent"] / ev["pages"] if ev["pages"] else 1.0
        bar = "#" * int(frac * 24)
        phase = "stop" if ev["phase"] == "stop" else f"pass {ev['iteration']}"
        self.stream.write(f"\r{self.label:>6} {phase:>8} [{bar:<24}] {ev['sent']:>9,}/"
                          f"{ev['pages']:,} pages  sim {ev['sim_ms'] / 1e3:8.2f} s  "
                          f"wall {now - self.t0:6.1f} s")
        self.stream.flush()

    def done(self):
        if self.enabled:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


def _fmt_ms(ms):
    return f"{ms / 1e3:,.2f} s" if ms >= 1000 else f"{ms:,.1f} ms"


ROWS = [
    ("status", lambda q: q["status"]),
    ("converged", lambda q: "yes" if q["sev"]["converged"] else "NO"),
    ("total time", lambda q: _fmt_ms(q["total-time"])),
    ("setup time", lambda q: _fmt_ms(q["setup-time"])),
    ("downtime", lambda q: _fmt_ms(q["downtime"])),
    ("iterations", lambda q: str(q["sev"]["iterations"])),
    ("transferred", lambda q: f"{q['ram']['transferred'] / 2**20:,.1f} MiB"),
    ("private pages", lambda q: f"{q['sev']['private-pages']:,}"),
    ("shared pages", lambda q: f"{q['sev']['shared-pages']:,}"),
    ("zero pages", lambda q: f"{q['ram']['duplicate']:,}"),
    ("PSP commands", lambda q: f"{sum(q['sev']['psp-commands'].values()):,}"),
    ("helper packets", lambda q: f"{q['sev']['helper-packets']:,}"),
    ("mbps", lambda q: f"{q['ram']['mbps']:,.1f}"),
    ("pages/s", lambda q: f"{q['ram']['pages-per-second']:,.0f}"),
    ("dirty pages/s", lambda q: f"{q['ram']['dirty-pages-rate']:,}"),
    ("dirty syncs", lambda q: str(q["ram"]["dirty-sync-count"])),
    ("guest check", lambda q: "not reported" if q["sev"]["bad-pages"] < 0 else
     f"{q['sev']['verified-pages']:,} pages, {q['sev']['bad-pages']} bad"),
    ("wall time", lambda q: f"{q['sev']['wall-time-s']:,.2f} s"),
]


def table(columns):
    """A text table: ``columns`` is ``{title: query_migrate dict}``."""
    names = list(columns)
    cells = [[title] + [fn(columns[n]) for n in names] for title, fn in ROWS]
    widths = [max(len(r[i]) for r in cells + [[""] + names]) for i in range(len(names) + 1)]
    head = "  ".join([" " * widths[0]] + [n.rjust(w) for n, w in zip(names, widths[1:])])
    lines = [head, "-" * len(head)]
    for row in cells:
        lines.append("  ".join([row[0].ljust(widths[0])] +
                               [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install 'sevcore[plot]'") from None
    return plt


def plot_remaining(results, path):
    """Pages still to send over simulated time, one line per migration path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (stats, samples) in results.items():
        if samples:
            ax.plot([s[0] / 1e9 for s in samples], [s[1] for s in samples], label=name,
                    drawstyle="steps-post")
        ax.axvline(stats.total_ns / 1e9, ls=":", lw=0.8,
                   color=ax.lines[-1].get_color() if ax.lines else None)
    ax.set_xscale("log")        # the paths differ by orders of magnitude
    ax.set_xlabel("simulated time (s, log scale)")
    ax.set_ylabel("pages left in the current pass")
    ax.set_title("Live migration of an SEV guest: pages remaining")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows, path):
    """Total time and downtime against the guest's dirty rate, per path; unconverged runs
    are drawn hollow."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, ax, title in (("total-time", axes[0], "total time"),
                           ("downtime", axes[1], "downtime")):
        for p in sorted({r["path"] for r in rows}):
            pts = [r for r in rows if r["path"] == p]
            xs = [r["dirty_rate"] for r in pts]
            ys = [r[key] / 1e3 for r in pts]
            line, = ax.plot(xs, ys, marker="o", label=p)
            for r, x, y in zip(pts, xs, ys):
                if not r["converged"]:
                    ax.plot([x], [y], marker="o", mfc="white", mec=line.get_color(), ms=9)
        if key == "downtime":
            ax.axhline(rows[0]["downtime_limit_ms"] / 1e3, ls="--", lw=0.8, color="grey",
                       label="downtime limit")
        ax.set_yscale("log")
        ax.set_xlabel("guest dirty rate (pages/s)")
        ax.set_ylabel(f"{title}, simulated (s)")
        ax.set_title(f"{title} (hollow: did not converge)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- commands ----------------------------------------------------------------------------------

def _guest_args(ap):
    g = ap.add_argument_group("guest")
    g.add_argument("--mem", type=parse_size, default=parse_size("256M"),
                   help="guest memory (default 256M)")
    g.add_argument("--vcpus", type=int, default=1, help="guest vCPUs (default 1)")
    g.add_argument("--shared", type=parse_size, default=parse_size("2M"),
                   help="memory the guest shares with the host (default 2M)")
    g.add_argument("--workload", choices=WORKLOADS, default="random",
                   help="how the guest dirties memory (default random)")
    g.add_argument("--dirty-rate", type=float, default=None,
                   help="pages/s the guest writes (default: the cost model's dirty_pages_per_s)")
    g.add_argument("--hot-fraction", type=float, default=0.1,
                   help="hotset workload: fraction of memory it writes (default 0.1)")
    g.add_argument("--type", choices=tuple(VM_TYPES), default="sev",
                   help="guest type (default sev; sev-es adds SEV_POLICY_ES to the policy)")
    g.add_argument("--policy", type=lambda s: int(s, 0), default=0,
                   help="SEV guest policy (default 0)")
    m = ap.add_argument_group("migration")
    m.add_argument("--path", choices=PATHS + ("both",), default="both",
                   help="private pages through the PSP, the in-guest helper, or both")
    m.add_argument("--max-iterations", type=int, default=30,
                   help="pre-copy passes before stop-and-copy is forced (default 30)")
    m.add_argument("--ring-buffer", action="store_true",
                   help="charge PSP page commands as ring-buffer batches")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="cost-model parameter (repeatable); --list-costs shows them")
    m.add_argument("--out-of-tree-vmsa", action="store_true",
                   help="give both hosts' KVM the out-of-tree KVM_SEV_SEND/RECEIVE_UPDATE_VMSA "
                        "(not in upstream KVM; the PSP path needs it for SEV-ES guests)")
    m.add_argument("--list-costs", action="store_true", help="print the cost model and exit")
    o = ap.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write all statistics as JSON")
    o.add_argument("--plot", metavar="FILE", help="write a plot (PNG; needs matplotlib)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


def _cost(args):
    try:
        return CostModel.from_overrides(args.set)
    except CostModelError as e:
        raise SystemExit(f"sevcore: {e}") from None


def _kvm(args):
    """A fresh Host's /dev/kvm, with the out-of-tree VMSA ioctls if asked for."""
    kvm = sevcore.Kvm()
    kvm.host.kvm_sev.out_of_tree_vmsa_migration = args.out_of_tree_vmsa
    return kvm


def _config(args, cost, kvm, dirty_rate=None, path="psp"):
    rate = dirty_rate if dirty_rate is not None else (
        args.dirty_rate if args.dirty_rate is not None else cost.dirty_pages_per_s)
    vm_type = VM_TYPES[args.type]
    policy = args.policy | (SEV_POLICY_ES if args.type == "sev-es" else 0)
    try:
        return GuestConfig(mem_size=args.mem, nr_vcpus=args.vcpus, shared_size=args.shared,
                           workload=args.workload, dirty_pages_per_s=rate,
                           hot_fraction=args.hot_fraction, policy=policy, vm_type=vm_type,
                           c_bit=kvm.host.c_bit, **_helper_config(path, args.mem, cost))
    except WorkloadError as e:
        raise SystemExit(f"sevcore: {e}") from None


def _helper_config(path, mem_size, cost):
    """The helper path's guest boots a migration helper with the cost model's helper vCPUs."""
    return {"helper_vcpus": cost.helper_vcpus} if path == "helper" else {}


def _params(args, cost, path):
    return MigrationParams(path=path, cost=cost, max_iterations=args.max_iterations,
                           ring_buffer=args.ring_buffer)


def _one(args, cost, path, dirty_rate=None, label=None):
    """Launch a fresh guest on a fresh source Host and migrate it to a fresh target Host."""
    src = _kvm(args)
    machine = Machine.launch(src, _config(args, cost, src, dirty_rate, path))
    bar = Progress(label or path, enabled=False if args.quiet else None)
    try:
        r = migrate(machine, _kvm(args), _params(args, cost, path), progress=bar)
    finally:
        bar.done()
    return r


def cmd_migrate(args):
    cost = _cost(args)
    if args.list_costs:
        for name, value, unit, doc in cost.describe():
            print(f"{name} = {value:g} {unit}\n    {doc}\n")
        return 0
    if args.listen is not None:
        return _listen(args)
    if args.to:
        return _send(args, cost)
    paths = PATHS if args.path == "both" else (args.path,)
    print(f"Migrating a {args.mem >> 20} MiB {args.type.upper()} guest ({args.workload}, "
          f"{args.dirty_rate if args.dirty_rate is not None else cost.dirty_pages_per_s:g} "
          f"pages/s dirtied) between two simulated hosts", file=sys.stderr)
    results, status = {}, 0
    for p in paths:
        try:
            r = _one(args, cost, p)
            results[p] = (r.stats, r.samples)
        except MigrationError as e:
            print(f"sevcore: {p} path: {e}", file=sys.stderr)
            status = 1
            if e.stats is not None:
                results[p] = (e.stats, [])
    if not results:
        return status
    print(table({p: s.query_migrate() for p, (s, _) in results.items()}))
    if len(results) == 2 and all(s.status == "completed" for s, _ in results.values()):
        a, b = results["psp"][0].total_ns, results["helper"][0].total_ns
        print(f"\nThe helper path took {a / b:,.1f}x less simulated time than the PSP path."
              if b else "")
    if args.json:
        _write_json(args.json, {p: s.to_dict() for p, (s, _) in results.items()})
    if args.plot:
        plot_remaining(results, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return status


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    print(f"json: {path}", file=sys.stderr)


def _listen(args):

    def listening(addr):
        print(f"listening on {addr[0]}:{addr[1]}", file=sys.stderr, flush=True)
        if args.port_file:
            with open(args.port_file + ".tmp", "w") as f:
                f.write(str(addr[1]))
            os.replace(args.port_file + ".tmp", args.port_file)
    try:
        t = serve(args.listen, _kvm(args), args.bind, on_listening=listening)
    except Exception as e:
        print(f"sevcore: incoming migration failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    r = t.result
    print(f"guest resumed: {r['checked']:,} pages checked, {r['bad']} bad")
    return 0 if r["bad"] == 0 else 1


def _send(args, cost):
    host, _, port = args.to.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"sevcore: --to wants HOST:PORT, not {args.to!r}")
    path = PATHS[0] if args.path == "both" else args.path
    src = _kvm(args)
    machine = Machine.launch(src, _config(args, cost, src, path=path))
    bar = Progress(path, enabled=False if args.quiet else None)
    try:
        s = send_to(host, int(port), machine, _params(args, cost, path), progress=bar)
    except MigrationError as e:
        bar.done()
        print(f"sevcore: {e}", file=sys.stderr)
        return 1
    bar.done()
    print(table({path: s.stats.query_migrate()}))
    if args.json:
        _write_json(args.json, {path: s.stats.to_dict()})
    if args.plot:
        plot_remaining({path: (s.stats, s.samples)}, args.plot)
    return 0


def cmd_sweep(args):
    cost = _cost(args)
    try:
        rates = [float(r) for r in args.dirty_rates.split(",")]
    except ValueError:
        raise SystemExit(f"sevcore: --dirty-rates wants numbers, not {args.dirty_rates!r}")
    paths = PATHS if args.path == "both" else (args.path,)
    rows = []
    for rate in rates:
        for p in paths:
            try:
                st = _one(args, cost, p, dirty_rate=rate, label=f"{p} {rate:g}").stats
            except MigrationError as e:
                print(f"sevcore: {p} at {rate:g} pages/s: {e}", file=sys.stderr)
                continue
            q = st.query_migrate()
            rows.append({"path": p, "dirty_rate": rate, "total-time": q["total-time"],
                         "downtime": q["downtime"], "converged": st.converged,
                         "iterations": len(st.iterations), "transferred": q["ram"]["transferred"],
                         "wall_s": st.wall_s, "downtime_limit_ms": cost.downtime_limit_ms})
    head = f"{'path':>6} {'pages/s':>8} {'total':>12} {'downtime':>12} {'passes':>6} " \
           f"{'converged':>9} {'MiB sent':>9} {'wall':>7}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['path']:>6} {r['dirty_rate']:>8g} {_fmt_ms(r['total-time']):>12} "
              f"{_fmt_ms(r['downtime']):>12} {r['iterations']:>6} "
              f"{'yes' if r['converged'] else 'NO':>9} {r['transferred'] / 2**20:>9,.1f} "
              f"{r['wall_s']:>6.1f}s")
    if args.json:
        _write_json(args.json, rows)
    if args.plot and rows:
        plot_sweep(rows, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0 if rows else 1


def cmd_info(args):
    return cpu.main(["--tier", args.tier] if args.tier else [])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="sevcore", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("migrate", help="migrate a guest (both paths side by side by default)")
    _guest_args(m)
    r = m.add_argument_group("two processes")
    r.add_argument("--listen", type=int, metavar="PORT",
                   help="be the target: wait for one migration on PORT")
    r.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    r.add_argument("--port-file", help="with --listen: write the port here once listening")
    r.add_argument("--to", metavar="HOST:PORT", help="be the source: migrate to HOST:PORT")
    m.set_defaults(fn=cmd_migrate)
    s = sub.add_parser("sweep", help="migrate at several dirty rates, per path")
    _guest_args(s)
    s.set_defaults(mem=parse_size("64M"))
    s.add_argument("--dirty-rates", default=DEFAULT_RATES,
                   help=f"comma-separated pages/s (default {DEFAULT_RATES})")
    s.set_defaults(fn=cmd_sweep)
    i = sub.add_parser("info", help="the CPU, its tiers and the path each C kernel takes "
                                    "(paste it into a performance report)")
    i.add_argument("--tier", help="report with this tier forced (avx512, avx2, aesni, portable)")
    i.set_defaults(fn=cmd_info)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
