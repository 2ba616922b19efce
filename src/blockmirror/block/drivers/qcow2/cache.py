"""A write-back LRU cache of decoded metadata tables (L2 tables, refcount blocks).

Keys are host offsets (L2) or refcount-table indices (refcount blocks); values are the decoded
entry lists, mutated in place by the driver. Dirty tables are never evicted: they leave the
cache only through the driver's ordered flush, which calls ``clean_all`` once they are written.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import MutableSequence
from typing import Generic, TypeVar

from blockmirror.errors import InternalError

#: a decoded table: a list of entries, or an array of them (refcount blocks, refcount.py)
T = TypeVar("T", bound=MutableSequence[int])


class TableCache(Generic[T]):
    def __init__(self, budget: int) -> None:
        #: how many clean tables to keep
        self.budget = budget
        self._tables: OrderedDict[int, T] = OrderedDict()
        self.dirty: set[int] = set()
        #: the entries [lo, hi) changed in a dirty table since it was last written, where
        #: every change so far named its entries; a dirty table without a span is whole
        self.spans: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, key: int) -> T | None:
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
        return table

    def peek(self, key: int) -> T:
        try:
            return self._tables[key]
        except KeyError:
            raise InternalError(f"qcow2 metadata table {key:#x} is not cached") from None

    def put(self, key: int, table: T, dirty: bool = False) -> None:
        self._tables[key] = table
        self._tables.move_to_end(key)
        if dirty:
            self.spans.pop(key, None)  # written whole
            self.dirty.add(key)
        self._evict()

    def mark_dirty(self, key: int, table: T | None = None,
                   span: tuple[int, int] | None = None) -> None:
        """``span``: only entries [lo, hi) changed; without one the whole table is dirty."""
        if key not in self._tables:
            if table is None:
                raise InternalError(f"qcow2 metadata table {key:#x} was evicted while in use")
            self._tables[key] = table
        if span is None:
            self.spans.pop(key, None)
        else:
            known = self.spans.get(key)
            if known is not None:
                self.spans[key] = (min(known[0], span[0]), max(known[1], span[1]))
            elif key not in self.dirty:
                self.spans[key] = span
            # else: already dirty as a whole, and it stays whole
        self.dirty.add(key)

    def drop(self, key: int) -> None:
        self._tables.pop(key, None)
        self.dirty.discard(key)
        self.spans.pop(key, None)

    def clean_all(self) -> None:
        self.dirty.clear()
        self.spans.clear()
        self._evict()

    def _evict(self) -> None:
        excess = len(self._tables) - len(self.dirty) - self.budget
        if excess <= 0:
            return
        for key in list(self._tables):
            if excess <= 0:
                break
            if key not in self.dirty:
                del self._tables[key]
                excess -= 1
