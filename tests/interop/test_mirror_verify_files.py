"""x-verify on real files (issue 12): a silent corruption written straight into the target
file, between the copy and the verification pass, is found and repaired before the pivot;
the reported digest is that of the target file afterwards.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from blockmirror.cli.mirror import execute
from blockmirror.jobs.mirror import MirrorJob
from blockmirror.jobs.mirror.verify import image_digest
from file_mirror import mirror_files

SIZE = 8 << 20
GRAN = 65536


def test_direct_write_to_the_target_file_is_found_and_repaired(tmp_path: Path) -> None:
    async def main() -> None:
        src, tgt = tmp_path / "s.raw", tmp_path / "t.raw"
        d, _ = await mirror_files(src, tgt, random.Random(3).randbytes(SIZE),
                                  granularity=GRAN, **{"x-verify": True})
        job = d.jobs.find("m")
        assert isinstance(job, MirrorJob) and job.verifier is not None
        hit = [3 * GRAN + 17, 100 * GRAN]

        async def corrupt() -> None:
            # READY: the copy is done; nothing in the daemon knows about these bytes
            fd = os.open(tgt, os.O_WRONLY)
            try:
                for o in hit:
                    os.pwrite(fd, b"\xff\x00silent corruption\x00\xff", o)
            finally:
                os.close(fd)

        job.verifier.before_pass = corrupt
        done = asyncio.Event()
        d.events.subscribe(lambda ev: done.set()
                           if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                           else None)
        ready = asyncio.Event()
        d.events.subscribe(lambda ev: ready.set() if ev["event"] == "BLOCK_JOB_READY" else None)
        await ready.wait()
        await execute(d, "block-job-complete", {"device": "m"})
        await done.wait()
        assert job.error is None, job.error
        ev = [e for e in d.events.history if e["event"] == "X_BLOCK_JOB_VERIFIED"][-1]["data"]
        assert (ev["mismatches"], ev["repaired"], ev["unrepaired"]) == (2, 2, 0), ev
        await d.shutdown()
        assert tgt.read_bytes() == src.read_bytes()
        assert ev["digest"] == image_digest(tgt.read_bytes(), GRAN)
        assert ev["verified"] >= SIZE

    asyncio.run(main())


HEAVY_SIZE = 4 << 20
WRITES_PER_WRITER = 150


async def _heavy_files_run(tmp: Path, seed: int) -> tuple[dict[str, object], int]:
    """A verification of real files while four guest writers keep writing through the
    source's device, and every other run also takes a write into the very run being
    verified, between its reads and its judgement. Returns the event and the deferrals."""
    rng = random.Random(seed)
    src, tgt = tmp / "s.raw", tmp / "t.raw"
    d, blk = await mirror_files(src, tgt, rng.randbytes(HEAVY_SIZE), granularity=GRAN, **{
        "x-verify": True, "copy-mode": "write-blocking" if seed % 3 == 0 else "background"})
    job = d.jobs.find("m")
    assert isinstance(job, MirrorJob) and job.verifier is not None
    stop = asyncio.Event()
    under_way = asyncio.Event()
    writes = 0

    async def guest_write(o: int | None = None, n: int | None = None) -> None:
        nonlocal writes
        node = blk.node
        assert node is not None
        if n is None:
            n = rng.choice([512, 4096, GRAN, 3 * GRAN + 512, 4 * GRAN])
        if o is None:
            o = rng.randrange(0, HEAVY_SIZE - n) // 512 * 512
        await node.write(o, rng.randbytes(n))
        writes += 1
        if writes >= 20:
            under_way.set()

    async def writer() -> None:
        # bounded, so that the pass can finish: a guest that always writes faster than
        # the pass verifies keeps it deferring chunks, as it keeps a mirror from converging
        for _ in range(WRITES_PER_WRITER):
            if stop.is_set():
                return
            await guest_write()
            await asyncio.sleep(0)

    started = asyncio.Event()

    async def before_pass() -> None:
        # the pass starts only once the writers are under way
        started.set()
        await under_way.wait()

    racers: list[asyncio.Future[None]] = []

    async def racing(offset: int, length: int) -> None:
        if seed % 2 == 0 and rng.random() < 0.5:
            o = offset + rng.randrange(0, length - 512) // 512 * 512
            # not awaited: a write-blocking write waits for the run the verifier holds
            racers.append(asyncio.ensure_future(guest_write(o, 512)))
            for _ in range(8):
                await asyncio.sleep(0)

    job.verifier.before_pass = before_pass
    job.verifier.after_read = racing
    done = asyncio.Event()
    d.events.subscribe(lambda ev: done.set()
                       if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                       else None)
    tasks = [asyncio.ensure_future(writer()) for _ in range(4)]
    ready = asyncio.Event()
    d.events.subscribe(lambda ev: ready.set() if ev["event"] == "BLOCK_JOB_READY" else None)
    if not job.is_ready:
        await ready.wait()
    await started.wait()
    task = job.verifier.task
    assert task is not None
    await task
    # the guest stops before the switch-over, so that the files can be compared after it
    stop.set()
    job.verifier.after_read = None
    await asyncio.gather(*tasks, *racers)
    await execute(d, "block-job-complete", {"device": "m"})
    await done.wait()
    assert job.error is None, job.error
    ev = [e for e in d.events.history if e["event"] == "X_BLOCK_JOB_VERIFIED"][-1]["data"]
    deferred = job.verifier.deferred
    await d.shutdown()
    assert tgt.read_bytes() == src.read_bytes()
    assert ev["digest"] == image_digest(tgt.read_bytes(), GRAN)
    return ev, deferred


@pytest.mark.parametrize("seed", range(50))
def test_heavy_writer_on_files_makes_no_false_mismatch(tmp_path: Path, seed: int) -> None:
    ev, deferred = asyncio.run(_heavy_files_run(tmp_path, seed))
    assert (ev["mismatches"], ev["unrepaired"]) == (0, 0), ev
    if seed % 2 == 0:
        assert deferred > 0  # a write did land inside a run being verified
