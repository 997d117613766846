"""Migrations and launches as SimPy processes (docs/embedding.md)."""
from sevcore.hw.clock import SimClock
from sevcore.hw.costmodel import CostModel
from sevcore.migration.driver import psp_command, work_ns
from sevcore.migration.engine import MigrationError, MigrationParams, MigrationResult, migrate
from sevcore.migration.machine import BOOT_IMAGE_SIZE, Machine
from sevcore.sim.driver import SimDriver
from sevcore.sim.resources import NS, Link, Psps

#: The launch's firmware commands and the bytes each moves (machine.Machine._launch).
LAUNCH_COMMANDS = (("LAUNCH_START", 0), ("LAUNCH_UPDATE_DATA", BOOT_IMAGE_SIZE),
                   ("LAUNCH_MEASURE", 0), ("LAUNCH_FINISH", 0))


class Migration:
    """One migration of ``machine`` to a new guest on ``target_kvm``'s Host, in ``env``.

    Start it with ``env.process(mig.run())`` (or :meth:`start`); its value is the engine's
    :class:`MigrationResult`. ``psp`` (a :class:`Psps`) and ``link`` (a :class:`Link`) are
    what it shares with other processes; by default it gets its own. At any simulated time
    :meth:`query` says where it is; :meth:`cancel` (or interrupting its process) ends it with
    SEND_CANCEL, its source guest running, and a result whose status is ``cancelled``."""

    def __init__(self, env, machine, target_kvm, params=MigrationParams(), *, psp=None,
                 link=None, name="migration", progress=None):
        self.env, self.machine, self.target_kvm, self.params = env, machine, target_kvm, params
        self.name = name
        self.psps = Psps(env) if psp is None else psp
        self.link = Link(env, params.cost.link_bytes_per_s) if link is None else link
        self.driver = SimDriver(env, params.cost, machine.host, target_kvm.host, self.psps,
                                self.link, name)
        self.progress = progress
        self.process = None
        self.started_s = self.ended_s = None
        self.result = None
        self.error = None
        self.last = {}                   # the engine's last progress event
        self.target_clock = SimClock()

    def start(self):
        """``env.process(self.run())``; returns the process."""
        return self.env.process(self.run())

    def run(self):
        """The SimPy process body: returns a MigrationResult; raises MigrationError when the
        migration failed (not when it was cancelled)."""
        env = self.env
        self.process = env.active_process
        self.started_s = env.now

        def body():
            return migrate(self.machine, self.target_kvm, self.params, progress=self._progress,
                           driver=self.driver, target_clock=self.target_clock)
        try:
            result = yield from self.driver.serve(body)
        except MigrationError as e:
            self.ended_s = env.now
            if not self.driver.cancelled:
                self.error = e
                raise
            e.stats.status = "cancelled"
            result = MigrationResult(e.stats, None, [])
        self.ended_s = env.now
        if result.target is not None:
            result.target.host.clock.advance_to(env.now / NS, "sim")
        self.result = result
        return result

    def _progress(self, ev):
        self.last = ev
        if self.progress:
            self.progress(self, ev)

    def cancel(self):
        """Interrupt the process: the source sends SEND_CANCEL at once and runs on. Returns
        False (and does nothing) once past SEND_FINISH, when only completing is left."""
        if self.process is None or not self.process.is_alive or self.driver.handed_over:
            return False
        self.process.interrupt("cancel")
        return True

    @property
    def stats(self):
        """The engine's MigrationStats (final once the process ended), or None before it
        began."""
        if self.result is not None:
            return self.result.stats
        if self.error is not None:
            return self.error.stats
        src = self.driver.source
        return None if src is None else src.stats

    @property
    def status(self):
        """``pending``, ``active``, then the engine's final status."""
        if self.result is not None or self.error is not None:
            return self.stats.status
        if self.process is None:
            return "pending"
        return "active" if self.process.is_alive else "failed"

    def query(self):
        """Where the migration is now, in QEMU's query-migrate terms (times in simulated ms)."""
        src = self.driver.source
        if self.result is not None or self.error is not None:
            return self.stats.query_migrate()
        out = {"status": self.status, "total-time": 0.0, "ram": {"transferred": 0},
               "sev": {"iterations": 0}}
        if src is None or self.started_s is None:
            return out
        st = src.stats
        writer = getattr(src, "writer", None)
        out["total-time"] = round((self.env.now - self.started_s) * 1e3, 3)
        out["ram"] = {"transferred": writer.stats.transferred if writer else 0,
                      "remaining": 4096 * max(0, self.last.get("pages", 0)
                                              - self.last.get("sent", 0)),
                      "total": st.guest_pages * 4096,
                      "dirty-sync-count": st.dirty_sync_count}
        out["sev"] = {"path": st.path, "phase": self.last.get("phase", "setup"),
                      "iterations": len(st.iterations),
                      "private-pages": st.private_pages,
                      "psp-commands": dict(sorted(st.psp_commands.items())),
                      "guest-pages-written": st.guest_pages_written}
        return out


def migrate_process(env, machine, target_kvm, params=MigrationParams(), *, psp=None, link=None,
                    name="migration", progress=None):
    """A SimPy process body migrating ``machine`` to ``target_kvm``'s Host: use as
    ``env.process(sevcore.sim.migrate(env, ...))``; its value is a MigrationResult."""
    return Migration(env, machine, target_kvm, params, psp=psp, link=link, name=name,
                     progress=progress).run()


def launch(env, kvm, config, *, psp=None, cost=None, name="launch"):
    """A SimPy process body launching ``config`` on ``kvm``'s Host: the launch runs for real
    when the process starts (Machine.launch: LAUNCH_START, LAUNCH_UPDATE_DATA of the boot
    image, LAUNCH_MEASURE checked by the owner, LAUNCH_FINISH, boot); the process then holds
    the Host's PSP for those commands' modelled time. Its value is the running Machine."""
    cost = CostModel() if cost is None else cost
    psps = Psps(env) if psp is None else psp
    m = Machine.launch(kvm, config)
    for _, nbytes in LAUNCH_COMMANDS:
        yield from psps[kvm.host].hold(work_ns(cost, psp_command(nbytes)), name, 1)
    kvm.host.clock.advance_to(env.now / NS, "sim")
    return m
