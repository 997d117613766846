"""The one error seam: every reason a C kernel gives for a refusal (csrc/sevcore.h SC_ERR_*) is
turned into an exception by one table, sevcore._bindings.REFUSALS, and a refused call says which
argument, page, packet or slot it was."""
import errno
import pathlib
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from sevcore import _bindings as _b
from sevcore.core import sevpkt
from sevcore.core.memcrypt import AES128_XEX, MemoryEngine
from sevcore.core.npt import GFN_LIMIT, NPT_WRITABLE, Npt
from sevcore.errors import PacketAuthError, PacketFlagsError
from support.errors import raises_errno

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
ffi, lib = _b.ffi, _b.lib

#: ``SC_ERR_NAME = 12,  /* EINVAL: ...`` in the header's enum: each reason and its errno.
_ENUM_LINE = re.compile(r"^\s*(SC_ERR_[A-Z0-9_]+)\s*=\s*(\d+),\s*/\*\s*(E[A-Z]+)?", re.M)


def header_reasons():
    """``{name: (value, errno name or None)}`` of the SC_ERR_* enum in csrc/sevcore.h."""
    text = (CSRC / "sevcore.h").read_text()
    return {m[1]: (int(m[2]), m[3]) for m in _ENUM_LINE.finditer(text)}


def test_every_reason_in_the_header_has_one_table_entry_with_its_errno():
    """Each SC_ERR_* the header declares (but NONE, which the errno alone explains) maps, with
    the errno the header gives it, to an exception in REFUSALS, and the table has no other."""
    reasons = header_reasons()
    assert len(reasons) > 40 and reasons["SC_ERR_NONE"] == (0, None)
    expected = set()
    for name, (value, err) in reasons.items():
        assert getattr(lib, name) == value, name          # the compiler agrees with the text
        if name != "SC_ERR_NONE":
            assert err is not None, f"{name}: the header names no errno"
            expected.add((getattr(errno, err), value))
    assert set(_b.REFUSALS) == expected
    assert len({value for value, _ in reasons.values()}) == len(reasons)


def test_every_reason_the_c_files_use_is_declared():
    """Every SC_ERR_* name a C file refuses with is one the header declares."""
    declared = set(header_reasons())
    used = set()
    for path in CSRC.glob("*.c"):
        used |= set(re.findall(r"\bSC_ERR_[A-Z0-9_]+\b", path.read_text()))
    assert used and used <= declared, used - declared


def _functions(text):
    """``(signature, body)`` of each function defined at column 0 of a C file."""
    for m in re.finditer(r"^(?:static |int|int64_t|uint64_t|void)[^;{]*?\)\s*\n\{\n(.*?)^\}",
                         text, re.M | re.S):
        yield m.group(0).split("{", 1)[0], m.group(1)


@pytest.mark.parametrize("name", ["memcrypt.c", "guest.c", "sevpkt.c", "npt.c"])
def test_kernels_that_take_an_sc_err_fill_it_on_every_failure(name):
    """A function that takes ``struct sc_err *err`` never returns a bare -E...: every failure
    goes through sc_refuse, so the caller never reads a reason left by an earlier call."""
    found = 0
    for signature, body in _functions((CSRC / name).read_text()):
        if "struct sc_err *err" in signature:
            found += 1
            assert not re.search(r"return\s+-E[A-Z]+", body), signature
    assert found


def test_the_table_builds_each_kind_of_exception():
    """refused() gives a ValueError for a bad argument, an OSError with C's errno for a refusal no
    argument explains, the packet errors with their index and flags, and a plain OSError for a
    reason the table does not list; each names the C call."""
    err = ffi.new("struct sc_err *")

    def raised(rc, reason, **fields):
        err.reason = reason
        for k, v in fields.items():
            setattr(err, k, v)
        with pytest.raises(Exception) as info:
            _b.refused(rc, "sc_test", err)
        return info.value

    e = raised(-errno.EINVAL, lib.SC_ERR_MEM_SPA_UNALIGNED, index=3, value=0x2010)
    assert type(e) is ValueError and str(e) == "sc_test: spas[3] = 0x2010 is not page aligned"
    e = raised(-errno.EFAULT, lib.SC_ERR_GUEST_FRAME, index=1, value=16, limit=16)
    assert type(e) is OSError and e.errno == errno.EFAULT and "page 1 maps pfn 0x10" in str(e)
    e = raised(-errno.EINVAL, lib.SC_ERR_NULL)
    assert type(e) is OSError and e.errno == errno.EINVAL and e.strerror.startswith("sc_test: ")
    e = raised(-errno.EBADMSG, lib.SC_ERR_PKT_MAC, index=7)
    assert type(e) is PacketAuthError and e.index == 7 and e.errno == errno.EBADMSG
    e = raised(-errno.EOPNOTSUPP, lib.SC_ERR_PKT_COMPRESSED, index=2, value=1)
    assert type(e) is PacketFlagsError and (e.index, e.flags) == (2, 1)
    e = raised(-errno.ENOMEM, lib.SC_ERR_NONE)
    assert type(e) is OSError and e.errno == errno.ENOMEM and "ENOMEM" in str(e)
    e = raised(-errno.EIO, lib.SC_ERR_MEM_OVERLAP)           # a pair the table does not list
    assert type(e) is OSError and e.errno == errno.EIO


def test_enomem_after_an_argument_refusal_carries_no_stale_reason():
    """A table that runs out of memory right after an argument refusal on the same thread says
    ENOMEM, not the earlier reason."""
    with Npt(limit_bytes=0) as table:
        with pytest.raises(ValueError, match="gfn 0x1000000000 is outside"):
            table.map(GFN_LIMIT, 0, 0)
        with raises_errno(errno.ENOMEM) as exc:
            table.map(0, 0, 0)
        assert "Cannot allocate memory" in str(exc.value)


def test_each_thread_gets_its_own_reason():
    """Threads refusing calls at once each report their own reason (one sc_err per thread)."""
    eng = MemoryEngine(AES128_XEX, bytes(16))
    errors = {}

    def refuse(name, call):
        try:
            for _ in range(300):
                with pytest.raises(ValueError) as info:
                    call()
                errors.setdefault(name, set()).add(str(info.value).split(": ", 1)[1])
        except BaseException as exc:                        # pragma: no cover - reported below
            errors[name] = exc

    threads = [threading.Thread(target=refuse, args=(
                   "unaligned", lambda: eng.encrypt_pages(bytes(8192), [0, 0x10]))),
               threading.Thread(target=refuse, args=(
                   "count", lambda: eng.encrypt_pages(bytes(8192), [0])))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == {"unaligned": {"spas[1] = 0x10 is not page aligned"},
                      "count": {"1 SPAs for 2 pages"}}


def test_batch_refusals_name_the_item():
    """A batch kernel's refusal names the offending item by its index: an SPA, a gfn of a lookup
    batch, a page of a guest access, a packet."""
    eng = MemoryEngine(AES128_XEX, bytes(16))
    with pytest.raises(ValueError, match=r"sc_memcrypt_pages: spas\[2\] = 0x3001 is not page"):
        eng.encrypt_pages(bytes(3 * 4096), np.array([0x1000, 0x2000, 0x3001], np.uint64))
    with Npt() as table:
        gfns = np.array([1, 2, GFN_LIMIT + 5, GFN_LIMIT], np.uint64)
        with pytest.raises(ValueError, match=rf"gfns\[2\] = {GFN_LIMIT + 5:#x} is outside"):
            table.lookup_batch(gfns)
    tek, tik = bytes(16), bytes(range(16))
    hdrs, ct = sevpkt.seal(tek, tik, bytes(4 * 64), bytes(64))
    ct = bytearray(ct)
    ct[3 * 64] ^= 1
    with pytest.raises(sevpkt.PacketAuthError) as info:
        sevpkt.open(tek, tik, hdrs, ct)
    assert info.value.index == 3 and str(info.value).startswith("[Errno 74] packet 3: MAC")


def test_refusals_write_nothing_and_leave_npt_as_it_was():
    """A refused npt call (an argument C judges) changes nothing and says which argument."""
    with Npt() as table:
        table.map(0, 0, NPT_WRITABLE, npages=4)
        before = list(table)
        for call, match in [(lambda: table.map(0, 1 << 40, 0), "pfns 0x10000000000"),
                            (lambda: table.unmap(0, 0), "npages 0 must be"),
                            (lambda: table.zap_range(0, 4, 1 << 3), "flags 0x8 have bits"),
                            (lambda: table.protect_range(0, 4, 1), "cannot clear NPT_PRESENT"),
                            (lambda: table.lookup(GFN_LIMIT), "gfn 0x1000000000 is outside")]:
            with pytest.raises(ValueError, match=match):
                call()
        assert list(table) == before


_REFUSED_IN_A_CYCLE = r"""
import gc
from sevcore.core.memcrypt import AES256_XTS, MemoryEngine
eng = MemoryEngine(AES256_XTS, bytes(range(64)))

def refused(call):
    page = memoryview(bytes(4096)).cast("B")
    try:
        call(page)
    except ValueError as exc:
        kept = exc        # the frame holds its exception, whose traceback holds the frame

for i in range(300):
    refused(lambda page: eng.encrypt_run(page, 0x1001))            # unaligned SPA
    refused(lambda page: eng.encrypt_pages(page, [0x1001]))
    refused(lambda page: eng.decrypt_pages(page, [0, 0x1000]))     # count mismatch
gc.collect()
print("collected")
"""


def test_a_refusal_over_a_memoryview_survives_the_cycle_collector():
    """A C call refused over memoryviews, its exception kept in a reference cycle, is freed
    by the collector without crashing CPython (python/cpython#77894: a memoryview cleared with
    an export still held), because no cdata holds an export of a memoryview."""
    res = subprocess.run([sys.executable, "-c", _REFUSED_IN_A_CYCLE], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert res.stdout.strip() == "collected"
