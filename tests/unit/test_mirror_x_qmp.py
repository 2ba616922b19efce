"""The x-converge and group extensions over QMP: arguments, errors, replies; QEMU's replies
unchanged when they are not used."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from blockmirror.qmp.testing import qmp_daemon

MiB = 1 << 20
#: QEMU 7.2's members, then QEMU 8.2's mirror member, in QDict wire order
QEMU_MEMBERS = ["auto-finalize", "io-status", "device", "auto-dismiss", "busy", "len", "offset",
                "status", "paused", "speed", "ready", "type", "actively-synced"]


async def _nodes(raw: Any, *names: str) -> None:
    for name in names:
        rsp = await raw.cmd("blockdev-add", {"driver": "null-co", "node-name": name,
                                             "size": 64 * MiB})
        assert rsp == {"return": {}}, rsp


def _mirror(job: str, src: str, tgt: str, **extra: Any) -> dict[str, Any]:
    # speed 1: the job stays in its first pass (RUNNING) for the whole test
    return {"job-id": job, "device": src, "target": tgt, "sync": "full", "speed": 1,
            "buf-size": 65536, **extra}


def test_x_converge_arguments_and_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            raw = await td.raw(negotiate=True)
            await _nodes(raw, "s0", "t0", "s1", "t1", "s2", "t2")
            for extra, desc in (
                ({"x-converge-deadline": 5}, "Parameter 'x-converge-deadline' requires "
                                             "'x-converge'"),
                ({"x-converge": "throttle"}, "Parameter 'x-converge-throttle' expects a "
                                             "positive rate in bytes per second"),
                ({"x-converge": "auto", "x-converge-throttle": 5},
                 "Parameter 'x-converge-throttle' requires x-converge 'throttle'"),
                ({"x-converge": "auto", "x-converge-deadline": 0},
                 "Parameter 'x-converge-deadline' expects a positive number of seconds"),
                ({"x-converge": "sometimes"},
                 "Parameter 'x-converge' does not accept value 'sometimes'"),
            ):
                rsp = await raw.cmd("blockdev-mirror", _mirror("j", "s0", "t0", **extra))
                assert rsp["error"] == {"class": "GenericError", "desc": desc}, (extra, rsp)
            # QEMU's reply when the extension is not used
            assert (await raw.cmd("blockdev-mirror", _mirror("q", "s0", "t0")))["return"] == {}
            info = (await raw.cmd("query-block-jobs"))["return"][0]
            assert list(info) == QEMU_MEMBERS
            # as in QEMU 8.2, the mirror branch needs copy-mode (unless an extension is given)
            rsp = await raw.cmd("block-job-change", {"id": "q", "type": "mirror"})
            assert rsp["error"] == {"class": "GenericError",
                                    "desc": "Parameter 'copy-mode' is missing"}, rsp
            # block-job-change turns the forecast on; its members come after QEMU's
            rsp = await raw.cmd("block-job-change", {"id": "q", "type": "mirror",
                                                     "x-converge": "throttle",
                                                     "x-converge-throttle": MiB,
                                                     "x-converge-deadline": 30})
            assert rsp == {"return": {}}, rsp
            info = (await raw.cmd("query-block-jobs"))["return"][0]
            # QEMU's members keep their order (the wire order is QEMU's QDict hash order, so
            # the extension member sits where the hash puts it)
            assert [k for k in info if not k.startswith("x-")] == QEMU_MEMBERS
            conv = info["x-convergence"]
            assert conv["policy"] == "throttle" and conv["deadline"] == 30, conv
            assert conv["verdict"] in ("converging", "not-converging", "throttled-by-speed")
            rsp = await raw.cmd("blockdev-mirror", _mirror("a", "s1", "t1",
                                                           **{"x-converge": "none"}))
            assert rsp == {"return": {}}, rsp
            info = (await raw.cmd("query-block-jobs"))["return"][1]
            assert info["x-convergence"]["policy"] == "none"

    asyncio.run(main())


def test_group_commands_and_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with qmp_daemon(tmp_path) as td:
            raw = await td.raw(negotiate=True)
            await _nodes(raw, "s0", "t0", "s1", "t1")
            for job, n in (("j0", "0"), ("j1", "1")):
                rsp = await raw.cmd("blockdev-mirror", _mirror(job, f"s{n}", f"t{n}"))
                assert rsp == {"return": {}}, rsp

            async def err(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
                rsp = await raw.cmd(cmd, args)
                assert "error" in rsp, (cmd, args, rsp)
                return dict(rsp["error"])

            assert await err("x-block-job-group", {"group": "g", "jobs": ["nope"]}) == {
                "class": "DeviceNotActive", "desc": "Block job 'nope' not found"}
            assert (await err("x-block-job-group", {"group": "g", "jobs": []}))["desc"] == \
                "A group needs at least one job"
            assert (await err("x-block-job-group", {"group": "1g", "jobs": ["j0"]}))["desc"] \
                == "Invalid group ID '1g'"
            assert (await err("x-block-job-group", {"group": "g", "jobs": ["j0", "j0"]})
                    )["desc"] == "Job 'j0' is listed twice"
            assert (await raw.cmd("x-block-job-group", {"group": "g", "jobs": ["j0", "j1"]})
                    ) == {"return": {}}
            assert (await err("x-block-job-group", {"group": "h", "jobs": ["j1"]}))["desc"] \
                == "Job 'j1' is already in group 'g'"
            assert (await err("x-block-job-group", {"group": "g", "jobs": ["j1"]}))["desc"] \
                == "Group ID 'g' already in use"
            assert (await err("x-block-job-group-complete", {"group": "x"}))["desc"] == \
                "Group 'x' not found"
            # not READY yet: QEMU's text for a job that cannot complete
            assert (await err("x-block-job-group-complete", {"group": "g"}))["desc"] == \
                "The active block job 'j0' cannot be completed"
            rsp = await raw.cmd("x-query-block-job-groups")
            assert rsp["return"] == [{"group": "g", "jobs": ["j0", "j1"], "state": "grouped"}]
            # cancelling a member fails the group: the other member is cancelled too
            assert (await raw.cmd("block-job-cancel", {"device": "j0"})) == {"return": {}}
            await asyncio.wait_for(td.daemon.jobs.wait_idle(), 10)
            names = [e["event"] for e in td.daemon.events.history]
            assert names.count("BLOCK_JOB_CANCELLED") == 2, names
            done = [e["data"] for e in td.daemon.events.history
                    if e["event"] == "X_BLOCK_JOB_GROUP_COMPLETED"]
            assert len(done) == 1 and done[0]["pivoted"] is False, done
            assert (await raw.cmd("x-query-block-job-groups"))["return"] == []

    asyncio.run(main())
