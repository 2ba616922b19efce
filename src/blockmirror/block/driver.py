"""The block driver interface: what every format, protocol and filter driver implements.

A driver instance belongs to exactly one ``BlockNode``. Drivers see requests that the generic
request path (``block/io.py``) has already bounds-checked, permission-checked and split to the
driver's ``max_transfer``; they implement one narrow async primitive per operation and declare
their capabilities. Formats reach their data through ``self.node.child("file")`` and their backing
through ``self.node.backing``; they never open files themselves.

Cf. QEMU's ``BlockDriver`` vtable (include/block/block_int-common.h).
"""

from __future__ import annotations

import enum
import errno
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from blockmirror.errors import BlockIOError

if TYPE_CHECKING:
    from blockmirror.block.graph import BlockGraph
    from blockmirror.block.node import BlockNode, Perm


class WriteFlags(enum.Flag):
    NONE = 0
    FUA = enum.auto()  # forced unit access: durable before completion
    MAY_UNMAP = enum.auto()  # write_zeroes may deallocate (punch a hole)
    NO_FALLBACK = enum.auto()  # write_zeroes must be fast or fail with ENOTSUP (NBD FAST_ZERO)


class BlockStatus(enum.Flag):
    """cf. BDRV_BLOCK_*: what a range of a node holds."""

    NONE = 0
    DATA = enum.auto()  # reads come from data stored by this node (or below it in ``file``)
    ZERO = enum.auto()  # reads return zeroes
    ALLOCATED = enum.auto()  # this layer decides the content (not passed to the backing)
    OFFSET_VALID = enum.auto()  # ``map_offset`` is meaningful (qemu-img map's "offset")
    EOF = enum.auto()  # the range reaches the end of the node


@dataclass(frozen=True, slots=True)
class Extent:
    """One answer of block_status: ``length`` bytes from the asked offset share ``status``.

    ``depth`` is filled by the chain-walking helpers (0 = this node, 1 = its backing, ...);
    ``map_offset`` and ``map_node`` say where the data lives in the protocol layer, for map.
    """

    length: int
    status: BlockStatus
    depth: int = 0
    map_offset: int | None = None
    map_node: BlockNode | None = None


@dataclass(slots=True)
class DriverInfo:
    """cf. BlockDriverInfo / ImageInfo: what ``info`` and the mirror need to know."""

    cluster_size: int = 0  # 0: the format has no clusters
    format_specific: dict[str, Any] = field(default_factory=dict)
    dirty_flag: bool = False
    backing_filename: str | None = None
    backing_format: str | None = None


class BlockDriver(ABC):
    """One open instance of a driver, attached to ``self.node``.

    Subclasses set the class attributes and implement the abstract methods. Optional operations
    raise ``BlockIOError(ENOTSUP)`` by default; the generic path turns an unsupported
    write_zeroes into a plain write of a zero buffer unless NO_FALLBACK was asked.
    """

    #: the driver name as QMP spells it ("file", "qcow2", "raw", "null-co", ...)
    format_name: ClassVar[str]
    #: True for formats (qcow2, raw), False for protocols (file, nbd, null-co)
    is_format: ClassVar[bool] = False
    #: True for filters (blkdebug, mirror_top): they pass everything to one child
    is_filter: ClassVar[bool] = False
    #: True when the driver implements truncate()
    supports_truncate: ClassVar[bool] = False
    #: True for formats that can have a ``backing`` child (qcow2): ranges they leave
    #: unallocated read from the backing, or as zeroes without one (cf. supports_backing)
    supports_backing: ClassVar[bool] = False
    #: True when the driver implements pwritev_compressed (cf. block_driver_can_compress); a
    #: filter with it forwards them, so its child decides (io.supports_compressed_writes)
    supports_compressed_writes: ClassVar[bool] = False

    #: the smallest aligned unit requests must use (file with O_DIRECT: 512 or 4096)
    request_alignment: int = 1
    #: the largest request the driver accepts in one call; the generic path splits above it
    max_transfer: int = 32 * 1024 * 1024
    #: FUA writes are native (else the generic path flushes after the write)
    supports_fua: bool = False
    #: write_zeroes with MAY_UNMAP really deallocates and reads back as zero
    can_write_zeroes_with_unmap: bool = False
    #: DATA extents with a map offset are refined by asking the protocol node below whether
    #: those bytes read as zeroes (cf. BDRV_BLOCK_RECURSE: qcow2 sets it when it detects
    #: metadata preallocation, so preallocated clusters over holes map as zero=true)
    recurse_block_status: bool = False

    def __init__(self, node: BlockNode) -> None:
        self.node = node

    @classmethod
    async def probe_image_format(cls, options: Mapping[str, Any],
                                 graph: BlockGraph | None) -> str:
        """For protocols whose images are not host files (rbd): the format of the image that
        ``options`` name, from its first bytes (cf. bdrv_probe_all over the protocol)."""
        raise NotImplementedError(f"{cls.format_name} cannot probe an image format")

    # --- life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Validate the node's options and children, read headers; raise ImageFormatError."""

    async def close(self) -> None:
        """Write back caches and release what open() took; children are closed by the node."""

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """The node's users now need ``perm`` and share ``shared`` (cumulative over parents).

        Called by the graph on every link change; protocol drivers turn it into image locks
        (file: QEMU's OFD lock bytes) and raise BlockMirrorError to refuse it.
        """

    def debug_event(self, event: str) -> bool:
        """A blkdebug event (BlkdebugEvent name) raised by a parent; True if handled here.

        cf. bdrv_debug_event: unhandled events travel down to the primary child.
        """
        return False

    # --- size and info ----------------------------------------------------------------------

    @abstractmethod
    def length(self) -> int:
        """The virtual size in bytes."""

    def info(self) -> DriverInfo:
        return DriverInfo()

    def has_zero_init(self) -> bool:
        """True when a newly created image of this driver reads as zeroes everywhere."""
        return False

    async def truncate(self, length: int, preallocation: str = "off") -> None:
        raise BlockIOError(errno.ENOTSUP, "Image format driver does not support resize")

    # --- I/O ------------------------------------------------------------------------------

    def linear_child(self) -> tuple[BlockNode, int] | None:
        """``(child, base)`` when guest offset ``o`` of this node is ``base + o`` of ``child``
        for reads and writes alike, with nothing done in between (a plain raw format);
        protocol drivers that *are* a host file answer ``(self.node, 0)``. None: no such
        mapping. ``block/copy.py`` uses it to batch copies into one thread-pool hop.
        """
        return None

    async def read_extents(self, extents: list[tuple[int, int]]) -> list[bytes] | None:
        """Read many ranges with fewer thread-pool hops than one ``preadv`` each, or None
        (not supported: the caller reads them one by one). Ranges are checked and aligned."""
        return None

    async def write_extents(self, pieces: list[tuple[int, memoryview]]) -> bool:
        """Write many ranges at once; False: not supported (nothing was written)."""
        return False

    async def zero_extents(self, extents: list[tuple[int, int]], flags: WriteFlags) -> bool:
        """``pwrite_zeroes`` of many ranges in one pass; False: not supported for these
        ranges (the caller zeroes them one by one; any already zeroed stay so)."""
        return False

    def cancel_in_flight(self) -> None:
        """Fail requests that wait for something that may never come (an NBD reconnect);
        cf. bdrv_cancel_in_flight, which a force-cancelled mirror calls on its target."""

    async def trim_headroom(self) -> None:
        """Give back file space grown ahead of use now rather than at close (a format that
        grows its file in steps); nothing for the others."""

    def data_file_node(self) -> BlockNode | None:
        """The node that holds this format's data clusters at host offsets (qcow2's
        ``file``), for copies that move them file to file; None: no such node."""
        return None

    async def host_segments(
        self, extents: list[tuple[int, int]]
    ) -> tuple[list[list[tuple[int, int]]], int] | None:
        """Where each extent's bytes lie in ``data_file_node``: ``(host_offset, length)``
        runs in guest order, pinned until ``release_host(token)``; None: not all of them
        lie there as plain data (read the bytes instead)."""
        return None

    def release_host(self, token: int) -> None:
        """End the pin of ``host_segments``."""

    async def write_via(
        self,
        extents: list[tuple[int, int]],
        fill: Callable[[list[tuple[int, int, int]]], Awaitable[None]],
    ) -> bool:
        """Write extents whose bytes are not in memory: allocate, let ``fill`` put the data
        at every ``(guest_offset, host_offset, length)`` of ``data_file_node``, then map
        them. False, with nothing done: not supported for these extents."""
        return False

    async def data_runs(self, ranges: list[tuple[int, int]]) -> list[list[tuple[bool, int]]] | None:
        """The data and zero runs of each range, for a node whose ranges read as zeroes
        wherever it holds no data (no backing), in one pass: what ``block_status`` would
        answer run by run, as ``(is_data, length)``. None: ask ``block_status``."""
        return None

    @abstractmethod
    async def preadv(self, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes at ``offset`` (inside the node)."""

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        raise BlockIOError(errno.EPERM if self.node.read_only else errno.ENOTSUP)

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        raise BlockIOError(errno.ENOTSUP)

    async def pwritev_compressed(self, offset: int, data: bytes | memoryview) -> None:
        """Write whole clusters compressed (cf. bdrv_co_pwritev_compressed_part)."""
        raise BlockIOError(errno.ENOTSUP)

    async def pdiscard(self, offset: int, length: int) -> None:
        raise BlockIOError(errno.ENOTSUP)

    async def flush(self) -> None:
        return None

    async def block_status(self, offset: int, length: int) -> Extent:
        """Describe the range starting at ``offset``: may cover less than ``length``, never 0."""
        return Extent(length, BlockStatus.DATA | BlockStatus.ALLOCATED)

