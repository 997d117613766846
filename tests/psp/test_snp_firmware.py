"""The SEV-SNP firmware commands (sevcore.psp.snp; AMD 56860 chapter 8): platform, guest
contexts, launch, debug, reclaim, and that a refused command changes nothing."""
import errno
import hashlib

import numpy as np
import pytest

import sevcore
from sevcore import uapi as U
from sevcore.hw.rmp import RmpFault
from sevcore.psp import PspError
from sevcore.psp import attest as A
from sevcore.psp import snp_layout as S

from support import raises_errno
from support.snp import ASID, POLICY, new_guest, preguest, snapshot, snp_host, spas

DATA = bytes(range(256)) * 16 * 4          # four pages


def fw_error(fn, *args, **kwargs):
    """The firmware status a typed call fails with."""
    with raises_errno(errno.EIO) as info:
        fn(*args, **kwargs)
    return info.value.fw_error


def test_snp_init_comes_before_sev_init_and_both_coexist():
    """SNP_INIT is refused once SEV is initialized; SEV INIT after SNP_INIT works."""
    host = sevcore.Host(memory_size=1 << 30)
    host.psp.init()
    assert fw_error(host.psp.snp_init) == U.SEV_RET_INVALID_PLATFORM_STATE
    host.psp.shutdown()
    host.psp.snp_init()
    host.psp.init()
    assert host.psp.platform_status().state == U.SEV_STATE_INIT
    assert host.psp.snp_platform_status()["state"] == 1


def test_snp_init_turns_the_rmp_check_on():
    """Before SNP_INIT nothing checks host writes; after it a host write to a guest's frame is an
    RMP fault and the frame is unchanged."""
    host = sevcore.Host(memory_size=1 << 30)
    pfn = int(host.mem.alloc(1)[0])
    host.rmp.rmp_make_private(pfn, 0x1000, 1)
    host.umc.write(pfn << 12, b"before")
    host.psp.snp_init_ex(init_rmp=0)
    with raises_errno(errno.EFAULT, "MemoryController.write") as info:
        host.umc.write((pfn << 12) + 8, b"after")
    assert isinstance(info.value, RmpFault) and info.value.error_code & U.X86_PF_RMP
    assert host.mem.read(pfn << 12, 6) == b"before"
    host.umc.write((pfn + 1) << 12, b"free frame")


def test_snp_init_refuses_an_rmp_with_assigned_entries():
    """SNP_INIT with init_rmp over an RMP that already assigns a frame is
    RMP_INITIALIZATION_FAILED, and SNP stays off."""
    host = sevcore.Host(memory_size=1 << 30)
    host.rmp.rmp_make_private(0x200, 0, 1)
    assert fw_error(host.psp.snp_init) == U.SEV_RET_RMP_INITIALIZATION_FAILED
    assert host.umc.rmp is None and host.psp.snp_state == 0


def test_platform_status_needs_a_firmware_page_once_snp_runs():
    """SNP_PLATFORM_STATUS writes to a firmware page and refuses a hypervisor page with
    INVALID_PAGE_STATE."""
    host = snp_host()
    st = host.psp.snp_platform_status()
    assert (st["api_major"], st["api_minor"], st["build_id"]) == (1, 55, 25)
    assert st["is_rmp_initialized"] == 1 and st["reported_tcb_version"] == host.psp.snp_tcb
    page = host.mem.alloc_contiguous(1)
    buf = host.mem.alloc_contiguous(1)
    host.mem.write(buf, S.sev_data_snp_addr.pack(address=page))
    assert host.psp.command(U.SEV_CMD_SNP_PLATFORM_STATUS, buf) == U.SEV_RET_INVALID_PAGE_STATE
    assert host.mem.read(page, 32) == bytes(32)


def test_gctx_create_needs_a_firmware_page():
    """A guest context on a hypervisor page, or twice on one page, is INVALID_PAGE_STATE."""
    host = snp_host()
    page = host.mem.alloc_contiguous(1)
    assert fw_error(host.psp.snp_gctx_create, page) == U.SEV_RET_INVALID_PAGE_STATE
    gctx = host.psp.snp_alloc_firmware_page()
    host.psp.snp_gctx_create(gctx)
    assert fw_error(host.psp.snp_gctx_create, gctx) == U.SEV_RET_INVALID_PAGE_STATE
    assert fw_error(host.psp.snp_launch_start, page, POLICY) == U.SEV_RET_INVALID_GUEST


@pytest.mark.parametrize("policy, status", [
    (U.SNP_POLICY_MASK_SMT, U.SEV_RET_INVALID_PARAM),                       # no RSVD_MBO
    (POLICY | 1 << 40, U.SEV_RET_INVALID_PARAM),                            # unknown bit
    (U.SNP_POLICY_MASK_RSVD_MBO, U.SEV_RET_POLICY_FAILURE),                 # SMT not allowed
    (POLICY | 2 << 8, U.SEV_RET_POLICY_FAILURE),                            # ABI 2.0 needed
    (POLICY | 1 << 8 | 56, U.SEV_RET_POLICY_FAILURE),                       # ABI 1.56 needed
    (POLICY | U.SNP_POLICY_MASK_CXL_ALLOW, U.SEV_RET_POLICY_FAILURE),       # no CXL here
])
def test_launch_start_enforces_the_policy(policy, status):
    """SNP_LAUNCH_START refuses a policy this platform cannot honour and changes nothing."""
    host = snp_host()
    gctx = host.psp.snp_alloc_firmware_page()
    host.psp.snp_gctx_create(gctx)
    before = snapshot(host)
    assert fw_error(host.psp.snp_launch_start, gctx, policy) == status
    assert snapshot(host) == before
    host.psp.snp_launch_start(gctx, POLICY | 1 << 8 | 55)          # ABI 1.55 is this firmware's


def test_launch_start_single_socket_and_migration_agent_policies():
    """SINGLE_SOCKET is refused on a two-socket host; a migration agent that is no guest
    context is INVALID_GUEST (tests/psp/test_snp_ma_messages.py checks the rest)."""
    host = snp_host()
    gctx = host.psp.snp_alloc_firmware_page()
    host.psp.snp_gctx_create(gctx)
    host.psp.sockets = 2
    assert fw_error(host.psp.snp_launch_start, gctx, POLICY | U.SNP_POLICY_MASK_SINGLE_SOCKET) \
        == U.SEV_RET_POLICY_FAILURE
    host.psp.sockets = 1
    assert fw_error(host.psp.snp_launch_start, gctx, POLICY | U.SNP_POLICY_MASK_MIGRATE_MA,
                    ma_en=1, ma_gctx_paddr=gctx + 4096) == U.SEV_RET_INVALID_GUEST
    host.psp.snp_launch_start(gctx, POLICY | U.SNP_POLICY_MASK_SINGLE_SOCKET)


def test_activate_checks_the_asid():
    """SNP_ACTIVATE wants an SEV-ES/SNP-range ASID, flushed and unowned, once per guest."""
    host = sevcore.Host(memory_size=1 << 30)
    host.psp.snp_init()
    gctx = host.psp.snp_alloc_firmware_page()
    host.psp.snp_gctx_create(gctx)
    host.psp.snp_launch_start(gctx, POLICY)
    assert fw_error(host.psp.snp_activate, gctx, 2) == U.SEV_RET_DFFLUSH_REQUIRED
    host.psp.wbinvd()
    host.psp.snp_df_flush()
    assert fw_error(host.psp.snp_activate, gctx, 0) == U.SEV_RET_INVALID_ASID
    assert fw_error(host.psp.snp_activate, gctx, 100) == U.SEV_RET_INVALID_ASID
    host.psp.snp_activate(gctx, 2)
    assert host.umc.has_key(2)
    assert fw_error(host.psp.snp_activate, gctx, 4) == U.SEV_RET_ACTIVE
    other = new_guest(host, asid=5)
    other_g = host.psp.snp_guest(other)
    other_g.asid = 0                        # a second guest asking for an owned ASID
    assert fw_error(host.psp.snp_activate, other, 2) == U.SEV_RET_ASID_OWNED


def test_launch_update_measures_encrypts_and_validates():
    """A NORMAL page is measured with its PAGE_INFO, encrypted with the guest's key in place and
    left validated and unlocked."""
    host = snp_host()
    gctx = new_guest(host)
    pfn = int(preguest(host, DATA[:4096], 0x10)[0])
    host.psp.snp_launch_update(gctx, pfn << 12, U.SNP_PAGE_TYPE_NORMAL)
    info = S.snp_page_info.pack(digest_cur=bytes(48),
                                contents=hashlib.sha384(DATA[:4096]).digest(), length=0x70,
                                page_type=1, gpa=0x10000)
    assert host.psp.snp_guest(gctx).ld == hashlib.sha384(info).digest()
    assert host.mem.read(pfn << 12, 4096) != DATA[:4096]
    assert host.umc.read(pfn << 12, 4096, ASID) == DATA[:4096]
    e = host.rmp.entry(pfn)
    assert (e.assigned, e.validated, e.immutable, e.asid, e.gpa) == (1, 1, 0, ASID, 0x10000)


@pytest.mark.parametrize("make", ["shared", "other_asid", "unlocked", "validated"])
def test_launch_update_refuses_a_page_not_in_pre_guest_state(make):
    """A page that is not Pre-Guest for this guest is INVALID_PAGE_STATE and nothing changes."""
    host = snp_host()
    gctx = new_guest(host)
    pfn = int(host.mem.alloc(1)[0])
    host.mem.write(pfn << 12, DATA[:4096])
    if make == "other_asid":
        host.rmp.rmp_make_private(pfn, 0x1000, ASID + 1, immutable=True)
    elif make in ("unlocked", "validated"):
        host.rmp.rmp_make_private(pfn, 0x1000, ASID)
        if make == "validated":
            host.rmp.pvalidate(pfn, gpa=0x1000, asid=ASID, validate=True)
    before = snapshot(host, pfn)
    assert fw_error(host.psp.snp_launch_update, gctx, pfn << 12, 1) == \
        U.SEV_RET_INVALID_PAGE_STATE
    assert snapshot(host, pfn) == before


@pytest.mark.parametrize("fields, status", [
    (dict(page_type=0), U.SEV_RET_INVALID_PARAM),
    (dict(page_type=7), U.SEV_RET_INVALID_PARAM),
    (dict(page_type=1, page_size=1), U.SEV_RET_INVALID_PAGE_SIZE),
    (dict(page_type=1, imi_page=1), U.SEV_RET_INVALID_PARAM),
    (dict(page_type=2, vmpl1_perms=1), U.SEV_RET_INVALID_PARAM),
    (dict(page_type=1, vmpl2_perms=0x10), U.SEV_RET_INVALID_PARAM),
    (dict(page_type=1, offset=8), U.SEV_RET_INVALID_ADDRESS),
])
def test_launch_update_bad_buffers(fields, status):
    """Bad page types, sizes, permissions and addresses are refused with the firmware's status and
    change nothing."""
    host = snp_host()
    gctx = new_guest(host)
    pfn = int(preguest(host, DATA[:4096], 1)[0])
    off = fields.pop("offset", 0)
    before = snapshot(host, pfn)
    assert fw_error(host.psp.snp_launch_update, gctx, (pfn << 12) + off, **fields) == status
    assert snapshot(host, pfn) == before


def test_zero_and_secrets_pages_are_written_by_the_firmware():
    """A ZERO page reads zero to the guest; a SECRETS page holds the guest's VMPCK0..3."""
    host = snp_host()
    gctx = new_guest(host, gosvw=b"w" * 16)
    z, s = preguest(host, b"\xaa" * 8192, 0x40).tolist()
    host.psp.snp_launch_update(gctx, z << 12, U.SNP_PAGE_TYPE_ZERO)
    host.psp.snp_launch_update(gctx, s << 12, U.SNP_PAGE_TYPE_SECRET)
    assert host.umc.read(z << 12, 4096, ASID) == bytes(4096)
    sec = S.snp_secrets_page.unpack(host.umc.read(s << 12, 4096, ASID))
    g = host.psp.snp_guest(gctx)
    assert [sec[f"vmpck{i}"] for i in range(4)] == g.vmpck and sec["gosvw"] == b"w" * 16
    assert len(set(g.vmpck)) == 4


def _cpuid_page(*fns):
    page = bytearray(4096)
    page[:16] = S.snp_cpuid_table.pack(count=len(fns))
    for i, fn in enumerate(fns):
        page[16 + 48 * i:16 + 48 * (i + 1)] = S.snp_cpuid_fn.pack(**fn)
    return bytes(page)


def test_cpuid_page_check_corrects_and_fails():
    """A CPUID page claiming a bit this CPU does not allow is corrected in place and fails with
    INVALID_PARAM, leaving the launch digest and the page's RMP entry alone; the corrected page
    then passes."""
    host = snp_host()
    gctx = new_guest(host)
    bad = _cpuid_page(dict(eax_in=1, eax=0x00A10F11, ecx=0xFFFFFFFF, edx=0x178BFBFF),
                      dict(eax_in=0x40000000, eax=0x40000001, ebx=0x12345678))
    pfn = int(preguest(host, bad, 0x50)[0])
    ld = host.psp.snp_guest(gctx).ld
    entry = host.rmp.entry(pfn)
    assert fw_error(host.psp.snp_launch_update, gctx, pfn << 12, U.SNP_PAGE_TYPE_CPUID) == \
        U.SEV_RET_INVALID_PARAM
    fixed = host.mem.read(pfn << 12, 4096)
    fn0 = S.snp_cpuid_fn.unpack(fixed[16:64])
    allowed = host.psp.cpuid_allowed(1, 0)
    assert fn0["ecx"] == 0xFFFFFFFF & allowed["ecx"] and fn0["eax"] == 0x00A10F11
    assert fixed[64:112] == bad[64:112]                    # a function it does not check
    assert host.psp.snp_guest(gctx).ld == ld and host.rmp.entry(pfn) == entry
    host.psp.snp_launch_update(gctx, pfn << 12, U.SNP_PAGE_TYPE_CPUID)
    assert host.rmp.entry(pfn).validated == 1


def test_batched_launch_update_equals_commands_one_by_one():
    """snp_launch_update_pages gives the digest, memory and RMP of one command per page, and
    stops where a single command would fail, naming the page."""
    ref, bat = snp_host(), snp_host()
    out = []
    for host in (ref, bat):
        gctx = new_guest(host)
        pfns = preguest(host, DATA, 0x100)
        e = host.rmp.entry(int(pfns[2]))                  # the third page is not Pre-Guest
        host.rmp.fw_set(int(pfns[2]), e._replace(immutable=0))
        out.append((host, gctx, pfns))
    (h1, g1, p1), (h2, g2, p2) = out
    for pfn in p1[:2].tolist():
        h1.psp.snp_launch_update(g1, pfn << 12, 1)
    assert fw_error(h1.psp.snp_launch_update, g1, int(p1[2]) << 12, 1) == \
        U.SEV_RET_INVALID_PAGE_STATE
    with raises_errno(errno.EIO) as info:
        h2.psp.snp_launch_update_pages(g2, spas(p2), 1)
    assert (info.value.fw_error, info.value.index) == (U.SEV_RET_INVALID_PAGE_STATE, 2)
    assert h1.psp.snp_guest(g1).ld == h2.psp.snp_guest(g2).ld
    for a, b in zip(p1.tolist(), p2.tolist()):
        assert h1.mem.read(a << 12, 4096) == h2.mem.read(b << 12, 4096)
        assert h1.rmp.entry(a)[:6] == h2.rmp.entry(b)[:6]


def test_launch_update_after_finish_is_invalid_guest_state():
    """Once the guest runs, SNP_LAUNCH_UPDATE is INVALID_GUEST_STATE."""
    host = snp_host()
    gctx = new_guest(host)
    host.psp.snp_launch_finish(gctx)
    pfn = int(preguest(host, DATA[:4096], 1)[0])
    assert fw_error(host.psp.snp_launch_update, gctx, pfn << 12, 1) == \
        U.SEV_RET_INVALID_GUEST_STATE
    assert fw_error(host.psp.snp_launch_finish, gctx) == U.SEV_RET_INVALID_GUEST_STATE


def _id_block(host, gctx, id_d, author_d=None, ld=None, policy=POLICY, corrupt=False):
    """ID block and ID auth in host pages, signed by the ID key (and the author key)."""
    g = host.psp.snp_guest(gctx)
    blk = S.snp_id_block.pack(ld=g.ld if ld is None else ld, family_id=b"F" * 16,
                              image_id=b"I" * 16, version=1, guest_svn=7, policy=policy)
    id_key = A.pubkey_bytes(A.public_point(id_d))
    sig = A.sig_bytes(*A.sign(id_d, blk))
    if corrupt:
        sig = bytes([sig[0] ^ 1]) + sig[1:]
    fields = dict(id_key_algo=1, auth_key_algo=1, id_block_sig=sig, id_key=id_key)
    if author_d is not None:
        fields.update(author_key=A.pubkey_bytes(A.public_point(author_d)),
                      id_key_sig=A.sig_bytes(*A.sign(author_d, id_key)))
    b, a = host.mem.alloc_contiguous(1), host.mem.alloc_contiguous(1)
    host.mem.write(b, blk)
    host.mem.write(a, S.snp_id_auth.pack(**fields))
    return dict(id_block_paddr=b, id_auth_paddr=a, id_block_en=1,
                auth_key_en=int(author_d is not None))


ID_D, AUTHOR_D = 0x1234567 << 100, 0x7654321 << 90


def test_launch_finish_with_an_id_block_puts_its_identity_in_reports():
    """A good ID block and author key: the report carries the family and image ids, the SVN and
    the SHA-384 digests of both keys."""
    from support.snp import report
    host = snp_host()
    gctx = new_guest(host)
    host.psp.snp_launch_finish(gctx, host_data=b"h" * 32,
                               **_id_block(host, gctx, ID_D, AUTHOR_D))
    r = S.snp_attestation_report.unpack(report(host, gctx))
    assert (r["family_id"], r["image_id"], r["guest_svn"]) == (b"F" * 16, b"I" * 16, 7)
    assert r["id_key_digest"] == hashlib.sha384(A.pubkey_bytes(A.public_point(ID_D))).digest()
    assert r["author_key_digest"] == \
        hashlib.sha384(A.pubkey_bytes(A.public_point(AUTHOR_D))).digest()
    assert r["author_key_en"] == 1 and r["host_data"] == b"h" * 32


@pytest.mark.parametrize("case, status", [
    ("digest", U.SEV_RET_BAD_MEASUREMENT),
    ("policy", U.SEV_RET_POLICY_FAILURE),
    ("signature", U.SEV_RET_BAD_SIGNATURE),
    ("author", U.SEV_RET_BAD_SIGNATURE),
])
def test_launch_finish_refuses_a_bad_id_block(case, status):
    """The wrong launch digest, policy or a bad signature fails SNP_LAUNCH_FINISH with its status
    and the guest stays in the launch state."""
    host = snp_host()
    gctx = new_guest(host)
    kw = dict(ld=bytes(47) + b"\1") if case == "digest" else \
        dict(policy=POLICY | U.SNP_POLICY_MASK_DEBUG) if case == "policy" else \
        dict(corrupt=True) if case == "signature" else {}
    args = _id_block(host, gctx, ID_D, AUTHOR_D, **kw)
    if case == "author":
        raw = bytearray(host.mem.read(args["id_auth_paddr"], 4096))
        raw[S.snp_id_auth.offsets["id_key_sig"]] ^= 1
        host.mem.write(args["id_auth_paddr"], bytes(raw))
    before = snapshot(host)
    assert fw_error(host.psp.snp_launch_finish, gctx, **args) == status
    assert snapshot(host) == before


def test_debug_commands_need_the_debug_policy():
    """SNP_DBG_DECRYPT reads a guest page into a firmware page only under the DEBUG policy;
    SNP_DBG_ENCRYPT writes one back."""
    for policy, ok in ((POLICY, False), (POLICY | U.SNP_POLICY_MASK_DEBUG, True)):
        host = snp_host()
        gctx = new_guest(host, policy=policy)
        pfn = int(preguest(host, DATA[:4096], 2)[0])
        host.psp.snp_launch_update(gctx, pfn << 12, 1)
        dst = host.psp.snp_alloc_firmware_page()
        if not ok:
            assert fw_error(host.psp.snp_dbg_decrypt, gctx, pfn << 12, dst) == \
                U.SEV_RET_POLICY_FAILURE
            continue
        host.psp.snp_dbg_decrypt(gctx, pfn << 12, dst)
        assert host.mem.read(dst, 4096) == DATA[:4096]
        host.mem.write(dst, b"z" * 4096)
        host.psp.snp_dbg_encrypt(gctx, dst, pfn << 12)
        assert host.umc.read(pfn << 12, 4096, ASID) == b"z" * 4096
        plain = host.mem.alloc_contiguous(1)
        assert fw_error(host.psp.snp_dbg_decrypt, gctx, pfn << 12, plain) == \
            U.SEV_RET_INVALID_PAGE_STATE


def test_decommission_removes_the_key_and_reclaim_frees_pages():
    """After SNP_DECOMMISSION the ASID's key is gone and needs a flush; the context page and a
    Pre-Guest page can then be reclaimed, a live context cannot."""
    host = snp_host()
    gctx = new_guest(host)
    pfn = int(preguest(host, DATA[:4096], 2)[0])
    assert fw_error(host.psp.snp_page_reclaim, gctx) == U.SEV_RET_INVALID_PAGE_STATE
    host.psp.snp_decommission(gctx)
    assert not host.umc.has_key(ASID)
    assert fw_error(host.psp.snp_launch_start, gctx, POLICY) == U.SEV_RET_INVALID_GUEST
    host.psp.snp_page_reclaim(pfn << 12)
    host.psp.snp_free_firmware_page(gctx)
    assert host.rmp.entry(pfn).assigned == 0 and host.rmp.entry(gctx >> 12).assigned == 0
    other = host.psp.snp_alloc_firmware_page()
    host.psp.snp_gctx_create(other)
    host.psp.snp_launch_start(other, POLICY)
    assert fw_error(host.psp.snp_activate, other, ASID) == U.SEV_RET_DFFLUSH_REQUIRED


def test_snp_shutdown_order():
    """SNP_SHUTDOWN_EX needs SEV shut down and no SNP guest, and turns the RMP check off."""
    host = snp_host(sev=True)
    gctx = new_guest(host)
    assert fw_error(host.psp.snp_shutdown_ex) == U.SEV_RET_INVALID_PLATFORM_STATE
    host.psp.shutdown()
    assert fw_error(host.psp.snp_shutdown_ex) == U.SEV_RET_ACTIVE
    host.psp.snp_decommission(gctx)
    host.psp.snp_shutdown_ex()
    assert host.umc.rmp is None


def test_errors_name_the_command_and_status():
    """A failed SNP command raises PspError naming SEV_CMD_SNP_* and the SEV_RET_* status."""
    host = snp_host()
    with pytest.raises(PspError) as info:
        host.psp.snp_launch_start(host.mem.alloc_contiguous(1), POLICY)
    assert info.value.command == "SEV_CMD_SNP_LAUNCH_START"
    assert info.value.fw_error_name == "SEV_RET_INVALID_GUEST"


def test_snp_commands_need_snp_initialized():
    """Without SNP_INIT the guest commands are INVALID_PLATFORM_STATE."""
    host = sevcore.Host(memory_size=1 << 30)
    page = host.mem.alloc_contiguous(1)
    assert fw_error(host.psp.snp_gctx_create, page) == U.SEV_RET_INVALID_PLATFORM_STATE
    assert fw_error(host.psp.snp_df_flush) == U.SEV_RET_INVALID_PLATFORM_STATE
    assert host.psp.snp_platform_status()["state"] == 0
    np.testing.assert_equal(host.rmp.assigned, 0)


def test_the_memory_controller_encrypts_an_assigned_frame_with_its_owners_key():
    """umc.rmp_asid names a frame's owner and write_owned stores through that owner's key; a
    hypervisor frame is written as it is."""
    host = snp_host()
    gctx = new_guest(host)
    pfn = int(preguest(host, DATA[:4096], 9)[0])
    host.psp.snp_launch_update(gctx, pfn << 12, U.SNP_PAGE_TYPE_NORMAL)
    assert host.umc.rmp_asid((pfn << 12) + 100) == ASID
    host.umc.write_owned((pfn << 12) + 16, b"owner's key")
    assert host.umc.read((pfn << 12) + 16, 11, ASID) == b"owner's key"
    assert host.mem.read((pfn << 12) + 16, 11) != b"owner's key"
    free = host.mem.alloc_contiguous(1)
    assert host.umc.rmp_asid(free) == 0
    host.umc.write_owned(free, b"plain")
    assert host.mem.read(free, 5) == b"plain"


def test_a_vmm_write_to_a_guest_frame_is_an_rmp_fault():
    """A VMM write through its address space to a frame the RMP gives a guest is refused with
    an RMP fault and writes nothing; other pages of the mapping stay writable."""
    host = snp_host()
    kvm = host.kvm
    hva = kvm.mmap(2 * 4096)
    kvm.write(hva, b"a" * 8192)
    pfn = kvm.hva_to_pfn(hva + 4096, write=True)
    assert host.rmp.rmp_make_private(pfn, 0x3000, ASID) == 0
    with raises_errno(errno.EFAULT, "VMM write") as info:
        kvm.write(hva + 4000, b"b" * 200)
    assert isinstance(info.value, RmpFault) and info.value.pfn == pfn
    assert kvm.read(hva, 8192) == b"a" * 8192
    kvm.write(hva, b"c" * 100)
