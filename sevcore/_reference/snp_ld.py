"""A slow, obviously correct twin of csrc/snp_ld.c: pages hashed one by one and the SNP launch
digest extended one PAGE_INFO at a time, with hashlib (AMD publication 56860, 8.17
"PAGE_INFO")."""
import hashlib


def snp_ld_extend(ld, contents, tails):
    """``ld`` after one ``SHA-384(ld || contents_i || tail_i)`` per 16-byte tail; ``contents``
    None is 48 zero bytes per page."""
    for i in range(len(tails) // 16):
        body = bytes(48) if contents is None else contents[48 * i:48 * i + 48]
        ld = hashlib.sha384(ld + body + tails[16 * i:16 * i + 16]).digest()
    return ld


def sha384_pages(frames, pfns):
    """The SHA-384 of each 4 KiB frame ``pfns[i]`` of ``frames``, concatenated."""
    view = memoryview(frames).cast("B")
    return b"".join(hashlib.sha384(view[int(p) << 12:(int(p) + 1) << 12]).digest()
                    for p in pfns)
