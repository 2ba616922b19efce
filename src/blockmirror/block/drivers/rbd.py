"""The rbd protocol driver: a node backed by a Ceph RBD image, through librbd.

cf. QEMU's block/rbd.c (7.2). Everything cluster-side is librbd's and librados's, reached
through Ceph's own Python bindings (Debian's python3-rbd / python3-rados, which ``make
tools`` makes importable from the project's venv): this module parses QEMU's options and
``rbd:`` filenames, connects, and turns requests into librbd calls.

Reads, writes, write-zeroes, discard and flush are librbd aio requests whose completions
(called on a librbd thread) wake the waiting coroutine through ``call_soon_threadsafe``, so
many requests are in flight at once without a worker thread each; connecting, opening,
``diff_iterate`` (block status) and resizing are blocking calls and run in the I/O pool
(``block/threadio.py``). Closing runs in a daemon thread of its own with a deadline, so a
cluster that went away cannot keep the daemon from exiting.

Errors keep QEMU's texts ("error opening pool rbd2: No such file or directory", ...). A
cluster that stops answering fails requests only if the client has timeouts configured
(``rados_osd_op_timeout`` / ``rados_mon_op_timeout`` in the conf file or the filename), as
with QEMU; the failed request then carries librbd's errno (ETIMEDOUT) to the job's error
policy.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import importlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockmirror.block import threadio
from blockmirror.block.driver import BlockDriver, BlockStatus, DriverInfo, Extent, WriteFlags
from blockmirror.block.drivers import register
from blockmirror.block.drivers.rbd_filename import KEYVALUE_PAIRS, parse_rbd_filename
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.objects import NO_OBJECTS, ObjectLookup
from blockmirror.objects.secret import lookup_secret

if TYPE_CHECKING:
    from blockmirror.block.graph import BlockGraph

log = logging.getLogger(__name__)

class _LazyModule:
    """A binding imported on first use: librados and librbd add ~18 MiB to the RSS of
    every daemon, and most daemons never open an rbd node."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None
        self.error: str | None = None

    def load(self) -> bool:
        if self._module is None and self.error is None:
            try:  # Debian's python3-rbd / python3-rados (no type information)
                self._module = importlib.import_module(self._name)
            except ImportError as e:  # pragma: no cover - depends on the host
                self.error = str(e)
        return self._module is not None

    def __getattr__(self, attr: str) -> Any:
        if not self.load():
            raise AttributeError(f"{self._name} bindings unavailable: {self.error}")
        return getattr(self._module, attr)


rados = _LazyModule("rados")
rbd = _LazyModule("rbd")


#: how long close() waits for librbd before leaving the handle to a daemon thread
_CLOSE_DEADLINE = 30.0
#: librbd before 1.17 reports wrong offsets for unaligned diff_iterate starts
#: (tracker.ceph.com/issues/53784); QEMU then starts at the object boundary
_DIFF_ITERATE_FIXED = (1, 17, 0)


def available() -> bool:
    """True when librbd's Python bindings could be imported."""
    return rados.load() and rbd.load()


def _require_bindings() -> None:
    if not available():
        raise BlockMirrorError(
            f"Ceph's Python bindings (python3-rbd, python3-rados) cannot be imported: "
            f"{rados.error or rbd.error}; run 'make tools'")


def _errno_of(e: BaseException) -> int:
    err = getattr(e, "errno", None)
    if isinstance(err, int) and err:
        return abs(err)
    return errno.EIO


def _strerror(e: BaseException) -> str:
    return os.strerror(_errno_of(e))


# --- secrets ---------------------------------------------------------------------------------


def _lookup_secret(graph: BlockGraph | None, secret_id: str) -> bytes:
    """The raw bytes of the ``secret`` object ``secret_id`` (cf. qcrypto_secret_lookup).

    The one place this driver reads user-creatable objects (the graph's object registry).

    Raises:
        BlockMirrorError: QEMU's texts for a missing, mistyped or empty secret.
    """
    objects: ObjectLookup = graph.objects if graph is not None else NO_OBJECTS
    return lookup_secret(objects, secret_id)


# --- connecting ------------------------------------------------------------------------------


@dataclass
class Location:
    """Where an image is and how to reach it (BlockdevOptionsRbd, resolved)."""

    pool: str
    image: str
    namespace: str = ""
    snapshot: str | None = None
    conf: str | None = None
    user: str | None = None
    key: str | None = None  # base64, ready for the "key" option
    auth_client_required: list[str] | None = None
    mon_host: str | None = None
    keypairs: list[tuple[str, str]] = field(default_factory=list)
    cache: bool = True


def _str_opt(opts: Mapping[str, Any], key: str, required: bool = False) -> str | None:
    v = opts.get(key)
    if v is None:
        if required:
            raise BlockMirrorError(f"Parameter '{key}' is missing")
        return None
    if not isinstance(v, str):
        raise BlockMirrorError(f"Invalid parameter type for '{key}', expected: string")
    return v


def _list_opt(opts: Mapping[str, Any], key: str) -> list[Any] | None:
    """A list option in QMP's form or keyval's (``key.0=...``, unflattened to a dict)."""
    v = opts.get(key)
    if v is None:
        return None
    if isinstance(v, dict) and all(k.isdigit() for k in v):
        v = [v[k] for k in sorted(v, key=int)]
    if not isinstance(v, list):
        raise BlockMirrorError(f"Invalid parameter type for '{key}', expected: array")
    return v


def location_from_options(opts: Mapping[str, Any], graph: BlockGraph | None,
                          cache: bool = True) -> Location:
    """Resolve BlockdevOptionsRbd (an ``rbd:`` filename parsed by parse_rbd_filename, or
    options given as such) into a Location.

    Raises:
        BlockMirrorError: missing or mistyped options, unknown secrets (QEMU's texts).
    """
    merged: dict[str, Any] = dict(opts)
    if merged.get("encrypt") is not None:
        raise BlockMirrorError("RBD image encryption is not supported by blockmirror")
    pool = _str_opt(merged, "pool", required=True)
    image = _str_opt(merged, "image", required=True)
    assert pool is not None and image is not None
    loc = Location(pool=pool, image=image, cache=cache,
                   namespace=_str_opt(merged, "namespace") or "",
                   snapshot=_str_opt(merged, "snapshot"), conf=_str_opt(merged, "conf"),
                   user=_str_opt(merged, "user"))
    secret = _str_opt(merged, "key-secret")
    if secret is not None:
        loc.key = base64.b64encode(_lookup_secret(graph, secret)).decode()
    acr = _list_opt(merged, "auth-client-required")
    if acr is not None:
        for mode in acr:
            if mode not in ("cephx", "none"):
                raise BlockMirrorError(
                    f"Parameter 'auth-client-required' does not accept value '{mode}'")
        loc.auth_client_required = [str(m) for m in acr]
    servers = _list_opt(merged, "server")
    if servers is not None:
        hosts = []
        for s in servers:
            if not isinstance(s, Mapping) or "host" not in s or "port" not in s:
                raise BlockMirrorError("Parameter 'server' expects host and port")
            host, port = str(s["host"]), str(s["port"])
            hosts.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        loc.mon_host = ";".join(hosts) if hosts else None
    raw_pairs = merged.get(KEYVALUE_PAIRS)
    if isinstance(raw_pairs, str):
        # imported here: this module comes with image creation (block/create.py: drive-mirror,
        # blockdev-create), and only an rbd: filename with key=value pairs needs json (2 ms
        # of CPU at import)
        import json

        flat = json.loads(raw_pairs)
        loc.keypairs = list(zip(flat[0::2], flat[1::2], strict=True))
    return loc


def connect(loc: Location) -> tuple[Any, Any]:
    """(cluster, ioctx) for a Location; blocking (run it in the I/O pool).

    cf. qemu_rbd_connect: the same order of configuration, the same error texts.
    """
    _require_bindings()
    cluster = rados.Rados(rados_id=loc.user)
    try:
        try:
            # no conf given: the default locations, whose absence is no error
            cluster.conf_read_file(loc.conf)
        except rados.Error as e:
            if loc.conf is not None:
                raise BlockMirrorError(
                    f"error reading conf file {loc.conf}: {_strerror(e)}") from e
        for key, value in loc.keypairs:
            try:
                cluster.conf_set(key, value)
            except rados.Error as e:
                raise BlockMirrorError(f"invalid conf option {key}: {_strerror(e)}") from e
        if loc.mon_host is not None:
            cluster.conf_set("mon_host", loc.mon_host)
        if loc.key is not None:
            try:
                cluster.conf_set("key", loc.key)
            except rados.Error as e:
                raise BlockMirrorError(f"Could not set 'key': {_strerror(e)}") from e
        if loc.auth_client_required is not None:
            try:
                cluster.conf_set("auth_client_required", ";".join(loc.auth_client_required))
            except rados.Error as e:
                raise BlockMirrorError(
                    f"Could not set 'auth_client_required': {_strerror(e)}") from e
        try:
            cluster.conf_set("rbd_cache", "true" if loc.cache else "false")
        except rados.Error:
            pass
        try:
            cluster.connect()
        except rados.Error as e:
            raise BlockMirrorError(f"error connecting: {_strerror(e)}") from e
        try:
            ioctx = cluster.open_ioctx(loc.pool)
        except rados.Error as e:
            raise BlockMirrorError(f"error opening pool {loc.pool}: {_strerror(e)}") from e
        if loc.namespace:
            try:
                exists = rbd.RBD().namespace_exists(ioctx, loc.namespace)
            except (rbd.Error, rados.Error) as e:
                ioctx.close()
                raise BlockMirrorError(f"error checking namespace: {_strerror(e)}") from e
            if not exists:
                ioctx.close()
                raise BlockMirrorError(f"namespace '{loc.namespace}' does not exist")
        ioctx.set_namespace(loc.namespace)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, ioctx


def _open_sync(loc: Location, read_only: bool) -> tuple[Any, Any, Any, dict[str, Any]]:
    cluster, ioctx = connect(loc)
    try:
        try:
            image = rbd.Image(ioctx, loc.image, snapshot=loc.snapshot, read_only=read_only)
        except (rbd.Error, rados.Error) as e:
            raise BlockMirrorError(
                f"error reading header from {loc.image}: {_strerror(e)}") from e
        try:
            st = image.stat()
            st["features"] = image.features()
        except (rbd.Error, rados.Error) as e:
            image.close()
            raise BlockMirrorError(
                f"error getting image info from {loc.image}: {_strerror(e)}") from e
    except BaseException:
        ioctx.close()
        cluster.shutdown()
        raise
    return cluster, ioctx, image, st


def _shutdown(*handles: Any) -> None:
    """Close image, ioctx, cluster in that order, logging (not raising) failures."""
    for h in handles:
        if h is None:
            continue
        try:
            if hasattr(h, "shutdown"):
                h.shutdown()
            else:
                h.close()
        except Exception as e:  # closing is best effort
            log.warning("rbd: closing %r failed: %s", h, e)


def _settle_none(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _in_daemon_thread(fn: Callable[[], None], deadline: float) -> bool:
    """Run ``fn`` in a daemon thread (process exit does not wait for it); True if it ended
    before ``deadline`` seconds."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def runner() -> None:
        try:
            fn()
        finally:
            loop.call_soon_threadsafe(_settle_none, done)

    threading.Thread(target=runner, name="blockmirror-rbd-close", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.shield(done), deadline)
    except TimeoutError:
        return False
    return True


def create_image(loc: Location, size: int, cluster_size: int | None) -> None:
    """cf. qemu_rbd_do_create; blocking (run it in the I/O pool).

    Raises:
        BlockMirrorError: QEMU's texts.
    """
    if loc.snapshot is not None:
        raise BlockMirrorError("Can't use snapshot name for image creation")
    order = None
    if cluster_size:
        if cluster_size & (cluster_size - 1):
            raise BlockMirrorError("obj size needs to be power of 2")
        if cluster_size < 4096:
            raise BlockMirrorError("obj size too small")
        order = cluster_size.bit_length() - 1
    cluster, ioctx = connect(loc)
    try:
        rbd.RBD().create(ioctx, loc.image, size, order=order)
    except (rbd.Error, rados.Error) as e:
        raise BlockMirrorError(f"error rbd create: {_strerror(e)}") from e
    finally:
        ioctx.close()
        cluster.shutdown()


def probe_format(loc: Location) -> str:
    """The format of an image's content (cf. bdrv_probe_all over the protocol): qcow2 or raw.
    Blocking."""
    cluster, ioctx, image, _ = _open_sync(loc, read_only=True)
    try:
        head = image.read(0, 4) if image.size() >= 4 else b""
    finally:
        _shutdown(image, ioctx, cluster)
    return "qcow2" if head == b"QFI\xfb" else "raw"


# --- the driver ------------------------------------------------------------------------------


class _Stop(Exception):
    """Ends a diff_iterate early: the allocation status changed."""


@register
class RbdDriver(BlockDriver):
    """cf. bdrv_rbd: every request is a librbd request on one open image."""

    format_name = "rbd"
    supports_truncate = True
    #: librbd splits requests per object itself; keep the generic path's requests large
    max_transfer = 32 * 1024 * 1024
    can_write_zeroes_with_unmap = True

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.location: Location | None = None
        self._cluster: Any = None
        self._ioctx: Any = None
        self._image: Any = None
        self._size = 0
        self._object_size = 0
        self._features = 0
        self._fast_diff_workaround = False

    @classmethod
    async def probe_image_format(cls, options: Mapping[str, Any],
                                 graph: BlockGraph | None) -> str:
        return await threadio.run(probe_format, location_from_options(options, graph))

    # --- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        _require_bindings()
        opts = self.node.options
        loc = location_from_options(opts, self.node.graph, cache=not self.node.cache_direct)
        self.location = loc
        # a snapshot is opened read-only whatever the node says; librbd answers first
        read_only = self.node.read_only or loc.snapshot is not None
        cluster, ioctx, image, st = await threadio.run(_open_sync, loc, read_only)
        if loc.snapshot is not None and not self.node.read_only:
            # cf. bdrv_apply_auto_read_only, after rbd_open as in qemu_rbd_open
            if not opts.get("auto-read-only"):
                await threadio.run(_shutdown, image, ioctx, cluster)
                raise BlockMirrorError("rbd snapshots are read-only")
            self.node.read_only = True
        self._cluster, self._ioctx, self._image = cluster, ioctx, image
        self._size = int(st["size"])
        self._object_size = int(st["obj_size"])
        self._features = int(st["features"])
        self._fast_diff_workaround = tuple(rbd.RBD().version()) < _DIFF_ITERATE_FIXED

    async def close(self) -> None:
        handles = (self._image, self._ioctx, self._cluster)
        self._image = self._ioctx = self._cluster = None
        if handles[0] is None and handles[2] is None:
            return
        if not await _in_daemon_thread(lambda: _shutdown(*handles), _CLOSE_DEADLINE):
            log.warning("rbd: closing %s did not finish in %.0f s; left to a background "
                        "thread", self.node.name, _CLOSE_DEADLINE)

    # --- size and info --------------------------------------------------------------------

    def length(self) -> int:
        return self._size

    def info(self) -> DriverInfo:
        # cf. qemu_rbd_getinfo / qemu_rbd_get_specific_info (no LUKS: no encryption-format)
        return DriverInfo(cluster_size=self._object_size,
                          format_specific={"type": "rbd", "data": {}})

    def has_zero_init(self) -> bool:
        return True

    async def truncate(self, length: int, preallocation: str = "off") -> None:
        if preallocation != "off":
            raise BlockMirrorError(f"Unsupported preallocation mode '{preallocation}'")
        image = self._live()
        try:
            await threadio.run(image.resize, length)
        except (rbd.Error, rados.Error) as e:
            raise BlockIOError(_errno_of(e), f"Failed to resize file: {_strerror(e)}") from e
        self._size = length

    # --- I/O ------------------------------------------------------------------------------

    def _live(self) -> Any:
        if self._image is None:
            raise BlockIOError(errno.EIO)
        return self._image

    async def _aio(self, start: Callable[[Callable[..., None]], Any],
                   submit_in_pool: bool = False) -> Any:
        """Start one librbd aio request and wait for its completion on this loop.

        ``start(callback)`` submits the request; librbd calls ``callback(completion, *rest)``
        on one of its threads, which hands (return value, rest) back to the loop.
        ``submit_in_pool``: submit from an I/O worker, for requests whose submission can
        block (librbd's write cache throttles writers once too much is in flight, and the
        payload is copied), so that the event loop never waits for the cluster.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, tuple[Any, ...]]] = loop.create_future()

        def settle(result: tuple[int, tuple[Any, ...]]) -> None:
            if not fut.done():
                fut.set_result(result)

        def callback(completion: Any, *rest: Any) -> None:
            loop.call_soon_threadsafe(settle, (completion.get_return_value(), rest))

        try:
            if submit_in_pool:
                await threadio.run(start, callback)
            else:
                start(callback)
        except (rbd.Error, rados.Error) as e:
            raise BlockIOError(_errno_of(e)) from e
        ret, rest = await fut
        if ret < 0:
            raise BlockIOError(-ret)
        return rest[0] if rest else ret

    async def preadv(self, offset: int, length: int) -> bytes:
        image = self._live()
        data = await self._aio(lambda cb: image.aio_read(offset, length, cb))
        buf = bytes(data or b"")
        if len(buf) < length:  # cf. qemu_rbd_start_co: short reads are zero padded
            buf += bytes(length - len(buf))
        return buf

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        if self.node.read_only:
            raise BlockIOError(errno.EPERM)
        image = self._live()

        def submit(cb: Callable[..., None]) -> Any:
            # librbd takes bytes; the copy of a view happens in the worker too
            payload = data if isinstance(data, bytes) else bytes(data)
            return image.aio_write(payload, offset, cb)

        await self._aio(submit, submit_in_pool=True)
        if flags & WriteFlags.FUA:
            await self.flush()

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        image = self._live()
        # without MAY_UNMAP the zeroes must stay allocated (cf. qemu_rbd_start_co)
        thick = rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        zero_flags = 0 if flags & WriteFlags.MAY_UNMAP else thick
        await self._aio(lambda cb: image.aio_write_zeroes(offset, length, cb,
                                                          zero_flags=zero_flags))
        if flags & WriteFlags.FUA:
            await self.flush()

    async def pdiscard(self, offset: int, length: int) -> None:
        image = self._live()
        await self._aio(lambda cb: image.aio_discard(offset, length, cb))

    async def flush(self) -> None:
        image = self._live()
        await self._aio(lambda cb: image.aio_flush(cb))

    async def block_status(self, offset: int, length: int) -> Extent:
        """cf. qemu_rbd_co_block_status: fast-diff answers, otherwise everything is data."""
        data = Extent(length, BlockStatus.DATA | BlockStatus.OFFSET_VALID,
                      map_offset=offset, map_node=self.node)
        image = self._live()
        try:
            result = await threadio.run(self._allocation, image, offset, length)
        except (rbd.Error, rados.Error) as e:
            log.debug("rbd: block status of %s failed: %s", self.node.name, e)
            return data
        if result is None:
            return data
        allocated, n = result
        if allocated:
            return Extent(n, BlockStatus.DATA | BlockStatus.OFFSET_VALID,
                          map_offset=offset, map_node=self.node)
        return Extent(n, BlockStatus.ZERO | BlockStatus.OFFSET_VALID,
                      map_offset=offset, map_node=self.node)

    def _allocation(self, image: Any, offset: int, length: int) -> tuple[bool, int] | None:
        """(allocated, bytes) of the run at ``offset``; None when fast-diff cannot tell.

        Blocking: diff_iterate against no snapshot lists the allocated objects (whole
        objects: the object map answers without reading data) and stops at the first change.
        """
        if not image.features() & rbd.RBD_FEATURE_FAST_DIFF:
            return None
        if image.flags() & rbd.RBD_FLAG_FAST_DIFF_INVALID:
            return None
        head = 0
        if self._fast_diff_workaround:
            if image.features() & rbd.RBD_FEATURE_STRIPINGV2:
                return None
            try:
                image.parent_id()
                return None  # a clone: the workaround is wrong there
            except rbd.ImageNotFound:
                pass
            head = offset % self._object_size if self._object_size else 0
        start = offset - head
        total = length + head
        state = {"bytes": 0, "exists": False}

        def cb(off: int, n: int, exists: bool) -> None:
            if not exists:
                return
            if not state["exists"] and off > start:
                state["bytes"] = off - start
                raise _Stop
            if state["exists"] and off > start + state["bytes"]:
                raise _Stop
            state["bytes"] += n
            state["exists"] = True

        stopped = False
        try:
            image.diff_iterate(start, total, None, cb, include_parent=True, whole_object=True)
        except _Stop:
            stopped = True
        n = int(state["bytes"])
        if not state["exists"] and not stopped:
            n = total
        n = min(n, total)
        if n <= head:
            return None
        return bool(state["exists"]), n - head


__all__ = [
    "KEYVALUE_PAIRS",
    "Location",
    "RbdDriver",
    "available",
    "connect",
    "create_image",
    "location_from_options",
    "parse_rbd_filename",
    "probe_format",
]
