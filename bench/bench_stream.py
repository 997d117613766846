"""Migration stream throughput: encrypted pages written and read back, as single-page records
and as batch records, against the raw socket moving the same bytes, same run.

Each round writes N pages on one thread and reads and verifies them on another. Single-page
ENCRYPTED_PAGE records are 4,180 bytes framed; ENCRYPTED_PAGES batch records carry
``BATCH_PAGES`` pages of 4,164 bytes (gfn + QEMU's per-page bytes) in one frame. Transports: the
in-process queue pair and TCP on 127.0.0.1. Peer: ``socket.sendall`` of the very bytes the batch
writer produced and ``recv_into`` them on the other side, with no framing or checksums: the
ceiling of the TCP path on this machine. The 4 GiB group moves 1 Mi pages (a fully touched
4 GiB guest) through the batch path over TCP; target: >= 300 k pages/s.
"""
import threading
import zlib

import numpy as np
import pytest

from benchutil import on_tier, per_item, tier_params
from sevcore.core import checksum
from sevcore.migration import StreamReader, StreamWriter, TcpListener, inprocess_pair, tcp_connect

PAGE = 4096
N = 16384                # 64 MiB of ciphertext per round
BIG = 1 << 20            # pages of a 4 GiB guest
CALL = 4096              # pages per batch call (what one batched SEND_UPDATE_DATA returns)


@pytest.fixture(scope="module")
def pages():
    rng = np.random.default_rng(5)
    return (np.arange(N, dtype=np.uint64),
            np.frombuffer(rng.bytes(52 * N), np.uint8).reshape(N, 52),
            np.frombuffer(rng.bytes(PAGE * N), np.uint8).reshape(N, PAGE))


def write_singles(ch, pages, total=N):
    gfns, hdrs, cts = pages
    w = StreamWriter(ch)
    w.encrypted_pages(range(total), hdrs, cts)
    w.end()
    return w


def write_batches(ch, pages, total=N):
    """``total`` pages in calls of CALL pages, cycling over the N source pages."""
    gfns, hdrs, cts = pages
    w = StreamWriter(ch)
    for lo in range(0, total, CALL):
        i = lo % N
        w.encrypted_batch(gfns[i:i + CALL] + np.uint64(lo - i), hdrs[i:i + CALL],
                          cts[i:i + CALL])
    w.end()
    return w


def read_pages(ch):
    """Pages received (batch records count their pages)."""
    n = 0
    for rec in StreamReader(ch):
        n += len(rec.gfns) if hasattr(rec, "gfns") else hasattr(rec, "trans")
    return n


def tcp_pair():
    lst = TcpListener()
    a = tcp_connect(*lst.address, timeout=60)
    b = lst.accept(timeout=60, channel_timeout=60)
    lst.close()
    return a, b


PAIRS = {"inprocess": lambda: inprocess_pair(timeout=60), "tcp": tcp_pair}


def transfer(make_pair, write, pages, total):
    a, b = make_pair()
    t = threading.Thread(target=write, args=(a, pages, total))
    t.start()
    n = read_pages(b)
    t.join()
    a.close()
    b.close()
    return n


@pytest.mark.parametrize("records", ["single", "batch"])
@pytest.mark.parametrize("transport", list(PAIRS))
def test_stream(benchmark, pages, transport, records):
    """Writer and reader of N pages over one transport, as N ENCRYPTED_PAGE records or as
    ENCRYPTED_PAGES batch records."""
    benchmark.group = f"migration stream, {N} encrypted pages"
    per_item(benchmark, N, "pages")
    write = write_singles if records == "single" else write_batches
    n = benchmark.pedantic(transfer, (PAIRS[transport], write, pages, N), rounds=5,
                           iterations=1, warmup_rounds=1)
    assert n == N


def stream_bytes(pages, total):
    """The bytes the batch writer produces for ``total`` pages."""
    a, b = inprocess_pair(capacity=1 << 30)
    write_batches(a, pages, total)
    a.close()
    blob = bytearray(a.bytes_sent + 1)
    size = 0
    while (got := b.recv_into(memoryview(blob)[size:])):
        size += got
    return bytes(blob[:size])


def raw_socket(blob, repeat):
    """sendall ``blob`` ``repeat`` times on one thread, recv_into on this one: bytes received."""
    src, dst = tcp_pair()

    def send():
        for _ in range(repeat):
            src.sock.sendall(blob)
    t = threading.Thread(target=send)
    t.start()
    buf = bytearray(1 << 20)
    total, want = 0, len(blob) * repeat
    while total < want and (got := dst.sock.recv_into(buf)):
        total += got
    t.join()
    src.close()
    dst.close()
    return total


def test_raw_socket_same_bytes(benchmark, pages):
    """Peer: the batch stream's bytes through sendall / recv_into on 127.0.0.1, no parsing."""
    benchmark.group = f"migration stream, {N} encrypted pages"
    blob = stream_bytes(pages, N)
    per_item(benchmark, N, "pages")
    assert benchmark.pedantic(raw_socket, (blob, 1), rounds=5, iterations=1,
                              warmup_rounds=1) == len(blob)


def test_stream_4gib_tcp(benchmark, pages):
    """A 4 GiB guest's pages (1 Mi) as batch records over TCP, writer and reader threads."""
    benchmark.group = "migration stream, 4 GiB of encrypted pages over TCP"
    per_item(benchmark, BIG, "pages")
    n = benchmark.pedantic(transfer, (tcp_pair, write_batches, pages, BIG), rounds=3,
                           iterations=1, warmup_rounds=0)
    assert n == BIG


def test_raw_socket_4gib(benchmark, pages):
    """Peer: the same number of stream bytes through a raw socket (N pages' bytes, 64 times)."""
    benchmark.group = "migration stream, 4 GiB of encrypted pages over TCP"
    blob = stream_bytes(pages, N)
    per_item(benchmark, BIG, "pages")
    assert benchmark.pedantic(raw_socket, (blob, BIG // N), rounds=3, iterations=1,
                              warmup_rounds=0) == len(blob) * (BIG // N)


@pytest.mark.parametrize("tier", tier_params())
def test_crc32_of_1mib(benchmark, tier):
    """The frame checksum of a 1 MiB batch payload: the C kernel on each tier."""
    benchmark.group = "CRC-32 of a 1 MiB payload"
    data = np.random.default_rng(9).bytes(1 << 20)
    per_item(benchmark, 1, "MiB")
    with on_tier(benchmark, tier):
        assert benchmark(checksum.crc32, data) == zlib.crc32(data)


def test_crc32_of_1mib_zlib(benchmark):
    """The peer: zlib.crc32 of the same payload."""
    benchmark.group = "CRC-32 of a 1 MiB payload"
    data = np.random.default_rng(9).bytes(1 << 20)
    per_item(benchmark, 1, "MiB")
    assert benchmark(zlib.crc32, data) == zlib.crc32(data)
