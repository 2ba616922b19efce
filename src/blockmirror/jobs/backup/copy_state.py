"""What a backup still has to copy, and the copying itself (cf. block/block-copy.c).

``BlockCopyState`` owns the copy bitmap (one bit per backup cluster: still to copy) and the
clusters being copied right now. Two users share it:

* the copy-before-write hook (``cbw.py``): before a guest write reaches the source, every
  dirty cluster it touches is copied to the target (and a cluster already being copied is
  waited for), so the target keeps the data as it was when the job started;
* the job's background loop: claims the next run of dirty clusters and copies it.

A cluster's bit is cleared when it is claimed, before any I/O, and set again if the copy
fails, so each cluster is copied at most once successfully and nobody copies it twice at the
same time. Zero ranges of the source (block status) become zero writes on the target.

With ``compress`` (backup's ``compress: true``) the data goes to the target as compressed
writes, which take whole clusters only: as QEMU's block-copy does then, block status is asked
in whole backup clusters (a cluster that is only partly zero is copied as data) and zero
clusters are still zero writes, not compressed ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from blockmirror.block.copy import CopyError, copy_extents
from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.block.driver import BlockStatus, Extent
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError, BlockMirrorError

#: cf. BLOCK_COPY_CLUSTER_SIZE_DEFAULT
DEFAULT_CLUSTER_SIZE = 64 * 1024
#: the largest run one background copy takes (cf. BLOCK_COPY_MAX_MEM's share per task)
DEFAULT_MAX_CHUNK = 1024 * 1024


def cluster_size_for(target: BlockNode) -> int:
    """cf. block_copy_calculate_cluster_size: the target's cluster size, at least 64 KiB."""
    try:
        size = target.info().cluster_size
    except BlockMirrorError:
        size = 0
    return max(DEFAULT_CLUSTER_SIZE, size)


@dataclass
class Claim:
    """A run of clusters one copier owns: ``[first, end)`` cluster indices."""

    first: int
    end: int
    done: asyncio.Event = field(default_factory=asyncio.Event)


class BlockCopyState:
    """The copy bitmap of one backup and the claims on it."""

    def __init__(self, source: BlockNode, target: BlockNode, cluster_size: int,
                 on_progress: Callable[[int], None],
                 on_remaining: Callable[[int], None], *, compress: bool = False) -> None:
        self.source = source
        self.target = target
        self.cluster_size = cluster_size
        self.length = source.length()
        #: bit set: the cluster must still be copied
        self.bitmap = DirtyBitmap(self.length, cluster_size)
        self.bitmap.enabled = False  # set only by the job, never by guest writes
        self._claims: list[Claim] = []
        self._on_progress = on_progress
        self._on_remaining = on_remaining
        #: sync=top before its allocation walk is done: unallocated clusters are not copied
        self.skip_unallocated = False
        #: write data clusters compressed (cf. BDRV_REQ_WRITE_COMPRESSED in block-copy)
        self.compress = compress
        #: woken whenever a claim ends (the background loop waits for the hook's copies)
        self._changed = asyncio.Event()

    # --- state --------------------------------------------------------------------------------

    @property
    def in_flight_bytes(self) -> int:
        return sum((c.end - c.first) * self.cluster_size for c in self._claims)

    @property
    def busy(self) -> bool:
        return bool(self._claims)

    def remaining(self) -> int:
        """Bytes still to copy, those being copied included (cf. progress_set_remaining)."""
        return self.bitmap.dirty_count() + self.in_flight_bytes

    def _bytes(self, first: int, end: int) -> tuple[int, int]:
        offset = first * self.cluster_size
        return offset, min(end * self.cluster_size, self.length) - offset

    def _claim_of(self, cluster: int) -> Claim | None:
        for c in self._claims:
            if c.first <= cluster < c.end:
                return c
        return None

    def _take(self, first: int, end: int) -> Claim:
        claim = Claim(first, end)
        self.bitmap.clear(*self._bytes(first, end))
        self._claims.append(claim)
        return claim

    def _release(self, claim: Claim, failed: bool) -> None:
        if failed:
            self.bitmap.set_dirty(*self._bytes(claim.first, claim.end))
        self._claims.remove(claim)
        claim.done.set()
        self._changed.set()

    def abandon(self, claim: Claim) -> None:
        """Give a claim up without copying (its clusters are dirty again)."""
        self._release(claim, True)

    async def wait_changed(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def reset(self, offset: int, length: int) -> None:
        """Nothing to copy in this range any more (sync=top: not allocated in the top)."""
        self.bitmap.clear(offset, length)
        self._on_remaining(self.remaining())

    # --- claiming -----------------------------------------------------------------------------

    def claim_next(self, max_bytes: int) -> Claim | None:
        """The first run of dirty clusters nobody copies, at most ``max_bytes`` long."""
        pos = 0
        while True:
            start = self.bitmap.next_dirty(pos)
            if start is None:
                return None
            first = start // self.cluster_size
            if self._claim_of(first) is not None:  # cannot happen: claimed bits are clear
                pos = start + self.cluster_size
                continue
            clean = self.bitmap.next_clean(start)
            stop = self.length if clean is None else clean
            limit = max(1, max_bytes // self.cluster_size)
            end = min(-(-stop // self.cluster_size), first + limit)
            return self._take(first, end)

    async def claim_range(self, offset: int, length: int) -> list[Claim]:
        """Claims on every dirty cluster of a byte range, after waiting out the clusters
        someone else is copying (the copy-before-write hook's way in)."""
        cs = self.cluster_size
        first, end = offset // cs, -(-(offset + length) // cs)
        while True:
            busy = next((c for c in self._claims if c.first < end and first < c.end), None)
            if busy is None:
                break
            await busy.done.wait()
        claims: list[Claim] = []
        cluster = first
        while cluster < end:
            if not self.bitmap.is_dirty(cluster * cs):
                cluster += 1
                continue
            run_end = cluster + 1
            while run_end < end and self.bitmap.is_dirty(run_end * cs):
                run_end += 1
            claims.append(self._take(cluster, run_end))
            cluster = run_end
        return claims

    # --- copying ------------------------------------------------------------------------------

    async def copy(self, claim: Claim) -> None:
        """Copy a claimed run; the claim ends either way (its clusters dirty again on failure).

        Raises:
            CopyError: the read (``is_read``) or the write failed.
        """
        failed = True
        skipped = 0
        try:
            offset, length = self._bytes(claim.first, claim.end)
            skipped = await self._copy_range(offset, length)
            failed = False
        finally:
            self._release(claim, failed)
        if skipped < length:
            # progress counts whole clusters, the image's partial last one too, as the
            # remaining work does (cf. progress_work_done of a block-copy task's bytes)
            self._on_progress((claim.end - claim.first) * self.cluster_size - skipped)
        if skipped:
            self._on_remaining(self.remaining())

    async def _copy_range(self, offset: int, length: int) -> int:
        """Copy (or zero) the range on the target; returns the bytes skipped as unallocated."""
        src, end = self.source, offset + length
        data: list[tuple[int, int]] = []
        zero: list[tuple[int, int]] = []
        skipped = 0
        pos = offset
        while pos < end:
            try:
                ext = await src.block_status(pos, end - pos)
            except BlockIOError as e:
                raise CopyError(e.errno, True, str(e)) from e
            n = min(ext.length, end - pos)
            if self.compress:
                n = self._whole_clusters(pos, n, end)
                if n != min(ext.length, end - pos):
                    ext = Extent(n, BlockStatus.DATA | BlockStatus.ALLOCATED)
            allocated = bool(ext.status & (BlockStatus.ALLOCATED | BlockStatus.DATA
                                           | BlockStatus.ZERO))
            if self.skip_unallocated and not allocated:
                skipped += n
            elif ext.status & BlockStatus.ZERO:
                zero.append((pos, n))
            else:
                data.append((pos, n))
            pos += n
        if data and self.compress:
            await self._copy_compressed(data)
        elif data:
            await copy_extents(src, self.target, data)
        for zo, zn in zero:
            try:
                await self.target.write_zeroes(zo, zn)
            except BlockIOError as e:
                raise CopyError(e.errno, False, str(e)) from e
        return skipped

    def _whole_clusters(self, pos: int, n: int, end: int) -> int:
        """cf. block_copy_block_status: a status shorter than a cluster covers the cluster
        (as data); a longer one is cut to whole clusters (the source's end is one)."""
        cs = self.cluster_size
        if pos + n >= end or n % cs == 0:
            return n
        if n < cs:
            return min(cs, end - pos)
        return n - n % cs

    async def _copy_compressed(self, data: list[tuple[int, int]]) -> None:
        """Read each data run and write it to the target compressed."""
        for offset, n in data:
            try:
                buf = await self.source.read(offset, n)
            except BlockIOError as e:
                raise CopyError(e.errno, True, str(e)) from e
            try:
                await self.target.write_compressed(offset, buf)
            except BlockIOError as e:
                raise CopyError(e.errno, False, str(e)) from e


__all__ = ["DEFAULT_CLUSTER_SIZE", "DEFAULT_MAX_CHUNK", "BlockCopyState", "Claim",
           "cluster_size_for"]
