"""Why a migration stream was refused: one ``StreamError`` subclass per cause.

A reader raises these before it hands on anything from the bad point onwards; ``offset`` is the
byte offset in the stream where the problem was found and ``record`` the index of the record
being read (None while reading the stream header).
"""


class StreamError(Exception):
    """A migration stream cannot be used; ``offset`` and ``record`` say where."""

    def __init__(self, message, offset=None, record=None):
        where = []
        if record is not None:
            where.append(f"record #{record}")
        if offset is not None:
            where.append(f"byte {offset}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.offset = offset
        self.record = record


class BadMagic(StreamError):
    """The stream does not start with the migration stream's magic: not a sevcore stream."""


class UnsupportedVersion(StreamError):
    """The stream is of a format version this reader does not implement; ``version`` is it."""

    def __init__(self, message, version, offset=None, record=None):
        super().__init__(message, offset, record)
        self.version = version


class UnsupportedFlags(StreamError):
    """The stream header sets feature flags this reader does not know."""


class ChecksumMismatch(StreamError):
    """A CRC-32 does not match: the header, a record's frame head or a record was corrupted, or a
    record was dropped, duplicated or reordered (the checksum runs over the whole stream)."""


class StreamTruncated(StreamError):
    """The stream ended (the peer closed its end) before the END record."""


class BadRecord(StreamError):
    """A record with a valid checksum that is still not acceptable: unknown type, non-zero
    reserved fields, a payload of the wrong size or inconsistent inner lengths."""


class PeerClosed(StreamError):
    """The other end went away: the connection was reset, or it no longer reads what we send."""


class StreamTimeout(StreamError):
    """No progress on the channel within the configured timeout."""


class MigrationError(RuntimeError):
    """A migration did not complete. The source guest runs on, unchanged (after SEND_CANCEL if
    SEND_START had succeeded). ``stats`` holds what was measured up to the failure."""

    def __init__(self, message, stats=None):
        super().__init__(message)
        self.stats = stats


class NotMigrationReady(MigrationError):
    """The guest has not set KVM_MIGRATION_READY in MSR_KVM_MIGRATION_CONTROL."""


class TargetFailed(MigrationError):
    """The target refused the stream or failed while applying it (its message is included).
    ``guest_ran``: whether the target says its guest had run (False: it refused before the
    guest's first run and destroyed its VM, so after a post-copy switch the source may take
    the guest back; None: it did not say)."""
    guest_ran = None


class GuestLost(MigrationError):
    """Post-copy failed after the guest had run on the target: the source's copy is stale and
    the target lacks pages, so neither side can run the guest (never reported as success)."""


class PostcopyPaused(MigrationError):
    """The connection broke during post-copy (QEMU's ``postcopy-paused``): both sides keep
    what they have, nothing is lost; ``resume`` on a new connection continues."""
