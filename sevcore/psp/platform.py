"""The platform half of the firmware: identity (CEK, OCA, PEK, PDH), persistent storage, the
platform state machine, ASID bookkeeping and the platform commands.

Sources: AMD-ASPFW ``sev_mcmd.c`` (``sev_mcmd_init_common``, ``sev_mcmd_pek_*``,
``sev_mcmd_pdh_*``, ``mcmd_df_flush_common``, ``sev_mcmd_get_id``), ``sev_plat.c``
(``sev_pek_generate``: OCA signs first, then the CEK; ``sev_cek_derive``; ``sev_get_id``),
``sev_es.c`` (TMR reservation); AMD SEV API #55766, "Platform Management API".
"""
import hashlib
import struct

from Crypto.Cipher import AES

from sevcore import uapi as U
from sevcore.psp import certs as C
from sevcore.psp.crypto import kdf, p384_key, scalar_from, seed_bytes, secp256k1_public

UNINIT, INIT, WORKING = U.SEV_STATE_UNINIT, U.SEV_STATE_INIT, U.SEV_STATE_WORKING

#: ASID states (one CCX group: the firmware keeps them per CCX; KVM flushes all CPUs at once).
CLEAN, DIRTY, ALLOCATED, IN_USE = 1, 2, 3, 4

CONFIG_ES = 1 << 0                  # PLATFORM_STATUS config flags bit 0 / INIT flags bit 0
TMR_SIZE = 1 << 20                  # SEV_ES_TMR_SIZE (no SNP)
NV_LEN = 32 * 1024                  # SEV_INIT_EX_NV_LEN
INIT_EX_LEN = 0x24
ID_SIZE = 64                        # get_id_t: x[32] || y[32] per socket
_NV_MAGIC = b"SEVPSTOR"
_EC_BYTES = 48


class Identity:
    """The platform's keys and certificates; OCA/PEK/PDH persist (SPI or the INIT_EX NV area)."""

    __slots__ = ("oca", "oca_cert", "pek", "pek_cert", "pdh", "pdh_cert", "ext_owned")

    def __init__(self):
        self.oca = self.oca_cert = self.pek = self.pek_cert = self.pdh = self.pdh_cert = None
        self.ext_owned = False

    def copy(self):
        new = Identity()
        for name in self.__slots__:
            v = getattr(self, name)
            setattr(new, name, bytearray(v) if isinstance(v, bytearray) else v)
        return new


class PlatformCommands:
    """Mixin of Psp: platform state, identity and platform commands."""

    # -- identity ---------------------------------------------------------------------------------

    def _chip_unique_key(self):
        """The CUK: a chip-unique 32-byte secret (here derived from the Host's seed)."""
        return hashlib.sha256(b"sevcore chip unique key\0" + seed_bytes(self.host.seed)).digest()

    def _cek_key(self):
        """``sev_cek_derive``: KDF(SHA-256(CUK), "sev-chip-endorsement-key") -> P-384 scalar."""
        if self._cek is None:
            seed = hashlib.sha256(self._chip_unique_key()).digest()
            self._cek = p384_key(scalar_from(kdf(seed, "sev-chip-endorsement-key", b"", 56)))
        return self._cek

    def _ec_keygen(self):
        return p384_key(scalar_from(self._rng(56)))

    def _self_signed(self, usage, algo, key, signers):
        cert = C.new_cert(C.ec_pubkey(usage, algo, key.pointQ), self.api_major, self.api_minor)
        for s_usage, s_key in signers:
            C.sign_ec(cert, s_usage, C.ALGO_ECDSA_SHA256, s_key if s_key is not None else key)
        return cert

    def _gen_oca(self, ident):
        key = self._ec_keygen()
        ident.oca = key
        ident.oca_cert = self._self_signed(C.USAGE_OCA, C.ALGO_ECDSA_SHA256, key,
                                           [(C.USAGE_OCA, None)])
        ident.ext_owned = False

    def _gen_pek(self, ident):
        key = self._ec_keygen()
        ident.pek = key
        ident.pek_cert = self._self_signed(C.USAGE_PEK, C.ALGO_ECDSA_SHA256, key,
                                           [(C.USAGE_OCA, ident.oca),
                                            (C.USAGE_CEK, self._cek_key())])

    def _gen_pdh(self, ident):
        key = self._ec_keygen()
        ident.pdh = key
        ident.pdh_cert = self._self_signed(C.USAGE_PDH, C.ALGO_ECDH_SHA256, key,
                                           [(C.USAGE_PEK, ident.pek)])

    def cek_unsigned_cert(self):
        """The CEK certificate without a signature, as PDH_CERT_EXPORT puts it in the chain."""
        return bytes(C.new_cert(C.ec_pubkey(C.USAGE_CEK, C.ALGO_ECDSA_SHA256,
                                            self._cek_key().pointQ),
                                self.api_major, self.api_minor))

    def get_id_bytes(self):
        """GET_ID's 64 bytes for this (one-socket) chip: the CUK's secp256k1 public point."""
        x, y = secp256k1_public(int.from_bytes(self._chip_unique_key(), "little"))
        return x.to_bytes(32, "big") + y.to_bytes(32, "big")

    # -- persistent storage -----------------------------------------------------------------------

    def _store_load(self, nv):
        """(status, Identity or None): the persistent state from SPI (nv == 0) or the NV area."""
        if not nv:
            return U.SEV_RET_SUCCESS, (self._spi.copy() if self._spi is not None else None)
        raw = self._read(nv, NV_LEN)
        if raw[:8] != _NV_MAGIC:
            return U.SEV_RET_SUCCESS, None
        size = struct.unpack_from("<I", raw, 8)[0]
        nonce, tag, body = raw[12:24], raw[24:40], raw[40:40 + size]
        try:
            plain = AES.new(self._nv_key(), AES.MODE_GCM, nonce=nonce).decrypt_and_verify(body, tag)
        except ValueError:
            self._write(nv, b"\xff" * NV_LEN)       # erase, as the firmware does, then fail
            return U.SEV_RET_SECURE_DATA_INVALID, None
        return U.SEV_RET_SUCCESS, _decode_identity(plain)

    def _store_save(self, nv, ident):
        if not nv:
            self._spi = ident.copy()
            return
        plain = _encode_identity(ident)
        nonce = self._rng(12)
        ct, tag = AES.new(self._nv_key(), AES.MODE_GCM, nonce=nonce).encrypt_and_digest(plain)
        blob = _NV_MAGIC + struct.pack("<I", len(ct)) + nonce + tag + ct
        self._write(nv, blob + b"\xff" * (NV_LEN - len(blob)))

    def _nv_key(self):
        return kdf(self._chip_unique_key(), "sevcore-persistent-store", b"", 32)

    def _output(self, f, size):
        """The length-query protocol of an output buffer (``f.address``, ``f.len``): ``len`` too
        short is INVALID_LEN with ``f.len = size``; outside memory INVALID_ADDRESS; else
        (SUCCESS, the buffer's SPA)."""
        if f.len < size:
            f.len = size
            return U.SEV_RET_INVALID_LEN, None
        spa = self._addr(f.address)
        if not self._valid(spa, size):
            return U.SEV_RET_INVALID_ADDRESS, None
        return U.SEV_RET_SUCCESS, spa

    def _commit_identity(self, ident):
        """Persist a renewed identity (SPI or the INIT_EX NV area) and make it the live one."""
        self._store_save(self._nv, ident)
        self._identity = ident
        return U.SEV_RET_SUCCESS

    # -- ASIDs -----------------------------------------------------------------------------------

    def _asid_in_range(self, asid):
        return 1 <= asid <= self.max_sev_asid

    def wbinvd(self):
        """The host executed WBINVD on every CPU (KVM's ``wbinvd_on_all_cpus()``): the next
        DF_FLUSH may clean the ASIDs DEACTIVATE left dirty."""
        self._wbinvd_done = True

    # -- platform commands --------------------------------------------------------------------------

    def _cmd_init(self, f):
        return self._init_common(f, False)

    def _cmd_init_ex(self, f):
        return self._init_common(f, True)

    def _init_common(self, f, ex):
        if self.state != UNINIT:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        if not self.memory_encryption_enabled:
            return U.SEV_RET_HWSEV_RET_PLATFORM
        # The firmware's flags field is 16 bits; the kernel's u32 upper half and the reserved
        # fields are MBZ (init_cmd_buf_valid / init_ex_cmd_buf_valid).
        if f.flags & ~CONFIG_ES or f.reserved:
            return U.SEV_RET_INAVLID_CONFIG
        nv = 0
        if ex:
            if f.length != INIT_EX_LEN:
                return U.SEV_RET_INVALID_LEN
            nv = self._addr(f.nv_address)
            if nv:
                if nv % 4096 or not self._valid(nv, f.nv_len):
                    return U.SEV_RET_INVALID_ADDRESS
                if f.nv_len != NV_LEN:
                    return U.SEV_RET_INVALID_LEN
        status, ident = self._store_load(nv)
        if status:
            return status
        ident = ident or Identity()
        self._cek_key()
        updated = False
        if ident.oca_cert is None:
            self._gen_oca(ident)
            ident.pek = ident.pek_cert = None
            updated = True
        if ident.pek_cert is None:
            self._gen_pek(ident)
            ident.pdh = ident.pdh_cert = None
            updated = True
        if ident.pdh_cert is None:
            self._gen_pdh(ident)
            updated = True
        if updated:
            self._store_save(nv, ident)
        for a in range(1, self.max_sev_asid + 1):
            self._asid_state[a] = DIRTY
        self._wbinvd_done = False
        if f.flags & CONFIG_ES:
            tmr, tmr_len = self._addr(f.tmr_address), f.tmr_len
            if ex and nv:
                if not self._valid(tmr, tmr_len):
                    return U.SEV_RET_INVALID_ADDRESS
                if tmr < nv + NV_LEN and nv < tmr + TMR_SIZE:
                    return U.SEV_RET_INVALID_ADDRESS
            if tmr % TMR_SIZE:
                return U.SEV_RET_INVALID_ADDRESS
            if tmr_len != TMR_SIZE:
                return U.SEV_RET_INVALID_LEN
            if not self._valid(tmr, tmr_len):
                return U.SEV_RET_INVALID_ADDRESS
            self._tmr = tmr
        self._identity = ident
        self._nv = nv
        self.state = INIT
        self.config_flags = f.flags & 0xFFFF
        return U.SEV_RET_SUCCESS

    def _cmd_shutdown(self, _):
        for g in self._guests.values():
            if g.asid:
                self.host.umc.remove_key(g.asid)
        self._guests.clear()
        self.state = UNINIT
        self.config_flags = 0
        self._identity = None
        self._tmr = None
        self._tmr_ready = False
        self._tmr_crc.clear()
        self._rb_disable()
        return U.SEV_RET_SUCCESS

    def _cmd_factory_reset(self, _):
        if self.state != UNINIT:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        self._spi = None
        return U.SEV_RET_SUCCESS

    def _cmd_platform_status(self, f):
        f.api_major, f.api_minor, f.state, f.build = (self.api_major, self.api_minor, self.state,
                                                      self.build)
        if self.state == UNINIT:
            f.flags, f.guest_count = 0, 0
        else:
            f.flags = int(self._identity.ext_owned) | (self.config_flags << 8)
            f.guest_count = len(self._guests)
        return U.SEV_RET_SUCCESS

    def _cmd_pek_gen(self, _):
        if self.state != INIT:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        ident = self._identity.copy()
        self._gen_oca(ident)
        self._gen_pek(ident)
        self._gen_pdh(ident)
        return self._commit_identity(ident)

    def _cmd_pek_csr(self, f):
        if self.state not in (INIT, WORKING):
            return U.SEV_RET_INVALID_PLATFORM_STATE
        status, spa = self._output(f, C.CERT_SIZE)
        if status:
            return status
        csr = C.new_cert(C.pubkey_of(self._identity.pek_cert))
        csr[:C.BODY_SIZE] = self._identity.pek_cert[:C.BODY_SIZE]
        self._write(spa, csr)
        f.len = C.CERT_SIZE
        return U.SEV_RET_SUCCESS

    def _cmd_pek_cert_import(self, f):
        if self.state != INIT:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        if self._identity.ext_owned:
            return U.SEV_RET_ALREADY_OWNED
        if f.pek_cert_len != C.CERT_SIZE or f.oca_cert_len != C.CERT_SIZE:
            return U.SEV_RET_INVALID_LEN
        pek_addr, oca_addr = self._addr(f.pek_cert_address), self._addr(f.oca_cert_address)
        if not (self._valid(pek_addr, C.CERT_SIZE) and self._valid(oca_addr, C.CERT_SIZE)):
            return U.SEV_RET_INVALID_ADDRESS
        pek = bytearray(self._read(pek_addr, C.CERT_SIZE))
        oca = bytearray(self._read(oca_addr, C.CERT_SIZE))
        for cert, signer in ((oca, oca), (pek, oca)):
            status = C.validate(cert, C.pubkey_of(signer))
            if status:
                return status
        own = self._identity.pek_cert
        if pek[:C.BODY_SIZE] != own[:C.BODY_SIZE]:
            return U.SEV_RET_INVALID_CERTIFICATE
        cek_sig = next((C.sig_slot(own, i) for i in (1, 2)
                        if C.sig_slot(own, i)[0] == C.USAGE_CEK), None)
        if cek_sig is None:
            return U.SEV_RET_INVALID_CERTIFICATE
        status = C.set_sig(pek, *cek_sig)
        if status:
            return status
        ident = self._identity.copy()
        ident.pek_cert, ident.oca_cert, ident.oca, ident.ext_owned = pek, oca, None, True
        self._gen_pdh(ident)
        return self._commit_identity(ident)

    def _cmd_pdh_cert_export(self, f):
        if self.state not in (INIT, WORKING):
            return U.SEV_RET_INVALID_PLATFORM_STATE
        status = U.SEV_RET_SUCCESS
        if f.pdh_cert_len < C.CERT_SIZE or f.cert_chain_len < C.CHAIN_SIZE:
            status = U.SEV_RET_INVALID_LEN
        else:
            pdh_addr, chain_addr = self._addr(f.pdh_cert_address), self._addr(f.cert_chain_address)
            if not (self._valid(pdh_addr, C.CERT_SIZE) and self._valid(chain_addr, C.CHAIN_SIZE)):
                return U.SEV_RET_INVALID_ADDRESS
            ident = self._identity
            self._write(pdh_addr, ident.pdh_cert)
            self._write(chain_addr, bytes(ident.pek_cert) + bytes(ident.oca_cert)
                        + self.cek_unsigned_cert())
        f.pdh_cert_len, f.cert_chain_len = C.CERT_SIZE, C.CHAIN_SIZE
        return status

    def _cmd_pdh_gen(self, _):
        if self.state not in (INIT, WORKING):
            return U.SEV_RET_INVALID_PLATFORM_STATE
        ident = self._identity.copy()
        self._gen_pdh(ident)
        return self._commit_identity(ident)

    def _cmd_df_flush(self, _):
        # No platform-state check in the firmware (mcmd_df_flush_common).
        if not self._wbinvd_done:
            return U.SEV_RET_WBINVD_REQUIRED
        for a in range(1, self.max_sev_asid + 1):
            if self._asid_state[a] == DIRTY:
                self._asid_state[a] = CLEAN
        if self.state != UNINIT and self.config_flags & CONFIG_ES and self._tmr is not None:
            self._tmr_ready = True
        return U.SEV_RET_SUCCESS

    def _cmd_download_firmware(self, f):
        if self.state != UNINIT:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        if self._addr(f.address) % 32:
            return U.SEV_RET_INVALID_ADDRESS
        # Firmware images are not modelled: nothing here is signed by AMD.
        return U.SEV_RET_BAD_SIGNATURE

    def _cmd_get_id(self, f):
        status, spa = self._output(f, ID_SIZE)
        if status:
            return status
        self._write(spa, self.get_id_bytes())
        f.len = ID_SIZE
        return U.SEV_RET_SUCCESS

    def _cmd_nop(self, _):
        return U.SEV_RET_SUCCESS


def _encode_identity(ident):
    def d(key):
        return (key.d if key is not None else 0).to_bytes(_EC_BYTES, "big")
    return (bytes([ident.ext_owned]) + d(ident.pdh) + d(ident.pek) + d(ident.oca)
            + bytes(ident.pdh_cert) + bytes(ident.pek_cert) + bytes(ident.oca_cert))


def _decode_identity(plain):
    ident = Identity()
    ident.ext_owned = bool(plain[0])
    keys = [int.from_bytes(plain[1 + _EC_BYTES * i:1 + _EC_BYTES * (i + 1)], "big")
            for i in range(3)]
    ident.pdh, ident.pek, ident.oca = (p384_key(k) if k else None for k in keys)
    off = 1 + 3 * _EC_BYTES
    ident.pdh_cert, ident.pek_cert, ident.oca_cert = (
        bytearray(plain[off + C.CERT_SIZE * i:off + C.CERT_SIZE * (i + 1)]) for i in range(3))
    return ident
