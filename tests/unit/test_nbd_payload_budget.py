"""Issue 15: one NBD client's WRITE payloads in flight are bounded (MAX_IN_FLIGHT_BYTES).

Four 16 MiB WRITEs arrive at once while the node holds every write: with a 32 MiB budget the
server takes two and stops reading until one finishes (QEMU would hold all four: 64 MiB).
"""

from __future__ import annotations

import asyncio
import struct

from blockmirror.block.driver import WriteFlags
from blockmirror.daemon import Daemon
from blockmirror.export import nbd_server as ns
from blockmirror.nbd.constants import NBD_OPTS_MAGIC, NBD_REQUEST_MAGIC, Cmd, Opt
from nbd_helpers import RamDriver, SocketClient, ram_node

MiB = 1 << 20


def test_write_payloads_in_flight_stay_within_the_budget() -> None:
    async def main() -> tuple[int, int]:
        d = Daemon()
        node = ram_node(d.graph, "n0", 64 * MiB)
        drv = node.driver
        assert isinstance(drv, RamDriver)
        gate = asyncio.Event()
        holding = 0
        peak = 0
        inner = drv.pwritev

        async def held(offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
            nonlocal holding, peak
            holding += 1
            peak = max(peak, holding)
            await gate.wait()
            holding -= 1
            await inner(offset, data, flags)

        drv.pwritev = held  # type: ignore[method-assign]
        server = ns.NbdServer(d.graph, d.events)
        server.add_export("e0", node, name="disk", description="", writable=True)
        name = b"disk"
        stream = struct.pack(">I", 3) + struct.pack(
            ">QII", NBD_OPTS_MAGIC, Opt.GO, 4 + len(name) + 2) + struct.pack(
            ">I", len(name)) + name + struct.pack(">H", 0)
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
        held_while_blocked = holding
        assert not conn.client.writer.transport.is_reading()
        gate.set()
        await sender
        await conn.finish(30)
        assert await node.read(48 * MiB, 4) == b"\x04" * 4  # all four written in the end
        return held_while_blocked, peak

    held, peak = asyncio.run(main())
    assert held == 2, held  # 2 x 16 MiB = the 32 MiB budget; the others wait unread
    assert peak <= 2


def test_after_disc_the_server_stops_reading_while_requests_finish() -> None:
    """A client that keeps sending after NBD_CMD_DISC: the server finishes the write in
    flight but reads nothing more (its buffers stay as they were)."""

    async def main() -> tuple[bool, int, int]:
        d = Daemon()
        node = ram_node(d.graph, "n0", 4 * MiB)
        drv = node.driver
        assert isinstance(drv, RamDriver)
        gate = asyncio.Event()
        inner = drv.pwritev

        async def held(offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
            await gate.wait()
            await inner(offset, data, flags)

        drv.pwritev = held  # type: ignore[method-assign]
        server = ns.NbdServer(d.graph, d.events)
        server.add_export("e0", node, name="disk", description="", writable=True)
        name = b"disk"
        stream = struct.pack(">I", 3) + struct.pack(
            ">QII", NBD_OPTS_MAGIC, Opt.GO, 4 + len(name) + 2) + struct.pack(
            ">I", len(name)) + name + struct.pack(">H", 0)
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
