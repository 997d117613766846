"""Migration between two processes over TCP: the target listens, the source connects.

>>> serve(4444)                                    # target process: one migration, then return
>>> send_to("127.0.0.1", 4444, machine, params)    # source process
"""
from sevcore.migration.engine import MigrationError, MigrationParams, Source, Target
from sevcore.migration.errors import StreamError
from sevcore.migration.transport import TcpListener, tcp_connect


def serve(port, kvm, host="127.0.0.1", timeout_s=60.0, on_listening=None):
    """Accept one migration on ``host:port`` and run it as the target on ``kvm``'s Host;
    returns the Target (``.m`` the running guest, ``.result`` its own memory check).
    ``on_listening(address)`` is called once the socket listens (port 0 picks a free one).
    Raises what Target.run raises."""
    with TcpListener(host, port) as lst:
        if on_listening is not None:
            on_listening(lst.address)
        ch = lst.accept(timeout=timeout_s, channel_timeout=timeout_s)
    target = Target(kvm, ch)
    try:
        target.run()
    finally:
        ch.close()
    return target


def send_to(host, port, machine, params=MigrationParams(), progress=None):
    """Migrate ``machine`` to the target listening on ``host:port``; returns the Source (with
    ``.stats`` and ``.samples``). Raises MigrationError after cancelling."""
    try:
        ch = tcp_connect(host, port, timeout=params.timeout_s)
    except (OSError, StreamError) as e:
        raise MigrationError(f"cannot reach the target at {host}:{port}: {e}") from e
    src = Source(machine, ch, params, progress)
    try:
        src.run()
    finally:
        ch.close()
    return src
