"""When a short blocking call may run on the event-loop thread instead of a worker thread.

Measured on this project's machine class (64 KiB random writes through the NBD export at
queue depth 1): handing a write to a pool thread and waking the loop when it is done costs
100-200 µs of CPU and wall time per request (two cross-thread wake-ups plus two GIL hand-offs),
more than the write itself when it lands in the page cache (5-20 µs) and as much as a durable
one (``RWF_DSYNC``, 100-300 µs). qemu-storage-daemon pays a few microseconds for the same hop
in C; in Python it was the largest single cost of a guest write.

So a small write runs inline, with three limits that keep the loop responsive:

- size: only requests up to ``max_bytes`` (the copy loop's megabyte batches stay in the pool);
- latency: one inline call slower than ``slow_ns`` (a disk under writeback pressure, a slow
  sync) closes the gate for ``cooldown_ns``, and everything goes to the pool until then;
- fairness: after ``burst`` inline calls in a row, the next call goes to the pool, which
  makes its caller yield, so a task issuing many small writes cannot hold the loop.

Pure logic: the caller measures the call and reports it; the time source is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: the largest request run inline (a guest's typical write; the mirror's batches are larger)
INLINE_MAX_BYTES = 128 * 1024
#: an inline call slower than this closes the gate (the loop is then blocked no longer)
INLINE_SLOW_NS = 2_000_000
#: how long a closed gate sends every call to the pool before trying inline again
INLINE_COOLDOWN_NS = 1_000_000_000
#: inline calls in a row before one is sent to the pool (its caller yields to the loop)
INLINE_BURST = 16


class InlineGate:
    """Admits a blocking call to run inline, and learns from how long inline calls take."""

    def __init__(self, *, max_bytes: int = INLINE_MAX_BYTES, slow_ns: int = INLINE_SLOW_NS,
                 cooldown_ns: int = INLINE_COOLDOWN_NS, burst: int = INLINE_BURST,
                 now_ns: Callable[[], int] = time.perf_counter_ns) -> None:
        self.max_bytes = max_bytes
        self.slow_ns = slow_ns
        self.cooldown_ns = cooldown_ns
        self.burst = burst
        self.now_ns = now_ns
        #: False turns inline calls off altogether (every call goes to the pool)
        self.enabled = True
        self._closed_until = 0
        self._streak = 0
        #: counters for tests and diagnostics
        self.inline_calls = 0
        self.pooled_calls = 0
        self.closings = 0

    def admit(self, nbytes: int) -> bool:
        """True: run the call inline and then call ``done``; False: send it to the pool."""
        if (not self.enabled or nbytes > self.max_bytes or self._streak >= self.burst
                or (self._closed_until and self.now_ns() < self._closed_until)):
            self._streak = 0
            self.pooled_calls += 1
            return False
        self._closed_until = 0
        self._streak += 1
        self.inline_calls += 1
        return True

    def start(self) -> int:
        return self.now_ns()

    def done(self, started_ns: int) -> None:
        """Report an admitted call as finished (successfully or not)."""
        now = self.now_ns()
        if now - started_ns > self.slow_ns:
            self._closed_until = now + self.cooldown_ns
            self.closings += 1


__all__ = ["INLINE_BURST", "INLINE_COOLDOWN_NS", "INLINE_MAX_BYTES", "INLINE_SLOW_NS",
           "InlineGate"]
