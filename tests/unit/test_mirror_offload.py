"""The mirror's fast paths over real files: batched copies and the cached block status.

Invariants: a raw-over-file to raw-over-file mirror copies many extents per worker call
(``block/copy.py``) and still ends byte-identical, including a source whose file ends inside
its last sector and writes that land while ops are in flight; anything that must see the data
on the target (a dirty tracker, detect-zeroes) turns the fast path off for that op; a cached
block-status answer is dropped as soon as the source is written.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import subprocess
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block import threadio
from blockmirror.block.copy import writes_inline
from blockmirror.block.driver import BlockStatus
from blockmirror.block.node import BlockNode
from blockmirror.block.options import open_blockdev
from blockmirror.daemon import Daemon
from blockmirror.jobs.mirror import MirrorJob, MirrorParams, start_mirror
from mirror_scripts.memory import make_device

MiB = 1 << 20


async def _raw(d: Daemon, name: str, path: Path, **opts: Any) -> BlockNode:
    return await open_blockdev(d.graph, {"driver": "raw", "node-name": name,
                                         "file": {"driver": "file", "filename": str(path)},
                                         **opts})


def _backend(d: Daemon, node: BlockNode) -> None:
    make_device(d.graph, node)


async def _until(pred: Any, limit: float = 10.0) -> None:
    for _ in range(int(limit * 1000)):
        if pred():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")


def _files(tmp: Path, size: int, tgt_size: int | None = None) -> tuple[Path, Path, bytes]:
    src, tgt = tmp / "src.raw", tmp / "tgt.raw"
    rng = random.Random(5)
    with open(src, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 256 * 1024):
            if rng.random() < 0.5:
                f.seek(off)
                f.write(rng.randbytes(min(256 * 1024, size - off)))
    with open(tgt, "wb") as f:
        f.truncate(size if tgt_size is None else tgt_size)
        # stale content the mirror must overwrite (holes in the source included)
        f.write(b"\xee" * min(size, 64 * 1024))
    return src, tgt, src.read_bytes()


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of extents of every batched host-to-host copy (one worker call each)."""
    seen: list[int] = []
    real = threadio.copy_batch_sync

    def spy(src_fd: int, dst_fd: int, plan: list[tuple[int, int, int]],
            direct: bool = False) -> int:
        seen.append(len(plan))
        return real(src_fd, dst_fd, plan, direct)

    monkeypatch.setattr(threadio, "copy_batch_sync", spy)
    return seen


async def _mirror(d: Daemon, src: BlockNode, tgt: BlockNode, **kw: Any) -> MirrorJob:
    job = start_mirror(d.jobs, "j", src, tgt, MirrorParams(granularity=65536, **kw))
    await _until(lambda: job.is_ready)
    return job


async def _complete(job: MirrorJob) -> None:
    await job.complete()
    await _until(lambda: job.status.value == "null")
    assert job.ret == 0, job.error


def test_batched_copy_used_and_exact(tmp_path: Path, batches: list[int]) -> None:
    src_p, tgt_p, _ = _files(tmp_path, 4 * MiB)

    async def main() -> None:
        d = Daemon()
        src = await _raw(d, "src", src_p)
        tgt = await _raw(d, "tgt", tgt_p)
        _backend(d, src)
        job = await _mirror(d, src, tgt)
        # 4 MiB in 256 KiB runs, about half of them data: far fewer calls than extents
        assert batches and sum(batches) > len(batches)
        await src.write(3 * MiB + 100, b"\x42" * 70_000)  # after READY: copied again
        await _complete(job)

    asyncio.run(main())
    assert tgt_p.read_bytes() == src_p.read_bytes()


def test_source_ending_inside_its_last_sector(tmp_path: Path) -> None:
    # the raw node is 2 MiB + 512 long; its file ends 100 bytes into that last sector, so the
    # kernel copy stops short and the generic path writes the zero-padded rest
    src_p, tgt_p, data = _files(tmp_path, 2 * MiB + 100, 2 * MiB + 512)
    with open(tgt_p, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"\xdd" * 512)

    async def main() -> None:
        d = Daemon()
        src = await _raw(d, "src", src_p)
        tgt = await _raw(d, "tgt", tgt_p)
        _backend(d, src)
        assert src.length() == tgt.length() == 2 * MiB + 512
        job = await _mirror(d, src, tgt)
        await _complete(job)

    asyncio.run(main())
    out = tgt_p.read_bytes()
    assert out[: len(data)] == data
    assert out[len(data):] == bytes(512 - 100)


def test_fast_path_off_when_the_target_must_see_the_data(
    tmp_path: Path, batches: list[int]
) -> None:
    src_p, tgt_p, _ = _files(tmp_path, 2 * MiB)

    class Tracker:
        def __init__(self) -> None:
            self.marked = 0

        def mark(self, offset: int, length: int) -> None:
            self.marked += length

    async def main() -> None:
        d = Daemon()
        src = await _raw(d, "src", src_p)
        tgt = await _raw(d, "tgt", tgt_p)
        _backend(d, src)
        tracker = Tracker()
        tgt.dirty_trackers.append(tracker)
        job = await _mirror(d, src, tgt)
        assert batches == []
        assert tracker.marked >= 2 * MiB  # every byte went through node.write
        await _complete(job)

    asyncio.run(main())
    assert tgt_p.read_bytes() == src_p.read_bytes()


def test_concurrent_writes_during_batched_copies(tmp_path: Path, batches: list[int]) -> None:
    size = 8 * MiB
    src_p, tgt_p, _ = _files(tmp_path, size)

    async def main() -> None:
        d = Daemon()
        src = await _raw(d, "src", src_p)
        tgt = await _raw(d, "tgt", tgt_p)
        _backend(d, src)
        job = start_mirror(d.jobs, "j", src, tgt, MirrorParams(granularity=65536,
                                                               buf_size=MiB))
        rng = random.Random(9)
        writes = 0

        async def write() -> None:
            off = rng.randrange(0, size - 200_000)
            n = rng.randrange(1, 200_000)
            if rng.random() < 0.2:
                await src.write_zeroes(off, n)
            else:
                await src.write(off, bytes([rng.randrange(1, 255)]) * n)

        # writes race the copy ops (before READY) and follow it (after READY); a writer
        # that never pauses would outrun a background mirror for ever, as in QEMU
        while not job.is_ready and writes < 300:
            await write()
            writes += 1
            await asyncio.sleep(0)
        await _until(lambda: job.is_ready)
        for _ in range(60):
            await write()
            writes += 1
            await asyncio.sleep(0)
        assert batches
        await _complete(job)

    asyncio.run(main())
    assert tgt_p.read_bytes() == src_p.read_bytes()


def test_cached_block_status_dropped_on_source_write(tmp_path: Path) -> None:
    src_p, tgt_p = tmp_path / "s.raw", tmp_path / "t.raw"
    for p in (src_p, tgt_p):
        with open(p, "wb") as f:
            f.truncate(4 * MiB)

    async def main() -> None:
        d = Daemon()
        src = await _raw(d, "src", src_p)
        tgt = await _raw(d, "tgt", tgt_p)
        job = MirrorJob(d.jobs, "j", src, tgt, MirrorParams())
        chain = job.copier.status
        n, status = await chain.status_above(0, MiB)
        assert n == MiB and not status & BlockStatus.DATA
        # served from the cache: the file is changed behind the node's back, unseen
        fd = os.open(src_p, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096, 2 * MiB)
        finally:
            os.close(fd)
        n, status = await chain.status_above(2 * MiB, MiB)
        assert not status & BlockStatus.DATA
        # a write through the node invalidates it
        await src.write(2 * MiB, b"y" * 4096)
        n, status = await chain.status_above(2 * MiB, MiB)
        assert status & BlockStatus.DATA and n == 4096

    asyncio.run(main())


def test_written_buffer_freed_without_the_cyclic_gc(tmp_path: Path) -> None:
    # a reference cycle in the write path kept every mirrored buffer alive until gc ran,
    # which is what made the mirror's peak RSS grow far beyond buf_size
    class Buf(bytearray):
        pass

    path = tmp_path / "n.raw"
    with open(path, "wb") as f:
        f.truncate(MiB)

    async def main() -> None:
        d = Daemon()
        node = await _raw(d, "n", path)
        buf = Buf(b"z" * 65536)
        # the worker thread drops its reference a moment after the write completes: wait
        # for the object to go (not for the cyclic collector, which is off)
        freed = threading.Event()
        weakref.finalize(buf, freed.set)
        view = memoryview(buf)
        await node.write(0, view)
        view.release()
        del view, buf
        assert freed.wait(5), "the written buffer is kept alive by a reference cycle"

    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()


def test_writes_inline_follows_the_data_down_to_a_local_buffered_file(tmp_path: Path) -> None:
    """``copy.writes_inline``: a small write through raw or qcow2 to a buffered local file
    runs on the loop thread; a large one, an O_DIRECT file or a node with no file does not."""
    qimg = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qimg), "1M"], check=True)

    async def main() -> None:
        d = Daemon()
        img = tmp_path / "t.raw"
        img.write_bytes(bytes(MiB))
        raw = await _raw(d, "r", img)
        assert writes_inline(raw, 64 * 1024)
        assert not writes_inline(raw, threadio.inline_gate.max_bytes + 1)
        direct = await open_blockdev(d.graph, {
            "driver": "raw", "node-name": "rd",
            "file": {"driver": "file", "filename": str(img), "cache": {"direct": True}}})
        assert not writes_inline(direct, 4096)
        q = await open_blockdev(d.graph, {"driver": "qcow2", "node-name": "q",
                                          "file": {"driver": "file", "filename": str(qimg)}})
        assert writes_inline(q, 64 * 1024)
        null = await open_blockdev(d.graph, {"driver": "null-co", "node-name": "n"})
        assert not writes_inline(null, 4096)

    asyncio.run(main())


def test_one_batch_of_the_whole_buffer_between_buffered_files(tmp_path: Path) -> None:
    """Between buffered host files (raw, or qcow2's data files) a copy op carries the whole
    buffer, so one runs at a time, until something writes the source; then, and with
    O_DIRECT at either end, a quarter of it; through Python (a target that is no host
    file) 1 MiB."""
    src_p, tgt_p, _ = _files(tmp_path, 4 * MiB)
    q1, q2 = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for q in (q1, q2):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "4M"], check=True)

    async def main() -> None:
        d = Daemon()
        src = await _raw(d, "src", src_p)
        tgt = await _raw(d, "tgt", tgt_p)
        direct = await open_blockdev(d.graph, {
            "driver": "raw", "node-name": "tgt-direct",
            "file": {"driver": "file", "filename": str(tgt_p), "cache": {"direct": True}}})
        qa = await open_blockdev(d.graph, {"driver": "qcow2", "node-name": "qa",
                                           "file": {"driver": "file", "filename": str(q1)}})
        qb = await open_blockdev(d.graph, {"driver": "qcow2", "node-name": "qb",
                                           "file": {"driver": "file", "filename": str(q2)}})
        null = await open_blockdev(d.graph, {"driver": "null-co", "node-name": "n",
                                             "size": 4 * MiB})
        buf = 16 * MiB
        for source, target, batch in ((src, tgt, buf), (qa, qb, buf), (src, direct, 4 * MiB),
                                      (src, null, MiB)):
            job = MirrorJob(d.jobs, "j", source, target, MirrorParams(buf_size=buf))
            assert job.copier.batch_bytes == batch, (source.name, target.name)
            job.dirty.mark(0, 4096)  # a write to the source: the pipeline of quarters
            assert job.copier.batch_bytes == min(batch, 4 * MiB), (source.name, target.name)

    asyncio.run(main())
