"""cffi build script for sevcore._native (out-of-line API mode).

The public headers in csrc/ are the cdef: each holds one block between the markers
``cdef:begin`` and ``cdef:end`` written in the subset of C that cffi parses. Enum values are
replaced by ``...`` here so that the compiler, not Python, supplies every number.

Environment:
  SEVCORE_SANITIZE=1   build with -fsanitize=address,undefined (CI runs the C-kernel tests so)
  SEVCORE_CFLAGS       extra compiler flags appended last
"""
import os
import pathlib
import re
import shlex

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADERS = ["sevcore.h", "memcrypt.h", "bitmap.h", "npt.h", "sevpkt.h", "dirty_ring.h", "guest.h",
           "crc32.h", "hostmem.h", "rmp.h", "snp_ld.h"]

_BLOCK = re.compile(r"/\*\s*cdef:begin\s*\*/(.*?)/\*\s*cdef:end\s*\*/", re.S)
_ENUM_VALUE = re.compile(r"^(\s*[A-Z][A-Z0-9_]*)\s*=\s*[^,\n]+(,?)", re.M)


def cdef_text():
    parts = []
    for name in HEADERS:
        path = HERE / name
        if not path.exists():
            continue
        for block in _BLOCK.findall(path.read_text()):
            block = re.sub(r"/\*.*?\*/", "", block, flags=re.S)
            parts.append(_ENUM_VALUE.sub(r"\1 = ...\2", block))
    return "\n".join(parts)


def compile_args():
    args = ["-O3", "-std=c11", "-Wall", "-Wextra", "-Wshadow", "-Wstrict-prototypes",
            "-Wno-unused-parameter", "-fno-strict-aliasing", "-D_GNU_SOURCE"]
    link = []
    if os.environ.get("SEVCORE_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
               "-fno-omit-frame-pointer", "-g", "-Werror"]
        args += san
        link += ["-fsanitize=address,undefined"]
    args += shlex.split(os.environ.get("SEVCORE_CFLAGS", ""))
    return args, link


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
_cflags, _ldflags = compile_args()
ffibuilder.set_source(
    "sevcore._native",
    "\n".join(f'#include "{h}"' for h in HEADERS if (HERE / h).exists()),
    sources=sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c")),
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
