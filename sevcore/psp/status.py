"""Firmware status codes and the exception a failed command raises in the typed layer."""
import errno
import os

from sevcore import uapi

#: status value -> its kernel name (SEV_RET_INAVLID_CONFIG keeps the kernel's spelling).
STATUS_NAMES = {}
for _name in dir(uapi):
    if _name.startswith("SEV_RET_") and _name != "SEV_RET_INVALID_CONFIG":
        STATUS_NAMES[getattr(uapi, _name)] = _name

#: command id -> its name (SEV_CMD_*).
COMMAND_NAMES = {getattr(uapi, n): n for n in dir(uapi) if n.startswith("SEV_CMD_")}


def status_name(status):
    return STATUS_NAMES.get(status, f"SEV_RET_{status:#x}")


def command_name(cmd):
    return COMMAND_NAMES.get(cmd, f"SEV_CMD_{cmd:#x}")


class PspError(OSError):
    """A firmware command failed: ``fw_error`` is the firmware's SEV_RET_* status (the name
    KVM's ``kvm_sev_cmd.error`` goes by in QEMU, and in :class:`sevcore.kvm.sev.SevError`),
    ``fw_error_name`` its name, ``command`` the SEV_CMD_* name. The errno is EIO, which is what
    the kernel's PSP driver returns for any non-zero firmware status
    (drivers/crypto/ccp/sev-dev.c). ``index`` is None, or for a batch
    (``send_update_data_pages`` ...) the position of the command that failed."""

    def __init__(self, command, fw_error, index=None):
        self.command = command_name(command) if isinstance(command, int) else command
        self.fw_error = fw_error
        self.fw_error_name = status_name(fw_error)
        self.index = index
        where = "" if index is None else f" at page {index} of the batch"
        super().__init__(errno.EIO, f"{os.strerror(errno.EIO)}: firmware status {fw_error:#x} "
                                    f"({self.fw_error_name}){where}", self.command)

    @property
    def status(self):
        """The former name of :attr:`fw_error`, read-only, kept for this release."""
        return self.fw_error

    @property
    def status_name(self):
        """The former name of :attr:`fw_error_name`, read-only, kept for this release."""
        return self.fw_error_name
