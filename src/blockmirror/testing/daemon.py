"""An in-process blockmirror daemon for test suites, driven over real QMP.

``start_daemon()`` runs a ``Daemon`` on its own event loop in a background thread, serving QMP
on a unix socket in a temporary directory, and hands back a ``DaemonHandle`` with a connected
``qemu.qmp`` client (the synchronous ``QEMUMonitorProtocol`` that QEMU's own iotests use) and
typed helpers for the extension commands: ``handle.clock`` (the virtual clock) and
``handle.faults`` (fault rules). Starting one takes milliseconds: no process, no image files.

    with start_daemon(blockdevs=[{"driver": "null-co", "node-name": "disk0"}],
                      clock="virtual") as bm:
        bm.execute("blockdev-mirror", **{"job-id": "j", ...})
        bm.clock.advance(1_000_000_000)
        bm.wait_event("BLOCK_JOB_READY")

The daemon is shut down (jobs cancelled, images flushed and closed) by ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from blockmirror.daemon import Daemon

SEC = 1_000_000_000


class CommandError(Exception):
    """A QMP command answered with an error: ``error_class`` and ``desc`` are QEMU's."""

    def __init__(self, name: str, error_class: str, desc: str) -> None:
        super().__init__(f"{name}: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


def execute(qmp: Any, name: str, **args: Any) -> Any:
    """Run one command on a ``QEMUMonitorProtocol`` and return its ``return`` value, or raise
    ``CommandError`` (built on ``cmd_obj``, whose meaning every qemu.qmp release shares)."""
    msg: dict[str, Any] = {"execute": name}
    if args:
        msg["arguments"] = args
    rsp = qmp.cmd_obj(msg)
    if "error" in rsp:
        raise CommandError(name, rsp["error"]["class"], rsp["error"]["desc"])
    return rsp["return"]


@dataclass(frozen=True)
class ClockStep:
    now_ns: int
    fired: int


@dataclass(frozen=True)
class ClockInfo:
    virtual: bool
    now_ns: int
    timers: int
    fired: int
    next_deadline_ns: int | None


class ClockControl:
    """Typed wrappers of the x-clock-* / x-query-clock commands."""

    def __init__(self, qmp: Any) -> None:
        self._qmp = qmp

    def info(self) -> ClockInfo:
        r = execute(self._qmp, "x-query-clock")
        return ClockInfo(r["virtual"], r["now-ns"], r["timers"], r["fired"],
                         r.get("next-deadline-ns"))

    def now_ns(self) -> int:
        return self.info().now_ns

    def advance(self, ns: int) -> ClockStep:
        """Move virtual time ``ns`` forward, firing due timers in order."""
        r = execute(self._qmp, "x-clock-advance", ns=ns)
        return ClockStep(r["now-ns"], r["fired"])

    def run_to_next_timer(self) -> ClockStep:
        r = execute(self._qmp, "x-clock-run-to-next-timer")
        return ClockStep(r["now-ns"], r["fired"])

    def run_until(self, done: Callable[[], bool], max_timers: int = 100_000) -> ClockStep:
        """Fire timers one by one until ``done()`` (checked before each); raises
        ``TimeoutError`` when no timer is left or ``max_timers`` fired first."""
        step = ClockStep(self.now_ns(), 0)
        for _ in range(max_timers):
            if done():
                return step
            step = self.run_to_next_timer()
            if not step.fired:
                if done():
                    return step
                raise TimeoutError("no timer left and the condition does not hold")
        raise TimeoutError(f"condition still false after {max_timers} timers")


@dataclass(frozen=True)
class FaultRule:
    """A rule as x-query-faults reports it."""

    id: str
    node_name: str
    operation: str
    offset: int
    once: bool
    delay_ns: int
    matched: int
    fired: int
    length: int | None = None
    nth: int | None = None
    probability: float | None = None
    seed: int | None = None
    errno: str | None = None

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> FaultRule:
        return cls(id=d["id"], node_name=d["node-name"], operation=d["operation"],
                   offset=d["offset"], once=d["once"], delay_ns=d["delay-ns"],
                   matched=d["matched"], fired=d["fired"], length=d.get("length"),
                   nth=d.get("nth"), probability=d.get("probability"), seed=d.get("seed"),
                   errno=d.get("errno"))


class FaultControl:
    """Typed wrappers of x-fault-add / x-fault-remove / x-query-faults."""

    def __init__(self, qmp: Any) -> None:
        self._qmp = qmp

    def add(self, node_name: str, operation: str, *, errno: str | None = None,
            offset: int | None = None, length: int | None = None, nth: int | None = None,
            probability: float | None = None, seed: int | None = None,
            delay_ns: int | None = None, once: bool = False, id: str | None = None
            ) -> FaultRule:
        """Fail (or delay) ``operation`` requests on ``node_name``; see docs/qmp.md."""
        args: dict[str, Any] = {"node-name": node_name, "operation": operation}
        for key, value in (("errno", errno), ("offset", offset), ("length", length),
                           ("nth", nth), ("probability", probability), ("seed", seed),
                           ("delay-ns", delay_ns), ("id", id)):
            if value is not None:
                args[key] = value
        if once:
            args["once"] = True
        return FaultRule.from_qmp(execute(self._qmp, "x-fault-add", **args))

    def remove(self, rule: FaultRule | str) -> None:
        execute(self._qmp, "x-fault-remove", id=rule if isinstance(rule, str) else rule.id)

    def list(self, node_name: str | None = None) -> list[FaultRule]:
        args = {} if node_name is None else {"node-name": node_name}
        return [FaultRule.from_qmp(d) for d in execute(self._qmp, "x-query-faults", **args)]


class DaemonHandle:
    """A running in-process daemon: its socket, a connected client, typed helpers."""

    def __init__(self, daemon: Daemon, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread, stop: asyncio.Event, workdir: str,
                 own_workdir: bool) -> None:
        #: the Daemon object (lives on the daemon thread: inspect, do not drive it)
        self.daemon = daemon
        self.loop = loop
        self._thread = thread
        self._stop = stop
        self.workdir = workdir
        self._own_workdir = own_workdir
        self.socket_path = os.path.join(workdir, "qmp.sock")
        self._clients: list[Any] = []
        self.qmp = self.client()
        self.clock = ClockControl(self.qmp)
        self.faults = FaultControl(self.qmp)
        #: every event wait_event() has read from ``qmp`` so far, in order
        self.events: list[dict[str, Any]] = []

    def client(self) -> Any:
        """Another negotiated ``qemu.qmp.legacy.QEMUMonitorProtocol`` on this daemon."""
        qmp = QEMUMonitorProtocol(self.socket_path)
        qmp.connect(negotiate=True)
        self._clients.append(qmp)
        return qmp

    def execute(self, name: str, **args: Any) -> Any:
        """``name`` on ``qmp``: its return value, or ``CommandError``. Members with dashes
        go in as ``**{"job-id": "j"}``."""
        return execute(self.qmp, name, **args)

    def wait_event(self, name: str, timeout: float = 10.0,
                   match: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The next event ``name`` on ``qmp`` (whose data contains ``match``); the events
        skipped on the way are kept in ``events`` too."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event within {timeout} s")
            try:
                ev = self.qmp.pull_event(wait=float(left))
            except TimeoutError:
                raise TimeoutError(f"no {name} event within {timeout} s") from None
            if ev is None:
                continue
            self.events.append(ev)
            data = ev.get("data", {})
            if ev["event"] == name and all(data.get(k) == v for k, v in (match or {}).items()):
                return dict(ev)

    def event_names(self) -> list[str]:
        return [e["event"] for e in self.events]

    def close(self) -> None:
        for qmp in self._clients:
            with contextlib.suppress(Exception):
                qmp.close()
        self._clients.clear()
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DaemonHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass
class _Started:
    ready: threading.Event = field(default_factory=threading.Event)
    daemon: Any = None
    loop: asyncio.AbstractEventLoop | None = None
    stop: asyncio.Event | None = None
    error: BaseException | None = None


def start_daemon(blockdevs: Iterable[Mapping[str, Any]] = (), *, clock: str = "monotonic",
                 workdir: str | os.PathLike[str] | None = None) -> DaemonHandle:
    """Start a daemon thread (``clock``: "monotonic" or "virtual"), add ``blockdevs``
    (blockdev-add arguments, in order) and return its handle; see the module docstring."""
    own = workdir is None
    # unix socket paths are short (108 bytes): a fresh short directory, not a deep tmp_path
    wd = tempfile.mkdtemp(prefix="bm-") if workdir is None else os.fspath(workdir)
    started = _Started()
    sock = os.path.join(wd, "qmp.sock")

    async def main() -> None:
        daemon = Daemon(clock)
        started.daemon = daemon
        started.loop = asyncio.get_running_loop()
        started.stop = asyncio.Event()
        server = daemon.qmp_server()
        try:
            await server.listen_unix(sock)
        except BaseException as e:
            started.error = e
            started.ready.set()
            raise
        started.ready.set()
        try:
            await started.stop.wait()
        finally:
            await server.close()
            await daemon.shutdown()

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # reported to the starter, or lost after start-up
            if not started.ready.is_set():
                started.error = e
                started.ready.set()

    thread = threading.Thread(target=thread_main, name="blockmirror-daemon", daemon=True)
    thread.start()
    started.ready.wait(30)
    if started.error is not None or started.loop is None or started.stop is None:
        thread.join(5)
        if own:
            shutil.rmtree(wd, ignore_errors=True)
        raise RuntimeError(f"blockmirror daemon failed to start: {started.error!r}")
    handle = DaemonHandle(started.daemon, started.loop, thread, started.stop, wd, own)
    try:
        for bd in blockdevs:
            handle.execute("blockdev-add", **dict(bd))
    except BaseException:
        handle.close()
        raise
    return handle


__all__ = ["ClockControl", "ClockInfo", "ClockStep", "CommandError", "DaemonHandle",
           "FaultControl", "FaultRule", "execute", "start_daemon"]
