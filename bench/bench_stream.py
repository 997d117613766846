"""Migration stream throughput: encrypted-page records written and read back, against the raw
socket moving the same bytes, same run.

Each round writes N ENCRYPTED_PAGE records (gfn, be32 hdr_len, 52-byte header, be32 trans_len,
4096-byte ciphertext: 4,180 bytes framed) on one thread and reads and verifies them on another.
Transports: the in-process queue pair and TCP on 127.0.0.1. Peer: `socket.sendall` of the very
bytes the writer produced and `recv_into` them on the other side, with no framing or checksums:
the ceiling of the TCP path on this machine.
"""
import threading

import numpy as np
import pytest

from benchutil import per_item
from sevcore.migration import StreamReader, StreamWriter, TcpListener, inprocess_pair, tcp_connect

PAGE = 4096
N = 8192                 # 32 MiB of ciphertext per round


@pytest.fixture(scope="module")
def pages():
    rng = np.random.default_rng(5)
    return rng.bytes(52 * N), rng.bytes(PAGE * N)


def write_pages(ch, pages):
    hdrs, cts = pages
    w = StreamWriter(ch)
    w.encrypted_pages(range(N), hdrs, cts)
    w.end()
    return w


def read_pages(ch):
    r = StreamReader(ch)
    n = 0
    for rec in r:
        n += 1
    return n


def tcp_pair():
    lst = TcpListener()
    a = tcp_connect(*lst.address, timeout=30)
    b = lst.accept(timeout=30, channel_timeout=30)
    lst.close()
    return a, b


def transfer(make_pair, pages):
    a, b = make_pair()
    t = threading.Thread(target=write_pages, args=(a, pages))
    t.start()
    n = read_pages(b)
    t.join()
    a.close()
    b.close()
    return n


@pytest.mark.parametrize("transport", ["inprocess", "tcp"])
def test_stream_encrypted_pages(benchmark, pages, transport):
    """Writer and reader of N encrypted-page records over one transport."""
    benchmark.group = f"migration stream, {N} encrypted pages"
    make = (lambda: inprocess_pair(timeout=30)) if transport == "inprocess" else tcp_pair
    per_item(benchmark, N, "pages")
    n = benchmark.pedantic(transfer, (make, pages), rounds=5, iterations=1, warmup_rounds=1)
    assert n == N + 1


def test_raw_socket_same_bytes(benchmark, pages):
    """Peer: the same stream bytes through sendall / recv_into on 127.0.0.1, no parsing."""
    benchmark.group = f"migration stream, {N} encrypted pages"
    a, b = inprocess_pair(capacity=1 << 28)
    write_pages(a, pages)
    a.close()
    blob = bytearray(b.bytes_received + (1 << 28))
    size = 0
    while (got := b.recv_into(memoryview(blob)[size:])):
        size += got
    blob = bytes(blob[:size])

    def run():
        src, dst = tcp_pair()
        t = threading.Thread(target=src.sock.sendall, args=(blob,))
        t.start()
        buf = bytearray(1 << 20)
        total = 0
        while (got := dst.sock.recv_into(buf)):
            total += got
            if total == size:
                break
        t.join()
        src.close()
        dst.close()
        return total
    per_item(benchmark, N, "pages")
    assert benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1) == size
