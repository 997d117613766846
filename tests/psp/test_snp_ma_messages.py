"""SNP migration through a migration agent at the firmware level (sevcore.psp.snp_ma; AMD 56860
7.4-7.8, 8.17): the agent bound at SNP_LAUNCH_START, MSG_VMRK_REQ, MSG_EXPORT_REQ on the source,
MSG_IMPORT_REQ on the target, MSG_ABSORB(_NOMA)_REQ, and every refusal with its status."""
import errno

import pytest

from sevcore import uapi as U
from sevcore.psp import attest as A
from sevcore.psp import snp_layout as S
from sevcore.psp import snp_ma as M

from support import raises_errno
from support.snp import (POLICY, guest_request, new_guest, preguest, report, snapshot,
                         snp_host, vmpck)

MA_POLICY = POLICY | U.SNP_POLICY_MASK_MIGRATE_MA
VMRK = bytes(range(32))


def running(host, asid, policy=POLICY, **start):
    """A guest context launched, activated on ``asid`` and finished; its SPA."""
    gctx = new_guest(host, policy, asid, **start)
    host.psp.snp_launch_finish(gctx)
    return gctx


class Agent:
    """A running guest sending messages under its VMPCK0, numbering them as its driver does."""

    def __init__(self, host, gctx):
        self.host, self.gctx, self.seqno = host, gctx, 1

    def send(self, msg_type, layout_or_payload, vmpck_id=0, **fields):
        payload = layout_or_payload.pack(**fields) if fields else layout_or_payload
        key = vmpck(self.host, self.gctx, vmpck_id)
        seqno = self.host.psp.snp_guest(self.gctx).msg_count[vmpck_id] + 1
        h, body = guest_request(self.host, self.gctx, key, seqno, msg_type, payload, vmpck_id)
        assert h["msg_type"] == msg_type + 1
        return body

    def status(self, msg_type, layout, **fields):
        return M.snp_msg_status_rsp.unpack(self.send(msg_type, layout, **fields))["status"]

    def export(self, gctx, imi_en=0, vmpck_id=0):
        rsp = M.snp_msg_export_rsp.unpack(self.send(
            U.SNP_MSG_EXPORT_REQ, M.snp_msg_export_req.pack(gctx_paddr=gctx, imi_en=imi_en),
            vmpck_id))
        return rsp["status"], rsp

    def import_(self, gctx, incoming, layout=M.snp_msg_import_req, **over):
        fields = dict(dict(gctx_paddr=gctx, in_gctx_size=M.snp_msg_gctx.size,
                           in_gctx_version=M.GCTX_VERSION, incoming_gctx=incoming), **over)
        msg = U.SNP_MSG_IMPORT_REQ if layout is M.snp_msg_import_req else U.SNP_MSG_ABSORB_REQ
        return self.status(msg, layout, **fields)


DATA = bytes(range(256)) * 16


def source(seed=1):
    """A source host with a running agent (ASID 1) and a guest bound to it (ASID 2), whose VMRK
    the agent set during the launch; the guest's page at gfn 7 is swapped out with its metadata
    entry as the context's root (``ma.swapped``: the ciphertext's SPA; ``ma.page``: the page's
    frame)."""
    host = snp_host(seed=seed)
    ma = Agent(host, running(host, 1))
    gctx = new_guest(host, MA_POLICY, 2, ma_en=1, ma_gctx_paddr=ma.gctx)
    assert ma.status(U.SNP_MSG_VMRK_REQ, M.snp_msg_vmrk_req, gctx_paddr=gctx, vmrk=VMRK) == 0
    (pfn,) = preguest(host, DATA, 7, asid=2).tolist()
    host.psp.snp_launch_update(gctx, pfn << 12, U.SNP_PAGE_TYPE_NORMAL)
    host.psp.snp_launch_finish(gctx)
    ma.swapped, ma.page = host.mem.alloc_contiguous(1), pfn
    host.psp.snp_page_swap_out(gctx, pfn << 12, ma.swapped, root_mdata_en=1)
    assert not host.rmp.entry(pfn).validated and host.mem.read(ma.swapped, 4096) != DATA
    return host, ma, gctx


def incoming(seed=2):
    """A target host with its own agent (ASID 1) and an empty context (SNP_GCTX_CREATE only)."""
    host = snp_host(seed=seed)
    ma = Agent(host, running(host, 1))
    gctx = host.psp.snp_alloc_firmware_page()
    host.psp.snp_gctx_create(gctx)
    return host, ma, gctx


def vmrk_key(host, gctx):
    """The guest's MSG_KEY_REQ from its VM root key (ROOT_KEY_SELECT = 1)."""
    body = Agent(host, gctx).send(U.SNP_MSG_KEY_REQ, S.snp_derived_key_req,
                                  root_key_select=1, guest_field_select=0b1001)
    rsp = S.snp_derived_key_resp.unpack(body)
    assert rsp["status"] == 0
    return rsp["derived_key"]


def test_layouts_match_the_firmware_sizes():
    """The exported context is 0x300 bytes, its metadata entry 0x40, the requests as 56860
    chapter 7 sizes them."""
    assert M.snp_msg_gctx.size == 0x300 and M.snp_mdata_entry.size == 0x40
    assert M.snp_msg_gctx.offsets["root_md_entry"] == 0x1E0
    assert M.snp_msg_gctx.offsets["launch_tcb"] == 0x2C0
    assert M.snp_msg_export_req.size == 0x10 and M.snp_msg_export_rsp.size == 0x320
    assert M.snp_msg_import_req.size == M.snp_msg_absorb_req.size == 0x320
    assert M.snp_msg_vmrk_req.size == 0x40 and M.snp_msg_status_rsp.size == 0x10


def test_guest_context_moves_from_agent_to_agent():
    """Exported by its agent and imported by another on a new host, the guest runs there with
    its measurement, VMPCKs, message counts and VM root key; its report names the new agent."""
    src, ma, gctx = source()
    g = src.psp.snp_guest(gctx)
    assert g.report_id_ma == src.psp.snp_guest(ma.gctx).report_id
    rep = S.snp_attestation_report.unpack(report(src, gctx))
    assert rep["report_id_ma"] == g.report_id_ma
    key = vmrk_key(src, gctx)
    before = (g.ld, list(g.vmpck), list(g.msg_count), g.policy)
    status, rsp = ma.export(gctx)
    assert status == 0 and rsp["gctx_size"] == 0x300 and rsp["gctx_version"] == M.GCTX_VERSION
    assert src.psp.snp_guest(gctx) is None and src.psp._fw_page(gctx)   # decommissioned

    dst, ma2, new = incoming()
    assert ma2.import_(new, rsp["gctx"]) == 0
    m = dst.psp.snp_guest(new)
    assert (m.ld, m.vmpck, m.msg_count, m.policy) == before
    assert m.state == U.SNP_GUEST_STATE_RUNNING and m.vmrk == VMRK
    dst.psp.snp_activate(new, 2)
    assert vmrk_key(dst, new) == key
    seqno = m.msg_count[0] + 1
    rep = S.snp_attestation_report.unpack(report(dst, new, seqno=seqno))
    assert rep["measurement"] == before[0]
    assert rep["report_id_ma"] == dst.psp.snp_guest(ma2.gctx).report_id != m.report_id


def test_launch_start_checks_the_agent():
    """An agent needs MIGRATE_MA in the policy and may not be bound to an agent itself
    (POLICY_FAILURE); what is not a guest context is INVALID_GUEST."""
    host, ma, gctx = source()
    for policy, ma_gctx, status in ((POLICY, ma.gctx, U.SEV_RET_POLICY_FAILURE),
                                    (MA_POLICY, gctx, U.SEV_RET_POLICY_FAILURE),
                                    (MA_POLICY, gctx + 4096, U.SEV_RET_INVALID_GUEST)):
        new = host.psp.snp_alloc_firmware_page()
        host.psp.snp_gctx_create(new)
        with raises_errno(errno.EIO) as e:
            host.psp.snp_launch_start(new, policy, ma_en=1, ma_gctx_paddr=ma_gctx)
        assert e.value.fw_error == status
        assert host.psp.snp_guest(new).state == U.SNP_GUEST_STATE_INIT


def test_only_the_bound_agent_exports():
    """Another running guest, or the guest itself once it has an agent, is INVALID_GUEST, and the
    guest runs on; a guest with no agent exports itself at VMPCK0 only."""
    host, ma, gctx = source()
    other = Agent(host, running(host, 3))
    before = snapshot(host)
    assert other.export(gctx)[0] == U.SEV_RET_INVALID_GUEST
    assert snapshot(host)[1][gctx >> 12] == before[1][gctx >> 12]
    assert Agent(host, gctx).export(gctx)[0] == U.SEV_RET_INVALID_GUEST
    g = host.psp.snp_guest(gctx)
    assert (g.state, g.asid) == (U.SNP_GUEST_STATE_RUNNING, 2)
    assert other.export(other.gctx, vmpck_id=1)[0] == U.SEV_RET_INVALID_GUEST
    assert other.export(other.gctx, imi_en=1)[0] == 0
    assert host.psp.snp_guest(other.gctx).state == U.SNP_GUEST_STATE_RUNNING


def test_import_refusals():
    """IMPORT wants an INIT context (INVALID_GUEST_STATE), a context that is one (INVALID_GUEST),
    the exported size and version (INVALID_PARAM) and a VALID root metadata entry, which an
    IMI_EN export does not carry (INVALID_MDATA_ENTRY); a refusal leaves the context INIT."""
    src, ma, gctx = source()
    _, imi = ma.export(gctx, imi_en=1)
    assert M.snp_msg_gctx.unpack(imi["gctx"])["root_md_entry"] == bytes(64)
    _, rsp = ma.export(gctx)
    dst, ma2, new = incoming()
    assert ma2.import_(new, imi["gctx"]) == U.SEV_RET_INVALID_MDATA_ENTRY
    assert ma2.import_(new, rsp["gctx"], in_gctx_version=2) == U.SEV_RET_INVALID_PARAM
    assert ma2.import_(new, rsp["gctx"], in_gctx_size=0x2F0) == U.SEV_RET_INVALID_PARAM
    assert ma2.import_(new + 4096, rsp["gctx"]) == U.SEV_RET_INVALID_GUEST
    assert ma2.import_(ma2.gctx, rsp["gctx"]) == U.SEV_RET_INVALID_GUEST_STATE
    assert dst.psp.snp_guest(new).state == U.SNP_GUEST_STATE_INIT
    assert ma2.import_(new, rsp["gctx"]) == 0
    assert ma2.import_(new, rsp["gctx"]) == U.SEV_RET_INVALID_GUEST_STATE


@pytest.mark.parametrize("attack", ["replay", "tamper", "other-key"])
def test_a_replayed_or_tampered_import_changes_nothing(attack):
    """An import request page sent again, with a byte changed or sealed under another agent's
    key is refused by SNP_GUEST_REQUEST (INVALID_PARAM) and changes nothing."""
    src, ma, gctx = source()
    _, rsp = ma.export(gctx)
    dst, ma2, new = incoming()
    other = running(dst, 3)
    payload = M.snp_msg_import_req.pack(gctx_paddr=new, in_gctx_size=0x300,
                                        in_gctx_version=M.GCTX_VERSION,
                                        incoming_gctx=rsp["gctx"])
    key = vmpck(dst, other if attack == "other-key" else ma2.gctx)
    page = bytearray(A.seal_msg(key, 1, U.SNP_MSG_IMPORT_REQ, payload, vmpck_id=0))
    if attack == "tamper":
        page[S.snp_guest_msg_hdr.size + 40] ^= 1
    req = dst.mem.alloc_contiguous(1)
    dst.mem.write(req, bytes(page))
    res = dst.psp.snp_alloc_firmware_page()
    if attack == "replay":
        dst.psp.snp_guest_request(ma2.gctx, req, res)      # the agent's own import, once
        assert dst.psp.snp_guest(new).state == U.SNP_GUEST_STATE_RUNNING
    before = snapshot(dst)
    with raises_errno(errno.EIO) as e:
        dst.psp.snp_guest_request(ma2.gctx, req, res)
    assert e.value.fw_error == U.SEV_RET_INVALID_PARAM
    assert snapshot(dst) == before


def test_vmrk_rules():
    """MSG_VMRK_REQ wants VMPCK0 (INVALID_PARAM), the guest's own agent (INVALID_GUEST) and a
    guest still in LAUNCH (INVALID_GUEST_STATE)."""
    host, ma, gctx = source()
    other = Agent(host, running(host, 3))
    launching = new_guest(host, MA_POLICY, 4, ma_en=1, ma_gctx_paddr=ma.gctx)
    args = (U.SNP_MSG_VMRK_REQ, M.snp_msg_vmrk_req)
    assert ma.status(*args, gctx_paddr=gctx, vmrk=VMRK) == U.SEV_RET_INVALID_GUEST_STATE
    assert other.status(*args, gctx_paddr=launching, vmrk=VMRK) == U.SEV_RET_INVALID_GUEST
    body = ma.send(U.SNP_MSG_VMRK_REQ, M.snp_msg_vmrk_req.pack(gctx_paddr=launching), 1)
    assert M.snp_msg_status_rsp.unpack(body)["status"] == U.SEV_RET_INVALID_PARAM
    assert host.psp.snp_guest(launching).vmrk != VMRK


def test_absorb_into_an_intermediate_image():
    """A guest launched with IMI_EN absorbs an exported context whose IMD is its launch digest
    and runs with its keys, bound to the sender; a measured IMI is BAD_MEASUREMENT."""
    src, ma, gctx = source()
    _, rsp = ma.export(gctx)
    dst, ma2, _ = incoming()
    imi = new_guest(dst, MA_POLICY, 2, ma_en=1, ma_gctx_paddr=ma2.gctx, imi_en=1)
    dst.psp.snp_guest(imi).ld = b"\1" * 48
    args = dict(layout=M.snp_msg_absorb_req)
    assert ma2.import_(imi, rsp["gctx"], **args) == U.SEV_RET_BAD_MEASUREMENT
    dst.psp.snp_guest(imi).ld = bytes(48)
    assert ma2.import_(imi, rsp["gctx"], **args) == 0
    m = dst.psp.snp_guest(imi)
    assert m.state == U.SNP_GUEST_STATE_RUNNING and m.vmrk == VMRK
    assert m.vmpck[0] == M.snp_msg_gctx.unpack(rsp["gctx"])["vmpck0"]


def test_absorb_noma_replaces_the_senders_context():
    """A guest with no agent absorbs an incoming context itself; the answer is sealed under the
    key the request came with, and its keys are the incoming ones from then on."""
    src, ma, gctx = source()
    _, rsp = ma.export(gctx)
    dst = snp_host(seed=3)
    g = Agent(dst, running(dst, 1))
    old = vmpck(dst, g.gctx)
    body = g.send(M.SNP_MSG_ABSORB_NOMA_REQ, M.snp_msg_absorb_noma_req.pack(
        in_gctx_size=0x300, in_gctx_version=M.GCTX_VERSION, incoming_gctx=rsp["gctx"]))
    assert M.snp_msg_status_rsp.unpack(body)["status"] == 0
    assert vmpck(dst, g.gctx) == M.snp_msg_gctx.unpack(rsp["gctx"])["vmpck0"] != old
    bound = running(dst, 2, MA_POLICY, ma_en=1, ma_gctx_paddr=g.gctx)
    body = Agent(dst, bound).send(M.SNP_MSG_ABSORB_NOMA_REQ, M.snp_msg_absorb_noma_req.pack(
        in_gctx_size=0x300, in_gctx_version=M.GCTX_VERSION, incoming_gctx=rsp["gctx"]))
    assert M.snp_msg_status_rsp.unpack(body)["status"] == U.SEV_RET_INVALID_GUEST



def _swapped_guest():
    """source() exported and imported on a target, activated on ASID 2; (target, the new
    context, the frame holding the swapped-out page's ciphertext)."""
    host, ma, gctx = source()
    _, rsp = ma.export(gctx)
    dst, ma2, new = incoming()
    assert ma2.import_(new, rsp["gctx"]) == 0
    dst.psp.snp_activate(new, 2)
    (src,) = dst.mem.alloc(1).tolist()
    dst.mem.write(src << 12, host.mem.read(ma.swapped, 4096))
    return dst, new, src


def test_swap_out_and_in_carry_a_page_across_hosts():
    """A page swapped out under the offline key on the source comes back into a Pre-Guest
    page of the imported guest, validated and readable with the guest's new key."""
    dst, new, src = _swapped_guest()
    (pfn,) = dst.mem.alloc(1).tolist()
    assert dst.rmp.rmp_make_private(pfn, 7 << 12, 2, immutable=True) == 0
    dst.psp.snp_page_swap_in(new, src << 12, pfn << 12, root_mdata_en=1)
    e = dst.rmp.entry(pfn)
    assert (e.assigned, e.immutable, e.validated, e.asid, e.gpa) == (1, 0, 1, 2, 7 << 12)
    assert dst.umc.read(pfn << 12, 4096, 2) == DATA
    assert not M.snp_mdata_entry.unpack(dst.psp.snp_guest(new).root_md)["valid"]


@pytest.mark.parametrize("case, status", [
    ("tamper", U.SEV_RET_INVALID_MDATA_ENTRY), ("gpa", U.SEV_RET_INVALID_PAGE_STATE),
    ("not-preguest", U.SEV_RET_INVALID_PAGE_STATE), ("vmsa", U.SEV_RET_INVALID_MDATA_ENTRY),
    ("owner", U.SEV_RET_INVALID_PAGE_OWNER)])
def test_swap_in_refusals_change_nothing(case, status):
    """A changed ciphertext, another GPA, a page not Pre-Guest, the wrong page type or another
    guest's page is refused with its status, and nothing changes."""
    dst, new, src = _swapped_guest()
    (pfn,) = dst.mem.alloc(1).tolist()
    gpa, immutable, asid = (8 << 12 if case == "gpa" else 7 << 12), case != "not-preguest", \
        (1 if case == "owner" else 2)
    assert dst.rmp.rmp_make_private(pfn, gpa, asid, immutable=immutable) == 0
    if case == "tamper":
        dst.mem.write((src << 12) + 100, b"\x55")
    before = snapshot(dst, pfn, src)
    root = dst.psp.snp_guest(new).root_md
    with raises_errno(errno.EIO) as e:
        dst.psp.snp_page_swap_in(new, src << 12, pfn << 12, root_mdata_en=1,
                                 page_type=M.SWAP_VMSA if case == "vmsa" else M.SWAP_DATA)
    assert e.value.fw_error == status
    assert snapshot(dst, pfn, src) == before and dst.psp.snp_guest(new).root_md == root


@pytest.mark.parametrize("where", ["dst", "src"])
def test_a_metadata_entry_inside_the_swapped_pages_is_refused(where):
    """A metadata entry that lies in SWAP_OUT's destination page, or SWAP_IN's source page, is
    INVALID_PARAM (AMD-ASPFW snp_mcmd_swap_out/_in: MDATA_PADDR may not overlap either page),
    and nothing changes: the IV count, the pages, the guest's RMP entry."""
    host, ma, gctx = source()
    pfn = ma.page
    fw = host.psp.snp_alloc_firmware_page()
    g = host.psp.snp_guest(gctx)
    iv, root = g.oek_iv_count, g.root_md
    before = snapshot(host, pfn, fw >> 12)
    with raises_errno(errno.EIO) as e:
        if where == "dst":
            host.psp.snp_page_swap_out(gctx, pfn << 12, fw, mdata_paddr=fw + 64)
        else:
            host.psp.snp_page_swap_in(gctx, fw, pfn << 12, mdata_paddr=fw + 64)
    assert e.value.fw_error == U.SEV_RET_INVALID_PARAM
    assert snapshot(host, pfn, fw >> 12) == before
    assert (g.oek_iv_count, g.root_md) == (iv, root)


@pytest.mark.parametrize("ma_en", [0, 1])
def test_launch_start_refuses_reserved_bits_in_the_agents_address(ma_en):
    """MA_GCTX_PADDR with bits 63:52 set is INVALID_PARAM whether or not MA_EN is set
    (AMD-ASPFW snp_mcmd_launch_start checks it with the reserved fields), and the context
    stays INIT."""
    host, ma, _ = source()
    new = host.psp.snp_alloc_firmware_page()
    host.psp.snp_gctx_create(new)
    with raises_errno(errno.EIO) as e:
        host.psp.snp_launch_start(new, MA_POLICY, ma_en=ma_en, ma_gctx_paddr=ma.gctx | 1 << 60)
    assert e.value.fw_error == U.SEV_RET_INVALID_PARAM
    assert host.psp.snp_guest(new).state == U.SNP_GUEST_STATE_INIT


def test_absorb_checks_the_incoming_size_and_version_last():
    """ABSORB checks the incoming context's size and version after the target's state, as
    AMD-ASPFW's handler does: a bad version into a running guest is INVALID_GUEST_STATE, into
    a matching IMI INVALID_PARAM, which leaves it in LAUNCH."""
    src, ma, gctx = source()
    _, rsp = ma.export(gctx)
    dst, ma2, _ = incoming()
    imi = new_guest(dst, MA_POLICY, 2, ma_en=1, ma_gctx_paddr=ma2.gctx, imi_en=1)
    args = dict(layout=M.snp_msg_absorb_req, in_gctx_version=2)
    assert ma2.import_(ma2.gctx, rsp["gctx"], **args) == U.SEV_RET_INVALID_GUEST_STATE
    assert ma2.import_(imi, rsp["gctx"], **args) == U.SEV_RET_INVALID_PARAM
    assert dst.psp.snp_guest(imi).state == U.SNP_GUEST_STATE_LAUNCH
