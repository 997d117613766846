"""The C core's implementation paths, kernel by kernel, and the ``cpu_path`` fixture that runs a
test once on each.

A kernel picks its path from the active CPU features (``sevcore.core.cpu``), so restricting the
core to a path's features selects that path. Paths are named by their tier (avx512, avx2, aesni,
portable; see ``sevcore.core.cpu``), or by the extra they add (shani, popcnt). A module names its
kernel with a mark::

    pytestmark = pytest.mark.cpu_paths(MEMCRYPT)

    def test_something(cpu_path):       # once per path: "avx512", "avx2", "aesni", "portable"
        ...

A path this CPU cannot run is still collected, and skipped with the features it lacks
("avx2: CPU lacks avx2, vaes"), so a run on a smaller CPU shows what it did not test. Paths of the
other architecture (x86-64's on AArch64 and the reverse) are left out: their code is not in the
build; tests/kat/kat.c checks the AArch64 paths under qemu-aarch64 in CI.
"""
import contextlib
import dataclasses
import platform

import pytest

from sevcore.core import bitmap, checksum, cpu, memcrypt, pages, sevpkt


@dataclasses.dataclass(frozen=True)
class Path:
    """One implementation path: its name, the CPU features it needs, those it also uses where the
    CPU has them, and what the kernel's ``implementation()`` reports while it runs (None: the
    name)."""
    name: str
    needs: frozenset
    also: frozenset = frozenset()
    reports: object = None
    arch: str = None        #: the machine (platform.machine()) it exists on; None: every one

    def __post_init__(self):
        object.__setattr__(self, "needs", frozenset(self.needs))
        object.__setattr__(self, "also", frozenset(self.also))

    def features(self, detected=None):
        """The features the core is restricted to on this path."""
        return self.needs | (self.also & (cpu.detected() if detected is None else detected))


class Kernel:
    """The paths of one C kernel, fastest first; the last, portable, one runs on every CPU."""

    def __init__(self, name, implementation, paths):
        """``implementation``: the kernel's report of the path it takes, or None."""
        self.name = name
        self.implementation = implementation
        here = platform.machine()
        self.paths = [dataclasses.replace(p, reports=p.name) if implementation is not None and
                      p.reports is None else p for p in paths if p.arch in (None, here)]
        self.by_name = {p.name: p for p in self.paths}

    def __repr__(self):
        return f"Kernel({self.name})"

    @staticmethod
    def missing(path, detected=None):
        """The features ``path`` needs that the CPU (or ``detected``) does not have."""
        return sorted(path.needs - (cpu.detected() if detected is None else detected))

    def runnable(self, detected=None):
        """The names of the paths this CPU (or a CPU with ``detected``) can run."""
        return [p.name for p in self.paths if not self.missing(p, detected)]

    def params(self, detected=None):
        """One ``pytest.param`` per path; a path the CPU cannot run carries a skip naming the
        features it lacks."""
        out = []
        for p in self.paths:
            lacks = self.missing(p, detected)
            marks = [pytest.mark.skip(reason=f"{p.name}: CPU lacks {', '.join(lacks)}")] \
                if lacks else []
            out.append(pytest.param(p.name, id=p.name, marks=marks))
        return out

    @contextlib.contextmanager
    def restricted(self, name):
        """Run the enclosed code on path ``name``: the core restricted to its features, checked
        against what the kernel reports."""
        p = self.by_name[name]
        features = p.features()
        with cpu.restricted(features) as active:
            assert active == features, (name, active)
            if p.reports is not None:
                assert self.implementation() == p.reports, (name, self.implementation())
            yield name

    def each(self):
        """Yield the name of every path this CPU can run, with the core restricted to it (for a
        test that compares the paths inside one example)."""
        for name in self.runnable():
            with self.restricted(name):
                yield name


#: The features of each vector tier's AES paths (csrc/cpu.c sc_cpu_tier_needs).
AVX512_AES = {"avx512", "avx2", "vaes", "aesni"}
AVX2_AES = {"avx2", "vaes", "aesni"}
ARMCE = {"neon", "armce"}
X86, ARM = "x86_64", "aarch64"

#: memcrypt.implementation() keeps the name 'vaes' for its avx512 path.
MEMCRYPT = Kernel("memcrypt", memcrypt.implementation, [
    Path("avx512", AVX512_AES, reports="vaes", arch=X86),
    Path("avx2", AVX2_AES, arch=X86),
    Path("aesni", {"aesni"}, arch=X86),
    Path("armce", ARMCE, arch=ARM),
    Path("portable", set()),
])

#: Together the paths take each AES path and each SHA-256 path (shani, portable) at least once.
SEVPKT = Kernel("sevpkt", sevpkt.implementation, [
    Path("avx512+shani", AVX512_AES | {"shani"}, reports={"aes": "vaes", "sha256": "shani"},
         arch=X86),
    Path("avx2+shani", AVX2_AES | {"shani"}, reports={"aes": "avx2", "sha256": "shani"}, arch=X86),
    Path("aesni+portable", {"aesni"}, reports={"aes": "aesni", "sha256": "portable"}, arch=X86),
    Path("portable+shani", {"shani"}, reports={"aes": "portable", "sha256": "shani"}, arch=X86),
    Path("armce", ARMCE, reports={"aes": "armce", "sha256": "portable"}, arch=ARM),
    Path("portable", set(), reports={"aes": "portable", "sha256": "portable"}),
])

#: The folding paths: VPCLMULQDQ (detected with "vaes") on zmm and ymm, and PCLMULQDQ on xmm, which
#: the core detects as part of "aesni" and whose implementation() keeps the name 'clmul'; PMULL
#: on AArch64.
CHECKSUM = Kernel("checksum", checksum.implementation, [
    Path("avx512", {"avx512", "vaes"}, arch=X86),
    Path("avx2", {"avx2", "vaes"}, arch=X86),
    Path("aesni", {"aesni"}, reports="clmul", arch=X86),
    Path("armce", ARMCE, arch=ARM),
    Path("portable", set()),
])

#: The bulk page loops of sevcore.core.pages (csrc/guest.c). On AArch64 the portable build is
#: already Advanced SIMD (every AArch64 CPU has it), so there is no other path.
PAGES = Kernel("pages", pages.implementation, [
    Path("avx512", {"avx512"}, arch=X86),
    Path("avx2", {"avx2"}, arch=X86),
    Path("portable", set()),
])

#: csrc/bitmap.c: the avx512 scans need AVX-512 and POPCNT, and its counts also use VPOPCNTQ
#: where the CPU has it, as a plain run does; the avx2 path needs AVX2 and POPCNT.
BITMAP = Kernel("bitmap", bitmap.implementation, [
    Path("avx512", {"avx512", "popcnt"}, also={"vpopcntdq"}, arch=X86),
    Path("avx2", {"avx2", "popcnt"}, arch=X86),
    Path("popcnt", {"popcnt"}, arch=X86),
    Path("neon", {"neon"}, arch=ARM),
    Path("portable", set()),
])


def generate_tests(metafunc):
    """Parametrize ``cpu_path`` over the paths of the kernel the test's ``cpu_paths`` mark
    names."""
    if "cpu_path" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("cpu_paths")
    if mark is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: the cpu_path fixture needs "
                                "a pytest.mark.cpu_paths(kernel) mark")
    kernel, = mark.args
    metafunc.parametrize("cpu_path", kernel.params(), indirect=True)


@pytest.fixture
def cpu_path(request):
    """The test runs on one implementation path of its module's kernel: the core restricted to
    the path's features; the value is the path's name."""
    kernel, = request.node.get_closest_marker("cpu_paths").args
    with kernel.restricted(request.param) as name:
        yield name
