"""Block nodes, the links between them, and the root handles that use them.

A ``BlockNode`` is one driver instance in the graph (cf. BlockDriverState). Its links to children
are ``Child`` objects (cf. BdrvChild) owned by the parent, which is either another node or a
``BlockBackend``: a root handle held by a device, an NBD export or a job (cf. BlockBackend).
Every node lists the ``Child`` links that point at it, so the graph can move all of a node's
parents to another node at once (the mirror's pivot, ``BlockGraph.replace_node``).

I/O enters through the node's public methods (``read``, ``write``, ...), implemented by the
generic request path in ``block/io.py``; this module holds only structure.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from blockmirror.block import io
from blockmirror.block.bitmaps import NodeBitmaps
from blockmirror.block.stats import BlockStats

if TYPE_CHECKING:
    from blockmirror.block.driver import BlockDriver, DriverInfo, Extent


class Perm(enum.Flag):
    """cf. BLK_PERM_*: what a parent does with a child, and what it lets others do."""

    NONE = 0
    CONSISTENT_READ = enum.auto()
    WRITE = enum.auto()
    WRITE_UNCHANGED = enum.auto()
    RESIZE = enum.auto()

    @classmethod
    def all(cls) -> Perm:
        return cls.CONSISTENT_READ | cls.WRITE | cls.WRITE_UNCHANGED | cls.RESIZE

    def describe(self) -> str:
        """QEMU's words for a permission set, as in 'Permission conflict' messages."""
        words = {
            Perm.CONSISTENT_READ: "consistent read",
            Perm.WRITE: "write",
            Perm.WRITE_UNCHANGED: "write unchanged",
            Perm.RESIZE: "resize",
        }
        return ", ".join(w for p, w in words.items() if p in self)


class DirtyTracker(Protocol):
    """Anything told about every range written to a node (dirty bitmaps of jobs)."""

    def mark(self, offset: int, length: int) -> None: ...


class WriteInterceptor(Protocol):
    """Sees writes before they reach a node's driver (active mirroring, fault scripts).

    ``kind`` is "write", "zero" or "discard". ``proceed`` performs the write on this node; the
    interceptor must await it exactly once and may do more work before and after.
    """

    async def around_write(
        self, node: BlockNode, kind: str, offset: int, length: int, proceed: Any
    ) -> None: ...


class BlockBackend:
    """A root reference to a node: a device, an export or a job's handle (cf. BlockBackend).

    ``name`` is the device name ('' for anonymous backends such as exports and jobs);
    ``owner`` describes the user for permission-conflict messages, e.g. "block device 'drive0'".
    """

    def __init__(self, name: str, owner: str, perm: Perm, shared: Perm) -> None:
        self.name = name
        self.owner = owner
        self.perm = perm
        self.shared = shared
        self.child: Child | None = None

    @property
    def node(self) -> BlockNode | None:
        return self.child.node if self.child else None

    def __repr__(self) -> str:
        return f"<BlockBackend {self.name or self.owner!s}>"




@dataclass(eq=False)
class Child:
    """A link from a parent to a node in a named role ("file", "backing", "image", "root")."""

    parent: BlockNode | BlockBackend
    node: BlockNode
    role: str
    perm: Perm
    shared: Perm
    #: a filter-like link (raw's file, blkdebug's image): ``perm``/``shared`` follow what the
    #: parent's own users need (cf. bdrv_filter_default_perms), plus ``take``, minus ``unshare``;
    #: the graph recomputes them whenever the parent's users change
    passthrough: bool = False
    take: Perm = Perm.NONE
    unshare: Perm = Perm.NONE

    def parent_description(self) -> str:
        if isinstance(self.parent, BlockBackend):
            return self.parent.owner
        return f"node '{self.parent.name}'"


@dataclass(eq=False)
class BlockNode:
    """One node of the graph. Created and linked only through ``BlockGraph``."""

    name: str
    driver: BlockDriver = field(init=False)
    #: the node's own options as opened (QMP nested form; children given by node name)
    options: dict[str, Any] = field(default_factory=dict)
    #: True for implicit filters (cf. bs->implicit: a mirror_top without filter-node-name),
    #: which queries skip. Auto-named children opened from options (#blockNNN) are NOT
    #: implicit: QEMU lists them in query-named-block-nodes.
    implicit: bool = False
    read_only: bool = False
    #: discard=unmap: discards and zero-writes with MAY_UNMAP may reach the driver
    discard_unmap: bool = False
    detect_zeroes: str = "off"  # off | on | unmap
    cache_direct: bool = False
    cache_no_flush: bool = False
    #: the filename QEMU would report (json:{...} for nodes without a simple one)
    filename: str = ""
    children: dict[str, Child] = field(default_factory=dict)
    parents: list[Child] = field(default_factory=list)
    #: reasons that block graph operations (cf. op blockers): op name -> reasons
    blockers: dict[str, list[str]] = field(default_factory=dict)
    dirty_trackers: list[DirtyTracker] = field(default_factory=list)
    interceptors: list[WriteInterceptor] = field(default_factory=list)
    #: run-time fault rules (block/faults.py), checked by the request path when non-empty
    fault_rules: list[Any] = field(default_factory=list, repr=False)
    #: requests being processed right now, and the drain barrier state (see block/io.py)
    in_flight: int = 0
    quiesce_counter: int = 0
    #: completed writes (data, zeroes, discards) and the count the last good flush covered:
    #: a flush with nothing new to write back does nothing (cf. write_gen/flushed_gen)
    write_gen: int = 0
    flushed_gen: int = 0
    #: set when in_flight drops to 0 while someone waits in drain() (see block/io.py)
    drain_event: asyncio.Event | None = field(default=None, repr=False)
    #: writes in flight on nodes with request_alignment > 1, for RMW serialisation (io.py)
    write_ranges: list[Any] = field(default_factory=list, repr=False)
    #: set once an inconsistency was found (qcow2 corrupt bit): further writes fail
    corrupt: bool = False
    #: I/O accounting for query-blockstats (fed by block/io.py)
    stats: BlockStats = field(default_factory=BlockStats, repr=False)
    #: block-set-write-threshold: the first write ending past it emits BLOCK_WRITE_THRESHOLD
    #: and resets it to 0 (block/write_threshold.py)
    write_threshold: int = 0
    #: the graph the node belongs to (set by BlockGraph.add_node)
    graph: Any = field(default=None, repr=False)
    #: named dirty bitmaps (block/bitmaps.py), each also one of ``dirty_trackers``
    bitmaps: NodeBitmaps = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.bitmaps = NodeBitmaps(self)

    # --- structure ------------------------------------------------------------------------

    def child(self, role: str) -> BlockNode | None:
        link = self.children.get(role)
        return link.node if link else None

    @property
    def file(self) -> BlockNode | None:
        return self.child("file")

    @property
    def backing(self) -> BlockNode | None:
        return self.child("backing")

    @property
    def format_name(self) -> str:
        return self.driver.format_name

    def filtered_child(self) -> BlockNode | None:
        """The child a filter passes everything to (cf. bdrv_filter_bs)."""
        if not self.driver.is_filter:
            return None
        for role in ("file", "backing", "image"):
            if role in self.children:
                return self.children[role].node
        return None

    def skip_filters(self) -> BlockNode:
        node = self
        while (inner := node.filtered_child()) is not None:
            node = inner
        return node

    def truncate_target(self) -> BlockNode:
        """The node a resize of this one lands on: filters without a resize of their own
        pass it to their child (cf. bdrv_co_truncate)."""
        node = self
        while not type(node.driver).supports_truncate and node.driver.is_filter:
            inner = node.filtered_child()
            if inner is None:
                break
            node = inner
        return node

    def skip_implicit_filters(self) -> BlockNode:
        """This node, or below the implicit filters above it the first explicit node (cf.
        bdrv_skip_implicit_filters): what the user named, not a job's unnamed filter."""
        node = self
        while node.implicit and (inner := node.filtered_child()) is not None:
            node = inner
        return node

    def backing_chain(self) -> list[BlockNode]:
        """This node, then its backing, and so on (filters skipped between layers)."""
        chain: list[BlockNode] = []
        node: BlockNode | None = self.skip_filters()
        while node is not None and node not in chain:
            chain.append(node)
            nxt = node.backing
            node = nxt.skip_filters() if nxt else None
        return chain

    def length(self) -> int:
        return self.driver.length()

    def can_write_zeroes_with_unmap(self) -> bool:
        """cf. bdrv_can_write_zeroes_with_unmap: discard=unmap and a driver that really unmaps
        (what decides whether a mirror may pre-zero its target cheaply)."""
        return self.discard_unmap and self.driver.can_write_zeroes_with_unmap

    def has_zero_init(self) -> bool:
        return self.driver.has_zero_init()

    def info(self) -> DriverInfo:
        return self.driver.info()

    def debug_event(self, event: str) -> None:
        """Raise a blkdebug event (e.g. "read_aio") on this node or the first one below it
        that handles events (cf. BLKDBG_EVENT / bdrv_debug_event); formats call it on their
        ``file`` child just before data I/O."""
        node: BlockNode | None = self
        while node is not None:
            drv = getattr(node, "driver", None)
            if drv is None or drv.debug_event(event):
                return
            node = node.file or node.child("image") or node.filtered_child()

    def block(self, op: str, reason: str) -> None:
        self.blockers.setdefault(op, []).append(reason)

    def unblock(self, op: str, reason: str) -> None:
        reasons = self.blockers.get(op, [])
        if reason in reasons:
            reasons.remove(reason)
        if not reasons:
            self.blockers.pop(op, None)

    # --- I/O (the generic request path lives in block/io.py) --------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        return await io.read(self, offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await io.write(self, offset, data, fua=fua)

    async def write_compressed(self, offset: int, data: bytes | memoryview) -> None:
        await io.write_compressed(self, offset, data)

    async def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fua: bool = False,
        no_fallback: bool = False,
    ) -> None:
        await io.write_zeroes(
            self, offset, length, may_unmap=may_unmap, fua=fua, no_fallback=no_fallback
        )

    async def discard(self, offset: int, length: int) -> None:
        await io.discard(self, offset, length)

    async def flush(self) -> None:
        await io.flush(self)

    async def block_status(self, offset: int, length: int, want_zero: bool = True) -> Extent:
        return await io.block_status(self, offset, length, want_zero)

    async def drain(self) -> None:
        """Wait until no request is in flight on this node (new ones may start afterwards)."""
        await io.drain(self)

    def __repr__(self) -> str:
        return f"<BlockNode {self.name} {getattr(self, 'driver', None).__class__.__name__}>"

    def __hash__(self) -> int:
        return id(self)
