"""The ``file`` and ``host_device`` protocol drivers: POSIX files and block devices.

cf. block/file-posix.c.

Every request becomes one or a few system calls in the thread pool (``block/threadio.py``).
Allocation comes from SEEK_DATA/SEEK_HOLE, zeroing and discard from fallocate (or the block
ioctls), and image locking uses the same OFD byte-range locks as QEMU, so a file one of us
holds is refused to the other with QEMU's words.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from typing import Any

from blockmirror.block import threadio
from blockmirror.block.driver import BlockDriver, BlockStatus, Extent, WriteFlags
from blockmirror.block.drivers import register
from blockmirror.block.hostpath import host_path
from blockmirror.block.node import BlockNode, Perm
from blockmirror.errors import BlockIOError, BlockMirrorError

# cf. RAW_LOCK_PERM_BASE / RAW_LOCK_SHARED_BASE: byte 100+bit is held (read-locked) by every user
# of a permission; byte 200+bit by every user that refuses to share it.
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
# the permission bits in QEMU's order (BLK_PERM_*), which fixes the lock byte offsets
_PERM_BITS: tuple[tuple[Perm, str], ...] = (
    (Perm.CONSISTENT_READ, "consistent read"),
    (Perm.WRITE, "write"),
    (Perm.WRITE_UNCHANGED, "write unchanged"),
    (Perm.RESIZE, "resize"),
)
_SECTOR = 512


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _flock(kind: int, start: int) -> bytes:
    # struct flock on Linux/x86-64 and aarch64: short type, short whence, off_t start, off_t len,
    # pid_t pid (0 for OFD locks), padded to 32 bytes
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0)


def _lock_byte(fd: int, start: int, take: bool) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK if take else fcntl.F_UNLCK, start))


def _byte_locked_by_other(fd: int, start: int) -> bool:
    """Would an exclusive lock on the byte conflict with someone (another open file)?"""
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, start))
    kind = struct.unpack("hhqqi4x", res)[0]
    return bool(kind != fcntl.F_UNLCK)


def _fd_access(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def _open_file(
    filename: str, flags: int, auto_read_only: bool, direct: bool
) -> tuple[int, os.stat_result, bool]:
    """open(2) + fstat in a worker: (fd, stat, opened read-only by auto-read-only)."""
    read_only = False
    try:
        fd = os.open(host_path(filename), flags)
    except OSError as e:
        err = e.errno or errno.EIO
        if auto_read_only and err in (errno.EACCES, errno.EROFS, errno.EPERM):
            read_only = True
            try:
                fd = os.open(host_path(filename), (flags & ~os.O_RDWR) | os.O_RDONLY)
            except OSError as e2:
                err2 = e2.errno or errno.EIO
                raise BlockMirrorError(f"Could not open '{filename}': {os.strerror(err2)}") from e2
        elif direct and err == errno.EINVAL:
            raise BlockMirrorError(
                f"Could not open '{filename}': filesystem does not support O_DIRECT"
            ) from e
        else:
            raise BlockMirrorError(f"Could not open '{filename}': {os.strerror(err)}") from e
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise BlockMirrorError(f"Could not open '{filename}': {os.strerror(errno.EISDIR)}")
    return fd, st, read_only


def _os_error(e: OSError) -> BlockIOError:
    return BlockIOError(e.errno or errno.EIO)


class FileDriver(BlockDriver):
    """A regular file (or anything ``open`` can read and write with pread/pwrite)."""

    format_name = "file"
    supports_truncate = True
    max_transfer = 16 * 1024 * 1024
    #: a FUA write is one call (pwritev2 with RWF_DSYNC; pwrite + fdatasync with O_DIRECT),
    #: not the generic write-then-flush in two hops: a writethrough client (qemu-io's
    #: default) sends every write with FUA. It promises only that write's durability
    #: (RWF_DSYNC syncs the written range, not the file's other dirty pages), so formats
    #: that need "everything so far" flush instead
    supports_fua = True

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.fd = -1
        self.filename = ""
        self.is_block_device = False
        self.locking = True
        self._size = 0
        self._locked_perm = Perm.NONE
        self._locked_unshared = Perm.NONE
        self._can_zero_range = True
        self._can_punch = True
        #: small buffered writes may run on the loop thread (a regular file on a local fs)
        self._inline_writes = False
        #: something that may make the next fdatasync long happened since the last one (a
        #: large or O_DIRECT write, zeroing, discard, truncation, a batch written past this
        #: driver by block/copy.py): that sync goes to the pool, never inline
        self._bulk_unsynced = True

    # --- life cycle ------------------------------------------------------------------------

    async def open(self) -> None:
        # the options were checked against the schema's BlockdevOptionsFile
        opts = self.node.options
        filename: str = opts["filename"]
        self.filename = filename
        aio = opts.get("aio", "threads")
        if aio == "native" and not self.node.cache_direct:
            raise BlockMirrorError(
                "aio=native was specified, but it requires cache.direct=on, "
                "which was not specified."
            )
        self.locking = opts.get("locking", "auto") != "off"

        flags = os.O_CLOEXEC | (os.O_RDONLY if self.node.read_only else os.O_RDWR)
        if self.node.cache_direct:
            flags |= os.O_DIRECT
        auto_ro = not self.node.read_only and bool(self.node.options.get("auto-read-only"))
        fd, st, read_only = await threadio.run(_open_file, filename, flags, auto_ro,
                                               self.node.cache_direct)
        self.fd = fd
        # auto-read-only: QEMU settles for read-only access when writing is not allowed
        self.node.read_only = self.node.read_only or read_only
        self.is_block_device = stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)
        try:
            self._check_kind()
        except BlockMirrorError:
            os.close(self.fd)
            self.fd = -1
            raise
        # regular files punch holes that read back as zeroes (cf. supported_zero_flags)
        self.can_write_zeroes_with_unmap = not self.is_block_device
        self._refresh_size(st)
        if self.node.cache_direct:
            self.request_alignment = await threadio.run(self._probe_alignment)
        else:
            self._inline_writes = await threadio.run(threadio.is_local_fs_sync, fd)

    async def reopen_read_write(self) -> None:
        """A descriptor opened read-only is replaced by a read-write one (blockdev-reopen,
        block/reopen.py); the graph re-takes the locks on the new descriptor afterwards."""
        if self.fd < 0 or _fd_access(self.fd) == os.O_RDWR:
            return
        flags = os.O_CLOEXEC | os.O_RDWR | (os.O_DIRECT if self.node.cache_direct else 0)
        fd, _, _ = await threadio.run(_open_file, self.filename, flags, False,
                                      self.node.cache_direct)
        old, self.fd = self.fd, fd
        os.close(old)
        self._locked_perm = self._locked_unshared = Perm.NONE

    def _check_kind(self) -> None:
        if self.is_block_device:
            raise BlockMirrorError(
                f"'file' driver requires '{self.filename}' to be a regular file"
            )

    def _refresh_size(self, st: os.stat_result | None = None) -> None:
        if self.is_block_device:
            self._size = threadio.blk_size(self.fd)
            return
        st = st or os.fstat(self.fd)
        # cf. bdrv_getlength: whole sectors; the tail past EOF reads as zeroes
        self._size = _round_up(st.st_size, _SECTOR)

    def _probe_alignment(self) -> int:
        """The smallest read size O_DIRECT accepts here (cf. raw_probe_alignment)."""
        buf = threadio.aligned_buffer(4096)
        try:
            view = memoryview(buf)
            for align in (512, 1024, 2048, 4096):
                try:
                    os.preadv(self.fd, [view[:align]], 0)
                    view.release()
                    return align
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        break
            view.release()
        finally:
            buf.close()
        return 4096

    async def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # closing the descriptor drops its OFD locks too

    # --- permissions as image locks -------------------------------------------------------

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Take QEMU-compatible lock bytes for the node's cumulative permissions."""
        if not self.locking or self.fd < 0:
            return
        unshared = Perm.all() & ~shared
        for bit, (p, word) in enumerate(_PERM_BITS):
            if p in perm and _byte_locked_by_other(self.fd, _LOCK_SHARED_BASE + bit):
                self._raise_lock_error(f'Failed to get "{word}" lock')
            if p in unshared and _byte_locked_by_other(self.fd, _LOCK_PERM_BASE + bit):
                self._raise_lock_error(f'Failed to get shared "{word}" lock')
        for bit, (p, _) in enumerate(_PERM_BITS):
            try:
                _lock_byte(self.fd, _LOCK_PERM_BASE + bit, p in perm)
                _lock_byte(self.fd, _LOCK_SHARED_BASE + bit, p in unshared)
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
                    # no OFD locks on this filesystem: locking=auto silently gives up
                    self.locking = False
                    return
                raise
        self._locked_perm, self._locked_unshared = perm, unshared

    def _raise_lock_error(self, msg: str) -> None:
        err = BlockMirrorError(msg)
        err.hint = f"Is another process using the image [{self.filename}]?"
        raise err

    # --- size -----------------------------------------------------------------------------

    def length(self) -> int:
        return self._size

    def has_zero_init(self) -> bool:
        return not self.is_block_device

    async def truncate(self, length: int, preallocation: str = "off") -> None:
        self._bulk_unsynced = True
        if self.is_block_device:
            if length > self._size:
                raise BlockIOError(errno.EINVAL, "Cannot grow device files")
            return
        try:
            old = (await threadio.fstat(self.fd)).st_size
            await threadio.ftruncate(self.fd, length)
            if length > old and preallocation == "falloc":
                await threadio.run(os.posix_fallocate, self.fd, old, length - old)
            elif length > old and preallocation == "full":
                step = 1024 * 1024
                zeroes = bytes(step)
                pos = old
                while pos < length:
                    n = min(step, length - pos)
                    await threadio.pwrite(self.fd, pos, zeroes[:n], direct=self.node.cache_direct)
                    pos += n
        except OSError as e:
            raise _os_error(e) from e
        self._refresh_size()

    # --- I/O ------------------------------------------------------------------------------

    def linear_child(self) -> tuple[BlockNode, int] | None:
        return (self.node, 0) if self.fd >= 0 else None

    async def preadv(self, offset: int, length: int) -> bytes:
        try:
            return await threadio.pread(self.fd, offset, length, direct=self.node.cache_direct)
        except OSError as e:
            raise _os_error(e) from e

    @property
    def inline_ok(self) -> bool:
        """Small buffered I/O on this file may run on the loop thread (a regular file on a
        local filesystem, not O_DIRECT; see block/inline_gate.py)."""
        return self._inline_writes

    def note_bulk_write(self) -> None:
        """Writes reached the file past this driver (block/copy.py's batches)."""
        self._bulk_unsynced = True

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        if len(data) > threadio.inline_gate.max_bytes or self.node.cache_direct:
            self._bulk_unsynced = True
        try:
            await threadio.pwrite(self.fd, offset, data, direct=self.node.cache_direct,
                                  sync=WriteFlags.FUA in flags, inline=self._inline_writes)
        except OSError as e:
            raise _os_error(e) from e

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self.pwrite_zeroes_batch([(offset, length)], flags)

    async def pwrite_zeroes_batch(self, extents: list[tuple[int, int]],
                                  flags: WriteFlags) -> None:
        """Zero every ``(offset, length)`` in one worker call (``block/copy.py`` batches)."""
        self._bulk_unsynced = True
        unmap = WriteFlags.MAY_UNMAP in flags
        try:
            await threadio.run(self._zero_all_sync, extents, unmap, WriteFlags.FUA in flags)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise BlockIOError(errno.ENOTSUP) from e
            raise _os_error(e) from e

    def _zero_all_sync(self, extents: list[tuple[int, int]], unmap: bool, sync: bool) -> None:
        for offset, length in extents:
            self._zero_sync(offset, length, unmap)
        if sync:
            os.fdatasync(self.fd)

    def _zero_sync(self, offset: int, length: int, unmap: bool) -> None:
        """One zeroing in a worker thread: punch, ZERO_RANGE, or punch + allocate."""
        fd = self.fd
        if self.is_block_device:
            try:
                threadio.blk_zeroout_sync(fd, offset, length)
            except OSError as e:
                # any failure: let the generic path write zeroes instead
                raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP)) from e
            return
        punch = threadio.FALLOC_FL_PUNCH_HOLE | threadio.FALLOC_FL_KEEP_SIZE
        try:
            if unmap and self._can_punch:
                threadio.fallocate_sync(fd, punch, offset, length)
                return
            if self._can_zero_range:
                try:
                    threadio.fallocate_sync(fd, threadio.FALLOC_FL_ZERO_RANGE, offset, length)
                    return
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                        raise
                    self._can_zero_range = False
            if self._can_punch:
                # cf. handle_aiocb_write_zeroes: punch, then allocate the range again
                threadio.fallocate_sync(fd, punch, offset, length)
                threadio.fallocate_sync(fd, 0, offset, length)
                return
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                self._can_punch = False
            raise
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    async def pdiscard(self, offset: int, length: int) -> None:
        self._bulk_unsynced = True
        try:
            if self.is_block_device:
                await threadio.blk_discard(self.fd, offset, length)
            else:
                await threadio.punch_hole(self.fd, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise BlockIOError(errno.ENOTSUP) from e
            raise _os_error(e) from e

    async def flush(self) -> None:
        # inline only after small writes alone; cleared before the sync, so that a large
        # write landing while it runs sends the next one to the pool again
        inline = self._inline_writes and not self._bulk_unsynced
        self._bulk_unsynced = False
        try:
            await threadio.fdatasync(self.fd, inline=inline)
        except OSError as e:
            raise _os_error(e) from e

    async def block_status(self, offset: int, length: int) -> Extent:
        valid = BlockStatus.OFFSET_VALID | BlockStatus.ALLOCATED
        if self.is_block_device:
            return Extent(length, BlockStatus.DATA | valid, map_offset=offset, map_node=self.node)
        try:
            is_data, end = await threadio.seek_extent(self.fd, offset)
        except OSError:
            # no information: pretend everything is data (cf. raw_co_block_status)
            return Extent(length, BlockStatus.DATA | valid, map_offset=offset, map_node=self.node)
        if end <= offset:
            # past EOF (the sector-rounded tail): a trailing hole
            end = offset + length
        n = min(length, end - offset)
        status = BlockStatus.DATA if is_data else BlockStatus.ZERO
        return Extent(n, status | valid, map_offset=offset, map_node=self.node)


@register
class HostDeviceDriver(FileDriver):
    """A block device: sizes and zeroing through ioctls; never zero-initialised."""

    format_name = "host_device"

    def _check_kind(self) -> None:
        if not self.is_block_device:
            raise BlockMirrorError(
                f"'host_device' driver requires '{self.filename}' to be either a character "
                "or block device"
            )


register(FileDriver)
