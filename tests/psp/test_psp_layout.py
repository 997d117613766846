"""Command-buffer layouts: the sizes and offsets of include/linux/psp-sev.h and the firmware."""
import pytest

from sevcore.psp import layout as L

# struct -> (size, {field: offset}) as packed in psp-sev.h / AMD-ASPFW sev_mcmd.h.
EXPECTED = {
    "sev_data_init": (20, {"flags": 0, "reserved": 4, "tmr_address": 8, "tmr_len": 0x10}),
    "sev_data_init_ex": (36, {"length": 0, "flags": 4, "tmr_address": 8, "tmr_len": 0x10,
                              "reserved": 0x14, "nv_address": 0x18, "nv_len": 0x20}),
    "sev_user_data_status": (12, {"api_major": 0, "api_minor": 1, "state": 2, "flags": 3,
                                  "build": 7, "guest_count": 8}),
    "sev_data_pek_csr": (12, {"address": 0, "len": 8}),
    "sev_data_pek_cert_import": (28, {"pek_cert_address": 0, "pek_cert_len": 8,
                                      "oca_cert_address": 0x10, "oca_cert_len": 0x18}),
    "sev_data_pdh_cert_export": (28, {"pdh_cert_address": 0, "pdh_cert_len": 8,
                                      "cert_chain_address": 0x10, "cert_chain_len": 0x18}),
    "sev_data_get_id": (12, {"address": 0, "len": 8}),
    "sev_data_download_firmware": (12, {"address": 0, "len": 8}),
    "sev_data_ring_buffer": (0x28, {"low_priority_cmd_ptr": 0, "high_priority_status_ptr": 0x18,
                                    "low_priority_queue_size": 0x20, "int_on_empty": 0x26}),
    "sev_data_activate": (8, {"handle": 0, "asid": 4}),
    "sev_data_guest_status": (13, {"handle": 0, "policy": 4, "asid": 8, "state": 0xC}),
    "sev_data_launch_start": (36, {"handle": 0, "policy": 4, "dh_cert_address": 8,
                                   "dh_cert_len": 0x10, "session_address": 0x18,
                                   "session_len": 0x20}),
    "sev_data_launch_update_data": (20, {"handle": 0, "address": 8, "len": 0x10}),
    "sev_data_launch_update_vmsa": (20, {"handle": 0, "address": 8, "len": 0x10}),
    "sev_data_launch_measure": (20, {"handle": 0, "address": 8, "len": 0x10}),
    "sev_data_launch_secret": (52, {"handle": 0, "hdr_address": 8, "hdr_len": 0x10,
                                    "guest_address": 0x18, "guest_len": 0x20,
                                    "trans_address": 0x28, "trans_len": 0x30}),
    "sev_data_attestation_report": (36, {"handle": 0, "address": 8, "mnonce": 0x10,
                                         "len": 0x20}),
    "sev_data_send_start": (68, {"handle": 0, "policy": 4, "pdh_cert_address": 8,
                                 "pdh_cert_len": 0x10, "plat_certs_address": 0x18,
                                 "plat_certs_len": 0x20, "amd_certs_address": 0x28,
                                 "amd_certs_len": 0x30, "session_address": 0x38,
                                 "session_len": 0x40}),
    "sev_data_send_update_data": (52, {"hdr_address": 8, "hdr_len": 0x10, "guest_address": 0x18,
                                       "guest_len": 0x20, "trans_address": 0x28,
                                       "trans_len": 0x30}),
    "sev_data_send_update_vmsa": (52, {"hdr_address": 8, "guest_address": 0x18,
                                       "trans_len": 0x30}),
    "linux_sev_data_send_update_vmsa": (48, {"hdr_address": 4, "hdr_len": 0xC,
                                             "guest_address": 0x14, "trans_len": 0x2C}),
    "sev_data_receive_start": (36, {"handle": 0, "policy": 4, "pdh_cert_address": 8,
                                    "pdh_cert_len": 0x10, "session_address": 0x18,
                                    "session_len": 0x20}),
    "sev_data_receive_update_data": (52, {"hdr_address": 8, "guest_address": 0x18,
                                          "trans_address": 0x28, "trans_len": 0x30}),
    "sev_data_receive_update_vmsa": (52, {"hdr_address": 8, "trans_len": 0x30}),
    "sev_data_dbg": (28, {"handle": 0, "src_addr": 8, "dst_addr": 0x10, "len": 0x18}),
    "sev_data_copy": (24, {"handle": 0, "len": 4, "src_address": 8, "dst_address": 0x10}),
    "sev_session": (128, {"nonce": 0, "wrap_tk": 0x10, "wrap_iv": 0x30, "wrap_mac": 0x40,
                          "policy_mac": 0x60}),
    "sev_packet_header": (52, {"flags": 0, "iv": 4, "mac": 0x14}),
    "sev_measurement": (48, {"measurement": 0, "mnonce": 0x20}),
    "sev_attestation_report": (0xD0, {"mnonce": 0, "launch_digest": 0x10, "policy": 0x30,
                                      "sig_usage": 0x34, "sig_algo": 0x38, "sig1": 0x40}),
    "sev_rb_cmd_ptr_entry": (16, {"cmd_id": 0, "cmd_flags": 2, "cmd_buffer_ptr": 8}),
    "sev_rb_status_entry": (16, {"status": 0, "error_stack": 8}),
}
for name in ("decommission", "deactivate", "launch_finish", "send_finish", "send_cancel",
             "receive_finish"):
    EXPECTED[f"sev_data_{name}"] = (4, {"handle": 0})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sizes_and_offsets(name):
    """Each layout has the kernel's (or the firmware's) packed size and field offsets."""
    layout = getattr(L, name)
    size, offsets = EXPECTED[name]
    assert layout.size == size
    for field, off in offsets.items():
        assert layout.offsets[field] == off, field


def test_every_layout_is_checked():
    """No layout is left out of the table above."""
    assert {lay.name for lay in L.ALL} == set(EXPECTED)


def test_send_update_vmsa_uses_the_transport_layout():
    """The firmware decodes SEND_UPDATE_VMSA like every transport command; the kernel's struct
    lacks reserved1 and moves every later field by -4 bytes."""
    fw = L.sev_data_send_update_vmsa
    assert fw.offsets == L.sev_data_launch_secret.offsets == L.sev_data_send_update_data.offsets
    linux = L.linux_sev_data_send_update_vmsa
    for field in ("hdr_address", "hdr_len", "guest_address", "guest_len", "trans_address",
                  "trans_len"):
        assert linux.offsets[field] == fw.offsets[field] - 4


def test_pack_unpack_view():
    """pack/unpack round-trip, views write in place, unknown fields are refused."""
    raw = L.sev_data_launch_measure.pack(handle=3, address=0x1000, len=48)
    assert L.sev_data_launch_measure.unpack(raw) == {"handle": 3, "reserved": 0,
                                                     "address": 0x1000, "len": 48}
    f = L.sev_data_launch_measure.view(bytearray(raw))
    f.len = 7
    assert f.len == 7 and f.buf[0x10] == 7
    with pytest.raises(TypeError):
        L.sev_data_launch_measure.pack(nope=1)
    with pytest.raises(TypeError):
        L.sev_data_launch_measure.pack(handle="1")
    with pytest.raises(ValueError):
        L.sev_data_launch_measure.pack(len=1 << 32)
    with pytest.raises(ValueError):
        L.sev_data_launch_measure.pack(address=-1)
    with pytest.raises(ValueError):
        L.sev_data_attestation_report.pack(mnonce=b"short")
    with pytest.raises(AttributeError):
        f.nope = 1
