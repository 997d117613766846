"""Byte layouts of the SEV-SNP firmware's command buffers and data structures.

Command buffers: ``include/linux/psp-sev.h`` (``struct sev_data_snp_*``) and
``include/uapi/linux/psp-sev.h`` (``struct sev_user_data_snp_status``), bit fields by their
kernel names (packed from bit 0 up, as GCC lays out these ``__packed`` structs). Data structures:
AMD SEV-SNP Firmware ABI (publication 56860) for PAGE_INFO, the ID block and its authentication
structure, the attestation report and the guest status; ``arch/x86/include/asm/sev.h`` for the
guest message header, the secrets page and the CPUID page; ``include/uapi/linux/sev-guest.h`` for
the report and key requests. Each layout's size and offsets are checked in
tests/psp/test_snp_layout.py.
"""
from sevcore.psp.layout import U8, U16, U32, U64, Layout

# -- command buffers -------------------------------------------------------------------------------

sev_data_snp_addr = Layout("sev_data_snp_addr", [("address", U64)])
sev_data_snp_activate = Layout("sev_data_snp_activate", [("gctx_paddr", U64), ("asid", U32)])
sev_data_snp_launch_start = Layout("sev_data_snp_launch_start", [
    ("gctx_paddr", U64), ("policy", U64), ("ma_gctx_paddr", U64),
    ("_flags", U32, [("ma_en", 1), ("imi_en", 1), ("rsvd", 30)]),
    ("desired_tsc_khz", U32), ("gosvw", "16s")])
sev_data_snp_launch_update = Layout("sev_data_snp_launch_update", [
    ("gctx_paddr", U64),
    ("_flags", U32, [("page_size", 1), ("page_type", 3), ("imi_page", 1), ("rsvd", 27)]),
    ("rsvd2", U32), ("address", U64),
    ("_perms", U32, [("rsvd3", 8), ("vmpl1_perms", 8), ("vmpl2_perms", 8), ("vmpl3_perms", 8)]),
    ("rsvd4", U32)])
sev_data_snp_launch_finish = Layout("sev_data_snp_launch_finish", [
    ("gctx_paddr", U64), ("id_block_paddr", U64), ("id_auth_paddr", U64),
    ("_flags", U64, [("id_block_en", 1), ("auth_key_en", 1), ("vcek_disabled", 1),
                     ("rsvd", 61)]),
    ("host_data", "32s")])
sev_data_snp_guest_status = Layout("sev_data_snp_guest_status", [
    ("gctx_paddr", U64), ("address", U64)])
sev_data_snp_page_reclaim = Layout("sev_data_snp_page_reclaim", [("paddr", U64)])
sev_data_snp_dbg = Layout("sev_data_snp_dbg", [
    ("gctx_paddr", U64), ("src_addr", U64), ("dst_addr", U64)])
sev_data_snp_guest_request = Layout("sev_data_snp_guest_request", [
    ("gctx_paddr", U64), ("req_paddr", U64), ("res_paddr", U64)])
sev_data_snp_init_ex = Layout("sev_data_snp_init_ex", [
    ("_flags", U32, [("init_rmp", 1), ("list_paddr_en", 1), ("rapl_dis", 1),
                     ("ciphertext_hiding_en", 1), ("tio_en", 1), ("rsvd", 27)]),
    ("rsvd1", U32), ("list_paddr", U64), ("max_snp_asid", U16), ("rsvd2", "46s")])
sev_data_snp_shutdown_ex = Layout("sev_data_snp_shutdown_ex", [
    ("len", U32),
    ("_flags", U32, [("iommu_snp_shutdown", 1), ("x86_snp_shutdown", 1), ("rsvd1", 30)])])
#: SNP_PLATFORM_STATUS output (include/uapi/linux/psp-sev.h).
sev_user_data_snp_status = Layout("sev_user_data_snp_status", [
    ("api_major", U8), ("api_minor", U8), ("state", U8),
    ("_flags", U8, [("is_rmp_initialized", 1), ("rsvd", 7)]),
    ("build_id", U32),
    ("_flags1", U32, [("mask_chip_id", 1), ("mask_chip_key", 1), ("vlek_en", 1),
                      ("feature_info", 1), ("rapl_dis", 1), ("ciphertext_hiding_cap", 1),
                      ("ciphertext_hiding_en", 1), ("rsvd1", 25)]),
    ("guest_count", U32), ("current_tcb_version", U64), ("reported_tcb_version", U64)])
#: SNP_GUEST_STATUS output (56860 "SNP_GUEST_STATUS": the GUEST_STATUS structure).
snp_guest_status = Layout("snp_guest_status", [
    ("policy", U64), ("asid", U32), ("state", U8), ("rsvd", "3s"),
    ("_flags", U32, [("vcek_dis", 1), ("rsvd1", 31)]), ("rsvd2", U32)])

# -- launch data ----------------------------------------------------------------------------------

#: What SNP_LAUNCH_UPDATE hashes into the launch digest (56860 "PAGE_INFO").
snp_page_info = Layout("snp_page_info", [
    ("digest_cur", "48s"), ("contents", "48s"), ("length", U16), ("page_type", U8),
    ("imi_page", U8), ("vmpl3_perms", U8), ("vmpl2_perms", U8), ("vmpl1_perms", U8),
    ("rsvd", U8), ("gpa", U64)])
#: SNP_LAUNCH_FINISH's ID block (56860 "ID_BLOCK").
snp_id_block = Layout("snp_id_block", [
    ("ld", "48s"), ("family_id", "16s"), ("image_id", "16s"), ("version", U32),
    ("guest_svn", U32), ("policy", U64)])
#: An ECDSA public key as the firmware takes it (56860 "ECDSA Public Key"): curve 2 is P-384,
#: the coordinates little-endian and zero-padded to 72 bytes.
snp_ecdsa_pubkey = Layout("snp_ecdsa_pubkey", [
    ("curve", U32), ("qx", "72s"), ("qy", "72s"), ("rsvd", "880s")])
#: An ECDSA signature (56860 "ECDSA Signature"): R and S little-endian, zero-padded to 72 bytes.
snp_ecdsa_sig = Layout("snp_ecdsa_sig", [("r", "72s"), ("s", "72s"), ("rsvd", "368s")])
#: SNP_LAUNCH_FINISH's ID authentication information (56860 "ID_AUTH").
snp_id_auth = Layout("snp_id_auth", [
    ("id_key_algo", U32), ("auth_key_algo", U32), ("rsvd1", "56s"), ("id_block_sig", "512s"),
    ("id_key", "1028s"), ("rsvd2", "60s"), ("id_key_sig", "512s"), ("author_key", "1028s"),
    ("rsvd3", "892s")])
#: One CPUID function of the CPUID page (arch/x86/include/asm/sev.h ``struct snp_cpuid_fn``).
snp_cpuid_fn = Layout("snp_cpuid_fn", [
    ("eax_in", U32), ("ecx_in", U32), ("xcr0_in", U64), ("xss_in", U64), ("eax", U32),
    ("ebx", U32), ("ecx", U32), ("edx", U32), ("reserved", U64)])
#: The CPUID page's header (``struct snp_cpuid_table``; 64 functions follow it).
snp_cpuid_table = Layout("snp_cpuid_table", [
    ("count", U32), ("reserved1", U32), ("reserved2", U64)])
SNP_CPUID_COUNT_MAX = 64

#: The secrets page (arch/x86/include/asm/sev.h ``struct snp_secrets_page``) up to the OS area.
snp_secrets_page = Layout("snp_secrets_page", [
    ("version", U32), ("_flags", U32, [("imien", 1), ("rsvd1", 31)]), ("fms", U32),
    ("rsvd2", U32), ("gosvw", "16s"), ("vmpck0", "32s"), ("vmpck1", "32s"), ("vmpck2", "32s"),
    ("vmpck3", "32s"), ("os_area", "96s"), ("vmsa_tweak_bitmap", "64s")])

# -- guest messages (SNP_GUEST_REQUEST) -------------------------------------------------------------

#: arch/x86/include/asm/sev.h ``struct snp_guest_msg_hdr``; the payload follows it in the page.
snp_guest_msg_hdr = Layout("snp_guest_msg_hdr", [
    ("authtag", "32s"), ("msg_seqno", U64), ("rsvd1", "8s"), ("algo", U8), ("hdr_version", U8),
    ("hdr_sz", U16), ("msg_type", U8), ("msg_version", U8), ("msg_sz", U16), ("rsvd2", U32),
    ("msg_vmpck", U8), ("rsvd3", "35s")])
#: include/uapi/linux/sev-guest.h ``struct snp_report_req`` (MSG_REPORT_REQ's payload).
snp_report_req = Layout("snp_report_req", [
    ("user_data", "64s"), ("vmpl", U32), ("rsvd", "28s")])
#: MSG_REPORT_RSP's payload (56860 "MSG_REPORT_RSP"): the report follows the 32-byte head.
snp_report_resp = Layout("snp_report_resp", [
    ("status", U32), ("report_size", U32), ("reserved", "24s"), ("report", "1184s")])
#: include/uapi/linux/sev-guest.h ``struct snp_derived_key_req`` (MSG_KEY_REQ's payload); bit 0
#: of ``root_key_select`` picks the VMRK over the VCEK, bits 1-2 the key (56860 "MSG_KEY_REQ").
snp_derived_key_req = Layout("snp_derived_key_req", [
    ("root_key_select", U32), ("rsvd", U32), ("guest_field_select", U64), ("vmpl", U32),
    ("guest_svn", U32), ("tcb_version", U64)])
#: MSG_KEY_RSP's payload (56860 "MSG_KEY_RSP").
snp_derived_key_resp = Layout("snp_derived_key_resp", [
    ("status", U32), ("reserved", "28s"), ("derived_key", "32s")])

# -- the attestation report -----------------------------------------------------------------------

#: 56860 "ATTESTATION_REPORT" (version 3; virtee/sev ``AttestationReport``), 0x4A0 bytes; the
#: signature covers bytes [0, 0x2A0).
snp_attestation_report = Layout("snp_attestation_report", [
    ("version", U32), ("guest_svn", U32), ("policy", U64), ("family_id", "16s"),
    ("image_id", "16s"), ("vmpl", U32), ("signature_algo", U32), ("current_tcb", U64),
    ("platform_info", U64),
    ("_flags", U32, [("author_key_en", 1), ("mask_chip_key", 1), ("signing_key", 3),
                     ("rsvd", 27)]),
    ("reserved0", U32), ("report_data", "64s"), ("measurement", "48s"), ("host_data", "32s"),
    ("id_key_digest", "48s"), ("author_key_digest", "48s"), ("report_id", "32s"),
    ("report_id_ma", "32s"), ("reported_tcb", U64), ("cpuid_fam_id", U8), ("cpuid_mod_id", U8),
    ("cpuid_step", U8), ("reserved1", "21s"), ("chip_id", "64s"), ("committed_tcb", U64),
    ("current_build", U8), ("current_minor", U8), ("current_major", U8), ("reserved2", U8),
    ("committed_build", U8), ("committed_minor", U8), ("committed_major", U8),
    ("reserved3", U8), ("launch_tcb", U64), ("reserved4", "168s"), ("signature", "512s")])
REPORT_SIGNED_SIZE = 0x2A0

ALL = [v for v in list(globals().values()) if isinstance(v, Layout)]
