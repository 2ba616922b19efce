"""The resume sidecar: an on-disk activity log of hot extents plus checkpoints of the bitmap.

DRBD's design, for one mirror. Before a guest write reaches the source, every extent it
touches must be *hot*: listed in the last activity-log record that reached the disk (a
``pwritev2`` with ``RWF_DSYNC``: durable when it returns). The list is bounded (``capacity``
extents); writers that need new extents while a record is being written join the next
record, so one log update serves them all.
The copy progress (the dirty bitmap, with ranges in flight counted as dirty) is checkpointed
separately. After a crash the chunks to recopy are: dirty in the last checkpoint, plus every
chunk of every hot extent in the last log record. An extent leaves the hot list only after a
checkpoint taken when no write to it was pending (``on_evict`` writes it), so every write that
did not reach a checkpoint is covered by a hot extent.

File layout (little-endian; every region 4 KiB-aligned)::

    [0, 4K)            header: magic, JSON length, CRC-32, JSON (geometry and identities)
    2 x log slot       magic, sequence, count, CRC-32, extent numbers (u32)
    2 x checkpoint     4 KiB head (magic, sequence, bitmap length and CRC, JSON meta) + bitmap

Two slots each, written alternately: a torn write leaves the other slot, an older but still
valid state (the writer was not acknowledged, so the older record covers everything needed).
This module knows the file and the hot list; the mirror side is ``resume.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from blockmirror.block import threadio
from blockmirror.errors import BlockMirrorError

HEADER_MAGIC = b"BMRESUM1"
LOG_MAGIC = b"BMACTLOG"
CKPT_MAGIC = b"BMCKPT01"
PAGE = 4096
VERSION = 1
#: DRBD's extent size: a hot extent costs at most this much recopy after a crash
DEFAULT_EXTENT_SIZE = 4 << 20
#: hot extents kept (cf. DRBD's al-extents, 1237 by default): 4 GiB of hot data
DEFAULT_CAPACITY = 1024
_LOG_HEAD = struct.Struct("<8sQII")  # magic, seq, count, crc
_CKPT_HEAD = struct.Struct("<8sQQIII")  # magic, seq, bitmap len, bitmap crc, meta len, meta crc


def _align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class ResumeError(BlockMirrorError):
    """The sidecar cannot be used (corrupt, or it does not describe this mirror)."""


@dataclass
class Geometry:
    size: int
    granularity: int
    extent_size: int
    capacity: int

    @property
    def bitmap_bytes(self) -> int:
        return ((self.size + self.granularity - 1) // self.granularity + 7) // 8

    @property
    def log_slot(self) -> int:
        # up to twice the capacity: extents still being written when the list is full
        return _align(_LOG_HEAD.size + 16 * self.capacity)

    @property
    def ckpt_slot(self) -> int:
        return PAGE + _align(self.bitmap_bytes)

    def log_offset(self, slot: int) -> int:
        return PAGE + slot * self.log_slot

    def ckpt_offset(self, slot: int) -> int:
        return PAGE + 2 * self.log_slot + slot * self.ckpt_slot

    @property
    def file_size(self) -> int:
        return self.ckpt_offset(2)

    def extents_of(self, offset: int, length: int) -> range:
        es = self.extent_size
        end = min(offset + max(length, 1), self.size)
        return range(offset // es, max(end - 1, offset) // es + 1)


@dataclass
class Recovered:
    """What a sidecar says about the mirror that wrote it."""

    header: dict[str, Any]
    geometry: Geometry
    #: the last checkpoint's bitmap: chunk i is bit i % 8 (least significant first) of byte
    #: i // 8, the order of qcow2 bitmaps and ``DirtyBitmap.to_bytes``
    bitmap: bytes
    ckpt_seq: int
    meta: dict[str, Any]
    hot: set[int] = field(default_factory=set)
    log_seq: int = 0


# --- the file ---------------------------------------------------------------------------------


class RecordFile:
    """Where a log's records go: a descriptor it owns, and the offset of the log in it.

    The sidecar is a file of its own (``base`` 0); a qcow2 source keeps the same bytes in
    clusters of the image (``image_store.py``), at ``base``. Writes are plain overwrites of
    bytes that exist already, each made durable before it counts.
    """

    def __init__(self, fd: int, base: int = 0) -> None:
        self.fd = fd
        self.base = base

    def write(self, data: bytes, offset: int) -> None:
        """(Blocking: run it in the I/O thread pool.)"""
        threadio.pwrite_dsync_sync(self.fd, data, self.base + offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def encode(geometry: Geometry, header: dict[str, Any], bitmap: bytes,
           meta: dict[str, Any]) -> bytes:
    """A whole fresh log (``geometry.file_size`` bytes): header, one empty log record, and
    a first checkpoint; the other slots are zeroes (invalid)."""
    body = dict(header)
    body.update(version=VERSION, size=geometry.size, granularity=geometry.granularity,
                extent_size=geometry.extent_size, capacity=geometry.capacity)
    raw = json.dumps(body, sort_keys=True).encode()
    if 16 + len(raw) > PAGE:
        raise ResumeError("resume log header too large")
    head = HEADER_MAGIC + struct.pack("<II", len(raw), zlib.crc32(raw)) + raw
    out = bytearray(geometry.file_size)
    out[0:len(head)] = head
    rec = _log_record(1, [])
    out[geometry.log_offset(1):geometry.log_offset(1) + len(rec)] = rec
    rec = _ckpt_record(1, bitmap, meta)
    out[geometry.ckpt_offset(1):geometry.ckpt_offset(1) + len(rec)] = rec
    return bytes(out)


def create(path: str, geometry: Geometry, header: dict[str, Any], bitmap: bytes,
           meta: dict[str, Any]) -> None:
    """Write a fresh sidecar (with its first checkpoint) atomically: temp file + rename."""
    data = encode(geometry, header, bitmap, meta)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _log_record(seq: int, extents: list[int]) -> bytes:
    payload = struct.pack(f"<{len(extents)}Q", *extents)
    return _LOG_HEAD.pack(LOG_MAGIC, seq, len(extents), zlib.crc32(payload)) + payload


def _ckpt_record(seq: int, bitmap: bytes, meta: dict[str, Any]) -> bytes:
    raw = json.dumps(meta, sort_keys=True).encode()
    head = _CKPT_HEAD.pack(CKPT_MAGIC, seq, len(bitmap), zlib.crc32(bitmap), len(raw),
                           zlib.crc32(raw)) + raw
    if len(head) > PAGE:
        raise ResumeError("resume checkpoint metadata too large")
    return head.ljust(PAGE, b"\0") + bitmap


def load(path: str) -> Recovered:
    """Read a sidecar: its header, newest valid checkpoint and newest valid log record.

    Raises:
        ResumeError: not a sidecar, or no valid checkpoint.
    """
    with open(path, "rb") as f:
        data = f.read()
    return parse(data, path)


def parse(data: bytes, path: str) -> Recovered:
    """``load`` of a log's bytes (``path`` names it in errors).

    Raises:
        ResumeError: not a resume log, or no valid checkpoint.
    """
    if len(data) < PAGE or data[:8] != HEADER_MAGIC:
        raise ResumeError(f"'{path}' is not a blockmirror resume log")
    n, crc = struct.unpack_from("<II", data, 8)
    raw = data[16:16 + n]
    if len(raw) != n or zlib.crc32(raw) != crc:
        raise ResumeError(f"resume log '{path}' has a corrupt header")
    header = json.loads(raw)
    if header.get("version") != VERSION:
        raise ResumeError(f"resume log '{path}' has unsupported version {header.get('version')}")
    geo = Geometry(header["size"], header["granularity"], header["extent_size"],
                   header["capacity"])
    best: Recovered | None = None
    for slot in (0, 1):
        off = geo.ckpt_offset(slot)
        if off + _CKPT_HEAD.size > len(data):
            continue
        magic, seq, blen, bcrc, mlen, mcrc = _CKPT_HEAD.unpack_from(data, off)
        if magic != CKPT_MAGIC or blen != geo.bitmap_bytes:
            continue
        mraw = data[off + _CKPT_HEAD.size: off + _CKPT_HEAD.size + mlen]
        bits = data[off + PAGE: off + PAGE + blen]
        if zlib.crc32(mraw) != mcrc or len(bits) != blen or zlib.crc32(bits) != bcrc:
            continue
        if best is None or seq > best.ckpt_seq:
            best = Recovered(header, geo, bits, seq, json.loads(mraw))
    if best is None:
        raise ResumeError(f"resume log '{path}' has no valid checkpoint")
    for slot in (0, 1):
        off = geo.log_offset(slot)
        magic, seq, count, crc = _LOG_HEAD.unpack_from(data, off)
        if magic != LOG_MAGIC or count > 2 * geo.capacity:
            continue
        payload = data[off + _LOG_HEAD.size: off + _LOG_HEAD.size + 8 * count]
        if len(payload) != 8 * count or zlib.crc32(payload) != crc:
            continue
        if seq > best.log_seq:
            best.log_seq = seq
            best.hot = set(struct.unpack(f"<{count}Q", payload))
    return best


# --- the live log -----------------------------------------------------------------------------


class _Batch:
    """The extents of one log record, and the event its writers wait for."""

    __slots__ = ("done", "extents")

    def __init__(self) -> None:
        self.extents: set[int] = set()
        self.done = asyncio.Event()


class ActivityLog:
    """The hot-extent list of a running mirror, and its sidecar file descriptor.

    ``begin`` before a write proceeds (waits until its extents are on disk as hot), ``end``
    after it. ``on_evict(victims)`` is the mirror's checkpoint: it must make durable the dirty
    state of every chunk written so far, or, if it cannot (a flush failed), list every chunk
    of the victims as dirty (the log calls it before dropping the victims from the list).

    Group commit: a writer that needs a new extent adds it to the *next* batch and waits for
    that batch's record; the committer writes one record (one durable ``pwritev2``) per
    batch, and every writer that arrived while the previous record was being written shares
    it. A write whose extents are hot already costs two dict operations and no wait.

    Eviction ahead: once the list is 7/8 full, idle extents are evicted in the background
    (their checkpoint runs off the writers' path) while the last eighth of the capacity
    still takes new extents. An extent being evicted stays in every record until its
    checkpoint is durable, and a writer that comes back to it takes it back at once.
    """

    def __init__(self, path: str | RecordFile, geometry: Geometry, *, log_seq: int,
                 ckpt_seq: int,
                 on_evict: Callable[[list[int]], Awaitable[object]],
                 is_clean: Callable[[int], bool] = lambda _e: True) -> None:
        # a sidecar path, or records kept elsewhere (in the qcow2 source: image_store.py)
        self._file = path if isinstance(path, RecordFile) else RecordFile(
            os.open(path, os.O_RDWR))
        self.path = path if isinstance(path, str) else "(in the image)"
        self.geo = geometry
        self._log_seq = log_seq
        self._ckpt_seq = ckpt_seq
        self._on_evict = on_evict
        #: the extent has nothing left to copy (evicting it then adds nothing to a resume)
        self._is_clean = is_clean
        self._es = geometry.extent_size
        self._last_extent = max(geometry.size - 1, 0) // geometry.extent_size
        #: extents listed in the last record on disk, least recently used first
        self._hot: OrderedDict[int, None] = OrderedDict()
        #: extents taken off ``_hot`` whose eviction checkpoint is not durable yet: every
        #: record still lists them (the last durable record does too)
        self._evicting: set[int] = set()
        self._evictor: asyncio.Task[None] | None = None
        #: evict ahead in the background when this many slots are left (0: only when full;
        #: a small log keeps every extent it can)
        self._ahead = geometry.capacity // 8 if geometry.capacity >= 64 else 0
        #: writes in progress per extent (an extent with writes cannot be evicted)
        self._busy: dict[int, int] = {}
        #: the record being written (its extents are not hot yet), and the next one
        self._writing: _Batch | None = None
        self._next = _Batch()
        self._committer: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._ckpt_lock = asyncio.Lock()
        #: records go through a thread of their own, not behind the pool's queue of copies
        self._lane = threadio.Lane("blockmirror-alog")
        self.closed = False
        #: statistics: log records written, and checkpoints forced by evictions
        self.records = 0
        self.evictions = 0

    @property
    def hot(self) -> list[int]:
        """The extents that stay listed (records also list those being evicted)."""
        return list(self._hot)

    # --- the write path -----------------------------------------------------------------------

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        es = self._es
        first = offset // es
        last = (offset + length - 1) // es if length > 1 else first
        return first, min(max(last, first), max(self._last_extent, first))

    async def begin(self, offset: int, length: int) -> None:
        """Make the extents of a write hot on disk before the write proceeds.

        Raises:
            ResumeError: the log could not be written.
        """
        first, last = self._span(offset, length)
        busy, hot = self._busy, self._hot
        if first == last:  # the common case, kept free of loops and allocations
            busy[first] = busy.get(first, 0) + 1
            if first in hot:
                hot.move_to_end(first)  # most recently used last
                return
        else:
            for e in range(first, last + 1):
                busy[e] = busy.get(e, 0) + 1
        try:
            await self._wait_hot(first, last)
        except BaseException:
            self.end(offset, length)
            raise

    def _reinstate(self, extents: Iterable[int]) -> None:
        """Extents being evicted go back to the hot list: every record since (and the one
        before) lists them, so they are hot on disk; their eviction is called off."""
        evicting = self._evicting
        if evicting:
            for e in extents:
                if e in evicting:
                    evicting.discard(e)
                    self._hot[e] = None

    async def _wait_hot(self, first: int, last: int) -> None:
        hot = self._hot
        while True:
            self._reinstate(range(first, last + 1))
            missing = [e for e in range(first, last + 1) if e not in hot]
            if not missing:
                for e in range(first, last + 1):
                    hot.move_to_end(e)
                return
            if self._error is not None:
                raise ResumeError(f"activity log write failed: {self._error}")
            if self.closed:
                return  # the mirror ended: nothing to protect any more
            writing = self._writing
            if writing is not None and writing.extents.issuperset(missing):
                batch = writing  # already on its way to the disk
            else:
                batch = self._next
                batch.extents.update(missing)
                if self._committer is None or self._committer.done():
                    self._committer = asyncio.ensure_future(self._commit_loop())
            # after the record, check again: an extent can be evicted as soon as it is
            # idle, and a failed record leaves ``_error``
            await batch.done.wait()

    def end(self, offset: int, length: int) -> None:
        first, last = self._span(offset, length)
        busy = self._busy
        for e in range(first, last + 1):
            n = busy.get(e, 0) - 1
            if n > 0:
                busy[e] = n
            else:
                busy.pop(e, None)

    async def _commit_loop(self) -> None:
        """Write records while writers wait: each record carries every extent asked so far."""
        while self._next.extents and not self.closed:
            batch, self._next = self._next, _Batch()
            self._writing = batch
            try:
                await self._commit(batch)
            except BaseException as e:  # handed to every waiting writer
                self._error = e
            finally:
                self._writing = None
                batch.done.set()
            if self._error is not None:
                self._next.done.set()
                return

    async def _commit(self, batch: _Batch) -> None:
        hot = self._hot
        self._reinstate(batch.extents)
        if all(e in hot for e in batch.extents):
            return
        await self._make_room(sum(1 for e in batch.extents if e not in hot))
        self._reinstate(batch.extents)
        want = sorted(e for e in batch.extents if e not in hot)
        if not want:
            return
        new = [*hot, *self._evicting, *want]
        if len(new) > 2 * self.geo.capacity:
            raise ResumeError("more extents written at once than the log can hold")
        self._log_seq += 1
        rec = _log_record(self._log_seq, new)
        await self._lane.run(self._file.write, rec, self.geo.log_offset(self._log_seq % 2))
        self.records += 1
        for e in want:
            hot[e] = None
        self._evict_ahead()

    def _listed(self) -> int:
        return len(self._hot) + len(self._evicting)

    async def _make_room(self, incoming: int) -> None:
        """Wait for (or run) evictions until ``incoming`` more extents fit."""
        cap = self.geo.capacity
        while self._listed() + incoming > cap:
            evictor = self._evictor
            if evictor is not None and not evictor.done():
                await asyncio.wait([evictor])  # its checkpoint frees room for us too
                if self._error is not None:
                    raise ResumeError(f"activity log eviction failed: {self._error}")
                continue
            excess = self._listed() + incoming - cap
            # evict an eighth of the list at once: one checkpoint serves many later misses
            if not await self._evict(max(excess, cap // 8)):
                return  # every hot extent is being written: the record grows past capacity

    def _evict_ahead(self) -> None:
        """Start a background eviction once the list is 7/8 full (capacity >= 64)."""
        ahead = self._ahead
        if (ahead and not self.closed and self._listed() >= self.geo.capacity - ahead
                and (self._evictor is None or self._evictor.done())):
            self._evictor = asyncio.ensure_future(self._evict_in_background(ahead))

    async def _evict_in_background(self, count: int) -> None:
        try:
            await self._evict(count)
        except Exception as e:  # the next writer that needs room reports it
            self._error = e

    async def _evict(self, want: int) -> bool:
        """Evict up to ``want`` idle extents after a checkpoint; False if none was idle."""
        idle = [e for e in self._hot if not self._busy.get(e)]
        # least recently used first, but extents with nothing left to copy before others:
        # the checkpoint then records them clean, so a resume does not recopy them
        victims = ([e for e in idle if self._is_clean(e)]
                   + [e for e in idle if not self._is_clean(e)])[:want]
        if not victims:
            return False
        # from here on a writer to a victim takes it back (``_reinstate``), so the
        # checkpoint below covers every write the victims that stay evicted ever saw
        for e in victims:
            del self._hot[e]
        self._evicting.update(victims)
        self.evictions += 1
        try:
            await self._on_evict(victims)
        except BaseException:
            self._reinstate(victims)  # the checkpoint may not exist: keep them listed
            raise
        # the checkpoint is durable: the next record may leave the victims out
        self._evicting.difference_update(victims)
        return True

    # --- checkpoints ------------------------------------------------------------------------

    async def write_checkpoint(self, bitmap: bytes, meta: dict[str, Any]) -> None:
        async with self._ckpt_lock:
            if self._file.fd < 0:
                raise ResumeError("the resume log is closed")
            self._ckpt_seq += 1
            rec = _ckpt_record(self._ckpt_seq, bitmap, meta)
            await threadio.run(self._file.write, rec, self.geo.ckpt_offset(self._ckpt_seq % 2))

    async def close(self) -> None:
        """Stop logging: waiting writers go on; the descriptor closes once no record or
        checkpoint write uses it (a worker thread must never write a reused fd number)."""
        if self.closed:
            return
        self.closed = True
        self._next.done.set()
        tasks = [t for t in (self._committer, self._evictor) if t is not None and not t.done()]
        if tasks:
            await asyncio.wait(tasks)
        async with self._ckpt_lock:
            self._file.close()
        self._lane.close()


__all__ = ["DEFAULT_CAPACITY", "DEFAULT_EXTENT_SIZE", "ActivityLog", "Geometry", "RecordFile",
           "Recovered", "ResumeError", "create", "encode", "load", "parse"]
