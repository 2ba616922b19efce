"""The mirror job over in-memory nodes: events, pivot, cancel flavours, error policies.

Invariant: every scenario ends with the event sequence QEMU 7.2 produces for it (spec 3.2),
and a completed mirror's target reads like its source.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from blockmirror.block.node import BlockBackend, BlockNode, Perm
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.mirror import MirrorJob, MirrorParams, default_granularity, start_mirror
from mirror_scripts.memory import drv, make_device, make_node

MiB = 1 << 20


class Env:
    def __init__(self, size: int = MiB, tgt_size: int | None = None, **tgt: Any) -> None:
        self.d = Daemon()
        self.g = self.d.graph
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.d.events.subscribe(lambda e: self.events.append((e["event"], e["data"])))
        self.src = make_node(self.g, "src", size)
        self.tgt = make_node(self.g, "tgt", size if tgt_size is None else tgt_size, **tgt)
        self.dev = make_device(self.g, self.src)

    def start(self, **kw: Any) -> MirrorJob:
        return start_mirror(self.d.jobs, "j", self.src, self.tgt, MirrorParams(**kw))

    def names(self) -> list[str]:
        return [n if n != "JOB_STATUS_CHANGE" else d["status"] for n, d in self.events]

    def last(self, name: str) -> dict[str, Any]:
        return [d for n, d in self.events if n == name][-1]

    async def wait_for(self, pred: Callable[[], bool], limit: float = 5.0) -> None:
        for _ in range(int(limit * 1000)):
            if pred():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("condition not reached; events: " + repr(self.names()))

    async def wait_status(self, job: MirrorJob, status: str) -> None:
        await self.wait_for(lambda: job.status.value == status)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


def test_complete_pivots_every_parent_and_removes_the_filter() -> None:
    async def main() -> None:
        env = Env()
        await env.src.write(0, b"\x5a" * 300_000)
        job = env.start(filter_node_name="mf")
        assert env.dev.node is env.g.find_node("mf")  # named filter sits above the source
        await env.wait_status(job, "ready")
        await env.dev.node.write(4096, b"\x01" * 5000)  # through the filter while READY
        await job.complete()
        await job.wait_finished()
        assert env.names() == ["created", "running", "ready", "BLOCK_JOB_READY", "waiting",
                               "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
        done = env.last("BLOCK_JOB_COMPLETED")
        assert done["offset"] == done["len"] > 0 and "error" not in done
        assert env.dev.node is env.tgt and "mf" not in env.g.nodes
        assert await env.tgt.read(0, MiB) == await env.src.read(0, MiB)
        assert not env.src.blockers and not env.tgt.blockers
        assert not env.src.dirty_trackers and not env.src.interceptors

    run(main)


def test_cancel_before_ready_is_forced() -> None:
    async def main() -> None:
        env = Env()
        await env.src.write(0, b"\x11" * MiB)
        job = env.start(speed=1, buf_size=65536, granularity=65536)
        # copying: the first chunk is done and the rate limit holds the job (not a timed wait)
        await env.wait_for(lambda: job.progress.current > 0 and not job.busy)
        await job.user_cancel(False)
        await job.wait_finished()
        assert env.names() == ["created", "running", "aborting", "BLOCK_JOB_CANCELLED",
                               "concluded", "null"]
        c = env.last("BLOCK_JOB_CANCELLED")
        assert c["offset"] < c["len"]
        assert env.dev.node is env.src

    run(main)


@pytest.mark.parametrize(("force", "final"), [(False, "BLOCK_JOB_COMPLETED"),
                                              (True, "BLOCK_JOB_CANCELLED")])
def test_cancel_after_ready(force: bool, final: str) -> None:
    async def main() -> None:
        env = Env()
        await env.src.write(0, b"\x22" * 70_000)
        job = env.start(auto_dismiss=False)
        await env.wait_status(job, "ready")
        await job.user_cancel(force)
        await job.wait_finished()
        assert final in env.names()
        assert env.dev.node is env.src  # no pivot either way
        info = env.d.jobs.query_jobs()[0]
        assert info["status"] == "concluded"
        if force:
            assert info["error"] == "Operation canceled"
        else:
            assert "error" not in info
            assert await env.tgt.read(0, MiB) == await env.src.read(0, MiB)
        env.d.jobs.get_job("j").dismiss()
        assert env.d.jobs.query_jobs() == []

    run(main)


def test_size_mismatch_fails_in_the_run() -> None:
    async def main() -> None:
        env = Env(tgt_size=MiB // 2)
        job = env.start()
        await job.wait_finished()
        assert env.names() == ["created", "running", "aborting", "BLOCK_JOB_COMPLETED",
                               "concluded", "null"]
        assert env.last("BLOCK_JOB_COMPLETED")["error"] == (
            "Source and target image have different sizes")

    run(main)


def test_zero_length_and_sync_none_are_ready_at_once() -> None:
    async def main() -> None:
        for size, sync in ((0, "full"), (MiB, "none")):
            env = Env(size=size)
            job = env.start(sync=sync)
            await env.wait_status(job, "ready")
            ready = env.last("BLOCK_JOB_READY")
            assert ready["len"] == ready["offset"] == 0
            await job.complete()
            await job.wait_finished()
            assert env.names()[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"]

    run(main)


def test_report_policy_fails_with_completed_error() -> None:
    async def main() -> None:
        env = Env()
        await env.src.write(0, b"\x33" * 100_000)
        drv(env.tgt).fail["write"] = errno.EIO
        job = env.start(on_target_error="report")
        await job.wait_finished()
        assert ("BLOCK_JOB_ERROR", {"device": "j", "operation": "write",
                                    "action": "report"}) in env.events
        assert env.names()[-4:] == ["aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
        assert env.last("BLOCK_JOB_COMPLETED")["error"] == "Input/output error"

    run(main)


def test_ignore_policy_retries_and_completes() -> None:
    async def main() -> None:
        env = Env()
        await env.src.write(0, b"\x44" * 100_000)
        drv(env.src).fail["read"] = errno.EIO
        job = env.start(on_source_error="ignore")
        await env.wait_status(job, "ready")
        assert ("BLOCK_JOB_ERROR", {"device": "j", "operation": "read",
                                    "action": "ignore"}) in env.events
        assert job.progress.redirtied > 0
        await job.complete()
        await job.wait_finished()
        assert await env.tgt.read(0, MiB) == await env.src.read(0, MiB)

    run(main)


@pytest.mark.parametrize(("policy", "err", "io_status"), [
    ("stop", errno.EIO, "failed"), ("enospc", errno.ENOSPC, "nospace"),
    ("auto", errno.ENOSPC, "nospace"),
])
def test_stop_policies_pause_until_resume(policy: str, err: int, io_status: str) -> None:
    async def main() -> None:
        env = Env()
        await env.src.write(0, b"\x55" * 100_000)
        drv(env.tgt).fail["write"] = err
        job = env.start(on_target_error=policy)
        await env.wait_status(job, "paused")
        info = env.d.jobs.query_block_jobs()[0]
        assert (info["io-status"], info["paused"], info["status"]) == (io_status, True, "paused")
        with pytest.raises(BlockMirrorError, match="Job is already paused"):
            job.user_pause()
        job.user_resume()
        await env.wait_status(job, "ready")
        assert env.d.jobs.query_block_jobs()[0]["io-status"] == "ok"
        await job.complete()
        await job.wait_finished()
        assert await env.tgt.read(0, MiB) == await env.src.read(0, MiB)

    run(main)


def test_error_after_ready_keeps_ready_stop_gives_standby() -> None:
    async def main() -> None:
        env = Env()
        job = env.start(on_target_error="stop")
        await env.wait_status(job, "ready")
        drv(env.tgt).fail["write"] = errno.EIO
        assert env.dev.node is not None
        await env.dev.node.write(0, b"\x66" * 4096)
        await env.wait_status(job, "standby")
        job.user_resume()
        await env.wait_status(job, "ready")
        assert env.names().count("BLOCK_JOB_READY") == 1
        await job.complete()
        await job.wait_finished()

    run(main)


def test_manual_finalize_and_dismiss() -> None:
    async def main() -> None:
        env = Env()
        job = env.start(auto_finalize=False, auto_dismiss=False)
        await env.wait_status(job, "ready")
        await job.complete()
        await env.wait_status(job, "pending")
        assert env.last("BLOCK_JOB_PENDING") == {"type": "mirror", "id": "j"}
        info = env.d.jobs.query_block_jobs()[0]
        assert info["paused"] is True and info["ready"] is False  # drained, as in QEMU
        with pytest.raises(BlockMirrorError, match="cannot accept command verb 'dismiss'"):
            job.dismiss()
        await job.finalize()
        assert job.status.value == "concluded" and env.dev.node is env.tgt
        job.dismiss()
        assert env.names()[-1] == "null" and env.d.jobs.jobs == {}

    run(main)


def test_shutdown_force_cancels_with_qemus_events() -> None:
    async def main() -> None:
        env = Env()
        await env.src.write(0, b"\x77" * MiB)
        job = env.start(speed=1, buf_size=65536, granularity=65536)
        await env.wait_for(lambda: job.progress.current > 0 and not job.busy)
        await env.d.jobs.cancel_all_for_shutdown()
        assert env.names() == ["created", "running", "paused", "running", "aborting",
                               "BLOCK_JOB_CANCELLED", "concluded", "null"]

    run(main)


def test_write_blocking_copies_writes_synchronously() -> None:
    async def main() -> None:
        env = Env()
        job = env.start(copy_mode="write-blocking", granularity=4096)
        await env.wait_status(job, "ready")
        assert job.actively_synced
        node = env.dev.node
        assert node is not None
        await node.write(8192, b"\x99" * 8192)
        # already on the target when the write returns
        assert await env.tgt.read(8192, 8192) == b"\x99" * 8192
        assert job.dirty.dirty_bytes() == 0
        await job.complete()
        await job.wait_finished()

    run(main)


def test_speed_and_verbs_and_lookup_errors() -> None:
    async def main() -> None:
        env = Env()
        job = env.start(speed=1, buf_size=65536, granularity=65536)
        with pytest.raises(BlockMirrorError, match="Parameter 'speed' expects a non-negative"):
            job.set_speed(-1)
        with pytest.raises(BlockMirrorError, match="cannot accept command verb 'complete'"):
            await job.complete()
        with pytest.raises(BlockMirrorError, match="Can't resume a job that was not paused"):
            job.user_resume()
        with pytest.raises(BlockMirrorError) as ei:
            env.d.jobs.get_block_job("x")
        assert (ei.value.qmp_class, str(ei.value)) == ("DeviceNotActive",
                                                       "Block job 'x' not found")
        with pytest.raises(BlockMirrorError, match=r"^Job not found$"):
            env.d.jobs.get_job("x")
        job.set_speed(0)  # wakes the sleeping job
        await env.wait_status(job, "ready")
        await job.user_cancel(True)
        await job.wait_finished()

    run(main)


def test_start_errors_and_events() -> None:
    async def main() -> None:
        env = Env()
        with pytest.raises(BlockMirrorError, match="Invalid parameter 'buf-size'"):
            start_mirror(env.d.jobs, "j", env.src, env.tgt, MirrorParams(buf_size=-1))
        with pytest.raises(BlockMirrorError, match="Can't mirror node into itself"):
            start_mirror(env.d.jobs, "j", env.src, env.src, MirrorParams())
        with pytest.raises(BlockMirrorError, match="Invalid job ID '1x'"):
            start_mirror(env.d.jobs, "1x", env.src, env.tgt, MirrorParams())
        assert env.events == []
        with pytest.raises(BlockMirrorError, match="expects a non-negative value"):
            start_mirror(env.d.jobs, "j", env.src, env.tgt, MirrorParams(speed=-1))
        assert env.names() == ["created", "null"]
        assert env.dev.node is env.src and len(env.g.nodes) == 2

    run(main)


def _node_with_cluster(cluster: int) -> BlockNode:
    d = Daemon()
    return make_node(d.graph, "n", MiB, cluster=cluster)


@pytest.mark.parametrize(("cluster", "gran"), [(512, 4096), (8192, 8192), (1 << 21, 65536)])
def test_default_granularity(cluster: int, gran: int) -> None:
    assert default_granularity(_node_with_cluster(cluster)) == gran


def test_writes_held_by_the_final_drain_follow_the_pivot() -> None:
    """Writes arriving during completion wait at the drain barrier, then reach the target,
    both through the filter and from a parent that addressed the source node directly."""

    async def main() -> None:
        env = Env()
        late = BlockBackend("", "export 'late'", Perm.CONSISTENT_READ | Perm.WRITE, Perm.all())
        job = env.start()
        env.g.attach(late, env.src, "root", late.perm, late.shared)
        env.g.add_backend(late)
        await env.wait_status(job, "ready")
        gate = asyncio.Event()
        drv(env.tgt).flush_gate = gate  # keep the job drained until the writes are held
        assert env.dev.node is not None
        await env.dev.node.write(8192, b"\xa0" * 512)  # so the final flush has work to do
        await env.wait_for(lambda: job.dirty.dirty_bytes() == 0 and job.progress.current
                           == job.progress.total)
        completing = asyncio.ensure_future(job.complete())
        await env.wait_for(lambda: job.gate.closed)
        via_filter, direct = env.dev.node, late.node
        assert via_filter is not None and direct is not None
        w1 = asyncio.ensure_future(via_filter.write(0, b"\xa1" * 4096))
        w2 = asyncio.ensure_future(direct.write(65536, b"\xa2" * 4096))
        for _ in range(50):
            await asyncio.sleep(0)
        assert not w1.done() and not w2.done()  # held at the barrier
        gate.set()
        await completing
        await job.wait_finished()
        await asyncio.gather(w1, w2)
        assert env.dev.node is env.tgt and late.node is env.tgt
        assert await env.tgt.read(0, 4096) == b"\xa1" * 4096
        assert await env.tgt.read(65536, 4096) == b"\xa2" * 4096

    run(main)
