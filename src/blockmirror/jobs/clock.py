"""Time for jobs: an injectable clock so tests (and later fault scripts) can drive time.

Jobs, the rate limiter and progress forecasts read time only through a ``Clock``. The
``MonotonicClock`` uses the event loop; a virtual clock for tests implements the same protocol.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now_ns(self) -> int:
        """Monotonic nanoseconds."""
        ...

    async def sleep_ns(self, ns: int) -> None:
        """Sleep ``ns`` nanoseconds (0: just yield to other tasks)."""
        ...


class MonotonicClock:
    def now_ns(self) -> int:
        return time.monotonic_ns()

    async def sleep_ns(self, ns: int) -> None:
        await asyncio.sleep(max(ns, 0) / 1e9)


def wall_timestamp() -> dict[str, int]:
    """QMP event timestamps are wall-clock time, split in seconds and microseconds."""
    now = time.time_ns() // 1000
    return {"seconds": now // 1_000_000, "microseconds": now % 1_000_000}
