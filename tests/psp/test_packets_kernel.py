"""The firmware's packet functions on the batched C kernel (sevcore.core.sevpkt)."""
import os

import pytest

from sevcore.core import sevpkt
from sevcore.psp.crypto import packet_header
from sevcore.psp.packets import BadPacketMac, _open_packets, _seal_packets


def test_round_trip_and_tamper():
    """Sealed pages open to the plaintext; a flipped ciphertext bit is refused at its index."""
    tek, tik = os.urandom(16), os.urandom(16)
    pt = os.urandom(3 * 4096)
    hdrs, ct = _seal_packets(tek, tik, pt, os.urandom(48))
    assert _open_packets(tek, tik, hdrs, ct) == pt
    bad = bytearray(ct)
    bad[4096 + 7] ^= 1
    with pytest.raises(BadPacketMac) as e:
        _open_packets(tek, tik, hdrs, bad)
    assert e.value.index == 1


def test_flagged_packet_with_valid_mac_opens():
    """A packet with a non-zero (non-COMPRESSED) flags word and a MAC over it opens as the
    firmware model expects; a wrong MAC on it is refused."""
    tek, tik = os.urandom(16), os.urandom(16)
    iv = os.urandom(16)
    ct = bytes(sevpkt.aes128_ctr(tek, iv, b"b" * 32))
    aad = bytes([2]) + (2).to_bytes(4, "little") + iv + (32).to_bytes(4, "little") * 2
    mac = bytes(sevpkt.hmac_sha256(tik, aad + ct))
    assert _open_packets(tek, tik, packet_header(2, iv, mac), ct) == b"b" * 32
    with pytest.raises(BadPacketMac):
        _open_packets(tek, tik, packet_header(2, iv, bytes(32)), ct)
