"""A virtual clock for mirror tests: job timing (rate limit, slices, READY) without real waits.

``VirtualClock`` implements ``jobs.clock.Clock``. Sleepers park on futures ordered by deadline;
``advance_until`` lets every runnable task settle, then jumps time to the earliest deadline and
wakes that sleeper, until a condition holds or a virtual deadline passes. Only fit for graphs
whose I/O never leaves the event loop (the memory driver): a thread-pool request would finish in
real time, after the clock has moved on.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable


class VirtualClock:
    #: event-loop passes that count as "everything runnable has run" before time jumps
    SETTLE_PASSES = 64

    def __init__(self, start_ns: int = 1_000_000_000) -> None:
        self.now = start_ns
        self._sleepers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now_ns(self) -> int:
        return self.now

    async def sleep_ns(self, ns: int) -> None:
        if ns <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + ns, next(self._seq), fut))
        await fut  # a cancelled sleeper cancels fut too; advance_until skips it

    async def _settle(self) -> None:
        for _ in range(self.SETTLE_PASSES):
            await asyncio.sleep(0)

    async def advance_until(self, done: Callable[[], bool], limit_ns: int) -> bool:
        """Run virtual time until ``done()`` or ``limit_ns`` later; returns ``done()``."""
        end = self.now + limit_ns
        while True:
            await self._settle()
            if done():
                return True
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)
            if not self._sleepers or self._sleepers[0][0] > end:
                return done()
            deadline, _, fut = heapq.heappop(self._sleepers)
            self.now = max(self.now, deadline)
            fut.set_result(None)


__all__ = ["VirtualClock"]
