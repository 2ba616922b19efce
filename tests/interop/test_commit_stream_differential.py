"""block-commit and block-stream against qemu-storage-daemon 7.2 and against ours (issue 11):
the same QMP scripts on fresh copies of the same backing chain, with identical replies, error
classes and texts, events in order, and final images (``qemu-img compare`` of what the guest
sees, ``qemu-img check``, and the backing chains ``qemu-img info`` reports).

The chain is base.qcow2 <- mid.qcow2 <- top.qcow2, each layer with its own pattern, opened
with blockdev-add as nodes ``base``, ``mid`` and ``top`` (the active layer).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import require_tool
from mirror_scripts.differential import (
    Step,
    Transcript,
    our_client,
    qsd_client,
    run_script,
)
from qsd_diff import drop_host_sizes

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 4 * MiB
#: what each layer writes: (pattern, offset, length)
LAYERS = {
    "base": [(0x11, 0, 2 * MiB), (0x12, 3 * MiB, 512 * 1024)],
    "mid": [(0x22, 1 * MiB, 1 * MiB), (0x23, 3 * MiB + 256 * 1024, 64 * 1024)],
    "top": [(0x33, 512 * 1024, 1 * MiB), (0x34, 3 * MiB + 768 * 1024, 128 * 1024)],
}


def make_chain(workdir: str) -> dict[str, str]:
    paths = {name: os.path.join(workdir, f"{name}.qcow2") for name in LAYERS}
    below = None
    for name, writes in LAYERS.items():
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if below is not None:
            cmd += ["-b", paths[below], "-F", "qcow2"]
        subprocess.run([*cmd, paths[name], str(SIZE)], check=True)
        io = ["qemu-io", "-f", "qcow2"]
        for pattern, off, length in writes:
            io += ["-c", f"write -P {pattern:#x} {off} {length}"]
        subprocess.run([*io, paths[name]], check=True, capture_output=True)
        below = name
    return paths


def open_chain(p: dict[str, str], faults: dict[str, dict[str, Any]] | None = None,
               read_only: tuple[str, ...] = ()) -> list[Step]:
    """blockdev-add of the chain; ``faults``: a blkdebug rule under a layer's qcow2;
    ``read_only``: layers opened read-only (as libvirt opens backing files)."""
    steps: list[Step] = []
    below = None
    for name in LAYERS:
        file: dict[str, Any] = {"driver": "file", "filename": p[name],
                                "node-name": f"{name}-file"}
        if faults and name in faults:
            file = {"driver": "blkdebug", "node-name": f"{name}-dbg",
                    "inject-error": [faults[name]], "image": file}
        opts: dict[str, Any] = {"driver": "qcow2", "node-name": name, "file": file}
        if name in read_only:
            opts["read-only"] = True
        opts["backing"] = below
        steps.append(("cmd", "blockdev-add", opts))
        below = name
    return steps


Q: Step = ("cmd", "query-block-jobs")
QJ: Step = ("cmd", "query-jobs")
#: the graph as the daemon sees it afterwards (backing links, auto-named nodes)
GRAPH: Step = ("cmd", "query-named-block-nodes", {"flat": True})
END: list[Step] = [("settle",), Q, QJ, GRAPH]


def intermediate_commit(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-commit", {"job-id": "c", "device": "top", "top-node": "mid",
                                     "base-node": "base"}),
            ("wait", "BLOCK_JOB_COMPLETED"), *END]


def intermediate_commit_manual(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-commit", {"job-id": "c", "device": "top", "top-node": "mid",
                                     "auto-finalize": False, "auto-dismiss": False,
                                     "backing-file": "base.qcow2"}),
            ("wait", "BLOCK_JOB_PENDING"), Q, QJ,
            ("cmd", "block-job-finalize", {"id": "c"}), ("wait", "BLOCK_JOB_COMPLETED"),
            ("status", "c", ["concluded"]), Q,
            # not the graph: QEMU then names the top json:{...} (its header's backing name
            # differs from the backing node's filename), which blockmirror does not do
            ("cmd", "block-job-dismiss", {"id": "c"}), ("settle",), Q, QJ]


def active_commit_complete(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-commit", {"job-id": "a", "device": "top"}),
            ("wait", "BLOCK_JOB_READY"), Q, QJ,
            ("cmd", "block-job-complete", {"device": "a"}), ("wait", "BLOCK_JOB_COMPLETED"),
            *END]


def active_commit_to_mid(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-commit", {"job-id": "a", "device": "top", "base-node": "mid"}),
            ("wait", "BLOCK_JOB_READY"),
            ("cmd", "block-job-complete", {"device": "a"}), ("wait", "BLOCK_JOB_COMPLETED"),
            *END]


def active_commit_cancel(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-commit", {"device": "top", "job-id": "a", "auto-dismiss": False}),
            ("wait", "BLOCK_JOB_READY"),
            ("cmd", "block-job-cancel", {"device": "a"}), ("wait", "BLOCK_JOB_COMPLETED"),
            ("status", "a", ["concluded"]), Q, ("cmd", "job-dismiss", {"id": "a"}), *END]


def stream_to_base(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-stream", {"job-id": "s", "device": "top", "base-node": "base"}),
            ("wait", "BLOCK_JOB_COMPLETED"), *END]


def stream_whole_chain(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-stream", {"job-id": "s", "device": "top"}),
            ("wait", "BLOCK_JOB_COMPLETED"), *END]


def stream_bottom(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-stream", {"job-id": "s", "device": "top", "bottom": "mid",
                                     "auto-finalize": False}),
            ("wait", "BLOCK_JOB_PENDING"), ("cmd", "job-finalize", {"id": "s"}),
            ("wait", "BLOCK_JOB_COMPLETED"), *END]


def read_only_backing(p: dict[str, str]) -> list[Step]:
    """Read-only backing files are reopened read-write for the commit, and back."""
    return [*open_chain(p, read_only=("base", "mid")),
            ("cmd", "block-commit", {"job-id": "c", "device": "top", "top-node": "mid"}),
            ("wait", "BLOCK_JOB_COMPLETED"), ("settle",), GRAPH,
            # (no graph while the job runs: QEMU lists its implicit filter, ours hides it)
            ("cmd", "block-commit", {"job-id": "a", "device": "top"}),
            ("wait", "BLOCK_JOB_READY"), ("cmd", "block-job-complete", {"device": "a"}),
            ("wait", "BLOCK_JOB_COMPLETED", 2), *END]


def read_only_stream(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p, read_only=("base", "mid", "top")),
            ("cmd", "block-stream", {"job-id": "s", "device": "mid"}),
            ("wait", "BLOCK_JOB_COMPLETED"), *END]


def stream_cancel(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-stream", {"job-id": "s", "device": "top", "speed": 1,
                                     "filter-node-name": "cor"}),
            ("progress", "s", 1), Q, GRAPH, ("cmd", "block-job-pause", {"device": "s"}),
            ("status", "s", ["paused"]), ("cmd", "block-job-resume", {"device": "s"}),
            ("cmd", "block-job-cancel", {"device": "s"}), ("wait", "BLOCK_JOB_CANCELLED"),
            *END]


def commit_filter_named(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-commit", {"job-id": "c", "device": "top", "top-node": "mid",
                                     "speed": 1, "filter-node-name": "ctop"}),
            ("progress", "c", 1), Q, GRAPH,
            ("cmd", "block-job-set-speed", {"device": "c", "speed": 0}),
            ("wait", "BLOCK_JOB_COMPLETED"), *END]


def commit_grows_base(p: dict[str, str]) -> list[Step]:
    """A base shorter than what is committed into it is grown first (both kinds)."""
    # (QEMU refuses block_resize on a backing node: the images grow before they are opened)
    grow: list[Step] = [("io", ["qemu-img", "resize", "-q", p[n], str(6 * MiB)])
                        for n in ("mid", "top")]
    return [*grow, *open_chain(p),
            ("cmd", "block-commit", {"job-id": "c", "device": "top", "top-node": "mid"}),
            ("wait", "BLOCK_JOB_COMPLETED"), ("settle",), GRAPH,
            ("cmd", "block_resize", {"node-name": "top", "size": 8 * MiB}),
            ("cmd", "block-commit", {"job-id": "a", "device": "top"}),
            ("wait", "BLOCK_JOB_READY"), ("cmd", "block-job-complete", {"device": "a"}),
            ("wait", "BLOCK_JOB_COMPLETED", 2), *END]


def quit_during_commit(p: dict[str, str]) -> list[Step]:
    """iotests qsd-jobs' first case with an intermediate commit asleep in its rate limit at
    ``quit`` (every script ends with it): it is cancelled, with all its events before quit's
    reply."""
    return [*open_chain(p),
            ("cmd", "block-commit", {"job-id": "c", "device": "top", "top-node": "mid",
                                     "speed": 1}),
            ("progress", "c", 1)]


def quit_during_active_commit(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-commit", {"job-id": "a", "device": "top", "speed": 1}),
            ("progress", "a", 1), Q]


def quit_during_stream(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p),
            ("cmd", "block-stream", {"job-id": "s", "device": "top", "speed": 1}),
            ("progress", "s", 1)]


def _open_top_only(p: dict[str, str]) -> Step:
    """The top alone: its backing chain is opened from the image headers (auto-named)."""
    return ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "top",
                                    "file": {"driver": "file", "filename": p["top"]}})


def commit_by_filename(p: dict[str, str]) -> list[Step]:
    """The deprecated ``top``/``base`` filenames, on a chain opened from the headers: the
    dropped node, which only the chain referenced, is closed."""
    return [_open_top_only(p), GRAPH,
            ("cmd", "block-commit", {"job-id": "c", "device": "top", "top": p["mid"],
                                     "base": p["base"]}),
            ("wait", "BLOCK_JOB_COMPLETED"), *END]


def stream_by_filename(p: dict[str, str]) -> list[Step]:
    return [_open_top_only(p),
            ("cmd", "block-stream", {"job-id": "s", "device": "top", "base": p["base"],
                                     "backing-file": "base.qcow2"}),
            ("wait", "BLOCK_JOB_COMPLETED"), ("settle",), Q, QJ]


def relative_names(p: dict[str, str]) -> list[Step]:
    """Headers that name their backing files relatively, looked up by either spelling."""
    rel: list[Step] = [("io", ["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", f"{below}.qcow2",
                               p[name]]) for name, below in (("mid", "base"), ("top", "mid"))]
    c, s = "block-commit", "block-stream"
    return [*rel, _open_top_only(p),
            ("cmd", s, {"job-id": "s", "device": "top", "base": "nosuch.qcow2"}),
            ("cmd", c, {"job-id": "c", "device": "top", "top": "mid.qcow2", "base": "x"}),
            ("cmd", c, {"job-id": "c", "device": "top", "top": "nosuch", "base": "x"}),
            ("cmd", c, {"job-id": "c", "device": "top", "top": p["mid"], "base": p["top"]}),
            ("cmd", c, {"job-id": "c", "device": "top", "top": p["top"]}),
            ("wait", "BLOCK_JOB_READY"), ("cmd", "block-job-cancel", {"device": "c"}),
            ("wait", "BLOCK_JOB_COMPLETED"), ("settle",),
            ("cmd", s, {"job-id": "s", "device": "top", "base": "base.qcow2"}),
            ("wait", "BLOCK_JOB_COMPLETED", 2), *END]


def busy_with_mirror(p: dict[str, str]) -> list[Step]:
    """Nodes a commit uses refuse a mirror, and nodes a mirror uses refuse commit and (on
    its source) stream, with QEMU's texts."""
    c, s = "block-commit", "block-stream"
    tgt = ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "tgt", "size": SIZE})
    slow = {"speed": 1, "buf-size": 65536, "granularity": 65536}
    return [*open_chain(p), tgt,
            ("cmd", c, {"job-id": "c", "device": "top", "top-node": "mid", "speed": 1}),
            ("progress", "c", 1),
            ("cmd", "blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt",
                                        "sync": "full"}),
            ("cmd", "blockdev-mirror", {"job-id": "m", "device": "mid", "target": "tgt",
                                        "sync": "full"}),
            ("cmd", "block-job-cancel", {"device": "c"}), ("wait", "BLOCK_JOB_CANCELLED"),
            ("settle",),
            ("cmd", "blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt",
                                        "sync": "full", **slow}),
            ("progress", "m", 1),
            ("cmd", c, {"job-id": "c", "device": "top"}),
            ("cmd", c, {"job-id": "c", "device": "top", "top-node": "mid"}),
            ("cmd", s, {"job-id": "s", "device": "top"}),
            # (not a stream of mid now, which QEMU allows: its graph changes drain the
            # mirror's nodes, and QEMU shows those drains as paused/running pairs of the
            # mirror job, which blockmirror does not emit)
            ("cmd", "block-job-cancel", {"device": "m"}), ("wait", "BLOCK_JOB_CANCELLED", 2),
            *END]


def bad_arguments(p: dict[str, str]) -> list[Step]:
    c, s = "block-commit", "block-stream"
    return [*open_chain(p),
            ("cmd", c, {"device": "nosuch"}),
            ("cmd", c, {"device": "mid"}),
            ("cmd", c, {"device": "top", "top-node": "top", "base-node": "top"}),
            ("cmd", c, {"device": "top", "top-node": "nosuch"}),
            ("cmd", c, {"device": "top", "top-node": "mid", "top": "x"}),
            ("cmd", c, {"device": "top", "base-node": "top-file"}),
            ("cmd", c, {"device": "top", "base-node": "base", "base": "x"}),
            ("cmd", c, {"device": "top", "base": "nosuch.qcow2"}),
            ("cmd", c, {"device": "top", "top": "nosuch.qcow2"}),
            ("cmd", c, {"device": "top", "backing-file": "x"}),
            ("cmd", c, {"device": "top", "top-node": "mid", "speed": -1, "job-id": "c"}),
            ("cmd", c, {"device": "top", "top-node": "mid", "job-id": "1bad"}),
            ("cmd", c, {"device": "top", "top-node": "mid"}),
            ("cmd", c, {"device": "top", "top-node": "mid", "job-id": "c",
                        "filter-node-name": "base"}),
            ("cmd", c, {"device": "top", "job-id": "a", "speed": -5}),
            ("cmd", c, {"device": "top-file"}),
            ("cmd", c, {"device": "base", "job-id": "b"}),
            ("cmd", s, {"device": "top", "base": "x", "base-node": "base"}),
            ("cmd", s, {"device": "top", "base": "x", "bottom": "mid"}),
            ("cmd", s, {"device": "top", "bottom": "mid", "base-node": "base"}),
            ("cmd", s, {"device": "nosuch"}),
            ("cmd", s, {"device": "top", "base": "nosuch.qcow2"}),
            ("cmd", s, {"device": "top", "base-node": "top"}),
            ("cmd", s, {"device": "mid", "base-node": "top"}),
            ("cmd", s, {"device": "top", "bottom": "nosuch"}),
            ("cmd", s, {"device": "mid", "bottom": "top"}),
            ("cmd", s, {"device": "top", "backing-file": "x"}),
            ("cmd", s, {"device": "top", "speed": -1, "job-id": "s"}),
            ("cmd", s, {"device": "top"}),
            ("cmd", s, {"device": "top", "job-id": "s", "filter-node-name": "mid"}),
            ("cmd", s, {"device": "base", "job-id": "s"}),
            ("wait", "JOB_STATUS_CHANGE:concluded"),
            *END]


def busy_nodes(p: dict[str, str]) -> list[Step]:
    slow = {"speed": 1}
    return [*open_chain(p),
            ("cmd", "block-commit", {"job-id": "c", "device": "top", "top-node": "mid",
                                     **slow}),
            ("progress", "c", 1),
            ("cmd", "block-stream", {"job-id": "s", "device": "top"}),
            ("cmd", "block-commit", {"job-id": "c2", "device": "top"}),
            ("cmd", "block-commit", {"job-id": "c3", "device": "top", "top-node": "mid"}),
            ("cmd", "blockdev-del", {"node-name": "mid"}),
            Q, ("cmd", "block-job-cancel", {"device": "c"}), ("wait", "BLOCK_JOB_CANCELLED"),
            *END]


#: the first write to reach the layer's file fails (blkdebug's generic write event: QEMU's
#: qcow2 raises write_aio/read_aio for its data, ours does not)
EIO_WRITE = {"event": "pwritev", "errno": 5, "once": True}


def commit_write_error_report(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p, {"base": {**EIO_WRITE, "once": False}}),
            ("cmd", "block-commit", {"job-id": "c", "device": "top", "top-node": "mid"}),
            ("wait", "BLOCK_JOB_COMPLETED"), ("settle",), Q, QJ]


def commit_write_error_stop(p: dict[str, str]) -> list[Step]:
    # an explicit backing-file: the default is the base's filename, here a json:{...}
    # (blkdebug) whose spelling differs between QEMU and us
    return [*open_chain(p, {"base": EIO_WRITE}),
            ("cmd", "block-commit", {"job-id": "c", "device": "top", "top-node": "mid",
                                     "on-error": "stop", "backing-file": "base.qcow2"}),
            ("wait", "BLOCK_JOB_ERROR"), ("status", "c", ["paused"]), Q,
            ("cmd", "block-job-resume", {"device": "c"}),
            ("wait", "BLOCK_JOB_COMPLETED"), ("settle",), Q, QJ]


def active_commit_write_error_stop(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p, {"base": EIO_WRITE}),
            ("cmd", "block-commit", {"job-id": "a", "device": "top", "on-error": "stop"}),
            ("wait", "BLOCK_JOB_ERROR"), ("status", "a", ["paused"]), Q,
            ("cmd", "block-job-resume", {"device": "a"}),
            ("wait", "BLOCK_JOB_READY"), ("cmd", "block-job-complete", {"device": "a"}),
            ("wait", "BLOCK_JOB_COMPLETED"), ("settle",), Q, QJ]


def stream_write_error_stop(p: dict[str, str]) -> list[Step]:
    return [*open_chain(p, {"top": EIO_WRITE}),
            ("cmd", "block-stream", {"job-id": "s", "device": "top", "on-error": "stop"}),
            ("wait", "BLOCK_JOB_ERROR"), ("status", "s", ["paused"]), Q,
            ("cmd", "block-job-resume", {"device": "s"}),
            ("wait", "BLOCK_JOB_COMPLETED"), ("settle",), Q, QJ]


def stream_write_error_ignore(p: dict[str, str]) -> list[Step]:
    """An ignored error still fails the job at its end, and the backing stays."""
    return [*open_chain(p, {"top": EIO_WRITE}),
            ("cmd", "block-stream", {"job-id": "s", "device": "top", "on-error": "ignore"}),
            ("wait", "BLOCK_JOB_COMPLETED"), ("settle",), Q, QJ]


def _export(p: dict[str, str], node: str) -> list[Step]:
    sock = os.path.join(os.path.dirname(p["top"]), "nbd.sock")
    return [("cmd", "nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}),
            ("cmd", "block-export-add", {"type": "nbd", "id": "e", "node-name": node,
                                         "name": "disk", "writable": True})]


def _guest_write(p: dict[str, str], pattern: int, offset: int, length: int) -> Step:
    """A write through the NBD export (run between QMP steps)."""
    sock = os.path.join(os.path.dirname(p["top"]), "nbd.sock")
    return ("io", ["qemu-io", "-f", "raw", "-c",
                   f"write -P {pattern:#x} {offset} {length}",
                   f"nbd+unix:///disk?socket={sock}"])


def stream_next_to_export(p: dict[str, str]) -> list[Step]:
    """iotests qsd-jobs' second case: the export writes a node the stream must freeze."""
    return [*open_chain(p), *_export(p, "base"),
            ("cmd", "block-stream", {"job-id": "s", "device": "top"}),
            ("cmd", "block-stream", {"job-id": "s", "device": "top", "base-node": "mid"}),
            ("wait", "BLOCK_JOB_COMPLETED"),
            ("cmd", "block-commit", {"job-id": "c", "device": "top", "top-node": "mid"}),
            # active commit shares writes on its base: the export may stay
            ("cmd", "block-commit", {"job-id": "a", "device": "top"}),
            ("wait", "BLOCK_JOB_READY"), ("cmd", "block-job-complete", {"device": "a"}),
            ("wait", "BLOCK_JOB_COMPLETED", 2),
            ("cmd", "block-export-del", {"id": "e"}), ("wait", "BLOCK_EXPORT_DELETED"),
            *END]


def active_commit_with_guest(p: dict[str, str]) -> list[Step]:
    """libvirt's active commit under a writing guest: writes before the pivot reach the
    base through the mirror, writes after it go to the base directly."""
    return [*open_chain(p), *_export(p, "top"),
            ("cmd", "block-commit", {"job-id": "a", "device": "top"}),
            ("wait", "BLOCK_JOB_READY"),
            _guest_write(p, 0x77, 1 * MiB + 4096, 64 * 1024),
            Q, ("cmd", "block-job-complete", {"device": "a"}),
            ("wait", "BLOCK_JOB_COMPLETED"), *END, ("cmd", "query-block-exports"),
            _guest_write(p, 0x78, 2 * MiB, 64 * 1024),
            ("cmd", "block-export-del", {"id": "e"}), ("wait", "BLOCK_EXPORT_DELETED")]


def stream_with_guest(p: dict[str, str]) -> list[Step]:
    """A guest write lands in the streamed node while the job is asleep in its rate limit:
    the stream must not overwrite it with the older data from below."""
    return [*open_chain(p), *_export(p, "top"),
            ("cmd", "block-stream", {"job-id": "s", "device": "top", "speed": 1}),
            ("progress", "s", 1),
            _guest_write(p, 0x79, 3 * MiB + 256 * 1024, 4096),
            _guest_write(p, 0x7a, 1 * MiB + 512 * 1024, 4096),
            ("cmd", "block-job-set-speed", {"device": "s", "speed": 0}),
            ("wait", "BLOCK_JOB_COMPLETED"), *END,
            ("cmd", "block-export-del", {"id": "e"}), ("wait", "BLOCK_EXPORT_DELETED")]


SCRIPTS: list[Callable[[dict[str, str]], list[Step]]] = [
    intermediate_commit, intermediate_commit_manual, active_commit_complete,
    active_commit_to_mid, active_commit_cancel, stream_to_base, stream_whole_chain,
    stream_bottom, bad_arguments, busy_nodes, stream_next_to_export, active_commit_with_guest,
    stream_with_guest, commit_write_error_report, commit_write_error_stop,
    active_commit_write_error_stop, stream_write_error_stop, stream_write_error_ignore,
    read_only_backing, read_only_stream, stream_cancel, commit_filter_named, commit_grows_base,
    quit_during_commit, quit_during_active_commit, quit_during_stream, commit_by_filename,
    stream_by_filename, relative_names, busy_with_mirror,
]


#: scripts whose guest writes change what the top reads
GUEST_WRITES = {active_commit_with_guest, stream_with_guest, commit_grows_base}
#: the nodes an active commit made the active layer: they now read as the top did
ACTIVE_TARGETS: dict[Callable[[dict[str, str]], list[Step]], tuple[str, ...]] = {
    active_commit_complete: ("base",), active_commit_to_mid: ("mid",),
    active_commit_write_error_stop: ("base",), read_only_backing: ("base",),
    stream_next_to_export: ("base",),
}


async def run_phases(qmp: Any, steps: list[Step], workdir: str) -> Transcript:
    """``run_script`` with ("io", argv) steps: a command run between two QMP phases."""
    out = Transcript()
    phase: list[Step] = []
    for step in [*steps, ("io", None)]:
        if step[0] != "io":
            phase.append(step)
            continue
        if phase:
            tr = await run_script(qmp, phase, limit_s=60, workdir=workdir)
            out.replies += tr.replies
            out.events += tr.events
            phase = []
        if step[1] is not None:
            r = await asyncio.create_subprocess_exec(*step[1], stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.STDOUT)
            text, _ = await r.communicate()
            assert r.returncode == 0, text
    return out


def _img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def image_state(workdir: str, paths: dict[str, str]) -> dict[str, Any]:
    """What each image holds, with ``workdir`` written as ``$W``: the backing chain qemu-img
    sees (names, formats, sizes) and the check verdict."""
    out: dict[str, Any] = {}
    for name, path in paths.items():
        info = _img("info", "--output=json", "--backing-chain", "-U", path)
        text = (info.stdout or "[]").replace(workdir, "$W")
        chain = [{"filename": i["filename"], "backing": i.get("backing-filename"),
                  "backing-format": i.get("backing-filename-format"),
                  "virtual-size": i["virtual-size"]}
                 for i in json.loads(text)]
        check = _img("check", "-U", path)
        out[name] = {"chain": chain, "check": check.returncode, "info": info.returncode}
    return out


def same_contents(a: str, b: str) -> bool:
    r = _img("compare", "-U", "-f", "qcow2", "-F", "qcow2", a, b)
    return r.returncode == 0


def _paths(replies: list[Any], workdir: Path) -> Any:
    """Replies with the work directory written as ``$W``, automatic node names as ``#block``
    and the allocated sizes dropped (how many host bytes an image takes is not what the
    scripts compare)."""
    text = json.dumps(replies).replace(str(workdir), "$W")
    # QEMU's automatic node names carry random digits (cf. id_generate)
    return drop_host_sizes(json.loads(re.sub(r"#block\d+", "#block", text)))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_commit_stream_like_qsd(script: Callable[[dict[str, str]], list[Step]],
                                tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")

    async def one(name: str, factory: Any) -> tuple[Transcript, dict[str, str]]:
        work = tmp_path / name
        work.mkdir()
        paths = make_chain(str(work))
        async with factory(str(work)) as qmp:
            steps = [*script(paths), ("cmd", "quit")]
            return await run_phases(qmp, steps, str(work)), paths

    async def main() -> None:
        (theirs, tp), (ours, op) = await asyncio.gather(one("qsd", qsd_client),
                                                        one("ours", our_client))
        assert _paths(ours.replies, tmp_path / "ours") == _paths(theirs.replies,
                                                                 tmp_path / "qsd")
        assert ours.events == theirs.events
        assert image_state(str(tmp_path / "ours"), op) == \
            image_state(str(tmp_path / "qsd"), tp)
        for name in LAYERS:
            assert same_contents(op[name], tp[name]), name
        # and against the chain as it was: what the guest sees through the top never changes
        # (unless the script wrote), and an active commit's base now reads as the top did
        ref = tmp_path / "ref"
        ref.mkdir()
        rp = make_chain(str(ref))
        if script not in GUEST_WRITES:
            assert same_contents(op["top"], rp["top"])
        for node in ACTIVE_TARGETS.get(script, ()):
            assert same_contents(op[node], rp["top"]), node

    asyncio.run(main())
