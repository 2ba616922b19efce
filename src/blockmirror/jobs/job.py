"""The job core: one job's life cycle, pause points, cancellation and completion (cf. job.c).

A ``Job`` runs its ``run()`` coroutine as an asyncio task owned by the ``JobManager``. Its
status moves only through ``_transition()``, which checks ``status.TRANSITIONS`` and emits
``JOB_STATUS_CHANGE`` on the daemon's event bus on every real change. User verbs are gated by
``status.VERBS`` with QEMU's text. Subclasses (``jobs/mirror/``) implement ``run()`` and the
hooks ``prepare/commit/abort/clean``, ``on_cancel``, ``on_complete``, ``on_pause``.

Theory of operation: the job task calls ``pause_point()`` and ``sleep_ns()`` regularly. Pausing
(user or internal) only raises ``pause_count``; the task notices at its next pause point and
waits there (PAUSED, or STANDBY when READY) until the count drops to zero. ``_enter()`` wakes a
task that is sleeping; a task that is busy re-checks its flags at the next pause point anyway.
When ``run()`` returns, completion follows QEMU's ``job_completed``: WAITING, PENDING, then
finalize (prepare, commit, clean, event, CONCLUDED, NULL) or, on error or forced cancel,
ABORTING, abort, clean, event, CONCLUDED, NULL.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar

from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.jobs.progress import Progress
from blockmirror.jobs.ratelimit import RateLimit
from blockmirror.jobs.status import JobStatus, JobVerb, can_transition, verb_allowed, verb_error

if TYPE_CHECKING:
    from blockmirror.jobs.manager import JobManager

log = logging.getLogger(__name__)

S = JobStatus


class Job:
    """Base class of every job (mirror now; create/commit later)."""

    #: the JobType wire value ("mirror", "create", ...)
    job_type: ClassVar[str] = ""
    #: block jobs appear in query-block-jobs and emit BLOCK_JOB_* events
    is_block_job: ClassVar[bool] = True

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        *,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        speed: int = 0,
    ) -> None:
        self.manager = manager
        self.events = manager.events
        self.clock = manager.clock
        self.id = job_id
        self.status = S.UNDEFINED
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.progress = Progress()
        self.limit = RateLimit(self.clock, speed)
        #: pauses requested (user + internal, e.g. drains and shutdown); >0 means "stop"
        self.pause_count = 0
        self.user_paused = False
        #: the task is stopped at a pause point right now
        self.paused = False
        #: the task is running (not sleeping or waiting at a pause point)
        self.busy = False
        self.cancelled = False
        self.force_cancel = False
        #: run() has returned; completion is in progress or waiting for finalize
        self.deferred = False
        self.started = False
        #: 0 or a negative errno; ``error`` is the text QMP reports
        self.ret = 0
        self.error: str | None = None
        self.io_status = "ok"
        self._wake = asyncio.Event()
        self._timer_pending = False
        self._awaiting_finalize = False
        self._finished = asyncio.Event()
        #: set whenever the task stops at a pause point or finishes its run
        self._quiet = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._transition(S.CREATED)

    # --- the state machine ----------------------------------------------------------------

    def _transition(self, new: JobStatus) -> None:
        """The only writer of ``status`` (cf. job_state_transition_locked)."""
        old = self.status
        if not can_transition(old, new):
            raise AssertionError(f"job {self.id!r}: illegal transition {old} -> {new}")
        self.status = new
        log.debug("job %s: %s -> %s", self.id, old.value, new.value)
        if old != new and self.id:
            self.events.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new.value})

    def apply_verb(self, verb: JobVerb) -> None:
        """Raise QEMU's GenericError if ``verb`` is not accepted now (cf. job_apply_verb)."""
        if not verb_allowed(verb, self.status):
            raise verb_error(self.id, self.status, verb)

    # --- predicates -----------------------------------------------------------------------

    @property
    def is_cancelled(self) -> bool:
        """A forced cancel: the job must stop as soon as possible (cf. job_is_cancelled)."""
        return self.cancelled and self.force_cancel

    @property
    def cancel_requested(self) -> bool:
        """Any cancel, soft or forced (cf. job_cancel_requested)."""
        return self.cancelled

    @property
    def is_ready(self) -> bool:
        return self.status in (S.READY, S.STANDBY)

    @property
    def is_completed(self) -> bool:
        return self.status in (S.CONCLUDED, S.NULL)

    @property
    def speed(self) -> int:
        return self.limit.speed

    def _should_pause(self) -> bool:
        return self.pause_count > 0

    # --- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """CREATED -> RUNNING and launch the task under the manager (cf. job_start)."""
        assert self.status == S.CREATED and not self.started
        self.started = True
        self.busy = True
        self._transition(S.RUNNING)
        self._task = self.manager.spawn(self._main(), f"job-{self.id}")

    async def _main(self) -> None:
        try:
            await self.run()
        except asyncio.CancelledError:
            raise
        except BlockIOError as e:
            self._record_error(-e.errno, str(e))
        except BlockMirrorError as e:
            self._record_error(-errno.EINVAL, str(e))
        except Exception as e:  # a bug in a job must not take the daemon down
            log.exception("job %s crashed", self.id)
            self._record_error(-errno.EIO, f"{type(e).__name__}: {e}")
        self.busy = False
        self.deferred = True
        self._quiet.set()
        await self._completed()

    async def run(self) -> None:
        """The job's work. Return normally on success; raise to fail with the error's text."""
        raise NotImplementedError

    def _record_error(self, ret: int, desc: str | None = None) -> None:
        if self.ret == 0:
            self.ret = ret if ret < 0 else -errno.EIO
            self.error = desc if desc is not None else os.strerror(-self.ret)

    def _enter(self) -> None:
        """Wake the task if it is sleeping (cf. job_enter)."""
        if self.started and not self.deferred and not self.busy:
            self._wake.set()

    async def _yield(self, ns: int | None) -> None:
        """Sleep ``ns`` nanoseconds, or until woken; ``None``: until woken (cf. job_do_yield)."""
        self.busy = False
        self._wake.clear()
        try:
            if ns is None:
                await self._wake.wait()
            elif ns <= 0:
                await self.clock.sleep_ns(0)
            else:
                self._timer_pending = True
                sleeper = asyncio.ensure_future(self.clock.sleep_ns(ns))
                waker = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeper.cancel()
                    waker.cancel()
                    self._timer_pending = False
        finally:
            self.busy = True

    async def pause_point(self) -> None:
        """Stop here while paused (cf. job_pause_point)."""
        if not self._should_pause() or self.is_cancelled:
            return
        await self.on_pause()
        if self._should_pause() and not self.is_cancelled:
            status = self.status
            self._transition(S.STANDBY if status == S.READY else S.PAUSED)
            self.paused = True
            self._quiet.set()
            while self._should_pause() and not self.is_cancelled:
                await self._yield(None)
            self.paused = False
            self._quiet.clear()
            self._transition(status)
        await self.on_resume()

    async def sleep_ns(self, ns: int) -> None:
        """Sleep (woken early by cancel/resume/speed changes), then a pause point.

        A pause requested while the task was busy skips the sleep (cf. job_sleep_ns): the
        task stops at once instead of sleeping out a long rate-limit delay first.
        """
        if not self.is_cancelled and not self._should_pause():
            await self._yield(ns)
        await self.pause_point()

    async def ratelimit_sleep(self) -> None:
        """cf. block_job_ratelimit_sleep: yields even without a limit."""
        while True:
            delay = self.limit.calculate_delay(0)
            await self.sleep_ns(delay)
            if delay == 0 or self.is_cancelled:
                return

    def ratelimit_processed(self, nbytes: int) -> None:
        self.limit.calculate_delay(nbytes)

    def transition_to_ready(self) -> None:
        """cf. job_transition_to_ready: once, with BLOCK_JOB_READY after the status change."""
        self._transition(S.READY)
        if self.is_block_job:
            self.events.emit("BLOCK_JOB_READY", self._event_data())

    # --- pause / resume ---------------------------------------------------------------------

    def pause(self) -> None:
        """An internal pause (drains, shutdown): nests, never visible as user_paused."""
        self.pause_count += 1
        self._enter()

    def resume(self) -> None:
        assert self.pause_count > 0
        self.pause_count -= 1
        if self.pause_count == 0:
            self._enter()

    def user_pause(self) -> None:
        self.apply_verb(JobVerb.PAUSE)
        if self.user_paused:
            raise BlockMirrorError("Job is already paused")
        self.user_paused = True
        self.pause()

    def user_resume(self) -> None:
        if not self.user_paused or self.pause_count <= 0:
            raise BlockMirrorError("Can't resume a job that was not paused")
        self.apply_verb(JobVerb.RESUME)
        self.on_user_resume()
        self.user_paused = False
        self.resume()

    def on_user_resume(self) -> None:
        """cf. block_job_user_resume: a user resume clears the I/O status."""
        self.io_status = "ok"

    def iostatus_set_err(self, err: int) -> None:
        if self.io_status == "ok":
            self.io_status = "nospace" if err == errno.ENOSPC else "failed"

    # --- speed --------------------------------------------------------------------------------

    def set_speed(self, speed: int) -> None:
        """cf. block_job_set_speed: a sleeping job is woken when the limit got looser."""
        self.apply_verb(JobVerb.SET_SPEED)
        if speed < 0:
            raise BlockMirrorError("Parameter 'speed' expects a non-negative value")
        old = self.limit.speed
        self.limit.set_speed(speed)
        if speed and speed <= old:
            return
        if self._timer_pending:
            self._enter()

    # --- cancel / complete / finalize / dismiss ---------------------------------------------

    def on_cancel(self, force: bool) -> bool:
        """Driver hook: may turn a soft cancel into a forced one. Default: always forced."""
        return True

    async def on_complete(self) -> None:
        raise BlockMirrorError(f"The active block job '{self.id}' cannot be completed")

    def supports_complete(self) -> bool:
        return False

    async def on_pause(self) -> None:
        """Driver hook run at a pause point before stopping (mirror: wait for its I/O)."""

    async def on_resume(self) -> None:
        """Driver hook run when leaving a pause point."""

    def _cancel_async(self, force: bool) -> None:
        if self.deferred and not self._awaiting_finalize:
            # completion is already running (QEMU does it without yielding): too late
            return
        force = self.on_cancel(force)
        if self.user_paused:
            self.on_user_resume()
            self.user_paused = False
            assert self.pause_count > 0
            self.pause_count -= 1
        # a soft cancel after the work is done is ignored (cf. job_cancel_async_locked)
        if force or not self.deferred:
            self.cancelled = True
            self.force_cancel |= force

    async def cancel(self, force: bool) -> None:
        """cf. job_cancel_locked (no verb check; see user_cancel)."""
        if self.status == S.CONCLUDED:
            self._do_dismiss()
            return
        self._cancel_async(force)
        if not self.started:
            self._record_error(-errno.ECANCELED)
            self.deferred = True
            await self._completed()
        elif self.deferred:
            if self.is_cancelled and self._awaiting_finalize:
                self._awaiting_finalize = False
                await self._abort_path()
        else:
            self._enter()

    async def user_cancel(self, force: bool) -> None:
        self.apply_verb(JobVerb.CANCEL)
        await self.cancel(force)

    async def complete(self) -> None:
        """cf. job_complete_locked."""
        self.apply_verb(JobVerb.COMPLETE)
        if self.cancel_requested or not self.supports_complete():
            raise BlockMirrorError(f"The active block job '{self.id}' cannot be completed")
        await self.on_complete()

    async def finalize(self) -> None:
        self.apply_verb(JobVerb.FINALIZE)
        if not self._awaiting_finalize:
            return  # auto-finalize is already under way
        self._awaiting_finalize = False
        await self._do_finalize()

    def dismiss(self) -> None:
        self.apply_verb(JobVerb.DISMISS)
        self._do_dismiss()

    # --- completion ---------------------------------------------------------------------------

    async def _completed(self) -> None:
        """cf. job_completed: success goes to WAITING/PENDING, failure to ABORTING."""
        if self.ret == 0 and self.is_cancelled:
            self._record_error(-errno.ECANCELED)
        if self.ret != 0:
            await self._abort_path()
            return
        self._transition(S.WAITING)
        self._transition(S.PENDING)
        if not self.auto_finalize:
            if self.is_block_job:
                self.events.emit("BLOCK_JOB_PENDING", {"type": self.job_type,
                                                              "id": self.id})
            self._awaiting_finalize = True
            return
        await self._do_finalize()

    async def _do_finalize(self) -> None:
        try:
            await self.prepare()
        except asyncio.CancelledError:
            raise
        except BlockMirrorError as e:
            err = e.errno if isinstance(e, BlockIOError) else errno.EPERM
            self._record_error(-err, os.strerror(err))
            await self._abort_path()
            return
        await self.commit()
        await self.clean()
        self._emit_final_event()
        self._conclude()

    async def _abort_path(self) -> None:
        if self.ret == 0:
            self._record_error(-errno.ECANCELED)
        if self.status != S.ABORTING:
            self._transition(S.ABORTING)
        try:
            await self.abort()
            await self.clean()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: abort failed", self.id)
        self._emit_final_event()
        self._conclude()

    def _emit_final_event(self) -> None:
        if not self.is_block_job:
            return
        data = self._event_data()
        if self.is_cancelled:
            self.events.emit("BLOCK_JOB_CANCELLED", data)
            return
        if self.error is not None:
            data["error"] = self.error
        self.events.emit("BLOCK_JOB_COMPLETED", data)

    def _conclude(self) -> None:
        self._transition(S.CONCLUDED)
        if self.auto_dismiss or not self.started:
            self._do_dismiss()
        self._finished.set()

    def _do_dismiss(self) -> None:
        self._transition(S.NULL)
        self.manager.remove(self)
        self._finished.set()

    def dispose_unstarted(self) -> None:
        """Drop a job whose setup failed after creation (JOB_STATUS_CHANGE null)."""
        assert not self.started
        self._do_dismiss()

    async def wait_quiet(self) -> None:
        """Until the task is stopped at a pause point or its run has ended (drains)."""
        await self._quiet.wait()

    async def wait_finished(self) -> None:
        """Until the job is CONCLUDED (or gone)."""
        await self._finished.wait()

    # --- hooks for completion -------------------------------------------------------------------

    async def prepare(self) -> None:
        """Success path before commit; raising turns the job into ABORTING."""

    async def commit(self) -> None:
        """Success path."""

    async def abort(self) -> None:
        """Failure path."""

    async def clean(self) -> None:
        """Both paths, after commit/abort."""

    # --- queries --------------------------------------------------------------------------------

    def _event_data(self) -> dict[str, Any]:
        return {"device": self.id, "len": self.progress.total, "offset": self.progress.current,
                "speed": self.speed, "type": self.job_type}

    def query_job(self) -> dict[str, Any]:
        """cf. JobInfo (query-jobs)."""
        info: dict[str, Any] = {
            "current-progress": self.progress.current,
            "status": self.status.value,
            "total-progress": self.progress.total,
            "type": self.job_type,
            "id": self.id,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    def query_block_job(self) -> dict[str, Any]:
        """cf. BlockJobInfo (query-block-jobs), with QEMU 7.2's member set."""
        info: dict[str, Any] = {
            "auto-finalize": self.auto_finalize,
            "io-status": self.io_status,
            "device": self.id,
            "auto-dismiss": self.auto_dismiss,
            "busy": self.busy,
            "len": self.progress.total,
            "offset": self.progress.current,
            "status": self.status.value,
            "paused": self.pause_count > 0,
            "speed": self.speed,
            "ready": self.is_ready,
            "type": self.job_type,
        }
        if self.error is not None:
            info["error"] = self.error
        return info


__all__ = ["Job"]
