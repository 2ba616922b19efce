"""Blocking file I/O run in a thread pool: the only place that owns worker threads.

Protocol drivers (``drivers/file.py``) call these coroutines with whole requests (never byte by
byte); each runs one or a few system calls in a worker thread so the event loop never blocks on
the disk. Also here: O_DIRECT aligned buffers, fallocate through ctypes (Python has no binding
for FALLOC_FL_PUNCH_HOLE/ZERO_RANGE), SEEK_DATA/SEEK_HOLE, and the block-device ioctls.
Nothing here knows about nodes or QEMU semantics.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from blockmirror.block.inline_gate import InlineGate

T = TypeVar("T")

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# linux/fs.h ioctls on block devices
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

# a mirror keeps up to 16 ops in flight (MAX_IN_FLIGHT), each one blocking call at a time; a few
# more workers let block-status seeks, NBD export requests and guest writes run beside them
# instead of queueing behind a full batch of copies
_MAX_WORKERS = 24
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


#: glibc's mallopt parameters: the size from which buffers get their own mapping, and how
#: much free memory at the top of the heap is kept instead of being given back
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: above asyncio's 256 KiB socket receive buffer (see _tune_malloc)
_MMAP_THRESHOLD = 320 * 1024
_TRIM_THRESHOLD = 2 * 1024 * 1024


def _tune_malloc() -> None:
    """Give request-sized buffers back to the system when they are freed.

    glibc raises its mmap threshold each time a mapped block is freed, so after the first
    megabyte-sized buffers every later one comes from the heap, whose freed middle is kept:
    a mirror's peak RSS grew by 8 to 20 MiB that way (measured). A fixed threshold keeps
    big buffers mapped and returned on free; small ones stay on the heap.

    The threshold sits just above the 256 KiB buffer asyncio's socket transports allocate
    for every receive (shrunk to what arrived): at 256 KiB each NBD request cost an mmap, an
    mremap, a munmap and 9 page faults, about a third of a 64 KiB guest write's CPU
    (measured: 249-360 µs per write against 170-188 µs with the buffer on the heap). The
    trim threshold keeps up to 2 MiB of freed heap top instead of handing it back and
    faulting it in again on the next request.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def executor() -> ThreadPoolExecutor:
    """The process-wide I/O pool (created on first use; threads are cheap to share)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _tune_malloc()
            _executor = ThreadPoolExecutor(_MAX_WORKERS, thread_name_prefix="blockmirror-io")
        return _executor


async def run(fn: Callable[..., T], *args: object) -> T:
    """Run one blocking callable in the pool and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor(), functools.partial(fn, *args))


class Lane:
    """One worker thread of its own, for a short call on a latency-critical path.

    The shared pool is FIFO: a tiny durable write queued there waits behind up to a full
    batch of a mirror's 64 KiB-to-MiB copies (measured: 0.2 ms median, up to 3 ms at p90 on
    a loaded machine). A lane's thread runs only its owner's calls, one at a time, in order.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        """Let the thread end once its queued calls are done (does not wait for them)."""
        self._pool.shutdown(wait=False)


def pwrite_dsync_sync(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write ``data`` durably (O_DSYNC semantics for this write): one ``pwritev2(RWF_DSYNC)``.

    One system call instead of ``pwrite`` + ``fdatasync``, so the calling thread takes the
    GIL back once, not twice. Falls back to the pair where the flag is unknown (old kernels,
    some FUSE filesystems), which is the same guarantee.
    """
    flag = getattr(os, "RWF_DSYNC", None)
    view = memoryview(data)
    if flag is not None:
        try:
            while view:
                n = os.pwritev(fd, [view], offset, flag)
                view, offset = view[n:], offset + n
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    os.fdatasync(fd)


# --- libc fallocate --------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _libc_handle() -> ctypes.CDLL:
    """The symbols the process already loaded, libc's among them.

    Not ``ctypes.util.find_library("c")``: that imports subprocess, tempfile and random and
    runs ``ldconfig -p`` in a child, some 28 ms of CPU at the first zeroed range of a mirror
    (issue 10), to name a library the interpreter is already linked with.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _fallocate_fn() -> Any:
    fn = getattr(_libc_handle(), "fallocate", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


def fallocate_sync(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode; raises OSError(ENOTSUP/EOPNOTSUPP) when unsupported."""
    fn = _fallocate_fn()
    if fn is None:
        if mode == 0:
            os.posix_fallocate(fd, offset, length)
            return
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
    if fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


#: statfs f_type of local filesystems (linux/magic.h): writes to their page cache do not wait
#: on a network, so a small one may run on the loop thread (inline_gate.py)
_LOCAL_FS_MAGIC = frozenset({
    0xEF53,      # ext2/3/4
    0x58465342,  # xfs
    0x9123683E,  # btrfs
    0x01021994,  # tmpfs
    0x858458F6,  # ramfs
    0xF2F52010,  # f2fs
    0x2FC12FC1,  # zfs
    0xCA451A4E,  # bcachefs
    0x794C7630,  # overlayfs (containers' root)
})


def is_local_fs_sync(fd: int) -> bool:
    """True when ``fd`` lives on a local filesystem (not NFS, CIFS, FUSE, Ceph, ...).

    Python has no fstatfs; libc's fills a ``struct statfs`` whose first field is f_type
    (a long) on every Linux ABI we run on. Unknown or failing: not local (the safe answer).
    """
    fn = getattr(_libc_handle(), "fstatfs", None)
    if fn is None:
        return False
    buf = ctypes.create_string_buffer(256)  # sizeof(struct statfs) is 120 on x86_64
    if fn(fd, buf) != 0:
        return False
    f_type = int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder) & 0xFFFFFFFF
    return f_type in _LOCAL_FS_MAGIC


# --- aligned buffers for O_DIRECT -------------------------------------------------------------


def aligned_buffer(length: int) -> mmap.mmap:
    """An anonymous mapping: page aligned, which satisfies every O_DIRECT alignment."""
    return mmap.mmap(-1, max(length, 1))


#: per worker thread, one bounce buffer kept between O_DIRECT requests: mapping and faulting
#: in a fresh buffer for every request cost two thirds of the throughput of 1 MiB requests
_bounce = threading.local()
#: requests larger than this get a one-off buffer, so idle workers do not pin much memory
_BOUNCE_KEEP_MAX = 4 * 1024 * 1024


@contextmanager
def _bounce_buffer(length: int) -> Iterator[memoryview]:
    if length > _BOUNCE_KEEP_MAX:
        once = aligned_buffer(length)
        view = memoryview(once)
        try:
            yield view
        finally:
            view.release()
            once.close()
        return
    kept: mmap.mmap | None = getattr(_bounce, "buf", None)
    if kept is None or len(kept) < length:
        if kept is not None:
            kept.close()
        kept = aligned_buffer(max(length, 1024 * 1024))
        _bounce.buf = kept
    view = memoryview(kept)
    try:
        yield view
    finally:
        view.release()


# --- the synchronous primitives (run in workers) ---------------------------------------------


def _pread_all(fd: int, offset: int, length: int, direct: bool) -> bytes:
    if direct:
        with _bounce_buffer(length) as view:
            done = 0
            while done < length:
                n = os.preadv(fd, [view[done:length]], offset + done)
                if n == 0:
                    break
                done += n
            data = bytes(view[:done])
    else:
        parts: list[bytes] = []
        done = 0
        while done < length:
            chunk = os.pread(fd, length - done, offset + done)
            if not chunk:
                break
            parts.append(chunk)
            done += len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) < length:
        # reads past EOF of a growing/shrunk file read as zeroes, like QEMU's file-posix
        data += bytes(length - len(data))
    return data


def _pwrite_all(fd: int, offset: int, data: bytes | memoryview, direct: bool) -> None:
    view = memoryview(data)
    if direct:
        with _bounce_buffer(len(view)) as bview:
            bview[: len(view)] = view
            src = bview[: len(view)]
            done = 0
            while done < len(src):
                done += os.pwritev(fd, [src[done:]], offset + done)
            src.release()
        return
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _seek_extent(fd: int, offset: int) -> tuple[bool, int]:
    """(is_data, end) of the data or hole run at ``offset``; end -1: hole to the end.

    cf. find_allocation in file-posix.c.
    """
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            # no data after offset: a trailing hole, to the end of whatever was asked
            return False, -1
        raise
    if data > offset:
        return False, data
    hole = os.lseek(fd, offset, os.SEEK_HOLE)
    return True, hole


def _ioctl_u64_pair(fd: int, request: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, request, struct.pack("QQ", offset, length))


def blk_zeroout_sync(fd: int, offset: int, length: int) -> None:
    _ioctl_u64_pair(fd, BLKZEROOUT, offset, length)


def seek_walk_sync(
    fd: int, ranges: list[tuple[int, int]], granularity: int = 1
) -> list[list[tuple[bool, int]]]:
    """For each ``(offset, length)``, its data and hole runs as ``(is_data, length)`` pairs.

    The SEEK_DATA/SEEK_HOLE walk of many ranges in one worker call (cf. find_allocation).
    Without SEEK_DATA support everything is data, as file-posix assumes. With a
    ``granularity`` (ranges start aligned to it), a unit that holds both data and a hole
    counts as data and the walk moves on to the next unit: a caller that copies whole units
    needs no finer answer, and a disk of 4 KiB extents needs no 4 KiB steps.
    """
    out: list[list[tuple[bool, int]]] = []
    for offset, length in ranges:
        runs: list[tuple[bool, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            try:
                is_data, stop = _seek_extent(fd, pos)
            except OSError:
                is_data, stop = True, end
            if stop <= pos:
                stop = end  # past EOF: a trailing hole
            stop = min(stop, end)
            if stop - pos < granularity and stop < end:
                # mixed unit: data, up to the next unit boundary
                is_data = True
                stop = min(end, pos + granularity - (pos - offset) % granularity)
            elif stop < end and granularity > 1:
                stop -= (stop - offset) % granularity
            n = stop - pos
            if runs and runs[-1][0] == is_data:
                runs[-1] = (is_data, runs[-1][1] + n)
            else:
                runs.append((is_data, n))
            pos = stop
        out.append(runs)
    return out


def _blk_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("Q", buf)[0])


# --- batches: many extents in one worker hop ------------------------------------------------

#: the largest piece one preadv/pwritev pair of a batched copy moves, and its buffer's size
_COPY_PIECE = 1024 * 1024
#: the piece when the target is buffered (the page cache). Measured in this project's VM,
#: copying 1 GiB file to file in one thread (a fresh sparse target): 1 MiB pieces spent
#: 1.2-2.0 s in the kernel's copy into page-cache folios (``copy_folio_from_iter_atomic``),
#: 256 KiB pieces 0.26-0.41 s, 64 KiB pieces 0.39-0.49 s; an idle raw 4k-layout mirror
#: (every 64 KiB unit has data: one long run) came READY in 3.8 s against 0.70 s (QSD:
#: 1.5 s), and the other layouts' copies did not change. The machine does not always show
#: it (an earlier phase copied that layout in 1 MiB pieces in 0.6-0.7 s); 256 KiB costs a
#: few thousand more calls per GiB either way. O_DIRECT keeps the larger piece: there the
#: size is the device's request
_COPY_PIECE_BUFFERED = 256 * 1024
#: buffers of batched copies not in use, shared by the worker threads (a buffer per thread
#: would keep one for each of the pool's 24 threads that ever copied: 24 MiB of RSS)
_copy_free: list[mmap.mmap] = []
_copy_free_lock = threading.Lock()
#: how many idle buffers are kept for the next copies
_COPY_KEEP = 4


@contextmanager
def _copy_buffer() -> Iterator[memoryview]:
    with _copy_free_lock:
        buf = _copy_free.pop() if _copy_free else None
    if buf is None:
        # an anonymous mapping is page aligned, so it serves O_DIRECT files too
        buf = aligned_buffer(_COPY_PIECE)
    view = memoryview(buf)
    try:
        yield view
    finally:
        view.release()
        with _copy_free_lock:
            if len(_copy_free) < _COPY_KEEP:
                _copy_free.append(buf)
                buf = None
        if buf is not None:
            with contextlib.suppress(BufferError):  # a slice still held by an error
                buf.close()


#: sync_file_range(2)'s flag: start writing dirty pages back, do not wait
_SYNC_FILE_RANGE_WRITE = 2
_libc_sync_file_range: Any = None


#: a batch's write-back is started only when its bytes fill at least 1/WRITE_BEHIND_SPARSE
#: of the stretch from its first to its last byte
WRITE_BEHIND_SPARSE = 4


def _write_behind(fd: int, extents: Iterable[tuple[int, int]]) -> None:
    """Start the write-back of what a batch just wrote (``(offset, length)`` pairs in
    ``fd``), without waiting for it.

    A mirror's target flush before READY (and before the pivot) otherwise waits for all of
    the copy's dirty pages at once: measured 0.2-0.4 s per GiB copied, most of the tail
    between "all copied" and READY. Started batch by batch, the write-back overlaps the copy.

    Only for a dense batch (the bulk copy's): one call covers the stretch from the batch's
    first byte to its last, and for a READY mirror's batch of chunks scattered over the
    disk by a guest's random writes, that stretch is the whole file. The call then walked
    every dirty page of the target and started its write-back, next to a guest waiting for
    its own syncs: measured under a max-rate 64 KiB random writer on qcow2, 70-110 µs more
    CPU per guest write and a 15-17% slower guest (paired runs in one daemon, medians of
    24). Those pages are written when the kernel's write-back or the final flush comes to
    them, as they are in QEMU, which never starts write-back early.
    Advisory: any failure is left to the flush that must follow.
    """
    global _libc_sync_file_range
    start, end, total = -1, 0, 0
    for offset, length in extents:
        if start < 0 or offset < start:
            start = offset
        end = max(end, offset + length)
        total += length
    if start < 0 or end <= start or total * WRITE_BEHIND_SPARSE < end - start:
        return
    if _libc_sync_file_range is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _libc_sync_file_range = fn
        except (OSError, AttributeError):
            _libc_sync_file_range = False
    if _libc_sync_file_range:
        _libc_sync_file_range(fd, start, end - start, _SYNC_FILE_RANGE_WRITE)


class BatchError(OSError):
    """A batched copy failed; ``is_read`` says which side (and ``index`` which extent)."""

    def __init__(self, err: OSError, is_read: bool, index: int) -> None:
        super().__init__(err.errno or errno.EIO, err.strerror or os.strerror(errno.EIO))
        self.is_read = is_read
        self.index = index


def copy_batch_sync(src_fd: int, dst_fd: int, plan: list[tuple[int, int, int]],
                    direct: bool = False) -> int:
    """Copy every ``(src_offset, dst_offset, length)`` of ``plan``; returns bytes copied.

    One worker call for the whole plan: the event loop pays one hand-off, not one per extent.
    A source read short of ``length`` (EOF of a file that shrank) is padded with zeroes.
    ``direct``: a file is opened O_DIRECT (larger pieces; see ``_COPY_PIECE_BUFFERED``).
    """
    total = 0
    piece_max = _COPY_PIECE if direct else _COPY_PIECE_BUFFERED
    with _copy_buffer() as view:
        for index, (src_off, dst_off, length) in enumerate(plan):
            done = 0
            while done < length:
                n = min(length - done, piece_max)
                piece = view[:n]
                try:
                    got = os.preadv(src_fd, [piece], src_off + done)
                except OSError as e:
                    raise BatchError(e, True, index) from e
                if got < n:
                    piece[got:n] = bytes(n - got)
                written = 0
                try:
                    while written < n:
                        written += os.pwritev(dst_fd, [piece[written:n]], dst_off + done + written)
                except OSError as e:
                    raise BatchError(e, False, index) from e
                piece.release()
                done += n
            total += length
    if plan:
        _write_behind(dst_fd, ((d, n) for _s, d, n in plan))
    return total


def read_batch_sync(fd: int, extents: list[tuple[int, int]], direct: bool) -> list[bytes]:
    """Read every ``(offset, length)`` in one worker call (zero-padded at EOF)."""
    out: list[bytes] = []
    for index, (offset, length) in enumerate(extents):
        try:
            out.append(_pread_all(fd, offset, length, direct))
        except OSError as e:
            raise BatchError(e, True, index) from e
    return out


def write_batch_sync(fd: int, pieces: list[tuple[int, bytes | memoryview]], direct: bool) -> None:
    """Write every ``(offset, data)`` in one worker call."""
    for index, (offset, data) in enumerate(pieces):
        try:
            _pwrite_all(fd, offset, data, direct)
        except OSError as e:
            raise BatchError(e, False, index) from e
    if pieces and not direct:
        _write_behind(fd, ((o, len(d)) for o, d in pieces))


# --- the async API --------------------------------------------------------------------------


async def pread(fd: int, offset: int, length: int, *, direct: bool = False) -> bytes:
    return await run(_pread_all, fd, offset, length, direct)


#: decides which small buffered writes run on the loop thread (see inline_gate.py)
inline_gate = InlineGate()


async def run_short(nbytes: int, inline: bool, fn: Callable[..., T], *args: object) -> T:
    """Run a short blocking call on the loop thread when ``inline`` (the caller's files
    allow it: buffered, on a local filesystem) and ``inline_gate`` admits a call of
    ``nbytes``; else in the pool, as ``run`` does (see inline_gate.py)."""
    gate = inline_gate
    if inline and gate.admit(nbytes):
        if gate.yield_first:
            await asyncio.sleep(0)
        started = gate.start()
        try:
            return fn(*args)
        finally:
            gate.done(started)
    if inline and gate.probing:
        # timed in the pool too: fast calls there end the gate's cooldown early
        started = gate.start()
        try:
            return await run(fn, *args)
        finally:
            gate.pooled_done(started)
    return await run(fn, *args)


async def pwrite(fd: int, offset: int, data: bytes | memoryview, *, direct: bool = False,
                 sync: bool = False, inline: bool = False) -> None:
    """``sync``: the write is durable when this returns (a FUA write: one call, not two).
    Only this write: ``RWF_DSYNC`` syncs its own range, not the file's other dirty pages.

    With ``inline`` (the caller's file is on a local filesystem, ``is_local_fs_sync``), a
    small buffered write runs on the calling (loop) thread when ``inline_gate`` admits it:
    the hop to a worker and back costs more than the write (inline_gate.py). O_DIRECT writes
    always go to the pool: they wait for the device.
    """
    await run_short(len(data), inline and not direct, _pwrite_durable if sync else _pwrite_all,
                    fd, offset, data, direct)


def _pwrite_durable(fd: int, offset: int, data: bytes | memoryview, direct: bool) -> None:
    if direct:
        _pwrite_all(fd, offset, data, direct)
        os.fdatasync(fd)
    else:
        pwrite_dsync_sync(fd, data, offset)


async def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    await run(fallocate_sync, fd, mode, offset, length)


async def punch_hole(fd: int, offset: int, length: int) -> None:
    await fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


async def zero_range(fd: int, offset: int, length: int) -> None:
    await fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length)


async def seek_extent(fd: int, offset: int) -> tuple[bool, int]:
    return await run(_seek_extent, fd, offset)


async def fsync(fd: int) -> None:
    await run(os.fsync, fd)


async def fdatasync(fd: int, *, inline: bool = False) -> None:
    """``inline``: the caller knows only small writes wait for this sync (see the file
    driver's ``flush``); then it may run on the loop thread when ``inline_gate`` admits it,
    like the small writes themselves (a writethrough guest's write to a qcow2 image ends
    with one: its hop to the pool cost more than the sync)."""
    await run_short(0, inline, os.fdatasync, fd)


async def ftruncate(fd: int, length: int) -> None:
    await run(os.ftruncate, fd, length)


async def fstat(fd: int) -> os.stat_result:
    return await run(os.fstat, fd)


async def blk_discard(fd: int, offset: int, length: int) -> None:
    await run(_ioctl_u64_pair, fd, BLKDISCARD, offset, length)


async def blk_zeroout(fd: int, offset: int, length: int) -> None:
    await run(_ioctl_u64_pair, fd, BLKZEROOUT, offset, length)


def blk_size(fd: int) -> int:
    """BLKGETSIZE64; one quick ioctl, fine to call from the loop at open time."""
    return _blk_size(fd)


__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "BatchError",
    "aligned_buffer",
    "blk_discard",
    "blk_size",
    "blk_zeroout",
    "blk_zeroout_sync",
    "copy_batch_sync",
    "executor",
    "fallocate",
    "fallocate_sync",
    "fdatasync",
    "fstat",
    "fsync",
    "ftruncate",
    "pread",
    "punch_hole",
    "pwrite",
    "read_batch_sync",
    "run",
    "seek_extent",
    "seek_walk_sync",
    "write_batch_sync",
    "zero_range",
]
