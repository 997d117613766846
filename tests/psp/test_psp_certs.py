"""A platform's certificate chain: what PDH_CERT_EXPORT and the simulated KDS hand out, ownership
(PEK_CSR, PEK_CERT_IMPORT), and the guest owner's chain check, cross-checked with OpenSSL."""
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sevcore.vmm import owner
from sevcore import uapi as U
from sevcore.vmm.owner import CertChainError
from sevcore.psp import PspError
from sevcore.psp import certs as C
from sevcore.psp import layout as L

from support.psp import _Rng, blob, raw, ready, snapshot

OK = U.SEV_RET_SUCCESS


def openssl_ec(cert):
    point = C.ec_point_of(C.pubkey_of(cert)).pointQ
    return ec.EllipticCurvePublicNumbers(int(point.x), int(point.y),
                                         ec.SECP384R1()).public_key()


def openssl_check(child, parent_cert=None, slot=1, rsa_parent=None):
    """Verify ``child``'s signature ``slot`` with OpenSSL (through cryptography)."""
    _, algo, value = C.sig_slot(child, slot)
    body = bytes(child[:C.BODY_SIZE])
    if rsa_parent is not None:
        rsa_parent.verify(value[:512][::-1], body, padding.PSS(
            mgf=padding.MGF1(hashes.SHA384()), salt_length=padding.PSS.AUTO), hashes.SHA384())
        return
    r = int.from_bytes(value[:72], "little")
    s = int.from_bytes(value[72:144], "little")
    openssl_ec(parent_cert).verify(encode_dss_signature(r, s), body, ec.ECDSA(hashes.SHA256()))


def test_exported_chain_is_valid_and_verifies_with_openssl():
    """PDH <- PEK <- (OCA, CEK) <- ASK <- ARK: every link checks with the firmware's rules, with
    the guest owner's tool and with OpenSSL."""
    host = ready()
    chain = host.psp.export_cert_chain()
    owner.verify_cert_chain(chain)
    assert [C.key_usage(C.pubkey_of(c)) for c in (chain.pdh, chain.pek, chain.oca, chain.cek)] \
        == [C.USAGE_PDH, C.USAGE_PEK, C.USAGE_OCA, C.USAGE_CEK]
    assert [C.sig_slot(chain.pek, i)[0] for i in (1, 2)] == [C.USAGE_OCA, C.USAGE_CEK]
    openssl_check(chain.pdh, chain.pek)
    openssl_check(chain.pek, chain.oca, 1)
    openssl_check(chain.pek, chain.cek, 2)
    openssl_check(chain.oca, chain.oca)
    ask = C.AmdCert(chain.ask)
    openssl_check(chain.cek, rsa_parent=rsa.RSAPublicNumbers(
        int.from_bytes(ask.pubexp, "little"), int.from_bytes(ask.modulus, "little")).public_key())
    assert chain.pek[4:6] == bytes([1, 55])                     # the firmware's API version


def test_pdh_cert_export_cek_is_unsigned_and_kds_cek_is_stable():
    """PDH_CERT_EXPORT's CEK carries no signature (get the signed one from AMD's KDS); the CEK is
    derived from the chip, so two hosts differ and one host always gives the same."""
    a, b = ready(seed=1), ready(seed=2)
    exp = a.psp.pdh_cert_export()
    assert C.sig_slot(exp.cek_cert, 1)[:2] == (C.USAGE_INVALID, C.ALGO_INVALID)
    assert a.psp.cek_cert()[:C.BODY_SIZE] == exp.cek_cert[:C.BODY_SIZE]
    assert C.pubkey_of(a.psp.cek_cert()) != C.pubkey_of(b.psp.cek_cert())


def test_owner_chain_check_names_the_broken_link():
    """verify_cert_chain raises CertChainError naming the first certificate that fails."""
    host, other = ready(seed=3), ready(seed=4)
    good, alien = host.psp.export_cert_chain(), other.psp.export_cert_chain()
    unsigned = host.psp.pdh_cert_export().cek_cert
    bad_ark = bytearray(good.ark)
    bad_ark[100] ^= 1
    for kw, which, status in [(dict(pdh=alien.pdh), "PDH", U.SEV_RET_BAD_SIGNATURE),
                              (dict(cek=unsigned), "CEK", U.SEV_RET_INVALID_CERTIFICATE),
                              (dict(oca=alien.oca), "PEK", U.SEV_RET_BAD_SIGNATURE),
                              (dict(ark=bytes(bad_ark)), "ARK", U.SEV_RET_BAD_SIGNATURE)]:
        fields = dict(good.__dict__)
        fields.update(kw)
        with pytest.raises(CertChainError) as exc:
            owner.verify_cert_chain(type(good)(**fields))
        assert (exc.value.which, exc.value.fw_error) == (which, status), kw
    with pytest.raises(CertChainError):
        owner.verify_cert_chain(good, ark_key_id=bytes(16))


def test_truncated_certificates_are_refused_not_crashed_on():
    """An AMD certificate shorter than its fixed part is ValueError, so an owner chain check
    with an empty ASK or ARK is CertChainError; a SEV public key too short to hold a P-384
    point has none."""
    good = ready(seed=3).psp.export_cert_chain()
    for n in (0, 1, C.AMD_FIXED.size - 1):
        with pytest.raises(ValueError, match="fixed part"):
            C.AmdCert(good.ask[:n])
    for kw in (dict(ask=b""), dict(ark=good.ark[:10])):
        fields = dict(good.__dict__)
        fields.update(kw)
        with pytest.raises(CertChainError) as exc:
            owner.verify_cert_chain(type(good)(**fields))
        assert (exc.value.which, exc.value.status) == ("ARK/ASK", U.SEV_RET_INVALID_CERTIFICATE)
    key = C.pubkey_of(good.pdh)
    assert C.ec_point_of(key) is not None
    assert all(C.ec_point_of(key[:n]) is None for n in (0, 11, 12, 12 + 2 * C.EC_COORD - 1))


def test_take_ownership_with_pek_cert_import():
    """PEK_CSR -> owner signs with its OCA -> PEK_CERT_IMPORT: the platform is externally owned,
    the PEK carries the owner's OCA and the firmware's CEK signatures, the PDH is new; a second
    import is ALREADY_OWNED; PEK_GEN returns to self-owned."""
    host = ready()
    psp = host.psp
    before = psp.pdh_cert_export()
    csr = psp.pek_csr()
    assert csr[:C.BODY_SIZE] == before.pek_cert[:C.BODY_SIZE]
    assert C.sig_slot(csr, 1)[0] == C.sig_slot(csr, 2)[0] == C.USAGE_INVALID
    key, oca = owner.new_oca(_Rng(b"owner oca"))
    psp.pek_cert_import(owner.sign_pek_csr(csr, key), oca)
    after = psp.export_cert_chain()
    assert psp.platform_status().owner == 1
    assert after.oca == oca and after.pdh != before.pdh_cert
    assert [C.sig_slot(after.pek, i)[0] for i in (1, 2)] == [C.USAGE_OCA, C.USAGE_CEK]
    owner.verify_cert_chain(after)
    with pytest.raises(PspError) as exc:
        psp.pek_cert_import(owner.sign_pek_csr(psp.pek_csr(), key), oca)
    assert exc.value.fw_error == U.SEV_RET_ALREADY_OWNED
    psp.pek_gen()
    assert psp.platform_status().owner == 0 and psp.pdh_cert_export().oca_cert != oca


def test_pek_cert_import_refusals_change_nothing():
    """PEK_CERT_IMPORT: wrong lengths, an OCA that is not self-signed, a PEK not signed by that
    OCA, a PEK that is not this platform's -- refused, ownership and keys unchanged."""
    host = ready()
    psp = host.psp
    key, oca = owner.new_oca(_Rng(b"k1"))
    key2, oca2 = owner.new_oca(_Rng(b"k2"))
    signed = owner.sign_pek_csr(psp.pek_csr(), key)
    foreign = owner.sign_pek_csr(ready(seed=9).psp.pek_csr(), key)
    oca_unsigned = bytearray(oca)
    oca_unsigned[C.SIG1:C.SIG1 + 8] = bytes(8)
    oca_unsigned[C.SIG1:C.SIG1 + 4] = C.USAGE_INVALID.to_bytes(4, "little")

    def f(pek=signed, o=oca, **kw):
        base = dict(pek_cert_address=blob(host, pek), pek_cert_len=len(pek),
                    oca_cert_address=blob(host, o), oca_cert_len=len(o))
        base.update(kw)
        return base

    cases = [(f(pek_cert_len=2083), U.SEV_RET_INVALID_LEN),
             (f(oca_cert_len=4096), U.SEV_RET_INVALID_LEN),
             (f(o=bytes(oca_unsigned)), U.SEV_RET_INVALID_CERTIFICATE),
             (f(o=oca2), U.SEV_RET_BAD_SIGNATURE),
             (f(pek=foreign), U.SEV_RET_INVALID_CERTIFICATE)]
    before = snapshot(host)
    identity = psp.pdh_cert_export()
    for fields, want in cases:
        assert raw(host, U.SEV_CMD_PEK_CERT_IMPORT, L.sev_data_pek_cert_import,
                   **fields)[0] == want, fields
    assert snapshot(host) == before and psp.pdh_cert_export() == identity
    assert psp.platform_status().owner == 0
    del key2
