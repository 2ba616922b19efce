"""The mirror block job (cf. block/mirror.c), composed of parts that each do one thing.

``MirrorJob`` owns and wires:

* ``DirtyState`` (``dirty.py``): the bitmap of chunks still to copy; the source's tracker;
* ``InFlight`` (``inflight.py``): ops, bytes and buffer space in flight, and the pulse;
* ``Copier`` (``copier.py``): iterations and the batched copy / zero / discard ops;
* ``seed_dirty`` (``seeding.py``): the initial bitmap per sync mode;
* ``ActiveWriter`` (``active.py``): the source's write interceptor (write-blocking mode);
* ``DrainGate`` (``gate.py``): holds source writes while the job converges and pivots;
* ``MirrorWiring`` (``wiring.py``): the filter, target handle, blockers, and the pivot;
* ``ConvergenceMonitor`` (``converge.py``, extension ``x-converge``): the forecast and policy;
* a ``SwitchGroup`` (``group.py``, extension): pivots with other mirrors at one instant.
* ``ResumeCoordinator`` (``resume.py``, x-resume-log): the crash-safe sidecar;
* ``Verifier`` (``verify.py``, x-verify): the compare pass after READY.
* ``SyncBitmap`` (``sync_bitmap.py``, __org.blockmirror_bitmap): the named bitmap it starts
  from, busy while the job runs, and updated per bitmap-mode when it ends.

``run`` is QEMU's ``mirror_run``: seed, copy dirty chunks, go READY once a pass leaves
nothing dirty or in flight and a target flush succeeds, and on complete (or soft cancel)
converge, drain, flush and exit. ``prepare``/``abort`` hand over to the wiring's ``exit``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.jobs.blockjob import BlockJob
from blockmirror.jobs.manager import JobManager
from blockmirror.jobs.mirror.active import ActiveWriter
from blockmirror.jobs.mirror.converge import ConvergenceMonitor, ConvergePolicy, WriteThrottle
from blockmirror.jobs.mirror.copier import Copier, CopierConfig
from blockmirror.jobs.mirror.dirty import DirtyState
from blockmirror.jobs.mirror.forecast import Sample
from blockmirror.jobs.mirror.gate import DrainGate
from blockmirror.jobs.mirror.inflight import InFlight
from blockmirror.jobs.mirror.params import (
    DEFAULT_BUF_SIZE,
    GATHER_NS,
    MAX_IN_FLIGHT,
    MirrorParams,
    align_up,
    default_granularity,
)
from blockmirror.jobs.mirror.seeding import cow_setup, seed_dirty
from blockmirror.jobs.mirror.sync_bitmap import SyncBitmap
from blockmirror.jobs.mirror.verify import Verifier
from blockmirror.jobs.mirror.wiring import MirrorWiring
from blockmirror.jobs.ratelimit import SLICE_NS

if TYPE_CHECKING:
    from blockmirror.jobs.mirror.group import SwitchGroup
    from blockmirror.jobs.mirror.resume import ResumeCoordinator


class MirrorJob(BlockJob):
    job_type = "mirror"

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        source: BlockNode,
        target: BlockNode,
        params: MirrorParams,
        *,
        base: BlockNode | None = None,
    ) -> None:
        super().__init__(manager, job_id, auto_finalize=params.auto_finalize,
                         auto_dismiss=params.auto_dismiss, speed=0)
        self.params = params
        self.source = source
        self.target = target
        self.copy_mode = params.copy_mode
        self.should_complete = False
        self.actively_synced = False
        #: the dirty bitmap is in use (copying started): active writes may bypass it
        self.published = False
        self.bdev_length = source.length()
        granularity = params.granularity or default_granularity(target)
        buf_size = align_up(params.buf_size or DEFAULT_BUF_SIZE, granularity)
        self.dirty = DirtyState(self.bdev_length, granularity, self._on_dirty)
        self.inflight = InFlight()
        self.wiring = MirrorWiring(manager.graph, job_id, source, target, params, base)
        self.gate = DrainGate(self.wiring.quiesce_filter)
        self.copier = Copier(source, target, self.dirty, self.inflight, self.progress,
                             CopierConfig(granularity, buf_size, params.unmap),
                             self, self._on_copy_error)
        self.active = ActiveWriter(source, target, self.dirty, self.inflight, self.gate,
                                   self.progress, self, unmap=params.unmap)
        #: x-resume-log: the crash-safe sidecar (None without one)
        self.resume_log: ResumeCoordinator | None = None
        if params.resume is not None:
            # imported here: the resume machinery (its log formats, json, random) is 4-5 ms
            # of CPU that a mirror without x-resume-log would pay at its first start
            from blockmirror.jobs.mirror.resume import ResumeCoordinator

            self.resume_log = ResumeCoordinator(params.resume, source, target, self.dirty,
                                                done=lambda: self.progress.current)
        #: x-verify: the compare pass between READY and the pivot
        self.verifier = (Verifier(source, target, self.dirty, self.inflight, self.progress,
                                  lambda: self.is_cancelled or self.ret < 0,
                                  self._verify_pause_point)
                         if params.verify else None)
        #: __org.blockmirror_bitmap: the named bitmap the job starts from (sync=bitmap)
        self.sync_bitmap = (SyncBitmap(params.sync_bitmap, params.bitmap_mode or "never")
                            if params.sync_bitmap is not None else None)
        if self.sync_bitmap is not None:
            self.sync_bitmap.seed(self.dirty.bitmap)
        for observer in (self.resume_log, self.verifier):
            if observer is not None:
                self.active.observers.append(observer)
        self._holding_pause = False
        #: when the loop last started a copy pass (the clock's nanoseconds)
        self._last_pass_ns = 0
        #: extensions: the convergence forecast/policy, and the switch-over group
        self.convergence: ConvergenceMonitor | None = None
        self.group: SwitchGroup | None = None
        if params.converge is not None:
            self.set_convergence(params.converge)

    # --- what the parts ask of the job ---------------------------------------------------------

    @property
    def granularity(self) -> int:
        return self.dirty.granularity

    @property
    def buf_size(self) -> int:
        return self.copier.config.buf_size

    @property
    def failed(self) -> bool:
        return self.ret < 0

    def should_copy_to_target(self) -> bool:
        """cf. should_copy_to_target: write-blocking, published, healthy, not force-cancelled."""
        return (self.copy_mode == "write-blocking" and self.published and self.ret >= 0
                and not self.is_cancelled and not self.wiring.exited)

    @property
    def slice_quota(self) -> float:
        return self.limit.slice_quota

    def _on_dirty(self, newly: int) -> None:
        """A write reached the source without being copied."""
        if newly:
            self.progress.count("redirtied", newly)
        self.actively_synced = False

    def _mirror_error(self, is_read: bool, e: BlockIOError) -> None:
        """cf. mirror_error_action: out of sync, then the policy; "report" fails the job."""
        self.actively_synced = False
        policy = self.params.on_source_error if is_read else self.params.on_target_error
        if self.error_action(policy, is_read, e.errno) == "report":
            self._record_error(-e.errno, str(e))

    def _on_copy_error(self, is_read: bool, e: BlockIOError) -> None:
        self._mirror_error(is_read, e)

    def on_active_error(self, e: BlockIOError) -> None:
        self._mirror_error(False, e)

    # --- wiring ---------------------------------------------------------------------------------

    def attach(self) -> None:
        """Hook the job into the graph (undone by ``prepare``/``abort``).

        Raises:
            BlockMirrorError: permission conflicts, duplicate filter name.
        """
        self.wiring.attach(self.dirty, self.active)

    def _hold_drain(self) -> None:
        """Block new source writes until the job has exited (cf. bdrv_drained_begin)."""
        self.gate.close()
        if not self._holding_pause:
            # drained jobs count as paused in query-block-jobs, as in QEMU
            self._holding_pause = True
            self.pause()

    def _release_drain(self, redirect: BlockNode | None = None) -> None:
        if self.wiring.exited:
            # still drained: the sync bitmap's end state first (cf. mirror_exit_common)
            self._finish_sync_bitmap()
        self.gate.redirect = redirect
        if self._holding_pause:
            self._holding_pause = False
            self.resume()
        self.gate.open()

    # --- job hooks ------------------------------------------------------------------------------

    def on_cancel(self, force: bool) -> bool:
        """cf. mirror_cancel: before READY every cancel is forced, and a forced one stops
        the target's waits (an NBD target within its reconnect-delay fails at once)."""
        force = force or not self.is_ready
        if force:
            node: BlockNode | None = self.target
            for _ in range(8):  # the format node, its file, a filter's child
                if node is None:
                    break
                node.driver.cancel_in_flight()
                node = node.filtered_child() or node.child("file")
        return force

    def supports_complete(self) -> bool:
        return True

    async def on_complete(self) -> None:
        """cf. mirror_complete; a verification that left a mismatch refuses."""
        if self.group is not None and not self.group.switching:
            raise BlockMirrorError(f"The block job '{self.id}' belongs to group "
                                   f"'{self.group.name}': complete the group")
        v = self.verifier
        if v is not None and (v.unrepaired or v.error):
            raise BlockMirrorError(
                f"Cannot complete job '{self.id}': verification found {v.unrepaired} "
                f"mismatching chunk(s) between source and target that could not be repaired"
                + (f" ({v.error})" if v.error else ""))
        self.wiring.block_replaced()
        self.should_complete = True
        if not self.paused:
            self._enter()

    async def on_pause(self) -> None:
        """cf. mirror_pause: a paused job has no I/O of its own in flight. A paused job
        holds no guest writes for its catch-up either (``_catch_up``)."""
        if not self._holding_pause:
            self.gate.open()
        await self.inflight.wait_idle()

    def set_copy_mode(self, mode: str) -> None:
        """cf. mirror_change (block-job-change): only background -> write-blocking."""
        if mode == self.copy_mode:
            return
        if mode != "write-blocking":
            raise BlockMirrorError(f"Change to copy mode '{mode}' is not implemented")
        if self.copy_mode != "background":
            raise BlockMirrorError(
                f"Expected current copy mode 'background', got '{self.copy_mode}'"
            )
        self.copy_mode = mode

    async def prepare(self) -> None:
        self._stop_extensions()
        await self._end_extras(pivot=self.should_complete, before_exit=True)
        if self.group is not None:
            if self.should_complete:
                # the group pivots every member at one instant (or none: this raises)
                await self.group.member_prepare(self)
                await self._end_extras(pivot=True, before_exit=False)
                return
            self.group.member_failed(self)  # a soft cancel leaves the group: none pivots
        await self.wiring.exit(pivot=self.should_complete, release=self._release_drain)
        await self._end_extras(pivot=self.should_complete, before_exit=False)

    async def abort(self) -> None:
        self._stop_extensions()
        await self._end_extras(pivot=False, before_exit=True)
        if self.group is not None:
            self.group.member_failed(self)
        await self.wiring.exit(pivot=False, release=self._release_drain)

    def _finish_sync_bitmap(self) -> None:
        """cf. mirror_exit_common's bitmap-mode step: after the pivot (or its failure), while
        guest writes are still held, the sync bitmap gets what is still dirty."""
        sb = self.sync_bitmap
        if sb is not None:
            sb.finish([self.dirty.bitmap, self.dirty.in_flight],
                      success=(self.ret == 0 and not self.is_cancelled
                               and not self.wiring.exit_failed))

    async def clean(self) -> None:
        """cf. mirror_clean: the sync bitmap is no longer busy."""
        sb = self.sync_bitmap
        if sb is not None:
            self._finish_sync_bitmap()  # nothing left to do if the exit did it
            sb.release()

    # --- extensions (x-converge, switch-over groups) -----------------------------------------

    def start(self) -> None:
        super().start()
        if self.convergence is not None:
            self.convergence.start()

    def _stop_extensions(self) -> None:
        if self.convergence is not None:
            self.convergence.stop()

    def set_convergence(self, policy: ConvergePolicy) -> None:
        """Turn the forecast on (or change its policy): x-converge."""
        if self.convergence is not None:
            self.convergence.change(policy)
            return
        self.convergence = ConvergenceMonitor(
            self, self.clock, self.events, policy,
            WriteThrottle(self.source, self.clock))
        if self.started and not self.deferred:
            self.convergence.start()

    def convergence_sample(self) -> Sample | None:
        """The counters the forecast reads (None while the bitmap is being seeded)."""
        if not self.published or self.deferred:
            return None
        inflight = self.inflight
        return Sample(self.clock.now_ns(), self.progress.current, self.dirty.marked_bytes,
                      self.dirty.dirty_bytes() + inflight.bytes + inflight.active_bytes,
                      self.speed)

    async def _end_extras(self, *, pivot: bool, before_exit: bool) -> None:
        """Stop the verifier; the resume sidecar: closed checkpoint, or gone after a pivot.

        The closed checkpoint is written while writes are still held (before the wiring
        releases them): it records the source as of its last tracked write.
        """
        if before_exit and self.verifier is not None:
            await self.verifier.stop()
        if self.resume_log is None:
            return
        if before_exit and pivot:
            await self.resume_log.before_pivot()  # (an in-image area only)
        if before_exit and not pivot:
            if self.wiring.exited:
                # a failed pivot: writes went on untracked; no closed checkpoint may claim
                # otherwise (the last one stays, with the crash-time checks)
                await self.resume_log.abandon()
                return
            await self.resume_log.finish(pivoted=False)
        elif not before_exit and pivot:
            await self.resume_log.finish(pivoted=True)

    @property
    def itemised(self) -> bool:
        """The job was started with an extension: its query shows the ``x-`` members."""
        return self.resume_log is not None or self.verifier is not None

    def query_block_job(self) -> dict[str, Any]:
        """QEMU's members, then the extension members of the extensions in use."""
        info = super().query_block_job()
        if self.job_type == "mirror":
            # QEMU 8.2+: the mirror branch of BlockJobInfo, after the common members
            info["actively-synced"] = self.actively_synced
        if self.itemised:
            info.update(self.extension_info())
        if self.convergence is not None:
            info["x-convergence"] = self.convergence.info()
        if self.group is not None:
            info["x-group"] = self.group.name
        return info

    def extension_info(self) -> dict[str, Any]:
        """The itemised, monotonic ``x-`` counters (query-block-jobs ``x-progress``)."""
        info: dict[str, Any] = {}
        p = self.progress
        info.update({
            "x-copied": p.copied,
            "x-zero-skipped": p.zeroed + p.discarded + p.skipped,
            "x-redirtied": p.redirtied,
            "x-verified": p.verified,
            "x-resumed": p.resumed,
            "x-active-written": p.active_written,
        })
        v = self.verifier
        if v is not None:
            info["x-verify-mismatches"] = v.mismatches
            info["x-verify-unrepaired"] = v.unrepaired
            if v.digest is not None:
                info["x-verify-digest"] = v.digest
        return info

    async def _verify_pause_point(self) -> None:
        """The verification pass stops while the job is paused."""
        while self.paused and not self.is_cancelled:
            await self.clock.sleep_ns(SLICE_NS)

    async def _after_ready(self) -> None:
        if self.resume_log is not None:
            await self.resume_log.tick(self.clock.now_ns(), self.progress.current,
                                      ready=True, in_sync=True, force=True)
        if self.verifier is not None:
            self.verifier.start()

    async def _final_verify(self) -> bool:
        """Under the drain, before the pivot: re-verify what changed since; False fails."""
        v = self.verifier
        if v is None or not self.should_complete or self.cancel_requested:
            return True
        await v.final_pass()
        self.events.emit("X_BLOCK_JOB_VERIFIED", {
            "device": self.id, "verified": self.progress.verified,
            "mismatches": v.mismatches, "repaired": v.repaired,
            "unrepaired": v.unrepaired, "digest": v.digest or ""})
        if v.unrepaired or v.error or v.digest is None:
            self._record_error(-errno.EIO, (
                f"verification found {v.unrepaired} mismatching chunk(s) between source "
                "and target that could not be repaired") if v.unrepaired else (
                v.error or "verification could not check every chunk"))
            return False
        return True

    # --- the run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """cf. mirror_run."""
        if self.target.length() != self.bdev_length and not self.params.target_is_backing:
            raise BlockMirrorError("Source and target image have different sizes")
        if self.bdev_length == 0:
            self.published = True
            self.transition_to_ready()
            self.actively_synced = True
            while not self.cancel_requested and not self.should_complete:
                await self._yield(None)
                await self.pause_point()
            self._hold_drain()
            return
        cluster, needs_cow = cow_setup(self.target, self.dirty)
        cfg = self.copier.config
        cfg.target_cluster_size = cluster
        if self.dirty.cow is not None:
            cfg.buf_size = max(cfg.buf_size, cluster)
        self.active.target_needs_cow = needs_cow
        self.active.cluster_aligned = self.copier._cluster_aligned
        drained = False
        resumed = False
        if self.resume_log is not None:
            try:
                skipped = self.resume_log.apply()
                resumed = self.resume_log.plan.resumed
                self.progress.count("resumed", skipped)
                await self.resume_log.start()
            except BlockMirrorError:
                self.resume_log.release()
                raise
        async with self.copier.running():
            if self.params.sync != "none" and not resumed:
                await seed_dirty(self.dirty, self.copier, self, sync=self.params.sync,
                                 target_is_zero=self.params.target_is_zero)
                if self.is_cancelled or self.ret < 0:
                    self._hold_drain()
                    return
            if self.resume_log is not None:
                self.resume_log.seeded = True
            self.published = True
            drained = await self._loop()
        if not drained:
            # failed or force-cancelled: still hold writes off until the filter is gone
            self._hold_drain()

    def _gather_left(self, cnt: int) -> int:
        """How much longer to let guest writes gather before the next copy pass (0: now).

        In READY, a guest writing all the time keeps a chunk or two dirty whenever an op
        ends, and copying each at once made every guest write pay a whole pass in Python
        (block status, launch, a worker hop, the finish: about 110 µs of CPU per 64 KiB
        write of a max-rate writer, against 15 µs in qemu-storage-daemon, and the writer
        waited for it). Passes at most every ``GATHER_NS`` carry that trickle in batches.
        Never before READY, when completing or cancelling, or once a batch's worth is dirty
        (the job must keep up, not fall behind).
        """
        if (not self.is_ready or self.should_complete or self.cancel_requested
                or cnt >= self.copier.batch_bytes):
            return 0
        return max(0, self._last_pass_ns + GATHER_NS - self.clock.now_ns())

    def _catch_up(self, cnt: int) -> None:
        """Completing or soft-cancelling in READY with less than a batch left: close the gate
        to new guest writes (the job is not paused, so it keeps copying), so that a moment
        with nothing dirty comes. Without it that moment waits on the loop's scheduling: a
        guest writing at queue depth 1 dirtied a chunk again as each copy ended, and on
        uvloop a soft cancel under a max-rate writer took 0.6-0.9 s in two runs of three
        (0.02-0.1 s on CPython's loop). The guest waits for at most one batch's copy and the
        final flush, as it waits for the flush in QEMU's drained section; an error, a pause
        or more than a batch dirty opens the gate again."""
        finishing = (self.is_ready and (self.should_complete or self.cancel_requested)
                     and (self.verifier is None or self.cancel_requested
                          or self.verifier.done))
        if finishing and self.io_status == "ok" and cnt <= self.copier.batch_bytes:
            self.gate.close()
        elif not self._holding_pause:
            self.gate.open()

    async def _flush_target(self) -> bool:
        try:
            await self.target.flush()
        except BlockIOError as e:
            self._mirror_error(False, e)
            return False
        return True

    async def _loop(self) -> bool:
        """The main loop; True when it exited drained and in sync (cf. mirror_run's loop)."""
        inflight, dirty = self.inflight, self.dirty
        last_pause = self.clock.now_ns()
        while True:
            if self.ret < 0:
                return False
            await self.pause_point()
            if self.is_cancelled:
                return False
            if self.resume_log is not None:
                await self.resume_log.tick(
                    self.clock.now_ns(), self.progress.current, ready=self.is_ready,
                    in_sync=dirty.dirty_bytes() == 0 and inflight.ops == 0)
            cnt = dirty.dirty_bytes()
            self.progress.set_remaining(inflight.bytes + cnt + inflight.active_bytes)
            self._catch_up(cnt)
            delta = self.clock.now_ns() - last_pause
            if delta < SLICE_NS and self.io_status == "ok":
                if (inflight.ops >= MAX_IN_FLIGHT or inflight.buf_used >= self.copier.budget()
                        or (cnt == 0 and inflight.ops > 0)):
                    await inflight.wait_pulse()
                    continue
                if cnt:
                    gather = self._gather_left(cnt)
                    if gather:
                        await self.sleep_ns(gather)
                        continue
                    await self.copier.iteration(wide=self.is_ready)
                    self._last_pass_ns = self.clock.now_ns()
            should_complete = False
            if inflight.ops == 0 and cnt == 0:
                if not self.is_ready:
                    if not await self._flush_target():
                        await self.ratelimit_sleep()
                        continue
                    self.transition_to_ready()
                    await self._after_ready()
                if self.copy_mode != "background":
                    self.actively_synced = True
                should_complete = self.should_complete or self.cancel_requested
                if (self.verifier is not None and not self.cancel_requested
                        and not self.verifier.done):
                    should_complete = False  # the verification pass comes first
                cnt = dirty.dirty_bytes()
            if cnt == 0 and should_complete:
                self._hold_drain()
                await inflight.wait_no_writers()
                if (dirty.dirty_bytes() == 0 and await self._flush_target()
                        and dirty.dirty_bytes() == 0 and not inflight.writers):
                    return await self._final_verify()
                self._release_drain()
                continue
            if self.is_ready and not should_complete:
                # idle: poll once a slice; busy: still yield, so writers and the monitor run
                # between passes (cf. job_sleep_ns(0) in mirror_run)
                await self.sleep_ns(SLICE_NS if inflight.ops == 0 and cnt == 0 else 0)
            else:
                await self.ratelimit_sleep()
            last_pause = self.clock.now_ns()


def start_mirror(
    manager: JobManager,
    job_id: str,
    source: BlockNode,
    target: BlockNode,
    params: MirrorParams,
    *,
    base: BlockNode | None = None,
) -> MirrorJob:
    """Validate, create, wire and start a mirror job (cf. mirror_start_job), QEMU's order.

    Raises:
        BlockMirrorError: buf-size, mirror into itself, filter over the source chain, job id,
            speed, permission conflicts. Failures after the job exists emit created/null.
    """
    if params.buf_size < 0:
        raise BlockMirrorError("Invalid parameter 'buf-size'")
    if source.skip_filters() is target.skip_filters():
        raise BlockMirrorError("Can't mirror node into itself")
    if target.driver.is_filter and target.skip_filters() in source.backing_chain():
        raise BlockMirrorError(
            "Cannot mirror to a filter on top of a node in the source's backing chain"
        )
    manager.check_new_id(job_id)
    job = MirrorJob(manager, job_id, source, target, params, base=base)
    manager.add(job)
    job.attach_at_speed(params.speed)
    if job.sync_bitmap is not None:
        job.sync_bitmap.hold()
    job.start()
    return job


__all__ = ["MirrorJob", "start_mirror"]
