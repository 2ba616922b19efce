"""QMP extension arguments of the mirror commands (issue 12): x-resume-log and friends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockmirror.cli.mirror import EXIT_USAGE, build_parser, execute, run
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


def test_cli_resume_log_with_the_in_image_store_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--resume-store image --resume-log PATH``: refused before anything is opened, in the
    style of the CLI's other usage errors (usage line, then ``prog: error: ...``; exit
    status 1, the CLI's usage status: 2 means the job failed). Before, the path was
    silently dropped."""
    src, dst, log = tmp_path / "src.qcow2", tmp_path / "dst.raw", tmp_path / "my.resume"
    src.write_bytes(b"not looked at")
    for order in (["--resume-store", "image", "--resume-log", str(log)],
                  ["--resume-log", str(log), "--resume-store=image"]):
        assert run("mirror", [*order, str(src), str(dst)]) == EXIT_USAGE, order
        out, err = capsys.readouterr()
        assert out == ""
        lines = err.splitlines()
        assert lines[0].startswith("usage: blockmirror mirror "), err
        assert lines[-1] == (
            "blockmirror mirror: error: argument --resume-log: not allowed with "
            "--resume-store image (the resume state is kept inside the qcow2 source, not in "
            "a sidecar file)"), err
        assert all(" error: " not in line for line in lines[:-1]), err
    # nothing was created or touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.qcow2"]
    assert src.read_bytes() == b"not looked at"
    # either option alone still parses (the combination is what is refused)
    p = build_parser()
    assert p.parse_args(["--resume-store", "image", "a", "b"]).resume_log is None
    assert p.parse_args(["--resume-store", "file", "--resume-log", "x", "a", "b"]
                        ).resume_log == "x"
    # --help says so, and no longer calls the path "ignored"
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ignored" not in text
    assert "not with --resume-log" in text
    assert "cannot be combined with --resume-store image" in text
