"""Channels under the stream: a peer that closes or dies mid-stream, refused connections,
timeouts and the bounded in-process queue."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from sevcore.migration import (PeerClosed, StreamReader, StreamTimeout, StreamTruncated,
                               StreamWriter, TcpListener, inprocess_pair, tcp_connect)
from sevcore.migration import transport as T

PAGE = 4096
HDR, CT = bytes(52), bytes(range(256)) * 16


def test_writer_closing_before_end_is_truncation(pair):
    """A source that closes after three records leaves the target with them and StreamTruncated."""
    def write(ch):
        w = StreamWriter(ch)
        for gfn in range(3):
            w.encrypted_page(gfn, HDR, CT)
        w.flush()
        ch.close()
    pair.write_in_thread(write)
    r = StreamReader(pair.dst)
    got = [r.read() for _ in range(3)]
    with pytest.raises(StreamTruncated, match="before END") as info:
        r.read()
    assert [g.gfn for g in got] == [0, 1, 2] and info.value.record == 3
    assert pair.join() == []


def test_peer_closed_inside_a_record(pair):
    """A source that stops halfway through a record: the target names the record and the bytes."""
    def write(ch):
        w = StreamWriter(ch, flush_size=1 << 30)
        w.encrypted_page(1, HDR, CT)
        w.encrypted_page(2, HDR, CT)
        data = bytes(w._buf)
        ch.send(data[:len(data) - 1000])
        ch.close()
    pair.write_in_thread(write)
    r = StreamReader(pair.dst)
    assert r.read().gfn == 1
    with pytest.raises(StreamTruncated, match="EncryptedPage record needs 4180 bytes") as info:
        r.read()
    assert info.value.record == 1 and info.value.offset == 16 + 4180
    assert pair.join() == []


def test_reader_gone_makes_the_writer_fail(pair):
    """When the target closes its end, the source's next sends raise PeerClosed."""
    pair.dst.close()
    w = StreamWriter(pair.src, flush_size=1)
    with pytest.raises(PeerClosed, match="closed"):
        for gfn in range(10_000):
            w.encrypted_page(gfn, HDR, CT)
            time.sleep(0)


def test_connect_refused():
    """Connecting where nobody listens is PeerClosed (connection refused)."""
    with TcpListener() as lst:
        port = lst.address[1]
    with pytest.raises(PeerClosed, match="refused"):
        tcp_connect("127.0.0.1", port, timeout=5)


def test_timeouts():
    """An idle in-process receive, a full queue, a silent TCP peer and a missing source time out."""
    a, b = inprocess_pair(capacity=10, timeout=0.05)
    with pytest.raises(StreamTimeout):
        b.recv_into(bytearray(10))
    with pytest.raises(StreamTimeout, match="full"):
        a.send(bytes(11))
    with TcpListener() as lst:
        with pytest.raises(StreamTimeout, match="no migration source"):
            lst.accept(timeout=0.05)
        c = tcp_connect(*lst.address, timeout=0.05)
        with pytest.raises(StreamTimeout):
            c.recv_into(bytearray(10))
        c.close()


def test_bounded_queue_never_exceeds_capacity():
    """A 10 KiB in-process queue carries a 100-page stream while never holding more than 10 KiB."""
    a, b = inprocess_pair(capacity=10 << 10, timeout=10)
    peak = []
    orig = T._Pipe.put

    def put(self, data, timeout):
        orig(self, data, timeout)
        peak.append(self.used)
    T._Pipe.put = put
    try:
        def write():
            w = StreamWriter(a, flush_size=3000)
            for gfn in range(100):
                w.encrypted_page(gfn, HDR, CT)
            w.end()
        t = threading.Thread(target=write)
        t.start()
        recs = StreamReader(b).read_all()
        t.join(10)
    finally:
        T._Pipe.put = orig
    assert len(recs) == 101 and max(peak) <= 10 << 10
    assert a.bytes_sent == b.bytes_received == 16 + 100 * 4180 + 24



def test_ring_carries_bytes_in_order_across_its_end():
    """The in-process ring (capacity not a multiple of any write or read size) delivers exactly
    the bytes sent, in order, through many wrap-arounds, with writer and reader in two threads."""
    import numpy as np
    rng = np.random.default_rng(8)
    data = rng.integers(0, 256, 3_000_003, dtype=np.uint8).tobytes()
    a, b = inprocess_pair(capacity=65_537, timeout=10)
    sizes = rng.integers(1, 50_000, 400).tolist()

    def write():
        pos, k = 0, 0
        while pos < len(data):
            n = sizes[k % len(sizes)]
            a.send(memoryview(data)[pos:pos + n])
            pos, k = pos + n, k + 1
        a.close()
    t = threading.Thread(target=write)
    t.start()
    got = bytearray()
    buf = bytearray(70_001)
    k = 0
    while True:
        n = b.recv_into(memoryview(buf)[:sizes[-1 - k % len(sizes)]])
        if n == 0:
            break
        got += buf[:n]
        k += 1
    t.join(10)
    assert bytes(got) == data and a.bytes_sent == b.bytes_received == len(data)


SENDER = textwrap.dedent("""
    import sys
    from sevcore.migration import StreamWriter, tcp_connect
    ch = tcp_connect("127.0.0.1", int(sys.argv[1]), timeout=30)
    w = StreamWriter(ch, flush_size=6000)
    gfn = 0
    while True:
        w.encrypted_page(gfn, bytes(52), bytes(4096))
        gfn += 1
""")


def test_killed_source_process_mid_send():
    """A source process killed while sending leaves the target with whole records and a clear
    StreamTruncated, not a hang or a partial record."""
    with TcpListener() as lst:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.Popen([sys.executable, "-c", SENDER, str(lst.address[1])], env=env)
        try:
            ch = lst.accept(timeout=20, channel_timeout=20)
            r = StreamReader(ch)
            for i in range(50):
                assert r.read().gfn == i
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            with pytest.raises(StreamTruncated, match="before END") as info:
                while True:
                    rec = r.read()
                    assert rec.trans == bytes(PAGE)
            assert info.value.record >= 50
            assert r.stats.records["EncryptedPage"] == info.value.record
            ch.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_inline_pair_runs_one_end_at_a_time():
    """On an inline pair the thread holding the baton runs until it waits: the other end's
    thread gets its turn only when the queue is full or empty, and never runs beside it."""
    a, b = inprocess_pair(capacity=8, timeout=5, inline=True)
    assert a.baton is b.baton is not None and inprocess_pair()[0].baton is None
    log, running = [], []

    def reader():
        with b.baton:
            running.append("r")
            buf = bytearray(8)
            got = 0
            while got < 24:
                log.append(("r", len(running)))
                got += b.recv_into(memoryview(buf)[:min(8, 24 - got)])
            running.remove("r")

    with a.baton:
        th = threading.Thread(target=reader)
        th.start()
        time.sleep(0.05)                     # the reader cannot start: the baton is held
        assert log == []
        running.append("w")
        for i in range(3):
            running.remove("w")
            a.send(bytes([i]) * 8)           # 8 bytes fill the queue; the next send waits
            running.append("w")
        running.remove("w")
    th.join(5)
    assert not th.is_alive() and all(n == 1 for _, n in log) and len(log) >= 3
