"""Ring-buffer mode (RING_BUFFER, 0x0F): queues of 256 commands, statuses, pause and resume,
priorities, leaving the mode, and batched SEND/RECEIVE_UPDATE_DATA that match one-at-a-time
execution byte for byte (AMD-ASPFW sev_ring_buffer.c, sev_mcmd_ring_buffer)."""
import pytest

from sevcore import uapi as U
from sevcore.psp import RingBuffer
from sevcore.psp import layout as L
from sevcore.psp.ring import CMD_FLAG_CONT_ON_ERROR, CMD_FLAG_INT_COMPLETE

from support.psp import SEV_ASID, Launched, pages, raw, ready, snapshot

OK = U.SEV_RET_SUCCESS
SEND, RECV = U.SEV_CMD_SEND_UPDATE_DATA, U.SEV_CMD_RECEIVE_UPDATE_DATA


def count_batches(host):
    """Record the page counts of host.umc.read_pages calls (one per batch)."""
    calls = []
    real = host.umc.read_pages

    def read_pages(spas, asid=0, out=None):
        calls.append(len(spas))
        return real(spas, asid, out)
    host.umc.read_pages = read_pages
    return calls


def sender(seed, npages):
    """A guest in SUPDATE with ``npages`` pages, and its target's PDH."""
    g = Launched(ready(seed=seed), npages=npages, finish=True)
    target = ready(seed=seed + 1)
    start = g.psp.send_start(g.handle, target.psp.pdh_cert_export().pdh_cert)
    return g, target, start


def queue_sends(rb, g, hdrs, trans, indexes, **kw):
    return [rb.put(SEND, L.sev_data_send_update_data, handle=g.handle, hdr_address=hdrs[i],
                   hdr_len=52, guest_address=g.spa + 4096 * i, guest_len=4096,
                   trans_address=trans[i], trans_len=4096, **kw)[0] for i in indexes]


def test_ring_buffer_command_checks():
    """RING_BUFFER: platform INIT/WORKING, queue sizes 1 and 0/1 pages, 4 KiB-aligned pages,
    not twice."""
    host = ready()
    p = pages(host, 4)
    cases = [(dict(low_priority_queue_size=2), U.SEV_RET_INVALID_PARAM),
             (dict(high_priority_queue_size=2), U.SEV_RET_INVALID_PARAM),
             (dict(low_priority_cmd_ptr=p + 16), U.SEV_RET_INVALID_ADDRESS),
             (dict(high_priority_queue_size=1, high_priority_status_ptr=p + 8),
              U.SEV_RET_INVALID_ADDRESS),
             (dict(low_priority_status_ptr=host.mem.size), U.SEV_RET_INVALID_ADDRESS)]
    for fields, want in cases:
        base = dict(low_priority_cmd_ptr=p, low_priority_status_ptr=p + 4096,
                    low_priority_queue_size=1, high_priority_cmd_ptr=p + 8192,
                    high_priority_status_ptr=p + 12288)
        base.update(fields)
        assert raw(host, U.SEV_CMD_RING_BUFFER, L.sev_data_ring_buffer, **base)[0] == want
        assert not host.psp.rb_enabled
    RingBuffer(host.psp)
    assert host.psp.rb_enabled


def test_queued_commands_run_with_statuses_and_the_mode_ends():
    """Queued commands run in order and post their statuses; a mailbox command while the mode is
    on is not run and ends it with EXIT_RING_BUFFER."""
    host = ready()
    rb = RingBuffer(host.psp)
    i0 = rb.enqueue(U.SEV_CMD_NOP, 0)
    i1, _ = rb.put(U.SEV_CMD_LAUNCH_START, L.sev_data_launch_start, policy=0)
    i2, buf = rb.put(U.SEV_CMD_GUEST_STATUS, L.sev_data_guest_status, handle=1)
    head = rb.kick()
    assert (head.lo_index, head.lo_running) == (3, True)
    assert [rb.status(i) for i in (i0, i1, i2)] == [OK, OK, OK]
    assert L.sev_data_guest_status.unpack(host.mem.read(buf, 13))["state"] == 1
    assert host.psp.command(U.SEV_CMD_PLATFORM_STATUS, buf) == U.SEV_RET_EXIT_RING_BUFFER
    assert not host.psp.rb_enabled
    assert host.psp.guest_status(1).state == 1       # the mailbox works again


def test_error_pauses_the_queue_until_resumed():
    """A failing command without CONT_ON_ERROR pauses its queue (later entries wait); resume
    sets then clears the resume bit; with CONT_ON_ERROR the queue goes on."""
    host = ready()
    rb = RingBuffer(host.psp)
    bad = rb.put(U.SEV_CMD_PEK_CERT_IMPORT, L.sev_data_pek_cert_import)[0]
    later = rb.enqueue(U.SEV_CMD_NOP, 0)
    head = rb.kick()
    assert rb.status(bad) == U.SEV_RET_INVALID_LEN
    assert (head.lo_index, head.lo_running, head.paused) == (1, False, True)
    assert rb.psp._rb.interrupts >= 1
    head = rb.resume()
    assert (head.lo_index, head.lo_running) == (2, True) and rb.status(later) == OK
    head = rb.kick(rb.control | (1 << 29))          # clear the interrupt status bits
    assert not head.paused
    rb.put(U.SEV_CMD_PEK_CERT_IMPORT, L.sev_data_pek_cert_import, flags=CMD_FLAG_CONT_ON_ERROR)
    rb.enqueue(U.SEV_CMD_NOP, 0, flags=CMD_FLAG_INT_COMPLETE)
    head = rb.kick()
    assert (head.lo_index, head.lo_running, head.paused, head.cmd_done) == (4, True, False, True)


def test_high_priority_queue_runs_first():
    """Entries of the high-priority queue run before the low queue's."""
    host = ready()
    rb = RingBuffer(host.psp, high=True)
    rb.put(U.SEV_CMD_LAUNCH_START, L.sev_data_launch_start, policy=1)
    rb.put(U.SEV_CMD_LAUNCH_START, L.sev_data_launch_start, policy=2, high=True)
    head = rb.kick()
    assert (head.lo_index, head.hi_index) == (1, 1)
    assert host.psp.guest(1).policy == 2 and host.psp.guest(2).policy == 1


def test_indexes_wrap_after_256_entries():
    """Head and tail wrap at 256 entries."""
    host = ready()
    rb = RingBuffer(host.psp)
    for _ in range(3):
        for _ in range(100):
            rb.enqueue(U.SEV_CMD_NOP, 0)
        head = rb.kick()
    assert head.lo_index == 300 % 256 == rb.tail[0]


def test_shutdown_from_the_queue_ends_the_mode():
    """A SHUTDOWN in the queue leaves ring-buffer mode with the platform UNINIT."""
    host = ready()
    rb = RingBuffer(host.psp)
    rb.enqueue(U.SEV_CMD_SHUTDOWN, 0)
    rb.enqueue(U.SEV_CMD_NOP, 0)
    head = rb.kick()
    assert head.lo_index == 1 and not host.psp.rb_enabled
    assert host.psp.state == U.SEV_STATE_UNINIT


@pytest.mark.parametrize("n", [2, 40])
def test_batched_send_matches_one_at_a_time(n):
    """SEND_UPDATE_DATA run as a batch from the queue writes exactly the packets, headers and
    buffers that the same commands run one at a time do (same seed, same DRBG stream)."""
    results = []
    for ring in (True, False):
        g, _, _ = sender(70, n)
        host = g.host
        hdrs = [pages(host, 1) for _ in range(n)]
        trans = [pages(host, 1) for _ in range(n)]
        if ring:
            rb = RingBuffer(host.psp)
            idx = queue_sends(rb, g, hdrs, trans, range(n))
            calls = count_batches(host)
            rb.kick()
            assert [rb.status(i) for i in idx] == [OK] * n
            assert calls == [n]
        else:
            for i in range(n):
                pkt = host.psp.send_update_data(g.handle, g.spa + 4096 * i, 4096)
                host.mem.write(hdrs[i], pkt.header)
                host.mem.write(trans[i], pkt.ciphertext)
        results.append([host.mem.read(a, 52) + host.mem.read(b, 4096)
                        for a, b in zip(hdrs, trans)])
    assert results[0] == results[1]


def test_batched_receive_stops_at_a_bad_packet():
    """A RECEIVE run with a corrupted packet in the middle: the good ones before it land, the bad
    one fails BAD_MEASUREMENT and pauses the queue, nothing after it runs."""
    g, target, start = sender(80, 6)
    pkts = [g.psp.send_update_data(g.handle, g.spa + 4096 * i, 4096) for i in range(6)]
    handle = target.psp.receive_start(start.policy, g.psp.pdh_cert_export().pdh_cert,
                                      start.session)
    target.psp.activate(handle, SEV_ASID)
    where = pages(target, 6)
    rb = RingBuffer(target.psp)
    idx = []
    for i, pkt in enumerate(pkts):
        ct = bytearray(pkt.ciphertext)
        if i == 3:
            ct[5] ^= 1
        hdr, trans = pages(target, 1), pages(target, 1)
        target.mem.write(hdr, pkt.header)
        target.mem.write(trans, bytes(ct))
        idx.append(rb.put(RECV, L.sev_data_receive_update_data, handle=handle, hdr_address=hdr,
                          hdr_len=52, guest_address=where + 4096 * i, guest_len=4096,
                          trans_address=trans, trans_len=4096)[0])
    before = snapshot(target, (where + 3 * 4096, 3 * 4096))
    calls = count_batches(target)
    head = rb.kick()
    assert calls == [6, 3]          # the run of six, then the run that starts at the bad one
    assert [rb.status(i) for i in idx[:4]] == [OK, OK, OK, U.SEV_RET_BAD_MEASUREMENT]
    assert (head.lo_index, head.paused) == (4, True)
    assert target.umc.read(where, 3 * 4096, SEV_ASID) == g.data[:3 * 4096]
    assert snapshot(target, (where + 3 * 4096, 3 * 4096))[5] == before[5]


def test_overlapping_batch_falls_back_to_exact_order():
    """Commands whose buffers overlap (a packet written over the next command's guest page) run
    one at a time, with the result of that order."""
    g, _, _ = sender(90, 2)
    host = g.host
    rb = RingBuffer(host.psp)
    hdr = pages(host, 2)
    # The first packet lands on the second guest page, which the second command then sends.
    idx = queue_sends(rb, g, [hdr, hdr + 4096], [g.spa + 4096, pages(host, 1)], range(2))
    calls = count_batches(host)
    rb.kick()
    assert [rb.status(i) for i in idx] == [OK, OK] and calls == []


def test_queue_depth_and_empty_interrupt_status():
    """With a threshold and the queue's interrupt enable, a queue holding fewer commands than the
    threshold raises the q_free status; int_on_empty raises all_empty when both are empty."""
    from sevcore.psp.ring import CTL_LO_QUEUE_EMPTY_INT, CTL_RUN
    host = ready()
    rb = RingBuffer(host.psp, low_threshold=4, int_on_empty=True)
    for _ in range(8):
        rb.enqueue(U.SEV_CMD_NOP, 0)
    head = rb.kick(CTL_RUN)                      # the enable bit is off: no q_free status
    assert head.all_empty and not head.q_free
    rb.enqueue(U.SEV_CMD_NOP, 0)
    head = rb.kick(CTL_RUN | CTL_LO_QUEUE_EMPTY_INT)
    assert head.q_free and head.all_empty
    assert host.psp._rb.interrupts >= 2
