"""The differential mirror scripts with RBD images, against qemu-storage-daemon 7.2.

The scenarios of ``mirror_scripts.scripts`` (complete, cancels, pause, manual finalize, error
policies through blkdebug) run with every ``driver=file`` node of theirs turned into a
``driver=rbd`` node on the session cluster (blkdebug then sits over rbd, as it can in QEMU);
a drive-mirror session that creates its target from an ``rbd:`` filename is added. Each daemon
gets its own images; the normalised replies, the events and the printed ``Formatting ...``
lines must be identical.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from ceph_helpers import Cluster
from conftest import require_tool
from mirror_scripts.differential import (
    Step,
    Transcript,
    make_images,
    our_client,
    qsd_client,
    run_script,
)
from mirror_scripts.scripts import SCRIPTS

pytestmark = pytest.mark.interop

def _script_id(script: Any) -> str:
    """complete_after_ready, target_error-stop-5, ... (closures show their arguments)."""
    name = script.__qualname__.split(".")[0]
    if script.__closure__:
        args = sorted((c.cell_contents for c in script.__closure__), key=str)
        return "-".join([name, *map(str, reversed(args))])
    return str(name)


_CHOSEN_IDS = ("complete_after_ready", "cancel_before_ready", "soft_cancel_after_ready",
               "pause_resume", "manual_finalize_dismiss", "target_error-report-5",
               "target_error-stop-5", "source_error-ignore-5")
CHOSEN = [s for s in SCRIPTS if _script_id(s) in _CHOSEN_IDS]


def _on_rbd(value: Any, images: dict[str, dict[str, Any]]) -> Any:
    """The same steps with file nodes of ``images`` (path -> rbd options) swapped for rbd."""
    if isinstance(value, dict):
        if value.get("driver") == "file" and value.get("filename") in images:
            rest = {k: v for k, v in value.items() if k not in ("driver", "filename")}
            return {**images[value["filename"]], **rest}
        return {k: _on_rbd(v, images) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_rbd(v, images) for v in value)
    return value


def _rbd_images(cluster: Cluster, work: Path, who: str) -> dict[str, dict[str, Any]]:
    paths = make_images(str(work))
    src = cluster.unique(f"dsrc-{who}")
    tgt = cluster.unique(f"dtgt-{who}")
    cluster.rbd("import", paths["src"], f"rbd/{src}")
    cluster.rbd("create", "--size", "4", f"rbd2/{tgt}")
    return {paths["src"]: cluster.blockdev("rbd", src),
            paths["tgt"]: cluster.blockdev("rbd2", tgt)}


@pytest.mark.parametrize("script", CHOSEN, ids=_script_id)
def test_rbd_mirror_scripts_match_qsd(ceph_cluster: Cluster, tmp_path: Path,
                                      script: Any) -> None:
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")
    assert len(CHOSEN) == len(_CHOSEN_IDS)

    async def one(who: str, factory: Any) -> Transcript:
        work = tmp_path / who
        work.mkdir()
        images = _rbd_images(ceph_cluster, work, who)
        paths = {"src": next(iter(images)), "tgt": list(images)[1]}
        steps = _on_rbd(script(paths), images)
        assert any("'driver': 'rbd'" in str(s) for s in steps)
        async with factory(str(work)) as qmp:
            return await run_script(qmp, steps, limit_s=30, workdir=str(work))

    async def main() -> None:
        theirs, ours = await asyncio.gather(one("qsd", qsd_client), one("ours", our_client))
        assert ours.replies == theirs.replies
        assert ours.events == theirs.events
        assert any(name == "JOB_STATUS_CHANGE" and data.get("status") == "created"
                   for name, data in ours.events)

    asyncio.run(main())


def test_rbd_drive_mirror_session_matches_qsd(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """drive-mirror from an rbd node to new images named by ``rbd:`` filenames: one
    completed, one refused (mode=existing, no such image), one cancelled; the Formatting
    lines printed must be the same."""
    require_tool("qemu-storage-daemon", "qemu-img", "qemu-io")
    cluster = ceph_cluster
    token = uuid.uuid4().hex[:8]

    def steps(images: dict[str, dict[str, Any]], who: str) -> list[Step]:
        src = next(iter(images.values()))
        a = cluster.filename("rbd2", f"dm-a-{who}-{token}")
        b = cluster.filename("rbd", f"dm-b-{who}-{token}")
        return [
            ("cmd", "blockdev-add", {"node-name": "src", **src}),
            ("cmd", "drive-mirror", {"job-id": "a", "device": "src", "target": a,
                                     "format": "raw", "sync": "full"}),
            ("wait", "BLOCK_JOB_READY", 1), ("cmd", "query-block-jobs"),
            ("cmd", "block-job-complete", {"device": "a"}),
            ("wait", "BLOCK_JOB_COMPLETED", 1),
            ("cmd", "drive-mirror", {"job-id": "b", "device": "src", "target": b,
                                     "format": "raw", "sync": "full", "mode": "existing"}),
            ("cmd", "drive-mirror", {"job-id": "b", "device": "src", "target": b,
                                     "format": "raw", "sync": "full", "speed": 1,
                                     "buf-size": 65536, "granularity": 65536}),
            ("sleep", 0.1), ("cmd", "query-block-jobs"),
            ("cmd", "job-cancel", {"id": "b"}), ("wait", "BLOCK_JOB_CANCELLED", 1),
            ("sleep", 0.1), ("cmd", "query-block-jobs"),
        ]

    async def theirs() -> tuple[Transcript, list[str]]:
        work = tmp_path / "qsd"
        work.mkdir()
        images = _rbd_images(cluster, work, "qsd")
        async with qsd_client(str(work)) as qmp:
            tr = await run_script(qmp, steps(images, "qsd"), limit_s=30, workdir=str(work))
        lines = (work / "qsd.out").read_text().splitlines()
        return tr, [ln.replace("-qsd-", "-ours-") for ln in lines]

    async def ours() -> tuple[Transcript, list[str]]:
        from blockmirror.qmp.testing import qmp_daemon

        work = tmp_path / "ours"
        work.mkdir()
        images = _rbd_images(cluster, work, "ours")
        async with qmp_daemon(work) as td:
            qmp = await td.client()
            tr = await run_script(qmp, steps(images, "ours"), limit_s=30, workdir=str(work))
            return tr, list(td.daemon.stdout_lines)

    async def main() -> None:
        (t, t_lines), (o, o_lines) = await asyncio.gather(theirs(), ours())
        assert o.replies == _unname(t.replies, "-qsd-", "-ours-")
        assert o.events == t.events
        assert o_lines == t_lines
        assert len(o_lines) == 2 and all("fmt=raw size=4194304" in ln for ln in o_lines)
        assert any("error reading header from dm-b-" in str(r) for r in o.replies)

    asyncio.run(main())


def _unname(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {k: _unname(v, old, new) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_unname(v, old, new) for v in value)
    return value

