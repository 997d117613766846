"""The guest's side of SNP guest messages (the Linux guest's ``snp_send_guest_request``,
``enc_payload`` and ``verify_and_dec_payload`` in arch/x86/coco/sev/core.c, under
drivers/virt/coco/sev-guest's SNP_GET_REPORT): a request is a ``snp_guest_msg_hdr`` and its
payload encrypted with AES-256-GCM under VMPCKn, the IV the message sequence number, the
additional data the header from ``algo`` on (AAD_LEN bytes); the response must carry the next
sequence number and the response type, and is decrypted the same way. The guest keeps the
sequence number of VMPCKn in the secrets page's OS area (``msg_seqno_n``, a u32), taking
``count + 1`` for a request and adding 2 once the response is in.
"""
from Crypto.Cipher import AES

from sevcore import uapi as U
from sevcore.psp import snp_layout as SL
from sevcore.psp.attest import seal_msg

HDR = SL.snp_guest_msg_hdr
#: Offsets in the secrets page: VMPCKn, and msg_seqno_n in the OS area (struct secrets_os_area).
VMPCK_OFFSET = SL.snp_secrets_page.offsets["vmpck0"]
OS_AREA_OFFSET = SL.snp_secrets_page.offsets["os_area"]
AAD_OFFSET = HDR.offsets["algo"]


class GuestMessageError(Exception):
    """The response failed the guest driver's checks (sequence number, type, size, tag)."""


def _iv(seqno):
    return seqno.to_bytes(8, "little") + bytes(4)


def seqno_offset(vmpck_id):
    """Where msg_seqno_<vmpck_id> sits in the secrets page."""
    return OS_AREA_OFFSET + 4 * vmpck_id


def build_request(vmpck, seqno, msg_type, payload, vmpck_id=0, msg_version=1):
    """The request page: header and payload encrypted under ``vmpck`` with ``seqno`` (sealed
    as the firmware seals its answers, :func:`sevcore.psp.attest.seal_msg`)."""
    return seal_msg(vmpck, seqno, msg_type, payload, vmpck_id=vmpck_id,
                    msg_version=msg_version)


def open_response(vmpck, page, req_seqno, req_type, max_size):
    """verify_and_dec_payload: the response payload, or GuestMessageError."""
    page = bytes(page)
    hdr = HDR.view(bytearray(page[:HDR.size]))
    if hdr.msg_seqno != req_seqno + 1:
        raise GuestMessageError(f"response sequence number {hdr.msg_seqno}, expected "
                                f"{req_seqno + 1}")
    if hdr.msg_type != req_type + 1 or hdr.msg_sz > max_size or \
            hdr.algo != U.SNP_AEAD_AES_256_GCM:
        raise GuestMessageError(f"response type {hdr.msg_type} size {hdr.msg_sz} not expected")
    gcm = AES.new(vmpck, AES.MODE_GCM, nonce=_iv(hdr.msg_seqno), mac_len=U.AUTHTAG_LEN)
    gcm.update(page[AAD_OFFSET:AAD_OFFSET + U.AAD_LEN])
    tag = page[HDR.offsets["authtag"]:HDR.offsets["authtag"] + U.AUTHTAG_LEN]
    try:
        return gcm.decrypt_and_verify(page[HDR.size:HDR.size + hdr.msg_sz], tag)
    except ValueError:
        raise GuestMessageError("response authentication tag does not verify") from None
