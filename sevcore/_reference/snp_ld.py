"""A slow, obviously correct twin of csrc/snp_ld.c: the SNP launch digest extended one PAGE_INFO
at a time with hashlib (AMD publication 56860, 8.17 "PAGE_INFO")."""
import hashlib


def snp_ld_extend(ld, contents, tails):
    """``ld`` after one ``SHA-384(ld || contents_i || tail_i)`` per 16-byte tail; ``contents``
    None is 48 zero bytes per page."""
    for i in range(len(tails) // 16):
        body = bytes(48) if contents is None else contents[48 * i:48 * i + 48]
        ld = hashlib.sha384(ld + body + tails[16 * i:16 * i + 16]).digest()
    return ld
