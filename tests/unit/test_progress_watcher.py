"""Unit tests of the operator CLI's pure helpers and of ``JobWatcher`` on an in-process daemon.

The watcher is what turns a mirror job into an exit status: complete at READY (or on request
with ``--wait``), force-cancel on request, and report DONE/CANCELLED/FAILED from the job's
final QMP event. Here it drives real mirror jobs between null-co nodes, with no sockets.
"""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from blockmirror.block.node import BlockBackend, Perm
from blockmirror.cli.mirror import (
    EXIT_CANCELLED,
    EXIT_OK,
    EXIT_USAGE,
    JobWatcher,
    build_parser,
    execute,
    export_uri,
    is_nbd_uri,
    mirror_arguments,
    parse_export,
    run,
)
from blockmirror.cli.progress import DisplayMode, Phase, ProgressDisplay
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockMirrorError

MiB = 1 << 20


# --- pure helpers -----------------------------------------------------------------------------


def test_parse_export() -> None:
    assert parse_export("unix:/run/x.sock") == {"type": "unix", "path": "/run/x.sock"}
    assert parse_export("127.0.0.1:10809") == {"type": "inet", "host": "127.0.0.1",
                                               "port": "10809"}
    assert parse_export("[::1]:10809") == {"type": "inet", "host": "::1", "port": "10809"}
    assert parse_export(":10809") == {"type": "inet", "host": "0.0.0.0", "port": "10809"}
    for bad in ("unix:", "localhost", "host:port", ""):
        with pytest.raises(ValueError):
            parse_export(bad)


def test_export_uri() -> None:
    assert export_uri({"type": "unix", "path": "/s"}, "disk") == "nbd+unix:///disk?socket=/s"
    assert export_uri({"type": "inet", "host": "0.0.0.0", "port": "1"}, "d") == \
        "nbd://localhost:1/d"
    assert export_uri({"type": "inet", "host": "::1", "port": "2"}, "d") == "nbd://[::1]:2/d"


def test_mirror_arguments_follow_drive_mirror() -> None:
    p = build_parser()
    opts = p.parse_args(["a.qcow2", "b.qcow2"])
    assert mirror_arguments(opts) == {"device": "drive0", "target": "b.qcow2", "sync": "full",
                                      "mode": "absolute-paths", "x-converge": "none"}
    opts = p.parse_args(["a.qcow2", "nbd://h/x", "--sync", "top", "--speed", "50M",
                         "--granularity", "4k", "--buf-size", "1M", "--copy-mode",
                         "write-blocking", "--on-source-error", "stop", "--on-target-error",
                         "ignore", "--no-unmap", "--format", "raw", "--job-id", "j0"])
    assert mirror_arguments(opts) == {
        "device": "drive0", "target": "nbd://h/x", "sync": "top", "mode": "existing",
        "job-id": "j0", "format": "raw", "speed": 50 * MiB, "granularity": 4096,
        "buf-size": MiB, "copy-mode": "write-blocking", "on-source-error": "stop",
        "on-target-error": "ignore", "unmap": False, "x-converge": "none"}
    assert is_nbd_uri("nbd+unix:///x?socket=/s") and is_nbd_uri("nbd:unix:/s")
    assert not is_nbd_uri("nbd.qcow2")


def test_usage_errors_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("mirror", []) == EXIT_USAGE
    assert run("mirror", ["a", "b", "--speed", "fast"]) == EXIT_USAGE
    assert "invalid size 'fast'" in capsys.readouterr().err
    assert run("mirror", ["a", "b", "--export", "nowhere"]) == EXIT_USAGE
    assert run("mirror", ["a", "b", "--interval", "0"]) == EXIT_USAGE
    assert run("mirror", ["--help"]) == EXIT_OK
    assert "Exit status:" in capsys.readouterr().out


# --- the watcher on real mirror jobs -----------------------------------------------------------


async def _setup(daemon: Daemon, speed: int = 0) -> BlockBackend:
    for name in ("src", "tgt"):
        await execute(daemon, "blockdev-add", {"driver": "null-co", "node-name": name,
                                               "size": 8 * MiB})
    node = daemon.graph.find_node("src")
    assert node is not None
    blk = BlockBackend("drive0", "block device 'drive0'", Perm.CONSISTENT_READ | Perm.WRITE,
                       Perm.all())
    daemon.graph.attach(blk, node, "root", blk.perm, blk.shared)
    daemon.graph.add_backend(blk)
    args = {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"}
    if speed:
        args["speed"] = speed
    await execute(daemon, "blockdev-mirror", args)
    return blk


def _watch(wait: bool, action: str | None, speed: int = 0) -> tuple[int, bool, list[dict]]:
    async def main() -> tuple[int, bool, list[dict]]:
        daemon = Daemon()
        out = io.StringIO()
        try:
            blk = await _setup(daemon, speed)
            job = daemon.jobs.find("m0")
            assert job is not None
            w = JobWatcher(daemon, job, ProgressDisplay(DisplayMode.JSON, stream=out),
                           device=blk, wait=wait, interval=0.01, started=0.0,
                           disk_size=8 * MiB)
            if action == "complete-at-ready":
                w.on_ready = w.request_complete
            elif action == "cancel-at-ready":
                w.on_ready = w.request_cancel
            elif action == "cancel-now":
                w.request_cancel()
            outcome = await w.run()
            w.display.finish(outcome.snapshot, outcome.text)
            return outcome.exit_code, outcome.pivoted, [json.loads(x) for x in
                                                        out.getvalue().splitlines()]
        finally:
            await daemon.shutdown()

    return asyncio.run(asyncio.wait_for(main(), 20))


def test_watcher_completes_at_ready() -> None:
    code, pivoted, lines = _watch(wait=False, action=None)
    assert code == EXIT_OK and pivoted
    assert lines[-1]["type"] == "summary" and lines[-1]["phase"] == "done"
    assert lines[-1]["done"] == 8 * MiB


def test_watcher_waits_then_completes_on_request() -> None:
    code, pivoted, lines = _watch(wait=True, action="complete-at-ready")
    assert code == EXIT_OK and pivoted
    assert any(x["type"] == "message" and x["text"].startswith("READY:") for x in lines)


def test_watcher_cancel_in_ready_does_not_pivot() -> None:
    code, pivoted, lines = _watch(wait=True, action="cancel-at-ready")
    assert code == EXIT_CANCELLED and not pivoted
    assert lines[-1]["phase"] == Phase.CANCELLED
    assert "not pivoted" in lines[-1]["outcome"]


def test_watcher_cancel_while_copying() -> None:
    # 8 MiB at 1 MiB/s: the cancel arrives long before READY
    code, pivoted, lines = _watch(wait=False, action="cancel-now", speed=MiB)
    assert code == EXIT_CANCELLED and not pivoted
    assert lines[-1]["done"] < 8 * MiB


def test_execute_validates_like_qmp() -> None:
    async def main() -> None:
        daemon = Daemon()
        try:
            with pytest.raises(BlockMirrorError, match="Parameter 'sync' is missing"):
                await execute(daemon, "drive-mirror", {"device": "x", "target": "y"})
            with pytest.raises(BlockMirrorError,
                               match="Cannot find device='nope' nor node-name='nope'"):
                await execute(daemon, "drive-mirror", {"device": "nope", "target": "y",
                                                       "sync": "full"})
        finally:
            await daemon.shutdown()

    asyncio.run(main())
