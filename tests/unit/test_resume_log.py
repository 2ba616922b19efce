"""The resume sidecar (issue 12): record format, torn writes, batching and eviction order."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from blockmirror.jobs.mirror import activity_log
from blockmirror.jobs.mirror.activity_log import ActivityLog, Geometry, ResumeError

GEO = Geometry(size=64 << 20, granularity=65536, extent_size=1 << 20, capacity=8)


def _make(path: Path, bits: bytes | None = None) -> None:
    bitmap = bits if bits is not None else bytes([0xFF]) * GEO.bitmap_bytes
    activity_log.create(str(path), GEO, {"source": {}, "target": {}}, bitmap, {"closed": False})


def test_fresh_sidecar_loads_with_its_checkpoint_and_no_hot_extents(tmp_path: Path) -> None:
    p = tmp_path / "s"
    _make(p)
    rec = activity_log.load(str(p))
    assert rec.geometry == GEO
    assert rec.bitmap == bytes([0xFF]) * GEO.bitmap_bytes
    assert rec.hot == set()


def test_torn_records_fall_back_to_the_previous_slot(tmp_path: Path) -> None:
    p = tmp_path / "s"
    _make(p)

    async def main() -> None:
        async def no_ckpt(_victims: list[int]) -> None:
            pass

        log = ActivityLog(str(p), GEO, log_seq=1, ckpt_seq=1, on_evict=no_ckpt)
        await log.begin(0, 4096)
        log.end(0, 4096)
        await log.begin(5 << 20, 4096)  # second record: extents {0, 5}
        log.end(5 << 20, 4096)
        await log.write_checkpoint(bytes(GEO.bitmap_bytes), {"closed": False, "n": 2})
        await log.write_checkpoint(bytes([1]) * GEO.bitmap_bytes, {"closed": False, "n": 3})
        await log.close()

    asyncio.run(main())
    rec = activity_log.load(str(p))
    assert rec.hot == {0, 5} and rec.meta["n"] == 3
    # tear the newest log record and the newest checkpoint (a crash in mid-write)
    with open(p, "r+b") as f:
        f.seek(GEO.log_offset(rec.log_seq % 2) + 30)
        f.write(b"\xde\xad")
        f.seek(GEO.ckpt_offset(rec.ckpt_seq % 2) + 4096 + 7)
        f.write(b"\xbe\xef")
    rec2 = activity_log.load(str(p))
    assert rec2.hot == {0} and rec2.log_seq == rec.log_seq - 1
    assert rec2.meta["n"] == 2 and rec2.bitmap == bytes(GEO.bitmap_bytes)


def test_not_a_sidecar_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "s"
    p.write_bytes(b"hello" * 2000)
    with pytest.raises(ResumeError, match="is not a blockmirror resume log"):
        activity_log.load(str(p))


def test_concurrent_writers_share_one_log_record(tmp_path: Path) -> None:
    p = tmp_path / "s"
    _make(p)

    async def main() -> int:
        async def no_ckpt(_victims: list[int]) -> None:
            pass

        log = ActivityLog(str(p), GEO, log_seq=1, ckpt_seq=1, on_evict=no_ckpt)
        # 8 writers to 8 different extents, all before the first record is written
        await asyncio.gather(*(log.begin(e << 20, 65536) for e in range(8)))
        assert set(log.hot) == set(range(8))
        n = log.records
        await log.close()
        return n

    # the first writer starts a record; the other seven wait and share the next one
    assert asyncio.run(main()) <= 2
    assert activity_log.load(str(p)).hot == set(range(8))


def test_eviction_checkpoints_first_and_never_drops_a_busy_extent(tmp_path: Path) -> None:
    p = tmp_path / "s"
    _make(p)
    order: list[str] = []

    async def main() -> None:
        log: ActivityLog

        async def ckpt(_victims: list[int]) -> None:
            # the record without the victims must not be on disk yet
            order.append(f"checkpoint, on disk {sorted(activity_log.load(str(p)).hot)}")

        log = ActivityLog(str(p), GEO, log_seq=1, ckpt_seq=1, on_evict=ckpt)
        await log.begin(0, 4096)  # extent 0 stays busy (a write in progress)
        for e in range(1, 8):
            await log.begin(e << 20, 4096)
            log.end(e << 20, 4096)
        await log.begin(20 << 20, 4096)  # the list is full: evict
        log.end(20 << 20, 4096)
        order.append(f"after, on disk {sorted(activity_log.load(str(p)).hot)}")
        assert 0 in log.hot and 20 in log.hot
        log.end(0, 4096)
        await log.close()

    asyncio.run(main())
    assert order[0] == "checkpoint, on disk [0, 1, 2, 3, 4, 5, 6, 7]"
    # the least recently used idle extent (1) went; the busy one (0) stayed
    assert order[1] == "after, on disk [0, 2, 3, 4, 5, 6, 7, 20]"
    assert os.path.getsize(p) == GEO.file_size


BIG = Geometry(size=256 << 20, granularity=65536, extent_size=1 << 20, capacity=64)


def test_eviction_ahead_keeps_victims_listed_until_their_checkpoint(tmp_path: Path) -> None:
    """At 7/8 full the log evicts in the background: writers to new extents do not wait for
    its checkpoint, every record written meanwhile still lists the victims, a writer coming
    back to a victim takes it back without a record, and only after the checkpoint do the
    other victims leave the log."""
    p = tmp_path / "s"
    activity_log.create(str(p), BIG, {"source": {}, "target": {}},
                        bytes([0xFF]) * BIG.bitmap_bytes, {"closed": False})

    async def main() -> None:
        in_ckpt, go = asyncio.Event(), asyncio.Event()

        async def ckpt(_victims: list[int]) -> None:
            in_ckpt.set()
            await go.wait()

        log = ActivityLog(str(p), BIG, log_seq=1, ckpt_seq=1, on_evict=ckpt)
        for e in range(56):  # 7/8 of 64: the eviction ahead starts after this record
            await log.begin(e << 20, 4096)
            log.end(e << 20, 4096)
        await asyncio.wait_for(in_ckpt.wait(), 10)
        victims = set(range(8))  # capacity // 8, least recently used first
        assert set(log.hot) == set(range(8, 56))
        # a new extent is admitted while the checkpoint is still running
        await asyncio.wait_for(log.begin(100 << 20, 4096), 10)
        log.end(100 << 20, 4096)
        on_disk = activity_log.load(str(p)).hot
        assert victims <= on_disk and 100 in on_disk
        # a writer back to a victim goes on at once, without a record
        n = log.records
        await asyncio.wait_for(log.begin(3 << 20, 4096), 10)
        log.end(3 << 20, 4096)
        assert log.records == n and 3 in log.hot
        go.set()
        assert log._evictor is not None
        await asyncio.wait([log._evictor])
        await log.begin(101 << 20, 4096)  # the first record after the checkpoint
        log.end(101 << 20, 4096)
        on_disk = activity_log.load(str(p)).hot
        assert not (victims - {3}) & on_disk
        assert {3, 100, 101} <= on_disk and len(on_disk) == 56 - 8 + 1 + 2
        assert log.evictions == 1
        await log.close()

    asyncio.run(main())


def test_a_failed_eviction_checkpoint_keeps_its_victims_listed(tmp_path: Path) -> None:
    p = tmp_path / "s"
    activity_log.create(str(p), BIG, {"source": {}, "target": {}},
                        bytes([0xFF]) * BIG.bitmap_bytes, {"closed": False})

    async def main() -> None:
        async def ckpt(_victims: list[int]) -> None:
            raise OSError(5, "Input/output error")

        log = ActivityLog(str(p), BIG, log_seq=1, ckpt_seq=1, on_evict=ckpt)
        for e in range(56):
            await log.begin(e << 20, 4096)
            log.end(e << 20, 4096)
        assert log._evictor is not None
        await asyncio.wait([log._evictor])
        assert set(log.hot) == set(range(56))  # nothing was dropped
        with pytest.raises(ResumeError, match="activity log"):
            for e in range(56, 70):  # needs room: the failure is reported
                await log.begin(e << 20, 4096)
                log.end(e << 20, 4096)
        await log.close()

    asyncio.run(main())
    assert set(range(56)) <= activity_log.load(str(p)).hot


def test_durable_write_falls_back_without_rwf_dsync(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from blockmirror.block import threadio

    p = tmp_path / "f"
    p.write_bytes(bytes(8192))
    fd = os.open(p, os.O_RDWR)
    try:
        threadio.pwrite_dsync_sync(fd, b"a" * 100, 10)
        monkeypatch.delattr(os, "RWF_DSYNC")
        synced: list[int] = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda f: (synced.append(f), real(f))[1])
        threadio.pwrite_dsync_sync(fd, b"b" * 100, 4096)
        assert synced == [fd]
    finally:
        os.close(fd)
    data = p.read_bytes()
    assert data[10:110] == b"a" * 100 and data[4096:4196] == b"b" * 100


class _Node:
    """What a checkpoint asks of the source and the target: a flush (here, one that fails,
    as with a lost NBD target)."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    async def flush(self) -> None:
        if self.fail:
            from blockmirror.errors import BlockIOError

            raise BlockIOError(5, "Input/output error")


def test_an_eviction_whose_flush_failed_lists_the_victims_dirty(tmp_path: Path) -> None:
    """Copies into a victim since the last checkpoint may not be durable when the target's
    flush fails: the checkpoint that lets the log drop the victim lists all its chunks."""
    from blockmirror.jobs.mirror.dirty import DirtyState
    from blockmirror.jobs.mirror.resume import ResumeCoordinator, ResumeOptions, ResumePlan

    es, gran = 1 << 20, 65536
    plan = ResumePlan(ResumeOptions(str(tmp_path / "s"), extents=64, extent_size=es), gran,
                      BIG.size)
    dirty = DirtyState(BIG.size, gran)
    target = _Node(fail=False)
    coord = ResumeCoordinator(plan, _Node(fail=False), target,  # type: ignore[arg-type]
                              dirty)

    async def main() -> None:
        await coord.start()  # everything dirty in the sidecar's first checkpoint
        coord.seeded = True
        assert await coord.checkpoint()  # all copied (nothing dirty), flushed: all clean
        target.fail = True
        assert coord.log is not None
        await coord._on_evict([3, 7])
        await coord.log.close()

    asyncio.run(main())
    rec = activity_log.load(str(tmp_path / "s"))
    per = es // gran
    dirty_chunks = {i for i in range(BIG.size // gran) if rec.bitmap[i // 8] >> (i % 8) & 1}
    assert dirty_chunks == set(range(3 * per, 4 * per)) | set(range(7 * per, 8 * per))
