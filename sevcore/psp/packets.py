"""Migration packets: AES-128-CTR under the TEK, then HMAC-SHA256 under the TIK (encrypt-then-MAC).

This is the one place SEND_UPDATE_* and RECEIVE_UPDATE_* turn guest plaintext into transport
packets and back ([FW] ``sev_mcmd_send_update``/``sev_mcmd_receive_update``,
``aesctr_hmac256_encrypt``/``_decrypt``; spec/sev-firmware.md section 7.6). Both functions take
a batch of equally sized packets with the calling convention of the batched C kernel
``sevcore.sevpkt`` (``seal(tek, tik, plaintext, ivs, ctx)`` / ``open(tek, tik, headers,
ciphertext, ctx)``), so that swapping the implementation is a change to this module alone.
"""
import hmac

from sevcore import sevpkt
from sevcore.psp.crypto import CTX_DATA, HEADER_SIZE, aes128_ctr, packet_mac, split_header


class BadPacketMac(ValueError):
    """A packet's MAC does not match; ``index`` is its position in the batch."""

    def __init__(self, index):
        super().__init__(f"packet {index}: MAC mismatch")
        self.index = index


def _seal_packets(tek, tik, plaintext, ivs, ctx=CTX_DATA):
    """Seal ``len(ivs) // 16`` packets cut evenly from ``plaintext``; returns ``(headers,
    ciphertext)``, 52 header bytes per packet and ciphertext as long as the plaintext."""
    ivs = bytes(ivs)
    n = len(ivs) // 16
    pt = memoryview(plaintext).cast("B")
    if n == 0 or len(ivs) % 16 or pt.nbytes % n:
        raise ValueError("plaintext must split into len(ivs) // 16 equal packets")
    hdrs, ct = sevpkt.seal(tek, tik, pt, ivs, ctx)
    return bytes(hdrs), bytes(ct)


def _open_packets(tek, tik, headers, ciphertext, ctx=CTX_DATA):
    """Verify and decrypt ``len(headers) // 52`` packets; raises BadPacketMac for the first packet
    whose MAC is wrong, before decrypting anything. Packets with flags 0 take the batched C
    kernel; the firmware refuses COMPRESSED before this point, and other flag bits (covered by
    the MAC, ignored by the firmware) take the per-packet path."""
    headers = bytes(headers)
    n = len(headers) // HEADER_SIZE
    ct = memoryview(ciphertext).cast("B")
    if n == 0 or len(headers) % HEADER_SIZE or ct.nbytes % n:
        raise ValueError("ciphertext must split into len(headers) // 52 equal packets")
    split = [split_header(headers[HEADER_SIZE * i:HEADER_SIZE * (i + 1)]) for i in range(n)]
    if not any(flags for flags, _, _ in split):
        try:
            return bytes(sevpkt.open(tek, tik, headers, ct, ctx))
        except sevpkt.PacketAuthError as e:
            raise BadPacketMac(e.index) from None
    size = ct.nbytes // n
    packets = [ct[size * i:size * (i + 1)] for i in range(n)]
    for i, ((flags, iv, mac), c) in enumerate(zip(split, packets)):
        if not hmac.compare_digest(packet_mac(tik, ctx, flags, iv, size, size, c), mac):
            raise BadPacketMac(i)
    return b"".join(aes128_ctr(tek, iv, c) for (_, iv, _), c in zip(split, packets))
