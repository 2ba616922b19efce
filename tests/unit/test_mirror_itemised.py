"""Itemised, monotonic mirror progress over QMP (issue 12): query-block-jobs ``x-progress``.

QEMU's members stay exactly as they are (and alone without ``x-progress``); the extension
members follow them and never go backwards while a guest keeps writing, in background and in
write-blocking mode. Virtual time, memory nodes.
"""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from blockmirror.cli.mirror import execute
from blockmirror.daemon import Daemon
from blockmirror.jobs.mirror import MirrorParams, start_mirror
from mirror_scripts.memory import make_device, make_node
from mirror_scripts.vclock import VirtualClock

SIZE = 2 << 20
#: QEMU 7.2's members, then QEMU 8.2's mirror member (wire order)
QEMU_KEYS = ["auto-finalize", "io-status", "device", "auto-dismiss", "busy", "len", "offset",
             "status", "paused", "speed", "ready", "type", "actively-synced"]
X_KEYS = ["x-copied", "x-zero-skipped", "x-redirtied", "x-verified", "x-resumed",
          "x-active-written"]


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_counters_are_monotonic_and_follow_qemus_members(mode: str) -> None:
    async def main() -> None:
        clock = VirtualClock()
        d = Daemon(clock=clock)
        g = d.graph
        src = make_node(g, "src", SIZE)
        await src.write(0, random.Random(1).randbytes(SIZE // 2))
        tgt = make_node(g, "tgt", SIZE)
        dev = make_device(g, src)
        job = start_mirror(d.jobs, "j", src, tgt, MirrorParams(
            speed=8 << 20, granularity=65536, buf_size=256 << 10, copy_mode=mode))
        stop = asyncio.Event()
        samples: list[dict[str, int]] = []

        async def writer() -> None:
            rng = random.Random(2)
            while not stop.is_set():
                node = dev.node
                assert node is not None
                await node.write(rng.randrange(0, SIZE - 65536), rng.randbytes(65536))
                await clock.sleep_ns(3_000_000)

        async def sampler() -> None:
            while not stop.is_set():
                plain = await execute(d, "query-block-jobs", {})
                assert list(plain[0]) == QEMU_KEYS  # nothing added unless asked
                info = (await execute(d, "query-block-jobs", {"x-progress": True}))[0]
                assert list(info)[:len(QEMU_KEYS)] == QEMU_KEYS
                assert list(info)[len(QEMU_KEYS):] == X_KEYS
                samples.append({k: info[k] for k in X_KEYS})
                await clock.sleep_ns(20_000_000)

        w = asyncio.ensure_future(writer())
        s = asyncio.ensure_future(sampler())
        await clock.advance_until(lambda: job.is_ready, 10**9)
        await clock.advance_until(lambda: False, 200_000_000)
        stop.set()
        await clock.advance_until(lambda: w.done() and s.done(), 100_000_000)
        await w
        await s
        await job.user_cancel(True)
        await job.wait_finished()
        assert len(samples) > 10
        for a, b in itertools.pairwise(samples):
            for k in X_KEYS:
                assert b[k] >= a[k], (k, a, b)
        last = samples[-1]
        assert last["x-copied"] > 0 and last["x-redirtied"] > 0
        if mode == "write-blocking":
            assert last["x-active-written"] > 0
        else:
            assert last["x-active-written"] == 0

    asyncio.run(main())
