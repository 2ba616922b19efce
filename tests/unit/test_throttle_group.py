"""The throttle-group leaky buckets and the throttle filter, on a virtual clock.

Expected times follow QEMU's formulas (util/throttle.c): without a burst rate a bucket holds
avg/10 units before requests wait, and a waiting request starts when the level has leaked
down to that size; with ``max`` and ``burst-length`` the bucket holds max*burst_length and
the burst bucket max/10.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.block.options import open_blockdev
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockMirrorError
from blockmirror.objects.factory import create_object
from blockmirror.objects.throttle import ThrottleConfig, ThrottleGroup
from mirror_scripts.vclock import VirtualClock
from nbd_helpers import ram_node

KiB = 1024
MiB = 1 << 20
NS = 1_000_000_000


def group(clock: VirtualClock, **limits: int) -> ThrottleGroup:
    return ThrottleGroup("tg", clock, limits=limits)


async def run_requests(clock: VirtualClock, tg: ThrottleGroup,
                       reqs: list[tuple[bool, int]]) -> list[int]:
    """Start every request at once; return the virtual time (ns from start) each got through."""
    start = clock.now_ns()
    done: list[int] = [-1] * len(reqs)

    async def one(i: int, is_write: bool, size: int) -> None:
        await tg.intercept(is_write, size)
        done[i] = clock.now_ns() - start

    tasks = [asyncio.create_task(one(i, w, n)) for i, (w, n) in enumerate(reqs)]
    assert await clock.advance_until(lambda: all(t.done() for t in tasks), 3600 * NS)
    return done


def test_bps_without_burst_rate() -> None:
    async def main() -> None:
        clock = VirtualClock()
        tg = group(clock, **{"bps-total": MiB})
        times = await run_requests(clock, tg, [(True, 64 * KiB)] * 20)
        # the bucket holds 102.4 KiB: the first two requests pass at once
        assert times[:2] == [0, 0]
        # request i waits until i*64K - 102.4K bytes have leaked at 1 MiB/s
        for i in range(2, 20):
            want = (i * 64 * KiB - MiB / 10) / MiB * NS
            assert abs(times[i] - want) <= 2, (i, times[i], want)

    asyncio.run(main())


def test_iops_limit_and_directions() -> None:
    async def main() -> None:
        clock = VirtualClock()
        tg = group(clock, **{"iops-write": 10})
        reqs = [(True, 512)] * 25 + [(False, 512)] * 25
        times = await run_requests(clock, tg, reqs)
        # reads are not limited at all; write i starts once i - 1 operations leaked at 10/s
        assert all(t == 0 for t in times[25:])
        assert times[24] == pytest.approx(2.3 * NS, abs=2)

    asyncio.run(main())


def test_burst_rate_and_length() -> None:
    async def main() -> None:
        clock = VirtualClock()
        tg = group(clock, **{"bps-total": 100 * KiB, "bps-total-max": MiB,
                              "bps-total-max-length": 2})
        times = await run_requests(clock, tg, [(False, 100 * KiB)] * 40)
        for i, t in enumerate(times):
            # request i waits for the burst bucket (leaking at max down to max/10) and the
            # main bucket (leaking at avg down to max*burst_length), whichever is later
            burst = (i * 100 * KiB - MiB / 10) / MiB * NS
            main_ = (i * 100 * KiB - 2 * MiB) / (100 * KiB) * NS
            assert t == pytest.approx(max(burst, main_, 0), abs=2), i
        # about 2 MiB went at the burst rate, then the average rate holds
        assert times[22] < 2.1 * NS < times[23]
        assert times[39] - times[38] == pytest.approx(NS, abs=2)

    asyncio.run(main())


def test_iops_size_counts_large_requests_as_several() -> None:
    async def main() -> None:
        clock = VirtualClock()
        tg = group(clock, **{"iops-total": 10, "iops-size": 4 * KiB})
        times = await run_requests(clock, tg, [(False, 16 * KiB)] * 3)
        # each request is 4 units: the third waits for 8 - 1 units to leak at 10/s
        assert times == [0, pytest.approx(0.3 * NS, abs=2), pytest.approx(0.7 * NS, abs=2)]

    asyncio.run(main())


@pytest.mark.parametrize(("limits", "text"), [
    ({"bps-total": 1, "bps-read": 1},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"iops-size": 3}, "iops size requires an iops value to be set"),
    ({"iops-total-max-length": 0}, "the burst length cannot be 0"),
    ({"bps-total-max-length": 3}, "burst length set without burst rate"),
    ({"bps-total-max": 10}, "bps_max/iops_max require corresponding bps/iops values"),
    ({"bps-total": 10, "bps-total-max": 1}, "bps_max/iops_max cannot be lower than bps/iops"),
    ({"iops-total": -1}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"bps-total": 1, "bps-total-max": 10**15, "bps-total-max-length": 2},
     "burst length too high for this burst rate"),
])
def test_invalid_limits(limits: dict[str, int], text: str) -> None:
    with pytest.raises(BlockMirrorError) as e:
        group(VirtualClock(), **limits)
    assert str(e.value) == text


@settings(max_examples=60, deadline=None)
@given(st.integers(4096, 10**7), st.lists(st.integers(1, 256 * KiB), min_size=1, max_size=30))
def test_average_rate_is_never_exceeded(rate: int, sizes: list[int]) -> None:
    """Property: at any request's start, the bytes started before it (minus the bucket's
    avg/10 allowance and the request itself) have had time to leak at ``rate``."""

    async def main() -> None:
        clock = VirtualClock()
        tg = group(clock, **{"bps-total": rate})
        times = await run_requests(clock, tg, [(True, n) for n in sizes])
        sent = 0
        for t, n in zip(times, sizes, strict=True):
            assert sent - rate / 10 <= rate * t / NS + 1e-6 * rate + 1
            sent += n

    asyncio.run(main())


def test_throttle_node_over_the_virtual_clock() -> None:
    async def main() -> None:
        clock = VirtualClock()
        d = Daemon(clock=clock)
        d.objects.add(create_object(d.objects, clock, {
            "qom-type": "throttle-group", "id": "tg", "x-bps-write": 64 * KiB}))
        ram_node(d.graph, "ram", 4 * MiB)
        await open_blockdev(d.graph, {"driver": "throttle", "node-name": "th",
                                      "throttle-group": "tg", "file": "ram"})
        th = d.graph.nodes["th"]
        start = clock.now_ns()
        task = asyncio.create_task(_write_many(th, 8, 32 * KiB))
        assert await clock.advance_until(task.done, 60 * NS)
        await task
        # 256 KiB at 64 KiB/s with a 6.4 KiB bucket: the last write starts at (224K-6.4K)/64K
        assert clock.now_ns() - start == pytest.approx((224 - 6.4) / 64 * NS, abs=2)
        assert await th.read(7 * 32 * KiB, 4) == b"\x07" * 4
        # reads are not limited by a write limit; the group is in use
        t0 = clock.now_ns()
        await th.read(0, MiB)
        assert clock.now_ns() == t0
        with pytest.raises(BlockMirrorError, match=r"^object 'tg' is in use, can not be deleted$"):
            d.objects.delete("tg")
        with pytest.raises(BlockMirrorError, match=r"^Throttle group 'nope' does not exist$"):
            await open_blockdev(d.graph, {"driver": "throttle", "node-name": "th2",
                                          "throttle-group": "nope", "file": "ram"})

    asyncio.run(main())


async def _write_many(node: Any, n: int, size: int) -> None:
    await asyncio.gather(*(node.write(i * size, bytes([i]) * size) for i in range(n)))


def test_limits_round_trip() -> None:
    cfg = ThrottleConfig()
    cfg.set_limit("bps-read-max-length", 5)
    cfg.set_limit("iops-size", 7)
    assert cfg.limits()["bps-read-max-length"] == 5
    assert cfg.limits()["iops-size"] == 7
    assert len(cfg.limits()) == 19


def test_qom_set_limits_merge_and_take_effect() -> None:
    async def main() -> None:
        clock = VirtualClock()
        tg = group(clock, **{"bps-total": MiB})
        tg.set_property("limits", {"iops-total": 10})
        assert tg.config.limits()["bps-total"] == MiB
        assert tg.config.limits()["iops-total"] == 10
        with pytest.raises(BlockMirrorError, match="cannot be lower"):
            tg.set_property("limits", {"iops-total-max": 5})
        assert tg.config.limits()["iops-total-max"] == 0  # a refused change changes nothing
        # the new iops limit now governs small requests: request i waits (i - 1) / 10 s
        times = await run_requests(clock, tg, [(False, 512)] * 12)
        assert times[11] == pytest.approx(1.0 * NS, abs=2)

    asyncio.run(main())
