"""``threadio._write_behind`` starts the write-back of a dense batch only.

A READY mirror's batch of chunks scattered over the disk would make one sync_file_range
call over the whole file; that walked all of the target's dirty pages next to a guest
waiting for its syncs. The call is replaced by a recorder here, so the test sees exactly
which stretches would be written back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from blockmirror.block import threadio

KIB = 1024
MIB = 1024 * KIB


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, int, int]]]:
    seen: list[tuple[int, int, int, int]] = []

    def record(fd: int, offset: int, length: int, flags: int) -> int:
        seen.append((fd, offset, length, flags))
        return 0

    monkeypatch.setattr(threadio, "_libc_sync_file_range", record)
    yield seen


def test_a_dense_batch_is_written_back_from_its_first_byte_to_its_last(
        calls: list[tuple[int, int, int, int]]) -> None:
    # half of the stretch holds data: a fragmented source's bulk copy
    threadio._write_behind(7, [(4 * MIB, MIB), (6 * MIB, MIB), (2 * MIB, MIB)])
    assert calls == [(7, 2 * MIB, 5 * MIB, threadio._SYNC_FILE_RANGE_WRITE)]


def test_a_quarter_full_batch_still_counts_as_dense(
        calls: list[tuple[int, int, int, int]]) -> None:
    threadio._write_behind(3, [(0, MIB), (7 * MIB, MIB)])
    assert calls == [(3, 0, 8 * MIB, threadio._SYNC_FILE_RANGE_WRITE)]


def test_scattered_chunks_start_no_write_back(calls: list[tuple[int, int, int, int]]) -> None:
    # a READY mirror's chunks after a guest's random writes: 3 x 64 KiB over 1 GiB
    threadio._write_behind(3, [(5 * MIB, 64 * KIB), (700 * MIB, 64 * KIB), (1023 * MIB, 64 * KIB)])
    threadio._write_behind(3, [(0, MIB), (7 * MIB + 1, MIB)])  # just under a quarter
    assert calls == []


def test_nothing_written_starts_nothing(calls: list[tuple[int, int, int, int]]) -> None:
    threadio._write_behind(3, [])
    threadio._write_behind(3, [(MIB, 0)])
    assert calls == []
