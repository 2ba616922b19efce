"""Per-node I/O accounting for query-blockstats (cf. block/accounting.c, BlockAcctStats).

The generic request path (``block/io.py``) wraps each request kind once in
``node.stats.account(kind, offset, length)``: bytes, operations, failures and total time of
reads, writes, discards ("unmap") and flushes, and the end of the highest write
(``wr_highest_offset``, which QEMU keeps per node in its generic path too).

QEMU counts bytes and operations only for requests that a device submits through its
BlockBackend, so in qemu-storage-daemon every node's counters read 0 except
``wr_highest_offset``; ``to_qapi(counters=False)`` reproduces that, ``counters=True`` gives
the real numbers (for the ``__org.blockmirror_counters`` extension of query-blockstats).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

#: request kinds as io.py names them -> QEMU's BlockAcctType prefix
_PREFIX = {"read": "rd", "write": "wr", "zero": "wr", "discard": "unmap", "flush": "flush"}


@dataclass
class _Counter:
    """Totals of one kind of request (read, write, unmap or flush)."""

    bytes: int = 0
    ops: int = 0
    failed: int = 0
    total_ns: int = 0


@dataclass
class BlockStats:
    """A node's I/O accounting, as query-blockstats reports it."""

    counters: dict[str, _Counter] = field(
        default_factory=lambda: {p: _Counter() for p in ("rd", "wr", "unmap", "flush")})
    wr_highest_offset: int = 0
    #: monotonic ns of the last completed request, for idle_time_ns
    last_done_ns: int | None = None

    @asynccontextmanager
    async def account(self, kind: str, offset: int, length: int) -> AsyncIterator[None]:
        """Account one request of ``kind`` (read/write/zero/discard/flush) around its body."""
        start = time.monotonic_ns()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.done(kind, offset, length, start, ok)

    def done(self, kind: str, offset: int, length: int, start_ns: int, ok: bool) -> None:
        """Account one request that began at ``start_ns`` (``account`` without a context
        manager, for the request path: an async generator per request and layer was a
        measurable share of a guest write's CPU)."""
        prefix = _PREFIX[kind]
        c = self.counters[prefix]
        now = time.monotonic_ns()
        if prefix == "wr":
            # cf. bdrv_co_write_req_finish: even a failed write may have reached the image
            self.wr_highest_offset = max(self.wr_highest_offset, offset + length)
        if ok:
            c.ops += 1
            c.bytes += length
            c.total_ns += now - start_ns
        else:
            c.failed += 1
        self.last_done_ns = now

    def record_batch(self, kind: str, extents: list[tuple[int, int]]) -> None:
        """Account requests of ``kind`` that one driver call served (io.read_many /
        write_many's fast path): each counts as an operation of its own."""
        prefix = _PREFIX[kind]
        c = self.counters[prefix]
        c.ops += len(extents)
        c.bytes += sum(n for _, n in extents)
        if prefix == "wr":
            self.wr_highest_offset = max(self.wr_highest_offset,
                                         max((o + n for o, n in extents), default=0))
        self.last_done_ns = time.monotonic_ns()

    def to_qapi(self, counters: bool = False) -> dict[str, Any]:
        """A BlockDeviceStats dict (QEMU's member set)."""
        out: dict[str, Any] = {}
        for p in ("rd", "wr", "unmap", "flush"):
            c = self.counters[p] if counters else _Counter()
            if p != "flush":
                out[f"{p}_bytes"] = c.bytes
            out[f"{p}_operations"] = c.ops
            out[f"{p}_total_time_ns"] = c.total_ns
            out[f"failed_{p}_operations"] = c.failed
            out[f"invalid_{p}_operations"] = 0
            if p != "flush":
                out[f"{p}_merged"] = 0
        out["wr_highest_offset"] = self.wr_highest_offset
        if counters and self.last_done_ns is not None:
            out["idle_time_ns"] = time.monotonic_ns() - self.last_done_ns
        out["account_invalid"] = False
        out["account_failed"] = False
        out["timed_stats"] = []
        return out


__all__ = ["BlockStats"]
