"""SEV transport-packet crypto (sevcore.core.sevpkt, csrc/sevpkt.c) against the check values,
published SHA-256/HMAC/CTR vectors, OpenSSL and the reference in sevcore._reference.sevpkt, on
every implementation path."""
import errno
import pathlib
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevcore import _bindings as _b
from sevcore.core import sevpkt
from sevcore._reference import sevpkt as ref

from support.cpu_paths import SEVPKT

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"
ffi, lib = _b.ffi, _b.lib

# cpu_path: avx512+shani, avx2+shani, aesni+portable, portable+shani, portable (each AES and
# SHA-256 path)
pytestmark = pytest.mark.cpu_paths(SEVPKT)


def openssl_ctr(key, iv, data):
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(bytes(data))


# Check values computed from the firmware's formula (AMD-ASPFW sev_channel_hmac; docs/sources.md):
# TEK = 00..0f, TIK = 10..1f, IV = 20..2f, 32 zero bytes, MEASURE from sev-tool's worked example.
TEK, TIK, IV = bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48))
MEASURE = bytes.fromhex("6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea")


# --- known answers ------------------------------------------------------------------------------

def test_launch_secret_check_value(cpu_path):
    """A LAUNCH_SECRET packet (ctx 0x01, MEASURE appended) gives the check CT and MAC."""
    hdr, ct = sevpkt.seal(TEK, TIK, bytes(32), IV, ctx=sevpkt.CTX_SECRET, measure=MEASURE)
    assert bytes(ct).hex() == "5be87e2e5b447c944b21c9af7756c0d84ba41c22228e38a802633ef8709fc8f7"
    assert bytes(hdr).hex() == "00000000" + IV.hex() + (
        "14d014da07d30bbfc46f6794e6c06545bcc760bdeb66dece1e47d95498a2e95a")
    assert bytes(sevpkt.open(TEK, TIK, hdr, ct, ctx=sevpkt.CTX_SECRET, measure=MEASURE)) == \
        bytes(32)


def test_migration_packet_check_value(cpu_path):
    """A SEND_UPDATE_DATA packet (ctx 0x02) of the same bytes gives the check MAC."""
    hdr, ct = sevpkt.seal(TEK, TIK, bytes(32), IV)
    assert bytes(hdr[20:]).hex() == (
        "fc67a3414b9a638a27ea1a43a24a2003ede74cfcf7fc3d761ffa11d0d590ab77")
    assert bytes(ct).hex().startswith("5be87e2e5b447c94")


def kdf(key, label, context, nbytes):
    """AMD-ASPFW nist_kdf.c: SP 800-108 counter mode, HMAC-SHA256, little-endian counter, length."""
    out = b""
    for i in range(1, (8 * nbytes + 255) // 256 + 1):
        out += sevpkt.hmac_sha256(key, struct.pack("<I", i) + label + b"\0" + context +
                                  struct.pack("<I", 8 * nbytes))
    return out[:nbytes]


def test_spec_kdf_session_and_measurement_vectors(cpu_path):
    """HMAC and CTR reproduce virtee's KDF and session vectors and sev-tool's MEASURE."""
    master = kdf(bytes(16), b"sev-master-secret", bytes(16), 16)
    assert master.hex() == "ab4d269fcc62bedb4511d56c386ce706"
    kek, kik = kdf(master, b"sev-kek", b"", 16), kdf(master, b"sev-kik", b"", 16)
    wrap_tk = bytes(sevpkt.aes128_ctr(kek, bytes(16), bytes(32)))
    assert wrap_tk.hex() == "2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4"
    assert sevpkt.hmac_sha256(kik, wrap_tk).hex() == (
        "3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d")
    assert sevpkt.hmac_sha256(bytes(16), bytes(4)).hex() == (
        "aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af")
    measure_in = (bytes([0x04, 0x00, 0x12, 0x0f]) + bytes(4) + sevpkt.sha256(b"") +
                  bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554"))
    assert sevpkt.hmac_sha256(bytes.fromhex("66320db73158a35a255d051758e95ed4"),
                              measure_in) == MEASURE


def vectors(kind):
    out = []
    for line in (DATA / "sha256_hmac_ctr_vectors.txt").read_text().splitlines():
        if line.startswith(kind + " "):
            fields = dict(f.split("=", 1) for f in line.split()[1:])
            repeat = int(fields.pop("repeat", 1))
            vec = {k: bytes.fromhex(v) for k, v in fields.items()}
            if "msg" in vec:
                vec["msg"] *= repeat
            out.append(vec)
    assert out
    return out


def test_sha256_fips180_vectors(cpu_path):
    """SHA-256 of the FIPS 180-2 messages (and the empty one) gives the published digests."""
    for v in vectors("sha256"):
        assert sevpkt.sha256(v["msg"]) == v["md"]


def test_hmac_sha256_rfc4231_vectors(cpu_path):
    """HMAC-SHA256 gives RFC 4231 test cases 1-7, long keys hashed first."""
    for v in vectors("hmac"):
        assert sevpkt.hmac_sha256(v["key"], v["msg"])[:len(v["mac"])] == v["mac"]


def test_aes128_ctr_sp800_38a_vector(cpu_path):
    """AES-128-CTR gives SP 800-38A F.5.1, and decrypting is the same operation."""
    (v,) = vectors("ctr")
    assert bytes(sevpkt.aes128_ctr(v["key"], v["iv"], v["pt"])) == v["ct"]
    assert bytes(sevpkt.aes128_ctr(v["key"], v["iv"], v["ct"])) == v["pt"]


# --- the counter ----------------------------------------------------------------------------------

# Lengths that end in the 8-register main loop, in the single-register tail and mid-block.
CTR_LENGTHS = [16, 48, 512, 16 * 37 + 5, 4096]


@pytest.mark.parametrize("iv", [
    "ffffffffffffffffffffffffffffffff",         # the very last counter: wraps to 0 at once
    "fffffffffffffffffffffffffffffff0",         # wraps across 2^128 after 16 blocks
    "0123456789abcdefffffffffffffffff",         # carries into the high half at once
    "0123456789abcdeffffffffffffffffd",         # ... after 3 blocks (inside a register)
    "0123456789abcdeffffffffffffffff3",         # ... after 13 blocks (inside a group)
    "00000000000000000000000000000000",
], ids=["2^128-1", "2^128-16", "2^64-1", "2^64-3", "2^64-13", "zero"])
def test_ctr_counter_wraps_as_128_bit_big_endian(cpu_path, iv, rng):
    """The counter carries from the low into the high 64 bits and wraps at 2^128, as OpenSSL's."""
    iv, key = bytes.fromhex(iv), rng.bytes(16)
    for n in CTR_LENGTHS:
        data = rng.bytes(n)
        want = openssl_ctr(key, iv, data)
        assert ref.aes128_ctr(key, iv, data) == want
        assert bytes(sevpkt.aes128_ctr(key, iv, data)) == want, n


def test_ctr_wrap_inside_a_packet(cpu_path, rng):
    """A packet whose IV is 2^128 - 2 seals and opens across the wrap like the reference."""
    iv = bytes.fromhex("ff" * 15 + "fe")
    pt = rng.bytes(4096)
    hdr, ct = sevpkt.seal(TEK, TIK, pt, iv)
    assert (bytes(hdr), bytes(ct)) == ref.seal(TEK, TIK, pt, iv)
    assert bytes(sevpkt.open(TEK, TIK, hdr, ct)) == pt


# --- differential: C vs the reference --------------------------------------------------------------

iv_strategy = st.one_of(
    st.binary(min_size=16, max_size=16),
    st.tuples(st.binary(min_size=8, max_size=8), st.integers(0, 80)).map(
        lambda t: t[0] + ((1 << 64) - 1 - t[1]).to_bytes(8, "big")),
    st.integers(0, 80).map(lambda k: ((1 << 128) - 1 - k).to_bytes(16, "big")),
)


@settings(max_examples=30)
@given(key=st.binary(min_size=16, max_size=16), iv=iv_strategy, size=st.integers(0, 1100),
       seed=st.integers(0, 2**32 - 1))
def test_ctr_matches_reference(key, iv, size, seed):
    """AES-128-CTR of any length agrees with pycryptodome on every path, near-wrap IVs included."""
    data = np.random.default_rng(seed).bytes(size)
    want = ref.aes128_ctr(key, iv, data)
    for name in SEVPKT.each():
        assert bytes(sevpkt.aes128_ctr(key, iv, data)) == want, name


@settings(max_examples=30)
@given(key=st.binary(max_size=150), msg=st.binary(max_size=300))
def test_sha256_and_hmac_match_hashlib(key, msg):
    """SHA-256 and HMAC-SHA256 agree with hashlib/hmac for any key and message, on every path."""
    for name in SEVPKT.each():
        assert sevpkt.sha256(msg) == ref.sha256(msg), name
        assert sevpkt.hmac_sha256(key, msg) == ref.hmac_sha256(key, msg), name


@settings(max_examples=25)
@given(blocks=st.one_of(st.integers(1, 300), st.sampled_from([256, 0x500])),
       n=st.integers(1, 4), ctx=st.integers(0, 255), with_measure=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_seal_and_open_match_reference(blocks, n, ctx, with_measure, seed):
    """Batches of any packet length, count and context seal and open exactly as the reference."""
    rng = np.random.default_rng(seed)
    tek, tik, measure = rng.bytes(16), rng.bytes(16), rng.bytes(32) if with_measure else None
    pt, ivs = rng.bytes(n * 16 * blocks), rng.bytes(16 * n)
    want = ref.seal(tek, tik, pt, ivs, ctx, measure)
    for name in SEVPKT.each():
        hdrs, ct = sevpkt.seal(tek, tik, pt, ivs, ctx, measure=measure)
        assert (bytes(hdrs), bytes(ct)) == want, name
        assert bytes(sevpkt.open(tek, tik, hdrs, ct, ctx, measure=measure)) == pt, name


def test_long_batch_equals_one_packet_calls(cpu_path, rng):
    """A batch of 67 pages (odd, so one packet is hashed alone) equals 67 one-packet calls."""
    n = 67
    pt, ivs = rng.bytes(n * 4096), rng.bytes(16 * n)
    hdrs, ct = sevpkt.seal(TEK, TIK, pt, ivs)
    for i in range(n):
        h, c = sevpkt.seal(TEK, TIK, pt[4096 * i:4096 * (i + 1)], ivs[16 * i:16 * (i + 1)])
        assert bytes(h) == bytes(hdrs[52 * i:52 * (i + 1)])
        assert bytes(c) == bytes(ct[4096 * i:4096 * (i + 1)])
    assert bytes(sevpkt.open(TEK, TIK, hdrs, ct)) == pt


def test_largest_packet_and_numpy_inputs(cpu_path, rng):
    """A 0x5000-byte packet is accepted, and 2-D numpy plaintext and IV arrays work uncopied."""
    pt = rng.integers(0, 256, (3, sevpkt.MAX_LEN), dtype=np.uint8)
    ivs = rng.integers(0, 256, (3, 16), dtype=np.uint8)
    hdrs, ct = sevpkt.seal(TEK, TIK, pt, ivs)
    assert (bytes(hdrs), bytes(ct)) == ref.seal(TEK, TIK, pt.tobytes(), ivs.tobytes())
    out = np.empty_like(pt)
    assert sevpkt.open(TEK, TIK, hdrs, ct, out=out) is out
    assert np.array_equal(out, pt)


def test_in_place_seal_and_open(cpu_path, rng):
    """The ciphertext may be the plaintext buffer (seal) and the plaintext the ciphertext (open)."""
    plain = rng.bytes(4 * 4096)
    ivs = rng.bytes(64)
    buf = bytearray(plain)
    hdrs = bytearray(4 * 52)
    assert sevpkt.seal(TEK, TIK, buf, ivs, out=(hdrs, buf)) == (hdrs, buf)
    assert (bytes(hdrs), bytes(buf)) == ref.seal(TEK, TIK, plain, ivs)
    assert sevpkt.open(TEK, TIK, hdrs, buf, out=buf) is buf
    assert bytes(buf) == plain
    data = bytearray(plain[:100])
    assert sevpkt.aes128_ctr(TEK, IV, data, out=data) is data
    assert bytes(data) == ref.aes128_ctr(TEK, IV, plain[:100])


def table(n, size, gap=8, seed=0):
    """An interleaved record table: per row ``gap`` bytes, a header, 4 bytes, a packet; returns
    the table and its (n, 52) and (n, size) column views (strided, not contiguous)."""
    stride = gap + 52 + 4 + size
    t = np.full((n, stride), SENT, np.uint8)
    return t, t[:, gap:gap + 52], t[:, gap + 56:gap + 56 + size]


@settings(max_examples=20)
@given(blocks=st.integers(1, 64), n=st.integers(1, 5), gap=st.integers(0, 40),
       seed=st.integers(0, 2**32 - 1))
def test_strided_rows_equal_contiguous(blocks, n, gap, seed):
    """Sealing into the interleaved columns of a table writes the very packets a contiguous call
    does and leaves the other bytes alone; opening from them gives the plaintext back."""
    rng = np.random.default_rng(seed)
    tek, tik = rng.bytes(16), rng.bytes(16)
    pt, ivs = rng.bytes(n * 16 * blocks), rng.bytes(16 * n)
    want = ref.seal(tek, tik, pt, ivs, sevpkt.CTX_DATA, None)
    for name in SEVPKT.each():
        t, h, c = table(n, 16 * blocks, gap)
        assert sevpkt.seal(tek, tik, pt, ivs, out=(h, c)) == (h, c)
        assert (h.tobytes(), c.tobytes()) == want, name
        assert not np.any(t[:, :gap] != SENT) and not np.any(t[:, gap + 52:gap + 56] != SENT)
        assert bytes(sevpkt.open(tek, tik, h, c)) == pt, name


def test_strided_rows_refusals_name_the_packet(cpu_path, rng):
    """A bad MAC in strided rows is refused at its index; so is COMPRESSED (with a valid MAC
    over the flags), its flags reported."""
    pt, ivs = rng.bytes(3 * 64), rng.bytes(48)
    t, h, c = table(3, 64)
    sevpkt.seal(TEK, TIK, pt, ivs, out=(h, c))
    c[1, 7] ^= 1
    with pytest.raises(sevpkt.PacketAuthError) as e:
        sevpkt.open(TEK, TIK, h, c)
    assert e.value.index == 1
    c[1, 7] ^= 1
    hdrs, ct = sevpkt.seal(TEK, TIK, pt, ivs)
    h[:] = np.frombuffer(hdrs, np.uint8).reshape(3, 52)
    h[2, 0] |= 1
    h[2, 20:] = np.frombuffer(ref.packet_mac(TIK, sevpkt.CTX_DATA, 1, h[2, 4:20].tobytes(),
                                             c[2].tobytes()), np.uint8)
    with pytest.raises(sevpkt.PacketFlagsError) as e:
        sevpkt.open(TEK, TIK, h, c)
    assert (e.value.index, e.value.flags) == (2, 1)


def test_strided_rows_bad_shapes_and_overlaps():
    """Strided rows of the wrong shape, overlapping rows, a read-only output or outputs that
    meet the inputs are refused before anything is written."""
    t, h, c = table(2, 64)
    pt, ivs = bytes(128), bytes(32)
    with pytest.raises(ValueError, match="rows"):
        sevpkt.seal(TEK, TIK, pt, ivs, out=(t[:, :52], t[:, 60:124][:, ::2]))
    with pytest.raises(ValueError, match="52-byte"):
        sevpkt.open(TEK, TIK, h[:, :51], c)
    view = np.lib.stride_tricks.as_strided(c, c.shape, c.strides, writeable=False)
    with pytest.raises(TypeError, match="writable"):
        sevpkt.seal(TEK, TIK, pt, ivs, out=(h, view))
    with pytest.raises(ValueError, match="overlap"):
        sevpkt.seal(TEK, TIK, pt, ivs, out=(t[:, 0:52], t[:, 40:104]))
    with pytest.raises(ValueError, match="overlap"):
        sevpkt.open(TEK, TIK, h, c, out=t.reshape(-1)[:128])
    assert not np.any(t != SENT)


def test_raw_rows_overlap_is_exact_for_one_stride():
    """sc_sevpkt_seal_rows accepts interleaved header and ciphertext rows of one stride, and
    refuses rows that meet, strides below the row length, and in place with a stride, saying
    which."""
    buf = z(4 * 200)
    pt = bytes(2 * 64)
    err = ffi.new("struct sc_err *")

    def rows(h_off, h_stride, c_off, c_stride, src=pt):
        rc = lib.sc_sevpkt_seal_rows(TEK, TIK, 2, ffi.NULL, src, 64, 2, IV * 2, buf + h_off,
                                     h_stride, buf + c_off, c_stride, err)
        return rc, (err.reason if rc else 0)
    EINVAL = -errno.EINVAL
    assert rows(0, 200, 60, 200) == (0, 0)
    assert rows(136, 200, 0, 200) == (0, 0)              # header after the packet in each row
    assert rows(0, 200, 51, 200) == (EINVAL, lib.SC_ERR_PKT_HDRS_OVERLAP)   # meets the header
    # runs into the next row's header
    assert rows(0, 200, 180, 200) == (EINVAL, lib.SC_ERR_PKT_HDRS_OVERLAP)
    assert rows(0, 51, 200, 200) == (EINVAL, lib.SC_ERR_PKT_STRIDE)  # header stride below 52
    # ciphertext stride below its length
    assert rows(0, 200, 60, 63) == (EINVAL, lib.SC_ERR_PKT_STRIDE)
    # in place, strided
    assert rows(0, 200, 300, 100, src=buf + 300) == (EINVAL, lib.SC_ERR_PKT_CT_OVERLAP)


def test_empty_batch_is_a_no_op():
    """No IVs and no plaintext (or no headers and no ciphertext) is valid and returns empties."""
    assert sevpkt.seal(TEK, TIK, b"", b"") == (bytearray(), bytearray())
    assert sevpkt.open(TEK, TIK, b"", b"") == bytearray()


# --- open() refuses tampering, writing nothing ------------------------------------------------------

SENT = 0xA5


def sealed(n=4, size=32, ctx=sevpkt.CTX_DATA, measure=None):
    pt = bytes(range(256)) * (n * size // 256) + bytes(n * size % 256)
    ivs = bytes(range(100, 100 + 16 * n))
    hdrs, ct = sevpkt.seal(TEK, TIK, pt, ivs, ctx, measure=measure)
    return bytearray(hdrs), bytearray(ct), pt


def refused(hdrs, ct, exc, index, **kw):
    """open() raises exc for packet index and leaves out as it was."""
    out = bytearray([SENT]) * len(ct)
    with pytest.raises(exc) as info:
        sevpkt.open(TEK, TIK, hdrs, ct, out=out, **kw)
    assert info.value.index == index
    assert out == bytearray([SENT]) * len(ct)
    return info.value


@pytest.mark.parametrize("field,start,stop", [
    ("flags", 0, 4), ("iv", 4, 20), ("mac", 20, 52)])
def test_every_flipped_header_bit_is_refused(cpu_path, field, start, stop):
    """Flipping any bit of a packet's flags, IV or MAC fails its MAC (EBADMSG) with nothing
    written."""
    hdrs, ct, _ = sealed()
    for bit in range(8 * start, 8 * stop):
        bad = bytearray(hdrs)
        bad[52 * 2 + bit // 8] ^= 1 << (bit % 8)
        err = refused(bad, ct, sevpkt.PacketAuthError, 2)
        assert err.errno == errno.EBADMSG


def test_every_flipped_ciphertext_bit_is_refused(cpu_path):
    """Flipping any bit of a packet's ciphertext fails its MAC with nothing written."""
    hdrs, ct, _ = sealed()
    for bit in range(8 * 32):
        bad = bytearray(ct)
        bad[32 * 3 + bit // 8] ^= 1 << (bit % 8)
        refused(hdrs, bad, sevpkt.PacketAuthError, 3)


@pytest.mark.parametrize("guest_len,trans_len", [(48, 32), (32, 48), (32 ^ 0x100, 32),
                                                 (32, 32 | 1 << 31)])
def test_mac_over_other_aad_lengths_is_refused(cpu_path, guest_len, trans_len):
    """A MAC computed with either AAD length differing from the packet's length is refused."""
    hdrs, ct, _ = sealed()
    iv = bytes(hdrs[52 + 4:52 + 20])
    hdrs[52 + 20:52 * 2] = ref.packet_mac(TIK, sevpkt.CTX_DATA, 0, iv, ct[32:64],
                                          guest_len=guest_len, trans_len=trans_len)
    refused(hdrs, ct, sevpkt.PacketAuthError, 1)


def test_repacked_lengths_are_refused(cpu_path):
    """Two 32-byte packets presented as one 64-byte packet (AAD lengths change) are refused."""
    hdrs, ct, _ = sealed(n=2)
    refused(hdrs[:52], ct, sevpkt.PacketAuthError, 0)


def test_wrong_context_key_or_measure_is_refused(cpu_path):
    """Opening with another ctx, TIK or MEASURE than the packet was sealed with fails its MAC."""
    hdrs, ct, _ = sealed(ctx=sevpkt.CTX_SECRET, measure=MEASURE)
    refused(hdrs, ct, sevpkt.PacketAuthError, 0, ctx=sevpkt.CTX_DATA, measure=MEASURE)
    refused(hdrs, ct, sevpkt.PacketAuthError, 0, ctx=sevpkt.CTX_SECRET)
    refused(hdrs, ct, sevpkt.PacketAuthError, 0, ctx=sevpkt.CTX_SECRET,
            measure=bytes(31) + b"\1")
    out = bytearray(len(ct))
    with pytest.raises(sevpkt.PacketAuthError):
        sevpkt.open(TEK, bytes(16), hdrs, ct, sevpkt.CTX_SECRET, measure=MEASURE, out=out)
    assert not any(out)


def test_first_bad_packet_is_named(cpu_path):
    """With packets 1 and 3 tampered, the error names packet 1."""
    hdrs, ct, _ = sealed()
    ct[32 * 1] ^= 1
    ct[32 * 3] ^= 1
    refused(hdrs, ct, sevpkt.PacketAuthError, 1)


def test_compressed_flag_with_a_valid_mac_is_refused(cpu_path):
    """A packet whose MAC covers COMPRESSED is refused with EOPNOTSUPP; other flag bits under a
    valid MAC open, as the firmware ignores them."""
    hdrs, ct, pt = sealed()
    for flags in (2, 1 << 31):
        ok = bytearray(hdrs)
        iv = bytes(ok[52 * 2 + 4:52 * 2 + 20])
        ok[52 * 2:52 * 2 + 4] = struct.pack("<I", flags)
        ok[52 * 2 + 20:52 * 3] = ref.packet_mac(TIK, sevpkt.CTX_DATA, flags, iv, ct[64:96])
        assert bytes(sevpkt.open(TEK, TIK, ok, ct)) == bytes(pt)
        assert ref.open_packets(TEK, TIK, ok, ct) == bytes(pt)
    for flags in (1, 3, 1 << 31 | 1):
        bad = bytearray(hdrs)
        iv = bytes(bad[52 * 2 + 4:52 * 2 + 20])
        bad[52 * 2:52 * 2 + 4] = struct.pack("<I", flags)
        bad[52 * 2 + 20:52 * 3] = ref.packet_mac(TIK, sevpkt.CTX_DATA, flags, iv, ct[64:96])
        err = refused(bad, ct, sevpkt.PacketFlagsError, 2)
        assert err.errno == errno.EOPNOTSUPP and err.flags == flags
        with pytest.raises(ref.BadPacket, match="flags"):
            ref.open_packets(TEK, TIK, bad, ct)


def test_packets_are_judged_in_order_mac_before_flags(cpu_path):
    """Packet 0 with valid MAC but flags set is named before a bad MAC in packet 1."""
    hdrs, ct, _ = sealed()
    iv = bytes(hdrs[4:20])
    hdrs[0:4] = struct.pack("<I", 1)
    hdrs[20:52] = ref.packet_mac(TIK, sevpkt.CTX_DATA, 1, iv, ct[:32])
    ct[32] ^= 1
    refused(hdrs, ct, sevpkt.PacketFlagsError, 0)


def test_packets_are_not_bound_to_their_position(cpu_path):
    """Swapped packets open (the firmware binds no address or sequence number,
    AMD-ASPFW sev_mcmd_receive_update)."""
    hdrs, ct, pt = sealed(n=2)
    swapped_h, swapped_c = hdrs[52:] + hdrs[:52], ct[32:] + ct[:32]
    assert bytes(sevpkt.open(TEK, TIK, swapped_h, swapped_c)) == pt[32:] + pt[:32]


# --- bad arguments: a clear error and nothing written -----------------------------------------------

P = bytes(64)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((bytes(15), TIK, P, IV), {}, ValueError, "tek must be 16 bytes"),
    ((TEK, bytes(17), P, IV), {}, ValueError, "tik must be 16 bytes"),
    (("0123456789abcdef", TIK, P, IV), {}, TypeError, "tek must be a buffer"),
    ((TEK, TIK, P, bytes(15)), {}, ValueError, "whole 16-byte IVs"),
    ((TEK, TIK, bytes(40), bytes(48)), {}, ValueError, "not 3 packets"),
    ((TEK, TIK, bytes(40), bytes(32)), {}, ValueError, "multiple of 16"),
    ((TEK, TIK, bytes(0x5010), IV), {}, ValueError, "at most 0x5000"),
    ((TEK, TIK, b"", IV), {}, ValueError, "non-zero"),
    ((TEK, TIK, P, b""), {}, ValueError, "no IVs"),
    ((TEK, TIK, P, IV, 256), {}, ValueError, "ctx"),
    ((TEK, TIK, P, IV, "2"), {}, TypeError, "ctx"),
    ((TEK, TIK, P, IV), dict(measure=bytes(31)), ValueError, "measure must be 32"),
    ((TEK, TIK, P, IV), dict(out=(bytearray(51), None)), ValueError, "headers out must be 52"),
    ((TEK, TIK, P, IV), dict(out=(None, bytearray(63))), ValueError, "ciphertext out"),
    ((TEK, TIK, P, IV), dict(out=bytearray(116)), TypeError, "pair"),
    ((TEK, TIK, P, IV), dict(out=(bytes(52), None)), TypeError, "writable"),
    ((TEK, TIK, [0] * 64, IV), {}, TypeError, "plaintext must be a buffer"),
])
def test_bad_seal_arguments(args, kwargs, exc, match):
    """Bad keys, IVs, lengths, contexts, measures and outputs raise before anything is written."""
    hdrs, ct = bytearray([SENT]) * 52, bytearray([SENT]) * 64
    kwargs.setdefault("out", (hdrs, ct))
    with pytest.raises(exc, match=match):
        sevpkt.seal(*args, **kwargs)
    assert hdrs == bytearray([SENT]) * 52 and ct == bytearray([SENT]) * 64


@pytest.mark.parametrize("args,exc,match", [
    ((TEK, TIK, bytes(51), P), ValueError, "whole 52-byte headers"),
    ((TEK, TIK, bytes(104), P[:33]), ValueError, "not 2 packets"),
    ((TEK, TIK, bytes(52), bytes(0x5010)), ValueError, "at most"),
    ((TEK, TIK, b"", P), ValueError, "no headers"),
    ((TEK, TIK, bytes(52), P, 2, None, bytearray(63)), ValueError, "out must be 64"),
])
def test_bad_open_arguments(args, exc, match):
    """Bad header and ciphertext sizes and a wrong-sized out raise ValueError."""
    names = ("tek", "tik", "headers", "ciphertext", "ctx", "measure", "out")
    kwargs = dict(zip(names, args))
    kwargs.setdefault("out", None)
    with pytest.raises(exc, match=match):
        sevpkt.open(**kwargs)


def test_overlapping_outputs_are_refused():
    """Headers or ciphertext written over the inputs (other than in place) raise ValueError."""
    buf = bytearray([SENT]) * 256
    view = memoryview(buf)
    with pytest.raises(ValueError, match="overlap"):
        sevpkt.seal(TEK, TIK, view[:64], IV, out=(bytearray(52), view[16:80]))
    with pytest.raises(ValueError, match="overlap"):
        sevpkt.seal(TEK, TIK, view[:64], IV, out=(view[60:112], bytearray(64)))
    with pytest.raises(ValueError, match="overlap"):
        sevpkt.seal(TEK, TIK, bytes(64), view[:16], out=(bytearray(52), view[8:72]))
    with pytest.raises(ValueError, match="overlap"):
        sevpkt.open(TEK, TIK, view[:52], view[64:128], out=view[32:96])
    with pytest.raises(ValueError, match="overlap"):
        sevpkt.aes128_ctr(TEK, IV, view[:64], out=view[1:65])
    assert buf == bytearray([SENT]) * 256


def z(n):
    return ffi.new("uint8_t[]", n)


def raw_seal(tek=TEK, tik=TIK, ctx=2, measure=ffi.NULL, pt=P, size=32, n=2, ivs=IV * 2,
             hdrs="new", ct="new", err=ffi.NULL):
    hdrs = z(104) if hdrs == "new" else hdrs
    ct = z(64) if ct == "new" else ct
    return lib.sc_sevpkt_seal(tek, tik, ctx, measure, pt, size, n, ivs, hdrs, ct, err)


def raw_open(tek=TEK, tik=TIK, ctx=2, measure=ffi.NULL, hdrs=bytes(104), ct=P, size=32, n=2,
             pt="new", err=ffi.NULL):
    pt = z(64) if pt == "new" else pt
    return lib.sc_sevpkt_open(tek, tik, ctx, measure, hdrs, ct, size, n, pt, err)


_BUF = z(4096)
_HUGE_N = (1 << 64) // sevpkt.MAX_LEN + 1


@pytest.mark.parametrize("call,kwargs,reason", [
    (raw_seal, dict(tek=ffi.NULL), "NULL"), (raw_seal, dict(tik=ffi.NULL), "NULL"),
    (raw_seal, dict(pt=ffi.NULL), "NULL"), (raw_seal, dict(ivs=ffi.NULL), "NULL"),
    (raw_seal, dict(hdrs=ffi.NULL), "NULL"), (raw_seal, dict(ct=ffi.NULL), "NULL"),
    (raw_seal, dict(size=0), "PKT_LEN"), (raw_seal, dict(size=8), "PKT_LEN"),
    (raw_seal, dict(size=0x5010), "PKT_LEN"), (raw_seal, dict(size=0, n=0), "PKT_LEN"),
    (raw_seal, dict(n=_HUGE_N), "PKT_COUNT"),
    (raw_seal, dict(pt=_BUF, ct=_BUF + 16), "PKT_CT_OVERLAP"),
    (raw_seal, dict(pt=_BUF + 16, ct=_BUF), "PKT_CT_OVERLAP"),
    (raw_seal, dict(ct=_BUF, hdrs=_BUF + 63), "PKT_HDRS_OVERLAP"),
    (raw_seal, dict(pt=_BUF, hdrs=_BUF + 60), "PKT_HDRS_OVERLAP"),
    (raw_seal, dict(ivs=_BUF, hdrs=_BUF + 31), "PKT_HDRS_OVERLAP"),
    (raw_seal, dict(ivs=_BUF, ct=_BUF + 31), "PKT_IVS_OVERLAP"),
    (raw_open, dict(tek=ffi.NULL), "NULL"), (raw_open, dict(tik=ffi.NULL), "NULL"),
    (raw_open, dict(hdrs=ffi.NULL), "NULL"), (raw_open, dict(ct=ffi.NULL), "NULL"),
    (raw_open, dict(pt=ffi.NULL), "NULL"),
    (raw_open, dict(size=0), "PKT_LEN"), (raw_open, dict(size=24), "PKT_LEN"),
    (raw_open, dict(size=0x5010), "PKT_LEN"), (raw_open, dict(n=_HUGE_N), "PKT_COUNT"),
    (raw_open, dict(ct=_BUF, pt=_BUF + 16), "PKT_CT_OVERLAP"),
    (raw_open, dict(hdrs=_BUF, pt=_BUF + 100), "PKT_PT_OVERLAP"),
])
def test_raw_bad_arguments_return_einval(call, kwargs, reason):
    """sc_sevpkt_seal/open return -EINVAL for NULLs, bad lengths, overflowing counts and
    overlaps, with the reason, before writing."""
    ffi.memmove(_BUF, bytes([SENT]) * 4096, 4096)
    err = ffi.new("struct sc_err *")
    assert call(**kwargs, err=err) == -errno.EINVAL
    assert err.reason == getattr(lib, "SC_ERR_" + reason)
    assert ffi.buffer(_BUF)[:] == bytes([SENT]) * 4096
    assert call(**kwargs) == -errno.EINVAL          # err may be NULL


def test_raw_primitives_check_their_arguments():
    """The one-shot primitives refuse NULL outputs and NULL inputs of non-zero length."""
    d = z(32)
    err = ffi.new("struct sc_err *")
    assert lib.sc_sha256(ffi.NULL, 0, d) == 0
    assert lib.sc_sha256(ffi.NULL, 1, d) == -errno.EINVAL
    assert lib.sc_sha256(b"x", 1, ffi.NULL) == -errno.EINVAL
    assert lib.sc_hmac_sha256(ffi.NULL, 0, ffi.NULL, 0, d) == 0
    assert lib.sc_hmac_sha256(ffi.NULL, 1, b"", 0, d) == -errno.EINVAL
    assert lib.sc_hmac_sha256(b"k", 1, ffi.NULL, 1, d) == -errno.EINVAL
    assert lib.sc_hmac_sha256(b"k", 1, b"m", 1, ffi.NULL) == -errno.EINVAL
    assert lib.sc_aes128_ctr(TEK, IV, ffi.NULL, 0, ffi.NULL, ffi.NULL) == 0
    assert lib.sc_aes128_ctr(ffi.NULL, IV, P, 16, d, ffi.NULL) == -errno.EINVAL
    assert lib.sc_aes128_ctr(TEK, ffi.NULL, P, 16, d, ffi.NULL) == -errno.EINVAL
    assert lib.sc_aes128_ctr(TEK, IV, P, 16, ffi.NULL, err) == -errno.EINVAL
    assert err.reason == lib.SC_ERR_NULL
    assert lib.sc_aes128_ctr(TEK, IV, d + 1, 16, d, err) == -errno.EINVAL
    assert err.reason == lib.SC_ERR_CTR_OVERLAP


def test_raw_open_reports_the_bad_index_and_accepts_null(cpu_path):
    """sc_sevpkt_open names the refused packet's index (and COMPRESSED's flags), and works
    without an sc_err."""
    hdrs, ct, _ = sealed(n=3)
    ct[32 * 2 + 5] ^= 0x80
    err = ffi.new("struct sc_err *", {"index": 99})
    assert raw_open(hdrs=bytes(hdrs), ct=bytes(ct), n=3, pt=z(96), err=err) == -errno.EBADMSG
    assert (err.reason, err.index) == (lib.SC_ERR_PKT_MAC, 2)
    assert raw_open(hdrs=bytes(hdrs), ct=bytes(ct), n=3, pt=z(96)) == -errno.EBADMSG
