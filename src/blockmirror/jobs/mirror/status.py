"""The source chain's view of a range, as the mirror asks for it (cf. mirror_iteration's
bdrv_block_status_above and mirror_dirty_init's bdrv_is_allocated_above).

``ChainStatus`` answers for the whole backing chain above ``base`` (sync=full: the whole
chain). One answer usually covers many ops (a SEEK_DATA/SEEK_HOLE run, a qcow2 extent), so the
last extent is kept until the source is written again: ``write_gen`` is read before asking,
and a write that lands (or completes) after that bumps it, so a stale answer is never used
for a range a concurrent write may have changed. ``answers_from_map`` turns one batched
data/hole walk of a linear source (``block/copy.map_data``) into the same kind of answers.
"""

from __future__ import annotations

from blockmirror.block.chain import block_status_above, is_allocated_above
from blockmirror.block.driver import BlockStatus
from blockmirror.block.node import BlockNode
from blockmirror.jobs.mirror.params import ALLOC_BITS


class ChainStatus:
    """Block status of ``source``'s chain, with a one-extent cache."""

    def __init__(self, source: BlockNode, length: int, window: int) -> None:
        self.source = source
        self.length = length
        #: how far one question reaches (qcow2's cost grows with the range asked)
        self.window = window
        self._cache: tuple[int, int, BlockStatus, int] | None = None

    async def status_above(self, offset: int, length: int) -> tuple[int, BlockStatus]:
        cached = self._cache
        gen = self.source.write_gen
        if cached is not None and cached[3] == gen and cached[0] <= offset < cached[1]:
            return min(length, cached[1] - offset), cached[2]
        want = max(length, min(self.length - offset, self.window))
        n, status = await self._uncached(offset, want)
        self._cache = (offset, offset + n, status, gen)
        return min(length, n), status

    async def _uncached(self, offset: int, length: int) -> tuple[int, BlockStatus]:
        ext = await block_status_above(self.source, None, offset, length)
        if not ext.status & ALLOC_BITS:
            # allocated nowhere in the whole chain: nothing below, so it reads as zeroes
            return ext.length, ext.status | BlockStatus.ZERO
        return ext.length, ext.status

    async def is_allocated_above(
        self, offset: int, length: int, top_only: bool
    ) -> tuple[bool, int]:
        """Allocated in the top layer (``top_only``) or anywhere in the chain."""
        base = self.source if top_only else None
        return await is_allocated_above(self.source, base, top_only, offset, length)


_DATA = BlockStatus.DATA | BlockStatus.ALLOCATED
_ZERO = BlockStatus.ZERO | BlockStatus.ALLOCATED


class MappedStatus:
    """Answers for ranges whose data/hole runs were read in one batch (a linear source)."""

    def __init__(self, ranges: list[tuple[int, int]], runs: list[list[tuple[bool, int]]]) -> None:
        self._spans: list[tuple[int, int, BlockStatus]] = []
        for (offset, _length), rlist in zip(ranges, runs, strict=True):
            pos = offset
            for is_data, n in rlist:
                self._spans.append((pos, pos + n, _DATA if is_data else _ZERO))
                pos += n
        self._i = 0

    def answer(self, offset: int, length: int) -> tuple[int, BlockStatus]:
        """Asked in increasing offsets, as the copier walks its runs."""
        spans = self._spans
        while self._i < len(spans) and spans[self._i][1] <= offset:
            self._i += 1
        if self._i >= len(spans) or spans[self._i][0] > offset:
            # not covered (cannot happen for the ranges asked): copy it as data
            return length, _DATA
        _start, end, status = spans[self._i]
        return min(length, end - offset), status

    def answer_data(self, offset: int, length: int) -> tuple[int, bool]:
        """``answer`` as ``(length, holds data)``: the copier's loop asks this once per
        piece, and flag arithmetic on an enum costs more than the rest of the step."""
        spans = self._spans
        i = self._i
        count = len(spans)
        while i < count and spans[i][1] <= offset:
            i += 1
        self._i = i
        if i >= count or spans[i][0] > offset:
            return length, True  # not covered (cannot happen for the ranges asked): data
        _start, end, status = spans[i]
        return min(length, end - offset), status is _DATA


__all__ = ["ChainStatus", "MappedStatus"]
