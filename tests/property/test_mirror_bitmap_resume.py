"""Resuming a failed mirror from its bitmap (``__org.blockmirror_bitmap-mode: always``, the
use Proxmox VE's bitmap modes were made for): whenever the first mirror is cancelled, and
whatever the guest writes before and during it, a second mirror from the same bitmap
(``sync: incremental``) onto the same target leaves the target equal to the source.

With a disabled bitmap (a checkpoint) only ``always`` can make this hold: the writes during
the first job that it had not copied yet reach the bitmap only through the job's own dirty
state (``never`` would lose them). An enabled bitmap also records writes after the job.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.qmp.testing import qmp_daemon

KiB = 1 << 10
SIZE = 1 << 20
GRAN = 16 * KiB
BM = "__org.blockmirror_bitmap"
MODE = "__org.blockmirror_bitmap-mode"

#: a guest write: (offset, length, byte)
writes = st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 40 * KiB),
                            st.integers(1, 255)), max_size=6)


async def _ok(raw: Any, name: str, args: dict[str, Any]) -> Any:
    rsp = await raw.cmd(name, args)
    assert "return" in rsp, (name, args, rsp)
    return rsp["return"]


async def _gone(raw: Any, job: str) -> None:
    for _ in range(3000):
        if not any(j["device"] == job for j in await _ok(raw, "query-block-jobs", {})):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{job} did not end")


async def _ready(raw: Any, job: str) -> None:
    for _ in range(3000):
        if any(j["device"] == job and j["ready"] for j in await _ok(raw, "query-block-jobs",
                                                                     {})):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{job} never ready")


def _files(d: Path) -> tuple[Path, Path]:
    src, tgt = d / "s.raw", d / "t.raw"
    base = bytes(range(256)) * (SIZE // 256)
    src.write_bytes(base)
    tgt.write_bytes(base)  # the replica, taken when the bitmap starts
    return src, tgt


def _read(path: Path) -> bytes:
    return path.read_bytes()


@settings(max_examples=25, deadline=None)
@given(before=writes, during=writes, after=writes, yields=st.integers(0, 60),
       recording=st.booleans())
def test_resume_from_an_always_bitmap(tmp_path_factory: Any, before: list[tuple[int, int, int]],
                                      during: list[tuple[int, int, int]],
                                      after: list[tuple[int, int, int]], yields: int,
                                      recording: bool) -> None:
    d = tmp_path_factory.mktemp("resume")
    src_path, tgt_path = _files(d)

    async def main() -> None:
        async with qmp_daemon(d) as td:
            raw = await td.raw(negotiate=True)
            for node, path in (("s", src_path), ("t", tgt_path)):
                await _ok(raw, "blockdev-add", {"driver": "raw", "node-name": node, "file": {
                    "driver": "file", "filename": str(path)}})
            src = td.daemon.graph.find_node("s")
            assert src is not None

            async def guest(ws: list[tuple[int, int, int]]) -> None:
                for off, n, b in ws:
                    await src.write(off, bytes([b]) * min(n, SIZE - off))

            await _ok(raw, "block-dirty-bitmap-add", {"node": "s", "name": "b",
                                                      "granularity": GRAN})
            await guest(before)
            if not recording:
                await _ok(raw, "block-dirty-bitmap-disable", {"node": "s", "name": "b"})
            await _ok(raw, "blockdev-mirror", {"job-id": "m1", "device": "s", "target": "t",
                                               "sync": "bitmap", BM: "b", MODE: "always",
                                               "buf-size": GRAN})
            await guest(during)
            for _ in range(yields):
                await asyncio.sleep(0)
            await raw.cmd("block-job-cancel", {"device": "m1", "force": True})
            await _gone(raw, "m1")
            if recording:
                await guest(after)
            await _ok(raw, "blockdev-mirror", {"job-id": "m2", "device": "s", "target": "t",
                                               "sync": "incremental", BM: "b"})
            await _ready(raw, "m2")
            await _ok(raw, "block-job-complete", {"device": "m2"})
            await _gone(raw, "m2")
            await _ok(raw, "blockdev-del", {"node-name": "t"})
        assert _read(tgt_path) == _read(src_path)

    asyncio.run(main())
