"""x-verify on real files (issue 12): a silent corruption written straight into the target
file, between the copy and the verification pass, is found and repaired before the pivot;
the reported digest is that of the target file afterwards.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

from blockmirror.cli.mirror import execute, open_source
from blockmirror.daemon import Daemon
from blockmirror.jobs.mirror import MirrorJob
from blockmirror.jobs.mirror.verify import image_digest

SIZE = 8 << 20
GRAN = 65536


def test_direct_write_to_the_target_file_is_found_and_repaired(tmp_path: Path) -> None:
    async def main() -> None:
        src, tgt = tmp_path / "s.raw", tmp_path / "t.raw"
        src.write_bytes(random.Random(3).randbytes(SIZE))
        with tgt.open("wb") as f:
            f.truncate(SIZE)
        d = Daemon()
        await open_source(d, str(src), "raw", print)
        await execute(d, "blockdev-add", {"driver": "raw", "node-name": "tgt", "file": {
            "driver": "file", "filename": str(tgt)}})
        await execute(d, "blockdev-mirror", {"job-id": "m", "device": "source",
                                             "target": "tgt", "sync": "full",
                                             "granularity": GRAN, "x-verify": True})
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
