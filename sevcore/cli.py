"""The ``sevcore`` command: migrate an SEV guest between two simulated hosts and compare paths.

    sevcore migrate                         # default guest, PSP path and helper path side by side
    sevcore migrate --mem 1G --dirty-rate 5000 --path psp --json out.json --plot out.png
    sevcore migrate --type sev-es --path psp --out-of-tree-vmsa   # an SEV-ES guest
    sevcore migrate --type sev-es --path helper --postcopy        # one with upstream KVM
    sevcore migrate --type snp --path ma --mem 64M    # an SNP guest through migration agents
    sevcore migrate --type snp --path ma --listen 4444 / --to 127.0.0.1:4444   # the same, TCP
    sevcore migrate --listen 4444           # target process
    sevcore migrate --to 127.0.0.1:4444     # source process
    sevcore sweep --dirty-rates 0,2500,10000 --plot sweep.png
    sevcore sweep --grid mem=64M,256M --grid dirty-rate=0:8000:2000 --out r.parquet --plot r.png
    sevcore info                            # the CPU, its tiers and each C kernel's path
    sevcore evacuate --guests 8 --mem 256M --path both --link 10G --plot evac.png

Times are simulated (the declared cost model, ``sevcore.hw.costmodel``) except "wall", which is
how long this machine took to do the work for real.
"""
import argparse
import functools
import json
import os
import sys
import time
import types

import sevcore
from sevcore.core import cpu
from sevcore.hw.costmodel import CostModel, CostModelError
from sevcore.migration import sweep
from sevcore.migration.engine import PATHS, MigrationError, MigrationParams, migrate
from sevcore.migration.machine import Machine
from sevcore.migration.remote import send_to, serve
from sevcore.migration.workload import VM_TYPES, WORKLOADS, GuestConfig, WorkloadError
from sevcore.plots import BYTE_KEYS, path_colour, plot_sweep, pyplot as _pyplot
from sevcore.uapi import SEV_POLICY_ES
from sevcore.vmm.dirty_ring import DEFAULT_RING_ENTRIES

DEFAULT_RATES = "0,1000,2000,4000,8000,16000"


class _Parser(argparse.ArgumentParser):
    """argparse with the house rule for user errors: one line naming the problem, status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fail(args, message):
    """A user error found after parsing: one line on stderr, exit status 2, nothing done."""
    print(f"sevcore {args.cmd}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


#: The option behind each GuestConfig/MigrationParams field a refusal names.
_OPTION_OF = {"mem_size": "--mem", "nr_vcpus": "--vcpus", "shared_size": "--shared",
              "dirty_pages_per_s": "--dirty-rate", "hot_fraction": "--hot-fraction",
              "policy": "--policy", "max_iterations": "--max-iterations",
              "a ": "--mem/--shared"}


def _check(args, cost, rates=(None,)):
    """Every option of ``migrate``/``sweep`` checked before anything runs or is written: the
    guest configuration each run would use, the migration parameters, the output files."""
    for opt in ("json", "plot", "port_file"):
        path = getattr(args, opt, None)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            _fail(args, f"--{opt.replace('_', '-')} {path}: no such directory")
    if args.plot and not sweep.have("matplotlib"):
        _fail(args, "--plot needs matplotlib: pip install 'sevcore[plot]'")
    if getattr(args, "listen", None) is not None and not 0 <= args.listen <= 65535:
        _fail(args, f"--listen {args.listen}: a port is 0-65535")
    if getattr(args, "to", None):
        host, _, port = args.to.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            _fail(args, f"--to wants HOST:PORT, not {args.to!r}")
    paths = PATHS if args.path == "both" else (args.path,)
    try:
        for p in paths:
            _params(args, cost, p)
            for rate in rates:
                _config(args, cost, None, rate, p)
    except ValueError as e:
        why = str(e)
        opt = next((o for f, o in _OPTION_OF.items() if why.startswith(f)), None)
        _fail(args, f"{opt}: {why}" if opt else why)


def parse_policy(text):
    """'0x5', '7' -> an SEV policy (a u32)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 1 << 32:
        raise argparse.ArgumentTypeError(f"policy {text!r} does not fit 32 bits")
    return value


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
    ("postcopy requests", lambda q: f"{q['ram']['postcopy-requests']:,}"
     if "postcopy-requests" in q["ram"] else "-"),
    ("postcopy blocktime", lambda q: _fmt_ms(q["postcopy-blocktime"])
     if "postcopy-blocktime" in q else "-"),
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

def plot_remaining(results, path):
    """Pages still to send over simulated time, one line per migration path; returns the
    colour of each path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (stats, samples) in results.items():
        if samples:
            ax.plot([s[0] / 1e9 for s in samples], [s[1] for s in samples], label=name,
                    drawstyle="steps-post", color=path_colour(name))
        ax.axvline(stats.total_ns / 1e9, ls=":", lw=0.8, color=path_colour(name))
    ax.set_xscale("log")        # the paths differ by orders of magnitude
    ax.set_xlabel("simulated time (s, log scale)")
    ax.set_ylabel("pages left in the current pass")
    ax.set_title("Live migration of an SEV guest: pages remaining")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {name: path_colour(name) for name in results}


# -- commands ----------------------------------------------------------------------------------

def _memory_args(g, each=""):
    """--mem, --shared, --workload and --dirty-rate of a guest (``each``: of every guest)."""
    g.add_argument("--mem", type=parse_size, default=parse_size("256M"),
                   help=f"memory of {each or 'the'} guest (default 256M)")
    g.add_argument("--shared", type=parse_size, default=parse_size("2M"),
                   help=f"memory {each or 'the'} guest shares with the host (default 2M)")
    g.add_argument("--workload", choices=WORKLOADS, default="random",
                   help="how the guest dirties memory (default random)")
    g.add_argument("--dirty-rate", type=float, default=None,
                   help="pages/s the guest writes (default: the cost model's dirty_pages_per_s)")


def _guest_args(ap):
    g = ap.add_argument_group("guest")
    _memory_args(g)
    g.add_argument("--vcpus", type=int, default=1, help="guest vCPUs (default 1)")
    g.add_argument("--hot-fraction", type=float, default=0.1,
                   help="hotset workload: fraction of memory it writes (default 0.1)")
    g.add_argument("--type", choices=tuple(VM_TYPES) + ("snp",), default="sev",
                   help="guest type (default sev; sev-es adds SEV_POLICY_ES to the policy; "
                        "snp migrates through migration agents, --path ma)")
    g.add_argument("--policy", type=parse_policy, default=0,
                   help="SEV guest policy (default 0)")
    g.add_argument("--seed", type=int, default=1,
                   help="seed of the workload's choice of pages to dirty (default 1)")
    m = ap.add_argument_group("migration")
    m.add_argument("--path", choices=PATHS + ("both", "ma"), default="both",
                   help="private pages through the PSP, the in-guest helper, or both; "
                        "ma: an SNP guest through migration agents")
    m.add_argument("--max-iterations", type=int, default=30,
                   help="pre-copy passes before stop-and-copy is forced (default 30; --path "
                        "ma: passes in all, 1 = stop-and-copy)")
    m.add_argument("--ring-buffer", action="store_true",
                   help="charge PSP page commands as ring-buffer batches")
    m.add_argument("--dirty-ring", action="store_true",
                   help="log dirty pages to per-vCPU dirty rings of 4096 entries "
                        "(KVM_CAP_DIRTY_LOG_RING) instead of bitmaps")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="cost-model parameter (repeatable); --list-costs shows them")
    m.add_argument("--out-of-tree-vmsa", action="store_true",
                   help="give both hosts' KVM the out-of-tree KVM_SEV_SEND/RECEIVE_UPDATE_VMSA "
                        "(not in upstream KVM; the PSP path needs it for SEV-ES guests)")
    m.add_argument("--list-costs", action="store_true", help="print the cost model and exit")
    m.add_argument("--postcopy", action="store_true",
                   help="switch to post-copy after --postcopy-after passes (sweep: compare "
                        "pre-copy and post-copy)")
    m.add_argument("--postcopy-after", type=int, default=1, metavar="N",
                   help="pre-copy passes before post-copy (default 1; 0: pure post-copy)")
    o = ap.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write all statistics as JSON")
    o.add_argument("--plot", metavar="FILE", help="write a plot (PNG; needs matplotlib)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


def _cost(args):
    try:
        return CostModel.from_overrides(args.set)
    except CostModelError as e:
        _fail(args, str(e))


def _kvm(args):
    """A fresh Host's /dev/kvm, with the out-of-tree VMSA ioctls if asked for."""
    kvm = sevcore.Kvm()
    kvm.host.kvm_sev.out_of_tree_vmsa_migration = args.out_of_tree_vmsa
    return kvm


def _config(args, cost, kvm, dirty_rate=None, path="psp"):
    """The GuestConfig of one run (``kvm`` None: only checked, with the default C-bit).
    Raises WorkloadError for options the guest cannot run with."""
    rate = dirty_rate if dirty_rate is not None else (
        args.dirty_rate if args.dirty_rate is not None else cost.dirty_pages_per_s)
    c_bit = {} if kvm is None else {"c_bit": kvm.host.c_bit}
    if args.type not in VM_TYPES:          # snp: only `migrate --path ma` takes it
        raise ValueError(f"--type {args.type}: only `sevcore migrate --type snp --path ma`")
    policy = args.policy | (SEV_POLICY_ES if args.type == "sev-es" else 0)
    return GuestConfig(mem_size=args.mem, nr_vcpus=args.vcpus, shared_size=args.shared,
                       workload=args.workload, dirty_pages_per_s=rate,
                       hot_fraction=args.hot_fraction, policy=policy, seed=args.seed,
                       vm_type=VM_TYPES[args.type], **c_bit, **_helper_config(path, args.mem, cost))


def _helper_config(path, mem_size, cost):
    """The helper path's guest boots a migration helper with the cost model's helper vCPUs."""
    return {"helper_vcpus": cost.helper_vcpus} if path == "helper" else {}


def _ring_size(args):
    """--dirty-ring: bytes of each vCPU's ring (struct kvm_dirty_gfn is 16 bytes)."""
    return DEFAULT_RING_ENTRIES * 16 if getattr(args, "dirty_ring", False) else 0


def _params(args, cost, path, postcopy=None):
    return MigrationParams(path=path, cost=cost, max_iterations=args.max_iterations,
                           ring_buffer=args.ring_buffer,
                           postcopy=args.postcopy if postcopy is None else postcopy,
                           postcopy_after=args.postcopy_after)


def _one(args, cost, path, dirty_rate=None, label=None, postcopy=None):
    """Launch a fresh guest on a fresh source Host and migrate it to a fresh target Host."""
    src = _kvm(args)
    machine = Machine.launch(src, _config(args, cost, src, dirty_rate, path),
                             dirty_ring_size=_ring_size(args))
    bar = Progress(label or path, enabled=False if args.quiet else None)
    try:
        r = migrate(machine, _kvm(args), _params(args, cost, path, postcopy), progress=bar)
    finally:
        bar.done()
    return r


def cmd_migrate(args):
    cost = _cost(args)
    if args.list_costs:
        for name, value, unit, doc in cost.describe():
            print(f"{name} = {value:g} {unit}\n    {doc}\n")
        return 0
    if args.type == "snp" or args.path == "ma":
        return cmd_migrate_snp(args)
    _check(args, cost)
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


def cmd_migrate_snp(args):
    """``migrate --type snp --path ma``: an SNP guest through migration agents, in process
    (sevcore.migration.ma); the guest's own check on the target decides the status."""
    if args.type != "snp" or args.path not in ("ma", "both"):
        _fail(args, "SNP guests migrate only through migration agents: --type snp --path ma")
    for opt in ("json", "port_file"):
        path = getattr(args, opt, None)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            _fail(args, f"--{opt.replace('_', '-')} {path}: no such directory")
    if getattr(args, "listen", None) is not None and not 0 <= args.listen <= 65535:
        _fail(args, f"--listen {args.listen}: a port is 0-65535")
    if getattr(args, "to", None) and not args.to.rpartition(":")[2].isdigit():
        _fail(args, f"--to wants HOST:PORT, not {args.to!r}")
    # local: pulls in cryptography's X25519 and AES-GCM, which only this path needs
    from sevcore.migration import ma, ma_remote
    if args.mem % 4096 or args.mem > parse_size("1G"):
        _fail(args, f"--mem {args.mem}: a multiple of 4 KiB up to 1G for --path ma")
    if args.max_iterations < 1:
        _fail(args, f"--max-iterations {args.max_iterations}: at least 1 (1 = stop-and-copy)")
    if args.listen is not None:
        return _listen_snp(args, ma, ma_remote)
    if args.to:
        return _send_snp(args, ma, ma_remote)
    print(f"Migrating a {args.mem >> 20} MiB SNP guest through migration agents between two "
          f"simulated hosts", file=sys.stderr)
    src, dst = sevcore.Kvm(), sevcore.Kvm()
    a, b = ma.Agent(src), ma.Agent(dst)
    t0 = time.perf_counter()
    try:
        guest = _snp_guest(args, ma, src, a)
        target, st = ma.migrate(guest, a, dst, b, cost=_cost(args),
                                max_passes=args.max_iterations)
        wall = time.perf_counter() - t0
        out = target.check()
    except (ma.MaError, ValueError, OSError) as e:
        return _snp_failed(args, "ma", e)
    rec = {"pages-sealed": st.pages_sealed, "pages-swapped": st.pages_swapped,
           "agent-messages": st.agent_messages, "bytes": st.bytes_sent,
           "downtime-ms": round(st.downtime_ns / 1e6, 3),
           "total-time-ms": round(st.total_ns / 1e6, 3), "passes": len(st.passes),
           "converged": st.converged, "wall-s": round(wall, 3), "guest-data-ok": out["data_ok"],
           "guest-vmrk-key-ok": out["key_ok"], "guest-report-bytes": len(out["report"])}
    line = "\n".join(f"{k:>20}  {v}" for k, v in rec.items())
    line += "".join(f"\n{'pass ' + str(p['pass']):>20}  {p['pages']:,} pages, "
                    f"{p['ns'] / 1e6:.3f} ms{', guest stopped' if p['stop'] else ''}"
                    for p in st.passes)
    rec["pass-stats"] = _pass_stats(st.passes)
    return _snp_done(args, "ma", out["data_ok"] and out["key_ok"], rec, line)


def _snp_failed(args, key, e):
    """A failed ``--path ma`` run: one line, and QEMU's record (status, error-desc) under
    ``key`` with --json."""
    desc = f"{type(e).__name__}: {e}"
    print(f"sevcore: {key} SNP migration failed: {desc}", file=sys.stderr)
    if args.json:
        rec = {"status": "failed", "error-desc": desc}
        if key != "incoming":
            rec["source-guest"] = {"lost": bool(getattr(e, "lost", False))}
        _write_json(args.json, {key: rec})
    return 1


def _snp_done(args, key, ok, rec, line):
    """A finished ``--path ma`` run: ``line`` printed, the record under ``key`` with --json;
    the status is the guest's own check (``ok``)."""
    if args.json:
        _write_json(args.json, {key: {"status": "completed" if ok else "failed", **rec}})
    print(line)
    return 0 if ok else 1


def _listen_snp(args, ma, ma_remote):
    """The target of ``--type snp --path ma``: its agent, one incoming guest, its check."""
    from sevcore.migration.transport import TcpListener   # local: as cmd_migrate_snp's
    kvm = sevcore.Kvm()
    agent = ma.Agent(kvm)
    try:
        with TcpListener(args.bind, args.listen) as lst:
            print(f"listening on {lst.address[0]}:{lst.address[1]}", file=sys.stderr, flush=True)
            if args.port_file:
                with open(args.port_file + ".tmp", "w") as f:
                    f.write(str(lst.address[1]))
                os.replace(args.port_file + ".tmp", args.port_file)
            with lst.accept(timeout=120, channel_timeout=120) as ch:
                _, result = ma_remote.receive_guest(ch, kvm, agent)
    except Exception as e:
        return _snp_failed(args, "incoming", e)
    ok = result["data_ok"] and result["key_ok"]
    return _snp_done(args, "incoming", ok, result, f"guest resumed: {result['pages']:,} "
                     f"pages, its own check {'passed' if ok else 'FAILED'}")


def _send_snp(args, ma, ma_remote):
    """The source of ``--type snp --path ma``: its agent and guest, sent to ``--to``."""
    from sevcore.migration.transport import tcp_connect   # local: as cmd_migrate_snp's
    host, _, port = args.to.rpartition(":")
    kvm = sevcore.Kvm()
    agent = ma.Agent(kvm)
    try:
        guest = _snp_guest(args, ma, kvm, agent)
        with tcp_connect(host, int(port), timeout=120) as ch:
            result = ma_remote.send_guest(ch, guest, agent, args.max_iterations, _cost(args))
    except Exception as e:
        return _snp_failed(args, "ma", e)
    ok = result["data_ok"] and result["key_ok"]
    line = (f"migrated: {result['pages']:,} pages; the guest's own check on the target "
            f"{'passed' if ok else 'FAILED'}")
    if "passes" in result:
        line += (f"; {len(result['passes'])} passes, downtime "
                 f"{result['downtime_ns'] / 1e6:.3f} ms of {result['total_ns'] / 1e6:.3f} ms")
        result["pass-stats"] = _pass_stats(result.pop("passes"))
        result["downtime-ms"] = round(result.pop("downtime_ns") / 1e6, 3)
        result["total-time-ms"] = round(result.pop("total_ns") / 1e6, 3)
    return _snp_done(args, "ma", ok, result, line)


def _snp_guest(args, ma, kvm, agent):
    """The SNP guest ``migrate --path ma`` moves, launched bound to ``agent``: working (pre-copy
    runs its rounds between the passes) unless ``--max-iterations 1``, where its work is done
    and its ledger written before the guest stops."""
    guest = ma.SnpMaGuest.launch(kvm, args.mem, agent, seed=args.seed)
    if args.max_iterations > 1:
        guest.start_work(seed=args.seed, dirty_pages=ma.PRECOPY_DIRTY_PAGES)
        guest.work(2)
    else:
        guest.run_workload(seed=args.seed)
    return guest


def _pass_stats(passes):
    """Pass dicts for a --json record: their modelled time in ms."""
    return [{("ms" if k == "ns" else k): round(v / 1e6, 3) if k == "ns" else v
             for k, v in p.items()} for p in passes]


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
        t = serve(args.listen, _kvm(args), args.bind, on_listening=listening,
                  resume=args.resume)
    except Exception as e:
        print(f"sevcore: incoming migration failed: {type(e).__name__}: {e}", file=sys.stderr)
        if args.json:
            _write_json(args.json, {"incoming": {"status": "failed",
                                                 "error-desc": f"{type(e).__name__}: {e}"}})
        return 1
    r = t.result
    if args.json:
        _write_json(args.json, {"incoming": {"status": "completed", **r}})
    print(f"guest resumed: {r['checked']:,} pages checked, {r['bad']} bad")
    return 0 if r["bad"] == 0 else 1


def _send(args, cost):
    host, _, port = args.to.rpartition(":")
    path = PATHS[0] if args.path == "both" else args.path
    src = _kvm(args)
    machine = Machine.launch(src, _config(args, cost, src, path=path),
                             dirty_ring_size=_ring_size(args))
    bar = Progress(path, enabled=False if args.quiet else None)
    try:
        s = send_to(host, int(port), machine, _params(args, cost, path), progress=bar,
                    resume=args.resume)
    except MigrationError as e:
        bar.done()
        print(f"sevcore: {e}", file=sys.stderr)
        if args.json and e.stats is not None:       # query-migrate's record of the failure
            _write_json(args.json, {path: e.stats.to_dict()})
        return 1
    bar.done()
    print(table({path: s.stats.query_migrate()}))
    if args.json:
        _write_json(args.json, {path: s.stats.to_dict()})
    if args.plot:
        plot_remaining({path: (s.stats, s.samples)}, args.plot)
    return 0


# -- sweeps --------------------------------------------------------------------------------------
# A sweep point is one `sevcore migrate` run: its grid keys are the migrate options (all of
# _guest_args but output and the cost table, whose parameters are keys of their own) and the
# cost-model parameters, so an option added to migrate is a grid key at once.

#: migrate options that say nothing about the migration itself.
_NOT_A_POINT = {"help", "json", "plot", "quiet", "set", "list_costs"}
#: Where finished points are kept unless --store says otherwise.
DEFAULT_STORE = "sevcore-sweep"
_notes = set()


def _migrate_options():
    ap = argparse.ArgumentParser(add_help=False)
    _guest_args(ap)
    return ap


@functools.lru_cache(maxsize=1)
def _migrate_defaults():
    return types.MappingProxyType(vars(_migrate_options().parse_args([])))


def _option_parse(action):
    """A grid value parser for one migrate option: its argparse type and choices, as typed."""
    if action.nargs == 0:                     # a flag (store_true)
        return sweep.parse_bool
    conv = action.type or str

    def parse(text):
        try:
            value = conv(text)
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from None
        except (TypeError, ValueError):
            raise ValueError(f"{text!r} is not valid here (the option wants "
                             f"{'numbers' if conv in (int, float) else 'another value'})"
                             ) from None
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
        return value
    return parse


def _cost_parse(name):
    def parse(text):
        return getattr(CostModel.from_overrides({name: text}), name)
    return parse


@functools.lru_cache(maxsize=1)
def sweep_options():
    """``{grid key: sweep.Option}``: every migrate option that describes a point (its long name,
    ``dest`` its argparse dest), then every cost-model parameter (``dest`` None)."""
    out = {}
    for a in _migrate_options()._actions:
        if a.dest in _NOT_A_POINT or not a.option_strings:
            continue
        name = max(a.option_strings, key=len).lstrip("-")
        expand = (lambda v: list(PATHS) if v == "both" else [v]) if a.dest == "path" else None
        out[name] = sweep.Option(name, _option_parse(a), expand=expand, dest=a.dest,
                                 numeric=a.nargs != 0 and a.type is not None and not a.choices)
    for name in CostModel.parameters():
        out[name] = sweep.Option(name, _cost_parse(name), numeric=True)
    return out


def sweep_base(args=None, **values):
    """The values a sweep's points start from: the sweep command's ``args`` (default: its
    defaults), then ``values`` (grid key -> value or text)."""
    if args is None:
        args = _sweep_parser().parse_args([])
    cost = _cost(args)
    opts = sweep_options()
    base = {n: getattr(args, o.dest) if o.dest else getattr(cost, n) for n, o in opts.items()}
    for key, value in sweep.parse_grid(opts, {k: [v] for k, v in values.items()}).items():
        base[key] = value[0]
    return base


def sweep_points(grid, base, repeat=1):
    """The points of ``grid`` (``["KEY=V1,V2", ...]`` or ``{key: values}``) over ``base``, each a
    dict of every grid key, checked as migrate would check them. Raises sweep.SweepError."""
    opts = sweep_options()
    grid = sweep.parse_grid(opts, grid)
    for name, opt in opts.items():            # a base value standing for several (path both)
        if name not in grid and len(opt.expand(base[name])) > 1:
            grid[name] = opt.expand(base[name])
    points = sweep.expand(grid, base, repeat)
    kvm = sevcore.Kvm()
    for p in points:
        if p["dirty-rate"] is None:           # migrate's default: the cost model's rate
            p["dirty-rate"] = p["dirty_pages_per_s"]
        args, cost = _point_args(p)
        try:
            _config(args, cost, kvm, path=args.path)
            _params(args, cost, args.path)
        except (SystemExit, ValueError) as e:
            what = ", ".join(f"{k}={p[k]}" for k in grid)
            why = str(getattr(e, "code", None) or e)
            opt = next((o for f, o in _OPTION_OF.items() if why.startswith(f)), None)
            raise sweep.SweepError(f"the point {what}: {opt + ': ' if opt else ''}{why}"
                                   ) from None
    return points


def _point_args(params):
    args = argparse.Namespace(**_migrate_defaults())
    for name, opt in sweep_options().items():
        if opt.dest:
            setattr(args, opt.dest, params[name])
    args.quiet = True
    return args, CostModel.from_overrides({n: params[n] for n in CostModel.parameters()})


def sweep_point(params):
    """Run one point of a sweep and return its row: the parameters and every query-migrate
    statistic (flattened: ``ram.transferred``). Raises sweep.PointFailed for a user error."""
    args, cost = _point_args(params)
    error = ""
    try:
        st = _one(args, cost, args.path).stats
    except MigrationError as e:
        if e.stats is None:
            raise sweep.PointFailed(str(e)) from None
        st, error = e.stats, str(e)
    except SystemExit as e:                   # a guest or option the point cannot run
        raise sweep.PointFailed(str(e.code)) from None
    except WorkloadError as e:
        raise sweep.PointFailed(str(e)) from None
    row = {**params, **sweep.flatten(st.query_migrate())}
    if error:
        row.update(status="failed", error=error)
    return row


def sweep_weight(params):
    """A point's expected share of a sweep's time, for the order Dask starts points in: larger
    guests first, then the PSP path (a page per PSP command: in the same simulated time it
    converges later than the helper and so sends more passes), then higher dirty rates."""
    return (params["mem"], params["path"] == "psp", params["dirty-rate"] or 0)


def _note(text):
    if text not in _notes:
        _notes.add(text)
        print(f"sevcore: {text}", file=sys.stderr)


def sweep_run(points, scheduler=None, workers=None, store=DEFAULT_STORE, progress=False,
              on_row=None, quiet=False):
    """Run ``points`` (skipping those already in ``store``) and return their rows, in order.
    ``scheduler``: None (a LocalCluster sized to the machine; in process without the sweep
    extra or with ``workers=0``), ``"tcp://HOST:PORT"``, or a ``distributed.Client``."""
    if isinstance(scheduler, str) and not sweep.have_dask():
        raise sweep.SweepError("--scheduler needs the sweep extra: pip install 'sevcore[sweep]'")
    st = sweep.Store(store)
    version = sevcore.__version__
    todo = st.pending(points, version)
    client, own = None, False
    if scheduler is not None and not isinstance(scheduler, str):
        client = scheduler
    elif not sweep.have_dask():
        _note("running the points one after another in this process; "
              "pip install 'sevcore[sweep]' brings parallel, cluster and Parquet runs")
    elif todo and (scheduler or (workers != 0 and len(todo) > 1)):
        per_point = 3 * max(p["mem"] for p in points) + (512 << 20)
        n = sweep.local_workers(len(todo), per_point, workers)
        client, own = sweep.open_client(scheduler, n, per_point, quiet=quiet), True
    distinct = len({sweep.point_key(p, version) for p in points})
    eta = sweep.Eta(distinct, skipped=distinct - len(todo), enabled=progress)
    try:
        return sweep.execute(points, sweep_point, st, version, client, on_row=on_row,
                             progress=eta, weight=sweep_weight)
    finally:
        if own:
            sweep.close_client(client)


def _sweep_table(rows, keys):
    cols = [k for k in keys if k != "path"]
    head = f"{'path':>6} " + " ".join(f"{k:>12}" for k in cols) + \
        f" {'total':>12} {'downtime':>12} {'passes':>6} {'converged':>9} {'MiB sent':>9} " \
        f"{'wall':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        vals = " ".join(f"{_cell(k, r.get(k)):>12}" for k in cols)
        if r["status"] != "completed":
            lines.append(f"{r.get('path', ''):>6} {vals} {r['status']}: {r['error']}")
            continue
        lines.append(f"{r['path']:>6} {vals} {_fmt_ms(r['total-time']):>12} "
                     f"{_fmt_ms(r['downtime']):>12} {r['sev.iterations']:>6} "
                     f"{'yes' if r['sev.converged'] else 'NO':>9} "
                     f"{r['ram.transferred'] / 2**20:>9,.1f} {r['sev.wall-time-s']:>6.1f}s")
    return "\n".join(lines)


def _cell(key, value):
    if key in BYTE_KEYS and isinstance(value, int):
        return f"{value >> 20}M" if value % (1 << 20) == 0 else f"{value >> 10}K"
    return f"{value:g}" if isinstance(value, float) else str(value)


def cmd_sweep(args):
    specs = list(args.grid)
    if args.dirty_rates is not None or not specs:
        specs.append(f"dirty-rate={args.dirty_rates or DEFAULT_RATES}")
    try:
        if args.dirty_rates is not None and any(
                sweep.lookup(sweep_options(), g.partition("=")[0].strip()).name == "dirty-rate"
                for g in args.grid):
            raise sweep.SweepError("--dirty-rates is --grid dirty-rate=...: give one of them")
        points = sweep_points(specs, sweep_base(args), args.repeat)
        keys = [k for k in points[0] if len({repr(p[k]) for p in points}) > 1]
        x = args.x or next((k for k in keys if k not in ("path", "seed")), "dirty-rate")
        for flag, key in (("--x", x), ("--hue", args.hue), ("--col", args.col)):
            if key is not None and sweep.lookup(sweep_options(), key).name not in points[0]:
                raise sweep.SweepError(f"{flag} {key}: not a grid key")
        if args.plot and not sweep.have("matplotlib"):
            raise sweep.SweepError("--plot needs matplotlib: pip install 'sevcore[plot]'")
        if str(args.out).endswith(".parquet") and not sweep.have("pyarrow", "pandas"):
            raise sweep.SweepError("--out *.parquet needs the sweep extra: "
                                   "pip install 'sevcore[sweep]'")
        rows = sweep_run(points, args.scheduler, args.workers, args.store, args.progress)
    except sweep.SweepError as e:
        print(f"sevcore sweep: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(_sweep_table(rows, keys))
    if args.out:
        sweep.write_table(rows, args.out)
        print(f"table: {args.out}", file=sys.stderr)
    if args.json:
        _write_json(args.json, rows)
    if args.plot:
        opts = sweep_options()
        plot_sweep(rows, args.plot, x=sweep.lookup(opts, x).name,
                   hue=sweep.lookup(opts, args.hue).name,
                   col=sweep.lookup(opts, args.col).name if args.col else None)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0 if all(r["status"] == "completed" for r in rows) else 1


def _sweep_parser(ap=None):
    """The ``sweep`` command's options (on ``ap``, or a parser of its own)."""
    ap = ap or argparse.ArgumentParser(prog="sevcore sweep")
    _guest_args(ap)
    ap.set_defaults(mem=parse_size("64M"))
    g = ap.add_argument_group("sweep")
    g.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a grid axis: any migrate option (mem, dirty-rate, workload, path, ...) "
                        "or cost-model parameter (psp_bytes_per_s, ...); values are a list and "
                        "ranges start:stop:step or start:stop:*factor (repeatable)")
    g.add_argument("--dirty-rates", default=None, metavar="RATES",
                   help=f"shorthand for --grid dirty-rate=... (default {DEFAULT_RATES} when "
                        f"no --grid is given)")
    g.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run each point N times with seeds 1..N (recorded in the seed column)")
    g.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="run on this Dask cluster (default: a local one)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes of the local cluster (default: one per CPU, as "
                        "memory allows; 0: in this process)")
    g.add_argument("--store", default=DEFAULT_STORE, metavar="DIR",
                   help=f"directory of finished points; a re-run skips them "
                        f"(default {DEFAULT_STORE})")
    g.add_argument("--out", metavar="FILE", help="the results table: FILE.csv or FILE.parquet")
    g.add_argument("--progress", action="store_true", help="points done / total with an ETA")
    g.add_argument("--x", metavar="KEY",
                   help="--plot: the grid key on the x axis (default: the first that varies)")
    g.add_argument("--hue", default="path", metavar="KEY",
                   help="--plot: a line per value of this key (default path)")
    g.add_argument("--col", metavar="KEY", help="--plot: a column of panels per value of this key")
    return ap


def cmd_info(args):
    try:
        return cpu.main(["--tier", args.tier] if args.tier else [])
    except ValueError as e:            # a tier this architecture or this CPU does not have
        _fail(args, str(e))


# -- evacuate ----------------------------------------------------------------------------------

def parse_link(text):
    """'10G', '25G', '800M' (bit/s, decimal prefixes, as links are sold) -> bytes/s."""
    t = text.strip().upper().removesuffix("BIT/S").removesuffix("BPS").removesuffix("B")
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(t[-1:], 1.0)
    try:
        bits = float(t[:-1] if t[-1:] in "KMGT" else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a link speed: {text!r} (e.g. 10G)") from None
    if not 0 < bits < float("inf"):
        raise argparse.ArgumentTypeError(f"link speed {text!r} must be > 0")
    return bits / 8


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {n}")
    return n


def _one_line_errors(parser):
    """Bad input on ``parser``: one line on stderr, exit status 2."""
    def error(message):
        print(f"{parser.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)
    parser.error = error
    return parser


def plot_evacuation(reports, path):
    """Per guest, on one time axis per path: waiting, pre-copy, stop-and-copy, done."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(reports), 1, squeeze=False,
                             figsize=(11, 1.2 + 0.35 * sum(len(r["guests"]) for r in
                                                          reports.values()) + 0.6 * len(reports)))
    for ax, (p, rep) in zip(axes[:, 0], reports.items()):
        gs = rep["guests"]
        for y, g in enumerate(gs):
            ax.barh(y, g["start_s"], color="0.88", height=0.6,
                    label="waiting" if y == 0 and g["start_s"] else None)
            ax.barh(y, g["stop_s"] - g["start_s"], left=g["start_s"], color="tab:blue",
                    height=0.6, label="pre-copy" if y == 0 else None)
            ax.barh(y, g["end_s"] - g["stop_s"], left=g["stop_s"], color="tab:red",
                    height=0.6, label="stop-and-copy" if y == 0 else None)
            ax.plot([g["end_s"]], [y], marker="|", ms=12, color="black",
                    label="runs on target" if y == 0 else None)
        ev = rep["evacuation"]
        ax.set_yticks(range(len(gs)), [g["name"] for g in gs])
        ax.invert_yaxis()
        ax.set_xlabel("simulated time since the evacuation began (s)")
        ax.set_title(f"{p} path: {ev['guests']} x {ev['mem_size'] >> 20} MiB, "
                     f"{ev['parallel']} at a time, done in {ev['evacuation_s']:,.2f} s; "
                     f"bottleneck: {ev['bottleneck'].split(' (')[0]}", fontsize=9)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _evacuation_table(rep):
    head = (f"{'guest':>8} {'target':>6} {'start':>10} {'stop':>10} {'done':>10} "
            f"{'downtime':>10} {'passes':>6} {'MiB sent':>9}  guest check")
    lines = [head, "-" * len(head)]
    for g in rep["guests"]:
        q = g["query-migrate"]
        check = ("not reported" if q["sev"]["bad-pages"] < 0 else
                 f"{q['sev']['verified-pages']:,} pages, {q['sev']['bad-pages']} bad")
        lines.append(f"{g['name']:>8} {g['target']:>6} {g['start_s']:>9,.2f}s "
                     f"{g['stop_s']:>9,.2f}s {g['end_s']:>9,.2f}s {_fmt_ms(q['downtime']):>10} "
                     f"{q['sev']['iterations']:>6} {q['ram']['transferred'] / 2**20:>9,.1f}  "
                     f"{check}")
    ev = rep["evacuation"]
    lines.append(f"\nlast guest running on a target after {ev['evacuation_s']:,.3f} s; "
                 f"downtime {_fmt_ms(ev['total_downtime_ms'])} in all, worst "
                 f"{_fmt_ms(ev['worst_downtime_ms'])}")
    for name, h in ev["hosts"].items():
        lines.append(f"{name:>8} PSP: busy {h['psp_busy_s']:,.3f} s "
                     f"({h['psp_utilisation']:.0%}), queueing delay {h['psp_queue_s']:,.3f} s "
                     f"in all, {h['psp_commands']:,} commands")
    lk = ev["link"]
    lines.append(f"{'link':>8}: {lk['bytes'] / 2**20:,.1f} MiB, utilisation "
                 f"{lk['utilisation']:.1%} of {lk['bytes_per_s'] * 8 / 1e9:g} Gbit/s, "
                 f"at most {lk['peak_transfers']} transfers at once")
    lines.append(f"bottleneck: {ev['bottleneck']}")
    return "\n".join(lines)


def cmd_evacuate(args):
    try:
        # SimPy is an optional extra (sevcore[sim]): only this command needs it.
        from sevcore.sim.evacuate import Plan, evacuate
    except ImportError as e:
        print(f"sevcore evacuate: {e}", file=sys.stderr)
        return 1
    if args.plot and not sweep.have("matplotlib"):
        _fail(args, "--plot needs matplotlib: pip install 'sevcore[plot]'")
    try:
        cost = CostModel.from_overrides(args.set).replace(link_bytes_per_s=args.link)
        rate = args.dirty_rate if args.dirty_rate is not None else cost.dirty_pages_per_s
        config = GuestConfig(mem_size=args.mem, shared_size=args.shared, workload=args.workload,
                             dirty_pages_per_s=rate)
        parallel = 1 if args.sequential else args.parallel
        paths = PATHS if args.path == "both" else (args.path,)
        plans = {p: Plan(args.guests, config, MigrationParams(
            path=p, cost=cost, max_iterations=args.max_iterations), args.link,
            targets=args.targets, parallel=parallel) for p in paths}
        for plan in plans.values():
            plan.config_for(config.c_bit).layout          # refuses a guest it cannot run
    except (CostModelError, WorkloadError) as e:
        args.parser.error(str(e))
    reports = {}
    for p, plan in plans.items():
        say = (lambda text, p=p: print(f"{p}: {text}", file=sys.stderr)) if args.progress \
            else None
        print(f"Evacuating {args.guests} x {args.mem >> 20} MiB SEV guests by the {p} path to "
              f"{args.targets} Host(s), {parallel or args.guests} at a time", file=sys.stderr)
        reports[p] = evacuate(plan, sevcore.Kvm, progress=say)
        print(f"\n== {p} path\n" + _evacuation_table(reports[p]))
    if args.json:
        _write_json(args.json, reports)
    if args.plot:
        plot_evacuation(reports, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0 if all(r["evacuation"]["all_ok"] for r in reports.values()) else 1


def _evacuate_parser(sub):
    e = _one_line_errors(sub.add_parser(
        "evacuate", help="migrate every guest of one Host at once, on shared PSPs and a link "
                         "(needs sevcore[sim])"))
    e.add_argument("--guests", type=_positive_int, default=4, help="guests (default 4)")
    _memory_args(e, each="each")
    e.add_argument("--path", choices=PATHS + ("both",), default="both",
                   help="private pages through the PSP, the in-guest helper, or both")
    e.add_argument("--link", type=parse_link, default=parse_link("10G"),
                   help="the link between the Hosts, bit/s (default 10G)")
    e.add_argument("--targets", type=_positive_int, default=1,
                   help="target Hosts, guests dealt out in turn (default 1)")
    how = e.add_mutually_exclusive_group()
    how.add_argument("--sequential", action="store_true", help="one migration at a time")
    how.add_argument("--parallel", type=_positive_int, default=None, metavar="K",
                     help="K migrations at a time (default: all at once)")
    e.add_argument("--max-iterations", type=_positive_int, default=30,
                   help="pre-copy passes before stop-and-copy is forced (default 30)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="cost-model parameter (repeatable)")
    e.add_argument("--json", metavar="FILE", help="write every statistic as JSON")
    e.add_argument("--plot", metavar="FILE", help="write the guests' timeline (PNG)")
    e.add_argument("--progress", action="store_true", help="a line on stderr as each guest "
                                                           "finishes")
    e.set_defaults(fn=cmd_evacuate, parser=e)


def main(argv=None):
    ap = _Parser(prog="sevcore", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("migrate", help="migrate a guest (both paths side by side by default)")
    _guest_args(m)
    r = m.add_argument_group("two processes")
    r.add_argument("--listen", type=int, metavar="PORT",
                   help="be the target: wait for one migration on PORT")
    r.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    r.add_argument("--port-file", help="with --listen: write the port here once listening")
    r.add_argument("--to", metavar="HOST:PORT", help="be the source: migrate to HOST:PORT")
    r.add_argument("--resume", action="store_true",
                   help="post-copy: when the connection breaks, pause and continue on a new "
                        "one (the source connects again, the target listens again)")
    m.set_defaults(fn=cmd_migrate)
    s = sub.add_parser("sweep", help="migrate over a grid of options and cost parameters")
    _sweep_parser(s)
    s.set_defaults(fn=cmd_sweep)
    i = sub.add_parser("info", help="the CPU, its tiers and the path each C kernel takes "
                                    "(paste it into a performance report)")
    i.add_argument("--tier", help="report with this tier forced (avx512, avx2, aesni, portable)")
    i.set_defaults(fn=cmd_info)
    _evacuate_parser(sub)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
