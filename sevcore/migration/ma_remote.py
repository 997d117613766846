"""SNP migration through migration agents over a byte channel (sevcore.migration.transport: in
process or TCP): the source process has the guest and its agent, the target process its own
agent and a Kvm.

    source                                          target
    HELLO {agent's key, report, VCEK}  --------->
                                       <---------   HELLO {agent's key, report, VCEK}
    (each agent checks the other: ma.Agent.trust)
    pre-copy (ma.precopy), while the guest works:
    PASS {gfns, seqs, packets} of each pass  ------>   kept, in order (the target's worker can
                                                      open nothing before the import)
    IMAGE {layout, gfns, seqs, packets, secrets page, VMSAs, sealed context}  --------->
                                       <---------   RESULT {the guest's own check}

IMAGE carries the last pass (the guest stopped), or every page in stop-and-copy; the target
opens the passes, then the image's packets, in the order they were sealed.

A frame is ``tag (u8) || length (u64 LE) || payload``; a part list inside a payload is
``length (u64 LE) || bytes`` repeated. Nothing in a frame is trusted: the packets, the swapped
pages and the context are authenticated by the worker, the firmware and the agent.
"""
import json
import struct

import numpy as np

from sevcore.migration import ma
from sevcore.migration.helper import PACKET_SIZE, HelperBatch
from sevcore.vmm import attest

HELLO, IMAGE, RESULT, PASS = 1, 2, 3, 4
_HDR = struct.Struct("<BQ")
_LEN = struct.Struct("<Q")
#: The largest frame a peer may announce (a 1 GiB guest's packets and then some).
MAX_FRAME = 2 << 30
#: The most PASS bytes a target keeps before the IMAGE (it opens nothing before the import,
#: and learns the guest's size only from the IMAGE): four times the largest frame.
MAX_PASSED = 4 * MAX_FRAME


def _parts(*parts):
    return b"".join(_LEN.pack(len(p)) + bytes(p) for p in parts)


def _unparts(data):
    out, pos = [], 0
    while pos < len(data):
        if pos + _LEN.size > len(data):
            raise ma.MaError("stream", reason="a part's length runs past its frame")
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        if pos + n > len(data):
            raise ma.MaError("stream", reason="a part runs past its frame")
        out.append(data[pos:pos + n])
        pos += n
    return out


def send_frame(ch, tag, payload):
    ch.send(_HDR.pack(tag, len(payload)))
    ch.send(payload)


def _recv_exact(ch, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = ch.recv_into(view[got:])
        if not k:
            raise ma.MaError("stream", reason=f"the peer closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_frame(ch, want):
    """The payload of the next frame, which must have tag ``want``."""
    return recv_tagged(ch, (want,))[1]


def recv_tagged(ch, wants):
    """``(tag, payload)`` of the next frame, whose tag must be one of ``wants``."""
    tag, n = _HDR.unpack(_recv_exact(ch, _HDR.size))
    if tag not in wants or n > MAX_FRAME:
        raise ma.MaError("stream", reason=f"frame {tag} of {n} bytes, expected frame "
                         f"{' or '.join(map(str, wants))}")
    return tag, _recv_exact(ch, n)


def agree(ch, agent):
    """HELLO both ways: this agent's key, report and VCEK out, the peer's in and checked
    (ma.Agent.trust: AttestationError for a peer it does not trust)."""
    key, report = agent.hello()
    send_frame(ch, HELLO, _parts(key, report, agent.host.psp.snp_vcek_cert()))
    peer_key, peer_report, peer_vcek = _unparts(recv_frame(ch, HELLO))
    agent.trust(peer_key, peer_report, peer_vcek)


def _sealed_parts(b):
    """The parts of sealed pages (a HelperBatch or an MaImage): gfns, seqs, packets."""
    return (b.gfns.astype("<u8").tobytes(), b.seqs.astype("<u8").tobytes(),
            np.ascontiguousarray(b.packets).tobytes())


def _image_bytes(guest, image):
    meta = json.dumps({"mem_size": guest.mem_size, "batch_pages": guest.layout.batch_pages,
                       "npages": len(image.gfns)}).encode()
    vmsas = [x for ct, entry in image.vmsas for x in (ct, entry)]
    return _parts(meta, *_sealed_parts(image), image.secrets, image.context, *vmsas)


def _sealed(gfns, seqs, packets, n=None):
    """The arrays of sealed pages from their parts (``n`` of them if given, else as many as
    the gfns); MaError if they disagree."""
    if len(gfns) % 8 or len(seqs) % 8:
        raise ma.MaError("stream", reason="sealed pages' gfns or seqs not whole u64s")
    gfns = np.frombuffer(gfns, "<u8").astype(np.uint64)
    n = len(gfns) if n is None else n
    seqs = np.frombuffer(seqs, "<u8").astype(np.uint64)
    packets = np.frombuffer(packets, np.uint8).copy()
    if len(gfns) != n or len(seqs) != n or packets.size != n * PACKET_SIZE:
        raise ma.MaError("stream", reason="sealed pages whose arrays disagree with their count")
    return gfns, seqs, packets.reshape(n, PACKET_SIZE)


def _image(data):
    parts = _unparts(data)
    if len(parts) < 6 or len(parts) % 2:
        raise ma.MaError("stream", reason="an image with missing parts")
    try:
        meta = json.loads(parts[0])
        n = int(meta["npages"])
        meta["mem_size"], meta["batch_pages"] = int(meta["mem_size"]), int(meta["batch_pages"])
    except (ValueError, TypeError, KeyError) as e:
        raise ma.MaError("stream", reason=f"an image header that does not parse: {e!r}") \
            from None
    gfns, seqs, packets = _sealed(*parts[1:4], n)
    vmsas = [(parts[i], parts[i + 1]) for i in range(6, len(parts), 2)]
    return meta, ma.MaImage(gfns, seqs, packets, parts[4], vmsas, parts[5])


def send_guest(ch, guest, agent, max_passes=1, cost=None):
    """The source process: agree with the peer's agent, send the guest's image, and return the
    target's RESULT (a dict: ``data_ok``, ``key_ok``, ``measurement``). ``max_passes`` > 1
    pre-copies (ma.precopy; ``cost`` decides when to stop), each pass a PASS frame while the
    guest works; the RESULT then has the source's ``passes`` and ``converged`` (and with
    ``cost`` the modelled ``downtime_ns`` and ``total_ns``). A failure
    before the export leaves the guest running here (ma.send swaps its pages back in when the
    export is refused, and pre-copy's dirty logging is off again); one after it is MaError
    with ``lost``: the guest exists only in the image."""
    agree(ch, agent)
    last, passes = None, None
    if max_passes > 1:
        batches, passes, converged = ma.precopy(
            guest, max_passes, cost,
            on_pass=lambda b: send_frame(ch, PASS, _parts(*_sealed_parts(b))))
        last = batches[-1:]
    image = ma.send(guest, agent, last)
    try:
        send_frame(ch, IMAGE, _image_bytes(guest, image))
        result = json.loads(recv_frame(ch, RESULT))
    except Exception as e:
        raise ma.MaError("migration", reason=f"{type(e).__name__}: {e}; the guest's context "
                         "was exported, so the source guest is lost", lost=True) from e
    if passes is not None:
        if cost is not None:
            fixed = image.nbytes() - passes[-1]["bytes"]
            result["downtime_ns"], result["total_ns"] = ma.model_times(
                cost, passes, guest, fixed, 1 + len(image.vmsas))
        result.update(passes=passes, converged=converged)
    return result


def receive_guest(ch, kvm, agent):
    """The target process: agree with the peer's agent, receive the image, bring the guest up
    and run its own check; the RESULT goes back. Returns ``(guest, result)``."""
    agree(ch, agent)
    passes, kept = [], 0
    tag, data = recv_tagged(ch, (PASS, IMAGE))
    while tag == PASS:
        kept += len(data)
        if kept > MAX_PASSED:
            raise ma.MaError("stream", reason=f"passes of more than {MAX_PASSED} bytes before "
                                              f"the image")
        parts = _unparts(data)
        if len(parts) != 3:
            raise ma.MaError("stream", reason="a pass with missing parts")
        passes.append(HelperBatch(*_sealed(*parts)))
        tag, data = recv_tagged(ch, (PASS, IMAGE))
    meta, image = _image(data)
    if passes:                            # in the order they were sealed
        allp = ma.joined(passes + [HelperBatch(image.gfns, image.seqs, image.packets)])
        image.gfns, image.seqs, image.packets = allp.gfns, allp.seqs, allp.packets
    guest = ma.receive(kvm, meta["mem_size"], agent, image, meta["batch_pages"])
    out = guest.check()
    result = {"data_ok": out["data_ok"], "key_ok": out["key_ok"],
              "measurement": attest.parse_report(out["report"]).measurement.hex(),
              "pages": len(image.gfns)}
    send_frame(ch, RESULT, json.dumps(result).encode())
    return guest, result
