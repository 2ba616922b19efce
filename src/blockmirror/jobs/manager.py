"""The job manager: ids, lookup, queries and task ownership for every job of one daemon.

Every job task is created here (``spawn``) and kept until it ends, so no job task is orphaned;
``cancel_all_for_shutdown`` force-cancels what is left the way QEMU's ``quit`` does. Lookups
raise QEMU's texts: DeviceNotActive for the block-job-* family, GenericError for job-*.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from blockmirror.block.graph import id_wellformed
from blockmirror.errors import BlockMirrorError, DeviceNotActive

if TYPE_CHECKING:
    from blockmirror.block.graph import BlockGraph
    from blockmirror.events import EventBus
    from blockmirror.jobs.clock import Clock
    from blockmirror.jobs.job import Job

log = logging.getLogger(__name__)


class JobManager:
    """Also the context every job gets: the event bus, the clock and the block graph."""

    def __init__(self, events: EventBus, clock: Clock, graph: BlockGraph) -> None:
        self.events = events
        self.clock = clock
        self.graph = graph
        #: live jobs by id, in creation order (query order)
        self.jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- ids and membership ---------------------------------------------------------------------

    def check_new_id(self, job_id: str) -> None:
        """cf. job_create: the id must be well formed and unused."""
        if not id_wellformed(job_id):
            raise BlockMirrorError(f"Invalid job ID '{job_id}'")
        if job_id in self.jobs:
            raise BlockMirrorError(f"Job ID '{job_id}' already in use")

    def add(self, job: Job) -> None:
        self.check_new_id(job.id)
        self.jobs[job.id] = job

    def remove(self, job: Job) -> None:
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]

    def find(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def get_block_job(self, device: str) -> Job:
        """cf. find_block_job_locked (block-job-* commands)."""
        job = self.jobs.get(device)
        if job is None or not job.is_block_job:
            raise DeviceNotActive(f"Block job '{device}' not found")
        return job

    def get_job(self, job_id: str) -> Job:
        """cf. find_job_locked (job-* commands)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise BlockMirrorError("Job not found")
        return job

    # --- tasks --------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a job coroutine as a task owned by this manager."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("job task %s failed", task.get_name(), exc_info=task.exception())

    async def wait_idle(self) -> None:
        """Until every job task has ended (tests and shutdown)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    # --- queries ------------------------------------------------------------------------------

    def query_jobs(self) -> list[dict[str, Any]]:
        return [job.query_job() for job in self.jobs.values()]

    def query_block_jobs(self) -> list[dict[str, Any]]:
        return [job.query_block_job() for job in self.jobs.values() if job.is_block_job]

    # --- shutdown -----------------------------------------------------------------------------

    async def cancel_all_for_shutdown(self) -> None:
        """cf. job_cancel_sync_all on quit: pause (drain), force-cancel, wait for the end.

        Events come out as QEMU's do: paused (or standby), running, aborting,
        BLOCK_JOB_CANCELLED, concluded, null.
        """
        jobs = list(self.jobs.values())
        for job in jobs:
            if job.started and not job.deferred:
                job.pause()
        # let running jobs reach their pause point, as a drain would (bounded: a job stuck in
        # I/O is cancelled without having paused)
        running = [j for j in jobs if j.started and not j.deferred and not j.paused]
        if running:
            waits = [asyncio.ensure_future(j.wait_quiet()) for j in running]
            _done, pending = await asyncio.wait(waits, timeout=1.0)
            for w in pending:
                w.cancel()
        for job in jobs:
            if job.status.value == "null":
                continue
            try:
                # a concluded job is dismissed by this (cf. job_cancel_locked)
                await job.cancel(True)
            except BlockMirrorError:
                log.exception("cancelling job %s on shutdown", job.id)
        await self.wait_idle()
        for job in jobs:
            if job.pause_count > 0:
                job.resume()
        # jobs kept for a manual dismiss: cancelling a concluded job dismisses it
        for job in list(self.jobs.values()):
            if job.status.value == "concluded":
                await job.cancel(True)


__all__ = ["JobManager"]
