"""The launch digest against sev-snp-measure (PyPI; its ``gctx.GCTX`` replays the PAGE_INFO chain
of AMD 56860 8.17): the same pages and VMSAs launched through the simulated firmware give the
digest it computes, and the report's measurement is that digest."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevcore import uapi as U
from sevcore.psp import snp_layout as S

from support.snp import new_guest, preguest, report, snp_host, spas

gctx_mod = pytest.importorskip("sevsnpmeasure.gctx")

KINDS = ("normal", "zero", "unmeasured", "secrets", "cpuid")
TYPES = {"normal": U.SNP_PAGE_TYPE_NORMAL, "zero": U.SNP_PAGE_TYPE_ZERO,
         "unmeasured": U.SNP_PAGE_TYPE_UNMEASURED, "secrets": U.SNP_PAGE_TYPE_SECRET,
         "cpuid": U.SNP_PAGE_TYPE_CPUID}


def _cpuid_table():
    page = bytearray(4096)
    page[:16] = S.snp_cpuid_table.pack(count=1)
    page[16:64] = S.snp_cpuid_fn.pack(eax_in=0x80000008, eax=0x3030)
    return bytes(page)


def _launch(runs, nvmsas, seed):
    """Launch ``runs`` ((kind, gfn, npages) in order) and ``nvmsas`` VMSAs through the firmware and
    through GCTX; returns (the firmware's digest, GCTX's digest, host, gctx)."""
    host = snp_host(seed=seed)
    gctx = new_guest(host)
    ref = gctx_mod.GCTX()
    rng = np.random.default_rng(seed)
    for kind, gfn, n in runs:
        data = _cpuid_table() * n if kind == "cpuid" else \
            rng.integers(0, 256, n * 4096, dtype=np.uint8).tobytes()
        pfns = preguest(host, data, gfn)
        host.psp.snp_launch_update_pages(gctx, spas(pfns), TYPES[kind])
        gpa = gfn << 12
        if kind == "normal":
            ref.update_normal_pages(gpa, data)
        elif kind == "zero":
            ref.update_zero_pages(gpa, n * 4096)
        elif kind == "unmeasured":
            ref.update_unmeasured_pages(gpa, n * 4096)
        else:
            for i in range(n):
                (ref.update_secrets_page if kind == "secrets" else ref.update_cpuid_page)(
                    gpa + i * 4096)
    for vcpu in range(nvmsas):
        vmsa = bytearray(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        pfn = int(preguest(host, bytes(vmsa), 0, gpas=[U.INITIAL_VMSA_GPA])[0])
        host.psp.snp_launch_update(gctx, pfn << 12, U.SNP_PAGE_TYPE_VMSA)
        ref.update_vmsa_page(bytes(vmsa))
    return host.psp.snp_guest(gctx).ld, ref.ld(), host, gctx


def test_every_page_type_and_vmsas_match_sev_snp_measure():
    """Normal, zero, unmeasured, secrets and CPUID pages and four VMSAs give GCTX's digest, and
    the report measures it."""
    runs = [("normal", 0x100, 5), ("zero", 0x200, 3), ("unmeasured", 0x300, 2),
            ("secrets", 0x400, 1), ("cpuid", 0x401, 1), ("normal", 0x10, 2)]
    ours, theirs, host, gctx = _launch(runs, 4, seed=1)
    assert ours == theirs
    host.psp.snp_launch_finish(gctx)
    assert S.snp_attestation_report.unpack(report(host, gctx))["measurement"] == theirs


@settings(max_examples=15, deadline=None)
@given(runs=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 1 << 20),
                               st.integers(1, 3)), min_size=1, max_size=5),
       nvmsas=st.integers(0, 3))
def test_any_launch_matches_sev_snp_measure(runs, nvmsas):
    """Any order of page runs and any number of VMSAs gives the digest sev-snp-measure gives."""
    ours, theirs, _, _ = _launch(runs, nvmsas, seed=len(runs))
    assert ours == theirs
