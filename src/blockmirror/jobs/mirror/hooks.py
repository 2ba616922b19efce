"""The two hooks a mirror hangs on its source node (cf. mirror_top's write path).

``DirtyHook`` is the node's dirty tracker: it marks the job's bitmap for every write that was not
already copied by active mirroring. ``Interceptor`` wraps every source write: it holds writes at
the drain barrier, forwards writes held across the pivot, and runs write-blocking active copies.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockmirror.block.node import BlockNode
    from blockmirror.jobs.mirror.job import MirrorJob


class DirtyHook:
    """The tracker on the source node: marks the bitmap, except ranges already synced."""

    def __init__(self, job: MirrorJob) -> None:
        self.job = job
        #: (offset, length) writes the active mirror copied itself: consume, don't mark
        self.synced: Counter[tuple[int, int]] = Counter()

    def mark(self, offset: int, length: int) -> None:
        key = (offset, length)
        if self.synced[key] > 0:
            self.synced[key] -= 1
            if not self.synced[key]:
                del self.synced[key]
            return
        self.job.on_source_write(offset, length)


class Interceptor:
    """The source's write interceptor: the drain barrier and active (write-blocking) copies."""

    def __init__(self, job: MirrorJob) -> None:
        self.job = job

    async def around_write(
        self, node: BlockNode, kind: str, offset: int, length: int, proceed: Any
    ) -> None:
        job = self.job
        while job.quiesced:
            await job.unquiesced.wait()
        if job.pivoted_to is not None:
            # held across the pivot by a parent that addressed the source node itself: the
            # source's parents now use the target, so the write must reach it too
            await proceed()
            await job.forward_after_pivot(job.pivoted_to, kind, offset, length)
            return
        job.active_writers += 1
        try:
            if job.should_copy_to_target():
                await job.active_write(kind, offset, length, proceed)
            else:
                await proceed()
        finally:
            job.active_writers -= 1
            job.pulse()



__all__ = ["DirtyHook", "Interceptor"]
