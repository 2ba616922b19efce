"""A fault-injecting NBD proxy for tests: sits between an NBD client (the daemon's nbd driver,
qemu-io, QEMU) and an NBD server (qemu-nbd, nbdkit, a daemon's export) and breaks the traffic
on command.

The proxy listens on a unix socket and connects each client to the upstream server (unix path
or (host, port)). It follows the fixed-newstyle handshake (without TLS: it has to read the
frames) until the server acknowledges NBD_OPT_GO, then frames every request and every reply
(simple replies, whose READ payload length it learns from the request, and structured
chunks), so that a fault hits a whole frame or a chosen byte of one.

Faults are armed from the test and fire on a count, never on a timer: ``after=n`` means "the
n-th frame of that kind seen from now on" (requests for a drop, replies for the others), with
an optional command filter (``cmd=CMD_WRITE``). Each fault has an ``asyncio.Event`` (``fired``)
and the proxy counts what it did (``stats``), so a test can wait for a fault and report it.

- ``Drop``: close both sides when the request arrives (after forwarding it, so the server may
  or may not have applied it; or before); then refuse the next ``refuse`` connections, or every
  one while ``down()`` is in force (an accepted connection is closed at once).
- ``Stall``: hold the server's traffic from that reply on until ``release()`` (or ``ms``).
- ``Truncate``: send the first ``keep`` bytes of the reply (header included), then drop.
- ``Reorder``: hold the reply back and send it after the next reply (only where another request
  is outstanding, so that the reorder can happen at all; it waits for such a reply otherwise).
- ``Garbage``: corrupt the reply: ``kind="magic"`` (a bad reply magic) or ``kind="cookie"``
  (a cookie never asked for) or ``kind="duplicate"`` (the reply is sent twice); with
  ``then_silent=True`` no reply follows it on that connection.
- ``slow(bytes_per_s)``: a bandwidth cap on both directions (this one is timed by nature).

All state lives on one event loop: run the proxy in the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

NBD_OPTS_MAGIC = 0x49484156454F5054
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
OPT_GO = 7
REP_ACK = 1
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7

_REQ = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")


@dataclass(eq=False)
class Fault:
    """Fires on the ``after``-th matching frame counted from when it was armed."""

    after: int = 1
    cmd: int | None = None
    fired: asyncio.Event = field(default_factory=asyncio.Event)
    seen: int = 0
    #: the request (cmd, offset, length) the fault hit
    hit: tuple[int, int, int] | None = None

    def matches(self, cmd: int) -> bool:
        if self.fired.is_set() or (self.cmd is not None and cmd != self.cmd):
            return False
        self.seen += 1
        return self.seen >= self.after


@dataclass(eq=False)
class Drop(Fault):
    #: forward the request before dropping (the server may apply it)
    forward: bool = True
    #: connections refused after the drop
    refuse: int = 0


@dataclass(eq=False)
class Stall(Fault):
    ms: int | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()


@dataclass(eq=False)
class Truncate(Fault):
    keep: int = 16


@dataclass(eq=False)
class Reorder(Fault):
    pass


@dataclass(eq=False)
class Garbage(Fault):
    kind: str = "magic"
    #: the server says nothing more on that connection after the broken frame (its later
    #: replies are read and dropped): the client's verdict then rests on the broken frame
    #: alone, not on how many good replies happen to be queued behind it
    then_silent: bool = False


class _Link:
    """One proxied client connection."""

    def __init__(self, proxy: FaultProxy, creader: asyncio.StreamReader,
                 cwriter: asyncio.StreamWriter, sreader: asyncio.StreamReader,
                 swriter: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.creader, self.cwriter = creader, cwriter
        self.sreader, self.swriter = sreader, swriter
        self.transmission = asyncio.Event()
        #: cookie -> (cmd, offset, length) of requests without a final reply yet
        self.outstanding: dict[int, tuple[int, int, int]] = {}
        self.held: list[bytes] = []
        self.closed = False
        #: a Garbage(then_silent=True) fired here: later replies are dropped
        self.silent = False

    def drop(self) -> None:
        if self.closed:
            return
        self.closed = True
        for w in (self.cwriter, self.swriter):
            w.transport.abort()

    async def run(self) -> None:
        up = asyncio.ensure_future(self._client_to_server())
        down = asyncio.ensure_future(self._server_to_client())
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.drop()
            for t in (up, down):
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        rate = self.proxy.bytes_per_s
        if rate:
            await asyncio.sleep(len(data) / rate)

    # --- client -> server -----------------------------------------------------------------

    async def _client_to_server(self) -> None:
        r = self.creader
        pushback = b""

        async def read(n: int) -> bytes:
            nonlocal pushback
            have, pushback = pushback[:n], pushback[n:]
            return have + (await r.readexactly(n - len(have)) if n > len(have) else b"")

        await self._send(self.swriter, await r.readexactly(4))  # client flags
        while not self.transmission.is_set():
            # options until the server acknowledges GO; the client sends nothing after GO
            # until the reply, so the phase cannot change under a half-read option
            head_task = asyncio.ensure_future(r.readexactly(16))
            phase_task = asyncio.ensure_future(self.transmission.wait())
            await asyncio.wait({head_task, phase_task}, return_when=asyncio.FIRST_COMPLETED)
            phase_task.cancel()
            if not head_task.done():
                head_task.cancel()
                with contextlib.suppress(BaseException):
                    await head_task
                break
            if self.transmission.is_set():
                # the client read the ACK and sent its first request already: these 16
                # bytes are the start of that request
                pushback = head_task.result()
                break
            head = head_task.result()
            _, _, length = struct.unpack(">QII", head)
            await self._send(self.swriter, head + await r.readexactly(length))
        while True:
            head = await read(_REQ.size)
            _magic, _flags, cmd, cookie, offset, length = _REQ.unpack(head)
            payload = await read(length) if cmd == CMD_WRITE else b""
            self.proxy.stats["requests"] += 1
            if cmd != CMD_DISC:
                self.outstanding[cookie] = (cmd, offset, length)
            fault = self.proxy._take(Drop, cmd)
            if fault is not None:
                assert isinstance(fault, Drop)
                fault.hit = (cmd, offset, length)
                if fault.forward:
                    await self._send(self.swriter, head + payload)
                self.proxy.refusing += fault.refuse
                self.proxy.stats["drops"] += 1
                fault.fired.set()
                self.drop()
                return
            await self._send(self.swriter, head + payload)

    # --- server -> client -----------------------------------------------------------------

    async def _server_to_client(self) -> None:
        r = self.sreader
        await self._send(self.cwriter, await r.readexactly(18))  # greeting
        while not self.transmission.is_set():
            head = await r.readexactly(20)
            _, opt, rep, length = struct.unpack(">QIII", head)
            body = await r.readexactly(length)
            if opt == OPT_GO and rep == REP_ACK:
                self.transmission.set()
            await self._send(self.cwriter, head + body)
        while True:
            magic_b = await r.readexactly(4)
            (magic,) = struct.unpack(">I", magic_b)
            if magic == NBD_SIMPLE_REPLY_MAGIC:
                rest = await r.readexactly(_SIMPLE.size - 4)
                _, err, cookie = _SIMPLE.unpack(magic_b + rest)
                req = self.outstanding.pop(cookie, (-1, 0, 0))
                n = req[2] if req[0] == CMD_READ and not err else 0
                frame = magic_b + rest + await r.readexactly(n)
            elif magic == NBD_STRUCTURED_REPLY_MAGIC:
                rest = await r.readexactly(_CHUNK.size - 4)
                _, flags, _type, cookie, length = _CHUNK.unpack(magic_b + rest)
                req = self.outstanding.get(cookie, (-1, 0, 0))
                if flags & 1:  # NBD_REPLY_FLAG_DONE
                    self.outstanding.pop(cookie, None)
                frame = magic_b + rest + await r.readexactly(length)
            else:  # the server itself is broken: pass it on, the client will say so
                frame = magic_b + await r.read(65536)
                req = (-1, 0, 0)
            self.proxy.stats["replies"] += 1
            if not await self._deliver(frame, req):
                return

    async def _deliver(self, frame: bytes, req: tuple[int, int, int]) -> bool:
        """Send one reply frame through the armed faults; False once the link is dropped."""
        proxy = self.proxy
        if self.silent:
            return True
        stall = proxy._take(Stall, req[0])
        if isinstance(stall, Stall):
            stall.hit = req
            stall.fired.set()
            proxy.stats["stalls"] += 1
            if stall.ms is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stall.released.wait(), stall.ms / 1000)
            else:
                await stall.released.wait()
        cut = proxy._take(Truncate, req[0])
        if isinstance(cut, Truncate):
            cut.hit = req
            await self._send(self.cwriter, frame[: cut.keep])
            proxy.stats["truncations"] += 1
            cut.fired.set()
            self.drop()
            return False
        bad = proxy._take(Garbage, req[0])
        if isinstance(bad, Garbage):
            bad.hit = req
            if bad.kind == "magic":
                frame = b"\xde\xad\xbe\xef" + frame[4:]
            elif bad.kind == "cookie":
                (cookie,) = struct.unpack_from(">Q", frame, 8)
                frame = frame[:8] + struct.pack(">Q", cookie ^ 0x5A5A000000000000) + frame[16:]
            else:  # duplicate
                frame = frame + frame
            proxy.stats["garbage"] += 1
            self.silent = bad.then_silent
            bad.fired.set()
        # a reply held back goes out after this one (the reorder)
        held, self.held = self.held, []
        if not held and self.outstanding:
            reorder = proxy._take(Reorder, req[0])
            if isinstance(reorder, Reorder):
                reorder.hit = req
                self.held.append(frame)
                proxy.stats["reorders"] += 1
                reorder.fired.set()
                return True
        await self._send(self.cwriter, frame)
        for f in held:
            await self._send(self.cwriter, f)
        return True


class FaultProxy:
    """See the module docstring. Use ``async with FaultProxy(...).running() as proxy``."""

    def __init__(self, listen: str, upstream: str | tuple[str, int]) -> None:
        self.listen = listen
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.links: list[_Link] = []
        #: connections still to refuse; ``down()`` refuses every one until ``up()``
        self.refusing = 0
        self.is_down = False
        #: a bandwidth cap on each direction of each link (0: none)
        self.bytes_per_s = 0
        self.stats: dict[str, int] = dict.fromkeys(
            ("connections", "refused", "requests", "replies", "drops", "stalls",
             "truncations", "reorders", "garbage"), 0)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: notified whenever a connection is proxied or refused
        self.changed = asyncio.Condition()

    # --- control --------------------------------------------------------------------------

    def arm(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def _take(self, kind: type[Fault], cmd: int) -> Fault | None:
        for f in self.faults:
            if type(f) is kind and f.matches(cmd):
                self.faults.remove(f)
                return f
        return None

    def down(self) -> None:
        """Refuse every new connection and drop the current ones (a dead server)."""
        self.is_down = True
        for link in self.links:
            link.drop()

    def up(self) -> None:
        self.is_down = False
        self.refusing = 0

    def drop_all(self) -> None:
        for link in self.links:
            link.drop()

    def slow(self, bytes_per_s: int) -> None:
        self.bytes_per_s = bytes_per_s

    async def wait_stat(self, name: str, n: int, limit_s: float = 60.0) -> None:
        """Until ``stats[name]`` (``connections`` or ``refused``) reaches ``n``."""
        async with self.changed:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: self.stats[name] >= n), limit_s)

    async def _count(self, name: str) -> None:
        async with self.changed:
            self.stats[name] += 1
            self.changed.notify_all()

    # --- life cycle -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FaultProxy]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen)
        self._server = await asyncio.start_unix_server(self._accept, self.listen)
        try:
            yield self
        finally:
            self._server.close()
            for link in list(self.links):
                link.drop()
            # the handlers end on their own once their sockets are gone (cancelling a
            # stream handler task makes asyncio log a spurious error)
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _accept(self, creader: asyncio.StreamReader,
                      cwriter: asyncio.StreamWriter) -> None:
        if self.is_down or self.refusing > 0:
            self.refusing = max(0, self.refusing - 1)
            cwriter.transport.abort()
            await self._count("refused")
            return
        try:
            if isinstance(self.upstream, str):
                sreader, swriter = await asyncio.open_unix_connection(self.upstream)
            else:
                sreader, swriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            cwriter.transport.abort()
            await self._count("refused")
            return
        link = _Link(self, creader, cwriter, sreader, swriter)
        self.links.append(link)
        await self._count("connections")
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await link.run()
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            self.links.remove(link)


__all__ = ["CMD_BLOCK_STATUS", "CMD_FLUSH", "CMD_READ", "CMD_WRITE", "CMD_WRITE_ZEROES",
           "Drop", "Fault", "FaultProxy", "Garbage", "Reorder", "Stall", "Truncate"]
