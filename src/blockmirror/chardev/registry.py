"""The daemon's chardevs by label: what ``--chardev`` and chardev-add create, and the checks
and texts of QEMU's chardev/char.c around them (add, change, remove, busy)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from blockmirror.chardev.backends import (
    MAX_MUX,
    Chardev,
    MuxChardev,
    NullChardev,
    PtyChardev,
    RingbufChardev,
    SocketChardev,
    StdioChardev,
    open_file,
    open_parallel,
    open_pipe,
    open_serial,
    open_udp,
)
from blockmirror.errors import BlockMirrorError
from blockmirror.objects import ObjectRegistry

#: the backends qemu-storage-daemon 7.2 is built with (query-chardev-backends)
BACKENDS = ("file", "serial", "parallel", "pipe", "socket", "udp", "pty", "null", "mux",
            "stdio", "ringbuf", "memory")

_U64 = (1 << 64) - 1


class ChardevRegistry:
    def __init__(self, objects: ObjectRegistry,
                 report: Callable[[str], None] | None = None) -> None:
        self._objects = objects
        self._devs: dict[str, Chardev] = {}
        #: set by --daemonize: stdio is gone
        self.daemonized = False
        #: QEMU closes fds 0 and 1 when a stdio chardev goes, so no later one can open
        self._stdio_in_use = False
        self._stdio_closed = False
        #: where a chardev reports what QEMU's error_report() prints (a client socket
        #: chardev with ``reconnect`` that cannot connect); the command line sets stderr
        self.report: Callable[[str], None] = report or (lambda text: None)

    def __iter__(self) -> Iterator[Chardev]:
        return iter(list(self._devs.values()))

    def find(self, label: str) -> Chardev | None:
        return self._devs.get(label)

    # --- opening ----------------------------------------------------------------------------

    def open_backend(self, label: str, backend: dict[str, Any]) -> Chardev:
        """A new chardev from a validated ChardevBackend; QEMU's texts, without the
        "Failed to add chardev" prefix (the command line has none)."""
        kind = str(backend["type"])
        data = dict(backend.get("data") or {})
        if kind not in BACKENDS:
            raise BlockMirrorError(f"'{kind}' is not a valid char driver name")
        chr_: Chardev | None = None
        log = Chardev(label)
        log.open_log(data)  # the log file opens before the backend, as in qemu_char_open
        try:
            chr_ = self._open(label, kind, data)
        except BaseException:
            log.close()
            raise
        chr_.logfd = log.logfd
        return chr_

    def _open(self, label: str, kind: str, data: dict[str, Any]) -> Chardev:
        if kind in ("ringbuf", "memory"):
            size = int(data.get("size", 65536))
            if (size & _U64) & ((size - 1) & _U64):
                raise BlockMirrorError("size of ringbuf chardev must be power of two")
            return RingbufChardev(label, kind, size)
        if kind == "null":
            return NullChardev(label)
        if kind == "file":
            return open_file(label, data)
        if kind == "pipe":
            return open_pipe(label, str(data["device"]))
        if kind == "serial":
            return open_serial(label, str(data["device"]))
        if kind == "parallel":
            return open_parallel(label, str(data["device"]))
        if kind == "pty":
            return PtyChardev(label)
        if kind == "udp":
            return open_udp(label, data)
        if kind == "stdio":
            return self._open_stdio(label)
        if kind == "mux":
            return self._open_mux(label, str(data["chardev"]))
        sock = SocketChardev(label, data, self._objects, self.report)
        sock.open()
        return sock

    def _open_stdio(self, label: str) -> StdioChardev:
        if self.daemonized:
            raise BlockMirrorError("cannot use stdio with -daemonize")
        if self._stdio_in_use:
            raise BlockMirrorError("cannot use stdio by multiple character devices")
        if self._stdio_closed:
            raise BlockMirrorError("Failed to set FD nonblocking: Bad file descriptor")
        self._stdio_in_use = True
        return StdioChardev(label)

    def _open_mux(self, label: str, base_label: str) -> MuxChardev:
        base = self._devs.get(base_label)
        if base is None:
            raise BlockMirrorError(f"mux: base chardev {base_label} not found")
        self.attach_frontend(base, label)
        return MuxChardev(label, base)

    def attach_frontend(self, chr_: Chardev, user: str) -> None:
        """``qemu_chr_fe_init``: a chardev takes one frontend, a mux up to MAX_MUX."""
        if isinstance(chr_, MuxChardev):
            if chr_.users >= MAX_MUX:
                raise BlockMirrorError(f"Device '{chr_.label}' is in use")
            chr_.users += 1
            return
        if chr_.frontend:
            raise BlockMirrorError(f"Device '{chr_.label}' is in use")
        chr_.frontend = user

    # --- the QMP commands' semantics ----------------------------------------------------------

    def register(self, chr_: Chardev) -> None:
        if chr_.label in self._devs:
            raise BlockMirrorError(f"Chardev with id '{chr_.label}' already exists")
        self._devs[chr_.label] = chr_

    def add(self, label: str, backend: dict[str, Any]) -> dict[str, Any]:
        """chardev-add: the ChardevReturn (``pty`` for a pty)."""
        if label in self._devs:
            raise BlockMirrorError(f"Chardev with id '{label}' already exists")
        try:
            chr_ = self.open_backend(label, backend)
        except BlockMirrorError as e:
            raise BlockMirrorError(f"Failed to add chardev '{label}': {e}") from e
        self._devs[label] = chr_
        return {"pty": chr_.pty_name} if isinstance(chr_, PtyChardev) else {}

    def change(self, label: str, backend: dict[str, Any]) -> dict[str, Any]:
        chr_ = self._devs.get(label)
        if chr_ is None:
            raise BlockMirrorError(f"Chardev '{label}' does not exist")
        if chr_.is_mux:
            raise BlockMirrorError("Mux device hotswap not supported yet")
        if chr_.frontend:
            # the only frontends here are monitors and muxes, and neither can be switched
            raise BlockMirrorError("Chardev user does not support chardev hotswap")
        # QEMU's "easy case": the old one goes first, even when the new one then fails
        self._close(chr_)
        return self.add(label, backend)

    def remove(self, label: str) -> None:
        chr_ = self._devs.get(label)
        if chr_ is None:
            raise BlockMirrorError(f"Chardev '{label}' not found")
        if chr_.busy:
            raise BlockMirrorError(f"Chardev '{label}' is busy")
        self._close(chr_)

    def send_break(self, label: str) -> None:
        if label not in self._devs:
            raise BlockMirrorError(f"Chardev '{label}' not found")
        # a break goes to the frontend, and chardevs QMP can reach have none that cares

    def ringbuf(self, label: str) -> RingbufChardev:
        chr_ = self._devs.get(label)
        if chr_ is None:
            raise BlockMirrorError(f"Device '{label}' not found")
        if not isinstance(chr_, RingbufChardev):
            raise BlockMirrorError(f"{label} is not a ringbuf device")
        return chr_

    def _close(self, chr_: Chardev) -> None:
        del self._devs[chr_.label]
        if isinstance(chr_, StdioChardev):
            self._stdio_in_use = False
            self._stdio_closed = True
        chr_.close()

    def close_all(self) -> None:
        for chr_ in list(self._devs.values()):
            chr_.close()
        self._devs.clear()


__all__ = ["BACKENDS", "ChardevRegistry"]
