"""QMP commands of qapi/block-core.json for dirty bitmaps: block-dirty-bitmap-add, -remove,
-clear, -enable, -disable, -merge and x-debug-block-dirty-bitmap-sha256.

Thin handlers over ``blockmirror.block.bitmaps``, whose prepare/commit/abort steps a
transaction can use as well; the commands and types are declared in ``qapi/block_core.py``.
"""

from __future__ import annotations

from typing import Any

from blockmirror.block import bitmaps
from blockmirror.qmp.registry import Args, CommandContext, command


def merge_sources(raw: list[Any]) -> list[bitmaps.MergeSource]:
    """The validated ``bitmaps`` member of block-dirty-bitmap-merge as MergeSources."""
    return [item if isinstance(item, str) else (item["node"], item["name"]) for item in raw]


@command("block-dirty-bitmap-add")
async def block_dirty_bitmap_add(ctx: CommandContext, args: Args) -> None:
    bitmaps.prepare_add(
        ctx.daemon.graph, args.get_str("node"), args.get_str("name"),
        args.opt_int("granularity"), args.get_bool("persistent"), args.get_bool("disabled"),
    ).commit()


@command("block-dirty-bitmap-remove")
async def block_dirty_bitmap_remove(ctx: CommandContext, args: Args) -> None:
    prepared = await bitmaps.prepare_remove(
        ctx.daemon.graph, args.get_str("node"), args.get_str("name")
    )
    prepared.commit()


@command("block-dirty-bitmap-clear")
async def block_dirty_bitmap_clear(ctx: CommandContext, args: Args) -> None:
    bitmaps.prepare_clear(ctx.daemon.graph, args.get_str("node"), args.get_str("name")).commit()


@command("block-dirty-bitmap-enable")
async def block_dirty_bitmap_enable(ctx: CommandContext, args: Args) -> None:
    bitmaps.prepare_enable(
        ctx.daemon.graph, args.get_str("node"), args.get_str("name"), True
    ).commit()


@command("block-dirty-bitmap-disable")
async def block_dirty_bitmap_disable(ctx: CommandContext, args: Args) -> None:
    bitmaps.prepare_enable(
        ctx.daemon.graph, args.get_str("node"), args.get_str("name"), False
    ).commit()


@command("block-dirty-bitmap-merge")
async def block_dirty_bitmap_merge(ctx: CommandContext, args: Args) -> None:
    bitmaps.prepare_merge(
        ctx.daemon.graph, args.get_str("node"), args.get_str("target"),
        merge_sources(args["bitmaps"]),
    ).commit()


@command("x-debug-block-dirty-bitmap-sha256")
async def x_debug_block_dirty_bitmap_sha256(ctx: CommandContext, args: Args) -> dict[str, Any]:
    return {"sha256": bitmaps.sha256(ctx.daemon.graph, args.get_str("node"),
                                     args.get_str("name"))}
