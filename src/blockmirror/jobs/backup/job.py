"""The backup block job (cf. block/backup.c, QEMU 7.2), made of parts:

* ``BlockCopyState`` (``copy_state.py``): the copy bitmap, the claims, the copying;
* ``CopyBeforeWrite`` (``cbw.py``): the source's write interceptor that copies old data first;
* ``BackupWiring`` (``wiring.py``): the ``copy-before-write`` filter, target handle, blockers;
* ``SyncBitmap`` (``sync_bitmap.py``): the user's bitmap, frozen while the job runs.

``run`` is ``backup_run``: a pause point first (a job started inside a drained section stops
there until the drain ends), the allocation walk of ``sync=top``, then either waiting for the
cancel (``sync=none``: only guest writes copy) or the background loop over the copy bitmap,
with the job's error policies. A cancel is always forced (cf. backup_cancel).
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass

from blockmirror.block.copy import CopyError
from blockmirror.block.driver import BlockStatus
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError
from blockmirror.jobs.backup.cbw import CopyBeforeWrite
from blockmirror.jobs.backup.copy_state import DEFAULT_MAX_CHUNK, BlockCopyState, Claim
from blockmirror.jobs.backup.sync_bitmap import SyncBitmap
from blockmirror.jobs.backup.wiring import BackupWiring
from blockmirror.jobs.blockjob import BlockJob
from blockmirror.jobs.manager import JobManager
from blockmirror.jobs.status import JobStatus, JobVerb

#: how long block-job-cancel waits for a backup to end before replying anyway
CANCEL_WAIT_S = 10.0


@dataclass
class BackupParams:
    sync: str = "full"
    speed: int = 0
    on_source_error: str = "report"
    on_target_error: str = "report"
    auto_finalize: bool = True
    auto_dismiss: bool = True
    compress: bool = False
    filter_node_name: str | None = None
    #: x-perf max-chunk (0: no limit beyond our own run size) and max-workers
    max_chunk: int = 0
    max_workers: int = 64
    #: the sync bitmap, frozen (None without ``bitmap``)
    bitmap: SyncBitmap | None = None
    #: drive-backup: the target is the job's to close when nobody else uses it
    owns_target: bool = False


class BackupJob(BlockJob):
    job_type = "backup"

    def __init__(self, manager: JobManager, job_id: str, source: BlockNode, target: BlockNode,
                 params: BackupParams, wiring: BackupWiring, cluster_size: int) -> None:
        super().__init__(manager, job_id, auto_finalize=params.auto_finalize,
                         auto_dismiss=params.auto_dismiss, speed=0)
        self.source = source
        self.target = target
        self.params = params
        self.wiring = wiring
        self.copy = BlockCopyState(source, target, cluster_size, self._copied,
                                   self.progress.set_remaining, compress=params.compress)
        self.cbw = CopyBeforeWrite(self.copy)
        chunk = params.max_chunk or DEFAULT_MAX_CHUNK
        # compressed writes go cluster by cluster (cf. COPY_READ_WRITE_CLUSTER's chunk size)
        self.chunk = cluster_size if params.compress else max(chunk, cluster_size)
        #: completion-mode=grouped: the jobs this one completes with
        self.txn: BackupTxn | None = None
        self._init_bitmap()

    def _copied(self, nbytes: int) -> None:
        self.progress.update(nbytes)

    def _init_bitmap(self) -> None:
        """cf. backup_init_bcs_bitmap, done before the hook sees any write."""
        st = self.copy
        sync = self.params.bitmap
        if self.params.sync == "bitmap":
            assert sync is not None
            st.bitmap.merge_from(sync.named.bitmap)
        else:
            st.bitmap.mark_all()
            st.skip_unallocated = self.params.sync == "top"
        self.progress.set_remaining(st.bitmap.dirty_count())

    # --- wiring ----------------------------------------------------------------------------------

    def attach(self) -> None:
        """Hook the source and take the target (the filter is already in place).

        Raises:
            BlockMirrorError: the target cannot be written.
        """
        self.wiring.take_target(self.cbw)

    # --- the run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """cf. backup_run (job_co_entry's pause point first)."""
        await self.pause_point()
        if self.params.sync == "top" and not await self._skip_unallocated():
            return
        if self.params.sync == "none":
            while not self.is_cancelled:
                await self._yield(None)
                await self.pause_point()
            return
        await self._loop()

    async def _skip_unallocated(self) -> bool:
        """sync=top: clusters the top layer does not allocate are not copied (cf.
        block_copy_reset_unallocated); False when cancelled meanwhile."""
        st, src = self.copy, self.source
        cs, length = st.cluster_size, st.length
        offset = 0
        while offset < length:
            if self.is_cancelled:
                return False
            await self.pause_point()
            if self.is_cancelled:
                return False
            ext = await src.block_status(offset, length - offset, want_zero=False)
            end = offset + ext.length
            if not ext.status & BlockStatus.ALLOCATED:
                # only whole clusters are skipped (a partly allocated one is copied)
                first = -(-offset // cs) * cs
                last = length if end >= length else end // cs * cs
                if last > first:
                    st.reset(first, last - first)
            offset = end
        st.skip_unallocated = False
        return True

    async def _loop(self) -> None:
        """cf. backup_loop over block_copy_dirty_clusters: up to ``workers`` runs copy at
        once (one at a time under a speed limit); after a failure the others finish, then
        the error policy decides (a new pass takes what is still dirty)."""
        st = self.copy
        while True:
            if self.is_cancelled or self.ret < 0:
                return
            await self.pause_point()
            if self.is_cancelled:
                return
            workers = 1 if self.speed else self.params.max_workers
            claims: list[Claim] = []
            while len(claims) < workers:
                claim = st.claim_next(self.chunk)
                if claim is None:
                    break
                claims.append(claim)
            if not claims:
                if st.busy:  # guest writes are still copying their clusters
                    await st.wait_changed()
                    continue
                break
            nbytes = sum((c.end - c.first) * st.cluster_size for c in claims)
            results = await asyncio.gather(*(st.copy(c) for c in claims),
                                           return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                if not isinstance(failure, CopyError):
                    raise failure
                policy = (self.params.on_source_error if failure.is_read
                          else self.params.on_target_error)
                if self.error_action(policy, failure.is_read, failure.errno) == "report":
                    self._record_error(-failure.errno)
                    return
                continue
            self.ratelimit_processed(nbytes)
            await self.ratelimit_sleep()
        try:
            await self.target.flush()
        except BlockIOError as e:
            if self.error_action(self.params.on_target_error, False, e.errno) == "report":
                self._record_error(-e.errno)

    # --- completion ---------------------------------------------------------------------------

    async def commit(self) -> None:
        if self.params.bitmap is not None:
            self.params.bitmap.finish(True)

    async def abort(self) -> None:
        if self.params.bitmap is not None:
            self.params.bitmap.finish(False, self.copy.bitmap)

    async def clean(self) -> None:
        """cf. backup_clean: the filter goes (copies in flight finish first)."""
        self.cbw.active = False
        while self.copy.busy:
            await self.copy.wait_changed()
        self.wiring.detach()
        if self.params.owns_target:
            await self.wiring.close_target_if_unused()

    # --- resuming: a job leaves PAUSED within the command that resumes it -------------------

    def _transition(self, new: JobStatus) -> None:
        if new == self.status == JobStatus.RUNNING:
            return  # the pause point's own transition, made early by _resume_now()
        super()._transition(new)

    def _resume_now(self) -> None:
        """cf. job_resume -> job_enter, which runs the job up to its next yield at once:
        the ``running`` event comes before the command's reply, as QEMU's does."""
        if self.paused and self.pause_count == 0 and self.status == JobStatus.PAUSED:
            self._transition(JobStatus.RUNNING)

    def resume(self) -> None:
        super().resume()
        self._resume_now()

    def pause(self) -> None:
        super().pause()
        if self.paused and self.status == JobStatus.RUNNING:
            # resumed early but still at its pause point: it stays there
            self._transition(JobStatus.PAUSED)

    async def user_cancel(self, force: bool) -> None:
        """A backup's cancel is always forced and ends within the command: QEMU's events
        (aborting, BLOCK_JOB_CANCELLED, concluded, null) come before the reply (bounded, in
        case the job's I/O hangs)."""
        await super().user_cancel(force)
        if self.started and not self.is_completed:
            waiter = asyncio.ensure_future(self.wait_finished())
            _done, pending = await asyncio.wait({waiter}, timeout=CANCEL_WAIT_S)
            for w in pending:
                w.cancel()

    def _emit_final_event(self) -> None:
        # cf. job_finalize_single: events only for jobs that started
        if self.started:
            super()._emit_final_event()

    # --- completion-mode=grouped (cf. JobTxn in job.c) -----------------------------------------

    @property
    def txn_completed(self) -> bool:
        """cf. job_is_completed: the job's run is over."""
        return self.status.value in ("waiting", "pending", "aborting", "concluded", "null")

    async def _completed(self) -> None:
        txn = self.txn
        if txn is None:
            await super()._completed()
            return
        if self.status.value in ("concluded", "null"):
            return  # the group finished it already
        if self.ret == 0 and self.is_cancelled:
            self._record_error(-errno.ECANCELED)
        if self.ret != 0:
            if self.status.value != "aborting":
                self._transition(JobStatus.ABORTING)
            await txn.abort(self)
            return
        self._transition(JobStatus.WAITING)
        await txn.job_succeeded()

    async def cancel(self, force: bool) -> None:
        """A grouped job that already finished its run takes its group down with it (cf.
        job_cancel_locked -> job_completed_txn_abort)."""
        txn = self.txn
        if (txn is not None and not txn.aborting and self.started
                and self.status.value in ("waiting", "pending")):
            self.cancelled = self.force_cancel = True
            self._awaiting_finalize = False
            self._record_error(-errno.ECANCELED)
            self._transition(JobStatus.ABORTING)
            await txn.abort(self)
            return
        if self.status.value == "null":
            return
        await super().cancel(force)

    async def finalize(self) -> None:
        txn = self.txn
        if txn is None:
            await super().finalize()
            return
        self.apply_verb(JobVerb.FINALIZE)
        if not self._awaiting_finalize:
            return
        await txn.finalize()

    async def finish_single(self) -> None:
        """cf. job_finalize_single: commit or abort, clean, the event, concluded."""
        self._awaiting_finalize = False
        if self.ret == 0:
            await self.commit()
        else:
            await self.abort()
        await self.clean()
        self._emit_final_event()
        self._conclude()

    async def wait_run_done(self) -> None:
        """Until the job's task has finished its run and completion steps."""
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            await asyncio.wait({task})


class BackupTxn:
    """Jobs that complete together (``completion-mode=grouped``), newest first as QEMU
    walks them: all reach PENDING before any finalizes; one failing cancels the others."""

    def __init__(self) -> None:
        self.jobs: list[BackupJob] = []
        self.aborting = False

    def add(self, job: BackupJob) -> None:
        self.jobs.insert(0, job)
        job.txn = self

    async def job_succeeded(self) -> None:
        """cf. job_completed_txn_success: once every run is over, all go PENDING."""
        if not all(j.txn_completed for j in self.jobs):
            return
        for j in self.jobs:
            j._transition(JobStatus.PENDING)
            if not j.auto_finalize:
                j.events.emit("BLOCK_JOB_PENDING", {"type": j.job_type, "id": j.id})
                j._awaiting_finalize = True
        if all(j.auto_finalize for j in self.jobs):
            await self.finalize()

    async def finalize(self) -> None:
        """cf. job_do_finalize: every job of the group finishes (ours prepare nothing)."""
        for j in list(self.jobs):
            await j.finish_single()

    async def abort(self, failed: BackupJob) -> None:
        """cf. job_completed_txn_abort: cancel the others, then abort every job."""
        if self.aborting:
            return
        self.aborting = True
        for j in self.jobs:
            if j is failed:
                continue
            if j.txn_completed:
                j.cancelled = j.force_cancel = True
            else:
                j._cancel_async(True)
                j._enter()
        for j in list(self.jobs):
            if not j.txn_completed and j.started:
                await j.wait_run_done()
            if j.ret == 0:
                j._record_error(-errno.ECANCELED)
            if j.status.value not in ("aborting", "concluded", "null"):
                j._transition(JobStatus.ABORTING)
            if j.status.value == "aborting":
                await j.finish_single()


def release_unstarted(job: BackupJob) -> None:
    """Undo what the job took before it could start (setup failed)."""
    job.cbw.active = False
    job.wiring.detach()
    if job.params.bitmap is not None:
        job.params.bitmap.finish(False)


__all__ = ["BackupJob", "BackupParams", "BackupTxn", "release_unstarted"]
