"""Corruption signalling (cf. QEMU's qcow2_signal_corruption).

The first inconsistency found in the metadata flags the image as corrupt (version 3 images
get the corrupt bit on disk, so the next read-write open refuses them) and every later request
fails with EIO instead of writing over what may be someone else's data.
"""

from __future__ import annotations

import errno
import sys
from typing import TYPE_CHECKING

from blockmirror.block.drivers.qcow2.header import INCOMPAT_CORRUPT, Header
from blockmirror.block.drivers.qcow2.image_file import ImageFile
from blockmirror.errors import BlockIOError, ImageCorruptError

if TYPE_CHECKING:
    from blockmirror.block.node import BlockNode


class CorruptionGuard:
    def __init__(self, owner: BlockNode, header: Header, image_file: ImageFile) -> None:
        self._owner = owner
        self._header = header
        self._file = image_file
        self.corrupt = False

    async def signal(self, text: str) -> ImageCorruptError:
        """Flag the image and return the error to raise."""
        if not self.corrupt:
            print(
                f"qcow2: Marking image as corrupt: {text}; further corruption events will be "
                "suppressed",
                file=sys.stderr,
                flush=True,
            )
            self.corrupt = True
            self._owner.corrupt = True
            if not self._owner.read_only and self._header.version == 3:
                self._header.incompatible |= INCOMPAT_CORRUPT
                try:
                    await self._file.write_header(self._header)
                    await self._file.flush()
                except BlockIOError:
                    pass
        return ImageCorruptError(text)

    def check_usable(self) -> None:
        if self.corrupt:
            raise BlockIOError(errno.EIO, "Input/output error")
