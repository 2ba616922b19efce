"""The NBD export server and the nbd client driver talking to each other in one process.

Over unix sockets in tmp_path (no external tools): request semantics, the export following a
mirror-style pivot, dirty tracking, export life cycle and QEMU's error texts, and isolation of
misbehaving clients.
"""

from __future__ import annotations

import asyncio
import errno
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block.driver import BlockStatus
from blockmirror.block.drivers.nbd import NbdDriver, parse_nbd_uri
from blockmirror.block.node import BlockNode
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.nbd.constants import NBD_OPTS_MAGIC, Cmd, Opt
from blockmirror.nbd.transmission import encode_request
from blockmirror.qmp.commands import nbd as nq
from nbd_helpers import RamDriver, ram_node, serve


async def client_node(daemon: Daemon, sock: str, export: str = "disk",
                      name: str = "c0", **extra: Any) -> BlockNode:  # extra: more options
    node = BlockNode(name=name, options={"server": {"type": "unix", "path": sock},
                                         "export": export, **extra}, discard_unmap=True)
    node.driver = NbdDriver(node)
    daemon.graph.add_node(node)
    await node.driver.open()
    return node


def ram(node: BlockNode) -> RamDriver:
    drv = node.driver
    assert isinstance(drv, RamDriver)
    return drv


def test_read_write_zero_trim_flush_and_block_status(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path) as (d, sock):
            c = await client_node(Daemon(), sock)
            src = ram(d.graph.nodes["n0"])
            assert c.length() == 4 << 20
            await c.write(65536 + 3, b"hello world", fua=True)
            assert bytes(src.data[65539:65550]) == b"hello world"
            assert await c.read(65536, 16) == bytes(3) + b"hello world" + bytes(2)
            await c.write(1 << 20, b"\xff" * 300000)
            await c.write_zeroes(1 << 20, 131072, may_unmap=True)
            assert await c.read(1 << 20, 131072) == bytes(131072)
            assert (1 << 20) // 65536 not in src.allocated  # unmapped, stays sparse
            await c.discard(2 << 20, 65536)
            flushes = src.flushes
            await c.flush()
            assert src.flushes == flushes + 1
            ext = await c.block_status(0, 4 << 20)
            assert ext.length == 65536 and ext.status & BlockStatus.ZERO
            assert not ext.status & BlockStatus.DATA
            ext = await c.block_status(65536, (4 << 20) - 65536)
            assert ext.status & BlockStatus.DATA and ext.length == 65536
            # many requests in flight at once, answered out of order by the task pool
            chunks = await asyncio.gather(*(c.read(i * 4096, 4096) for i in range(64)))
            assert b"".join(chunks) == bytes(src.data[: 64 * 4096])
            # a sparse structured read: holes come back as zeroes
            assert await c.read(0, 3 << 20) == bytes(src.data[: 3 << 20])
            await c.driver.close()

    asyncio.run(main())


def test_export_follows_pivot_and_marks_dirty(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path) as (d, sock):
            c = await client_node(Daemon(), sock)
            old = d.graph.nodes["n0"]
            marks: list[tuple[int, int]] = []

            class Tracker:
                def mark(self, offset: int, length: int) -> None:
                    marks.append((offset, length))

            old.dirty_trackers.append(Tracker())
            await c.write(4096, b"A" * 4096)
            assert marks == [(4096, 4096)]
            new = ram_node(d.graph, "n1", 4 << 20)
            d.graph.replace_node(old, new)
            await c.write(8192, b"B" * 4096)  # same connection, no reconnect
            assert bytes(ram(new).data[8192:12288]) == b"B" * 4096
            assert bytes(ram(old).data[8192:12288]) == bytes(4096)
            assert nq.query_block_exports(d) == [
                {"id": "e0", "type": "nbd", "node-name": "n1", "shutting-down": False}]
            await c.driver.close()

    asyncio.run(main())


def test_read_only_export_refuses_writes_and_errors_map_to_errno(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path, writable=False) as (d, sock):
            c = await client_node(Daemon(), sock)
            with pytest.raises(BlockIOError) as ei:
                await c.write(0, b"x")
            assert ei.value.errno == errno.EPERM
            ram(d.graph.nodes["n0"]).allocated.add(0)  # holes are never read
            ram(d.graph.nodes["n0"]).fail_reads_at = 100
            with pytest.raises(BlockIOError) as ei:
                await c.read(0, 4096)
            assert ei.value.errno == errno.EIO
            assert await c.read(4096, 10) == bytes(10)  # the connection survived
            await c.driver.close()

    asyncio.run(main())


async def raw_connect(sock: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(sock)


def test_bad_clients_do_not_disturb_others(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path) as (d, sock):
            assert d.nbd is not None
            d.nbd.handshake_timeout = 0.5
            good = await client_node(Daemon(), sock)
            # garbage instead of client flags and options
            r1, w1 = await raw_connect(sock)
            await r1.readexactly(18)
            w1.write(b"\xff" * 64)
            assert await asyncio.wait_for(r1.read(), 5) == b""
            # a client that never finishes the handshake is dropped after the timeout
            r2, w2 = await raw_connect(sock)
            await r2.readexactly(18)
            assert await asyncio.wait_for(r2.read(), 5) == b""
            # a negotiated client that sends a bad request magic
            r3, w3 = await raw_connect(sock)
            await r3.readexactly(18)
            w3.write(struct.pack(">I", 3) + struct.pack(">QII", NBD_OPTS_MAGIC,
                                                        Opt.EXPORT_NAME, 4) + b"disk")
            await r3.readexactly(10)
            w3.write(b"\x00" * 28)
            assert await asyncio.wait_for(r3.read(), 5) == b""
            # a write past the end of the export is refused and writes nothing
            r4, w4 = await raw_connect(sock)
            await r4.readexactly(18)
            w4.write(struct.pack(">I", 3) + struct.pack(">QII", NBD_OPTS_MAGIC,
                                                        Opt.EXPORT_NAME, 4) + b"disk")
            await r4.readexactly(10)
            w4.write(encode_request(Cmd.WRITE, 5, (4 << 20) - 2, 4, data=b"zzzz"))
            _, err, cookie = struct.unpack(">IIQ", await r4.readexactly(16))
            assert (err, cookie) == (22, 5)  # EINVAL, as QEMU 7.2 answers
            assert len(ram(d.graph.nodes["n0"]).data) == 4 << 20
            for w in (w1, w2, w3, w4):
                w.close()
            await good.write(0, b"still fine")
            assert await good.read(0, 10) == b"still fine"
            await good.driver.close()

    asyncio.run(main())


def test_export_life_cycle_and_qemu_texts(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon()
        ram_node(d.graph, "n0", 1 << 20)
        ro = ram_node(d.graph, "ro", 1 << 20, read_only=True)
        add = {"type": "nbd", "id": "e0", "node-name": "n0"}
        with pytest.raises(BlockMirrorError, match=r"^NBD server not running$"):
            await nq.block_export_add(d, add)
        sock = str(tmp_path / "s")
        await nq.nbd_server_start(d, {"addr": {"type": "unix", "data": {"path": sock}}})
        with pytest.raises(BlockMirrorError, match=r"^NBD server already running$"):
            await nq.nbd_server_start(d, {"addr": {"type": "unix", "data": {"path": sock}}})
        await nq.block_export_add(d, add)
        with pytest.raises(BlockMirrorError, match=r"^Block export id 'e0' is already in use$"):
            await nq.block_export_add(d, add)
        with pytest.raises(BlockMirrorError, match=r"^NBD server already has export named 'n0'$"):
            await nq.block_export_add(d, {**add, "id": "e1"})
        with pytest.raises(BlockMirrorError, match=r"^Cannot find device='' nor node-name='zz'$"):
            await nq.block_export_add(d, {**add, "id": "e1", "node-name": "zz"})
        with pytest.raises(BlockMirrorError, match=r"^Cannot export read-only node as writable$"):
            await nq.block_export_add(d, {**add, "id": "e1", "node-name": ro.name,
                                          "writable": True})
        with pytest.raises(BlockMirrorError, match=r"^Invalid block export id$"):
            await nq.block_export_add(d, {**add, "id": "1x"})
        await nq.nbd_server_add(d, {"device": "ro", "writable": True})  # silently read-only
        assert [e["id"] for e in nq.query_block_exports(d)] == ["ro", "e0"]  # newest first
        assert d.nbd is not None and not d.nbd.exports["ro"].writable

        c = await client_node(Daemon(), sock, export="n0")
        with pytest.raises(BlockMirrorError, match=r"^export 'e0' still in use$") as ei:
            await nq.block_export_del(d, "e0")
        assert ei.value.hint == "Use mode='hard' to force client disconnect"
        await nq.block_export_del(d, "e0", "hard")
        with pytest.raises(BlockMirrorError, match=r"^Export 'e0' is already shutting down$"):
            await nq.block_export_del(d, "e0")
        deadline = time.monotonic() + 30  # the hard deletion ends after the client is gone
        while not any(e["event"] == "BLOCK_EXPORT_DELETED" for e in d.events.history):
            assert time.monotonic() < deadline, "BLOCK_EXPORT_DELETED never came"
            await asyncio.sleep(0.01)
        assert [e["data"] for e in d.events.history
                if e["event"] == "BLOCK_EXPORT_DELETED"] == [{"id": "e0"}]
        assert not d.graph.nodes["n0"].parents  # the export's backend is gone
        with pytest.raises(BlockIOError):
            await c.read(0, 512)
        await c.driver.close()
        with pytest.raises(BlockMirrorError, match=r"^Export 'e0' is not found$"):
            await nq.block_export_del(d, "e0")
        await nq.nbd_server_stop(d)
        assert [e["data"]["id"] for e in d.events.history
                if e["event"] == "BLOCK_EXPORT_DELETED"] == ["e0", "ro"]  # e0 went first
        with pytest.raises(BlockMirrorError, match=r"^NBD server not running$"):
            await nq.nbd_server_stop(d)

    asyncio.run(main())


def test_bind_failures_use_qemu_texts(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon()
        busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = busy.sockets[0].getsockname()[1]
        try:
            with pytest.raises(BlockMirrorError, match=r"^Failed to find an available port: "
                                                       r"Address already in use$"):
                await nq.nbd_server_start(d, {"addr": {"type": "inet", "data": {
                    "host": "127.0.0.1", "port": str(port)}}})
        finally:
            busy.close()
        bad = tmp_path / "no" / "such" / "dir.sock"
        with pytest.raises(BlockMirrorError, match=rf"^Failed to bind socket to {bad}: "
                                                   r"No such file or directory$"):
            await nq.nbd_server_start(d, {"addr": {"type": "unix", "data": {"path": str(bad)}}})
        assert d.nbd is None

    asyncio.run(main())


def test_max_connections(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon()
        ram_node(d.graph, "n0", 1 << 20)
        sock = str(tmp_path / "s")
        await nq.nbd_server_start(d, {"addr": {"type": "unix", "data": {"path": sock}},
                                      "max-connections": 1})
        await nq.block_export_add(d, {"type": "nbd", "id": "e0", "node-name": "n0"})
        c = await client_node(Daemon(), sock, export="n0")
        with pytest.raises(BlockMirrorError):
            await client_node(Daemon(), sock, export="n0", name="c1")
        await c.driver.close()
        # the server frees the slot once it has seen the hang-up: retry until it has
        deadline = time.monotonic() + 30
        while True:
            try:
                c2 = await client_node(Daemon(), sock, export="n0", name="c2")
                break
            except BlockMirrorError:
                assert time.monotonic() < deadline, "the connection slot was never freed"
                await asyncio.sleep(0.02)
        await c2.driver.close()
        await nq.nbd_server_stop(d)

    asyncio.run(main())


def test_reconnect_delay_rides_over_a_server_restart(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon()
        ram_node(d.graph, "n0", 1 << 20)
        sock = str(tmp_path / "s")
        args = {"addr": {"type": "unix", "data": {"path": sock}}}
        export = {"type": "nbd", "id": "e0", "node-name": "n0", "writable": True}
        await nq.nbd_server_start(d, args)
        await nq.block_export_add(d, export)
        opts: dict[str, Any] = {"reconnect-delay": 5}
        c = await client_node(Daemon(), sock, export="n0", **opts)
        await c.write(0, b"one")
        await nq.nbd_server_stop(d)
        await nq.nbd_server_start(d, args)
        await nq.block_export_add(d, export)
        await c.write(3, b"two")  # waits for the reconnect, then succeeds
        assert await c.read(0, 6) == b"onetwo"
        await c.driver.close()
        # reconnect-delay=0 (the default): fail at once, but reconnect in the background
        c0 = await client_node(Daemon(), sock, export="n0", name="c9")
        await nq.nbd_server_stop(d)
        with pytest.raises(BlockIOError):
            await c0.read(0, 3)
        await nq.nbd_server_start(d, args)
        await nq.block_export_add(d, export)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert await c0.read(0, 6) == b"onetwo"
                break
            except BlockIOError:
                assert time.monotonic() < deadline, "the driver never reconnected"
                await asyncio.sleep(0.05)
        await c0.driver.close()
        await nq.nbd_server_stop(d)

    asyncio.run(main())


def test_parse_nbd_uri() -> None:
    assert parse_nbd_uri("nbd://example.org:10810/disk") == {
        "driver": "nbd", "server": {"type": "inet", "host": "example.org", "port": "10810"},
        "export": "disk"}
    assert parse_nbd_uri("nbd://127.0.0.1/") == {
        "driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": "10809"}}
    assert parse_nbd_uri("nbd+unix:///e1?socket=/tmp/s.sock") == {
        "driver": "nbd", "server": {"type": "unix", "path": "/tmp/s.sock"}, "export": "e1"}
    assert parse_nbd_uri("nbd:unix:/tmp/x:exportname=a") == {
        "driver": "nbd", "server": {"type": "unix", "path": "/tmp/x"}, "export": "a"}
    for bad in ("http://x/y", "nbd+unix:///e", "nbd://h/e?socket=/x", "nbd:"):
        with pytest.raises(BlockMirrorError, match=r"^No valid URL specified$"):
            parse_nbd_uri(bad)
