"""Issue 14: a speed-limited 1 GiB mirror stepped through every state on the virtual clock,
over QMP (x-clock-*), in well under a second.

Where the time of the first test goes (measured, idle machine, pytest, PYTHONDONTWRITEBYTECODE=1
as on the development machines): about 0.04 s of CPU for the 64 timer firings and 128 QMP round
trips that step the mirror (the null-co source reports neither data nor zeroes, so the mirror
discards 1 GiB on the target in 64 runs of 16 MiB, one per rate-limit wake, and moves no bytes),
and about 0.2 s for the first command, which imports the command modules: pytest rewrites the
asserts of every ``blockmirror`` module (the ``pytest11`` entry point marks the package) and
cannot cache the result without bytecode writing. Run after other tests, the imports are done.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from blockmirror.daemon import Daemon
from blockmirror.qmp.testing import qmp_daemon

GIB = 1 << 30
MIB = 1 << 20
SEC = 1_000_000_000
SPEED = 100 * MIB


def _events(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for ev in history:
        data = ev["data"]
        out.append((ev["event"], data.get("status") or data.get("device") or data.get("id", "")))
    return out


#: the acceptance bound (issue 14): the whole run, from daemon start to the job's dismissal
BUDGET_S = 1.0


def test_speed_limited_mirror_steps_through_every_state_on_virtual_time(
        record_property: Any) -> None:
    # Two bounds. The whole run (daemon start to dismissal, imports included) is bounded in
    # CPU time of this process (every thread), which is insensitive to other load. The
    # stepping itself, from blockdev-mirror to job-dismiss, is bounded in wall time, as the
    # acceptance says: a real clock would make it last 10.24 s; here it is 64 timer firings
    # and about 130 QMP round trips. Imports are left out of the wall bound: pytest rewrites
    # every module's asserts on first import, which a loaded machine can stretch.
    wall0, cpu0 = time.monotonic(), time.process_time()
    stepping: list[float] = []

    async def main() -> None:
        async with qmp_daemon(daemon=Daemon(clock="virtual")) as td:
            qmp = await td.client()
            for n in ("src", "tgt"):
                await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": n,
                                                   "size": GIB})
            t0 = (await qmp.execute("x-query-clock"))["now-ns"]
            stepping.append(time.monotonic())
            await qmp.execute("blockdev-mirror", {
                "job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                "speed": SPEED, "auto-finalize": False, "auto-dismiss": False})
            # time stands still: however often we look, the job waits for the clock
            for _ in range(5):
                job = (await qmp.execute("query-block-jobs"))[0]
            stalled = job["offset"]
            assert 0 < stalled < GIB and job["status"] == "running"
            assert (await qmp.execute("x-query-clock"))["now-ns"] == t0
            steps = 0
            while not job["ready"]:
                step = await qmp.execute("x-clock-run-to-next-timer")
                assert step["fired"] >= 1
                steps += 1
                elapsed = step["now-ns"] - t0
                job = (await qmp.execute("query-block-jobs"))[0]
                # the rate limit paces it: never more than speed * time plus one slice, plus
                # the first burst (a request is charged whole, after it was dispatched)
                assert job["offset"] <= SPEED * (elapsed + SEC // 10) // SEC + stalled, (
                    steps, job)
                assert steps < 1000
            elapsed = (await qmp.execute("x-query-clock"))["now-ns"] - t0
            # 1 GiB at 100 MiB/s is 10.24 virtual seconds, to within one 100 ms slice
            assert abs(elapsed - GIB * SEC // SPEED) <= SEC // 10, elapsed
            assert job["offset"] == job["len"] == GIB
            await qmp.execute("block-job-complete", {"device": "j"})
            # with auto-finalize off the job stops in PENDING; pivot needs no clock
            await td.next_event(qmp, "BLOCK_JOB_PENDING")
            await qmp.execute("job-finalize", {"id": "j"})
            await td.next_event(qmp, "BLOCK_JOB_COMPLETED")
            (info,) = await qmp.execute("query-jobs")
            assert info["status"] == "concluded"
            await qmp.execute("job-dismiss", {"id": "j"})
            assert await qmp.execute("query-jobs") == []
            stepping.append(time.monotonic())
            assert _events(td.daemon.events.history) == [
                ("JOB_STATUS_CHANGE", "created"),
                ("JOB_STATUS_CHANGE", "running"),
                ("JOB_STATUS_CHANGE", "ready"),
                ("BLOCK_JOB_READY", "j"),
                ("JOB_STATUS_CHANGE", "waiting"),
                ("JOB_STATUS_CHANGE", "pending"),
                ("BLOCK_JOB_PENDING", "j"),
                ("BLOCK_JOB_COMPLETED", "j"),
                ("JOB_STATUS_CHANGE", "concluded"),
                ("JOB_STATUS_CHANGE", "null"),
            ]

    asyncio.run(main())
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    step_wall = stepping[1] - stepping[0]
    record_property("cpu_s", round(cpu, 3))
    record_property("wall_s", round(wall, 3))
    record_property("stepping_wall_s", round(step_wall, 3))
    print(f"1 GiB mirror stepped on the virtual clock: {cpu:.3f} s CPU, {wall:.3f} s wall, "
          f"{step_wall:.3f} s wall from blockdev-mirror to job-dismiss")
    assert cpu < BUDGET_S, f"{cpu:.3f} s of CPU ({wall:.3f} s wall)"
    # the acceptance line itself: stepping the job through every state takes under a second
    # of wall time (about 0.05 s of CPU; the rest of the run is start-up and imports)
    assert step_wall < BUDGET_S, f"{step_wall:.3f} s of wall time stepping the mirror"


def test_advance_fires_the_job_timers_of_a_window_in_one_command() -> None:
    async def main() -> None:
        async with qmp_daemon(daemon=Daemon(clock="virtual")) as td:
            qmp = await td.client()
            for n in ("src", "tgt"):
                await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": n,
                                                   "size": 64 * MIB})
            await qmp.execute("blockdev-mirror", {"job-id": "j", "device": "src",
                                                  "target": "tgt", "sync": "full",
                                                  "speed": 16 * MIB})
            info = await qmp.execute("x-query-clock")
            assert info["virtual"] is True and info["timers"] == 1
            assert info["next-deadline-ns"] > info["now-ns"]
            # 64 MiB at 16 MiB/s: 4 s; 3 s are not enough, 1 more is
            step = await qmp.execute("x-clock-advance", {"ns": 3 * SEC})
            assert step["now-ns"] == info["now-ns"] + 3 * SEC and step["fired"] >= 2
            assert not (await qmp.execute("query-block-jobs"))[0]["ready"]
            await qmp.execute("x-clock-advance", {"ns": SEC})
            assert (await qmp.execute("query-block-jobs"))[0]["ready"]
            events = [e["event"] for e in td.daemon.events.history]
            assert "BLOCK_JOB_READY" in events
            await qmp.execute("block-job-cancel", {"device": "j"})
            await td.next_event(qmp, "BLOCK_JOB_COMPLETED")

    asyncio.run(main())


def test_clock_commands_on_a_real_clock() -> None:
    async def main() -> None:
        async with qmp_daemon() as td:
            raw = await td.raw(negotiate=True)
            info = (await raw.cmd("x-query-clock"))["return"]
            assert info["virtual"] is False and info["timers"] == 0
            for name, args in (("x-clock-advance", {"ns": 1}), ("x-clock-run-to-next-timer", None)):
                rsp = await raw.cmd(name, args)
                assert rsp == {"error": {"class": "GenericError", "desc":
                               "The clock is not virtual (start the daemon with --clock "
                               "virtual)"}}
        async with qmp_daemon(daemon=Daemon(clock="virtual")) as td:
            raw = await td.raw(negotiate=True)
            rsp = await raw.cmd("x-clock-advance", {"ns": -5})
            assert rsp["error"]["desc"] == "Parameter 'ns' expects a non-negative value"
            rsp = await raw.cmd("x-clock-run-to-next-timer")
            assert rsp["return"]["fired"] == 0

    asyncio.run(main())
