"""Helpers named after the KVM selftests' library (tools/testing/selftests/kvm/lib/kvm_util.c),
so that a selftest ports line by line: ``vm_mem_add``, ``addr_gpa2hva``,
``vm_guest_mem_fallocate``, ``vm_mem_set_private`` ...

Each helper asserts success the way the library does: a failing ioctl raises its OSError.
"""
from sevcore import uapi as U
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm.fpu import SUPPORTED_XCR0


def vm_mem_add(vm, gpa, slot, npages, flags=0, guest_memfd=None, guest_memfd_offset=0):
    """Back ``npages`` at ``gpa`` with fresh anonymous VMM memory and add them as memslot
    ``slot`` (``KVM_SET_USER_MEMORY_REGION2``). With ``KVM_MEM_GUEST_MEMFD`` and no file, a
    guest_memfd of the region's size is created. Returns the memslot's HVA."""
    size = npages << PAGE_SHIFT
    hva = vm.kvm.mmap(size)
    if flags & U.KVM_MEM_GUEST_MEMFD and guest_memfd is None:
        guest_memfd = vm.create_guest_memfd(size, 0)
        guest_memfd_offset = 0
    vm.set_user_memory_region2(slot, flags, gpa, size, hva, guest_memfd_offset, guest_memfd)
    return hva


def addr_gpa2hva(vm, gpa):
    """The VMM address that backs ``gpa`` through its memslot (address space 0)."""
    s = vm.gfn_to_memslot(gpa >> PAGE_SHIFT)
    if s is None:
        raise LookupError(f"no memslot covers gpa {gpa:#x}")
    return s.userspace_addr + (gpa - (s.base_gfn << PAGE_SHIFT))


def vm_guest_mem_fallocate(vm, gpa, size, punch_hole):
    """fallocate() the guest_memfd ranges behind ``[gpa, gpa + size)``, slot by slot, with
    ``KEEP_SIZE`` (and ``PUNCH_HOLE`` if ``punch_hole``)."""
    mode = U.FALLOC_FL_KEEP_SIZE | (U.FALLOC_FL_PUNCH_HOLE if punch_hole else 0)
    end = gpa + size
    while gpa < end:
        s = vm.gfn_to_memslot(gpa >> PAGE_SHIFT)
        if s is None or not s.flags & U.KVM_MEM_GUEST_MEMFD or s.gmem_file is None:
            raise LookupError(f"gpa {gpa:#x} is not backed by a guest_memfd slot")
        slot_end = s.end_gfn << PAGE_SHIFT
        n = min(end, slot_end) - gpa
        offset = (s.gmem_pgoff << PAGE_SHIFT) + (gpa - (s.base_gfn << PAGE_SHIFT))
        s.gmem_file.fallocate(mode, offset, n)
        gpa += n


def vm_set_memory_attributes(vm, gpa, size, attributes):
    return vm.set_memory_attributes(gpa, size, attributes, 0)


def vm_mem_set_private(vm, gpa, size):
    return vm.set_memory_attributes(gpa, size, U.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)


def vm_mem_set_shared(vm, gpa, size):
    return vm.set_memory_attributes(gpa, size, 0, 0)


#: The selftest library's flat GDT selectors (lib/x86/processor.c).
KERNEL_CS = 0x8
KERNEL_DS = 0x10
KERNEL_TSS = 0x18


def vcpu_init_sregs(vcpu):
    """vcpu_init_sregs (lib/x86/processor.c): 64-bit mode at CPL 0 through ``KVM_SET_SREGS``:
    CR0 PE|NE|PG, CR4 PAE|OSFXSR (and OSXSAVE with XSAVE), EFER LME|LMA|NX, a flat 64-bit
    code segment, flat data segments, a 64-bit TSS and an unusable LDT. The library's GDT, IDT,
    TSS and page tables have no counterpart here (guest programs need none), so their bases
    are 0."""
    s = vcpu.get_sregs()
    s.idt.base, s.idt.limit = 0, 256 * 16 - 1           # NUM_INTERRUPTS idt_entry
    s.gdt.base, s.gdt.limit = 0, PAGE_SIZE - 1
    s.cr0 = U.X86_CR0_PE | U.X86_CR0_NE | U.X86_CR0_PG
    s.cr4 |= U.X86_CR4_PAE | U.X86_CR4_OSFXSR
    leaf = vcpu.cpuid_entry(1)
    if leaf and leaf["ecx"] >> 26 & 1:                   # X86_FEATURE_XSAVE
        s.cr4 |= U.X86_CR4_OSXSAVE
    s.efer |= U.EFER_LME | U.EFER_LMA | U.EFER_NX
    s.ldt = U.kvm_segment(unusable=1)                   # kvm_seg_set_unusable
    # kvm_seg_set_kernel_code_64bit / kvm_seg_set_kernel_data_64bit / kvm_seg_set_tss_64bit
    s.cs = U.kvm_segment(selector=KERNEL_CS, limit=0xffffffff, type=0x0b, s=1, present=1,
                         l=1, g=1)
    for name in ("ds", "es", "fs", "gs"):
        setattr(s, name, U.kvm_segment(selector=KERNEL_DS, limit=0xffffffff, type=0x03, s=1,
                                       present=1, db=1, g=1))
    s.tr = U.kvm_segment(selector=KERNEL_TSS, limit=0x67, type=0x0b, present=1)
    s.cr3 = 0
    vcpu.set_sregs(s)


def vm_vcpu_add(vm, vcpu_id):
    """vm_arch_vcpu_add: ``KVM_CREATE_VCPU`` (the vCPU gets KVM_GET_SUPPORTED_CPUID's entries),
    :func:`vcpu_init_sregs` (64-bit mode), then ``vcpu_init_xcrs``: XCR0 = the supported XCR0
    (``KVM_SET_XCRS``)."""
    vcpu = vm.create_vcpu(vcpu_id)
    vcpu_init_sregs(vcpu)
    vcpu.set_xcrs([(U.XCR_XFEATURE_ENABLED_MASK, SUPPORTED_XCR0)])
    return vcpu


def kvm_vm_free(vm):
    """kvm_vm_free: close every vCPU fd, then the VM fd. The VM is destroyed when nothing else
    (a guest_memfd, a mirror) holds it."""
    for vcpu in vm.vcpus:
        vcpu.close()
    vm.close()


def vm_create_with_vcpus(kvm, type, nr_vcpus, guest_code=None, *args):
    """A VM of ``type`` with vCPUs 0..nr_vcpus-1 (:func:`vm_vcpu_add`), each loaded with
    ``guest_code(g, *args)``."""
    vm = kvm.create_vm(type)
    vcpus = [vm_vcpu_add(vm, i) for i in range(nr_vcpus)]
    if guest_code is not None:
        for v in vcpus:
            v.set_guest_code(guest_code, *args)
    return vm, vcpus


def kvm_device_attr_get(kvm, group, attr):
    """kvm_device_attr_get on /dev/kvm: ``KVM_GET_DEVICE_ATTR`` into a u64 of the VMM's memory,
    returned as an int."""
    hva = kvm.mmap(PAGE_SIZE)
    try:
        kvm.get_device_attr(group, attr, hva)
        return int.from_bytes(kvm.read(hva, 8), "little")
    finally:
        kvm.munmap(hva, PAGE_SIZE)


__all__ = ["kvm_device_attr_get", "vm_mem_add", "addr_gpa2hva", "vm_guest_mem_fallocate",
           "vm_set_memory_attributes", "vm_mem_set_private", "vm_mem_set_shared", "vm_vcpu_add",
           "vcpu_init_sregs", "vm_create_with_vcpus",
           "PAGE_SIZE"]


# -- SEV (tools/testing/selftests/kvm/lib/x86/sev.c) -------------------------------------------------

def vm_sev_ioctl(vm, cmd, **fields):
    """KVM_MEMORY_ENCRYPT_OP, asserting success (a failure raises its OSError)."""
    return vm.memory_encrypt_op(cmd, **fields)


def sev_vm_init(vm):
    """Legacy ``KVM_SEV_INIT`` (NULL data) on a DEFAULT VM, ``KVM_SEV_INIT2`` otherwise."""
    if vm.type == U.KVM_X86_DEFAULT_VM:
        return vm.memory_encrypt_op(U.KVM_SEV_INIT, data=None)
    return vm.memory_encrypt_op(U.KVM_SEV_INIT2)


def sev_es_vm_init(vm):
    """As sev_vm_init, with ``KVM_SEV_ES_INIT`` for a DEFAULT VM."""
    if vm.type == U.KVM_X86_DEFAULT_VM:
        return vm.memory_encrypt_op(U.KVM_SEV_ES_INIT, data=None)
    return vm.memory_encrypt_op(U.KVM_SEV_INIT2)


def sev_vm_launch(vm, policy):
    """LAUNCH_START, GUEST_STATUS == LAUNCH_UPDATE, then REG_REGION and LAUNCH_UPDATE_DATA of
    every memslot (the selftest library encrypts its protected pages: here all of guest RAM),
    and LAUNCH_UPDATE_VMSA for an SEV-ES policy."""
    vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_START, policy=policy)
    st = vm.memory_encrypt_op(U.KVM_SEV_GUEST_STATUS)
    assert st.policy == policy and st.state == U.SEV_GUEST_STATE_LAUNCH_UPDATE, st
    for s in sorted(vm.memslots.values(), key=lambda s: s.base_gfn):
        size = s.npages << PAGE_SHIFT
        vm.memory_encrypt_reg_region(s.userspace_addr, size)
        vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=s.userspace_addr, len=size)
    if policy & U.SEV_POLICY_ES:
        vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_UPDATE_VMSA)


def vm_sev_launch(vm, policy, measurement=None):
    """sev_vm_launch, LAUNCH_MEASURE (state LAUNCH_SECRET), LAUNCH_FINISH (state RUNNING).
    ``measurement``, a bytearray, receives the 48-byte MEASURE || MNONCE. An SNP VM takes the
    SNP launch instead (:func:`vm_snp_launch`), as the selftests' vm_sev_launch does."""
    if vm.type == U.KVM_X86_SNP_VM:
        return vm_snp_launch(vm, policy)
    sev_vm_launch(vm, policy)
    buf = vm.kvm.mmap(PAGE_SIZE)
    vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_MEASURE, uaddr=buf, len=256)
    if measurement is not None:
        measurement[:] = vm.kvm.read(buf, 48)
    st = vm.memory_encrypt_op(U.KVM_SEV_GUEST_STATUS)
    assert st.state == U.SEV_GUEST_STATE_LAUNCH_SECRET, st
    vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_FINISH)
    st = vm.memory_encrypt_op(U.KVM_SEV_GUEST_STATUS)
    assert st.state == U.SEV_GUEST_STATE_RUNNING, st


def vm_sev_create_with_one_vcpu(kvm, type, guest_code=None, *args, npages=16):
    """A VM of ``type`` (SEV, SEV-ES or SNP) initialised with INIT2, one memslot of ``npages``
    at gpa 0 (for SNP backed by a guest_memfd as well, as the selftests' VMs with private
    memory are), and vCPU 0 running ``guest_code``. Returns ``(vm, vcpu)``."""
    vm = kvm.create_vm(type)
    vm.memory_encrypt_op(U.KVM_SEV_INIT2)
    vm_mem_add(vm, 0, 0, npages, U.KVM_MEM_GUEST_MEMFD if type == U.KVM_X86_SNP_VM else 0)
    vcpu = vm_vcpu_add(vm, 0)
    if guest_code is not None:
        vcpu.set_guest_code(guest_code, *args)
    return vm, vcpu


def sev_encrypt_memory(vm, dst_hva, src_hva, size):
    """KVM_SEV_DBG_ENCRYPT of ``size`` bytes of plaintext at ``src_hva`` into guest memory."""
    return vm.memory_encrypt_op(U.KVM_SEV_DBG_ENCRYPT, src_uaddr=src_hva, dst_uaddr=dst_hva,
                                len=size)


def sev_decrypt_memory(vm, dst_hva, src_hva, size):
    """KVM_SEV_DBG_DECRYPT of ``size`` bytes of guest memory at ``src_hva``."""
    return vm.memory_encrypt_op(U.KVM_SEV_DBG_DECRYPT, src_uaddr=src_hva, dst_uaddr=dst_hva,
                                len=size)


def _user_blob(kvm, blob):
    hva = kvm.mmap(max(len(blob), 1))
    kvm.write(hva, blob)
    return hva


def sev_send_start(vm, chain):
    """KVM_SEV_SEND_START towards the platform whose certificates are ``chain`` (a
    ``sevcore.psp.CertChain``); returns the 128-byte session for the target. The guest is then
    in SEND_UPDATE."""
    kvm = vm.kvm
    fields = {}
    for name, blob in (("pdh_cert", chain.pdh), ("plat_certs", chain.plat_certs),
                       ("amd_certs", chain.amd_certs)):
        fields[name + "_uaddr"], fields[name + "_len"] = _user_blob(kvm, blob), len(blob)
    session = kvm.mmap(PAGE_SIZE)
    vm.memory_encrypt_op(U.KVM_SEV_SEND_START, session_uaddr=session, session_len=128, **fields)
    return kvm.read(session, 128)


def sev_receive_start(vm, policy, pdh, session):
    """KVM_SEV_RECEIVE_START with the source platform's PDH and SEND_START's ``session``; the
    new guest is then in RECEIVE_UPDATE."""
    kvm = vm.kvm
    return vm.memory_encrypt_op(U.KVM_SEV_RECEIVE_START, policy=policy,
                                pdh_uaddr=_user_blob(kvm, pdh), pdh_len=len(pdh),
                                session_uaddr=_user_blob(kvm, session), session_len=len(session))


__all__ += ["vm_sev_ioctl", "sev_vm_init", "sev_es_vm_init", "sev_vm_launch", "vm_sev_launch",
            "vm_sev_create_with_one_vcpu", "sev_encrypt_memory", "sev_decrypt_memory",
            "sev_send_start", "sev_receive_start"]


# -- SEV-SNP (tools/testing/selftests/kvm/lib/x86/sev.c) --------------------------------------------

def snp_default_policy():
    """snp_default_policy: RSVD_MBO, and SMT (the simulated host runs SMT)."""
    return U.SNP_POLICY_MASK_RSVD_MBO | U.SNP_POLICY_MASK_SMT


def snp_vm_init(vm):
    """``KVM_SEV_INIT2`` with a zeroed struct on an SNP VM."""
    assert vm.type == U.KVM_X86_SNP_VM, vm.type
    return vm.memory_encrypt_op(U.KVM_SEV_INIT2)


def snp_vm_launch_start(vm, policy):
    """``KVM_SEV_SNP_LAUNCH_START`` with ``policy``."""
    return vm.memory_encrypt_op(U.KVM_SEV_SNP_LAUNCH_START, policy=policy)


def snp_launch_update_data(vm, gpa, hva, size, type):
    """``KVM_SEV_SNP_LAUNCH_UPDATE`` of ``size`` bytes at ``gpa`` from ``hva``, repeated while
    the kernel reports partial progress (it writes back ``gfn_start``, ``uaddr``, ``len``)."""
    fields = dict(gfn_start=gpa >> PAGE_SHIFT, uaddr=hva, len=size, type=type)
    while fields["len"]:
        out = vm.memory_encrypt_op(U.KVM_SEV_SNP_LAUNCH_UPDATE, **fields)
        fields = dict(gfn_start=out.gfn_start, uaddr=out.uaddr, len=out.len, type=type)
    return out


def snp_vm_launch_update(vm, page_type=U.KVM_SEV_SNP_PAGE_TYPE_NORMAL):
    """encrypt_region of every memslot: all of it made private, then measured and encrypted
    from the VMM's copy at the slot's HVA (the selftests protect all of guest RAM here)."""
    for s in sorted(vm.memslots.values(), key=lambda s: s.base_gfn):
        gpa, size = s.base_gfn << PAGE_SHIFT, s.npages << PAGE_SHIFT
        vm_mem_set_private(vm, gpa, size)
        snp_launch_update_data(vm, gpa, s.userspace_addr, size, page_type)


def snp_vm_launch_finish(vm, **fields):
    """``KVM_SEV_SNP_LAUNCH_FINISH`` (a zeroed struct unless ``fields`` say otherwise)."""
    return vm.memory_encrypt_op(U.KVM_SEV_SNP_LAUNCH_FINISH, **fields)


def vm_snp_launch(vm, policy):
    """vm_sev_launch for an SNP VM: KVM_HC_MAP_GPA_RANGE exits enabled (page-state changes reach
    the VMM), LAUNCH_START, LAUNCH_UPDATE of all memory, LAUNCH_FINISH."""
    vm.enable_cap(U.KVM_CAP_EXIT_HYPERCALL, 1 << U.KVM_HC_MAP_GPA_RANGE)
    snp_vm_launch_start(vm, policy)
    snp_vm_launch_update(vm)
    snp_vm_launch_finish(vm)


def handle_map_gpa_range(vm, run):
    """What a VMM does with a KVM_HC_MAP_GPA_RANGE exit: convert the range with
    KVM_SET_MEMORY_ATTRIBUTES (ENCRYPTED: private, else shared) and answer 0."""
    hc = run.hypercall
    assert run.exit_reason == U.KVM_EXIT_HYPERCALL and hc.nr == U.KVM_HC_MAP_GPA_RANGE, run
    private = bool(hc.args[2] & U.KVM_MAP_GPA_RANGE_ENCRYPTED)
    vm.set_memory_attributes(hc.args[0], hc.args[1] << PAGE_SHIFT,
                             U.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)
    hc.ret = 0


def snp_guest_msg_init(vm, secrets_gpa, req_gpa, resp_gpa):
    """Tell the SNP guest where its secrets page is and which two shared pages its
    guest-message driver uses (what its firmware and driver would know); ``g.snp_get_report``
    needs it."""
    vm.snp_guest_msg = (secrets_gpa, req_gpa, resp_gpa)


__all__ += ["snp_guest_msg_init", "snp_default_policy", "snp_vm_init", "snp_vm_launch_start", "snp_launch_update_data",
            "snp_vm_launch_update", "snp_vm_launch_finish", "vm_snp_launch",
            "handle_map_gpa_range"]
