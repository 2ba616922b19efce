"""A mirror between two raw files in this process (the CLI's source device and a target node),
for the tests that watch the files themselves while the job runs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from blockmirror.block.node import BlockBackend
from blockmirror.cli.mirror import execute, open_source
from blockmirror.daemon import Daemon


def _files(src: Path, tgt: Path, data: bytes) -> None:
    src.write_bytes(data)
    with tgt.open("wb") as f:
        f.truncate(len(data))


async def mirror_files(src: Path, tgt: Path, data: bytes, **args: Any
                       ) -> tuple[Daemon, BlockBackend]:
    """Write ``data`` to ``src`` and an empty file of its size to ``tgt``, and start
    blockdev-mirror ``m`` (sync full, and ``args``) from the source's device to ``tgt``.

    Returns the daemon and the source's device (what a guest writes through)."""
    await asyncio.to_thread(_files, src, tgt, data)
    d = Daemon()
    dev = await open_source(d, str(src), "raw", print)
    await execute(d, "blockdev-add", {"driver": "raw", "node-name": "tgt", "file": {
        "driver": "file", "filename": str(tgt)}})
    await execute(d, "blockdev-mirror", {"job-id": "m", "device": "source", "target": "tgt",
                                         "sync": "full", **args})
    return d, dev
