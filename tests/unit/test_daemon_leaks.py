"""No per-mirror leak in a long-lived daemon (issue 15, the soak's RSS growth).

One in-process daemon runs rounds like the soak's: nodes (one under blkdebug), an NBD export
written through, a mirror paused and resumed and ended one of four ways (pivot, soft cancel,
forced cancel, reported target error), then everything is deleted. After a warm-up, the live
objects of each blockmirror class, the asyncio tasks, the manager's bookkeeping and the event
history are counted; more rounds must not grow them. Objects, not RSS: RSS moves with the
allocator (see tests/soak/README.md), a count of leaked jobs or nodes does not.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from pathlib import Path
from typing import Any

from blockmirror.daemon import Daemon
from blockmirror.qmp.testing import qmp_daemon
from nbd_writer import NbdWriter

MiB = 1 << 20
SIZE = 2 * MiB
WARMUP = 4
ROUNDS = 24
ENDS = ("complete", "soft-cancel", "force-cancel", "error")


def live_counts() -> Counter[str]:
    """Live objects by class, for the daemon's own classes (after a full collection)."""
    gc.collect()
    # a foreign extension type may have no string __module__ (uvloop's, once imported)
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
                   if isinstance(m := type(o).__module__, str) and m.startswith("blockmirror."))


class Rounds:
    def __init__(self, tmp: Path, qmp: Any, nbd_sock: str) -> None:
        self.tmp, self.qmp, self.nbd_sock = tmp, qmp, nbd_sock
        self.events: list[dict[str, Any]] = []
        self.new = asyncio.Event()

    async def pump(self) -> None:
        async for ev in self.qmp.events:
            self.events.append(dict(ev))
            self.new.set()

    async def event(self, job: str, names: tuple[str, ...], after: int) -> dict[str, Any]:
        async def find() -> dict[str, Any]:
            while True:
                for ev in self.events[after:]:
                    data = ev.get("data", {})
                    if ev["event"] in names and data.get("device", data.get("id")) == job:
                        return ev
                self.new.clear()
                await self.new.wait()

        return await asyncio.wait_for(find(), 60)

    async def one(self, n: int) -> None:
        q = self.qmp
        end = ENDS[n % len(ENDS)]
        src, tgt = self.tmp / f"s{n}.raw", self.tmp / f"t{n}.raw"
        for p in (src, tgt):
            with p.open("wb") as f:
                f.truncate(SIZE)
        await q.execute("blockdev-add", {"driver": "raw", "node-name": f"s{n}", "file": {
            "driver": "file", "filename": str(src)}})
        proto: dict[str, Any] = {"driver": "file", "filename": str(tgt)}
        if end == "error":
            proto = {"driver": "blkdebug", "image": proto, "inject-error": [
                {"event": "write_aio", "errno": 5, "once": True}]}
        await q.execute("blockdev-add", {"driver": "raw", "node-name": f"t{n}", "file": proto})
        await q.execute("block-export-add", {"type": "nbd", "id": f"e{n}", "node-name": f"s{n}",
                                             "name": f"d{n}", "writable": True})
        writer = NbdWriter(self.nbd_sock, SIZE, seed=n, pace_s=0.001, export=f"d{n}")
        writer.start()
        await asyncio.to_thread(writer.started_writing.wait, 30)
        job, mark = f"j{n}", len(self.events)
        await q.execute("blockdev-mirror", {"job-id": job, "device": f"s{n}", "target": f"t{n}",
                                            "sync": "full", "granularity": 65536})
        try:
            if end == "force-cancel":
                await q.execute("block-job-cancel", {"device": job, "force": True})
                await self.event(job, ("BLOCK_JOB_CANCELLED",), mark)
            elif end == "error":
                done = await self.event(job, ("BLOCK_JOB_COMPLETED",), mark)
                assert done["data"].get("error"), done
            else:
                await q.execute("block-job-pause", {"device": job})
                await q.execute("block-job-resume", {"device": job})
                await self.event(job, ("BLOCK_JOB_READY",), mark)
                await q.execute("block-job-complete" if end == "complete" else
                                "block-job-cancel", {"device": job})
                done = await self.event(job, ("BLOCK_JOB_COMPLETED",), mark)
                assert not done["data"].get("error"), done
        finally:
            writer.stop.set()
            await asyncio.to_thread(writer.join, 30)
        assert writer.log.error is None, writer.log.error
        await q.execute("block-export-del", {"id": f"e{n}", "mode": "hard"})
        await self.event(f"e{n}", ("BLOCK_EXPORT_DELETED",), mark)
        for node in (f"s{n}", f"t{n}"):
            await q.execute("blockdev-del", {"node-name": node})
        src.unlink()
        tgt.unlink()


def test_mirror_rounds_leave_no_live_objects_behind(tmp_path: Path) -> None:
    async def main() -> None:
        daemon = Daemon()
        # far below the events of the rounds (about 9 each), so that the cap is exercised
        daemon.events.history_limit = 40
        async with qmp_daemon(tmp_path, daemon=daemon) as td:
            qmp = await td.client()
            nbd_sock = str(tmp_path / "nbd.sock")
            await qmp.execute("nbd-server-start", {
                "addr": {"type": "unix", "data": {"path": nbd_sock}}})
            r = Rounds(tmp_path, qmp, nbd_sock)
            pump = asyncio.ensure_future(r.pump())
            try:
                for n in range(WARMUP):
                    await r.one(n)
                before, tasks_before = live_counts(), len(asyncio.all_tasks())
                for n in range(WARMUP, WARMUP + ROUNDS):
                    await r.one(n)
                after, tasks_after = live_counts(), len(asyncio.all_tasks())
            finally:
                pump.cancel()
            # one object of a class per round would be ROUNDS more: allow a little noise
            # (a cache filling up), never one per round or half that
            grown = {k: after[k] - before[k] for k in after if after[k] - before[k] > 3}
            assert not grown, f"live objects grew over {ROUNDS} rounds: {grown}"
            assert tasks_after <= tasks_before + 2, (tasks_before, tasks_after)
            assert not daemon.jobs.jobs and not daemon.jobs._tasks
            assert not list(daemon.graph.all_nodes()), list(daemon.graph.nodes)
            assert len(r.events) > 4 * daemon.events.history_limit
            assert len(daemon.events.history) <= daemon.events.history_limit
            assert gc.garbage == []

    asyncio.run(main())
