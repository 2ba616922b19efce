"""Image creation with bdrv_img_create's semantics: `blockmirror create` and drive-mirror targets.

Validates options the way QEMU 7.2 does (unknown format or option, missing size, backing file
equal to the target), takes the size from the backing image when none is given, prints the
``Formatting '...', fmt=... size=...`` line with QEMU's option order, then creates the file:
raw here (with preallocation), qcow2 through ``drivers/qcow2/create.py``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Mapping
from typing import Any

from blockmirror.block import threadio
from blockmirror.block.drivers import load_all
from blockmirror.block.drivers.qcow2.create import create_qcow2
from blockmirror.block.drivers.rbd import (
    Location,
    create_image,
    location_from_options,
    parse_rbd_filename,
)
from blockmirror.block.graph import BlockGraph
from blockmirror.block.hostpath import host_path
from blockmirror.block.options import close_all, open_image
from blockmirror.block.optsyntax import probe_format_async
from blockmirror.errors import BlockMirrorError

_SECTOR = 512
_FIRST_BLOCK = 4096

# (option, kind, default printed when not given or None) in the order QEMU 7.2 prints them;
# kind: "size" prints the parsed number, anything else prints the value as given
_RAW_OPTS: tuple[tuple[str, str, str | None], ...] = (
    ("size", "size", None),
    ("nocow", "bool", None),
    ("preallocation", "str", None),
    ("extent_size_hint", "size", None),
)
_QCOW2_OPTS: tuple[tuple[str, str, str | None], ...] = (
    ("cluster_size", "size", "65536"),
    ("extended_l2", "bool", "off"),
    ("preallocation", "str", None),
    ("compression_type", "str", "zlib"),
    ("size", "size", None),
    ("compat", "str", None),
    ("backing_file", "str", None),
    ("backing_fmt", "str", None),
    ("data_file", "str", None),
    ("data_file_raw", "bool", None),
    ("encryption", "bool", None),
    ("encrypt.format", "str", None),
    ("encrypt.key-secret", "str", None),
    ("encrypt.cipher-alg", "str", None),
    ("encrypt.cipher-mode", "str", None),
    ("encrypt.ivgen-alg", "str", None),
    ("encrypt.ivgen-hash-alg", "str", None),
    ("encrypt.hash-alg", "str", None),
    ("encrypt.iter-time", "str", None),
    ("lazy_refcounts", "bool", "off"),
    ("refcount_bits", "str", "16"),
    ("nocow", "bool", None),
    ("extent_size_hint", "size", None),
)
_HDEV_OPTS: tuple[tuple[str, str, str | None], ...] = (("size", "size", None),)
#: raw on the rbd protocol: raw's size, then rbd's own options (cf. qemu_rbd_create_opts)
_RBD_RAW_OPTS: tuple[tuple[str, str, str | None], ...] = (
    ("size", "size", None),
    ("cluster_size", "size", None),
    ("password-secret", "str", None),
)
FORMAT_OPTS = {"raw": _RAW_OPTS, "file": _RAW_OPTS, "host_device": _HDEV_OPTS,
               "qcow2": _QCOW2_OPTS}

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
             "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str | int) -> int:
    """qemu's size syntax: a number with an optional k/M/G/T/P/E suffix (fractions allowed).

    Raises:
        ValueError: when the text is not a size.
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError(text)
        return text
    s = text.strip()
    if not s:
        raise ValueError(text)
    suffix = s[-1].lower() if s[-1].isalpha() else ""
    number = s[:-1] if suffix else s
    if suffix not in _SUFFIXES or not number or number.startswith(("-", "+")):
        raise ValueError(text)
    try:
        value = int(number, 10) if number.isdigit() else float(number)
    except ValueError:
        raise ValueError(text) from None
    result = int(value * _SUFFIXES[suffix])
    if result < 0 or result >= 1 << 63:
        raise ValueError(text)
    return result


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("on", "true", "yes"):
        return True
    if value in ("off", "false", "no"):
        return False
    raise BlockMirrorError(f"Parameter '{key}' expects 'on' or 'off'")


def _printed(value: Any, kind: str) -> str:
    if kind == "size":
        return str(parse_size(value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _format_opts(filename: str, fmt: str) -> tuple[tuple[str, str, str | None], ...]:
    """The creation options of ``fmt`` on the protocol ``filename`` names."""
    if fmt == "raw" and filename.startswith("rbd:"):
        return _RBD_RAW_OPTS
    return FORMAT_OPTS[fmt]


def formatting_line(filename: str, fmt: str, opts: Mapping[str, Any]) -> str:
    """The line bdrv_img_create prints: given options plus those with defaults, QEMU's order."""
    parts = [f"Formatting '{filename}', fmt={fmt}"]
    for key, kind, default in _format_opts(filename, fmt):
        if key in opts and opts[key] is not None:
            parts.append(f"{key}={_printed(opts[key], kind)}")
        elif default is not None:
            parts.append(f"{key}={default}")
    return " ".join(parts)


async def _backing_size(filename: str, backing_file: str, backing_fmt: str | None) -> int:
    path = backing_file
    if not os.path.isabs(path) and ":" not in path.split("/")[0]:
        path = os.path.join(os.path.dirname(filename), path)
    graph = BlockGraph()
    try:
        # force-share: the backing may well be in use (drive-mirror sync=none backs the new
        # image with the very source it mirrors), as in bdrv_img_create
        node = await open_image(graph, path, backing_fmt, read_only=True, backing=False,
                                options={"force-share": True})
        return node.length()
    finally:
        await close_all(graph)


async def img_create(
    filename: str,
    fmt: str,
    size: int | None,
    *,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    options: Mapping[str, Any] | None = None,
    quiet: bool = False,
    unsafe: bool = False,
    printer: Callable[[str], None] | None = None,
) -> str:
    """Create an image (cf. bdrv_img_create) and return its ``Formatting ...`` line.

    The line is printed (or passed to ``printer``) before the file is created, as QEMU does,
    so it appears even when creation then fails.

    Raises:
        BlockMirrorError: QEMU's texts (unknown format/option, missing size, same file as the
            backing file, backing image errors with hint "Could not open backing image.").
    """
    if fmt not in FORMAT_OPTS:
        if fmt in load_all():
            raise BlockMirrorError(f"Format driver '{fmt}' does not support image creation")
        raise BlockMirrorError(f"Unknown file format '{fmt}'")
    allowed = {key for key, _, _ in _format_opts(filename, fmt)}
    opts: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key not in allowed:
            raise BlockMirrorError(f"Invalid parameter '{key}'")
        opts[key] = value
    if size is not None:
        opts["size"] = size
    if backing_file is not None:
        if fmt != "qcow2":
            raise BlockMirrorError(f"Backing file not supported for file format '{fmt}'")
        opts["backing_file"] = backing_file
    if backing_fmt is not None:
        if fmt != "qcow2":
            raise BlockMirrorError(
                f"Backing file format not supported for file format '{fmt}'")
        opts["backing_fmt"] = backing_fmt
    for key, kind, _ in _format_opts(filename, fmt):
        if kind == "size" and key in opts and opts[key] is not None:
            try:
                opts[key] = parse_size(opts[key])
            except ValueError:
                err = BlockMirrorError(
                    f"Parameter '{key}' expects a non-negative number below 2^64"
                )
                err.hint = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                            "tera-, peta-\nand exabytes, respectively.")
                raise err from None

    bfile = opts.get("backing_file")
    if bfile is not None:
        if bfile == filename:
            raise BlockMirrorError(
                "Error: Trying to create an image with the same filename as the backing file"
            )
        if opts.get("backing_fmt") is None:
            path = bfile if os.path.isabs(bfile) else os.path.join(
                os.path.dirname(filename), bfile
            )
            err = BlockMirrorError("Backing file specified without backing format")
            err.hint = f"Detected format of {await probe_format_async(path)}."
            raise err
        if not unsafe:
            # -u: the backing is not even looked at (so there is no size to borrow either)
            try:
                bsize = await _backing_size(filename, str(bfile), opts.get("backing_fmt"))
            except BlockMirrorError as e:
                err = BlockMirrorError(str(e))
                err.hint = "Could not open backing image."
                raise err from e
            if opts.get("size") is None:
                opts["size"] = bsize
    if opts.get("size") is None:
        raise BlockMirrorError("Image creation needs a size parameter")

    line = formatting_line(filename, fmt, opts)
    if printer is not None:
        printer(line)
    elif not quiet:
        print(line, flush=True)

    if bfile is None and opts.get("backing_fmt") is not None:
        # qcow2's own check, so it comes after the Formatting line
        raise BlockMirrorError("Backing format cannot be used without backing file")
    if filename.startswith("rbd:"):
        await _create_on_rbd(filename, fmt, opts)
    elif fmt == "host_device":
        await _check_device(filename, int(opts["size"]))
    elif fmt in ("raw", "file"):
        prealloc = str(opts.get("preallocation") or "off")
        if prealloc not in ("off", "falloc", "full", "metadata"):
            raise BlockMirrorError(f"invalid parameter value: {prealloc}")
        try:
            await create_file(
                filename,
                int(opts["size"]),
                preallocation=prealloc,
                nocow=_parse_bool("nocow", opts.get("nocow", False)),
            )
        except _TooLarge:
            raise BlockMirrorError(
                f"The image size is too large for file format '{fmt}'"
            ) from None
    else:
        await _create_qcow2(filename, int(opts["size"]), opts)
    return line


async def _create_on_rbd(filename: str, fmt: str, opts: Mapping[str, Any]) -> None:
    """cf. qemu_rbd_co_create_opts: an rbd image from an ``rbd:`` filename (raw only)."""
    if fmt != "raw":
        raise BlockMirrorError(f"blockmirror can only create raw images on rbd, not '{fmt}'")
    if opts.get("password-secret") is not None:
        raise BlockMirrorError("'password-secret' is not supported (use key-secret)")
    parsed = parse_rbd_filename(filename)
    # as in QEMU, a snapshot in the name is not part of what gets created
    parsed.pop("snapshot", None)
    loc = location_from_options(parsed, None)
    size = -(-int(opts["size"]) // _SECTOR) * _SECTOR
    await _create_rbd_image(loc, size, opts.get("cluster_size"))


async def create_rbd(graph: BlockGraph, location: Mapping[str, Any], size: int,
                     cluster_size: int | None = None) -> None:
    """blockdev-create driver=rbd (cf. qemu_rbd_co_create): ``location`` is
    BlockdevOptionsRbd; secrets are looked up in ``graph``'s objects.

    Raises:
        BlockMirrorError: QEMU's texts ("error rbd create: File exists", ...).
    """
    await _create_rbd_image(location_from_options(location, graph, cache=False), size,
                            cluster_size)


async def _create_rbd_image(loc: Location, size: int, cluster_size: Any) -> None:
    await threadio.run(create_image, loc, size, int(cluster_size) if cluster_size else None)


def _check_device_sync(filename: str, size: int) -> None:
    fail = "Protocol driver 'host_device' does not support image creation, and opening the " \
        "image failed: "
    try:
        fd = os.open(host_path(filename), os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise BlockMirrorError(
            f"{fail}Could not open '{filename}': {os.strerror(e.errno or errno.EIO)}") from e
    try:
        st = os.fstat(fd)
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise BlockMirrorError(f"{fail}'host_device' driver requires '{filename}' to be "
                                   "either a character or block device")
        try:
            have = threadio.blk_size(fd) if stat.S_ISBLK(st.st_mode) else 0
        except OSError:
            have = 0
        if have < size:
            raise BlockMirrorError("Cannot grow device files")
        # cf. create_file_fallback_zero_first_sector: no stale header may be probed later
        os.pwrite(fd, bytes(min(_FIRST_BLOCK, have)), 0)
    finally:
        os.close(fd)


async def _check_device(filename: str, size: int) -> None:
    """cf. bdrv_create_file_fallback: host_device cannot create, only reuse a large device."""
    await threadio.run(_check_device_sync, filename, size)


async def _create_qcow2(filename: str, size: int, opts: Mapping[str, Any]) -> None:
    normalized: dict[str, Any] = {
        "cluster_size": int(opts.get("cluster_size") or 65536),
        "extended_l2": _parse_bool("extended_l2", opts.get("extended_l2", False)),
        "preallocation": str(opts.get("preallocation") or "off"),
        "compression_type": str(opts.get("compression_type") or "zlib"),
        "compat": str(opts.get("compat") or "1.1"),
        "backing_file": opts.get("backing_file"),
        "backing_fmt": opts.get("backing_fmt"),
        "data_file": opts.get("data_file"),
        "data_file_raw": _parse_bool("data_file_raw", opts.get("data_file_raw", False)),
        "lazy_refcounts": _parse_bool("lazy_refcounts", opts.get("lazy_refcounts", False)),
        "refcount_bits": int(opts.get("refcount_bits") or 16),
        "nocow": _parse_bool("nocow", opts.get("nocow", False)),
    }
    await create_qcow2(host_path(filename), size, **normalized)


class _TooLarge(Exception):
    """The filesystem refused the size (EFBIG)."""


def _create_sync(filename: str, size: int, preallocation: str, nocow: bool) -> None:
    try:
        fd = os.open(host_path(filename), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BlockMirrorError(
            f"Could not create '{filename}': {os.strerror(e.errno or errno.EIO)}"
        ) from e
    try:
        os.ftruncate(fd, 0)
        if preallocation == "full":
            step = 1 << 20
            zeroes = bytes(step)
            pos = 0
            while pos < size:
                n = min(step, size - pos)
                os.pwrite(fd, zeroes[:n], pos)
                pos += n
        else:
            if preallocation == "falloc" and size:
                os.posix_fallocate(fd, 0, size)
            os.ftruncate(fd, size)
            if size:
                # cf. allocate_first_block: makes alignment probing work on the new image
                os.pwrite(fd, bytes(min(size, _FIRST_BLOCK)), 0)
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise _TooLarge from e
        raise BlockMirrorError(
            f"Could not resize file: {os.strerror(e.errno or errno.EIO)}"
        ) from e
    finally:
        os.close(fd)


async def create_file(
    filename: str, size: int, *, preallocation: str = "off", nocow: bool = False
) -> None:
    """cf. raw_co_create (file-posix): a file of ``size`` rounded up to 512, preallocated.

    Raises:
        BlockMirrorError: unsupported preallocation mode, or the file cannot be created.
    """
    if preallocation not in ("off", "falloc", "full", "metadata"):
        raise BlockMirrorError(
            f"Parameter 'preallocation' does not accept value '{preallocation}'"
        )
    if preallocation == "metadata":
        raise BlockMirrorError("Unsupported preallocation mode: metadata")
    size = -(-size // _SECTOR) * _SECTOR
    await threadio.run(_create_sync, filename, size, preallocation, nocow)


__all__ = ["FORMAT_OPTS", "create_file", "create_rbd", "formatting_line", "img_create",
           "parse_size"]
