"""The typed layer of the firmware: one method per command, returning dataclasses.

Each method builds the command's buffer and blobs in a scratch area of host memory (as the
kernel's driver uses a bounce buffer), goes through the raw mailbox (``Psp.command``), reads the
results back and raises PspError on a non-zero status, so an embedder can drive either layer and
both see the same firmware. Guest memory is passed by system physical address (``address``,
``guest_address``); blobs (certificates, sessions, packets) by value.
"""
from dataclasses import dataclass


from sevcore import uapi as U
from sevcore.psp import amd_root
from sevcore.psp import certs as C
from sevcore.psp import crypto as X
from sevcore.psp import layout as L
from sevcore.psp.platform import NV_LEN
from sevcore.psp.status import PspError

SCRATCH_PAGES = 16
_HEAD = 256                          # bytes reserved for the command buffer itself


@dataclass(frozen=True)
class PlatformStatus:
    """PLATFORM_STATUS output (``struct sev_user_data_status``)."""
    api_major: int
    api_minor: int
    state: int
    flags: int
    build: int
    guest_count: int

    @property
    def owner(self):
        """1 if the platform is externally owned (PEK_CERT_IMPORT done)."""
        return self.flags & 1

    @property
    def es(self):
        return bool(self.flags & U.SEV_STATUS_FLAGS_CONFIG_ES)


@dataclass(frozen=True)
class GuestStatus:
    handle: int
    policy: int
    asid: int
    state: int


@dataclass(frozen=True)
class LaunchMeasure:
    """LAUNCH_MEASURE output: MEASURE (HMAC under the TIK) and the firmware's MNONCE."""
    measurement: bytes
    mnonce: bytes

    @property
    def raw(self):
        return self.measurement + self.mnonce


@dataclass(frozen=True)
class AttestationReport:
    """ATTESTATION output (208 bytes), signed by the PEK over bytes 0x00-0x33."""
    raw: bytes

    def __getattr__(self, name):
        fields = L.sev_attestation_report.unpack(self.raw)
        if name in fields:
            return fields[name]
        raise AttributeError(name)


@dataclass(frozen=True)
class PdhCertExport:
    """PDH_CERT_EXPORT output: the PDH and the chain PEK || OCA || CEK (CEK unsigned)."""
    pdh_cert: bytes
    cert_chain: bytes

    @property
    def pek_cert(self):
        return self.cert_chain[:C.CERT_SIZE]

    @property
    def oca_cert(self):
        return self.cert_chain[C.CERT_SIZE:2 * C.CERT_SIZE]

    @property
    def cek_cert(self):
        return self.cert_chain[2 * C.CERT_SIZE:]


@dataclass(frozen=True)
class CertChain:
    """Every certificate of a platform, as sev-tool's ``export_cert_chain`` gathers them: the
    PDH_CERT_EXPORT output, the CEK signed by the ASK (from AMD's KDS), and the ASK and ARK."""
    pdh: bytes
    pek: bytes
    oca: bytes
    cek: bytes
    ask: bytes
    ark: bytes

    @property
    def plat_certs(self):
        """PEK || OCA || CEK, SEND_START's ``plat_certs`` for a target with this chain."""
        return self.pek + self.oca + self.cek

    @property
    def amd_certs(self):
        """ASK || ARK, SEND_START's ``amd_certs``."""
        return self.ask + self.ark


@dataclass(frozen=True)
class SendStart:
    policy: int
    session: bytes


@dataclass(frozen=True)
class Packet:
    """A transport packet: the 52-byte header (flags, IV, MAC) and the ciphertext."""
    header: bytes
    ciphertext: bytes


class _Scratch:
    """Bump allocation of blobs after the command buffer in the scratch area."""

    def __init__(self, psp, base):
        self.psp, self.base, self.off = psp, base, _HEAD

    def reserve(self, size):
        spa = self.base + self.off
        self.off += (size + 15) & ~15
        if self.off > SCRATCH_PAGES * 4096:
            raise ValueError("blobs do not fit the scratch area")
        return spa

    def put(self, data):
        spa = self.reserve(len(data))
        self.psp._write(spa, bytes(data))
        return spa


class TypedApi:
    """Mixin of Psp: the typed command methods."""

    def _area(self):
        if self._scratch is None:
            self._scratch = self.host.mem.alloc_contiguous(SCRATCH_PAGES)
        return _Scratch(self, self._scratch)

    def _issue(self, cmd, layout, scratch=None, **fields):
        """Write the buffer, run ``cmd``, raise PspError on failure; returns the buffer's fields
        as the firmware left them."""
        base = (scratch or self._area()).base
        if layout is not None:
            self._write(base, layout.pack(**fields))
        status = self.command(cmd, base if layout is not None else 0)
        if status:
            raise PspError(cmd, status)
        if layout is None:
            return None
        return layout.view(bytearray(self._read(base, layout.size)))

    # -- platform -----------------------------------------------------------------------------------

    def init(self, flags=0, tmr_address=0, tmr_len=0):
        """INIT. Raises PspError."""
        self._issue(U.SEV_CMD_INIT, L.sev_data_init, flags=flags, tmr_address=tmr_address,
                    tmr_len=tmr_len)

    def init_ex(self, flags=0, tmr_address=0, tmr_len=0, nv_address=0, nv_len=NV_LEN,
                length=L.sev_data_init_ex.size):
        """INIT_EX: the persistent state lives in ``nv_address`` (0: SPI). Raises PspError."""
        self._issue(U.SEV_CMD_INIT_EX, L.sev_data_init_ex, length=length, flags=flags,
                    tmr_address=tmr_address, tmr_len=tmr_len, nv_address=nv_address,
                    nv_len=nv_len)

    def platform_status(self):
        """PLATFORM_STATUS -> PlatformStatus."""
        f = self._issue(U.SEV_CMD_PLATFORM_STATUS, L.sev_user_data_status)
        return PlatformStatus(**L.sev_user_data_status.unpack(f.buf))

    def pek_csr(self):
        """PEK_CSR -> the 2084-byte CSR (the PEK certificate without signatures)."""
        s = self._area()
        addr = s.reserve(C.CERT_SIZE)
        self._issue(U.SEV_CMD_PEK_CSR, L.sev_data_pek_csr, s, address=addr, len=C.CERT_SIZE)
        return self._read(addr, C.CERT_SIZE)

    def pek_cert_import(self, pek_cert, oca_cert):
        """PEK_CERT_IMPORT of an OCA-signed PEK CSR and that OCA. Raises PspError."""
        s = self._area()
        pek, oca = s.put(pek_cert), s.put(oca_cert)
        self._issue(U.SEV_CMD_PEK_CERT_IMPORT, L.sev_data_pek_cert_import, s,
                    pek_cert_address=pek, pek_cert_len=len(pek_cert), oca_cert_address=oca,
                    oca_cert_len=len(oca_cert))

    def pdh_cert_export(self):
        """PDH_CERT_EXPORT -> PdhCertExport."""
        s = self._area()
        pdh, chain = s.reserve(C.CERT_SIZE), s.reserve(C.CHAIN_SIZE)
        self._issue(U.SEV_CMD_PDH_CERT_EXPORT, L.sev_data_pdh_cert_export, s,
                    pdh_cert_address=pdh, pdh_cert_len=C.CERT_SIZE, cert_chain_address=chain,
                    cert_chain_len=C.CHAIN_SIZE)
        return PdhCertExport(self._read(pdh, C.CERT_SIZE), self._read(chain, C.CHAIN_SIZE))

    def get_id(self):
        """GET_ID -> the chip's 64-byte ID (one socket), the key of AMD's KDS."""
        s = self._area()
        addr = s.reserve(128)
        f = self._issue(U.SEV_CMD_GET_ID, L.sev_data_get_id, s, address=addr, len=128)
        return self._read(addr, f.len)

    def cek_cert(self):
        """The CEK certificate signed by the ASK: what AMD's KDS returns for GET_ID's ID."""
        if self._cek_signed is None:
            self._cek_signed = amd_root.sign_cek(self.cek_unsigned_cert())
        return self._cek_signed

    def export_cert_chain(self):
        """PDH_CERT_EXPORT plus the KDS-signed CEK and the ASK and ARK -> CertChain."""
        exp = self.pdh_cert_export()
        return CertChain(exp.pdh_cert, exp.pek_cert, exp.oca_cert, self.cek_cert(),
                         amd_root.ask_cert(), amd_root.ark_cert())

    # -- guests -------------------------------------------------------------------------------------

    def activate(self, handle, asid):
        """ACTIVATE: bind ``handle`` to ``asid`` (its key goes into the memory controller)."""
        self._issue(U.SEV_CMD_ACTIVATE, L.sev_data_activate, handle=handle, asid=asid)

    def guest_status(self, handle):
        """GUEST_STATUS -> GuestStatus (an unknown handle reports state 0)."""
        f = self._issue(U.SEV_CMD_GUEST_STATUS, L.sev_data_guest_status, handle=handle)
        return GuestStatus(handle, f.policy, f.asid, f.state)

    def copy(self, handle, src_address, dst_address, len):
        """COPY: move encrypted guest pages to another SPA. Raises PspError."""
        self._issue(U.SEV_CMD_COPY, L.sev_data_copy, handle=handle, len=len,
                    src_address=src_address, dst_address=dst_address)

    def launch_start(self, policy, dh_cert=None, session=None, handle=0):
        """LAUNCH_START -> the new guest's handle. Without ``dh_cert`` there is no session (TEK
        and TIK are zero). ``handle`` != 0 shares that guest's key."""
        s = self._area()
        dh = s.put(dh_cert) if dh_cert is not None else 0
        sess = s.put(session) if session is not None else 0
        f = self._issue(U.SEV_CMD_LAUNCH_START, L.sev_data_launch_start, s, handle=handle,
                        policy=policy, dh_cert_address=dh,
                        dh_cert_len=len(dh_cert) if dh_cert is not None else 0,
                        session_address=sess, session_len=len(session) if session else 0)
        return f.handle

    def launch_update_data(self, handle, address, len):
        """LAUNCH_UPDATE_DATA of ``[address, address + len)``: measured, then encrypted in
        place with the guest's key."""
        self._issue(U.SEV_CMD_LAUNCH_UPDATE_DATA, L.sev_data_launch_update_data, handle=handle,
                    address=address, len=len)

    def launch_update_vmsa(self, handle, address, len=4096):
        """LAUNCH_UPDATE_VMSA of the 4096-byte VMSA at ``address`` (SEV-ES)."""
        self._issue(U.SEV_CMD_LAUNCH_UPDATE_VMSA, L.sev_data_launch_update_vmsa, handle=handle,
                    address=address, len=len)

    def launch_measure(self, handle):
        """LAUNCH_MEASURE -> LaunchMeasure."""
        s = self._area()
        addr = s.reserve(X.MEASURE_SIZE)
        self._issue(U.SEV_CMD_LAUNCH_MEASURE, L.sev_data_launch_measure, s, handle=handle,
                    address=addr, len=X.MEASURE_SIZE)
        raw = self._read(addr, X.MEASURE_SIZE)
        return LaunchMeasure(raw[:32], raw[32:])

    def launch_secret(self, handle, header, ciphertext, guest_address):
        """LAUNCH_UPDATE_SECRET: inject a packaged secret at ``guest_address``."""
        s = self._area()
        hdr, trans = s.put(header), s.put(ciphertext)
        self._issue(U.SEV_CMD_LAUNCH_UPDATE_SECRET, L.sev_data_launch_secret, s, handle=handle,
                    hdr_address=hdr, hdr_len=len(header), guest_address=guest_address,
                    guest_len=len(ciphertext), trans_address=trans, trans_len=len(ciphertext))

    def attestation_report(self, handle, mnonce):
        """ATTESTATION_REPORT -> AttestationReport over the caller's 16-byte ``mnonce``."""
        s = self._area()
        addr = s.reserve(0xD0)
        self._issue(U.SEV_CMD_ATTESTATION_REPORT, L.sev_data_attestation_report, s,
                    handle=handle, address=addr, mnonce=bytes(mnonce), len=0xD0)
        return AttestationReport(self._read(addr, 0xD0))

    def dbg_decrypt(self, handle, src_addr, dst_addr, len):
        """DBG_DECRYPT: guest memory at ``src_addr`` to plaintext at ``dst_addr``."""
        self._issue(U.SEV_CMD_DBG_DECRYPT, L.sev_data_dbg, handle=handle, src_addr=src_addr,
                    dst_addr=dst_addr, len=len)

    def dbg_encrypt(self, handle, src_addr, dst_addr, len):
        """DBG_ENCRYPT: plaintext at ``src_addr`` into guest memory at ``dst_addr``."""
        self._issue(U.SEV_CMD_DBG_ENCRYPT, L.sev_data_dbg, handle=handle, src_addr=src_addr,
                    dst_addr=dst_addr, len=len)

    # -- migration ----------------------------------------------------------------------------------

    def send_start(self, handle, pdh_cert, plat_certs=b"", amd_certs=b""):
        """SEND_START towards the platform whose PDH is ``pdh_cert`` -> SendStart (policy and
        the 128-byte session for RECEIVE_START)."""
        s = self._area()
        pdh, plat, amd = s.put(pdh_cert), s.put(plat_certs), s.put(amd_certs)
        session = s.reserve(X.SESSION_SIZE)
        f = self._issue(U.SEV_CMD_SEND_START, L.sev_data_send_start, s, handle=handle,
                        pdh_cert_address=pdh, pdh_cert_len=len(pdh_cert),
                        plat_certs_address=plat, plat_certs_len=len(plat_certs),
                        amd_certs_address=amd, amd_certs_len=len(amd_certs),
                        session_address=session, session_len=X.SESSION_SIZE)
        return SendStart(f.policy, self._read(session, X.SESSION_SIZE))

    def _api_send_update(self, cmd, layout, handle, guest_address, guest_len):
        s = self._area()
        hdr, trans = s.reserve(X.HEADER_SIZE), s.reserve(guest_len)
        self._issue(cmd, layout, s, handle=handle, hdr_address=hdr, hdr_len=X.HEADER_SIZE,
                    guest_address=guest_address, guest_len=guest_len, trans_address=trans,
                    trans_len=guest_len)
        return Packet(self._read(hdr, X.HEADER_SIZE), self._read(trans, guest_len))

    def send_update_data(self, handle, guest_address, guest_len):
        """SEND_UPDATE_DATA of guest memory -> Packet."""
        return self._api_send_update(U.SEV_CMD_SEND_UPDATE_DATA, L.sev_data_send_update_data,
                                     handle, guest_address, guest_len)

    def send_update_vmsa(self, handle, guest_address, guest_len=4096):
        """SEND_UPDATE_VMSA (firmware layout) -> Packet."""
        return self._api_send_update(U.SEV_CMD_SEND_UPDATE_VMSA, L.sev_data_send_update_vmsa,
                                     handle, guest_address, guest_len)

    def receive_start(self, policy, pdh_cert, session, handle=0):
        """RECEIVE_START with the sender's PDH and SEND_START's session -> the new handle."""
        s = self._area()
        pdh, sess = s.put(pdh_cert), s.put(session)
        f = self._issue(U.SEV_CMD_RECEIVE_START, L.sev_data_receive_start, s, handle=handle,
                        policy=policy, pdh_cert_address=pdh, pdh_cert_len=len(pdh_cert),
                        session_address=sess, session_len=len(session))
        return f.handle

    def _api_receive_update(self, cmd, layout, handle, packet, guest_address):
        s = self._area()
        hdr, trans = s.put(packet.header), s.put(packet.ciphertext)
        n = len(packet.ciphertext)
        self._issue(cmd, layout, s, handle=handle, hdr_address=hdr, hdr_len=len(packet.header),
                    guest_address=guest_address, guest_len=n, trans_address=trans, trans_len=n)

    def receive_update_data(self, handle, packet, guest_address):
        """RECEIVE_UPDATE_DATA of a Packet into guest memory at ``guest_address``."""
        self._api_receive_update(U.SEV_CMD_RECEIVE_UPDATE_DATA, L.sev_data_receive_update_data,
                                 handle, packet, guest_address)

    def receive_update_vmsa(self, handle, packet, guest_address):
        """RECEIVE_UPDATE_VMSA of a Packet (SEV-ES)."""
        self._api_receive_update(U.SEV_CMD_RECEIVE_UPDATE_VMSA, L.sev_data_receive_update_vmsa,
                                 handle, packet, guest_address)


def _no_buffer(cmd, doc):
    def method(self):
        self._issue(cmd, None)
    method.__doc__ = doc
    return method


def _handle_only(cmd, layout, doc):
    def method(self, handle):
        self._issue(cmd, layout, handle=handle)
    method.__doc__ = doc
    return method


for _name, _cmd, _doc in [
        ("shutdown", U.SEV_CMD_SHUTDOWN, "SHUTDOWN: every guest goes, the platform is UNINIT."),
        ("factory_reset", U.SEV_CMD_FACTORY_RESET, "FACTORY_RESET (PLATFORM_RESET): delete the "
                                                   "persistent OCA/PEK/PDH (UNINIT only)."),
        ("pek_gen", U.SEV_CMD_PEK_GEN, "PEK_GEN: new OCA, PEK and PDH (INIT only)."),
        ("pdh_gen", U.SEV_CMD_PDH_GEN, "PDH_GEN: a new PDH signed by the PEK."),
        ("df_flush", U.SEV_CMD_DF_FLUSH, "DF_FLUSH: dirty ASIDs become clean (after WBINVD)."),
        ("nop", U.SEV_CMD_NOP, "NOP.")]:
    setattr(TypedApi, _name, _no_buffer(_cmd, _doc))

for _name, _cmd, _layout, _doc in [
        ("decommission", U.SEV_CMD_DECOMMISSION, L.sev_data_decommission,
         "DECOMMISSION: forget the guest (it must be deactivated)."),
        ("deactivate", U.SEV_CMD_DEACTIVATE, L.sev_data_deactivate,
         "DEACTIVATE: unbind the guest's ASID (its key leaves the memory controller)."),
        ("launch_finish", U.SEV_CMD_LAUNCH_FINISH, L.sev_data_launch_finish,
         "LAUNCH_FINISH: LSECRET -> RUNNING; the launch channel is closed."),
        ("send_finish", U.SEV_CMD_SEND_FINISH, L.sev_data_send_finish,
         "SEND_FINISH: SUPDATE -> SENT."),
        ("send_cancel", U.SEV_CMD_SEND_CANCEL, L.sev_data_send_cancel,
         "SEND_CANCEL: SUPDATE -> RUNNING."),
        ("receive_finish", U.SEV_CMD_RECEIVE_FINISH, L.sev_data_receive_finish,
         "RECEIVE_FINISH: RUPDATE -> RUNNING.")]:
    setattr(TypedApi, _name, _handle_only(_cmd, _layout, _doc))
