"""The generic job core with a toy job: pause points, verbs, cancel, finalize and dismiss.

Invariant: status only moves along the table, every real change emits one JOB_STATUS_CHANGE,
and each user verb is accepted or refused with QEMU's text.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from blockmirror.daemon import Daemon
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.job import Job
from blockmirror.jobs.manager import JobManager


class ToyJob(Job):
    """Counts to ``steps``, one step per sleep; can be told to go READY on the way."""

    job_type = "create"
    is_block_job = False

    def __init__(self, manager: JobManager, job_id: str, steps: int = 10_000,
                 **kw: Any) -> None:
        super().__init__(manager, job_id, **kw)
        self.steps = steps
        self.done = 0
        self.completed_by_user = False
        self.prepared = self.aborted = self.cleaned = False

    async def run(self) -> None:
        self.progress.set_remaining(self.steps)
        while self.done < self.steps and not self.is_cancelled:
            if self.completed_by_user:
                return
            await self.sleep_ns(1_000_000)
            self.done += 1
            self.progress.update(1)

    async def prepare(self) -> None:
        self.prepared = True

    async def abort(self) -> None:
        self.aborted = True

    async def clean(self) -> None:
        self.cleaned = True


def _env() -> tuple[Daemon, list[str]]:
    d = Daemon()
    seen: list[str] = []
    d.events.subscribe(lambda e: seen.append(
        e["data"]["status"] if e["event"] == "JOB_STATUS_CHANGE" else e["event"]))
    return d, seen


async def _until(pred: Any, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not pred():
        assert time.monotonic() < deadline, "timeout"
        await asyncio.sleep(0.001)


def test_runs_to_completion_with_auto_finalize_and_dismiss() -> None:
    async def main() -> None:
        d, seen = _env()
        job = ToyJob(d.jobs, "t", steps=3)
        d.jobs.add(job)
        job.start()
        await job.wait_finished()
        assert seen == ["created", "running", "waiting", "pending", "concluded", "null"]
        assert job.prepared and job.cleaned and not job.aborted
        assert job.progress.current == job.progress.total == 3
        assert d.jobs.jobs == {}

    asyncio.run(main())


def test_pause_resume_at_pause_points_and_verb_texts() -> None:
    async def main() -> None:
        d, seen = _env()
        job = ToyJob(d.jobs, "t")
        d.jobs.add(job)
        job.start()
        job.user_pause()
        await _until(lambda: job.status.value == "paused")
        frozen = job.done
        await asyncio.sleep(0.02)  # a window in which nothing may happen (not a sync point)
        assert job.done == frozen and job.paused and not job.busy
        with pytest.raises(BlockMirrorError, match=r"^Job is already paused$"):
            job.user_pause()
        job.pause()  # an internal pause on top of the user's
        job.user_resume()
        await asyncio.sleep(0.02)
        assert job.status.value == "paused"  # still held by the internal pause
        job.resume()
        await _until(lambda: job.status.value == "running")
        with pytest.raises(BlockMirrorError, match="Can't resume a job that was not paused"):
            job.user_resume()
        with pytest.raises(BlockMirrorError) as ei:
            await job.finalize()
        assert str(ei.value) == "Job 't' in state 'running' cannot accept command verb 'finalize'"
        await job.user_cancel(True)
        await job.wait_finished()
        assert seen == ["created", "running", "paused", "running", "aborting", "concluded",
                        "null"]
        assert job.aborted and not job.prepared and job.error == "Operation canceled"

    asyncio.run(main())


def test_cancelling_a_user_paused_job_resumes_it_first() -> None:
    async def main() -> None:
        d, seen = _env()
        job = ToyJob(d.jobs, "t", auto_dismiss=False)
        d.jobs.add(job)
        job.start()
        job.user_pause()
        await _until(lambda: job.paused)
        await job.user_cancel(False)  # no .cancel hook: always forced
        await job.wait_finished()
        assert seen[-4:] == ["paused", "running", "aborting", "concluded"]
        assert d.jobs.query_jobs() == [{"current-progress": job.progress.current,
                                        "status": "concluded",
                                        "total-progress": job.progress.total, "type": "create",
                                        "id": "t", "error": "Operation canceled"}]
        with pytest.raises(BlockMirrorError, match="cannot accept command verb 'cancel'"):
            await job.user_cancel(True)
        job.dismiss()
        assert seen[-1] == "null" and d.jobs.jobs == {}

    asyncio.run(main())


def test_manual_finalize_and_cancel_in_pending() -> None:
    async def main() -> None:
        for cancel in (False, True):
            d, seen = _env()
            job = ToyJob(d.jobs, "t", steps=2, auto_finalize=False, auto_dismiss=False)
            d.jobs.add(job)
            job.start()
            await _until(lambda j=job: j.status.value == "pending")
            assert not job.prepared
            if cancel:
                await job.user_cancel(True)
                assert seen[-2:] == ["aborting", "concluded"] and job.aborted
            else:
                await job.finalize()
                assert seen[-1] == "concluded" and job.prepared
            job.dismiss()

    asyncio.run(main())


def test_ids_and_lookups() -> None:
    d = Daemon()
    with pytest.raises(BlockMirrorError, match="Invalid job ID ''"):
        d.jobs.check_new_id("")
    job = ToyJob(d.jobs, "a.b-c_1")
    d.jobs.add(job)
    with pytest.raises(BlockMirrorError, match=r"Job ID 'a\.b-c_1' already in use"):
        d.jobs.check_new_id("a.b-c_1")
    # not a block job: invisible to the block-job family
    with pytest.raises(BlockMirrorError, match=r"Block job 'a\.b-c_1' not found"):
        d.jobs.get_block_job("a.b-c_1")
    assert d.jobs.get_job("a.b-c_1") is job
    assert d.jobs.query_block_jobs() == []
    job.dispose_unstarted()
    assert d.jobs.jobs == {}
