"""Holding a node's writes for a moment (cf. a drained section: bdrv_drained_begin/end).

``async with WriteHold(node):`` puts an interceptor in front of every other one, so new
writes, zero-writes and discards wait at the node, then waits until every request already
past it has finished. Inside, nothing changes the node's data or metadata through the request
path; on leaving, the held writes go on in their order. Reads are not held.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from blockmirror.block.node import BlockNode

#: how often the in-flight count is looked at while requests already past the hold finish
_POLL_S = 0.001


class WriteHold:
    def __init__(self, node: BlockNode) -> None:
        self.node = node
        #: writes waiting here right now (they count as in flight on the node)
        self.held = 0
        self._open = asyncio.Event()

    async def around_write(self, node: BlockNode, kind: str, offset: int, length: int,
                           proceed: Any) -> None:
        self.held += 1
        try:
            await self._open.wait()
        finally:
            self.held -= 1
        await proceed()

    async def __aenter__(self) -> WriteHold:
        self.node.interceptors.insert(0, self)
        try:
            # no event fires when the count reaches the held writes (only at zero), so look
            while self.node.in_flight > self.held:  # noqa: ASYNC110
                await asyncio.sleep(_POLL_S)
        except BaseException:
            self._release()
            raise
        return self

    def _release(self) -> None:
        if self in self.node.interceptors:
            self.node.interceptors.remove(self)
        self._open.set()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._release()


__all__ = ["WriteHold"]
