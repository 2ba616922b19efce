"""The error hierarchy, each class bound to its QMP error class.

    BlockMirrorError                 (qmp_class GenericError)
     +-- CommandNotFound             (CommandNotFound)
     +-- DeviceNotActive             (DeviceNotActive)
     +-- DeviceNotFound              (DeviceNotFound)
     +-- BlockIOError                (an errno; what a failed request raises)
     |    +-- ImageCorruptError      (metadata inconsistency found while an image is open)
     +-- ImageFormatError            (an image that cannot be opened: hostile, unsupported)
     +-- ProtocolError               (a peer broke a wire protocol: QMP input, NBD)
     +-- InternalError               (a bug of ours; never expected)

The message of every error is the exact text QEMU would put in a QMP ``desc``.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import ClassVar


class BlockMirrorError(Exception):
    """Root of every error we raise on purpose. ``str(e)`` is the QMP ``desc``."""

    qmp_class: ClassVar[str] = "GenericError"
    #: an extra line QEMU prints after the message on the command line (error_append_hint),
    #: e.g. "Is another process using the image [x]?"; never part of the QMP desc
    hint: str | None = None

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc

    def __str__(self) -> str:
        return self.desc


class CommandNotFound(BlockMirrorError):
    qmp_class = "CommandNotFound"


class DeviceNotActive(BlockMirrorError):
    qmp_class = "DeviceNotActive"


class DeviceNotFound(BlockMirrorError):
    qmp_class = "DeviceNotFound"


class BlockIOError(BlockMirrorError):
    """A failed I/O request. ``errno`` travels with it to QMP (strerror), NBD and job policies."""

    def __init__(self, err: int, desc: str | None = None) -> None:
        super().__init__(desc if desc is not None else os.strerror(err))
        self.errno = err

    @classmethod
    def eio(cls, desc: str | None = None) -> BlockIOError:
        return cls(_errno.EIO, desc)


class ImageCorruptError(BlockIOError):
    """An inconsistency found in an open image: the image is marked corrupt, I/O fails with EIO."""

    def __init__(self, desc: str) -> None:
        super().__init__(_errno.EIO, desc)


class ImageFormatError(BlockMirrorError):
    """An image that cannot be opened (bad header, unsupported feature, hostile offsets)."""


class ProtocolError(BlockMirrorError):
    """A peer violated a wire protocol."""


class InternalError(BlockMirrorError):
    """Something that should never happen; please report it."""


__all__ = [
    "BlockIOError",
    "BlockMirrorError",
    "CommandNotFound",
    "DeviceNotActive",
    "DeviceNotFound",
    "ImageCorruptError",
    "ImageFormatError",
    "InternalError",
    "ProtocolError",
]
