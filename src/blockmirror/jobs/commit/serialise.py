"""Copy-on-read writes and guest writes to the same range, one after the other.

The stream job copies a range from the backing chain into the top node by reading it through
the top and writing it back; a guest write landing in between would be overwritten with the
older data. QEMU serialises such requests in the block layer (copy-on-read requests are
serialising); here the stream job hooks the top node with a ``RangeGuard``: a guest write
waits for copies that overlap it, a copy waits for overlapping guest writes and holds new
ones off until it is done. The job's own writes pass (``own()`` marks the job's task).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from blockmirror.block.node import BlockNode

_OWN: contextvars.ContextVar[object | None] = contextvars.ContextVar("stream_own", default=None)


class RangeGuard:
    """A write interceptor serialising the job's copies with other writes."""

    def __init__(self) -> None:
        self._copies: list[tuple[int, int]] = []
        self._writes: list[tuple[int, int]] = []
        self._changed = asyncio.Event()

    @staticmethod
    def _overlaps(spans: list[tuple[int, int]], start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in spans)

    async def _wait_until_clear(self, spans: list[tuple[int, int]], start: int, end: int
                                ) -> None:
        while self._overlaps(spans, start, end):
            self._changed.clear()
            await self._changed.wait()

    def _release(self, spans: list[tuple[int, int]], span: tuple[int, int]) -> None:
        spans.remove(span)
        self._changed.set()

    def own(self) -> None:
        """Mark the calling task's writes as the job's own (they are not held)."""
        _OWN.set(self)

    @asynccontextmanager
    async def copying(self, offset: int, length: int) -> AsyncIterator[None]:
        span = (offset, offset + length)
        await self._wait_until_clear(self._writes, *span)
        self._copies.append(span)
        try:
            yield
        finally:
            self._release(self._copies, span)

    async def around_write(self, node: BlockNode, kind: str, offset: int, length: int,
                           proceed: Any) -> None:
        if _OWN.get() is self:
            await proceed()
            return
        span = (offset, offset + length)
        await self._wait_until_clear(self._copies, *span)
        self._writes.append(span)
        try:
            await proceed()
        finally:
            self._release(self._writes, span)


__all__ = ["RangeGuard"]
