"""The in-guest migration helper (sevcore.migration.helper) between two Hosts: a launched SEV guest
on the source, a target VM set up by the PSP (SEND_START / RECEIVE_START, the helper's private
pages by SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA), pages sealed by the source helper and opened
by the target helper; refused packets; and the PSP path's contrast (AMD-ASPFW
sev_mcmd_receive_update): the firmware accepts a replayed or swapped packet, the helper does not."""
import struct
import threading

import numpy as np
import pytest

import sevcore
from sevcore.core import pages as guestmem
from sevcore._reference import sevpkt as ref
from sevcore.vmm.kvm_util import (addr_gpa2hva, sev_decrypt_memory, vm_mem_add,
                              vm_sev_create_with_one_vcpu, vm_sev_launch)
from sevcore.migration import helper as H
from sevcore.migration.helper import (ENTRY, HELPER_CTX, PACKET_SIZE, HelperLayout,
                                      HelperPacketError, MigrationHelper, helper_boot,
                                      packet_ivs)
from sevcore.psp.crypto import kdf
from sevcore.uapi import *
from sevcore.vmm.shared_pages import SharedPagesTracker

NPAGES = 1024                   # 4 MiB of guest RAM; the helper takes its top 262 pages
DATA_GFN, NDATA = 16, 48        # the pages the tests move
SEED = 0x5eed
LAYOUT = HelperLayout.for_guest(NPAGES * 4096)


def source_guest(g, layout, c_bit):
    """Boot the helper, then write the data pages' pattern (encrypted)."""
    yield from helper_boot(g, layout, c_bit)
    yield g.write_pattern(DATA_GFN << 12 | 1 << c_bit, NDATA, SEED)
    yield g.sync("ready")


def rewrite(g, gfn, seed, c_bit):
    """The running guest rewrites one page (as during pre-copy)."""
    yield g.write_pattern(gfn << 12 | 1 << c_bit, 1, seed)
    yield g.sync("ready")


def check(g, c_bit, gfn=DATA_GFN, npages=NDATA, seed=SEED):
    """Compare pages with their pattern; report (mismatches, first mismatching index)."""
    yield g.sync((yield g.check_pattern(gfn << 12 | 1 << c_bit, npages, seed)))


def digest(g, gfn, c_bit):
    """Report the XXH3 digest of one page."""
    yield g.sync(int((yield g.digest(gfn << 12 | 1 << c_bit, 1))[0]))


def run_until_sync(vcpu, tracker=None):
    """Run a vCPU to its next ucall, serving the tracker's exits on the way; the ucall values."""
    while True:
        vcpu.run()
        if tracker is None or not tracker.handle_exit(vcpu):
            cmd, values = vcpu.get_ucall()
            assert cmd == "sync"
            return values


def blobs(kvm, **named):
    """Each bytes value in VMM memory: ``{name_uaddr: hva, name_len: len}``."""
    out = {}
    for name, data in named.items():
        out[name + "_uaddr"] = hva = kvm.mmap(len(data))
        kvm.write(hva, data)
        out[name + "_len"] = len(data)
    return out


class Migration:
    """A launched source guest with its helper booted, and a target VM on another Host in
    RECEIVE_UPDATE after SEND_START / RECEIVE_START."""

    def __init__(self, layout=LAYOUT, psp_private=True):
        self.layout = layout
        self.src_kvm = sevcore.Kvm()
        self.c_bit = self.src_kvm.host.c_bit
        self.src, self.vcpu = vm_sev_create_with_one_vcpu(
            self.src_kvm, KVM_X86_SEV_VM, source_guest, layout, self.c_bit, npages=NPAGES)
        self.tracker = SharedPagesTracker(self.src)
        self.tracker.setup([self.vcpu])
        vm_sev_launch(self.src, 0)
        assert run_until_sync(self.vcpu, self.tracker) == ("ready",)

        self.dst_kvm = sevcore.Host(seed=1).kvm
        self.dst = self.dst_kvm.create_vm(KVM_X86_SEV_VM)
        self.dst.memory_encrypt_op(KVM_SEV_INIT2)
        vm_mem_add(self.dst, 0, 0, NPAGES)
        self.dst_vcpu = self.dst.create_vcpu(0)
        self.dst_vcpu.set_guest_code(check, self.c_bit)
        chain = self.dst_kvm.host.psp.export_cert_chain()
        out = self.src.memory_encrypt_op(
            KVM_SEV_SEND_START, session_uaddr=self.src_kvm.mmap(4096), session_len=128,
            **blobs(self.src_kvm, pdh_cert=chain.pdh, plat_certs=chain.plat_certs,
                    amd_certs=chain.amd_certs))
        session = self.src_kvm.read(out.session_uaddr, 128)
        pdh = self.src_kvm.host.psp.pdh_cert_export().pdh_cert      # SEV_PDH_CERT_EXPORT
        self.dst.memory_encrypt_op(KVM_SEV_RECEIVE_START, policy=out.policy,
                                   **blobs(self.dst_kvm, pdh=pdh, session=session))
        if psp_private:
            self.psp_move(layout.private_gfns())

    def src_hva(self, gfn):
        return addr_gpa2hva(self.src, int(gfn) << 12)

    def dst_hva(self, gfn):
        return addr_gpa2hva(self.dst, int(gfn) << 12)

    def psp_send(self, gfn):
        """SEND_UPDATE_DATA of a source page: the packet in QEMU's stream form (4156 bytes:
        be32 hdr_len, header, be32 trans_len, ciphertext)."""
        kvm = self.src_kvm
        hdr, trans = kvm.mmap(4096), kvm.mmap(4096)
        self.src.memory_encrypt_op(KVM_SEV_SEND_UPDATE_DATA, hdr_uaddr=hdr, hdr_len=52,
                                   guest_uaddr=self.src_hva(gfn), guest_len=4096,
                                   trans_uaddr=trans, trans_len=4096)
        return struct.pack(">I52sI4096s", 52, kvm.read(hdr, 52), 4096, kvm.read(trans, 4096))

    def psp_receive(self, packet, gfn):
        """RECEIVE_UPDATE_DATA of a packet in QEMU's form into target page ``gfn``."""
        hdr_len, hdr, trans_len, trans = struct.unpack(">I52sI4096s", packet)
        self.dst.memory_encrypt_op(KVM_SEV_RECEIVE_UPDATE_DATA, guest_uaddr=self.dst_hva(gfn),
                                   guest_len=trans_len,
                                   **blobs(self.dst_kvm, hdr=hdr[:hdr_len], trans=trans))

    def psp_move(self, gfns):
        for gfn in gfns:
            self.psp_receive(self.psp_send(gfn), gfn)

    def rewrite(self, gfn, seed):
        """The source guest rewrites page ``gfn`` with the pattern of ``seed``."""
        self.vcpu.set_guest_code(rewrite, gfn, seed, self.c_bit)
        assert run_until_sync(self.vcpu) == ("ready",)

    def finish(self, *check_args):
        """SEND_FINISH, RECEIVE_FINISH, then the target's own vCPU runs ``check`` (by default
        over all data pages) and reports its result."""
        self.src.memory_encrypt_op(KVM_SEV_SEND_FINISH)
        self.dst.memory_encrypt_op(KVM_SEV_RECEIVE_FINISH)
        self.dst_vcpu.set_guest_code(check, self.c_bit, *check_args)
        return run_until_sync(self.dst_vcpu)[0]

    def dst_frames(self, gfns):
        """The VMM's view (ciphertext) of target pages."""
        return [self.dst_kvm.read(self.dst_hva(g), 4096) for g in gfns]

    def key(self):
        """The transport key, read through DBG_DECRYPT (the guest's policy allows debugging)."""
        buf = self.src_kvm.mmap(4096)
        sev_decrypt_memory(self.src, buf, self.src_hva(self.layout.key_gfn), 48)
        magic, key = struct.unpack("<8s32s", self.src_kvm.read(buf, 40))
        assert magic == b"SCMHKEY1"
        return key


DATA = np.arange(DATA_GFN, DATA_GFN + NDATA, dtype=np.uint64)


@pytest.fixture
def mig():
    return Migration()


# -- layout --------------------------------------------------------------------------------------------

def test_layout_sits_at_the_top_of_guest_ram():
    """for_guest places mailbox, packet buffer, key and state pages, in that order, at the top
    of RAM; the shared ranges cover mailbox and buffer, the private gfns are key and state."""
    lay = HelperLayout.for_guest(NPAGES * 4096)
    # A page for the slot, then 256 entries of 48 bytes in 3 pages.
    assert (lay.mailbox_gfn, lay.mailbox_pages, lay.entries_gfn, lay.buffer_gfn, lay.key_gfn,
            lay.state_gfn) == (NPAGES - 262, 4, NPAGES - 261, NPAGES - 258, NPAGES - 2,
                               NPAGES - 1)
    assert lay.first_gfn == lay.mailbox_gfn and lay.end_gfn == NPAGES
    assert lay.shared_ranges() == [(NPAGES - 262, NPAGES - 2)]
    assert lay.private_gfns().tolist() == [NPAGES - 2, NPAGES - 1]
    assert ENTRY.itemsize == 48 and PACKET_SIZE == 4128
    lay4 = HelperLayout.for_guest(NPAGES * 4096, batch_pages=16, vcpus=65)
    assert (lay4.mailbox_pages, lay4.entries_gfn) == (3, lay4.mailbox_gfn + 2)
    assert lay4 == HelperLayout(NPAGES * 4096, 16, 65)


@pytest.mark.parametrize("args", [(4096 * 100 + 1,), (4096 * 200,), (0,), (NPAGES * 4096, 0),
                                  (NPAGES * 4096, 256, 0), (NPAGES * 4096, True)])
def test_layout_refuses_bad_sizes(args):
    """A size that is not whole pages, a guest too small for the helper, or a non-positive
    batch or vCPU count is a ValueError."""
    with pytest.raises(ValueError):
        HelperLayout.for_guest(*args)


# -- boot ------------------------------------------------------------------------------------------------

def test_boot_reports_the_shared_pages_and_hides_the_key(mig):
    """At boot the guest reports exactly the mailbox and buffer shared (the VMM's tracker holds
    them); the key and state pages stay private: the VMM's view of them is ciphertext."""
    assert mig.tracker.shared_ranges() == LAYOUT.shared_ranges()
    key = mig.key()
    for gfn in LAYOUT.private_gfns():
        frame = mig.src_kvm.read(mig.src_hva(gfn), 4096)
        assert key not in frame and b"SCMHKEY1" not in frame and b"SCMHSTA2" not in frame


# -- the happy path ----------------------------------------------------------------------------------------

def test_pages_move_through_the_helpers(mig):
    """The source helper seals the data pages, the target helper opens them after the PSP
    carried its private pages, and the target's own vCPU reads the right plaintext."""
    src = MigrationHelper(mig.src, LAYOUT)
    batch = src.seal(DATA)
    assert batch.gfns.tolist() == DATA.tolist() and batch.seqs.tolist() == list(range(NDATA))
    assert batch.packets.shape == (NDATA, PACKET_SIZE) and batch.packets.dtype == np.uint8
    plain = bytes(guestmem.pattern(SEED, DATA_GFN))
    assert plain[:64] not in batch.packets.tobytes()
    dst = MigrationHelper(mig.dst, LAYOUT)
    dst.open(batch.gfns, batch.seqs, batch.packets)
    assert (src.counters.requests, src.counters.exits, src.counters.sealed) == (1, 1, [NDATA])
    assert (dst.counters.requests, dst.counters.exits, dst.counters.opened) == (1, 1, [NDATA])
    src.close()
    dst.close()
    assert mig.finish() == (0, None)


def test_packets_are_the_documented_aead(mig):
    """A packet is MAC || AES-128-CTR ciphertext under the KDF subkeys of the transport key,
    with IV BE64(seq) || BE64(gfn << 8) and context 0x48: the pure-Python reference agrees."""
    with MigrationHelper(mig.src, LAYOUT) as src:
        src.seal(DATA[:3])
        batch = src.seal(DATA[5:7])
    key = mig.key()
    tek, tik = kdf(key, "sevcore-helper-tek", b"", 16), kdf(key, "sevcore-helper-tik", b"", 16)
    assert batch.seqs.tolist() == [3, 4]
    for i, gfn in enumerate(batch.gfns):
        iv = packet_ivs([gfn], [batch.seqs[i]])
        assert bytes(iv) == struct.pack(">QQ", 3 + i, int(gfn) << 8)
        hdr, ct = ref.seal(tek, tik, guestmem.pattern(SEED, int(gfn)), iv, HELPER_CTX)
        assert batch.packets[i].tobytes() == hdr[20:] + ct


def test_the_key_never_reaches_the_host(mig):
    """Through boot, sealing, the PSP transfer and opening, the transport key appears in no
    buffer the host sees: guest memory as the VMM maps it on both hosts, packets, PSP packets."""
    key = mig.key()
    with MigrationHelper(mig.src, LAYOUT) as src, MigrationHelper(mig.dst, LAYOUT) as dst:
        batch = src.seal(DATA)
        dst.open(batch.gfns, batch.seqs, batch.packets)
    visible = [batch.packets.tobytes(), mig.psp_send(LAYOUT.key_gfn)]
    for kvm, vm in ((mig.src_kvm, mig.src), (mig.dst_kvm, mig.dst)):
        visible.append(kvm.read(addr_gpa2hva(vm, 0), NPAGES * 4096))
    assert not any(key in v or key[:16] in v or key[16:] in v for v in visible)


def test_the_vmm_touches_only_the_shared_pages(mig, monkeypatch):
    """The helper's host side reaches guest memory only through the frames behind the mailbox's
    and packet buffer's HVAs: every byte range it reads or writes lies in those frames, and it
    makes no other VMM access (kvm.read / kvm.write)."""
    from sevcore.migration import helper
    spans, start, end = [], *LAYOUT.shared_ranges()[0]
    real_spans = helper._SharedPages._spans

    def spy(self, gpa, size):
        base = self._host.mem.frames.ctypes.data
        for pos, view in real_spans(self, gpa, size):
            spa = view.ctypes.data - base
            spans.append((self, spa >> 12, (spa + len(view) - 1) >> 12))
            yield pos, view
    monkeypatch.setattr(helper._SharedPages, "_spans", spy)
    for kvm in (mig.src_kvm, mig.dst_kvm):
        monkeypatch.setattr(kvm, "read", None)
        monkeypatch.setattr(kvm, "write", None)
    with MigrationHelper(mig.src, LAYOUT) as src, MigrationHelper(mig.dst, LAYOUT) as dst:
        batch = src.seal(DATA)
        dst.open(batch.gfns, batch.seqs, batch.packets)
        monkeypatch.undo()
        for h, kvm, vm in ((src, mig.src_kvm, mig.src), (dst, mig.dst_kvm, mig.dst)):
            assert h._shared.pfns.tolist() == [kvm.hva_to_pfn(addr_gpa2hva(vm, gfn << 12), False)
                                               for gfn in range(start, end)]
    assert {s for s, _, _ in spans} == {src._shared, dst._shared}
    for shared, first, last in spans:
        assert first in shared.pfns and last in shared.pfns
    assert mig.finish() == (0, None)


def test_several_helper_vcpus_share_a_batch():
    """With three helper vCPUs a batch is split in contiguous runs, each vCPU numbers its run
    in its own lane (lane << 56 | count, counts claimed in blocks), each counts its pages,
    batches above batch_pages are cut, and a target of two vCPUs opens lane l on vCPU l % 2."""
    lay = HelperLayout.for_guest(NPAGES * 4096, batch_pages=20, vcpus=3)
    mig = Migration(lay)
    with MigrationHelper(mig.src, lay, nr_vcpus=3) as src:
        batch = src.seal(DATA)
        # 48 pages: batches of 20, 20, 8; runs of 7, 7, 6 / 7, 7, 6 / 3, 3, 2.
        runs = [(0, 7), (7, 7), (14, 6), (20, 7), (27, 7), (34, 6), (40, 3), (43, 3), (46, 2)]
        want = np.zeros(NDATA, np.uint64)
        next_count = [0, 0, 0]
        for i, (at, k) in enumerate(runs):
            lane = i % 3
            want[at:at + k] = (lane << 56) + next_count[lane] + np.arange(k)
            next_count[lane] += k
        assert batch.seqs.tolist() == want.tolist()
        assert (src.counters.requests, src.counters.exits, src.counters.sealed) == \
            (3, 9, [17, 17, 14])
    with MigrationHelper(mig.dst, lay, nr_vcpus=2) as dst:
        dst.open(batch.gfns, batch.seqs, batch.packets)
        assert dst.counters.opened == [17 + 14, 17]
    assert mig.finish() == (0, None)


# -- refusals ----------------------------------------------------------------------------------------------

def flip(batch, i):
    p = batch.packets.copy()
    p[i, 1000] ^= 0x10
    return batch.gfns, batch.seqs, p


def replay(batch, i):
    """Packet i replaced by packet 2 (its gfn, seq and bytes), as a host replaying it would."""
    g, s, p = batch.gfns.copy(), batch.seqs.copy(), batch.packets.copy()
    g[i], s[i], p[i] = g[2], s[2], p[2]
    return g, s, p


def swap(batch, i):
    """The gfns of packets i and i + 1 exchanged (seqs and packets in place)."""
    g = batch.gfns.copy()
    g[[i, i + 1]] = g[[i + 1, i]]
    return g, batch.seqs, batch.packets


def mac(batch, i):
    p = batch.packets.copy()
    p[i, 5] ^= 1
    return batch.gfns, batch.seqs, p


@pytest.mark.parametrize("tamper, reason, at", [
    (flip, "auth", 0), (flip, "auth", 9), (flip, "auth", NDATA - 1), (mac, "auth", 0),
    (mac, "auth", 30), (replay, "replay", 3), (replay, "replay", NDATA - 1), (swap, "auth", 0),
    (swap, "auth", 9), (swap, "auth", NDATA - 2)])
def test_a_tampered_packet_is_refused_from_its_index_on(mig, tamper, reason, at):
    """A flipped ciphertext or MAC bit, a replayed packet or swapped gfns are refused at that
    packet: the target pages before it are written, it and every later page stay untouched."""
    with MigrationHelper(mig.src, LAYOUT) as src:
        batch = src.seal(DATA)
    before = mig.dst_frames(DATA)
    with MigrationHelper(mig.dst, LAYOUT) as dst:
        with pytest.raises(HelperPacketError) as e:
            dst.open(*tamper(batch, at))
        assert (e.value.index, e.value.reason, e.value.op) == (at, reason, "OPEN")
        assert dst.counters.opened == [at]
    after = mig.dst_frames(DATA)
    assert after[at:] == before[at:]
    assert all(a != b for a, b in zip(after[:at], before[:at]))
    assert mig.finish(DATA_GFN, at) == (0, None)


def test_a_replayed_batch_is_refused_and_the_rest_still_opens(mig):
    """After a refusal at index i the helper has accepted exactly [0, i): the rest of the batch
    opens afterwards, and replaying any part of it again is refused without a write."""
    with MigrationHelper(mig.src, LAYOUT) as src:
        batch = src.seal(DATA)
    with MigrationHelper(mig.dst, LAYOUT) as dst:
        with pytest.raises(HelperPacketError) as e:
            dst.open(*flip(batch, 20))
        dst.open(batch.gfns[20:], batch.seqs[20:], batch.packets[20:])
        before = mig.dst_frames(DATA)
        for lo, hi in ((0, NDATA), (10, 11), (NDATA - 1, NDATA)):
            with pytest.raises(HelperPacketError) as e:
                dst.open(batch.gfns[lo:hi], batch.seqs[lo:hi], batch.packets[lo:hi])
            assert (e.value.index, e.value.reason) == (0, "replay")
        assert mig.dst_frames(DATA) == before
    assert mig.finish() == (0, None)


def test_reordered_packets_are_refused_as_replays(mig):
    """Packets delivered out of sequence order are refused at the first one whose number does
    not increase, even though each is authentic."""
    with MigrationHelper(mig.src, LAYOUT) as src:
        batch = src.seal(DATA[:4])
    order = [0, 2, 1, 3]
    with MigrationHelper(mig.dst, LAYOUT) as dst:
        with pytest.raises(HelperPacketError) as e:
            dst.open(batch.gfns[order], batch.seqs[order], batch.packets[order])
    assert (e.value.index, e.value.reason, e.value.gfn) == (2, "replay", DATA_GFN + 1)


LAYOUT3 = HelperLayout.for_guest(NPAGES * 4096, vcpus=3)


def test_lanes_keep_their_own_order_and_may_interleave():
    """Packets of two lanes interleaved in any way open on one vCPU as long as each lane's
    numbers increase; swapping two packets of one lane is refused as a replay."""
    mig = Migration(LAYOUT3)
    with MigrationHelper(mig.src, LAYOUT3, nr_vcpus=2) as src:
        batch = src.seal(DATA)
    lanes = batch.seqs >> np.uint64(56)
    a, b = np.flatnonzero(lanes == 0), np.flatnonzero(lanes == 1)
    assert len(a) == len(b) == NDATA // 2
    mixed = np.stack([b, a], axis=1).reshape(-1)     # b0 a0 b1 a1 ...
    bad = mixed.copy()
    bad[[2, 4]] = bad[[4, 2]]                        # lane 1's second and third swapped
    with MigrationHelper(mig.dst, LAYOUT3) as dst:
        with pytest.raises(HelperPacketError) as e:
            dst.open(batch.gfns[bad], batch.seqs[bad], batch.packets[bad])
        assert (e.value.index, e.value.reason) == (4, "replay")
    mig2 = Migration(LAYOUT3)
    with MigrationHelper(mig2.src, LAYOUT3, nr_vcpus=2) as src:
        batch = src.seal(DATA)
    with MigrationHelper(mig2.dst, LAYOUT3) as dst:
        dst.open(batch.gfns[mixed], batch.seqs[mixed], batch.packets[mixed])
    assert mig2.finish() == (0, None)


def test_the_same_packets_opened_by_two_vcpus_at_once_are_written_once():
    """A host that hands the same packets to two helper vCPUs at once (the lanes' counters
    then have two writers) gets them opened by exactly one; the other refuses them as
    replays, whichever comes first, and every page is right."""
    mig = Migration(LAYOUT3)
    with MigrationHelper(mig.src, LAYOUT3, nr_vcpus=1) as src:
        batch = src.seal(DATA)
    with MigrationHelper(mig.dst, LAYOUT3, nr_vcpus=2) as dst:
        with pytest.raises(HelperPacketError) as e:
            dst._request(H.CMD_OPEN, 0, [(0, NDATA), (0, NDATA)], batch.gfns,
                         before=lambda lo, hi: dst._open_rows_in(
                             batch.gfns, batch.seqs, batch.packets, 0, None, lo, hi))
        assert (e.value.index, e.value.reason) == (0, "replay")
        assert sum(dst.counters.opened) == NDATA
        with pytest.raises(HelperPacketError):
            dst.open(batch.gfns, batch.seqs, batch.packets)
    assert mig.finish() == (0, None)


def test_small_shares_run_one_after_another_in_the_callers_thread():
    """Below parallel_min_pages per vCPU the helper's vCPUs serve a request one after another
    in the caller's thread and at it the second runs in a helper thread, each numbering in its
    own lane, and the target opens both batches with every page right."""
    mig = Migration(LAYOUT3)
    threads = []
    with MigrationHelper(mig.src, LAYOUT3, nr_vcpus=2) as src:
        fill = src._seal_rows_in
        src._seal_rows_in = lambda *a: (threads.append(threading.get_ident()), fill(*a))
        src.parallel_min_pages = NDATA // 2 + 1
        one = src.seal(DATA)
        assert set(threads) == {threading.get_ident()} and len(threads) == 2
        threads.clear()
        src.parallel_min_pages = NDATA // 2
        two = src.seal(DATA)
        assert len(set(threads)) == 2
    for batch in (one, two):
        assert sorted(set((batch.seqs >> np.uint64(56)).tolist())) == [0, 1]
    with MigrationHelper(mig.dst, LAYOUT3, nr_vcpus=2) as dst:
        dst.parallel_min_pages = NDATA
        dst.open(one.gfns, one.seqs, one.packets)
        dst.open(two.gfns, two.seqs, two.packets)
    assert mig.finish() == (0, None)


def test_mirrors_share_a_lane_and_never_reuse_a_number(mig):
    """Two mirrors' vCPU 0 both number pages in lane 0: the second claims after the first's
    block, so no (gfn, seq) is ever sealed twice; the target opens both in order."""
    with MigrationHelper(mig.src, LAYOUT) as a:
        first = a.seal(DATA[:10])
    with MigrationHelper(mig.src, LAYOUT) as b:
        second = b.seal(DATA[10:])
    assert first.seqs.tolist() + second.seqs.tolist() == list(range(NDATA))
    with MigrationHelper(mig.dst, LAYOUT) as dst:
        dst.open(first.gfns, first.seqs, first.packets)
        dst.open(second.gfns, second.seqs, second.packets)
    assert mig.finish() == (0, None)


def test_a_refusal_in_one_vcpu_reports_the_first_packet_and_the_other_lane_opens():
    """With two target vCPUs, a tampered packet in lane 1 is refused by its vCPU while lane
    0's vCPU opens all of its packets: the error names the tampered packet."""
    mig = Migration(LAYOUT3)
    with MigrationHelper(mig.src, LAYOUT3, nr_vcpus=2) as src:
        batch = src.seal(DATA)
    i = NDATA // 2 + 3
    with MigrationHelper(mig.dst, LAYOUT3, nr_vcpus=2) as dst:
        with pytest.raises(HelperPacketError) as e:
            dst.open(*flip(batch, i))
        assert (e.value.index, e.value.reason, e.value.gfn) == (i, "auth", int(DATA[i]))
        assert dst.counters.opened == [NDATA // 2, 3]
    assert mig.finish(DATA_GFN, NDATA // 2 + 3) == (0, None)


def test_a_target_without_the_key_page_refuses_everything():
    """Before RECEIVE_UPDATE_DATA brought the helper's key page, the target helper refuses to
    open ('key'); a key page holding another page's contents is refused the same way."""
    mig = Migration(psp_private=False)
    with MigrationHelper(mig.src, LAYOUT) as src:
        batch = src.seal(DATA)
    before = mig.dst_frames(DATA)
    with MigrationHelper(mig.dst, LAYOUT) as dst:
        with pytest.raises(HelperPacketError) as e:
            dst.open(batch.gfns, batch.seqs, batch.packets)
        assert (e.value.index, e.value.reason) == (0, "key")
        mig.psp_receive(mig.psp_send(LAYOUT.state_gfn), LAYOUT.state_gfn)
        mig.psp_receive(mig.psp_send(DATA_GFN), LAYOUT.key_gfn)       # the wrong page
        with pytest.raises(HelperPacketError) as e:
            dst.open(batch.gfns, batch.seqs, batch.packets)
        assert (e.value.index, e.value.reason) == (0, "key")
    assert mig.dst_frames(DATA) == before


def test_a_target_with_another_key_refuses_every_packet():
    """A target whose helper holds a different transport key (its guest booted a helper of its
    own instead of receiving the source's pages) finds no packet authentic ('auth' at 0)."""
    mig = Migration(psp_private=False)
    with MigrationHelper(mig.src, LAYOUT) as src:
        batch = src.seal(DATA)
    tracker = SharedPagesTracker(mig.dst)
    tracker.setup([mig.dst_vcpu])
    mig.dst_vcpu.set_guest_code(source_guest, LAYOUT, mig.c_bit)
    assert run_until_sync(mig.dst_vcpu, tracker) == ("ready",)
    before = mig.dst_frames(DATA)
    with MigrationHelper(mig.dst, LAYOUT) as dst:
        with pytest.raises(HelperPacketError) as e:
            dst.open(batch.gfns, batch.seqs, batch.packets)
    assert (e.value.index, e.value.reason) == (0, "auth")
    assert mig.dst_frames(DATA) == before


def test_the_counter_travels_with_the_state_page(mig):
    """Sent again after the last OPEN, the state page leaves the target's counter at the
    source's, numbers sealed but never delivered included: the target never issues them again,
    and every packet of the migration is a replay from then on."""
    with MigrationHelper(mig.src, LAYOUT) as src:
        batch = src.seal(DATA)
        src.seal(DATA[:5])                                  # sealed, never sent
    with MigrationHelper(mig.dst, LAYOUT) as dst:
        dst.open(batch.gfns, batch.seqs, batch.packets)
        mig.psp_move([LAYOUT.state_gfn])
        with pytest.raises(HelperPacketError) as e:
            dst.open(batch.gfns[-1:], batch.seqs[-1:], batch.packets[-1:])
        assert e.value.reason == "replay"
        assert dst.seal(DATA[:2]).seqs.tolist() == [NDATA + 5, NDATA + 6]
    assert mig.finish() == (0, None)


@pytest.mark.parametrize("which", ["key", "state", "mailbox", "beyond"])
def test_seal_refuses_the_helpers_own_pages(mig, which):
    """The source helper refuses to seal its key, state or shared pages, or a gfn past RAM
    ('range', at that index), and claims no sequence number for the refused batch."""
    gfn = {"key": LAYOUT.key_gfn, "state": LAYOUT.state_gfn, "mailbox": LAYOUT.mailbox_gfn,
           "beyond": NPAGES + 5}[which]
    with MigrationHelper(mig.src, LAYOUT) as src:
        with pytest.raises(HelperPacketError) as e:
            src.seal([DATA_GFN, DATA_GFN + 1, gfn])
        assert (e.value.index, e.value.reason, e.value.op, e.value.gfn) == \
            (2, "range", "SEAL", gfn)
        assert src.seal([DATA_GFN]).seqs.tolist() == [0]


def test_open_refuses_the_helpers_own_pages(mig):
    """An OPEN aimed at the helper's state page is refused ('range') before its MAC is looked
    at, so the host cannot roll the replay counter back through the helper."""
    with MigrationHelper(mig.src, LAYOUT) as src:
        batch = src.seal(DATA[:2])
    g = batch.gfns.copy()
    g[1] = LAYOUT.state_gfn
    with MigrationHelper(mig.dst, LAYOUT) as dst:
        with pytest.raises(HelperPacketError) as e:
            dst.open(g, batch.seqs, batch.packets)
    assert (e.value.index, e.value.reason) == (1, "range")


def test_seal_straight_into_stream_record_columns(mig):
    """The source seals into a HELPER_PAGES record's strided seqs/packets columns (what the
    engine does, no intermediate copy); the target opens from the record read back."""
    from sevcore.migration import StreamReader, StreamWriter, inprocess_pair
    a, b = inprocess_pair(capacity=1 << 24)
    w = StreamWriter(a)
    with MigrationHelper(mig.src, LAYOUT) as src:
        w.helper_batch_fill(DATA, lambda lo, n, seqs, packets: src.seal(
            DATA[lo:lo + n], packets=packets, seqs=seqs), PACKET_SIZE)
        with pytest.raises(ValueError, match="seqs"):
            src.seal(DATA[:2], seqs=np.zeros(2, np.uint32))
    w.end()
    (rec, _) = StreamReader(b).read_all()
    assert rec.seqs.tolist() == list(range(NDATA)) and rec.packets.strides[0] > PACKET_SIZE
    with MigrationHelper(mig.dst, LAYOUT) as dst:
        dst.open(rec.gfns, rec.seqs, rec.packets)
    assert mig.finish() == (0, None)


def test_host_side_argument_errors(mig):
    """Misuse is a TypeError or ValueError before the helper runs: wrong packet shape, seqs of
    another length, more vCPUs than mailbox slots, a VM that is not an SEV guest."""
    with MigrationHelper(mig.src, LAYOUT) as src:
        with pytest.raises(ValueError):
            src.open(DATA[:2], DATA[:2], np.zeros((2, 4096), np.uint8))
        with pytest.raises(ValueError):
            src.open(DATA[:2], DATA[:1], np.zeros((2, PACKET_SIZE), np.uint8))
        with pytest.raises(TypeError):
            src.seal([[1, 2]])
        assert src.counters.exits == 0
    with pytest.raises(ValueError):
        MigrationHelper(mig.src, LAYOUT, nr_vcpus=2)
    plain = mig.src_kvm.create_vm(KVM_X86_DEFAULT_VM)
    with pytest.raises(ValueError):
        MigrationHelper(plain, LAYOUT)


def test_close_destroys_the_mirror(mig):
    """The helper's mirror shares the guest's context while it exists and leaves the owner's
    mirror list on close; the guest keeps running."""
    src = MigrationHelper(mig.src, LAYOUT)
    assert len(mig.src.sev.mirror_vms) == 1
    assert mig.src.sev.mirror_vms[0].sev.asid == mig.src.sev.asid
    src.close()
    src.close()
    assert mig.src.sev.mirror_vms == []
    mig.rewrite(DATA_GFN, 1)


# -- the PSP path's contrast ---------------------------------------------------------------------------

def test_psp_path_accepts_replayed_and_swapped_packets(mig):
    """RECEIVE_UPDATE_DATA binds a packet to nothing but the session's TEK/TIK: a packet written
    into another page (swap) and an older packet of a page delivered after a newer one
    (replay) are both accepted, so the target holds the wrong and the stale contents."""
    a, b = DATA_GFN, DATA_GFN + 1
    old_a = mig.psp_send(a)
    assert len(old_a) == 4156
    mig.rewrite(a, 77)
    new_a = mig.psp_send(a)
    mig.psp_receive(new_a, a)
    mig.psp_receive(old_a, a)                           # replay: accepted
    mig.psp_receive(new_a, b)                           # swap: accepted
    assert mig.finish(a, 1, SEED) == (0, None)          # the stale contents
    mig.dst_vcpu.set_guest_code(digest, b, mig.c_bit)      # page b holds page a's contents
    assert run_until_sync(mig.dst_vcpu) == (guestmem.digest(guestmem.pattern(77, a)),)


def test_helper_path_refuses_the_same_replay_and_swap(mig):
    """The same two attacks on helper packets: the stale packet after the newer one is a
    replay, the packet moved to another page fails its MAC; the target keeps the new page."""
    a, b = DATA_GFN, DATA_GFN + 1
    with MigrationHelper(mig.src, LAYOUT) as src:
        old = src.seal([a])
        mig.rewrite(a, 77)
        new = src.seal([a])
    with MigrationHelper(mig.dst, LAYOUT) as dst:
        dst.open(new.gfns, new.seqs, new.packets)
        with pytest.raises(HelperPacketError) as e:
            dst.open(old.gfns, old.seqs, old.packets)
        assert e.value.reason == "replay"
        before = mig.dst_frames([b])
        with pytest.raises(HelperPacketError) as e:
            dst.open([b], new.seqs + np.uint64(1), new.packets)
        assert e.value.reason == "auth"
        assert mig.dst_frames([b]) == before
    assert mig.finish(a, 1, 77) == (0, None)
