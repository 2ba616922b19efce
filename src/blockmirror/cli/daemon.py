"""`blockmirror daemon`: a qemu-storage-daemon compatible command line.

Options are QSD's (``--blockdev``, ``--chardev``, ``--monitor``, ``--nbd-server``, ``--export``,
``--object``, ``--pidfile``, ``--daemonize``, ``-h``, ``-V``, ``-T``) and are processed in
order, like QSD, after a first pass that rejects unknown options. A bad value is reported as
``<prog>: --opt value: <QEMU's text>`` with exit status 1. The pid file is written once every
listener exists; ``quit`` or SIGINT/SIGTERM/SIGHUP flush and close every image before exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from blockmirror import QEMU_COMPAT_PACKAGE, QEMU_COMPAT_VERSION
from blockmirror.block.options import open_blockdev
from blockmirror.chardev import BACKENDS
from blockmirror.chardev.backends import (
    CommandLineSocket,
    PtyChardev,
    connection_name,
    report_stderr,
)
from blockmirror.cli import early, event_loop
from blockmirror.cli.chardev_opts import ALIASES, KNOWN_KEYS, backend_of
from blockmirror.cli.keyval import parse_option, split_qemuopts
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockMirrorError
from blockmirror.qapi import SchemaError, validate
from blockmirror.qapi.qom import OBJECT_TYPES
from blockmirror.qmp.commands import nbd as nbd_commands
from blockmirror.qmp.registry import Args, CommandContext, find_command
from blockmirror.qmp.stdio import attach_stdio
from blockmirror.unixsock import listen_unix

#: long options that take an argument, as QSD's getopt table declares them
_WITH_ARG = ("blockdev", "chardev", "export", "monitor", "nbd-server", "object", "pidfile",
             "trace", "clock")
_NO_ARG = ("help", "version", "daemonize")

class UsageError(Exception):
    """A getopt-level error (the message is printed after "<prog>: ")."""


class OptionError(Exception):
    """A bad option value: printed as "<prog>: --<opt> <value>: <desc>"."""


def program_name() -> str:
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return base if base and not base.startswith("-") and not base.endswith(".py") \
        else "blockmirror"


def usage(prog: str) -> str:
    return f"""Usage: {prog} [options]
QEMU storage daemon (blockmirror)

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options (accepted and ignored)
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend (JSON form '{{...}}' accepted)

  --chardev socket,id=<id>,path=<path>|host=<host>,port=<port>|fd=<n>
            [,server=on|off][,wait=on|off]
  --chardev stdio,id=<id>[,signal=on|off]
  --chardev ringbuf|memory|null|pty,id=<id>[,size=<n>]
  --chardev file|pipe|serial|parallel,id=<id>,path=<path>
  --chardev udp,id=<id>,host=<host>,port=<port>[,localaddr=..][,localport=..]
  --chardev mux,id=<id>,chardev=<id>
                         configure a character device backend (monitors: socket
                         and stdio)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>; 'id' must be set

  --pidfile <path>       write process ID to a file after startup

  --clock monotonic|virtual
                         blockmirror extension: with 'virtual', rate limits, job
                         timers and fault delays follow a clock that moves only on
                         x-clock-advance / x-clock-run-to-next-timer (docs/qmp.md)

Environment:
  BLOCKMIRROR_EVENT_LOOP=asyncio
                         run on CPython's own event loop instead of uvloop (for
                         comparing the two; docs/architecture.md)
"""


def parse_argv(argv: list[str]) -> list[tuple[str, str | None]]:
    """getopt_long-like pass: (option, value) pairs in order; "" names a bare argument.

    Raises:
        UsageError: with getopt's texts.
    """
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--") and len(arg) > 2:
            name, eq, val = arg[2:].partition("=")
            if name in _WITH_ARG:
                if not eq:
                    if i >= len(argv):
                        raise UsageError(f"option '--{name}' requires an argument")
                    val = argv[i]
                    i += 1
                out.append((name, val))
            elif name in _NO_ARG:
                if eq:
                    raise UsageError(f"option '--{name}' doesn't allow an argument")
                out.append((name, None))
            else:
                raise UsageError(f"unrecognized option '--{name}'" if not eq
                                 else f"unrecognized option '{arg}'")
        elif arg.startswith("-") and len(arg) > 1:
            letters = arg[1:]
            while letters:
                c, letters = letters[0], letters[1:]
                if c == "h":
                    out.append(("help", None))
                elif c == "V":
                    out.append(("version", None))
                elif c == "T":
                    if not letters:
                        if i >= len(argv):
                            raise UsageError("option requires an argument -- 'T'")
                        letters = argv[i]
                        i += 1
                    out.append(("trace", letters))
                    letters = ""
                else:
                    raise UsageError(f"invalid option -- '{c}'")
        else:
            out.append(("", arg))
    return out


@dataclass
class _Chardev:
    """A --chardev of the command line, until a --monitor takes it."""

    id: str
    sock: socket.socket | None  # None: the stdio backend
    server: bool
    path: str | None = None
    used: bool = False
    #: with server=on,wait=on: the first client, accepted before start-up goes on
    first_client: socket.socket | None = None


@dataclass
class _State:
    """What start-up gathers while it processes the command line, option by option."""

    prog: str
    daemon: Daemon
    chardevs: dict[str, _Chardev] = field(default_factory=dict)
    pidfile: str | None = None
    #: monitors start serving once every option is processed, as in QSD, whose main loop
    #: (and so every monitor) only runs after start-up: no command runs half-way through it
    monitors: list[tuple[_Chardev, bool]] = field(default_factory=list)


def _qemuopts(text: str, implied: str) -> dict[str, str]:
    """QemuOpts syntax for --chardev: "backend,key=value,flag" (",," escapes a comma)."""
    out: dict[str, str] = {}
    for n, item in enumerate(split_qemuopts(text)):
        if not item:
            continue
        key, eq, val = item.partition("=")
        if not eq:
            if n == 0:
                out[implied] = key
                continue
            # QemuOpts flags: "server" means server=on, "nowait" means wait=off
            if key.startswith("no"):
                out[key[2:]] = "off"
            else:
                out[key] = "on"
            continue
        out[key] = val
    return out


def _onoff(opts: dict[str, str], key: str, default: bool) -> bool:
    val = opts.get(key)
    if val is None:
        return default
    if val in ("on", "yes", "true", "y"):
        return True
    if val in ("off", "no", "false", "n"):
        return False
    raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")


async def _open_chardev(st: _State, text: str) -> None:
    opts = _qemuopts(text, "backend")
    unknown = [k for k in opts if k not in KNOWN_KEYS]
    if unknown:
        raise OptionError(f"Invalid parameter '{unknown[0]}'")
    backend = opts.get("backend", "")
    if "id" not in opts:
        raise OptionError("chardev: no id specified")
    if backend in ALIASES:
        print(f"{st.prog}: --chardev {text}: warning: The alias '{backend}' is deprecated, "
              f"use '{ALIASES[backend]}' instead", file=sys.stderr, flush=True)
        backend = ALIASES[backend]
    if backend not in BACKENDS:
        raise OptionError(f"'{backend}' is not a valid char driver name")
    cid = opts["id"]
    registry = st.daemon.chardevs
    if cid in st.chardevs and backend == "socket" and st.chardevs[cid].sock is not None:
        raise OptionError("duplicate yank instance")
    if registry.find(cid) is not None:
        raise OptionError(f"attempt to add duplicate property '{cid}' to object "
                          "(type 'container')")
    if backend not in ("socket", "stdio"):
        # every other backend through the registry, as chardev-add opens it
        chr_ = registry.open_backend(cid, backend_of(backend, opts))
        registry.register(chr_)
        if isinstance(chr_, PtyChardev):
            print(f"char device redirected to {chr_.pty_name} (label {cid})", flush=True)
        return
    if backend == "stdio":
        # cf. chardev/char-stdio.c: one stdio chardev per process; 'signal' only
        # concerns terminals (^C), which the monitor does not read as a terminal anyway
        _onoff(opts, "signal", True)
        registry.register(registry.open_backend(cid, {"type": "stdio", "data": {}}))
        st.chardevs[cid] = _Chardev(cid, None, False)
        return
    server = _onoff(opts, "server", False)
    wait = _onoff(opts, "wait", True)
    path = opts.get("path")
    early_sock = early.take_listener(text) if path is not None and server else None
    if early_sock is not None:
        sock = early_sock  # bound and listening since start-up (cli/early.py)
    elif path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if server:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                sock.close()
                sock = listen_unix(path)  # mode 0600, see unixsock.py
            else:
                sock.connect(path)
        except OSError as e:
            sock.close()
            verb = "bind" if server else "connect"
            raise OptionError(f"Failed to {verb} socket to {path}: {e.strerror}") from e
    elif "host" in opts:
        host, port = opts["host"], opts.get("port", "")
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise OptionError(
                f"address resolution failed for {host}:{port}: {e.strerror}") from e
        fam, _, _, _, addr = infos[0]
        sock = socket.socket(fam, socket.SOCK_STREAM)
        try:
            if server:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(addr)
                sock.listen(16)
            else:
                sock.connect(addr)
        except OSError as e:
            sock.close()
            raise OptionError(f"Failed to {'bind' if server else 'connect'} socket: "
                              f"{e.strerror}") from e
    elif "fd" in opts:
        try:
            fd = int(opts["fd"])
        except ValueError:
            raise OptionError(f"Unable to parse FD number {opts['fd']}") from None
        sock = socket.socket(fileno=fd)
    else:
        raise OptionError("Unable to parse FD number ")
    sock.setblocking(False)
    chardev = _Chardev(cid, sock, server, path if server else None)
    st.chardevs[cid] = chardev
    registry.register(_registered_socket(cid, opts, sock, server))
    if server and wait and "fd" not in opts:
        # cf. tcp_chr_wait_connected: start-up blocks until the first client connects
        where = f"unix:{path}" if path is not None else f"tcp:{opts['host']}:{opts.get('port')}"
        print(f"{st.prog}: --chardev {text}: info: QEMU waiting for connection on: "
              f"disconnected:{where},server=on", file=sys.stderr, flush=True)
        conn, _ = await asyncio.get_running_loop().sock_accept(sock)
        chardev.first_client = conn


def _registered_socket(cid: str, opts: dict[str, str], sock: socket.socket,
                       server: bool) -> CommandLineSocket:
    """What query-chardev shows of a command-line socket chardev."""
    listen = ",server=on" if server else ""
    if "path" in opts:
        address = f"unix:{opts['path']}{listen}"
    elif "host" in opts:
        address = f"tcp:{opts['host']}:{opts.get('port', '')}{listen}"
    else:
        address = f"fd:{opts.get('fd', '')}{listen}"
    if not server:
        connected: str | None = connection_name(sock, False)
    else:
        connected = address if "path" in opts else None
    return CommandLineSocket(cid, address, connected)


def _validated(type_name: str, text: str, implied: str | None) -> dict[str, Any]:
    """Parse an option argument (keyval or JSON) and validate it against the schema type."""
    raw = parse_option(text, implied)
    try:
        out = validate(type_name, raw, None, "", keyval=not text.startswith("{"))
    except SchemaError as e:
        raise OptionError(e.desc) from None
    assert isinstance(out, dict)
    return out


def _legacy_socket_address(addr: dict[str, Any]) -> dict[str, Any]:
    """Flat SocketAddress (--nbd-server addr.*) to nbd-server-start's legacy form."""
    data = {k: v for k, v in addr.items() if k != "type"}
    return {"type": addr["type"], "data": data}


def _trace_pattern(value: str) -> str:
    """The event pattern of a --trace argument ([enable=]PATTERN[,events=..][,file=..])."""
    first = value.split(",", 1)[0]
    return first[len("enable="):] if first.startswith("enable=") else \
        ("" if "=" in first else first)


async def _apply(st: _State, opt: str, value: str) -> None:
    d = st.daemon
    if opt == "blockdev":
        opts = _validated("BlockdevOptions", value, "driver")
        await open_blockdev(d.graph, opts, validated=True)
    elif opt == "chardev":
        await _open_chardev(st, value)
    elif opt == "monitor":
        mon = _validated("MonitorOptions", value, "chardev")
        chardev = st.chardevs.get(mon["chardev"])
        registered = d.chardevs.find(mon["chardev"])
        if chardev is None and registered is None:
            raise OptionError(f'chardev "{mon["chardev"]}" not found')
        if mon.get("mode", "control") != "control":
            raise OptionError("Only QMP is supported")
        if registered is not None:
            d.chardevs.attach_frontend(registered, "monitor")
            registered.frontend_open = True
        if chardev is None:
            # a monitor on a ring buffer, a file...: taken, but QMP is served on sockets
            # and stdio only
            return
        d.qmp_server()
        chardev.used = True
        st.monitors.append((chardev, bool(mon.get("pretty", False))))
    elif opt == "nbd-server":
        opts = _validated("NbdServerOptions", value, None)
        args = dict(opts)
        args["addr"] = _legacy_socket_address(opts["addr"])
        await nbd_commands.nbd_server_start(d, args)
    elif opt == "export":
        opts = _validated("BlockExportOptions", value, "type")
        await nbd_commands.block_export_add(d, opts)
    elif opt == "object":
        if value == "help":
            print("List of user creatable objects:")
            for t in OBJECT_TYPES:
                print(f"  {t}")
            raise SystemExit(0)
        # what object-add does (cf. user_creatable_add_qapi), through the command registry:
        # the object types' modules load only for a command line that has --object
        object_add = find_command("object-add")
        assert object_add is not None
        await object_add.handler(CommandContext(d),
                                 Args(_validated("ObjectOptions", value, "qom-type")))
    elif opt == "pidfile":
        st.pidfile = value
    # --trace and --daemonize need nothing here


async def _start_monitors(st: _State) -> None:
    server = st.daemon.qmp_server()
    for chardev, pretty in st.monitors:
        if chardev.sock is None:
            attach_stdio(server, pretty=pretty)
        elif chardev.server:
            greeted = early.take_greeted(chardev.id)
            await server.listen_socket(chardev.sock, pretty=pretty)
            for conn in greeted:
                server.attach_connected(conn, pretty=pretty, greeted=True)
            if chardev.first_client is not None:
                server.attach_connected(chardev.first_client, pretty=pretty)
                chardev.first_client = None
        else:
            server.attach_connected(chardev.sock, pretty=pretty)


async def _main(prog: str, opts: list[tuple[str, str | None]], ready_fd: int | None) -> int:
    clock = "monotonic"
    for opt, value in opts:
        if opt == "clock" and value is not None:
            if value not in ("monotonic", "virtual"):
                print(f"{prog}: --clock {value}: Parameter 'clock' does not accept value "
                      f"'{value}'", file=sys.stderr, flush=True)
                return 1
            clock = value
    daemon = Daemon(clock)
    daemon.chardevs.report = report_stderr(prog)
    daemon.chardevs.daemonized = ready_fd is not None
    st = _State(prog, daemon)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, daemon.quit_requested.set)
    rc = 0
    try:
        for opt, value in opts:
            if opt == "":
                # non-options are reported in order, after earlier options took effect
                print(f"{prog}: {value}: Unexpected argument", file=sys.stderr, flush=True)
                return 1
            if opt == "trace" and value is not None:
                pattern = _trace_pattern(value)
                if pattern and "*" not in pattern and "?" not in pattern:
                    print(f"{prog}: --trace {value}: warning: trace event '{pattern}' does "
                          "not exist", file=sys.stderr, flush=True)
                continue
            if opt in ("help", "version", "daemonize") or value is None:
                continue
            try:
                await _apply(st, opt, value)
            except (OptionError, BlockMirrorError) as e:
                print(f"{prog}: --{opt} {value}: {e}", file=sys.stderr, flush=True)
                hint = getattr(e, "hint", None)
                if hint:
                    print(hint, file=sys.stderr, flush=True)
                return 1
        await _start_monitors(st)
        if st.pidfile is not None:
            try:
                _write_pidfile(st.pidfile)
            except OSError as e:
                print(f"{prog}: cannot create PID file: {e.strerror}", file=sys.stderr)
                return 1
        if ready_fd is not None:
            os.write(ready_fd, b"\0")
            os.close(ready_fd)
            ready_fd = None
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
        await daemon.quit_requested.wait()
    finally:
        if daemon.qmp is not None:
            await daemon.qmp.close()
        try:
            await daemon.shutdown()
        except Exception as e:  # still exit; the images were flushed as far as possible
            print(f"{prog}: {e}", file=sys.stderr)
            rc = 1
        for cd in st.chardevs.values():
            if cd.sock is not None:
                cd.sock.close()
            if cd.path:
                with contextlib.suppress(OSError):
                    os.unlink(cd.path)
        if st.pidfile is not None and rc == 0:
            with contextlib.suppress(OSError):
                os.unlink(st.pidfile)
    return rc


def _write_pidfile(path: str) -> None:
    # a few bytes, once, before anyone can connect: no need for the thread pool
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")


def _daemonize() -> int | None:
    """Fork; the parent waits for the child's "ready" byte and exits. Returns the child's fd."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        ok = os.read(rfd, 1)
        os._exit(0 if ok == b"\0" else 1)
    os.close(rfd)
    os.setsid()
    return wfd


def run(name: str, argv: list[str]) -> int:
    prog = program_name()
    try:
        opts = parse_argv(argv)
    except UsageError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    for opt, value in opts:
        if opt == "help":
            print(usage(prog), end="")
            return 0
        if opt == "trace" and value is not None and _trace_pattern(value) == "help":
            return 0  # QSD lists its trace events; blockmirror has none
        if opt == "version":
            major, minor, micro = QEMU_COMPAT_VERSION
            print(f"{prog} version {major}.{minor}.{micro} ({QEMU_COMPAT_PACKAGE})")
            print("Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers")
            return 0
    ready_fd = _daemonize() if any(o == "daemonize" for o, _ in opts) else None
    clocks = [value for opt, value in opts if opt == "clock"]
    try:
        return event_loop.run(_main(prog, opts, ready_fd),
                              virtual_clock=bool(clocks) and clocks[-1] == "virtual")
    except KeyboardInterrupt:
        return 0


__all__ = ["parse_argv", "run", "usage"]
