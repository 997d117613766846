"""Ring-buffer mode: queued firmware commands, 256 to a queue (RING_BUFFER, 0x0F).

What the firmware does (AMD-ASPFW ``sev_ring_buffer.c/.h``, ``sev_mcmd_ring_buffer``, the main
loop of ``sev_uapp``):

* RING_BUFFER (platform INIT or WORKING) takes a low-priority queue (one 4 KiB page of 16-byte
  command entries ``{cmd_id u16, cmd_flags u16, software_data u32, cmd_buffer_ptr u64}``) and its
  status page (16-byte ``{status u16, reserved, error_stack u64}`` entries), and optionally a
  high-priority pair; sizes are in pages (low 1, high 0 or 1), pages are 4 KiB aligned. The mode
  starts with the next mailbox write.
* The mailbox registers change meaning: CMDRESP is the x86 control register (queue-empty interrupt
  enables, resume bits 8/9, clear-interrupts bit 29, ring-buffer-active bit 30, x86-control bit
  31), CMDBUF_HI the x86 tail register (low queue tail in byte 0, high queue tail in byte 2),
  CMDBUF_LO the firmware's head register (indexes, running bits 11/27, interrupt status bits
  28-31).
* On each doorbell the firmware takes commands from the high queue before the low one until both
  are empty (head == tail) or paused, writes each status to the status page at the command's index
  and advances the head (wrapping at 256). A failing command without CONT_ON_ERROR (flag bit 1)
  pauses its queue; the x86 sets the queue's resume bit (the firmware marks it running) and then
  clears it (processing continues). INT_COMPLETE (flag bit 0) raises the command-done status.
* Writing CMDRESP without the active and x86-control bits ends the mode: EXIT_RING_BUFFER. A plain
  mailbox command written while the mode is on is not run; it ends the mode the same way.

What is assumed: the interrupt itself is counted (``interrupts``), not delivered; the
error_stack field is always 0; queue-depth interrupts follow ``check_queue_depth`` as written.

The simulated firmware runs a doorbell synchronously. Consecutive SEND_UPDATE_DATA (or
RECEIVE_UPDATE_DATA) commands of one guest moving whole, page-aligned 4 KiB pages, whose buffers,
headers, packets and guest pages do not overlap one another, are executed as one batch: one
gather of the guest pages through the memory controller, one call to the packet cipher, one
scatter. The result is byte for byte that of running them one at a time (the same checks, the
same IVs from the DRBG stream, the same status entries and head updates); anything else runs
one command at a time. The batch's work steps are those of the batched typed entries
(``sevcore/psp/batch.py``).
"""
from dataclasses import dataclass

import numpy as np

from sevcore import uapi as U
from sevcore.psp import crypto as X
from sevcore.psp import layout as L
from sevcore.psp.batch import packet_rows
from sevcore.psp.status import PspError

PAGE = 4096
ENTRIES = PAGE // L.sev_rb_cmd_ptr_entry.size          # 256
LOW, HIGH = 0, 1

CMD_FLAG_INT_COMPLETE = 1 << 0
CMD_FLAG_CONT_ON_ERROR = 1 << 1

# x86 control register (CMDRESP in ring-buffer mode)
CTL_LO_QUEUE_EMPTY_INT = 1 << 0
CTL_HI_QUEUE_EMPTY_INT = 1 << 1
CTL_RESUME_LO = 1 << 8
CTL_RESUME_HI = 1 << 9
CTL_CLEAR_INT = 1 << 29
CTL_RB_MODE_ACTIVE = 1 << 30
CTL_X86_CONTROL = 1 << 31
CTL_RUN = CTL_RB_MODE_ACTIVE | CTL_X86_CONTROL

# firmware head register (CMDBUF_LO in ring-buffer mode)
HEAD_LO_RUNNING = 1 << 11
HEAD_HI_RUNNING = 1 << 27
HEAD_ALL_EMPTY = 1 << 28
HEAD_CMD_DONE = 1 << 29
HEAD_PAUSED = 1 << 30
HEAD_Q_FREE = 1 << 31

_BATCH = {U.SEV_CMD_SEND_UPDATE_DATA, U.SEV_CMD_RECEIVE_UPDATE_DATA}
_ENTRY, _STATUS = L.sev_rb_cmd_ptr_entry, L.sev_rb_status_entry


def _flag(bit, doc):
    return property(lambda self: bool(self.value & bit), doc=doc)


@dataclass
class RbHead:
    """The firmware's head register, decoded."""

    value: int

    @property
    def lo_index(self):
        return self.value & 0xFF

    @property
    def hi_index(self):
        return (self.value >> 16) & 0xFF

    lo_running = _flag(HEAD_LO_RUNNING, "the low-priority queue runs")
    hi_running = _flag(HEAD_HI_RUNNING, "the high-priority queue runs")
    all_empty = _flag(HEAD_ALL_EMPTY, "interrupt status: both queues empty")
    cmd_done = _flag(HEAD_CMD_DONE, "interrupt status: an INT_COMPLETE command finished")
    paused = _flag(HEAD_PAUSED, "interrupt status: a queue paused on an error")
    q_free = _flag(HEAD_Q_FREE, "interrupt status: a queue fell below its threshold")


class _Config:
    def __init__(self, f):
        self.enabled = True
        self.cmd = [f.low_priority_cmd_ptr, f.high_priority_cmd_ptr]
        self.status = [f.low_priority_status_ptr, f.high_priority_status_ptr]
        self.size = [f.low_priority_queue_size, f.high_priority_queue_size]
        self.threshold = [f.low_q_threshold, f.high_q_threshold if self.size[HIGH] else 0]
        self.int_on_empty = bool(f.int_on_empty & 1)
        self.head = HEAD_LO_RUNNING | (HEAD_HI_RUNNING if self.size[HIGH] else 0)
        self.control = 0
        self.tail = 0
        self.interrupts = 0
        self.gen = False                 # an interrupt is due after this step

    def index(self, queue):
        return (self.head >> (16 * queue)) & 0xFF

    def tail_index(self, queue):
        return (self.tail >> (16 * queue)) & 0xFF

    def running(self, queue):
        return bool(self.head & (HEAD_HI_RUNNING if queue else HEAD_LO_RUNNING))


class RingBufferMode:
    """Mixin of Psp: the RING_BUFFER command and the ring-buffer mailbox."""

    @property
    def rb_enabled(self):
        return self._rb is not None and self._rb.enabled

    def _rb_disable(self):
        if self._rb is not None:
            self._rb.enabled = False

    def _cmd_ring_buffer(self, f):
        """``sev_mcmd_ring_buffer``."""
        if self.state not in (U.SEV_STATE_INIT, U.SEV_STATE_WORKING):
            return U.SEV_RET_INVALID_PLATFORM_STATE
        if self.rb_enabled:
            return U.SEV_RET_INVALID_PARAM
        if f.low_priority_queue_size != 1 or f.high_priority_queue_size not in (0, 1):
            return U.SEV_RET_INVALID_PARAM
        pages = [f.low_priority_cmd_ptr, f.low_priority_status_ptr]
        if f.high_priority_queue_size:
            pages += [f.high_priority_cmd_ptr, f.high_priority_status_ptr]
        if any(p % PAGE for p in pages):
            return U.SEV_RET_INVALID_ADDRESS
        if not all(self._valid(self._addr(p), PAGE) for p in pages):
            return U.SEV_RET_INVALID_ADDRESS
        self._rb = _Config(f)
        for q in (LOW, HIGH):
            self._rb.cmd[q] = self._addr(self._rb.cmd[q])
            self._rb.status[q] = self._addr(self._rb.status[q])
        return U.SEV_RET_SUCCESS

    def rb_mailbox(self, control, tail):
        """The x86 writes the control and tail registers and rings the doorbell; the firmware runs
        queued commands until the queues are empty or paused. Returns ``(status, head)``:
        status is None while the mode continues, EXIT_RING_BUFFER when this write ended it."""
        if not self.rb_enabled:
            raise RuntimeError("ring-buffer mode is not on (RING_BUFFER first)")
        rb = self._rb
        rb.control, rb.tail = control, tail
        while True:
            if (rb.control & CTL_RUN) != CTL_RUN:
                rb.enabled = False
                return U.SEV_RET_EXIT_RING_BUFFER, RbHead(rb.head)
            self._rb_prologue()
            queue = self._rb_select()
            if queue is None:
                self._rb_interrupt()
                return None, RbHead(rb.head)
            entry = _ENTRY.unpack(self._read(rb.cmd[queue] + 16 * rb.index(queue), 16))
            done = 0
            if entry["cmd_id"] in _BATCH:
                done = self._rb_batch(queue, entry["cmd_id"])
            if not done:
                status = self._dispatch(entry["cmd_id"], entry["cmd_buffer_ptr"])
                self._rb_post(queue, status, entry["cmd_flags"])
                self._rb_interrupt()
            if not rb.enabled:              # SHUTDOWN from the queue ends the mode
                return None, RbHead(rb.head)

    # -- the firmware's per-command steps (sev_rb_pre_cmd_process, sev_rb_post_cmd_process) ----

    def _rb_prologue(self):
        rb = self._rb
        rb.gen = False
        if rb.control & CTL_CLEAR_INT:
            rb.head &= ~(HEAD_ALL_EMPTY | HEAD_CMD_DONE | HEAD_PAUSED | HEAD_Q_FREE)
        if not rb.running(HIGH) and rb.size[HIGH] and rb.control & CTL_RESUME_HI:
            rb.head |= HEAD_HI_RUNNING
        if not rb.running(LOW) and rb.control & CTL_RESUME_LO:
            rb.head |= HEAD_LO_RUNNING

    def _rb_depth(self, queue):
        rb = self._rb
        head, tail, threshold = rb.index(queue), rb.tail_index(queue), rb.threshold[queue]
        if threshold == 0:
            return
        if head > tail:
            tail += ENTRIES
        enable = CTL_HI_QUEUE_EMPTY_INT if queue else CTL_LO_QUEUE_EMPTY_INT
        if tail - head < threshold and rb.control & enable:
            rb.head |= HEAD_Q_FREE
            rb.gen = True

    def _rb_select(self):
        """``sev_rb_get_cmd``: the queue to take the next command from, or None."""
        rb = self._rb
        for queue, resume in ((HIGH, CTL_RESUME_HI), (LOW, CTL_RESUME_LO)):
            if rb.control & resume or not rb.running(queue):
                continue
            self._rb_depth(queue)
            if rb.tail_index(queue) != rb.index(queue):
                self._rb_depth(queue)
                return queue
        if rb.int_on_empty:
            rb.head |= HEAD_ALL_EMPTY
            rb.gen = True
        return None

    def _rb_post(self, queue, status, flags):
        rb = self._rb
        index = rb.index(queue)
        entry = rb.status[queue] + 16 * index          # status and error_stack only
        self._write(entry, (status & 0xFFFF).to_bytes(2, "little"))
        self._write(entry + 8, bytes(8))
        shift = 16 * queue
        rb.head = (rb.head & ~(0xFF << shift)) | (((index + 1) % ENTRIES) << shift)
        if status and not flags & CMD_FLAG_CONT_ON_ERROR:
            rb.head &= ~(HEAD_HI_RUNNING if queue else HEAD_LO_RUNNING)
            rb.head |= HEAD_PAUSED
            rb.gen = True
        if flags & CMD_FLAG_INT_COMPLETE:
            rb.head |= HEAD_CMD_DONE
            rb.gen = True

    def _rb_interrupt(self):
        if self._rb.gen:
            self._rb.interrupts += 1

    # -- batches --------------------------------------------------------------------------------------

    def _rb_batch(self, queue, cmd_id):
        """Run the longest batchable run of ``cmd_id`` commands at the head of ``queue``; returns
        how many ran (0: run the next command alone)."""
        rb = self._rb
        send = cmd_id == U.SEV_CMD_SEND_UPDATE_DATA
        layout = L.sev_data_send_update_data if send else L.sev_data_receive_update_data
        checks = self._send_update_checks if send else self._receive_update_checks
        index, tail = rb.index(queue), rb.tail_index(queue)
        run, guest = [], None
        while index != tail:
            entry = _ENTRY.unpack(self._read(rb.cmd[queue] + 16 * index, 16))
            spa = self._addr(entry["cmd_buffer_ptr"])
            if entry["cmd_id"] != cmd_id or not self._valid(spa, layout.size):
                break
            f = layout.view(bytearray(self._read(spa, layout.size)))
            # The command's own checks; RECEIVE's also make trans_len equal guest_len.
            status, g = checks(f, False)
            if (status or (guest is not None and g is not guest) or f.guest_len != PAGE
                    or f.guest_address % PAGE or f.trans_address % PAGE):
                break
            guest = g
            run.append((entry["cmd_flags"], spa, f))
            index = (index + 1) % ENTRIES
        if len(run) < 2 or not self._rb_disjoint(run):
            return 0
        umc = self.host.umc
        guest_spas = np.array([self._addr(f.guest_address) for _, _, f in run], np.uint64)
        if send:
            _, _, headers, ct = packet_rows(None, len(run))
            self._seal_pages(guest, guest_spas, headers, ct)
            umc.write_pages([self._addr(f.trans_address) for _, _, f in run], ct, 0)
            for k, (_, spa, f) in enumerate(run):
                self._write(self._addr(f.hdr_address), headers[k])
                f.hdr_len = X.HEADER_SIZE
                self._write(spa, f.buf)
        else:
            headers = b"".join(self._read(self._addr(f.hdr_address), X.HEADER_SIZE)
                               for _, _, f in run)
            headers = np.frombuffer(headers, np.uint8).reshape(-1, X.HEADER_SIZE)
            cts = umc.read_pages([self._addr(f.trans_address) for _, _, f in run], 0)
            # The leading packets that pass run here; the first refused one is left to run
            # alone, so that its status and the queue's pause are exact.
            done, _, plain = self._open_pages(guest, headers, cts.reshape(-1, PAGE))
            if not done:
                return 0
            run = run[:done]
            self._write_pages(guest, guest_spas[:done], plain)
        for k, (flags, _, _) in enumerate(run):
            if k:
                self._rb_prologue()
                self._rb_select()
            self._rb_post(queue, U.SEV_RET_SUCCESS, flags)
            self._rb_interrupt()
        return len(run)

    def _rb_disjoint(self, run):
        """True if no range one command of the run writes meets a range another reads or writes,
        nor the queues' own pages: then batching changes nothing."""
        rb = self._rb
        spans = [(p, p + PAGE) for q in (LOW, HIGH) if rb.size[q]
                 for p in (rb.cmd[q], rb.status[q])]
        for _, spa, f in run:
            spans.append((spa, spa + len(f.buf)))
            for addr, size in ((f.hdr_address, X.HEADER_SIZE), (f.trans_address, PAGE),
                               (f.guest_address, PAGE)):
                spans.append((self._addr(addr), self._addr(addr) + size))
        spans.sort()
        return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


class RingBuffer:
    """The host side of ring-buffer mode: queue pages in host memory, tails, the doorbell.

    >>> rb = RingBuffer(host.psp, high=True)            # issues RING_BUFFER
    >>> i = rb.put(SEV_CMD_SEND_UPDATE_DATA, layout.sev_data_send_update_data, handle=1, ...)
    >>> head = rb.kick()                                # firmware runs the queues
    >>> rb.status(i)                                    # SEV_RET_SUCCESS
    """

    def __init__(self, psp, *, high=False, low_threshold=0, high_threshold=0,
                 int_on_empty=False):
        self.psp = psp
        mem = psp.host.mem
        self._pages = [int(p) << 12 for p in mem.alloc(4 if high else 2)]
        self.cmd = [self._pages[0], self._pages[2] if high else 0]
        self.status_page = [self._pages[1], self._pages[3] if high else 0]
        self.tail = [0, 0]
        self.control = CTL_RUN
        self._bufs = []
        self._buf_used = 0
        f = L.sev_data_ring_buffer.pack(
            low_priority_cmd_ptr=self.cmd[LOW], low_priority_status_ptr=self.status_page[LOW],
            high_priority_cmd_ptr=self.cmd[HIGH], high_priority_status_ptr=self.status_page[HIGH],
            low_priority_queue_size=1, high_priority_queue_size=int(high),
            low_q_threshold=low_threshold, high_q_threshold=high_threshold,
            int_on_empty=int(int_on_empty))
        buf = self._buffer(len(f))
        psp.host.mem.write(buf, f)
        status = psp.command(U.SEV_CMD_RING_BUFFER, buf)
        if status:
            raise PspError(U.SEV_CMD_RING_BUFFER, status)

    def _buffer(self, size):
        """64-byte slots for command buffers, in pages of host memory the helper owns."""
        if size > 64:
            raise ValueError("command buffers are at most 64 bytes here")
        if self._buf_used % 64 == 0:
            self._bufs.append(int(self.psp.host.mem.alloc(1)[0]) << 12)
        spa = self._bufs[-1] + 64 * (self._buf_used % 64)
        self._buf_used += 1
        return spa

    def enqueue(self, cmd_id, buf_spa, flags=0, high=False):
        """Write an entry at the queue's tail; the firmware sees it at the next ``kick``.
        Returns the entry's index."""
        q = HIGH if high else LOW
        index = self.tail[q]
        self.psp.host.mem.write(self.cmd[q] + 16 * index, _ENTRY.pack(
            cmd_id=cmd_id, cmd_flags=flags, cmd_buffer_ptr=buf_spa))
        self.tail[q] = (index + 1) % ENTRIES
        return index

    def put(self, cmd_id, layout, flags=0, high=False, **fields):
        """Build a command buffer from ``fields`` and enqueue it; returns (index, buffer SPA)."""
        spa = self._buffer(layout.size)
        self.psp.host.mem.write(spa, layout.pack(**fields))
        return self.enqueue(cmd_id, spa, flags, high), spa

    def kick(self, control=None):
        """Ring the doorbell with the current tails; returns the head register (RbHead)."""
        status, head = self.psp.rb_mailbox(self.control if control is None else control,
                                           self.tail[LOW] | (self.tail[HIGH] << 16))
        if status is not None:
            raise RuntimeError("ring-buffer mode ended")
        return head

    def resume(self, high=False):
        """Recover a paused queue: set its resume bit (the firmware marks it running), then clear
        it (the firmware goes on). Returns the head register."""
        self.kick(self.control | (CTL_RESUME_HI if high else CTL_RESUME_LO))
        return self.kick()

    def status(self, index, high=False):
        """The status the firmware wrote for entry ``index``."""
        raw = self.psp.host.mem.read(self.status_page[HIGH if high else LOW] + 16 * index, 16)
        return _STATUS.unpack(raw)["status"]

    def exit(self):
        """Leave ring-buffer mode (CMDRESP without the active bits); returns EXIT_RING_BUFFER."""
        status, _ = self.psp.rb_mailbox(0, self.tail[LOW] | (self.tail[HIGH] << 16))
        return status
