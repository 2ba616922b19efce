"""Filters that hand every request to one child, as the jobs insert them above a node:
``mirror_top``, ``copy-before-write``, ``commit_top`` and ``copy-on-read``.

Such a filter exists so that a node's parents can be moved as one (putting it in and taking it
out are ``replace_node`` calls, ``link_above`` and ``unlink``) and so that the graph can name
the job (``filter-node-name``). A request already on its way through the filter when it is
taken out (held by a drain, or racing the removal) goes on to ``redirect``: the node its
parents went back to.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, ClassVar

from blockmirror.block.driver import BlockDriver, DriverInfo, Extent, WriteFlags
from blockmirror.block.node import BlockNode, Child, Perm
from blockmirror.errors import BlockIOError

if TYPE_CHECKING:
    from blockmirror.block.graph import BlockGraph


class PassThroughFilter(BlockDriver):
    is_filter = True
    #: the child every request goes to
    role: ClassVar[str] = "backing"

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        #: where requests go once the filter is out of the graph
        self.redirect: BlockNode | None = None

    def _child(self) -> BlockNode:
        child = self.node.child(self.role) or self.redirect
        if child is None:
            raise BlockIOError(errno.ENOMEDIUM, "No medium found")
        return child

    def length(self) -> int:
        child = self.node.child(self.role) or self.redirect
        return child.length() if child is not None else 0

    def info(self) -> DriverInfo:
        # a filter has no header of its own: only the cluster size comes from below
        # (cf. bdrv_co_get_info's filter fallback); no backing file name, no format data
        return DriverInfo(cluster_size=self._child().info().cluster_size)

    def has_zero_init(self) -> bool:
        return self._child().driver.has_zero_init()

    async def preadv(self, offset: int, length: int) -> bytes:
        return await self._child().read(offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        await self._child().write(offset, data, fua=WriteFlags.FUA in flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self._child().write_zeroes(
            offset, length, may_unmap=WriteFlags.MAY_UNMAP in flags,
            fua=WriteFlags.FUA in flags, no_fallback=WriteFlags.NO_FALLBACK in flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._child().discard(offset, length)

    async def flush(self) -> None:
        await self._child().flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self._child().block_status(offset, length)


def new_filter_node(graph: BlockGraph, driver: type[PassThroughFilter], name: str | None,
                    source: BlockNode) -> BlockNode:
    """A detached filter node shaped after ``source`` (``link_above`` puts it in the graph);
    without a ``name`` (``filter-node-name``), an implicit one with a generated name."""
    node_name = name or graph.new_auto_name()
    node = BlockNode(name=node_name, implicit=name is None, read_only=source.read_only,
                     discard_unmap=True, filename=source.filename,
                     options={"driver": driver.format_name, "node-name": node_name})
    node.driver = driver(node)
    return node


def link_above(graph: BlockGraph, filt: BlockNode, below: BlockNode, perm: Perm, *,
               passthrough: bool = False) -> Child:
    """cf. bdrv_append: add ``filt`` to the graph as the parent of ``below`` (in the role of
    its driver, taking ``perm`` and sharing everything), then move ``below``'s other parents
    onto it. Returns the link to ``below``.

    Raises:
        BlockMirrorError: a permission conflict; the graph is then as it was.
    """
    assert isinstance(filt.driver, PassThroughFilter)
    graph.add_node(filt)
    link: Child | None = None
    try:
        link = graph.attach(filt, below, filt.driver.role, perm, Perm.all(),
                            passthrough=passthrough)
        graph.replace_node(below, filt, exclude=link)
    except BaseException:
        if link is not None:
            graph.detach(link)
        graph.forget_node(filt)
        raise
    return link


def unlink(graph: BlockGraph, filt: BlockNode, link: Child) -> None:
    """cf. bdrv_replace_node(filter, child) and dropping it: the undoing of ``link_above``.
    The parents go back down to the node below, and so do requests still on their way."""
    below = link.node
    if isinstance(filt.driver, PassThroughFilter):
        filt.driver.redirect = below
    graph.replace_node(filt, below, exclude=link)
    graph.detach(link)
    graph.forget_node(filt)


__all__ = ["PassThroughFilter", "link_above", "new_filter_node", "unlink"]
