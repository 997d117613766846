"""A vCPU's x87/SSE/AVX state: the ``struct kvm_xsave`` image, its checks, and its two trips
through an SEV-ES VMSA.

The image is the standard (non-compacted) XSAVE layout (Intel SDM vol. 1 section 13.4, AMD APM
vol. 2 section 11.5): the 512-byte legacy region (FCW at 0, FSW 2, abridged FTW 4, FOP 6, FIP 8,
FDP 16, MXCSR 24, MXCSR_MASK 28, ST0-7 at 32 in 16-byte slots, XMM0-15 at 160), the header at 512
(XSTATE_BV, XCOMP_BV, 48 reserved bytes), and the upper YMM halves at 576 (CPUID 0xD.2). The
simulated CPU offers x87, SSE and AVX (XCR0 bits 0-2).

``sync_vmsa`` is the FPU part of ``sev_es_sync_vmsa`` (arch/x86/kvm/svm/sev.c), which
LAUNCH_UPDATE_VMSA runs for VM types other than KVM_X86_DEFAULT_VM; ``vmsa_state`` reads the state
back out of a VMSA the way VMRUN loads it, and ``xsave`` is what the guest's XSAVE then writes.
"""
import struct

from sevcore import uapi as U
from sevcore.hw import vmsa as V

XSAVE_SIZE = U.KVM_XSAVE_SIZE
#: Byte offsets in the standard XSAVE layout.
XSAVE_MXCSR_OFFSET = 24
XSAVE_ST_OFFSET = 32
XSAVE_XMM_OFFSET = 160
XSAVE_HDR_OFFSET = 512
XSAVE_YMM_OFFSET = 576
XSAVE_YMM_SIZE = 256
_XMM_SIZE = 256

FCW_DEFAULT = 0x037f
MXCSR_DEFAULT = 0x1f80
#: MXCSR_MASK as AMD Zen parts report it in FXSAVE (bit 17, MM, beyond Intel's 0xffff); the kernel
#: copies it into mxcsr_feature_mask and refuses MXCSR bits outside it.
MXCSR_FEATURE_MASK = 0x0002ffff
#: XCR0 bits KVM_GET_SUPPORTED_CPUID offers (leaf 0xD.0 EAX): kvm_caps.supported_xcr0.
SUPPORTED_XCR0 = U.XFEATURE_MASK_FP | U.XFEATURE_MASK_SSE | U.XFEATURE_MASK_YMM

_LEGACY = struct.Struct("<HHHHQQII")      # FCW FSW FTW(+rsvd) FOP FIP FDP MXCSR MXCSR_MASK


def reset_image():
    """The state ``fpstate_init_fxstate`` leaves: FCW 0x37f, MXCSR 0x1f80, all else 0."""
    img = bytearray(XSAVE_SIZE)
    _LEGACY.pack_into(img, 0, FCW_DEFAULT, 0, 0, 0, 0, 0, MXCSR_DEFAULT, MXCSR_FEATURE_MASK)
    return img


def xstate_bv(img):
    return int.from_bytes(img[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 8], "little")


def check_uabi(buf, xcr0):
    """The checks of ``fpu_copy_uabi_to_guest_fpstate`` and ``copy_uabi_to_xstate`` in their
    order: an XSTATE_BV bit outside ``xcr0`` (kvm_caps.supported_xcr0), a nonzero XCOMP_BV
    (compacted format), nonzero reserved header bytes, or an MXCSR bit outside
    MXCSR_FEATURE_MASK when FP, SSE or YMM is present. Returns the reason or None."""
    hdr = XSAVE_HDR_OFFSET
    bv = int.from_bytes(buf[hdr:hdr + 8], "little")
    if bv & ~xcr0:
        return f"XSTATE_BV {bv:#x} has features outside {xcr0:#x}"
    if any(buf[hdr + 8:hdr + 16]):
        return "XCOMP_BV is not 0 (compacted format)"
    if any(buf[hdr + 16:hdr + 64]):
        return "reserved XSAVE header bytes are not 0"
    if bv & SUPPORTED_XCR0:
        mxcsr = int.from_bytes(buf[XSAVE_MXCSR_OFFSET:XSAVE_MXCSR_OFFSET + 4], "little")
        if mxcsr & ~MXCSR_FEATURE_MASK:
            return f"MXCSR {mxcsr:#x} has reserved bits"
    return None


def _copy_components(dst, src, mask):
    """Copy the bytes of the components in ``mask`` from ``src`` to ``dst``: FP's x87 fields and
    ST registers, MXCSR and MXCSR_MASK (with SSE or YMM), the XMM registers, the upper YMM
    halves."""
    spans = []
    if mask & U.XFEATURE_MASK_FP:
        spans += [(0, XSAVE_MXCSR_OFFSET), (XSAVE_ST_OFFSET, XSAVE_XMM_OFFSET)]
    if mask & (U.XFEATURE_MASK_SSE | U.XFEATURE_MASK_YMM):
        spans.append((XSAVE_MXCSR_OFFSET, XSAVE_ST_OFFSET))
    if mask & U.XFEATURE_MASK_SSE:
        spans.append((XSAVE_XMM_OFFSET, XSAVE_XMM_OFFSET + _XMM_SIZE))
    if mask & U.XFEATURE_MASK_YMM:
        spans.append((XSAVE_YMM_OFFSET, XSAVE_YMM_OFFSET + XSAVE_YMM_SIZE))
    for start, end in spans:
        dst[start:end] = src[start:end]


def copy_uabi(buf):
    """The effective state after ``copy_uabi_to_xstate`` of a checked ``buf``: each component
    whose XSTATE_BV bit is set comes from ``buf`` (FP's 160-byte area includes MXCSR; SSE or YMM
    alone bring MXCSR with them), every other one is in its initial configuration."""
    bv = xstate_bv(buf)
    img = reset_image()
    _copy_components(img, buf, bv)
    if bv & U.XFEATURE_MASK_FP:
        img[XSAVE_MXCSR_OFFSET:XSAVE_ST_OFFSET] = buf[XSAVE_MXCSR_OFFSET:XSAVE_ST_OFFSET]
    img[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 8] = bv.to_bytes(8, "little")
    return img


def sync_vmsa(vmsa, img):
    """Copy the image into the VMSA's FPU area as ``sev_es_sync_vmsa`` does: the legacy fields
    one by one (x87_ds and x87_cs 0), each ST register split into its low 8 bytes and its 2-byte
    exponent in separate arrays, XMM as is, and YMM only if its XSTATE_BV bit is set (else 0)."""
    fcw, fsw, ftw, fop, fip, fdp, mxcsr, _ = _LEGACY.unpack_from(img, 0)
    struct.pack_into("<QIHHHHHHQ", vmsa, V.X87_DP, fdp, mxcsr, ftw, fsw, fcw, fop, 0, 0, fip)
    for i in range(8):
        s = XSAVE_ST_OFFSET + 16 * i
        vmsa[V.FPREG_X87 + 8 * i:V.FPREG_X87 + 8 * i + 8] = img[s:s + 8]
        vmsa[V.FPREG_X87 + 64 + 2 * i:V.FPREG_X87 + 66 + 2 * i] = img[s + 8:s + 10]
    vmsa[V.FPREG_XMM:V.FPREG_XMM + _XMM_SIZE] = \
        img[XSAVE_XMM_OFFSET:XSAVE_XMM_OFFSET + _XMM_SIZE]
    ymm = img[XSAVE_YMM_OFFSET:XSAVE_YMM_OFFSET + XSAVE_YMM_SIZE] \
        if xstate_bv(img) & U.XFEATURE_MASK_YMM else bytes(XSAVE_YMM_SIZE)
    vmsa[V.FPREG_YMM:V.FPREG_YMM + XSAVE_YMM_SIZE] = ymm


def vmsa_state(vmsa):
    """``(image, xinuse, xcr0)``: the state VMRUN loads from a decrypted VMSA. A component is in
    use when it differs from its initial configuration (the VMSA carries no XINUSE); MXCSR_MASK
    is the CPU's."""
    vmsa = bytes(vmsa)
    fdp, mxcsr, ftw, fsw, fcw, fop, _, _, fip = struct.unpack_from("<QIHHHHHHQ", vmsa, V.X87_DP)
    img = bytearray(XSAVE_SIZE)
    _LEGACY.pack_into(img, 0, fcw, fsw, ftw, fop, fip, fdp, mxcsr, MXCSR_FEATURE_MASK)
    for i in range(8):
        s = XSAVE_ST_OFFSET + 16 * i
        img[s:s + 8] = vmsa[V.FPREG_X87 + 8 * i:V.FPREG_X87 + 8 * i + 8]
        img[s + 8:s + 10] = vmsa[V.FPREG_X87 + 64 + 2 * i:V.FPREG_X87 + 66 + 2 * i]
    xmm = vmsa[V.FPREG_XMM:V.FPREG_XMM + _XMM_SIZE]
    ymm = vmsa[V.FPREG_YMM:V.FPREG_YMM + XSAVE_YMM_SIZE]
    img[XSAVE_XMM_OFFSET:XSAVE_XMM_OFFSET + _XMM_SIZE] = xmm
    img[XSAVE_YMM_OFFSET:XSAVE_YMM_OFFSET + XSAVE_YMM_SIZE] = ymm
    x87_init = (fcw, fsw, ftw, fop, fip, fdp) == (FCW_DEFAULT, 0, 0, 0, 0, 0) and \
        not any(img[XSAVE_ST_OFFSET:XSAVE_XMM_OFFSET])
    xinuse = (0 if x87_init else U.XFEATURE_MASK_FP) | \
        (U.XFEATURE_MASK_SSE if any(xmm) else 0) | (U.XFEATURE_MASK_YMM if any(ymm) else 0)
    xcr0 = int.from_bytes(vmsa[V.XCR0:V.XCR0 + 8], "little")
    return img, xinuse, xcr0


def xsave_span(rfbm):
    """The bytes XSAVE with ``rfbm`` may touch, from offset 0."""
    return XSAVE_YMM_OFFSET + XSAVE_YMM_SIZE if rfbm & U.XFEATURE_MASK_YMM else XSAVE_YMM_OFFSET


def xsave(mem, img, xinuse, rfbm):
    """Apply XSAVE with requested-feature bitmap ``rfbm`` (EDX:EAX & XCR0) of the state ``img``
    to ``mem`` (the bytes at the destination, at least ``xsave_span(rfbm)`` long), in place: the
    x87 fields and ST registers for FP, MXCSR and MXCSR_MASK for SSE or YMM, XMM for SSE, the
    upper YMM halves for YMM, and XSTATE_BV[i] = XINUSE[i] for each requested i. Nothing else of
    the area is written."""
    _copy_components(mem, img, rfbm)
    old = int.from_bytes(mem[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 8], "little")
    bv = (old & ~rfbm) | (xinuse & rfbm)
    mem[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 8] = bv.to_bytes(8, "little")


def xstate_size(xcr0):
    """CPUID 0xD.0 EBX for ``xcr0``: the size of the XSAVE area its features need."""
    return xsave_span(xcr0)
