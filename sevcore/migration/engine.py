"""The live-migration engine: pre-copy of an SEV guest from a source Host to a target Host.

:class:`Source` and :class:`Target` are the two VMMs' migration code; they talk through a
channel (in process, or TCP between two processes). Forward, the source writes the migration
stream (docs/migration-stream.md); back, the target answers with a stream of its own carrying
JSON messages (SETUP records): its certificate chain, READY when every page is in, ERROR, and
RESUMED with the guest's own check of its memory.

The order of one migration (docs/migration.md has the reasoning)::

    source                                        target
    refuse unless KVM_MIGRATION_READY
    SETUP {guest, params}                   ->    create the VM (KVM_SEV_INIT2), memory, vCPUs
                                            <-    HELLO {PDH, platform and AMD certificates}
    KVM_SEV_SEND_START (target's chain)
    SEV_SESSION {policy, source PDH, session} ->   KVM_SEV_RECEIVE_START
    ITERATION 0, every page                 ->    RECEIVE_UPDATE_DATA / helper OPEN / copy
    ITERATION k, the pages dirtied since    ->    ...
    (downtime estimate <= limit, or the iteration limit)
    ITERATION STOP: the guest is paused; the last dirty pages, shared ranges, vCPU states
    SETUP {complete}                        ->
                                            <-    READY
    KVM_SEV_SEND_FINISH (never runs again)
    END                                     ->    KVM_SEV_RECEIVE_FINISH, the guest runs
                                            <-    RESUMED {pages checked, bad}

Until SEND_FINISH any failure on either side, the target going away included, ends with
KVM_SEV_SEND_CANCEL on the source: its guest is RUNNING again with its memory unchanged.

Two kinds of time: everything is computed for real (wall time), and each modelled hardware cost
advances simulated time by :class:`sevcore.hw.costmodel.CostModel`. The engine describes each
step's cost and a driver (:mod:`sevcore.migration.driver`) decides when it happens. The default
keeps the source Host's clock, plus a network stage and a target stage in a three-stage pipeline
with one batch in flight between stages, so the slowest stage sets the pace. The guest reads its
TSC from the source clock, so it dirties pages at its rate of simulated time.
"""
import contextlib
import threading
from dataclasses import dataclass

from sevcore.migration.driver import ClockDriver, Driver
from sevcore.migration.errors import (GuestLost, MigrationError, NotMigrationReady,
                                      PostcopyPaused, TargetFailed)
from sevcore.migration.machine import Machine
from sevcore.migration.params import PATHS, MigrationParams
from sevcore.migration.source import Source
from sevcore.migration.stats import MigrationStats
from sevcore.migration.target import Target
from sevcore.migration.timeline import Timeline
from sevcore.migration.transport import inprocess_pair

#: The engine's API: ``migrate`` and what it takes, returns and raises; the two ends.
__all__ = ["PATHS", "ClockDriver", "Driver", "GuestLost", "MigrationError", "MigrationParams",
           "MigrationResult", "NotMigrationReady", "PostcopyPaused", "Source", "Target",
           "TargetFailed", "Timeline", "migrate", "resume"]


@dataclass
class MigrationResult:
    """What :func:`migrate` returns: the statistics, the target's running Machine, and the
    pages-remaining samples ``(simulated ns, pages, iteration)`` for plots."""
    stats: MigrationStats
    target: Machine
    samples: list


#: Whether this process's in-process migrations take one core (see :func:`set_inline`).
_inline = False


def set_inline(on=True):
    """Make this process's in-process migrations run on one core at a time: the source and
    the target take turns (an inline channel pair, :class:`sevcore.migration.transport.Baton`)
    and the target faults its frames in where it writes them (no HostMemory.populating
    thread). For processes that run one migration per core side by side (the sweep engine's
    workers); a lone migration is faster overlapped, the default. Returns the old setting."""
    global _inline
    old, _inline = _inline, bool(on)
    return old


def migrate(machine, target_kvm, params=MigrationParams(), progress=None, channel_pair=None,
            driver=None, target_clock=None):
    """Migrate ``machine`` to a new guest on ``target_kvm``'s Host, in this process (the target
    runs in a thread). ``driver`` keeps simulated time (default: ClockDriver on the source
    Host's clock); ``target_clock`` takes the target's own charges (default: its Host's).
    Returns MigrationResult; raises MigrationError after cancelling."""
    a, b = channel_pair or inprocess_pair(timeout=params.timeout_s, inline=_inline)
    target = Target(target_kvm, b, target_clock)
    target.populate = not _inline
    src = Source(machine, a, params, progress, driver)
    r = _both(src, target, src.run, target.run, params.timeout_s, a)
    r.target.owner = machine.owner         # the guest's owner serves it where it runs now
    r.target.generation = src.target_generation
    return r


def resume(paused, channel_pair=None):
    """Continue a post-copy that :func:`migrate` left paused (the PostcopyPaused it raised,
    which holds ``source`` and ``target``) on a new in-process connection. Returns and raises
    as :func:`migrate`."""
    src, target = paused.source, paused.target
    timeout = src.params.timeout_s
    a, b = channel_pair or inprocess_pair(timeout=timeout, inline=_inline)
    return _both(src, target, lambda: src.resume(a), lambda: target.resume(b), timeout, a)


def _both(src, target, run_source, run_target, timeout, channel):
    """The source here and the target in a thread; a pause keeps both for :func:`resume`.
    On an inline pair (``channel``'s) each holds the pair's baton while it runs."""
    failure = []
    baton = getattr(channel, "baton", None) or contextlib.nullcontext()

    def target_thread():
        try:
            with baton:
                run_target()
        except BaseException as e:            # reported to the source through the channel
            failure.append(e)
    th = threading.Thread(target=target_thread, name="sevcore-migration-target", daemon=True)
    try:
        with baton:
            th.start()
            stats = run_source()
    except PostcopyPaused as e:
        th.join(timeout)
        e.source, e.target = src, target
        raise
    finally:
        th.join(timeout)
    if failure:
        raise MigrationError(f"target failed after the hand-over: {failure[0]}", stats)
    return MigrationResult(stats, target.m, src.samples)
