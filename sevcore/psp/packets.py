"""Migration packets: AES-128-CTR under the TEK, then HMAC-SHA256 under the TIK (encrypt-then-MAC).

The bytes-in, bytes-out form of the batched C kernel ``sevcore.core.sevpkt`` for the commands that
move one packet: SEND_UPDATE_* seals with ``_seal_packets`` and LAUNCH_SECRET opens with
``_open_packets`` ([FW] ``sev_mcmd_send_update``/``sev_mcmd_launch_secret``,
``aesctr_hmac256_encrypt``/``_decrypt``; docs/sources.md). RECEIVE_UPDATE_*
judges its packets with ``Psp._open_pages`` (sevcore/psp/batch.py), which calls ``sevpkt`` on
arrays, so that one command and a batch share the firmware's order of checks.
"""

from sevcore.core import sevpkt
from sevcore.psp.crypto import CTX_DATA, HEADER_SIZE


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


def _open_packets(tek, tik, headers, ciphertext, ctx=CTX_DATA, measure=None):
    """Verify and decrypt ``len(headers) // 52`` packets: BadPacketMac for the first packet whose
    MAC is wrong, sevpkt.PacketFlagsError for COMPRESSED, before anything is decrypted.
    ``measure``: LAUNCH_SECRET's launch measurement, bound into the MAC."""
    headers = bytes(headers)
    n = len(headers) // HEADER_SIZE
    ct = memoryview(ciphertext).cast("B")
    if n == 0 or len(headers) % HEADER_SIZE or ct.nbytes % n:
        raise ValueError("ciphertext must split into len(headers) // 52 equal packets")
    try:
        return bytes(sevpkt.open(tek, tik, headers, ct, ctx, measure=measure))
    except sevpkt.PacketAuthError as e:
        raise BadPacketMac(e.index) from None
