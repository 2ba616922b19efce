"""drive-mirror against qemu-storage-daemon: target creation, backing fix-ups, node lifetime.

The same drive-mirror session (sync top / full / none on a qcow2 over a raw base, with
complete, job-cancel and soft cancel) runs on both daemons; the events, the replies, the
``Formatting ...`` lines printed on stdout and the nodes left afterwards must agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require_tool
from mirror_scripts.differential import (
    Step,
    make_images,
    our_client,
    qsd_client,
    run_script,
)

pytestmark = pytest.mark.interop


@contextlib.contextmanager
def _our_stdout() -> Iterator[list[str]]:
    """What our daemons print on stdout meanwhile (the ``Formatting ...`` lines), line by
    line; they still print it."""
    from blockmirror.daemon import Daemon

    lines: list[str] = []
    orig = Daemon.print_stdout

    def capture(self: Daemon, line: str) -> None:
        lines.append(line)
        orig(self, line)

    Daemon.print_stdout = capture  # type: ignore[method-assign]
    try:
        yield lines
    finally:
        Daemon.print_stdout = orig  # type: ignore[method-assign]


def _steps(work: str) -> list[Step]:
    p = make_images(work)
    top = os.path.join(work, "top.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", p["src"], "-F", "raw",
                    top], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 1M 64k", top], check=True,
                   capture_output=True)

    def dm(job: str, name: str, sync: str, **kw: Any) -> Step:
        return ("cmd", "drive-mirror", {"job-id": job, "device": "top", "sync": sync,
                                        "target": os.path.join(work, name), **kw})

    return [
        ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "top",
                                 "file": {"driver": "file", "filename": top}}),
        dm("a", "a.qcow2", "top"), ("wait", "BLOCK_JOB_READY", 1),
        ("cmd", "block-job-complete", {"device": "a"}), ("wait", "BLOCK_JOB_COMPLETED", 1),
        # full: 4 MiB are READY at once; job-cancel still forces (CANCELLED)
        dm("b", "b.qcow2", "full", **{"node-name": "bn"}), ("wait", "BLOCK_JOB_READY", 2),
        ("cmd", "job-cancel", {"id": "b"}), ("wait", "BLOCK_JOB_CANCELLED", 1),
        dm("c", "c.qcow2", "none", granularity=4096), ("wait", "BLOCK_JOB_READY", 3),
        ("cmd", "query-block-jobs"),
        ("cmd", "block-job-cancel", {"device": "c"}), ("wait", "BLOCK_JOB_COMPLETED", 2),
        dm("d", "a.qcow2", "top", mode="existing"), ("wait", "BLOCK_JOB_READY", 4),
        ("cmd", "block-job-complete", {"device": "d"}), ("wait", "BLOCK_JOB_COMPLETED", 3),
        ("sleep", 0.1), ("cmd", "query-block-jobs"),
    ]


def _nodes(qmp_reply: Any) -> list[tuple[str, str]]:
    """(driver, backing file) of every node; auto names differ between the daemons."""
    return sorted((n["drv"], os.path.basename(n.get("backing_file", "-"))) for n in qmp_reply)


def test_drive_mirror_session_matches_qsd(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")

    async def one(name: str, factory: Any) -> tuple[Any, list[tuple[str, str]]]:
        work = tmp_path / name
        work.mkdir()
        async with factory(str(work)) as qmp:
            tr = await run_script(qmp, _steps(str(work)), limit_s=60, workdir=str(work))
            nodes = _nodes(await qmp.execute("query-named-block-nodes", {"flat": True}))
        return tr, nodes

    theirs, their_nodes = asyncio.run(one("qsd", qsd_client))
    their_out = (tmp_path / "qsd" / "qsd.out").read_text().replace(str(tmp_path / "qsd"), "$W")

    with _our_stdout() as lines:
        ours, our_nodes = asyncio.run(one("ours", our_client))
    our_out = "".join(f"{line}\n" for line in lines).replace(str(tmp_path / "ours"), "$W")

    assert ours.replies == theirs.replies
    assert ours.events == theirs.events
    assert our_out == their_out and our_out.count("Formatting") == 3
    assert our_nodes == their_nodes


def test_drive_mirror_of_a_protocol_node_creates_a_plain_file(tmp_path: Path) -> None:
    """A ``file`` source: both daemons create the target through the file driver (fmt=file)."""
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")

    def steps(work: str) -> list[Step]:
        plain = os.path.join(work, "plain.img")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", plain, "2M"], check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 64k 64k", plain],
                       check=True, capture_output=True)
        return [
            ("cmd", "blockdev-add", {"driver": "file", "node-name": "pf", "filename": plain}),
            ("cmd", "drive-mirror", {"job-id": "e", "device": "pf", "sync": "full",
                                     "target": os.path.join(work, "e.img")}),
            ("wait", "BLOCK_JOB_READY", 1),
            ("cmd", "block-job-complete", {"device": "e"}), ("wait", "BLOCK_JOB_COMPLETED", 1),
        ]

    async def one(name: str, factory: Any) -> Any:
        work = tmp_path / name
        work.mkdir()
        async with factory(str(work)) as qmp:
            return await run_script(qmp, steps(str(work)), limit_s=60, workdir=str(work))

    theirs = asyncio.run(one("qsd", qsd_client))
    their_out = (tmp_path / "qsd" / "qsd.out").read_text().replace(str(tmp_path / "qsd"), "$W")
    assert "fmt=file" in their_out

    with _our_stdout() as lines:
        ours = asyncio.run(one("ours", our_client))
    our_out = "".join(f"{line}\n" for line in lines).replace(str(tmp_path / "ours"), "$W")
    assert ours.replies == theirs.replies
    assert ours.events == theirs.events
    assert our_out == their_out
    assert (tmp_path / "ours" / "e.img").read_bytes() == (tmp_path / "ours" /
                                                          "plain.img").read_bytes()
