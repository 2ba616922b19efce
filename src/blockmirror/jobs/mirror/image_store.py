"""The resume log kept inside a qcow2 source (``x-resume-store: "image"``).

The same bytes as the sidecar (``activity_log.encode``), in clusters of the source that the
qcow2 driver's ``ResumeArea`` allocates, guards with an autoclear bit, and frees
(``block/drivers/qcow2/resume_area.py``). ``resume.py`` uses this instead of a sidecar path:
``load`` before the job (refusing a stale area), ``create`` when the job starts (the area is
replaced by a fresh one, as the sidecar is rewritten), ``drop`` after a pivot.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from blockmirror.block.drivers.qcow2.driver import Qcow2Driver
from blockmirror.block.drivers.qcow2.header import MAGIC, parse_header
from blockmirror.block.drivers.qcow2.resume_area import (
    AUTOCLEAR_RESUME,
    ResumeArea,
    parse_extension,
)
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockMirrorError
from blockmirror.jobs.mirror import activity_log
from blockmirror.jobs.mirror.activity_log import Geometry, RecordFile, Recovered, ResumeError


class ImageStore:
    """The resume area of one qcow2 source node, as the mirror sees it."""

    def __init__(self, source: BlockNode, area: ResumeArea) -> None:
        self.source = source
        self.area = area

    @classmethod
    def of(cls, source: BlockNode) -> ImageStore:
        """Raises: BlockMirrorError when the source cannot hold the state."""
        drv = source.driver
        if not isinstance(drv, Qcow2Driver) or not drv.resume_area.local_file():
            raise BlockMirrorError(
                "Parameter 'x-resume-store': 'image' needs a qcow2 source in a local file")
        if drv.header.version != 3:
            raise BlockMirrorError(
                "Parameter 'x-resume-store': 'image' needs a qcow2 v3 (compat=1.1) source")
        if source.read_only:
            raise BlockMirrorError("Parameter 'x-resume-store': the source is read-only")
        return cls(source, drv.resume_area)

    @property
    def name(self) -> str:
        return f"the qcow2 source '{self.source.filename or self.source.name}'"

    async def load(self) -> Recovered | None:
        """The area's state, None if the image has none.

        Raises:
            ResumeError: the image has an area that cannot be trusted.
        """
        area = self.area
        if area.current is None:
            if area.stale is not None:
                raise ResumeError(
                    f"Cannot resume the mirror: the resume state in {self.name} is stale: "
                    f"{area.stale}. Use a full restart instead")
            return None
        try:
            rec = activity_log.parse(await area.read(), self.name)
        except ResumeError as e:
            raise ResumeError(f"Cannot resume the mirror: {e}. Use a full restart "
                              "instead") from e
        if rec.header.get("nonce") != area.current.nonce:
            raise ResumeError(f"Cannot resume the mirror: the resume state in {self.name} "
                              "does not match its header extension. Use a full restart instead")
        return rec

    async def create(self, geometry: Geometry, header: dict[str, Any], bitmap: bytes,
                     meta: dict[str, Any], owner: object) -> RecordFile:
        """A fresh area (replacing any old one); the descriptor the log writes through.

        Raises:
            ResumeError: the area cannot be written.
        """
        data = activity_log.encode(geometry, header, bitmap, meta)
        try:
            await self.area.install(data, geometry.granularity, header["nonce"], owner)
            fd = self.area.record_fd()
        except (OSError, BlockMirrorError) as e:
            why = e.strerror if isinstance(e, OSError) else e.desc
            raise ResumeError(f"Cannot write the resume state into {self.name}: {why}") from e
        assert self.area.current is not None
        return RecordFile(fd, self.area.current.offset)

    def detach(self, owner: object) -> None:
        self.area.detach(owner)

    async def disarm(self, owner: object) -> None:
        await self.area.disarm(owner)

    async def drop(self) -> None:
        await self.area.remove()


def read_image_log(path: str) -> tuple[Recovered, bool] | None:
    """The resume state of a qcow2 file on disk, and whether its autoclear bit says it is
    current (tests, tools). None when the image has no resume extension.
    """
    with open(path, "rb") as f:
        first = f.read(1 << 21)
        length = os.fstat(f.fileno()).st_size
        if first[:4] != MAGIC:
            return None
        bits = struct.unpack_from(">I", first, 20)[0]
        header = parse_header(first[: 1 << bits], path, length)
        ext = parse_extension(header)
        if ext is None:
            return None
        f.seek(ext.offset)
        rec = activity_log.parse(f.read(ext.length), path)
    return rec, bool(header.autoclear & AUTOCLEAR_RESUME)


__all__ = ["ImageStore", "read_image_log"]
