"""In-kernel copies for the mirror: copy_file_range between two plain raw-over-file nodes.

When both the source and the target are a ``raw`` node straight over a regular ``file`` node
on the same filesystem, a copy op needs no buffer in this process: the kernel moves the bytes
(page cache to page cache, or a reflink where the filesystem shares extents). This is only a
shortcut for what ``node.read`` + ``node.write`` would do, so every op re-checks that nothing
on the target side wants to see the data (write interceptors, dirty trackers, zero detection,
a probed raw's sector-0 guard) and keeps the generic path's bookkeeping (in-flight counts for
drains, ``write_gen`` so the READY flush really flushes). The mirror clears the dirty bits
before the op as for any copy, so a concurrent source write re-dirties the range as usual.
Not used with cache.direct=on (the kernel then splices in small synchronous pieces).
Anything unusual (a short copy at the source's EOF, an error) is left to the generic path,
which reports errors with the right side and errno.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from blockmirror.block import threadio
from blockmirror.block.drivers.file import FileDriver
from blockmirror.block.drivers.raw import RawDriver
from blockmirror.block.io import check_writable

if TYPE_CHECKING:
    from blockmirror.block.node import BlockNode

#: errnos meaning "copy_file_range cannot do this pair": stop trying for the job
_UNSUPPORTED = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                          errno.ENOTSUP, errno.EBADF, errno.ETXTBSY})


def _plain_raw_file(node: BlockNode) -> BlockNode | None:
    """The ``file`` child of a raw node that only forwards to it, else None."""
    if type(node.driver) is not RawDriver:
        return None
    child = node.file
    if child is None or type(child.driver) is not FileDriver:
        return None
    return child


def _copy_range_sync(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> int:
    """copy_file_range until ``length`` bytes or the source's EOF; returns bytes copied."""
    done = 0
    while done < length:
        n = os.copy_file_range(src_fd, dst_fd, length - done, src_off + done, dst_off + done)
        if n == 0:
            break  # source EOF: the rest reads as zeroes, which the generic path writes
        done += n
    return done


class CopyOffload:
    """copy_file_range for one mirror's source/target pair; ``for_nodes`` says if it applies."""

    def __init__(self, source: BlockNode, src_file: BlockNode, target: BlockNode,
                 tgt_file: BlockNode) -> None:
        self.source, self.src_file = source, src_file
        self.target, self.tgt_file = target, tgt_file
        self.enabled = True
        #: bytes the kernel copied for us (query/benchmark evidence that the path is used)
        self.copied = 0

    @classmethod
    def for_nodes(cls, source: BlockNode, target: BlockNode) -> CopyOffload | None:
        src_file, tgt_file = _plain_raw_file(source), _plain_raw_file(target)
        if src_file is None or tgt_file is None:
            return None
        src_drv, tgt_drv = src_file.driver, tgt_file.driver
        assert isinstance(src_drv, FileDriver) and isinstance(tgt_drv, FileDriver)
        if src_drv.fd < 0 or tgt_drv.fd < 0:
            return None
        if source.cache_direct or src_file.cache_direct or target.cache_direct \
                or tgt_file.cache_direct:
            # the kernel splices O_DIRECT files through a pipe in small synchronous pieces:
            # measured about twice as slow as our own large direct reads and writes
            return None
        try:
            same_fs = os.fstat(src_drv.fd).st_dev == os.fstat(tgt_drv.fd).st_dev
        except OSError:
            return None
        if not same_fs or os.path.samestat(os.fstat(src_drv.fd), os.fstat(tgt_drv.fd)):
            return None
        return cls(source, src_file, target, tgt_file)

    def _usable(self, offset: int, length: int) -> bool:
        """Re-checked per op: the graph and node options can change while the job runs."""
        tgt, tfile = self.target, self.tgt_file
        if not self.enabled or self.source.file is not self.src_file or tgt.file is not tfile:
            return False
        if (tgt.interceptors or tgt.dirty_trackers or tfile.interceptors
                or tfile.dirty_trackers or self.src_file.interceptors):
            return False
        if tgt.detect_zeroes != "off" or tfile.detect_zeroes != "off":
            return False
        tdrv = tgt.driver
        if not isinstance(tdrv, RawDriver) or tdrv.probed:
            return False
        sdrv = self.source.driver
        assert isinstance(sdrv, RawDriver)
        for node, base in ((self.src_file, sdrv.offset), (tfile, tdrv.offset)):
            drv = node.driver
            if not isinstance(drv, FileDriver) or drv.fd < 0:
                return False
            align = drv.request_alignment
            if align > 1 and ((base + offset) % align or length % align):
                return False
        return True

    async def copy(self, offset: int, length: int) -> int:
        """Copy ``[offset, offset+length)``; returns how many bytes it copied (0: not used).

        The caller does the rest (if any) through the generic read/write path.
        """
        if not self._usable(offset, length):
            return 0
        tgt, tfile = self.target, self.tgt_file
        check_writable(tgt)
        check_writable(tfile)
        sdrv, tdrv = self.source.driver, tgt.driver
        sfd, tfd = self.src_file.driver, tfile.driver
        assert isinstance(sdrv, RawDriver) and isinstance(tdrv, RawDriver)
        assert isinstance(sfd, FileDriver) and isinstance(tfd, FileDriver)
        nodes = (self.source, self.src_file, tgt, tfile)
        for node in nodes:
            node.in_flight += 1
        try:
            done = await threadio.run(_copy_range_sync, sfd.fd, tfd.fd, sdrv.offset + offset,
                                      tdrv.offset + offset, length)
            self.copied += done
            return done
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                self.enabled = False
            # whatever was copied before the error is redone by the generic path
            return 0
        finally:
            # bytes may have reached the target even on failure: the next flush must run
            tgt.write_gen += 1
            tfile.write_gen += 1
            for node in nodes:
                node.in_flight -= 1
                if node.in_flight == 0 and node.drain_event is not None:
                    ev, node.drain_event = node.drain_event, None
                    ev.set()


__all__ = ["CopyOffload"]
