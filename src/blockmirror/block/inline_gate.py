"""When a short blocking call may run on the event-loop thread instead of a worker thread.

Measured on this project's machine class (64 KiB random writes through the NBD export at
queue depth 1): handing a write to a pool thread and waking the loop when it is done costs
100-200 µs of CPU and wall time per request (two cross-thread wake-ups plus two GIL hand-offs),
more than the write itself when it lands in the page cache (5-20 µs) and as much as a durable
one (``RWF_DSYNC``, 100-300 µs). qemu-storage-daemon pays a few microseconds for the same hop
in C; in Python it was the largest single cost of a guest write.

So a small write runs inline, with three limits that keep the loop responsive:

- size: only requests up to ``max_bytes`` (the copy loop's megabyte batches stay in the pool);
- latency: when the inline calls become slow (their moving average passes ``slow_ns``: a disk
  under writeback pressure, slow syncs) or one call takes longer than ``stall_ns``, the gate
  closes for ``cooldown_ns`` and everything goes to the pool until then. One slow call among
  fast ones does not close it: on a loaded machine a durable write now and then takes a few
  milliseconds, and closing on each of them sent most writes back to the pool (measured:
  5,489 of 6,528 writes of a writer-only run);
- recovery: while closed, the calls it sends to the pool are timed too (the hop included).
  Once their moving average (after at least ``probe_calls``) is under half of
  ``slow_ns``, whatever made the calls slow has passed and the gate reopens before its
  cooldown ends. Measured: a mirror's bulk copy closes it (its writeback makes a guest's
  syncs take 1-2 ms), and when the copy ended (READY) the gate often had most of a
  cooldown left; a max-rate guest's writes through the pool, four hops each, ran at
  850-1,200 a second for those 250 ms against 1,400-1,500 inline right after. During the
  copy the pooled calls stay slow (they queue behind the copy's batches too), so it
  stays closed then. Whole daemon lives under a max-rate writer, 8 interleaved pairs:
  the writer's rate in the bench's window rose 16% (qcow2 4m) and 10% (qcow2 64k) in
  background mode, 6% and -1% (4m, 1m) in write-blocking mode, READY and CPU unchanged;
- fairness: after ``burst`` inline calls in a row, the next one is admitted with
  ``yield_first`` set: its caller yields to the loop once (``asyncio.sleep(0)``) before
  running it, so a task issuing many small writes cannot hold the loop. (It used to go to
  the pool instead, which yields too but costs a hop: an allocating writethrough write to
  qcow2 makes five small calls, so one in four such writes paid a hop for fairness alone.)

Pure logic: the caller measures the call and reports it; the time source is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: the largest request run inline (a guest's typical write; the mirror's batches are larger)
INLINE_MAX_BYTES = 128 * 1024
#: the moving average of inline calls above which the gate closes
INLINE_SLOW_NS = 1_000_000
#: a single inline call this slow closes the gate at once
INLINE_STALL_NS = 20_000_000
#: how long a closed gate sends every call to the pool before trying inline again
INLINE_COOLDOWN_NS = 250_000_000
#: inline calls in a row before one is sent to the pool (its caller yields to the loop)
INLINE_BURST = 16
#: pooled calls timed, at least, before their average may reopen a closed gate early
INLINE_PROBE_CALLS = 8


class InlineGate:
    """Admits a blocking call to run inline, and learns from how long inline calls take."""

    def __init__(self, *, max_bytes: int = INLINE_MAX_BYTES, slow_ns: int = INLINE_SLOW_NS,
                 stall_ns: int = INLINE_STALL_NS, cooldown_ns: int = INLINE_COOLDOWN_NS,
                 burst: int = INLINE_BURST, probe_calls: int = INLINE_PROBE_CALLS,
                 now_ns: Callable[[], int] = time.perf_counter_ns) -> None:
        self.max_bytes = max_bytes
        self.slow_ns = slow_ns
        self.stall_ns = stall_ns
        self.cooldown_ns = cooldown_ns
        self.burst = burst
        self.probe_calls = probe_calls
        self.now_ns = now_ns
        #: False turns inline calls off altogether (every call goes to the pool)
        self.enabled = True
        self._closed_until = 0
        self._streak = 0
        #: moving average of the inline calls' durations (weight 1/8 for the newest)
        self.average_ns = 0
        #: counters for tests and diagnostics
        self.inline_calls = 0
        self.pooled_calls = 0
        self.closings = 0
        self.yields = 0
        #: set by ``admit``: the caller yields to the loop once before the admitted call
        self.yield_first = False
        #: set by ``admit``: the call goes to the pool only because the gate is closed; its
        #: caller times it and reports it to ``pooled_done``
        self.probing = False
        #: while closed: the pooled calls' moving average, and how many were timed
        self._pooled_average_ns = 0
        self._pooled_seen = 0
        #: closings ended early by fast pooled calls (for tests and diagnostics)
        self.early_reopenings = 0

    def admit(self, nbytes: int) -> bool:
        """True: run the call inline (after a yield if ``yield_first``) and then call
        ``done``; False: send it to the pool."""
        if (not self.enabled or nbytes > self.max_bytes
                or (self._closed_until and self.now_ns() < self._closed_until)):
            self._streak = 0
            self.yield_first = False
            self.probing = self.enabled and nbytes <= self.max_bytes
            self.pooled_calls += 1
            return False
        self.probing = False
        if self._closed_until:
            # reopening: start the average at half the limit, so that calls as slow as
            # before close the gate again after a few, and fast ones keep it open
            self._closed_until = 0
            self.average_ns = self.slow_ns // 2
        self._streak += 1
        self.yield_first = self._streak > self.burst
        if self.yield_first:
            self._streak = 1
            self.yields += 1
        self.inline_calls += 1
        return True

    def would_admit(self, nbytes: int) -> bool:
        """Whether a call of ``nbytes`` would run inline now (``admit`` without its
        bookkeeping: for a caller choosing how to arrange its calls, not making one)."""
        return (self.enabled and nbytes <= self.max_bytes
                and not (self._closed_until and self.now_ns() < self._closed_until))

    def start(self) -> int:
        return self.now_ns()

    def done(self, started_ns: int) -> None:
        """Report an admitted call as finished (successfully or not)."""
        now = self.now_ns()
        took = now - started_ns
        self.average_ns += (took - self.average_ns) // 8
        if took > self.stall_ns or self.average_ns > self.slow_ns:
            self._closed_until = now + self.cooldown_ns
            self._pooled_average_ns = max(self.average_ns, took)
            self._pooled_seen = 0
            self.closings += 1

    def pooled_done(self, started_ns: int) -> None:
        """Report a call ``admit`` sent to the pool with ``probing`` set as finished. Their
        moving average (the hop included) starts where the inline calls' stood when the
        gate closed; under half of ``slow_ns`` after ``probe_calls`` of them, the cooldown
        ends (the next ``admit`` reopens the gate)."""
        if not self._closed_until:
            return
        now = self.now_ns()
        self._pooled_average_ns += (now - started_ns - self._pooled_average_ns) // 8
        self._pooled_seen += 1
        if (self._pooled_seen >= self.probe_calls and now < self._closed_until
                and self._pooled_average_ns < self.slow_ns // 2):
            self._closed_until = now
            self.early_reopenings += 1


__all__ = ["INLINE_BURST", "INLINE_COOLDOWN_NS", "INLINE_MAX_BYTES", "INLINE_PROBE_CALLS",
           "INLINE_SLOW_NS", "INLINE_STALL_NS", "InlineGate"]
