"""Byte layouts of the firmware's command buffers and data structures, little-endian and packed.

Names and field names are those of ``include/linux/psp-sev.h`` (``struct sev_data_*``), whose
packed offsets equal those of the firmware's ``sev_mcmd_*_t`` (AMD-ASPFW ``sev_mcmd.h``); the
firmware copies ``sizeof`` of its unpacked struct, a few bytes of tail padding longer, which reads
no field and writes back the bytes it read. The one disagreement is SEND_UPDATE_VMSA: the
kernel's ``struct sev_data_send_update_vmsa`` lacks ``reserved1``, moving every later field by
-4 bytes, while the firmware decodes every transport command (LAUNCH_SECRET, SEND_UPDATE_*,
RECEIVE_UPDATE_*) with one layout, ``sev_mcmd_transport_t``. The simulated firmware decodes what
the firmware decodes; the kernel's variant is kept as ``linux_sev_data_send_update_vmsa``.

>>> b = sev_data_launch_measure.pack(handle=1, address=0x1000, len=48)
>>> sev_data_launch_measure.unpack(b)["len"]
48
>>> f = sev_data_launch_measure.view(bytearray(b)); f.len = 0; f.len
0
"""
import struct


class Layout:
    """A packed little-endian struct with named fields."""

    def __init__(self, name, fields):
        self.name = name
        self.fields = tuple(f[:2] for f in fields)
        self._struct = struct.Struct("<" + "".join(f[1] for f in fields))
        self.size = self._struct.size
        self.offsets = {}
        self._fmt = {}
        #: bit-field name -> (the word holding it, its shift, its width): the kernel's
        #: ``u32 page_size:1`` style fields, packed from bit 0 up as GCC lays them out.
        self._bits = {}
        off = 0
        for fname, fmt, *bits in fields:
            self.offsets[fname] = off
            self._fmt[fname] = struct.Struct("<" + fmt)
            shift = 0
            for sub, width in (bits[0] if bits else ()):
                self._bits[sub] = (fname, shift, width)
                self.offsets[sub] = off
                shift += width
            if bits and shift != 8 * self._fmt[fname].size:
                raise ValueError(f"{name}.{fname}: bit fields cover {shift} bits")
            off += struct.calcsize("<" + fmt)

    def __repr__(self):
        return f"<Layout {self.name} ({self.size} bytes)>"

    def pack(self, **values):
        """The struct's bytes; fields not given are zero. A value of the wrong type is TypeError,
        one that does not fit its field ValueError."""
        unknown = set(values) - set(self.offsets)
        if unknown:
            raise TypeError(f"{self.name} has no field(s) {sorted(unknown)}")
        if self._bits:
            values = self._fold_bits(values)
        args = []
        for fname, fmt in self.fields:
            size = struct.calcsize("<" + fmt)
            v = values.get(fname)
            if v is None:
                v = bytes(size) if fmt.endswith("s") else 0
            elif fmt.endswith("s"):
                if not isinstance(v, (bytes, bytearray)):
                    raise TypeError(f"{self.name}.{fname} must be bytes")
                if len(v) != size:
                    raise ValueError(f"{self.name}.{fname} must be {size} bytes")
            elif not isinstance(v, int):
                raise TypeError(f"{self.name}.{fname} must be an int, not {type(v).__name__}")
            elif not 0 <= v < 1 << (8 * size):
                raise ValueError(f"{self.name}.{fname} = {v:#x} does not fit {8 * size} bits")
            args.append(v)
        return self._struct.pack(*args)

    def unpack(self, data):
        out = dict(zip((n for n, _ in self.fields), self._struct.unpack_from(data)))
        for sub, (word, shift, width) in self._bits.items():
            out[sub] = (out[word] >> shift) & ((1 << width) - 1)
        for word in {w for w, _, _ in self._bits.values()}:
            del out[word]
        return out

    def _fold_bits(self, values):
        """``values`` with bit fields folded into their words; a value too wide is ValueError."""
        values = dict(values)
        for sub, (word, shift, width) in self._bits.items():
            v = values.pop(sub, None)
            if v is None:
                continue
            if not isinstance(v, int):
                raise TypeError(f"{self.name}.{sub} must be an int, not {type(v).__name__}")
            if not 0 <= v < 1 << width:
                raise ValueError(f"{self.name}.{sub} = {v:#x} does not fit {width} bits")
            values[word] = (values.get(word) or 0) | (int(v) << shift)
        return values

    def view(self, buf):
        """Attribute access to the fields of ``buf`` (a bytearray), read and written in place."""
        return Fields(self, buf)

    def get(self, buf, name):
        bits = self._bits.get(name)
        if bits is not None:
            word, shift, width = bits
            return (self.get(buf, word) >> shift) & ((1 << width) - 1)
        return self._fmt[name].unpack_from(buf, self.offsets[name])[0]

    def set(self, buf, name, value):
        bits = self._bits.get(name)
        if bits is not None:
            word, shift, width = bits
            mask = ((1 << width) - 1) << shift
            value = (self.get(buf, word) & ~mask) | ((value << shift) & mask)
            name = word
        self._fmt[name].pack_into(buf, self.offsets[name], value)


class Fields:
    """A command buffer seen through its layout: ``f.len`` reads, ``f.len = 48`` writes."""

    __slots__ = ("_layout", "buf")

    def __init__(self, layout, buf):
        object.__setattr__(self, "_layout", layout)
        object.__setattr__(self, "buf", buf)

    def __getattr__(self, name):
        try:
            return self._layout.get(self.buf, name)
        except KeyError:
            raise AttributeError(f"{self._layout.name} has no field {name!r}") from None

    def __setattr__(self, name, value):
        if name not in self._layout.offsets:
            raise AttributeError(f"{self._layout.name} has no field {name!r}")
        self._layout.set(self.buf, name, value)


U8, U16, U32, U64 = "B", "H", "I", "Q"

# -- platform commands ----------------------------------------------------------------------------

sev_data_init = Layout("sev_data_init", [
    ("flags", U32), ("reserved", U32), ("tmr_address", U64), ("tmr_len", U32)])
sev_data_init_ex = Layout("sev_data_init_ex", [
    ("length", U32), ("flags", U32), ("tmr_address", U64), ("tmr_len", U32), ("reserved", U32),
    ("nv_address", U64), ("nv_len", U32)])
#: PLATFORM_STATUS output. The firmware writes owner flags (byte 3), config flags (u16 at 4) and a
#: reserved byte (6); the kernel reads bytes 3..6 as one ``flags`` u32.
sev_user_data_status = Layout("sev_user_data_status", [
    ("api_major", U8), ("api_minor", U8), ("state", U8), ("flags", U32), ("build", U8),
    ("guest_count", U32)])
sev_data_pek_csr = Layout("sev_data_pek_csr", [("address", U64), ("len", U32)])
sev_data_pek_cert_import = Layout("sev_data_pek_cert_import", [
    ("pek_cert_address", U64), ("pek_cert_len", U32), ("reserved", U32),
    ("oca_cert_address", U64), ("oca_cert_len", U32)])
sev_data_pdh_cert_export = Layout("sev_data_pdh_cert_export", [
    ("pdh_cert_address", U64), ("pdh_cert_len", U32), ("reserved", U32),
    ("cert_chain_address", U64), ("cert_chain_len", U32)])
sev_data_download_firmware = Layout("sev_data_download_firmware", [
    ("address", U64), ("len", U32)])
sev_data_get_id = Layout("sev_data_get_id", [("address", U64), ("len", U32)])
#: RING_BUFFER (0x0F) has no kernel struct: AMD-ASPFW ``sev_mcmd_ring_buffer_t`` (0x28 bytes).
sev_data_ring_buffer = Layout("sev_data_ring_buffer", [
    ("low_priority_cmd_ptr", U64), ("low_priority_status_ptr", U64),
    ("high_priority_cmd_ptr", U64), ("high_priority_status_ptr", U64),
    ("low_priority_queue_size", U8), ("high_priority_queue_size", U8),
    ("low_q_threshold", U16), ("high_q_threshold", U16), ("int_on_empty", U16)])

# -- guest management ------------------------------------------------------------------------------

sev_data_decommission = Layout("sev_data_decommission", [("handle", U32)])
sev_data_activate = Layout("sev_data_activate", [("handle", U32), ("asid", U32)])
sev_data_deactivate = Layout("sev_data_deactivate", [("handle", U32)])
sev_data_guest_status = Layout("sev_data_guest_status", [
    ("handle", U32), ("policy", U32), ("asid", U32), ("state", U8)])
#: COPY (0x24) has no kernel struct: AMD-ASPFW ``sev_mcmd_copy_t``.
sev_data_copy = Layout("sev_data_copy", [
    ("handle", U32), ("len", U32), ("src_address", U64), ("dst_address", U64)])

# -- launch ----------------------------------------------------------------------------------------

sev_data_launch_start = Layout("sev_data_launch_start", [
    ("handle", U32), ("policy", U32), ("dh_cert_address", U64), ("dh_cert_len", U32),
    ("reserved", U32), ("session_address", U64), ("session_len", U32)])
_update = [("handle", U32), ("reserved", U32), ("address", U64), ("len", U32)]
sev_data_launch_update_data = Layout("sev_data_launch_update_data", _update)
sev_data_launch_update_vmsa = Layout("sev_data_launch_update_vmsa", _update)
sev_data_launch_measure = Layout("sev_data_launch_measure", _update)
_transport = [
    ("handle", U32), ("reserved1", U32), ("hdr_address", U64), ("hdr_len", U32),
    ("reserved2", U32), ("guest_address", U64), ("guest_len", U32), ("reserved3", U32),
    ("trans_address", U64), ("trans_len", U32)]
sev_data_launch_secret = Layout("sev_data_launch_secret", _transport)
sev_data_launch_finish = Layout("sev_data_launch_finish", [("handle", U32)])
sev_data_attestation_report = Layout("sev_data_attestation_report", [
    ("handle", U32), ("reserved", U32), ("address", U64), ("mnonce", "16s"), ("len", U32)])

# -- migration -------------------------------------------------------------------------------------

sev_data_send_start = Layout("sev_data_send_start", [
    ("handle", U32), ("policy", U32), ("pdh_cert_address", U64), ("pdh_cert_len", U32),
    ("reserved1", U32), ("plat_certs_address", U64), ("plat_certs_len", U32), ("reserved2", U32),
    ("amd_certs_address", U64), ("amd_certs_len", U32), ("reserved3", U32),
    ("session_address", U64), ("session_len", U32)])
sev_data_send_update_data = Layout("sev_data_send_update_data", _transport)
sev_data_send_update_vmsa = Layout("sev_data_send_update_vmsa", _transport)
linux_sev_data_send_update_vmsa = Layout("linux_sev_data_send_update_vmsa", [
    ("handle", U32), ("hdr_address", U64), ("hdr_len", U32), ("reserved2", U32),
    ("guest_address", U64), ("guest_len", U32), ("reserved3", U32), ("trans_address", U64),
    ("trans_len", U32)])
sev_data_send_finish = Layout("sev_data_send_finish", [("handle", U32)])
sev_data_send_cancel = Layout("sev_data_send_cancel", [("handle", U32)])
sev_data_receive_start = Layout("sev_data_receive_start", [
    ("handle", U32), ("policy", U32), ("pdh_cert_address", U64), ("pdh_cert_len", U32),
    ("reserved1", U32), ("session_address", U64), ("session_len", U32)])
sev_data_receive_update_data = Layout("sev_data_receive_update_data", _transport)
sev_data_receive_update_vmsa = Layout("sev_data_receive_update_vmsa", _transport)
sev_data_receive_finish = Layout("sev_data_receive_finish", [("handle", U32)])
sev_data_dbg = Layout("sev_data_dbg", [
    ("handle", U32), ("reserved", U32), ("src_addr", U64), ("dst_addr", U64), ("len", U32)])

# -- data the commands carry -----------------------------------------------------------------------

#: The 128-byte session blob (sev-tool ``sev_session_buf``, [FW] ``sev_session_t``).
sev_session = Layout("sev_session", [
    ("nonce", "16s"), ("wrap_tk", "32s"), ("wrap_iv", "16s"), ("wrap_mac", "32s"),
    ("policy_mac", "32s")])
#: The 52-byte packet header (sev-tool ``sev_hdr_buf``, [FW] ``sev_packet_header_t``).
sev_packet_header = Layout("sev_packet_header", [("flags", U32), ("iv", "16s"), ("mac", "32s")])
#: LAUNCH_MEASURE output ([FW] ``sev_measurement_t``).
sev_measurement = Layout("sev_measurement", [("measurement", "32s"), ("mnonce", "16s")])
#: ATTESTATION output, 0xD0 bytes ([FW] ``sev_mcmd_attestation_report_t``).
sev_attestation_report = Layout("sev_attestation_report", [
    ("mnonce", "16s"), ("launch_digest", "32s"), ("policy", U32), ("sig_usage", U32),
    ("sig_algo", U32), ("reserved", U32), ("sig1", "144s")])
#: Ring-buffer queue entries, 16 bytes each, 256 to a 4 KiB page ([FW] ``sev_ring_buffer.h``).
sev_rb_cmd_ptr_entry = Layout("sev_rb_cmd_ptr_entry", [
    ("cmd_id", U16), ("cmd_flags", U16), ("software_data", U32), ("cmd_buffer_ptr", U64)])
sev_rb_status_entry = Layout("sev_rb_status_entry", [
    ("status", U16), ("reserved", U16), ("reserved2", U32), ("error_stack", U64)])

ALL = [v for v in list(globals().values()) if isinstance(v, Layout)]
