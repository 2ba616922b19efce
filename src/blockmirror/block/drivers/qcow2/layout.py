"""qcow2 address arithmetic: L1/L2 entry fields, cluster types and the image geometry (pure).

Names follow docs/interop/qcow2.txt: an L1 entry points at an L2 table, an L2 entry at a data
cluster (or describes a compressed one); bit 63 of both says the cluster is "COPIED" (its
refcount is exactly 1, so it may be written in place); bit 0 of a standard L2 entry reads the
cluster as zeroes (version 3 only).
"""

from __future__ import annotations

from blockmirror.block.drivers.qcow2.header import Header

#: bit 63 of L1 and L2 entries: refcount is exactly one
OFLAG_COPIED = 1 << 63
#: bit 62 of an L2 entry: compressed cluster descriptor
OFLAG_COMPRESSED = 1 << 62
#: bit 0 of a standard L2 entry: the cluster reads as zeroes
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

# cluster types (cf. QEMU's QCow2ClusterType)
UNALLOCATED = 0
ZERO_PLAIN = 1
ZERO_ALLOC = 2
NORMAL = 3
COMPRESSED = 4

#: the largest L1 table QEMU accepts (QCOW_MAX_L1_SIZE)
MAX_L1_BYTES = 32 * 1024 * 1024


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cluster_type(entry: int, version: int) -> int:
    """The type of the cluster an L2 entry describes."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    host = entry & L2E_OFFSET_MASK
    if entry & OFLAG_ZERO and version == 3:
        return ZERO_ALLOC if host else ZERO_PLAIN
    return NORMAL if host else UNALLOCATED


class Geometry:
    """Sizes derived from the header's cluster_bits and refcount_order (plain attributes:
    the per-cluster loops read them)."""

    __slots__ = (
        "cluster_bits",
        "cluster_size",
        "l2_bits",
        "l2_size",
        "refcount_block_bits",
        "refcount_block_size",
        "refcount_max",
        "refcount_order",
    )

    def __init__(self, cluster_bits: int, refcount_order: int) -> None:
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        #: log2 of the entries of one L2 table (8-byte entries filling a cluster)
        self.l2_bits = cluster_bits - 3
        self.l2_size = 1 << self.l2_bits
        self.refcount_order = refcount_order
        #: log2 of the entries of one refcount block
        self.refcount_block_bits = cluster_bits + 3 - refcount_order
        self.refcount_block_size = 1 << self.refcount_block_bits
        self.refcount_max = (1 << (1 << refcount_order)) - 1

    @classmethod
    def of(cls, header: Header) -> Geometry:
        return cls(header.cluster_bits, header.refcount_order)

    def clusters(self, offset: int, length: int) -> range:
        """The clusters a byte range touches."""
        return range(offset >> self.cluster_bits, ceil_div(offset + length, self.cluster_size))
