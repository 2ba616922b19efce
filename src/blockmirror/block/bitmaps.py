"""Named dirty bitmaps on block nodes (cf. QEMU's BdrvDirtyBitmap and block/dirty-bitmap.c).

Every node has ``node.bitmaps`` (a ``NodeBitmaps``): its named bitmaps, newest first, as QEMU
lists them. A ``NamedBitmap`` wraps a ``DirtyBitmap`` with QEMU's state (persistent, busy,
readonly, inconsistent) and is one of the node's ``dirty_trackers`` while it exists, so the
request path marks it; it records only while enabled.

The QMP actions (``add``, ``remove``, ``clear``, ``enable``, ``disable``, ``merge``) are
written as prepare steps returning a ``Prepared`` with ``commit()``/``abort()``, so that a
transaction can run several and undo them all (cf. the BlockDirtyBitmap* TransactionActions);
a plain command prepares and commits at once. Error texts are QEMU 7.2's.

Persistence belongs to the format driver: a driver that implements ``PersistentBitmapStore``
(qcow2) validates new persistent bitmaps, loads them on open and stores them on close.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.errors import BlockMirrorError

if TYPE_CHECKING:
    from blockmirror.block.graph import BlockGraph
    from blockmirror.block.node import BlockNode

#: longest bitmap name (cf. BDRV_BITMAP_MAX_NAME_SIZE)
MAX_NAME_SIZE = 1023
MIN_GRANULARITY = 512
DEFAULT_GRANULARITY = 65536


class Check(enum.Flag):
    """What an operation refuses (cf. BDRV_BITMAP_BUSY/RO/INCONSISTENT)."""

    BUSY = enum.auto()
    READONLY = enum.auto()
    INCONSISTENT = enum.auto()
    DEFAULT = BUSY | READONLY | INCONSISTENT
    ALLOW_READONLY = BUSY | INCONSISTENT


class NamedBitmap:
    """A named bitmap of a node; a ``DirtyTracker`` of it."""

    def __init__(self, name: str, bitmap: DirtyBitmap, *, persistent: bool = False) -> None:
        self.name = name
        self.bitmap = bitmap
        self.persistent = persistent
        #: loaded from an image where it was left in use (a crash): its bits are meaningless
        self.inconsistent = False
        #: loaded from a read-only image: may not change
        self.readonly = False
        #: users that hold it (an NBD export, a job): it may not be changed or removed
        self.users = 0

    @property
    def granularity(self) -> int:
        return self.bitmap.granularity

    @property
    def enabled(self) -> bool:
        return self.bitmap.enabled

    @property
    def busy(self) -> bool:
        return self.users > 0

    @property
    def recording(self) -> bool:
        return self.bitmap.enabled

    def mark(self, offset: int, length: int) -> None:
        if not self.readonly:
            self.bitmap.mark(offset, length)

    def check(self, refuse: Check) -> None:
        """Raise QEMU's error if the bitmap is in a state ``refuse`` lists."""
        if Check.BUSY in refuse and self.busy:
            raise BlockMirrorError(
                f"Bitmap '{self.name}' is currently in use by another operation and cannot "
                "be used"
            )
        if Check.READONLY in refuse and self.readonly:
            raise BlockMirrorError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if Check.INCONSISTENT in refuse and self.inconsistent:
            raise BlockMirrorError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    def info(self) -> dict[str, Any]:
        """QEMU's BlockDirtyInfo, members in schema order."""
        out: dict[str, Any] = {
            "name": self.name,
            "count": self.bitmap.dirty_count(),
            "granularity": self.granularity,
            "recording": self.recording,
            "busy": self.busy,
            "persistent": self.persistent,
        }
        if self.inconsistent:
            out["inconsistent"] = True
        return out


class NodeBitmaps:
    """The named bitmaps of one node (cf. bs->dirty_bitmaps), newest first."""

    def __init__(self, node: BlockNode) -> None:
        self._node = node
        self._by_name: dict[str, NamedBitmap] = {}

    def __iter__(self) -> Iterator[NamedBitmap]:
        return reversed(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> NamedBitmap | None:
        return self._by_name.get(name)

    def create(self, name: str, granularity: int, *, persistent: bool = False) -> NamedBitmap:
        """cf. bdrv_create_dirty_bitmap: a new, clean, enabled bitmap tracking the node."""
        if name in self._by_name:
            raise BlockMirrorError(f"Bitmap already exists: {name}")
        if len(name.encode()) > MAX_NAME_SIZE:
            raise BlockMirrorError(f"Bitmap name too long: {name}")
        named = NamedBitmap(
            name, DirtyBitmap(self._node.length(), granularity), persistent=persistent
        )
        self._by_name[name] = named
        self._node.dirty_trackers.append(named)
        return named

    def release(self, name: str) -> None:
        """cf. bdrv_release_dirty_bitmap: forget the bitmap (not its persistent copy)."""
        named = self._by_name.pop(name, None)
        if named is not None and named in self._node.dirty_trackers:
            self._node.dirty_trackers.remove(named)

    def info(self) -> list[dict[str, Any]]:
        return [named.info() for named in self]

    def resize(self, size: int) -> None:
        for named in self._by_name.values():
            named.bitmap.resize(size)


@runtime_checkable
class PersistentBitmapStore(Protocol):
    """Implemented by format drivers that keep bitmaps in the image (qcow2)."""

    def check_new_persistent_bitmap(self, name: str, granularity: int) -> None:
        """Raise QEMU's error if a persistent bitmap of that name/granularity can't be stored."""

    async def remove_persistent_bitmap(self, name: str) -> None:
        """Drop the bitmap from the image now (cf. bdrv_remove_persistent_dirty_bitmap)."""


# --- lookups ------------------------------------------------------------------------------


def device_or_node_name(graph: BlockGraph, node: BlockNode) -> str:
    """cf. bdrv_get_device_or_node_name."""
    for backend in graph.root_backends(node):
        if backend.name:
            return backend.name
    return node.name


def lookup(graph: BlockGraph, node_name: str, name: str) -> tuple[BlockNode, NamedBitmap]:
    """cf. block_dirty_bitmap_lookup: the node (device or node name) and its bitmap."""
    try:
        node = graph.lookup(node_name, node_name)
    except BlockMirrorError:
        raise BlockMirrorError(f"Node '{node_name}' not found") from None
    named = node.bitmaps.get(name)
    if named is None:
        raise BlockMirrorError(f"Dirty bitmap '{name}' not found")
    return node, named


def default_granularity(node: BlockNode) -> int:
    """cf. bdrv_get_default_bitmap_granularity: the cluster size within [4 KiB, 64 KiB]."""
    try:
        cluster_size = node.info().cluster_size
    except BlockMirrorError:
        cluster_size = 0
    if cluster_size > 0:
        return min(DEFAULT_GRANULARITY, max(4096, cluster_size))
    return DEFAULT_GRANULARITY


# --- actions: prepare, then commit or abort -----------------------------------------------


@dataclass
class Prepared:
    """A prepared action: ``commit`` makes it final, ``abort`` undoes it."""

    on_commit: Callable[[], None] | None = None
    on_abort: Callable[[], None] | None = None

    def commit(self) -> None:
        if self.on_commit is not None:
            self.on_commit()

    def abort(self) -> None:
        if self.on_abort is not None:
            self.on_abort()


def prepare_add(
    graph: BlockGraph,
    node_name: str,
    name: str,
    granularity: int | None = None,
    persistent: bool = False,
    disabled: bool = False,
) -> Prepared:
    """block-dirty-bitmap-add (cf. qmp_block_dirty_bitmap_add)."""
    if not name:
        raise BlockMirrorError("Bitmap name cannot be empty")
    node = graph.lookup(node_name, node_name)
    if granularity is not None:
        if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise BlockMirrorError("Granularity must be power of 2 and at least 512")
    else:
        granularity = default_granularity(node)
    if persistent:
        driver = node.driver
        if not isinstance(driver, PersistentBitmapStore):
            raise BlockMirrorError(
                f"Can't store persistent bitmaps to {device_or_node_name(graph, node)}: "
                "Operation not supported"
            )
        if name in node.bitmaps:
            raise BlockMirrorError(f"Bitmap already exists: {name}")
        try:
            driver.check_new_persistent_bitmap(name, granularity)
        except BlockMirrorError as e:
            raise BlockMirrorError(
                f"Can't make bitmap '{name}' persistent in "
                f"'{device_or_node_name(graph, node)}': {e.desc}"
            ) from None
    named = node.bitmaps.create(name, granularity, persistent=persistent)
    if disabled:
        named.bitmap.enabled = False
    return Prepared(on_abort=lambda: node.bitmaps.release(name))


async def prepare_remove(graph: BlockGraph, node_name: str, name: str) -> Prepared:
    """block-dirty-bitmap-remove (cf. block_dirty_bitmap_remove with release deferred to
    commit; like QEMU, a persistent copy is dropped from the image at once)."""
    node, named = lookup(graph, node_name, name)
    named.check(Check.BUSY | Check.READONLY)
    if named.persistent:
        driver = node.driver
        if isinstance(driver, PersistentBitmapStore):
            await driver.remove_persistent_bitmap(name)
    # held busy until the commit, so nothing else takes it meanwhile
    named.users += 1

    def commit() -> None:
        named.users -= 1
        node.bitmaps.release(name)

    def abort() -> None:
        named.users -= 1

    return Prepared(commit, abort)


def prepare_clear(graph: BlockGraph, node_name: str, name: str) -> Prepared:
    """block-dirty-bitmap-clear (cf. qmp_block_dirty_bitmap_clear)."""
    _node, named = lookup(graph, node_name, name)
    named.check(Check.DEFAULT)
    saved = named.bitmap.copy()
    named.bitmap.clear_all()
    return Prepared(on_abort=lambda: named.bitmap.restore(saved))


def prepare_enable(graph: BlockGraph, node_name: str, name: str, enable: bool = True) -> Prepared:
    """block-dirty-bitmap-enable / -disable."""
    _node, named = lookup(graph, node_name, name)
    named.check(Check.ALLOW_READONLY)
    was = named.bitmap.enabled
    named.bitmap.enabled = enable

    def abort() -> None:
        named.bitmap.enabled = was

    return Prepared(on_abort=abort)


#: a merge source: a bitmap of the target's node by name, or (node, name) anywhere
MergeSource = str | tuple[str, str]


def prepare_merge(
    graph: BlockGraph, node_name: str, target: str, sources: list[MergeSource]
) -> Prepared:
    """block-dirty-bitmap-merge (cf. block_dirty_bitmap_merge): all sources are merged into a
    scratch bitmap first, so the target changes only if every source is usable."""
    node, destination = lookup(graph, node_name, target)
    destination.check(Check.DEFAULT)
    scratch = DirtyBitmap(destination.bitmap.size, destination.granularity)
    for source in sources:
        if isinstance(source, str):
            found = node.bitmaps.get(source)
            if found is None:
                raise BlockMirrorError(f"Dirty bitmap '{source}' not found")
        else:
            _source_node, found = lookup(graph, source[0], source[1])
        found.check(Check.ALLOW_READONLY)
        _check_mergeable(scratch, found.bitmap)
        scratch.merge_from(found.bitmap)
    _check_mergeable(destination.bitmap, scratch)
    saved = destination.bitmap.copy()
    destination.bitmap.merge_from(scratch)
    return Prepared(on_abort=lambda: destination.bitmap.restore(saved))


def _check_mergeable(destination: DirtyBitmap, source: DirtyBitmap) -> None:
    if destination.size != source.size:
        raise BlockMirrorError(
            f"Bitmaps are of different sizes (destination size is {destination.size}, source "
            f"size is {source.size}) and can't be merged"
        )


def sha256(graph: BlockGraph, node_name: str, name: str) -> str:
    """x-debug-block-dirty-bitmap-sha256."""
    _node, named = lookup(graph, node_name, name)
    return named.bitmap.sha256()


# --- users outside the block layer -----------------------------------------------------------


def find_export_bitmaps(node: BlockNode, names: list[str], writable: bool) -> list[NamedBitmap]:
    """The bitmaps an NBD export of ``node`` serves, held busy (cf. nbd_export_create): each
    is looked up on the node, then down its filters and backing chain."""
    found: list[NamedBitmap] = []
    for name in names:
        named: NamedBitmap | None = None
        owner: BlockNode | None = node
        while owner is not None:
            named = owner.bitmaps.get(name)
            if named is not None:
                break
            owner = owner.filtered_child() or owner.backing
        if named is None or owner is None:
            raise BlockMirrorError(f"Bitmap '{name}' is not found")
        named.check(Check.ALLOW_READONLY)
        if not writable and not owner.read_only and named.enabled:
            raise BlockMirrorError(f"Enabled bitmap '{name}' incompatible with readonly export")
        found.append(named)
    for named in found:
        named.users += 1
    return found


def release_export_bitmaps(found: list[NamedBitmap]) -> None:
    for named in found:
        named.users -= 1


def hold_for_job(graph: BlockGraph, node_name: str, name: str) -> NamedBitmap:
    """A bitmap a block job reads (a mirror seeding from it), held busy until ``release``:
    refused when busy or inconsistent, as QEMU's bitmap-mode jobs do (BDRV_BITMAP_ALLOW_RO).
    The job reads ``named.bitmap`` (a ``DirtyBitmap``); ``bitmap.copy()`` gives it a
    private copy to consume."""
    _node, named = lookup(graph, node_name, name)
    named.check(Check.ALLOW_READONLY)
    named.users += 1
    return named


def release(named: NamedBitmap) -> None:
    named.users -= 1
