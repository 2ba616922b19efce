"""Acceptance (issue 13): a guest that writes faster than the copy, in real time, over QMP.

A 4 MiB file disk, a copy held to 1 MiB/s (``speed``, ``buf-size`` 256 KiB) and a guest that
rewrites random 64 KiB blocks at about 4 MiB/s. With random writes, the copy can only keep a
quarter of the disk clean (it cleans 1 MiB/s, the guest dirties 4 MiB/s of whatever is clean),
so the dirty data settles at about 3 MiB and the job never goes READY. The test watches for
30 s without the extension (the issue's bound) and 6 s with the forecast on: by then the
forecast is steady and says ``throttled-by-speed`` with the dirty data no smaller than at 2 s.
With ``x-converge: auto`` the job switches itself to write-blocking, goes READY, stays in
sync while the guest keeps writing, and completes with a target identical to the source.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

from blockmirror.qmp.testing import qmp_daemon
from mirror_scripts.memory import make_device

SIZE = 4 << 20
CHUNK = 64 << 10


def _make_files(src: Path, tgt: Path) -> None:
    src.write_bytes(random.Random(7).randbytes(SIZE))
    with open(tgt, "wb") as f:
        f.truncate(SIZE)


async def _run(tmp_path: Path, converge: str | None, watch_s: float = 4.0) -> dict[str, Any]:
    src, tgt = tmp_path / "src.raw", tmp_path / "tgt.raw"
    _make_files(src, tgt)
    out: dict[str, Any] = {}
    async with qmp_daemon(tmp_path) as td:
        qmp = await td.client()
        events: list[dict[str, Any]] = []
        ready = asyncio.Event()
        completed = asyncio.Event()

        def on_event(ev: dict[str, Any]) -> None:
            events.append(ev)
            if ev["event"] == "BLOCK_JOB_READY":
                ready.set()
            if ev["event"] == "BLOCK_JOB_COMPLETED":
                completed.set()

        td.daemon.events.subscribe(on_event)
        for name, path in (("src", src), ("tgt", tgt)):
            await qmp.execute("blockdev-add", {"driver": "raw", "node-name": name,
                                               "file": {"driver": "file",
                                                        "filename": str(path)}})
        graph = td.daemon.graph
        dev = make_device(graph, graph.find_node("src"))
        stop = asyncio.Event()
        written = [0]

        async def guest() -> None:
            rng = random.Random(3)
            start = time.monotonic()
            while not stop.is_set():
                node = dev.node
                assert node is not None
                await node.write(rng.randrange(SIZE // CHUNK) * CHUNK, rng.randbytes(CHUNK))
                written[0] += CHUNK
                # pace to ~4 MiB/s of wall time, whatever the machine's load
                ahead = written[0] / (4 << 20) - (time.monotonic() - start)
                await asyncio.sleep(max(ahead, 0.0))

        args: dict[str, Any] = {"job-id": "j", "device": "src", "target": "tgt",
                                "sync": "full", "speed": 1 << 20, "buf-size": 256 << 10,
                                "granularity": CHUNK}
        if converge is not None:
            args["x-converge"] = converge
        task = asyncio.ensure_future(guest())
        await qmp.execute("blockdev-mirror", args)
        try:
            if converge in (None, "none"):
                await asyncio.sleep(2.0)  # the observation window, not a synchronisation
                out["early"] = await qmp.execute("query-block-jobs")
                out["verdicts"] = []
                for _ in range(int(watch_s / 0.25)):  # watch_s more, sampled
                    await asyncio.sleep(0.25)
                    out["late"] = await qmp.execute("query-block-jobs")
                    conv = out["late"][0].get("x-convergence")
                    if conv is not None:
                        out["verdicts"].append(conv["verdict"])
                out["ready"] = ready.is_set()
            else:
                await asyncio.wait_for(ready.wait(), 30)
                out["ready"] = True
                start = written[0]
                while written[0] < start + (2 << 20):  # the guest keeps writing 2 MiB more
                    await asyncio.sleep(0.05)
                    info = (await qmp.execute("query-block-jobs"))[0]
                    assert info["ready"] and info["status"] == "ready", info
                out["in_sync"] = (await qmp.execute("query-block-jobs"))[0]
                stop.set()
                await task
                await qmp.execute("block-job-complete", {"device": "j"})
                await asyncio.wait_for(completed.wait(), 30)
                out["pivoted"] = dev.node is graph.find_node("tgt")
        finally:
            stop.set()
            await task
        out["events"] = events
        out["guest_bytes"] = written[0]
    out["src"] = src.read_bytes()
    out["tgt"] = tgt.read_bytes()
    return out


def test_without_a_policy_a_faster_writer_keeps_the_job_from_ready(tmp_path: Path) -> None:
    # the bound: no READY within 30 s of the start without a policy
    out = asyncio.run(_run(tmp_path, None, watch_s=28.0))
    assert not out["ready"]
    early, late = out["early"][0], out["late"][0]
    assert "x-convergence" not in late  # QEMU's reply unless the extension is asked for
    assert late["status"] == "running"
    assert late["len"] - late["offset"] >= (early["len"] - early["offset"]) // 2, (early, late)
    assert out["guest_bytes"] >= 8 << 20  # the guest really outpaced the 1 MiB/s copy


def test_forecast_without_a_policy_says_throttled_by_speed(tmp_path: Path) -> None:
    out = asyncio.run(_run(tmp_path, "none"))
    assert not out["ready"]
    conv = out["late"][0]["x-convergence"]
    # the copy runs at its limit: throttled-by-speed (were the machine so loaded that the
    # copy fell under 80% of its limit, "not-converging" would be the honest answer). The
    # dirty data hovers around 3 MiB, moving by chance, so the verdict is sampled
    verdicts = out["verdicts"]
    wrong = [v for v in verdicts if v not in ("throttled-by-speed", "not-converging")]
    assert len(verdicts) == 16 and len(wrong) <= 2, verdicts
    assert conv["policy"] == "none" and "action" not in conv
    assert conv["dirty-rate"] > conv["copy-rate"] > 0, conv
    names = [e["event"] for e in out["events"]]
    assert "X_BLOCK_JOB_CONVERGENCE" in names and "X_BLOCK_JOB_CONVERGENCE_ACTION" not in names


def test_auto_policy_switches_to_write_blocking_and_stays_in_sync(tmp_path: Path) -> None:
    out = asyncio.run(_run(tmp_path, "auto"))
    assert out["ready"] and out["pivoted"]
    actions = [e["data"] for e in out["events"]
               if e["event"] == "X_BLOCK_JOB_CONVERGENCE_ACTION"]
    assert len(actions) == 1 and actions[0]["action"] == "write-blocking", actions
    conv = out["in_sync"]["x-convergence"]
    assert conv["action"] == "write-blocking" and conv["policy"] == "auto", conv
    assert conv["verdict"] == "converging", conv
    assert out["src"] == out["tgt"]
