"""The slice rate limiter (cf. include/qemu/ratelimit.h) over a hand-driven clock."""

from __future__ import annotations

from blockmirror.jobs.ratelimit import SLICE_NS, RateLimit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def now_ns(self) -> int:
        return self.now

    async def sleep_ns(self, ns: int) -> None:
        self.now += max(ns, 0)


def test_disabled_never_delays() -> None:
    rl = RateLimit(FakeClock(), 0)
    assert not rl.enabled
    assert rl.calculate_delay(1 << 40) == 0


def test_quota_per_slice_and_burst_debt() -> None:
    clock = FakeClock()
    rl = RateLimit(clock, 1_000_000)  # 100 kB per 100 ms slice
    assert rl.slice_quota == 100_000
    assert rl.calculate_delay(50_000) == 0
    # going over the quota: wait until the slices the debt covers have passed
    assert rl.calculate_delay(250_000) == 3 * SLICE_NS
    clock.now += SLICE_NS
    assert rl.calculate_delay(0) == 2 * SLICE_NS
    clock.now += 3 * SLICE_NS
    assert rl.calculate_delay(0) == 0  # a new slice started


def test_tiny_speed_still_one_byte_per_slice() -> None:
    rl = RateLimit(FakeClock(), 1)
    assert rl.slice_quota == 1
    assert rl.calculate_delay(65536) == 65536 * SLICE_NS


def test_set_speed_changes_quota() -> None:
    rl = RateLimit(FakeClock(), 10)
    rl.set_speed(20_000_000)
    assert rl.slice_quota == 2_000_000
    rl.set_speed(0)
    assert rl.calculate_delay(10) == 0
