"""Pure tests of the qcow2 codecs: header parsing and validation, refcount block packing,
compressed descriptors, the creation layout and the metadata cache."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.block.drivers.qcow2 import compress as cz
from blockmirror.block.drivers.qcow2.cache import TableCache
from blockmirror.block.drivers.qcow2.create import build_image
from blockmirror.block.drivers.qcow2.header import (
    EXT_BACKING_FORMAT,
    Header,
    encode_fixed,
    parse_header,
)
from blockmirror.block.drivers.qcow2.refcount import decode_block, encode_block
from blockmirror.errors import ImageFormatError, InternalError


def _image(size: int = 1 << 20, **kw: object) -> bytes:
    writes, end = build_image(size, **kw)  # type: ignore[arg-type]
    buf = bytearray(end)
    for off, data in writes:
        buf[off : off + len(data)] = data
    return bytes(buf)


def test_parse_created_header_roundtrip() -> None:
    img = _image(
        10 << 20, cluster_size=4096, backing_file="base.img", backing_fmt="raw",
        lazy_refcounts=True, refcount_order=3,
    )
    h = parse_header(img[:4096], "x.qcow2", len(img))
    assert (h.version, h.cluster_size, h.size, h.refcount_order) == (3, 4096, 10 << 20, 3)
    assert h.backing_file == "base.img" and h.backing_format == "raw"
    assert h.compatible == 1
    assert h.l1_size == 5 and h.l1_table_offset == 3 * 4096
    assert h.refcount_table_offset == 4096 and h.refcount_table_clusters == 1
    assert encode_fixed(h) == img[: h.header_length]


def test_v2_header() -> None:
    img = _image(1 << 20, version=2, backing_file="b", backing_fmt="qcow2")
    h = parse_header(img[:65536], "x", len(img))
    assert h.version == 2 and h.header_length == 72 and h.refcount_order == 4
    assert h.backing_file == "b" and h.backing_format == "qcow2"


def _patched(off: int, fmt: str, value: int) -> bytes:
    img = bytearray(_image())
    struct.pack_into(fmt, img, off, value)
    return bytes(img)


@pytest.mark.parametrize(
    ("off", "fmt", "value", "text"),
    [
        (0, ">I", 0, "Image is not in qcow2 format"),
        (4, ">I", 1, "Unsupported qcow2 version 1"),
        (20, ">I", 30, "Unsupported cluster size: 2^30"),
        (72, ">Q", 1 << 9 | 1 << 33, "Unknown incompatible feature: 200"),
        (96, ">I", 9, "may not exceed 64 bits"),
        (100, ">I", 8, "qcow2 header too short"),
        (56, ">I", 0, "does not contain a reference count table"),
    ],
)
def test_header_refusals(off: int, fmt: str, value: int, text: str) -> None:
    img = _patched(off, fmt, value)
    with pytest.raises(ImageFormatError) as ei:
        parse_header(img[:65536], "/some/file.qcow2", len(img))
    # QEMU's bare text: the front end (CLI, QMP) adds the file name where QEMU does
    assert text in str(ei.value)
    assert "Could not open" not in str(ei.value)


def test_unknown_feature_named_from_table() -> None:
    img = bytearray(_image())
    struct.pack_into(">Q", img, 72, 1 << 5)
    # rename bit 5 of the incompatible features in the image's own feature table
    name_table = img.index(b"extended L2 entries") - 2
    img[name_table : name_table + 48] = bytes([0, 5]) + b"frobnication".ljust(46, b"\0")
    with pytest.raises(ImageFormatError) as ei:
        parse_header(bytes(img[:65536]), "f", len(img))
    assert str(ei.value).endswith("Unsupported qcow2 feature(s): frobnication")


def test_backing_format_extension_too_long_refused() -> None:
    img = bytearray(_image(cluster_size=4096))
    struct.pack_into(">II", img, 112, EXT_BACKING_FORMAT, 2000)
    with pytest.raises(ImageFormatError):
        parse_header(bytes(img[:4096]), "f", len(img))


@settings(max_examples=60, deadline=None)
@given(order=st.integers(0, 6), seed=st.integers(0, 2**32))
def test_refcount_block_roundtrip(order: int, seed: int) -> None:
    rnd = random.Random(seed)
    bits = 1 << order
    n = 4096 * 8 // bits
    values = [rnd.choice([0, 1, (1 << bits) - 1, rnd.getrandbits(bits)]) for _ in range(n)]
    raw = encode_block(values, order)
    assert len(raw) == 4096
    decoded = decode_block(raw, order)
    assert list(decoded) == values
    # the decoded form (an array from 16 bits up) encodes back to the same bytes
    assert encode_block(decoded, order) == raw
    assert encode_block(decoded[8:24], order) == encode_block(values[8:24], order)


def test_refcount_sub_byte_packing_is_lsb_first() -> None:
    # entry 0 sits in the least significant bits (QEMU's get_refcount_ro0..ro2)
    assert encode_block([1] + [0] * 7, 0) == b"\x01"
    assert encode_block([3, 0, 0, 0], 1) == b"\x03"
    assert encode_block([0, 5], 2) == b"\x50"
    assert encode_block([0x1234], 4) == b"\x12\x34"


@settings(max_examples=60, deadline=None)
@given(cbits=st.integers(9, 21), sector=st.integers(0, 1 << 30), off=st.integers(0, 511),
       nbytes=st.integers(1, 4096))
def test_compressed_descriptor_roundtrip(cbits: int, sector: int, off: int, nbytes: int) -> None:
    nbytes = min(nbytes, 1 << cbits)
    host = sector * 512 + off
    entry = cz.make_entry(host, nbytes, cbits)
    got_off, got_len = cz.descriptor(entry, cbits)
    assert got_off == host
    assert got_len >= nbytes and (got_off + got_len) % 512 == 0


def test_decompress_raw_deflate() -> None:
    data = bytes(range(256)) * 16
    assert cz.decompress(cz.compress(data), 4096) == data
    co = zlib.compressobj(9, zlib.DEFLATED, 15)  # a zlib header is not raw deflate
    assert cz.decompress(co.compress(data) + co.flush(), 4096) is None
    assert cz.decompress(cz.compress(data)[:10], 4096) is None


@pytest.mark.parametrize("cs", [512, 65536, 2 << 20])
@pytest.mark.parametrize("order", [0, 4, 6])
def test_build_image_refcounts_cover_every_cluster(cs: int, order: int) -> None:
    img = _image(64 << 20, cluster_size=cs, refcount_order=order, preallocate=True)
    h = parse_header(img[:cs], "f", len(img))
    rt = struct.unpack_from(">Q", img, h.refcount_table_offset)[0]
    assert rt
    n_clusters = len(img) // cs
    per_block = cs * 8 >> order
    counted = 0
    for r in range(-(-n_clusters // per_block)):
        off = struct.unpack_from(">Q", img, h.refcount_table_offset + 8 * r)[0]
        blk = decode_block(img[off : off + cs], order)
        counted += sum(blk)
        assert set(blk) <= {0, 1}
    assert counted == n_clusters


def test_table_cache_never_evicts_dirty() -> None:
    c = TableCache(2)
    c.put(1, [1], dirty=True)
    for k in range(2, 10):
        c.put(k, [k])
    assert c.get(1) == [1] and len(c) == 3
    c.clean_all()
    for k in range(20, 23):
        c.put(k, [k])
    assert c.get(1) is None
    with pytest.raises(InternalError):
        c.peek(1)
    c.mark_dirty(1, [9])
    assert c.peek(1) == [9]


def test_header_dataclass_cluster_size() -> None:
    h = Header(3, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0)
    assert h.cluster_size == 65536
