"""SNP migration through migration agents over a byte channel (sevcore.migration.transport: in
process or TCP): the source process has the guest and its agent, the target process its own
agent and a Kvm.

    source                                          target
    HELLO {agent's key, report, VCEK}  --------->
                                       <---------   HELLO {agent's key, report, VCEK}
    (each agent checks the other: ma.Agent.trust)
    IMAGE {layout, gfns, seqs, packets, secrets page, VMSAs, sealed context}  --------->
                                       <---------   RESULT {the guest's own check}

A frame is ``tag (u8) || length (u64 LE) || payload``; a part list inside a payload is
``length (u64 LE) || bytes`` repeated. Nothing in a frame is trusted: the packets, the swapped
pages and the context are authenticated by the worker, the firmware and the agent.
"""
import json
import struct

import numpy as np

from sevcore.migration import ma
from sevcore.migration.helper import PACKET_SIZE
from sevcore.vmm import attest

HELLO, IMAGE, RESULT = 1, 2, 3
_HDR = struct.Struct("<BQ")
_LEN = struct.Struct("<Q")
#: The largest frame a peer may announce (a 1 GiB guest's packets and then some).
MAX_FRAME = 2 << 30


def _parts(*parts):
    return b"".join(_LEN.pack(len(p)) + bytes(p) for p in parts)


def _unparts(data):
    out, pos = [], 0
    while pos < len(data):
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
    tag, n = _HDR.unpack(_recv_exact(ch, _HDR.size))
    if tag != want or n > MAX_FRAME:
        raise ma.MaError("stream", reason=f"frame {tag} of {n} bytes, expected frame {want}")
    return _recv_exact(ch, n)


def agree(ch, agent):
    """HELLO both ways: this agent's key, report and VCEK out, the peer's in and checked
    (ma.Agent.trust: AttestationError for a peer it does not trust)."""
    key, report = agent.hello()
    send_frame(ch, HELLO, _parts(key, report, agent.host.psp.snp_vcek_cert()))
    peer_key, peer_report, peer_vcek = _unparts(recv_frame(ch, HELLO))
    agent.trust(peer_key, peer_report, peer_vcek)


def _image_bytes(guest, image):
    meta = json.dumps({"mem_size": guest.mem_size, "batch_pages": guest.layout.batch_pages,
                       "npages": len(image.gfns)}).encode()
    vmsas = [x for ct, entry in image.vmsas for x in (ct, entry)]
    return _parts(meta, image.gfns.astype("<u8").tobytes(), image.seqs.astype("<u8").tobytes(),
                  np.ascontiguousarray(image.packets).tobytes(), image.secrets, image.context,
                  *vmsas)


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
    gfns = np.frombuffer(parts[1], "<u8").astype(np.uint64)
    seqs = np.frombuffer(parts[2], "<u8").astype(np.uint64)
    packets = np.frombuffer(parts[3], np.uint8).copy()
    if len(gfns) != n or len(seqs) != n or packets.size != n * PACKET_SIZE:
        raise ma.MaError("stream", reason="an image whose arrays disagree with its count")
    vmsas = [(parts[i], parts[i + 1]) for i in range(6, len(parts), 2)]
    image = ma.MaImage(gfns, seqs, packets.reshape(n, PACKET_SIZE), parts[4], vmsas,
                       parts[5])
    return meta, image


def send_guest(ch, guest, agent):
    """The source process: agree with the peer's agent, send the guest's image, and return the
    target's RESULT (a dict: ``data_ok``, ``key_ok``, ``measurement``). A failure before the
    export leaves the guest running here (ma.send swaps its pages back in when the export is
    refused); one after it is MaError with ``lost``: the guest exists only in the image."""
    agree(ch, agent)
    image = ma.send(guest, agent)
    try:
        send_frame(ch, IMAGE, _image_bytes(guest, image))
        return json.loads(recv_frame(ch, RESULT))
    except Exception as e:
        raise ma.MaError("migration", reason=f"{type(e).__name__}: {e}; the guest's context "
                         "was exported, so the source guest is lost", lost=True) from e


def receive_guest(ch, kvm, agent):
    """The target process: agree with the peer's agent, receive the image, bring the guest up
    and run its own check; the RESULT goes back. Returns ``(guest, result)``."""
    agree(ch, agent)
    meta, image = _image(recv_frame(ch, IMAGE))
    guest = ma.receive(kvm, meta["mem_size"], agent, image, meta["batch_pages"])
    out = guest.check()
    result = {"data_ok": out["data_ok"], "key_ok": out["key_ok"],
              "measurement": attest.parse_report(out["report"]).measurement.hex(),
              "pages": len(image.gfns)}
    send_frame(ch, RESULT, json.dumps(result).encode())
    return guest, result
