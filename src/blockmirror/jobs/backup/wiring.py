"""How a backup hangs in the block graph (cf. bdrv_cbw_append / bdrv_cbw_drop).

``attach`` inserts the ``copy-before-write`` filter above the source (the source's users now
go through it), takes the target for writing, blocks both for other jobs and hooks the source
with the copy-before-write interceptor; ``detach`` undoes exactly that.
"""

from __future__ import annotations

from blockmirror.block import options
from blockmirror.block.drivers.copy_before_write import CopyBeforeWriteDriver
from blockmirror.block.drivers.passthrough import link_above, new_filter_node, unlink
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, BlockNode, Child, Perm, WriteInterceptor
from blockmirror.errors import BlockMirrorError

#: cf. the blocker block_job_create puts on the job's nodes
BLOCKER_REASON = "block device is in use by block job: backup"


class BackupWiring:
    def __init__(self, graph: BlockGraph, job_id: str, source: BlockNode, target: BlockNode,
                 filter_node_name: str | None) -> None:
        self.graph = graph
        self.job_id = job_id
        self.source = source
        self.target = target
        self.filter_node_name = filter_node_name
        self.filter: BlockNode | None = None
        self._link: Child | None = None
        self._target_blk: BlockBackend | None = None
        self._interceptor: WriteInterceptor | None = None
        self._blocked: list[BlockNode] = []

    def insert_filter(self) -> BlockNode:
        """The filter above the source (cf. bdrv_cbw_append).

        Raises:
            BlockMirrorError: a permission conflict (the filter is gone again).
        """
        graph, source = self.graph, self.source
        filt = new_filter_node(graph, CopyBeforeWriteDriver, self.filter_node_name, source)
        perm = Perm.CONSISTENT_READ if source.read_only else Perm.CONSISTENT_READ | Perm.WRITE
        self._link = link_above(graph, filt, source, perm)
        self.filter = filt
        return filt

    def take_target(self, interceptor: WriteInterceptor) -> None:
        """The target handle, the blockers and the source hook.

        Raises:
            BlockMirrorError: the target cannot be written (the filter is removed again).
        """
        blk = BlockBackend("", f"block job '{self.job_id}'", Perm.WRITE,
                           Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED)
        try:
            self.graph.attach(blk, self.target, "root", blk.perm, blk.shared)
        except BlockMirrorError:
            self.remove_filter()
            raise
        self.graph.add_backend(blk)
        self._target_blk = blk
        assert self.filter is not None
        for node in (self.filter, self.target):
            node.block("all", BLOCKER_REASON)
            self._blocked.append(node)
        self.source.interceptors.append(interceptor)
        self._interceptor = interceptor

    def remove_filter(self) -> None:
        if self.filter is not None and self._link is not None:
            unlink(self.graph, self.filter, self._link)
            self.filter = None
            self._link = None

    def detach(self) -> None:
        """Undo ``take_target`` and ``insert_filter`` (cf. bdrv_cbw_drop)."""
        if self._interceptor is not None and self._interceptor in self.source.interceptors:
            self.source.interceptors.remove(self._interceptor)
        self._interceptor = None
        for node in self._blocked:
            node.unblock("all", BLOCKER_REASON)
        self._blocked.clear()
        if self._target_blk is not None:
            self.graph.remove_backend(self._target_blk)
            self._target_blk = None
        self.remove_filter()

    async def close_target_if_unused(self) -> None:
        """drive-backup: the job's reference to the target it opened goes with it."""
        tgt = self.target
        if tgt.name in self.graph.nodes and self.graph.refcount(tgt) == 0:
            await options.close_node(self.graph, tgt)


__all__ = ["BLOCKER_REASON", "BackupWiring"]
