"""The convergence monitor's policy against fakes: a scripted job, a recording throttle."""

from __future__ import annotations

from typing import Any

from blockmirror.cli.progress import Phase, Snapshot, combine, render_line
from blockmirror.errors import BlockMirrorError
from blockmirror.events import EventBus
from blockmirror.jobs.mirror.converge import ConvergenceMonitor, ConvergePolicy
from blockmirror.jobs.mirror.forecast import SEC, Sample
from blockmirror.qapi.x_mirror import XConvergePolicy as Mode

MIB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.t = 0

    def now_ns(self) -> int:
        return self.t

    async def sleep_ns(self, ns: int) -> None:
        raise AssertionError("the tests tick by hand")


class FakeJob:
    """Copies ``copy`` B/s while the guest adds ``dirty`` B/s of new dirty data."""

    id = "j"

    def __init__(self, clock: FakeClock, copy: int, dirty: int, speed: int = 0) -> None:
        self.clock, self.copy, self.dirty, self.speed = clock, copy, dirty, speed
        self.copy_mode = "background"
        self.copied = self.dirtied = 0
        self.remaining = 64 * MIB
        self.refuse = False

    def step(self) -> None:
        self.clock.t += SEC // 10
        self.copied += self.copy // 10
        self.dirtied += self.dirty // 10
        self.remaining = max(0, self.remaining + (self.dirty - self.copy) // 10)

    def convergence_sample(self) -> Sample | None:
        return Sample(self.clock.t, self.copied, self.dirtied, self.remaining, self.speed)

    def set_copy_mode(self, mode: str) -> None:
        if self.refuse:
            raise BlockMirrorError("no")
        self.copy_mode = mode
        self.dirty = 0  # write-blocking: guest writes no longer dirty anything


class FakeThrottle:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def limit_writes(self, bps: int) -> None:
        self.calls.append(("limit", bps))

    def lift(self) -> None:
        self.calls.append("lift")


def _run(policy: ConvergePolicy, job: FakeJob, seconds: float,
         throttle: FakeThrottle | None = None) -> tuple[ConvergenceMonitor, list[Any]]:
    events = EventBus()
    mon = ConvergenceMonitor(job, job.clock, events, policy, throttle)
    for _ in range(int(seconds * 10)):
        job.step()
        mon.tick()
    return mon, [(e["event"], e["data"]) for e in events.history]


def test_none_only_reports() -> None:
    job = FakeJob(FakeClock(), copy=2 * MIB, dirty=4 * MIB)
    mon, events = _run(ConvergePolicy(Mode.NONE), job, 3)
    assert job.copy_mode == "background" and mon.action is None
    assert [d["verdict"] for n, d in events] == ["not-converging"]
    assert "action" not in mon.info()


def test_write_blocking_acts_once_and_reports() -> None:
    job = FakeJob(FakeClock(), copy=2 * MIB, dirty=4 * MIB, speed=2 * MIB)
    mon, events = _run(ConvergePolicy(Mode.WRITE_BLOCKING), job, 5)
    assert job.copy_mode == "write-blocking"
    actions = [d for n, d in events if n == "X_BLOCK_JOB_CONVERGENCE_ACTION"]
    assert len(actions) == 1 and actions[0]["action"] == "write-blocking"
    assert "throttled-by-speed" in actions[0]["reason"]
    assert mon.info()["action"] == "write-blocking"
    assert mon.forecast.verdict.value == "converging"  # the switch fixed it


def test_a_deadline_beyond_the_eta_triggers_the_policy() -> None:
    # converging at 0.5 MiB/s net: 128 s to go, beyond a 60 s deadline
    job = FakeJob(FakeClock(), copy=4 * MIB, dirty=int(3.5 * MIB))
    mon, _events = _run(ConvergePolicy(Mode.AUTO, deadline_s=60), job, 3)
    assert job.copy_mode == "write-blocking"
    assert "deadline" in (mon.action_reason or "")
    # ... but not within a longer one
    job = FakeJob(FakeClock(), copy=4 * MIB, dirty=int(3.5 * MIB))
    mon, _events = _run(ConvergePolicy(Mode.AUTO, deadline_s=600), job, 3)
    assert job.copy_mode == "background" and mon.action is None


def test_throttle_asks_the_guest_throttle_and_change_lifts_it() -> None:
    job = FakeJob(FakeClock(), copy=2 * MIB, dirty=4 * MIB)
    throttle = FakeThrottle()
    mon, _events = _run(ConvergePolicy(Mode.THROTTLE, throttle_bps=MIB), job, 3, throttle)
    assert throttle.calls == [("limit", MIB)]
    assert job.copy_mode == "background" and mon.action == "throttle"
    mon.change(ConvergePolicy(Mode.THROTTLE, throttle_bps=MIB // 2))
    assert throttle.calls[-1] == ("limit", MIB // 2)
    mon.change(ConvergePolicy(Mode.NONE))
    assert throttle.calls[-1] == "lift" and mon.action is None
    mon.stop()
    assert throttle.calls[-1] == "lift"


def test_a_refused_switch_is_not_reported() -> None:
    job = FakeJob(FakeClock(), copy=2 * MIB, dirty=4 * MIB)
    job.refuse = True
    mon, events = _run(ConvergePolicy(Mode.AUTO), job, 3)
    assert mon.action is None
    assert not [n for n, _d in events if n == "X_BLOCK_JOB_CONVERGENCE_ACTION"]


def _snap(**kw: Any) -> Snapshot:
    base: dict[str, Any] = {"elapsed": 1.0, "phase": Phase.COPYING, "disk_size": 8 * MIB,
                            "done": MIB, "copied": MIB, "zeroed": 0, "redirtied": 0,
                            "remaining": 2 * MIB, "rate": MIB, "eta": 2.0, "speed": 0,
                            "status": "running"}
    base.update(kw)
    return Snapshot(**base)


def test_progress_shows_verdict_and_group_sums() -> None:
    line = render_line(_snap(verdict="not-converging", eta=None, action="write-blocking"))
    assert "verdict not-converging" in line and "policy: write-blocking" in line
    assert "ETA --" in line
    both = combine([_snap(verdict="converging", eta=3.0),
                    _snap(verdict="throttled-by-speed", eta=None, reason="slow")],
                   elapsed=1.0, rate=2 * MIB, phase=Phase.COPYING)
    assert both.disks == 2 and both.remaining == 4 * MIB and both.disk_size == 16 * MIB
    assert both.verdict == "throttled-by-speed" and both.reason == "slow" and both.eta is None
    fine = combine([_snap(verdict="converging", eta=3.0), _snap(verdict="converging", eta=5.0)],
                   elapsed=1.0, rate=2 * MIB, phase=Phase.COPYING)
    assert fine.eta == 5.0 and fine.verdict == "converging"
