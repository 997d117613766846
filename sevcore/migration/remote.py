"""Migration between two processes over TCP: the target listens, the source connects.

>>> serve(4444)                                    # target process: one migration, then return
>>> send_to("127.0.0.1", 4444, machine, params)    # source process

With ``resume=True`` on both sides a post-copy whose connection breaks is continued on a new
one (QEMU's postcopy-paused, then ``migrate -r``): the target keeps listening and the source
connects again, until ``timeout_s`` passes without it.
"""
import time

from sevcore.migration.engine import (GuestLost, MigrationError, MigrationParams,
                                      PostcopyPaused, Source, Target)
from sevcore.migration.errors import StreamError, StreamTimeout
from sevcore.migration.transport import TcpListener, tcp_connect


def serve(port, kvm, host="127.0.0.1", timeout_s=60.0, on_listening=None, resume=False):
    """Accept one migration on ``host:port`` and run it as the target on ``kvm``'s Host;
    returns the Target (``.m`` the running guest, ``.result`` its own memory check).
    ``on_listening(address)`` is called once the socket listens (port 0 picks a free one).
    Raises what Target.run raises; with ``resume``, a paused post-copy waits ``timeout_s``
    for the source to connect again, and raises GuestLost if it does not."""
    with TcpListener(host, port) as lst:
        if on_listening is not None:
            on_listening(lst.address)
        ch = lst.accept(timeout=timeout_s, channel_timeout=timeout_s)
        target = Target(kvm, ch)
        step = target.run
        while True:
            try:
                step()
            except PostcopyPaused:
                ch.close()
                if not resume:
                    raise target.give_up() from None
                try:
                    ch = lst.accept(timeout=timeout_s, channel_timeout=timeout_s)
                except StreamTimeout:
                    raise target.give_up() from None
                step = (lambda c: lambda: target.resume(c))(ch)
                continue
            except BaseException:
                ch.close()
                raise
            ch.close()
            return target


def send_to(host, port, machine, params=MigrationParams(), progress=None, resume=False):
    """Migrate ``machine`` to the target listening on ``host:port``; returns the Source (with
    ``.stats`` and ``.samples``). Raises MigrationError after cancelling; with ``resume``, a
    paused post-copy connects again (for up to ``params.timeout_s``) and goes on."""
    try:
        ch = tcp_connect(host, port, timeout=params.timeout_s)
    except (OSError, StreamError) as e:
        raise MigrationError(f"cannot reach the target at {host}:{port}: {e}") from e
    src = Source(machine, ch, params, progress)
    step = src.run
    while True:
        try:
            step()
        except PostcopyPaused as e:
            ch.close()
            if not resume:
                raise
            ch = _reconnect(host, port, params.timeout_s, e)
            step = (lambda c: lambda: src.resume(c))(ch)
            continue
        except BaseException:
            ch.close()
            raise
        ch.close()
        return src


def _reconnect(host, port, timeout_s, paused):
    """A new connection to the target, retried until ``timeout_s``; GuestLost if none."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return tcp_connect(host, port, timeout=timeout_s)
        except (OSError, StreamError) as e:
            if time.monotonic() > deadline:
                raise GuestLost(f"the guest is lost: post-copy paused and the target at "
                                f"{host}:{port} cannot be reached again: {e}",
                                paused.stats) from e
            time.sleep(0.05)
