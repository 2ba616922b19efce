"""A block job's own links to the nodes it works on (cf. block_job_add_bdrv), and the backing
links it relaxes while it runs.

Each node a job uses gets a root-style link from the job with the permissions the job needs
and shares (QEMU's "main node", "intermediate node", "base", ... children of a job), and the
job's op blocker ("block device is in use by block job: commit"). A permission conflict is
refused with QEMU's text, naming the job as "commit job 'job0'".

While a commit or stream runs, the nodes between top and base must not be read consistently
by anyone but the job (they are about to disappear). In QEMU the backing links inside the
chain then stop asking for consistent read, because the filter on top no longer forwards
it; our backing links have fixed permissions, so ``ChainPerms`` drops that bit from them for
the duration and puts it back afterwards.
"""

from __future__ import annotations

from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, BlockNode, Child, Perm


def blocker_reason(job_type: str) -> str:
    """cf. block_job_create's blocker text."""
    return f"block device is in use by block job: {job_type}"


class JobLinks:
    """The links one job holds on nodes, removed together (cf. block_job_remove_all_bdrv)."""

    def __init__(self, graph: BlockGraph, job_type: str, job_id: str) -> None:
        self.graph = graph
        self.owner = f"{job_type} job '{job_id}'"
        self.reason = blocker_reason(job_type)
        self._links: list[tuple[BlockBackend, BlockNode]] = []

    def add(self, role: str, node: BlockNode, perm: Perm, shared: Perm) -> None:
        """Link the job to ``node`` and block every operation on it.

        Raises:
            BlockMirrorError: a permission conflict with the node's other users.
        """
        blk = BlockBackend("", self.owner, perm, shared)
        self.graph.attach(blk, node, role, perm, shared)
        node.block("all", self.reason)
        self._links.append((blk, node))

    def nodes(self) -> list[BlockNode]:
        return [node for _blk, node in self._links]

    def remove_all(self) -> None:
        for blk, node in reversed(self._links):
            if blk.child is not None:
                self.graph.detach(blk.child)
            node.unblock("all", self.reason)
        self._links.clear()


class ChainPerms:
    """Backing links from ``top`` down to ``base`` that no longer take consistent read."""

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph
        self._relaxed: list[Child] = []
        self._unshared: list[Child] = []

    def relax(self, top: BlockNode, base: BlockNode | None) -> None:
        node: BlockNode | None = top
        while node is not None and node is not base:
            link = node.children.get("backing") or _filter_link(node)
            if link is None:
                break
            if link.perm & Perm.CONSISTENT_READ and not link.passthrough:
                link.perm &= ~Perm.CONSISTENT_READ
                self._relaxed.append(link)
                self.graph.refresh_perms(link.node, best_effort=True)
            node = link.node

    def unshare_writes_below(self, node: BlockNode) -> None:
        """``node``'s users no longer share WRITE: its backing link (and so on down) stops
        sharing WRITE and RESIZE, as QEMU derives it (cf. bdrv_default_perms_for_cow).

        Raises:
            BlockMirrorError: someone writes a node below (QEMU's text names the backing
                link, "node 'mid' (uses node 'base' as 'backing' child)").
        """
        cur: BlockNode | None = node
        while cur is not None:
            _perm, shared = self.graph.cumulative_perms(cur)
            link = cur.children.get("backing")
            if link is None or shared & Perm.WRITE or not link.shared & Perm.WRITE \
                    or link.passthrough:
                return
            link.shared &= ~(Perm.WRITE | Perm.RESIZE)
            self._unshared.append(link)
            self.graph.check_perms(link.node)
            cur = link.node

    def restore(self) -> None:
        """Give the links that still exist their permissions back."""
        for link in reversed(self._relaxed):
            if link in link.node.parents:
                link.perm |= Perm.CONSISTENT_READ
                self.graph.refresh_perms(link.node, best_effort=True)
        self._relaxed.clear()
        for link in reversed(self._unshared):
            link.shared |= Perm.WRITE | Perm.RESIZE
            if link in link.node.parents:
                self.graph.refresh_perms(link.node, best_effort=True)
        self._unshared.clear()


def _filter_link(node: BlockNode) -> Child | None:
    if not node.driver.is_filter:
        return None
    for role in ("file", "backing", "image"):
        if role in node.children:
            return node.children[role]
    return None


def filter_or_cow(node: BlockNode) -> BlockNode | None:
    """cf. bdrv_filter_or_cow_bs: the next node down a chain (filters count as layers)."""
    return node.filtered_child() or node.backing


def chain_contains(top: BlockNode, node: BlockNode) -> bool:
    """cf. bdrv_chain_contains: ``node`` is ``top`` or below it (filters included)."""
    it: BlockNode | None = top
    while it is not None:
        if it is node:
            return True
        it = filter_or_cow(it)
    return False


def find_overlay(active: BlockNode, bs: BlockNode | None) -> BlockNode | None:
    """cf. bdrv_find_overlay: the node of ``active``'s chain whose next layer is ``bs``
    (filters skipped); with ``bs`` None, the last node of the chain."""
    target = bs.skip_filters() if bs is not None else None
    node: BlockNode | None = active.skip_filters()
    while node is not None:
        nxt = node.backing.skip_filters() if node.backing is not None else None
        if nxt is target:
            return node
        node = nxt
    return None


def find_base(node: BlockNode) -> BlockNode | None:
    """cf. bdrv_find_base: the last node of ``node``'s chain (``node`` itself without one)."""
    return find_overlay(node, None)


__all__ = ["ChainPerms", "JobLinks", "blocker_reason", "chain_contains", "filter_or_cow",
           "find_base", "find_overlay"]
