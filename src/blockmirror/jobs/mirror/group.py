"""Switch-over groups: several mirrors that pivot at one instant, or not at all (extension).

A VM with several disks must not find one disk on its new storage and another still on the
old one: the old sources together must hold exactly the guest writes issued before some
instant, and the new targets every write after it. ``SwitchGroup.complete`` makes that
instant explicit:

1. *The cut.* Every member is READY. In one step (no await in between) a ``WriteHold`` is put
   on each member's guest path (its ``mirror_top`` filter): from now on no guest write enters
   any source. Writes already below the holds are awaited; they land in the sources.
2. *Converge and drain.* Each member is completed: it copies what is still dirty, closes its
   ``DrainGate``, flushes its target and stops in ``prepare`` at the group's barrier.
3. *The pivot.* When the last member arrives, holds go on every target too (a pivoted disk's
   guest writes reach its target directly), every member pivots, and only then are all holds
   opened: the held writes go to the targets.

If any member fails, is cancelled, or its pivot is refused before the barrier is passed, the
group fails: members at the barrier do not pivot, the others are cancelled, and the holds
open onto the sources, which stay in use with every write they were sent.
"""

from __future__ import annotations

import asyncio
import errno
import weakref
from typing import TYPE_CHECKING, Any

from blockmirror.block.graph import id_wellformed
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.jobs.status import JobStatus

if TYPE_CHECKING:
    from blockmirror.jobs.manager import JobManager
    from blockmirror.jobs.mirror.job import MirrorJob

#: how often the cut polls for guest writes that were already past the holds
_POLL_NS = 1_000_000


class WriteHold:
    """A write interceptor that holds every write while closed."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        #: writes waiting here now
        self.waiting = 0
        self.nodes: list[BlockNode] = []

    def install(self, node: BlockNode) -> None:
        node.interceptors.insert(0, self)
        self.nodes.append(node)

    def open(self) -> None:
        for node in self.nodes:
            if self in node.interceptors:
                node.interceptors.remove(self)
        self.nodes.clear()
        self._open.set()

    async def around_write(self, node: BlockNode, kind: str, offset: int, length: int,
                           proceed: Any) -> None:
        if not self._open.is_set():
            self.waiting += 1
            try:
                await self._open.wait()
            finally:
                self.waiting -= 1
        await proceed()


class SwitchGroup:
    """Mirror jobs that complete together (QMP ``x-block-job-group``)."""

    def __init__(self, manager: JobManager, name: str, jobs: list[MirrorJob]) -> None:
        self.manager = manager
        self.name = name
        self.jobs = jobs
        #: "grouped", "switching", "switched" or "failed"
        self.state = "grouped"
        self.error: str | None = None
        self._filter_holds: list[tuple[WriteHold, BlockNode]] = []
        self._target_hold: WriteHold | None = None
        self._arrived: set[str] = set()
        self._done = asyncio.Event()
        self._pivot_errors: dict[str, BlockMirrorError] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        for job in jobs:
            job.group = self

    @property
    def switching(self) -> bool:
        return self.state == "switching"

    # --- 1: the cut -----------------------------------------------------------------------------

    async def complete(self) -> None:
        """Start the switch-over; BLOCK_JOB_COMPLETED of each member and
        X_BLOCK_JOB_GROUP_COMPLETED tell how it ended.

        Raises:
            BlockMirrorError: the group is not idle, or a member cannot be completed now.
        """
        if self.state != "grouped":
            raise BlockMirrorError(f"Group '{self.name}' is already {self.state}")
        for job in self.jobs:
            if job.status not in (JobStatus.READY, JobStatus.STANDBY) or job.cancel_requested:
                raise BlockMirrorError(f"The active block job '{job.id}' cannot be completed")
            if job.wiring.filter is None:
                raise BlockMirrorError(f"The active block job '{job.id}' cannot be completed")
        self.state = "switching"
        for job in self.jobs:
            assert job.wiring.filter is not None
            hold = WriteHold()
            hold.install(job.wiring.filter)
            self._filter_holds.append((hold, job.wiring.filter))
        # guest writes that were already below a hold belong to the sources: let them land
        # before the jobs start closing their gates
        while any(node.in_flight > hold.waiting for hold, node in self._filter_holds):
            if self.state != "switching":
                return
            await self.manager.clock.sleep_ns(_POLL_NS)
        for job in self.jobs:
            if self.state != "switching":
                return
            try:
                await job.complete()
            except BlockMirrorError as e:
                self._fail(f"job '{job.id}': {e}")
                raise

    # --- 2 and 3: the barrier and the pivot ---------------------------------------------------

    async def member_prepare(self, job: MirrorJob) -> None:
        """A member converged, drained and flushed its target (its ``prepare``).

        Raises:
            BlockIOError: the group failed (ECANCELED), or this member's pivot failed.
        """
        if self.state == "switching":
            self._arrived.add(job.id)
            if len(self._arrived) == len(self.jobs):
                await self._switch()
            else:
                await self._done.wait()
        if self.state != "switched":
            raise BlockIOError(errno.ECANCELED)
        err = self._pivot_errors.get(job.id)
        if err is not None:
            raise err

    async def _switch(self) -> None:
        target_hold = WriteHold()
        for job in self.jobs:
            target_hold.install(job.target)
        self._target_hold = target_hold
        for job in self.jobs:
            try:
                await job.wiring.exit(pivot=True, release=job._release_drain)
            except BlockMirrorError as e:
                self._pivot_errors[job.id] = e
        self.state = "switched"
        self._open_holds()
        self._emit(pivoted=True)
        self._done.set()
        self._forget()

    # --- failure ------------------------------------------------------------------------------

    def member_failed(self, job: MirrorJob) -> None:
        """A member is aborting (failed or cancelled): nothing pivots."""
        if self.state in ("switched", "failed"):
            return
        self._fail(f"job '{job.id}': {job.error or 'cancelled'}")

    def _fail(self, why: str) -> None:
        if self.state in ("switched", "failed"):
            return
        self.state = "failed"
        self.error = why
        self._open_holds()
        for other in self.jobs:
            if not other.deferred and not other.cancel_requested:
                task = asyncio.ensure_future(other.cancel(True))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._done.set()
        self._emit(pivoted=False)
        self._forget()

    def _open_holds(self) -> None:
        for hold, _node in self._filter_holds:
            hold.open()
        self._filter_holds.clear()
        if self._target_hold is not None:
            self._target_hold.open()
            self._target_hold = None

    def _emit(self, *, pivoted: bool) -> None:
        data: dict[str, Any] = {"group": self.name, "jobs": [j.id for j in self.jobs],
                                "pivoted": pivoted}
        if self.error is not None:
            data["error"] = self.error
        self.manager.events.emit("X_BLOCK_JOB_GROUP_COMPLETED", data)

    def _forget(self) -> None:
        groups(self.manager).pop(self.name, None)

    def info(self) -> dict[str, Any]:
        return {"group": self.name, "jobs": [j.id for j in self.jobs], "state": self.state}


_REGISTRY: weakref.WeakKeyDictionary[JobManager, dict[str, SwitchGroup]] = \
    weakref.WeakKeyDictionary()


def groups(manager: JobManager) -> dict[str, SwitchGroup]:
    """The live groups of one daemon, by name."""
    return _REGISTRY.setdefault(manager, {})


def make_group(manager: JobManager, name: str, jobs: list[MirrorJob]) -> SwitchGroup:
    """Group mirror jobs (the QMP layer has looked them up).

    Raises:
        BlockMirrorError: bad or duplicate name, no jobs, a job twice, a job in another group
            or already completing.
    """
    live = groups(manager)
    if not id_wellformed(name):
        raise BlockMirrorError(f"Invalid group ID '{name}'")
    if name in live:
        raise BlockMirrorError(f"Group ID '{name}' already in use")
    if not jobs:
        raise BlockMirrorError("A group needs at least one job")
    seen: set[str] = set()
    for job in jobs:
        if job.id in seen:
            raise BlockMirrorError(f"Job '{job.id}' is listed twice")
        seen.add(job.id)
        if job.group is not None:
            raise BlockMirrorError(f"Job '{job.id}' is already in group '{job.group.name}'")
        if job.deferred or job.cancel_requested or job.should_complete:
            raise BlockMirrorError(f"Job '{job.id}' is already finishing")
    group = SwitchGroup(manager, name, jobs)
    live[name] = group
    return group


__all__ = ["SwitchGroup", "WriteHold", "groups", "make_group"]
