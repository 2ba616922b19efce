"""How a mirror hangs in the block graph, set up and taken down in one place.

cf. mirror_start_job (``attach``) and mirror_exit_common (``exit``). ``attach`` inserts the
``mirror_top`` filter above the source (every parent of the source now goes through it),
takes a root handle on the target, puts op blockers on the nodes it uses and hooks the source
with the dirty tracker and the write interceptor. ``exit`` undoes exactly that, and on success
first fixes the target's backing and replaces the source (or the ``replaces`` node) by the
target in every parent: the pivot. Then it closes what nobody references any more.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from blockmirror.block import options
from blockmirror.block.drivers.mirror_top import MirrorTopDriver
from blockmirror.block.drivers.passthrough import link_above, new_filter_node, unlink
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import (
    BlockBackend,
    BlockNode,
    Child,
    DirtyTracker,
    Perm,
    WriteInterceptor,
)
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.jobs.mirror.params import BLOCKER_REASON, BackingMode, MirrorParams

log = logging.getLogger(__name__)

#: the op blocker block-job-complete puts on the ``replaces`` node
_REPLACE_REASON = "block device is in use by block-job-complete"


class MirrorWiring:
    """The filter, the target handle, the blockers and the source hooks of one mirror."""

    def __init__(self, graph: BlockGraph, job_id: str, source: BlockNode, target: BlockNode,
                 params: MirrorParams, base: BlockNode | None) -> None:
        self.graph = graph
        self.job_id = job_id
        self.source = source
        self.target = target
        self.params = params
        #: the source's backing for sync=top (what the target's backing becomes)
        self.base = base
        self.filter: BlockNode | None = None
        self._filter_link: Child | None = None
        self._target_blk: BlockBackend | None = None
        self._blocked: list[BlockNode] = []
        self._tracker: DirtyTracker | None = None
        self._interceptor: WriteInterceptor | None = None
        #: the node block-job-complete named in ``replaces``
        self.to_replace: BlockNode | None = None
        self.exited = False
        #: the op blocker's text names the job type (cf. block_job_create)
        self.blocker_reason = (BLOCKER_REASON if params.job_type == "mirror" else
                               f"block device is in use by block job: {params.job_type}")
        #: the backing fix-up or the pivot failed (known when ``exit`` calls ``release``)
        self.exit_failed = False

    # --- setup --------------------------------------------------------------------------------

    def attach(self, tracker: DirtyTracker, interceptor: WriteInterceptor) -> None:
        """Insert the filter, take the target, block the nodes, hook the source.

        Raises:
            BlockMirrorError: permission conflicts, duplicate filter name.
        """
        graph = self.graph
        filt = new_filter_node(graph, MirrorTopDriver, self.params.filter_node_name, self.source)
        self._filter_link = link_above(graph, filt, self.source, Perm.CONSISTENT_READ | Perm.WRITE)
        self.filter = filt
        perm, shared = Perm.WRITE, Perm.WRITE_UNCHANGED
        if self.params.target_is_backing:
            # an active commit's target is a backing file in use (cf. mirror_start_job)
            shared |= Perm.CONSISTENT_READ | Perm.WRITE
            if self.target.length() < self.source.length():
                perm |= Perm.RESIZE
        blk = BlockBackend("", f"block job '{self.job_id}'", perm, shared)
        try:
            graph.attach(blk, self.target, "root", blk.perm, blk.shared)
        except BlockMirrorError:
            self.remove_filter()
            raise
        graph.add_backend(blk)
        self._target_blk = blk
        for node in (filt, self.source, self.target):
            node.block("all", self.blocker_reason)
            self._blocked.append(node)
        self.source.dirty_trackers.append(tracker)
        self.source.interceptors.append(interceptor)
        self._tracker, self._interceptor = tracker, interceptor

    def quiesce_filter(self, on: bool) -> None:
        """Hold (or let go) requests at the filter itself, for the drain gate."""
        if self.filter is not None and isinstance(self.filter.driver, MirrorTopDriver):
            self.filter.driver.quiesce(on)

    def block_replaced(self) -> None:
        """cf. mirror_complete: ``replaces`` must exist and is blocked until the pivot.

        Raises:
            BlockMirrorError: the node does not exist.
        """
        name = self.params.replaces
        if name is None:
            return
        node = self.graph.find_node(name)
        if node is None:
            raise BlockMirrorError(f"Node name '{name}' not found")
        node.block("all", _REPLACE_REASON)
        self.to_replace = node

    # --- the inverse ----------------------------------------------------------------------------

    def remove_filter(self) -> None:
        filt, link = self.filter, self._filter_link
        if filt is None or link is None:
            return
        unlink(self.graph, filt, link)
        self.filter = None
        if isinstance(filt.driver, MirrorTopDriver):
            filt.driver.quiesce(False)  # held requests go on, to ``redirect``

    def _unhook(self) -> None:
        src = self.source
        if self._tracker is not None and self._tracker in src.dirty_trackers:
            src.dirty_trackers.remove(self._tracker)
        if self._interceptor is not None and self._interceptor in src.interceptors:
            src.interceptors.remove(self._interceptor)
        if self._target_blk is not None:
            self.graph.remove_backend(self._target_blk)
            self._target_blk = None

    async def exit(self, *, pivot: bool,
                   release: Callable[[BlockNode | None], None]) -> None:
        """cf. mirror_exit_common: undo ``attach``; with ``pivot``, replace the source.

        ``release`` is called once the graph is settled, before unused nodes are closed,
        with the node that writes held across the pivot must also reach (or None): it lets
        the writes held at the drain gate go on while the source is still open.

        Raises:
            BlockMirrorError: the backing fix-up or the pivot failed (the job fails).
        """
        if self.exited:
            return
        self.exited = True
        graph, src, tgt = self.graph, self.source, self.target
        self._unhook()
        failure: BlockMirrorError | None = None
        pivoted = False
        redirect: BlockNode | None = None
        try:
            exclude: Child | None = await self._fix_backing() if pivot else None
            if pivot:
                to_replace = self.to_replace or src
                # links from the target itself stay (cf. should_update_child): no loops
                own = [c for c in to_replace.parents if c.parent is tgt]
                exclude = own[0] if own else None
                try:
                    graph.replace_node(to_replace, tgt, exclude=exclude)
                    pivoted = True
                    if to_replace is src:
                        redirect = tgt
                except BlockMirrorError as e:
                    # QEMU reports this on stderr and fails the job with EPERM
                    log.warning("Can no longer replace '%s' by '%s', because it can no longer "
                                "be guaranteed that doing so would not lead to an abrupt "
                                "change of visible data (%s)", to_replace.name, tgt.name, e)
                    failure = BlockIOError(errno.EPERM)
        except BlockMirrorError as e:
            failure = e
        finally:
            self.remove_filter()
            for node in self._blocked:
                node.unblock("all", self.blocker_reason)
            self._blocked.clear()
            if self.to_replace is not None:
                self.to_replace.unblock("all", _REPLACE_REASON)
            self.exit_failed = failure is not None
            release(redirect)
        await self._drop_unused(pivoted)
        if failure is not None:
            raise failure

    async def _fix_backing(self) -> Child | None:
        """Backing fix-ups on success; returns the new backing link (kept out of the pivot)."""
        mode = self.params.backing_mode
        tgt = self.target
        if mode == BackingMode.SOURCE:
            backing = self.source if self.params.sync == "none" else self.base
            if backing is None or tgt.backing is backing:
                return None
            old = tgt.children.get("backing")
            if old is not None:
                self.graph.detach(old)
            try:
                return self.graph.attach(tgt, backing, "backing", Perm.CONSISTENT_READ,
                                         Perm.all())
            except BlockMirrorError as e:
                raise BlockIOError(errno.EPERM) from e
        if mode == BackingMode.OPEN and tgt.backing is None:
            # cf. bdrv_open_backing_file: the backing named in the target's header
            try:
                await options.open_backing_file(self.graph, tgt)
            except BlockMirrorError as e:
                raise BlockIOError(errno.EPERM) from e
            link = tgt.children.get("backing")
            return link if link is not None and link.node is self.source else None
        return None

    async def _drop_unused(self, pivoted: bool) -> None:
        """Close what nobody references any more: a drive-mirror target left behind, or a
        source (or the ``replaces`` node, e.g. a format node below a throttle filter) whose
        every parent moved to the target."""
        candidates = [self.to_replace or self.source] if pivoted else []
        if self.params.owns_target:
            # drive-mirror's reference goes with the job (cf. bdrv_unref(target_bs)): a
            # target no parent adopted is closed, pivot or not
            candidates.append(self.target)
        for node in candidates:
            if node.name in self.graph.nodes and self.graph.refcount(node) == 0:
                try:
                    await options.close_node(self.graph, node)
                except BlockMirrorError:
                    log.exception("closing %s after the mirror", node.name)


__all__ = ["MirrorWiring"]
