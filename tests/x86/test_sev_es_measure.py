"""The SEV and SEV-ES launch digest against sev-snp-measure (PyPI; ``guest.calc_launch_digest``
in its ``sev`` and ``seves`` modes): an OVMF-shaped firmware image, QEMU's kernel hashes table and
the VMSAs of vCPUs in QEMU's reset state, launched as QEMU launches them (target/i386/sev.c
``sev_encrypt_flash``, ``sev_add_kernel_loader_hashes``, ``sev_es_set_reset_vector``,
``sev_launch_get_measure``), give the LAUNCH_MEASURE that AMD pub. 55766 (LAUNCH_MEASURE) defines
over the tool's digest, and an ATTESTATION report carrying that digest.

No real OVMF build is on this machine, so the image is synthetic: random bytes in the shape the
tool and QEMU read (hw/i386/pc_sysfw_ovmf.c ``pc_system_parse_ovmf_flash``, target/i386/sev.c
``sev_es_find_reset_vector``): the GUIDed footer table ending 32 bytes before the end of the
image, holding the SEV-ES reset block (the APs' reset EIP) and the kernel hashes table area, and
a reset vector at 0xfffffff0."""
import hashlib
import hmac
import struct
import uuid

import numpy as np
import pytest

import sevcore
from sevcore.uapi import *
from sevcore.vmm import owner
from sevcore.vmm.kvm_util import addr_gpa2hva, vm_mem_add

from support.qemu import BSP_RESET_EIP, qemu_reset

guest = pytest.importorskip("sevsnpmeasure.guest")
from sevsnpmeasure.sev_mode import SevMode  # noqa: E402  (only once the tool is known present)
from sevsnpmeasure.vcpu_types import CPU_SIGS  # noqa: E402
from sevsnpmeasure.vmsa import VMSA  # noqa: E402

FOUR_GB = 1 << 32
IMAGE_PAGES = 16                          # 64 KiB of "flash" ending at 4 GiB, as pflash sits
RAM_PAGES = 16
AP_RESET_EIP = 0xffffe400                 # inside the image, as OVMF's SEV-ES AP reset code is
HASHES_BASE, HASHES_SIZE = 0x5c00, 0x400  # in RAM, as OVMF's PcdQemuHashTableBase area is
SIGNATURE = CPU_SIGS["EPYC-Genoa"]

# GUIDs of target/i386/sev.c and edk2's reset vector.
FOOTER_GUID = "96b582de-1fb2-45f7-baea-a366c55a082d"
SEV_ES_RESET_BLOCK_GUID = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
SEV_HASH_TABLE_RV_GUID = "7255371f-3a3b-4b04-927b-1da6efa8d454"
HASH_TABLE_HEADER_GUID = "9438d606-4f22-4cc9-b479-a793d411fd21"
CMDLINE_GUID = "97d02dd8-bd20-4c94-aa78-e7714d36ab2a"
INITRD_GUID = "44baf731-3a2f-4bd7-9af1-41e29169781d"
KERNEL_GUID = "4de79437-abd2-427f-b835-d5b172d2045b"


def guid(text):
    return uuid.UUID(text).bytes_le


def ovmf_image(seed):
    """An OVMF-shaped image: each footer table entry is its data, then a 2-byte length (data
    included) and its GUID; the table's own entry, whose length covers the whole table, ends 32
    bytes before the end; the last 16 bytes hold the reset vector."""
    image = bytearray(np.random.default_rng(seed).integers(0, 256, IMAGE_PAGES * 4096,
                                                           dtype=np.uint8).tobytes())
    entries = b""
    for data, name in ((struct.pack("<I", AP_RESET_EIP), SEV_ES_RESET_BLOCK_GUID),
                       (struct.pack("<II", HASHES_BASE, HASHES_SIZE), SEV_HASH_TABLE_RV_GUID)):
        entries += data + struct.pack("<H", len(data) + 18) + guid(name)
    table = entries + struct.pack("<H", len(entries) + 18) + guid(FOOTER_GUID)
    end = len(image) - 32
    image[end - len(table):end] = table
    image[-16:] = b"\x90\x90\xeb\xfe" + bytes(12)    # nop; nop; jmp $ at 0xfffffff0
    return bytes(image)


def hashes_table(kernel, initrd, cmdline):
    """QEMU's padded SEV hashes table: header GUID and length, then the cmdline, initrd and
    kernel entries (GUID, length, SHA-256), zero-padded to 16 bytes."""
    entries = b"".join(guid(g) + struct.pack("<H", 50) + hashlib.sha256(data).digest()
                       for g, data in ((CMDLINE_GUID, cmdline), (INITRD_GUID, initrd),
                                       (KERNEL_GUID, kernel)))
    table = guid(HASH_TABLE_HEADER_GUID) + struct.pack("<H", 18 + len(entries)) + entries
    return table + bytes(-len(table) % 16)


def blob(kvm, data):
    hva = kvm.mmap(len(data))
    kvm.write(hva, data)
    return hva


def qemu_launch(es, nvcpus, image, table, legacy=False, vmsa_features=0,
                ap_eip=AP_RESET_EIP):
    """Launch as QEMU does: KVM_SEV_INIT2 with ``vmsa_features`` (or, ``legacy``, KVM_SEV_INIT or
    KVM_SEV_ES_INIT on a default VM), vCPUs at reset (APs at ``ap_eip``), LAUNCH_START with the
    owner's session, LAUNCH_UPDATE_DATA of the flash, then of the hashes table if any,
    LAUNCH_UPDATE_VMSA for SEV-ES, LAUNCH_MEASURE, ATTESTATION. Returns (TIK, policy, platform
    status, the 48-byte MEASURE || MNONCE, the 0xd0-byte report, its mnonce)."""
    kvm = sevcore.Kvm()
    if legacy:
        vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
        vm.memory_encrypt_op(KVM_SEV_ES_INIT if es else KVM_SEV_INIT, data=None)
    else:
        vm = kvm.create_vm(KVM_X86_SEV_ES_VM if es else KVM_X86_SEV_VM)
        vm.memory_encrypt_op(KVM_SEV_INIT2, vmsa_features=vmsa_features)
    ram = vm_mem_add(vm, 0, 0, RAM_PAGES)
    flash = vm_mem_add(vm, FOUR_GB - len(image), 1, IMAGE_PAGES)
    for i in range(nvcpus):
        qemu_reset(vm.create_vcpu(i), SIGNATURE, ap_eip if i else BSP_RESET_EIP)
    policy = SEV_POLICY_ES | SEV_POLICY_NO_DBG if es else SEV_POLICY_NO_DBG
    chain = kvm.host.psp.export_cert_chain()
    session = owner.create_launch_session(chain.pdh, policy)
    vm.memory_encrypt_op(
        KVM_SEV_LAUNCH_START, policy=policy,
        dh_uaddr=blob(kvm, session.godh_cert), dh_len=len(session.godh_cert),
        session_uaddr=blob(kvm, session.session), session_len=len(session.session))
    vm.memory_encrypt_reg_region(ram, RAM_PAGES * 4096)
    vm.memory_encrypt_reg_region(flash, IMAGE_PAGES * 4096)
    kvm.write(flash, image)
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=flash, len=len(image))
    if table:
        hva = addr_gpa2hva(vm, HASHES_BASE)
        kvm.write(hva, table)
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=hva, len=len(table))
    if es:
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_VMSA)
    buf = kvm.mmap(4096)
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_MEASURE, uaddr=buf, len=256)
    measure = kvm.read(buf, 48)
    mnonce = bytes(range(16))
    vm.memory_encrypt_op(KVM_SEV_GET_ATTESTATION_REPORT, mnonce=mnonce, uaddr=buf, len=4096)
    report = kvm.read(buf, 0xd0)
    return session.tik, policy, kvm.host.psp.platform_status(), measure, report, mnonce


@pytest.mark.parametrize("es,nvcpus,legacy", [(False, 0, False), (False, 0, True),
                                               (True, 1, False), (True, 2, False)],
                         ids=["sev", "sev-legacy-init", "sev-es-1vcpu", "sev-es-2vcpus"])
@pytest.mark.parametrize("kernel", [False, True], ids=["firmware", "kernel-hashes"])
def test_launch_digest_matches_sev_snp_measure(tmp_path, es, nvcpus, legacy, kernel):
    """LAUNCH_MEASURE is the HMAC 55766 defines over the digest sev-snp-measure computes for the
    same image, hashes table and QEMU vCPUs, and the ATTESTATION report carries that digest."""
    image = ovmf_image(seed=nvcpus)
    (tmp_path / "ovmf.fd").write_bytes(image)
    args = ("", "", "")
    table = None
    if kernel:
        data = np.random.default_rng(7).integers(0, 256, 9000, dtype=np.uint8).tobytes()
        (tmp_path / "bzImage").write_bytes(data[:5000])
        (tmp_path / "initrd").write_bytes(data[5000:])
        args = (str(tmp_path / "bzImage"), str(tmp_path / "initrd"), "console=ttyS0")
        table = hashes_table(data[:5000], data[5000:], b"console=ttyS0\0")
    mode = SevMode.SEV_ES if es else SevMode.SEV
    expected = guest.calc_launch_digest(mode, nvcpus, SIGNATURE, str(tmp_path / "ovmf.fd"),
                                        *args, guest_features=0)
    tik, policy, st, measure, report, mnonce = qemu_launch(es, nvcpus, image, table, legacy)
    # MEASURE = HMAC-SHA256(TIK; 0x04 || API_MAJOR || API_MINOR || BUILD || POLICY || LD || MNONCE)
    message = (bytes([0x04, st.api_major, st.api_minor, st.build]) + struct.pack("<I", policy)
               + expected + measure[32:48])
    assert measure[:32] == hmac.new(tik, message, hashlib.sha256).digest()
    assert report[:16] == mnonce and report[16:48] == expected
    assert struct.unpack_from("<I", report, 48)[0] == policy


def tool_vmsas(ap_eip, sev_features, fpu=True):
    """The tool's QEMU VMSA pages for a BSP and an AP at ``ap_eip``; without ``fpu``, MXCSR and
    the x87 control word are left zero."""
    pages = []
    for eip in (VMSA.BSP_EIP, ap_eip):
        area = VMSA.build_save_area(eip, sev_features, SIGNATURE)
        if not fpu:
            area.mxcsr = area.x87_fcw = 0
        pages.append(bytes(area))
    return pages


@pytest.mark.parametrize("variant", ["ap-at-bsp-eip", "debug-swap", "legacy-es-init"])
def test_other_vcpu_state_is_measured_as_the_tools_vmsas_say(tmp_path, variant):
    """An AP left at the BSP's reset vector, DebugSwap in KVM_SEV_INIT2's vmsa_features, or the
    legacy KVM_SEV_ES_INIT (no FPU state in the VMSA: sev_es_sync_vmsa) moves the digest off the
    tool's ``seves`` result, onto SHA-256 of the image and the tool's VMSAs for that state."""
    image = ovmf_image(seed=3)
    (tmp_path / "ovmf.fd").write_bytes(image)
    seves = guest.calc_launch_digest(SevMode.SEV_ES, 2, SIGNATURE, str(tmp_path / "ovmf.fd"),
                                     "", "", "", guest_features=0)
    launch = dict(legacy=variant == "legacy-es-init",
                  vmsa_features=SVM_SEV_FEAT_DEBUG_SWAP if variant == "debug-swap" else 0,
                  ap_eip=BSP_RESET_EIP if variant == "ap-at-bsp-eip" else AP_RESET_EIP)
    pages = tool_vmsas(launch["ap_eip"], launch["vmsa_features"], fpu=not launch["legacy"])
    expected = hashlib.sha256(image + b"".join(pages)).digest()
    report = qemu_launch(True, 2, image, None, **launch)[4]
    assert report[16:48] == expected != seves
