"""Issue 14: fault rules over QMP (x-fault-add / x-fault-remove / x-query-faults).

Every operation and field, the X_FAULT_INJECTED event, delays on the virtual clock, and a rule
added while a mirror runs; the job events a rule produces are compared with those of the same
fault scripted with blkdebug.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from blockmirror.daemon import Daemon
from blockmirror.errors import BlockIOError
from blockmirror.qmp.testing import TestDaemon, qmp_daemon

KIB = 1024
MIB = 1024 * KIB
SEC = 1_000_000_000

Body = Callable[[TestDaemon, Any], Awaitable[None]]


def run(body: Body, clock: str = "monotonic") -> None:
    async def main() -> None:
        async with qmp_daemon(daemon=Daemon(clock)) as td:
            qmp = await td.client()
            # discard=unmap: without it discards end before anything hears of them
            await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "n",
                                               "size": 4 * MIB, "read-zeroes": True,
                                               "discard": "unmap"})
            await body(td, qmp)

    asyncio.run(main())


def injected(td: TestDaemon) -> list[dict[str, Any]]:
    return [e["data"] for e in td.daemon.events.history if e["event"] == "X_FAULT_INJECTED"]


OPS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "read": lambda n: n.read(4 * KIB, 4 * KIB),
    "write": lambda n: n.write(4 * KIB, b"\1" * 4 * KIB),
    "zero": lambda n: n.write_zeroes(4 * KIB, 4 * KIB),
    "discard": lambda n: n.discard(4 * KIB, 4 * KIB),
    "flush": lambda n: n.flush(),
    "block-status": lambda n: n.block_status(4 * KIB, 4 * KIB),
}


@pytest.mark.parametrize("op", list(OPS))
def test_each_operation_fails_with_its_errno_and_an_event(op: str) -> None:
    async def body(td: TestDaemon, qmp: Any) -> None:
        node = td.daemon.graph.find_node("n")
        rule = await qmp.execute("x-fault-add", {"node-name": "n", "operation": op,
                                                 "errno": "ENOSPC"})
        assert rule["id"] == "fault0" and rule["errno"] == "ENOSPC"
        # other kinds of request pass
        for other, call in OPS.items():
            if other != op:
                await call(node)
        assert injected(td) == []
        with pytest.raises(BlockIOError) as exc:
            await OPS[op](node)
        assert exc.value.errno == errno.ENOSPC
        assert str(exc.value) == "No space left on device"
        ev = await td.next_event(qmp, "X_FAULT_INJECTED")
        length = 0 if op == "flush" else 4 * KIB
        assert ev["data"] == {"id": "fault0", "node-name": "n", "operation": op,
                              "offset": 0 if op == "flush" else 4 * KIB, "length": length,
                              "errno": "ENOSPC", "delay-ns": 0}

    run(body)


def test_offset_range_nth_and_once() -> None:
    async def body(td: TestDaemon, qmp: Any) -> None:
        node = td.daemon.graph.find_node("n")
        await qmp.execute("x-fault-add", {"node-name": "n", "operation": "write", "id": "r",
                                          "offset": MIB, "length": 64 * KIB, "nth": 2})
        await node.write(0, b"a" * 4096)                 # outside the range: not counted
        await node.write(MIB + 64 * KIB, b"a" * 4096)    # just past the end: not counted
        await node.write(MIB - 512, b"a" * 1024)         # overlaps: 1st match, passes
        for _ in range(2):                               # 2nd and later matches: fail
            with pytest.raises(BlockIOError):
                await node.write(MIB + 60 * KIB, b"a" * 8192)
        (info,) = await qmp.execute("x-query-faults")
        assert info == {"id": "r", "node-name": "n", "operation": "write", "offset": MIB,
                        "length": 64 * KIB, "nth": 2, "errno": "EIO", "once": False,
                        "delay-ns": 0, "matched": 3, "fired": 2}
        await qmp.execute("x-fault-remove", {"id": "r"})
        await node.write(MIB, b"a" * 4096)
        await qmp.execute("x-fault-add", {"node-name": "n", "operation": "read", "nth": 3,
                                          "once": True, "errno": "EPERM"})
        await node.read(0, 512)
        await node.read(0, 512)
        with pytest.raises(BlockIOError) as exc:
            await node.read(0, 512)
        assert exc.value.errno == errno.EPERM
        await node.read(0, 512)  # once: the rule is gone
        assert await qmp.execute("x-query-faults") == []
        assert [e["id"] for e in injected(td)] == ["r", "r", "fault0"]

    run(body)


def test_probability_is_repeatable_with_a_seed() -> None:
    async def pattern(td: TestDaemon, qmp: Any, prob: float, seed: int) -> list[bool]:
        node = td.daemon.graph.find_node("n")
        rule = await qmp.execute("x-fault-add", {"node-name": "n", "operation": "read",
                                                 "probability": prob, "seed": seed})
        out = []
        for _ in range(64):
            try:
                await node.read(0, 512)
                out.append(False)
            except BlockIOError:
                out.append(True)
        await qmp.execute("x-fault-remove", {"id": rule["id"]})
        return out

    async def body(td: TestDaemon, qmp: Any) -> None:
        a = await pattern(td, qmp, 0.5, 7)
        b = await pattern(td, qmp, 0.5, 7)
        c = await pattern(td, qmp, 0.5, 8)
        assert a == b and a != c
        assert 10 < sum(a) < 54
        assert not any(await pattern(td, qmp, 0.0, 1))
        assert all(await pattern(td, qmp, 1, 1))

    run(body)


def test_delay_follows_the_virtual_clock() -> None:
    async def body(td: TestDaemon, qmp: Any) -> None:
        node = td.daemon.graph.find_node("n")
        rule = await qmp.execute("x-fault-add", {"node-name": "n", "operation": "flush",
                                                 "delay-ns": 2 * SEC})
        assert "errno" not in rule  # a delay alone fails nothing
        await node.write(0, b"x" * 512)  # something to flush
        flush = asyncio.ensure_future(node.flush())
        await qmp.execute("x-clock-advance", {"ns": SEC})
        assert not flush.done()
        await qmp.execute("x-clock-advance", {"ns": SEC})
        assert flush.done() and flush.exception() is None
        await qmp.execute("x-fault-add", {"node-name": "n", "operation": "read",
                                          "delay-ns": SEC, "errno": "ETIMEDOUT"})
        read = asyncio.ensure_future(node.read(0, 512))
        step = await qmp.execute("x-clock-run-to-next-timer")
        assert step["fired"] == 1
        with pytest.raises(BlockIOError) as exc:
            await read
        assert exc.value.errno == errno.ETIMEDOUT

    run(body, clock="virtual")


def test_bad_arguments_get_clear_errors() -> None:
    async def body(td: TestDaemon, qmp: Any) -> None:
        raw = await td.raw(negotiate=True)

        async def err(name: str, args: dict[str, Any]) -> str:
            rsp = await raw.cmd(name, args)
            assert rsp["error"]["class"] == "GenericError", rsp
            return str(rsp["error"]["desc"])

        base = {"node-name": "n", "operation": "write"}
        assert await err("x-fault-add", {**base, "node-name": "nope"}) == \
            "Cannot find node 'nope'"
        assert await err("x-fault-add", {**base, "operation": "trim"}) == \
            "Parameter 'operation' does not accept value 'trim'"
        assert await err("x-fault-add", {**base, "nth": 0}) == \
            "Parameter 'nth' expects a value of at least 1"
        assert await err("x-fault-add", {**base, "probability": 1.5}) == \
            "Parameter 'probability' expects a number from 0 to 1"
        assert await err("x-fault-add", {**base, "errno": "EWHATEVER"}) == \
            "Parameter 'errno' does not accept value 'EWHATEVER'"
        assert await err("x-fault-add", {**base, "length": 0}) == \
            "Parameter 'length' expects a positive value"
        assert await err("x-fault-add", {**base, "offset": -1}) == \
            "Parameter 'offset' expects a non-negative value"
        await raw.cmd("x-fault-add", {**base, "id": "dup"})
        assert await err("x-fault-add", {**base, "id": "dup"}) == \
            "Fault rule 'dup' already exists"
        assert await err("x-fault-remove", {"id": "zzz"}) == "Fault rule 'zzz' not found"
        # the daemon keeps running and the node is fine without the rule
        await raw.cmd("x-fault-remove", {"id": "dup"})
        await td.daemon.graph.find_node("n").write(0, b"ok")

    run(body)


# --- against jobs, and against blkdebug -------------------------------------------------------


def _normalized(history: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(e["event"], e["data"]) for e in history if e["event"] != "X_FAULT_INJECTED"]


async def _mirror_with_target_fault(tmp_path: Path, how: str, errname: str, policy: str
                                    ) -> list[tuple[str, dict[str, Any]]]:
    """Mirror 4 MiB of data into blkdebug(null-co); the first data write to the target fails,
    scripted by blkdebug (``how="blkdebug"``) or by a fault rule on the same node."""
    img = tmp_path / f"src-{how}.img"
    img.write_bytes(bytes(range(256)) * (4 * MIB // 256))
    err = getattr(errno, errname)
    dbg: dict[str, Any] = {"driver": "blkdebug", "node-name": "tgt",
                           "image": {"driver": "null-co", "node-name": "tgt-img",
                                     "size": 4 * MIB}}
    if how == "blkdebug":
        dbg["inject-error"] = [{"event": "pwritev", "iotype": "write", "errno": err,
                                "once": True}]
    async with qmp_daemon(tmp_path) as td:
        qmp = await td.client()
        await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "src",
                                           "file": {"driver": "file", "filename": str(img)}})
        await qmp.execute("blockdev-add", dbg)
        if how == "rule":
            await qmp.execute("x-fault-add", {"node-name": "tgt", "operation": "write",
                                              "nth": 1, "once": True, "errno": errname})
        await qmp.execute("blockdev-mirror", {"job-id": "j", "device": "src", "target": "tgt",
                                              "sync": "full", "on-target-error": policy})
        ev = await td.next_event(qmp, "BLOCK_JOB_ERROR")
        if ev["data"]["action"] == "stop":
            await td.next_event(qmp, "JOB_STATUS_CHANGE")  # paused
            (job,) = await qmp.execute("query-block-jobs")
            assert job["paused"] and job["io-status"] == ("nospace" if err == errno.ENOSPC
                                                          else "failed")
            await qmp.execute("block-job-resume", {"device": "j"})
        if ev["data"]["action"] != "report":
            await td.next_event(qmp, "BLOCK_JOB_READY")
            await qmp.execute("block-job-complete", {"device": "j"})
        await td.next_event(qmp, "BLOCK_JOB_COMPLETED")
        await td.next_event(qmp, "JOB_STATUS_CHANGE")  # concluded
        await td.next_event(qmp, "JOB_STATUS_CHANGE")  # null
        return _normalized(td.daemon.events.history)


@pytest.mark.parametrize(("errname", "policy"), [
    ("EIO", "stop"), ("ENOSPC", "enospc"), ("EIO", "report"), ("EIO", "ignore")])
def test_target_write_fault_events_match_blkdebug(tmp_path: Path, errname: str,
                                                   policy: str) -> None:
    async def main() -> None:
        theirs = await _mirror_with_target_fault(tmp_path, "blkdebug", errname, policy)
        ours = await _mirror_with_target_fault(tmp_path, "rule", errname, policy)
        assert ours == theirs
        errors = [d for name, d in ours if name == "BLOCK_JOB_ERROR"]
        action = {"stop": "stop", "enospc": "stop", "report": "report",
                  "ignore": "ignore"}[policy]
        assert errors == [{"device": "j", "operation": "write", "action": action}]

    asyncio.run(main())


def test_source_read_fault_fails_the_job_like_blkdebug(tmp_path: Path) -> None:
    async def one(how: str) -> list[tuple[str, dict[str, Any]]]:
        img = tmp_path / f"src-{how}.img"
        img.write_bytes(b"\x5a" * (2 * MIB))
        dbg: dict[str, Any] = {"driver": "blkdebug", "node-name": "dbg",
                               "image": {"driver": "file", "filename": str(img)}}
        if how == "blkdebug":
            dbg["inject-error"] = [{"event": "read_aio", "iotype": "read"}]
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "src",
                                               "file": dbg})
            await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "tgt",
                                               "size": 2 * MIB})
            if how == "rule":
                await qmp.execute("x-fault-add", {"node-name": "dbg", "operation": "read"})
            await qmp.execute("blockdev-mirror", {"job-id": "j", "device": "src",
                                                  "target": "tgt", "sync": "full"})
            done = await td.next_event(qmp, "BLOCK_JOB_COMPLETED")
            assert done["data"]["error"] == "Input/output error"
            await td.next_event(qmp, "JOB_STATUS_CHANGE")
            await td.next_event(qmp, "JOB_STATUS_CHANGE")
            return _normalized(td.daemon.events.history)

    async def main() -> None:
        theirs = await one("blkdebug")
        assert await one("rule") == theirs
        assert ("BLOCK_JOB_ERROR", {"device": "j", "operation": "read",
                                    "action": "report"}) in theirs

    asyncio.run(main())


def test_rule_added_while_a_mirror_runs(tmp_path: Path) -> None:
    # a speed-limited mirror on the virtual clock: the rule lands mid-copy, deterministically
    img = tmp_path / "src.img"
    img.write_bytes(b"\xa5" * (16 * MIB))

    async def main() -> None:
        async with qmp_daemon(tmp_path, daemon=Daemon(clock="virtual")) as td:
            qmp = await td.client()
            await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "src", "file": {
                "driver": "file", "filename": str(img)}})
            await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "tgt",
                                               "size": 16 * MIB})
            await qmp.execute("blockdev-mirror", {"job-id": "j", "device": "src",
                                                  "target": "tgt", "sync": "full",
                                                  "speed": 4 * MIB, "buf-size": MIB,
                                                  "on-target-error": "stop"})
            await qmp.execute("x-clock-advance", {"ns": SEC})
            (job,) = await qmp.execute("query-block-jobs")
            assert 0 < job["offset"] < job["len"] and job["status"] == "running"
            await qmp.execute("x-fault-add", {"node-name": "tgt", "operation": "write",
                                              "nth": 2, "once": True})
            for _ in range(100):
                if [e for e in td.daemon.events.history if e["event"] == "BLOCK_JOB_ERROR"]:
                    break
                assert (await qmp.execute("x-clock-run-to-next-timer"))["fired"]
            (fired,) = injected(td)
            assert fired["node-name"] == "tgt" and fired["operation"] == "write"
            assert fired["offset"] >= job["offset"]
            ev = [e["data"] for e in td.daemon.events.history if e["event"] == "BLOCK_JOB_ERROR"]
            assert ev == [{"device": "j", "operation": "write", "action": "stop"}]
            (job,) = await qmp.execute("query-block-jobs")
            assert job["status"] == "paused" and job["io-status"] == "failed"
            await qmp.execute("block-job-resume", {"device": "j"})
            for _ in range(1000):
                if (await qmp.execute("query-block-jobs"))[0]["ready"]:
                    break
                assert (await qmp.execute("x-clock-run-to-next-timer"))["fired"]
            await qmp.execute("block-job-complete", {"device": "j"})
            await td.next_event(qmp, "BLOCK_JOB_COMPLETED")

    asyncio.run(main())


@pytest.mark.parametrize(("side", "operation"), [("src", "read"), ("src-file", "read"),
                                                 ("dst", "write"), ("dst-file", "write")])
def test_rules_hold_on_plain_raw_files(tmp_path: Path, side: str, operation: str) -> None:
    # raw over file is the pair the copier moves in one worker call, around the request
    # path; a rule on any node of either side must still meet its requests
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(b"\x77" * (4 * MIB))
    dst.write_bytes(bytes(4 * MIB))

    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            for name, path in (("src", src), ("dst", dst)):
                await qmp.execute("blockdev-add", {"driver": "raw", "node-name": name, "file": {
                    "driver": "file", "node-name": f"{name}-file", "filename": str(path)}})
            await qmp.execute("x-fault-add", {"node-name": side, "operation": operation,
                                              "once": True})
            await qmp.execute("blockdev-mirror", {"job-id": "j", "device": "src",
                                                  "target": "dst", "sync": "full"})
            done = await td.next_event(qmp, "BLOCK_JOB_COMPLETED")
            assert done["data"]["error"] == "Input/output error"
            errors = [e["data"] for e in td.daemon.events.history
                      if e["event"] == "BLOCK_JOB_ERROR"]
            assert errors == [{"device": "j", "operation": operation, "action": "report"}]
            assert [e["data"]["node-name"] for e in td.daemon.events.history
                    if e["event"] == "X_FAULT_INJECTED"] == [side]

    asyncio.run(main())
