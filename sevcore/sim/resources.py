"""What migrations share in a SimPy environment: each Host's PSP and the links between Hosts.

Times are SimPy time units of one second (``env.now`` is in seconds); the cost model's
nanoseconds are divided by 1e9 on the way in.
"""
import math

import simpy

NS = 1e-9


class Psp:
    """One Host's PSP as a SimPy resource. The firmware runs one command at a time (the
    kernel's ``sev_cmd_mutex`` serialises mailbox commands, drivers/crypto/ccp/sev-dev.c
    ``__sev_do_cmd_locked``; a ring-buffer queue is also consumed one entry at a time), so
    the resource has capacity 1 and serves its users first come, first served.

    A page batch of ``n`` commands holds the PSP for at most ``slice_commands`` commands at
    a time (default: the whole batch, so two migrations' batches alternate); ``trace`` keeps
    every hold as ``(start_s, end_s, owner, commands)``."""

    def __init__(self, env, name="psp", slice_commands=None):
        if slice_commands is not None and slice_commands < 1:
            raise ValueError(f"slice_commands must be >= 1, not {slice_commands!r}")
        self.env, self.name, self.slice_commands = env, name, slice_commands
        self.resource = simpy.Resource(env, capacity=1)
        self.trace = []
        self.busy_s = 0.0
        self.queue_s = 0.0
        self.commands = 0

    def hold(self, ns, owner, commands=1):
        """A SimPy generator: wait for the PSP, then run ``commands`` taking ``ns`` in all."""
        n = max(1, commands)
        step = n if self.slice_commands is None else min(n, self.slice_commands)
        done = 0
        while done < n:
            k = min(step, n - done)
            part = ns * k / n if step < n else ns
            yield from self._hold_once(part, owner, k)
            done += k

    def _hold_once(self, ns, owner, commands):
        env = self.env
        asked = env.now
        with self.resource.request() as req:
            yield req
            start = env.now
            self.queue_s += start - asked
            try:
                yield env.timeout(ns * NS)
            finally:                         # a cancelled hold still occupied the PSP so far
                self.trace.append((start, env.now, owner, commands))
                self.busy_s += env.now - start
                self.commands += commands

    def stats(self):
        """Busy and queueing time (s), commands run, utilisation so far."""
        now = self.env.now
        return {"name": self.name, "busy_s": self.busy_s, "queue_s": self.queue_s,
                "commands": self.commands, "holds": len(self.trace),
                "utilisation": self.busy_s / now if now > 0 else 0.0}


class Psps:
    """One :class:`Psp` per Host, made on first use: pass the same ``Psps`` to every process
    whose Hosts' PSPs should be shared."""

    def __init__(self, env, slice_commands=None):
        self.env, self.slice_commands = env, slice_commands
        self._by_host = {}

    def __getitem__(self, host):
        psp = self._by_host.get(id(host))
        if psp is None:
            psp = Psp(self.env, f"psp{len(self._by_host)}", self.slice_commands)
            self._by_host[id(host)] = psp
        return psp

    def __iter__(self):
        return iter(self._by_host.values())


class _Flow:
    __slots__ = ("remaining", "cap", "rate", "done")

    def __init__(self, nbytes, cap, done):
        self.remaining, self.cap, self.rate, self.done = float(nbytes), cap, 0.0, done


class Link:
    """A network link of ``bytes_per_s`` shared by the transfers on it: max-min fair shares
    (each gets an equal part, a transfer capped lower, e.g. by QEMU's max-bandwidth, gives the
    rest back to the others), and ``latency_s`` after the last byte before the data is there.
    ``busy_s`` is the time with at least one transfer; ``bytes`` what crossed it."""

    def __init__(self, env, bytes_per_s, latency_s=0.0, name="link"):
        if not bytes_per_s > 0 or not math.isfinite(bytes_per_s):
            raise ValueError(f"bytes_per_s must be a finite number > 0, not {bytes_per_s!r}")
        if not latency_s >= 0:
            raise ValueError(f"latency_s must be >= 0, not {latency_s!r}")
        self.env, self.name = env, name
        self.bytes_per_s, self.latency_s = float(bytes_per_s), float(latency_s)
        self._flows = []
        self._t = env.now
        self._gen = 0
        self.busy_s = 0.0
        self.bytes = 0.0
        self.peak_flows = 0

    def send(self, nbytes, cap=math.inf):
        """A SimPy generator: ``nbytes`` over the link at no more than ``cap`` B/s, done
        ``latency_s`` after the last byte. An interrupted transfer leaves the link."""
        env = self.env
        if nbytes > 0:
            flow = _Flow(nbytes, cap, env.event())
            self._settle()
            self._flows.append(flow)
            self.peak_flows = max(self.peak_flows, len(self._flows))
            self._reschedule()
            try:
                yield flow.done
            finally:
                if flow in self._flows:         # interrupted mid-way
                    self._settle()
                    self._flows.remove(flow)
                    self._reschedule()
        if self.latency_s:
            yield env.timeout(self.latency_s)

    def _settle(self):
        """Move every transfer on by what it got since the last change."""
        now = self.env.now
        dt = now - self._t
        if dt > 0 and self._flows:
            self.busy_s += dt
            for f in self._flows:
                moved = min(f.remaining, f.rate * dt)
                f.remaining -= moved
                self.bytes += moved
        self._t = now

    def _reschedule(self):
        """New shares, and a wake-up at the next transfer's end."""
        self._gen += 1
        flows = self._flows
        if not flows:
            return
        left, n = self.bytes_per_s, len(flows)
        for f in sorted(flows, key=lambda f: f.cap):        # water-filling
            f.rate = min(f.cap, left / n)
            left -= f.rate
            n -= 1
        dt = min(f.remaining / f.rate for f in flows)
        gen = self._gen
        self.env.timeout(max(0.0, dt)).callbacks.append(lambda _: self._wake(gen))

    def _wake(self, gen):
        if gen != self._gen:
            return                              # a later change rescheduled
        self._settle()
        # Done: less than a nanosecond of it left (rounding of env.now never leaves a flow
        # waiting for less).
        for f in [f for f in self._flows if f.remaining <= f.rate * NS]:
            self.bytes += f.remaining
            f.remaining = 0.0
            self._flows.remove(f)
            f.done.succeed()
        self._reschedule()

    def stats(self):
        """Busy time (s), bytes carried, utilisation (bytes / capacity over the time so far)."""
        self._settle()
        now = self.env.now
        return {"name": self.name, "busy_s": self.busy_s, "bytes": self.bytes,
                "bytes_per_s": self.bytes_per_s, "peak_transfers": self.peak_flows,
                "utilisation": self.bytes / (self.bytes_per_s * now) if now > 0 else 0.0}
