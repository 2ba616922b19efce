"""Character device backends, each opened from a validated ``ChardevBackend`` (qapi/char.py).

A storage daemon has one kind of chardev user, the QMP monitor, and a monitor only goes on a
chardev of the command line; the chardevs chardev-add makes have no frontend. So these
backends do what can be seen without one: they open (and close) their files, sockets and
ptys with QEMU's checks and texts, report QEMU's ``filename`` in query-chardev, and the ring
buffer keeps what ringbuf-write wrote. Nothing is ever written to a file or socket, as in
QEMU, where only a frontend writes; what a peer sends to a socket chardev is read and
dropped (QEMU leaves it unread), which lets a hang-up be seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from blockmirror.chardev.text import encode_qmp_string
from blockmirror.errors import BlockMirrorError
from blockmirror.objects import ObjectRegistry
from blockmirror.objects.tls import TlsCreds
from blockmirror.unixsock import bind_unix

#: a mux takes at most this many frontends (MAX_MUX)
MAX_MUX = 4
_PPCLAIM = 0x708B  # linux/ppdev.h: _IO('p', 0x8b)


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno or errno.EIO)


def os_path(text: str) -> str:
    """The path QEMU hands the OS for a QMP string: its modified UTF-8 bytes (so a NUL, C0 80
    there, neither ends nor breaks the path), as a str the os module turns back into them."""
    return os.fsdecode(encode_qmp_string(text))


def _sun_path(path: str) -> str:
    """A unix socket path as the OS gets it; QEMU's text when sun_path cannot hold it."""
    if len(encode_qmp_string(path)) >= 108:
        raise BlockMirrorError(f"UNIX socket path '{path}' is too long")
    return os_path(path)


def _getaddrinfo(host: str | None, port: str | None, *args: Any, **kwargs: Any) -> Any:
    """socket.getaddrinfo, where a name Python cannot even encode is one that is not known
    (what the C library says of QEMU's bytes)."""
    try:
        return socket.getaddrinfo(host, port, *args, **kwargs)
    except (UnicodeError, ValueError):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None


def _temporary_socket_path() -> str:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="qemu-socket-")
    os.close(fd)
    os.unlink(path)
    return path


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def open_file_source(path: str, flags: int) -> int:
    """``qmp_chardev_open_file_source``: QEMU's "Could not open" text on failure."""
    try:
        return os.open(os_path(path), flags | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise BlockMirrorError(f"Could not open '{path}': {_strerror(e)}") from e


class Chardev:
    """One chardev: its label, its user (``frontend``), and what it holds open."""

    #: the QOM type name without "chardev-": the default ``filename``
    kind = "null"
    #: a mux: chardev-change refuses it, and it always counts as busy (QEMU's mux_cnt >= 0)
    is_mux = False
    is_ringbuf = False

    def __init__(self, label: str) -> None:
        self.label = label
        #: who uses it: "monitor", or the label of a mux ("" when nobody does)
        self.frontend = ""
        #: the frontend has it open (query-chardev's ``frontend-open``)
        self.frontend_open = False
        self.logfd = -1
        self._fds: list[int] = []

    @property
    def filename(self) -> str:
        return self.kind

    @property
    def busy(self) -> bool:
        return self.is_mux or bool(self.frontend)

    def open_log(self, common: dict[str, Any]) -> None:
        """ChardevCommon's ``logfile`` (created, truncated unless ``logappend``)."""
        path = common.get("logfile")
        if path is None:
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_APPEND if common.get("logappend") else os.O_TRUNC
        try:
            self.logfd = os.open(os_path(path), flags, 0o666)
        except OSError as e:
            raise BlockMirrorError(f"Could not create '{path}': {_strerror(e)}") from e

    def hold(self, fd: int) -> None:
        self._fds.append(fd)

    def close(self) -> None:
        for fd in [*self._fds, self.logfd]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds.clear()
        self.logfd = -1


class NullChardev(Chardev):
    kind = "null"


class RingbufChardev(Chardev):
    """``ringbuf`` / ``memory``: the last ``size`` bytes written, read oldest first.

    QEMU allocates the whole ring up front (a huge power of two aborts it) and a ring of size
    0 passes its check but breaks on the first write; here the ring grows with what is
    written, up to ``size``, and a ring of size 0 keeps nothing.
    """

    kind = "ringbuf"
    is_ringbuf = True

    def __init__(self, label: str, kind: str, size: int) -> None:
        super().__init__(label)
        self.kind = kind
        self.size = size
        self._data = bytearray()

    @property
    def count(self) -> int:
        return len(self._data)

    def write(self, data: bytes) -> None:
        self._data += data
        if len(self._data) > self.size:
            del self._data[: len(self._data) - self.size]

    def read(self, size: int) -> bytes:
        out = bytes(self._data[:size])
        del self._data[:size]
        return out


class FdChardev(Chardev):
    """``file``, ``pipe``, ``serial``: file descriptors held open (filename: the kind)."""

    def __init__(self, label: str, kind: str) -> None:
        super().__init__(label)
        self.kind = kind


class PtyChardev(Chardev):
    kind = "pty"

    def __init__(self, label: str) -> None:
        super().__init__(label)
        try:
            master, slave = os.openpty()
        except OSError as e:
            raise BlockMirrorError(f"Failed to create PTY: {_strerror(e)}") from e
        self.pty_name = os.ttyname(slave)
        os.close(slave)  # cf. qemu_chr_open_pty: only the master side is kept
        os.set_blocking(master, False)
        self.hold(master)

    @property
    def filename(self) -> str:
        return f"pty:{self.pty_name}"


class StdioChardev(Chardev):
    kind = "stdio"


class MuxChardev(Chardev):
    kind = "mux"
    is_mux = True

    def __init__(self, label: str, base: Chardev) -> None:
        super().__init__(label)
        self.base = base
        #: frontends attached to this mux (another mux on top of it)
        self.users = 0


class UdpChardev(Chardev):
    kind = "udp"


def connection_name(conn: socket.socket, server: bool, protocol: str = "tcp") -> str:
    """``qemu_chr_compute_filename``: the name of an established connection."""
    listen = ",server=on" if server else ""
    try:
        if conn.family == socket.AF_UNIX:
            local = conn.getsockname()
            path = local.decode(errors="replace") if isinstance(local, bytes) else local
            return f"unix:{path}{listen}"
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            lb, rb = ("[", "]") if conn.family == socket.AF_INET6 else ("", "")
            lh, lp = conn.getsockname()[:2]
            ph, pp = conn.getpeername()[:2]
            return f"{protocol}:{lb}{lh}{rb}:{lp}{listen} <-> {lb}{ph}{rb}:{pp}"
    except OSError:
        pass
    return "unknown"


class CommandLineSocket(Chardev):
    """A ``--chardev socket`` of the command line: cli/daemon.py opened its socket, which a
    monitor serves. ``filename`` is QEMU's: the connected form while the monitor is open
    (a unix listener's connected name is its own path; a TCP listener's, which names the
    peer, is shown in its disconnected form), the connection's name for a client socket."""

    kind = "socket"

    def __init__(self, label: str, address: str, connected: str | None) -> None:
        super().__init__(label)
        self._address = address
        self._connected = connected

    @property
    def filename(self) -> str:
        if self.frontend_open and self._connected is not None:
            return self._connected
        return f"disconnected:{self._address}"


def _legacy(addr: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """SocketAddressLegacy {"type", "data"} -> (type, members)."""
    return str(addr["type"]), dict(addr["data"])


class SocketChardev(Chardev):
    """``socket``: a listener that takes one client at a time, or a client connection.

    ``filename`` follows QEMU's: "disconnected:unix:PATH,server=on" while nobody is
    connected, the connection's own addresses while someone is.
    """

    kind = "socket"

    def __init__(self, label: str, opts: dict[str, Any], objects: ObjectRegistry,
                 report: Callable[[str], None]) -> None:
        super().__init__(label)
        self.server = bool(opts.get("server", True))
        self.telnet = bool(opts.get("telnet", False))
        self.websocket = bool(opts.get("websocket", False))
        self.reconnect = int(opts.get("reconnect", 0))
        self._report = report
        self.addr_type, self.addr = _legacy(opts["addr"])
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._connected_name = ""
        self._tasks: set[asyncio.Task[None]] = set()
        #: set when the connection ends: a listener then takes the next client
        self._disconnected = asyncio.Event()
        self._closed = False
        self._check_tls(opts, objects)
        self._validate(opts)

    # --- checks, in qmp_chardev_open_socket's order ---------------------------------------

    def _check_tls(self, opts: dict[str, Any], objects: ObjectRegistry) -> None:
        cid = opts.get("tls-creds")
        if cid is None:
            return
        obj = objects.get(cid)
        if obj is None:
            raise BlockMirrorError(f"No TLS credentials with id '{cid}'")
        if not isinstance(obj, TlsCreds):
            raise BlockMirrorError(f"Object with id '{cid}' is not TLS credentials")
        want = "server" if self.server else "client"
        if obj.endpoint != want:
            raise BlockMirrorError(f"Expected TLS credentials for a {want} endpoint")

    def _validate(self, opts: dict[str, Any]) -> None:
        tls = "tls-creds" in opts
        if self.addr_type == "fd":
            if "reconnect" in opts:
                raise BlockMirrorError(
                    "'reconnect' option is incompatible with 'fd' address type")
            if tls and not self.server:
                raise BlockMirrorError(
                    "'tls_creds' option is incompatible with 'fd' address type as client")
        elif self.addr_type in ("unix", "vsock") and tls:
            raise BlockMirrorError(
                f"'tls_creds' option is incompatible with '{self.addr_type}' address type")
        if "tls-authz" in opts and not tls:
            raise BlockMirrorError("'tls_authz' option requires 'tls_creds' option")
        if self.server:
            if "reconnect" in opts:
                raise BlockMirrorError("'reconnect' option is incompatible with socket in "
                                       "server listen mode")
        else:
            if self.websocket:
                raise BlockMirrorError("Websocket client is not implemented")
            if "wait" in opts:
                raise BlockMirrorError("'wait' option is incompatible with socket in "
                                       "client connect mode")

    # --- names ----------------------------------------------------------------------------

    def _protocol(self) -> str:
        return "telnet" if self.telnet else ("websocket" if self.websocket else "tcp")

    def address(self) -> str:
        """``qemu_chr_socket_address`` without the "disconnected:" prefix."""
        listen = ",server=on" if self.server else ""
        a = self.addr
        if self.addr_type == "inet":
            return f"{self._protocol()}:{a['host']}:{a['port']}{listen}"
        if self.addr_type == "unix":
            extra = ""
            if a.get("abstract"):
                extra = ",abstract=on" + (",tight=on" if a.get("tight", True) else "")
            return f"unix:{a['path']}{extra}{listen}"
        if self.addr_type == "fd":
            return f"fd:{a['str']}{listen}"
        return f"vsock:{a['cid']}:{a['port']}"

    @property
    def filename(self) -> str:
        if self._conn is not None:
            return self._connected_name
        return f"disconnected:{self.address()}"

    def _name_connection(self, conn: socket.socket) -> str:
        return connection_name(conn, self.server, self._protocol())

    # --- opening --------------------------------------------------------------------------

    def open(self) -> None:
        if self.server:
            self._listener = self._listen()
            if self.addr_type == "inet":
                host, port = self._listener.getsockname()[:2]
                self.addr = {**self.addr, "host": host, "port": str(port)}
            self._spawn(self._accept_loop())
        elif self.reconnect > 0:
            self._spawn(self._reconnect_loop())
        else:
            self._attach(self._connect())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _listen(self) -> socket.socket:
        a = self.addr
        if self.addr_type == "unix":
            path = str(a["path"])
            if not path:
                # cf. unix_listen_saddr: no path, a fresh one in the temporary directory
                path = _temporary_socket_path()
                self.addr = {**a, "path": path}
            where = _sun_path(path)
            with contextlib.suppress(OSError):
                if os.path.exists(where) and not os.path.isdir(where):
                    os.unlink(where)  # cf. unix_listen_saddr: a stale socket is replaced
            try:
                sock = bind_unix(where)  # mode 0600, see unixsock.py
                sock.listen(1)
            except OSError as e:
                raise BlockMirrorError(
                    f"Failed to bind socket to {path}: {_strerror(e)}") from e
        elif self.addr_type == "inet":
            sock = self._inet_listen(str(a["host"]), str(a["port"]))
        elif self.addr_type == "fd":
            sock = self._fd_socket(str(a["str"]))
        else:
            raise BlockMirrorError("socket family AF_VSOCK unsupported")
        sock.setblocking(False)
        return sock

    @staticmethod
    def _inet_listen(host: str, port: str) -> socket.socket:
        try:
            infos = _getaddrinfo(host or None, port or None, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise BlockMirrorError(
                f"address resolution failed for {host}:{port}: {e.strerror}") from e
        err: OSError | None = None
        for fam, typ, proto, _, sa in infos:
            try:
                sock = socket.socket(fam, typ, proto)
            except OSError as e:
                err = e
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sa)
                sock.listen(1)
                return sock
            except OSError as e:
                sock.close()
                if e.errno != errno.EADDRINUSE:
                    raise BlockMirrorError(f"Failed to bind socket: {_strerror(e)}") from e
                err = e
        what = "Failed to find an available port" if err is not None and \
            err.errno == errno.EADDRINUSE else "Failed to create a socket"
        raise BlockMirrorError(f"{what}: {_strerror(err) if err else os.strerror(0)}")

    @staticmethod
    def _fd_socket(text: str) -> socket.socket:
        # within a QMP command QEMU asks the monitor for the descriptor, and a storage
        # daemon's monitor has none to give (its stub says so, for numbers too)
        raise BlockMirrorError("only QEMU supports file descriptor passing")

    def _connect(self) -> socket.socket:
        a = self.addr
        if self.addr_type == "unix":
            path = str(a["path"])
            where: str | bytes = _sun_path(path)
            if not path:
                where = bytes(108)  # QEMU passes the whole (empty) sun_path: abstract zeros
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(where)
            except OSError as e:
                sock.close()
                raise BlockMirrorError(
                    f"Failed to connect to '{path}': {_strerror(e)}") from e
            return sock
        if self.addr_type == "inet":
            host, port = str(a["host"]), str(a["port"])
            try:
                infos = _getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise BlockMirrorError(
                    f"address resolution failed for {host}:{port}: {e.strerror}") from e
            last: OSError | None = None
            for fam, typ, proto, _, sa in infos:
                sock = socket.socket(fam, typ, proto)
                try:
                    sock.connect(sa)
                    return sock
                except OSError as e:
                    sock.close()
                    last = e
            assert last is not None
            raise BlockMirrorError(f"Failed to connect to '{host}:{port}': "
                                   f"{_strerror(last)}")
        if self.addr_type == "fd":
            return self._fd_socket(str(a["str"]))
        cid, port = str(a["cid"]), str(a["port"])
        if not _number(cid):
            raise BlockMirrorError(f"Failed to parse cid '{cid}'")
        if not _number(port):
            raise BlockMirrorError(f"Failed to parse port '{port}'")
        vsock_family = getattr(socket, "AF_VSOCK", None)
        if vsock_family is None:
            raise BlockMirrorError("socket family AF_VSOCK unsupported")
        try:
            sock = socket.socket(vsock_family, socket.SOCK_STREAM)
        except OSError as e:
            raise BlockMirrorError(f"Failed to create socket family {vsock_family}: "
                                   f"{_strerror(e)}") from e
        try:
            sock.connect((int(cid), int(port)))
        except OSError as e:
            sock.close()
            raise BlockMirrorError(f"Failed to connect to '{cid}:{port}': "
                                   f"{_strerror(e)}") from e
        return sock

    # --- connections ----------------------------------------------------------------------

    def _attach(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self._conn = conn
        self._connected_name = self._name_connection(conn)
        self._spawn(self._drain(conn))

    async def _drain(self, conn: socket.socket) -> None:
        """Read and drop what the peer sends until it hangs up (nobody reads a chardev
        without a frontend), then go back to "disconnected"."""
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                if not await loop.sock_recv(conn, 65536):
                    break
        except OSError:
            pass
        finally:
            conn.close()
            if self._conn is conn:
                self._conn = None
                self._disconnected.set()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while not self._closed:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError:
                return
            if self._closed:
                conn.close()
                return
            # QEMU stops listening while a client is connected: one at a time
            self._disconnected.clear()
            self._attach(conn)
            await self._disconnected.wait()

    async def _reconnect_loop(self) -> None:
        while not self._closed:
            try:
                conn = await asyncio.to_thread(self._connect)
            except BlockMirrorError as e:
                self._report(f"Unable to connect character device {self.label}: {e}")
            else:
                if self._closed:
                    conn.close()
                    return
                self._disconnected.clear()
                self._attach(conn)
                await self._disconnected.wait()
            await asyncio.sleep(self.reconnect)

    def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.addr_type == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(os_path(str(self.addr["path"])))
        super().close()


def open_udp(label: str, opts: dict[str, Any]) -> UdpChardev:
    """``udp``: a datagram socket bound locally and connected to ``remote``."""
    rtype, remote = _legacy(opts["remote"])
    if rtype != "inet":
        raise BlockMirrorError("socket type unsupported for datagram")
    local: dict[str, Any] = {}
    if "local" in opts:
        ltype, local = _legacy(opts["local"])
        if ltype != "inet":
            raise BlockMirrorError("socket type unsupported for datagram")
    host = str(remote.get("host") or "localhost")
    port = str(remote.get("port") or "")
    if not port:
        raise BlockMirrorError("remote port not specified")
    try:
        peer = _getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except socket.gaierror as e:
        raise BlockMirrorError(f"address resolution failed for {host}:{port}: "
                               f"{e.strerror}") from e
    lhost = str(local.get("host") or "") or None
    lport = str(local.get("port") or "") or "0"
    try:
        mine = _getaddrinfo(lhost, lport, peer[0], socket.SOCK_DGRAM,
                                  flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise BlockMirrorError(f"address resolution failed for {lhost}:{lport}: "
                               f"{e.strerror}") from e
    sock = socket.socket(peer[0], socket.SOCK_DGRAM)
    try:
        try:
            sock.bind(mine[4])
        except OSError as e:
            raise BlockMirrorError(f"Failed to bind socket: {_strerror(e)}") from e
        try:
            sock.connect(peer[4])
        except OSError as e:
            raise BlockMirrorError(f"Failed to connect to '{lhost}:{lport}': "
                                   f"{_strerror(e)}") from e
    except BlockMirrorError:
        sock.close()
        raise
    chr_ = UdpChardev(label)
    chr_.hold(sock.detach())
    return chr_


def open_parallel(label: str, device: str) -> FdChardev:
    fd = open_file_source(device, os.O_RDWR)
    try:
        fcntl.ioctl(fd, _PPCLAIM)
    except OSError as e:
        os.close(fd)
        raise BlockMirrorError(f"not a parallel port: {_strerror(e)}") from e
    chr_ = FdChardev(label, "parallel")
    chr_.hold(fd)
    return chr_


def open_serial(label: str, device: str) -> FdChardev:
    """``serial``: the device opened non-blocking (QEMU sets up termios where it can)."""
    chr_ = FdChardev(label, "serial")
    chr_.hold(open_file_source(device, os.O_RDWR | os.O_NONBLOCK))
    return chr_


def open_pipe(label: str, device: str) -> FdChardev:
    """``pipe``: DEVICE.in and DEVICE.out if both open, else DEVICE itself both ways."""
    chr_ = FdChardev(label, "pipe")
    fds = []
    for suffix in (".in", ".out"):
        try:
            fds.append(os.open(os_path(device + suffix), os.O_RDWR | os.O_CLOEXEC))
        except OSError:
            break
    if len(fds) == 2:
        for fd in fds:
            chr_.hold(fd)
        return chr_
    for fd in fds:
        os.close(fd)
    chr_.hold(open_file_source(device, os.O_RDWR))
    return chr_


def open_file(label: str, opts: dict[str, Any]) -> FdChardev:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if opts.get("append") else os.O_TRUNC)
    out = open_file_source(str(opts["out"]), flags)
    chr_ = FdChardev(label, "file")
    chr_.hold(out)
    if "in" in opts:
        try:
            chr_.hold(open_file_source(str(opts["in"]), os.O_RDONLY))
        except BlockMirrorError:
            chr_.close()
            raise
    return chr_


def report_stderr(prog: str) -> Callable[[str], None]:
    def report(text: str) -> None:
        print(f"{prog}: {text}", file=sys.stderr, flush=True)
    return report


__all__ = [
    "MAX_MUX", "Chardev", "CommandLineSocket", "FdChardev", "MuxChardev", "NullChardev",
    "PtyChardev", "RingbufChardev", "SocketChardev", "StdioChardev", "UdpChardev",
    "connection_name", "open_file", "open_file_source", "open_parallel", "open_pipe",
    "open_serial", "open_udp", "report_stderr",
]
