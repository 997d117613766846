"""Migrating a guest: SEND_START, SEND_UPDATE_DATA/VMSA, SEND_FINISH/CANCEL and RECEIVE_START,
RECEIVE_UPDATE_DATA/VMSA, RECEIVE_FINISH (AMD-ASPFW ``sev_mcmd.c``, each handler named in its
method's docstring)."""
import numpy as np

from sevcore import uapi as U
from sevcore.psp import certs as C
from sevcore.psp import crypto as X
from sevcore.psp.guests import RUNNING, RUPDATE, SCRATCH, SUPDATE, Guest
from sevcore.psp.packets import _seal_packets
from sevcore.psp.platform import INIT, WORKING


class SendReceiveCommands:
    """Mixin of Psp: the migration commands of both ends."""

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
