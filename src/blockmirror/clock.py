"""Time, injected: every part that waits or measures (rate limits, job sleeps, fault delays)
reads it through a ``Clock``, so a test can replace real time with a ``VirtualClock``.

``MonotonicClock`` is real time on the event loop. ``VirtualClock`` moves only when told:
``advance(ns)`` fires the timers that fall due in deadline order, each at its own instant;
``run_to_next_timer()`` jumps to the earliest one. Between firings the clock lets the woken
tasks run until the loop has nothing runnable left and no thread-pool request is outstanding
(``settle()``), so what a timer sets off happens at that virtual instant, deterministically.
Peers outside the process (sockets) are not waited for: virtual time suits graphs whose I/O
stays in the process (null, memory, local files). QMP drives it with the ``x-clock-*`` commands
(qmp/commands/testing.py); the daemon picks it with ``--clock virtual``.

This is the lowest layer (beside errors and events): it imports nothing from blockmirror.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Protocol


class Clock(Protocol):
    def now_ns(self) -> int:
        """Monotonic nanoseconds."""
        ...

    async def sleep_ns(self, ns: int) -> None:
        """Sleep ``ns`` nanoseconds (0: just yield to other tasks)."""
        ...


class MonotonicClock:
    virtual = False

    def now_ns(self) -> int:
        return time.monotonic_ns()

    async def sleep_ns(self, ns: int) -> None:
        await asyncio.sleep(max(ns, 0) / 1e9)


def wall_timestamp() -> dict[str, int]:
    """QMP event timestamps are wall-clock time, split in seconds and microseconds (always
    real time, also under a virtual clock: clients compare them with their own clock)."""
    now = time.time_ns() // 1000
    return {"seconds": now // 1_000_000, "microseconds": now % 1_000_000}


class _Timer:
    """One sleeper: due at ``deadline``; ``seq`` keeps equal deadlines in arrival order."""

    __slots__ = ("deadline", "future", "seq")

    def __init__(self, deadline: int, seq: int, future: asyncio.Future[None]) -> None:
        self.deadline, self.seq, self.future = deadline, seq, future

    def __lt__(self, other: _Timer) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


#: virtual time stops at the largest int64 (QMP's ``int``, QEMU's int64_t nanoseconds): a
#: fuzzed ``x-clock-advance ns=2^63-1`` or delay past it saturates instead of leaving the type
MAX_NS = (1 << 63) - 1


class VirtualClock:
    """A clock that moves only when told (see the module docstring)."""

    virtual = True
    #: consecutive idle loop passes that count as "nothing runnable is left"
    IDLE_PASSES = 3
    #: a bound on one settle, in loop passes: a task that never stops yielding (a busy loop of
    #: ``sleep_ns(0)``) must not hang the caller
    MAX_PASSES = 100_000

    def __init__(self, start_ns: int = 1_000_000_000) -> None:
        self.now = start_ns
        self._timers: list[_Timer] = []
        self._seq = itertools.count()
        #: thread-pool requests in flight on the loop this clock watches (see _watch_executor)
        self._pool_futures: set[asyncio.Future[Any]] = set()
        self._watched: asyncio.AbstractEventLoop | None = None
        #: timers fired so far (for x-query-clock and tests)
        self.fired = 0
        #: set by release(): time then jumps to every deadline at once
        self.released = False
        # watch the pool from the start when created on a running loop (a daemon's clock
        # is): requests started before the first sleep or settle count too
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            self._watch_executor()

    # --- the Clock protocol ---------------------------------------------------------------

    def now_ns(self) -> int:
        return self.now

    async def sleep_ns(self, ns: int) -> None:
        self._watch_executor()
        if ns <= 0:
            await asyncio.sleep(0)
            return
        if self.released:
            self.now = min(self.now + ns, MAX_NS)
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, _Timer(min(self.now + ns, MAX_NS), next(self._seq), fut))
        await fut  # a cancelled sleeper cancels fut; the heap drops it lazily

    # --- inspection ---------------------------------------------------------------------

    def _prune(self) -> None:
        while self._timers and self._timers[0].future.done():
            heapq.heappop(self._timers)

    def next_deadline(self) -> int | None:
        self._prune()
        return self._timers[0].deadline if self._timers else None

    def pending(self) -> list[int]:
        """Deadlines of the live timers, earliest first."""
        return sorted(t.deadline for t in self._timers if not t.future.done())

    # --- moving time ----------------------------------------------------------------------

    def _watch_executor(self) -> None:
        """Count thread-pool requests of the running loop, so that ``settle`` can wait for
        them: a file read finishes in real time and must land before time moves on. Wraps
        ``loop.run_in_executor`` of that loop only (the public entry every pool user takes)."""
        loop = asyncio.get_running_loop()
        if self._watched is loop:
            return
        self._watched = loop
        original = loop.run_in_executor
        pool = self._pool_futures

        def run_in_executor(executor: Executor | None, func: Callable[..., Any],
                            *args: Any) -> asyncio.Future[Any]:
            fut = original(executor, func, *args)
            pool.add(fut)
            fut.add_done_callback(pool.discard)
            return fut

        loop.run_in_executor = run_in_executor  # type: ignore[method-assign,assignment]

    async def settle(self) -> None:
        """Let every runnable task run, and every thread-pool request finish, until the loop
        is idle for a few passes in a row. Time does not move meanwhile."""
        self._watch_executor()
        loop = asyncio.get_running_loop()
        idle = 0
        for _ in range(self.MAX_PASSES):
            await asyncio.sleep(0)
            if self._pool_futures:
                idle = 0
                await asyncio.wait(set(self._pool_futures))
                continue
            # callbacks queued behind ours: someone is still runnable (CPython's ready queue)
            ready = getattr(loop, "_ready", None)
            if ready:
                idle = 0
                continue
            idle += 1
            if idle >= self.IDLE_PASSES:
                return

    def _fire_due(self, until: int) -> bool:
        """Wake the earliest live timer due at or before ``until`` (and every other one due at
        the very same instant); False when none is due."""
        self._prune()
        if not self._timers or self._timers[0].deadline > until:
            return False
        deadline = self._timers[0].deadline
        self.now = max(self.now, deadline)
        while self._timers and self._timers[0].deadline == deadline:
            timer = heapq.heappop(self._timers)
            if not timer.future.done():
                timer.future.set_result(None)
                self.fired += 1
        return True

    async def advance(self, ns: int) -> int:
        """Move time ``ns`` forward, firing due timers in deadline order; returns how many
        fired. What a timer sets off (a new timer inside the window included) runs at its
        deadline before time moves further."""
        if ns < 0:
            raise ValueError("time cannot go backwards")
        end = min(self.now + ns, MAX_NS)
        before = self.fired
        await self.settle()
        while self._fire_due(end):
            await self.settle()
        self.now = end
        return self.fired - before

    async def run_to_next_timer(self) -> bool:
        """Jump to the earliest timer's deadline and fire it; False if there is none."""
        await self.settle()
        deadline = self.next_deadline()
        if deadline is None:
            return False
        self._fire_due(deadline)
        await self.settle()
        return True

    def release(self) -> None:
        """Let go of time for good (the daemon shutting down): every pending timer fires now,
        in deadline order, and later sleeps return at once, so that nothing waits for a
        clock command that will never come."""
        self.released = True
        self._prune()
        if self._timers:
            last = max(t.deadline for t in self._timers)
            while self._fire_due(last):
                pass

    async def advance_until(self, done: Callable[[], bool], limit_ns: int) -> bool:
        """Run virtual time, timer by timer, until ``done()`` or ``limit_ns`` later; returns
        ``done()``. Time stops at the last timer fired (not at the limit)."""
        end = min(self.now + limit_ns, MAX_NS)
        while True:
            await self.settle()
            if done():
                return True
            if not self._fire_due(end):
                return done()


def make_clock(kind: str) -> MonotonicClock | VirtualClock:
    """The clock named by ``--clock`` ("monotonic" or "virtual")."""
    if kind == "virtual":
        return VirtualClock()
    if kind in ("monotonic", "host", "realtime"):
        return MonotonicClock()
    raise ValueError(f"Invalid clock '{kind}' (expected 'monotonic' or 'virtual')")


__all__ = ["Clock", "MonotonicClock", "VirtualClock", "make_clock", "wall_timestamp"]
