"""External snapshots: a new overlay on top of a node (cf. external_snapshot_* in blockdev.c).

``ExternalSnapshot`` is one blockdev-snapshot or blockdev-snapshot-sync action in QEMU's four
steps, so a transaction can roll it back:

- ``prepare``: find the node, create (``-sync``) and open the overlay, check it, and append it:
  the overlay's ``backing`` link points at the node and every parent of the node (an export,
  a device) moves onto the overlay (``BlockGraph.replace_node``);
- ``commit``: the old top becomes read-only;
- ``abort``: the parents move back and the backing link goes;
- ``clean``: the action drops its reference to the overlay, which is closed if nothing else
  holds it (an overlay of a node without users disappears again, as in QEMU).
"""

from __future__ import annotations

from collections.abc import Callable

from blockmirror.block.create import img_create
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, BlockNode, Child, Perm
from blockmirror.block.options import open_image, unref_node
from blockmirror.block.reopen import set_read_only
from blockmirror.errors import BlockMirrorError


def busy_reason(node: BlockNode) -> str | None:
    """Why external snapshots of ``node`` are blocked (cf. the backing child's op blockers)."""
    for link in node.parents:
        if link.role == "backing" and isinstance(link.parent, BlockNode):
            return f"node is used as backing hd of '{link.parent.name}'"
    reasons = node.blockers.get("external-snapshot") or node.blockers.get("all")
    return reasons[0] if reasons else None


def check_not_busy(node: BlockNode) -> None:
    reason = busy_reason(node)
    if reason is not None:
        raise BlockMirrorError(f"Node '{node.name}' is busy: {reason}")


class ExternalSnapshot:
    def __init__(self, graph: BlockGraph, printer: Callable[[str], None] | None = None) -> None:
        self.graph = graph
        self.printer = printer
        self.old: BlockNode | None = None
        self.new: BlockNode | None = None
        self._link: Child | None = None
        self._moved: list[Child] = []

    # --- prepare ----------------------------------------------------------------------------

    async def _check_old(self, old: BlockNode) -> None:
        check_not_busy(old)
        if not old.read_only:
            try:
                await old.flush()
            except BlockMirrorError as e:
                raise BlockMirrorError(f"Write to node '{old.name}' failed") from e

    async def prepare_existing(self, node: str, overlay: str) -> None:
        """blockdev-snapshot: ``overlay`` is a node added earlier (without a backing)."""
        self.old = old = self.graph.lookup(node, node)
        await self._check_old(old)
        self.new = self.graph.lookup(overlay, overlay)
        await self._append()

    async def prepare_sync(self, device: str | None, node_name: str | None, snapshot_file: str,
                           snapshot_node_name: str | None, fmt: str | None,
                           mode: str | None) -> None:
        """blockdev-snapshot-sync: create the overlay image (unless mode=existing) and open it."""
        self.old = old = self.graph.lookup(device, node_name)
        await self._check_old(old)
        fmt = fmt or "qcow2"
        mode = mode or "absolute-paths"
        if node_name is not None and snapshot_node_name is None:
            raise BlockMirrorError("New overlay node-name missing")
        if snapshot_node_name is not None and (
                self.graph.find_node(snapshot_node_name) is not None
                or self.graph.find_backend(snapshot_node_name) is not None):
            raise BlockMirrorError("New overlay node-name already in use")
        if mode != "existing":
            await img_create(snapshot_file, fmt, old.length(), backing_file=old.filename,
                             backing_fmt=old.format_name, unsafe=True, printer=self.printer)
        self.new = await open_image(self.graph, snapshot_file, fmt, read_only=False,
                                    backing=False, node_name=snapshot_node_name)
        await self._append()

    async def _append(self) -> None:
        """cf. the checks of external_snapshot_prepare, then bdrv_append."""
        old, new = self.old, self.new
        assert old is not None and new is not None
        if any(isinstance(c.parent, BlockBackend) for c in new.parents):
            raise BlockMirrorError("The overlay is already in use")
        check_not_busy(new)
        if new.backing is not None:
            raise BlockMirrorError("The overlay already has a backing image")
        if not type(new.driver).supports_backing:
            raise BlockMirrorError("The overlay does not support backing images")
        if new is old or new in old.backing_chain():
            raise BlockMirrorError(
                f"Making '{old.name}' a backing child of '{new.name}' would create a cycle")
        moving = list(old.parents)
        link = self.graph.attach(new, old, "backing", Perm.CONSISTENT_READ, Perm.all())
        try:
            self.graph.replace_node(old, new, exclude=link)
        except BlockMirrorError:
            self.graph.detach(link)
            raise
        self._link, self._moved = link, moving

    # --- the other three steps ---------------------------------------------------------------

    async def commit(self) -> None:
        """The old top is read-only from now on (cf. external_snapshot_commit)."""
        if self.old is not None and self._link is not None:
            try:
                await set_read_only(self.graph, self.old, True)
            except BlockMirrorError:
                pass  # QEMU ignores a failed reopen here too

    async def abort(self) -> None:
        """Undo the append: parents back on the old node, the backing link gone."""
        old, new, link = self.old, self.new, self._link
        if old is None or new is None or link is None:
            return
        back = [c for c in self._moved if c.node is new]
        for c in back:
            new.parents.remove(c)
            c.node = old
            old.parents.append(c)
        self.graph.detach(link)
        self.graph.refresh_perms(old, best_effort=True)
        self.graph.refresh_perms(new, best_effort=True)
        self._link = None

    async def clean(self) -> None:
        """Drop the action's reference to the overlay (cf. external_snapshot_clean)."""
        if self.new is not None:
            await unref_node(self.graph, self.new)


__all__ = ["ExternalSnapshot", "busy_reason", "check_not_busy"]
