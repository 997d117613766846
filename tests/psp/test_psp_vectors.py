"""Known-answer vectors of the SEV channel cryptography (AMD-ASPFW nist_kdf.c, sev_channel.c,
sev_guest.c).

Provenance: the KDF and session vectors are virtee/sev's tests (``key.rs``, ``session()``), the
measurement vector is AMD sev-tool's readme example (and virtee's test), and the LAUNCH_SECRET and
migration-packet values are computed from the firmware's formula (sev_channel_hmac) by an
independent implementation, not hardware-validated (TEK 00..0f, TIK 10..1f, IV 20..2f, 32 zero
bytes; docs/sources.md).
"""
import hashlib

from hypothesis import given
from hypothesis import strategies as st

from sevcore.psp import crypto as X
from sevcore.psp.packets import BadPacketMac, _open_packets, _seal_packets

import pytest

TEK, TIK, IV = bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48))
MEASURE = bytes.fromhex("6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea")


def test_kdf_master_secret_vector():
    """KDF(16 zero bytes, "sev-master-secret", 16 zero bytes) is virtee's ab4d269f..."""
    assert X.kdf(bytes(16), "sev-master-secret", bytes(16), 16).hex() == \
        "ab4d269fcc62bedb4511d56c386ce706"


def test_kdf_counter_and_length_are_little_endian():
    """The KDF's counter and bit length are serialised little-endian, the label without its NUL."""
    import hmac
    want = hmac.new(b"k", (1).to_bytes(4, "little") + b"lbl\0ctx" + (256).to_bytes(4, "little"),
                    hashlib.sha256).digest()
    assert X.kdf(b"k", "lbl", b"ctx", 32) == want
    second = hmac.new(b"k", (2).to_bytes(4, "little") + b"lbl\0ctx" + (320).to_bytes(4, "little"),
                      hashlib.sha256).digest()
    assert X.kdf(b"k", "lbl", b"ctx", 40)[32:] == second[:8]


def test_session_vector():
    """A session with Z, nonce, IV, TEK, TIK all zero and policy 0 matches virtee's values."""
    s = X.make_session(X.master_secret(bytes(16), bytes(16)), bytes(16), bytes(16), bytes(16),
                       bytes(16), 0)
    assert len(s) == 128
    assert s[16:48].hex() == "2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4"
    assert s[64:96].hex() == "3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d"
    assert s[96:].hex() == "aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af"


def test_session_opens_and_refuses_a_bad_wrap_mac():
    """open_session returns TEK/TIK for its own blob and None when the wrap MAC is wrong."""
    master = X.master_secret(b"z" * 48, b"n" * 16)
    s = X.make_session(master, b"n" * 16, b"i" * 16, TEK, TIK, 0x33)
    assert X.open_session(master, s) == (TEK, TIK)
    assert X.policy_mac_ok(TIK, 0x33, s[96:]) and not X.policy_mac_ok(TIK, 0x31, s[96:])
    bad = bytearray(s)
    bad[20] ^= 1
    assert X.open_session(master, bytes(bad)) is None


def test_measurement_vector():
    """sev-tool's calc_measurement example: API 0.18 build 0x0f, policy 0, empty digest."""
    m = X.measurement(bytes.fromhex("66320db73158a35a255d051758e95ed4"), 0x00, 0x12, 0x0F, 0,
                      hashlib.sha256(b"").digest(),
                      bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554"))
    assert m == MEASURE


def test_launch_secret_vector():
    """LAUNCH_SECRET ciphertext and MAC (context 0x01, bound to MEASURE): the check values."""
    ct = X.aes128_ctr(TEK, IV, bytes(32))
    assert ct.hex() == "5be87e2e5b447c944b21c9af7756c0d84ba41c22228e38a802633ef8709fc8f7"
    mac = X.packet_mac(TIK, X.CTX_SECRET, 0, IV, 32, 32, ct, MEASURE)
    assert mac.hex() == "14d014da07d30bbfc46f6794e6c06545bcc760bdeb66dece1e47d95498a2e95a"


def test_packet_mac_vector():
    """A migration packet's MAC (context 0x02): the check value, through _seal_packets."""
    headers, ct = _seal_packets(TEK, TIK, bytes(32), IV)
    assert ct == X.aes128_ctr(TEK, IV, bytes(32))
    assert headers == bytes(4) + IV + bytes.fromhex(
        "fc67a3414b9a638a27ea1a43a24a2003ede74cfcf7fc3d761ffa11d0d590ab77")


@given(n=st.integers(1, 5), blocks=st.integers(1, 8), seed=st.binary(min_size=16, max_size=16))
def test_packets_round_trip(n, blocks, seed):
    """Sealed packets open to the same plaintext; each flipped bit is refused with its index."""
    plain = hashlib.shake_256(seed).digest(n * blocks * 16)
    ivs = hashlib.shake_256(seed + b"iv").digest(16 * n)
    headers, ct = _seal_packets(TEK, TIK, plain, ivs)
    assert _open_packets(TEK, TIK, headers, ct) == plain
    k = n - 1
    bad = bytearray(ct)
    bad[k * blocks * 16] ^= 0x80
    with pytest.raises(BadPacketMac) as exc:
        _open_packets(TEK, TIK, headers, bytes(bad))
    assert exc.value.index == k


def test_drbg_is_a_reproducible_stream():
    """The DRBG is deterministic per seed, and one large draw equals the small draws it covers."""
    a, b = X.Drbg(5), X.Drbg(5)
    assert a(48) == b(16) + b(16) + b(16)
    assert X.Drbg(6)(16) != X.Drbg(5)(16)
