"""Guest data reads and writes over the cluster map (cf. QEMU's qcow2_co_preadv_part and
qcow2_co_pwritev_part with their cluster allocation).

Concurrency (cf. QEMU's s->lock and cluster_allocs): the driver's lock guards metadata only. A
write allocates its clusters under the lock, drops it for the data I/O, then re-takes it to
link the L2 entries, so data always lands before any metadata points at it. Guest clusters
being allocated are listed in ``allocations``; any other request that would change their
entries waits for the link. Writes to clusters we own (COPIED) take no lock at all. Host ranges
under data I/O outside the lock are registered with the ``ImageFile``.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, MutableSequence
from itertools import repeat

from blockmirror.block.drivers.qcow2 import compress
from blockmirror.block.drivers.qcow2.cluster_map import ClusterMap, Link, Segment
from blockmirror.block.drivers.qcow2.image_context import ImageContext
from blockmirror.block.drivers.qcow2.layout import (
    COMPRESSED,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    NORMAL,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    UNALLOCATED,
    ZERO_ALLOC,
    ZERO_PLAIN,
    ceil_div,
)
from blockmirror.block.drivers.qcow2.refcount_allocator import RefcountAllocator
from blockmirror.errors import BlockIOError

#: a planned data write: host offset, length, offset in the request buffer (when the prepared
#: buffer is None, the bytes are that slice of the request) and a prepared buffer
#: (copy-on-write completions)
Piece = tuple[int, int, int, "bytes | None"]


class DataPath:
    def __init__(
        self, ctx: ImageContext, allocator: RefcountAllocator, cluster_map: ClusterMap
    ) -> None:
        self._ctx = ctx
        self._allocator = allocator
        self._map = cluster_map
        #: guest cluster -> event set once the write allocating it has linked its L2 entry
        self.allocations: dict[int, asyncio.Event] = {}
        self._last_compressed: tuple[int, bytes] | None = None

    # --- reading ---------------------------------------------------------------------------

    async def read_backing(self, offset: int, length: int) -> bytes:
        backing = self._ctx.node.backing
        if backing is None:
            return bytes(length)
        avail = max(0, min(length, backing.length() - offset))
        if avail == 0:
            return bytes(length)
        data = await backing.read(offset, avail)
        if avail < length:
            data = bytes(data) + bytes(length - avail)
        return data

    def forget_compressed(self) -> None:
        """Drop the last inflated cluster: a new stream may get the very same descriptor
        (same host bytes, same length) as a freed one."""
        self._last_compressed = None

    async def read_compressed(self, entry: int) -> bytes:
        if self._last_compressed is not None and self._last_compressed[0] == entry:
            return self._last_compressed[1]
        offset, length = compress.descriptor(entry, self._ctx.geometry.cluster_bits)
        if offset >= self._ctx.file.length:
            raise await self._ctx.signal_corruption(
                f"Compressed cluster offset {offset:#x} past the end of the image file"
            )
        raw = await self._ctx.file.read(offset, length)
        out = compress.decompress(raw, self._ctx.geometry.cluster_size,
                                  self._ctx.header.compression_type)
        if out is None:
            raise BlockIOError(errno.EIO, "Input/output error")
        self._last_compressed = (entry, out)
        return out

    async def _read_segments(self, segments: list[Segment]) -> list[bytes]:
        parts: list[bytes] = []
        for kind, pos, length, value in segments:
            if kind == NORMAL:
                parts.append(await self._ctx.file.read(value, length))
            elif kind in (ZERO_PLAIN, ZERO_ALLOC):
                parts.append(bytes(length))
            elif kind == UNALLOCATED:
                parts.append(await self.read_backing(pos, length))
            else:
                data = await self.read_compressed(value)
                in_cluster = pos & (self._ctx.geometry.cluster_size - 1)
                parts.append(data[in_cluster : in_cluster + length])
        return parts

    async def read(self, offset: int, length: int) -> bytes:
        cluster_bits = self._ctx.geometry.cluster_bits
        async with self._ctx.lock:
            segments = await self._map.map(offset, length)
            # the clusters read must not be released and reused under us
            hosts = [(v, n) for k, _p, n, v in segments if k == NORMAL]
            token = 0
            if hosts:
                token = self._ctx.file.register(
                    min(v for v, _n in hosts) >> cluster_bits,
                    ceil_div(max(v + n for v, n in hosts), self._ctx.geometry.cluster_size),
                )
        try:
            parts = await self._read_segments(segments)
        finally:
            self._ctx.file.release(token)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_many(self, extents: list[tuple[int, int]]) -> list[bytes]:
        """``read`` of every extent: one mapping pass under the lock, one file hop for the
        data clusters of all of them (the mirror's batches of small extents)."""
        geometry = self._ctx.geometry
        cluster_bits, cluster_size = geometry.cluster_bits, geometry.cluster_size
        async with self._ctx.lock:
            maps = [await self._map.map(o, n) for o, n in extents]
            hosts = [(v, n) for segs in maps for k, _p, n, v in segs if k == NORMAL]
            token = 0
            if hosts:
                token = self._ctx.file.register(
                    min(v for v, _n in hosts) >> cluster_bits,
                    ceil_div(max(v + n for v, n in hosts), cluster_size),
                )
        try:
            data = iter(await self._ctx.file.read_many(hosts))
            out: list[bytes] = []
            for segments in maps:
                parts: list[bytes] = []
                for kind, pos, length, value in segments:
                    if kind == NORMAL:
                        parts.append(next(data))
                    elif kind in (ZERO_PLAIN, ZERO_ALLOC):
                        parts.append(bytes(length))
                    elif kind == UNALLOCATED:
                        parts.append(await self.read_backing(pos, length))
                    else:
                        whole = await self.read_compressed(value)
                        in_cluster = pos & (cluster_size - 1)
                        parts.append(whole[in_cluster : in_cluster + length])
                out.append(parts[0] if len(parts) == 1 else b"".join(parts))
            return out
        finally:
            self._ctx.file.release(token)

    async def host_segments(
        self, extents: list[tuple[int, int]]
    ) -> tuple[list[list[tuple[int, int]]], int] | None:
        """The host ranges that hold each extent, for a copy that moves them file to file:
        ``(host_offset, length)`` runs in guest order, when every cluster involved is a
        plain data cluster. The ranges are registered as under I/O (they must not be freed
        and reused meanwhile); ``release_host(token)`` ends that. None: something else is
        involved (zeroes, the backing file, compressed data); read the bytes instead."""
        geometry = self._ctx.geometry
        cluster_bits, cluster_size = geometry.cluster_bits, geometry.cluster_size
        lowest, highest = -1, -1
        async with self._ctx.lock:
            out = await self._map.host_runs(extents)
            if out is None:
                return None
            for runs in out:
                for host, n in runs:
                    if lowest < 0 or host < lowest:
                        lowest = host
                    if host + n > highest:
                        highest = host + n
            if lowest < 0:
                return None
            token = self._ctx.file.register(lowest >> cluster_bits,
                                            ceil_div(highest, cluster_size))
        return out, token

    def release_host(self, token: int) -> None:
        self._ctx.file.release(token)

    async def write_via(
        self,
        extents: list[tuple[int, int]],
        fill: Callable[[list[tuple[int, int, int]]], Awaitable[None]],
    ) -> bool:
        """Write whole-cluster extents whose bytes are not in memory (a file-to-file copy).

        Clusters are planned and allocated as ``write_many`` does, all extents' at once
        (``_plan_whole``); ``fill`` gets every ``(guest_offset, host_offset, length)`` to put
        data at, in one call, in guest order, and the L2 entries are linked once it returned.
        False, with nothing done: an extent is not whole clusters, or overlaps another
        writer's allocation in flight.
        """
        geometry = self._ctx.geometry
        cluster_size, cluster_bits = geometry.cluster_size, geometry.cluster_bits
        if any(o % cluster_size or n % cluster_size or n <= 0 for o, n in extents):
            return False
        tokens: list[int] = []
        plan: list[tuple[int, int, int]] = []
        links: list[Link] = []
        new_runs: list[tuple[int, int]] = []
        done = asyncio.Event()
        async with self._ctx.lock:
            allocations = self.allocations
            if allocations and not all(
                    allocations.keys().isdisjoint(
                        range(o >> cluster_bits, ((o + n - 1) >> cluster_bits) + 1))
                    for o, n in extents):
                return False
            planned: list[tuple[int, int]] = []
            for offset, length in extents:
                pieces = self._in_place_pieces(offset, length)
                if pieces is None:
                    planned.append((offset, length))
                    continue
                tokens.append(self._register(pieces))
                for host, n, source, _buf in pieces:
                    plan.append((offset + source, host, n))
            if planned:
                host_plan = await self._plan_whole(planned, links, new_runs)
                allocations.update(dict.fromkeys(self._linked_clusters(links), done))
                tokens.append(self._ctx.file.register(
                    min(h for _g, h, _n in host_plan) >> cluster_bits,
                    ceil_div(max(h + n for _g, h, n in host_plan), cluster_size)))
                # fill wants guest order; in-place extents came first
                plan = sorted(plan + host_plan) if plan else host_plan
            self._ctx.file.grow_ahead(self._allocator.end * cluster_size)
        try:
            await self._ctx.file.ensure_size(max(h + n for _g, h, n in plan))
            ok = False
            try:
                await fill(plan)
                ok = True
            finally:
                await self._settle(tokens, links, new_runs, ok)
        finally:
            for guest_cluster in self._linked_clusters(links):
                self.allocations.pop(guest_cluster, None)
            done.set()
        return True

    def _linked_clusters(self, links: list[Link]) -> list[int]:
        l2_bits = self._ctx.geometry.l2_bits
        return [(l1_index << l2_bits) | l2_index for l1_index, l2_index, _entry in links]

    async def _plan_whole(
        self, extents: list[tuple[int, int]], links: list[Link], new_runs: list[tuple[int, int]]
    ) -> list[tuple[int, int, int]]:
        """Under the lock: ``_plan`` for many whole-cluster extents at once, returning
        ``(guest_offset, host_offset, length)`` runs (contiguous in both merged).

        The L2 tables come first, then one allocation for every new cluster of the batch
        where the free space from the allocator's hint on is one run (a fresh or growing
        image: the clusters each extent's own allocation would have got, in the same order),
        else one allocation per extent as ``_plan`` does. New clusters' links are appended
        to ``links`` and their runs to ``new_runs``.
        """
        geometry = self._ctx.geometry
        cluster_size, cluster_bits, l2_bits = (
            geometry.cluster_size, geometry.cluster_bits, geometry.l2_bits)
        mask = geometry.l2_size - 1
        cluster_map = self._map
        v3 = self._ctx.header.version == 3
        tables: dict[int, tuple[int, MutableSequence[int]]] = {}
        for offset, length in extents:
            first = offset >> cluster_bits
            last = (offset + length - 1) >> cluster_bits
            for l1_index in range(first >> l2_bits, (last >> l2_bits) + 1):
                if l1_index not in tables:
                    tables[l1_index] = await cluster_map.l2_for_write(l1_index)
        # per extent: how many clusters need a new host cluster; ``fresh``: all of them, and
        # the extent's entries are all plain unallocated or zero (a mirror's empty target),
        # which list primitives tell without a step per cluster
        counts: list[int] = []
        fresh: list[bool] = []
        for offset, length in extents:
            first = offset >> cluster_bits
            last = (offset + length - 1) >> cluster_bits
            if first >> l2_bits == last >> l2_bits:
                seg = tables[first >> l2_bits][1][first & mask : (last & mask) + 1]
                if seg.count(0) + seg.count(OFLAG_ZERO) == len(seg):
                    counts.append(len(seg))
                    fresh.append(True)
                    continue
            fresh.append(False)
            need = 0
            l1_index = first >> l2_bits
            l2_offset, table = tables[l1_index]
            for guest_cluster in range(first, last + 1):
                if guest_cluster >> l2_bits != l1_index:
                    l1_index = guest_cluster >> l2_bits
                    l2_offset, table = tables[l1_index]
                entry = table[guest_cluster & mask]
                # NORMAL or ZERO_ALLOC that we own keep their cluster (cf. _plan)
                if entry & OFLAG_COPIED and entry & L2E_OFFSET_MASK and not (
                        entry & OFLAG_COMPRESSED):
                    await cluster_map.check_data_cluster(
                        entry & L2E_OFFSET_MASK, l2_offset, guest_cluster & mask, True)
                else:
                    need += 1
            counts.append(need)
        total = sum(counts)
        starts: list[int] = []
        allocator = self._allocator
        if total and allocator.free_hint >= allocator.end:
            start = await allocator.allocate(total)
            new_runs.append((start, total))
            for need in counts:
                starts.append(start)
                start += need
        else:
            for need in counts:
                start = (await allocator.allocate(need)) if need else 0
                if need:
                    new_runs.append((start, need))
                starts.append(start)
        plan: list[tuple[int, int, int]] = []
        for (offset, length), next_new, is_fresh in zip(extents, starts, fresh, strict=True):
            first = offset >> cluster_bits
            last = (offset + length - 1) >> cluster_bits
            l1_index = first >> l2_bits
            if is_fresh:
                # one run of new clusters; its entries link to consecutive host clusters
                host = next_new << cluster_bits
                lo = first & mask
                links.extend(zip(repeat(l1_index), range(lo, lo + last - first + 1),
                                 range(host | OFLAG_COPIED, (host + length) | OFLAG_COPIED,
                                       cluster_size), strict=False))
                if plan and plan[-1][0] + plan[-1][2] == offset and (
                        plan[-1][1] + plan[-1][2] == host):
                    g, h, m = plan[-1]
                    plan[-1] = (g, h, m + length)
                else:
                    plan.append((offset, host, length))
                continue
            table = tables[l1_index][1]
            for guest_cluster in range(first, last + 1):
                if guest_cluster >> l2_bits != l1_index:
                    l1_index = guest_cluster >> l2_bits
                    table = tables[l1_index][1]
                l2_index = guest_cluster & mask
                entry = table[l2_index]
                host = entry & L2E_OFFSET_MASK
                if entry & OFLAG_COPIED and host and not entry & OFLAG_COMPRESSED:
                    if v3 and entry & OFLAG_ZERO:
                        # keep the preallocated cluster, drop its zero flag
                        links.append((l1_index, l2_index, host | OFLAG_COPIED))
                else:
                    host = next_new << cluster_bits
                    next_new += 1
                    links.append((l1_index, l2_index, host | OFLAG_COPIED))
                guest = guest_cluster << cluster_bits
                if plan:
                    g, h, m = plan[-1]
                    if g + m == guest and h + m == host:
                        plan[-1] = (g, h, m + cluster_size)
                        continue
                plan.append((guest, host, cluster_size))
        return plan

    async def _settle(self, tokens: list[int], links: list[Link],
                      new_runs: list[tuple[int, int]], ok: bool) -> None:
        """After a batch's data I/O: end its host pins, then link its clusters (their data
        is written) or give the new ones back at the next flush (nothing points at them)."""
        for token in tokens:
            self._ctx.file.release(token)
        if links or new_runs:
            async with self._ctx.lock:
                if ok:
                    await self._map.link(links)
                    await self._ctx.write_back()
                else:
                    for new_first, new_count in new_runs:
                        self._allocator.free_later(range(new_first, new_first + new_count))

    async def _cluster_content(self, guest_cluster: int, entry: int) -> bytes:
        """The guest-visible content of a cluster before a partial overwrite."""
        kind = self._map.cluster_type(entry)
        base = guest_cluster << self._ctx.geometry.cluster_bits
        size = self._ctx.geometry.cluster_size
        if kind == NORMAL:
            return await self._ctx.file.read(entry & L2E_OFFSET_MASK, size)
        if kind == COMPRESSED:
            return await self.read_compressed(entry)
        if kind == UNALLOCATED:
            inside = min(size, self._ctx.header.size - base)
            data = await self.read_backing(base, inside)
            return data + bytes(size - inside) if inside < size else data
        return bytes(size)

    # --- writing ---------------------------------------------------------------------------

    async def write(self, offset: int, data: memoryview) -> None:
        """Write guest data: in place where we own the cluster (COPIED), else copy-on-write.

        In-place writes to cached, owned clusters go out without the lock. Otherwise the
        clusters are planned and allocated under the lock, the data is written without it,
        and the L2 entries are linked under the lock again.
        """
        pieces = self._in_place_pieces(offset, len(data))
        if pieces is not None:
            token = self._register(pieces)
            try:
                await self._issue(data, pieces)
            finally:
                self._ctx.file.release(token)
            return
        cluster_bits, l2_bits = self._ctx.geometry.cluster_bits, self._ctx.geometry.l2_bits
        first, last = offset >> cluster_bits, (offset + len(data) - 1) >> cluster_bits
        while True:
            async with self._ctx.lock:
                busy = self.allocation_in(first, last)
                if busy is None:
                    pieces, links, new_first, new_count = await self._plan(offset, len(data),
                                                                           data)
                    token = self._register(pieces)
                    done = asyncio.Event()
                    for l1_index, l2_index, _entry in links:
                        self.allocations[(l1_index << l2_bits) | l2_index] = done
                    self._ctx.file.grow_ahead(self._allocator.end * self._ctx.geometry.cluster_size)
                    break
            await busy.wait()
        ok = False
        try:
            await self._issue(data, pieces)
            ok = True
        finally:
            self._ctx.file.release(token)
            try:
                async with self._ctx.lock:
                    if ok:
                        await self._map.link(links)
                        await self._ctx.write_back()
                    elif new_count:
                        # nothing points at them yet: give them back at the next flush
                        self._allocator.free_later(range(new_first, new_first + new_count))
            finally:
                for l1_index, l2_index, _entry in links:
                    self.allocations.pop((l1_index << l2_bits) | l2_index, None)
                done.set()

    async def write_many(self, writes: list[tuple[int, memoryview]]) -> None:
        """``write`` of every piece: one allocation pass and one link pass under the lock,
        and one file hop for all the data (the mirror's batches of small extents).

        Pieces that overlap an allocation in flight (another writer's) are written one by
        one through ``write`` afterwards, as is everything when one of them fails to plan.
        """
        l2_bits = self._ctx.geometry.l2_bits
        cluster_bits = self._ctx.geometry.cluster_bits
        tokens: list[int] = []
        host_writes: list[tuple[int, bytes | memoryview]] = []
        later: list[tuple[int, memoryview]] = []
        planned: list[tuple[int, memoryview]] = []
        for offset, data in writes:
            pieces = self._in_place_pieces(offset, len(data))
            if pieces is None:
                planned.append((offset, data))
                continue
            # registered before any await: nothing can change these entries meanwhile
            tokens.append(self._register(pieces))
            host_writes += self._host_writes(data, pieces)
        links: list[Link] = []
        new_runs: list[tuple[int, int]] = []
        done = asyncio.Event()
        try:
            if planned:
                async with self._ctx.lock:
                    for offset, data in planned:
                        first = offset >> cluster_bits
                        last = (offset + len(data) - 1) >> cluster_bits
                        if self.allocation_in(first, last) is not None:
                            later.append((offset, data))
                            continue
                        pieces, piece_links, new_first, new_count = await self._plan(
                            offset, len(data), data)
                        tokens.append(self._register(pieces))
                        for l1_index, l2_index, _entry in piece_links:
                            self.allocations[(l1_index << l2_bits) | l2_index] = done
                        links += piece_links
                        if new_count:
                            new_runs.append((new_first, new_count))
                        host_writes += self._host_writes(data, pieces)
                    self._ctx.file.grow_ahead(self._allocator.end * self._ctx.geometry.cluster_size)
            ok = False
            try:
                await self._ctx.file.write_many(host_writes)
                ok = True
            finally:
                await self._settle(tokens, links, new_runs, ok)
        finally:
            for l1_index, l2_index, _entry in links:
                self.allocations.pop((l1_index << l2_bits) | l2_index, None)
            done.set()
        for offset, data in later:
            await self.write(offset, data)

    def _in_place_pieces(self, offset: int, length: int) -> list[Piece] | None:
        """The host pieces of a write that touches only owned, cached, settled data clusters.

        Synchronous on purpose: nothing can change the entries between this check and the
        registration of the write as in flight. None sends the write down the locked path.
        """
        geometry = self._ctx.geometry
        cluster_bits, cluster_size = geometry.cluster_bits, geometry.cluster_size
        end = offset + length
        first, last = offset >> cluster_bits, (end - 1) >> cluster_bits
        l2_bits, mask = geometry.l2_bits, geometry.l2_size - 1
        allocations = self.allocations
        l1 = self._map.l1
        l2_cache = self._map.l2_cache
        data_cluster_ok = self._map.data_cluster_ok
        pieces: list[Piece] = []
        current = -1
        table: MutableSequence[int] | None = None
        for guest_cluster in range(first, last + 1):
            l1_index = guest_cluster >> l2_bits
            if l1_index != current:
                if l1_index >= len(l1):
                    return None
                l1_entry = l1[l1_index]
                if not l1_entry & OFLAG_COPIED:
                    return None
                table = l2_cache.get(l1_entry & L1E_OFFSET_MASK)
                if table is None:
                    return None
                current = l1_index
            assert table is not None
            entry = table[guest_cluster & mask]
            if (
                entry & (OFLAG_COMPRESSED | OFLAG_ZERO)
                or not entry & OFLAG_COPIED
                or guest_cluster in allocations
            ):
                return None
            host_cluster = entry & L2E_OFFSET_MASK
            if not host_cluster or not data_cluster_ok(host_cluster, True):
                return None
            guest_start = guest_cluster << cluster_bits
            lo = offset if offset > guest_start else guest_start
            hi = min(end, guest_start + cluster_size)
            host = host_cluster + (lo - guest_start)
            if pieces and pieces[-1][0] + pieces[-1][1] == host:
                prev_host, prev_length, prev_source, _buf = pieces[-1]
                pieces[-1] = (prev_host, prev_length + hi - lo, prev_source, None)
            else:
                pieces.append((host, hi - lo, lo - offset, None))
        return pieces

    def allocation_in(self, first: int, last: int) -> asyncio.Event | None:
        """The event of an in-flight allocation among guest clusters first..last, if any."""
        allocations = self.allocations
        if not allocations:
            return None
        if last - first + 1 <= len(allocations):
            for guest_cluster in range(first, last + 1):
                event = allocations.get(guest_cluster)
                if event is not None:
                    return event
            return None
        for guest_cluster, event in allocations.items():
            if first <= guest_cluster <= last:
                return event
        return None

    def _register(self, pieces: list[Piece]) -> int:
        if not pieces:
            return self._ctx.file.register(0, 0)
        return self._ctx.file.register(
            min(p[0] for p in pieces) >> self._ctx.geometry.cluster_bits,
            ceil_div(max(p[0] + p[1] for p in pieces), self._ctx.geometry.cluster_size),
        )

    async def _plan(
        self, offset: int, length: int, data: memoryview | None
    ) -> tuple[list[Piece], list[Link], int, int]:
        """Under the lock: allocate what the write needs and lay out its data pieces.

        All clusters needing a new host cluster are allocated as one contiguous run. Partial
        clusters are completed from their old content (backing file, compressed data, a
        snapshot's shared cluster, or zeroes). Returns the pieces, the L2 entries to link
        after the data is written, and the run of new clusters (first, count). ``data`` may
        be None when the write covers whole clusters only (no completion needs it).
        """
        geometry = self._ctx.geometry
        cluster_size, cluster_bits, l2_bits = (
            geometry.cluster_size, geometry.cluster_bits, geometry.l2_bits
        )
        mask = geometry.l2_size - 1
        cluster_map = self._map
        end = offset + length
        first, last = offset >> cluster_bits, (end - 1) >> cluster_bits
        tables: dict[int, tuple[int, MutableSequence[int]]] = {}
        for l1_index in range(first >> l2_bits, (last >> l2_bits) + 1):
            tables[l1_index] = await cluster_map.l2_for_write(l1_index)
        need = 0
        for guest_cluster in range(first, last + 1):
            l2_offset, table = tables[guest_cluster >> l2_bits]
            l2_index = guest_cluster & mask
            entry = table[l2_index]
            kind = cluster_map.cluster_type(entry)
            if kind in (NORMAL, ZERO_ALLOC) and entry & OFLAG_COPIED:
                await cluster_map.check_data_cluster(
                    entry & L2E_OFFSET_MASK, l2_offset, l2_index, True
                )
            else:
                need += 1
        new_first = (await self._allocator.allocate(need)) if need else 0
        next_new = new_first
        pieces: list[Piece] = []
        links: list[Link] = []
        for guest_cluster in range(first, last + 1):
            l1_index = guest_cluster >> l2_bits
            _l2_offset, table = tables[l1_index]
            l2_index = guest_cluster & mask
            entry = table[l2_index]
            kind = cluster_map.cluster_type(entry)
            guest_start = guest_cluster << cluster_bits
            lo = max(offset, guest_start)
            hi = min(end, guest_start + cluster_size)
            full = hi - lo == cluster_size
            base: bytes | None = None
            if kind == NORMAL and entry & OFLAG_COPIED:
                host = (entry & L2E_OFFSET_MASK) + (lo - guest_start)
                pieces.append((host, hi - lo, lo - offset, None))
                continue
            if kind == ZERO_ALLOC and entry & OFLAG_COPIED:
                # keep the preallocated cluster, drop its zero flag
                host = entry & L2E_OFFSET_MASK
                if not full:
                    base = bytes(cluster_size)
            else:
                host = next_new << cluster_bits
                next_new += 1
                if not full:
                    if kind in (ZERO_PLAIN, ZERO_ALLOC):
                        base = bytes(cluster_size)
                    else:
                        base = await self._cluster_content(guest_cluster, entry)
            links.append((l1_index, l2_index, host | OFLAG_COPIED))
            if base is None:
                pieces.append((host, cluster_size, lo - offset, None))
            else:
                assert data is not None, "a partial cluster needs the request's bytes"
                buf = bytearray(base)
                buf[lo - guest_start : hi - guest_start] = data[lo - offset : hi - offset]
                pieces.append((host, cluster_size, -1, bytes(buf)))
        return pieces, links, new_first, need

    async def _issue(self, data: memoryview, pieces: list[Piece]) -> None:
        """Write pieces, merging those contiguous on the host into single large writes."""
        for host, out in self._host_writes(data, pieces):
            await self._ctx.file.write(host, out)

    def _host_writes(
        self, data: memoryview, pieces: list[Piece]
    ) -> list[tuple[int, bytes | memoryview]]:
        """The file writes for pieces, those contiguous on the host merged into one.

        Runs of plain request slices that are also contiguous in the request go out as one
        memoryview slice, without copying.
        """
        writes: list[tuple[int, bytes | memoryview]] = []
        i = 0
        while i < len(pieces):
            host, length, source, buf = pieces[i]
            j = i + 1
            next_host = host + length
            sliceable = buf is None
            while j < len(pieces) and pieces[j][0] == next_host:
                _host, length2, source2, buf2 = pieces[j]
                if buf2 is not None or source2 != source + (next_host - host):
                    sliceable = False
                next_host += length2
                j += 1
            out: bytes | memoryview
            if sliceable:
                out = data[source : source + (next_host - host)]
            else:
                out = b"".join(
                    b if b is not None else data[s : s + m] for _h, m, s, b in pieces[i:j]
                )
            writes.append((host, out))
            i = j
        return writes
