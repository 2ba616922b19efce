"""The order in which QEMU iterates a QDict (its 512 hash buckets, newest first in a bucket).

QEMU's visitors and printers walk dict members in this order, so the first unexpected member
reported, and the member order of printed JSON, depend on it. Shared by the schema validator
and the QMP printer.
"""

from __future__ import annotations

_BUCKETS = 512


def tdb_hash(key: str) -> int:
    """QDict's bucket hash (gdbm's, via tdb) of the UTF-8 bytes, in 32-bit arithmetic."""
    data = key.encode("utf-8", "surrogatepass")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, b in enumerate(data):
        value = (value + (b << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: list[str]) -> list[str]:
    """The order QEMU iterates a QDict filled with ``keys`` in this insertion order."""
    indexed = [(tdb_hash(k) % _BUCKETS, -n, k) for n, k in enumerate(keys)]
    indexed.sort()
    return [k for _, _, k in indexed]


__all__ = ["qdict_order", "tdb_hash"]
