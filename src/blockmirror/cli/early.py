"""The early greeter: QMP greetings go out while the daemon is still importing.

A client of ``blockmirror daemon`` waits for the QMP greeting before anything else, and Python
needs far longer to import asyncio and the QMP and block layers than qemu-storage-daemon needs
to start. So ``cli/main.py`` calls ``start()`` first thing: for the ``--chardev`` (unix socket,
``server=on,wait=off``) and ``--monitor`` options of the command line, it binds and listens
right away and runs a small thread that accepts clients and sends each one the greeting. When
``cli/daemon.py`` reaches those options it takes the listening socket (``take_listener``) and,
once start-up is over, the greeted connections (``take_greeted``), and serves them on the event
loop without greeting them again; commands a client sent meanwhile wait in its socket.

In qemu-storage-daemon the greeting comes from the main loop, after every option took effect:
a client that has it may rely on the NBD server, the exports and the nodes of the command line
(and their image locks) being there. So the early path is taken only when the command line
holds nothing else a client could see without a QMP command: monitors, ``--pidfile`` (written
after start-up anyway), ``--object``, ``--trace``, ``--clock``, and ``ringbuf``, ``memory``
and ``null`` chardevs. Any ``--blockdev``,
``--nbd-server``, ``--export`` or ``--daemonize``, and anything unusual (``pretty``, other
chardev backends or keys), leaves the greeting to the event loop after start-up, as in QSD.
This module imports nothing heavy: that is its whole point.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import select
import socket

from blockmirror import QEMU_COMPAT_PACKAGE, QEMU_COMPAT_VERSION
from blockmirror.unixsock import listen_unix


def greeting_bytes() -> bytes:
    """The greeting of a non-pretty monitor offering oob (what QMPSession.greeting() sends;
    tests/unit/test_cli_early.py checks they agree)."""
    major, minor, micro = QEMU_COMPAT_VERSION
    return (f'{{"QMP": {{"version": {{"qemu": {{"micro": {micro}, "minor": {minor}, '
            f'"major": {major}}}, "package": "{QEMU_COMPAT_PACKAGE}"}}, '
            f'"capabilities": ["oob"]}}}}\r\n').encode("ascii")


class _Listener:
    def __init__(self, text: str, cid: str, path: str, sock: socket.socket) -> None:
        self.text, self.cid, self.path = text, cid, path
        self.sock: socket.socket | None = sock
        self.greet = False
        self.taken = False
        self.greeted: list[socket.socket] = []


class _Greeter:
    def __init__(self, listeners: list[_Listener]) -> None:
        self.listeners = listeners
        self._wake_r, self._wake_w = os.pipe()
        # _thread, not threading: one import less on the way to the greeting; the lock is
        # held while the thread runs, so acquiring it joins the thread
        self._done = _thread.allocate_lock()
        self._started = False
        self._greeting = greeting_bytes()
        self.stopped = False

    def start(self) -> None:
        self._done.acquire()
        self._started = True
        _thread.start_new_thread(self._main, ())

    def _main(self) -> None:
        try:
            self._run()
        finally:
            self._done.release()

    def _run(self) -> None:
        poller = select.poll()
        by_fd = {}
        for lst in self.listeners:
            if lst.greet and lst.sock is not None:
                poller.register(lst.sock.fileno(), select.POLLIN)
                by_fd[lst.sock.fileno()] = lst
        poller.register(self._wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    return
                lst = by_fd[fd]
                if lst.sock is None:
                    continue
                try:
                    conn, _ = lst.sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    poller.unregister(fd)
                    continue
                try:
                    conn.setblocking(True)
                    conn.sendall(self._greeting)
                except OSError:
                    conn.close()  # gone already: nothing to hand over
                    continue
                lst.greeted.append(conn)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        os.write(self._wake_w, b"x")
        if self._started:
            with self._done:  # waits until the thread has left _run()
                pass
        os.close(self._wake_r)
        os.close(self._wake_w)


_greeter: _Greeter | None = None


def _opts(text: str) -> dict[str, str] | None:
    """QemuOpts "a,b=c" with no escapes; None for anything this module does not handle."""
    if ",," in text or text.startswith("{"):
        return None
    out: dict[str, str] = {}
    for n, item in enumerate(text.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            if n == 0:
                out[""] = key
                continue
            if key in ("server", "nowait"):
                out["server" if key == "server" else "wait"] = "on" if key == "server" \
                    else "off"
                continue
            return None
        out[key] = val
    return out


#: options with an argument whose effect no client sees before it can send commands
_INVISIBLE = ("pidfile", "object", "trace", "clock")
#: chardev backends that leave no trace outside the daemon (no file, port or pty)
_INVISIBLE_CHARDEVS = ("ringbuf", "memory", "null")


def _monitor_options(argv: list[str]) -> list[tuple[str, str]] | None:
    """The --chardev/--monitor options, in order; None when the early path must stay off
    (an option a client could observe without QMP, or anything this parser does not know)."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, val = arg[2:].partition("=")
        elif arg == "-T":
            name, eq, val = "trace", "", ""
        elif arg.startswith("-T"):
            name, eq, val = "trace", "=", arg[2:]
        else:
            return None
        if name not in ("chardev", "monitor", *_INVISIBLE):
            return None
        if not eq:
            if i + 1 >= len(argv):
                return None
            val = argv[i + 1]
            i += 1
        if name in ("chardev", "monitor"):
            out.append((name, val))
        i += 1
    return out


def _visible_chardev(opts: list[tuple[str, str]]) -> bool:
    """A chardev other than a socket that is seen without QMP (a file, a pty, a port)."""
    for name, text in opts:
        if name != "chardev":
            continue
        o = _opts(text)  # None: syntax this module does not parse; assume the worst
        if o is None or o.get("") not in ("socket", *_INVISIBLE_CHARDEVS):
            return True
    return False


def start(argv: list[str]) -> None:
    """Bind the monitor sockets of ``blockmirror daemon ARGV`` and greet clients (when the
    command line allows it; see the module docstring)."""
    global _greeter
    opts = _monitor_options(argv)
    if not opts or _visible_chardev(opts):
        return  # decided before anything is bound: no socket appears and goes again
    listeners: dict[str, _Listener] = {}
    for name, text in opts:
        o = _opts(text)
        if o is None:
            break
        if name == "chardev":
            if o.get("") in _INVISIBLE_CHARDEVS and "id" in o and set(o) <= {"", "id", "size"}:
                continue  # only QMP can see it: no reason to hold the greeting back
            if o.get("") != "socket":
                break  # not reached: _visible_chardev() said no to the whole command line
            if (set(o) - {"", "id", "path", "server", "wait"}
                    or "id" not in o or "path" not in o or o["id"] in listeners
                    or o.get("server") not in ("on",) or o.get("wait") != "off"):
                break
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(o["path"])
                sock = listen_unix(o["path"])  # mode 0600, see unixsock.py
            except OSError:
                break  # the normal path reports it, with QEMU's words
            sock.setblocking(False)
            listeners[o["id"]] = _Listener(text, o["id"], o["path"], sock)
        else:
            cid = o.get("chardev", o.get(""))
            if (cid is None or cid not in listeners or set(o) - {"", "chardev", "mode"}
                    or o.get("mode", "control") != "control" or ("" in o and "chardev" in o)):
                break
            listeners[cid].greet = True
    if not listeners:
        return
    _greeter = _Greeter(list(listeners.values()))
    if any(lst.greet for lst in listeners.values()):
        _greeter.start()
    else:
        _greeter.stopped = True


def take_listener(text: str) -> socket.socket | None:
    """The socket bound early for the ``--chardev`` option ``text``; the greeter keeps
    greeting on it until ``take_greeted``."""
    if _greeter is None:
        return None
    for lst in _greeter.listeners:
        if lst.text == text and lst.sock is not None:
            lst.taken = True
            return lst.sock
    return None


def take_greeted(cid: str) -> list[socket.socket]:
    """Connections already greeted on chardev ``cid`` (stops the greeter: the caller serves
    the listening socket and these connections from now on)."""
    if _greeter is None:
        return []
    _greeter.stop()
    for lst in _greeter.listeners:
        if lst.cid == cid:
            conns, lst.greeted = lst.greeted, []
            return conns
    return []


def close() -> None:
    """Close whatever was not taken (start-up failed before reaching those options)."""
    global _greeter
    if _greeter is None:
        return
    _greeter.stop()
    for lst in _greeter.listeners:
        for conn in lst.greeted:
            conn.close()
        if lst.sock is not None and not lst.taken:
            lst.sock.close()
            with contextlib.suppress(OSError):
                os.unlink(lst.path)
    _greeter = None


__all__ = ["close", "greeting_bytes", "start", "take_greeted", "take_listener"]
