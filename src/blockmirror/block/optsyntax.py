"""Option and filename syntaxes around BlockdevOptions: QEMU's spelling in both directions.

keyval's dotted keys become QMP's nested options (the schema types their values); QEMU's legacy
filenames (``json:{...}``, ``blkdebug:CONF:IMAGE``, NBD URIs) become options, and format
probing picks a driver; back the other way, a node's options give the filename QEMU would
report (cf. bdrv_refresh_filename). Pure helpers for ``block/options.py``; nothing is opened.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import Any

from blockmirror.block import threadio
from blockmirror.block.drivers.rbd_filename import parse_rbd_filename
from blockmirror.block.hostpath import host_path
from blockmirror.block.node import BlockNode
from blockmirror.block.query import qemu_json
from blockmirror.errors import BlockMirrorError
from blockmirror.qapi import struct_members

#: option keys that name a child node, per role, in the order QEMU opens them
CHILD_KEYS = ("file", "image", "data-file", "backing")
#: drivers for which one of those keys is a plain option, not a child (rbd's image name)
_PLAIN_KEYS: dict[str, frozenset[str]] = {"rbd": frozenset({"image"})}


def child_keys(driver: object) -> tuple[str, ...]:
    """The CHILD_KEYS that name children for ``driver``."""
    plain = _PLAIN_KEYS.get(driver) if isinstance(driver, str) else None
    return CHILD_KEYS if not plain else tuple(k for k in CHILD_KEYS if k not in plain)

#: options every driver takes (the base members of the schema's BlockdevOptions)
COMMON_KEYS = frozenset(m.name for m in struct_members("BlockdevOptions"))


# --- option dictionaries -------------------------------------------------------------------


def unflatten(options: Mapping[str, Any]) -> dict[str, Any]:
    """Turn keyval's dotted keys into nested dicts (and dicts keyed 0..n-1 into lists).

    Raises:
        BlockMirrorError: when a key is both a value and a parent of dotted keys.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            value = unflatten(value)
        parts = key.split(".")
        cur = out
        for i, part in enumerate(parts[:-1]):
            nxt = cur.get(part)
            if nxt is None:
                nxt = cur[part] = {}
            elif not isinstance(nxt, dict):
                raise BlockMirrorError(
                    f"Parameter '{'.'.join(parts[: i + 1])}' is both a value and a parent"
                )
            cur = nxt
        last = parts[-1]
        if last in cur and isinstance(cur[last], dict) and isinstance(value, dict):
            cur[last].update(value)
        else:
            cur[last] = value
    result: dict[str, Any] = _lists(out)
    return result


def _lists(value: Any) -> Any:
    """Dicts keyed "0".."n-1" (keyval's list syntax) become lists."""
    if isinstance(value, dict):
        value = {k: _lists(v) for k, v in value.items()}
        keys = list(value)
        if keys and all(k.isdigit() for k in keys):
            idx = sorted(int(k) for k in keys)
            if idx == list(range(len(idx))):
                return [value[str(i)] for i in idx]
        return value
    if isinstance(value, list):
        return [_lists(v) for v in value]
    return value


def parse_filename(filename: str) -> dict[str, Any] | None:
    """Options for QEMU's legacy filename syntaxes (json:, blkdebug:, nbd URIs), else None."""
    if filename.startswith("json:"):
        import json  # here: most daemons never see a json: filename (start-up CPU, issue 10)

        try:
            parsed = json.loads(filename[5:])
        except ValueError as e:
            raise BlockMirrorError(f"Could not parse the JSON options: {e}") from e
        if not isinstance(parsed, dict):
            raise BlockMirrorError("Invalid JSON object given")
        return unflatten(parsed)
    if filename.startswith("blkdebug:"):
        # blkdebug:CONFIG:IMAGE (the config part may be empty)
        rest = filename[len("blkdebug:"):]
        conf, sep, image = rest.partition(":")
        if not sep:
            raise BlockMirrorError("Could not parse blkdebug filename")
        dbg: dict[str, Any] = {"driver": "blkdebug", "image": _image_ref(image)}
        if conf:
            dbg["config"] = conf
        return dbg
    if filename.startswith(("nbd:", "nbd+unix://", "nbd://")):
        return _nbd_options(filename)
    if filename.startswith("rbd:"):
        # cf. qemu_rbd_parse_filename
        return {"driver": "rbd", **parse_rbd_filename(filename)}
    return None


def _image_ref(filename: str) -> dict[str, Any]:
    # blkdebug's image is opened as a protocol (no format probing), like QEMU does
    inner = parse_filename(filename)
    if inner is not None:
        return inner
    return {"driver": protocol_for(filename), "filename": filename}


def _nbd_options(uri: str) -> dict[str, Any]:
    from urllib.parse import parse_qs, urlparse

    if uri.startswith("nbd:") and not uri.startswith("nbd:/"):
        # nbd:unix:PATH[:exportname=X] or nbd:HOST:PORT[:exportname=X]
        parts = uri.split(":")
        export = None
        for p in parts:
            if p.startswith("exportname="):
                export = p[len("exportname="):]
        if len(parts) >= 3 and parts[1] == "unix":
            server: dict[str, Any] = {"type": "unix", "path": parts[2]}
        elif len(parts) >= 3:
            server = {"type": "inet", "host": parts[1], "port": parts[2]}
        else:
            raise BlockMirrorError(f"Could not open '{uri}': Invalid argument")
        opts = {"driver": "nbd", "server": server}
        if export is not None:
            opts["export"] = export
        return opts
    u = urlparse(uri)
    export = u.path[1:] if u.path.startswith("/") else u.path
    if u.scheme == "nbd+unix":
        sock = parse_qs(u.query).get("socket", [""])[0]
        server = {"type": "unix", "path": sock}
    else:
        server = {"type": "inet", "host": u.hostname or "localhost", "port": str(u.port or 10809)}
    opts = {"driver": "nbd", "server": server}
    if export:
        opts["export"] = export
    return opts


def nbd_filename(server: dict[str, Any], export: str) -> str:
    """The filename QEMU reports for an nbd node (cf. nbd_refresh_filename)."""
    if server.get("type") == "unix":
        return f"nbd+unix:///{export}?socket={server.get('path', '')}"
    host, port = server.get("host", ""), server.get("port", "10809")
    return f"nbd://{host}:{port}/{export}"


def protocol_for(filename: str) -> str:
    """cf. protocol probing (hdev_probe_device): devices get host_device, the rest file."""
    try:
        mode = os.stat(host_path(filename)).st_mode
    except OSError:
        return "file"
    return "host_device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "file"


def probe_format(filename: str) -> str:
    """cf. bdrv_probe_all, reduced to what we implement: qcow2 magic, else raw."""
    try:
        with open(host_path(filename), "rb") as f:
            head = f.read(4)
    except OSError:
        return "raw"
    return "qcow2" if head == b"QFI\xfb" else "raw"


async def probe_format_async(filename: str) -> str:
    """probe_format, reading the header in the I/O pool."""
    return await threadio.run(probe_format, filename)


# --- opening ---------------------------------------------------------------------------------


def deep_merge(into: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Nested options win over the ones derived from a filename (file.node-name=x, ...)."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value


# --- filenames QEMU reports -----------------------------------------------------------------

#: options that change what a node reads (cf. strong_runtime_opts); only these make a node's
#: filename a json: one. Drivers not listed here keep all their options.
_STRONG_OPTS: dict[str, frozenset[str]] = {
    "raw": frozenset({"offset", "size"}),
    "null-co": frozenset({"size", "read-zeroes"}),
    "null-aio": frozenset({"size", "read-zeroes"}),
    "blkdebug": frozenset({"config", "inject-error", "set-state", "align", "max-transfer",
                           "opt-write-zero", "max-write-zero", "opt-discard", "max-discard"}),
    "qcow2": frozenset(),
    "rbd": frozenset({"pool", "namespace", "image", "conf", "snapshot", "user", "server"}),
}


def refresh_filename(node: BlockNode) -> str:
    """cf. bdrv_refresh_filename: a plain name when the options say nothing more, else json:."""
    drv = node.format_name
    opts = node.options
    strong = _STRONG_OPTS.get(drv)
    extra = {
        k: v for k, v in opts.items()
        if k not in COMMON_KEYS and k not in child_keys(drv) and (strong is None or k in strong)
    }
    if drv in ("file", "host_device"):
        return str(opts.get("filename", ""))
    if drv == "nbd" and isinstance(opts.get("server"), dict) and "tls-creds" not in opts:
        # cf. nbd_refresh_filename: the URI form, as QEMU 7.2 reports it
        return nbd_filename(opts["server"], str(opts.get("export", "")))
    if drv in ("null-co", "null-aio"):
        rest = {k: v for k, v in extra.items() if not (k == "size" and v == 1 << 30)}
        if not rest:
            return f"{drv}://"
        return "json:" + qemu_json({**rest, "driver": drv})
    child = node.file or node.child("image")
    if child is None:
        return "json:" + qemu_json({**extra, "driver": drv})
    if drv == "blkdebug":
        conf = extra.pop("config", "")
        if not extra:
            return f"blkdebug:{conf}:{child.filename}"
    elif not extra and not child.filename.startswith("json:"):
        # a child without a plain filename (rbd) puts this node in json: form too
        return child.filename
    role = "image" if drv == "blkdebug" else "file"
    return "json:" + qemu_json({**extra, "driver": drv, role: _as_json(child)})


def _as_json(node: BlockNode) -> Any:
    if node.filename.startswith("json:"):
        import json  # see parse_filename

        return json.loads(node.filename[5:])
    if node.format_name in ("file", "host_device"):
        return {"driver": node.format_name, "filename": node.filename}
    child = node.file
    if child is not None and node.format_name in ("qcow2", "raw"):
        # cf. bdrv_refresh_filename: a child appears as its full open options
        return {"driver": node.format_name, "file": _as_json(child)}
    return node.filename


__all__ = [
    "CHILD_KEYS",
    "COMMON_KEYS",
    "child_keys",
    "deep_merge",
    "nbd_filename",
    "parse_filename",
    "probe_format",
    "probe_format_async",
    "protocol_for",
    "refresh_filename",
    "unflatten",
]
