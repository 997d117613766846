"""A launch driven from the guest owner's side through KVM's SEV layer, as sev-tool and a VMM do
it together: the owner checks the platform's certificate chain and makes a launch session for its
PDH; the VMM issues LAUNCH_START with it, LAUNCH_UPDATE_DATA (and LAUNCH_UPDATE_VMSA for SEV-ES)
and LAUNCH_MEASURE; the owner verifies the measurement and packages a secret bound to it; the VMM
injects it with KVM_SEV_LAUNCH_SECRET and finishes; the guest finds the secret in plaintext behind
its C-bit while the VMM sees ciphertext (sevcore.vmm.owner; AMD SEV API #55766, LAUNCH_START to
LAUNCH_FINISH; arch/x86/kvm/svm/sev.c, sev_launch_* handlers)."""
from errno import EIO

import pytest

import sevcore
from sevcore.vmm import owner
from sevcore.vmm.kvm_util import addr_gpa2hva, vm_mem_add, vm_vcpu_add
from sevcore.kvm.sev import SevError
from sevcore.kvm.sev_es import build_vmsa
from sevcore.uapi import *

NPAGES = 16
IMAGE_PAGES = 6                          # gpa 0..0x6000: the "firmware" the owner expects
SECRET_GPA = 0x4000                      # inside the measured image, as OVMF's secret page is
SHARED = 0x8000                          # an SEV-ES guest reports through a shared page
SECRET = b"disk passphrase!" * 3         # LAUNCH_SECRET takes 16-byte multiples


def image():
    """The guest image the owner knows: deterministic bytes, one pattern per page."""
    return b"".join(bytes([0x40 + i]) * 4096 for i in range(IMAGE_PAGES))


def guest_reads_secret(g, c_bit):
    yield g.sync((yield g.read(SECRET_GPA | 1 << c_bit, len(SECRET))))
    yield g.done()


def guest_es_reads_secret(g, c_bit):
    data = yield g.read(SECRET_GPA | 1 << c_bit, len(SECRET))
    yield g.write(SHARED, data)                   # no C-bit: the page is shared with the host
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def blob(kvm, data):
    hva = kvm.mmap(max(len(data), 1))
    kvm.write(hva, data)
    return hva


class Launch:
    """One VM taken up to LAUNCH_MEASURE, with the guest owner's session and checks."""

    def __init__(self, es, tamper=False):
        self.es = es
        self.kvm = kvm = sevcore.Kvm()
        self.vm = vm = kvm.create_vm(KVM_X86_SEV_ES_VM if es else KVM_X86_SEV_VM)
        vm.memory_encrypt_op(KVM_SEV_INIT2)
        self.hva = vm_mem_add(vm, 0, 0, NPAGES)
        self.vcpu = vm_vcpu_add(vm, 0)
        self.policy = SEV_POLICY_ES if es else SEV_POLICY_NO_DBG
        # The guest owner: the platform's certificates, then a session for its PDH.
        chain = kvm.host.psp.export_cert_chain()
        owner.verify_cert_chain(chain)
        self.session = owner.create_launch_session(chain.pdh, self.policy)
        # The VMM: LAUNCH_START with the owner's GODH certificate and session.
        out = vm.memory_encrypt_op(
            KVM_SEV_LAUNCH_START, policy=self.policy,
            dh_uaddr=blob(kvm, self.session.godh_cert), dh_len=len(self.session.godh_cert),
            session_uaddr=blob(kvm, self.session.session), session_len=len(self.session.session))
        assert out.handle == vm.sev.handle != 0
        loaded = bytearray(image())
        if tamper:
            loaded[100] ^= 1                           # the VMM changes one byte of the image
        kvm.write(self.hva, bytes(loaded))
        vm.memory_encrypt_reg_region(self.hva, NPAGES * 4096)
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=self.hva, len=len(loaded))
        self.expected = [image()]
        if es:
            # The owner knows the initial vCPU state: the VMSA KVM builds from it is measured.
            self.expected.append(build_vmsa(self.vcpu, vm.sev.vmsa_features))
            vm.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_VMSA)
        buf = kvm.mmap(4096)
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_MEASURE, uaddr=buf, len=256)
        self.measure = kvm.read(buf, 48)
        assert self.status() == SEV_GUEST_STATE_LAUNCH_SECRET

    def status(self):
        return self.vm.memory_encrypt_op(KVM_SEV_GUEST_STATUS).state

    def owner_verifies(self):
        """verify_measurement against the digest of what the owner expects to be launched, on
        the firmware version the platform reports."""
        st = self.kvm.host.psp.platform_status()
        return owner.verify_measurement(self.session.tik, self.measure,
                                        owner.launch_digest(*self.expected), st.api_major,
                                        st.api_minor, st.build, self.policy)

    def launch_secret(self, header, ct):
        """KVM_SEV_LAUNCH_SECRET of (header, ciphertext) into the guest's secret page."""
        kvm = self.kvm
        return self.vm.memory_encrypt_op(
            KVM_SEV_LAUNCH_SECRET, hdr_uaddr=blob(kvm, header), hdr_len=len(header),
            guest_uaddr=addr_gpa2hva(self.vm, SECRET_GPA), guest_len=len(ct),
            trans_uaddr=blob(kvm, ct), trans_len=len(ct))

    def secret_page(self):
        return self.kvm.read(addr_gpa2hva(self.vm, SECRET_GPA), 4096)


@pytest.mark.parametrize("es", [False, True], ids=["sev", "sev-es"])
def test_owner_launch_with_secret(es):
    """The owner verifies LAUNCH_MEASURE and packages a secret bound to it; after LAUNCH_SECRET
    and LAUNCH_FINISH the guest reads it through its C-bit, the VMM's view is ciphertext."""
    la = Launch(es)
    assert la.owner_verifies()
    header, ct = owner.package_secret(la.session.tek, la.session.tik, SECRET, la.measure[:32])
    assert len(header) == 52 and ct != SECRET
    la.launch_secret(header, ct)
    la.vm.memory_encrypt_op(KVM_SEV_LAUNCH_FINISH)
    assert la.status() == SEV_GUEST_STATE_RUNNING
    assert SECRET not in la.secret_page()
    kvm, vm, vcpu = la.kvm, la.vm, la.vcpu
    if es:
        vcpu.set_guest_code(guest_es_reads_secret, kvm.host.c_bit)
        run = vcpu.run()
        assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
        assert run.system_event.type == KVM_SYSTEM_EVENT_SEV_TERM
        assert kvm.read(addr_gpa2hva(vm, SHARED), len(SECRET)) == SECRET
    else:
        vcpu.set_guest_code(guest_reads_secret, kvm.host.c_bit)
        vcpu.run()
        assert vcpu.get_ucall() == ("sync", (SECRET,))


@pytest.mark.parametrize("wrong", ["zeros", "other launch"])
def test_secret_for_a_wrong_measurement_is_refused(wrong):
    """A secret packaged against another measurement fails LAUNCH_SECRET: EIO with
    SEV_RET_BAD_MEASUREMENT, the guest page and the launch state untouched; the right one then
    goes in."""
    la = Launch(False)
    other = Launch(False)
    measure = bytes(32) if wrong == "zeros" else other.measure[:32]
    header, ct = owner.package_secret(la.session.tek, la.session.tik, SECRET, measure)
    before = la.secret_page()
    with pytest.raises(SevError) as e:
        la.launch_secret(header, ct)
    assert e.value.errno == EIO and e.value.fw_error == SEV_RET_BAD_MEASUREMENT
    assert e.value.out.error == SEV_RET_BAD_MEASUREMENT
    assert "BAD_MEASUREMENT" in e.value.fw_error_name and "BAD_MEASUREMENT" in str(e.value)
    assert la.secret_page() == before and la.status() == SEV_GUEST_STATE_LAUNCH_SECRET
    assert la.vm.sev.pages_locked == NPAGES                # the secret's pin was released
    la.launch_secret(*owner.package_secret(la.session.tek, la.session.tik, SECRET,
                                           la.measure[:32]))


def test_owner_refuses_a_tampered_launch():
    """One byte of the image changed by the VMM gives a measurement the owner's check rejects,
    so no secret is released; the firmware accepts a secret only for the measurement it made."""
    la = Launch(False, tamper=True)
    assert not la.owner_verifies()
    honest = Launch(False)
    assert honest.owner_verifies()


def test_session_for_another_platform_is_refused():
    """LAUNCH_START with a session made for another platform's PDH fails with
    SEV_RET_BAD_MEASUREMENT (the session's wrap key does not verify); no handle is kept."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SEV_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    elsewhere = sevcore.Host(seed=7)
    elsewhere.psp.init()
    s = owner.create_launch_session(elsewhere.psp.export_cert_chain().pdh, 0)
    with pytest.raises(SevError) as e:
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_START, policy=0,
                             dh_uaddr=blob(kvm, s.godh_cert), dh_len=len(s.godh_cert),
                             session_uaddr=blob(kvm, s.session), session_len=len(s.session))
    assert e.value.errno == EIO and e.value.fw_error == SEV_RET_BAD_MEASUREMENT
    assert vm.sev.handle == 0
