"""The rbd driver against QEMU's rbd driver, the rbd CLI and qemu-storage-daemon.

Bytes written by qemu-io through QEMU's rbd driver are read by us and the other way round;
``rbd export`` and ``rbd diff`` agree with what we wrote (discard and write-zeroes leave
objects unallocated, block status matches the allocation ``rbd diff`` reports);
blockdev-create makes the image ``rbd info`` describes; and bad input (no such pool, image,
namespace or snapshot, an unreachable monitor, a wrong or missing key, a missing secret, an
unreadable conf file) gets the very replies qemu-storage-daemon gives, with both daemons
still answering afterwards.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ceph_helpers import Cluster, sh
from conftest import require_tool

pytestmark = pytest.mark.interop

MiB = 1 << 20


def test_qemu_writes_we_read_we_write_qemu_reads(ceph_cluster: Cluster, tmp_path: Path) -> None:
    require_tool("qemu-io", "qemu-img")
    cluster = ceph_cluster
    image = cluster.unique("io")
    cluster.rbd("create", "--size", "16", f"rbd/{image}")
    name = cluster.filename("rbd", image)
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 1M", "-c", "write -P 0x5b 9M 4k", name)

    async def main() -> None:
        from blockmirror.block.driver import BlockStatus, WriteFlags
        from blockmirror.block.graph import BlockGraph
        from blockmirror.block.options import close_all, open_blockdev
        from blockmirror.objects import ObjectRegistry
        from blockmirror.objects.secret import Secret

        objects = ObjectRegistry()
        objects.add(Secret("key0", objects, data=cluster.user_key, format="base64"))
        graph = BlockGraph(objects=objects)
        try:
            # the rbd-profile user, its key from a secret object (cf. key-secret)
            node = await open_blockdev(graph, cluster.blockdev(
                "rbd", image, user="blockmirror", **{"node-name": "r", "key-secret": "key0"}))
            assert node.length() == 16 * MiB
            assert await node.read(1 * MiB, MiB) == b"\x5a" * MiB
            assert await node.read(9 * MiB, 4096) == b"\x5b" * 4096
            assert await node.read(0, 4096) == bytes(4096)
            await node.write(4 * MiB + 512, b"\xc3" * 70000)
            await node.write(12 * MiB, b"\xc4" * (4 * MiB))  # a whole object
            await node.driver.pdiscard(12 * MiB, 4 * MiB)
            await node.driver.pwrite_zeroes(1 * MiB, 64 * 1024, WriteFlags.MAY_UNMAP)
            await node.flush()
            info = node.driver.info()
            assert info.cluster_size == 4 * MiB
            # block status from fast-diff: whole 4 MiB objects, allocated or zero
            seen: list[tuple[int, int, bool]] = []
            off = 0
            while off < node.length():
                ext = await node.driver.block_status(off, node.length() - off)
                seen.append((off, ext.length, BlockStatus.DATA in ext.status))
                off += ext.length
            allocated = [(o, n) for o, n, data in seen if data]
            assert allocated == _merge(cluster.diff("rbd", image)), seen
        finally:
            await close_all(graph)

    asyncio.run(main())
    out = sh("qemu-io", "-f", "raw", "-c", "read -P 0xc3 4194816 70000",
             "-c", "read -P 0 1M 64k", "-c", "read -P 0x5a 1114112 983040",
             "-c", "read -P 0 12M 4M", name)
    assert "Pattern verification failed" not in out
    expected = bytearray(16 * MiB)
    expected[1 * MiB : 2 * MiB] = b"\x5a" * MiB
    expected[9 * MiB : 9 * MiB + 4096] = b"\x5b" * 4096
    expected[4 * MiB + 512 : 4 * MiB + 512 + 70000] = b"\xc3" * 70000
    expected[1 * MiB : 1 * MiB + 65536] = bytes(65536)
    assert cluster.export("rbd", image) == bytes(expected)
    # the discarded object is gone: rbd diff lists no data at 12M
    assert all(o + n <= 12 * MiB for o, n in cluster.diff("rbd", image))


def _merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """rbd diff's extents merged where they touch, widened to whole 4 MiB objects."""
    out: list[tuple[int, int]] = []
    obj = 4 * MiB
    for off, n in extents:
        start, end = off // obj * obj, -(-(off + n) // obj) * obj
        if out and out[-1][0] + out[-1][1] >= start:
            s0, n0 = out[-1]
            out[-1] = (s0, max(s0 + n0, end) - s0)
        else:
            out.append((start, end - start))
    return out


def test_blockdev_create_and_drive_mirror_target(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """blockdev-create driver=rbd (cluster-size = object size), then resize through the
    driver; a filename drive-mirror target is created with QEMU's Formatting line."""
    require_tool("qemu-img")
    cluster = ceph_cluster
    image = cluster.unique("created")

    async def main() -> None:
        from blockmirror.qmp.testing import qmp_daemon

        async with qmp_daemon(tmp_path) as td:
            qmp = await td.client()
            await qmp.execute("blockdev-create", {"job-id": "c", "options": {
                "driver": "rbd", "size": 8 * MiB, "cluster-size": MiB,
                "location": {"pool": "rbd2", "image": image, "conf": cluster.conf}}})
            ev = await td.next_event(qmp, "JOB_STATUS_CHANGE", 30)
            while ev["data"]["status"] not in ("concluded",):
                ev = await td.next_event(qmp, "JOB_STATUS_CHANGE", 30)
            jobs = await qmp.execute("query-jobs")
            assert jobs[0]["status"] == "concluded" and "error" not in jobs[0], jobs
            await qmp.execute("job-dismiss", {"id": "c"})
            # a second create of the same image fails with QEMU's text
            await qmp.execute("blockdev-create", {"job-id": "c2", "options": {
                "driver": "rbd", "size": 8 * MiB,
                "location": {"pool": "rbd2", "image": image, "conf": cluster.conf}}})
            ev = await td.next_event(qmp, "JOB_STATUS_CHANGE", 30)
            while ev["data"]["status"] != "concluded":
                ev = await td.next_event(qmp, "JOB_STATUS_CHANGE", 30)
            jobs = await qmp.execute("query-jobs")
            assert jobs[0]["error"] == "error rbd create: File exists", jobs
            await qmp.execute("blockdev-add", {"node-name": "n", **cluster.blockdev("rbd2",
                                                                                   image)})
            node = td.daemon.graph.find_node("n")
            assert node is not None
            await node.driver.truncate(12 * MiB)
            assert node.length() == 12 * MiB

    asyncio.run(main())
    info = cluster.rbd("info", "--format", "json", f"rbd2/{image}")
    parsed = json.loads(info)
    assert parsed["size"] == 12 * MiB and parsed["order"] == 20
    out = json.loads(sh("qemu-img", "info", "--output=json", cluster.filename("rbd2", image)))
    assert out["virtual-size"] == 12 * MiB


# --- bad input, differential against qemu-storage-daemon ---------------------------------------


def _bad_input_steps(cluster: Cluster, tmp: Path) -> list[tuple[str, dict[str, Any]]]:
    image = cluster.unique("bad")
    cluster.rbd("create", "--size", "4", f"rbd/{image}")
    # an unreachable monitor, given up on after 2 s (client_mount_timeout)
    nomon = tmp / "nomon.conf"
    nomon.write_text(re.sub(r"mon host = .*", "mon host = v2:127.0.0.1:9",
                            Path(cluster.conf).read_text())
                     .replace("client_mount_timeout = 10", "client_mount_timeout = 2"))

    def add(name: str, **opts: Any) -> tuple[str, dict[str, Any]]:
        return ("blockdev-add", {"driver": "rbd", "node-name": name, **opts})

    base = {"conf": cluster.conf}
    return [
        add("a", pool="nopool", image=image, **base),
        add("b", pool="rbd", image="no-such-image", **base),
        add("c", pool="rbd", image=image, namespace="nons", **base),
        add("d", pool="rbd", image=image, snapshot="nosnap", **{**base, "read-only": True}),
        add("e", pool="rbd", image=image, conf=str(tmp / "missing.conf")),
        add("f", pool="rbd", image=image, user="blockmirror", **base),  # no key at all
        add("g", pool="rbd", image=image, user="blockmirror", **{"key-secret": "wrong"},
            **base),
        add("h", pool="rbd", image=image, user="blockmirror", **{"key-secret": "nosuch"},
            **base),
        add("i", pool="rbd", image=image, conf=str(nomon)),
        add("j", pool="rbd", image=image, snapshot="x", **base),  # r/w snapshot
        add("ok", pool="rbd", image=image, user="blockmirror", **{"key-secret": "key0"},
            **base),
        ("blockdev-add", {"driver": "raw", "node-name": "fmt", "file": "ok"}),
        ("query-named-block-nodes", {}),
    ]


def _normalised_nodes(reply: Any) -> Any:
    """Every field of every node (image info: cluster-size, format-specific, ...)."""
    return sorted(reply, key=lambda n: n["node-name"])


async def _run_bad_input(kind: str, cluster: Cluster, tmp: Path,
                         steps: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    from qemu.qmp import ExecuteError, QMPClient

    from blockmirror.qmp.testing import DaemonProcess, daemon_argv

    sock = str(tmp / f"{kind}.sock")
    argv = daemon_argv(kind, sock,
                       "--object", f"secret,id=key0,data={cluster.user_key},format=base64",
                       "--object", "secret,id=wrong,data=AQBUUmJlAAAAABAAtx1ynxkkk0v1EHbbMn1JyQ==,"
                       "format=base64")
    out: list[Any] = []
    with DaemonProcess(argv, sock, limit_s=30):
        qmp = QMPClient(kind)
        await qmp.connect(sock)
        try:
            for name, args in steps:
                try:
                    rsp = await asyncio.wait_for(qmp.execute(name, args), 60)
                    if name == "query-named-block-nodes":
                        rsp = _normalised_nodes(rsp)
                    out.append((name, rsp))
                except ExecuteError as e:
                    out.append((name, [e.error_class, str(e)]))
            out.append(("alive", await qmp.execute("query-version") is not None))
        finally:
            await qmp.disconnect()
    return out


def test_bad_input_matches_qsd(ceph_cluster: Cluster, tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon")
    steps = _bad_input_steps(ceph_cluster, tmp_path)

    async def main() -> tuple[list[Any], list[Any]]:
        theirs, ours = await asyncio.gather(
            _run_bad_input("qsd", ceph_cluster, tmp_path, steps),
            _run_bad_input("ours", ceph_cluster, tmp_path, steps))
        return theirs, ours

    theirs, ours = asyncio.run(main())
    for t, o in zip(theirs, ours, strict=True):
        assert o == t
    texts = [r[1][1] for r in ours if isinstance(r[1], list) and len(r[1]) == 2
             and isinstance(r[1][1], str)]
    assert "error opening pool nopool: No such file or directory" in texts
    assert "error reading header from no-such-image: No such file or directory" in texts
    assert "namespace 'nons' does not exist" in texts
    assert "No secret with id 'nosuch'" in texts
    assert "error connecting: Connection timed out" in texts
    assert ours[-1] == ("alive", True)


def test_drive_mirror_to_bad_rbd_target_matches_qsd(ceph_cluster: Cluster,
                                                     tmp_path: Path) -> None:
    """drive-mirror to an rbd: target in a missing pool / with a bad option: the
    Formatting line, then QEMU's error; the source is untouched and still served."""
    require_tool("qemu-storage-daemon", "qemu-img")
    src = tmp_path / "src.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(src), "4M"], check=True)
    conf = ceph_cluster.conf
    steps: list[tuple[str, dict[str, Any]]] = [
        ("blockdev-add", {"driver": "file", "node-name": "src", "filename": str(src)}),
        ("drive-mirror", {"job-id": "m", "device": "src", "sync": "full", "format": "raw",
                          "target": f"rbd:nopool/x:conf={conf}"}),
        ("drive-mirror", {"job-id": "m", "device": "src", "sync": "full", "format": "raw",
                          "target": f"rbd:rbd/x:conf={conf}:no_such_option=1"}),
        ("query-block-jobs", {}),
    ]

    async def one(kind: str) -> tuple[list[Any], str]:
        from qemu.qmp import ExecuteError, QMPClient

        from blockmirror.qmp.testing import DaemonProcess, daemon_argv

        sock = str(tmp_path / f"dm-{kind}.sock")
        out: list[Any] = []
        with DaemonProcess(daemon_argv(kind, sock), sock, limit_s=30) as proc:
            qmp = QMPClient(kind)
            await qmp.connect(sock)
            try:
                for name, args in steps:
                    try:
                        out.append((name, await asyncio.wait_for(qmp.execute(name, args), 60)))
                    except ExecuteError as e:
                        out.append((name, [e.error_class, str(e)]))
            finally:
                await qmp.disconnect()
            printed = proc.output()
        return out, printed

    async def main() -> tuple[Any, Any]:
        return await asyncio.gather(one("qsd"), one("ours"))

    (theirs, their_out), (ours, our_out) = asyncio.run(main())
    assert ours == theirs
    assert our_out == their_out
    assert "error opening pool nopool: No such file or directory" in str(ours)
