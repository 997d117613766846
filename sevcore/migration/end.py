"""What the source and the target of a migration share: the back channel's messages, the dirty
log read, and the teardown of the helper and the channel."""
import numpy as np

from sevcore.core.bitmap import Bitmap
from sevcore.migration import stream as S
from sevcore.migration.errors import StreamError, TargetFailed
from sevcore.migration.machine import SLOT


def _message(reader, what):
    """The next back-channel message (a SETUP record's JSON), checking its kind."""
    rec = reader.read()
    if not isinstance(rec, S.Setup):
        raise StreamError(f"expected a {what} message from the peer, got "
                          f"{type(rec).__name__ if rec else 'the end of the stream'}")
    kind = rec.params.get("kind")
    if kind == "error":
        raise target_failed(rec.params)
    if kind != what:
        raise StreamError(f"expected a {what} message from the peer, got {kind!r}")
    return rec.params


def target_failed(params):
    """The TargetFailed an ERROR message describes (with whether the target's guest ran)."""
    e = TargetFailed(f"target: {params.get('message', 'unknown error')}")
    ran = params.get("ran")
    e.guest_ran = ran if isinstance(ran, bool) else None
    return e


def _dirty_gfns(vm, npages):
    """KVM_GET_DIRTY_LOG of the guest's slot, as sorted gfns (the log is cleared)."""
    return Bitmap.from_words(vm.get_dirty_log(SLOT), npages).set_indices()


class _End:
    """What the source and the target tear down alike: the migration helper and the channel."""
    helper = None

    def _close_helper(self):
        if self.helper is not None:
            self.helper.close()
            self.helper = None

    def _close(self):
        """Close the helper and the channel (telling the peer we are gone)."""
        self._close_helper()
        try:
            self.channel.close()
        except OSError:
            pass


def _row(data):
    """One record's bytes as a 1-row uint8 array, the shape the batched calls take."""
    return np.frombuffer(data, np.uint8).reshape(1, -1)
