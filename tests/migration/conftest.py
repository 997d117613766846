import threading

import pytest

from sevcore.migration import TcpListener, inprocess_pair, tcp_connect
from sevcore.migration import helper as H


@pytest.fixture(autouse=True)
def _helper_vcpus_at_once(monkeypatch):
    """Helper vCPUs serve every request at once in their threads, however small their share
    (a migration's own threshold keeps small shares in one thread): the tests' guests are
    small, and the threads are what they check."""
    monkeypatch.setattr(H, "PARALLEL_MIN_PAGES", 1)


class Pair:
    """Two connected channel ends and a way to run the writing side in a thread."""

    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        self.threads = []
        self.errors = []

    def write_in_thread(self, fn):
        def run():
            try:
                fn(self.src)
            except BaseException as e:          # surfaced by join()
                self.errors.append(e)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def join(self):
        for t in self.threads:
            t.join(10)
        return self.errors


@pytest.fixture(params=["inprocess", "tcp"])
def pair(request):
    """A connected (source, target) channel pair: in process, or TCP on 127.0.0.1."""
    if request.param == "inprocess":
        src, dst = inprocess_pair(capacity=64 << 10, timeout=10)
        yield Pair(src, dst)
    else:
        with TcpListener() as lst:
            src = tcp_connect(*lst.address, timeout=10)
            dst = lst.accept(timeout=10, channel_timeout=10)
            yield Pair(src, dst)
    src.close()
    dst.close()
