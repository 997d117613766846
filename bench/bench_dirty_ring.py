"""The dirty ring against the dirty bitmap, for a sparse and a dense writer.

Run: ``pytest bench/bench_dirty_ring.py --benchmark-enable``.

One timed round is what a migration's pass costs on the source: the guest writes its pages
through KVM_RUN (the C page kernel, which sets bitmap bits or pushes ring entries and unprotects
the page), then the VMM learns which pages are dirty and re-arms the log:

* ``bitmap``: ``KVM_GET_DIRTY_LOG`` (read and clear, as without manual protect) and the set bits
  as gfns (``Bitmap.set_indices``): a scan of the whole slot's bitmap however few pages changed.
* ``ring``: ``KVM_CAP_DIRTY_LOG_RING`` with the largest ring (65536 entries): every vCPU ring
  collected (C, ``sc_dirty_ring_collect``) and ``KVM_RESET_DIRTY_RINGS`` (C,
  ``sc_dirty_ring_reset``, which write-protects the pages again); a ring that fills
  (KVM_EXIT_DIRTY_RING_FULL) is reaped and the guest run on, as a VMM does.

Writers: ``sparse``, 1024 random pages of a 256 GiB slot (64M pages; the bitmap is 8 MiB);
``dense``, every page of a 256 MiB slot (65536 pages: the ring fills and is reaped on the way).
The pages are touched before the timed rounds (faults and frames are the same for both).
``extra_info["us_per_page"]`` is the round divided by the pages written.
"""
import numpy as np
import pytest

import sevcore
from sevcore.core.arrays import sorted_unique
from sevcore.core.bitmap import Bitmap
from sevcore.vmm.dirty_ring import DirtyRings
from sevcore.vmm.kvm_util import vm_mem_add
from sevcore.uapi import *

from benchutil import per_item

GPA = 1 << 32
SLOT = 1
RING_BYTES = KVM_DIRTY_RING_MAX_ENTRIES * 16
WRITERS = {"sparse": (256 << 30 >> 12, 1024), "dense": (256 << 20 >> 12, 256 << 20 >> 12)}


def writer(g, gpas, rounds):
    for r in range(rounds):
        yield g.stamp_pages(gpas, r + 1)
        yield g.sync(r)


def make(kind, mode):
    """A VM whose slot logs to ``mode`` and a vCPU that stamps the writer's pages each run."""
    slot_pages, n = WRITERS[kind]
    host = sevcore.Host()
    vm = host.kvm.create_vm(KVM_X86_DEFAULT_VM)
    if mode == "ring":
        vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, RING_BYTES)
    vm_mem_add(vm, 0, 0, 16)
    vm_mem_add(vm, GPA, SLOT, slot_pages)
    rng = np.random.default_rng(7)
    pages = np.sort(rng.choice(slot_pages, n, replace=False)) if n < slot_pages \
        else np.arange(n)
    gpas = np.uint64(GPA) + (pages.astype(np.uint64) << np.uint64(12))
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(writer, gpas, 1 << 20)
    assert vcpu.run().exit_reason == KVM_EXIT_IO           # first touch, before logging
    vm.set_user_memory_region2(SLOT, KVM_MEM_LOG_DIRTY_PAGES, GPA, slot_pages << 12,
                               vm.memslots[(0, SLOT)].userspace_addr)
    rings = DirtyRings(vm) if mode == "ring" else None
    return host, vm, vcpu, rings, pages


def one_round(vm, vcpu, rings, slot_pages):
    """The guest's pass over its pages, then the VMM's harvest: the dirty gfns' offsets."""
    parts = []
    while True:
        run = vcpu.run()
        if run.exit_reason != KVM_EXIT_DIRTY_RING_FULL:
            break
        parts.append(rings.harvest())
    assert run.exit_reason == KVM_EXIT_IO
    if rings is None:
        return Bitmap.from_words(vm.get_dirty_log(SLOT), slot_pages).set_indices()
    parts.append(rings.harvest())
    return sorted_unique(np.concatenate(parts)) - np.uint64(GPA >> 12)


@pytest.mark.parametrize("mode", ["ring", "bitmap"])
@pytest.mark.parametrize("kind", list(WRITERS))
def test_dirty_harvest(benchmark, kind, mode):
    slot_pages, n = WRITERS[kind]
    host, vm, vcpu, rings, pages = make(kind, mode)
    benchmark.group = f"dirty_log_{kind}"
    got = benchmark.pedantic(one_round, args=(vm, vcpu, rings, slot_pages), rounds=5,
                             warmup_rounds=1)
    assert np.array_equal(np.asarray(got, np.uint64), pages.astype(np.uint64))
    per_item(benchmark, n, "page")
    if benchmark.stats:
        benchmark.extra_info["us_per_page"] = benchmark.stats.stats.median / n * 1e6
