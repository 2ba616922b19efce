"""QMP extension arguments of the mirror commands (issue 12): x-resume-log and friends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockmirror.cli.mirror import execute
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockMirrorError
from mirror_scripts.memory import make_device, make_node


async def _daemon() -> Daemon:
    d = Daemon()
    g = d.graph
    src = make_node(g, "src", 1 << 20)
    make_node(g, "tgt", 1 << 20)
    make_device(g, src)
    return d


@pytest.mark.parametrize(("extra", "text"), [
    ({"sync": "top"}, "Parameter 'x-resume-log' requires sync mode 'full'"),
    ({"x-resume-extent-size": 3 << 20},
     "Parameter 'x-resume-extent-size' must be a power of two no smaller than the "
     "granularity, and 'x-resume-extents' positive"),
    ({"x-resume-extents": 0},
     "Parameter 'x-resume-extent-size' must be a power of two no smaller than the "
     "granularity, and 'x-resume-extents' positive"),
])
def test_bad_resume_arguments(tmp_path: Path, extra: dict[str, object], text: str) -> None:
    async def main() -> None:
        d = await _daemon()
        args: dict[str, object] = {"job-id": "j", "device": "src", "target": "tgt",
                                   "sync": "full", "x-resume-log": str(tmp_path / "log")}
        args.update(extra)
        with pytest.raises(BlockMirrorError) as e:
            await execute(d, "blockdev-mirror", args)
        assert str(e.value) == text
        assert d.jobs.query_block_jobs() == []
        assert not (tmp_path / "log").exists()

    asyncio.run(main())


def test_a_sidecar_that_is_not_one_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        d = await _daemon()
        log = tmp_path / "log"
        log.write_bytes(b"not a sidecar" * 1000)
        with pytest.raises(BlockMirrorError) as e:
            await execute(d, "blockdev-mirror", {"job-id": "j", "device": "src",
                                                 "target": "tgt", "sync": "full",
                                                 "x-resume-log": str(log)})
        assert str(e.value) == (f"Cannot resume the mirror: '{log}' is not a blockmirror "
                                "resume log. Use a full restart instead")
        # x-resume-restart starts afresh over it
        await execute(d, "blockdev-mirror", {"job-id": "j", "device": "src", "target": "tgt",
                                             "sync": "full", "x-resume-log": str(log),
                                             "x-resume-restart": True})
        job = d.jobs.find("j")
        assert job is not None
        await job.user_cancel(True)
        await job.wait_finished()

    asyncio.run(main())
