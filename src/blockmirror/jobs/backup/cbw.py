"""The copy-before-write hook: the source node's write interceptor during a backup (cf.
cbw_do_copy_before_write in block/copy-before-write.c).

Before a write, zero-write or discard reaches the source, every cluster of its range that the
backup has not copied yet is copied to the target (clusters another copier holds are waited
for). Only then does the write proceed, so the target holds the source as it was when the job
started. A failed copy fails the guest's write with the copy's error and leaves the clusters
to copy (QEMU's default ``on-cbw-error=break-guest-write``).
"""

from __future__ import annotations

from typing import Any

from blockmirror.block.copy import CopyError
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError
from blockmirror.jobs.backup.copy_state import BlockCopyState


class CopyBeforeWrite:
    """A ``WriteInterceptor`` over one ``BlockCopyState``."""

    def __init__(self, state: BlockCopyState) -> None:
        self.state = state
        #: False once the job is over: writes pass untouched
        self.active = True

    async def around_write(self, node: BlockNode, kind: str, offset: int, length: int,
                           proceed: Any) -> None:
        if self.active and length:
            end = min(offset + length, self.state.length)
            if end > offset:
                claims = await self.state.claim_range(offset, end - offset)
                for i, claim in enumerate(claims):
                    try:
                        await self.state.copy(claim)
                    except CopyError as e:
                        for rest in claims[i + 1:]:
                            self.state.abandon(rest)
                        raise BlockIOError(e.errno, str(e)) from e
        await proceed()


__all__ = ["CopyBeforeWrite"]
