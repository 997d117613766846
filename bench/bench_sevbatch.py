"""Batched KVM_SEV_SEND/RECEIVE_UPDATE_DATA of 4096 whole pages against the raw cryptography they
perform, same run.

SEND's work is reading the guest pages through the guest key and sealing them (AES-128-CTR +
HMAC-SHA256); the peer does exactly that with no KVM or firmware around it:
``umc.read_pages`` (the memory engine's decryption) + ``sevpkt.seal``. RECEIVE's work is
opening the packets and writing the plaintext through the guest key; the peer is
``sevpkt.open`` + the engine's encryption of the pages. The batched ioctls add KVM's checks, the
page pins, the firmware's state checks, the DRBG's IVs and the gather/scatter. Target: within
1.5x of the peer. The one-page ioctl loop is timed beside them (fewer pages, the same per-page
rate), and the batched receive is also fed the strided views a stream reader hands on. The last
group runs the whole PSP path of a migration (batched SEND, the stream over the in-process
channel, batched RECEIVE) against its cryptography alone.
"""
import threading

import numpy as np
import pytest

import sevcore
from benchutil import per_item
from sevcore.core import sevpkt
from sevcore.vmm.kvm_util import sev_receive_start, sev_send_start, vm_mem_add, vm_sev_launch
from sevcore.core.memcrypt import MemoryEngine
from sevcore.migration import StreamReader, StreamWriter, inprocess_pair
from sevcore.migration.stream import EncryptedPages
from sevcore.uapi import (KVM_SEV_INIT2, KVM_SEV_RECEIVE_UPDATE_DATA, KVM_SEV_SEND_UPDATE_DATA,
                          KVM_X86_SEV_VM)

PAGE = 4096
N = 4096
SINGLE = 256             # pages in the one-ioctl-per-page loop (about 30 ms each round)


class Migration:
    """A launched source guest of N pages in SEND_UPDATE and a target guest in RECEIVE_UPDATE on
    another host, with the source's packets of every page."""

    def __init__(self):
        self.src, self.dst = sevcore.Host(seed=1).kvm, sevcore.Host(seed=2).kvm
        self.vm = self.src.create_vm(KVM_X86_SEV_VM)
        self.vm.memory_encrypt_op(KVM_SEV_INIT2)
        hva = vm_mem_add(self.vm, 0, 0, N)
        self.data = np.random.default_rng(7).bytes(N * PAGE)
        self.src.write(hva, self.data)
        vm_sev_launch(self.vm, 0)
        self.tvm = self.dst.create_vm(KVM_X86_SEV_VM)
        self.tvm.memory_encrypt_op(KVM_SEV_INIT2)
        session = sev_send_start(self.vm, self.dst.host.psp.export_cert_chain())
        sev_receive_start(self.tvm, 0, self.src.host.psp.pdh_cert_export().pdh_cert, session)
        thva = vm_mem_add(self.tvm, 0, 0, N)
        self.uaddrs = hva + PAGE * np.arange(N, dtype=np.uint64)
        self.tuaddrs = thva + PAGE * np.arange(N, dtype=np.uint64)
        self.hdrs, self.trans = self.vm.sev_send_update_data_pages(self.uaddrs)
        self.tvm.sev_receive_update_data_pages(self.tuaddrs, self.hdrs, self.trans)
        self.g = self.src.host.psp.guest(self.vm.sev.handle)
        self.spas = self.src.hva_to_pfns(self.uaddrs, False)[0] << np.uint64(12)
        self.tspas = self.dst.hva_to_pfns(self.tuaddrs, True)[0] << np.uint64(12)
        self.ivs = np.random.default_rng(8).bytes(16 * N)

    def check_target(self):
        """The target guest reads the source's plaintext through its own key."""
        got = self.dst.host.umc.read_pages(self.tspas, self.tvm.sev.asid)
        assert bytes(got) == self.data


@pytest.fixture(scope="module")
def mig():
    return Migration()


def per_page_ioctls(vm, cmd, uaddrs, hdr, trans):
    for u in uaddrs:
        vm.memory_encrypt_op(cmd, hdr_uaddr=hdr, hdr_len=52, guest_uaddr=int(u), guest_len=PAGE,
                             trans_uaddr=trans, trans_len=PAGE)


@pytest.mark.benchmark(group=f"SEND_UPDATE_DATA, {N} pages")
def test_send_batched(benchmark, mig):
    """vm.sev_send_update_data_pages of N pages (new output arrays each round)."""
    per_item(benchmark, N, "pages")
    hdrs, trans = benchmark.pedantic(mig.vm.sev_send_update_data_pages, (mig.uaddrs,),
                                     rounds=30, warmup_rounds=3)
    g = mig.g
    assert bytes(sevpkt.open(g.tek, g.tik, hdrs, trans)) == mig.data


@pytest.mark.benchmark(group=f"SEND_UPDATE_DATA, {N} pages")
def test_send_batched_into_out(benchmark, mig):
    """vm.sev_send_update_data_pages of N pages into preallocated ``out`` buffers."""
    out = (np.empty((N, 52), np.uint8), np.empty((N, PAGE), np.uint8))
    per_item(benchmark, N, "pages")
    hdrs, trans = benchmark.pedantic(mig.vm.sev_send_update_data_pages, (mig.uaddrs, out),
                                     rounds=30, warmup_rounds=3)
    g = mig.g
    assert hdrs is out[0] and bytes(sevpkt.open(g.tek, g.tik, hdrs, trans)) == mig.data


@pytest.mark.benchmark(group=f"SEND_UPDATE_DATA, {N} pages")
def test_send_peer_read_pages_and_seal(benchmark, mig):
    """Peer: the same pages read through the guest key (umc.read_pages) into a preallocated
    buffer and sealed in place."""
    umc, g, asid = mig.src.host.umc, mig.g, mig.vm.sev.asid
    hdrs, trans = np.empty((N, 52), np.uint8), np.empty((N, PAGE), np.uint8)

    def raw():
        return sevpkt.seal(g.tek, g.tik, umc.read_pages(mig.spas, asid, out=trans), mig.ivs,
                           out=(hdrs, trans))
    per_item(benchmark, N, "pages")
    benchmark.pedantic(raw, rounds=30, warmup_rounds=3)
    assert bytes(sevpkt.open(g.tek, g.tik, hdrs, trans)) == mig.data


@pytest.mark.benchmark(group=f"SEND_UPDATE_DATA, {N} pages")
def test_send_one_ioctl_per_page(benchmark, mig):
    """The KVM_SEV_SEND_UPDATE_DATA loop, one page per ioctl (SINGLE pages per round)."""
    kvm = mig.src
    hdr, trans = kvm.mmap(PAGE), kvm.mmap(PAGE)
    per_item(benchmark, SINGLE, "pages")
    benchmark.pedantic(per_page_ioctls, (mig.vm, KVM_SEV_SEND_UPDATE_DATA, mig.uaddrs[:SINGLE],
                                         hdr, trans), rounds=3)
    g = mig.g
    assert bytes(sevpkt.open(g.tek, g.tik, kvm.read(hdr, 52), kvm.read(trans, PAGE))) == \
        mig.data[(SINGLE - 1) * PAGE:SINGLE * PAGE]


@pytest.mark.benchmark(group=f"RECEIVE_UPDATE_DATA, {N} pages")
def test_receive_batched(benchmark, mig):
    """vm.sev_receive_update_data_pages of N packets (contiguous arrays)."""
    per_item(benchmark, N, "pages")
    benchmark.pedantic(mig.tvm.sev_receive_update_data_pages,
                       (mig.tuaddrs, mig.hdrs, mig.trans), rounds=30, warmup_rounds=3)
    mig.check_target()


@pytest.mark.benchmark(group=f"RECEIVE_UPDATE_DATA, {N} pages")
def test_receive_batched_from_stream_views(benchmark, mig):
    """The same, fed the strided views of ENCRYPTED_PAGES records (2048 pages each) as a stream
    reader hands them on, one call per record."""
    a, b = inprocess_pair(capacity=1 << 26)
    w = StreamWriter(a, batch_pages=N // 2)
    w.encrypted_batch(np.arange(N), mig.hdrs, mig.trans)
    w.end()
    recs = StreamReader(b).read_all()[:-1]

    def receive():
        for rec in recs:
            mig.tvm.sev_receive_update_data_pages(mig.tuaddrs[rec.gfns], rec.hdrs, rec.trans)
    per_item(benchmark, N, "pages")
    benchmark.pedantic(receive, rounds=30, warmup_rounds=3)
    mig.check_target()


@pytest.mark.benchmark(group=f"RECEIVE_UPDATE_DATA, {N} pages")
def test_receive_peer_open_and_encrypt(benchmark, mig):
    """Peer: the packets opened into a preallocated buffer, then the plaintext encrypted in
    place by the memory engine."""
    g = mig.dst.host.psp.guest(mig.tvm.sev.handle)
    eng = MemoryEngine(mig.dst.host.umc.mode, bytes(16), mig.dst.host.tweak_table)
    plain = np.empty(N * PAGE, np.uint8)

    def raw():
        sevpkt.open(g.tek, g.tik, mig.hdrs, mig.trans, out=plain)
        return eng.encrypt_pages(plain, mig.tspas, out=plain)
    per_item(benchmark, N, "pages")
    out = benchmark.pedantic(raw, rounds=30, warmup_rounds=3)
    assert bytes(eng.decrypt_pages(out, mig.tspas)) == mig.data


@pytest.mark.benchmark(group=f"RECEIVE_UPDATE_DATA, {N} pages")
def test_receive_one_ioctl_per_page(benchmark, mig):
    """The KVM_SEV_RECEIVE_UPDATE_DATA loop, one page per ioctl (SINGLE pages per round)."""
    kvm = mig.dst
    hdr, trans = kvm.mmap(PAGE), kvm.mmap(PAGE)
    kvm.write(hdr, bytes(mig.hdrs[0]))
    kvm.write(trans, bytes(mig.trans[0]))
    per_item(benchmark, SINGLE, "pages")
    benchmark.pedantic(per_page_ioctls, (mig.tvm, KVM_SEV_RECEIVE_UPDATE_DATA,
                                         mig.tuaddrs[:1].repeat(SINGLE), hdr, trans), rounds=3)
    mig.check_target()


def pipeline(mig, call=1024):
    """The PSP path of a migration: batched SEND on a source thread, ENCRYPTED_PAGES records
    through the in-process channel, batched RECEIVE of each record on this thread."""
    a, b = inprocess_pair(timeout=60)

    def source():
        w = StreamWriter(a)
        for lo in range(0, N, call):
            hdrs, trans = mig.vm.sev_send_update_data_pages(mig.uaddrs[lo:lo + call])
            w.encrypted_batch(np.arange(lo, lo + call), hdrs, trans)
        w.end()
    t = threading.Thread(target=source)
    t.start()
    n = 0
    for rec in StreamReader(b):
        if isinstance(rec, EncryptedPages):
            mig.tvm.sev_receive_update_data_pages(mig.tuaddrs[rec.gfns], rec.hdrs, rec.trans)
            n += len(rec)
    t.join()
    return n


@pytest.mark.benchmark(group=f"PSP path end to end, {N} pages")
def test_pipeline_send_stream_receive(benchmark, mig):
    """Batched SEND -> stream (in process, writer and reader threads) -> batched RECEIVE."""
    per_item(benchmark, N, "pages")
    assert benchmark.pedantic(pipeline, (mig,), rounds=10, warmup_rounds=1) == N
    mig.check_target()


@pytest.mark.benchmark(group=f"PSP path end to end, {N} pages")
def test_pipeline_peer_raw_crypto(benchmark, mig):
    """Peer: the cryptography alone, one thread: decrypt + seal + open + encrypt of the pages."""
    umc, g, asid = mig.src.host.umc, mig.g, mig.vm.sev.asid
    eng = MemoryEngine(mig.dst.host.umc.mode, bytes(16), mig.dst.host.tweak_table)
    buf, hdrs = np.empty((N, PAGE), np.uint8), np.empty((N, 52), np.uint8)

    def raw():
        umc.read_pages(mig.spas, asid, out=buf)
        sevpkt.seal(g.tek, g.tik, buf, mig.ivs, out=(hdrs, buf))
        sevpkt.open(g.tek, g.tik, hdrs, buf, out=buf)
        return eng.encrypt_pages(buf, mig.tspas, out=buf)
    per_item(benchmark, N, "pages")
    out = benchmark.pedantic(raw, rounds=10, warmup_rounds=1)
    assert bytes(eng.decrypt_pages(out, mig.tspas)) == mig.data
