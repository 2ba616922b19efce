"""The asyncio QMP server: listeners (unix, TCP, inherited fds) and one task per client.

Each connection gets its own ``QMPSession`` (qmp/session.py does all protocol work); this
module only moves bytes. Rules: one in-band command at a time per client, replies in order;
reading is suspended while a command runs, so a flooding client only fills its own socket
buffer; a client whose unread output exceeds ``MAX_OUTPUT_BUFFER`` is disconnected; a
misbehaving or vanished client never affects another. Events reach negotiated clients only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any

from blockmirror.errors import BlockMirrorError
from blockmirror.qapi import checks as schema_checks
from blockmirror.qmp.registry import (
    Args,
    CommandContext,
    CommandDef,
    DaemonAPI,
    find_command,
    load_commands,
)
from blockmirror.qmp.session import Execute, QMPSession, Reply
from blockmirror.unixsock import bind_unix

log = logging.getLogger(__name__)

READ_CHUNK = 16 * 1024
MAX_OUTPUT_BUFFER = 16 << 20


async def run_command(daemon: DaemonAPI, session: QMPSession, req: Execute) -> bytes:
    """Run one validated command and return its encoded reply."""
    ctx = CommandContext(daemon, session)
    try:
        ret = await req.command.handler(ctx, Args(req.arguments, req.command.defaults))
        if schema_checks.enabled():
            schema_checks.check_return(req.name, ret)
    except BlockMirrorError as e:
        return session.reply_error(req, e.qmp_class, e.desc)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a bug of ours: keep the daemon and the client alive
        log.exception("QMP command %s failed", req.name)
        return session.reply_error(req, "GenericError", f"internal error: {e}")
    return session.reply_return(req, ret)


class LazyCommands(Mapping[str, CommandDef]):
    """The command registry: a lookup imports the module of that command only
    (``find_command()``); listing them all loads every module (``load_commands()``)."""

    def __init__(self) -> None:
        self._loaded: dict[str, CommandDef] | None = None

    def _get(self) -> dict[str, CommandDef]:
        if self._loaded is None:
            self._loaded = load_commands()
        return self._loaded

    def __getitem__(self, key: str) -> CommandDef:
        if self._loaded is not None:
            return self._loaded[key]
        cmd = find_command(key)
        if cmd is None:
            raise KeyError(key)
        return cmd

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class QMPServer:
    """Serves QMP for one daemon on any number of listeners (monitors)."""

    def __init__(self, daemon: DaemonAPI, *, pretty: bool = False, oob: bool = True) -> None:
        self.daemon = daemon
        self.pretty = pretty
        self.oob = oob
        # Command modules (and the block layer behind them) are imported on the first
        # request, not at start-up: the greeting must not wait for them.
        self.commands = LazyCommands()
        self._servers: list[asyncio.Server] = []
        self._clients: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._attached: set[asyncio.Task[None]] = set()
        self._unix_paths: list[str] = []

    def _handler(self, pretty: bool | None, greeted: bool = False) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._client(reader, writer, self.pretty if pretty is None else pretty,
                               greeted)

        return handle

    async def listen_unix(self, path: str, *, pretty: bool | None = None) -> asyncio.Server:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = bind_unix(path)  # mode 0600 before listen(): see unixsock.py
        try:
            srv = await asyncio.start_unix_server(self._handler(pretty), sock=sock,
                                                  limit=READ_CHUNK)
        except BaseException:
            sock.close()
            raise
        self._unix_paths.append(path)
        self._servers.append(srv)
        return srv

    async def listen_tcp(self, host: str, port: int, *, pretty: bool | None = None
                         ) -> asyncio.Server:
        srv = await asyncio.start_server(self._handler(pretty), host=host, port=port,
                                         limit=READ_CHUNK, reuse_address=True)
        self._servers.append(srv)
        return srv

    async def listen_socket(self, sock: socket.socket, *, pretty: bool | None = None
                            ) -> asyncio.Server:
        """Serve on an already bound and listening socket (e.g. an inherited fd)."""
        handler = self._handler(pretty)
        if sock.family == socket.AF_UNIX:
            srv = await asyncio.start_unix_server(handler, sock=sock, limit=READ_CHUNK)
        else:
            srv = await asyncio.start_server(handler, sock=sock, limit=READ_CHUNK)
        self._servers.append(srv)
        return srv

    def attach_connected(self, sock: socket.socket, *, pretty: bool | None = None,
                         greeted: bool = False) -> None:
        """Serve an already connected socket in a task this server owns (and ends on close).
        ``greeted``: the greeting was sent already (cli/early.py)."""
        task = asyncio.get_running_loop().create_task(
            self.serve_connected(sock, pretty=pretty, greeted=greeted), name="qmp-connected")
        self._attached.add(task)
        task.add_done_callback(self._attached.discard)

    def attach_streams(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                       pretty: bool | None = None) -> None:
        """Serve a session on a stream pair that is not a socket (the stdio monitor)."""
        task = asyncio.get_running_loop().create_task(
            self._handler(pretty)(reader, writer), name="qmp-streams")
        self._attached.add(task)
        task.add_done_callback(self._attached.discard)

    async def serve_connected(self, sock: socket.socket, *, pretty: bool | None = None,
                              greeted: bool = False) -> None:
        """Serve one already connected socket (``-chardev socket,fd=N`` without server=on)."""
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_CHUNK) \
            if sock.family != socket.AF_UNIX else \
            await asyncio.open_unix_connection(sock=sock, limit=READ_CHUNK)
        handler = self._handler(pretty, greeted)
        await handler(reader, writer)

    @property
    def sockets(self) -> list[Any]:
        return [s for srv in self._servers for s in srv.sockets]

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        # Aborting the transports ends each client loop with EOF; cancel what is still busy.
        for writer in list(self._writers):
            writer.transport.abort()
        pending = self._clients | self._attached
        if pending:
            _, busy = await asyncio.wait(pending, timeout=1.0)
            for task in busy:
                task.cancel()
            for task in busy:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      pretty: bool, greeted: bool = False) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        self._writers.add(writer)
        session = QMPSession(self.commands, oob_offered=self.oob, pretty=pretty)

        def on_event(ev: dict[str, Any]) -> None:
            data = session.event(ev)
            if data is None or writer.is_closing():
                return
            if writer.transport.get_write_buffer_size() > MAX_OUTPUT_BUFFER:
                log.warning("QMP client not reading its events; disconnecting it")
                writer.transport.abort()
                return
            writer.write(data)

        unsubscribe = self.daemon.events.subscribe(on_event)
        try:
            if not greeted:
                writer.write(session.greeting())
                await writer.drain()
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                session.receive_data(data)
                while (req := session.next_request()) is not None:
                    if isinstance(req, Reply):
                        out = req.data
                    else:
                        out = await run_command(self.daemon, session, req)
                    try:
                        if not writer.is_closing():
                            writer.write(out)
                            await writer.drain()
                    finally:
                        # quit already shut the daemon down; exit even if the client is gone
                        if isinstance(req, Execute) and req.name == "quit":
                            self.daemon.quit_requested.set()
                    if writer.is_closing():
                        break
        except (ConnectionError, BrokenPipeError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("QMP client failed")
        finally:
            unsubscribe()
            self._clients.discard(task)
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.transport.abort()


__all__ = ["QMPServer", "run_command"]
