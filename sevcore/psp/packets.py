"""Migration packets: AES-128-CTR under the TEK, then HMAC-SHA256 under the TIK (encrypt-then-MAC).

This is the one place SEND_UPDATE_* and RECEIVE_UPDATE_* turn guest plaintext into transport
packets and back ([FW] ``sev_mcmd_send_update``/``sev_mcmd_receive_update``,
``aesctr_hmac256_encrypt``/``_decrypt``; spec/sev-firmware.md section 7.6). Both functions take
a batch of equally sized packets with the calling convention of the batched C kernel
``sevcore.sevpkt`` (``seal(tek, tik, plaintext, ivs, ctx)`` / ``open(tek, tik, headers,
ciphertext, ctx)``), so that swapping the implementation is a change to this module alone.
"""
import hashlib
import hmac

from sevcore.psp.crypto import (CTX_DATA, HEADER_SIZE, aes128_ctr, le32, packet_header,
                                split_header)


class BadPacketMac(ValueError):
    """A packet's MAC does not match; ``index`` is its position in the batch."""

    def __init__(self, index):
        super().__init__(f"packet {index}: MAC mismatch")
        self.index = index


def _mac(tik, ctx, flags, iv, ct):
    n = le32(len(ct))
    return hmac.new(tik, bytes([ctx]) + le32(flags) + iv + n + n + ct, hashlib.sha256).digest()


def _seal_packets(tek, tik, plaintext, ivs, ctx=CTX_DATA):
    """Seal ``len(ivs) // 16`` packets cut evenly from ``plaintext``; returns ``(headers,
    ciphertext)``, 52 header bytes per packet and ciphertext as long as the plaintext."""
    ivs = bytes(ivs)
    n = len(ivs) // 16
    pt = memoryview(plaintext).cast("B")
    if n == 0 or len(ivs) % 16 or pt.nbytes % n:
        raise ValueError("plaintext must split into len(ivs) // 16 equal packets")
    size = pt.nbytes // n
    headers, cts = [], []
    for i in range(n):
        iv = ivs[16 * i:16 * i + 16]
        ct = aes128_ctr(tek, iv, pt[size * i:size * (i + 1)])
        cts.append(ct)
        headers.append(packet_header(0, iv, _mac(tik, ctx, 0, iv, ct)))
    return b"".join(headers), b"".join(cts)


def _open_packets(tek, tik, headers, ciphertext, ctx=CTX_DATA):
    """Verify and decrypt ``len(headers) // 52`` packets; raises BadPacketMac for the first packet
    whose MAC is wrong, before decrypting anything."""
    headers = bytes(headers)
    n = len(headers) // HEADER_SIZE
    ct = memoryview(ciphertext).cast("B")
    if n == 0 or len(headers) % HEADER_SIZE or ct.nbytes % n:
        raise ValueError("ciphertext must split into len(headers) // 52 equal packets")
    size = ct.nbytes // n
    parts = []
    for i in range(n):
        flags, iv, mac = split_header(headers[HEADER_SIZE * i:HEADER_SIZE * (i + 1)])
        c = bytes(ct[size * i:size * (i + 1)])
        if not hmac.compare_digest(_mac(tik, ctx, flags, iv, c), mac):
            raise BadPacketMac(i)
        parts.append((iv, c))
    return b"".join(aes128_ctr(tek, iv, c) for iv, c in parts)
