"""The mirror's drain barrier on source writes (cf. bdrv_drained_begin on mirror_top).

While closed, new writes wait in the interceptor and the filter holds its own requests; at
the pivot ``redirect`` names the node that writes held across it must reach too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from blockmirror.block.node import BlockNode


class DrainGate:
    def __init__(self, on_change: Callable[[bool], None]) -> None:
        #: told True when the gate closes and False when it opens (the filter's own hold)
        self._on_change = on_change
        self.closed = False
        self._open = asyncio.Event()
        self._open.set()
        #: set at the pivot: where writes held at the gate must also go
        self.redirect: BlockNode | None = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._open.clear()
            self._on_change(True)

    def open(self) -> None:
        if self.closed:
            self.closed = False
            self._open.set()
            self._on_change(False)

    async def wait_open(self) -> None:
        while self.closed:
            await self._open.wait()


__all__ = ["DrainGate"]
