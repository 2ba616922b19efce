"""``--chardev`` options (QemuOpts) -> the ChardevBackend chardev-add takes, as each backend's
``parse`` hook in QEMU's chardev/*.c builds it, with its texts.

Socket and stdio chardevs (the monitor's) are opened by cli/daemon.py itself, which keeps
the early greeter's sockets; every other backend goes through here and the registry.
"""

from __future__ import annotations

from typing import Any

from blockmirror.errors import BlockMirrorError
from blockmirror.qapi import SchemaError, validate

#: every key qemu_chardev_opts knows ("id" is the options' id)
KNOWN_KEYS = frozenset({
    "id", "backend", "path", "host", "port", "fd", "localaddr", "localport", "to", "ipv4",
    "ipv6", "wait", "server", "delay", "nodelay", "reconnect", "telnet", "tn3270",
    "tls-creds", "tls-authz", "websocket", "width", "height", "cols", "rows", "mux", "signal",
    "name", "debug", "size", "chardev", "append", "logfile", "logappend", "mouse",
    "clipboard", "tight", "abstract",
})

#: chardev_alias_translate
ALIASES = {"tty": "serial", "parport": "parallel"}

_SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
              "and exabytes, respectively.")


def _bool(opts: dict[str, str], key: str) -> bool | None:
    val = opts.get(key)
    if val is None:
        return None
    if val in ("on", "yes", "true", "y"):
        return True
    if val in ("off", "no", "false", "n"):
        return False
    raise BlockMirrorError(f"Parameter '{key}' expects 'on' or 'off'")


def _common(opts: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "logfile" in opts:
        out["logfile"] = opts["logfile"]
        out["logappend"] = bool(_bool(opts, "logappend"))
    return out


def _device(opts: dict[str, str], what: str) -> dict[str, Any]:
    path = opts.get("path")
    if path is None:
        raise BlockMirrorError(f"chardev: {what}: no device path given")
    return {"device": path, **_common(opts)}


def backend_of(kind: str, opts: dict[str, str]) -> dict[str, Any]:
    """The ChardevBackend of ``--chardev KIND,...`` for the backends other than socket and
    stdio (``kind`` already translated from its alias)."""
    data: dict[str, Any]
    if kind in ("ringbuf", "memory"):
        data = _common(opts)
        if "size" in opts:
            try:
                # QemuOpts' size syntax (k/M/G/T/P/E suffixes); the text is QemuOpts' own
                size = validate("size", opts["size"], None, "size", keyval=True)
            except SchemaError:
                err = BlockMirrorError(
                    "Parameter 'size' expects a non-negative number below 2^64")
                err.hint = _SIZE_HINT
                raise err from None
            if size:
                data["size"] = size
        return {"type": kind, "data": data}
    if kind == "file":
        path = opts.get("path")
        if path is None:
            raise BlockMirrorError("chardev: file: no filename given")
        data = {"out": path, **_common(opts)}
        append = _bool(opts, "append")
        if append is not None:
            data["append"] = append
        return {"type": "file", "data": data}
    if kind == "pipe":
        return {"type": "pipe", "data": _device(opts, "pipe")}
    if kind == "serial":
        return {"type": "serial", "data": _device(opts, "serial/tty")}
    if kind == "parallel":
        return {"type": "parallel", "data": _device(opts, "parallel")}
    if kind == "udp":
        host = opts.get("host", "")
        port = opts.get("port", "")
        if not port:
            raise BlockMirrorError("chardev: udp: remote port not specified")
        remote = {"type": "inet", "data": {"host": host or "localhost", "port": port}}
        data = {"remote": remote, **_common(opts)}
        if "localaddr" in opts or "localport" in opts:
            data["local"] = {"type": "inet", "data": {
                "host": opts.get("localaddr", ""), "port": opts.get("localport", "0")}}
        return {"type": "udp", "data": data}
    if kind == "mux":
        chardev = opts.get("chardev")
        if chardev is None:
            raise BlockMirrorError("chardev: mux: no chardev given")
        return {"type": "mux", "data": {"chardev": chardev, **_common(opts)}}
    # null, pty, and the kinds that are not built in (the registry refuses those by name)
    return {"type": kind, "data": _common(opts)}


__all__ = ["ALIASES", "KNOWN_KEYS", "backend_of"]
