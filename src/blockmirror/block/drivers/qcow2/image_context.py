"""What the parts of one open qcow2 image share (the driver builds it once, in ``open``).

The refcount allocator, cluster map, data path, compressed writer, bitmap store and resume
area all work on the same node, header, geometry and image file, under the same metadata
lock, and call back into the driver for the same two flushes. They take this one object
instead of each repeating the list; what differs between them (the allocator, the cluster
map, ...) they still take by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockmirror.block.drivers.qcow2.header import Header
from blockmirror.block.drivers.qcow2.image_file import ImageFile
from blockmirror.block.drivers.qcow2.layout import Geometry
from blockmirror.errors import ImageCorruptError

if TYPE_CHECKING:
    from blockmirror.block.node import BlockNode

#: reports a corruption and returns the error to raise (``CorruptionGuard.signal``)
SignalCorruption = Callable[[str], Awaitable[ImageCorruptError]]


@dataclass(frozen=True, slots=True)
class ImageContext:
    """What every part of an open qcow2 image shares: node, header, geometry, file, lock."""

    #: the qcow2 node itself (its backing child, read-only flag, named bitmaps)
    node: BlockNode
    #: the parsed header; changed in place, never replaced, while the image is open
    header: Header
    geometry: Geometry
    #: bytes of the ``file`` child
    file: ImageFile
    #: the driver's metadata lock
    lock: asyncio.Lock
    signal_corruption: SignalCorruption
    #: called with the lock held after metadata changes: bounds the dirty metadata in memory
    write_back: Callable[[], Awaitable[None]]
    #: the driver's ordered metadata flush (lock held): refcounts, L2, L1, deferred frees
    flush_metadata: Callable[[], Awaitable[None]]
