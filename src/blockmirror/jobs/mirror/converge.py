"""The convergence monitor of one mirror: forecast, report, and (opt-in) act.

An extension (QMP ``x-converge`` on blockdev-mirror/drive-mirror and block-job-change): a
mirror that has it samples its counters every ``INTERVAL_NS`` of the job's clock, feeds the
``Forecaster`` (``forecast.py``), reports the forecast in query-block-jobs
(``x-convergence``) and emits ``X_BLOCK_JOB_CONVERGENCE`` when the verdict changes. With a
policy other than ``none`` it acts once when the job will not converge, or not within the
deadline: it switches the job to write-blocking (``set_copy_mode``), or asks a
``GuestThrottle`` to slow the guest's writes, and reports that with
``X_BLOCK_JOB_CONVERGENCE_ACTION`` and the query field. Without ``x-converge`` none of this
exists and the job behaves exactly as QEMU's.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

from blockmirror.block.node import BlockNode
from blockmirror.clock import Clock
from blockmirror.errors import BlockMirrorError
from blockmirror.events import EventBus
from blockmirror.jobs.mirror.forecast import Forecast, Forecaster, Sample, Verdict
from blockmirror.jobs.ratelimit import RateLimit
from blockmirror.qapi.x_mirror import XConvergePolicy as PolicyMode

#: how often the monitor samples (a tenth of the forecast window)
INTERVAL_NS = 100_000_000
#: the deadline when none is given: a forecast beyond it counts as "will not converge"
DEFAULT_DEADLINE_S = 300


@dataclass
class ConvergePolicy:
    """What x-converge asks: the mode, the deadline and, for throttle, the guest's rate."""

    mode: PolicyMode = PolicyMode.NONE
    #: seconds: an ETA beyond this is as bad as no convergence
    deadline_s: int = DEFAULT_DEADLINE_S
    #: bytes per second the guest may write once throttled (THROTTLE only)
    throttle_bps: int = 0


class GuestThrottle(Protocol):
    """Something that can slow the guest's writes to the mirrored disk."""

    def limit_writes(self, bps: int) -> None: ...

    def lift(self) -> None: ...


class WriteThrottle:
    """A ``GuestThrottle`` as a write interceptor on the guest's path (the node the guest
    writes through): each write waits until the rate allows it (QEMU's slice limiter)."""

    def __init__(self, node: BlockNode, clock: Clock) -> None:
        self.node = node
        self.clock = clock
        self.limit = RateLimit(clock)
        self._installed = False

    def limit_writes(self, bps: int) -> None:
        self.limit.set_speed(bps)
        if not self._installed:
            self.node.interceptors.insert(0, self)
            self._installed = True

    def lift(self) -> None:
        if self._installed:
            with contextlib.suppress(ValueError):
                self.node.interceptors.remove(self)
            self._installed = False

    async def around_write(self, node: BlockNode, kind: str, offset: int, length: int,
                           proceed: Any) -> None:
        if kind != "discard" and self.limit.enabled:
            delay = self.limit.calculate_delay(length)
            if delay:
                await self.clock.sleep_ns(delay)
        await proceed()


class MonitoredJob(Protocol):
    """What the monitor reads and asks of its mirror job."""

    id: str
    copy_mode: str

    def convergence_sample(self) -> Sample | None: ...

    def set_copy_mode(self, mode: str) -> None: ...


class ConvergenceMonitor:
    def __init__(self, job: MonitoredJob, clock: Clock, events: EventBus,
                 policy: ConvergePolicy, throttle: GuestThrottle | None) -> None:
        self.job = job
        self.clock = clock
        self.events = events
        self.policy = policy
        self.throttle = throttle
        self.forecaster = Forecaster()
        #: what the policy did ("write-blocking", "throttle"), and why
        self.action: str | None = None
        self.action_reason: str | None = None
        self._emitted: Verdict | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def forecast(self) -> Forecast:
        return self.forecaster.current

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        """The job is ending: stop sampling and lift any throttle."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.throttle is not None:
            self.throttle.lift()

    def change(self, policy: ConvergePolicy) -> None:
        """block-job-change: a new policy. A throttle is lifted by a policy that does not
        throttle (a switch to write-blocking cannot be undone, cf. mirror_change)."""
        if self.action == "throttle" and self.throttle is not None:
            if policy.mode == PolicyMode.THROTTLE:
                self.throttle.limit_writes(policy.throttle_bps)
            else:
                self.throttle.lift()
                self.action = self.action_reason = None
        self.policy = policy

    async def _run(self) -> None:
        while True:
            await self.clock.sleep_ns(INTERVAL_NS)
            self.tick()

    # --- one sample ---------------------------------------------------------------------------

    def tick(self) -> None:
        sample = self.job.convergence_sample()
        if sample is None:
            return
        f = self.forecaster.add(sample)
        if (self._emitted is None and f.steady) or (
                self._emitted is not None and f.verdict != self._emitted):
            self._emitted = f.verdict
            self.events.emit("X_BLOCK_JOB_CONVERGENCE", {"device": self.job.id,
                                                         **self._forecast_fields(f)})
        if f.steady:
            self._apply_policy(f)

    def _apply_policy(self, f: Forecast) -> None:
        mode = self.policy.mode
        if mode == PolicyMode.NONE or self.action is not None:
            return
        late = f.eta is not None and f.eta > self.policy.deadline_s
        if f.verdict == Verdict.CONVERGING and not late:
            return
        why = (f"the forecast is {f.eta:.0f} s, beyond the {self.policy.deadline_s} s deadline"
               if f.verdict == Verdict.CONVERGING else f"{f.verdict.value}: {f.reason}")
        if mode in (PolicyMode.AUTO, PolicyMode.WRITE_BLOCKING):
            if self.job.copy_mode == "write-blocking":
                return  # nothing more this policy can do
            try:
                self.job.set_copy_mode("write-blocking")
            except BlockMirrorError:
                return
            self._acted("write-blocking", why)
        elif mode == PolicyMode.THROTTLE and self.throttle is not None:
            self.throttle.limit_writes(self.policy.throttle_bps)
            self._acted("throttle", f"{why}; guest writes limited to "
                                    f"{self.policy.throttle_bps} bytes/s")

    def _acted(self, action: str, reason: str) -> None:
        self.action, self.action_reason = action, reason
        self.events.emit("X_BLOCK_JOB_CONVERGENCE_ACTION", {
            "device": self.job.id, "action": action, "reason": reason})

    # --- reports ------------------------------------------------------------------------------

    @staticmethod
    def _forecast_fields(f: Forecast) -> dict[str, Any]:
        out: dict[str, Any] = {"verdict": f.verdict.value, "reason": f.reason,
                               "remaining": f.remaining, "copy-rate": int(f.copy_rate),
                               "dirty-rate": int(f.dirty_rate)}
        if f.eta is not None:
            out["eta"] = round(f.eta, 3)
        return out

    def info(self) -> dict[str, Any]:
        """The ``x-convergence`` member of query-block-jobs."""
        out = self._forecast_fields(self.forecast)
        out["policy"] = self.policy.mode.value
        out["deadline"] = self.policy.deadline_s
        if self.action is not None:
            out["action"] = self.action
            out["action-reason"] = self.action_reason
        return out


__all__ = ["DEFAULT_DEADLINE_S", "INTERVAL_NS", "ConvergePolicy", "ConvergenceMonitor",
           "GuestThrottle", "MonitoredJob", "PolicyMode", "WriteThrottle"]
