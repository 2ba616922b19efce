"""Differential QMP scripts: run the same mirror scenario against qemu-storage-daemon and ours.

A script is a list of steps executed over a ``qemu.qmp.QMPClient``:

    ("cmd", name, args)       execute; the reply (return or error class + desc) is recorded
    ("wait", event[, n])      wait until ``event`` has been seen ``n`` times (default: once more)
    ("status", job, statuses)  poll (unrecorded) until ``job``'s status is one of ``statuses``
                              ("absent": the job is gone)
    ("progress", job, n)      poll (unrecorded) until ``job`` has copied ``n`` bytes and is
                              not busy (e.g. asleep in its rate limit)
    ("settle",)               poll (unrecorded) until no job is in a passing state (created,
                              waiting, aborting; concluded when auto-dismissed; pending when
                              auto-finalized)
    ("sleep", seconds)        only as a window in which nothing may happen, never to wait

Every wait has a generous deadline (``limit_s``) instead of a fixed sleep, so a loaded machine
slows a script down without changing its transcript.

``run_script`` returns a ``Transcript``: the replies and the events, each normalised so that two
daemons compare equal when they behave alike (timestamps dropped, byte counts reduced to the
relation between offset and len, ``busy`` dropped: it only says whether a coroutine happened to
be running; a mirror's ``actively-synced`` dropped: a QEMU 8.2 member 7.2 does not have).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

Step = tuple[Any, ...]


def _norm_progress(d: dict[str, Any], off: str, ln: str) -> dict[str, Any]:
    out = dict(d)
    if off in out and ln in out:
        o, n = out.pop(off), out.pop(ln)
        out["progress"] = "done" if o == n else ("partial" if o < n else "over")
    out.pop("busy", None)
    out.pop("actively-synced", None)
    return out


def norm_event(ev: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ev["event"], _norm_progress(ev.get("data", {}), "offset", "len")


def norm_reply(name: str, reply: Any) -> Any:
    if name == "query-block-jobs" and isinstance(reply, list):
        return [_norm_progress(j, "offset", "len") for j in reply]
    if name == "query-jobs" and isinstance(reply, list):
        return [_norm_progress(j, "current-progress", "total-progress") for j in reply]
    return reply


@dataclass
class Transcript:
    replies: list[tuple[str, Any]] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


async def run_script(
    qmp: Any, steps: list[Step], limit_s: float = 60.0, workdir: str | None = None
) -> Transcript:
    """Run ``steps``; occurrences of ``workdir`` in error texts become ``$W``."""
    from qemu.qmp import ExecuteError

    tr = Transcript()
    seen: dict[str, int] = {}
    waited: dict[str, int] = {}
    cond = asyncio.Condition()

    async def listen() -> None:
        async for ev in qmp.events:
            async with cond:
                tr.events.append(norm_event(dict(ev)))
                seen[ev["event"]] = seen.get(ev["event"], 0) + 1
                if ev["event"] == "JOB_STATUS_CHANGE":
                    key = f"JOB_STATUS_CHANGE:{ev['data']['status']}"
                    seen[key] = seen.get(key, 0) + 1
                cond.notify_all()

    async def poll(done: Any, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while True:
            jobs = await qmp.execute("query-block-jobs")
            if done(jobs):
                return
            if loop.time() > deadline:
                raise AssertionError(f"{what}: not reached in {limit_s} s: {jobs}")
            await asyncio.sleep(0.01)

    def passing(job: dict[str, Any]) -> bool:
        st = job["status"]
        return (st in ("created", "waiting", "aborting", "undefined")
                or (st == "concluded" and job["auto-dismiss"])
                or (st == "pending" and job["auto-finalize"]))

    async def drain() -> None:
        # events sent before the last reply are queued in qmp.events: let the listener
        # take them all (it appends without yielding)
        for _ in range(100_000):
            if qmp.events.empty():
                break
            await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)

    listener = asyncio.ensure_future(listen())
    try:
        for step in steps:
            kind = step[0]
            if kind == "cmd":
                name, args = step[1], step[2] if len(step) > 2 else None
                try:
                    rsp = await asyncio.wait_for(qmp.execute(name, args), limit_s)
                    tr.replies.append((name, norm_reply(name, rsp)))
                except ExecuteError as e:
                    desc = str(e).replace(workdir, "$W") if workdir else str(e)
                    tr.replies.append((name, {"error": [e.error_class, desc]}))
            elif kind == "wait":
                name = step[1]
                want = step[2] if len(step) > 2 else waited.get(name, 0) + 1
                waited[name] = want
                def reached(n: str = name, w: int = want) -> bool:
                    return seen.get(n, 0) >= w

                async with cond:
                    await asyncio.wait_for(cond.wait_for(reached), limit_s)
            elif kind == "status":
                job_id, statuses = step[1], step[2]

                def reached_status(jobs: list[dict[str, Any]], j: str = job_id,
                                   want: Any = statuses) -> bool:
                    found = [x["status"] for x in jobs if x["device"] == j]
                    return (found[0] if found else "absent") in want

                await poll(reached_status, f"job {job_id} in {statuses}")
            elif kind == "progress":
                job_id, least = step[1], step[2]

                def progressed(jobs: list[dict[str, Any]], j: str = job_id,
                               n: int = least) -> bool:
                    return any(x["device"] == j and x["offset"] >= n and not x["busy"]
                               for x in jobs)

                await poll(progressed, f"job {job_id} at offset {least}, not busy")
            elif kind == "settle":
                await poll(lambda jobs: not any(passing(x) for x in jobs), "settled jobs")
            elif kind == "sleep":
                await asyncio.sleep(step[1])
            else:
                raise ValueError(f"unknown step {step!r}")
        # a last round trip (unless the script quit): every event the daemon sent before it
        # is then queued; then let the listener take them
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.execute("query-version"), limit_s)
        await drain()
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    return tr


@contextlib.asynccontextmanager
async def qsd_client(workdir: str) -> AsyncIterator[Any]:
    """A negotiated QMPClient to a fresh qemu-storage-daemon (killed on exit)."""
    from qemu.qmp import QMPClient

    sock = os.path.join(workdir, "qsd-qmp.sock")
    # stdout (the "Formatting ..." lines) is kept in workdir/qsd.out for the tests
    with open(os.path.join(workdir, "qsd.out"), "wb") as out:  # noqa: ASYNC230 - instant
        proc = await asyncio.create_subprocess_exec(
            "qemu-storage-daemon", "--chardev", f"socket,id=m0,path={sock},server=on,wait=off",
            "--monitor", "chardev=m0", stdout=out, stderr=asyncio.subprocess.DEVNULL,
        )
    qmp = QMPClient("qsd")
    try:
        # retry until the monitor listens (the socket may exist before listen())
        for attempt in range(500):
            try:
                await qmp.connect(sock)
                break
            except Exception:
                if attempt == 499 or proc.returncode is not None:
                    raise
                await asyncio.sleep(0.01)
        yield qmp
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def our_client(workdir: str) -> AsyncIterator[Any]:
    """A negotiated QMPClient to an in-process blockmirror daemon (shut down on exit)."""
    from blockmirror.qmp.testing import qmp_daemon

    async with qmp_daemon(workdir) as td:
        yield await td.client()


def make_images(workdir: str, size: int = 4 << 20, data: int = 2 << 20) -> dict[str, str]:
    """src.raw with ``data`` bytes of 0xab at 0, empty tgt.raw; both ``size`` bytes."""
    src = os.path.join(workdir, "src.raw")
    tgt = os.path.join(workdir, "tgt.raw")
    for path in (src, tgt):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", path, str(size)], check=True)
    if data:
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0xab 0 {data}", src],
                       check=True, capture_output=True)
    return {"src": src, "tgt": tgt}


__all__ = ["Step", "Transcript", "make_images", "norm_event", "norm_reply", "our_client",
           "qsd_client", "run_script"]
