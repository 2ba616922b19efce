"""Backup jobs in-process: bitmaps after failures, copy-before-write failing a guest write,
grouped completion, drive-backup's sync=none overlay, and quitting with a backup running."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block.create import img_create
from blockmirror.errors import BlockIOError
from blockmirror.qmp.testing import TestDaemon, qmp_daemon

K = 1024
M = 1024 * K


async def _qcow2(qmp: Any, tmp: Path, name: str, size: int = 4 * M) -> None:
    path = tmp / f"{name}.qcow2"
    await img_create(str(path), "qcow2", size, quiet=True)
    await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": name, "file": {
        "driver": "file", "filename": str(path), "node-name": f"{name}-f"}})


def _history(td: TestDaemon, *names: str) -> list[tuple[str, dict[str, Any]]]:
    return [(e["event"], e["data"]) for e in td.daemon.events.history
            if e["event"] in names]


async def _done(td: TestDaemon, qmp: Any, job: str) -> None:
    while td.daemon.jobs.find(job) is not None:
        await td.next_event(qmp, "JOB_STATUS_CHANGE")


async def _all_done(td: TestDaemon, qmp: Any) -> None:
    while td.daemon.jobs.jobs:
        await td.next_event(qmp, "JOB_STATUS_CHANGE")


async def _src_t1_t2(qmp: Any, tmp: Path) -> None:
    for name in ("src", "t1", "t2"):
        await _qcow2(qmp, tmp, name)


def _backup(job: str, target: str, sync: str, **extra: Any) -> dict[str, Any]:
    """A transaction's blockdev-backup action of ``src``."""
    return {"type": "blockdev-backup", "data": {"job-id": job, "device": "src",
                                                "target": target, "sync": sync, **extra}}


async def _grouped(qmp: Any, *actions: dict[str, Any]) -> None:
    await qmp.execute("transaction", {"actions": list(actions),
                                      "properties": {"completion-mode": "grouped"}})


def test_always_mode_after_a_failure_keeps_what_was_not_copied(tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await _qcow2(qmp, tmp_path, "src")
            await _qcow2(qmp, tmp_path, "tgt")
            src = td.daemon.graph.find_node("src")
            await qmp.execute("block-dirty-bitmap-add", {"node": "src", "name": "b"})
            await src.write(0, b"\1" * (2 * M))
            await qmp.execute("x-fault-add", {"node-name": "tgt-f", "operation": "write"})
            await qmp.execute("blockdev-backup", {
                "job-id": "j", "device": "src", "target": "tgt", "sync": "bitmap",
                "bitmap": "b", "bitmap-mode": "always"})
            done = await td.next_event(qmp, "BLOCK_JOB_COMPLETED")
            assert done["data"]["error"] == "Input/output error"
            await _done(td, qmp, "j")
            (node,) = [n for n in await qmp.execute("query-named-block-nodes")
                       if n["node-name"] == "src"]
            (bm,) = node["dirty-bitmaps"]
            # nothing was copied: every cluster of the old bitmap is still dirty
            assert bm["count"] == 2 * M and not bm["busy"] and bm["recording"]

    asyncio.run(main())


def test_a_failed_copy_before_write_fails_the_guest_write(tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await _qcow2(qmp, tmp_path, "src")
            await _qcow2(qmp, tmp_path, "tgt")
            src = td.daemon.graph.find_node("src")
            await src.write(0, b"\xaa" * (4 * M))
            await qmp.execute("blockdev-backup", {"job-id": "j", "device": "src",
                                                  "target": "tgt", "sync": "none"})
            rule = await qmp.execute("x-fault-add", {"node-name": "tgt-f",
                                                     "operation": "write"})
            with pytest.raises(BlockIOError) as e:
                await src.write(M, b"\xbb" * 4096)
            assert e.value.errno == errno.EIO
            assert await src.read(M, 4096) == b"\xaa" * 4096  # the write never happened
            await qmp.execute("x-fault-remove", {"id": rule["id"]})
            await src.write(M, b"\xbb" * 4096)  # copies the old cluster, then writes
            (job,) = await qmp.execute("query-block-jobs")
            assert job["offset"] == 64 * K and job["status"] == "running"
            await qmp.execute("block-job-cancel", {"device": "j"})
            assert _history(td, "BLOCK_JOB_CANCELLED")[-1][1]["offset"] == 64 * K
            tgt = td.daemon.graph.find_node("tgt")
            assert await tgt.read(M, 64 * K) == b"\xaa" * (64 * K)
            assert await tgt.read(0, 4096) == bytes(4096)
            # the filter and the hook are gone
            assert not src.interceptors and [n for n in td.daemon.graph.nodes
                                             if n.startswith("#")] == []

    asyncio.run(main())


def test_a_failing_member_of_a_group_cancels_the_others(tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await _src_t1_t2(qmp, tmp_path)
            await td.daemon.graph.find_node("src").write(0, b"\1" * M)
            await qmp.execute("x-fault-add", {"node-name": "t2-f", "operation": "write"})
            await _grouped(qmp, _backup("a", "t1", "none"), _backup("b", "t2", "full"))
            await _all_done(td, qmp)
            final = _history(td, "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
            assert [(n, d["device"]) for n, d in final] == [
                ("BLOCK_JOB_COMPLETED", "b"), ("BLOCK_JOB_CANCELLED", "a")]
            assert final[0][1]["error"] == "Input/output error"

    asyncio.run(main())


def test_grouped_jobs_reach_pending_together(tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await _src_t1_t2(qmp, tmp_path)
            await _grouped(qmp, _backup("a", "t1", "full", **{"auto-finalize": False}),
                           _backup("b", "t2", "full"))
            await td.next_event(qmp, "BLOCK_JOB_PENDING")
            status = {j["id"]: j["status"] for j in await qmp.execute("query-jobs")}
            assert status == {"a": "pending", "b": "pending"}
            await qmp.execute("job-finalize", {"id": "a"})
            assert td.daemon.jobs.jobs == {}
            changes = [(d["id"], d["status"]) for _n, d in _history(td, "JOB_STATUS_CHANGE")]
            waiting = max(changes.index((j, "waiting")) for j in "ab")
            assert waiting < min(changes.index((j, "pending")) for j in "ab")

    asyncio.run(main())


def test_drive_backup_sync_none_overlays_the_source_and_quit_ends_the_job(
        tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await _qcow2(qmp, tmp_path, "src")
            await td.daemon.graph.find_node("src").write(0, b"\5" * M)
            target = tmp_path / "ov.qcow2"
            await qmp.execute("drive-backup", {"job-id": "d", "device": "src",
                                               "target": str(target), "sync": "none",
                                               "format": "qcow2"})
            nodes = {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes")}
            (ov,) = [n for n in nodes.values()
                     if n["file"] == str(target) and n["drv"] == "qcow2"]
            assert ov["backing_file"] == str(tmp_path / "src.qcow2")
            ov_node = td.daemon.graph.find_node(ov["node-name"])
            assert await ov_node.read(0, 16) == b"\5" * 16  # through its backing, the source
            await td.daemon.jobs.cancel_all_for_shutdown()
            assert td.daemon.jobs.jobs == {}
            assert ov_node.name not in td.daemon.graph.nodes  # drive-backup's target closed

    asyncio.run(main())


def test_a_grouped_transaction_aborted_before_its_jobs_start(tmp_path: Path) -> None:
    """(qemu-storage-daemon 7.2 hangs on this one; ours rolls everything back.)"""
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await _src_t1_t2(qmp, tmp_path)
            from qemu.qmp import ExecuteError
            with pytest.raises(ExecuteError, match="Transaction aborted using Abort action"):
                await _grouped(qmp, _backup("a", "t1", "full"), _backup("b", "t2", "full"),
                               {"type": "abort", "data": {}})
            assert td.daemon.jobs.jobs == {}
            assert not td.daemon.graph.find_node("src").interceptors
            assert [n for n in td.daemon.graph.nodes if n.startswith("#")] == []
            assert not td.daemon.graph.find_node("t1").blockers
            changes = [(d["id"], d["status"]) for _n, d in _history(td, "JOB_STATUS_CHANGE")]
            for j in "ab":
                assert [s for i, s in changes if i == j] == [
                    "created", "aborting", "concluded", "null"]
            assert not _history(td, "BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED")
            # a later group works (nothing of the failed one is left behind)
            await _grouped(qmp, _backup("c", "t1", "full"))
            await _done(td, qmp, "c")

    asyncio.run(main())


def test_cancelling_a_waiting_member_cancels_its_group(tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await _src_t1_t2(qmp, tmp_path)
            await _grouped(qmp, _backup("a", "t1", "none"), _backup("b", "t2", "full"))
            while td.daemon.jobs.get_job("b").status.value != "waiting":
                await td.next_event(qmp, "JOB_STATUS_CHANGE")
            await qmp.execute("job-cancel", {"id": "b"})
            await _all_done(td, qmp)
            final = _history(td, "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
            assert sorted((n, d["device"]) for n, d in final) == [
                ("BLOCK_JOB_CANCELLED", "a"), ("BLOCK_JOB_CANCELLED", "b")]

    asyncio.run(main())
