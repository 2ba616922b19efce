"""The verified switch-over: compare source and target while the guest keeps writing.

After READY a pass walks the disk in runs of chunks. Each run is taken the way the copier
and write-blocking writes take ranges: wait until no op holds any of its chunks, then mark
them in the dirty state's ``in_flight`` bitmap (the copier skips them, write-blocking writers
wait). Guest writes in background mode do not wait for ``in_flight``, so the verifier also
observes them (it is one of the ActiveWriter's observers): ``touched`` records every chunk a
write began on, ``_writing`` counts writes in progress. A chunk is judged only if, across the
reads, it stayed clean, untouched and had no write in progress; otherwise it is left to the
copy loop (a concurrent write can make neither a false mismatch nor hide a real one). A
mismatch is repaired at once, under the same hold: the source's bytes are written to the
target and read back.

Chunks written after they were verified stay ``touched``; the final pass (under the mirror's
drain, before the pivot) verifies exactly those, so the digest describes the target as it is
at the pivot. The digest is XXH3-128 over the XXH3-64 digests of the chunks in order
(``image_digest`` computes the same for any image).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import xxhash

from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError
from blockmirror.jobs.mirror.dirty import DirtyState
from blockmirror.jobs.mirror.inflight import InFlight
from blockmirror.jobs.progress import Progress

#: chunks read per step (one pair of reads): 1 MiB at the default 64 KiB granularity
RUN_CHUNKS = 16


def chunk_digest(data: bytes) -> bytes:
    return xxhash.xxh3_64_digest(data)


def combine(digests: list[bytes]) -> str:
    h = xxhash.xxh3_128()
    for d in digests:
        h.update(d)
    return h.hexdigest()


def image_digest(data: bytes, granularity: int) -> str:
    """The digest a verification reports for an image with these contents."""
    return combine([chunk_digest(data[o:o + granularity])
                    for o in range(0, len(data), granularity)])


class Verifier:
    """One mirror's verification: the write observer, the pass and the final pass."""

    def __init__(self, source: BlockNode, target: BlockNode, dirty: DirtyState,
                 inflight: InFlight, progress: Progress,
                 is_cancelled: Callable[[], bool],
                 pause_point: Callable[[], Awaitable[None]] | None = None) -> None:
        self.source = source
        self.target = target
        self.dirty = dirty
        self.inflight = inflight
        self.progress = progress
        self._is_cancelled = is_cancelled
        #: waits while the job is paused (a paused job does no I/O of its own)
        self._pause_point = pause_point
        gran = dirty.granularity
        self.touched = DirtyBitmap(dirty.size, gran)
        self._writing: Counter[int] = Counter()
        nchunks = (dirty.size + gran - 1) // gran
        self._digests: list[bytes | None] = [None] * nchunks
        self.mismatches = 0
        self.repaired = 0
        self.unrepaired = 0
        self.deferred = 0
        self.passes_done = 0
        self.digest: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.error: str | None = None
        #: test hooks: awaited before the first pass, and after a run's reads (before judging)
        self.before_pass: Callable[[], Awaitable[None]] | None = None
        self.after_read: Callable[[int, int], Awaitable[None]] | None = None

    # --- WriteObserver ------------------------------------------------------------------------

    def _chunks(self, offset: int, length: int) -> range:
        gran = self.dirty.granularity
        end = min(offset + max(length, 1), self.dirty.size)
        return range(offset // gran, (max(end, offset + 1) - 1) // gran + 1)

    async def write_begins(self, kind: str, offset: int, length: int) -> None:
        self.touched.set_dirty(offset, length)
        for c in self._chunks(offset, length):
            self._writing[c] += 1

    def write_ends(self, kind: str, offset: int, length: int) -> None:
        for c in self._chunks(offset, length):
            self._writing[c] -= 1
            if self._writing[c] <= 0:
                del self._writing[c]

    # --- passes -----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.ensure_future(self._first_pass())

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def _first_pass(self) -> None:
        try:
            if self.before_pass is not None:
                await self.before_pass()
            size, gran = self.dirty.size, self.dirty.granularity
            step = gran * RUN_CHUNKS
            for pos in range(0, size, step):
                if self._pause_point is not None:
                    await self._pause_point()
                if self._is_cancelled():
                    return
                await self._verify_run(pos, min(step, size - pos))
            self.passes_done += 1
        except BlockIOError as e:
            self.error = f"verification failed: {e}"

    async def final_pass(self) -> None:
        """Under the drain: verify every chunk written since it was last verified."""
        pending = list(self.touched.runs())
        for o, n in pending:
            gran = self.dirty.granularity
            step = gran * RUN_CHUNKS
            for pos in range(o, o + n, step):
                await self._verify_run(pos, min(step, o + n - pos))
        if not self.touched.dirty_count() and all(d is not None for d in self._digests):
            self.digest = combine([d for d in self._digests if d is not None])

    async def _verify_run(self, offset: int, length: int) -> None:
        dirty, gran = self.dirty, self.dirty.granularity
        await self.inflight.wait_no_conflict(dirty, offset, length)
        dirty.in_flight.set_dirty(offset, length)
        try:
            first = offset // gran
            chunks = range(first, first + (length + gran - 1) // gran)
            judge = [c for c in chunks
                     if not dirty.is_dirty(c * gran) and not self._writing.get(c)]
            for c in judge:
                self.touched.clear(c * gran, min(gran, dirty.size - c * gran))
            if not judge:
                return
            src, tgt = await asyncio.gather(self.source.read(offset, length),
                                            self.target.read(offset, length))
            if self.after_read is not None:
                await self.after_read(offset, length)
            for c in judge:
                o = c * gran
                n = min(gran, dirty.size - o)
                if (dirty.is_dirty(o) or self._writing.get(c)
                        or self.touched.count_range(o, n)):
                    # written meanwhile: the copy loop (and the final pass) deal with it
                    self.touched.set_dirty(o, n)
                    self.deferred += 1
                    continue
                a = src[o - offset:o - offset + n]
                b = tgt[o - offset:o - offset + n]
                if a != b:
                    b = await self._repair(o, a)
                self._digests[c] = chunk_digest(b)
                self.progress.count("verified", n)
        finally:
            dirty.in_flight.clear(offset, length)
            self.inflight.pulse()

    async def _repair(self, offset: int, data: bytes) -> bytes:
        """Copy the source's bytes over a mismatching chunk and read them back."""
        self.mismatches += 1
        try:
            await self.target.write(offset, data)
            await self.target.flush()
            back = await self.target.read(offset, len(data))
        except BlockIOError:
            self.unrepaired += 1
            return b""
        if back != data:
            self.unrepaired += 1
        else:
            self.repaired += 1
        return back


__all__ = ["Verifier", "chunk_digest", "combine", "image_digest"]
