"""Issue 15: one NBD client's WRITE payloads in flight are bounded (MAX_IN_FLIGHT_BYTES).

Four 16 MiB WRITEs arrive at once while the node holds every write: with a 32 MiB budget the
server takes two and stops reading until one finishes (QEMU would hold all four: 64 MiB).
"""

from __future__ import annotations

import asyncio
import struct

from blockmirror.block.driver import WriteFlags
from blockmirror.block.node import BlockNode
from blockmirror.daemon import Daemon
from blockmirror.export import nbd_server as ns
from blockmirror.nbd.constants import NBD_OPTS_MAGIC, NBD_REQUEST_MAGIC, Cmd, Opt
from nbd_helpers import RamDriver, SocketClient, ram_node

MiB = 1 << 20


def _export_held(size: int) -> tuple[ns.NbdServer, BlockNode, asyncio.Event, list[int]]:
    """A server exporting a RAM node whose writes wait for the returned gate; the list holds
    [writes waiting now, the most that ever waited]."""
    d = Daemon()
    node = ram_node(d.graph, "n0", size)
    drv = node.driver
    assert isinstance(drv, RamDriver)
    gate = asyncio.Event()
    counts = [0, 0]
    inner = drv.pwritev

    async def held(offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        counts[0] += 1
        counts[1] = max(counts[1], counts[0])
        await gate.wait()
        counts[0] -= 1
        await inner(offset, data, flags)

    drv.pwritev = held  # type: ignore[method-assign]
    server = ns.NbdServer(d.graph, d.events)
    server.add_export("e0", node, name="disk", description="", writable=True)
    return server, node, gate, counts


def _go(name: bytes = b"disk") -> bytes:
    """A client's handshake: fixed newstyle, then NBD_OPT_GO for ``name``."""
    return struct.pack(">I", 3) + struct.pack(
        ">QII", NBD_OPTS_MAGIC, Opt.GO, 4 + len(name) + 2) + struct.pack(
        ">I", len(name)) + name + struct.pack(">H", 0)


def test_write_payloads_in_flight_stay_within_the_budget() -> None:
    async def main() -> tuple[int, int]:
        server, node, gate, counts = _export_held(64 * MiB)
        stream = _go()
        for k in range(4):
            stream += struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Cmd.WRITE, k + 1,
                                  k * 16 * MiB, 16 * MiB) + bytes([k + 1]) * (16 * MiB)
        conn = SocketClient(server)
        await conn.start()
        sender = asyncio.ensure_future(conn.send(stream))
        # the server takes what the budget allows, then holds the third write unstarted
        # and stops reading (the fourth stays in the socket)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while conn.client._waiting is None:
            assert loop.time() < deadline, "the server never stopped at the budget"
            await asyncio.sleep(0)
        held_while_blocked = counts[0]
        assert not conn.client.writer.transport.is_reading()
        gate.set()
        await sender
        await conn.finish(30)
        assert await node.read(48 * MiB, 4) == b"\x04" * 4  # all four written in the end
        return held_while_blocked, counts[1]

    held, peak = asyncio.run(main())
    assert held == 2, held  # 2 x 16 MiB = the 32 MiB budget; the others wait unread
    assert peak <= 2


def test_after_disc_the_server_stops_reading_while_requests_finish() -> None:
    """A client that keeps sending after NBD_CMD_DISC: the server finishes the write in
    flight but reads nothing more (its buffers stay as they were)."""

    async def main() -> tuple[bool, int, int]:
        server, node, gate, _counts = _export_held(4 * MiB)
        stream = _go()
        stream += struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, 4096)
        stream += b"\x07" * 4096
        stream += struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, Cmd.DISC, 2, 0, 0)
        conn = SocketClient(server)
        await conn.start()
        await conn.send(stream, eof=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while conn.client._intake is None or not conn.client._intake.ended.done():
            assert loop.time() < deadline, "DISC was never taken"
            await asyncio.sleep(0)
        stage = len(conn.client._intake.decoder.get_buffer())
        # 8 MiB of junk after DISC, while the write is still held
        sender = asyncio.ensure_future(conn.send(bytes(8 * MiB)))
        for _ in range(500):
            await asyncio.sleep(0)
        reading = conn.client.writer.transport.is_reading()
        after = len(conn.client._intake.decoder.get_buffer())
        gate.set()
        await conn.finish(30)
        sender.cancel()
        assert await node.read(0, 4) == b"\x07" * 4  # the write in flight still landed
        return reading, stage, after

    reading, stage, after = asyncio.run(main())
    assert not reading
    assert after == stage  # nothing was received into the decoder after DISC
