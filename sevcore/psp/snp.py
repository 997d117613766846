"""The SEV-SNP half of the firmware: the SNP platform, guest contexts, launch, guest requests,
debug and page reclaim (AMD SEV Secure Nested Paging Firmware ABI Specification, publication
56860, chapter 8: each handler names its section).

An SNP guest is known by the host page that holds its context (``gctx_paddr``): the hypervisor
gives the firmware a page it turned into a firmware page in the RMP (the kernel's
``snp_alloc_firmware_page``, here :meth:`SnpCommands.snp_alloc_firmware_page`) and SNP_GCTX_CREATE
makes it a guest context. The SEV and SNP platforms coexist as 56860 section 5.1 allows: SNP_INIT
must come while the SEV platform is UNINIT (the kernel runs it first, ``__sev_platform_init_locked``
after ``__sev_snp_init_locked``), and SEV INIT may follow; from SNP_INIT on the RMP is enforced
(``host.umc.rmp``) and SEV, SEV-ES and SNP guests share the ASID space, SNP and SEV-ES guests
below ``min_sev_asid``.

The launch digest is the SHA-384 chain of 56860 section 8.17 ("PAGE_INFO"): each page updates
it with ``SHA-384(digest || contents || length, type, IMI, VMPL3..1 permissions || GPA)``, the
contents being the SHA-384 of the page for NORMAL and VMSA pages and zero for the others, the GPA
the one in the page's RMP entry.
"""
import hashlib
import struct

import numpy as np

from sevcore import uapi as U
from sevcore._bindings import sha384_pages, snp_ld_extend
from sevcore.core.arrays import runs
from sevcore.hw.rmp import RmpEntry
from sevcore.psp import attest as A
from sevcore.psp import snp_layout as S
from sevcore.psp.snp_ma import NO_MA, NO_MA_REPORT_ID, SnpMaMessages
from sevcore.psp.crypto import kdf
from sevcore.psp.platform import ALLOCATED, CLEAN, DIRTY, IN_USE
from sevcore.psp.status import PspError

PAGE = 4096
SNP_UNINIT, SNP_INIT = 0, 1
GSTATE_INIT = U.SNP_GUEST_STATE_INIT
GSTATE_LAUNCH = U.SNP_GUEST_STATE_LAUNCH
GSTATE_RUNNING = U.SNP_GUEST_STATE_RUNNING
#: Policy bits this firmware knows (56860 "Guest Policy"); any other set bit is refused.
POLICY_KNOWN = (U.SNP_POLICY_MASK_BASE | U.SNP_POLICY_MASK_CXL_ALLOW
                | U.SNP_POLICY_MASK_MEM_AES_256_XTS | U.SNP_POLICY_MASK_RAPL_DIS
                | U.SNP_POLICY_MASK_CIPHERTEXT_HIDING_DRAM | U.SNP_POLICY_MASK_PAGE_SWAP_DISABLE)
#: Derived-key request fields (56860 "MSG_KEY_REQ" GUEST_FIELD_SELECT).
KEY_FIELDS_MASK = 0x3F
_ZERO48 = bytes(48)


#: PAGE_INFO after the two digests (56860 8.17 "PAGE_INFO"), one record per page.
_TAIL_DTYPE = np.dtype([("length", "<u2"), ("page_type", "u1"), ("imi_page", "u1"),
                        ("vmpl3_perms", "u1"), ("vmpl2_perms", "u1"), ("vmpl1_perms", "u1"),
                        ("rsvd", "u1"), ("gpa", "<u8")])


def _chain(ld, frames, pfns, gpas, page_type, perms):
    """The launch digest after PAGE_INFO updates for the pages ``pfns`` at ``gpas``: each page's
    ``SHA-384(ld || contents || tail)`` in order, contents the SHA-384 of the page for NORMAL
    and VMSA pages, zero for the rest. The pages are hashed several at a time, one per vector
    lane, and the chain is extended in C (csrc/snp_ld.c; its twin is
    sevcore/_reference/snp_ld.py)."""
    tails = np.zeros(len(pfns), _TAIL_DTYPE)
    tails["length"] = S.snp_page_info.size
    tails["page_type"] = page_type
    tails["vmpl3_perms"], tails["vmpl2_perms"], tails["vmpl1_perms"] = perms
    tails["gpa"] = gpas
    contents = None
    if page_type in (U.SNP_PAGE_TYPE_NORMAL, U.SNP_PAGE_TYPE_VMSA):
        contents = sha384_pages(frames, np.ascontiguousarray(pfns, np.uint64))
    return snp_ld_extend(ld, contents, tails.tobytes())


class SnpGuest:
    """One SNP guest context (56860 "Guest Context")."""

    def __init__(self, gctx_pfn):
        self.gctx_pfn = gctx_pfn
        self.state = GSTATE_INIT
        self.policy = 0
        self.asid = 0
        self.ld = _ZERO48
        self.vek = b""
        self.vmpck = [b""] * U.VMPCK_MAX_NUM
        self.msg_count = [0] * U.VMPCK_MAX_NUM
        self.gosvw = bytes(16)
        self.desired_tsc_khz = 0
        self.host_data = bytes(32)
        self.id_block_en = self.author_key_en = self.vcek_disabled = 0
        self.family_id = self.image_id = bytes(16)
        self.guest_svn = 0
        self.id_key_digest = self.author_key_digest = _ZERO48
        self.report_id = bytes(32)
        self.launch_tcb = 0
        self.vmsa_pfns = []
        # Migration (56860 7.4-7.8, sevcore.psp.snp_ma): the agent's context page (NO_MA:
        # none) and REPORT_ID, the IMI flag, the offline encryption key, the VM root key, the
        # IMI digest, the root metadata entry and the OEK's IV count.
        self.ma_pfn = NO_MA
        self.report_id_ma = NO_MA_REPORT_ID
        self.imi_en = 0
        self.oek = self.vmrk = bytes(32)
        self.imd = _ZERO48
        self.root_md = bytes(64)
        self.oek_iv_count = 0


class SnpCommands(SnpMaMessages):
    """Mixin of Psp: the SEV-SNP platform and guest commands."""

    #: The TCB this chip runs and reports (boot loader, TEE, SNP firmware, microcode SPLs).
    snp_tcb = A.tcb_version(9, 0, 23, 72)
    #: CPUID family/model/stepping of the part (Genoa: 19h / 11h / 1), in reports version 3.
    cpuid_fms = (0x19, 0x11, 0x01)
    #: SMT is on for this host (PLATFORM_INFO bit 0): a policy without SMT is refused.
    smt_enabled = True
    #: Sockets of this host: a SINGLE_SOCKET policy is refused on more than one.
    sockets = 1

    def _snp_setup(self):
        self.snp_state = SNP_UNINIT
        self._snp_guests = {}
        self.rmp_initialized = False

    # -- host pages the firmware owns ------------------------------------------------------------

    @property
    def rmp(self):
        return self.host.rmp

    def _fw_page(self, spa):
        """True if the frame at ``spa`` is a firmware page (assigned, ASID 0, immutable)."""
        e = self.rmp.entry(spa >> 12)
        return e.assigned and e.asid == 0 and e.immutable and not e.pagesize

    def _fw_write(self, spa, data):
        """The firmware writes host memory as it is (its own pages are never host-checked)."""
        self.host.mem.write(spa, data)

    def snp_alloc_firmware_page(self):
        """A zeroed host page turned into a firmware page: the kernel's
        ``snp_alloc_firmware_page`` (drivers/crypto/ccp/sev-dev.c), ``rmp_mark_pages_firmware``
        once SNP is initialized. Returns its SPA."""
        spa = self.host.mem.alloc_contiguous(1)
        if self.snp_state == SNP_INIT:
            status = self.rmp.rmp_make_private(spa >> 12, 0, 0, immutable=True)
            if status:
                raise OSError(5, f"RMPUPDATE of the firmware page failed ({status})")
        return spa

    def snp_free_firmware_page(self, spa):
        """``snp_free_firmware_page``: SNP_PAGE_RECLAIM, RMPUPDATE back to the hypervisor, free.
        Raises PspError if the firmware will not give the page back (it is then leaked, as the
        kernel leaks it)."""
        if self.rmp.entry(spa >> 12).assigned:
            self.snp_page_reclaim(spa)
            self.rmp.rmp_make_shared(spa >> 12)
        self.host.mem.free(np.array([spa >> 12], np.uint64))

    # -- the platform (56860 8.2-8.9) ------------------------------------------------------------

    def _snp_init_common(self, init_rmp=1, list_paddr_en=0, list_paddr=0):
        """SNP_INIT / SNP_INIT_EX (56860 8.8, 8.9): only while SEV is UNINIT; the RMP is
        enforced from here on."""
        if self.snp_state != SNP_UNINIT or self.state != U.SEV_STATE_UNINIT:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        if list_paddr_en and not self._valid(self._addr(list_paddr), 8):
            return U.SEV_RET_INVALID_ADDRESS
        # Nothing may be assigned when the RMP is (re)initialized (56860 8.8: RMP_INIT_FAILED).
        if init_rmp and self.rmp.next_assigned(0, self.rmp.nframes) < self.rmp.nframes:
            return U.SEV_RET_RMP_INITIALIZATION_FAILED
        self.snp_state = SNP_INIT
        self.rmp_initialized = True
        self.host.umc.rmp = self.rmp
        return U.SEV_RET_SUCCESS

    def _cmd_snp_init(self, _):
        return self._snp_init_common()

    def _cmd_snp_init_ex(self, f):
        if f.rsvd or f.rsvd1 or any(f.rsvd2) or f.tio_en or f.rapl_dis or f.ciphertext_hiding_en:
            return U.SEV_RET_INVALID_PARAM
        return self._snp_init_common(f.init_rmp, f.list_paddr_en, f.list_paddr)

    def _snp_shutdown_common(self):
        """SNP_SHUTDOWN(_EX) (56860 8.10): after SEV's SHUTDOWN, and with no SNP guest left."""
        if self.state != U.SEV_STATE_UNINIT:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        if self._snp_guests:
            return U.SEV_RET_ACTIVE
        self.snp_state = SNP_UNINIT
        self.host.umc.rmp = None
        return U.SEV_RET_SUCCESS

    def _cmd_snp_shutdown(self, _):
        return self._snp_shutdown_common()

    def _cmd_snp_shutdown_ex(self, f):
        if f.len != S.sev_data_snp_shutdown_ex.size:
            return U.SEV_RET_INVALID_LEN
        return self._snp_shutdown_common()

    def _cmd_snp_df_flush(self, _):
        """SNP_DF_FLUSH (56860 8.12): as DF_FLUSH, for the SNP platform."""
        if self.snp_state != SNP_INIT:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        return self._cmd_df_flush(None)

    def _cmd_snp_platform_status(self, f):
        """SNP_PLATFORM_STATUS (56860 8.3): the status goes to the page at ``address``, which
        must be a firmware page once SNP is initialized (else INVALID_PAGE_STATE)."""
        spa = self._addr(f.address)
        if spa % PAGE:
            return U.SEV_RET_INVALID_ADDRESS
        if not self._valid(spa, PAGE):
            return U.SEV_RET_INVALID_ADDRESS
        if self.snp_state == SNP_INIT and not self._fw_page(spa):
            return U.SEV_RET_INVALID_PAGE_STATE
        out = S.sev_user_data_snp_status.pack(
            api_major=self.api_major, api_minor=self.api_minor, state=self.snp_state,
            is_rmp_initialized=int(self.rmp_initialized), build_id=self.build,
            guest_count=len(self._snp_guests), current_tcb_version=self.snp_tcb,
            reported_tcb_version=self.snp_tcb)
        self._fw_write(spa, out)
        return U.SEV_RET_SUCCESS

    # -- guest contexts (56860 8.13-8.16) ---------------------------------------------------------

    def _snp_guest(self, gctx_paddr, *states):
        """(status, guest): SNP initialized, a context page that is one, in one of ``states``."""
        if self.snp_state != SNP_INIT:
            return U.SEV_RET_INVALID_PLATFORM_STATE, None
        spa = self._addr(gctx_paddr)
        if spa % PAGE or not self._valid(spa, PAGE):
            return U.SEV_RET_INVALID_ADDRESS, None
        g = self._snp_guests.get(spa >> 12)
        if g is None:
            return U.SEV_RET_INVALID_GUEST, None
        if states and g.state not in states:
            return U.SEV_RET_INVALID_GUEST_STATE, None
        return U.SEV_RET_SUCCESS, g

    def _cmd_snp_gctx_create(self, f):
        """SNP_GCTX_CREATE (56860 8.13): the page at ``address`` must be a firmware page."""
        if self.snp_state != SNP_INIT:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        spa = self._addr(f.address)
        if spa % PAGE or not self._valid(spa, PAGE):
            return U.SEV_RET_INVALID_ADDRESS
        if not self._fw_page(spa) or (spa >> 12) in self._snp_guests:
            return U.SEV_RET_INVALID_PAGE_STATE
        self._snp_guests[spa >> 12] = SnpGuest(spa >> 12)
        self._fw_write(spa, bytes(PAGE))
        return U.SEV_RET_SUCCESS

    def _cmd_snp_decommission(self, f):
        """SNP_DECOMMISSION (56860 8.14): the context goes, the ASID's key leaves the memory
        controllers and the ASID needs a flush before it is used again. The context page stays
        a firmware page until SNP_PAGE_RECLAIM."""
        status, g = self._snp_guest(f.address)
        if status:
            return status
        if g.asid:
            self.host.umc.remove_key(g.asid)
            self._asid_state[g.asid] = DIRTY
            self._wbinvd_done = False
        del self._snp_guests[g.gctx_pfn]
        return U.SEV_RET_SUCCESS

    def _cmd_snp_activate(self, f):
        """SNP_ACTIVATE (56860 8.15): bind an ASID of the SEV-ES/SNP range, clean (DF_FLUSH
        done) and unowned; the guest's memory key goes into the memory controllers."""
        status, g = self._snp_guest(f.gctx_paddr, GSTATE_LAUNCH, GSTATE_RUNNING)
        if status:
            return status
        asid = f.asid
        if not 1 <= asid < self.min_sev_asid:
            return U.SEV_RET_INVALID_ASID
        if g.asid:
            return U.SEV_RET_ACTIVE
        if self._asid_state[asid] in (IN_USE, ALLOCATED):
            return U.SEV_RET_ASID_OWNED
        if self._asid_state[asid] == DIRTY:
            return U.SEV_RET_DFFLUSH_REQUIRED
        if self._asid_state[asid] != CLEAN:
            return U.SEV_RET_ASID_OWNED
        self.host.umc.install_key(asid, g.vek[:self.host.umc.key_len])
        self._asid_state[asid] = IN_USE
        g.asid = asid
        return U.SEV_RET_SUCCESS

    def _cmd_snp_guest_status(self, f):
        """SNP_GUEST_STATUS (56860 8.16): policy, ASID, state and VCEK use, to a firmware page."""
        status, g = self._snp_guest(f.gctx_paddr)
        if status:
            return status
        spa = self._addr(f.address)
        if spa % PAGE or not self._valid(spa, PAGE):
            return U.SEV_RET_INVALID_ADDRESS
        if not self._fw_page(spa):
            return U.SEV_RET_INVALID_PAGE_STATE
        self._fw_write(spa, S.snp_guest_status.pack(policy=g.policy, asid=g.asid, state=g.state,
                                                    vcek_dis=g.vcek_disabled))
        return U.SEV_RET_SUCCESS

    def _cmd_snp_page_reclaim(self, f):
        """SNP_PAGE_RECLAIM (56860 8.24): a firmware page no context uses, or a guest page
        (Pre-Guest or of a decommissioned guest), goes back to the hypervisor's state. Bit 0 of
        ``paddr`` is the page size; 2 MiB pages are not reclaimed here (INVALID_PARAM)."""
        if self.snp_state != SNP_INIT:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        if f.paddr & 1:
            return U.SEV_RET_INVALID_PARAM
        spa = self._addr(f.paddr)
        if spa % PAGE or not self._valid(spa, PAGE):
            return U.SEV_RET_INVALID_ADDRESS
        pfn = spa >> 12
        e = self.rmp.entry(pfn)
        if not e.assigned or pfn in self._snp_guests:
            return U.SEV_RET_INVALID_PAGE_STATE
        live = {g.asid for g in self._snp_guests.values() if g.state == GSTATE_RUNNING}
        if e.asid and e.asid in live and not e.immutable:
            return U.SEV_RET_INVALID_PAGE_STATE
        self.rmp.fw_set(pfn, RmpEntry(0, 0, 0, 0, 0, 0, 0, 0))
        return U.SEV_RET_SUCCESS

    # -- launch (56860 8.17-8.19) -----------------------------------------------------------------

    def _cmd_snp_launch_start(self, f):
        """SNP_LAUNCH_START (56860 8.17): the policy is checked against this platform (ABI
        version, SMT, single socket, reserved bits); the guest's keys are made."""
        status, g = self._snp_guest(f.gctx_paddr, GSTATE_INIT)
        if status:
            return status
        if f.rsvd:
            return U.SEV_RET_INVALID_PARAM
        status = self._snp_policy_ok(f.policy)
        if status:
            return status
        status, ma = self._ma_launch_check(f)
        if status:
            return status
        g.policy = f.policy
        g.gosvw = bytes(f.gosvw)
        g.desired_tsc_khz = f.desired_tsc_khz
        g.vek = self._new_vek()
        g.vmpck = [self._rng(U.VMPCK_KEY_LEN) for _ in range(U.VMPCK_MAX_NUM)]
        g.report_id = self._rng(32)
        g.launch_tcb = self.snp_tcb
        g.ld = _ZERO48
        self._ma_bind(g, ma, f.imi_en)
        g.state = GSTATE_LAUNCH
        return U.SEV_RET_SUCCESS

    def _snp_policy_ok(self, policy):
        if not policy & U.SNP_POLICY_MASK_RSVD_MBO or policy & ~POLICY_KNOWN:
            return U.SEV_RET_INVALID_PARAM
        major = (policy & U.SNP_POLICY_MASK_API_MAJOR) >> 8
        minor = policy & U.SNP_POLICY_MASK_API_MINOR
        if (major, minor) > (self.api_major, self.api_minor):
            return U.SEV_RET_POLICY_FAILURE
        if self.smt_enabled and not policy & U.SNP_POLICY_MASK_SMT:
            return U.SEV_RET_POLICY_FAILURE
        if self.sockets > 1 and policy & U.SNP_POLICY_MASK_SINGLE_SOCKET:
            return U.SEV_RET_POLICY_FAILURE
        if policy & (U.SNP_POLICY_MASK_CXL_ALLOW | U.SNP_POLICY_MASK_MEM_AES_256_XTS
                     | U.SNP_POLICY_MASK_RAPL_DIS | U.SNP_POLICY_MASK_CIPHERTEXT_HIDING_DRAM):
            return U.SEV_RET_POLICY_FAILURE    # features this platform does not offer
        return U.SEV_RET_SUCCESS

    def _launch_update_gate(self, f):
        """(status, guest) for SNP_LAUNCH_UPDATE's buffer: state, ASID, page type and size,
        address, VMPL permissions."""
        status, g = self._snp_guest(f.gctx_paddr, GSTATE_LAUNCH)
        if status:
            return status, None
        if not g.asid:
            return U.SEV_RET_INACTIVE, None
        if not U.SNP_PAGE_TYPE_NORMAL <= f.page_type < U.SNP_PAGE_TYPE_MAX or f.imi_page \
                or f.rsvd or f.rsvd2 or f.rsvd3 or f.rsvd4:
            return U.SEV_RET_INVALID_PARAM, None
        if f.page_size:
            return U.SEV_RET_INVALID_PAGE_SIZE, None     # 4 KiB pages only (docs/snp.md)
        if max(f.vmpl1_perms, f.vmpl2_perms, f.vmpl3_perms) > U.VMPL_PERM_ALL:
            return U.SEV_RET_INVALID_PARAM, None
        if f.page_type == U.SNP_PAGE_TYPE_VMSA and (f.vmpl1_perms or f.vmpl2_perms
                                                    or f.vmpl3_perms):
            return U.SEV_RET_INVALID_PARAM, None
        spa = self._addr(f.address)
        if spa % PAGE or not self._valid(spa, PAGE):
            return U.SEV_RET_INVALID_ADDRESS, None
        return U.SEV_RET_SUCCESS, g

    def _cmd_snp_launch_update(self, f):
        """SNP_LAUNCH_UPDATE (56860 8.18): one 4 KiB page in the Pre-Guest state of the guest's
        ASID (what ``rmp_make_private(..., immutable=true)`` leaves) is measured, encrypted in
        place with the guest's key and made Guest-Valid (validated, unlocked)."""
        status, g = self._launch_update_gate(f)
        if status:
            return status
        spa = self._addr(f.address)
        return self._launch_pages(g, np.array([spa >> 12], np.uint64), f.page_type,
                                  (f.vmpl3_perms, f.vmpl2_perms, f.vmpl1_perms))[0]

    def _launch_pages(self, g, pfns, page_type, perms=(0, 0, 0)):
        """Run SNP_LAUNCH_UPDATE on each of ``pfns`` in order, with the result of running them
        one by one; returns (status, pages done)."""
        rmp, umc = self.rmp, self.host.umc
        ok = rmp.preguest_prefix(pfns, g.asid)
        todo = pfns[:ok]
        gpas = rmp.gpas(todo)
        status = U.SEV_RET_SUCCESS if ok == len(pfns) else U.SEV_RET_INVALID_PAGE_STATE
        frames = memoryview(self.host.mem.frames)
        if page_type == U.SNP_PAGE_TYPE_CPUID:
            for n, pfn in enumerate(todo.tolist()):
                page = bytearray(frames[pfn << 12:(pfn + 1) << 12])
                if not self._cpuid_check(page):
                    self._fw_write(pfn << 12, page)      # the corrected values, in plaintext
                    todo, gpas = todo[:n], gpas[:n]
                    status = U.SEV_RET_INVALID_PARAM
                    break
        g.ld = _chain(g.ld, frames, todo, gpas, page_type, perms)
        if page_type in (U.SNP_PAGE_TYPE_ZERO, U.SNP_PAGE_TYPE_SECRET):
            body = bytes(PAGE) if page_type == U.SNP_PAGE_TYPE_ZERO else self._secrets_page(g)
            for pfn in todo.tolist():
                umc.write(pfn << 12, body, g.asid)
        else:
            self._encrypt_pages(todo, g.asid)
        rmp.fw_validate(todo, g.asid, vmsa=page_type == U.SNP_PAGE_TYPE_VMSA)
        for vmpl, p in zip((3, 2, 1), perms):
            if p:
                rmp.adjust_pages(todo, gpas, asid=g.asid, target_vmpl=vmpl, perms=p)
        if page_type == U.SNP_PAGE_TYPE_VMSA:
            g.vmsa_pfns.extend(todo.tolist())
        return status, len(todo)

    def _encrypt_pages(self, pfns, asid):
        """Encrypt the pages in place with ``asid``'s key: runs of frames in one engine call."""
        if not len(pfns):
            return
        umc = self.host.umc
        for start, n in runs(pfns):
            umc.encrypt_in_place(int(pfns[start]) << 12, n << 12, asid)

    def _secrets_page(self, g):
        """The secrets page the firmware writes for a SECRETS page (56860 8.18 "Secrets Page";
        arch/x86/include/asm/sev.h ``struct snp_secrets_page``): version 2, the family/model/
        stepping, the guest's OS-visible workarounds and VMPCK0..3."""
        fam, mod, step = self.cpuid_fms
        fms = (step & 0xF) | (mod & 0xF) << 4 | (fam & 0xF) << 8 | ((mod >> 4) & 0xF) << 16 \
            | (max(fam - 0xF, 0) & 0xFF) << 20
        body = S.snp_secrets_page.pack(version=2, fms=fms, gosvw=g.gosvw, vmpck0=g.vmpck[0],
                                       vmpck1=g.vmpck[1], vmpck2=g.vmpck[2], vmpck3=g.vmpck[3])
        return body.ljust(PAGE, b"\0")

    def _cpuid_check(self, page):
        """The CPUID page check (56860 8.18.2 "CPUID Page"): each function's values are checked
        against what this CPU reports and may report; a value outside that is corrected in
        ``page`` and the check fails. A count over 64 fails with nothing to correct."""
        head = S.snp_cpuid_table.unpack(page)
        count = head["count"]
        if count > S.SNP_CPUID_COUNT_MAX:
            return False
        ok = True
        size = S.snp_cpuid_fn.size
        for i in range(count):
            off = S.snp_cpuid_table.size + i * size
            fn = S.snp_cpuid_fn.unpack(page[off:off + size])
            allowed = self.cpuid_allowed(fn["eax_in"], fn["ecx_in"])
            if allowed is None:
                continue
            fixed = {r: fn[r] & allowed[r] for r in ("eax", "ebx", "ecx", "edx")}
            if fixed != {r: fn[r] for r in fixed}:
                ok = False
                fn.update(fixed)
                page[off:off + size] = S.snp_cpuid_fn.pack(**fn)
        return ok

    #: Bits of each CPUID function a guest may be told it has (leaf, subleaf) -> register masks.
    #: Functions not listed pass unchecked (docs/snp.md says which the simulation checks).
    CPUID_ALLOWED = {
        (0x1, 0): {"eax": 0x0FFF3FFF, "ebx": 0xFFFFFFFF, "ecx": 0xFEFA3203, "edx": 0x178BFBFF},
        (0x7, 0): {"eax": 0xFFFFFFFF, "ebx": 0xF1BF07AB, "ecx": 0x405FCE4E, "edx": 0x00000010},
        (0x80000001, 0): {"eax": 0x0FFF3FFF, "ebx": 0xF0000000, "ecx": 0x75C237FF,
                          "edx": 0x2FD3FBFF},
        (0x8000001F, 0): {"eax": 0x0001FFFF, "ebx": 0x0000FFFF, "ecx": 0xFFFFFFFF,
                          "edx": 0xFFFFFFFF},
    }

    def cpuid_allowed(self, eax_in, ecx_in):
        """The masks of CPUID function (eax_in, ecx_in) the CPUID check holds values to, or
        None for a function it lets through."""
        return self.CPUID_ALLOWED.get((eax_in, ecx_in if eax_in == 0x7 else 0))

    def _cmd_snp_launch_finish(self, f):
        """SNP_LAUNCH_FINISH (56860 8.19): with an ID block, its signature by the ID key (and
        the ID key's by the author key) is checked, then the expected launch digest
        (BAD_MEASUREMENT) and policy (POLICY_FAILURE); the guest runs."""
        status, g = self._snp_guest(f.gctx_paddr, GSTATE_LAUNCH)
        if status:
            return status
        if f.rsvd:
            return U.SEV_RET_INVALID_PARAM
        idb = None
        id_digest = author_digest = _ZERO48
        if f.id_block_en:
            status, idb, id_digest, author_digest = self._check_id(f, g)
            if status:
                return status
        elif f.auth_key_en:
            return U.SEV_RET_INVALID_PARAM
        if idb is not None:
            g.family_id, g.image_id = idb["family_id"], idb["image_id"]
            g.guest_svn = idb["guest_svn"]
        g.id_block_en, g.author_key_en = f.id_block_en, f.auth_key_en
        g.id_key_digest, g.author_key_digest = id_digest, author_digest
        g.vcek_disabled = f.vcek_disabled
        g.host_data = bytes(f.host_data)
        g.state = GSTATE_RUNNING
        return U.SEV_RET_SUCCESS

    def _check_id(self, f, g):
        blk_spa, auth_spa = self._addr(f.id_block_paddr), self._addr(f.id_auth_paddr)
        if not (self._valid(blk_spa, S.snp_id_block.size)
                and self._valid(auth_spa, S.snp_id_auth.size)):
            return U.SEV_RET_INVALID_ADDRESS, None, None, None
        raw_blk = self._read(blk_spa, S.snp_id_block.size)
        idb = S.snp_id_block.unpack(raw_blk)
        auth = S.snp_id_auth.unpack(self._read(auth_spa, S.snp_id_auth.size))
        if auth["id_key_algo"] != A.SIG_ALGO_ECDSA_P384_SHA384 or \
                (f.auth_key_en and auth["auth_key_algo"] != A.SIG_ALGO_ECDSA_P384_SHA384):
            return U.SEV_RET_INVALID_PARAM, None, None, None
        curve, id_point = A.pubkey_point(auth["id_key"])
        if curve != 2 or not A.verify(id_point, raw_blk, *A.sig_values(auth["id_block_sig"])):
            return U.SEV_RET_BAD_SIGNATURE, None, None, None
        author_digest = _ZERO48
        if f.auth_key_en:
            curve, au_point = A.pubkey_point(auth["author_key"])
            if curve != 2 or not A.verify(au_point, auth["id_key"],
                                          *A.sig_values(auth["id_key_sig"])):
                return U.SEV_RET_BAD_SIGNATURE, None, None, None
            author_digest = hashlib.sha384(auth["author_key"]).digest()
        if idb["ld"] != g.ld:
            return U.SEV_RET_BAD_MEASUREMENT, None, None, None
        if idb["policy"] != g.policy or idb["version"] != 1:
            return U.SEV_RET_POLICY_FAILURE, None, None, None
        return U.SEV_RET_SUCCESS, idb, hashlib.sha384(auth["id_key"]).digest(), author_digest

    # -- debug (56860 8.20, 8.21) -----------------------------------------------------------------

    def _snp_dbg(self, f, encrypt):
        """SNP_DBG_DECRYPT / SNP_DBG_ENCRYPT of one 4 KiB page: the guest's policy must allow
        debugging; the guest page must be the guest's, the other a firmware page."""
        status, g = self._snp_guest(f.gctx_paddr, GSTATE_LAUNCH, GSTATE_RUNNING)
        if status:
            return status
        if not g.policy & U.SNP_POLICY_MASK_DEBUG:
            return U.SEV_RET_POLICY_FAILURE
        if not g.asid:
            return U.SEV_RET_INACTIVE
        src, dst = self._addr(f.src_addr), self._addr(f.dst_addr)
        if src % PAGE or dst % PAGE or not (self._valid(src, PAGE) and self._valid(dst, PAGE)):
            return U.SEV_RET_INVALID_ADDRESS
        guest_spa, plain_spa = (dst, src) if encrypt else (src, dst)
        e = self.rmp.entry(guest_spa >> 12)
        if not e.assigned or e.asid != g.asid or not self._fw_page(plain_spa):
            return U.SEV_RET_INVALID_PAGE_STATE
        umc = self.host.umc
        if encrypt:
            umc.write(dst, self._read(src, PAGE), g.asid)
        else:
            self._fw_write(dst, umc.read(src, PAGE, g.asid))
        return U.SEV_RET_SUCCESS

    def _cmd_snp_dbg_decrypt(self, f):
        return self._snp_dbg(f, False)

    def _cmd_snp_dbg_encrypt(self, f):
        return self._snp_dbg(f, True)

    # -- guest requests (56860 8.26, chapter 7) ---------------------------------------------------

    def _cmd_snp_guest_request(self, f):
        """SNP_GUEST_REQUEST (56860 8.26): the request page (hypervisor memory) holds a message
        sealed under a VMPCK with the next sequence number of that key; the answer, sealed with
        the one after, goes to the response page, which must be a firmware page. A message that
        does not authenticate or is out of sequence is refused (INVALID_PARAM) and changes
        nothing: no sequence number is used up."""
        status, g = self._snp_guest(f.gctx_paddr, GSTATE_RUNNING)
        if status:
            return status
        req, res = self._addr(f.req_paddr), self._addr(f.res_paddr)
        if req % PAGE or res % PAGE or not (self._valid(req, PAGE) and self._valid(res, PAGE)):
            return U.SEV_RET_INVALID_ADDRESS
        if not self._fw_page(res):
            return U.SEV_RET_INVALID_PAGE_STATE
        page = self._read(req, PAGE)
        h = A.msg_header(page)
        vmpck_id = h["msg_vmpck"]
        if vmpck_id >= U.VMPCK_MAX_NUM:
            return U.SEV_RET_INVALID_PARAM
        if g.msg_count[vmpck_id] >= (1 << 64) - 2:
            return U.SEV_RET_AEAD_OFLOW
        if h["msg_seqno"] != g.msg_count[vmpck_id] + 1:
            return U.SEV_RET_INVALID_PARAM
        try:
            h, payload = A.open_msg(g.vmpck[vmpck_id], page)
        except A.GuestMsgError:
            return U.SEV_RET_INVALID_PARAM
        handler = {U.SNP_MSG_REPORT_REQ: self._msg_report, U.SNP_MSG_KEY_REQ: self._msg_key,
                   **self._ma_handlers()}.get(h["msg_type"])
        if handler is None or h["msg_version"] != 1:
            return U.SEV_RET_INVALID_PARAM
        key = g.vmpck[vmpck_id]           # the answer's key even if ABSORB_NOMA replaces it
        answer = handler(g, vmpck_id, payload)
        out = A.seal_msg(key, h["msg_seqno"] + 1, h["msg_type"] + 1, answer,
                         vmpck_id=vmpck_id, msg_version=h["msg_version"])
        self._fw_write(res, out)
        g.msg_count[vmpck_id] += 2
        return U.SEV_RET_SUCCESS

    def _msg_report(self, g, vmpck_id, payload):
        """MSG_REPORT_REQ (56860 7.3): the report, signed by the VCEK of the reported TCB. A
        VMPL below the key's is INVALID_PARAM in the response's status."""
        req = S.snp_report_req.unpack(payload.ljust(S.snp_report_req.size, b"\0"))
        if req["vmpl"] < vmpck_id or req["vmpl"] > 3 or any(req["rsvd"]) \
                or len(payload) != S.snp_report_req.size:
            return S.snp_report_resp.pack(status=U.SEV_RET_INVALID_PARAM)
        if g.vcek_disabled:
            return S.snp_report_resp.pack(status=U.SEV_RET_INVALID_PARAM)
        report = self.snp_report(g, req["user_data"], req["vmpl"])
        return S.snp_report_resp.pack(status=0, report_size=len(report), report=report)

    def snp_report(self, g, report_data, vmpl):
        """The signed ATTESTATION_REPORT of guest ``g`` (56860 7.3, table "ATTESTATION_REPORT
        Structure")."""
        fam, mod, step = self.cpuid_fms
        body = S.snp_attestation_report.pack(
            version=A.REPORT_VERSION, guest_svn=g.guest_svn, policy=g.policy,
            family_id=g.family_id, image_id=g.image_id, vmpl=vmpl,
            signature_algo=A.SIG_ALGO_ECDSA_P384_SHA384, current_tcb=self.snp_tcb,
            platform_info=int(self.smt_enabled), author_key_en=g.author_key_en,
            mask_chip_key=0, signing_key=0, report_data=bytes(report_data), measurement=g.ld,
            host_data=g.host_data, id_key_digest=g.id_key_digest,
            author_key_digest=g.author_key_digest, report_id=g.report_id,
            report_id_ma=g.report_id_ma, reported_tcb=self.snp_tcb, cpuid_fam_id=fam,
            cpuid_mod_id=mod, cpuid_step=step, chip_id=self.snp_chip_id(),
            committed_tcb=self.snp_tcb, current_build=self.build, current_minor=self.api_minor,
            current_major=self.api_major, committed_build=self.build,
            committed_minor=self.api_minor, committed_major=self.api_major,
            launch_tcb=g.launch_tcb)
        return A.sign_report(body, self._vcek_d())

    def _msg_key(self, g, vmpck_id, payload):
        """MSG_KEY_REQ (56860 7.2): a 32-byte key derived from the VCEK's secret, or with
        ROOT_KEY_SELECT bit 0 from the guest's VM root key (which travels with the guest's
        context: sevcore.psp.snp_ma), mixed with the guest fields selected, the VMPL, the guest
        SVN and the TCB asked for, none above what the guest has."""
        req = S.snp_derived_key_req.unpack(payload.ljust(S.snp_derived_key_req.size, b"\0"))
        bad = (len(payload) != S.snp_derived_key_req.size or req["rsvd"]
               or req["root_key_select"] & ~1
               or req["guest_field_select"] & ~KEY_FIELDS_MASK
               or not vmpck_id <= req["vmpl"] <= 3 or req["guest_svn"] > g.guest_svn
               or any(((req["tcb_version"] >> s) & 0xFF) > ((self.snp_tcb >> s) & 0xFF)
                      for s in range(0, 64, 8)))
        if bad:
            return S.snp_derived_key_resp.pack(status=U.SEV_RET_INVALID_PARAM)
        sel = req["guest_field_select"]
        ctx = struct.pack("<QII", sel, req["vmpl"], 0)
        for bit, value in ((0, struct.pack("<Q", g.policy)), (1, g.image_id), (2, g.family_id),
                           (3, g.ld), (4, struct.pack("<I", req["guest_svn"])),
                           (5, struct.pack("<Q", req["tcb_version"]))):
            if sel >> bit & 1:
                ctx += value
        root = g.vmrk if req["root_key_select"] & 1 else \
            kdf(self._chip_unique_key(), "sev-snp-vcek-secret", b"", 32)
        key = kdf(root, "sev-snp-derived-key", ctx, 32)
        return S.snp_derived_key_resp.pack(status=0, derived_key=key)

    # -- the chip's attestation identity ---------------------------------------------------------

    def snp_chip_id(self):
        """The 64-byte CHIP_ID reports carry and the VCEK's hwID extension names."""
        return A.chip_id(self._chip_unique_key())

    def _vcek_d(self):
        return A.vcek_scalar(self._chip_unique_key(), self.snp_tcb)

    def snp_vcek_point(self):
        """(x, y) of this chip's VCEK for its reported TCB."""
        return A.public_point(self._vcek_d())

    def snp_vcek_cert(self):
        """This chip's VCEK certificate (DER), as AMD's KDS would issue it for the reported TCB
        (``/vcek/v1/Genoa/{hwid}?blSPL=..``), signed by the simulated ASK."""
        return A.vcek_certificate(self._chip_unique_key(), self.snp_tcb)

    # -- typed methods (the kernel's buffers, by the psp-sev.h field names) -----------------------

    def snp_init(self):
        """SNP_INIT. Mirrors ``SEV_CMD_SNP_INIT``; raises PspError."""
        self._issue(U.SEV_CMD_SNP_INIT, None)

    def snp_init_ex(self, init_rmp=1, list_paddr_en=0, rapl_dis=0, ciphertext_hiding_en=0,
                    tio_en=0, list_paddr=0, max_snp_asid=0):
        """SNP_INIT_EX (``struct sev_data_snp_init_ex``). Mirrors ``SEV_CMD_SNP_INIT_EX``;
        raises PspError."""
        self._issue(U.SEV_CMD_SNP_INIT_EX, S.sev_data_snp_init_ex, init_rmp=init_rmp,
                    list_paddr_en=list_paddr_en, rapl_dis=rapl_dis,
                    ciphertext_hiding_en=ciphertext_hiding_en, tio_en=tio_en,
                    list_paddr=list_paddr, max_snp_asid=max_snp_asid)

    def snp_shutdown_ex(self, iommu_snp_shutdown=0, x86_snp_shutdown=0):
        """SNP_SHUTDOWN_EX. Mirrors ``SEV_CMD_SNP_SHUTDOWN_EX``; raises PspError."""
        self._issue(U.SEV_CMD_SNP_SHUTDOWN_EX, S.sev_data_snp_shutdown_ex,
                    len=S.sev_data_snp_shutdown_ex.size, iommu_snp_shutdown=iommu_snp_shutdown,
                    x86_snp_shutdown=x86_snp_shutdown)

    def snp_df_flush(self):
        """SNP_DF_FLUSH. Mirrors ``SEV_CMD_SNP_DF_FLUSH``; raises PspError."""
        self._issue(U.SEV_CMD_SNP_DF_FLUSH, None)

    def snp_platform_status(self):
        """SNP_PLATFORM_STATUS -> a dict of ``struct sev_user_data_snp_status``'s fields, through
        a firmware page as ``snp_platform_status_locked`` does. Raises PspError."""
        page = self.snp_alloc_firmware_page()
        try:
            self._issue(U.SEV_CMD_SNP_PLATFORM_STATUS, S.sev_data_snp_addr, address=page)
            return S.sev_user_data_snp_status.unpack(self._read(page, S.sev_user_data_snp_status.size))
        finally:
            self.snp_free_firmware_page(page)

    def snp_gctx_create(self, address):
        """SNP_GCTX_CREATE on the firmware page at ``address``. Mirrors
        ``SEV_CMD_SNP_GCTX_CREATE``; raises PspError."""
        self._issue(U.SEV_CMD_SNP_GCTX_CREATE, S.sev_data_snp_addr, address=address)

    def snp_decommission(self, address):
        """SNP_DECOMMISSION of the context at ``address``. Mirrors ``SEV_CMD_SNP_DECOMMISSION``;
        raises PspError."""
        self._issue(U.SEV_CMD_SNP_DECOMMISSION, S.sev_data_snp_addr, address=address)

    def snp_activate(self, gctx_paddr, asid):
        """SNP_ACTIVATE. Mirrors ``SEV_CMD_SNP_ACTIVATE``; raises PspError."""
        self._issue(U.SEV_CMD_SNP_ACTIVATE, S.sev_data_snp_activate, gctx_paddr=gctx_paddr,
                    asid=asid)

    def snp_guest_status(self, gctx_paddr):
        """SNP_GUEST_STATUS -> dict (policy, asid, state, vcek_dis). Raises PspError."""
        page = self.snp_alloc_firmware_page()
        try:
            self._issue(U.SEV_CMD_SNP_GUEST_STATUS, S.sev_data_snp_guest_status,
                        gctx_paddr=gctx_paddr, address=page)
            return S.snp_guest_status.unpack(self._read(page, S.snp_guest_status.size))
        finally:
            self.snp_free_firmware_page(page)

    def snp_page_reclaim(self, paddr):
        """SNP_PAGE_RECLAIM. Mirrors ``SEV_CMD_SNP_PAGE_RECLAIM``; raises PspError."""
        self._issue(U.SEV_CMD_SNP_PAGE_RECLAIM, S.sev_data_snp_page_reclaim, paddr=paddr)

    def snp_launch_start(self, gctx_paddr, policy, ma_gctx_paddr=0, ma_en=0, imi_en=0,
                         desired_tsc_khz=0, gosvw=bytes(16)):
        """SNP_LAUNCH_START (``struct sev_data_snp_launch_start``). Mirrors
        ``SEV_CMD_SNP_LAUNCH_START``; raises PspError."""
        self._issue(U.SEV_CMD_SNP_LAUNCH_START, S.sev_data_snp_launch_start,
                    gctx_paddr=gctx_paddr, policy=policy, ma_gctx_paddr=ma_gctx_paddr,
                    ma_en=ma_en, imi_en=imi_en, desired_tsc_khz=desired_tsc_khz, gosvw=gosvw)

    def snp_launch_update(self, gctx_paddr, address, page_type, page_size=0, imi_page=0,
                          vmpl1_perms=0, vmpl2_perms=0, vmpl3_perms=0):
        """SNP_LAUNCH_UPDATE of one page (``struct sev_data_snp_launch_update``). Mirrors
        ``SEV_CMD_SNP_LAUNCH_UPDATE``; raises PspError (a CPUID page that fails the check has
        been corrected in place: INVALID_PARAM)."""
        self._issue(U.SEV_CMD_SNP_LAUNCH_UPDATE, S.sev_data_snp_launch_update,
                    gctx_paddr=gctx_paddr, address=address, page_type=page_type,
                    page_size=page_size, imi_page=imi_page, vmpl1_perms=vmpl1_perms,
                    vmpl2_perms=vmpl2_perms, vmpl3_perms=vmpl3_perms)

    def snp_launch_update_pages(self, gctx_paddr, spas, page_type, vmpl1_perms=0, vmpl2_perms=0,
                                vmpl3_perms=0):
        """SNP_LAUNCH_UPDATE of each 4 KiB page at ``spas`` (page aligned, in order), with the
        result of issuing the commands one by one but in one pass: returns the pages done;
        raises PspError (``index``: the page that failed, the pages before it done)."""
        fields = dict(gctx_paddr=gctx_paddr, address=0, page_type=page_type,
                      vmpl1_perms=vmpl1_perms, vmpl2_perms=vmpl2_perms, vmpl3_perms=vmpl3_perms)
        f = S.sev_data_snp_launch_update.view(bytearray(S.sev_data_snp_launch_update.pack(
            **fields)))
        status, g = self._launch_update_gate(f)
        spas = np.asarray(spas, np.uint64).reshape(-1)
        if status:
            raise PspError(U.SEV_CMD_SNP_LAUNCH_UPDATE, status, index=0)
        addr = spas & np.uint64(((1 << 64) - 1) ^ (1 << self.host.c_bit))
        bad = np.flatnonzero((addr % np.uint64(PAGE) != 0)
                             | (addr > np.uint64(self.host.mem.size - PAGE)))
        stop = int(bad[0]) if len(bad) else len(addr)
        status, done = self._launch_pages(g, addr[:stop] >> np.uint64(12), page_type,
                                          (vmpl3_perms, vmpl2_perms, vmpl1_perms))
        if status:
            raise PspError(U.SEV_CMD_SNP_LAUNCH_UPDATE, status, index=done)
        if stop < len(addr):
            raise PspError(U.SEV_CMD_SNP_LAUNCH_UPDATE, U.SEV_RET_INVALID_ADDRESS, index=stop)
        return done

    def snp_launch_finish(self, gctx_paddr, id_block_paddr=0, id_auth_paddr=0, id_block_en=0,
                          auth_key_en=0, vcek_disabled=0, host_data=bytes(32)):
        """SNP_LAUNCH_FINISH (``struct sev_data_snp_launch_finish``). Mirrors
        ``SEV_CMD_SNP_LAUNCH_FINISH``; raises PspError."""
        self._issue(U.SEV_CMD_SNP_LAUNCH_FINISH, S.sev_data_snp_launch_finish,
                    gctx_paddr=gctx_paddr, id_block_paddr=id_block_paddr,
                    id_auth_paddr=id_auth_paddr, id_block_en=id_block_en,
                    auth_key_en=auth_key_en, vcek_disabled=vcek_disabled, host_data=host_data)

    def snp_guest_request(self, gctx_paddr, req_paddr, res_paddr):
        """SNP_GUEST_REQUEST (``struct sev_data_snp_guest_request``). Mirrors
        ``SEV_CMD_SNP_GUEST_REQUEST``; raises PspError."""
        self._issue(U.SEV_CMD_SNP_GUEST_REQUEST, S.sev_data_snp_guest_request,
                    gctx_paddr=gctx_paddr, req_paddr=req_paddr, res_paddr=res_paddr)

    def snp_dbg_decrypt(self, gctx_paddr, src_addr, dst_addr):
        """SNP_DBG_DECRYPT of one page into a firmware page. Mirrors ``SEV_CMD_SNP_DBG_DECRYPT``;
        raises PspError."""
        self._issue(U.SEV_CMD_SNP_DBG_DECRYPT, S.sev_data_snp_dbg, gctx_paddr=gctx_paddr,
                    src_addr=src_addr, dst_addr=dst_addr)

    def snp_dbg_encrypt(self, gctx_paddr, src_addr, dst_addr):
        """SNP_DBG_ENCRYPT of one firmware page into the guest's. Mirrors
        ``SEV_CMD_SNP_DBG_ENCRYPT``; raises PspError."""
        self._issue(U.SEV_CMD_SNP_DBG_ENCRYPT, S.sev_data_snp_dbg, gctx_paddr=gctx_paddr,
                    src_addr=src_addr, dst_addr=dst_addr)

    def snp_guest(self, gctx_paddr):
        """The context at ``gctx_paddr`` (an SnpGuest), or None: for tests and tools."""
        return self._snp_guests.get(self._addr(gctx_paddr) >> 12)
