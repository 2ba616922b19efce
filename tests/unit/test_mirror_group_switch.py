"""Acceptance (issue 13): three disks switch over together, or not at all.

Three file-backed disks, each behind a guest device with a writer; every write carries a
global sequence number taken when it is issued. The mirrors are driven through QMP only
(blockdev-mirror, x-block-job-group, x-block-job-group-complete). After the group pivot the
old sources must hold a prefix of the global order and the new targets everything after it:
the last write that reached any old source is older than the first write that reached only
a new target. A target write error injected (blkdebug) into one member before the pivot
leaves every disk on its source with every acknowledged write in place.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockmirror.block.node import BlockBackend, Perm
from blockmirror.qmp.testing import qmp_daemon

DISKS = 3
SIZE = 8 << 20
BLOCK = 4096
#: the block of disk 1 whose copy to the target fails in the failure test
BAD_BLOCK = 1500


def _stamp(seq: int, disk: int) -> bytes:
    return struct.pack("<QQ", seq, disk + 1) * (BLOCK // 16)


def _stamps(path: Path) -> dict[int, int]:
    """block index -> sequence number of the write it holds."""
    data = path.read_bytes()
    out = {}
    for b in range(len(data) // BLOCK):
        seq, disk = struct.unpack_from("<QQ", data, b * BLOCK)
        if disk:
            out[b] = seq
    return out


class Guests:
    """One writer per disk, sharing one sequence counter; acks are logged per disk."""

    def __init__(self, devs: list[BlockBackend]) -> None:
        self.devs = devs
        self.seq = itertools.count(1)
        self.acked: list[dict[int, int]] = [{} for _ in devs]
        self.stop = asyncio.Event()
        self.paused = asyncio.Event()
        self.paused.set()
        self.tasks: list[asyncio.Task[None]] = []
        #: blocks writers never touch (the failure test writes them itself)
        self.reserved = {BAD_BLOCK}
        #: set on every acknowledged write
        self.acked_event = asyncio.Event()

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._writer(i)) for i in range(len(self.devs))]

    async def _writer(self, disk: int) -> None:
        block = 0
        while not self.stop.is_set():
            await self.paused.wait()
            block = (block + 1) % (SIZE // BLOCK)
            if block in self.reserved:
                continue
            node = self.devs[disk].node
            assert node is not None
            seq = next(self.seq)  # issued now: no await between the number and the write
            await node.write(block * BLOCK, _stamp(seq, disk))
            self.acked[disk][block] = seq
            self.acked_event.set()
            await asyncio.sleep(0.001)  # pacing: about one write per millisecond and disk

    async def write_one(self, disk: int, block: int) -> None:
        node = self.devs[disk].node
        assert node is not None
        seq = next(self.seq)
        await node.write(block * BLOCK, _stamp(seq, disk))
        self.acked[disk][block] = seq

    async def writes(self, n: int) -> None:
        """Until every writer has had ``n`` more writes acknowledged."""
        target = [len(a) + n for a in self.acked]
        while any(len(a) < t for a, t in zip(self.acked, target, strict=True)):
            if all(t.done() for t in self.tasks):
                raise AssertionError("the writers died")
            self.acked_event.clear()
            await asyncio.wait_for(self.acked_event.wait(), 30)

    async def finish(self) -> None:
        self.stop.set()
        self.paused.set()
        await asyncio.gather(*self.tasks)


def _make_files(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(SIZE)


async def _setup(tmp_path: Path, td: Any, qmp: Any, *, bad_target: int | None = None
                 ) -> tuple[Guests, list[Path], list[Path]]:
    srcs = [tmp_path / f"src{i}.raw" for i in range(DISKS)]
    tgts = [tmp_path / f"tgt{i}.raw" for i in range(DISKS)]
    _make_files(srcs + tgts)
    devs = []
    for i in range(DISKS):
        await qmp.execute("blockdev-add", {"driver": "raw", "node-name": f"s{i}",
                                           "file": {"driver": "file",
                                                    "filename": str(srcs[i])}})
        tfile: dict[str, Any] = {"driver": "file", "filename": str(tgts[i])}
        if i == bad_target:
            tfile = {"driver": "blkdebug", "image": tfile, "inject-error": [{
                "event": "write_aio", "iotype": "write", "errno": 5,
                "sector": BAD_BLOCK * BLOCK // 512}]}
        await qmp.execute("blockdev-add", {"driver": "raw", "node-name": f"t{i}",
                                           "file": tfile})
        graph = td.daemon.graph
        dev = BlockBackend(f"dev{i}", f"block device 'dev{i}'",
                           Perm.CONSISTENT_READ | Perm.WRITE, Perm.all())
        graph.attach(dev, graph.find_node(f"s{i}"), "root", dev.perm, dev.shared)
        graph.add_backend(dev)
        devs.append(dev)
    return Guests(devs), srcs, tgts


class Events:
    """The daemon's events, awaited by name (no sleeps)."""

    def __init__(self, daemon: Any) -> None:
        self.seen: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        daemon.events.subscribe(self._on)

    def _on(self, ev: dict[str, Any]) -> None:
        self.seen.append(ev)
        self._changed.set()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.seen if e["event"] == name]

    async def until(self, cond: Callable[[], bool], limit_s: float = 30.0) -> None:
        async def wait() -> None:
            while not cond():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), limit_s)


async def _mirror_all(qmp: Any, ev: Events) -> None:
    for i in range(DISKS):
        await qmp.execute("blockdev-mirror", {"job-id": f"j{i}", "device": f"s{i}",
                                              "target": f"t{i}", "sync": "full"})
    await ev.until(lambda: len(ev.named("BLOCK_JOB_READY")) == DISKS)
    await qmp.execute("x-block-job-group", {"group": "vm", "jobs": ["j0", "j1", "j2"]})


def test_group_pivots_every_disk_at_one_instant(tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            ev = Events(td.daemon)
            guests, srcs, tgts = await _setup(tmp_path, td, qmp)
            guests.start()
            await guests.writes(20)
            await _mirror_all(qmp, ev)
            await guests.writes(20)  # the writers run while READY
            # a member of a group refuses a complete of its own
            rsp = await (await td.raw(negotiate=True)).cmd("block-job-complete",
                                                           {"device": "j1"})
            assert "group 'vm'" in rsp["error"]["desc"], rsp
            groups = await qmp.execute("x-query-block-job-groups")
            assert groups == [{"group": "vm", "jobs": ["j0", "j1", "j2"], "state": "grouped"}]
            jobs = await qmp.execute("query-block-jobs")
            assert [j.get("x-group") for j in jobs] == ["vm"] * DISKS
            await qmp.execute("x-block-job-group-complete", {"group": "vm"})
            await ev.until(lambda: bool(ev.named("X_BLOCK_JOB_GROUP_COMPLETED")))
            done = ev.named("X_BLOCK_JOB_GROUP_COMPLETED")[0]
            assert done == {"group": "vm", "jobs": ["j0", "j1", "j2"], "pivoted": True}, done
            await ev.until(lambda: len(ev.named("BLOCK_JOB_COMPLETED")) == DISKS)
            assert all("error" not in e for e in ev.named("BLOCK_JOB_COMPLETED"))
            await guests.writes(30)  # the guests go on, on the new disks
            await guests.finish()
            graph = td.daemon.graph
            for i, dev in enumerate(guests.devs):
                assert dev.node is graph.find_node(f"t{i}"), i
            assert await qmp.execute("query-block-jobs") == []
        old = [_stamps(p) for p in srcs]
        new = [_stamps(p) for p in tgts]
        in_old = [s for d in old for s in d.values()]
        # writes that reached only the new target: the target's block differs from the source's
        only_new = [seq for o, n in zip(old, new, strict=True)
                    for b, seq in n.items() if o.get(b) != seq]
        assert in_old and only_new, (len(in_old), len(only_new))
        assert max(in_old) < min(only_new), (max(in_old), min(only_new))
        # every acknowledged write is in the disk the guest uses now
        for i in range(DISKS):
            for block, seq in guests.acked[i].items():
                assert new[i].get(block) == seq, (i, block, seq, new[i].get(block))

    asyncio.run(main())


def test_a_member_failing_before_the_pivot_leaves_every_disk_on_its_source(
        tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            ev = Events(td.daemon)
            guests, srcs, _tgts = await _setup(tmp_path, td, qmp, bad_target=1)
            guests.start()
            await guests.writes(20)
            await _mirror_all(qmp, ev)
            await guests.writes(10)
            # hold j1 still, give it a block whose copy will fail, then switch the group over:
            # j1 can only reach the pivot by copying that block, so it fails before it
            await qmp.execute("block-job-pause", {"device": "j1"})
            await guests.write_one(1, BAD_BLOCK)
            await qmp.execute("x-block-job-group-complete", {"group": "vm"})
            await qmp.execute("block-job-resume", {"device": "j1"})
            await ev.until(lambda: bool(ev.named("X_BLOCK_JOB_GROUP_COMPLETED")))
            done = ev.named("X_BLOCK_JOB_GROUP_COMPLETED")[0]
            assert done["pivoted"] is False and "j1" in done["error"], done
            await ev.until(lambda: len(ev.named("BLOCK_JOB_COMPLETED"))
                           + len(ev.named("BLOCK_JOB_CANCELLED")) == DISKS)
            errors = {e["device"]: e.get("error") for e in ev.named("BLOCK_JOB_COMPLETED")}
            assert errors.get("j1") == "Input/output error", ev.seen[-12:]
            await guests.writes(20)  # the guests go on, on their sources
            await guests.finish()
            graph = td.daemon.graph
            for i, dev in enumerate(guests.devs):
                assert dev.node is graph.find_node(f"s{i}"), i
            assert await qmp.execute("x-query-block-job-groups") == []
        for i in range(DISKS):
            stamps = _stamps(srcs[i])
            for block, seq in guests.acked[i].items():
                assert stamps.get(block) == seq, (i, block, seq, stamps.get(block))

    asyncio.run(main())
