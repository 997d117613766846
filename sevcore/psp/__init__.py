"""The AMD SEV firmware (PSP) of a simulated host.

``Psp`` is the firmware: ``psp.command(cmd_id, buf_spa)`` is the raw mailbox and the typed
methods (``psp.launch_start(...)``, ``psp.send_update_data(...)``, ...) build the same buffers;
``psp.send_update_data_pages`` and ``psp.receive_update_data_pages`` run many whole-page
migration commands in one pass, with the result of running them one by one.
Every Host has one (``host.psp``), reading and writing guest memory through ``host.umc``.
See docs/psp.md for what is exact and what is assumed.
"""
from sevcore.psp.api import (AttestationReport, CertChain, GuestStatus, LaunchMeasure, Packet,
                             PdhCertExport, PlatformStatus, SendStart)
from sevcore.psp.firmware import Psp
from sevcore.psp.ring import RingBuffer
from sevcore.psp.status import PspError, command_name, status_name

__all__ = ["AttestationReport", "CertChain", "GuestStatus", "LaunchMeasure", "Packet",
           "PdhCertExport", "PlatformStatus", "Psp", "PspError", "RingBuffer", "SendStart",
           "command_name", "status_name"]
