"""The guest half of the firmware: guest contexts by handle, the guest state machine, ASID binding,
and what all guest commands share: the gates, sessions and SEV-ES VMSA checksums (the commands
themselves are in launch.py and send_receive.py).

Check order, status codes and effects follow AMD-ASPFW ``sev_mcmd.c`` command by command (the
handler of each command is named in its docstring), ``sev_guest.c`` (state table, policy check,
activation, measurement), ``sev_channel.c`` (sessions) and ``sev_es.c`` (VMSA checksums);
AMD's SEV API (#55766) documents the commands. Guest memory is only touched through the
host's memory controller (``host.umc``) with the guest's ASID.
"""
import hashlib

from sevcore.core import sevpkt
from sevcore import uapi as U
from sevcore.hw import vmsa as V
from sevcore.psp import certs as C
from sevcore.psp import crypto as X
from sevcore.psp.platform import ALLOCATED, CLEAN, CONFIG_ES, DIRTY, IN_USE, INIT, WORKING

LUPDATE = U.SEV_GUEST_STATE_LAUNCH_UPDATE
LSECRET = U.SEV_GUEST_STATE_LAUNCH_SECRET
RUNNING = U.SEV_GUEST_STATE_RUNNING
SUPDATE = U.SEV_GUEST_STATE_SEND_UPDATE
RUPDATE = U.SEV_GUEST_STATE_RECEIVE_UPDATE
SENT = U.SEV_GUEST_STATE_SENT

SCRATCH = sevpkt.MAX_LEN            # SEV_SCRATCH_BUF_LEN (0x5000): most one transport command moves
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
        block = int.from_bytes(vmsa[V.CRC_PADDR:V.CRC_PADDR + 8], "little")
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
    return hashlib.blake2b(bytes(vmsa[:V.CRC_SIZE]), digest_size=8).digest()
