"""SEV transport packets: the crypto of SEND_UPDATE_DATA, RECEIVE_UPDATE_DATA and LAUNCH_SECRET.

Each packet (one page, or any 16-byte multiple up to 0x5000 bytes) is encrypted with AES-128-CTR
under the session TEK and authenticated encrypt-then-MAC with HMAC-SHA256 under the TIK
(AMD-ASPFW ``sev_channel_hmac``, ``aesctr_hmac256_encrypt``):

    CT     = AES-128-CTR(TEK, IV, PT)        (IV: the whole initial counter block, big-endian)
    MAC    = HMAC-SHA256(TIK, ctx || LE32(flags) || IV || LE32(len) || LE32(len) || CT [|| MEASURE])
    header = LE32(flags) || IV || MAC        (52 bytes; flags is always 0)

>>> from sevcore import sevpkt
>>> hdrs, ct = sevpkt.seal(tek, tik, pages, ivs)      # n packets: ivs is n * 16 bytes
>>> pt = sevpkt.open(tek, tik, hdrs, ct)              # PacketAuthError(index) on a bad MAC
>>> hdr, ct = sevpkt.seal(tek, tik, secret, iv, ctx=sevpkt.CTX_SECRET, measure=measure)

Batches run in C (csrc/sevpkt.c) with SHA-NI and the AES tier the CPU has; one call
handles any number of packets of one length.
"""
import operator

from sevcore import _bindings as _b
# The packet errors are raised by the seam (sevcore/_bindings.py REFUSALS); this module is
# where users have always found them.
from sevcore.errors import PacketAuthError, PacketError, PacketFlagsError  # noqa: F401

HDR_SIZE = _b.PKT_HDR_SIZE
IV_SIZE = _b.PKT_IV_SIZE
MAC_SIZE = _b.PKT_MAC_SIZE
MEASURE_SIZE = _b.PKT_MEASURE_SIZE
#: The firmware's limit on one packet's length ([FW] SEV_SCRATCH_BUF_LEN).
MAX_LEN = _b.PKT_MAX_LEN
#: MAC context bytes: LAUNCH_SECRET, SEND/RECEIVE_UPDATE_DATA (also used for VMSAs by the
#: firmware), and the defined but unused VMSA context.
CTX_SECRET = _b.PKT_CTX["SECRET"]
CTX_DATA = _b.PKT_CTX["DATA"]
CTX_VMSA = _b.PKT_CTX["VMSA"]
KEY_SIZE = _b.PKT_KEY_SIZE


def _ctx(ctx):
    try:
        ctx = operator.index(ctx)
    except TypeError:
        raise TypeError(f"ctx must be an int, not {type(ctx).__name__}") from None
    if not 0 <= ctx <= 255:
        raise ValueError(f"ctx must be a byte (0..255), not {ctx}")
    return ctx


def seal(tek, tik, plaintext, ivs, ctx=CTX_DATA, *, measure=None, out=None):
    """Encrypt and MAC ``len(ivs) // 16`` packets cut evenly from ``plaintext``; returns
    ``(headers, ciphertext)``.

    Mirrors the packet crypto of SEND_UPDATE_DATA (``ctx=CTX_DATA``) and of a guest owner's
    LAUNCH_SECRET (``ctx=CTX_SECRET`` with the launch ``measure``). ``out`` is None or a pair of
    writable buffers (either may be None) of ``n * 52`` and ``len(plaintext)`` bytes; the
    ciphertext buffer may be ``plaintext`` itself. Either output may also be an ``(n, 52)`` /
    ``(n, len)`` uint8 array whose rows are strided (the columns of a migration stream record),
    written in place. Raises TypeError or ValueError, before writing anything, on bad keys,
    IVs, lengths or overlapping buffers.
    """
    if out is None:
        hdrs = ct = None
    elif isinstance(out, tuple) and len(out) == 2:
        hdrs, ct = out
    else:
        raise TypeError("out must be None or a (headers, ciphertext) pair")
    return _b.sevpkt_seal(tek, tik, _ctx(ctx), measure, plaintext, ivs, hdrs, ct)


def open(tek, tik, headers, ciphertext, ctx=CTX_DATA, *, measure=None, out=None):
    """Check every packet's MAC, then decrypt them all; returns the plaintext.

    Mirrors the packet checks of RECEIVE_UPDATE_DATA (``ctx=CTX_DATA``) and LAUNCH_SECRET
    (``ctx=CTX_SECRET`` with ``measure``): packets are judged in order, MAC first (constant-time
    compare), then flags. ``headers`` and ``ciphertext`` may be ``(n, 52)`` / ``(n, len)`` uint8
    arrays with strided rows, read in place. ``out`` is None or a writable buffer of
    ``n * len`` bytes, or ``ciphertext`` itself. Raises PacketAuthError or PacketFlagsError naming the first refused
    packet, or TypeError/ValueError for bad arguments; in every case nothing is written.
    """
    return _b.sevpkt_open(tek, tik, _ctx(ctx), measure, headers, ciphertext, out)


def sha256(data):
    """SHA-256 digest (32 bytes) of a buffer."""
    return _b.sha256(data)


def hmac_sha256(key, data):
    """HMAC-SHA256 (RFC 2104) of a buffer under a key of any length."""
    return _b.hmac_sha256(key, data)


def aes128_ctr(key, iv, data, out=None):
    """AES-128-CTR of ``data`` (any length) from the 16-byte initial counter block ``iv``,
    incremented as a 128-bit big-endian integer (OpenSSL's aes-128-ctr); returns ``out``.

    ``out`` (default: a new bytearray) may be ``data`` itself; a partial overlap is a ValueError.
    """
    return _b.aes128_ctr(key, iv, data, out)


def implementation():
    """The C paths taken with the active CPU features: ``{'aes': ..., 'sha256': ...}``, AES as
    :func:`sevcore.core.memcrypt.implementation` names it ('vaes' is the avx512 tier), SHA-256
    'shani' or 'portable'."""
    aes = _b.aes128_ctr_impl()
    return {"aes": "vaes" if aes == "avx512" else aes, "sha256": _b.sha256_impl()}

