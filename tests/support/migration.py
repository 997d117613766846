"""Helpers for the engine tests: small launched guests and a man-in-the-middle that re-frames
the stream (so a change reaches the target with valid CRCs, as an attacker on the wire can)."""
import dataclasses
import subprocess
import sys
import threading
import time

import sevcore
from sevcore.migration import stream as S
from sevcore.migration.machine import Machine
from sevcore.migration.transport import inprocess_pair
from sevcore.migration.workload import GuestConfig

SMALL = dict(mem_size=2 << 20, shared_size=64 << 10)


def launched(**cfg):
    """A booted, migration-ready guest on a fresh Host, and a second Host for the target."""
    kvm = sevcore.Kvm()
    m = Machine.launch(kvm, GuestConfig(**{**SMALL, **cfg}))
    return m, sevcore.Kvm()


def memory_snapshot(m):
    """Every byte of the guest's memory as the host sees it (ciphertext for private pages)."""
    return m.kvm.read(m.hva, m.config.mem_size)


def guest_state(m):
    from sevcore.uapi import KVM_SEV_GUEST_STATUS
    return m.vm.memory_encrypt_op(KVM_SEV_GUEST_STATUS).state


class Proxy:
    """Sits between source and target: records source -> target go through ``transform(index,
    record, writer)`` (which writes what the target should see, or raises to cut the stream);
    bytes target -> source pass unchanged. Use ``proxy.source_end`` and ``proxy.target_end``."""

    def __init__(self, transform, timeout=20):
        self.source_end, self._a = inprocess_pair(timeout=timeout)
        self._b, self.target_end = inprocess_pair(timeout=timeout)
        self.transform = transform
        self.errors = []
        # A forward failure ends only the stream to the target (its reader sees the end): the
        # target then reports and closes, and the backward thread carries the report to the
        # source before closing the source's side, so the source reads what the target said.
        threading.Thread(target=self._guard(self._forward, self._b._tx.close_writer),
                         daemon=True).start()
        threading.Thread(target=self._guard(self._backward, self._close_both),
                         daemon=True).start()

    def _close_both(self):
        for end in (self._a, self._b):
            end.close()

    def _guard(self, fn, on_error):
        def run():
            try:
                fn()
            except BaseException as e:
                self.errors.append(e)
                on_error()
        return run

    def _forward(self):
        reader = S.StreamReader(self._a)
        reader.read_header()
        writer = S.StreamWriter(self._b, reader.flags)
        i = 0
        for rec in reader:
            # Batch records go on as their single-page records, so a transform sees pages.
            for one in (rec if isinstance(rec, S._Batch) else (rec,)):
                self.transform(i, one, writer)
                i += 1
            writer.flush()
            if isinstance(rec, S.End):
                break

    def _backward(self):
        buf = bytearray(1 << 16)
        while True:
            n = self._b.recv_into(buf)
            if n == 0:
                self._a.close()
                return
            self._a.send(buf[:n])


def rewrite(writer, rec):
    """Write ``rec`` (a record read from a stream) unchanged."""
    if isinstance(rec, S.Setup):
        writer.setup(rec.params)
    elif isinstance(rec, S.SevSession):
        writer.sev_session(rec.policy, rec.pdh, rec.session)
    elif isinstance(rec, S.EncryptedPage):
        writer.encrypted_page(rec.gfn, rec.hdr, rec.trans)
    elif isinstance(rec, S.SharedPage):
        writer.shared_page(rec.gfn, rec.data)
    elif isinstance(rec, S.HelperPage):
        writer.helper_page(rec.gfn, rec.seq, rec.packet)
    elif isinstance(rec, S.ZeroPages):
        writer.zero_pages(rec.gfn, rec.npages)
    elif isinstance(rec, S.Iteration):
        writer.iteration(rec.iteration, rec.dirty_pages, rec.stop)
    elif isinstance(rec, S.VcpuState):
        writer.vcpu_state(rec.vcpu_id, rec.data)
    elif isinstance(rec, S.End):
        writer.end()
    else:
        raise TypeError(type(rec))


def flip(data, bit):
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def swapped(a, b, keep=("gfn",)):
    """Records ``a`` and ``b`` with their payloads exchanged and the ``keep`` fields (the page,
    and for helper packets its sequence number) left in place."""
    return (dataclasses.replace(b, **{k: getattr(a, k) for k in keep}),
            dataclasses.replace(a, **{k: getattr(b, k) for k in keep}))


def assert_runs_on(m, before=None):
    """The source guest is RUNNING (its memory as ``before``, if given) and runs another tick."""
    from sevcore.uapi import SEV_GUEST_STATE_RUNNING
    assert guest_state(m) == SEV_GUEST_STATE_RUNNING
    if before is not None:
        assert memory_snapshot(m) == before
    m.host.clock.advance(1e6, "test")
    m.tick()


def target_process(tmp_path, *extra):
    """A ``sevcore migrate --listen 0`` process (with ``extra`` options), once its port file
    says it listens; ``(process, port)``."""
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "sevcore", "migrate", "--listen", "0",
                             "--port-file", str(port_file), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"target did not start: {proc.communicate()}")
        time.sleep(0.02)
    return proc, int(port_file.read_text())


def ma_over_channel(src_end, dst_end, guest, src_agent, dst_kvm, dst_agent, **send):
    """An SNP migration through agents between the two ends of a channel: the target's half
    (ma_remote.receive_guest) on a thread, the source's (send_guest with ``send``) here.
    Returns ``(source's result, (target guest, target's result))``."""
    from sevcore.migration import ma_remote      # SNP: only the tests that use it load it
    got = {}

    def target():
        try:
            got["target"] = ma_remote.receive_guest(dst_end, dst_kvm, dst_agent)
        except Exception as e:              # reported to the test below
            got["error"] = e
    t = threading.Thread(target=target)
    t.start()
    result = ma_remote.send_guest(src_end, guest, src_agent, **send)
    t.join(60)
    assert "error" not in got, got.get("error")
    return result, got["target"]

