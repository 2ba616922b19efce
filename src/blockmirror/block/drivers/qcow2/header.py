"""qcow2 on-disk header: constants, parsing with validation, and encoding (sans-IO).

Pure functions over bytes: the driver (``driver.py``) reads cluster 0 and hands it here, and the
creator (``create.py``) builds a header with ``encode_header``. Layout per QEMU's
docs/interop/qcow2.txt; every refusal carries QEMU's text where QEMU has one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from blockmirror.errors import ImageFormatError

MAGIC = b"QFI\xfb"

# header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
INCOMPAT_KNOWN |= INCOMPAT_EXTL2
# compatible feature bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

#: (type, bit, name) as qemu-img writes its feature name table
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

V2_HEADER_LEN = 72
V3_HEADER_MIN = 104
V3_HEADER_LEN = 112  # with the compression type byte and padding, as QEMU 7.2 writes it

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_NAME = 1023
MAX_L1_BYTES = 32 * 1024 * 1024  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_VIRTUAL_SIZE = 1 << 61  # L1 index must stay below INT_MAX / offsets below 2^63

_FIXED = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72-byte v2 part
_V3 = struct.Struct(">QQQII")  # features, refcount_order, header_length


@dataclass
class Header:
    """The qcow2 header fields (version 2 and 3), decoded; extensions are kept apart."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LEN
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    #: extensions we do not interpret, kept byte for byte: (type, data)
    other_extensions: list[tuple[int, bytes]] = field(default_factory=list)
    has_bitmaps_ext: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def _fail(filename: str, text: str) -> ImageFormatError:
    """QEMU's bare text, as a QMP desc carries it; qemu-img-like front ends (our CLI too)
    prefix "Could not open '<file>': ", so the file is named where QEMU names it."""
    return ImageFormatError(text)


def _table_ok(offset: int, entries: int, entry_len: int, cluster_size: int) -> bool:
    """cf. validate_table_offset: aligned and not wrapping past INT64_MAX."""
    if offset % cluster_size:
        return False
    return offset + entries * entry_len < (1 << 63)


def parse_header(buf: bytes, filename: str, file_length: int) -> Header:
    """Parse and validate the header and its extensions from the first bytes of the file.

    ``buf`` holds the whole first cluster (or the whole file when smaller).
    """
    if len(buf) < V2_HEADER_LEN or buf[:4] != MAGIC:
        raise _fail(filename, "Image is not in qcow2 format")
    header = Header(*_FIXED.unpack_from(buf, 0)[1:])
    version, cluster_bits = header.version, header.cluster_bits
    if version not in (2, 3):
        raise _fail(filename, f"Unsupported qcow2 version {version}")
    if cluster_bits < MIN_CLUSTER_BITS or cluster_bits > MAX_CLUSTER_BITS:
        raise _fail(filename, f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = header.cluster_size
    if version == 3:
        if len(buf) < V3_HEADER_MIN:
            raise _fail(filename, "qcow2 header too short")
        (
            header.incompatible, header.compatible, header.autoclear, header.refcount_order,
            header.header_length,
        ) = _V3.unpack_from(buf, 72)
        if header.header_length < V3_HEADER_MIN:
            raise _fail(filename, "qcow2 header too short")
        if header.header_length > cluster_size:
            raise _fail(filename, "qcow2 header exceeds cluster size")
        if header.header_length > len(buf):
            raise _fail(filename, "qcow2 header exceeds the end of the file")
        if header.header_length > V3_HEADER_MIN:
            header.compression_type = buf[104]
    if header.backing_file_offset > cluster_size:
        raise _fail(filename, "Invalid backing file offset")

    ext_end = _parse_extensions(header, buf, filename)

    unknown = header.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        names = []
        for bit in range(64):
            if unknown & (1 << bit):
                name = header.feature_names.get((0, bit))
                names.append(name if name else f"Unknown incompatible feature: {1 << bit:x}")
        raise _fail(filename, "Unsupported qcow2 feature(s): " + ", ".join(names))
    if header.refcount_order > 6:
        raise _fail(filename, "Reference count entry width too large; may not exceed 64 bits")
    if header.crypt_method in (1, 2):
        raise _fail(
            filename,
            f"Encrypted images are not supported (encryption method {header.crypt_method})",
        )
    if header.crypt_method != 0:
        raise _fail(filename, f"Unsupported encryption method {header.crypt_method}")
    if header.incompatible & INCOMPAT_DATA_FILE:
        raise _fail(filename, "Images with an external data file are not supported")
    if header.incompatible & INCOMPAT_EXTL2:
        raise _fail(filename, "Images with extended L2 entries (subclusters) are not supported")
    if header.incompatible & INCOMPAT_COMPRESSION:
        if header.compression_type == 0:
            raise _fail(
                filename, "qcow2: Compression type incompatible feature bit must not be set"
            )
    elif header.compression_type != 0:
        raise _fail(filename, "qcow2: Compression type incompatible feature bit must be set")
    if header.compression_type > 1:
        raise _fail(filename, f"qcow2: unknown compression type: {header.compression_type}")

    # the size and the tables
    if header.size >= MAX_VIRTUAL_SIZE:
        raise _fail(filename, "Image is too big")
    l2_bits = cluster_bits - 3
    l1_needed = -(-header.size // (1 << (cluster_bits + l2_bits)))
    if header.l1_size > MAX_L1_BYTES // 8:
        raise _fail(filename, "Active L1 table too large")
    if header.l1_size < l1_needed:
        raise _fail(filename, "L1 table is too small")
    if header.l1_size and (
        not _table_ok(header.l1_table_offset, header.l1_size, 8, cluster_size)
        or header.l1_table_offset + header.l1_size * 8 > file_length
        or header.l1_table_offset < cluster_size
    ):
        raise _fail(filename, "Active L1 table offset invalid")
    if header.refcount_table_clusters > MAX_REFTABLE_BYTES // cluster_size:
        raise _fail(filename, "Reference count table too large")
    if header.refcount_table_clusters == 0:
        raise _fail(filename, "Image does not contain a reference count table")
    reftable_offset = header.refcount_table_offset
    reftable_bytes = header.refcount_table_clusters * cluster_size
    if (
        not _table_ok(reftable_offset, header.refcount_table_clusters, cluster_size, cluster_size)
        or reftable_offset < cluster_size
        or reftable_offset + reftable_bytes > file_length
    ):
        raise _fail(filename, "Reference count table offset invalid")
    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise _fail(filename, "Snapshot table too large")
    # aligned even with no snapshots, as QEMU checks it (40: the fixed part of an entry)
    if not _table_ok(header.snapshots_offset, header.nb_snapshots, 40, cluster_size) or (
        header.nb_snapshots
        and (header.snapshots_offset < cluster_size or header.snapshots_offset >= file_length)
    ):
        raise _fail(filename, "Snapshot table offset invalid")

    if header.backing_file_offset and header.backing_file_size:
        if header.backing_file_size > MAX_BACKING_NAME or (
            header.backing_file_size > cluster_size - header.backing_file_offset
        ):
            raise _fail(filename, "Backing file name too long")
        if header.backing_file_offset < ext_end:
            raise _fail(filename, "Invalid backing file offset")
        end = header.backing_file_offset + header.backing_file_size
        if end > len(buf):
            raise _fail(filename, "Backing file name exceeds the end of the file")
        # a C string in QEMU: the name ends at a NUL
        raw = buf[header.backing_file_offset : end].split(b"\0", 1)[0]
        header.backing_file = raw.decode("utf-8", "replace")
    return header


def _parse_extensions(header: Header, buf: bytes, filename: str) -> int:
    """Read header extensions; return the offset just past the end marker."""
    pos = header.header_length
    limit = header.backing_file_offset if header.backing_file_offset else header.cluster_size
    limit = min(limit, len(buf))
    while pos + 8 <= limit:
        ext_type, ext_len = struct.unpack_from(">II", buf, pos)
        pos += 8
        if ext_type == EXT_END:
            return pos
        if ext_len > limit - pos:
            raise _fail(filename, "Invalid extension length")
        data = bytes(buf[pos : pos + ext_len])
        pos += (ext_len + 7) & ~7
        if ext_type == EXT_BACKING_FORMAT:
            if ext_len > 1023:
                raise _fail(filename, f"ERROR: ext_backing_format: len={ext_len} too large")
            header.backing_format = data.decode("utf-8", "replace").rstrip("\0")
        elif ext_type == EXT_FEATURE_TABLE:
            for i in range(0, ext_len - 47, 48):
                ftype, bit = data[i], data[i + 1]
                name = data[i + 2 : i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                header.feature_names[(ftype, bit)] = name
        elif ext_type == EXT_DATA_FILE:
            header.incompatible |= INCOMPAT_DATA_FILE
            header.other_extensions.append((ext_type, data))
        else:
            if ext_type == EXT_BITMAPS:
                header.has_bitmaps_ext = True
            header.other_extensions.append((ext_type, data))
    return pos


def encode_fixed(header: Header) -> bytes:
    """The fixed header fields (72 bytes for v2, 104 + compression type for v3)."""
    out = _FIXED.pack(
        MAGIC, header.version, header.backing_file_offset, header.backing_file_size,
        header.cluster_bits, header.size, header.crypt_method, header.l1_size,
        header.l1_table_offset, header.refcount_table_offset, header.refcount_table_clusters,
        header.nb_snapshots, header.snapshots_offset,
    )
    if header.version == 3:
        out += _V3.pack(
            header.incompatible, header.compatible, header.autoclear, header.refcount_order,
            header.header_length,
        )
        if header.header_length > V3_HEADER_MIN:
            out += bytes([header.compression_type]) + bytes(7)
    return out


def encode_extension(ext_type: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return struct.pack(">II", ext_type, len(data)) + data + bytes(pad)


def feature_table() -> bytes:
    return b"".join(
        bytes([t, b]) + name.encode().ljust(46, b"\0") for t, b, name in FEATURE_NAMES
    )


def encode_header_cluster(header: Header, cluster_size: int) -> bytes:
    """The whole first cluster as QEMU's qcow2_update_header lays it out: the fixed fields,
    then the extensions (backing format, feature name table, bitmaps, any kept unknown ones),
    the end marker, and the backing file name; ``header.backing_file_offset`` is updated to match.
    """
    # QEMU writes the header it knows, whatever length the file had
    header.header_length = V3_HEADER_LEN if header.version == 3 else V2_HEADER_LEN
    extensions = b""
    if header.backing_format:
        extensions += encode_extension(EXT_BACKING_FORMAT, header.backing_format.encode())
    if header.version == 3 and header.feature_names:
        extensions += encode_extension(EXT_FEATURE_TABLE, feature_table())
    bitmaps = [data for kind, data in header.other_extensions if kind == EXT_BITMAPS]
    others = [(kind, data) for kind, data in header.other_extensions if kind != EXT_BITMAPS]
    if bitmaps and header.autoclear & AUTOCLEAR_BITMAPS:
        extensions += encode_extension(EXT_BITMAPS, bitmaps[0])
    for kind, data in others:
        extensions += encode_extension(kind, data)
    extensions += struct.pack(">II", EXT_END, 0)
    name = header.backing_file.encode() if header.backing_file else b""
    if name:
        header.backing_file_offset = header.header_length + len(extensions)
        header.backing_file_size = len(name)
    else:
        header.backing_file_offset = header.backing_file_size = 0
    out = encode_fixed(header) + extensions + name
    if len(out) > cluster_size:
        raise ImageFormatError("qcow2 header exceeds cluster size")
    return out + bytes(cluster_size - len(out))
