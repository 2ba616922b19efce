"""Acceptance 4: a guest writer that outpaces the copy.

Background mode keeps running and reports honestly: ``offset`` never goes backwards, ``len``
grows with the new dirty data, and READY is never claimed while the writer wins. Write-blocking
mode copies each write synchronously, so the job reaches READY anyway. Time is virtual: the
writer's pace, the rate limit and the sampling all follow the same clock, whatever the load.
"""

from __future__ import annotations

import asyncio
import random

from blockmirror.daemon import Daemon
from blockmirror.jobs.mirror import MirrorJob, MirrorParams, start_mirror
from mirror_scripts.memory import make_device, make_node
from mirror_scripts.vclock import VirtualClock

SIZE = 2 << 20
SPEED = 4 << 20  # bytes/s: the writer below dirties about 10x as much


async def _scenario(
    copy_mode: str, seconds: float
) -> tuple[MirrorJob, list[tuple[int, int]], bool]:
    clock = VirtualClock()
    d = Daemon(clock=clock)
    g = d.graph
    src = make_node(g, "src", SIZE)
    await src.write(0, random.Random(1).randbytes(SIZE))
    tgt = make_node(g, "tgt", SIZE)
    dev = make_device(g, src)
    job = start_mirror(d.jobs, "j", src, tgt, MirrorParams(
        speed=SPEED, granularity=65536, buf_size=256 << 10, copy_mode=copy_mode))
    samples: list[tuple[int, int]] = []
    stop = asyncio.Event()

    async def writer() -> None:
        rng = random.Random(2)
        while not stop.is_set():
            node = dev.node
            assert node is not None
            await node.write(rng.randrange(0, SIZE - 65536), rng.randbytes(65536))
            await clock.sleep_ns(1_500_000)  # ~40 MB/s of new dirty data

    async def sampler() -> None:
        while not stop.is_set():
            info = d.jobs.query_block_jobs()[0]
            samples.append((info["offset"], info["len"]))
            await clock.sleep_ns(20_000_000)

    w = asyncio.ensure_future(writer())
    s = asyncio.ensure_future(sampler())
    await clock.advance_until(lambda: copy_mode == "write-blocking" and job.is_ready,
                              int(seconds * 1e9))
    stop.set()
    await clock.advance_until(lambda: w.done() and s.done(), 100_000_000)
    await w
    await s
    ready_seen = any(e["event"] == "BLOCK_JOB_READY" for e in d.events.history)
    await job.user_cancel(True)
    await job.wait_finished()
    return job, samples, ready_seen


def test_background_mode_keeps_running_and_reports_honestly() -> None:
    job, samples, ready_seen = asyncio.run(_scenario("background", 1.0))
    offsets = [o for o, _ in samples]
    lens = [n for _, n in samples]
    assert offsets == sorted(offsets), "offset went backwards"
    assert all(o <= n for o, n in samples)
    assert lens[-1] > SIZE, "len did not grow with the guest's writes"
    assert offsets[-1] > SIZE // 2, "the copy stalled"
    assert not ready_seen
    assert job.progress.redirtied > 0


def test_write_blocking_mode_reaches_ready() -> None:
    job, samples, ready_seen = asyncio.run(_scenario("write-blocking", 5.0))
    assert ready_seen, "write-blocking mode never reached READY under the writer"
    assert job.error == "Operation canceled"  # cancelled by us after READY, not failed
    offsets = [o for o, _ in samples]
    assert offsets == sorted(offsets)
    assert job.progress.current >= SIZE
