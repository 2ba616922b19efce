"""Hostile qcow2 images: refused at open with an error naming the file and the problem, never
a traceback, never a write to the file; inconsistencies found later mark the image corrupt."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
from pathlib import Path

import pytest
from test_qcow2_support import close, open_qcow2, qemu_img, sha

from blockmirror.cli import image as cli
from blockmirror.errors import BlockIOError, BlockMirrorError, ImageFormatError
from conftest import require_tool

pytestmark = pytest.mark.interop


def _base(tmp: Path) -> Path:
    img = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 128k", str(img)],
                   check=True, capture_output=True)
    return img


def _l1_offset(img: Path) -> int:
    return int(struct.unpack(">Q", img.read_bytes()[40:48])[0])


def _l2_offset(img: Path) -> int:
    data = img.read_bytes()
    l1 = _l1_offset(img)
    return int(struct.unpack(">Q", data[l1 : l1 + 8])[0]) & 0x00FFFFFFFFFFFE00


def hostile_image(tmp_path: Path, name: str, where: object, fmt: str, value: int) -> Path:
    """The base image with one of ``CASES`` written into it."""
    img = _base(tmp_path)
    off = _l1_offset(img) if where == "l1" else int(where)  # type: ignore[call-overload]
    if name == "backing_name_long":
        with img.open("r+b") as f:
            f.seek(8)
            f.write(struct.pack(">Q", 0x200))
    with img.open("r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))
    return img


# (name, offset (or callable of the image), struct format, value, expected text)
CASES = [
    ("magic", 0, ">I", 0x12345678, "Image is not in qcow2 format"),
    ("version", 4, ">I", 4, "Unsupported qcow2 version 4"),
    ("cluster_bits_low", 20, ">I", 8, "Unsupported cluster size: 2^8"),
    ("cluster_bits_high", 20, ">I", 22, "Unsupported cluster size: 2^22"),
    ("size_huge", 24, ">Q", 1 << 62, "Image is too big"),
    ("l1_too_small", 36, ">I", 0, "L1 table is too small"),
    ("l1_too_large", 36, ">I", 0x7FFFFFFF, "Active L1 table too large"),
    ("l1_unaligned", 40, ">Q", 0x30008, "Active L1 table offset invalid"),
    ("l1_past_eof", 40, ">Q", 1 << 40, "Active L1 table offset invalid"),
    ("reftable_unaligned", 48, ">Q", 0x10004, "Reference count table offset invalid"),
    ("reftable_past_eof", 48, ">Q", 1 << 40, "Reference count table offset invalid"),
    ("reftable_too_large", 56, ">I", 0x1000000, "Reference count table too large"),
    ("snapshots_too_many", 60, ">I", 100000, "Snapshot table too large"),
    ("crypt_unknown", 32, ">I", 3, "Unsupported encryption method 3"),
    ("crypt_aes", 32, ">I", 1, "Encrypted images are not supported"),
    ("crypt_luks", 32, ">I", 2, "Encrypted images are not supported"),
    ("incompat_unknown", 72, ">Q", 1 << 40,
     "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"),
    ("data_file", 72, ">Q", 4, "external data file"),
    ("extended_l2", 72, ">Q", 16, "extended L2"),
    ("compression_bit", 72, ">Q", 8,
     "qcow2: Compression type incompatible feature bit must not be set"),
    ("refcount_order", 96, ">I", 7,
     "Reference count entry width too large; may not exceed 64 bits"),
    ("header_short", 100, ">I", 50, "qcow2 header too short"),
    ("header_long", 100, ">I", 70000, "qcow2 header exceeds cluster size"),
    ("backing_offset", 8, ">Q", 0x20000, "Invalid backing file offset"),
    ("backing_name_long", 16, ">I", 2000, "Backing file name too long"),
    ("refblock_past_eof", 0x10000, ">Q", 1 << 40, "Refcount block offset"),
    ("refblock_unaligned", 0x10000, ">Q", 0x20200, "Refcount block offset"),
    ("refblock_on_l1", 0x10000, ">Q", 0x30000, "Overlapping metadata"),
    ("l2_unaligned", "l1", ">Q", (1 << 63) | 0x40200, "unaligned"),
    ("l2_past_eof", "l1", ">Q", (1 << 63) | (1 << 40), "L2 table offset"),
    ("l2_on_l1", "l1", ">Q", (1 << 63) | 0x30000, "Overlapping metadata"),
    ("l2_on_reftable", "l1", ">Q", (1 << 63) | 0x10000, "Overlapping metadata"),
]


@pytest.mark.parametrize(("name", "where", "fmt", "value", "text"), CASES,
                         ids=[c[0] for c in CASES])
@pytest.mark.parametrize("read_only", [False, True])
def test_hostile_header_refused(
    tmp_path: Path, name: str, where: object, fmt: str, value: int, text: str, read_only: bool,
    capfd: pytest.CaptureFixture[str],
) -> None:
    require_tool("qemu-img", "qemu-io")
    img = hostile_image(tmp_path, name, where, fmt, value)
    before = sha(img)
    with pytest.raises(BlockMirrorError) as ei:
        asyncio.run(open_qcow2(img, read_only=read_only))
    assert text in str(ei.value), str(ei.value)
    assert sha(img) == before
    if read_only:
        # through our qemu-img-like CLI: one line naming the file and the problem, the same
        # line as qemu-img's wherever qemu-img refuses the image too
        capfd.readouterr()
        rc = cli.run("info", ["-f", "qcow2", str(img)])
        err = capfd.readouterr().err.strip()
        assert rc == 1 and "Traceback" not in err
        ours = err.split(": ", 1)[1]
        assert ours.startswith(f"Could not open '{img}': ") and text in ours, ours
        q = subprocess.run(["qemu-img", "info", "-f", "qcow2", str(img)],
                           capture_output=True, text=True)
        if q.returncode != 0 and ": " in q.stderr:
            assert ours == q.stderr.strip().split(": ", 1)[1]
        assert sha(img) == before


def test_truncated_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    require_tool("qemu-img")
    img = _base(tmp_path)
    data = img.read_bytes()
    for cut in (0, 50, 100, 70000):
        img.write_bytes(data[:cut])
        before = sha(img)
        with pytest.raises(ImageFormatError):
            asyncio.run(open_qcow2(img))
        capfd.readouterr()
        assert cli.run("info", ["-f", "qcow2", str(img)]) == 1
        ours = capfd.readouterr().err.strip().split(": ", 1)[1]
        q = subprocess.run(["qemu-img", "info", "-f", "qcow2", str(img)],
                           capture_output=True, text=True)
        assert ours.startswith(f"Could not open '{img}': ")
        if cut < 104:  # QEMU reads tables past EOF as zeroes; we refuse those (stricter)
            assert ours == q.stderr.strip().split(": ", 1)[1], cut
        assert sha(img) == before


def test_corrupt_bit_refuses_rw_allows_ro(tmp_path: Path) -> None:
    require_tool("qemu-img")
    img = _base(tmp_path)
    with img.open("r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 2))
    before = sha(img)
    with pytest.raises(ImageFormatError) as ei:
        asyncio.run(open_qcow2(img))
    assert "qcow2: Image is corrupt; cannot be opened read/write" in str(ei.value)

    async def ro() -> bytes:
        graph, node = await open_qcow2(img, read_only=True)
        try:
            return await node.read(0, 4096)
        finally:
            await close(graph)

    assert asyncio.run(ro()) == b"\x5a" * 4096
    assert sha(img) == before


def test_data_cluster_past_eof_marks_corrupt(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    require_tool("qemu-img", "qemu-io")
    img = _base(tmp_path)
    l2 = _l2_offset(img)
    with img.open("r+b") as f:
        f.seek(l2 + 8)  # the second cluster's entry
        f.write(struct.pack(">Q", (1 << 63) | (1 << 39)))

    async def run() -> None:
        graph, node = await open_qcow2(img)
        try:
            assert await node.read(0, 4096) == b"\x5a" * 4096
            with pytest.raises(BlockIOError):
                await node.read(65536, 4096)
            with pytest.raises(BlockIOError):
                await node.read(0, 4096)  # every further request fails
            with pytest.raises(BlockIOError):
                await node.write(0, b"x")
        finally:
            await close(graph)

    asyncio.run(run())
    assert "qcow2: Marking image as corrupt: " in capfd.readouterr().err
    info = json.loads(qemu_img("info", "--output=json", "-U", str(img)))
    assert info["format-specific"]["data"]["corrupt"] is True


def test_dirty_image_repaired_on_rw_open(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096",
             str(img), "4M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 300k", str(img)],
                   check=True, capture_output=True)
    data = bytearray(img.read_bytes())
    # simulate a crash with lazy refcounts: dirty bit set and a refcount block wiped
    data[72:80] = struct.pack(">Q", 1)
    rt = struct.unpack(">Q", data[48:56])[0]
    rb = struct.unpack(">Q", data[rt : rt + 8])[0]
    data[rb + 2 * 20 : rb + 4096] = bytes(4096 - 40)
    img.write_bytes(bytes(data))
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode != 0

    async def run() -> None:
        graph, node = await open_qcow2(img)
        try:
            assert not node.info().dirty_flag
            await node.write(400 * 1024, b"\x44" * 8192)
        finally:
            await close(graph)

    asyncio.run(run())
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x33 0 300k",
                    "-c", "read -P 0x44 400k 8k", str(img)], check=True, capture_output=True)


def test_autoclear_bits_cleared_on_rw_open_only(tmp_path: Path) -> None:
    """A read-write open clears the autoclear bits of extensions we do not maintain and keeps
    the bitmaps bit (the bitmaps are maintained), as QEMU does; a read-only open writes
    nothing."""
    require_tool("qemu-img")
    img = tmp_path / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    qemu_img("bitmap", "--add", str(img), "b0")
    with img.open("r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 1 | 1 << 7))  # bitmaps + an unknown autoclear bit
    before = sha(img)

    async def open_close(read_only: bool) -> None:
        graph, node = await open_qcow2(img, read_only=read_only)
        try:
            if not read_only:
                await node.write(0, b"\x01" * 65536)
        finally:
            await close(graph)

    asyncio.run(open_close(True))
    assert sha(img) == before
    asyncio.run(open_close(False))
    assert struct.unpack(">Q", img.read_bytes()[88:96])[0] == 1
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 1 0 64k", str(img)], check=True,
                   capture_output=True)
    info = json.loads(qemu_img("info", "--output=json", str(img)))
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"flags": ["auto"], "name": "b0", "granularity": 65536}
    ]


def test_concurrent_requests(tmp_path: Path) -> None:
    require_tool("qemu-img")
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "8M")

    async def run() -> bytes:
        graph, node = await open_qcow2(img)
        try:
            chunks = [(i * 37000, bytes([i]) * 30000) for i in range(1, 200)]
            chunks = [(o, d) for o, d in chunks if o + len(d) <= 8 << 20]
            await asyncio.gather(*(node.write(o, d) for o, d in chunks),
                                 *(node.read(o, 4096) for o, _ in chunks), node.flush())
            expected = bytearray(8 << 20)
            for o, d in chunks:
                expected[o : o + len(d)] = d
            assert await node.read(0, 8 << 20) == bytes(expected)
            return bytes(expected)
        finally:
            await close(graph)

    expected = asyncio.run(run())
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    out = tmp_path / "o.raw"
    qemu_img("convert", "-O", "raw", str(img), str(out))
    assert out.read_bytes() == expected


def test_write_into_metadata_marks_corrupt(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    require_tool("qemu-img", "qemu-io")
    img = _base(tmp_path)
    l2 = _l2_offset(img)
    reftable = struct.unpack(">Q", img.read_bytes()[48:56])[0]
    with img.open("r+b") as f:
        f.seek(l2 + 8)  # guest cluster 1 -> the refcount table
        f.write(struct.pack(">Q", (1 << 63) | reftable))
    before_reftable = img.read_bytes()[reftable : reftable + 65536]

    async def run() -> None:
        graph, node = await open_qcow2(img)
        try:
            with pytest.raises(BlockIOError):
                await node.write(65536, b"\xff" * 512)
        finally:
            await close(graph)

    asyncio.run(run())
    assert "qcow2: Marking image as corrupt: Preventing invalid write on metadata" in (
        capfd.readouterr().err
    )
    assert img.read_bytes()[reftable : reftable + 65536] == before_reftable
    info = json.loads(qemu_img("info", "--output=json", "-U", str(img)))
    assert info["format-specific"]["data"]["corrupt"] is True
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read 0 512", str(img)],
                       capture_output=True, text=True)
    assert "Image is corrupt; cannot be opened read/write" in r.stdout + r.stderr


UNSUPPORTED = [
    (["-o", "extended_l2=on"], "extended L2 entries"),
    (["-o", "data_file={dir}/data.raw"], "external data file"),
]


@pytest.mark.parametrize(("opts", "text"), UNSUPPORTED, ids=["extl2", "datafile"])
def test_unsupported_qemu_features_refused(tmp_path: Path, opts: list[str], text: str) -> None:
    require_tool("qemu-img")
    img = tmp_path / "u.qcow2"
    args = [o.format(dir=tmp_path) for o in opts]
    r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args, str(img), "1M"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    before = sha(img)
    for ro in (True, False):
        with pytest.raises(ImageFormatError) as ei:
            asyncio.run(open_qcow2(img, read_only=ro))
        assert text in str(ei.value)
    assert sha(img) == before


def test_dirty_image_with_wild_reference_refused(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    img = _base(tmp_path)
    l2 = _l2_offset(img)
    with img.open("r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 1))  # dirty: a read-write open must rebuild refcounts
        f.seek(l2 + 16)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 50)))
    before = sha(img)
    with pytest.raises(ImageFormatError) as ei:
        asyncio.run(open_qcow2(img))
    assert "past the end of the image file" in str(ei.value)
    assert sha(img) == before and img.stat().st_size < 1 << 20
