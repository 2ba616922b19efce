"""QEMU's slice-based rate limiter (cf. include/qemu/ratelimit.h), over an injected clock.

Time is split into slices (100 ms for block jobs); each slice allows ``speed * slice`` bytes.
A caller reports bytes it dispatched and gets back how long to sleep before the next request.
Because a whole request is charged at once, the limiter is bursty: the first slice may go well
over its quota, and the debt is paid by sleeping afterwards. Pure arithmetic; no sleeping here.
"""

from __future__ import annotations

from blockmirror.clock import Clock

#: cf. BLOCK_JOB_SLICE_TIME
SLICE_NS = 100_000_000


class RateLimit:
    def __init__(self, clock: Clock, speed: int = 0, slice_ns: int = SLICE_NS) -> None:
        self._clock = clock
        self.slice_ns = slice_ns
        self.slice_quota = 0.0
        self.slice_start = 0
        self.slice_end = 0
        self.dispatched = 0
        self.speed = 0
        self.set_speed(speed)

    def set_speed(self, speed: int) -> None:
        """Bytes per second; 0 turns limiting off (cf. ratelimit_set_speed)."""
        self.speed = speed
        # at least one byte per slice, so a tiny speed still makes progress
        self.slice_quota = max(speed * self.slice_ns / 1e9, 1.0) if speed else 0.0

    @property
    def enabled(self) -> bool:
        return self.slice_quota > 0

    def calculate_delay(self, n: int) -> int:
        """Charge ``n`` bytes; return the nanoseconds to wait before dispatching more."""
        if not self.enabled:
            return 0
        now = self._clock.now_ns()
        if self.slice_end < now:
            self.slice_start = now
            self.slice_end = now + self.slice_ns
            self.dispatched = 0
        self.dispatched += n
        if self.dispatched < self.slice_quota:
            return 0
        # the debt spans this many whole slices from the start of the current one
        self.slice_end = self.slice_start + int(self.dispatched / self.slice_quota * self.slice_ns)
        return max(self.slice_end - now, 0)


__all__ = ["SLICE_NS", "RateLimit"]
