"""Character device commands (cf. QEMU's chardev/char.c and char-ringbuf.c): chardev-add,
chardev-change, chardev-remove, chardev-send-break, query-chardev, query-chardev-backends,
ringbuf-write, ringbuf-read. The semantics live in ``chardev/registry.py``."""

from __future__ import annotations

import base64
from typing import Any

from blockmirror.chardev import BACKENDS
from blockmirror.chardev.text import decode_base64, encode_qmp_string, qmp_string_of
from blockmirror.errors import BlockMirrorError
from blockmirror.qapi.char import DataFormat
from blockmirror.qmp.registry import Args, CommandContext, command


@command("query-chardev")
async def query_chardev(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    return [{"label": c.label, "filename": c.filename, "frontend-open": c.frontend_open}
            for c in ctx.daemon.chardevs]


@command("query-chardev-backends")
async def query_chardev_backends(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    return [{"name": name} for name in BACKENDS]


@command("chardev-add")
async def chardev_add(ctx: CommandContext, args: Args) -> dict[str, Any]:
    return ctx.daemon.chardevs.add(args.get_str("id"), dict(args["backend"]))


@command("chardev-change")
async def chardev_change(ctx: CommandContext, args: Args) -> dict[str, Any]:
    return ctx.daemon.chardevs.change(args.get_str("id"), dict(args["backend"]))


@command("chardev-remove")
async def chardev_remove(ctx: CommandContext, args: Args) -> None:
    ctx.daemon.chardevs.remove(args.get_str("id"))


@command("chardev-send-break")
async def chardev_send_break(ctx: CommandContext, args: Args) -> None:
    ctx.daemon.chardevs.send_break(args.get_str("id"))


@command("ringbuf-write")
async def ringbuf_write(ctx: CommandContext, args: Args) -> None:
    ring = ctx.daemon.chardevs.ringbuf(args.get_str("device"))
    text = args.get_str("data")
    if args.get_str("format") == DataFormat.BASE64:
        ring.write(decode_base64(text))
    else:
        ring.write(encode_qmp_string(text))


@command("ringbuf-read")
async def ringbuf_read(ctx: CommandContext, args: Args) -> str:
    ring = ctx.daemon.chardevs.ringbuf(args.get_str("device"))
    size = args.get_int("size")
    if size <= 0:
        raise BlockMirrorError("size must be greater than zero")
    data = ring.read(min(size, ring.count))
    if args.get_str("format") == DataFormat.BASE64:
        return base64.b64encode(data).decode("ascii")
    return qmp_string_of(data)
