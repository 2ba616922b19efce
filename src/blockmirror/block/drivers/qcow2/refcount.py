"""Refcount block codecs for every refcount_order 0..6 (1..64-bit entries), sans-IO.

A refcount block is one cluster of packed entries. Widths of 8 bits and more are big-endian
integers; narrower widths pack several entries per byte, the lowest-numbered entry in the
least significant bits (as QEMU's get_refcount_ro0..ro2 read them).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import MutableSequence

#: the array type code of each entry width of 16 bits and more (machine-sized: checked below)
_CODES = {2: "H", 4: "I", 8: "Q"}
assert all(array(c).itemsize == w for w, c in _CODES.items())
_SWAP = sys.byteorder == "little"

#: a decoded refcount block: an array of native integers for widths of 16 bits and more
#: (encoding a piece of one is a copy and a byte swap, where packing 2,048 Python ints one by
#: one cost 20 µs of an allocating guest write), a list for the narrower widths
RefcountBlock = MutableSequence[int]


def entries_per_block(cluster_bits: int, refcount_order: int) -> int:
    return 1 << (cluster_bits + 3 - refcount_order)


def new_block(entries: int, refcount_order: int) -> RefcountBlock:
    """A block of ``entries`` zero refcounts."""
    if refcount_order >= 4:
        code = _CODES[1 << (refcount_order - 3)]
        return array(code, bytes(entries << (refcount_order - 3)))
    return [0] * entries


def decode_block(buf: bytes, refcount_order: int) -> RefcountBlock:
    if refcount_order == 3:
        return list(buf)
    if refcount_order >= 4:
        out = array(_CODES[1 << (refcount_order - 3)])
        out.frombytes(buf)
        if _SWAP:
            out.byteswap()
        return out
    bits = 1 << refcount_order
    per = 8 // bits
    mask = (1 << bits) - 1
    return [(b >> (bits * k)) & mask for b in buf for k in range(per)]


def encode_block(values: RefcountBlock, refcount_order: int) -> bytes:
    if refcount_order == 3:
        return bytes(values)
    if refcount_order >= 4:
        code = _CODES[1 << (refcount_order - 3)]
        if isinstance(values, array) and values.typecode == code:
            swapped = values[:]  # a copy: the block itself stays in native order
            if _SWAP:
                swapped.byteswap()
            return swapped.tobytes()
        return struct.pack(f">{len(values)}{code}", *values)
    bits = 1 << refcount_order
    per = 8 // bits
    out = bytearray(len(values) // per)
    for i, v in enumerate(values):
        if v:
            out[i // per] |= v << (bits * (i % per))
    return bytes(out)
