"""The mirror's in-flight accounting: ops, bytes and buffer space, and the pulse that wakes
whoever waits for one of them to finish (cf. MirrorBlockJob's in_flight, bytes_in_flight,
buf_free_count and mirror_wait_for_any_operation)."""

from __future__ import annotations

import asyncio

from blockmirror.jobs.mirror.dirty import DirtyState


class InFlight:
    """Counts what runs now; ``pulse()`` after every change others may wait for."""

    def __init__(self) -> None:
        #: background ops (copy batches, zero and discard runs) running now
        self.ops = 0
        #: of those, copy ops (each holds a worker thread for its batch)
        self.copy_ops = 0
        #: bytes of background ops, not counting the initial zeroing
        self.bytes = 0
        #: bytes the active mirror is copying for writers right now
        self.active_bytes = 0
        #: buffer bytes held by copy ops (bounded by buf-size)
        self.buf_used = 0
        #: guest writes inside the mirror's interceptor now
        self.writers = 0
        self._pulse = asyncio.Event()

    def pulse(self) -> None:
        """Wake everything waiting for an op (or an active write) to finish."""
        self._pulse.set()
        self._pulse = asyncio.Event()

    async def wait_pulse(self) -> None:
        await self._pulse.wait()

    async def wait_no_conflict(self, dirty: DirtyState, offset: int, length: int) -> None:
        """Until no op copies any chunk of the range (cf. mirror_wait_on_conflicts)."""
        while dirty.busy(offset, length):
            await self.wait_pulse()

    async def wait_idle(self) -> None:
        """Until every background op has ended."""
        while self.ops:
            await self.wait_pulse()

    async def wait_no_writers(self) -> None:
        while self.writers:
            await self.wait_pulse()


__all__ = ["InFlight"]
