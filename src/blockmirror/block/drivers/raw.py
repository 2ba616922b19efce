"""The ``raw`` format driver: a window (``offset``/``size``) onto its ``file`` child.

cf. block/raw-format.c.

Everything is forwarded to the child through its own request path, shifted by ``offset``;
block status is the child's, marked ALLOCATED because raw owns every byte it exposes.
"""

from __future__ import annotations

import errno

from blockmirror.block.driver import BlockDriver, BlockStatus, DriverInfo, Extent, WriteFlags
from blockmirror.block.drivers import register
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError, BlockMirrorError

_SECTOR = 512
# image-format magics a probe would recognise (cf. the bdrv_probe functions); a probed raw
# image refuses to get one of these written into its first sector
_MAGICS = (b"QFI\xfb", b"QED\x00", b"KDMV", b"conectix", b"LUKS\xba\xbe", b"vhdxfile")

#: printed once when a raw image was opened by probing (cf. bdrv_open_inherit)
PROBED_RAW_WARNING = (
    "WARNING: Image format was not specified for '{}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions."
)


def looks_like_image(sector0: bytes) -> bool:
    return any(sector0.startswith(m) for m in _MAGICS) or sector0[0x40:0x44] == b"\x7f\x10\xda\xbe"


@register
class RawDriver(BlockDriver):
    format_name = "raw"
    is_format = True
    supports_truncate = True
    # FUA travels down to the file child, which emulates it with a flush if it must
    supports_fua = True

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self.offset = 0
        self.size: int | None = None
        #: opened by format probing: sector 0 must not become another format's header
        self.probed = False

    @property
    def _file(self) -> BlockNode:
        child = self.node.file
        if child is None:
            raise BlockIOError(errno.ENOMEDIUM, "No medium")
        return child

    async def open(self) -> None:
        opts = self.node.options
        offset = opts.get("offset", 0)
        size = opts.get("size")
        real = self._file.length()
        if not isinstance(offset, int) or offset < 0:
            raise BlockMirrorError("Parameter 'offset' expects a non-negative value")
        if offset > real:
            raise BlockMirrorError(
                f"Offset ({offset}) cannot be greater than size of the containing file ({real})"
            )
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise BlockMirrorError("Parameter 'size' expects a non-negative value")
            if real - offset < size:
                raise BlockMirrorError(
                    f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal "
                    f"to the  actual size of the containing file ({real})"
                )
            if size % _SECTOR:
                raise BlockMirrorError(f"Specified size is not multiple of {_SECTOR}")
        self.offset, self.size = offset, size
        child = self._file.driver
        self.request_alignment = child.request_alignment
        self.max_transfer = child.max_transfer
        self.can_write_zeroes_with_unmap = child.can_write_zeroes_with_unmap

    def length(self) -> int:
        if self.size is not None:
            return self.size
        return max(0, self._file.length() - self.offset)

    def info(self) -> DriverInfo:
        return DriverInfo()

    def has_zero_init(self) -> bool:
        return self.offset == 0 and self.size is None and self._file.driver.has_zero_init()

    async def truncate(self, length: int, preallocation: str = "off") -> None:
        if self.offset or self.size is not None:
            raise BlockIOError(errno.ENOTSUP, "Cannot resize fixed-size raw disks")
        await self._file.driver.truncate(length, preallocation)

    def linear_child(self) -> tuple[BlockNode, int] | None:
        # a probed raw guards sector 0 on writes: that check needs the generic path
        child = self.node.file
        if child is None or self.probed:
            return None
        return child, self.offset

    async def preadv(self, offset: int, length: int) -> bytes:
        self._file.debug_event("read_aio")
        return await self._file.read(self.offset + offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        if self.probed and offset < _SECTOR:
            await self._check_sector0(offset, data)
        self._file.debug_event("write_aio")
        await self._file.write(self.offset + offset, data, fua=WriteFlags.FUA in flags)

    async def _check_sector0(self, offset: int, data: bytes | memoryview) -> None:
        """cf. raw_co_pwritev on probed images: EPERM for a write that makes sector 0 look
        like an image header (a guest could otherwise turn its disk into a qcow2 image)."""
        n = min(_SECTOR, self.length())
        sector = bytearray(await self._file.read(self.offset, n)) if n else bytearray()
        part = bytes(data[: max(0, n - offset)])
        sector[offset : offset + len(part)] = part
        if looks_like_image(bytes(sector)):
            raise BlockIOError(errno.EPERM)

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self._file.write_zeroes(
            self.offset + offset,
            length,
            may_unmap=WriteFlags.MAY_UNMAP in flags,
            fua=WriteFlags.FUA in flags,
            no_fallback=WriteFlags.NO_FALLBACK in flags,
        )

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._file.discard(self.offset + offset, length)

    async def flush(self) -> None:
        await self._file.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        # cf. BDRV_BLOCK_RAW: the answer is the child's, seen through our window
        ext = await self._file.block_status(self.offset + offset, length)
        status = ext.status | BlockStatus.ALLOCATED | BlockStatus.OFFSET_VALID
        map_offset = ext.map_offset if ext.map_offset is not None else self.offset + offset
        map_node = ext.map_node if ext.map_node is not None else self._file
        return Extent(ext.length, status & ~BlockStatus.EOF, 0, map_offset, map_node)
