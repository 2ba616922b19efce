"""A small FuzzedDataProvider: turns fuzzer bytes into choices (pure Python, no atheris).

Harnesses use it so that the same harness runs under atheris (coverage-guided), under the
seeded random driver (CI) and on a saved crash file. Running out of bytes yields zeros, so
every input decodes to something.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class Input:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def int(self, nbytes: int = 1) -> int:
        return int.from_bytes(self.bytes(nbytes).ljust(nbytes, b"\0"), "little")

    def below(self, n: int) -> int:
        """An int in [0, n)."""
        if n <= 1:
            return 0
        nbytes = max(1, (n.bit_length() + 7) // 8)
        return self.int(nbytes) % n

    def bool(self) -> bool:
        return bool(self.int() & 1)

    def pick(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def rest(self) -> bytes:
        return self.bytes(self.remaining())
