"""The block core against real QEMU 7.2 tools: map, create, info, compare, image locks.

Every test builds its images with qemu-img/qemu-io, runs the same query through qemu-img and
through `blockmirror`, and requires identical output (or identical parsed JSON for info,
whose key order QEMU does not fix).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_blockdev, open_image
from blockmirror.cli import image as cli
from blockmirror.errors import BlockMirrorError
from conftest import IN_CI, require_tool

pytestmark = pytest.mark.interop

MiB = 1024 * 1024


def sh(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=check, timeout=60)


def ours(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.run(args[0], list(args[1:]))
    out = capsys.readouterr()
    return rc, out.out, out.err


def qemu_io(img: str, *cmds: str, fmt: str | None = None) -> None:
    argv = ["qemu-io"]
    if fmt:
        argv += ["-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    sh(*argv, img)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, str]:
    """A zoo of images made by QEMU itself."""
    require_tool("qemu-img", "qemu-io")
    d = tmp_path
    out: dict[str, str] = {}

    def p(name: str) -> str:
        out[name] = str(d / name)
        return out[name]

    sh("qemu-img", "create", "-f", "raw", p("fresh.img"), "3M")
    sparse = p("sparse.img")
    with open(sparse, "wb") as f:
        f.truncate(5 * MiB)
        for off, n in ((0, 512), (MiB + 4096, 12288), (3 * MiB, 65536), (5 * MiB - 4096, 4096)):
            f.seek(off)
            f.write(b"\xab" * n)
    with open(p("odd.img"), "wb") as f:
        f.write(b"\x01" * 70000)
    sh("qemu-img", "create", "-f", "raw", p("empty.img"), "0")
    sh("qemu-img", "create", "-f", "qcow2", p("base.qcow2"), "2M")
    qemu_io(out["base.qcow2"], "write -P 0x11 0 192k", "write -P 0x12 1M 64k")
    sh("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
       p("top.qcow2"), "4M", cwd=d)
    qemu_io(out["top.qcow2"], "write -P 0x21 64k 64k", "write -z 256k 128k",
            "write -P 0x22 1088k 4k", "discard 3M 64k", "write -P 0x23 3M 64k")
    sh("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "sparse.img",
       "-F", "raw", p("over-raw.qcow2"), cwd=d)
    qemu_io(out["over-raw.qcow2"], "write -P 0x31 8k 8k", "write -z 3M 4k")
    sh("qemu-img", "convert", "-c", "-O", "qcow2", out["base.qcow2"], p("compressed.qcow2"))
    sh("qemu-img", "create", "-f", "qcow2", "-o", "preallocation=metadata",
       p("prealloc.qcow2"), "1M")
    return out


MAP_CASES = [
    "fresh.img", "sparse.img", "odd.img", "empty.img", "base.qcow2", "top.qcow2",
    "over-raw.qcow2", "compressed.qcow2", "prealloc.qcow2",
]


@pytest.mark.parametrize("name", MAP_CASES)
def test_map_json_equals_qemu_img(images: dict[str, str], name: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    img = images[name]
    want = sh("qemu-img", "map", "--output=json", img).stdout
    rc, got, err = ours(capsys, "map", "--output", "json", img)
    assert (rc, err) == (0, "")
    assert got == want


@pytest.mark.parametrize("name", ["sparse.img", "top.qcow2", "over-raw.qcow2", "odd.img"])
def test_map_human_equals_qemu_img(images: dict[str, str], name: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    img = images[name]
    want = sh("qemu-img", "map", img).stdout
    rc, got, _ = ours(capsys, "map", img)
    assert rc == 0 and got == want


@pytest.mark.parametrize("name", ["fresh.img", "odd.img", "top.qcow2", "over-raw.qcow2",
                                  "compressed.qcow2"])
def test_info_equals_qemu_img(images: dict[str, str], name: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    img = images[name]
    want = sh("qemu-img", "info", "--output=json", img).stdout
    rc, got, _ = ours(capsys, "info", "--output=json", img)
    # byte for byte: same members, same values, and QEMU's member order
    assert rc == 0 and got == want
    want_h = sh("qemu-img", "info", img).stdout
    rc, got_h, _ = ours(capsys, "info", img)
    assert rc == 0 and got_h == want_h


def test_info_backing_chain(images: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    img = images["top.qcow2"]
    want = sh("qemu-img", "info", "--output=json", "--backing-chain", img).stdout
    rc, got, _ = ours(capsys, "info", "--output=json", "--backing-chain", img)
    assert rc == 0 and got == want
    want_h = sh("qemu-img", "info", "--backing-chain", img).stdout
    rc, got_h, _ = ours(capsys, "info", "--backing-chain", img)
    assert rc == 0 and got_h == want_h


CREATE_CASES = [
    ["-f", "raw", "x.img", "1M"],
    ["-f", "raw", "x.img", "1000"],
    ["-f", "raw", "-o", "preallocation=falloc", "x.img", "2M"],
    ["-f", "raw", "-o", "preallocation=full", "x.img", "256k"],
    ["-f", "file", "x.img", "1M"],
    ["-f", "null-co", "x.img", "1M"],
    ["-f", "raw", "-b", "b.qcow2", "x.img", "1M"],
    ["-f", "raw", "-F", "raw", "x.img", "1M"],
    ["-f", "raw", "-o", "backing_file=b.qcow2", "x.img", "1M"],
    ["-f", "qcow2", "-F", "qcow2", "x.qcow2", "1M"],
    ["-f", "raw", "-o", "preallocation=bogus", "x.img", "1M"],
    ["-f", "raw", "-o", "size=2M", "x.img", "1M"],
    ["-f", "raw", "-o", "size=2x", "x.img"],
    ["-f", "qcow2", "-o", "size=4M,cluster_size=4k", "x.qcow2"],
    ["-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "x.qcow2", "1M"],
    ["-f", "qcow2", "x.qcow2", "1G"],
    ["-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on,compat=1.1", "x.qcow2", "64M"],
    ["-f", "qcow2", "-o", "preallocation=metadata", "x.qcow2", "1M"],
    ["-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "x.qcow2", "8M"],
    # errors: same stderr (modulo the program name) and exit status
    ["-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "x.qcow2"],
    ["-f", "foo", "x.img", "1M"],
    ["-f", "raw", "x.img"],
    ["-f", "raw", "x.img", "1x"],
    ["-f", "raw", "-o", "bogus=1", "x.img", "1M"],
    ["-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "x.qcow2"],
    ["-f", "raw", "nodir/x.img", "1M"],
]


@pytest.mark.parametrize("args", CREATE_CASES, ids=lambda a: " ".join(a))
def test_create_equals_qemu_img(tmp_path: Path, args: list[str],
                                capsys: pytest.CaptureFixture[str]) -> None:
    require_tool("qemu-img")
    qdir, bdir = tmp_path / "q", tmp_path / "b"
    for d in (qdir, bdir):
        d.mkdir()
        sh("qemu-img", "create", "-f", "qcow2", str(d / "b.qcow2"), "3M")
    want = sh("qemu-img", "create", *args, cwd=qdir, check=False)
    cwd = os.getcwd()
    os.chdir(bdir)
    try:
        rc, out, err = ours(capsys, "create", *args)
    finally:
        os.chdir(cwd)
    assert rc == want.returncode
    assert out == want.stdout
    assert err.rstrip("\n") == want.stderr.replace("qemu-img:", "blockmirror:").rstrip("\n")
    target = args[-1] if not args[-1][0].isdigit() else args[-2]
    if want.returncode == 0 and "missing.qcow2" in args:
        # the backing does not exist: compare what the headers say instead of the contents
        def header(path: Path) -> tuple[object, ...]:
            info = json.loads(sh("qemu-img", "info", "--output=json", str(path)).stdout)
            return tuple(info.get(k) for k in ("virtual-size", "cluster-size",
                                               "backing-filename", "backing-filename-format"))
        assert header(qdir / target) == header(bdir / target)
    elif want.returncode == 0:
        cmp = sh("qemu-img", "compare", str(qdir / target), str(bdir / target), check=False)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        # and the same allocation, so mirrors and maps behave alike on both
        assert (sh("qemu-img", "map", "--output=json", str(qdir / target)).stdout
                == sh("qemu-img", "map", "--output=json", str(bdir / target)).stdout)
        if target.endswith(".qcow2"):
            sh("qemu-img", "check", str(bdir / target))
    else:
        assert not (bdir / target).exists()


def test_raw_writes_land_where_qemu_reads(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    img = str(tmp_path / "w.img")
    sh("qemu-img", "create", "-f", "raw", img, "2M")

    async def main() -> None:
        graph = BlockGraph()
        try:
            node = await open_image(graph, img, read_only=False)
            await node.write(MiB + 100, b"\x5c" * 5000)
            await node.write_zeroes(0, 4096, may_unmap=True)
        finally:
            await close_all(graph)

    asyncio.run(main())
    out = sh("qemu-io", "-f", "raw", "-c", f"read -P 0x5c {MiB + 100} 5000", img).stdout
    assert "read 5000/5000 bytes" in out


@pytest.fixture
def qemu_nbd_holding(tmp_path: Path) -> Iterator[str]:
    require_tool("qemu-img", "qemu-nbd")
    img = str(tmp_path / "held.qcow2")
    sock = str(tmp_path / "nbd.sock")
    sh("qemu-img", "create", "-f", "qcow2", img, "1M")
    proc = subprocess.Popen(["qemu-nbd", "-t", "-f", "qcow2", f"--socket={sock}", img],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.02)
        yield img
    finally:
        proc.kill()
        proc.wait()


def test_lock_held_by_qemu_refuses_us(qemu_nbd_holding: str) -> None:
    img = qemu_nbd_holding

    async def main() -> None:
        graph = BlockGraph()
        try:
            with pytest.raises(BlockMirrorError) as exc:
                await open_blockdev(graph, {"driver": "qcow2", "node-name": "q",
                                            "file": {"driver": "file", "filename": img}})
            assert str(exc.value) == 'Failed to get "write" lock'
            assert exc.value.hint == f"Is another process using the image [{img}]?"
            with pytest.raises(BlockMirrorError, match=r'^Failed to get shared "write" lock$'):
                await open_image(graph, img, read_only=True)
            # force-share reads anyway, like qemu-img -U
            node = await open_image(graph, img, read_only=True, options={"force-share": True})
            assert node.length() == MiB
        finally:
            await close_all(graph)

    asyncio.run(main())


def test_our_lock_refuses_qemu(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    img = str(tmp_path / "mine.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", img, "1M")

    async def main() -> None:
        graph = BlockGraph()
        try:
            await open_image(graph, img, read_only=False)
            res = await asyncio.to_thread(sh, "qemu-io", "-c", "read 0 512", img, check=False)
            assert res.returncode != 0
            assert f"can't open device {img}: Failed to get \"write\" lock" in res.stderr
            assert f"Is another process using the image [{img}]?" in res.stderr
            res = await asyncio.to_thread(sh, "qemu-img", "info", "-U", img, check=False)
            assert res.returncode == 0
        finally:
            await close_all(graph)
        res = await asyncio.to_thread(sh, "qemu-io", "-c", "read 0 512", img, check=False)
        assert res.returncode == 0, res.stderr

    asyncio.run(main())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["map", "/nonexistent/x.img"],
         "Could not open '/nonexistent/x.img': Could not open '/nonexistent/x.img': "
         "No such file or directory"),
        (["info", "--output", "xml", "x"], "--output must be used with human or json"),
        (["create", "-f", "qcow2", "-o", "cluster_size=1000", "BADDIR/x.qcow2", "1M"],
         "Cluster size must be a power of two between 512 and 2048k"),
        (["map", "LOOP"], "creates an infinite loop"),
        (["map", "-f", "qcow2", "RAW"], "qcow2"),
        (["create", "--bogus", "x.img"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_hostile_input_no_traceback(tmp_path: Path, args: list[str], needle: str) -> None:
    require_tool("qemu-img")
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", "-u", "-b", b, "-F", "qcow2", a, "1M")
    sh("qemu-img", "create", "-f", "qcow2", "-u", "-b", a, "-F", "qcow2", b, "1M")
    raw = str(tmp_path / "r.img")
    sh("qemu-img", "create", "-f", "raw", raw, "1M")
    argv = [x.replace("LOOP", a).replace("RAW", raw).replace("BADDIR", str(tmp_path))
            for x in args]
    res = subprocess.run([sys.executable, "-m", "blockmirror.cli.main", *argv],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith("blockmirror: ")
    assert needle in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("force", [False, True])
def test_map_of_an_image_qemu_nbd_serves(tmp_path: Path, fmt: str, force: bool,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Same locks as qemu-img: raw shares with a writer, qcow2 refuses unless -U."""
    require_tool("qemu-img", "qemu-nbd")
    img = str(tmp_path / f"served.{fmt}")
    sock = str(tmp_path / "s.sock")
    sh("qemu-img", "create", "-f", fmt, img, "1M")
    proc = subprocess.Popen(["qemu-nbd", "-t", "-f", fmt, f"--socket={sock}", img],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        flags = ["-U"] if force else []
        want = sh("qemu-img", "map", *flags, "--output=json", img, check=False)
        rc, out, err = ours(capsys, "map", *flags, "--output=json", img)
    finally:
        proc.kill()
        proc.wait()
    assert rc == want.returncode and out == want.stdout
    assert err == want.stderr.replace("qemu-img:", "blockmirror:")
    assert (rc != 0) == (fmt == "qcow2" and not force)


BLKDEBUG_CONF = """
[inject-error]
state = "1"
event = "read_aio"
errno = "5"
immediately = "off"
once = "on"
sector = "2048"

[set-state]
state = "1"
event = "read_aio"
new_state = "2"

[set-state]
state = "2"
event = "read_aio"
new_state = "1"

[inject-error]
event = "write_aio"
errno = "28"
sector = "16"
iotype = "write"
"""
BLKDEBUG_OPS = [("read", 0), ("read", MiB), ("read", MiB), ("read", MiB), ("write", 0),
                ("write", 8192), ("read", 8192), ("write", 4096), ("read", MiB + 512),
                ("write", 8192 + 512), ("write", 8192)]


def test_blkdebug_script_matches_qemu_io(tmp_path: Path) -> None:
    """The same legacy config and request sequence fail at the same places as in QEMU."""
    require_tool("qemu-img", "qemu-io")
    img = str(tmp_path / "d.img")
    conf = tmp_path / "d.conf"
    conf.write_text(BLKDEBUG_CONF)
    sh("qemu-img", "create", "-f", "raw", img, "2M")
    argv = ["qemu-io", "-f", "raw"]
    for op, off in BLKDEBUG_OPS:
        argv += ["-c", f"{op} {off} 512"]
    out = sh(*argv, f"blkdebug:{conf}:{img}", check=False).stdout
    want = []
    for line in out.splitlines():
        if " failed: " in line:
            want.append(line.split(" failed: ")[1])
        elif line.startswith(("read ", "wrote ")):
            want.append("ok")

    async def main() -> list[str]:
        graph = BlockGraph()
        got: list[str] = []
        try:
            node = await open_image(graph, f"blkdebug:{conf}:{img}", "raw", read_only=False)
            for op, off in BLKDEBUG_OPS:
                try:
                    if op == "read":
                        await node.read(off, 512)
                    else:
                        await node.write(off, b"\xcd" * 512)
                    got.append("ok")
                except BlockMirrorError as e:
                    got.append(str(e))
        finally:
            await close_all(graph)
        return got

    got = asyncio.run(main())
    assert len(want) == len(BLKDEBUG_OPS)
    assert "ok" in want and "Input/output error" in want and "No space left on device" in want
    assert got == want


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A loop block device over a scratch file, always detached afterwards."""
    require_tool("losetup")
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    res = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                         text=True, timeout=30)
    if res.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot create a loop device (CI=true requires it): {res.stderr}")
        pytest.skip(f"cannot create a loop device here: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)


def test_host_device_on_a_loop_device(loop_device: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from conformance import run_battery

    require_tool("qemu-img", "qemu-io")

    async def main() -> None:
        graph = BlockGraph()
        try:
            node = await open_blockdev(graph, {"driver": "host_device", "node-name": "h",
                                               "filename": loop_device, "discard": "unmap"})
            assert node.length() == 8 * MiB and not node.has_zero_init()
            await run_battery(node, seed=21, rounds=30)
            await node.write(MiB, b"\x3c" * 4096)
            await node.flush()
            with pytest.raises(BlockMirrorError) as exc:
                await open_blockdev(graph, {"driver": "file", "node-name": "f",
                                            "filename": loop_device})
            assert str(exc.value) == f"'file' driver requires '{loop_device}' to be a regular file"
        finally:
            await close_all(graph)

    asyncio.run(main())
    out = sh("qemu-io", "-f", "raw", "-c", f"read -P 0x3c {MiB} 4096", loop_device).stdout
    assert "read 4096/4096 bytes" in out
    want = sh("qemu-img", "map", "--output=json", "-f", "raw", loop_device).stdout
    rc, got, _ = ours(capsys, "map", "--output=json", "-f", "raw", loop_device)
    assert rc == 0 and got == want


@pytest.mark.parametrize(
    "spec",
    [
        "blkdebug::{top}",
        "blkdebug:{conf}:{sparse}",
        'json:{{"driver": "raw", "offset": 65536, "size": 131072, '
        '"file": {{"driver": "file", "filename": "{sparse}"}}}}',
        'json:{{"driver": "null-co", "size": 1048576, "read-zeroes": true}}',
        'json:{{"driver": "blkdebug", "align": 4096, '
        '"image": {{"driver": "file", "filename": "{sparse}"}}}}',
    ],
)
def test_special_filenames_like_qemu_img(images: dict[str, str], tmp_path: Path, spec: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Legacy blkdebug: and json: filenames: same node tree, same map, same info (incl. the
    json: filename QEMU prints with its QDict member order)."""
    conf = tmp_path / "empty.conf"
    conf.write_text("")
    name = spec.format(top=images["top.qcow2"], sparse=images["sparse.img"], conf=conf)
    want_map = sh("qemu-img", "map", "--output=json", name).stdout
    rc, got_map, _ = ours(capsys, "map", "--output=json", name)
    assert rc == 0 and got_map == want_map
    want = sh("qemu-img", "info", "--output=json", name).stdout
    rc, got, _ = ours(capsys, "info", "--output=json", name)
    assert rc == 0 and got == want
