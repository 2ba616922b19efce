"""qcow2 against real qemu-img/qemu-io: our images pass `qemu-img check` and read back the same
in QEMU; QEMU's images (v2, v3, chains, zero and compressed clusters, preallocation,
snapshots) read the same here and stay clean when we write to them."""

from __future__ import annotations

import asyncio
import json
import random
import struct
import subprocess
from pathlib import Path

import pytest
from test_qcow2_support import (
    apply,
    assert_clean,
    close,
    open_qcow2,
    qemu_img,
    qemu_raw,
)

from blockmirror.block.driver import BlockStatus
from blockmirror.block.drivers.qcow2.create import create_qcow2
from blockmirror.errors import BlockMirrorError
from conftest import require_tool

pytestmark = pytest.mark.interop

CLUSTER_SIZES = [512, 1024, 4096, 65536, 262144, 2 * 1024 * 1024]
REFCOUNT_BITS = [1, 2, 4, 8, 16, 32, 64]


def _workload(seed: int, size: int, n: int) -> list[tuple[str, int, int]]:
    rnd = random.Random(seed)
    ops = []
    for _ in range(n):
        op = rnd.choice(["write", "write", "write", "zero", "zero_unmap", "discard", "flush"])
        off = rnd.randrange(0, size - 1)
        ln = min(size - off, rnd.choice([1, 511, 4096, 65536 + 17, 300000, 1 << 20]))
        ops.append((op, off, ln))
    return ops


async def _run_workload(
    path: Path, model: bytearray, seed: int, cs: int, n: int = 30, direct: bool = False
) -> None:
    graph, node = await (open_qcow2(path, cache={"direct": True}) if direct else open_qcow2(path))
    try:
        for i, (op, off, ln) in enumerate(_workload(seed, len(model), n)):
            await apply(node, model, op, off, ln, seed + i, cs)
        assert await node.read(0, len(model)) == bytes(model)
    finally:
        await close(graph)


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_our_images_every_cluster_size(tmp_path: Path, cs: int) -> None:
    require_tool("qemu-img")
    size = 6 * 1024 * 1024 + 512
    path = tmp_path / "img.qcow2"
    asyncio.run(create_qcow2(str(path), size, cluster_size=cs))
    assert_clean(path)
    model = bytearray(size)
    asyncio.run(_run_workload(path, model, cs, cs))
    assert_clean(path)
    assert qemu_raw(path, tmp_path) == bytes(model)


@pytest.mark.parametrize("cs", [512, 65536])
def test_our_images_o_direct(tmp_path: Path, cs: int) -> None:
    """cache.direct=on: every metadata and partial-cluster write obeys O_DIRECT alignment."""
    require_tool("qemu-img")
    size = 3 * 1024 * 1024 + 512
    path = tmp_path / "img.qcow2"
    asyncio.run(create_qcow2(str(path), size, cluster_size=cs))
    model = bytearray(size)
    asyncio.run(_run_workload(path, model, cs + 1, cs, direct=True))
    assert_clean(path)
    assert qemu_raw(path, tmp_path) == bytes(model)


@pytest.mark.parametrize("bits", REFCOUNT_BITS)
def test_our_images_every_refcount_width(tmp_path: Path, bits: int) -> None:
    require_tool("qemu-img")
    size = 4 * 1024 * 1024
    cs = 4096 if bits < 16 else 512
    path = tmp_path / "img.qcow2"
    asyncio.run(create_qcow2(str(path), size, cluster_size=cs, refcount_bits=bits))
    info = json.loads(qemu_img("info", "--output=json", str(path)))
    assert info["format-specific"]["data"]["refcount-bits"] == bits
    model = bytearray(size)
    asyncio.run(_run_workload(path, model, bits, cs))
    assert_clean(path)
    assert qemu_raw(path, tmp_path) == bytes(model)


@pytest.mark.parametrize(("version", "cs"), [
    ("v2", 512), ("v2", 65536),
    ("v3", 512), ("v3", 4096), ("v3", 65536), ("v3", 2 * 1024 * 1024),
])
def test_our_images_with_backing(tmp_path: Path, version: str, cs: int) -> None:
    require_tool("qemu-img", "qemu-io")
    size = 3 * 1024 * 1024
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(size))
    pattern = bytes(random.Random(5).randbytes(size))
    (tmp_path / "p.raw").write_bytes(pattern)
    qemu_img("convert", "-O", "qcow2", str(tmp_path / "p.raw"), str(base))
    asyncio.run(
        create_qcow2(str(top), size, cluster_size=cs, backing_file="base.qcow2",
                     backing_fmt="qcow2", version=version)
    )
    assert_clean(top)
    model = bytearray(pattern)

    async def run() -> None:
        graph, node = await open_qcow2(top)
        try:
            assert node.backing is not None
            ops = _workload(cs, size, 30)
            for i, (op, off, ln) in enumerate(ops):
                if op == "discard" and version == "v2":
                    continue  # advisory on v2 with a backing file: we keep the data
                await apply(node, model, op, off, ln, i, cs)
            assert await node.read(0, size) == bytes(model)
        finally:
            await close(graph)

    asyncio.run(run())
    assert_clean(top)
    assert qemu_raw(top, tmp_path) == bytes(model)
    # qemu-io reads a written pattern back
    r = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -v 0 512", str(top)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr


def test_qemu_io_pattern_readback(tmp_path: Path) -> None:
    require_tool("qemu-io")
    path = tmp_path / "img.qcow2"
    asyncio.run(create_qcow2(str(path), 1 << 20, cluster_size=4096))

    async def run() -> None:
        graph, node = await open_qcow2(path)
        try:
            await node.write(1000, b"\xab" * 9000)
            await node.write_zeroes(4096, 4096)
        finally:
            await close(graph)

    asyncio.run(run())
    for cmd, ok in (("read -P 0xab 1000 3096", True), ("read -P 0 4096 4096", True),
                    ("read -P 0xab 8192 1808", True), ("read -P 0xab 0 1000", False)):
        r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(path)],
                           capture_output=True, text=True)
        assert ("Pattern verification failed" not in r.stdout) == ok, (cmd, r.stdout)


# --- images made by qemu-img --------------------------------------------------------------


def _raw_pattern(tmp: Path, size: int, seed: int, holes: bool = True) -> Path:
    rnd = random.Random(seed)
    buf = bytearray(size)
    for _ in range(20):
        off = rnd.randrange(0, size - 70000)
        ln = rnd.randrange(1, 70000)
        buf[off : off + ln] = rnd.randbytes(ln) if rnd.random() < 0.7 else b"\x55" * ln
    if not holes:
        buf = bytearray(rnd.randbytes(size))
    p = tmp / f"pattern{seed}.raw"
    p.write_bytes(bytes(buf))
    return p


async def _read_all(path: Path) -> bytes:
    graph, node = await open_qcow2(path, read_only=True)
    try:
        return await node.read(0, node.length())
    finally:
        await close(graph)


async def _write_then_check(path: Path, tmp: Path, cs: int = 65536) -> None:
    expected = bytearray(qemu_raw(path, tmp))
    graph, node = await open_qcow2(path)
    try:
        for i, (op, off, ln) in enumerate(_workload(99, len(expected), 20)):
            if op == "discard" and node.backing is not None:
                continue
            await apply(node, expected, op, off, ln, i, cs)
    finally:
        await close(graph)
    assert_clean(path)
    assert qemu_raw(path, tmp) == bytes(expected)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qemu_images_v2_v3(tmp_path: Path, compat: str) -> None:
    require_tool("qemu-img", "qemu-io")
    size = 2 * 1024 * 1024
    src = _raw_pattern(tmp_path, size, 1)
    img = tmp_path / "img.qcow2"
    qemu_img("convert", "-O", "qcow2", "-o", f"compat={compat}", str(src), str(img))
    # zero clusters (v3: zero flag; v2: data) and a discard hole
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -z 65536 131072",
                    "-c", "write -z -u 262144 65536", str(img)], check=True,
                   capture_output=True)
    assert asyncio.run(_read_all(img)) == qemu_raw(img, tmp_path)
    asyncio.run(_write_then_check(img, tmp_path))


def test_qemu_three_deep_chain(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    size = 2 * 1024 * 1024
    prev = None
    for i in range(3):
        img = tmp_path / f"l{i}.qcow2"
        args = ["create", "-q", "-f", "qcow2"]
        if prev is not None:
            args += ["-b", prev.name, "-F", "qcow2"]
        qemu_img(*args, str(img), str(size))
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0x10 + i} {i * 300000} 400000",
                        "-c", f"write -z {i * 500000 + 100000} 70000", str(img)],
                       check=True, capture_output=True)
        prev = img
    assert prev is not None
    assert asyncio.run(_read_all(prev)) == qemu_raw(prev, tmp_path)

    async def status() -> None:
        graph, node = await open_qcow2(prev, read_only=True)
        try:
            assert len(node.backing_chain()) == 3
            ext = await node.block_status(0, size)
            # offset 0 belongs to the bottom layer only: unallocated at the top
            assert ext.status == BlockStatus.NONE
            ext = await node.block_status(600000, 65536)
            assert BlockStatus.DATA in ext.status and ext.map_offset is not None
        finally:
            await close(graph)

    asyncio.run(status())
    asyncio.run(_write_then_check(prev, tmp_path))


def test_qemu_compressed_clusters(tmp_path: Path) -> None:
    require_tool("qemu-img")
    size = 3 * 1024 * 1024
    src = _raw_pattern(tmp_path, size, 2)
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(img))
    assert asyncio.run(_read_all(img)) == src.read_bytes()
    asyncio.run(_write_then_check(img, tmp_path, 4096))


@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
def test_qemu_preallocation_modes(tmp_path: Path, prealloc: str) -> None:
    require_tool("qemu-img")
    img = tmp_path / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"preallocation={prealloc}", str(img), "3M")
    assert asyncio.run(_read_all(img)) == bytes(3 << 20)
    asyncio.run(_write_then_check(img, tmp_path))


def test_qemu_internal_snapshot(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    size = 2 * 1024 * 1024
    src = _raw_pattern(tmp_path, size, 3, holes=False)
    img = tmp_path / "s.qcow2"
    qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(img))
    qemu_img("snapshot", "-c", "snap1", str(img))
    before = src.read_bytes()
    asyncio.run(_write_then_check(img, tmp_path, 4096))
    # the snapshot still holds the old content
    qemu_img("snapshot", "-a", "snap1", str(img))
    assert qemu_raw(img, tmp_path) == before
    assert "snap1" in qemu_img("snapshot", "-l", str(img))
    assert_clean(img)


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_our_preallocation(tmp_path: Path, prealloc: str) -> None:
    require_tool("qemu-img")
    img = tmp_path / "p.qcow2"
    asyncio.run(create_qcow2(str(img), 3 << 20, cluster_size=65536, preallocation=prealloc))
    assert_clean(img)
    out = json.loads(qemu_img("map", "--output=json", str(img)))
    assert all(e["data"] for e in out), out
    assert qemu_raw(img, tmp_path) == bytes(3 << 20)
    asyncio.run(_write_then_check(img, tmp_path))


def test_layout_matches_qemu_img(tmp_path: Path) -> None:
    require_tool("qemu-img")
    for cs in (512, 65536):
        ours, theirs = tmp_path / f"o{cs}.qcow2", tmp_path / f"t{cs}.qcow2"
        asyncio.run(create_qcow2(str(ours), 100 << 20, cluster_size=cs))
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", str(theirs), "100M")
        a, b = ours.read_bytes(), theirs.read_bytes()
        assert a[:104] == b[:104]  # header fields: same table offsets and sizes
        assert len(a) == len(b)


CREATE_ERRORS = [
    ({"cluster_size": 1000}, "cluster_size=1000"),
    ({"cluster_size": 4 << 20}, "cluster_size=4M"),
    ({"refcount_bits": 3}, "refcount_bits=3"),
    ({"refcount_bits": 128}, "refcount_bits=128"),
    ({"version": "v2", "refcount_bits": 8}, "compat=0.10,refcount_bits=8"),
    ({"version": "v2", "lazy_refcounts": True}, "compat=0.10,lazy_refcounts=on"),
    ({"preallocation": "foo"}, "preallocation=foo"),
]


@pytest.mark.parametrize(("kwargs", "opts"), CREATE_ERRORS)
def test_create_errors_match_qemu_img(tmp_path: Path, kwargs: dict[str, object], opts: str) -> None:
    require_tool("qemu-img")
    r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts,
                        str(tmp_path / "q.qcow2"), "1M"], capture_output=True, text=True)
    assert r.returncode != 0
    qemu_text = r.stderr.strip().split(": ", 2)[-1]
    with pytest.raises(BlockMirrorError) as ei:
        asyncio.run(create_qcow2(str(tmp_path / "b.qcow2"), 1 << 20, **kwargs))  # type: ignore[arg-type]
    assert str(ei.value) == qemu_text
    assert not (tmp_path / "b.qcow2").exists()


@pytest.mark.parametrize("bitmaps", [False, True])
def test_info_matches_qemu(tmp_path: Path, bitmaps: bool) -> None:
    require_tool("qemu-img")
    img = tmp_path / "i.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,refcount_bits=8",
             str(img), "1M")
    if bitmaps:
        qemu_img("bitmap", "--add", str(img), "b0")
        qemu_img("bitmap", "--add", "-g", "128k", "--disable", str(img), "b1")
    qinfo = json.loads(qemu_img("info", "--output=json", str(img)))

    async def run() -> None:
        graph, node = await open_qcow2(img, read_only=True)
        try:
            info = node.info()
            assert info.format_specific == qinfo["format-specific"]
            assert info.cluster_size == qinfo["cluster-size"]
            assert node.length() == qinfo["virtual-size"]
            assert node.driver.has_zero_init()
        finally:
            await close(graph)

    asyncio.run(run())


def test_block_status_kinds(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    img = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "write -z 64k 64k",
                    str(img)], check=True, capture_output=True)
    qmap = json.loads(qemu_img("map", "--output=json", str(img)))

    async def run() -> None:
        graph, node = await open_qcow2(img, read_only=True)
        try:
            e0 = await node.block_status(0, 1 << 20)
            assert e0.length == 65536 and e0.map_offset == qmap[0]["offset"]
            assert e0.status & BlockStatus.DATA and e0.status & BlockStatus.OFFSET_VALID
            e1 = await node.block_status(65536, (1 << 20) - 65536)
            assert e1.status == BlockStatus.ZERO | BlockStatus.ALLOCATED
            # the driver's own answer; the generic layer adds ZERO for a chain's bottom
            e2 = await node.driver.block_status(131072, (1 << 20) - 131072)
            assert e2.status == BlockStatus.NONE and e2.length == (1 << 20) - 131072
        finally:
            await close(graph)

    asyncio.run(run())


def test_truncate_grow(tmp_path: Path) -> None:
    require_tool("qemu-img")
    img = tmp_path / "t.qcow2"
    asyncio.run(create_qcow2(str(img), 1 << 20, cluster_size=512))

    async def run() -> None:
        graph, node = await open_qcow2(img)
        try:
            await node.write(0, b"\x11" * 4096)
            await node.driver.truncate(64 << 20)
            assert node.length() == 64 << 20
            await node.write((64 << 20) - 4096, b"\x22" * 4096)
        finally:
            await close(graph)

    asyncio.run(run())
    assert_clean(img)
    data = qemu_raw(img, tmp_path)
    assert len(data) == 64 << 20
    assert data[:4096] == b"\x11" * 4096 and data[-4096:] == b"\x22" * 4096
    assert struct.unpack(">Q", img.read_bytes()[24:32])[0] == 64 << 20


def test_refcount_table_grows_and_moves(tmp_path: Path) -> None:
    require_tool("qemu-img")
    img = tmp_path / "g.qcow2"
    size = 6 << 20
    asyncio.run(create_qcow2(str(img), size, cluster_size=512, refcount_bits=64))
    header0 = img.read_bytes()[48:60]
    model = bytearray(size)

    async def run() -> None:
        graph, node = await open_qcow2(img)
        try:
            for off in range(0, size, 1 << 20):
                data = bytes([off >> 20]) * (1 << 20)
                await node.write(off, data)
                model[off : off + len(data)] = data
        finally:
            await close(graph)

    asyncio.run(run())
    rt_off, rt_clusters = struct.unpack(">QI", img.read_bytes()[48:60])
    assert (rt_off, rt_clusters) != struct.unpack(">QI", header0)
    assert rt_clusters > 1
    assert_clean(img)
    assert qemu_raw(img, tmp_path) == bytes(model)


@pytest.mark.parametrize(("cs", "backing"), [(512, False), (65536, False), (4096, True)])
def test_conformance_battery(tmp_path: Path, cs: int, backing: bool) -> None:
    """The driver battery every block driver passes (tests/conformance.py)."""
    require_tool("qemu-img")
    from conformance import run_battery

    size = 5 << 20
    img = tmp_path / "b.qcow2"
    kwargs: dict[str, object] = {}
    if backing:
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), str(size))
        kwargs = {"backing_file": "base.qcow2", "backing_fmt": "qcow2"}
    asyncio.run(create_qcow2(str(img), size, cluster_size=cs, **kwargs))  # type: ignore[arg-type]

    async def run() -> None:
        graph, node = await open_qcow2(img)
        try:
            await run_battery(node, seed=cs, rounds=40)
        finally:
            await close(graph)

    asyncio.run(run())
    assert_clean(img)


def test_discard_returns_space_to_host(tmp_path: Path) -> None:
    require_tool("qemu-img")
    img = tmp_path / "d.qcow2"
    asyncio.run(create_qcow2(str(img), 8 << 20))

    async def run() -> tuple[int, int]:
        graph, node = await open_qcow2(img)
        try:
            await node.write(0, b"\x42" * (8 << 20))
            await node.flush()
            full = img.stat().st_blocks
            await node.discard(0, 8 << 20)
            await node.flush()
            return full, img.stat().st_blocks
        finally:
            await close(graph)

    full, after = asyncio.run(run())
    assert after * 4 < full, (full, after)
    assert_clean(img)
    assert qemu_raw(img, tmp_path) == bytes(8 << 20)
