"""Launching and inspecting a guest: LAUNCH_START, LAUNCH_UPDATE_DATA/VMSA, LAUNCH_MEASURE,
LAUNCH_SECRET, LAUNCH_FINISH, ATTESTATION and the debug commands (AMD-ASPFW ``sev_mcmd.c``,
each handler named in its method's docstring)."""
import hashlib

from sevcore import uapi as U
from sevcore.core import sevpkt
from sevcore.hw import vmsa as V
from sevcore.psp import certs as C
from sevcore.psp import crypto as X
from sevcore.psp.guests import LSECRET, LUPDATE, RUNNING, SCRATCH, SENT, SUPDATE, Guest
from sevcore.psp.packets import BadPacketMac, _open_packets
from sevcore.psp.platform import IN_USE, INIT, WORKING


class LaunchCommands:
    """Mixin of Psp: the launch, attestation and debug commands."""

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
        if f.len != V.VMSA_SIZE:
            return U.SEV_RET_INVALID_LEN
        status, g = self._launch_update_checks(f, True)
        if status:
            return status
        spa = self._addr(f.address)
        vmsa = bytearray(self._read(spa, V.VMSA_SIZE))
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
