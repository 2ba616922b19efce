"""A live mirror under a writing guest, as the NBD migration and rbd mirror tests run it.

``QemuIoWriter`` is the guest: an interactive ``qemu-io`` on one NBD connection for its
whole life, keeping a model of the disk. ``export_source`` puts node ``src`` behind an NBD
export; ``mirror_to_pivot`` follows a throttled drive-mirror ``m0`` of it while the guest
writes, up to the pivot, after which the export serves the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any


class QemuIoWriter:
    """A guest: interactive qemu-io on one NBD connection, keeping a model of the disk."""

    def __init__(self, proc: asyncio.subprocess.Process, initial: bytes, seed: int,
                 span: int | None, zeroes: bool) -> None:
        self.proc = proc
        self.model = bytearray(initial)
        #: writes land below this offset (the rest of the disk keeps its initial content)
        self.span = span or len(initial)
        #: some writes are write-zeroes (15 %); else every write is data
        self.zeroes = zeroes
        self.rng = random.Random(seed)
        self.writes = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, uri: str, initial: bytes, seed: int, span: int | None = None,
                    zeroes: bool = True) -> AsyncIterator[QemuIoWriter]:
        proc = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", uri, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        w = cls(proc, initial, seed, span, zeroes)
        try:
            yield w
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    async def command(self, line: str, expect: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        seen = b""
        while expect.encode() not in seen:
            chunk = await asyncio.wait_for(self.proc.stdout.read(4096), 60)
            if not chunk:
                raise AssertionError(f"qemu-io exited during {line!r}: {seen.decode()}")
            seen += chunk
            if b"error" in seen.lower() or b"failed" in seen.lower():
                raise AssertionError(f"qemu-io: {line!r}: {seen.decode()}")
        return seen.decode()

    async def write_some(self, n: int) -> None:
        for _ in range(n):
            length = self.rng.choice([512, 4096, 65536, 3 * 4096 + 512])
            offset = self.rng.randrange(0, self.span - length)
            if self.zeroes and self.rng.random() < 0.15:
                await self.command(f"write -z {offset} {length}", "wrote")
                self.model[offset : offset + length] = bytes(length)
            else:
                value = self.rng.randrange(1, 256)
                await self.command(f"write -P {value} {offset} {length}", "wrote")
                self.model[offset : offset + length] = bytes([value]) * length
            self.writes += 1


async def export_source(qmp: Any, tmp_path: Path) -> str:
    """A writable NBD export ``disk`` of node ``src`` on a Unix socket; returns its URI."""
    sock = str(tmp_path / "export.sock")
    await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src",
                                           "name": "disk", "writable": True})
    return f"nbd+unix:///disk?socket={sock}"


async def mirror_to_pivot(td: Any, qmp: Any, w: QemuIoWriter, *, rounds: int, pause: float,
                          limit_s: float) -> None:
    """Follow the throttled mirror ``m0`` (just started) while ``w`` writes, to the pivot.

    ``rounds`` bursts of writes while it copies (at least one must land before the copy is
    done), then unthrottled, a burst every ``pause`` seconds until READY, ten writes while
    READY, and job-complete, which must succeed: the one export now serves the target.
    ``limit_s`` bounds the waits for READY and for the end.
    """
    ready = asyncio.create_task(td.next_event(qmp, "BLOCK_JOB_READY", limit_s))
    copying = 0
    for _ in range(rounds):  # writes while the throttled mirror copies
        await w.write_some(3)
        jobs = await qmp.execute("query-block-jobs")
        copying += jobs[0]["offset"] < jobs[0]["len"]
        await asyncio.sleep(0.05)
    assert copying, "no write happened during the copy phase"
    # unthrottled, the mirror converges between the writer's bursts
    await qmp.execute("block-job-set-speed", {"device": "m0", "speed": 0})
    while not ready.done():
        await w.write_some(2)
        await asyncio.sleep(pause)
    await ready
    await w.write_some(10)  # while READY: mirrored through the dirty bitmap
    done = asyncio.create_task(td.next_event(qmp, "BLOCK_JOB_COMPLETED", limit_s))
    await qmp.execute("job-complete", {"id": "m0"})
    ev = await done
    assert "error" not in ev["data"], ev
    exports = await qmp.execute("query-block-exports")
    assert len(exports) == 1 and exports[0]["node-name"] != "src", exports
