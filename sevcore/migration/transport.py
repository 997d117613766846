"""Byte channels for the migration stream: in process (a bounded queue pair) and TCP.

A channel has ``send(data)`` (all of it, blocking), ``recv_into(buffer) -> n`` (0 at the end of
the stream), ``close()``, and counts ``bytes_sent`` / ``bytes_received``. Errors are the stream's:
``PeerClosed`` when the other end is gone (a reset connection, or sending to an end that closed),
``StreamTimeout`` when nothing moves within the timeout. A clean close by the peer is not an error
here: ``recv_into`` returns 0 and the stream reader decides whether the stream was complete.

>>> src, dst = inprocess_pair()                  # two ends, each can send and receive
>>> with TcpListener() as lst:                   # 127.0.0.1, ephemeral port
...     a = tcp_connect(*lst.address); b = lst.accept(timeout=5)
"""
import socket
import threading
import time

import numpy as np

from sevcore.migration.errors import PeerClosed, StreamTimeout

#: Default capacity of one in-process direction, in bytes.
INPROCESS_CAPACITY = 8 << 20


class _Pipe:
    """One direction of an in-process channel: a ring of ``capacity`` bytes with one writer and
    one reader, like a socket's buffer. The ring is allocated once (its pages are touched as they
    are first used) and each side copies its bytes outside the lock: the writer into the free
    span after the data, the reader out of the data at the head, neither of which the other
    side touches until the counts under the lock say so."""

    def __init__(self, capacity, cond=None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 byte, not {capacity}")
        self.capacity = capacity
        self.ring = np.empty(capacity, np.uint8)
        self.head = 0                   # ring offset of the oldest unread byte
        self.used = 0                   # bytes written and not yet read
        self.writer_closed = False
        self.reader_closed = False
        self.cond = threading.Condition() if cond is None else cond

    def _wait(self, ready, timeout, what):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise StreamTimeout(f"in-process channel: no progress in {timeout} s ({what})")
            self.cond.wait(left)

    def put(self, data, timeout):
        src = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        pos, cap = 0, self.capacity
        while pos < src.size:
            with self.cond:
                self._wait(lambda: self.reader_closed or self.used < cap,
                           timeout, "send: the queue is full")
                if self.reader_closed:
                    raise PeerClosed("in-process channel: the receiving end is closed")
                tail = (self.head + self.used) % cap    # head + used is the reader's invariant
                n = min(src.size - pos, cap - self.used, cap - tail)
            self.ring[tail:tail + n] = src[pos:pos + n]
            with self.cond:
                if not self.reader_closed:
                    self.used += n
                self.cond.notify_all()
            pos += n

    def get_into(self, buf, timeout):
        out = np.frombuffer(memoryview(buf).cast("B"), np.uint8)
        with self.cond:
            self._wait(lambda: self.used or self.writer_closed or self.reader_closed,
                       timeout, "receive: the queue is empty")
            head = self.head
            n = min(out.size, self.used, self.capacity - head)
        if n:
            out[:n] = self.ring[head:head + n]
            with self.cond:
                if not self.reader_closed:
                    self.head = (head + n) % self.capacity
                    self.used -= n
                self.cond.notify_all()
        return n

    def close_writer(self):
        with self.cond:
            self.writer_closed = True
            self.cond.notify_all()

    def close_reader(self):
        with self.cond:
            self.reader_closed = True
            self.used = self.head = 0
            self.cond.notify_all()


class InProcessChannel:
    """One end of an in-process channel pair (see ``inprocess_pair``)."""

    def __init__(self, tx, rx, timeout, baton=None):
        self._tx, self._rx, self.timeout = tx, rx, timeout
        #: For an ``inline`` pair, the Baton each thread using an end holds while it runs.
        self.baton = baton
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False

    def send(self, data):
        """Queue all of ``data``, blocking while the queue is full; raises PeerClosed if the other
        end is closed, StreamTimeout if the queue stays full for ``timeout`` seconds."""
        if self.closed:
            raise ValueError("send on a closed channel")
        n = memoryview(data).nbytes
        self._tx.put(data, self.timeout)
        self.bytes_sent += n

    def recv_into(self, buf):
        """Copy queued bytes into ``buf``; returns how many, 0 once the other end has closed and
        the queue is drained. Raises StreamTimeout after ``timeout`` seconds of nothing."""
        if self.closed:
            raise ValueError("recv on a closed channel")
        n = self._rx.get_into(buf, self.timeout)
        self.bytes_received += n
        return n

    def close(self):
        """Close both directions: the peer reads what was sent and then the end of the stream,
        and its further sends raise PeerClosed."""
        if not self.closed:
            self.closed = True
            self._tx.close_writer()
            self._rx.close_reader()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Baton:
    """One core's worth of an inline channel pair: a thread runs only while it holds the baton
    (``with baton:``) and hands it over only where it would wait (a full send, an empty
    receive), so the two ends' threads take turns, as coroutines would, and a migration keeps
    one core busy instead of overlapping its source and target."""

    def __init__(self):
        self.cond = threading.Condition(threading.RLock())

    def __enter__(self):
        self.cond.acquire()
        return self

    def __exit__(self, *exc):
        self.cond.notify_all()           # the other end may wait for a turn we no longer take
        self.cond.release()


def inprocess_pair(capacity=INPROCESS_CAPACITY, timeout=None, inline=False):
    """Two connected in-process channel ends; each direction holds at most ``capacity`` bytes.

    ``timeout`` (seconds, None = wait forever) bounds how long a send waits for room and a
    receive waits for data. ``inline``: the ends share a :class:`Baton` (``end.baton``) that
    each of the two threads holds while it runs, so only one runs at a time."""
    baton = Baton() if inline else None
    cond = baton.cond if inline else None
    ab, ba = _Pipe(capacity, cond), _Pipe(capacity, cond)
    return InProcessChannel(ab, ba, timeout, baton), InProcessChannel(ba, ab, timeout, baton)


class TcpChannel:
    """A migration channel over a connected TCP socket."""

    def __init__(self, sock, timeout=None):
        self.sock = sock
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = sock.getpeername()
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, data):
        """Send all of ``data``; raises PeerClosed if the peer reset or closed the connection,
        StreamTimeout if the socket times out."""
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise StreamTimeout(f"TCP send to {self.peer}: timed out") from None
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
            raise PeerClosed(f"TCP send to {self.peer}: the peer closed the connection "
                             f"({e.strerror}) after {self.bytes_sent} bytes") from e
        self.bytes_sent += memoryview(data).nbytes

    def recv_into(self, buf):
        """Receive into ``buf``; returns how many bytes, 0 when the peer has closed its end.
        Raises PeerClosed on a reset connection, StreamTimeout on a timeout."""
        try:
            n = self.sock.recv_into(buf)
        except socket.timeout:
            raise StreamTimeout(f"TCP receive from {self.peer}: timed out") from None
        except (ConnectionResetError, ConnectionAbortedError) as e:
            raise PeerClosed(f"TCP receive from {self.peer}: connection reset by the peer after "
                             f"{self.bytes_received} bytes") from e
        self.bytes_received += n
        return n

    def close(self):
        """Close the socket (the peer's reads then end)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TcpListener:
    """A listening TCP socket for the migration target; ``address`` is ``(host, port)`` (port 0
    asks for an ephemeral port)."""

    def __init__(self, host="127.0.0.1", port=0):
        self.sock = socket.create_server((host, port))
        self.address = self.sock.getsockname()[:2]

    def accept(self, timeout=None, channel_timeout=None):
        """Wait up to ``timeout`` seconds for the source to connect; returns its TcpChannel.
        Raises StreamTimeout if nobody connects."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except socket.timeout:
            raise StreamTimeout(f"no migration source connected to {self.address} "
                                f"within {timeout} s") from None
        return TcpChannel(conn, channel_timeout)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tcp_connect(host, port, timeout=None):
    """Connect to a listening target; returns a TcpChannel whose operations time out after
    ``timeout`` seconds (None: never). Raises PeerClosed if the connection is refused."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError as e:
        raise PeerClosed(f"TCP connect to {(host, port)}: connection refused") from e
    return TcpChannel(sock, timeout)
