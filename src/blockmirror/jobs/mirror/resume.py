"""Resumable mirrors: the mirror's side of the resume sidecar (``activity_log.py``).

``plan_resume`` runs before the job exists (the QMP command awaits it, so a refusal is the
command's error): it reads the sidecar, checks that nothing could have written the source or
the target without being tracked, and turns the last checkpoint plus the hot extents into the
bitmap to start from. ``ResumeCoordinator`` is the running job's part: it writes a fresh
sidecar before the first guest write proceeds, makes extents hot before writes (it is one of
the ActiveWriter's observers), checkpoints periodically, at READY and when the log evicts,
and at the end either deletes the sidecar (pivoted) or writes a closed checkpoint.
See docs/resume.md for the guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bitarray import bitarray

from blockmirror.block.dirty_bitmap import DirtyBitmap
from blockmirror.block.drivers.file import FileDriver
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.jobs.mirror import activity_log
from blockmirror.jobs.mirror.activity_log import ActivityLog, Geometry, ResumeError
from blockmirror.jobs.mirror.dirty import DirtyState
from blockmirror.jobs.mirror.image_store import ImageStore

#: chunks compared between source and target when resuming (clean and not hot in the log)
SAMPLES = 64
#: the longest time between periodic checkpoints while the mirror copies
CHECKPOINT_INTERVAL_NS = 1_000_000_000
#: READY: a checkpoint this soon after the copy caught up, if the last one lists dirty chunks
IN_SYNC_DELAY_NS = 250_000_000
#: ... and a checkpoint after this share of the disk was copied (at least 1 MiB, at most 1 GiB)
CHECKPOINT_SHARE = 16


#: the log's size when x-resume-log-extents / -extent-size are not given
DEFAULT_EXTENTS = activity_log.DEFAULT_CAPACITY
DEFAULT_EXTENT_SIZE = activity_log.DEFAULT_EXTENT_SIZE


@dataclass
class ResumeOptions:
    """The QMP extension arguments (``x-resume-log`` and friends)."""

    path: str
    restart: bool = False
    extents: int = DEFAULT_EXTENTS
    extent_size: int = DEFAULT_EXTENT_SIZE
    #: where the log lives: "file" (the sidecar at ``path``) or "image" (in the qcow2 source)
    store: str = "file"


@dataclass
class ResumePlan:
    options: ResumeOptions
    granularity: int
    size: int
    #: the chunks to copy when resuming (None: a fresh start, seeded as usual)
    bitmap: DirtyBitmap | None = None
    #: bytes dirty in the last checkpoint, and bytes of hot extents (before merging)
    checkpoint_dirty: int = 0
    hot_bytes: int = 0
    source_id: dict[str, Any] = field(default_factory=dict)
    target_id: dict[str, Any] = field(default_factory=dict)
    #: the source's write generation when checked (it must not move before the job starts)
    write_gen: int = 0
    #: the log kept in the qcow2 source (``store == "image"``), instead of a sidecar
    image: ImageStore | None = None

    @property
    def resumed(self) -> bool:
        return self.bitmap is not None

    @property
    def recopy(self) -> int:
        return self.bitmap.dirty_count() if self.bitmap is not None else self.size

    @property
    def skipped(self) -> int:
        return self.size - self.recopy if self.bitmap is not None else 0


# --- identities -------------------------------------------------------------------------------

_QCOW2_FIELDS = struct.Struct(">4sIQIIQI")  # magic, version, backing off/size, bits, size, crypt


def _abspath(p: str) -> str:
    return os.path.abspath(p)


def _protocol(node: BlockNode) -> BlockNode:
    while "file" in node.children:
        node = node.children["file"].node
    return node


async def identity(node: BlockNode) -> dict[str, Any]:
    """What must not change while a mirror is down: kind, inode, sizes, the format header."""
    ident: dict[str, Any] = {"format": node.format_name, "length": node.length()}
    proto = _protocol(node)
    drv = proto.driver
    if isinstance(drv, FileDriver) and drv.fd >= 0:
        st = os.fstat(drv.fd)
        ident.update(path=_abspath(drv.filename), dev=st.st_dev, ino=st.st_ino,
                     mtime_ns=st.st_mtime_ns)
    else:
        ident["filename"] = proto.filename
    if node.format_name == "qcow2" and proto is not node:
        head = await proto.read(0, 72)
        _magic, version, boff, bsize, bits, size, crypt = _QCOW2_FIELDS.unpack_from(head, 0)
        nb_snap, snap_off = struct.unpack_from(">IQ", head, 60)
        ident["qcow2"] = [version, boff, bsize, bits, size, crypt, nb_snap, snap_off]
    return ident


def _in_image_id(ident: dict[str, Any]) -> dict[str, Any]:
    """A source identity that our own area does not change: the area's writes move the
    modification time (the autoclear bit stands in for it), and its header extension moves
    the backing file name's offset."""
    out = {k: v for k, v in ident.items() if k != "mtime_ns"}
    if "qcow2" in out:
        out["qcow2"] = [v if i != 1 else None for i, v in enumerate(out["qcow2"])]
    return out


def _compare_ids(role: str, was: dict[str, Any], now: dict[str, Any], closed: bool) -> None:
    keys = ["format", "length", "path", "dev", "ino", "filename", "qcow2"]
    if closed:
        keys.append("mtime_ns")  # a clean stop recorded it: any later write shows
    for k in keys:
        if was.get(k) != now.get(k):
            what = {"length": "size", "ino": "inode", "dev": "device", "qcow2": "qcow2 header",
                    "mtime_ns": "modification time"}.get(k, k)
            raise ResumeError(
                f"Cannot resume the mirror: the {role}'s {what} changed since the resume log "
                f"was written ({was.get(k)!r} -> {now.get(k)!r}); it may have been written "
                "without being tracked. Use a full restart instead")


# --- planning (before the job) ---------------------------------------------------------------


async def plan_resume(opts: ResumeOptions, source: BlockNode, target: BlockNode,
                      granularity: int) -> ResumePlan:
    """Read and check the sidecar; the plan says what to copy.

    Raises:
        ResumeError: the sidecar is unusable or the images changed behind the mirror's back.
    """
    size = source.length()
    if opts.extents < 1 or opts.extent_size < granularity or opts.extent_size & (
            opts.extent_size - 1):
        raise BlockMirrorError("Parameter 'x-resume-extent-size' must be a power of two no "
                               "smaller than the granularity, and 'x-resume-extents' positive")
    plan = ResumePlan(opts, granularity, size, write_gen=source.write_gen)
    plan.source_id = await identity(source)
    plan.target_id = await identity(target)
    if opts.store == "image":
        plan.image = ImageStore.of(source)
        plan.source_id = _in_image_id(plan.source_id)
        found = None if opts.restart else await plan.image.load()
        if found is None:
            return plan
        rec = found
    elif opts.restart or not await asyncio.to_thread(os.path.exists, opts.path):
        return plan
    else:
        try:
            rec = await asyncio.to_thread(activity_log.load, opts.path)
        except ResumeError as e:
            raise ResumeError(f"Cannot resume the mirror: {e}. Use a full restart "
                              "instead") from e
        except OSError as e:
            raise ResumeError(f"Cannot resume the mirror: cannot read '{opts.path}': "
                              f"{e.strerror}. Use a full restart instead") from e
    head = rec.header
    geo = rec.geometry
    closed = bool(rec.meta.get("closed"))
    if geo.size != size or target.length() != size:
        raise ResumeError(
            f"Cannot resume the mirror: the resume log describes a {geo.size}-byte disk, the "
            f"source has {size} bytes and the target {target.length()}. Use a full restart "
            "instead")
    _compare_ids("source", head.get("source", {}), plan.source_id, False)
    _compare_ids("target", head.get("target", {}), plan.target_id, False)
    if closed:
        # a closed checkpoint recorded the source's state after its last tracked write
        _compare_ids("source", rec.meta.get("source", {}), plan.source_id, True)
        _compare_ids("target", rec.meta.get("target", {}), plan.target_id, True)
    old = DirtyBitmap(size, geo.granularity)
    old.load_bytes(rec.bitmap)  # granule i is bit i % 8 of byte i // 8 (as in qcow2)
    plan.checkpoint_dirty = old.dirty_count()
    bm = DirtyBitmap(size, granularity)
    bm.merge_from(old)
    hot = DirtyBitmap(size, granularity)
    for ext in rec.hot:
        hot.set_dirty(ext * geo.extent_size, geo.extent_size)
        bm.set_dirty(ext * geo.extent_size, geo.extent_size)
    plan.hot_bytes = hot.dirty_count()
    await _sample_compare(source, target, bm, head.get("nonce", 0), rec.ckpt_seq)
    if source.write_gen != plan.write_gen:
        raise ResumeError("Cannot resume the mirror: the source was written while its resume "
                          "log was being checked. Stop the writer until the mirror has started")
    plan.bitmap = bm
    return plan


async def _sample_compare(source: BlockNode, target: BlockNode, bm: DirtyBitmap, nonce: int,
                          seq: int) -> None:
    """Compare a few chunks the log says are in sync: a stray write there shows."""
    gran = bm.granularity
    clean: list[int] = []
    pos = 0
    while pos < bm.size and len(clean) < 1 << 16:
        nxt = bm.next_clean(pos)
        if nxt is None:
            break
        end = bm.next_dirty(nxt)
        stop = bm.size if end is None else end
        clean.extend(range(nxt, stop, gran))
        pos = stop
    if not clean:
        return
    rng = random.Random(f"{nonce}:{seq}")
    picks = sorted(rng.sample(clean, min(SAMPLES, len(clean))))
    # the first and the last chunk, where headers and partitions live, always
    picks = sorted(set(picks) | {clean[0], clean[-1]})
    for o in picks:
        n = min(gran, bm.size - o)
        try:
            a, b = await asyncio.gather(source.read(o, n), target.read(o, n))
        except BlockIOError as e:
            raise ResumeError(f"Cannot resume the mirror: reading offset {o} failed: {e}") from e
        if a != b:
            raise ResumeError(
                f"Cannot resume the mirror: source and target differ at offset {o}, which the "
                "resume log says was in sync: something wrote the source or the target "
                "without being tracked. Use a full restart instead")


# --- the running job's side --------------------------------------------------------------------


class ResumeCoordinator:
    """The sidecar of one running mirror: the write observer, checkpoints and the end."""

    def __init__(self, plan: ResumePlan, source: BlockNode, target: BlockNode,
                 dirty: DirtyState, *, done: Callable[[], int] = lambda: 0) -> None:
        self.plan = plan
        #: the job's QEMU ``offset`` (bytes done); each checkpoint records it with its bitmap
        self._done = done
        self.source = source
        self.target = target
        self.dirty = dirty
        self.log: ActivityLog | None = None
        self._started = asyncio.Event()
        #: the bitmap is complete (seeded or resumed): checkpoints may describe it
        self.seeded = False
        self._lock = asyncio.Lock()
        self._last_bits: bitarray | None = None
        self._last_ckpt_ns: int | None = None
        self._last_copied = 0
        #: dirty chunks in the last checkpoint written
        self._last_dirty = 1
        self.checkpoints = 0
        self.closed = False

    def apply(self) -> int:
        """Load a resumed plan's bitmap into the job's dirty state; the bytes skipped."""
        bm = self.plan.bitmap
        if bm is None:
            return 0
        for o, n in bm.runs():
            self.dirty.bitmap.set_dirty(o, n)
        return self.plan.skipped

    async def start(self) -> None:
        """Write the fresh sidecar (the resumed bitmap, or everything dirty) and open the log.

        Guest writes wait meanwhile (``write_begins``).

        Raises:
            ResumeError: the sidecar cannot be written.
        """
        plan = self.plan
        geo = Geometry(plan.size, plan.granularity, plan.options.extent_size,
                       plan.options.extents)
        bits = self._bits(all_dirty=not plan.resumed)
        header = {"source": plan.source_id, "target": plan.target_id,
                  "nonce": random.getrandbits(48), "created": time.time()}
        records: str | activity_log.RecordFile = plan.options.path
        if plan.image is not None:
            # the area is replaced by a fresh one; from here on this job tracks every write
            records = await plan.image.create(geo, header, bits.tobytes(),
                                              {"closed": False, "offset": self._done()},
                                              owner=self)
        else:
            try:
                activity_log.create(plan.options.path, geo, header, bits.tobytes(),
                                    {"closed": False, "offset": self._done()})
            except OSError as e:
                raise ResumeError(f"Cannot write the resume log '{plan.options.path}': "
                                  f"{e.strerror}") from e
        self._last_bits = bits
        self.log = ActivityLog(records, geo, log_seq=1, ckpt_seq=1,
                               on_evict=self._on_evict, is_clean=self._extent_clean)
        self._started.set()

    def _bits(self, all_dirty: bool = False) -> bitarray:
        d = self.dirty
        if all_dirty:
            bits = bitarray(d.bitmap.granules, endian="little")
            bits.setall(1)
            return bits
        return d.bitmap.copy_bits() | d.in_flight.copy_bits()

    # --- WriteObserver ----------------------------------------------------------------------

    async def write_begins(self, kind: str, offset: int, length: int) -> None:
        if not self._started.is_set():
            await self._started.wait()
        if self.log is not None and not self.closed:
            await self.log.begin(offset, length)

    def write_ends(self, kind: str, offset: int, length: int) -> None:
        if self.log is not None:
            self.log.end(offset, length)

    def release(self) -> None:
        """The job could not start: writers stop waiting for the log."""
        self.closed = True
        if self.plan.image is not None:
            self.plan.image.detach(self)
        self._started.set()

    # --- checkpoints ------------------------------------------------------------------------

    async def checkpoint(self, *, closed: bool = False, evicting: list[int] | None = None
                         ) -> bool:
        """Snapshot the bitmap, make the copies durable, write it; False if flushes failed.

        ``evicting``: extents the log drops once this checkpoint is durable. If the flushes
        fail, their chunks are listed dirty: copies into them since the last checkpoint may
        not be durable, and once dropped, no hot extent would cover them any more.
        """
        log = self.log
        if log is None or log.closed or not self.seeded:
            return False
        async with self._lock:
            # the bitmap and the offset together (no await between): the job's offset minus
            # this one is what it copied after the snapshot, which this checkpoint still
            # lists as dirty (the lag that docs/resume.md bounds a resume's recopy with)
            bits = self._bits()
            offset = self._done()
            ok = True
            try:
                await self.target.flush()
                await self.source.flush()
            except BlockIOError:
                # copies since the last checkpoint may not be durable: claim nothing new
                ok = False
                if self._last_bits is not None:
                    bits |= self._last_bits
                per = self.plan.options.extent_size // self.plan.granularity
                for e in evicting or ():
                    bits[e * per:min((e + 1) * per, len(bits))] = 1
            meta: dict[str, Any] = {"closed": closed, "time": time.time(), "offset": offset}
            if closed:
                # a format that trims its file at close would change the mtime recorded here
                # (a clean stop's resume was refused for every qcow2 target): trim now
                for node in (self.source, self.target):
                    with contextlib.suppress(BlockIOError):
                        await node.driver.trim_headroom()
                meta["source"] = await identity(self.source)
                if self.plan.image is not None:
                    meta["source"] = _in_image_id(meta["source"])
                meta["target"] = await identity(self.target)
            await log.write_checkpoint(bits.tobytes(), meta)
            self._last_bits = bits
            self._last_dirty = self._dirty_outside_hot(bits)
            self.checkpoints += 1
            return ok

    def _extent_clean(self, extent: int) -> bool:
        es = self.plan.options.extent_size
        return (self.dirty.bitmap.count_range(extent * es, es) == 0
                and self.dirty.in_flight.count_range(extent * es, es) == 0)

    def _dirty_outside_hot(self, bits: bitarray) -> int:
        """Dirty chunks a resume would recopy only because of this checkpoint."""
        n = bits.count()
        log = self.log
        if log is None:
            return n
        per = log.geo.extent_size // self.plan.granularity
        for e in log.hot:
            n -= bits.count(1, e * per, min((e + 1) * per, len(bits)))
        return n

    async def _on_evict(self, victims: list[int]) -> None:
        if not self.seeded:
            return  # the sidecar's checkpoint says "all dirty": it covers every write
        await self.checkpoint(evicting=victims)

    async def tick(self, now_ns: int, copied: int, *, ready: bool, in_sync: bool,
                   force: bool = False) -> None:
        """The job's loop calls this each pass (``copied``: bytes so far).

        Before READY: a checkpoint once per interval, or once a share of the disk was copied
        since the last one. READY: only while the last checkpoint still lists dirty chunks
        (the hot extents cover every later write): soon after the copy caught up, or once
        per interval. Checkpoints flush both images: they are not taken for nothing.
        """
        if self._last_ckpt_ns is None:
            self._last_ckpt_ns = now_ns
        since = now_ns - self._last_ckpt_ns
        step = max(min(self.plan.size // CHECKPOINT_SHARE, 1 << 30), 1 << 20)
        if ready:
            due = self._last_dirty > 0 and (
                since >= CHECKPOINT_INTERVAL_NS or (in_sync and since >= IN_SYNC_DELAY_NS))
        else:
            due = since >= CHECKPOINT_INTERVAL_NS or copied - self._last_copied >= step
        if force or due:
            self._last_ckpt_ns = now_ns
            self._last_copied = copied
            await self.checkpoint()

    async def finish(self, *, pivoted: bool) -> None:
        """Pivoted: the sidecar has served its purpose. Otherwise: a closed checkpoint."""
        if self.closed:
            return
        log = self.log
        try:
            if log is not None and not pivoted and self.seeded:
                await self.checkpoint(closed=True)
        except (OSError, BlockMirrorError):
            pass  # the last checkpoint on disk stays valid (only more conservative)
        finally:
            self.closed = True
            if log is not None:
                await log.close()
            image = self.plan.image
            if image is not None:
                # writes from now on are not tracked: the next one clears the bit
                image.detach(self)
                if pivoted:
                    try:
                        await image.drop()
                    except (OSError, BlockMirrorError):
                        pass  # a stale area: the next mirror of this source replaces it
            elif pivoted:
                try:
                    os.unlink(self.plan.options.path)
                except FileNotFoundError:
                    pass

    async def before_pivot(self) -> None:
        """Just before the pivot, writes held: an in-image area is removed now, while the
        source is surely open (after a drive-mirror pivot it may be closed at once). If the
        pivot then fails, there is simply nothing to resume from."""
        image = self.plan.image
        if image is None or self.closed:
            return
        self.closed = True
        if self.log is not None:
            await self.log.close()
        image.detach(self)
        try:
            await image.drop()
        except (OSError, BlockMirrorError):
            with contextlib.suppress(OSError, BlockMirrorError):
                await image.disarm(self)  # at least no claim survives

    async def abandon(self) -> None:
        """Writes went on without being tracked (a failed pivot): the log stops, and it
        claims nothing it cannot know (an in-image area is marked stale at once)."""
        self.closed = True
        if self.log is not None:
            await self.log.close()
        if self.plan.image is not None:
            await self.plan.image.disarm(self)


__all__ = ["ResumeCoordinator", "ResumeOptions", "ResumePlan", "identity", "plan_resume"]
