"""The resume sidecar's invariant, checked after every guest write (issue 12).

A mirror with ``x-resume-log`` runs in-process on raw files while a guest writes through the
source's device; after each write the test reads the sidecar (as a restart would) and checks
that every chunk the last checkpoint calls clean and that lies outside the hot extents is equal
on source and target *right now*, in the copy phase, at READY and in write-blocking mode.
A crash at any of these moments would therefore resume correctly. (Files, not NBD: this is
the in-process counterpart of test_mirror_resume_kill.)
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from blockmirror.cli.mirror import execute
from blockmirror.jobs.mirror import activity_log
from file_mirror import mirror_files

SIZE = 8 << 20
GRAN = 65536
EXTENT = 1 << 20


def _violations(log: str, fs: int, ft: int) -> list[int]:
    rec = activity_log.load(log)
    per = rec.geometry.extent_size // GRAN
    hot = {c for e in rec.hot for c in range(e * per, (e + 1) * per)}
    bad = []
    for c in range(SIZE // GRAN):
        if rec.bitmap[c // 8] & (1 << (c % 8)) or c in hot:
            continue
        if os.pread(fs, GRAN, c * GRAN) != os.pread(ft, GRAN, c * GRAN):
            bad.append(c)
    return bad


@pytest.mark.parametrize(("mode", "seed"), [("background", 1), ("background", 2),
                                            ("write-blocking", 3)])
def test_clean_outside_hot_extents_means_equal_after_every_write(
        tmp_path: Path, mode: str, seed: int) -> None:
    async def main() -> None:
        rng = random.Random(seed)
        src, tgt, log = tmp_path / "s.raw", tmp_path / "t.raw", str(tmp_path / "s.resume")
        d, dev = await mirror_files(src, tgt, rng.randbytes(SIZE), granularity=GRAN, **{
            "copy-mode": mode, "speed": 8 << 20, "buf-size": 1 << 20, "x-resume-log": log,
            "x-resume-extents": 3, "x-resume-extent-size": EXTENT})
        job = d.jobs.find("m")
        assert job is not None
        fs, ft = os.open(src, os.O_RDONLY), os.open(tgt, os.O_RDONLY)
        checked = after_ready = 0
        try:
            while after_ready < 100:
                n = rng.choice([4096, GRAN, 256 * 1024])
                o = rng.randrange(0, SIZE - n) // 512 * 512
                node = dev.node
                assert node is not None
                await node.write(o, rng.randbytes(n))
                bad = _violations(log, fs, ft)
                assert not bad, f"write {checked}: chunks {bad} differ, clean in the log"
                checked += 1
                after_ready += job.is_ready
                if checked == 150:
                    # the copy phase was checked; unthrottled, the copy overtakes the writer
                    await execute(d, "block-job-set-speed", {"device": "m", "speed": 0})
                assert checked < 5000, "the mirror never got READY"
        finally:
            os.close(fs)
            os.close(ft)
            await job.user_cancel(True)
            await job.wait_finished()
            await d.shutdown()
        rec = activity_log.load(log)
        assert rec.meta["closed"] is True  # cancelled: a closed checkpoint

    asyncio.run(main())
