"""transaction: the action table's all-or-nothing order, and snapshot actions on a real graph."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block.node import BlockBackend, Perm
from blockmirror.block.options import open_blockdev
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockMirrorError
from blockmirror.qapi import TYPES
from blockmirror.qapi.schema import UnionType
from blockmirror.qmp.commands import transaction as tx
from blockmirror.qmp.registry import CommandContext


def _recording(log: list[str], name: str, fail: bool = False) -> tx.ActionType:
    async def prepare(ctx: CommandContext, data: dict[str, Any],
                      props: tx.TransactionProperties) -> tx.Action:
        log.append(f"prepare {name}")
        if fail:
            raise BlockMirrorError(f"{name} failed")

        async def step(kind: str) -> None:
            log.append(f"{kind} {name}")

        return tx.Action(commit=lambda: step("commit"), abort=lambda: step("abort"),
                         clean=lambda: step("clean"))

    return tx.ActionType(prepare)


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    log: list[str] = []
    monkeypatch.setitem(tx.ACTIONS, "drive-backup", _recording(log, "A"))
    monkeypatch.setitem(tx.ACTIONS, "blockdev-backup", _recording(log, "B"))
    monkeypatch.setitem(tx.ACTIONS, "blockdev-snapshot-internal-sync",
                        _recording(log, "F", fail=True))
    return log


def _run(actions: list[str], props: dict[str, Any] | None = None) -> None:
    ctx = CommandContext(Daemon())
    asyncio.run(tx.run_transaction(ctx, [{"type": a, "data": {}} for a in actions],
                                   props or {}))


def test_all_prepared_then_all_committed_then_cleaned(table: list[str]) -> None:
    _run(["drive-backup", "blockdev-backup"])
    assert table == ["prepare A", "prepare B", "commit A", "commit B", "clean A", "clean B"]


def test_a_failed_prepare_aborts_the_others_in_reverse(table: list[str]) -> None:
    with pytest.raises(BlockMirrorError, match=r"^F failed$"):
        _run(["drive-backup", "blockdev-backup", "blockdev-snapshot-internal-sync",
              "drive-backup"])
    assert table == ["prepare A", "prepare B", "prepare F", "abort B", "abort A",
                     "clean A", "clean B"]


def test_grouped_completion_mode_needs_grouped_actions(table: list[str]) -> None:
    with pytest.raises(BlockMirrorError) as e:
        _run(["drive-backup"], {"completion-mode": "grouped"})
    assert str(e.value) == ("Action 'drive-backup' does not support Transaction property "
                            "completion-mode = grouped")
    assert table == []


def test_register_action_adds_a_union_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    decl = TYPES["TransactionAction"]
    assert isinstance(decl, UnionType)
    assert decl.branches["blockdev-snapshot-sync"] == "BlockdevSnapshotSyncWrapper"
    with pytest.raises(ValueError, match="registered twice"):
        tx.register_action("abort", tx._prepare_abort)
    with pytest.raises(ValueError, match="not a TransactionActionKind"):
        tx.register_action("frobnicate", tx._prepare_abort)
    # every kind QEMU 7.2 has is implemented now: take one branch away to see the check
    monkeypatch.delitem(decl.branches, "drive-backup")
    monkeypatch.delitem(tx.ACTIONS, "drive-backup", raising=False)
    with pytest.raises(ValueError, match="no branch for drive-backup"):
        tx.register_action("drive-backup", tx._prepare_abort)


def test_snapshot_sync_commit_and_rollback(tmp_path: Path) -> None:
    from blockmirror.block.create import img_create

    async def main() -> None:
        d = Daemon()
        ctx = CommandContext(d)
        base = tmp_path / "base.qcow2"
        await img_create(str(base), "qcow2", 1 << 20, quiet=True)
        await open_blockdev(d.graph, {"driver": "qcow2", "node-name": "base", "file": {
            "driver": "file", "filename": str(base)}})
        node = d.graph.nodes["base"]
        await node.write(0, b"old data")
        dev = BlockBackend("dev0", "block device 'dev0'", Perm.CONSISTENT_READ | Perm.WRITE,
                           Perm.all())
        d.graph.add_backend(dev)
        d.graph.attach(dev, node, "root", dev.perm, dev.shared)

        def snap(name: str) -> dict[str, Any]:
            return {"type": "blockdev-snapshot-sync", "data": {
                "node-name": "base", "snapshot-file": str(tmp_path / f"{name}.qcow2"),
                "snapshot-node-name": name}}

        # rolled back: the device is on base again, base still writable, no overlay node
        with pytest.raises(BlockMirrorError, match="Abort action"):
            await tx.run_transaction(ctx, [snap("s1"), {"type": "abort", "data": {}}], {})
        assert dev.node is node and not node.read_only
        assert "s1" not in d.graph.nodes and not node.parents[1:]
        # committed: the device writes to the overlay, reads fall through to base
        await tx.run_transaction(ctx, [snap("s2")], {})
        top = d.graph.nodes["s2"]
        assert dev.node is top and top.backing is node and node.read_only
        assert await top.read(0, 8) == b"old data"
        await top.write(0, b"new")
        assert await top.read(0, 8) == b"newdata"[:3] + b" data"
        assert await node.read(0, 8) == b"old data"
        with pytest.raises(BlockMirrorError, match="is busy: node is used as backing hd"):
            await tx.run_transaction(ctx, [snap("s3")], {})
        await d.shutdown()

    asyncio.run(main())
