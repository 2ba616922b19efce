"""`blockmirror mirror SOURCE TARGET`: a one-shot live mirror with an honest progress display.

CLI layer. It runs one in-process ``Daemon`` in one asyncio loop: it opens SOURCE behind a
BlockBackend called ``drive0`` (the "guest device"), optionally exports it over NBD so writers
keep going during the copy, optionally serves QMP on a unix socket, and starts the job through
QMP ``drive-mirror`` itself (argument validation and handler, exactly as a monitor would). It
then watches the job, completes it at READY (or on SIGUSR1 / QMP ``block-job-complete`` with
``--wait``), force-cancels on SIGINT/SIGTERM, and maps the outcome to an exit code. It never
re-implements graph, job or NBD logic; everything goes through the daemon's own APIs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from blockmirror.block.create import parse_size
from blockmirror.block.node import BlockBackend, BlockNode, Perm
from blockmirror.block.options import close_node, open_image
from blockmirror.cli import event_loop
from blockmirror.cli.progress import (
    DisplayMode,
    Phase,
    ProgressDisplay,
    RateMeter,
    Snapshot,
    choose_mode,
    combine,
    final_phase,
    format_bytes,
    phase_of,
    snapshot_of,
)
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.job import Job
from blockmirror.jobs.mirror.image_store import read_image_log
from blockmirror.qapi import SchemaError, validate_command_args
from blockmirror.qapi import checks as schema_checks
from blockmirror.qmp.registry import Args, CommandContext, load_commands

#: exit statuses (documented in --help and docs/cli.md)
EXIT_OK = 0
EXIT_USAGE = 1
EXIT_JOB_FAILED = 2
EXIT_CANCELLED = 130

#: the BlockBackend standing for the guest's disk; also the default job id (cf. drive-mirror)
DEVICE = "drive0"
SOURCE_NODE = "source"

_NBD_PREFIXES = ("nbd:", "nbd+unix:", "nbd+tcp:", "nbd://")

EPILOG = """\
SOURCE and TARGET are image paths or NBD URIs (nbd://HOST[:PORT]/NAME,
nbd+unix:///NAME?socket=PATH). An NBD TARGET must already exist (--mode existing
is the default for it); a file TARGET is created like drive-mirror does
(--mode absolute-paths), in the source's format unless --format is given.

Completion: the mirror completes (pivots to the target) as soon as it is READY,
unless --wait is given; then it stays in sync until SIGUSR1 or QMP
block-job-complete on the --qmp socket (job id: drive0).

Several disks: --disk SRC=DST (repeatable, instead of SOURCE TARGET) mirrors
each pair and groups the jobs (QMP x-block-job-group): at READY every disk is
pivoted at one instant, or none is if one fails (x-block-job-group-complete).

Convergence: --converge (default none: forecast only) reports the ETA and a
verdict (converging, not-converging, throttled-by-speed); auto or
write-blocking switch a mirror that will not converge within
--converge-deadline to write-blocking; throttle:RATE slows the guest's writes.

Resuming: with --sync full the copy state is kept crash-safe in a resume log
(--resume-log, default TARGET.blockmirror-resume, or SOURCE.blockmirror-resume
when the target is not a local file (NBD, rbd:, json:); none when neither is).
Running the same command again after a crash, a kill or a lost target resumes
(the target is reused, only what may differ is recopied); --restart starts
afresh. Resuming is refused if the
source or target changed behind the mirror's back (see docs/resume.md).
--resume-store image keeps the resume state inside the source, which must be a
qcow2 v3 image in a local file, instead of a sidecar file (--resume-store file,
the default); --resume-log names a sidecar, so it cannot be combined with
--resume-store image (a usage error). --verify compares source and
target before the switch-over and repairs any difference.

Signals: SIGINT (Ctrl-C) or SIGTERM force-cancel the job; the source is left
untouched and nothing is pivoted. SIGUSR1 requests completion.

Exit status:
  0    the mirror completed; the target is in sync (and pivoted)
  1    usage error, or the source/target/export could not be opened or started
  2    the mirror job failed (I/O error with the report policy, ...)
  130  cancelled (SIGINT/SIGTERM or a QMP cancel)
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 1 (our convention) instead of 2 (a job failure)."""

    def error(self, message: str) -> Any:
        raise _UsageError(message)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size '{text}'") from None


def _disk(text: str) -> tuple[str, str]:
    src, sep, dst = text.partition("=")
    if not sep or not src or not dst:
        raise argparse.ArgumentTypeError(f"expected SRC=DST, got '{text}'")
    return src, dst


def _converge(text: str) -> dict[str, Any]:
    """``--converge`` to the x-converge arguments of drive-mirror."""
    mode, sep, rate = text.partition(":")
    if mode == "throttle":
        if not sep:
            raise argparse.ArgumentTypeError("throttle needs a rate: throttle:RATE")
        return {"x-converge": "throttle", "x-converge-throttle": _size(rate)}
    if sep or mode not in ("auto", "write-blocking", "none"):
        raise argparse.ArgumentTypeError(
            f"invalid value '{text}' (auto, write-blocking, throttle:RATE or none)")
    return {"x-converge": mode}


def build_parser(prog: str = "blockmirror mirror") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Mirror a live disk to a new destination (drive-mirror).",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", nargs="?",
                   help="source image path or NBD URI")
    p.add_argument("target", metavar="TARGET", nargs="?",
                   help="target image path or NBD URI")
    p.add_argument("--disk", action="append", default=[], metavar="SRC=DST", type=_disk,
                   help="a disk to mirror with the others at one instant (repeatable; "
                        "instead of SOURCE TARGET)")
    j = p.add_argument_group("drive-mirror arguments")
    j.add_argument("--sync", choices=("full", "top", "none"), default="full",
                   help="what to copy: the whole chain (default), the top layer, or only new "
                        "writes")
    j.add_argument("--format", help="target format (default: the source's, or probed when "
                                    "--mode existing)")
    j.add_argument("--source-format", help="source format (default: probed)")
    j.add_argument("--mode", choices=("existing", "absolute-paths"),
                   help="create the target (absolute-paths, the default for files) or use an "
                        "existing one (the default for NBD URIs)")
    j.add_argument("--speed", type=_size, default=0,
                   help="rate limit in bytes per second, with k/M/G suffixes (default: none)")
    j.add_argument("--granularity", type=_size, help="dirty bitmap granularity "
                                                     "(power of 2, 512 B..64 MiB)")
    j.add_argument("--buf-size", type=_size, help="bytes in flight (default 16M)")
    j.add_argument("--copy-mode", choices=("background", "write-blocking"),
                   help="write-blocking: guest writes wait until copied (active mirror)")
    policies = ("report", "ignore", "enospc", "stop", "auto")
    j.add_argument("--on-source-error", choices=policies, help="default: report")
    j.add_argument("--on-target-error", choices=policies, help="default: report")
    j.add_argument("--no-unmap", action="store_true",
                   help="where the source reads as zero, write explicit zeroes rather than "
                        "unmap target clusters (drive-mirror unmap=false)")
    j.add_argument("--job-id", help=f"job id (default: {DEVICE})")
    j.add_argument("--converge", type=_converge, default={"x-converge": "none"},
                   metavar="auto|write-blocking|throttle:RATE|none",
                   help="what to do when the forecast says the mirror will not converge "
                        "(default none: only report the ETA and verdict)")
    j.add_argument("--converge-deadline", type=int, metavar="SECONDS",
                   help="an ETA beyond this counts as not converging (default 300)")
    r = p.add_argument_group("resume and verification (extensions, docs/resume.md)")
    r.add_argument("--resume-log", metavar="PATH",
                   help="the crash-safe resume log (default: TARGET.blockmirror-resume)")
    r.add_argument("--restart", action="store_true",
                   help="start afresh even if a resume log says the copy can resume")
    r.add_argument("--no-resume", action="store_true", help="keep no resume log")
    r.add_argument("--resume-store", choices=("file", "image"), default="file",
                   help="where the resume state lives: a sidecar file (file, the default), "
                        "or inside the qcow2 source (image; not with --resume-log)")
    r.add_argument("--verify", action="store_true",
                   help="compare source and target before the switch-over; repair mismatches")
    o = p.add_argument_group("operation")
    o.add_argument("--wait", action="store_true",
                   help="stay in sync after READY until SIGUSR1 or QMP block-job-complete")
    o.add_argument("--export", metavar="ADDR",
                   help="serve the disk over NBD while mirroring: unix:PATH or HOST:PORT "
                        "(writable; follows the target after the pivot)")
    o.add_argument("--export-name", default="disk", help="NBD export name (default: disk)")
    o.add_argument("--qmp", metavar="PATH", help="serve a QMP monitor on this unix socket")
    d = p.add_argument_group("display")
    d.add_argument("--json", action="store_true",
                   help="one JSON object per line on stdout (see docs/cli.md for fields)")
    d.add_argument("--quiet", "-q", action="store_true", help="print errors only")
    d.add_argument("--interval", type=float, default=0.25,
                   help="seconds between progress updates (default 0.25)")
    return p


def parse_export(text: str) -> dict[str, Any]:
    """``unix:PATH`` or ``HOST:PORT`` (``[::1]:PORT`` for IPv6) to a flat SocketAddress.

    Raises:
        ValueError: the text is neither form.
    """
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise ValueError("empty socket path")
        return {"type": "unix", "path": path}
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected unix:PATH or HOST:PORT, got '{text}'")
    host = host.strip("[]") or "0.0.0.0"
    return {"type": "inet", "host": host, "port": port}


def export_uri(addr: dict[str, Any], name: str) -> str:
    """The NBD URI clients use for an export at ``addr``."""
    if addr["type"] == "unix":
        return f"nbd+unix:///{name}?socket={addr['path']}"
    host = addr["host"]
    if host in ("0.0.0.0", "::"):
        host = "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"nbd://{host}:{addr['port']}/{name}"


def is_nbd_uri(name: str) -> bool:
    return name.startswith(_NBD_PREFIXES)


async def execute(daemon: Daemon, name: str, arguments: dict[str, Any]) -> Any:
    """Run a QMP command in-process on the same path a monitor uses: schema validation
    (QEMU's texts) then the registered handler.

    Raises:
        BlockMirrorError: the command failed (``str(e)`` is the QMP desc).
    """
    cmd = load_commands()[name]
    try:
        args = validate_command_args(cmd.args, dict(arguments))
    except SchemaError as e:
        raise BlockMirrorError(e.desc) from e
    ret = await cmd.handler(CommandContext(daemon), Args(args, cmd.defaults))
    if schema_checks.enabled():
        schema_checks.check_return(name, ret)
    return ret


class CliDaemon(Daemon):
    """A Daemon whose stdout lines (``Formatting ...``) go through the progress display."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        super().__init__()
        self._sink = sink

    def print_stdout(self, line: str) -> None:
        self.stdout_lines.append(line)
        self._sink(line)


@dataclass
class Outcome:
    """How a watched job ended."""

    phase: Phase
    snapshot: Snapshot
    pivoted: bool
    text: str
    exit_code: int


async def _follow(finished: Awaitable[None], act: Callable[[], Awaitable[None]],
                  show: Callable[[], None], wake: asyncio.Event, interval: float) -> None:
    """A watcher's loop until ``finished``: act on the requests, show the progress, then
    sleep until the next tick, or until ``wake`` (a request, an event) or the end."""
    done = asyncio.ensure_future(finished)
    try:
        while not done.done():
            await act()
            show()
            wake.clear()
            waker = asyncio.ensure_future(wake.wait())
            await asyncio.wait({done, waker}, timeout=interval,
                               return_when=asyncio.FIRST_COMPLETED)
            waker.cancel()
    finally:
        done.cancel()


class JobWatcher:
    """Follows one job: samples progress, obeys signals, completes at READY, reports the end.

    Requests arrive as flags set by signal handlers (or the demo); the loop acts on them at
    its next tick so that job verbs always run in the loop's task, never in a handler.
    """

    def __init__(self, daemon: Daemon, job: Job, display: ProgressDisplay, *,
                 device: BlockBackend | None, wait: bool, interval: float,
                 started: float, disk_size: int) -> None:
        self.daemon = daemon
        self.job = job
        self.display = display
        self.device = device
        self.wait = wait
        self.interval = interval
        self.started = started
        self.disk_size = disk_size
        self.meter = RateMeter()
        self.target: BlockNode | None = getattr(job, "target", None)
        self.cancel_requested = False
        self.complete_requested = False
        self._complete_sent = False
        self._cancel_sent = False
        self._wake = asyncio.Event()
        self._final_event: str | None = None
        self._final_error: str | None = None
        self._announced_ready = False
        #: print how to complete when READY with --wait (the demo completes by itself)
        self.ready_hint = True
        #: called once when the job first becomes READY (the demo uses it)
        self.on_ready: Callable[[], None] | None = None
        self._unsubscribe = daemon.events.subscribe(self._on_event)

    # -- requests (signal handlers) ------------------------------------------------------------

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self._wake.set()

    def request_complete(self) -> None:
        self.complete_requested = True
        self._wake.set()

    def _on_event(self, ev: dict[str, Any]) -> None:
        data = ev.get("data", {})
        if data.get("device") != self.job.id and data.get("id") != self.job.id:
            return
        name = ev["event"]
        if name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            self._final_event = name
            self._final_error = data.get("error")
        elif name == "X_BLOCK_JOB_CONVERGENCE_ACTION":
            self.display.message(f"{self.job.id}: switched to {data.get('action')}: "
                                 f"{data.get('reason')}")
        elif name == "BLOCK_JOB_ERROR":
            action = data.get("action")
            self.display.message(f"I/O error on {data.get('operation')}: action {action}")
            if action == "stop":
                self.display.message(
                    f"the job is paused: resume it with QMP block-job-resume device={self.job.id}"
                    " (--qmp), or cancel with Ctrl-C")
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        job = self.job
        # completes and cancels may also come from a QMP client (--qmp)
        phase = phase_of(job.status.value, published=getattr(job, "published", True),
                         complete_requested=self._complete_sent
                         or bool(getattr(job, "should_complete", False)),
                         cancel_requested=self._cancel_sent or job.is_cancelled)
        return snapshot_of(job, elapsed=time.monotonic() - self.started,
                           disk_size=self.disk_size, meter=self.meter, phase=phase)

    async def run(self) -> Outcome:
        try:
            await _follow(self.job.wait_finished(), self._act,
                          lambda: self.display.update(self.snapshot()), self._wake,
                          self.interval)
        finally:
            self._unsubscribe()
        return self._outcome()

    async def _act(self) -> None:
        job = self.job
        if self.cancel_requested and not self._cancel_sent:
            self._cancel_sent = True
            try:
                await job.user_cancel(True)
                self.display.message("cancelling: the source stays as it is, no pivot")
            except BlockMirrorError as e:
                self.display.message(f"cannot cancel now: {e}")
        if job.is_ready and not self._announced_ready:
            self._announced_ready = True
            if self.wait and self.ready_hint:
                self.display.message(
                    f"READY: source and target in sync; complete with `kill -USR1 {os.getpid()}`"
                    f" or QMP block-job-complete (device {job.id})")
            if self.on_ready is not None:
                self.on_ready()
        if (job.is_ready and not self._complete_sent and not self._cancel_sent
                and (self.complete_requested or not self.wait)):
            self._complete_sent = True
            try:
                await job.complete()
            except BlockMirrorError as e:
                # no automatic retry: wait for the next explicit request (SIGUSR1, QMP)
                self.display.message(f"cannot complete now: {e}")
                self._complete_sent = False
                self.complete_requested = False
                self.wait = True

    def _outcome(self) -> Outcome:
        phase = final_phase(self._final_event, self._final_error or self.job.error)
        snap = self.snapshot()
        snap = replace(snap, phase=phase, eta=None, error=self._final_error or self.job.error)
        pivoted = (self.device is not None and self.target is not None
                   and self.device.node is self.target)
        if phase == Phase.DONE:
            text = ("the target is in sync and is now the active image (pivoted)" if pivoted
                    else "the target is in sync; not pivoted (cancelled after READY)")
            code = EXIT_OK
        elif phase == Phase.CANCELLED:
            text = "the source is untouched and the target was not pivoted"
            # "Operation canceled" is the job's QMP error; the phase already says it
            snap = replace(snap, error=None)
            code = EXIT_CANCELLED
        else:
            text = f"the mirror failed: {snap.error or 'unknown error'}"
            code = EXIT_JOB_FAILED
        return Outcome(phase, snap, pivoted, text, code)


def mirror_arguments(opts: argparse.Namespace) -> dict[str, Any]:
    """The drive-mirror arguments for the parsed command line."""
    mode = opts.mode or ("existing" if is_nbd_uri(opts.target) else "absolute-paths")
    args: dict[str, Any] = {"device": DEVICE, "target": opts.target, "sync": opts.sync,
                            "mode": mode}
    if opts.job_id:
        args["job-id"] = opts.job_id
    if opts.format:
        args["format"] = opts.format
    if opts.speed:
        args["speed"] = opts.speed
    if opts.granularity is not None:
        args["granularity"] = opts.granularity
    if opts.buf_size is not None:
        args["buf-size"] = opts.buf_size
    if opts.copy_mode:
        args["copy-mode"] = opts.copy_mode
    if opts.on_source_error:
        args["on-source-error"] = opts.on_source_error
    if opts.on_target_error:
        args["on-target-error"] = opts.on_target_error
    if opts.no_unmap:
        args["unmap"] = False
    args.update(opts.converge)
    if opts.converge_deadline is not None:
        args["x-converge-deadline"] = opts.converge_deadline
    return args


def resume_log_path(opts: argparse.Namespace) -> str | None:
    """Where the resume log lives (None: none is kept)."""
    if opts.no_resume or opts.sync != "full":
        return None
    if opts.resume_log:
        return str(opts.resume_log)
    # next to the target file, or the source file for a target that is not a local file
    # (NBD, rbd:, ...); never next to json: names or protocol filenames
    image = opts.source if _not_a_local_file(opts.target) else opts.target
    if _not_a_local_file(image):
        return None
    return f"{image}.blockmirror-resume"


def _not_a_local_file(name: str) -> bool:
    """An NBD URI, a json: name or a protocol filename (rbd:pool/image, ...)."""
    if is_nbd_uri(name) or name.startswith("json:"):
        return True
    prefix, sep, _rest = name.partition(":")
    return bool(sep) and "/" not in prefix and prefix.isidentifier()


def resume_arguments(opts: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """The drive-mirror extension arguments, and whether an earlier mirror is resumed."""
    args: dict[str, Any] = {}
    if opts.verify:
        args["x-verify"] = True
    if getattr(opts, "resume_store", "file") == "image":
        return _in_image_arguments(opts, args)
    path = resume_log_path(opts)
    if path is None:
        return args, False
    args["x-resume-log"] = path
    target_exists = is_nbd_uri(opts.target) or os.path.exists(opts.target)
    resuming = os.path.exists(path) and target_exists and not opts.restart
    if not resuming:
        args["x-resume-restart"] = True
    elif opts.mode is None:
        args["mode"] = "existing"  # the target holds the copy so far: keep it
    return args, resuming


def _in_image_arguments(opts: argparse.Namespace, args: dict[str, Any]
                        ) -> tuple[dict[str, Any], bool]:
    """--resume-store image: the state is in the qcow2 source (a stale one is refused by
    the mirror, with the reason, unless --restart)."""
    if opts.no_resume or opts.sync != "full":
        return args, False
    args["x-resume-store"] = "image"
    found = None
    if not _not_a_local_file(opts.source) and os.path.exists(opts.source):
        try:
            found = read_image_log(opts.source)
        except (OSError, ValueError, BlockMirrorError):
            found = None  # not a qcow2 file with a readable area: nothing to resume
    target_exists = is_nbd_uri(opts.target) or os.path.exists(opts.target)
    resuming = found is not None and target_exists and not opts.restart
    if not resuming:
        args["x-resume-restart"] = True
    elif opts.mode is None:
        args["mode"] = "existing"
    return args, resuming


async def open_source(daemon: Daemon, filename: str, fmt: str | None,
                      warn: Callable[[str], None], *, device: str = DEVICE,
                      node_name: str = SOURCE_NODE) -> BlockBackend:
    """Open the source read-write behind the ``drive0`` BlockBackend (the guest's device)."""
    graph = daemon.graph
    node = await open_image(graph, filename, fmt, read_only=False, node_name=node_name,
                            warn=warn)
    # a guest device: reads and writes, never resizes, shares everything (so an NBD export
    # and the mirror can use the node too)
    perm = Perm.CONSISTENT_READ | Perm.WRITE
    blk = BlockBackend(device, f"block device '{device}'", perm, Perm.all())
    try:
        graph.attach(blk, node, "root", perm, blk.shared)
    except BlockMirrorError:
        await close_node(graph, node)
        raise
    graph.add_backend(blk)
    return blk


async def start_export(daemon: Daemon, addr: dict[str, Any], name: str) -> str:
    """nbd-server-start + a writable block-export-add of the source; returns the URI."""
    # nbd-server-start takes the legacy SocketAddress: {"type": ..., "data": {...}}
    legacy = {"type": addr["type"], "data": {k: v for k, v in addr.items() if k != "type"}}
    await execute(daemon, "nbd-server-start", {"addr": legacy})
    await execute(daemon, "block-export-add", {"type": "nbd", "id": "export0",
                                               "node-name": SOURCE_NODE, "name": name,
                                               "writable": True})
    return export_uri(addr, name)


class _Session:
    """What both ways of running take up and down around the watcher: the daemon, the
    signals (SIGINT and SIGTERM cancel, SIGUSR1 completes now), the optional QMP monitor."""

    def __init__(self, display: ProgressDisplay) -> None:
        self.display = display
        self.daemon = CliDaemon(display.message)
        self.interrupted = asyncio.Event()
        self.watcher: JobWatcher | GroupWatcher | None = None
        self._loop = asyncio.get_running_loop()
        self._qmp_path: str | None = None

    def _on_interrupt(self) -> None:
        self.interrupted.set()
        if self.watcher is not None:
            self.watcher.request_cancel()

    def _on_usr1(self) -> None:
        if self.watcher is not None:
            self.watcher.request_complete()

    async def __aenter__(self) -> _Session:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(sig, self._on_interrupt)
        self._loop.add_signal_handler(signal.SIGUSR1, self._on_usr1)
        return self

    async def listen_qmp(self, path: str | None) -> None:
        if path:
            await self.daemon.qmp_server().listen_unix(path)
            self._qmp_path = path
            self.display.message(f"QMP monitor on {path}")

    async def watch(self, watcher: JobWatcher | GroupWatcher) -> Outcome:
        """Run ``watcher`` to its outcome (cancelling at once after an early interrupt)."""
        self.watcher = watcher
        if self.interrupted.is_set():
            watcher.request_cancel()
        return await watcher.run()

    async def __aexit__(self, *exc: object) -> None:
        daemon = self.daemon
        self.display.stop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            self._loop.remove_signal_handler(sig)
        if daemon.qmp is not None:
            await daemon.qmp.close()
        await daemon.shutdown()
        if self._qmp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._qmp_path)


async def _main(opts: argparse.Namespace, display: ProgressDisplay, prog: str) -> int:
    if opts.disk:
        return await _main_group(opts, display, prog)
    started = time.monotonic()
    async with _Session(display) as session:
        daemon = session.daemon
        try:
            device = await open_source(daemon, opts.source, opts.source_format, display.message)
            extra, resuming = resume_arguments(opts)
            # resuming: the guest may write only once the mirror tracks the source again
            if opts.export and not resuming:
                uri = await start_export(daemon, parse_export(opts.export), opts.export_name)
                display.message(f"exporting the disk at {uri}")
            await session.listen_qmp(opts.qmp)
            if session.interrupted.is_set():
                return EXIT_CANCELLED
            node = device.node
            assert node is not None
            disk_size = node.length()
            args = mirror_arguments(opts)
            args.update(extra)
            await execute(daemon, "drive-mirror", args)
            job = daemon.jobs.find(args.get("job-id", DEVICE))
            plan = getattr(getattr(job, "params", None), "resume", None)
            if resuming and plan is not None and plan.resumed:
                left = plan.recopy
                display.message(f"resumed: {format_bytes(left)} to recopy of "
                                f"{format_bytes(disk_size)}")
            if opts.export and resuming:
                uri = await start_export(daemon, parse_export(opts.export), opts.export_name)
                display.message(f"exporting the disk at {uri}")
        except (BlockMirrorError, ValueError) as e:
            print(f"{prog}: {e}", file=sys.stderr, flush=True)
            hint = getattr(e, "hint", None)
            if hint:
                print(hint, file=sys.stderr, flush=True)
            return EXIT_USAGE
        job = daemon.jobs.find(args.get("job-id", DEVICE))
        assert job is not None
        outcome = await session.watch(JobWatcher(
            daemon, job, display, device=device, wait=opts.wait, interval=opts.interval,
            started=started, disk_size=disk_size))
        for ev in daemon.events.history:
            if ev["event"] == "X_BLOCK_JOB_VERIFIED":
                v = ev["data"]
                display.message(
                    f"verified: {format_bytes(v['verified'])} compared, {v['mismatches']} "
                    f"mismatching chunk(s), {v['repaired']} repaired, {v['unrepaired']} not; "
                    f"target digest xxh3-128 {v['digest'] or '(incomplete)'}")
        display.finish(outcome.snapshot, outcome.text)
        return outcome.exit_code


#: the group ``--disk`` mirrors form (QMP x-block-job-group)
GROUP = "disks"


class GroupWatcher:
    """Follows the mirrors of a switch-over group as one: one progress view, one complete
    (x-block-job-group-complete) once every disk is READY, one outcome."""

    def __init__(self, daemon: Daemon, watchers: list[JobWatcher], display: ProgressDisplay,
                 *, wait: bool, interval: float, started: float) -> None:
        self.daemon = daemon
        self.watchers = watchers
        self.display = display
        self.wait = wait
        self.interval = interval
        self.started = started
        self.meter = RateMeter()
        self.cancel_requested = False
        self.complete_requested = False
        self._complete_sent = False
        self._cancel_sent = False
        self._announced_ready = False
        self._wake = asyncio.Event()
        self._unsubscribe = daemon.events.subscribe(self._on_event)

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self._wake.set()

    def request_complete(self) -> None:
        self.complete_requested = True
        self._wake.set()

    def _on_event(self, ev: dict[str, Any]) -> None:
        if ev["event"] == "X_BLOCK_JOB_GROUP_COMPLETED":
            data = ev.get("data", {})
            if data.get("pivoted"):
                self.display.message(f"every disk pivoted at one instant ({len(self.watchers)}"
                                     " disks)")
            else:
                self.display.message(f"the switch-over failed, no disk pivoted: "
                                     f"{data.get('error')}")
        self._wake.set()

    def snapshot(self) -> Snapshot:
        snaps = [w.snapshot() for w in self.watchers]
        elapsed = time.monotonic() - self.started
        phases = {s.phase for s in snaps}
        order = (Phase.ABORTING, Phase.CANCELLING, Phase.INIT, Phase.PAUSED, Phase.COPYING,
                 Phase.COMPLETING, Phase.READY)
        phase = next((p for p in order if p in phases), snaps[0].phase)
        return combine(snaps, elapsed=elapsed, phase=phase,
                       rate=self.meter.add(elapsed, sum(s.done for s in snaps)))

    async def run(self) -> Outcome:
        async def all_finished() -> None:
            for w in self.watchers:
                await w.job.wait_finished()

        try:
            await _follow(all_finished(), self._act,
                          lambda: self.display.update(self.snapshot()), self._wake,
                          self.interval)
        finally:
            self._unsubscribe()
            for w in self.watchers:
                w._unsubscribe()
        return self._outcome()

    async def _act(self) -> None:
        jobs = [w.job for w in self.watchers]
        if self.cancel_requested and not self._cancel_sent:
            self._cancel_sent = True
            for job in jobs:
                with contextlib.suppress(BlockMirrorError):
                    await job.user_cancel(True)
            self.display.message("cancelling: every source stays as it is, no pivot")
        all_ready = all(job.is_ready for job in jobs)
        if all_ready and not self._announced_ready:
            self._announced_ready = True
            if self.wait:
                self.display.message(
                    f"READY: every disk in sync; complete with `kill -USR1 {os.getpid()}` or "
                    f"QMP x-block-job-group-complete (group {GROUP})")
        if (all_ready and not self._complete_sent and not self._cancel_sent
                and (self.complete_requested or not self.wait)):
            self._complete_sent = True
            for w in self.watchers:
                w._complete_sent = True  # their phase shows "completing"
            try:
                await execute(self.daemon, "x-block-job-group-complete", {"group": GROUP})
            except BlockMirrorError as e:
                self.display.message(f"cannot complete now: {e}")
                self._complete_sent = False
                self.complete_requested = False
                self.wait = True

    def _outcome(self) -> Outcome:
        outs = [w._outcome() for w in self.watchers]
        snap = combine([o.snapshot for o in outs], elapsed=time.monotonic() - self.started,
                       rate=self.meter.rate(), phase=outs[0].phase)
        n = len(outs)
        if all(o.phase == Phase.DONE and o.pivoted for o in outs):
            return Outcome(Phase.DONE, replace(snap, phase=Phase.DONE), True,
                           f"all {n} disks are in sync and were pivoted at one instant", EXIT_OK)
        pivoted = [o.pivoted for o in outs]
        where = ("no disk was pivoted: every source is still in use" if not any(pivoted)
                 else "some disks were pivoted (their pivot failed for the others)")
        if any(o.phase == Phase.FAILED for o in outs):
            return Outcome(Phase.FAILED, replace(snap, phase=Phase.FAILED), any(pivoted),
                           f"the group failed; {where}", EXIT_JOB_FAILED)
        if any(o.phase == Phase.CANCELLED for o in outs):
            return Outcome(Phase.CANCELLED, replace(snap, phase=Phase.CANCELLED, error=None),
                           any(pivoted), f"cancelled; {where}", EXIT_CANCELLED)
        return Outcome(Phase.DONE, replace(snap, phase=Phase.DONE), any(pivoted),
                       f"in sync; {where}", EXIT_OK)


async def _main_group(opts: argparse.Namespace, display: ProgressDisplay, prog: str) -> int:
    """``--disk SRC=DST ...``: one mirror per disk, grouped, completed at one instant."""
    started = time.monotonic()
    async with _Session(display) as session:
        daemon = session.daemon
        watchers: list[JobWatcher] = []
        try:
            await session.listen_qmp(opts.qmp)
            for i, (src, dst) in enumerate(opts.disk):
                device = f"drive{i}"
                blk = await open_source(daemon, src, opts.source_format, display.message,
                                        device=device, node_name=f"source{i}")
                node = blk.node
                assert node is not None
                args = mirror_arguments(replace_target(opts, src, dst))
                args["device"] = device
                args["job-id"] = device
                await execute(daemon, "drive-mirror", args)
                job = daemon.jobs.find(device)
                assert job is not None
                watchers.append(JobWatcher(daemon, job, display, device=blk, wait=True,
                                           interval=opts.interval, started=started,
                                           disk_size=node.length()))
            await execute(daemon, "x-block-job-group",
                          {"group": GROUP, "jobs": [w.job.id for w in watchers]})
        except (BlockMirrorError, ValueError) as e:
            print(f"{prog}: {e}", file=sys.stderr, flush=True)
            for w in watchers:
                w._unsubscribe()
            return EXIT_USAGE
        outcome = await session.watch(GroupWatcher(
            daemon, watchers, display, wait=opts.wait, interval=opts.interval,
            started=started))
        display.finish(outcome.snapshot, outcome.text)
        return outcome.exit_code


def replace_target(opts: argparse.Namespace, source: str, target: str) -> argparse.Namespace:
    """``opts`` for one ``--disk`` pair (the mirror arguments read source and target)."""
    ns = argparse.Namespace(**vars(opts))
    ns.source, ns.target = source, target
    return ns


def _check_disks(opts: argparse.Namespace) -> str | None:
    """SOURCE TARGET or --disk pairs, not both; what --disk cannot be combined with."""
    if opts.disk:
        if opts.source is not None:
            return "give either SOURCE TARGET or --disk SRC=DST, not both"
        for flag, value in (("--export", opts.export), ("--job-id", opts.job_id)):
            if value:
                return f"{flag} is for a single disk (SOURCE TARGET)"
        return None
    if opts.source is None or opts.target is None:
        return "the following arguments are required: SOURCE, TARGET (or --disk SRC=DST)"
    return None


def _check_resume(opts: argparse.Namespace) -> str | None:
    """Resume options that contradict each other. --resume-log names a sidecar, which the
    in-image store does not have: rather than drop the path the user gave, refuse."""
    if opts.resume_store == "image" and opts.resume_log is not None:
        return ("argument --resume-log: not allowed with --resume-store image (the resume "
                "state is kept inside the qcow2 source, not in a sidecar file)")
    return None


def run(name: str, argv: list[str]) -> int:
    prog = f"blockmirror {name}"
    parser = build_parser(prog)
    try:
        opts = parser.parse_args(argv)
    except _UsageError as e:
        print(f"{parser.format_usage().rstrip()}\n{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if opts.export:
        try:
            parse_export(opts.export)
        except ValueError as e:
            print(f"{prog}: --export: {e}", file=sys.stderr)
            return EXIT_USAGE
    if opts.interval <= 0:
        print(f"{prog}: --interval must be positive", file=sys.stderr)
        return EXIT_USAGE
    problem = _check_disks(opts) or _check_resume(opts)
    if problem:
        print(f"{parser.format_usage().rstrip()}\n{prog}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    mode = choose_mode(json_lines=opts.json, quiet=opts.quiet)
    title = (f"mirror {opts.source} -> {opts.target}" if not opts.disk else
             "mirror group: " + ", ".join(f"{s} -> {d}" for s, d in opts.disk))
    display = ProgressDisplay(mode, title=title)
    try:
        return event_loop.run(_main(opts, display, prog))
    except KeyboardInterrupt:  # before the loop installed its handlers
        display.stop()
        return EXIT_CANCELLED


__all__ = ["EXIT_CANCELLED", "EXIT_JOB_FAILED", "EXIT_OK", "EXIT_USAGE", "GROUP", "CliDaemon",
           "DisplayMode", "GroupWatcher", "JobWatcher", "Outcome", "build_parser", "execute",
           "export_uri", "mirror_arguments", "open_source", "parse_export", "run", "start_export"]
