"""Holding a node's writes for a moment (cf. a drained section: bdrv_drained_begin/end).

``async with hold_writes(node):`` puts an interceptor in front of every other one, so new
writes, zero-writes and discards wait at the node, then waits until every request already
past it has finished. Inside, nothing changes the node's data or metadata through the request
path; when the last holder leaves, the held writes go on in their order. Reads are not held.
Holds nest, as drained sections do: a second holder of the same node shares the first's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from blockmirror.block.node import BlockNode

#: how often the in-flight count is looked at while requests already past the hold finish
_POLL_S = 0.001


class WriteHold:
    """The interceptor of one node's hold (shared by nested holders)."""

    def __init__(self, node: BlockNode) -> None:
        self.node = node
        #: writes waiting here right now (they count as in flight on the node)
        self.held = 0
        self.holders = 0
        self.quiet = asyncio.Event()
        self._open = asyncio.Event()

    async def around_write(self, node: BlockNode, kind: str, offset: int, length: int,
                           proceed: Any) -> None:
        self.held += 1
        try:
            await self._open.wait()
        finally:
            self.held -= 1
        await proceed()

    async def settle(self) -> None:
        # no event fires when the count reaches the held writes (only at zero), so look
        while self.node.in_flight > self.held:  # noqa: ASYNC110
            await asyncio.sleep(_POLL_S)
        self.quiet.set()

    def release(self) -> None:
        if self in self.node.interceptors:
            self.node.interceptors.remove(self)
        self._open.set()


def _hold_of(node: BlockNode) -> WriteHold | None:
    for interceptor in node.interceptors:
        if isinstance(interceptor, WriteHold):
            return interceptor
    return None


@asynccontextmanager
async def hold_writes(node: BlockNode) -> AsyncIterator[WriteHold]:
    hold = _hold_of(node)
    first = hold is None
    if hold is None:
        hold = WriteHold(node)
        node.interceptors.insert(0, hold)
    hold.holders += 1
    try:
        if first:
            await hold.settle()
        else:
            await hold.quiet.wait()
        yield hold
    finally:
        hold.holders -= 1
        if hold.holders == 0:
            hold.release()


__all__ = ["WriteHold", "hold_writes"]
