"""Coverage-guided fuzzing of the SEV transport packets: the 52-byte header (LE32 flags, IV, MAC)
and its ciphertext, judged by the packet kernel, by LAUNCH_SECRET's opener and by the simulated
firmware's RECEIVE_UPDATE_DATA, one command or a batch of the rows of a stream record.

Contracts:

* ``sevcore.core.sevpkt.open`` (the C kernel): PacketAuthError or PacketFlagsError naming the
  first refused packet, or ValueError for lengths that do not make packets; nothing else. Its
  verdict and plaintext equal those of the pure-Python twin ``sevcore._reference.sevpkt``.
* ``sevcore.psp.packets._open_packets`` (LAUNCH_SECRET, context 0x01 with the launch MEASURE):
  BadPacketMac, PacketFlagsError or ValueError; the same verdict as the twin.
* RECEIVE_UPDATE_DATA through the mailbox of a PSP with a guest in RUPDATE (AMD-ASPFW
  ``sev_mcmd_receive_update``: lengths, then the packet's flags and MAC): a status, never an
  exception; SUCCESS only for a packet the twin opens, which then sits in guest memory under
  the guest's key; any other status leaves guest memory as it was.
* ``Psp.receive_update_data_pages`` (what the migration target does with an ENCRYPTED_PAGES
  record, whose ``hdr_len`` the stream does not check): returns, or raises PspError whose
  ``index`` is the first packet refused (lengths: 0; else the first the twin refuses), or
  ValueError for an address that is not page aligned; exactly the pages before ``index`` are
  written, each with the twin's plaintext.

Input (big-endian)::

    u8 target (0 kernel, 1 LAUNCH_SECRET opener, 2 RECEIVE_UPDATE_DATA, 3 a batch of them)
    u8 options: bit 0 set each header's MAC right for its flags, IV and ciphertext (so that
       mutations get past the MAC); bit 1 pass the headers and ciphertext as strided rows;
       bits 2-3 the output (new, in place, caller's buffer); bits 4-5 the batch's pages - 1
    u8 ctx (kernel), u32 hdr_len, u32 guest_len, u32 trans_len (RECEIVE_UPDATE_DATA's fields),
    u16 offset of guest_address in its page (a batch: 2 bits of page per packet, and bit 15
       adds 8 bytes to the first address), u16 header bytes, u16 MEASURE bytes (0: none),
    then the header bytes, the MEASURE bytes and the ciphertext

    python tests/fuzz/fuzz_packets.py -max_total_time=30
"""
import functools
import pathlib
import struct
import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["sevcore"]):
    from sevcore import uapi as U
    from sevcore._reference import sevpkt as ref
    from sevcore.core import sevpkt
    from sevcore.psp import layout as L
    from sevcore.psp.packets import BadPacketMac, _open_packets
    from sevcore.psp.status import STATUS_NAMES, PspError

import fuzzutil  # noqa: E402 -- this folder's, not instrumented

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support import psp as psputil  # noqa: E402 -- the firmware tests' migration set-up, found on the path above

HEAD = struct.Struct(">BBBIIIHHH")
TEK, TIK = bytes(range(16)), bytes(range(16, 32))
SET_MAC, ROWS = 1, 2
AREA_PAGES = 8              # guest_address area: room for the largest packet at any offset


def pack(target, options=0, ctx=sevpkt.CTX_DATA, hdr_len=52, guest_len=0, trans_len=0,
         offset=0, header=b"", measure=b"", ciphertext=b""):
    """An input for this harness (make_corpus writes the seeds with it)."""
    return (HEAD.pack(target, options, ctx, hdr_len, guest_len, trans_len, offset, len(header),
                      len(measure)) + header + measure + ciphertext)


def unpack(data):
    """The fields of an input (None if it is shorter than its head), target reduced mod 4."""
    if len(data) < HEAD.size:
        return None
    target, options, ctx, hdr_len, guest_len, trans_len, offset, nh, nm = HEAD.unpack_from(data)
    rest = data[HEAD.size:]
    header, measure, ct = rest[:nh], rest[nh:nh + nm], rest[nh + nm:]
    return (target % 4, options, ctx, hdr_len, guest_len, trans_len, offset, header,
            measure or None, ct)


def set_macs(tik, ctx, headers, ct, measure):
    """``headers`` with each packet's MAC made right, where the lengths make packets."""
    n = len(headers) // ref.HDR_SIZE
    if not n or len(headers) % ref.HDR_SIZE or len(ct) % n:
        return headers
    size = len(ct) // n
    out = bytearray(headers)
    for i in range(n):
        h = out[ref.HDR_SIZE * i:ref.HDR_SIZE * (i + 1)]
        flags = struct.unpack_from("<I", h)[0]
        out[ref.HDR_SIZE * i + 20:ref.HDR_SIZE * (i + 1)] = ref.packet_mac(
            tik, ctx, flags, h[4:20], ct[size * i:size * (i + 1)], measure)
    return bytes(out)


def twin(tek, tik, headers, ct, ctx, measure, empty=False):
    """The reference's verdict: ('ok', plaintext), ('mac' | 'flags', index) or ('lengths',).
    ``empty``: no headers and no ciphertext are a batch of no packets (the kernel's view)."""
    n = len(headers) // ref.HDR_SIZE
    if empty and not headers and not ct and (measure is None
                                             or len(measure) == sevpkt.MEASURE_SIZE):
        return "ok", b""
    if (not n or len(headers) % ref.HDR_SIZE or len(ct) % n or not len(ct) // n
            or len(ct) // n % 16 or len(ct) // n > ref.MAX_LEN
            or (measure is not None and len(measure) != sevpkt.MEASURE_SIZE)):
        return ("lengths",)
    try:
        return "ok", ref.open_packets(tek, tik, headers, ct, ctx, measure)
    except ref.BadPacket as e:
        return e.reason, e.index


def strided(buf, n):
    """``buf`` as ``n`` rows with 16 bytes between them, views of a larger array (as the
    columns of a stream record are)."""
    size = len(buf) // n
    arr = np.zeros((n, size + 16), np.uint8)
    rows = arr[:, 8:8 + size]
    rows[:] = np.frombuffer(buf, np.uint8).reshape(n, size)
    return rows


def kernel(options, ctx, header, measure, ct):
    """sevcore.core.sevpkt.open against the twin."""
    if options & SET_MAC:
        header = set_macs(TIK, ctx, header, ct, measure)
    want = twin(TEK, TIK, header, ct, ctx, measure, empty=True)
    n = len(header) // ref.HDR_SIZE
    hdrs, cts = header, ct
    if options & ROWS and n and want[0] != "lengths":
        hdrs, cts = strided(header, n), strided(ct, n)
    out_mode = options >> 2 & 3
    out = None
    # The plaintext is contiguous: strided ciphertext rows cannot be opened in place.
    rows_in_place = out_mode == 1 and isinstance(cts, np.ndarray)
    if out_mode == 1:
        cts = out = cts if rows_in_place else bytearray(ct)
    elif out_mode == 2:
        out = bytearray(len(ct))
    before = bytes(out) if out is not None else None
    try:
        pt = sevpkt.open(TEK, TIK, hdrs, cts, ctx, measure=measure, out=out)
    except ValueError:
        assert want == ("lengths",) or rows_in_place, want
        return
    except sevpkt.PacketAuthError as e:
        assert want == ("mac", e.index), (want, e.index)
    except sevpkt.PacketFlagsError as e:
        assert want == ("flags", e.index), (want, e.index)
        assert e.flags & 1
    else:
        assert want[0] == "ok" and bytes(pt) == want[1], want[0]
        return
    if out is not None:             # a refusal writes nothing
        assert bytes(out) == before


def secret(options, header, measure, ct):
    """LAUNCH_SECRET's opener (context 0x01) against the twin."""
    if options & SET_MAC:
        header = set_macs(TIK, ref.CTX_SECRET, header, ct, measure)
    want = twin(TEK, TIK, header, ct, ref.CTX_SECRET, measure)
    try:
        pt = _open_packets(TEK, TIK, header, ct, ref.CTX_SECRET, measure)
    except ValueError as e:
        if isinstance(e, BadPacketMac):
            assert want == ("mac", e.index), (want, e.index)
        else:
            assert want == ("lengths",), want
        return
    except sevpkt.PacketFlagsError as e:
        assert want == ("flags", e.index), (want, e.index)
        return
    assert want[0] == "ok" and pt == want[1], want[0]


@functools.cache
def target():
    """The destination of a migration (set up once): host, handle, the guest's keys and the
    pages RECEIVE_UPDATE_DATA's buffers live in."""
    src, dst, handle, start = psputil.migration_pair()
    g = dst.psp.guest(handle)
    return {"host": dst, "handle": handle, "tek": g.tek, "tik": g.tik, "asid": g.asid,
            "src": src, "cmd": psputil.pages(dst, 1), "hdr": psputil.pages(dst, 1),
            "trans": psputil.pages(dst, 6), "where": psputil.pages(dst, AREA_PAGES)}


def receive(options, hdr_len, guest_len, trans_len, offset, header, ct):
    """RECEIVE_UPDATE_DATA through the mailbox: a status; memory changes only on SUCCESS."""
    t = target()
    host = t["host"]
    header = (header + bytes(52))[:52]
    ct = (ct + bytes(6 * 4096))[:6 * 4096]      # what the firmware finds at trans_address
    if options & SET_MAC:
        header = set_macs(t["tik"], ref.CTX_DATA, header, ct[:trans_len], None)
    host.mem.write(t["hdr"], header)
    host.mem.write(t["trans"], ct)
    where = t["where"] + offset % 4096
    area = (t["where"], AREA_PAGES * 4096)
    before = host.mem.read(*area)
    host.mem.write(t["cmd"], L.sev_data_receive_update_data.pack(
        handle=t["handle"], hdr_address=t["hdr"], hdr_len=hdr_len, guest_address=where,
        guest_len=guest_len, trans_address=t["trans"], trans_len=trans_len))
    status = host.psp.command(U.SEV_CMD_RECEIVE_UPDATE_DATA, t["cmd"])
    assert status in STATUS_NAMES, status
    if status != U.SEV_RET_SUCCESS:
        assert host.mem.read(*area) == before, "a refused RECEIVE_UPDATE_DATA wrote memory"
        return
    want = twin(t["tek"], t["tik"], header, ct[:trans_len], ref.CTX_DATA, None)
    assert want[0] == "ok" and hdr_len >= 52 and guest_len == trans_len, (want[0], hdr_len)
    assert host.umc.read(where, guest_len, t["asid"]) == want[1]


def receive_pages(options, hdr_len, trans_len, offset, header, ct):
    """Psp.receive_update_data_pages of ``n`` rows of ``hdr_len % 128`` header bytes and
    ``trans_len % 8192`` ciphertext bytes: exactly the pages before the refused one written."""
    t = target()
    host, psp = t["host"], t["host"].psp
    n, hl, tl = (options >> 4 & 3) + 1, hdr_len % 128, trans_len % 8192
    hdrs = np.frombuffer(header.ljust(n * hl, b"\0")[:n * hl], np.uint8).reshape(n, hl)
    trans = np.frombuffer(ct.ljust(n * tl, b"\0")[:n * tl], np.uint8).reshape(n, tl)
    if options & SET_MAC and hl >= 52:
        hdrs = np.frombuffer(b"".join(set_macs(t["tik"], ref.CTX_DATA, bytes(hdrs[i, :52]),
                                               bytes(trans[i]), None) + bytes(hdrs[i, 52:])
                                      for i in range(n)), np.uint8).reshape(n, hl)
    slots = [offset >> 2 * i & 3 for i in range(n)]
    addrs = [t["where"] + 4096 * k for k in slots]
    addrs[0] += 8 * (offset >> 15)
    area = (t["where"], 4 * 4096)
    before = host.mem.read(*area)
    if addrs[0] % 4096:
        try:
            psp.receive_update_data_pages(t["handle"], addrs, hdrs, trans)
        except ValueError:
            assert host.mem.read(*area) == before
            return
        raise AssertionError("an unaligned guest address was taken")
    verdicts = [twin(t["tek"], t["tik"], bytes(hdrs[i, :52]), bytes(trans[i]), ref.CTX_DATA,
                     None) for i in range(n)] if hl >= 52 and tl == 4096 else [("lengths",)] * n
    want = next((i for i, v in enumerate(verdicts) if v[0] != "ok"), n)
    try:
        psp.receive_update_data_pages(t["handle"], addrs, hdrs, trans)
        done = n
    except PspError as e:
        done = e.index
        assert e.status != U.SEV_RET_SUCCESS and e.status in STATUS_NAMES, e.status
    assert done == want, (done, verdicts)
    written = {slots[i]: verdicts[i][1] for i in range(done)}     # a later packet wins
    for k in range(4):
        page = (t["where"] + 4096 * k, 4096)
        if k in written:
            assert host.umc.read(*page, t["asid"]) == written[k], k
        else:
            assert host.mem.read(*page) == before[4096 * k:4096 * (k + 1)], k


def TestOneInput(data):
    """One input, decoded as the docstring says, checked against its target's contract."""
    fields = unpack(data)
    if fields is None:
        return
    which, options, ctx, hdr_len, guest_len, trans_len, offset, header, measure, ct = fields
    if which == 0:
        kernel(options, ctx, header, measure, ct)
    elif which == 1:
        secret(options, header, measure, ct)
    elif which == 2:
        receive(options, hdr_len, guest_len, trans_len, offset, header, ct)
    else:
        receive_pages(options, hdr_len, trans_len, offset, header, ct)


if __name__ == "__main__":
    fuzzutil.main(TestOneInput, "packets")
