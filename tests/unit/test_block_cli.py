"""cli/image.py without QEMU: option parsing, map entry merging and formatting, exit codes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockmirror.block.create import create_file
from blockmirror.cli import image
from blockmirror.cli.image import MapEntry, format_map_human, format_map_json

MiB = 1024 * 1024


def test_parse_o_escapes_and_flags() -> None:
    got = image._parse_o(["cluster_size=4k,lazy_refcounts", "backing_file=a,,b.img"])
    assert got == {"cluster_size": "4k", "lazy_refcounts": "on", "backing_file": "a,b.img"}


def test_map_entries_merge_like_qemu_img() -> None:
    a = MapEntry(0, 4096, 0, True, False, True, 0, "f")
    b = MapEntry(4096, 4096, 0, True, False, True, 4096, "f")
    c = MapEntry(8192, 4096, 0, True, False, True, 12288, "f")  # not contiguous on the host
    d = MapEntry(12288, 4096, 1, False, True, False, None, None)
    assert a.mergeable(b) and not b.mergeable(c) and not c.mergeable(d)
    assert not MapEntry(0, 0, 0, True, False, True, 0, "f").mergeable(a)
    assert format_map_json([a, d]) == (
        '[{ "start": 0, "length": 4096, "depth": 0, "present": true, "zero": false, '
        '"data": true, "offset": 0},\n'
        '{ "start": 12288, "length": 4096, "depth": 1, "present": false, "zero": true, '
        '"data": false}]'
    )
    assert format_map_human([a, c, d]).splitlines() == [
        "Offset          Length          Mapped to       File",
        "0               0x1000          0               f",
        "0x2000          0x1000          0x3000          f",
    ]


def test_map_of_a_sparse_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "s.img"
    asyncio.run(create_file(str(img), 2 * MiB))
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(b"\x01" * 8192)
    assert image.run("map", ["--output=json", str(img)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        '[{ "start": 0, "length": 4096, "depth": 0, "present": true, "zero": false, '
        '"data": true, "offset": 0},',
        '{ "start": 4096, "length": 1044480, "depth": 0, "present": true, "zero": true, '
        '"data": false, "offset": 4096},',
        '{ "start": 1048576, "length": 8192, "depth": 0, "present": true, "zero": false, '
        '"data": true, "offset": 1048576},',
        '{ "start": 1056768, "length": 1040384, "depth": 0, "present": true, "zero": true, '
        '"data": false, "offset": 1056768}]',
    ]


@pytest.mark.parametrize(
    ("argv", "err"),
    [
        (["create", "-f", "raw", "/nonexistent/dir/x.img", "1M"],
         "blockmirror: /nonexistent/dir/x.img: Could not create '/nonexistent/dir/x.img': "
         "No such file or directory\n"),
        (["info", "/nonexistent.img"],
         "blockmirror: Could not open '/nonexistent.img': Could not open '/nonexistent.img': "
         "No such file or directory\n"),
        (["map", "--output", "yaml", "x"],
         "blockmirror: --output must be used with human or json as argument.\n"),
        (["map"], "blockmirror: the following arguments are required: filename\n"),
    ],
)
def test_errors_exit_1_without_traceback(argv: list[str], err: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert image.run(argv[0], argv[1:]) == 1
    out = capsys.readouterr()
    assert out.err == err
    # like qemu-img, create announces the image before it fails to make it
    assert out.out == ("Formatting '/nonexistent/dir/x.img', fmt=raw size=1048576\n"
                       if argv[0] == "create" else "")
