"""A FUA write to qcow2 is durable when acknowledged, and its metadata lands in a safe order.

A model of the page cache replays the system calls made on the image file: a plain write
leaves its range dirty, ``pwritev2(RWF_DSYNC)`` makes only its own range durable (Linux
syncs the written range, not the file), ``fdatasync``/``fsync`` make everything durable.
Against that model:

* when a FUA write returns, its data is durable (what the guest was promised);
* when the L2 entry that points at a newly allocated cluster is written, the data and the
  refcount block written before it are durable (a crash cannot leave an L2 entry pointing
  at a cluster whose refcount or contents never reached the disk).

The bug this guards against: the file driver's FUA write became one RWF_DSYNC call, while
the qcow2 flush still treated a FUA metadata write as a flush of everything before it.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block import threadio
from blockmirror.block.drivers.qcow2.create import create_qcow2
from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_blockdev

CLUSTER = 65536
SIZE = 64 * CLUSTER
_DSYNC = getattr(os, "RWF_DSYNC", 0)

Event = tuple[str, int, int]  # ("write" | "dsync-write", start, end) or ("sync", 0, 0)


class SyscallLog:
    """Records the writes and syncs made on one file, whichever thread makes them."""

    def __init__(self, path: str) -> None:
        self.path = os.path.realpath(path)
        self.events: list[Event] = []

    def _ours(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == self.path
        except OSError:
            return False

    def install(self, mp: pytest.MonkeyPatch) -> None:
        real_pwrite, real_pwritev = os.pwrite, os.pwritev
        real_fdatasync, real_fsync = os.fdatasync, os.fsync

        def pwrite(fd: int, data: Any, offset: int) -> int:
            n = real_pwrite(fd, data, offset)
            if self._ours(fd):
                self.events.append(("write", offset, offset + n))
            return n

        def pwritev(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
            n = real_pwritev(fd, buffers, offset, flags)
            if self._ours(fd):
                kind = "dsync-write" if flags & _DSYNC else "write"
                self.events.append((kind, offset, offset + n))
            return n

        def sync(real: Any) -> Any:
            def call(fd: int) -> None:
                real(fd)
                if self._ours(fd):
                    self.events.append(("sync", 0, 0))
            return call

        mp.setattr(os, "pwrite", pwrite)
        mp.setattr(os, "pwritev", pwritev)
        mp.setattr(os, "fdatasync", sync(real_fdatasync))
        mp.setattr(os, "fsync", sync(real_fsync))


def replay(events: list[Event]) -> Iterator[tuple[Event, list[tuple[int, int]]]]:
    """Each event with the ranges still dirty (not durable) just before it."""
    dirty: list[tuple[int, int]] = []
    for ev in events:
        yield ev, list(dirty)
        kind, start, end = ev
        if kind == "sync":
            dirty.clear()
        elif kind == "dsync-write":
            dirty = _minus(dirty, start, end)
        else:
            dirty.append((start, end))
    yield ("end", 0, 0), dirty


def _minus(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    out = []
    for s, e in ranges:
        if s < start:
            out.append((s, min(e, start)))
        if e > end:
            out.append((max(s, end), e))
    return out


def _overlaps(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s < end and start < e for s, e in ranges)


def _metadata(path: Path, guest_cluster: int) -> tuple[int, int, int]:
    """(host offset of the cluster's data, file offset of its L2 entry, of refcount block 0)."""
    raw = path.read_bytes()
    l1_offset = struct.unpack(">Q", raw[40:48])[0]
    rct_offset = struct.unpack(">Q", raw[48:56])[0]
    l2_offset = struct.unpack(">Q", raw[l1_offset:l1_offset + 8])[0] & 0x00FFFFFFFFFFFE00
    entry_at = l2_offset + 8 * guest_cluster
    data = struct.unpack(">Q", raw[entry_at:entry_at + 8])[0] & 0x00FFFFFFFFFFFE00
    block0 = struct.unpack(">Q", raw[rct_offset:rct_offset + 8])[0]
    return data, entry_at, block0


@pytest.fixture(params=["inline", "pool"])
def io_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a small write can go: on the loop thread (inline gate open) or the pool."""
    if request.param == "pool":
        monkeypatch.setattr(threadio.inline_gate, "enabled", False)
    return str(request.param)


def _fua_write(tmp_path: Path, mp: pytest.MonkeyPatch, guest_cluster: int,
               overwrite: bool) -> tuple[Path, list[Event]]:
    path = tmp_path / "a.qcow2"
    log = SyscallLog(str(path))

    async def main() -> None:
        await create_qcow2(str(path), SIZE)
        g = BlockGraph()
        try:
            node = await open_blockdev(g, {"driver": "qcow2", "node-name": "n",
                                           "file": {"driver": "file", "filename": str(path)}})
            if overwrite:
                await node.write(guest_cluster * CLUSTER, b"\x01" * CLUSTER)
                await node.flush()
            log.install(mp)
            await node.write(guest_cluster * CLUSTER, b"\x02" * CLUSTER, fua=True)
            mp.undo()  # the model covers the FUA write alone, not the close
        finally:
            await close_all(g)

    asyncio.run(main())
    return path, log.events


def test_allocating_fua_write_is_durable_and_ordered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, io_path: str) -> None:
    path, events = _fua_write(tmp_path, monkeypatch, 5, overwrite=False)
    data, entry_at, block0 = _metadata(path, 5)
    assert data, "the write allocated a cluster"
    refcount_written = False
    l2_written = False
    for (kind, start, end), dirty in replay(events):
        if kind == "end":
            assert not _overlaps(dirty, data, data + CLUSTER), (
                f"{io_path}: the FUA write returned with its data not durable: {events}")
            assert not _overlaps(dirty, entry_at, entry_at + 8), events
            break
        if kind == "sync":
            continue
        if start <= entry_at < end:
            l2_written = True
            assert not _overlaps(dirty, data, data + CLUSTER), (
                f"{io_path}: L2 entry written while the data it points at was not durable: "
                f"{events}")
            assert not _overlaps(dirty, block0, block0 + CLUSTER), (
                f"{io_path}: L2 entry written before the refcount block was durable: {events}")
        if block0 <= start < block0 + CLUSTER:
            refcount_written = True
    assert refcount_written and l2_written, events


def test_overwriting_fua_write_is_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, io_path: str) -> None:
    path, events = _fua_write(tmp_path, monkeypatch, 7, overwrite=True)
    data, _entry_at, _block0 = _metadata(path, 7)
    *_, (last, dirty) = replay(events)
    assert last[0] == "end"
    assert any(s <= data < e for k, s, e in events if k != "sync"), events
    assert not _overlaps(dirty, data, data + CLUSTER), (
        f"{io_path}: the FUA write returned with its data not durable: {events}")


def test_the_model_catches_a_range_only_sync() -> None:
    """The model itself: RWF_DSYNC on one range leaves an earlier write elsewhere dirty."""
    events: list[Event] = [("write", 0, 10), ("dsync-write", 100, 110)]
    *_, (_end, dirty) = replay(events)
    assert dirty == [(0, 10)]
    events.append(("sync", 0, 0))
    *_, (_end, dirty) = replay(events)
    assert dirty == []
