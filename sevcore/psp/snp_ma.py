"""SEV-SNP migration through a migration agent (MA): the firmware's half.

An SNP guest launched with ``POLICY.MIGRATE_MA`` may be bound to a migration agent at
SNP_LAUNCH_START (``MA_EN`` = 1, ``MA_GCTX_PADDR`` = the agent's guest context; 56860 8.17). The
agent is itself a running SNP guest; from then on the firmware takes from it, and only from it,
the guest messages that move the guest's context between platforms (56860 chapter 7, the
message types of arch/x86/include/asm/sev.h ``enum msg_type``):

=====================  ====  ============================================================
message                type  what the firmware does (56860 section)
=====================  ====  ============================================================
MSG_EXPORT_REQ/RSP     7/8   the guest context, in the clear inside the agent's message
                             (7.4); IMI_EN = 0 decommissions the guest here
MSG_IMPORT_REQ/RSP     9/10  a context in the INIT state becomes that guest, RUNNING, bound
                             to the importing agent (7.5)
MSG_ABSORB_REQ/RSP     11/12 a guest launched with IMI_EN = 1 (its "intermediate migration
                             image") takes over an exported context (7.6)
MSG_VMRK_REQ/RSP       13/14 the agent sets the VM root key of a guest it is bound to, while
                             the guest is in LAUNCH (7.8)
MSG_ABSORB_NOMA        15/16 as ABSORB, for a guest with no agent, sent by itself (7.7)
=====================  ====  ============================================================

The byte layouts are those of 56860 chapter 7 as AMD's published firmware source lays them out
(AMD-ASPFW ``sev_rmp.h``: ``snp_msg_export_req_t`` ... ``snp_msg_gctx_t``, 0x300 bytes, version
3), and the checks follow its handlers (``sev_mcmd.c`` ``snp_mcmd_guest_request``) in their
order. A failed check is the response's STATUS; SNP_GUEST_REQUEST itself succeeds and uses up
the sequence number, as the firmware answers every authenticated request. docs/snp.md
("Migration through a migration agent") says what the specification leaves open and what
sevcore chose.
"""
from Crypto.Cipher import AES

from sevcore import uapi as U
from sevcore.psp import snp_layout as S
from sevcore.psp.crypto import kdf
from sevcore.psp.layout import U8, U32, U64, Layout

GSTATE_INIT = U.SNP_GUEST_STATE_INIT
GSTATE_LAUNCH = U.SNP_GUEST_STATE_LAUNCH
GSTATE_RUNNING = U.SNP_GUEST_STATE_RUNNING
#: The two message types 56860 7.7 adds after the kernel's enum msg_type (AMD-ASPFW
#: ``SNP_MSG_ABSORB_NOMA_REQ``/``_RSP``); the kernel's enum stops at MSG_VMRK_RSP.
SNP_MSG_ABSORB_NOMA_REQ = 15
SNP_MSG_ABSORB_NOMA_RSP = 16
#: The exported context's layout version and size (AMD-ASPFW SNP_GMSG_MAX_XPORT_GCTX_VERSION).
GCTX_VERSION = 3
#: "No migration agent": the MA field of a context launched without one, and the REPORT_ID_MA
#: reports carry for it (all ones, 56860 7.3 "REPORT_ID_MA").
NO_MA = None
NO_MA_REPORT_ID = b"\xff" * 32

#: A metadata entry (56860 "MDATA": what SNP_PAGE_SWAP_OUT writes for a page; the context's
#: ROOT_MD_ENTRY is the entry of the top of the tree).
snp_mdata_entry = Layout("snp_mdata_entry", [
    ("software_data", U64), ("iv", U64), ("auth_tag", "16s"),
    ("_entry", U64, [("valid", 1), ("page_validated", 1), ("vmsa", 1), ("metadata", 1),
                     ("page_size", 1), ("rsvd1", 7), ("gpa", 52)]),
    ("vmpl", U64), ("rsvd2", U64), ("rsvd3", U64)])
#: The guest context as it travels (56860 7.4 "GCTX structure"; AMD-ASPFW snp_msg_gctx_t).
snp_msg_gctx = Layout("snp_msg_gctx", [
    ("ld", "48s"), ("oek", "32s"), ("vmpck0", "32s"), ("vmpck1", "32s"), ("vmpck2", "32s"),
    ("vmpck3", "32s"), ("vmrk", "32s"), ("host_data", "32s"), ("id_key_digest", "48s"),
    ("author_key_digest", "48s"), ("report_id", "32s"), ("imd", "48s"), ("msg_count0", U64),
    ("msg_count1", U64), ("msg_count2", U64), ("msg_count3", U64), ("root_md_entry", "64s"),
    ("_flags", U64, [("author_key_en", 1), ("id_block_en", 1), ("vcek_dis", 1), ("rsvd", 61)]),
    ("policy", U64), ("state", U8), ("rsvd1", "7s"), ("oek_iv_count", U64),
    ("id_block", "96s"), ("gosvw", "16s"), ("desired_tsc_freq", U32), ("rsvd2", U32),
    ("psp_tsc_offset", U64), ("launch_tcb", U64), ("rsvd3", "56s")])
snp_msg_export_req = Layout("snp_msg_export_req", [
    ("gctx_paddr", U64), ("_flags", U32, [("imi_en", 1), ("rsvd", 31)]), ("rsvd2", U32)])
snp_msg_export_rsp = Layout("snp_msg_export_rsp", [
    ("status", U32), ("gctx_size", U32), ("gctx_version", U32), ("rsvd", "20s"),
    ("gctx", f"{snp_msg_gctx.size}s")])
_IN = [("in_gctx_size", U32), ("in_gctx_version", U32), ("rsvd", "16s"),
       ("incoming_gctx", f"{snp_msg_gctx.size}s")]
snp_msg_import_req = Layout("snp_msg_import_req", [("gctx_paddr", U64)] + _IN)
snp_msg_absorb_req = Layout("snp_msg_absorb_req", [("gctx_paddr", U64)] + _IN)
snp_msg_absorb_noma_req = Layout("snp_msg_absorb_noma_req", [("rsvd0", U64)] + _IN)
snp_msg_vmrk_req = Layout("snp_msg_vmrk_req", [
    ("gctx_paddr", U64), ("rsvd", "24s"), ("vmrk", "32s")])
#: SNP_PAGE_SWAP_OUT / SNP_PAGE_SWAP_IN's buffers (56860 chapter 8, the two commands; AMD-ASPFW
#: sev_mcmd.h ``snp_mcmd_swap_out_t``, ``snp_mcmd_swap_in_t``: the kernel has the ids only).
_SWAP_FLAGS = [("page_size", 1), ("page_type", 2), ("swap_in_place", 1), ("root_mdata_en", 1),
               ("rsvd2", 59)]
sev_data_snp_page_swap_out = Layout("sev_data_snp_page_swap_out", [
    ("gctx_paddr", U64), ("src_paddr", U64), ("dst_paddr", U64), ("mdata_paddr", U64),
    ("software_data", U64), ("_flags", U64, _SWAP_FLAGS)])
sev_data_snp_page_swap_in = Layout("sev_data_snp_page_swap_in", [
    ("gctx_paddr", U64), ("src_paddr", U64), ("dst_paddr", U64), ("mdata_paddr", U64),
    ("rsvd", U64), ("_flags", U64, _SWAP_FLAGS)])
#: SWAP_OUT/SWAP_IN page types (AMD-ASPFW SWAP_IO_*): data, metadata, VMSA.
SWAP_DATA, SWAP_METADATA, SWAP_VMSA = 0, 1, 2
#: The status-only answers of IMPORT, ABSORB, ABSORB_NOMA and VMRK.
snp_msg_status_rsp = Layout("snp_msg_status_rsp", [("status", U32), ("rsvd", "12s")])
#: EXPORT's answer fills the page (AMD-ASPFW: MSG_SIZE = 4 KiB - the header).
EXPORT_RSP_SIZE = U.SNP_GUEST_MSG_SIZE - S.snp_guest_msg_hdr.size

#: The physical-address bits a message's GCTX_PADDR may not set (bits 63:52; the page offset
#: is dropped, as the firmware's SNP_PAGE_ADDR drops it).
_ADDR_RESERVED = ~((1 << 52) - 1) & ((1 << 64) - 1)


class SnpMaMessages:
    """Mixin of Psp (through SnpCommands): the migration-agent half of SNP_GUEST_REQUEST."""

    def _ma_handlers(self):
        return {U.SNP_MSG_EXPORT_REQ: self._msg_export, U.SNP_MSG_IMPORT_REQ: self._msg_import,
                U.SNP_MSG_ABSORB_REQ: self._msg_absorb, U.SNP_MSG_VMRK_REQ: self._msg_vmrk,
                SNP_MSG_ABSORB_NOMA_REQ: self._msg_absorb_noma}

    # -- SNP_LAUNCH_START's agent (56860 8.17) -----------------------------------------------------

    def _ma_launch_check(self, f):
        """(status, agent context or None) for SNP_LAUNCH_START's MA_EN / MA_GCTX_PADDR: the
        agent must be a guest context (INVALID_GUEST), the policy must allow an agent, the agent
        must not be bound to one itself, and a SINGLE_SOCKET guest needs a SINGLE_SOCKET agent
        (POLICY_FAILURE), in AMD-ASPFW snp_mcmd_launch_start's order; MA_GCTX_PADDR's
        reserved bits are INVALID_PARAM even with MA_EN = 0, as there."""
        if f.ma_gctx_paddr & _ADDR_RESERVED:
            return U.SEV_RET_INVALID_PARAM, None
        if not f.ma_en:
            return U.SEV_RET_SUCCESS, None
        spa = self._addr(f.ma_gctx_paddr)
        ma = self._snp_guests.get(spa >> 12) if spa % 4096 == 0 else None
        if ma is None:
            return U.SEV_RET_INVALID_GUEST, None
        if not f.policy & U.SNP_POLICY_MASK_MIGRATE_MA or ma.ma_pfn is not NO_MA or \
                (f.policy & U.SNP_POLICY_MASK_SINGLE_SOCKET
                 and not ma.policy & U.SNP_POLICY_MASK_SINGLE_SOCKET):
            return U.SEV_RET_POLICY_FAILURE, None
        return U.SEV_RET_SUCCESS, ma

    def _ma_bind(self, g, ma, imi_en):
        """LAUNCH_START's agent fields: the agent's context and REPORT_ID (REPORT_ID_MA), the
        offline encryption key and the VM root key, fresh."""
        g.ma_pfn = ma.gctx_pfn if ma is not None else NO_MA
        g.report_id_ma = ma.report_id if ma is not None else NO_MA_REPORT_ID
        g.imi_en = imi_en
        g.oek = self._rng(32)
        g.vmrk = self._rng(32)

    # -- the messages ------------------------------------------------------------------------------

    def _target(self, gctx_paddr, *states):
        """(status, guest) named by a message's GCTX_PADDR: reserved bits clear
        (INVALID_PARAM), a guest context (INVALID_GUEST), in one of ``states``
        (INVALID_GUEST_STATE)."""
        if gctx_paddr & _ADDR_RESERVED:
            return U.SEV_RET_INVALID_PARAM, None
        m = self._snp_guests.get((gctx_paddr & ~(1 << self.host.c_bit)) >> 12)
        if m is None:
            return U.SEV_RET_INVALID_GUEST, None
        if states and m.state not in states:
            return U.SEV_RET_INVALID_GUEST_STATE, None
        return U.SEV_RET_SUCCESS, m

    def _bound_to(self, m, g):
        """Whether guest ``m``'s agent is ``g`` (the context page and its REPORT_ID)."""
        return m.ma_pfn == g.gctx_pfn and m.report_id_ma == g.report_id

    def _msg_export(self, g, vmpck_id, payload):
        """MSG_EXPORT_REQ (56860 7.4): the guest at GCTX_PADDR, RUNNING, exported by its agent
        (or by itself at VMPCK0 when it has none; anything else is INVALID_GUEST). IMI_EN = 0
        decommissions it (the context page goes back to a firmware page) and exports its root
        metadata entry (what SNP_PAGE_SWAP_OUT with ROOT_MDATA_EN left); IMI_EN = 1 leaves it
        running and exports a zero entry."""
        req = snp_msg_export_req.unpack(payload.ljust(snp_msg_export_req.size, b"\0"))
        rsp = dict(gctx_size=snp_msg_gctx.size, gctx_version=GCTX_VERSION)
        status, m = U.SEV_RET_INVALID_PARAM, None
        if len(payload) == snp_msg_export_req.size and not req["rsvd"] and not req["rsvd2"]:
            status, m = self._target(req["gctx_paddr"], GSTATE_RUNNING)
        if not status:
            by_agent = self._bound_to(m, g)
            by_itself = m is g and g.ma_pfn is NO_MA and vmpck_id == 0
            if not (by_agent or by_itself):
                status = U.SEV_RET_INVALID_GUEST
        if not status:
            rsp["gctx"] = self._export_gctx(m, with_root=not req["imi_en"])
            if not req["imi_en"]:
                self._decommission(m)
        return snp_msg_export_rsp.pack(status=status, **rsp).ljust(EXPORT_RSP_SIZE, b"\0")

    def _msg_import(self, g, vmpck_id, payload):
        """MSG_IMPORT_REQ (56860 7.5): a context in the INIT state becomes the incoming guest,
        RUNNING, bound to the importing agent, with a fresh REPORT_ID and memory key; the
        incoming root metadata entry must be VALID (INVALID_MDATA_ENTRY)."""
        req, status = self._incoming(snp_msg_import_req, payload)
        m = None
        if not status:
            status, m = self._target(req["gctx_paddr"], GSTATE_INIT)
        gctx = snp_msg_gctx.unpack(req["incoming_gctx"]) if not status else None
        if not status and not snp_mdata_entry.unpack(gctx["root_md_entry"])["valid"]:
            status = U.SEV_RET_INVALID_MDATA_ENTRY
        if not status:
            self._load_gctx(m, gctx)
            m.ma_pfn, m.report_id_ma, m.imi_en = g.gctx_pfn, g.report_id, 0
            m.report_id = self._rng(32)
            m.vek = self._new_vek()
            m.state = GSTATE_RUNNING
        return snp_msg_status_rsp.pack(status=status)

    def _msg_absorb(self, g, vmpck_id, payload):
        """MSG_ABSORB_REQ (56860 7.6): a guest launched with IMI_EN = 1, still in LAUNCH, whose
        launch digest equals the incoming context's IMD (BAD_MEASUREMENT), takes the incoming
        context and runs bound to the sender; it keeps its REPORT_ID and memory key."""
        req, status = self._incoming(snp_msg_absorb_req, payload, gctx_checked=False)
        m = None
        if not status:
            status, m = self._target(req["gctx_paddr"])
        if not status and (m.state != GSTATE_LAUNCH or not m.imi_en):
            status = U.SEV_RET_INVALID_GUEST_STATE
        if not status and snp_mdata_entry.unpack(m.root_md)["valid"]:
            status = U.SEV_RET_INVALID_MDATA_ENTRY
        gctx = snp_msg_gctx.unpack(req["incoming_gctx"]) if not status else None
        if not status and gctx["imd"] != m.ld:
            status = U.SEV_RET_BAD_MEASUREMENT
        if not status and not self._gctx_ok(req):
            status = U.SEV_RET_INVALID_PARAM
        if not status:
            self._load_gctx(m, gctx)
            m.ma_pfn, m.report_id_ma = g.gctx_pfn, g.report_id
            m.state = GSTATE_RUNNING
        return snp_msg_status_rsp.pack(status=status)

    def _msg_absorb_noma(self, g, vmpck_id, payload):
        """MSG_ABSORB_NOMA_REQ (56860 7.7): the sender, a guest with no agent, takes over an
        incoming context whose IMD equals both its launch digest and its own IMD."""
        req = snp_msg_absorb_noma_req.unpack(payload.ljust(snp_msg_absorb_noma_req.size, b"\0"))
        status = U.SEV_RET_INVALID_PARAM
        if len(payload) == snp_msg_absorb_noma_req.size and not req["rsvd0"] \
                and not any(req["rsvd"]):
            status = U.SEV_RET_SUCCESS
        if not status and g.ma_pfn is not NO_MA:
            status = U.SEV_RET_INVALID_GUEST
        gctx = snp_msg_gctx.unpack(req["incoming_gctx"]) if not status else None
        if not status and (gctx["imd"] != g.ld or gctx["imd"] != g.imd):
            status = U.SEV_RET_BAD_MEASUREMENT
        if not status and not self._gctx_ok(req):
            status = U.SEV_RET_INVALID_PARAM
        if not status:
            self._load_gctx(g, gctx)
        return snp_msg_status_rsp.pack(status=status)

    def _msg_vmrk(self, g, vmpck_id, payload):
        """MSG_VMRK_REQ (56860 7.8): under the agent's VMPCK0 only (INVALID_PARAM), the agent
        sets the VM root key of a guest bound to it (INVALID_GUEST) that is still in LAUNCH and
        not an IMI (INVALID_GUEST_STATE)."""
        req = snp_msg_vmrk_req.unpack(payload.ljust(snp_msg_vmrk_req.size, b"\0"))
        status, m = U.SEV_RET_INVALID_PARAM, None
        if vmpck_id == 0 and len(payload) == snp_msg_vmrk_req.size and not any(req["rsvd"]):
            status, m = self._target(req["gctx_paddr"])
        if not status and (m.state != GSTATE_LAUNCH or m.imi_en):
            status = U.SEV_RET_INVALID_GUEST_STATE
        if not status and not self._bound_to(m, g):
            status = U.SEV_RET_INVALID_GUEST
        if not status:
            m.vmrk = bytes(req["vmrk"])
        return snp_msg_status_rsp.pack(status=status)

    # -- pages out and in: SNP_PAGE_SWAP_OUT / SNP_PAGE_SWAP_IN (56860 chapter 8) ----------------

    def _swap_gate(self, f, in_place_ok=False):
        """(status, guest) common to both swaps: reserved bits, a 4 KiB data or VMSA page
        (metadata pages: INVALID_PARAM, docs/snp.md), the context, its state and ASID, the
        pages' addresses, and a metadata entry outside both pages (AMD-ASPFW
        snp_mcmd_swap_out/_in: ``ranges_overlap``, INVALID_PARAM)."""
        if f.rsvd2 or (f.swap_in_place and not in_place_ok) or f.page_type == SWAP_METADATA \
                or f.page_type > SWAP_VMSA:
            return U.SEV_RET_INVALID_PARAM, None
        if f.page_size:
            return U.SEV_RET_INVALID_PAGE_SIZE, None
        status, g = self._snp_guest(f.gctx_paddr, GSTATE_LAUNCH, GSTATE_RUNNING)
        if status:
            return status, None
        if not g.asid:
            return U.SEV_RET_INACTIVE, None
        for addr in (f.src_paddr, f.dst_paddr):
            spa = self._addr(addr)
            if spa % 4096 or not self._valid(spa, 4096):
                return U.SEV_RET_INVALID_ADDRESS, None
        if not f.root_mdata_en:           # an entry inside either page: INVALID_PARAM too
            md = self._addr(f.mdata_paddr)
            if md % snp_mdata_entry.size or not self._valid(md, snp_mdata_entry.size) \
                    or md >> 12 in (self._addr(f.src_paddr) >> 12, self._addr(f.dst_paddr) >> 12):
                return U.SEV_RET_INVALID_PARAM, None
            if not self._fw_page(md & ~4095):
                return U.SEV_RET_INVALID_PAGE_STATE, None
        return U.SEV_RET_SUCCESS, g

    def _cmd_snp_page_swap_out(self, f):
        """SNP_PAGE_SWAP_OUT (56860 chapter 8): a page of the guest (data, or its VMSA) leaves
        encrypted under the guest's offline encryption key with AES-256-GCM, the IV the guest's
        OEK IV count (incremented), its metadata entry (GPA, validated, VMSA, IV, tag) in a
        firmware page or, with ROOT_MDATA_EN, in the context. The guest's copy is no longer
        validated. The page's metadata entry is the GCM's additional data (docs/snp.md)."""
        status, g = self._swap_gate(f)
        if status:
            return status
        src, dst = self._addr(f.src_paddr), self._addr(f.dst_paddr)
        if src == dst:
            return U.SEV_RET_INVALID_PARAM
        e = self.rmp.entry(src >> 12)
        if not e.assigned or e.pagesize:
            return U.SEV_RET_INVALID_PAGE_STATE
        if e.asid != g.asid:
            return U.SEV_RET_INVALID_PAGE_OWNER
        if e.vmsa != (f.page_type == SWAP_VMSA):
            return U.SEV_RET_INVALID_PAGE_STATE
        d = self.rmp.entry(dst >> 12)
        if d.assigned and not self._fw_page(dst):
            return U.SEV_RET_INVALID_PAGE_STATE
        if g.oek_iv_count >= (1 << 64) - 2:
            return U.SEV_RET_AEAD_OFLOW
        entry = snp_mdata_entry.pack(software_data=f.software_data, iv=g.oek_iv_count,
                                     valid=1, page_validated=e.validated, vmsa=e.vmsa,
                                     gpa=e.gpa >> 12)
        plain = self.host.umc.read(src, 4096, g.asid)
        ct, tag = _seal(g.oek, g.oek_iv_count, _aad(entry), plain)
        g.oek_iv_count += 1
        entry = snp_mdata_entry.pack(**dict(snp_mdata_entry.unpack(entry), auth_tag=tag))
        self._fw_write(dst, ct)
        self.rmp.fw_set(src >> 12, e._replace(validated=0))
        if f.root_mdata_en:
            g.root_md = entry
        else:
            self._fw_write(self._addr(f.mdata_paddr), entry)
        return U.SEV_RET_SUCCESS

    def _cmd_snp_page_swap_in(self, f):
        """SNP_PAGE_SWAP_IN (56860 chapter 8): a page swapped out of this guest (its context moved
        here with the OEK and the IV count) comes back into a Pre-Guest page of the guest
        (assigned to its ASID, immutable, not validated), after the metadata entry is VALID, of
        the type asked for (INVALID_MDATA_ENTRY) at the page's GPA (INVALID_PAGE_STATE) and the
        tag checks out (INVALID_MDATA_ENTRY). The page is then validated as it was when it left,
        unlocked (docs/snp.md), and the entry no longer VALID."""
        if f.rsvd:
            return U.SEV_RET_INVALID_PARAM
        status, g = self._swap_gate(f)
        if status:
            return status
        src, dst = self._addr(f.src_paddr), self._addr(f.dst_paddr)
        md = None if f.root_mdata_en else self._addr(f.mdata_paddr)
        entry = g.root_md if md is None else self._read(md, snp_mdata_entry.size)
        m = snp_mdata_entry.unpack(entry)
        if not m["valid"] or m["metadata"] or m["vmsa"] != (f.page_type == SWAP_VMSA):
            return U.SEV_RET_INVALID_MDATA_ENTRY
        d = self.rmp.entry(dst >> 12)
        if not (d.assigned and d.immutable and not d.validated) or d.pagesize:
            return U.SEV_RET_INVALID_PAGE_STATE
        if d.asid != g.asid:
            return U.SEV_RET_INVALID_PAGE_OWNER
        if d.gpa != m["gpa"] << 12:
            return U.SEV_RET_INVALID_PAGE_STATE
        plain = _open(g.oek, m["iv"], _aad(entry), self._read(src, 4096), m["auth_tag"])
        if plain is None:
            return U.SEV_RET_INVALID_MDATA_ENTRY
        self.host.umc.write(dst, plain, g.asid)
        self.rmp.fw_set(dst >> 12, d._replace(immutable=0, validated=m["page_validated"],
                                              vmsa=m["vmsa"]))
        cleared = snp_mdata_entry.pack(**dict(m, valid=0))
        if md is None:
            g.root_md = cleared
        else:
            self._fw_write(md, cleared)
        return U.SEV_RET_SUCCESS

    def snp_page_swap_out(self, gctx_paddr, src_paddr, dst_paddr, mdata_paddr=0,
                          software_data=0, page_type=SWAP_DATA, root_mdata_en=0):
        """SNP_PAGE_SWAP_OUT of one 4 KiB page. Mirrors ``SEV_CMD_SNP_PAGE_SWAP_OUT``; raises
        PspError."""
        self._issue(U.SEV_CMD_SNP_PAGE_SWAP_OUT, sev_data_snp_page_swap_out,
                    gctx_paddr=gctx_paddr, src_paddr=src_paddr, dst_paddr=dst_paddr,
                    mdata_paddr=mdata_paddr, software_data=software_data, page_type=page_type,
                    root_mdata_en=root_mdata_en)

    def snp_page_swap_in(self, gctx_paddr, src_paddr, dst_paddr, mdata_paddr=0,
                         page_type=SWAP_DATA, root_mdata_en=0):
        """SNP_PAGE_SWAP_IN of one 4 KiB page. Mirrors ``SEV_CMD_SNP_PAGE_SWAP_IN``; raises
        PspError."""
        self._issue(U.SEV_CMD_SNP_PAGE_SWAP_IN, sev_data_snp_page_swap_in,
                    gctx_paddr=gctx_paddr, src_paddr=src_paddr, dst_paddr=dst_paddr,
                    mdata_paddr=mdata_paddr, page_type=page_type, root_mdata_en=root_mdata_en)

    # -- contexts in and out -----------------------------------------------------------------------

    def _incoming(self, layout, payload, gctx_checked=True):
        """(request dict, status) of IMPORT/ABSORB: length, reserved bytes and, for IMPORT, the
        incoming context's size and version (INVALID_PARAM); ABSORB checks those last, after
        the measurement, as AMD-ASPFW does."""
        req = layout.unpack(payload.ljust(layout.size, b"\0"))
        bad = len(payload) != layout.size or any(req["rsvd"]) \
            or (gctx_checked and not self._gctx_ok(req))
        return req, U.SEV_RET_INVALID_PARAM if bad else U.SEV_RET_SUCCESS

    @staticmethod
    def _gctx_ok(req):
        """The incoming context's size and version are this firmware's."""
        return req["in_gctx_size"] == snp_msg_gctx.size and req["in_gctx_version"] == GCTX_VERSION

    def _export_gctx(self, m, with_root):
        """The GCTX structure of guest ``m`` (56860 7.4)."""
        idb = bytes(S.snp_id_block.size)
        if m.id_block_en:
            idb = S.snp_id_block.pack(ld=m.ld, family_id=m.family_id, image_id=m.image_id,
                                      version=1, guest_svn=m.guest_svn, policy=m.policy)
        return snp_msg_gctx.pack(
            ld=m.ld, oek=m.oek, vmpck0=m.vmpck[0], vmpck1=m.vmpck[1], vmpck2=m.vmpck[2],
            vmpck3=m.vmpck[3], vmrk=m.vmrk, host_data=m.host_data,
            id_key_digest=m.id_key_digest, author_key_digest=m.author_key_digest,
            report_id=m.report_id, imd=m.imd, msg_count0=m.msg_count[0],
            msg_count1=m.msg_count[1], msg_count2=m.msg_count[2], msg_count3=m.msg_count[3],
            root_md_entry=m.root_md if with_root else bytes(snp_mdata_entry.size),
            author_key_en=m.author_key_en,
            id_block_en=m.id_block_en, vcek_dis=m.vcek_disabled, policy=m.policy,
            state=m.state, oek_iv_count=m.oek_iv_count, id_block=idb, gosvw=m.gosvw,
            desired_tsc_freq=m.desired_tsc_khz, launch_tcb=m.launch_tcb)

    def _load_gctx(self, m, x):
        """Guest ``m`` takes the fields of an incoming GCTX (IMPORT, ABSORB, ABSORB_NOMA);
        REPORT_ID, the agent binding and the state are the caller's."""
        m.ld, m.oek, m.vmrk, m.host_data = x["ld"], x["oek"], x["vmrk"], x["host_data"]
        m.vmpck = [x[f"vmpck{i}"] for i in range(U.VMPCK_MAX_NUM)]
        m.msg_count = [x[f"msg_count{i}"] for i in range(U.VMPCK_MAX_NUM)]
        m.id_key_digest, m.author_key_digest = x["id_key_digest"], x["author_key_digest"]
        m.imd, m.root_md, m.policy = x["imd"], x["root_md_entry"], x["policy"]
        m.author_key_en, m.id_block_en, m.vcek_disabled = (x["author_key_en"], x["id_block_en"],
                                                           x["vcek_dis"])
        m.oek_iv_count, m.gosvw = x["oek_iv_count"], x["gosvw"]
        m.desired_tsc_khz, m.launch_tcb = x["desired_tsc_freq"], x["launch_tcb"]
        if m.id_block_en:
            idb = S.snp_id_block.unpack(x["id_block"])
            m.family_id, m.image_id, m.guest_svn = (idb["family_id"], idb["image_id"],
                                                    idb["guest_svn"])

    def _decommission(self, m):
        """snp_decommission_common for an export with IMI_EN = 0: the key leaves the memory
        controllers, the ASID needs a flush, the context page is a firmware page again."""
        status = self._cmd_snp_decommission(_Addr(m.gctx_pfn << 12))
        assert status == U.SEV_RET_SUCCESS, status

    def _new_vek(self):
        """A fresh memory key (LAUNCH_START's, and an imported guest's: SNP_ACTIVATE installs
        it)."""
        return kdf(self._rng(32), "sev-snp-vm-encryption-key", b"", 64)


def _aad(entry):
    """The part of a metadata entry the page's tag covers: the flags and GPA word."""
    off = snp_mdata_entry.offsets["_entry"]
    return bytes(entry[off:off + 8])


def _gcm(oek, iv):
    return AES.new(oek, AES.MODE_GCM, nonce=iv.to_bytes(8, "little"), mac_len=16)


def _seal(oek, iv, aad, plain):
    c = _gcm(oek, iv)
    c.update(aad)
    return c.encrypt_and_digest(bytes(plain))


def _open(oek, iv, aad, ct, tag):
    c = _gcm(oek, iv)
    c.update(aad)
    try:
        return c.decrypt_and_verify(bytes(ct), bytes(tag))
    except ValueError:
        return None


class _Addr:
    """The one field SNP_DECOMMISSION's handler reads."""

    def __init__(self, address):
        self.address = address
