"""blockmirror.clock.VirtualClock: time moves only when told, timers fire in deadline order."""

from __future__ import annotations

import asyncio
import threading

import pytest

from blockmirror.clock import MonotonicClock, VirtualClock, make_clock


def test_timers_fire_in_deadline_order_each_at_its_own_instant() -> None:
    async def main() -> None:
        clock = VirtualClock(start_ns=0)
        seen: list[tuple[str, int]] = []

        async def sleeper(name: str, ns: int) -> None:
            await clock.sleep_ns(ns)
            seen.append((name, clock.now_ns()))
            if name == "b":  # a timer set off by a timer, still inside the window
                await clock.sleep_ns(5)
                seen.append(("b2", clock.now_ns()))

        tasks = [asyncio.ensure_future(sleeper(n, ns)) for n, ns in
                 (("c", 30), ("a", 10), ("b", 20), ("late", 100))]
        await clock.settle()
        assert clock.pending() == [10, 20, 30, 100]
        assert seen == []  # nothing moves by itself
        fired = await clock.advance(50)
        assert seen == [("a", 10), ("b", 20), ("b2", 25), ("c", 30)]
        assert fired == 4
        assert clock.now_ns() == 50
        assert clock.next_deadline() == 100
        assert await clock.run_to_next_timer() is True
        assert seen[-1] == ("late", 100) and clock.now_ns() == 100
        assert await clock.run_to_next_timer() is False
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_cancelled_sleepers_are_dropped_and_equal_deadlines_keep_arrival_order() -> None:
    async def main() -> None:
        clock = VirtualClock(start_ns=0)
        seen: list[str] = []

        async def sleeper(name: str) -> None:
            await clock.sleep_ns(7)
            seen.append(name)

        t1 = asyncio.ensure_future(sleeper("first"))
        gone = asyncio.ensure_future(sleeper("cancelled"))
        t2 = asyncio.ensure_future(sleeper("second"))
        await clock.settle()
        gone.cancel()
        await clock.settle()
        assert clock.pending() == [7, 7]
        assert await clock.advance(7) == 2
        assert seen == ["first", "second"]
        await asyncio.gather(t1, t2)
        with pytest.raises(ValueError):
            await clock.advance(-1)

    asyncio.run(main())


def test_settle_waits_for_thread_pool_requests() -> None:
    # a file request finishes in real time; time must not move before it landed
    async def main() -> None:
        clock = VirtualClock(start_ns=0)
        gate = threading.Event()
        order: list[str] = []

        async def io_then_sleep() -> None:
            await clock.sleep_ns(0)  # the clock now watches this loop's pool hand-offs
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, 5)
            order.append("io done")
            await clock.sleep_ns(10)
            order.append("timer")

        threading.Timer(0.05, gate.set).start()
        task = asyncio.ensure_future(io_then_sleep())
        await clock.settle()
        assert order == ["io done"] and clock.pending() == [10]
        await clock.advance(10)
        assert order == ["io done", "timer"]
        await task

    asyncio.run(main())


def test_advance_until_stops_at_the_condition() -> None:
    async def main() -> None:
        clock = VirtualClock(start_ns=0)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await clock.sleep_ns(100)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        assert await clock.advance_until(lambda: ticks == 5, 10_000) is True
        assert clock.now_ns() == 500
        assert await clock.advance_until(lambda: ticks == 1000, 1_000) is False
        assert clock.now_ns() == 1500
        task.cancel()

    asyncio.run(main())


def test_make_clock() -> None:
    assert isinstance(make_clock("virtual"), VirtualClock)
    assert isinstance(make_clock("monotonic"), MonotonicClock)
    with pytest.raises(ValueError):
        make_clock("sundial")
