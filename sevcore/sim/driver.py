"""The migration engine's driver on SimPy: each call of the engine becomes SimPy events on the
shared PSPs and link, and the engine waits for them.

The engine is ordinary blocking code, so it runs in a thread of its own, and that thread and
the SimPy process take turns: the engine asks (``local``, ``batch``, ``drain``...), the
process serves the request in simulated time while every other process of the environment
runs, and only then does the engine continue. Exactly one of them runs at any moment, so a
simulation is as deterministic as SimPy itself.
"""
import queue
import threading

import simpy

from sevcore.migration.driver import Driver
from sevcore.migration.errors import MigrationError
from sevcore.sim.resources import NS


class Cancelled(MigrationError):
    """Raised in the engine's thread when its SimPy process was interrupted: the source
    cancels as for any failure."""


class _Batch:
    """One batch's moments in the pipeline: on the link, taken by the target, applied."""
    __slots__ = ("net_started", "dst_started", "dst_done")

    def __init__(self, env):
        self.net_started, self.dst_started, self.dst_done = env.event(), env.event(), env.event()


class SimDriver(Driver):
    """A :class:`sevcore.migration.driver.Driver` whose time is a SimPy environment's.

    ``src_host``'s and ``dst_host``'s PSP work runs on ``psps[host]``; bytes go over ``link``
    at no more than ``cap`` B/s (QEMU's max-bandwidth); helper and VMM work takes its time
    with no one to share with (each guest has its own vCPUs, each VMM its own thread). The
    pipeline is the default driver's (one batch in flight between source, link and target),
    so an uncontended migration takes the same simulated time."""

    def __init__(self, env, cost, src_host, dst_host, psps, link, owner="migration"):
        self.env, self.cost = env, cost
        self.src_host, self.dst_host = src_host, dst_host
        self.psps, self.link, self.owner = psps, link, owner
        self.cap = cost.network_bytes_per_s
        self._requests = queue.SimpleQueue()
        self._replies = queue.SimpleQueue()
        self._carriers = []
        self._last = None
        self._t0 = None
        self._spent = {}
        self.cancelled = False
        self.source = None

    # -- the engine's side (its thread) ---------------------------------------------------------

    def _call(self, *request):
        self._requests.put(request)
        reply = self._replies.get()
        if reply is _CANCEL:
            raise Cancelled("the migration's SimPy process was interrupted")
        if isinstance(reply, Exception):
            raise reply
        return reply

    def bind(self, source):
        """Keep the Source, whose statistics observers read."""
        self.source = source

    def start(self):
        """The pipeline starts empty, now."""
        self._call("start")

    def now_ns(self):
        """The environment's time, in ns (read while the SimPy side waits for this thread)."""
        return self.env.now / NS

    def local(self, work):
        """Work on the source Host, on its PSP for PSP commands."""
        self._call("local", work)

    def batch(self, src, nbytes, dst):
        """Source work now, then the link and the target in the background."""
        self._call("batch", src, nbytes, dst)

    def drain(self):
        """Until the target applied the last batch."""
        self._call("drain")

    def remote(self, work):
        """On the target after a drain."""
        self._call("remote", work)

    def target_now_ns(self):
        """When the target has applied everything sent: SimPy knows it only when it happens,
        so the source waits for it (a post-copy step is not pipelined with the next)."""
        self._call("drain")
        return self.now_ns()

    def wait_until(self, t_ns, category="wait"):
        """The source waits, in the environment, until ``t_ns``."""
        self._call("wait_until", t_ns, category)

    def spent(self):
        """The source's simulated ns per category; ``wait`` is everything else (the
        pipeline, the link, the PSP's queue)."""
        out = dict(self._spent)
        if self._t0 is not None:
            elapsed = (self.env.now - self._t0) / NS
            out["wait"] = max(0.0, elapsed - sum(out.values()))
        return out

    # -- the SimPy side ---------------------------------------------------------------------------

    def serve(self, body):
        """A SimPy generator: run ``body()`` (blocking engine code) in a thread, serving its
        requests, and return its value (or raise what it raised). An interrupt of this
        process makes the engine's pending request raise :class:`Cancelled`."""
        outcome = []

        def run():
            try:
                outcome.append((True, body()))
            except BaseException as e:        # handed to the SimPy process
                outcome.append((False, e))
            self._requests.put(("exit",))
        th = threading.Thread(target=run, name=f"sevcore-sim-{self.owner}", daemon=True)
        th.start()
        while True:
            req = self._requests.get()
            if req[0] == "exit":
                break
            try:
                if not self.cancelled:
                    yield from self._serve_guarded(req)
            except Exception as e:            # raised in the engine's thread instead
                self._replies.put(e)
                continue
            if self.cancelled:
                self._replies.put(_CANCEL)
                continue
            self._sync_clock()
            self._replies.put(None)
        th.join()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _serve_guarded(self, req):
        """Serve ``req`` in a process of its own, so that an interrupt of ours can stop it
        (releasing what it holds) or, past SEND_FINISH, be ignored."""
        p = self.env.process(self._quietly(self._serve(req)))
        while p.is_alive:
            try:
                yield p
            except simpy.Interrupt:
                if self.handed_over:
                    continue                 # the guest is the target's now: finish
                p.interrupt("cancel")
                self.cancel_inflight()
                return

    @property
    def handed_over(self):
        """Past SEND_FINISH: the migration can only complete."""
        return self.source is not None and self.source.handed_over

    @staticmethod
    def _quietly(gen):
        try:
            yield from gen
        except simpy.Interrupt:
            pass

    def cancel_inflight(self):
        """Stop the batches still on the link or at the target (they release what they hold)."""
        self.cancelled = True
        for p in self._carriers:
            if p.is_alive:
                p.interrupt("cancel")
        self._carriers = []

    def _sync_clock(self):
        """The source Host's clock (its guests' TSC) follows the environment."""
        self.src_host.clock.advance_to(self.env.now / NS, "sim")

    def _serve(self, req):
        kind = req[0]
        env = self.env
        if kind == "start":
            self._t0 = env.now
            self._last = _Batch(env)
            for ev in (self._last.net_started, self._last.dst_started, self._last.dst_done):
                ev.succeed()
        elif kind == "local":
            yield from self._work(req[1], self.src_host, True)
        elif kind == "batch":
            _, src, nbytes, dst = req
            prev = self._last
            if not prev.net_started.triggered:
                yield prev.net_started               # the buffer frees when the link took it
            yield from self._work(src, self.src_host, True)
            b = self._last = _Batch(env)
            self._carriers = [p for p in self._carriers if p.is_alive]
            self._carriers.append(env.process(self._quietly(self._carry(prev, b, nbytes, dst))))
        elif kind == "drain":
            yield from self._drain()
        elif kind == "remote":
            yield from self._drain()
            yield from self._work(req[1], self.dst_host, False)
        elif kind == "wait_until":
            _, t_ns, category = req
            ns = max(0.0, t_ns - env.now / NS)
            if ns:
                self._spent[category] = self._spent.get(category, 0.0) + ns
                yield env.timeout(ns * NS)
        else:
            raise ValueError(f"unknown driver request {kind!r}")

    def _drain(self):
        if not self._last.dst_done.triggered:
            yield self._last.dst_done

    def _carry(self, prev, b, nbytes, dst):
        """The link and the target's part of one batch."""
        if not prev.dst_started.triggered:
            yield prev.dst_started                   # one batch in flight link -> target
        b.net_started.succeed()
        yield from self.link.send(nbytes, self.cap)
        if not prev.dst_done.triggered:
            yield prev.dst_done
        b.dst_started.succeed()
        yield from self._work(dst, self.dst_host, False)
        b.dst_done.succeed()

    def _work(self, work, host, source):
        """Each demand on its resource: PSP demands on the Host's PSP, the rest as time on
        the guest's own vCPUs or the VMM's thread (consecutive ones in one step)."""
        env, cost = self.env, self.cost
        pending = 0.0
        for d in work:
            ns = d.ns(cost)
            if source:
                self._spent[d.category] = self._spent.get(d.category, 0.0) + ns
            if d.resource == "psp":
                if pending:
                    yield env.timeout(pending * NS)
                    pending = 0.0
                yield from self.psps[host].hold(ns, self.owner, d.n)
            else:
                pending += ns
        if pending:
            yield env.timeout(pending * NS)


_CANCEL = object()
