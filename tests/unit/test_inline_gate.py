"""The inline gate (block/inline_gate.py) and the file driver's inline writes through it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from blockmirror.block import threadio
from blockmirror.block.inline_gate import InlineGate

KiB = 1024
MS = 1_000_000


class FakeTime:
    def __init__(self) -> None:
        self.ns = 10**9

    def __call__(self) -> int:
        return self.ns


def _run_inline(gate: InlineGate, t: FakeTime, took_ns: int, nbytes: int = 4 * KiB) -> bool:
    if not gate.admit(nbytes):
        return False
    started = gate.start()
    t.ns += took_ns
    gate.done(started)
    return True


def test_small_requests_run_inline_large_ones_go_to_the_pool() -> None:
    t = FakeTime()
    gate = InlineGate(max_bytes=128 * KiB, now_ns=t)
    assert gate.admit(64 * KiB)
    gate.done(gate.start())
    assert gate.admit(128 * KiB)
    gate.done(gate.start())
    assert not gate.admit(128 * KiB + 1)
    assert (gate.inline_calls, gate.pooled_calls) == (2, 1)


def test_one_stalled_inline_call_closes_the_gate_for_the_cooldown() -> None:
    t = FakeTime()
    gate = InlineGate(slow_ns=1 * MS, stall_ns=20 * MS, cooldown_ns=250 * MS, now_ns=t)
    assert _run_inline(gate, t, 0)
    assert _run_inline(gate, t, 21 * MS)  # a stall: closes at once
    assert gate.closings == 1
    t.ns += 249 * MS
    assert not gate.admit(4 * KiB)
    t.ns += 1 * MS
    assert _run_inline(gate, t, 0)  # the cooldown is over: inline again
    assert _run_inline(gate, t, 0)
    assert gate.closings == 1


def test_an_occasional_slow_call_keeps_it_open_sustained_slowness_closes_it() -> None:
    t = FakeTime()
    gate = InlineGate(slow_ns=1 * MS, stall_ns=20 * MS, cooldown_ns=250 * MS, burst=1000,
                      now_ns=t)
    for _ in range(50):
        for _ in range(7):
            assert _run_inline(gate, t, MS // 5)
        assert _run_inline(gate, t, 3 * MS)  # one in eight takes 3 ms
    assert gate.closings == 0
    took = 0
    while gate.closings == 0:  # every call 2 ms: the average passes 1 ms within a few calls
        assert _run_inline(gate, t, 2 * MS)
        took += 1
    assert took <= 8
    t.ns += 250 * MS
    # reopened at half the limit: a few more slow calls close it again
    slow = 0
    while gate.closings == 1:
        assert _run_inline(gate, t, 2 * MS)
        slow += 1
    assert slow <= 6


def test_a_burst_of_inline_calls_is_broken_by_one_yield() -> None:
    t = FakeTime()
    gate = InlineGate(burst=4, now_ns=t)
    pattern = []
    for _ in range(10):
        assert _run_inline(gate, t, 0)
        pattern.append(gate.yield_first)
    assert pattern == [False] * 4 + [True] + [False] * 3 + [True] + [False]
    assert gate.yields == 2 and gate.pooled_calls == 0
    # a call sent to the pool yields by itself: the streak starts again after it
    assert not gate.admit(gate.max_bytes + 1)
    pattern = []
    for _ in range(5):
        assert _run_inline(gate, t, 0)
        pattern.append(gate.yield_first)
    assert pattern == [False] * 4 + [True]


def test_the_yield_lets_other_tasks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task issuing small writes back to back lets another ready task run every
    ``burst`` writes (the yield before the admitted call), without any pool call."""
    gate = InlineGate(burst=3)
    monkeypatch.setattr(threadio, "inline_gate", gate)
    path = tmp_path / "img"
    path.write_bytes(bytes(64 * KiB))
    fd = os.open(path, os.O_RDWR)
    seen: list[int] = []

    async def main() -> None:
        written = 0

        async def other() -> None:
            while written < 12:
                seen.append(written)
                await asyncio.sleep(0)

        task = asyncio.get_running_loop().create_task(other())
        await asyncio.sleep(0)  # let it start: it records 0 and yields
        for i in range(12):
            await threadio.pwrite(fd, i * 4096, b"x" * 4096, inline=True)
            written += 1
        await task

    try:
        asyncio.run(main())
    finally:
        os.close(fd)
    assert gate.pooled_calls == 0 and gate.inline_calls == 12 and gate.yields == 3
    # the other task ran before the first write and at each yield (after writes 3, 6, 9)
    assert seen[:4] == [0, 3, 6, 9]


def test_would_admit_answers_as_admit_would_without_counting() -> None:
    t = FakeTime()
    gate = InlineGate(max_bytes=128 * KiB, cooldown_ns=250 * MS, now_ns=t)
    assert gate.would_admit(128 * KiB) and not gate.would_admit(128 * KiB + 1)
    assert _run_inline(gate, t, 21 * MS)  # a stall closes the gate
    assert not gate.would_admit(4 * KiB)
    t.ns += 250 * MS
    assert gate.would_admit(4 * KiB)
    assert (gate.inline_calls, gate.pooled_calls, gate.yields) == (1, 0, 0)
    gate.enabled = False
    assert not gate.would_admit(1)


def _run_pooled(gate: InlineGate, t: FakeTime, took_ns: int, nbytes: int = 4 * KiB) -> None:
    """A call ``admit`` refused, run "in the pool" as threadio.run_short does."""
    assert not gate.admit(nbytes)
    started = gate.start()
    t.ns += took_ns
    if gate.probing:
        gate.pooled_done(started)


def test_fast_pooled_calls_end_the_cooldown_early_slow_ones_do_not() -> None:
    t = FakeTime()
    gate = InlineGate(slow_ns=1 * MS, stall_ns=20 * MS, cooldown_ns=250 * MS, probe_calls=8,
                      now_ns=t)
    assert _run_inline(gate, t, 21 * MS)  # a stall closes the gate
    # the cause lasts: pooled calls as slow as the inline ones keep it closed to the end
    for _ in range(40):
        _run_pooled(gate, t, 2 * MS)
    assert gate.early_reopenings == 0 and not gate.would_admit(4 * KiB)
    t.ns += 250 * MS
    assert _run_inline(gate, t, 0)  # reopened by the cooldown alone
    # closed again; now the pooled calls turn fast (the hop included): a few of them reopen
    assert _run_inline(gate, t, 21 * MS)
    fast = 0
    while not gate.would_admit(4 * KiB):
        _run_pooled(gate, t, 200_000)
        fast += 1
    assert gate.early_reopenings == 1
    assert 8 <= fast <= 40, fast
    assert t.ns < 10**9 + 540 * MS  # long before the cooldown's end
    assert _run_inline(gate, t, 100_000)
    assert gate.closings == 2


def test_only_calls_refused_for_the_cooldown_are_timed() -> None:
    t = FakeTime()
    gate = InlineGate(max_bytes=128 * KiB, slow_ns=1 * MS, stall_ns=20 * MS, probe_calls=1,
                      now_ns=t)
    assert not gate.admit(256 * KiB) and not gate.probing  # too large, gate open
    assert _run_inline(gate, t, 21 * MS)
    assert not gate.admit(256 * KiB) and not gate.probing  # too large: says nothing
    assert not gate.admit(4 * KiB) and gate.probing
    gate.enabled = False
    assert not gate.admit(4 * KiB) and not gate.probing


def test_disabled_gate_sends_everything_to_the_pool() -> None:
    gate = InlineGate()
    gate.enabled = False
    assert not gate.admit(1)


def test_file_writes_inline_and_pooled_store_the_same_bytes(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """Both paths of threadio.pwrite, plain and durable, write exactly the bytes given."""
    gate = InlineGate(burst=2)
    monkeypatch.setattr(threadio, "inline_gate", gate)
    path = tmp_path / "img"
    path.write_bytes(bytes(1024 * KiB))
    fd = os.open(path, os.O_RDWR)
    expect = bytearray(1024 * KiB)

    async def main() -> None:
        # every combination of inline or pooled, plain or durable
        for i in range(9):
            off, data = i * 70 * KiB, bytes([i + 1]) * (64 * KiB + i)
            await threadio.pwrite(fd, off, data, sync=bool(i % 2), inline=i % 4 < 2)
            expect[off:off + len(data)] = data
        big = b"\xee" * (256 * KiB)  # over max_bytes: the pool
        await threadio.pwrite(fd, 700 * KiB, big, inline=True)
        # a file the driver did not find on a local filesystem: always the pool
        await threadio.pwrite(fd, 0, data[:10])
        expect[0:10] = data[:10]
        expect[700 * KiB:956 * KiB] = big

    try:
        asyncio.run(main())
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(expect)
    # i % 4 < 2: writes 0, 1, 4, 5 and 8 inline, with a yield before 4 and 8 (the gate
    # counts the calls it admits; 2, 3, 6 and 7 never ask it); the big write is refused
    # and the last one does not ask
    assert (gate.inline_calls, gate.pooled_calls, gate.yields) == (5, 1, 2)


def test_local_filesystems_are_told_from_others(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert threadio.is_local_fs_sync(fd)  # the test's scratch directory: ext4 or tmpfs
    finally:
        os.close(fd)
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        assert not threadio.is_local_fs_sync(fd)  # procfs is not in the list
    finally:
        os.close(fd)


def test_file_flush_runs_inline_only_after_small_writes(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The file driver's flush asks for an inline fdatasync only when nothing but small
    writes happened since the last one: a large write, a zeroing, a discard or a batch that
    block/copy.py wrote past the driver sends it to the pool."""
    from blockmirror.block.graph import BlockGraph
    from blockmirror.block.options import close_all, open_blockdev

    asked: list[bool] = []
    real = threadio.fdatasync

    async def spy(fd: int, *, inline: bool = False) -> None:
        asked.append(inline)
        await real(fd, inline=inline)

    monkeypatch.setattr(threadio, "fdatasync", spy)
    path = tmp_path / "f.raw"
    path.write_bytes(bytes(4 << 20))

    async def main() -> None:
        graph = BlockGraph()
        try:
            node = await open_blockdev(graph, {"driver": "file", "node-name": "f",
                                               "filename": str(path)})
            # (the generic layer skips a flush when nothing was written since the last one)
            await node.write(0, b"a" * 65536)
            await node.flush()                          # the first sync after open: pool
            await node.write(0, b"a" * 65536)
            await node.flush()                          # small writes only: inline
            await node.write(0, b"b" * (1 << 20))
            await node.flush()                          # a 1 MiB write: pool
            await node.write_zeroes(0, 65536)
            await node.flush()                          # zeroing: pool
            await node.write(65536, b"c" * 4096)
            await node.flush()                          # inline again
            await node.write(65536, b"c" * 4096)
            node.driver.note_bulk_write()               # as block/copy.py's batches do
            await node.flush()                          # pool
        finally:
            await close_all(graph)

    asyncio.run(main())
    assert asked == [False, True, False, False, True, False], asked


def test_small_copies_between_local_files_run_inline(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """block/copy.py copies a small plan between two local files on the loop thread (the
    gate admits it) and a large one in the pool; both copy exactly."""
    from blockmirror.block.copy import copy_extents
    from blockmirror.block.graph import BlockGraph
    from blockmirror.block.options import close_all, open_blockdev

    gate = InlineGate(burst=1000)
    monkeypatch.setattr(threadio, "inline_gate", gate)
    src, dst = tmp_path / "s.raw", tmp_path / "d.raw"
    data = bytes(range(256)) * (4 * 4096)  # 4 MiB
    src.write_bytes(data)
    dst.write_bytes(bytes(len(data)))

    async def main() -> tuple[int, int]:
        graph = BlockGraph()
        try:
            s = await open_blockdev(graph, {"driver": "file", "node-name": "s",
                                            "filename": str(src)})
            d = await open_blockdev(graph, {"driver": "file", "node-name": "d",
                                            "filename": str(dst)})
            await copy_extents(s, d, [(0, 65536), (131072, 4096)])  # 68 KiB: inline
            inline = gate.inline_calls
            await copy_extents(s, d, [(1 << 20, 1 << 20)])          # 1 MiB: the pool
            return inline, gate.pooled_calls
        finally:
            await close_all(graph)

    inline, pooled = asyncio.run(main())
    assert (inline, pooled) == (1, 0)  # over max_bytes, the gate is not even asked
    out = dst.read_bytes()
    assert out[:65536] == data[:65536] and out[131072:135168] == data[131072:135168]
    assert out[1 << 20:2 << 20] == data[1 << 20:2 << 20]
    assert out[65536:131072] == bytes(65536) and out[2 << 20:] == bytes(len(data) - (2 << 20))
