"""DBG_DECRYPT/DBG_ENCRYPT, COPY, and what the keys the firmware installs mean for guest memory."""
import os

from sevcore import uapi as U
from sevcore.psp import layout as L

from support.psp import SEV_ASID, Launched, pages, raw, ready, snapshot

OK = U.SEV_RET_SUCCESS


def test_dbg_decrypt_and_encrypt_round_trip():
    """DBG_DECRYPT shows the guest's plaintext; DBG_ENCRYPT writes plaintext into guest memory."""
    host = ready()
    g = Launched(host)
    out = pages(host, 2)
    host.psp.dbg_decrypt(g.handle, g.spa, out, 8192)
    assert host.mem.read(out, 8192) == g.data
    patch = os.urandom(4096)
    host.mem.write(out, patch)
    host.psp.dbg_encrypt(g.handle, out, g.spa + 4096, 4096)
    assert host.umc.read(g.spa + 4096, 4096, SEV_ASID) == patch


def test_dbg_refused_with_nodbg_and_bad_arguments():
    """NODBG -> POLICY_FAILURE; misaligned addresses -> INVALID_ADDRESS; a length not a multiple
    of 16 -> INVALID_LEN; a free handle -> INVALID_GUEST; nothing is written."""
    host = ready()
    g = Launched(host, policy=U.SEV_POLICY_MASK_NODBG)
    ok = Launched(host, asid=SEV_ASID + 1)
    out = pages(host, 1)
    cases = [(dict(handle=g.handle, src_addr=g.spa, dst_addr=out, len=16),
              U.SEV_RET_POLICY_FAILURE),
             (dict(handle=ok.handle, src_addr=ok.spa + 8, dst_addr=out, len=16),
              U.SEV_RET_INVALID_ADDRESS),
             (dict(handle=ok.handle, src_addr=ok.spa, dst_addr=out + 4, len=16),
              U.SEV_RET_INVALID_ADDRESS),
             (dict(handle=ok.handle, src_addr=ok.spa, dst_addr=out, len=17),
              U.SEV_RET_INVALID_LEN),
             (dict(handle=42, src_addr=ok.spa, dst_addr=out, len=16), U.SEV_RET_INVALID_GUEST)]
    for cmd in (U.SEV_CMD_DBG_DECRYPT, U.SEV_CMD_DBG_ENCRYPT):
        before = snapshot(host, (out, 4096), (g.spa, 8192), (ok.spa, 8192))
        for fields, want in cases:
            assert raw(host, cmd, L.sev_data_dbg, **fields)[0] == want, fields
        assert snapshot(host, (out, 4096), (g.spa, 8192), (ok.spa, 8192)) == before


def test_pages_are_bound_to_asid_key_and_address():
    """A guest page read with another guest's key, or moved to another SPA, is garbage; COPY
    moves it correctly (the firmware re-encrypts it for the new address)."""
    host = ready()
    a, b = Launched(host, asid=200), Launched(host, asid=201)
    assert host.umc.read(a.spa, 4096, 201) != a.data[:4096]
    assert host.umc.read(a.spa, 4096, 200) == a.data[:4096]
    dst = pages(host, 1)
    host.mem.write(dst, host.mem.read(a.spa, 4096))            # the host copies ciphertext
    assert host.umc.read(dst, 4096, 200) != a.data[:4096]
    host.psp.copy(a.handle, a.spa, dst, 4096)
    assert host.umc.read(dst, 4096, 200) == a.data[:4096]
    same_key = host.psp.launch_start(0, handle=a.handle)      # key sharing: same key, own ASID
    host.psp.activate(same_key, 202)
    assert host.umc.read(a.spa, 4096, 202) == a.data[:4096]
    del b


def test_copy_checks():
    """COPY: length a nonzero multiple of 4096, page-aligned addresses, an overlap is a no-op."""
    host = ready()
    g = Launched(host)
    dst = pages(host, 2)
    for fields, want in [(dict(len=0), U.SEV_RET_INVALID_LEN),
                         (dict(len=100), U.SEV_RET_INVALID_LEN),
                         (dict(len=4096, src_address=g.spa + 16), U.SEV_RET_INVALID_ADDRESS),
                         (dict(len=4096, dst_address=g.spa), OK)]:
        base = dict(handle=g.handle, src_address=g.spa, dst_address=dst)
        base.update(fields)
        assert raw(host, U.SEV_CMD_COPY, L.sev_data_copy, **base)[0] == want, fields
    assert host.umc.read(g.spa, 8192, SEV_ASID) == g.data
