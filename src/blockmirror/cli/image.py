"""`blockmirror create|info|map`: qemu-img's create, info and map over our own block layer.

Output matches qemu-img 7.2 (the Formatting line, info's human and JSON forms, map's JSON
entries and their merging), errors go to stderr as ``blockmirror: ...`` with exit status 1,
never a traceback. The work itself is in ``block/create.py``, ``block/options.py`` and
``block/query.py``; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from blockmirror.block.create import img_create, parse_size
from blockmirror.block.driver import BlockStatus
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode
from blockmirror.block.options import attach_backend, close_all, open_image
from blockmirror.block.query import image_info, qemu_key_order, size_to_str
from blockmirror.errors import BlockMirrorError

PROG = "blockmirror"
_PROBE_MAX = 1 << 30


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


def _err(msg: str, hint: str | None = None) -> int:
    print(f"{PROG}: {msg}", file=sys.stderr)
    if hint:
        print(hint, file=sys.stderr)
    return 1


def _parse_o(text: list[str]) -> dict[str, Any]:
    """-o k=v,k=v (repeatable; ',,' escapes a comma, as in QemuOpts)."""
    out: dict[str, Any] = {}
    for chunk in text:
        items: list[str] = []
        cur = ""
        i = 0
        while i < len(chunk):
            c = chunk[i]
            if c == "," and chunk[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            if c == ",":
                items.append(cur)
                cur = ""
            else:
                cur += c
            i += 1
        items.append(cur)
        for item in items:
            if not item:
                continue
            key, sep, value = item.partition("=")
            out[key] = value if sep else "on"
    return out


# --- create ----------------------------------------------------------------------------------


async def _create(argv: list[str]) -> int:
    p = _Parser(prog=f"{PROG} create", add_help=True)
    p.add_argument("-f", dest="fmt", default="raw")
    p.add_argument("-b", dest="backing")
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-u", dest="unsafe", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    p.add_argument("size", nargs="?")
    args = p.parse_args(argv)
    size: int | None = None
    if args.size is not None:
        try:
            size = parse_size(args.size)
        except ValueError:
            print(
                f"{PROG}: Invalid image size specified. You may use k, M, G, T, P or E "
                f"suffixes for\n{PROG}: kilobytes, megabytes, gigabytes, terabytes, "
                "petabytes and exabytes.",
                file=sys.stderr,
            )
            return 1
    options = _parse_o(args.options)
    if "size" in options and size is not None:
        return _err(f"{args.filename}: The image size must be specified only once")
    try:
        await img_create(
            args.filename,
            args.fmt,
            size,
            backing_file=args.backing,
            backing_fmt=args.backing_fmt,
            options=options,
            quiet=args.quiet,
            unsafe=args.unsafe,
        )
    except BlockMirrorError as e:
        return _err(f"{args.filename}: {e}", e.hint)
    return 0


# --- info --------------------------------------------------------------------------------------


def _human_info(info: dict[str, Any]) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        "disk size: "
        + (size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable"),
    ]
    if info.get("cluster-size"):
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full and full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
    if "backing-filename-format" in info:
        lines.append(f"backing file format: {info['backing-filename-format']}")
    spec = info.get("format-specific")
    if spec:
        lines.append("Format specific information:")
        lines += _human_dict(spec.get("data", {}), 1)
    return "\n".join(lines)


def _human_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _human_dict(d: dict[str, Any], level: int) -> list[str]:
    pad = "    " * level
    out: list[str] = []
    for key, value in d.items():
        name = key.replace("-", " ")
        if isinstance(value, dict):
            out.append(f"{pad}{name}:")
            out += _human_dict(value, level + 1)
        elif isinstance(value, list):
            out.append(f"{pad}{name}:")
            for item in value:
                if isinstance(item, dict):
                    out += _human_dict(item, level + 2)
                else:
                    out.append(f"{pad}    [{_human_value(item)}]")
        else:
            out.append(f"{pad}{name}: {_human_value(value)}")
    return out


async def _open_for_query(graph: BlockGraph, filename: str, fmt: str | None, *, backing: bool,
                          force_share: bool) -> BlockNode:
    opts: dict[str, Any] = {"force-share": True} if force_share else {}
    try:
        node = await open_image(graph, filename, fmt, read_only=True, backing=backing,
                                options=opts)
        # like qemu-img: a read-only user sharing everything; formats (qcow2) still refuse
        # to share their metadata file with a writer, unless -U
        attach_backend(graph, node, owner="qemu-img")
        return node
    except BlockMirrorError as e:
        err = BlockMirrorError(f"Could not open '{filename}': {e}")
        err.hint = e.hint
        raise err from e


def _query_args(name: str, argv: list[str], *, backing_chain: bool) -> argparse.Namespace | None:
    """The options `info` and `map` share (as qemu-img's); None for a bad --output value."""
    p = _Parser(prog=f"{PROG} {name}")
    p.add_argument("-f", dest="fmt")
    p.add_argument("--output", default="human")
    if backing_chain:
        p.add_argument("--backing-chain", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("filename")
    args = p.parse_args(argv)
    return args if args.output in ("human", "json") else None


async def _info(argv: list[str]) -> int:
    args = _query_args("info", argv, backing_chain=True)
    if args is None:
        return _err("--output must be used with human or json as argument.")
    graph = BlockGraph()
    try:
        node = await _open_for_query(graph, args.filename, args.fmt,
                                     backing=args.backing_chain, force_share=args.force_share)
        infos = []
        layer: BlockNode | None = node
        while layer is not None:
            infos.append(await image_info(layer, backing_image=False))
            layer = layer.backing.skip_filters() if args.backing_chain and layer.backing else None
    except BlockMirrorError as e:
        return _err(str(e), e.hint)
    finally:
        await close_all(graph)
    if args.output == "json":
        # QEMU prints members in its QDict order: matching it makes the text identical
        print(json.dumps(qemu_key_order(infos if args.backing_chain else infos[0]), indent=4))
    else:
        print("\n\n".join(_human_info(i) for i in infos))
    return 0


# --- map -------------------------------------------------------------------------------------


@dataclass
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str | None

    def mergeable(self, nxt: MapEntry) -> bool:
        """cf. entry_mergeable in qemu-img.c."""
        if self.length == 0:
            return False
        if (self.zero, self.data, self.depth, self.present) != (
            nxt.zero, nxt.data, nxt.depth, nxt.present
        ):
            return False
        if (self.filename is None) != (nxt.filename is None) or self.filename != nxt.filename:
            return False
        if (self.offset is None) != (nxt.offset is None):
            return False
        return self.offset is None or (nxt.offset == self.offset + self.length)

    def json(self) -> str:
        s = (
            f'{{ "start": {self.start}, "length": {self.length}, "depth": {self.depth}, '
            f'"present": {_jb(self.present)}, "zero": {_jb(self.zero)}, "data": {_jb(self.data)}'
        )
        if self.offset is not None:
            s += f', "offset": {self.offset}'
        return s + "}"


def _jb(v: bool) -> str:
    return "true" if v else "false"


async def map_entry(node: BlockNode, offset: int, length: int) -> MapEntry:
    """cf. get_block_status in qemu-img.c: descend the backing chain until data or zeroes."""
    depth = 0
    bs: BlockNode | None = node
    while True:
        assert bs is not None
        bs = bs.skip_filters()
        ext = await bs.block_status(offset, length)
        length = ext.length
        status = ext.status
        if status & (BlockStatus.ZERO | BlockStatus.DATA):
            break
        bs = bs.backing
        if bs is None:
            status = BlockStatus.NONE
            break
        depth += 1
    has_offset = bool(status & BlockStatus.OFFSET_VALID)
    filename = ext.map_node.filename if (has_offset and ext.map_node is not None) else None
    return MapEntry(
        start=offset,
        length=length,
        depth=depth,
        present=bool(status & BlockStatus.ALLOCATED),
        zero=bool(status & BlockStatus.ZERO),
        data=bool(status & BlockStatus.DATA),
        offset=ext.map_offset if has_offset else None,
        filename=filename,
    )


async def map_entries(node: BlockNode) -> list[MapEntry]:
    """The merged entries qemu-img map prints for the node."""
    size = node.length()
    out: list[MapEntry] = []
    cur = MapEntry(0, 0, 0, False, False, False, None, None)
    offset = 0
    while offset < size:
        nxt = await map_entry(node, offset, min(_PROBE_MAX, size - offset))
        if cur.length and cur.mergeable(nxt):
            cur.length += nxt.length
        else:
            if cur.length:
                out.append(cur)
            cur = nxt
        offset += nxt.length
    out.append(cur)
    return out


def format_map_json(entries: list[MapEntry]) -> str:
    return "[" + ",\n".join(e.json() for e in entries) + "]"


def _hx(n: int) -> str:
    # printf's %#x prints 0 without the 0x prefix
    return f"{n:#x}" if n else "0"


def format_map_human(entries: list[MapEntry]) -> str:
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e.data and e.offset is None:
            raise BlockMirrorError("File contains external, encrypted or compressed clusters.")
        if e.data and not e.zero:
            lines.append(f"{_hx(e.start):<16}{_hx(e.length):<16}{_hx(e.offset or 0):<16}"
                         f"{e.filename}")
    return "\n".join(lines)


async def _map(argv: list[str]) -> int:
    args = _query_args("map", argv, backing_chain=False)
    if args is None:
        return _err("--output must be used with human or json as argument.")
    graph = BlockGraph()
    try:
        node = await _open_for_query(graph, args.filename, args.fmt, backing=True,
                                     force_share=args.force_share)
        entries = await map_entries(node)
        text = format_map_json(entries) if args.output == "json" else format_map_human(entries)
    except BlockMirrorError as e:
        return _err(str(e), e.hint)
    finally:
        await close_all(graph)
    print(text)
    return 0


_COMMANDS = {"create": _create, "info": _info, "map": _map}


def run(name: str, argv: list[str]) -> int:
    """Entry from cli/main.py: run one image subcommand, return its exit status."""
    handler = _COMMANDS.get(name)
    if handler is None:
        return _err(f"unknown command '{name}'")
    try:
        return asyncio.run(handler(argv))
    except _Usage as e:
        return _err(str(e))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`... | head`): stop quietly, as qemu-img dies of SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # a bug of ours: still no traceback on the user's terminal
        return _err(f"internal error: {type(e).__name__}: {e}")


__all__ = ["MapEntry", "format_map_human", "format_map_json", "map_entries", "run"]
