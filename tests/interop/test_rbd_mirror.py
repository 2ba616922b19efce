"""Live mirrors into, out of and between Ceph RBD pools, under a writing NBD client.

A guest-like writer (interactive qemu-io, one NBD connection for its whole life) writes
through our export of the source while drive-mirror copies it: local qcow2 -> RBD (the image
created by drive-mirror, as bdrv_img_create does), RBD -> RBD in another pool, RBD -> local
qcow2. After the pivot the writer keeps going on the same connection, now served by the
target. In the end QEMU's own rbd driver (qemu-img compare with an ``rbd:`` filename) and
``rbd export`` must see exactly the writer's model. A blockdev-mirror onto a target opened
with discard=unmap leaves what the source left unallocated unallocated (``rbd diff``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ceph_helpers import Cluster, pattern, sh
from conftest import require_tool
from guest_writes import QemuIoWriter, export_source, mirror_to_pivot

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 32 * MiB
#: the writer stays below this; [HOLE) stays unallocated in every source
SPAN = 12 * MiB
HOLE = (16 * MiB, 12 * MiB)


def _make_source(kind: str, cluster: Cluster, tmp: Path, initial: bytes) -> tuple[Any, str]:
    """(blockdev-add options, a name qemu-img understands) of a filled source."""
    raw = tmp / "initial.raw"
    raw.write_bytes(initial)
    if kind == "qcow2":
        path = str(tmp / "src.qcow2")
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), path)
        return {"driver": "qcow2", "node-name": "src",
                "file": {"driver": "file", "filename": path}}, path
    image = cluster.unique("src")
    cluster.rbd("import", str(raw), f"rbd/{image}")
    return {"driver": "raw", "node-name": "src",
            "file": cluster.blockdev("rbd", image)}, cluster.filename("rbd", image)


@pytest.mark.parametrize(("src_kind", "tgt_kind"), [
    ("qcow2", "rbd"), ("rbd", "rbd2"), ("rbd", "qcow2")])
def test_live_mirror_with_writer(ceph_cluster: Cluster, tmp_path: Path, src_kind: str,
                                 tgt_kind: str) -> None:
    require_tool("qemu-img", "qemu-io")
    cluster = ceph_cluster
    initial = pattern(SIZE, [(6 * MiB, 2 * MiB), HOLE])
    src_opts, src_name = _make_source(src_kind, cluster, tmp_path, initial)
    if tgt_kind == "qcow2":
        target, fmt = str(tmp_path / "tgt.qcow2"), "qcow2"
        tgt_image = ""
    else:
        tgt_image = cluster.unique("tgt")
        target, fmt = cluster.filename(tgt_kind, tgt_image), "raw"

    async def main() -> bytes:
        from blockmirror.qmp.testing import qmp_daemon

        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await qmp.execute("blockdev-add", src_opts)
            uri = await export_source(qmp, tmp_path)
            async with QemuIoWriter.start(uri, initial, 16, span=SPAN) as w:
                await w.write_some(10)
                await qmp.execute("drive-mirror", {
                    "job-id": "m0", "device": "src", "target": target, "format": fmt,
                    "sync": "full", "speed": 4 * MiB, "buf-size": MiB})
                assert td.daemon.stdout_lines[-1].startswith(
                    f"Formatting '{target}', fmt={fmt} ")
                await mirror_to_pivot(td, qmp, w, rounds=6, pause=0.05, limit_s=120)
                await w.write_some(15)  # the same connection, now served by the target
                await w.command("flush", "qemu-io>")
                await w.command("quit", "")
                return bytes(w.model)

    model = asyncio.run(main())
    model_path = tmp_path / "model.raw"
    model_path.write_bytes(model)
    # QEMU's rbd driver (or qcow2 driver) reads exactly the writer's disk
    out = sh("qemu-img", "compare", "-f", "raw", "-F", fmt, str(model_path), target)
    assert "Images are identical" in out
    if tgt_kind != "qcow2":
        assert cluster.export(tgt_kind, tgt_image) == model
    else:
        sh("qemu-img", "check", target)
    # the source stopped at the pivot: the writer's last writes are only in the target
    src_copy = tmp_path / "src-after.raw"
    sh("qemu-img", "convert", "-O", "raw", src_name, str(src_copy))
    assert src_copy.read_bytes() != model


@pytest.mark.parametrize("src_kind", ["qcow2", "rbd"])
def test_sparse_source_stays_sparse(ceph_cluster: Cluster, tmp_path: Path,
                                    src_kind: str) -> None:
    """Holes are not written as data: block status (qcow2 map / rbd fast-diff) sends them
    as write-zeroes, which librbd keeps unallocated on a discard=unmap target."""
    require_tool("qemu-img", "qemu-io")
    cluster = ceph_cluster
    initial = pattern(SIZE, [HOLE])
    src_opts, _ = _make_source(src_kind, cluster, tmp_path, initial)
    image = cluster.unique("sparse")
    cluster.rbd("create", "--size", str(SIZE // MiB), f"rbd2/{image}")

    async def main() -> None:
        from blockmirror.qmp.testing import qmp_daemon

        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await qmp.execute("blockdev-add", src_opts)
            await qmp.execute("blockdev-add", {"node-name": "tgt", "discard": "unmap",
                                               **cluster.blockdev("rbd2", image)})
            await qmp.execute("blockdev-mirror", {"job-id": "m", "device": "src",
                                                  "target": "tgt", "sync": "full"})
            await td.next_event(qmp, "BLOCK_JOB_READY", 60)
            await qmp.execute("job-complete", {"id": "m"})
            ev = await td.next_event(qmp, "BLOCK_JOB_COMPLETED", 60)
            assert "error" not in ev["data"], ev

    asyncio.run(main())
    assert cluster.export("rbd2", image) == initial
    extents = cluster.diff("rbd2", image)
    assert extents, "nothing was written"
    hole_start, hole_len = HOLE
    for off, length in extents:
        assert off + length <= hole_start or off >= hole_start + hole_len, (off, length)
