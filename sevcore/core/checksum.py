"""CRC-32 as zlib computes it (``zlib.crc32``, the reference), in C with carry-less multiplies
where the CPU has them (csrc/crc32.c): several times zlib's speed, so that checksumming the
migration stream costs less than copying it. The C call releases the GIL.

>>> from sevcore.core.checksum import crc32
>>> crc32(b"123456789")                 # 0xcbf43926, the check value of CRC-32/ISO-HDLC
3421780262
>>> crc32(b"6789", crc32(b"12345")) == crc32(b"123456789")
True
"""
from sevcore import _bindings as _b


def crc32(data, value=0):
    """The CRC-32 of ``data`` (any contiguous buffer) continued from ``value``, as
    ``zlib.crc32(data, value)``."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"value must be a u32, not {value}")
    return _b.crc32(data, value)


def implementation():
    """The path the calls take with the active CPU features: 'avx512' (VPCLMULQDQ on zmm),
    'avx2' (on ymm), 'clmul' (PCLMULQDQ on xmm: the aesni tier) or 'portable'."""
    impl = _b.crc32_impl()
    return "clmul" if impl == "aesni" else impl
