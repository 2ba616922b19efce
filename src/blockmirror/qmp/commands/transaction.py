"""``transaction``: several actions, all or nothing (cf. qmp_transaction in blockdev.c, 7.2).

The action table maps each TransactionAction ``type`` to a *prepare* function. Prepare does
the work that can fail and returns an ``Action`` holding the remaining steps; once every
action prepared, every ``commit`` runs in order; if one prepare fails, every action prepared
so far (the failed one included) is aborted in reverse order; ``clean`` runs for all of them
at the end in both cases.

Registering an action (the dirty-bitmap module does this for block-dirty-bitmap-*)::

    from blockmirror.qmp.commands.transaction import Action, register_action

    async def prepare_bitmap_add(ctx: CommandContext, data: dict[str, Any],
                                 props: TransactionProperties) -> Action:
        ...                      # checks and the change itself; raise BlockMirrorError to fail
        return Action(abort=undo)  # commit/abort/clean: async callables, each optional

    register_action("block-dirty-bitmap-add", prepare_bitmap_add)

and, in ``blockmirror/qapi/transaction.py``, the union branch
``"block-dirty-bitmap-add": "BlockDirtyBitmapAddWrapper"`` with
``struct("BlockDirtyBitmapAddWrapper", {"data": "BlockDirtyBitmapAdd"})``. ``grouped=True``
marks an action that supports ``completion-mode=grouped`` (job-starting actions); the others
refuse it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from blockmirror.block import bitmaps
from blockmirror.block.snapshot import ExternalSnapshot
from blockmirror.errors import BlockMirrorError
from blockmirror.qapi import TYPES
from blockmirror.qapi.schema import UnionType
from blockmirror.qapi.transaction import ACTION_KINDS
from blockmirror.qmp.commands.bitmaps import merge_sources
from blockmirror.qmp.registry import Args, CommandContext, command

Step = Callable[[], Awaitable[None]]


@dataclass
class Action:
    """The steps of one prepared action; each runs at most once."""

    commit: Step | None = None
    abort: Step | None = None
    clean: Step | None = None


@dataclass(frozen=True)
class TransactionProperties:
    completion_mode: str = "individual"


Prepare = Callable[[CommandContext, dict[str, Any], TransactionProperties], Awaitable[Action]]


@dataclass(frozen=True)
class ActionType:
    prepare: Prepare
    grouped: bool = False


#: the action table: TransactionAction type -> how to prepare it
ACTIONS: dict[str, ActionType] = {}

def register_action(kind: str, prepare: Prepare, *, grouped: bool = False) -> None:
    """Add ``kind`` to the action table (its branch of TransactionAction is declared in
    ``blockmirror.qapi.transaction``)."""
    if kind not in ACTION_KINDS:
        raise ValueError(f"{kind} is not a TransactionActionKind")
    if kind in ACTIONS:
        raise ValueError(f"transaction action {kind} registered twice")
    decl = TYPES["TransactionAction"]
    assert isinstance(decl, UnionType)
    if kind not in decl.branches:
        raise ValueError(f"TransactionAction has no branch for {kind} in blockmirror.qapi")
    ACTIONS[kind] = ActionType(prepare, grouped)


async def run_transaction(ctx: CommandContext, actions: list[dict[str, Any]],
                          properties: dict[str, Any]) -> None:
    """cf. qmp_transaction: prepare all, then commit all, or abort all in reverse."""
    props = TransactionProperties(properties.get("completion-mode", "individual"))
    for act in actions:
        kind = act["type"]
        if kind not in ACTIONS:
            raise BlockMirrorError(f"Action '{kind}' is not supported by blockmirror")
    prepared: list[Action] = []
    # the failed action is aborted too (QEMU queues its state before preparing it), so each
    # prepare function must leave nothing behind when it raises: its abort step is not known
    try:
        for act in actions:
            # checked as each action prepares (cf. action_check_completion_mode): the
            # actions before it are rolled back
            if props.completion_mode != "individual" and not ACTIONS[act["type"]].grouped:
                raise BlockMirrorError(
                    f"Action '{act['type']}' does not support Transaction property "
                    f"completion-mode = {props.completion_mode}")
            prepared.append(await ACTIONS[act["type"]].prepare(ctx, act.get("data", {}),
                                                                 props))
    except BaseException:
        for done in reversed(prepared):
            if done.abort is not None:
                await done.abort()
        await _clean(prepared)
        raise
    for done in prepared:
        if done.commit is not None:
            await done.commit()
    await _clean(prepared)


async def _clean(prepared: list[Action]) -> None:
    for done in prepared:
        if done.clean is not None:
            await done.clean()


@command("transaction")
async def transaction(ctx: CommandContext, args: Args) -> None:
    await run_transaction(ctx, list(args["actions"]), dict(args.get("properties") or {}))


# --- the actions built here ------------------------------------------------------------------


async def _prepare_abort(ctx: CommandContext, data: dict[str, Any],
                         props: TransactionProperties) -> Action:
    raise BlockMirrorError("Transaction aborted using Abort action")


async def _prepare_snapshot(ctx: CommandContext, data: dict[str, Any],
                            props: TransactionProperties, sync: bool) -> Action:
    snap = ExternalSnapshot(ctx.daemon.graph, ctx.daemon.print_stdout)
    try:
        if sync:
            await snap.prepare_sync(data.get("device"), data.get("node-name"),
                                    data["snapshot-file"], data.get("snapshot-node-name"),
                                    data.get("format"), data.get("mode"))
        else:
            await snap.prepare_existing(data["node"], data["overlay"])
    except BaseException:
        # a half-prepared snapshot is rolled back here, then its overlay released
        await snap.abort()
        await snap.clean()
        raise
    return Action(commit=snap.commit, abort=snap.abort, clean=snap.clean)


async def _prepare_snapshot_sync(ctx: CommandContext, data: dict[str, Any],
                                 props: TransactionProperties) -> Action:
    return await _prepare_snapshot(ctx, data, props, sync=True)


async def _prepare_blockdev_snapshot(ctx: CommandContext, data: dict[str, Any],
                                     props: TransactionProperties) -> Action:
    return await _prepare_snapshot(ctx, data, props, sync=False)


# --- dirty bitmaps (block/bitmaps.py prepares them; commit/abort are synchronous there) -----


def _bitmap_action(prepared: bitmaps.Prepared) -> Action:
    async def commit() -> None:
        prepared.commit()

    async def abort() -> None:
        prepared.abort()

    return Action(commit=commit, abort=abort)


async def _prepare_bitmap_add(ctx: CommandContext, data: dict[str, Any],
                              props: TransactionProperties) -> Action:
    return _bitmap_action(bitmaps.prepare_add(
        ctx.daemon.graph, data["node"], data["name"], data.get("granularity"),
        bool(data.get("persistent", False)), bool(data.get("disabled", False))))


async def _prepare_bitmap_remove(ctx: CommandContext, data: dict[str, Any],
                                 props: TransactionProperties) -> Action:
    return _bitmap_action(await bitmaps.prepare_remove(ctx.daemon.graph, data["node"],
                                                       data["name"]))


async def _prepare_bitmap_clear(ctx: CommandContext, data: dict[str, Any],
                                props: TransactionProperties) -> Action:
    return _bitmap_action(bitmaps.prepare_clear(ctx.daemon.graph, data["node"], data["name"]))


async def _prepare_bitmap_enable(ctx: CommandContext, data: dict[str, Any],
                                 props: TransactionProperties) -> Action:
    return _bitmap_action(bitmaps.prepare_enable(ctx.daemon.graph, data["node"], data["name"],
                                                 True))


async def _prepare_bitmap_disable(ctx: CommandContext, data: dict[str, Any],
                                  props: TransactionProperties) -> Action:
    return _bitmap_action(bitmaps.prepare_enable(ctx.daemon.graph, data["node"], data["name"],
                                                 False))


async def _prepare_bitmap_merge(ctx: CommandContext, data: dict[str, Any],
                                props: TransactionProperties) -> Action:
    return _bitmap_action(bitmaps.prepare_merge(ctx.daemon.graph, data["node"], data["target"],
                                                merge_sources(data["bitmaps"])))


# QEMU's abort action does not check the completion mode: it fails in any mode
register_action("abort", _prepare_abort, grouped=True)
register_action("block-dirty-bitmap-add", _prepare_bitmap_add)
register_action("block-dirty-bitmap-remove", _prepare_bitmap_remove)
register_action("block-dirty-bitmap-clear", _prepare_bitmap_clear)
register_action("block-dirty-bitmap-enable", _prepare_bitmap_enable)
register_action("block-dirty-bitmap-disable", _prepare_bitmap_disable)
register_action("block-dirty-bitmap-merge", _prepare_bitmap_merge)
register_action("blockdev-snapshot-sync", _prepare_snapshot_sync)
register_action("blockdev-snapshot", _prepare_blockdev_snapshot)
