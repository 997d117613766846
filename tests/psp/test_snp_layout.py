"""SEV-SNP byte layouts: the packed sizes and offsets of include/linux/psp-sev.h,
include/uapi/linux/psp-sev.h, arch/x86/include/asm/sev.h, include/uapi/linux/sev-guest.h and the
structures of AMD 56860, and bit fields packed from bit 0 up."""
import pytest

from sevcore import uapi as U
from sevcore.psp import snp_layout as S

TABLE = [
    ("sev_data_snp_addr", 0x8, {"address": 0}),
    ("sev_data_snp_activate", 0xC, {"gctx_paddr": 0, "asid": 8}),
    ("sev_data_snp_launch_start", 0x30, {"policy": 8, "ma_gctx_paddr": 0x10, "ma_en": 0x18,
                                         "desired_tsc_khz": 0x1C, "gosvw": 0x20}),
    ("sev_data_snp_launch_update", 0x20, {"page_type": 8, "address": 0x10,
                                          "vmpl1_perms": 0x18, "rsvd4": 0x1C}),
    ("sev_data_snp_launch_finish", 0x40, {"id_block_paddr": 8, "id_auth_paddr": 0x10,
                                          "id_block_en": 0x18, "host_data": 0x20}),
    ("sev_data_snp_guest_status", 0x10, {"address": 8}),
    ("sev_data_snp_page_reclaim", 0x8, {"paddr": 0}),
    ("sev_data_snp_dbg", 0x18, {"src_addr": 8, "dst_addr": 0x10}),
    ("sev_data_snp_guest_request", 0x18, {"req_paddr": 8, "res_paddr": 0x10}),
    ("sev_data_snp_init_ex", 0x40, {"list_paddr": 8, "max_snp_asid": 0x10, "rsvd2": 0x12}),
    ("sev_data_snp_shutdown_ex", 0x8, {"len": 0, "x86_snp_shutdown": 4}),
    ("sev_user_data_snp_status", 0x20, {"is_rmp_initialized": 3, "build_id": 4,
                                        "mask_chip_id": 8, "guest_count": 0xC,
                                        "current_tcb_version": 0x10,
                                        "reported_tcb_version": 0x18}),
    ("snp_page_info", 0x70, {"contents": 0x30, "length": 0x60, "page_type": 0x62,
                             "vmpl3_perms": 0x64, "vmpl1_perms": 0x66, "gpa": 0x68}),
    ("snp_id_block", 0x60, {"family_id": 0x30, "image_id": 0x40, "version": 0x50,
                            "guest_svn": 0x54, "policy": 0x58}),
    ("snp_id_auth", 0x1000, {"id_block_sig": 0x40, "id_key": 0x240, "id_key_sig": 0x680,
                             "author_key": 0x880}),
    ("snp_ecdsa_pubkey", 0x404, {"qx": 4, "qy": 0x4C}),
    ("snp_ecdsa_sig", 0x200, {"s": 0x48}),
    ("snp_guest_msg_hdr", 0x60, {"msg_seqno": 0x20, "algo": 0x30, "msg_type": 0x34,
                                 "msg_sz": 0x36, "msg_vmpck": 0x3C}),
    ("snp_report_req", 0x60, {"vmpl": 0x40}),
    ("snp_derived_key_req", 0x20, {"guest_field_select": 8, "vmpl": 0x10, "tcb_version": 0x18}),
    ("snp_secrets_page", 0x140, {"gosvw": 0x10, "vmpck0": 0x20, "vmpck3": 0x80,
                                 "os_area": 0xA0}),
    ("snp_cpuid_fn", 0x30, {"xss_in": 0x10, "eax": 0x18, "edx": 0x24}),
    ("snp_attestation_report", 0x4A0, {
        "policy": 0x08, "family_id": 0x10, "vmpl": 0x30, "signature_algo": 0x34,
        "current_tcb": 0x38, "platform_info": 0x40, "author_key_en": 0x48, "report_data": 0x50,
        "measurement": 0x90, "host_data": 0xC0, "id_key_digest": 0xE0,
        "author_key_digest": 0x110, "report_id": 0x140, "report_id_ma": 0x160,
        "reported_tcb": 0x180, "cpuid_fam_id": 0x188, "chip_id": 0x1A0, "committed_tcb": 0x1E0,
        "current_build": 0x1E8, "committed_build": 0x1EC, "launch_tcb": 0x1F0,
        "signature": 0x2A0}),
]


@pytest.mark.parametrize("name, size, offsets", TABLE, ids=[t[0] for t in TABLE])
def test_sizes_and_offsets(name, size, offsets):
    """Each layout has the size and field offsets of its source."""
    layout = getattr(S, name)
    assert layout.size == size
    for field, off in offsets.items():
        assert layout.offsets[field] == off, field


def test_every_layout_is_checked():
    """No SNP layout is left out of the table above."""
    assert {t[0] for t in TABLE} | {"snp_cpuid_table", "snp_report_resp",
                                    "snp_derived_key_resp", "snp_guest_status"} == \
        {layout.name for layout in S.ALL}


def test_bit_fields_pack_from_bit_zero():
    """page_size is bit 0 and page_type bits 1-3 of the word at 8; vmpl1_perms is byte 0x19."""
    raw = S.sev_data_snp_launch_update.pack(page_size=1, page_type=U.SNP_PAGE_TYPE_CPUID,
                                            vmpl1_perms=0xF, vmpl3_perms=0x3)
    assert raw[8] == 1 | U.SNP_PAGE_TYPE_CPUID << 1
    assert (raw[0x19], raw[0x1B]) == (0xF, 0x3)
    f = S.sev_data_snp_launch_update.view(bytearray(raw))
    assert (f.page_size, f.page_type, f.vmpl1_perms) == (1, 6, 0xF)
    f.page_type = 2
    assert f.page_size == 1 and f.page_type == 2


def test_a_bit_field_value_too_wide_is_refused():
    """A value that does not fit its bit field is ValueError."""
    with pytest.raises(ValueError, match="page_type"):
        S.sev_data_snp_launch_update.pack(page_type=8)
