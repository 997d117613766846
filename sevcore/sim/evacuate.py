"""Evacuating a Host: N SEV guests launched on one source Host all migrate to M target Hosts
at once (or K at a time), sharing the source's PSP, the targets' PSPs and one link.

On the PSP path every private page of every guest goes through SEND_UPDATE_DATA on the one
source PSP, so the evacuation time grows with N at the PSP's rate; on the helper path each
guest seals its pages on its own vCPUs and the link (or each migration's max-bandwidth) sets
the pace. :func:`evacuate` measures it and says which resource was busiest.
"""
from dataclasses import dataclass

import simpy

from sevcore.migration.engine import MigrationError, MigrationParams
from sevcore.migration.workload import GuestConfig
from sevcore.sim.process import Migration, launch
from sevcore.sim.resources import Link, Psps


@dataclass(frozen=True)
class Plan:
    """What to evacuate and how: ``guests`` guests of ``config`` (its ``helper_vcpus`` set for
    the helper path by :meth:`config_for`), ``parallel`` migrations at a time (None: all),
    to ``targets`` Hosts in turn, over a link of ``link_bytes_per_s`` with ``latency_s``."""
    guests: int
    config: GuestConfig
    params: MigrationParams
    link_bytes_per_s: float
    targets: int = 1
    parallel: int = None
    latency_s: float = 0.0

    def __post_init__(self):
        if self.guests < 1 or self.targets < 1:
            raise ValueError("guests and targets must be >= 1")
        if self.parallel is not None and self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, not {self.parallel}")

    def config_for(self, c_bit):
        """The guest configuration on a Host with ``c_bit``: with a migration helper on the
        helper path."""
        helper = self.params.cost.helper_vcpus if self.params.path == "helper" else 0
        d = {**self.config.to_dict(), "c_bit": c_bit, "helper_vcpus": helper}
        return GuestConfig.from_dict(d)


def _snapshot(psp):
    return {"busy_s": psp.busy_s, "queue_s": psp.queue_s, "commands": psp.commands}


def evacuate(plan, kvm_factory, progress=None):
    """Run ``plan`` in a fresh SimPy environment; ``kvm_factory()`` gives a new Host's Kvm.
    Returns the report (a dict: ``guests`` per guest, ``evacuation`` for the whole).
    ``progress(text)`` hears one line per event worth telling (a guest done)."""
    env = simpy.Environment()
    cost = plan.params.cost
    src = kvm_factory()
    targets = [kvm_factory() for _ in range(plan.targets)]
    psps = Psps(env)
    link = Link(env, plan.link_bytes_per_s, plan.latency_s)
    cfg = plan.config_for(src.host.c_bit)
    launches = [env.process(launch(env, src, cfg, psp=psps, cost=cost, name=f"launch{i}"))
                for i in range(plan.guests)]
    env.run(simpy.AllOf(env, launches))
    machines = [p.value for p in launches]
    for t in targets:
        psps[t.host]                                 # every Host's PSP in the report
    t0 = env.now
    before = {p.name: _snapshot(p) for p in psps}
    slots = simpy.Resource(env, capacity=plan.parallel or plan.guests)
    migs = [Migration(env, m, targets[i % plan.targets], plan.params, psp=psps, link=link,
                      name=f"guest{i}") for i, m in enumerate(machines)]

    def one(mig):
        with slots.request() as req:
            yield req
            try:
                yield env.process(mig.run())
            except MigrationError:
                pass                                 # reported with its stats, not ok
        if progress:
            q = mig.stats.query_migrate()
            progress(f"{mig.name}: {q['status']} at {env.now - t0:,.2f} s, downtime "
                     f"{q['downtime']:,.1f} ms, {q['sev']['bad-pages']} bad pages")
    env.run(simpy.AllOf(env, [env.process(one(m)) for m in migs]))
    return _report(plan, migs, psps, before, link, t0, src, targets, env.now)


def _report(plan, migs, psps, before, link, t0, src, targets, now):
    guests = []
    for i, mig in enumerate(migs):
        st = mig.stats
        start = mig.started_s - t0
        end = start + st.total_ns / 1e9 if st.status == "completed" else mig.ended_s - t0
        guests.append({"name": mig.name, "target": i % plan.targets, "start_s": start,
                       "stop_s": end - st.downtime_ns / 1e9, "end_s": end,
                       "ok": st.status == "completed" and st.bad_pages == 0,
                       "query-migrate": st.query_migrate()})
    span = max(g["end_s"] for g in guests)
    hosts = {}
    named = [("source", src.host)] + [(f"target{j}", t.host) for j, t in enumerate(targets)]
    for label, host in named:
        p = psps[host]
        b = before[p.name]
        busy, queue = p.busy_s - b["busy_s"], p.queue_s - b["queue_s"]
        hosts[label] = {"psp_busy_s": busy, "psp_queue_s": queue,
                        "psp_commands": p.commands - b["commands"],
                        "psp_utilisation": busy / span if span else 0.0}
    ls = link.stats()
    link_util = ls["bytes"] / (plan.link_bytes_per_s * span) if span else 0.0
    downtimes = [g["query-migrate"]["downtime"] for g in guests]
    whole = {"path": plan.params.path, "guests": plan.guests, "targets": plan.targets,
             "parallel": plan.parallel or plan.guests, "mem_size": plan.config.mem_size,
             "evacuation_s": span, "total_downtime_ms": sum(downtimes),
             "worst_downtime_ms": max(downtimes), "all_ok": all(g["ok"] for g in guests),
             "hosts": hosts, "link": {"bytes": ls["bytes"], "bytes_per_s": plan.link_bytes_per_s,
                                      "busy_s": ls["busy_s"], "utilisation": link_util,
                                      "peak_transfers": ls["peak_transfers"]},
             "bottleneck": _bottleneck(hosts, link_util, plan.link_bytes_per_s
                                       / max(1, ls["peak_transfers"])
                                       < plan.params.cost.network_bytes_per_s)}
    return {"guests": guests, "evacuation": whole}


def _bottleneck(hosts, link_util, link_shared_below_cap):
    """The busiest shared resource if it was busy most of the evacuation, else the guests'
    own limits (each migration's max-bandwidth, its dirtying, the pipeline). The link counts
    only if its fair share fell below a migration's max-bandwidth."""
    # A source and a target PSP doing the same pages are equally busy: the one where work
    # queued is the bottleneck.
    link = [(round(link_util, 3), 0.0, False, "link")] if link_shared_below_cap else []
    busiest = max([(round(h["psp_utilisation"], 3), h["psp_queue_s"], name == "source",
                    f"{name} PSP") for name, h in hosts.items()] + link)
    if busiest[0] >= 0.5:
        return f"{busiest[3]} ({busiest[0]:.0%} busy)"
    return (f"per-migration limits: max-bandwidth, dirtying, the pipeline (busiest shared "
            f"resource: {busiest[3]}, {busiest[0]:.0%})")
