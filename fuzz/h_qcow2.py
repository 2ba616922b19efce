"""Harness: qcow2 header, L1, L2 and refcount parsing, on corrupted qemu-img-made images.

Base images (made once per process with qemu-img when installed, else with our own create):
a 4 MiB qcow2 with data in a few clusters, one with 4 KiB clusters and refcount_bits=1, one
with a backing file. The fuzzer's bytes choose a base and a list of edits aimed at the
structures (header fields, the L1 table, L2 tables, the refcount table and blocks, or any
byte), then the image is opened by our qcow2 driver and used: every cluster read, block
status walked, a cluster written, flushed, closed.

Invariant: opening fails with ImageFormatError (or another BlockMirrorError), or the image
works, with any later failure a BlockMirrorError (BlockIOError, ImageCorruptError); never an
IndexError/struct.error/ValueError/MemoryError, never a hang.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

from blockmirror.block.create import img_create
from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_blockdev
from blockmirror.errors import BlockMirrorError
from fuzz.common import Finding, require_sandbox, run, scratch
from fuzz.provider import Input

DICT = [b"QFI\xfb", b"\0\0\0\x03", b"\xff\xff\xff\xff", b"\x80\0\0\0\0\0\0\0",
        b"\0\0\0\0\0\x01\0\0", b"\xe2\x79\x2a\xca", b"\x68\x53\x78\x6d"]

_BASES: list[tuple[bytes, dict[str, int]]] = []


def _qemu(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def _make_bases() -> None:
    d = scratch()
    have_qemu = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
    specs = [("a.qcow2", ["-o", "cluster_size=65536"], None),
             ("b.qcow2", ["-o", "cluster_size=4096,refcount_bits=1"], None),
             ("c.qcow2", ["-o", "cluster_size=65536", "-b", "a.qcow2", "-F", "qcow2"], "a")]
    for name, opts, _ in specs:
        path = os.path.join(d, name)
        if have_qemu:
            _qemu("qemu-img", "create", "-q", "-f", "qcow2", *opts, path, "4M")
            _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k",
                  "-c", "write -P 0x22 1M 8k", "-c", "write -z 2M 64k", path)
        else:
            cs = 4096 if name == "b.qcow2" else 65536
            run(img_create(path, "qcow2", 4 << 20, quiet=True,
                           options={"cluster_size": cs}))
        with open(path, "rb") as f:
            raw = f.read()
        # magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
        # crypt_method, l1_size, l1_table_offset, refcount_table_offset,
        # refcount_table_clusters (the fields were read one place off before: the "aimed"
        # edits missed the L1 and refcount tables)
        hdr = struct.unpack_from(">4sIQIIQIIQQI", raw, 0)
        layout = {"cluster_bits": hdr[4], "l1_size": hdr[7], "l1_off": hdr[8],
                  "rt_off": hdr[9], "rt_clusters": hdr[10]}
        assert hdr[0] == b"QFI\xfb" and 9 <= layout["cluster_bits"] <= 21, layout
        _BASES.append((raw, layout))


def _edit(inp: Input, img: bytearray, layout: dict[str, int]) -> None:
    cs = 1 << layout["cluster_bits"]
    region = inp.below(6)
    width = inp.pick([1, 2, 4, 8])
    if region == 0:  # the header
        pos = inp.below(112)
    elif region == 1:  # the L1 table
        pos = layout["l1_off"] + 8 * inp.below(max(1, layout["l1_size"]))
    elif region == 2:  # an L2 table: where L1[0] points
        l2 = struct.unpack_from(">Q", img, layout["l1_off"])[0] & 0x00FFFFFFFFFFFE00 \
            if layout["l1_off"] + 8 <= len(img) else 0
        pos = (l2 or cs) + 8 * inp.below(cs // 8)
    elif region == 3:  # the refcount table
        pos = layout["rt_off"] + 8 * inp.below(max(1, layout["rt_clusters"] * cs // 8))
    elif region == 4:  # the first refcount block
        rb = struct.unpack_from(">Q", img, layout["rt_off"])[0] \
            if layout["rt_off"] + 8 <= len(img) else 0
        pos = (rb or cs) + inp.below(cs)
    else:
        pos = inp.below(max(1, len(img)))
    value = inp.bytes(width).ljust(width, b"\0")
    if inp.below(4) == 0:  # an edge value: all ones, the top bit, one cluster
        value = inp.pick([b"\xff" * width, b"\x80" + b"\0" * (width - 1),
                          struct.pack(">Q", cs)[-width:], b"\0" * width])
    if pos + width > len(img) + cs:  # an earlier edit moved a table far away: wrap
        pos %= max(1, len(img) - width)
    if pos + width > len(img):
        img.extend(bytes(pos + width - len(img)))
    img[pos:pos + width] = value


async def _use(path: str, write_at: int) -> None:
    graph = BlockGraph()
    try:
        try:
            node = await open_blockdev(graph, {
                "driver": "qcow2", "node-name": "q",
                "file": {"driver": "file", "filename": path}})
        except BlockMirrorError:
            return
        size = node.length()
        step = 64 * 1024
        for off in range(0, min(size, 4 << 20), step):
            try:
                await node.read(off, min(step, size - off))
            except BlockMirrorError:
                pass
        try:
            off = 0
            while off < min(size, 4 << 20):
                st = await node.block_status(off, min(size, 4 << 20) - off)
                if st.length <= 0:
                    raise Finding(f"block_status made no progress at {off}")
                off += st.length
        except BlockMirrorError:
            pass
        try:
            if size:
                await node.write(write_at % size // 512 * 512, b"\x5a" * min(4096, size))
            await node.flush()
        except BlockMirrorError:
            pass
    finally:
        try:
            await close_all(graph)
        except BlockMirrorError:
            pass


def one_input(data: bytes) -> None:
    require_sandbox()
    if not _BASES:
        _make_bases()
    inp = Input(data)
    raw, layout = _BASES[inp.below(len(_BASES))]
    img = bytearray(raw)
    for _ in range(1 + inp.below(6)):
        _edit(inp, img, layout)
    if inp.below(16) == 0:
        del img[inp.below(len(img)):]  # truncated
    path = os.path.join(scratch(), "fuzz.qcow2")
    with open(path, "wb") as f:
        f.write(img)
    try:
        run(_use(path, inp.int(4)), 30)
    except Finding:
        raise
    except BlockMirrorError:
        pass
    except Exception as e:
        raise Finding(f"{type(e).__name__}: {e}") from e
