"""`blockmirror mirror` with --converge and several --disk pairs (issue 13), in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockmirror.cli.mirror import EXIT_OK, EXIT_USAGE, build_parser, mirror_arguments, run

MiB = 1 << 20


def test_converge_option_becomes_x_converge_arguments() -> None:
    p = build_parser()
    assert mirror_arguments(p.parse_args(["a", "b", "--converge", "auto",
                                          "--converge-deadline", "60"]))["x-converge"] == "auto"
    args = mirror_arguments(p.parse_args(["a", "b", "--converge", "throttle:4M"]))
    assert args["x-converge"] == "throttle" and args["x-converge-throttle"] == 4 * MiB
    args = mirror_arguments(p.parse_args(["a", "b", "--converge", "write-blocking",
                                          "--converge-deadline", "60"]))
    assert args["x-converge"] == "write-blocking" and args["x-converge-deadline"] == 60
    opts = p.parse_args(["--disk", "a=b", "--disk", "c=d"])
    assert opts.disk == [("a", "b"), ("c", "d")] and opts.source is None


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, text in (
        (["a", "b", "--converge", "fast"], "invalid value 'fast'"),
        (["a", "b", "--converge", "throttle"], "throttle needs a rate"),
        (["a", "b", "--converge", "throttle:lots"], "invalid size 'lots'"),
        (["--disk", "a"], "expected SRC=DST"),
        (["a", "b", "--disk", "c=d"], "not both"),
        (["--disk", "a=b", "--export", "unix:/x"], "--export is for a single disk"),
        (["a"], "SOURCE, TARGET"),
    ):
        assert run("mirror", argv) == EXIT_USAGE, argv
        assert text in capsys.readouterr().err, argv


def _image(path: Path, fill: int) -> None:
    path.write_bytes(bytes([fill]) * (2 * MiB) + b"\0" * (2 * MiB))


def test_three_disks_switch_over_together(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    srcs = [tmp_path / f"s{i}.raw" for i in range(3)]
    tgts = [tmp_path / f"t{i}.raw" for i in range(3)]
    for i, p in enumerate(srcs):
        _image(p, i + 1)
    argv = ["--json", "--interval", "0.05", "--source-format", "raw", "--format", "raw"]
    for s, t in zip(srcs, tgts, strict=True):
        argv += ["--disk", f"{s}={t}"]
    assert run("mirror", argv) == EXIT_OK
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    progress = [x for x in lines if x["type"] == "progress"]
    assert progress and all(x["disks"] == 3 for x in progress)
    # the forecast is on by default: every view has a verdict once the jobs run
    assert any(x["verdict"] == "converging" for x in progress)
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["phase"] == "done", summary
    assert "pivoted at one instant" in summary["outcome"], summary
    assert any(x.get("text", "").startswith("every disk pivoted") for x in lines), lines
    for s, t in zip(srcs, tgts, strict=True):
        assert s.read_bytes() == t.read_bytes()
