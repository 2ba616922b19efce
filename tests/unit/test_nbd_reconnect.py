"""The nbd driver's reconnect-delay and open-timeout against a fault proxy, in one process.

The client node (our NbdDriver) talks to an in-process export (a RAM node) through
``tests/netproxy.py``; faults fire on request/reply counts, and every wait of the driver is on
a virtual clock that the test moves only once the driver is seen waiting on it (a pending
timer), so no outcome depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block.drivers.nbd import NbdDriver
from blockmirror.block.node import BlockNode
from blockmirror.clock import VirtualClock
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockIOError, BlockMirrorError
from nbd_helpers import GRANULE, RamDriver, serve
from netproxy import (
    CMD_READ,
    CMD_WRITE,
    Drop,
    FaultProxy,
    Garbage,
    Reorder,
    Stall,
    Truncate,
)

S = 1_000_000_000
LIMIT_S = 30.0


async def until(cond: Callable[[], bool], what: str) -> None:
    """Wait (real time, generous) for something the loop will make true: driver states and
    clock timers have no event to wait on, so poll them."""
    async def poll() -> None:
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), LIMIT_S)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def fill(ram: RamDriver, offset: int, data: bytes) -> None:
    """Content on the server, allocated (the export answers unallocated ranges as holes)."""
    ram.data[offset:offset + len(data)] = data
    for g in range(offset // GRANULE, (offset + len(data) - 1) // GRANULE + 1):
        ram.allocated.add(g)


def node_of(d: Daemon, sock: str, name: str = "c0", **extra: Any) -> BlockNode:
    node = BlockNode(name=name, options={"server": {"type": "unix", "path": sock},
                                         "export": "disk", **extra})
    node.driver = NbdDriver(node)
    d.graph.add_node(node)
    return node


def drv(node: BlockNode) -> NbdDriver:
    assert isinstance(node.driver, NbdDriver)
    return node.driver


@asynccontextmanager
async def setup(tmp: Path, **extra: Any) -> AsyncIterator[tuple[FaultProxy, BlockNode,
                                                                  VirtualClock, RamDriver]]:
    """Export <- proxy <- client node on a virtual-clock daemon."""
    async with serve(tmp) as (server, sock):
        ram = server.graph.nodes["n0"].driver
        assert isinstance(ram, RamDriver)
        clock = VirtualClock()
        client = Daemon(clock=clock)
        proxy = FaultProxy(str(tmp / "proxy.sock"), sock)
        async with proxy.running():
            node = node_of(client, proxy.listen, **extra)
            await node.driver.open()
            try:
                yield proxy, node, clock, ram
            finally:
                clock.release()
                await node.driver.close()


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 120))


def test_drop_within_reconnect_delay_resends_the_write_in_flight(tmp_path: Path) -> None:
    async def main() -> None:
        async with setup(tmp_path, **{"reconnect-delay": 5}) as (proxy, node, _clock, ram):
            await node.write(0, b"a" * 4096)
            # the next write reaches the server, then the connection drops before its reply
            drop = proxy.arm(Drop(cmd=CMD_WRITE, forward=True))
            await node.write(4096, b"b" * 4096)
            assert drop.fired.is_set()
            assert drv(node).connects == 2 and drv(node).state == "connected"
            # and with the request never reaching the server: sent again, applied once
            drop = proxy.arm(Drop(cmd=CMD_WRITE, forward=False))
            await node.write(8192, b"c" * 4096)
            assert drop.fired.is_set() and drv(node).connects == 3
            assert bytes(ram.data[:12288]) == b"a" * 4096 + b"b" * 4096 + b"c" * 4096
            assert proxy.stats["drops"] == 2

    run(main())


def test_many_requests_in_flight_at_a_drop_all_complete(tmp_path: Path) -> None:
    async def main() -> None:
        async with setup(tmp_path, **{"reconnect-delay": 5}) as (proxy, node, _clock, ram):
            proxy.arm(Drop(after=5, cmd=CMD_WRITE))
            await asyncio.gather(*(node.write(i * 4096, bytes([i + 1]) * 4096)
                                   for i in range(16)))
            assert proxy.stats["drops"] == 1
            for i in range(16):
                assert bytes(ram.data[i * 4096:(i + 1) * 4096]) == bytes([i + 1]) * 4096

    run(main())


def test_a_request_that_learns_of_the_loss_after_the_reconnect_is_sent_again(
        tmp_path: Path) -> None:
    """A request still on the old connection (waiting for a slot behind the in-flight limit,
    say) can hear of the loss only once the reconnect is done: it is sent on the new
    connection, not failed. (CI saw a mirror through a storm of faults end in seven write
    errors with reconnect-delay=10; a READY batch of scattered chunks issues more requests
    than the limit.) The loss and its late news are staged directly, so the order is
    certain."""
    from blockmirror.block.drivers import nbd

    async def main() -> None:
        async with setup(tmp_path, **{"reconnect-delay": 5}) as (_proxy, node, _clock, ram):
            d = drv(node)
            old = d._conn
            assert old is not None

            async def late(*_args: Any, **_kw: Any) -> Any:
                old._end("staged loss", False)  # what the reader does on EOF
                d._kick_reconnect()  # what the next request would do
                await until(lambda: d.state == "connected" and d._conn is not old,
                            "the reconnect")
                raise nbd._Disconnected("Connection closed")

            old.request = late  # type: ignore[method-assign]
            await node.write(0, b"q" * 4096)
            assert bytes(ram.data[:4096]) == b"q" * 4096
            assert d.connects == 2

    run(main())


def test_without_delay_a_drop_fails_at_once_and_reconnects_in_the_background(
        tmp_path: Path) -> None:
    async def main() -> None:
        async with setup(tmp_path) as (proxy, node, clock, ram):
            d = drv(node)
            proxy.arm(Drop(cmd=CMD_WRITE))
            with pytest.raises(BlockIOError) as e:
                await node.write(0, b"x" * 512)
            assert e.value.errno == errno.EIO
            assert d.state == "connecting-nowait"
            # as in QEMU, the next request starts the attempts and fails without waiting;
            # the first attempt runs at once and succeeds (the proxy is up)
            with pytest.raises(BlockIOError):
                await node.write(0, b"x" * 512)
            await until(lambda: d.state == "connected", "the background reconnect")
            await node.write(0, b"y" * 512)
            assert bytes(ram.data[:512]) == b"y" * 512
            # while the server is away, attempts go on with QEMU's pauses (1, 2, 4 s ...)
            proxy.down()
            for _ in range(2):  # the one in flight at the loss, and the one that starts
                with pytest.raises(BlockIOError):
                    await node.read(0, 512)
            await until(lambda: len(clock.pending()) == 1, "the first pause")
            assert clock.pending()[0] - clock.now_ns() == 1 * S
            refused = proxy.stats["refused"]
            await clock.advance(1 * S)
            await until(lambda: proxy.stats["refused"] > refused and len(clock.pending()) == 1,
                        "the second attempt and pause")
            assert clock.pending()[0] - clock.now_ns() == 2 * S
            proxy.up()
            with pytest.raises(BlockIOError):  # not before the next attempt
                await node.read(0, 512)
            await clock.advance(2 * S)
            await until(lambda: d.state == "connected", "the third attempt")
            assert await node.read(0, 512) == b"y" * 512

    run(main())


def test_requests_fail_once_the_delay_has_run_out(tmp_path: Path) -> None:
    async def main() -> None:
        async with setup(tmp_path, **{"reconnect-delay": 3}) as (proxy, node, clock, ram):
            d = drv(node)
            proxy.down()
            reader = asyncio.ensure_future(node.read(0, 4096))
            # the read waits for the delay (3 s) while attempts pause 1 s, then 2 s
            await until(lambda: len(clock.pending()) == 2, "the delay timer and a pause")
            assert clock.pending() == [clock.now_ns() + 1 * S, clock.now_ns() + 3 * S]
            assert not reader.done() and d.state == "connecting-wait"
            await clock.advance(1 * S)
            await until(lambda: len(clock.pending()) == 2, "the next pause")
            assert clock.pending() == [clock.now_ns() + 2 * S] * 2
            assert not reader.done()
            await clock.advance(2 * S)  # 3 s: the delay is over
            with pytest.raises(BlockIOError):
                await reader
            assert d.state == "connecting-nowait"
            with pytest.raises(BlockIOError):  # later requests fail at once
                await node.read(0, 4096)
            # the server comes back: the next background attempt (after 4 s) reconnects
            proxy.up()
            await until(lambda: len(clock.pending()) == 1, "the 4 s pause")
            assert clock.pending() == [clock.now_ns() + 4 * S]
            await clock.advance(4 * S)
            await until(lambda: d.state == "connected", "the reconnect after the delay")
            fill(ram, 0, b"back")
            assert await node.read(0, 4) == b"back"

    run(main())


def test_a_reply_truncated_mid_payload_is_asked_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with setup(tmp_path, **{"reconnect-delay": 5}) as (proxy, node, _clock, ram):
            fill(ram, 0, os.urandom(65536))
            cut = proxy.arm(Truncate(cmd=CMD_READ, keep=20 + 8 + 1000))
            assert await node.read(0, 65536) == bytes(ram.data[:65536])
            assert cut.fired.is_set() and drv(node).connects == 2

    run(main())


def test_a_truncated_reply_without_delay_is_an_io_error(tmp_path: Path) -> None:
    async def main() -> None:
        async with setup(tmp_path) as (proxy, node, _clock, _ram):
            proxy.arm(Truncate(cmd=CMD_READ, keep=10))  # mid-header
            with pytest.raises(BlockIOError) as e:
                await node.read(0, 4096)
            assert e.value.errno == errno.EIO

    run(main())


def test_reordered_replies_reach_their_own_requests(tmp_path: Path) -> None:
    async def main() -> None:
        async with setup(tmp_path) as (proxy, node, _clock, ram):
            fill(ram, 0, os.urandom(len(ram.data)))
            faults = [proxy.arm(Reorder(cmd=CMD_READ)) for _ in range(4)]
            faults += [proxy.arm(Reorder(cmd=CMD_WRITE)) for _ in range(4)]
            reads = [node.read(i * 4096, 4096) for i in range(16)]
            writes = [node.write((512 + i) * 4096, bytes([i]) * 4096) for i in range(16)]
            got = await asyncio.gather(*reads, *writes)
            for i in range(16):
                assert got[i] == bytes(ram.data[i * 4096:(i + 1) * 4096])
                assert bytes(ram.data[(512 + i) * 4096:(513 + i) * 4096]) == bytes([i]) * 4096
            assert proxy.stats["reorders"] >= 2, proxy.stats
            assert drv(node).connects == 1  # a legitimate peer: nothing was dropped
            assert sum(f.fired.is_set() for f in faults) == proxy.stats["reorders"]

    run(main())


@pytest.mark.parametrize("kind", ["magic", "cookie", "duplicate"])
def test_a_broken_server_is_given_up(tmp_path: Path, kind: str) -> None:
    async def main() -> None:
        async with setup(tmp_path, **{"reconnect-delay": 5}) as (proxy, node, clock, ram):
            d = drv(node)
            await node.write(0, b"ok" * 256)
            proxy.arm(Garbage(cmd=CMD_WRITE, kind=kind))
            w = node.write(4096, b"z" * 512)
            if kind == "duplicate":  # the write itself is answered; the copy is the error
                await w
                await until(lambda: d.state == "quit", "the protocol error")
            else:
                with pytest.raises(BlockIOError):
                    await w
            assert d.state == "quit"
            # QUIT: no reconnect, not even within reconnect-delay; the server is fine
            with pytest.raises(BlockIOError):
                await node.read(0, 512)
            assert d.connects == 1 and not clock.pending()
            assert bytes(ram.data[:512]) == b"ok" * 256

    run(main())


def test_a_stalled_reply_holds_only_until_released(tmp_path: Path) -> None:
    async def main() -> None:
        async with setup(tmp_path, **{"reconnect-delay": 5}) as (proxy, node, _clock, ram):
            stall = proxy.arm(Stall(cmd=CMD_WRITE))
            w = asyncio.ensure_future(node.write(0, b"s" * 4096))
            await asyncio.wait_for(stall.fired.wait(), LIMIT_S)
            assert not w.done()
            stall.release()
            await w
            assert bytes(ram.data[:4096]) == b"s" * 4096 and drv(node).connects == 1

    run(main())


def test_open_timeout_waits_for_a_server_that_starts_late(tmp_path: Path) -> None:
    async def main() -> None:
        clock = VirtualClock()
        client = Daemon(clock=clock)
        sock = str(tmp_path / "late.sock")
        node = node_of(client, sock, **{"open-timeout": 5})
        opening = asyncio.ensure_future(node.driver.open())
        await until(lambda: len(clock.pending()) == 2, "the open timer and the first pause")
        await clock.advance(1 * S)  # the second attempt fails too; then a 2 s pause
        await until(lambda: len(clock.pending()) == 2, "the second pause")
        async with serve(tmp_path) as (_server, real):
            os.rename(real, sock)
            await clock.advance(2 * S)  # the third attempt, at 3 s, finds the server
            await asyncio.wait_for(opening, LIMIT_S)
            assert drv(node).state == "connected"
            assert await node.read(0, 4) == bytes(4)
            await node.driver.close()
            os.rename(sock, real)

    run(main())


def test_open_timeout_fails_with_the_last_error(tmp_path: Path) -> None:
    async def main() -> None:
        clock = VirtualClock()
        client = Daemon(clock=clock)
        sock = str(tmp_path / "never.sock")
        node = node_of(client, sock, **{"open-timeout": 2})
        opening = asyncio.ensure_future(node.driver.open())
        await until(lambda: len(clock.pending()) == 2, "the open timer and the first pause")
        await clock.advance(1 * S)
        await until(lambda: len(clock.pending()) == 2, "the second pause")
        await clock.advance(1 * S)
        with pytest.raises(BlockMirrorError, match=r"^Failed to connect to '.*never.sock': "
                                                   r"No such file or directory$"):
            await asyncio.wait_for(opening, LIMIT_S)

    run(main())


def test_open_timeout_cancels_a_handshake_that_never_ends(tmp_path: Path) -> None:
    async def main() -> None:
        clock = VirtualClock()
        client = Daemon(clock=clock)
        sock = str(tmp_path / "mute.sock")
        accepted: list[asyncio.StreamWriter] = []

        async def mute(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.append(w)

        server = await asyncio.start_unix_server(mute, sock)
        node = node_of(client, sock, **{"open-timeout": 1})
        opening = asyncio.ensure_future(node.driver.open())
        await until(lambda: bool(accepted) and len(clock.pending()) == 1, "the mute accept")
        await clock.advance(1 * S)
        with pytest.raises(BlockMirrorError, match=r"^Connection attempt cancelled by timeout$"):
            await asyncio.wait_for(opening, LIMIT_S)
        for w in accepted:
            w.close()
        server.close()

    run(main())


def test_cancel_in_flight_and_close_end_the_wait_for_a_reconnect(tmp_path: Path) -> None:
    async def main() -> None:
        async with setup(tmp_path, **{"reconnect-delay": 300}) as (proxy, node, clock, _ram):
            d = drv(node)
            proxy.down()
            waiting = asyncio.ensure_future(node.read(0, 512))
            await until(lambda: d.state == "connecting-wait" and len(clock.pending()) == 2,
                        "the wait for a reconnect (the delay timer and the first pause)")
            d.cancel_in_flight()  # what QEMU's mirror does on a forced cancel
            with pytest.raises(BlockIOError):
                await asyncio.wait_for(waiting, LIMIT_S)
            assert d.state == "connecting-nowait"
            # a reconnect, a new loss, a new wait: close ends it too
            proxy.up()
            await until(lambda: len(clock.pending()) == 1, "the delay timer gone")
            assert clock.pending() == [clock.now_ns() + 1 * S]
            await clock.advance(1 * S)
            await until(lambda: d.state == "connected", "the reconnect")
            proxy.down()
            waiting = asyncio.ensure_future(node.read(0, 512))
            await until(lambda: d.state == "connecting-wait", "the second wait")
            await d.close()
            with pytest.raises(BlockIOError):
                await asyncio.wait_for(waiting, LIMIT_S)
            assert d.state == "quit"

    run(main())
