"""Helpers of the SEV-SNP firmware tests: a Host with SNP initialized, guest contexts, pages in
the Pre-Guest state, guest messages and the state a refused command must leave unchanged."""
import numpy as np

import sevcore
from sevcore import uapi as U
from sevcore.psp import attest as A
from sevcore.psp import snp_layout as S

POLICY = U.SNP_POLICY_MASK_SMT | U.SNP_POLICY_MASK_RSVD_MBO
ASID = 3


def snp_host(seed=5, memory_size=1 << 32, sev=False):
    """A Host whose firmware ran SNP_INIT (and SEV INIT if ``sev``), WBINVD and SNP_DF_FLUSH."""
    host = sevcore.Host(seed=seed, memory_size=memory_size)
    host.psp.snp_init()
    if sev:
        host.psp.init()
    host.psp.wbinvd()
    host.psp.snp_df_flush()
    return host


def new_guest(host, policy=POLICY, asid=ASID, **start):
    """A guest context through SNP_GCTX_CREATE, SNP_LAUNCH_START and SNP_ACTIVATE; its SPA."""
    gctx = host.psp.snp_alloc_firmware_page()
    host.psp.snp_gctx_create(gctx)
    host.psp.snp_launch_start(gctx, policy, **start)
    host.psp.snp_activate(gctx, asid)
    return gctx


def preguest(host, data, gfn0, asid=ASID, gpas=None):
    """Frames holding ``data`` (whole pages), each assigned to ``asid`` at ``gfn0 + i`` (or
    ``gpas[i]``) and locked, as kvm_gmem_populate leaves them; their pfns."""
    n = len(data) // 4096
    pfns = host.mem.alloc(n)
    for i, pfn in enumerate(pfns.tolist()):
        host.mem.write(pfn << 12, data[i * 4096:(i + 1) * 4096])
        gpa = (gfn0 + i) << 12 if gpas is None else gpas[i]
        assert host.rmp.rmp_make_private(pfn, gpa, asid, immutable=True) == 0
    return pfns


def spas(pfns):
    return np.asarray(pfns, np.uint64) << np.uint64(12)


def vmpck(host, gctx, i=0):
    return host.psp.snp_guest(gctx).vmpck[i]


def guest_request(host, gctx, key, seqno, msg_type, payload, vmpck_id=0):
    """Seal a request, run SNP_GUEST_REQUEST; returns (response header, payload) opened."""
    req = host.mem.alloc_contiguous(1)
    host.mem.write(req, A.seal_msg(key, seqno, msg_type, payload, vmpck_id=vmpck_id))
    res = host.psp.snp_alloc_firmware_page()
    host.psp.snp_guest_request(gctx, req, res)
    return A.open_msg(key, host.mem.read(res, 4096))


def report(host, gctx, user_data=bytes(64), vmpl=0, seqno=1, vmpck_id=0):
    """The report bytes of an MSG_REPORT_REQ under VMPCK ``vmpck_id``."""
    _, payload = guest_request(host, gctx, vmpck(host, gctx, vmpck_id), seqno,
                               U.SNP_MSG_REPORT_REQ,
                               S.snp_report_req.pack(user_data=user_data, vmpl=vmpl), vmpck_id)
    resp = S.snp_report_resp.unpack(payload)
    assert resp["status"] == 0 and resp["report_size"] == 1184
    return resp["report"]


def snapshot(host, *pfns):
    """What a refused command must leave as it was: guests, RMP entries and the frames."""
    psp = host.psp
    guests = {k: (g.state, g.ld, g.asid, g.policy, tuple(g.msg_count), g.host_data)
              for k, g in psp._snp_guests.items()}
    entries = [tuple(host.rmp.entry(int(p))) for p in pfns]
    frames = [host.mem.read(int(p) << 12, 4096) for p in pfns]
    return psp.snp_state, guests, entries, frames, host.rmp.assigned
