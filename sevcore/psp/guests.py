"""The guest half of the firmware: guest contexts by handle, the guest state machine, ASID binding,
and the launch, attestation, debug and migration commands.

Check order, status codes and effects follow AMD-ASPFW ``sev_mcmd.c`` command by command (the
handler of each command is named in its docstring), ``sev_guest.c`` (state table, policy check,
activation, measurement), ``sev_channel.c`` (sessions) and ``sev_es.c`` (VMSA checksums);
AMD's SEV API (#55766) documents the commands. Guest memory is only touched through the
host's memory controller (``host.umc``) with the guest's ASID.
"""
import hashlib

import numpy as np

from sevcore.core import sevpkt
from sevcore import uapi as U
from sevcore.psp import certs as C
from sevcore.psp import crypto as X
from sevcore.psp.packets import BadPacketMac, _open_packets, _seal_packets
from sevcore.psp.platform import ALLOCATED, CLEAN, CONFIG_ES, DIRTY, IN_USE, INIT, WORKING

LUPDATE = U.SEV_GUEST_STATE_LAUNCH_UPDATE
LSECRET = U.SEV_GUEST_STATE_LAUNCH_SECRET
RUNNING = U.SEV_GUEST_STATE_RUNNING
SUPDATE = U.SEV_GUEST_STATE_SEND_UPDATE
RUPDATE = U.SEV_GUEST_STATE_RECEIVE_UPDATE
SENT = U.SEV_GUEST_STATE_SENT

SCRATCH = sevpkt.MAX_LEN            # SEV_SCRATCH_BUF_LEN (0x5000): most one transport command moves
VMSA_SIZE = 4096
VMSA_CRC_SIZE = 0xFC0               # the checksum covers the VMSA up to here ([FW] sev_es.h)
VMSA_CRC_PADDR = 0x388              # vmcb_save_area_t.crc_paddr (0x380: 8 zero bytes)
POLICY_RESERVED = 0xFFC0            # bits 6-15 MBZ
GUEST_COUNT_MAX = 1024
CRC_BLOCK = 16                      # TMR checksum-pool block (size assumed)

#: Guest state transitions ([FW] sev_guest.c ``state_tbl_sev``).
TRANSITIONS = {
    (LUPDATE, U.SEV_CMD_LAUNCH_MEASURE): LSECRET,
    (LSECRET, U.SEV_CMD_LAUNCH_FINISH): RUNNING,
    (RUNNING, U.SEV_CMD_SEND_START): SUPDATE,
    (SUPDATE, U.SEV_CMD_SEND_FINISH): SENT,
    (SUPDATE, U.SEV_CMD_SEND_CANCEL): RUNNING,
    (RUPDATE, U.SEV_CMD_RECEIVE_FINISH): RUNNING,
}


class Guest:
    """One guest context (``sev_guest_t``)."""

    def __init__(self, handle, policy):
        self.handle = handle
        self.policy = policy
        self.state = U.SEV_GUEST_STATE_UNINITIALIZED
        self.asid = 0
        self.active = False              # ASID valid on the cores
        self.pending = False             # ACTIVATE done, valid from LAUNCH/RECEIVE_FINISH on
        self.vek_seed = b""
        self.oek = b""
        self.es = False
        self.sha = hashlib.sha256()
        self.launch_digest = bytes(32)
        self.vmsa_blocks = []
        self.close_channel()

    @property
    def bound(self):
        """ACTIVE or PENDING: what the firmware calls "has an ASID"."""
        return self.active or self.pending

    def close_channel(self):
        """``sev_channel_close``: the transport keys, master secret and measurement are gone."""
        self.tek = self.tik = self.master = self.nonce = bytes(16)
        self.measure = bytes(32)

    def vek(self, size):
        """The key the memory controllers get for this guest, from its 32-byte VEK seed
        ([FW] ``umc.c::set_umc_key``, channel 0)."""
        return X.kdf(self.vek_seed, b"sev-vm-encryption-key-0\0", X.le32(0), size)


class GuestCommands:
    """Mixin of Psp: guest contexts and the guest commands."""

    def guest(self, handle):
        """The context of ``handle``, or None (``handle_is_valid``)."""
        return self._guests.get(handle)

    def _working_guest(self, handle):
        """(status, guest) for the common "platform WORKING, then handle" prologue."""
        if self.state != WORKING:
            return U.SEV_RET_INVALID_PLATFORM_STATE, None
        g = self._guests.get(handle)
        if g is None:
            return U.SEV_RET_INVALID_GUEST, None
        return U.SEV_RET_SUCCESS, g

    def _gates(self, g, state, vmsa):
        """The guest's side of every data command, in the firmware's order: the guest state, an
        SEV-ES guest for the VMSA variants, an ASID bound (ACTIVE or PENDING)."""
        if g.state != state:
            return U.SEV_RET_INVALID_GUEST_STATE
        if vmsa and not g.es:
            return U.SEV_RET_UNSUPPORTED
        if not g.bound:
            return U.SEV_RET_INACTIVE
        return U.SEV_RET_SUCCESS

    def _transition(self, g, cmd):
        g.state = TRANSITIONS[(g.state, cmd)]

    def _api_ok(self, policy):
        major, minor = (policy >> 16) & 0xFF, (policy >> 24) & 0xFF
        return (self.api_major, self.api_minor) >= (major, minor)

    def _guest_range(self, addr, size):
        """Guest memory at a C-bit address: the SPA, or None outside host memory."""
        spa = self._addr(addr)
        return spa if self._valid(spa, size) else None

    # -- contexts: DECOMMISSION, ACTIVATE, DEACTIVATE, GUEST_STATUS --------------------------------

    def _cmd_decommission(self, f):
        """``sev_mcmd_decommission``."""
        status, g = self._working_guest(f.handle)
        if status:
            return status
        if g.asid and self._asid_state[g.asid] in (IN_USE, DIRTY, ALLOCATED):
            return U.SEV_RET_ACTIVE
        for block in g.vmsa_blocks:
            self._tmr_crc.pop(block, None)
        del self._guests[g.handle]
        if not self._guests:
            self.state = INIT
        return U.SEV_RET_SUCCESS

    def _cmd_activate(self, f):
        """``sev_mcmd_activate`` -> ``mcmd_activate_common`` -> ``activate_common`` ->
        ``sev_guest_activate``."""
        status, g = self._working_guest(f.handle)
        if status:
            return status
        asid = f.asid
        if not self._asid_in_range(asid):
            return U.SEV_RET_INVALID_ASID
        if self._asid_state[asid] in (IN_USE, ALLOCATED):
            return U.SEV_RET_ASID_OWNED
        if g.bound:
            return U.SEV_RET_ACTIVE
        if g.state == SENT:
            return U.SEV_RET_INVALID_GUEST_STATE
        if self._asid_state[asid] == DIRTY:
            return U.SEV_RET_DFFLUSH_REQUIRED
        if self._asid_state[asid] != CLEAN:
            return U.SEV_RET_ASID_OWNED
        es_range = 1 <= asid < self.min_sev_asid
        sev_range = self.min_sev_asid <= asid <= self.max_sev_asid
        if not (es_range if g.es else sev_range):
            return U.SEV_RET_INVALID_ASID
        self.host.umc.install_key(asid, g.vek(self.host.umc.key_len))
        g.asid = asid
        if g.state in (RUNNING, SUPDATE):
            g.active, self._asid_state[asid] = True, IN_USE
        else:
            g.pending, self._asid_state[asid] = True, ALLOCATED
        return U.SEV_RET_SUCCESS

    def _cmd_deactivate(self, f):
        """``sev_mcmd_deactivate``. An ASID that ran goes dirty and needs WBINVD + DF_FLUSH
        before it can be activated again; one that only was pending goes back to clean. The key
        leaves the memory controller here (the firmware leaves it in the slot but invalidates the
        ASID on every core, so no access can use it any more)."""
        status, g = self._working_guest(f.handle)
        if status:
            return status
        if not g.bound:
            return U.SEV_RET_INACTIVE
        asid = g.asid
        if self._asid_state[asid] == IN_USE:
            self._asid_state[asid] = DIRTY
            self._wbinvd_done = False
        elif self._asid_state[asid] == ALLOCATED:
            self._asid_state[asid] = CLEAN
        self.host.umc.remove_key(asid)
        g.asid, g.active, g.pending = 0, False, False
        return U.SEV_RET_SUCCESS

    def _cmd_guest_status(self, f):
        """``sev_mcmd_guest_status``: an unknown handle reports state 0 and succeeds."""
        if self.state not in (INIT, WORKING):
            return U.SEV_RET_INVALID_PLATFORM_STATE
        g = self._guests.get(f.handle)
        if g is None:
            f.state = U.SEV_GUEST_STATE_UNINITIALIZED
            return U.SEV_RET_SUCCESS
        f.state, f.asid, f.policy = g.state, g.asid if g.bound else 0, g.policy
        return U.SEV_RET_SUCCESS

    def _cmd_copy(self, f):
        """``sev_mcmd_copy`` (firmware only): move encrypted pages to another SPA, re-encrypting
        them for the new address with the guest's key."""
        status, g = self._working_guest(f.handle)
        if status:
            return status
        if not g.bound:
            return U.SEV_RET_INACTIVE
        if not f.len or f.len % 4096:
            return U.SEV_RET_INVALID_LEN
        src, dst = self._addr(f.src_address), self._addr(f.dst_address)
        if src % 4096 or dst % 4096:
            return U.SEV_RET_INVALID_ADDRESS
        if src < dst + 4096 and dst < src + 4096:
            return U.SEV_RET_SUCCESS
        if not (self._valid(src, f.len) and self._valid(dst, f.len)):
            return U.SEV_RET_INVALID_ADDRESS
        umc = self.host.umc
        umc.write(dst, umc.read(src, f.len, g.asid), g.asid)
        return U.SEV_RET_SUCCESS

    # -- sessions --------------------------------------------------------------------------------------

    def _open_server(self, g, dh_cert, session, policy):
        """``sev_channel_open_server`` + ``sev_guest_verify_policy``: derive the master secret
        from our PDH and the peer's DH certificate, unwrap TEK/TIK, check the policy MAC."""
        status = C.sanity_check(dh_cert, C.USAGE_PDH, C.ALGO_ECDH_SHA256)
        if status:
            return status
        peer = C.ec_point_of(C.pubkey_of(dh_cert)).pointQ
        z = X.ecdh_p384(self._identity.pdh.d, peer)
        master = X.master_secret(z, session[:16])
        keys = X.open_session(master, session)
        if keys is None:
            return U.SEV_RET_BAD_MEASUREMENT
        g.tek, g.tik = keys
        g.master, g.nonce = master, bytes(session[:16])
        if not X.policy_mac_ok(g.tik, policy, session[96:128]):
            return U.SEV_RET_BAD_MEASUREMENT
        if not self._api_ok(policy) or policy & POLICY_RESERVED:
            return U.SEV_RET_POLICY_FAILURE
        return U.SEV_RET_SUCCESS

    def _server_channel(self, g, session_address, session_len, dh_address, dh_len):
        """Read the session and the peer's DH certificate (each length checked before its copy,
        in the firmware's order) and open the server side of the channel."""
        if session_len != X.SESSION_SIZE:
            return U.SEV_RET_INVALID_LEN
        session = self._read_blob(session_address, X.SESSION_SIZE)
        if session is None:
            return U.SEV_RET_INVALID_ADDRESS
        if dh_len != C.CERT_SIZE:
            return U.SEV_RET_INVALID_LEN
        dh = self._read_blob(dh_address, C.CERT_SIZE)
        if dh is None:
            return U.SEV_RET_INVALID_ADDRESS
        return self._open_server(g, dh, session, g.policy)

    def _start_context(self, g, f, state):
        """The common tail of LAUNCH_START and RECEIVE_START: VEK (fresh, or shared with
        ``f.handle``), handle, ES, OEK; then the guest exists in ``state``, the platform is
        WORKING and ``f.handle`` is written back."""
        if f.handle == 0:
            g.vek_seed = self._rng(32)
        else:
            shared = self._guests.get(f.handle)
            if shared is None:
                return U.SEV_RET_INVALID_GUEST
            if g.policy != shared.policy or shared.policy & U.SEV_POLICY_MASK_NOKS:
                return U.SEV_RET_POLICY_FAILURE
            g.vek_seed = shared.vek_seed
        handle = next((h for h in range(1, GUEST_COUNT_MAX + 1) if h not in self._guests), None)
        if handle is None:
            return U.SEV_RET_RESOURCE_LIMIT
        if g.policy & U.SEV_POLICY_MASK_ES:
            if not self.config_flags & CONFIG_ES:
                return U.SEV_RET_UNSUPPORTED
            g.es = True
        g.oek = self._rng(32)
        g.handle, g.state = handle, state
        self._guests[handle] = g
        self.state = WORKING
        f.handle = handle
        return U.SEV_RET_SUCCESS

    def _read_blob(self, addr, size):
        spa = self._addr(addr)
        return self._read(spa, size) if self._valid(spa, size) else None

    # -- launch ---------------------------------------------------------------------------------------

    def _cmd_launch_start(self, f):
        """``sev_mcmd_launch_start``. Without a DH certificate no channel is opened: TEK and TIK
        stay zero and the policy is not checked."""
        if self.state not in (INIT, WORKING):
            return U.SEV_RET_INVALID_PLATFORM_STATE
        g = Guest(0, f.policy)
        status = U.SEV_RET_SUCCESS
        if f.dh_cert_address:
            status = self._server_channel(g, f.session_address, f.session_len,
                                          f.dh_cert_address, f.dh_cert_len)
        return status or self._start_context(g, f, LUPDATE)

    def _launch_update_checks(self, f, vmsa):
        status, g = self._working_guest(f.handle)
        status = status or self._gates(g, LUPDATE, vmsa)
        if status:
            return status, None
        if f.address % 16:
            return U.SEV_RET_INVALID_ADDRESS, None
        if f.len % 16 or f.len == 0:
            return U.SEV_RET_INVALID_LEN, None
        if self._guest_range(f.address, f.len) is None:
            return U.SEV_RET_INVALID_ADDRESS, None
        return U.SEV_RET_SUCCESS, g

    def _cmd_launch_update_data(self, f):
        """``launch_update_common``: measure the plaintext (SHA-256 of every byte in call order),
        then encrypt it in place with the guest's key."""
        status, g = self._launch_update_checks(f, False)
        if status:
            return status
        self.host.umc.encrypt_in_place(self._addr(f.address), f.len, g.asid, g.sha.update)
        return U.SEV_RET_SUCCESS

    def _cmd_launch_update_vmsa(self, f):
        """``sev_mcmd_launch_update_vmsa``: length first, then as LAUNCH_UPDATE_DATA, with the
        SEV-ES checksum set up after the VMSA is measured and before it is encrypted."""
        if f.len != VMSA_SIZE:
            return U.SEV_RET_INVALID_LEN
        status, g = self._launch_update_checks(f, True)
        if status:
            return status
        spa = self._addr(f.address)
        vmsa = bytearray(self._read(spa, VMSA_SIZE))
        g.sha.update(vmsa)
        status = self._es_setup_vmsa(g, vmsa)
        if status:
            return status
        self.host.umc.write(spa, vmsa, g.asid)
        return U.SEV_RET_SUCCESS

    def _cmd_launch_measure(self, f):
        """``sev_mcmd_launch_measure``: no ASID check; ``len`` < 48 is the length query."""
        status, g = self._working_guest(f.handle)
        if status:
            return status
        if g.state != LUPDATE:
            return U.SEV_RET_INVALID_GUEST_STATE
        status, addr = self._output(f, X.MEASURE_SIZE)
        if status:
            return status
        digest = g.sha.digest()
        mnonce = self._rng(16)
        measure = X.measurement(g.tik, self.api_major, self.api_minor, self.build, g.policy,
                                digest, mnonce)
        self._write(addr, measure + mnonce)
        g.measure, g.launch_digest = measure, digest
        self._transition(g, U.SEV_CMD_LAUNCH_MEASURE)
        return U.SEV_RET_SUCCESS

    def _cmd_launch_update_secret(self, f):
        """``sev_mcmd_launch_secret``: the MAC (context 0x01, bound to the launch measurement)
        is checked before anything is decrypted or written."""
        status, g = self._working_guest(f.handle)
        if status:
            return status
        if f.guest_address % 16:
            return U.SEV_RET_INVALID_ADDRESS
        if (f.hdr_len != X.HEADER_SIZE or f.guest_len % 16 or f.guest_len == 0
                or f.guest_len > SCRATCH or f.guest_len != f.trans_len):
            return U.SEV_RET_INVALID_LEN
        if g.state != LSECRET:
            return U.SEV_RET_INVALID_GUEST_STATE
        if not g.bound:
            return U.SEV_RET_INACTIVE
        header = self._read_blob(f.hdr_address, X.HEADER_SIZE)
        trans = self._read_blob(f.trans_address, f.trans_len)
        dst = self._guest_range(f.guest_address, f.guest_len)
        if header is None or trans is None or dst is None:
            return U.SEV_RET_INVALID_ADDRESS
        try:
            plain = _open_packets(g.tek, g.tik, header, trans, X.CTX_SECRET,
                                  measure=g.measure)
        except BadPacketMac:
            return U.SEV_RET_BAD_MEASUREMENT
        except sevpkt.PacketFlagsError:
            return U.SEV_RET_UNSUPPORTED
        self.host.umc.write(dst, plain, g.asid)
        return U.SEV_RET_SUCCESS

    def _finish(self, f, state, cmd):
        """LAUNCH_FINISH / RECEIVE_FINISH: complete a pending ACTIVATE, close the channel."""
        status, g = self._working_guest(f.handle)
        if status:
            return status
        if g.state != state:
            return U.SEV_RET_INVALID_GUEST_STATE
        if g.pending:
            g.pending, g.active = False, True
            self._asid_state[g.asid] = IN_USE
        g.close_channel()
        self._transition(g, cmd)
        return U.SEV_RET_SUCCESS

    def _cmd_launch_finish(self, f):
        """``sev_mcmd_launch_finish``."""
        status = self._finish(f, LSECRET, U.SEV_CMD_LAUNCH_FINISH)
        if not status:
            self._guests[f.handle].sha = hashlib.sha256()
        return status

    def _cmd_attestation_report(self, f):
        """``sev_mcmd_attestation``: mnonce, launch digest and policy signed by the PEK."""
        status, g = self._working_guest(f.handle)
        if status:
            return status
        if g.state not in (LSECRET, RUNNING, SUPDATE, SENT):
            return U.SEV_RET_INVALID_GUEST_STATE
        status, addr = self._output(f, 0xD0)
        if status:
            return status
        signed = bytes(f.mnonce) + g.launch_digest + X.le32(g.policy)
        sig = C.ecdsa_value(self._identity.pek, C.ALGO_ECDSA_SHA256, signed)
        report = (signed + X.le32(C.USAGE_PEK) + X.le32(C.ALGO_ECDSA_SHA256) + bytes(4) + sig)
        self._write(addr, report)
        f.len = len(report)
        return U.SEV_RET_SUCCESS

    # -- debug ----------------------------------------------------------------------------------------

    def _dbg(self, f, encrypt):
        """``sev_mcmd_dbg_decrypt``/``_encrypt`` + ``debug_crypt_common``: no guest-state check;
        a NODBG policy refuses."""
        if self.state != WORKING:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        if f.src_addr % 16 or f.dst_addr % 16:
            return U.SEV_RET_INVALID_ADDRESS
        if f.len % 16:
            return U.SEV_RET_INVALID_LEN
        g = self._guests.get(f.handle)
        if g is None:
            return U.SEV_RET_INVALID_GUEST
        if g.policy & U.SEV_POLICY_MASK_NODBG:
            return U.SEV_RET_POLICY_FAILURE
        if not g.bound:
            return U.SEV_RET_INACTIVE
        src, dst = self._addr(f.src_addr), self._addr(f.dst_addr)
        if not (self._valid(src, f.len) and self._valid(dst, f.len)):
            return U.SEV_RET_INVALID_ADDRESS
        if f.len:
            umc = self.host.umc
            if encrypt:
                umc.write(dst, umc.read(src, f.len, 0), g.asid)
            else:
                umc.write(dst, umc.read(src, f.len, g.asid), 0)
        return U.SEV_RET_SUCCESS

    def _cmd_dbg_decrypt(self, f):
        return self._dbg(f, False)

    def _cmd_dbg_encrypt(self, f):
        return self._dbg(f, True)

    # -- sending --------------------------------------------------------------------------------------

    def _target_chain(self, f):
        """(status, pdh, chain) read for the SEV and DOMAIN policy checks."""
        if f.plat_certs_len != C.CHAIN_SIZE or f.pdh_cert_len != C.CERT_SIZE:
            return U.SEV_RET_INVALID_LEN, None, None
        chain = self._read_blob(f.plat_certs_address, C.CHAIN_SIZE)
        pdh = self._read_blob(f.pdh_cert_address, C.CERT_SIZE)
        if chain is None or pdh is None:
            return U.SEV_RET_INVALID_ADDRESS, None, None
        return U.SEV_RET_SUCCESS, pdh, chain

    def _validate_platform(self, f):
        """``validate_platform``: ARK (fused) -> ASK -> CEK -> PEK -> PDH of the target."""
        status, pdh, chain = self._target_chain(f)
        if status:
            return status, None, None
        if not C.amd_chain_length_is_valid(f.amd_certs_len):
            return U.SEV_RET_INVALID_LEN, None, None
        amd = self._read_blob(f.amd_certs_address, f.amd_certs_len)
        if amd is None:
            return U.SEV_RET_INVALID_ADDRESS, None, None
        amd = amd + bytes(2 * C.AMD_CERT_MAX)
        try:
            ask = C.AmdCert(amd)
            ark = C.AmdCert(amd[ask.size:])
        except ValueError:
            return U.SEV_RET_INVALID_CERTIFICATE, None, None
        status = C.amd_validate(ark, ark, C.USAGE_ARK)
        if not status and (ark.key_id != self.fused_ark_id
                           or ark.pubkey_hash() != self.fused_ark_hash):
            status = U.SEV_RET_INVALID_CERTIFICATE
        status = status or C.amd_validate(ask, ark, C.USAGE_ASK)
        pek, cek = chain[:C.CERT_SIZE], chain[2 * C.CERT_SIZE:]
        status = (status or C.validate(cek, ask.sev_pubkey())
                  or C.validate(pek, C.pubkey_of(cek)) or C.validate(pdh, C.pubkey_of(pek)))
        return status, pdh, chain

    def _validate_domain(self, f, pdh, chain):
        """``validate_domain``: OCA (self-signed) -> PEK -> PDH, and the OCA must be ours. The
        chain is the one ``validate_platform`` read, else read here (lengths checked first)."""
        if chain is None:
            status, pdh, chain = self._target_chain(f)
            if status:
                return status, None, None
        pek, oca = chain[:C.CERT_SIZE], chain[C.CERT_SIZE:2 * C.CERT_SIZE]
        status = (C.validate(oca, C.pubkey_of(oca)) or C.validate(pek, C.pubkey_of(oca))
                  or C.validate(pdh, C.pubkey_of(pek)))
        if not status and oca != bytes(self._identity.oca_cert):
            status = U.SEV_RET_POLICY_FAILURE
        return status, pdh, chain

    def _cmd_send_start(self, f):
        """``sev_mcmd_send_start``: the policy decides how far the target is authenticated."""
        status, g = self._working_guest(f.handle)
        if status:
            return status
        if f.session_len != X.SESSION_SIZE:
            f.session_len = X.SESSION_SIZE
            return U.SEV_RET_INVALID_LEN
        if g.state != RUNNING:
            return U.SEV_RET_INVALID_GUEST_STATE
        if g.policy & U.SEV_POLICY_MASK_NOSEND:
            return U.SEV_RET_POLICY_FAILURE
        pdh = chain = None
        if g.policy & U.SEV_POLICY_MASK_SEV:
            status, pdh, chain = self._validate_platform(f)
            if status:
                return status
            pek = chain[:C.CERT_SIZE]
            if (pek[4], pek[5]) < ((g.policy >> 16) & 0xFF, (g.policy >> 24) & 0xFF):
                return U.SEV_RET_POLICY_FAILURE
        if g.policy & U.SEV_POLICY_MASK_DOMAIN:
            status, pdh, chain = self._validate_domain(f, pdh, chain)
            if status:
                return status
        if pdh is None:
            if f.pdh_cert_len != C.CERT_SIZE:
                return U.SEV_RET_INVALID_LEN
            pdh = self._read_blob(f.pdh_cert_address, C.CERT_SIZE)
            if pdh is None:
                return U.SEV_RET_INVALID_ADDRESS
        session_addr = self._addr(f.session_address)
        if not self._valid(session_addr, X.SESSION_SIZE):
            return U.SEV_RET_INVALID_ADDRESS
        status = C.sanity_check(pdh, C.USAGE_PDH, C.ALGO_ECDH_SHA256)
        if status:
            return status
        # sev_channel_open_client: TEK, TIK and nonce, then the wrap IV, in that order.
        tek, tik, nonce = self._rng(16), self._rng(16), self._rng(16)
        peer = C.ec_point_of(C.pubkey_of(pdh)).pointQ
        master = X.master_secret(X.ecdh_p384(self._identity.pdh.d, peer), nonce)
        session = X.make_session(master, nonce, self._rng(16), tek, tik, g.policy)
        self._write(session_addr, session)
        f.policy = g.policy
        self._transition(g, U.SEV_CMD_SEND_START)
        g.tek, g.tik, g.master, g.nonce = tek, tik, master, nonce
        return U.SEV_RET_SUCCESS

    def _send_update_checks(self, f, vmsa):
        """The checks of ``sev_mcmd_send_update`` up to the first memory access: (status,
        guest)."""
        status, g = self._send_update_gate(f.handle, f.hdr_len, f.guest_len, f.trans_len, vmsa)
        return status or self._transport_addresses(f, f.guest_len), g

    def _send_update_gate(self, handle, hdr_len, guest_len, trans_len, vmsa):
        """``sev_mcmd_send_update``'s checks before the addresses: (status, guest). ``hdr_len``
        < 52 is the length query and comes before the handle."""
        if self.state != WORKING:
            return U.SEV_RET_INVALID_PLATFORM_STATE, None
        if hdr_len < X.HEADER_SIZE:
            return U.SEV_RET_INVALID_LEN, None
        g = self._guests.get(handle)
        if g is None:
            return U.SEV_RET_INVALID_GUEST, None
        status = self._gates(g, SUPDATE, vmsa)
        if status:
            return status, None
        if (guest_len == 0 or guest_len > SCRATCH or guest_len % 16 or trans_len == 0
                or trans_len < guest_len):
            return U.SEV_RET_INVALID_LEN, None
        return U.SEV_RET_SUCCESS, g

    def _transport_addresses(self, f, trans_len):
        """The last checks of SEND/RECEIVE_UPDATE: a 16-byte aligned guest address
        (INVALID_ADDRESS), then the guest, packet and header ranges inside host memory."""
        if f.guest_address % 16:
            return U.SEV_RET_INVALID_ADDRESS
        if not (self._valid(self._addr(f.guest_address), f.guest_len)
                and self._valid(self._addr(f.trans_address), trans_len)
                and self._valid(self._addr(f.hdr_address), X.HEADER_SIZE)):
            return U.SEV_RET_INVALID_ADDRESS
        return U.SEV_RET_SUCCESS

    def _send_update(self, f, vmsa):
        status, g = self._send_update_checks(f, vmsa)
        if status:
            if status == U.SEV_RET_INVALID_LEN and f.hdr_len < X.HEADER_SIZE:
                f.hdr_len = X.HEADER_SIZE
            return status
        plain = self.host.umc.read(self._addr(f.guest_address), f.guest_len, g.asid)
        if vmsa and self._es_validate_vmsa(g, plain):
            return U.SEV_RET_INVALID_PARAM
        header, ct = _seal_packets(g.tek, g.tik, plain, self._rng(16))
        self._write(self._addr(f.trans_address), ct)
        self._write(self._addr(f.hdr_address), header)
        f.hdr_len = X.HEADER_SIZE
        return U.SEV_RET_SUCCESS

    def _cmd_send_update_data(self, f):
        """``sev_mcmd_send_update_data``: guest plaintext (read with the guest's key) leaves as
        an AES-CTR + HMAC packet under a fresh IV."""
        return self._send_update(f, False)

    def _cmd_send_update_vmsa(self, f):
        """``sev_mcmd_send_update_vmsa``: as DATA, after checking the VMSA's SEV-ES checksum
        (any mismatch is INVALID_PARAM)."""
        return self._send_update(f, True)

    def _send_end(self, f, cmd):
        status, g = self._working_guest(f.handle)
        if status:
            return status
        if g.state != SUPDATE:
            return U.SEV_RET_INVALID_GUEST_STATE
        g.close_channel()
        self._transition(g, cmd)
        return U.SEV_RET_SUCCESS

    def _cmd_send_finish(self, f):
        """``sev_mcmd_send_finish``: SUPDATE -> SENT; the guest can never be activated again."""
        return self._send_end(f, U.SEV_CMD_SEND_FINISH)

    def _cmd_send_cancel(self, f):
        """``sev_mcmd_send_cancel``: SUPDATE -> RUNNING."""
        return self._send_end(f, U.SEV_CMD_SEND_CANCEL)

    # -- receiving ------------------------------------------------------------------------------------

    def _cmd_receive_start(self, f):
        """``sev_mcmd_receive_start``: the DH certificate (the sender's PDH) is mandatory."""
        if self.state not in (INIT, WORKING):
            return U.SEV_RET_INVALID_PLATFORM_STATE
        g = Guest(0, f.policy)
        return (self._server_channel(g, f.session_address, f.session_len, f.pdh_cert_address,
                                     f.pdh_cert_len)
                or self._start_context(g, f, RUPDATE))

    def _receive_update_checks(self, f, vmsa):
        """The checks of ``sev_mcmd_receive_update`` before the header is read: (status,
        guest)."""
        status, g = self._receive_update_gate(f.handle, f.hdr_len, f.guest_len, f.trans_len,
                                              vmsa)
        return status or self._transport_addresses(f, f.trans_len), g

    def _receive_update_gate(self, handle, hdr_len, guest_len, trans_len, vmsa):
        """``sev_mcmd_receive_update``'s checks before the addresses: (status, guest)."""
        status, g = self._working_guest(handle)
        status = status or self._gates(g, RUPDATE, vmsa)
        if status:
            return status, None
        if (trans_len == 0 or trans_len > SCRATCH or guest_len == 0 or guest_len != trans_len
                or guest_len % 16 or hdr_len < X.HEADER_SIZE):
            return U.SEV_RET_INVALID_LEN, None
        return U.SEV_RET_SUCCESS, g

    def _receive_update(self, f, vmsa):
        status, g = self._receive_update_checks(f, vmsa)
        if status:
            return status
        header = np.frombuffer(self._read(self._addr(f.hdr_address), X.HEADER_SIZE), np.uint8)
        ct = np.frombuffer(self._read(self._addr(f.trans_address), f.trans_len), np.uint8)
        done, status, plain = self._open_pages(g, header.reshape(1, -1), ct.reshape(1, -1))
        if not done:
            return status
        if vmsa:
            status = self._es_setup_vmsa(g, memoryview(plain))
            if status:
                return status
        self.host.umc.write(self._addr(f.guest_address), plain, g.asid)
        return U.SEV_RET_SUCCESS

    def _cmd_receive_update_data(self, f):
        """``sev_mcmd_receive_update_data``: the MAC is checked before anything is written; the
        packet is not bound to an address, a sequence number or a count."""
        return self._receive_update(f, False)

    def _cmd_receive_update_vmsa(self, f):
        """``sev_mcmd_receive_update_vmsa``: as DATA, setting up a fresh SEV-ES checksum."""
        return self._receive_update(f, True)

    def _cmd_receive_finish(self, f):
        """``sev_mcmd_receive_finish``."""
        return self._finish(f, RUPDATE, U.SEV_CMD_RECEIVE_FINISH)

    # -- SEV-ES VMSA checksums (kept in the TMR, which the host cannot read) -------------------------

    def _es_setup_vmsa(self, g, vmsa):
        """``sev_es_setup_vmsa``: take a checksum block from the TMR pool, write its address into
        the VMSA (0x388) and keep the VMSA's checksum there."""
        capacity = TMR_POOL_BLOCKS if self._tmr_ready else 0
        if len(self._tmr_crc) >= capacity:
            return U.SEV_RET_RESOURCE_LIMIT
        crc_base = self._tmr + (1 << 19)
        block = next(crc_base + CRC_BLOCK * i for i in range(capacity)
                     if crc_base + CRC_BLOCK * i not in self._tmr_crc)
        vmsa[0x380:0x390] = bytes(8) + block.to_bytes(8, "little")
        self._tmr_crc[block] = _vmsa_checksum(vmsa)
        g.vmsa_blocks.append(block)
        return U.SEV_RET_SUCCESS

    def _es_validate_vmsa(self, g, vmsa):
        """``sev_es_validate_vmsa``: non-zero (some failure) unless the checksum block the VMSA
        names is one of this guest's and matches."""
        block = int.from_bytes(vmsa[VMSA_CRC_PADDR:VMSA_CRC_PADDR + 8], "little")
        if not g.vmsa_blocks or block not in g.vmsa_blocks:
            return U.SEV_RET_INVALID_ADDRESS
        if self._tmr_crc.get(block) != _vmsa_checksum(vmsa):
            return U.SEV_RET_BAD_MEASUREMENT
        return U.SEV_RET_SUCCESS


#: Checksum blocks in the TMR's second half (512 KiB / CRC_BLOCK); the pool's real block size is
#: not in the sources read, so this capacity is an assumption.
TMR_POOL_BLOCKS = (1 << 19) // CRC_BLOCK


def _vmsa_checksum(vmsa):
    """The firmware keeps a CRC64 of the first 0xFC0 bytes in the TMR. The TMR is invisible to
    the host, so any collision-free digest models it; BLAKE2b-64 is used."""
    return hashlib.blake2b(bytes(vmsa[:VMSA_CRC_SIZE]), digest_size=8).digest()
