"""The VMM's side of the guest's live-migration interface (hypercalls.rst, msr.rst).

KVM keeps no record of which pages an SEV guest shares: the guest reports them with
``KVM_HC_MAP_GPA_RANGE``, which KVM forwards to user space (``KVM_CAP_EXIT_HYPERCALL``), and it
declares its reports complete by setting ``KVM_MIGRATION_READY`` in ``MSR_KVM_MIGRATION_CONTROL``,
an MSR KVM does not implement (user space gets it through ``KVM_CAP_X86_USER_SPACE_MSR`` and an
MSR filter). :class:`SharedPagesTracker` is the VMM code that sets this up and keeps the result:
the shared gfns as ranges (never one entry per page) and the migration-ready flag.
"""
from sevcore import uapi as U
from sevcore.hw.hostmem import PAGE_SHIFT
from sevcore.core.ranges import RangeSet

MAP_GPA_RANGE_PAGE_SZ_MASK = 0xf
#: Valid page-size codes in attrs bits 3:0 (4K, 2M, 1G).
MAP_GPA_RANGE_PAGE_SIZES = (U.KVM_MAP_GPA_RANGE_PAGE_SZ_4K, U.KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
                            U.KVM_MAP_GPA_RANGE_PAGE_SZ_1G)
MAP_GPA_RANGE_VALID = MAP_GPA_RANGE_PAGE_SZ_MASK | U.KVM_MAP_GPA_RANGE_ENCRYPTED


class SharedPagesTracker:
    """Keeps a guest's shared-page list and migration-ready flag from its exits.

    ``convert`` (default: the VM has private memory) also converts the memory attributes on
    each report, as a VMM must for SNP, TDX and SW_PROTECTED guests; for SEV and SEV-ES the
    reports are only recorded, to pick the migration path of each page.
    """

    def __init__(self, vm, convert=None):
        self.vm = vm
        self.convert = vm.has_private_mem if convert is None else convert
        self.shared = RangeSet()
        encrypted = vm.type != U.KVM_X86_DEFAULT_VM
        # msr.rst: bit 0 starts clear for a guest with encrypted memory, set otherwise.
        self.migration_control = 0 if encrypted else U.KVM_MIGRATION_READY
        self.hypercalls = 0
        self.msr_writes = 0

    @property
    def migration_ready(self):
        return bool(self.migration_control & U.KVM_MIGRATION_READY)

    def setup(self, vcpus):
        """Enable the exits and advertise the features, in the order hypercalls.rst asks:
        KVM_CAP_EXIT_HYPERCALL for MAP_GPA_RANGE, user-space MSR exits plus a filter that denies
        MSR_KVM_MIGRATION_CONTROL, then KVM_FEATURE_HC_MAP_GPA_RANGE and
        KVM_FEATURE_MIGRATION_CONTROL in each vCPU's CPUID."""
        vm = self.vm
        vm.enable_cap(U.KVM_CAP_EXIT_HYPERCALL,
                      vm.hypercall_exit_enabled | 1 << U.KVM_HC_MAP_GPA_RANGE)
        vm.enable_cap(U.KVM_CAP_X86_USER_SPACE_MSR,
                      vm.user_space_msr_mask | U.KVM_MSR_EXIT_REASON_FILTER)
        deny = (U.KVM_MSR_FILTER_READ | U.KVM_MSR_FILTER_WRITE, 1, U.MSR_KVM_MIGRATION_CONTROL,
                b"\x00")
        ranges = [(r.flags, r.nmsrs, r.base, r.bitmap) for r in vm.msr_filter.ranges] \
            if vm.msr_filter is not None else []
        flags = U.KVM_MSR_FILTER_DEFAULT_ALLOW if vm.msr_filter is None or \
            vm.msr_filter.default_allow else U.KVM_MSR_FILTER_DEFAULT_DENY
        vm.x86_set_msr_filter(flags, [deny] + ranges)
        features = 1 << U.KVM_FEATURE_HC_MAP_GPA_RANGE | 1 << U.KVM_FEATURE_MIGRATION_CONTROL
        for vcpu in vcpus:
            entries = vcpu.get_cpuid2()
            for e in entries:
                if e["function"] == U.KVM_CPUID_FEATURES:
                    e["eax"] |= features
            vcpu.set_cpuid2(entries)

    def handle_exit(self, vcpu):
        """Handle ``vcpu.kvm_run`` if it is a MAP_GPA_RANGE or MIGRATION_CONTROL exit; returns
        True if it was (the answer is written into kvm_run for the next KVM_RUN)."""
        run = vcpu.kvm_run
        if run.exit_reason == U.KVM_EXIT_HYPERCALL and run.hypercall.nr == U.KVM_HC_MAP_GPA_RANGE:
            run.hypercall.ret = self.map_gpa_range(*run.hypercall.args[:3])
            return True
        if run.exit_reason in (U.KVM_EXIT_X86_RDMSR, U.KVM_EXIT_X86_WRMSR) and \
                run.msr.index == U.MSR_KVM_MIGRATION_CONTROL:
            has = vcpu.cpuid_entry(U.KVM_CPUID_FEATURES)
            if not has or not has["eax"] >> U.KVM_FEATURE_MIGRATION_CONTROL & 1:
                run.msr.error = 1            # the MSR exists only with the feature
            elif run.exit_reason == U.KVM_EXIT_X86_RDMSR:
                run.msr.data = self.migration_control
            elif run.msr.data & ~U.KVM_MIGRATION_READY:
                run.msr.error = 1
            else:
                self.migration_control = run.msr.data
                self.msr_writes += 1
            return True
        return False

    def map_gpa_range(self, gpa, npages, attrs):
        """Record a guest report; the hypercall's return value (0, or -KVM_EINVAL for reserved
        attribute bits, a bad page size or a range the attribute update refuses; then nothing
        changes)."""
        self.hypercalls += 1
        if attrs & ~MAP_GPA_RANGE_VALID or \
                attrs & MAP_GPA_RANGE_PAGE_SZ_MASK not in MAP_GPA_RANGE_PAGE_SIZES:
            return -U.KVM_EINVAL
        encrypted = bool(attrs & U.KVM_MAP_GPA_RANGE_ENCRYPTED)
        start = gpa >> PAGE_SHIFT
        end = start + npages
        if self.convert:
            try:
                self.vm.set_memory_attributes(
                    gpa, npages << PAGE_SHIFT,
                    U.KVM_MEMORY_ATTRIBUTE_PRIVATE if encrypted else 0)
            except OSError:
                return -U.KVM_EINVAL
        if encrypted:
            self.shared.remove(start, end)
        else:
            self.shared.add(start, end)
        return 0

    def is_shared(self, gfn):
        return gfn in self.shared

    def shared_ranges(self, start=0, end=1 << 52):
        """The shared gfn ranges clipped to ``[start, end)``."""
        return self.shared.intersect(start, end)

    def private_ranges(self, start, end):
        """The complement of :meth:`shared_ranges` within ``[start, end)``."""
        out, pos = [], start
        for s, e in self.shared.intersect(start, end):
            if pos < s:
                out.append((pos, s))
            pos = e
        if pos < end:
            out.append((pos, end))
        return out
