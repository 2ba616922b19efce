"""Refcount block codecs for every refcount_order 0..6 (1..64-bit entries), sans-IO.

A refcount block is one cluster of packed entries. Widths of 8 bits and more are big-endian
integers; narrower widths pack several entries per byte, the lowest-numbered entry in the
least significant bits (as QEMU's get_refcount_ro0..ro2 read them).
"""

from __future__ import annotations

import struct


def entries_per_block(cluster_bits: int, refcount_order: int) -> int:
    return 1 << (cluster_bits + 3 - refcount_order)


def decode_block(buf: bytes, refcount_order: int) -> list[int]:
    if refcount_order == 3:
        return list(buf)
    if refcount_order >= 4:
        width = 1 << (refcount_order - 3)
        code = {2: "H", 4: "I", 8: "Q"}[width]
        return list(struct.unpack(f">{len(buf) // width}{code}", buf))
    bits = 1 << refcount_order
    per = 8 // bits
    mask = (1 << bits) - 1
    return [(b >> (bits * k)) & mask for b in buf for k in range(per)]


def encode_block(values: list[int], refcount_order: int) -> bytes:
    if refcount_order == 3:
        return bytes(values)
    if refcount_order >= 4:
        width = 1 << (refcount_order - 3)
        code = {2: "H", 4: "I", 8: "Q"}[width]
        return struct.pack(f">{len(values)}{code}", *values)
    bits = 1 << refcount_order
    per = 8 // bits
    out = bytearray(len(values) // per)
    for i, v in enumerate(values):
        if v:
            out[i // per] |= v << (bits * (i % per))
    return bytes(out)
