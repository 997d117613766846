"""Live migration of (encrypted) guests between two Hosts.

``stream``: the framed, versioned, checksummed migration stream (docs/migration-stream.md).
``transport``: byte channels for it, in process and over TCP. ``errors``: why a stream is refused.
"""
from sevcore.migration.errors import (BadMagic, BadRecord, ChecksumMismatch, PeerClosed,
                                      StreamError, StreamTimeout, StreamTruncated,
                                      UnsupportedFlags, UnsupportedVersion)
from sevcore.migration.stream import StreamReader, StreamStats, StreamWriter
from sevcore.migration.transport import TcpListener, inprocess_pair, tcp_connect

__all__ = ["BadMagic", "BadRecord", "ChecksumMismatch", "PeerClosed", "StreamError",
           "StreamReader", "StreamStats", "StreamTimeout", "StreamTruncated", "StreamWriter",
           "TcpListener", "UnsupportedFlags", "UnsupportedVersion", "inprocess_pair",
           "tcp_connect"]
