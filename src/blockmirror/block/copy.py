"""Copying ranges from one node to another (cf. bdrv_co_copy_range), in batches.

A mirror copies thousands of small extents on a fragmented disk. Sent one by one through
``read`` and ``write``, every extent pays a thread-pool hand-off (and a loop wake-up) per
side, which on a 2-core machine costs more than moving the bytes. ``copy_extents`` takes a
whole list of extents instead and picks the cheapest correct way for the pair of nodes:

* both nodes map linearly onto a plain host file (``BlockDriver.linear_child``: a raw node over
  a ``file`` node, or the file node itself) and nothing on the target wants to see the data:
  one worker call reads and writes every extent (``threadio.copy_batch_sync``);
* only the source maps linearly: one worker call reads every extent, then each is written
  through the target's generic request path (qcow2 allocation, interceptors, trackers);
* otherwise each extent goes through ``read`` and ``write``, concurrently.

The fast paths keep the generic path's bookkeeping: in-flight counts (drains wait for them),
``write_gen`` (so the next flush really flushes), bounds, read-only and alignment checks.
Errors come back as ``CopyError``, which says whether the read or the write side failed.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockmirror.block import io, threadio
from blockmirror.block.driver import WriteFlags
from blockmirror.block.drivers.file import FileDriver
from blockmirror.block.io import check_request, check_writable
from blockmirror.errors import BlockIOError

if TYPE_CHECKING:
    from blockmirror.block.node import BlockNode


class CopyError(BlockIOError):
    """A copy failed on the source (``is_read``) or on the target side."""

    def __init__(self, err: int, is_read: bool, desc: str | None = None) -> None:
        super().__init__(err, desc)
        self.is_read = is_read


@dataclass(frozen=True)
class HostFile:
    """Where a node's bytes live: guest offset ``o`` is ``base + o`` of ``fd``."""

    nodes: tuple[BlockNode, ...]  #: the node, then each node down to the file node
    fd: int
    base: int
    align: int
    direct: bool


def host_file(node: BlockNode, *, for_write: bool) -> HostFile | None:
    """The linear host file behind ``node``, if reads (or writes) may bypass the request path.

    For writes, no node on the way may have an interceptor (active mirroring, fault rules), a
    dirty tracker, zero detection or anything but the plain ``file`` driver at the bottom.
    """
    nodes: list[BlockNode] = []
    base = 0
    cur = node
    for _ in range(4):
        if for_write and (cur.interceptors or cur.dirty_trackers or cur.detect_zeroes != "off"):
            return None
        if cur.fault_rules:  # its requests must meet the rules (block/faults.py)
            return None
        mapping = cur.driver.linear_child()
        if mapping is None:
            return None
        child, offset = mapping
        nodes.append(cur)
        base += offset
        if child is cur:
            drv = cur.driver
            if type(drv) is not FileDriver or drv.fd < 0:
                return None
            direct = any(n.cache_direct for n in nodes)
            return HostFile(tuple(nodes), drv.fd, base, drv.request_alignment, direct)
        cur = child
    return None


def _small_local(src: HostFile, dst: HostFile, nbytes: int) -> bool:
    """Both files are buffered regular files on local filesystems, and a plan of ``nbytes``
    is small."""
    if src.direct or dst.direct:
        return False
    if nbytes > threadio.inline_gate.max_bytes:
        return False
    for hf in (src, dst):
        drv = hf.nodes[-1].driver
        if not isinstance(drv, FileDriver) or not drv.inline_ok:
            return False
    return True


def writes_inline(node: BlockNode, nbytes: int) -> bool:
    """Whether a write of ``nbytes`` to ``node`` is expected to run on the loop thread now:
    its data reaches, through format nodes, a buffered regular file on a local filesystem,
    and ``threadio.inline_gate`` would take a call of that size.

    For a caller choosing between issuing two writes one after the other in its own task and
    running them concurrently: an inline write costs less than the task that would overlap
    it, a write to the pool, a network or O_DIRECT costs more. A guess, not a promise: the
    gate may close before the write is made.
    """
    cur: BlockNode | None = node
    for _ in range(4):
        if cur is None or cur.cache_direct:
            return False
        drv = cur.driver
        if isinstance(drv, FileDriver):
            return drv.inline_ok and threadio.inline_gate.would_admit(nbytes)
        cur = cur.child("data-file") or cur.file
    return False


def data_file_pair(src: BlockNode, dst: BlockNode) -> tuple[HostFile, HostFile] | None:
    """The host files of two formats that keep their data at host offsets of a plain file
    (qcow2's data clusters): what ``copy_extents`` moves bytes between when the nodes
    themselves are not linear. None when either has no such file or it is not plain."""
    src_file, dst_file = src.driver.data_file_node(), dst.driver.data_file_node()
    if src_file is None or dst_file is None:
        return None
    src_hf = host_file(src_file, for_write=False)
    dst_hf = host_file(dst_file, for_write=True)
    if src_hf is None or dst_hf is None:
        return None
    return src_hf, dst_hf


def kernel_copy_files(src: BlockNode, dst: BlockNode) -> tuple[HostFile, HostFile] | None:
    """The host files ``copy_extents`` would move bytes between without Python seeing them:
    the nodes' own, or their formats' data files; None when the data passes through Python.
    A property of the pair, not of one request (alignment and read-only checks come later)."""
    src_hf = host_file(src, for_write=False)
    dst_hf = host_file(dst, for_write=True)
    if src_hf is not None and dst_hf is not None:
        return src_hf, dst_hf
    return data_file_pair(src, dst)


def _aligned(hf: HostFile, extents: Sequence[tuple[int, int]]) -> bool:
    a = hf.align
    return a <= 1 or all((hf.base + o) % a == 0 and n % a == 0 for o, n in extents)


def _enter(nodes: Sequence[BlockNode]) -> None:
    for node in nodes:
        node.in_flight += 1


def _leave(nodes: Sequence[BlockNode], written: bool) -> None:
    for node in nodes:
        if written:
            node.write_gen += 1
            drv = node.driver
            if isinstance(drv, FileDriver):
                drv.note_bulk_write()  # its next sync may be long: not on the loop thread
        node.in_flight -= 1
        if node.in_flight == 0 and node.drain_event is not None:
            ev, node.drain_event = node.drain_event, None
            ev.set()


async def read_host(node: BlockNode, ranges: list[tuple[int, int]]) -> list[bytes] | None:
    """Read ranges of a node that maps onto a host file in one worker call (zero-padded past
    the file's end), or None when it does not (or the ranges do not fit O_DIRECT)."""
    hf = host_file(node, for_write=False)
    if hf is None or not _aligned(hf, ranges):
        return None
    _enter(hf.nodes)
    try:
        return await threadio.run(threadio.read_batch_sync, hf.fd,
                                  [(hf.base + o, n) for o, n in ranges], hf.direct)
    except OSError as e:
        raise BlockIOError(e.errno or errno.EIO) from e
    finally:
        _leave(hf.nodes, False)


async def write_host(node: BlockNode, pieces: list[tuple[int, bytes | memoryview]]) -> bool:
    """Write pieces to a node that maps onto a host file in one worker call; False when it
    does not, or when something on the way must see each write (nothing was written)."""
    hf = host_file(node, for_write=True)
    if hf is None or not _aligned(hf, [(o, len(d)) for o, d in pieces]) or any(
            n.read_only or n.corrupt for n in hf.nodes):
        return False
    _enter(hf.nodes)
    try:
        await threadio.run(threadio.write_batch_sync, hf.fd,
                           [(hf.base + o, d) for o, d in pieces], hf.direct)
    except OSError as e:
        raise BlockIOError(e.errno or errno.EIO) from e
    finally:
        _leave(hf.nodes, True)
    return True


def _batch_error(e: OSError) -> CopyError:
    is_read = e.is_read if isinstance(e, threadio.BatchError) else False
    return CopyError(e.errno or errno.EIO, is_read)


async def copy_extents(
    src: BlockNode, dst: BlockNode, extents: Sequence[tuple[int, int]]
) -> None:
    """Copy each ``(offset, length)`` of ``src`` to the same offset of ``dst``.

    Raises:
        CopyError: the first failure; the caller treats every extent as not copied.
    """
    if not extents:
        return
    for offset, length in extents:
        check_request(src, offset, length)
        check_request(dst, offset, length)
    try:
        check_writable(dst)
    except BlockIOError as e:
        raise CopyError(e.errno, False, str(e)) from e
    src_hf = host_file(src, for_write=False)
    if src_hf is not None and not _aligned(src_hf, extents):
        src_hf = None
    dst_hf = host_file(dst, for_write=True) if src_hf is not None else None
    if dst_hf is not None and (not _aligned(dst_hf, extents)
                               or any(n.read_only or n.corrupt for n in dst_hf.nodes)):
        dst_hf = None
    if src_hf is not None and dst_hf is not None:
        await _copy_host_to_host(src_hf, dst_hf, extents)
    elif src_hf is not None:
        await _copy_host_to_node(src_hf, dst, extents)
    elif not await _copy_via_data_files(src, dst, extents):
        await _copy_generic(src, dst, extents)


async def _copy_host_to_host(
    src: HostFile, dst: HostFile, extents: Sequence[tuple[int, int]]
) -> None:
    await _copy_host_to_host_plan(src, dst, [(src.base + o, dst.base + o, n) for o, n in extents])


async def _copy_host_to_host_plan(
    src: HostFile, dst: HostFile, plan: list[tuple[int, int, int]]
) -> None:
    """``copy_batch_sync`` of ``(src_offset, dst_offset, length)`` in the files themselves."""
    _enter(src.nodes)
    _enter(dst.nodes)
    try:
        # a few chunks between local files may run on the loop thread, as a small write
        # does (the pool's hop cost more than the copy; a READY mirror under a busy guest
        # copies one 64 KiB chunk per guest write, and could not catch up to finish)
        nbytes = sum(n for _s, _d, n in plan)
        await threadio.run_short(nbytes, _small_local(src, dst, nbytes),
                                 threadio.copy_batch_sync, src.fd, dst.fd, plan,
                                 src.direct or dst.direct)
    except OSError as e:
        raise _batch_error(e) from e
    finally:
        _leave(src.nodes, False)
        # bytes may have reached the target even on failure: the next flush must run
        _leave(dst.nodes, True)


async def _copy_via_data_files(
    src: BlockNode, dst: BlockNode, extents: Sequence[tuple[int, int]]
) -> bool:
    """Copy between formats that keep data at host offsets of a plain file (qcow2 to qcow2)
    in one worker call: the source says where each extent lies in its file, the target
    allocates clusters for them, and ``copy_batch_sync`` moves the bytes file to file
    through one reused buffer; the target maps the clusters once they are written.

    False, with nothing copied: the pair cannot (an extent is not plain data clusters on the
    source or whole clusters on the target, something on the target must see each write,
    a file is not a plain host file).
    """
    if (src.fault_rules or dst.fault_rules or dst.interceptors or dst.dirty_trackers
            or dst.detect_zeroes != "off" or dst.corrupt):
        return False
    pair = data_file_pair(src, dst)
    if pair is None:
        return False
    src_hf, dst_hf = pair
    if any(n.read_only or n.corrupt for n in dst_hf.nodes):
        return False
    if src_hf.align > 1 or dst_hf.align > 1:
        return False  # O_DIRECT: the generic path knows how to align
    wanted = list(extents)
    try:
        pinned = await src.driver.host_segments(wanted)
    except BlockIOError as e:
        raise CopyError(e.errno, True, str(e)) from e
    if pinned is None:
        return False
    runs, token = pinned
    # guest offset -> source host offset, in guest order
    source: list[tuple[int, int, int]] = []
    for (offset, _length), host_runs in zip(wanted, runs, strict=True):
        pos = offset
        for host, n in host_runs:
            source.append((pos, host, n))
            pos += n

    async def fill(plan: list[tuple[int, int, int]]) -> None:
        moves: list[tuple[int, int, int]] = []
        i = 0
        for guest, dst_host, length in plan:
            while length > 0:
                while source[i][0] + source[i][2] <= guest:
                    i += 1
                g, h, n = source[i]
                take = min(length, g + n - guest)
                moves.append((src_hf.base + h + (guest - g), dst_hf.base + dst_host, take))
                guest += take
                dst_host += take
                length -= take
        await _copy_host_to_host_plan(src_hf, dst_hf, moves)

    _enter((src, dst))
    try:
        done = await dst.driver.write_via(wanted, fill)
    except CopyError:
        raise
    except BlockIOError as e:
        raise CopyError(e.errno, False, str(e)) from e
    finally:
        src.driver.release_host(token)
        _leave((src,), False)
        _leave((dst,), True)
    if done:
        src.stats.record_batch("read", wanted)
        dst.stats.record_batch("write", wanted)
    return done


async def _copy_host_to_node(
    src: HostFile, dst: BlockNode, extents: Sequence[tuple[int, int]]
) -> None:
    _enter(src.nodes)
    try:
        parts = await threadio.run(threadio.read_batch_sync, src.fd,
                                   [(src.base + o, n) for o, n in extents], src.direct)
    except OSError as e:
        raise _batch_error(e) from e
    finally:
        _leave(src.nodes, False)
    pieces: list[tuple[int, bytes | memoryview]] = [
        (o, data) for (o, _n), data in zip(extents, parts, strict=True)]
    await _write_all(dst, pieces)


async def _write_all(dst: BlockNode, pieces: list[tuple[int, bytes | memoryview]]) -> None:
    try:
        if len(pieces) == 1:
            await dst.write(*pieces[0])
        else:
            await io.write_many(dst, pieces)
    except BlockIOError as e:
        raise CopyError(e.errno, False, str(e)) from e


async def _copy_generic(
    src: BlockNode, dst: BlockNode, extents: Sequence[tuple[int, int]]
) -> None:
    try:
        if len(extents) == 1:
            parts = [await src.read(*extents[0])]
        else:
            parts = await io.read_many(src, list(extents))
    except BlockIOError as e:
        raise CopyError(e.errno, True, str(e)) from e
    dst_hf = host_file(dst, for_write=True)
    pieces: list[tuple[int, bytes | memoryview]] = [
        (o, d) for (o, _n), d in zip(extents, parts, strict=True)]
    if dst_hf is not None and len(pieces) > 1:
        try:
            if await write_host(dst, pieces):
                return
        except BlockIOError as e:
            raise CopyError(e.errno, False, str(e)) from e
    await _write_all(dst, pieces)


async def zero_extents(
    dst: BlockNode, extents: Sequence[tuple[int, int]], *, may_unmap: bool
) -> None:
    """``write_zeroes`` of every extent, in one worker call when ``dst`` maps onto a file.

    Raises:
        BlockIOError: the first failure.
    """
    if not extents:
        return
    for offset, length in extents:
        check_request(dst, offset, length)
    check_writable(dst)
    hf = host_file(dst, for_write=True)
    if hf is not None and _aligned(hf, extents) and not any(
            n.read_only or n.corrupt for n in hf.nodes):
        drv = hf.nodes[-1].driver
        assert isinstance(drv, FileDriver)
        # cf. io.write_zeroes: each layer passes MAY_UNMAP on only if it allows discards
        unmap = may_unmap and all(n.discard_unmap for n in hf.nodes)
        flags = WriteFlags.MAY_UNMAP if unmap else WriteFlags.NONE
        _enter(hf.nodes)
        try:
            await drv.pwrite_zeroes_batch([(hf.base + o, n) for o, n in extents], flags)
            return
        except BlockIOError as e:
            if e.errno != errno.ENOTSUP:
                raise
            # the generic path below falls back to writing zero buffers
        finally:
            _leave(hf.nodes, True)

    await io.write_zeroes_many(dst, list(extents), may_unmap=may_unmap)


async def map_data(
    node: BlockNode, ranges: Sequence[tuple[int, int]], granularity: int = 1
) -> list[list[tuple[bool, int]]] | None:
    """Data and hole runs of each range, in one pass for all of them.

    The same answer as ``block_status`` gives run by run: for a node that maps linearly onto
    a file (a raw image has no backing, so its file's holes read as zeroes), one worker call
    that seeks; with a ``granularity``, units holding both data and holes count as data (see
    ``threadio.seek_walk_sync``). Otherwise the driver's ``data_runs`` (a qcow2 image without
    backing walks its L2 tables once). None: neither applies; ask ``block_status``.
    """
    hf = host_file(node, for_write=False)
    for offset, length in ranges:
        check_request(node, offset, length)
    if hf is None:
        if node.fault_rules:
            return None  # block-status rules must see each request
        _enter((node,))
        try:
            return await node.driver.data_runs(list(ranges))
        finally:
            _leave((node,), False)
    _enter(hf.nodes)
    try:
        return await threadio.run(threadio.seek_walk_sync, hf.fd,
                                  [(hf.base + o, n) for o, n in ranges], granularity)
    finally:
        _leave(hf.nodes, False)


__all__ = ["CopyError", "HostFile", "copy_extents", "data_file_pair", "host_file",
           "kernel_copy_files", "map_data", "read_host", "write_host", "writes_inline",
           "zero_extents"]
