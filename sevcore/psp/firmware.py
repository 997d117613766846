"""The simulated SEV firmware of one Host: the mailbox, the dispatcher and the firmware's state.

``psp.command(cmd_id, buf_spa)`` is what the kernel's ``sev_do_cmd`` does: the command buffer
sits in host memory at a system physical address, the firmware copies it in, runs the command and
copies results back, and the status comes back in the CMDRESP register. Which commands write
their buffer back, and when, follows the dispatcher of AMD-ASPFW ``sev_dispatch.c``:

* input only: never;  output only (PLATFORM_STATUS): on success;
* input and output (GUEST_STATUS, LAUNCH_START, RECEIVE_START): on success only;
* input and output even on error (PEK_CSR, PDH_CERT_EXPORT, GET_ID, LAUNCH_MEASURE, ATTESTATION,
  SEND_START, SEND_UPDATE_*): on success and on INVALID_LEN, the length-query protocol;
* no buffer (SHUTDOWN, FACTORY_RESET, PEK_GEN, PDH_GEN, DF_FLUSH, NOP).

An unknown command id is INVALID_COMMAND. Addresses are SPAs; the C-bit (``host.c_bit``) is
stripped, and anything outside host memory is INVALID_ADDRESS. All randomness (keys, nonces, IVs)
comes from a DRBG seeded from ``host.seed``, so a run reproduces.
"""
from sevcore import uapi as U
from sevcore.psp import amd_root
from sevcore.psp import layout as L
from sevcore.psp.api import TypedApi
from sevcore.psp.batch import UpdatePages
from sevcore.psp.crypto import Drbg
from sevcore.psp.guests import GuestCommands
from sevcore.psp.launch import LaunchCommands
from sevcore.psp.platform import DIRTY, UNINIT, PlatformCommands
from sevcore.psp.ring import RingBufferMode
from sevcore.psp.send_receive import SendReceiveCommands
from sevcore.psp import snp_layout as SL
from sevcore.psp import snp_ma as MA
from sevcore.psp.snp import SnpCommands

IN, OUT, INOUT, INOUT_ERR, IGNORE = range(5)

#: command id -> (handler name, buffer layout, buffer class): AMD-ASPFW master_handler_table.
COMMANDS = {
    U.SEV_CMD_INIT: ("init", L.sev_data_init, IN),
    U.SEV_CMD_SHUTDOWN: ("shutdown", None, IGNORE),
    U.SEV_CMD_FACTORY_RESET: ("factory_reset", None, IGNORE),
    U.SEV_CMD_PLATFORM_STATUS: ("platform_status", L.sev_user_data_status, OUT),
    U.SEV_CMD_PEK_GEN: ("pek_gen", None, IGNORE),
    U.SEV_CMD_PEK_CSR: ("pek_csr", L.sev_data_pek_csr, INOUT_ERR),
    U.SEV_CMD_PEK_CERT_IMPORT: ("pek_cert_import", L.sev_data_pek_cert_import, IN),
    U.SEV_CMD_PDH_CERT_EXPORT: ("pdh_cert_export", L.sev_data_pdh_cert_export, INOUT_ERR),
    U.SEV_CMD_PDH_GEN: ("pdh_gen", None, IGNORE),
    U.SEV_CMD_DF_FLUSH: ("df_flush", None, IGNORE),
    U.SEV_CMD_DOWNLOAD_FIRMWARE: ("download_firmware", L.sev_data_download_firmware, IN),
    U.SEV_CMD_GET_ID: ("get_id", L.sev_data_get_id, INOUT_ERR),
    U.SEV_CMD_INIT_EX: ("init_ex", L.sev_data_init_ex, IN),
    U.SEV_CMD_NOP: ("nop", None, IGNORE),
    U.SEV_CMD_RING_BUFFER: ("ring_buffer", L.sev_data_ring_buffer, IN),
    U.SEV_CMD_DECOMMISSION: ("decommission", L.sev_data_decommission, IN),
    U.SEV_CMD_ACTIVATE: ("activate", L.sev_data_activate, IN),
    U.SEV_CMD_DEACTIVATE: ("deactivate", L.sev_data_deactivate, IN),
    U.SEV_CMD_GUEST_STATUS: ("guest_status", L.sev_data_guest_status, INOUT),
    U.SEV_CMD_COPY: ("copy", L.sev_data_copy, IN),
    U.SEV_CMD_LAUNCH_START: ("launch_start", L.sev_data_launch_start, INOUT),
    U.SEV_CMD_LAUNCH_UPDATE_DATA: ("launch_update_data", L.sev_data_launch_update_data, IN),
    U.SEV_CMD_LAUNCH_UPDATE_VMSA: ("launch_update_vmsa", L.sev_data_launch_update_vmsa, IN),
    U.SEV_CMD_LAUNCH_MEASURE: ("launch_measure", L.sev_data_launch_measure, INOUT_ERR),
    U.SEV_CMD_LAUNCH_UPDATE_SECRET: ("launch_update_secret", L.sev_data_launch_secret, IN),
    U.SEV_CMD_LAUNCH_FINISH: ("launch_finish", L.sev_data_launch_finish, IN),
    U.SEV_CMD_ATTESTATION_REPORT: ("attestation_report", L.sev_data_attestation_report,
                                   INOUT_ERR),
    U.SEV_CMD_SEND_START: ("send_start", L.sev_data_send_start, INOUT_ERR),
    U.SEV_CMD_SEND_UPDATE_DATA: ("send_update_data", L.sev_data_send_update_data, INOUT_ERR),
    U.SEV_CMD_SEND_UPDATE_VMSA: ("send_update_vmsa", L.sev_data_send_update_vmsa, INOUT_ERR),
    U.SEV_CMD_SEND_FINISH: ("send_finish", L.sev_data_send_finish, IN),
    U.SEV_CMD_SEND_CANCEL: ("send_cancel", L.sev_data_send_cancel, IN),
    U.SEV_CMD_RECEIVE_START: ("receive_start", L.sev_data_receive_start, INOUT),
    U.SEV_CMD_RECEIVE_UPDATE_DATA: ("receive_update_data", L.sev_data_receive_update_data, IN),
    U.SEV_CMD_RECEIVE_UPDATE_VMSA: ("receive_update_vmsa", L.sev_data_receive_update_vmsa, IN),
    U.SEV_CMD_RECEIVE_FINISH: ("receive_finish", L.sev_data_receive_finish, IN),
    U.SEV_CMD_DBG_DECRYPT: ("dbg_decrypt", L.sev_data_dbg, IN),
    U.SEV_CMD_DBG_ENCRYPT: ("dbg_encrypt", L.sev_data_dbg, IN),
    # SEV-SNP (AMD 56860 chapter 8): every buffer is input; outputs go to pages it names.
    U.SEV_CMD_SNP_INIT: ("snp_init", None, IGNORE),
    U.SEV_CMD_SNP_SHUTDOWN: ("snp_shutdown", None, IGNORE),
    U.SEV_CMD_SNP_PLATFORM_STATUS: ("snp_platform_status", SL.sev_data_snp_addr, IN),
    U.SEV_CMD_SNP_DF_FLUSH: ("snp_df_flush", None, IGNORE),
    U.SEV_CMD_SNP_INIT_EX: ("snp_init_ex", SL.sev_data_snp_init_ex, IN),
    U.SEV_CMD_SNP_SHUTDOWN_EX: ("snp_shutdown_ex", SL.sev_data_snp_shutdown_ex, IN),
    U.SEV_CMD_SNP_DECOMMISSION: ("snp_decommission", SL.sev_data_snp_addr, IN),
    U.SEV_CMD_SNP_ACTIVATE: ("snp_activate", SL.sev_data_snp_activate, IN),
    U.SEV_CMD_SNP_GUEST_STATUS: ("snp_guest_status", SL.sev_data_snp_guest_status, IN),
    U.SEV_CMD_SNP_GCTX_CREATE: ("snp_gctx_create", SL.sev_data_snp_addr, IN),
    U.SEV_CMD_SNP_GUEST_REQUEST: ("snp_guest_request", SL.sev_data_snp_guest_request, IN),
    U.SEV_CMD_SNP_LAUNCH_START: ("snp_launch_start", SL.sev_data_snp_launch_start, IN),
    U.SEV_CMD_SNP_LAUNCH_UPDATE: ("snp_launch_update", SL.sev_data_snp_launch_update, IN),
    U.SEV_CMD_SNP_LAUNCH_FINISH: ("snp_launch_finish", SL.sev_data_snp_launch_finish, IN),
    U.SEV_CMD_SNP_DBG_DECRYPT: ("snp_dbg_decrypt", SL.sev_data_snp_dbg, IN),
    U.SEV_CMD_SNP_DBG_ENCRYPT: ("snp_dbg_encrypt", SL.sev_data_snp_dbg, IN),
    U.SEV_CMD_SNP_PAGE_RECLAIM: ("snp_page_reclaim", SL.sev_data_snp_page_reclaim, IN),
    U.SEV_CMD_SNP_PAGE_SWAP_OUT: ("snp_page_swap_out", MA.sev_data_snp_page_swap_out, IN),
    U.SEV_CMD_SNP_PAGE_SWAP_IN: ("snp_page_swap_in", MA.sev_data_snp_page_swap_in, IN),
}


class Psp(PlatformCommands, GuestCommands, LaunchCommands, SendReceiveCommands, RingBufferMode,
          UpdatePages, TypedApi, SnpCommands):
    """The SEV firmware (PSP) of one Host.

    ``command(cmd_id, buf_spa)`` is the raw mailbox; the typed methods (``launch_start``,
    ``send_update_data``, ...) build the same buffers in a scratch area of host memory, call it,
    and raise PspError on a non-zero status. Construction is cheap: keys are made at INIT.

    ``api_major``/``api_minor``/``build`` are those of the firmware read (AMD-ASPFW, Genoa,
    1.55 build 25). ``max_sev_asid``/``min_sev_asid`` are CPUID 0x8000001F ECX/EDX: SEV-ES guests
    use ASIDs [1, min_sev_asid), SEV guests [min_sev_asid, max_sev_asid].
    """

    api_major = 1
    api_minor = 55
    build = 25

    def __init__(self, host, *, max_sev_asid=509, min_sev_asid=100,
                 memory_encryption_enabled=True):
        if not 1 <= min_sev_asid <= max_sev_asid:
            raise ValueError("need 1 <= min_sev_asid <= max_sev_asid")
        self.host = host
        self.max_sev_asid = max_sev_asid
        self.min_sev_asid = min_sev_asid
        #: INIT checks that SME is on for every core and UMC (else HWSEV_RET_PLATFORM).
        self.memory_encryption_enabled = memory_encryption_enabled
        #: The ARK this part trusts (its key id and public-key hash are fused).
        self.fused_ark_id = amd_root.ARK_KEY_ID
        self.fused_ark_hash = amd_root.ARK_PUBKEY_HASH
        self.state = UNINIT
        self.config_flags = 0
        self._guests = {}
        self._identity = None           # live identity between INIT and SHUTDOWN
        self._spi = None                # persistent identity in SPI flash
        self._nv = 0                    # INIT_EX NV area in use, 0 for SPI
        self._cek = None
        self._cek_signed = None
        self._drbg = None
        self._asid_state = bytearray([DIRTY]) * (max_sev_asid + 1)
        self._wbinvd_done = False
        self._tmr = None
        self._tmr_ready = False
        self._tmr_crc = {}
        self._rb = None
        self._scratch = None
        self._snp_setup()

    def __repr__(self):
        return f"<Psp state={self.state} guests={len(self._guests)}>"

    # -- the mailbox ----------------------------------------------------------------------------------

    def command(self, cmd, buf_spa=0):
        """Run firmware command ``cmd`` with its buffer at ``buf_spa``; returns the status.

        Mirrors the kernel's ``sev_do_cmd``. While ring-buffer mode is on, writing a command to
        the mailbox leaves ring-buffer mode instead: the command is not run and the status is
        EXIT_RING_BUFFER (``sev_uapp`` main loop)."""
        if self.rb_enabled:
            self._rb_disable()
            return U.SEV_RET_EXIT_RING_BUFFER
        return self._dispatch(cmd, buf_spa)

    def _dispatch(self, cmd, buf_spa):
        entry = COMMANDS.get(cmd)
        if entry is None:
            return U.SEV_RET_INVALID_COMMAND
        name, layout, kind = entry
        handler = getattr(self, "_cmd_" + name)
        if kind == IGNORE:
            return handler(None)
        spa = self._addr(buf_spa)
        if not self._valid(spa, layout.size):
            return U.SEV_RET_INVALID_ADDRESS
        buf = bytearray(layout.size) if kind == OUT else bytearray(self._read(spa, layout.size))
        status = handler(layout.view(buf))
        if status == U.SEV_RET_SUCCESS and kind != IN:
            self._write(spa, buf)
        elif status == U.SEV_RET_INVALID_LEN and kind == INOUT_ERR:
            self._write(spa, buf)
        return status

    # -- host memory as the firmware sees it ---------------------------------------------------------

    def _addr(self, addr):
        return addr & ~(1 << self.host.c_bit)

    def _valid(self, spa, size):
        return 0 <= spa and spa + size <= self.host.mem.size

    def _read(self, spa, size):
        return self.host.umc.read(spa, size, 0)

    def _write(self, spa, data):
        self.host.umc.write(spa, data, 0)

    def _rng(self, n):
        if self._drbg is None:
            self._drbg = Drbg(self.host.seed)
        return self._drbg(n)
