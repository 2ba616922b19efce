"""Mirror completion: the graph pivot, backing fix-ups and cleanup (cf. mirror_exit_common).

``prepare`` (success) replaces the source (or the ``replaces`` node) by the target in every
parent, after attaching the backing the target should have; ``abort`` only unwires. Both remove
the filter, drop the op blockers and the drain, and close nodes nobody references any more.
"""

from __future__ import annotations

import errno
import logging

from blockmirror.block import options
from blockmirror.block.node import Child, Perm
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.jobs.mirror.active import MirrorActive
from blockmirror.jobs.mirror.params import BLOCKER_REASON, BackingMode

log = logging.getLogger(__name__)


class MirrorPivot(MirrorActive):
    """The job's exit paths."""

    # --- completion (cf. mirror_exit_common) ----------------------------------------------------

    async def prepare(self) -> None:
        await self._exit_common(abort=False)

    async def abort(self) -> None:
        await self._exit_common(abort=True)

    async def _exit_common(self, abort: bool) -> None:
        if self._exited:
            return
        self._exited = True
        graph = self.graph
        src, tgt = self.source, self.target
        if self._hook in src.dirty_trackers:
            src.dirty_trackers.remove(self._hook)
        if self._interceptor in src.interceptors:
            src.interceptors.remove(self._interceptor)
        if self._target_blk is not None:
            graph.remove_backend(self._target_blk)
            self._target_blk = None
        failure: BlockMirrorError | None = None
        pivoted = False
        try:
            exclude: Child | None = None
            if not abort:
                exclude = await self._fix_backing()
            if self.should_complete and not abort:
                to_replace = self._to_replace or src
                # links from the target itself stay (cf. should_update_child): no loops
                own = [c for c in to_replace.parents if c.parent is tgt]
                exclude = own[0] if own else None
                try:
                    graph.replace_node(to_replace, tgt, exclude=exclude)
                    pivoted = True
                    if to_replace is src:
                        self.pivoted_to = tgt
                except BlockMirrorError as e:
                    # QEMU reports this on stderr and fails the job with EPERM
                    log.warning("Can no longer replace '%s' by '%s', because it can no longer "
                                "be guaranteed that doing so would not lead to an abrupt "
                                "change of visible data (%s)", to_replace.name, tgt.name, e)
                    failure = BlockIOError(errno.EPERM)
        except BlockMirrorError as e:
            failure = e
        finally:
            self._remove_filter()
            for node in self._blocked:
                node.unblock("all", BLOCKER_REASON)
            self._blocked.clear()
            if self._to_replace is not None:
                self._to_replace.unblock("all", "block device is in use by block-job-complete")
            self._release_drain()
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
        source whose every parent moved to the target."""
        candidates = [self.source] if pivoted else []
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


__all__ = ["MirrorPivot"]
