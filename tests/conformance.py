"""One battery for every block driver: random requests checked against a bytearray model.

``await run_battery(node)`` takes an opened, writable node and checks the invariants every
driver must keep through the generic request path: reads return what was written (at any
alignment), write_zeroes reads back as zeroes with or without unmap, discard never corrupts
data outside its range, flush and FUA succeed, out-of-range requests fail with BlockIOError,
block_status extents tile the node and never claim ZERO over non-zero data, and concurrent
requests on disjoint ranges (allocating writes racing each other) do not corrupt one another.
Drivers that do not keep data (null-co) pass ``stores_data=False``. ``MemDriver`` is a
reference in-memory driver for tests of the generic path itself.
"""

from __future__ import annotations

import asyncio
import errno
import random
from dataclasses import dataclass, field

from blockmirror.block.driver import BlockDriver, BlockStatus, Extent, WriteFlags
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError


@dataclass
class Model:
    """What the node must contain: bytes, and which of them are defined (not discarded)."""

    data: bytearray
    defined: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.defined = bytearray(b"\x01" * len(self.data))

    def write(self, offset: int, buf: bytes) -> None:
        self.data[offset : offset + len(buf)] = buf
        self.defined[offset : offset + len(buf)] = b"\x01" * len(buf)

    def forget(self, offset: int, length: int) -> None:
        self.defined[offset : offset + length] = bytes(length)


class BatteryFailure(AssertionError):
    pass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise BatteryFailure(msg)


async def _verify(node: BlockNode, model: Model, offset: int, length: int, stores: bool) -> None:
    got = await node.read(offset, length)
    _check(len(got) == length, f"read({offset}, {length}) returned {len(got)} bytes")
    if not stores or got == bytes(model.data[offset : offset + length]):
        return
    # differences are allowed only where a discard left the content undefined
    for i in range(length):
        if model.defined[offset + i] and got[i] != model.data[offset + i]:
            raise BatteryFailure(
                f"byte {offset + i:#x}: read {got[i]:#x}, expected {model.data[offset + i]:#x}"
            )


async def check_block_status(node: BlockNode, model: Model | None, limit: int) -> None:
    """Extents tile [0, limit), are non-empty, and ZERO ranges really read as zeroes."""
    offset = 0
    while offset < limit:
        ext = await node.block_status(offset, limit - offset)
        _check(0 < ext.length <= limit - offset, f"block_status({offset}) length {ext.length}")
        if ext.status & BlockStatus.ZERO:
            data = await node.read(offset, ext.length)
            _check(not any(data), f"ZERO claimed at {offset:#x}+{ext.length:#x} over data")
        if ext.status & BlockStatus.OFFSET_VALID:
            _check(ext.map_offset is not None, "OFFSET_VALID without map_offset")
        offset += ext.length


async def run_battery(
    node: BlockNode,
    *,
    seed: int = 0,
    rounds: int = 60,
    max_len: int = 192 * 1024,
    region: int = 4 * 1024 * 1024,
    stores_data: bool = True,
) -> None:
    """Run the battery on the first ``region`` bytes of ``node`` (which must be writable).

    Raises:
        BatteryFailure: with the first broken invariant.
    """
    rng = random.Random(seed)
    size = node.length()
    limit = min(size, region)
    _check(limit > 0, "the battery needs a non-empty node")
    model = Model(bytearray(await node.read(0, limit)))

    # zero-length requests are no-ops, out-of-range ones fail cleanly
    await node.write(0, b"")
    _check(await node.read(limit, 0) == b"", "zero-length read")
    for bad in (lambda: node.read(size, 1), lambda: node.write(size - 1, b"ab"),
                lambda: node.write_zeroes(size, 512), lambda: node.read(-1, 1)):
        try:
            await bad()
        except BlockIOError:
            pass
        else:
            raise BatteryFailure("an out-of-range request succeeded")

    for _ in range(rounds):
        op = rng.choice(("write", "write", "unaligned", "zero", "zero_unmap", "discard",
                         "flush", "fua", "read"))
        length = rng.randint(1, min(max_len, limit))
        if op in ("write", "fua", "zero", "zero_unmap", "discard"):
            # mostly sector/cluster-aligned requests, as guests and jobs send them
            length = max(512, length - length % 512)
            length = min(length, limit)
        offset = rng.randint(0, limit - length)
        if op != "unaligned":
            offset -= offset % 512
        if op in ("write", "unaligned", "fua"):
            buf = rng.randbytes(length)
            await node.write(offset, buf, fua=op == "fua")
            model.write(offset, buf)
        elif op in ("zero", "zero_unmap"):
            await node.write_zeroes(offset, length, may_unmap=op == "zero_unmap")
            model.write(offset, bytes(length))
        elif op == "discard":
            await node.discard(offset, length)
            model.forget(offset, length)
        elif op == "flush":
            await node.flush()
        await _verify(node, model, offset, length, stores_data)
        # and a random window, to catch writes that leaked outside their range
        wlen = rng.randint(1, min(max_len, limit))
        woff = rng.randint(0, limit - wlen)
        await _verify(node, model, woff, wlen, stores_data)

    # concurrent requests on disjoint ranges, some unaligned, interleaved with zeroing
    slots = max(1, min(16, limit // 8192))
    width = limit // slots

    async def one(i: int) -> None:
        base = i * width
        n = rng.randint(1, width)
        off = base + rng.randint(0, width - n)
        if i % 4 == 3:
            off -= off % 512
            n = max(512, n - n % 512) if off + 512 <= base + width else n
            n = min(n, base + width - off)
            await node.write_zeroes(off, n, may_unmap=bool(i % 2))
            model.write(off, bytes(n))
        else:
            buf = rng.randbytes(n)
            await node.write(off, buf)
            model.write(off, buf)

    await asyncio.gather(*(one(i) for i in range(slots)))
    await node.flush()
    await _verify(node, model, 0, limit, stores_data)
    await check_block_status(node, model, limit)
    await node.drain()
    _check(node.in_flight == 0, "requests still in flight after drain")


# --- a reference driver for tests of the generic path ----------------------------------------


class MemDriver(BlockDriver):
    """RAM-backed; asserts every request is aligned and within max_transfer."""

    format_name = "mem-test"

    def __init__(self, node: BlockNode, size: int, align: int, max_transfer: int,
                 zeroes: bool = True) -> None:
        super().__init__(node)
        self.buf = bytearray(size)
        self.request_alignment = align
        self.max_transfer = max_transfer
        self.zeroes = zeroes
        self.calls: list[tuple[str, int, int]] = []

    def _req(self, kind: str, offset: int, length: int, split: bool = True) -> None:
        assert offset % self.request_alignment == 0, (kind, offset)
        # only the last block of a node whose size is not aligned may be partial
        assert length % self.request_alignment == 0 or offset + length == len(self.buf), (
            kind, length)
        if split:
            assert length <= self.max_transfer, (kind, length)
        self.calls.append((kind, offset, length))

    def length(self) -> int:
        return len(self.buf)

    async def preadv(self, offset: int, length: int) -> bytes:
        self._req("read", offset, length)
        await asyncio.sleep(0)
        return bytes(self.buf[offset : offset + length])

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        self._req("write", offset, len(data))
        await asyncio.sleep(0)
        self.buf[offset : offset + len(data)] = data

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        if not self.zeroes:
            raise BlockIOError(errno.ENOTSUP)
        self._req("zero", offset, length, split=False)
        self.buf[offset : offset + length] = bytes(length)

    async def pdiscard(self, offset: int, length: int) -> None:
        self._req("discard", offset, length, split=False)
        self.buf[offset : offset + length] = bytes(length)

    async def block_status(self, offset: int, length: int) -> Extent:
        return Extent(length, BlockStatus.DATA, map_offset=offset)


def mem_node(size: int = 1 << 20, align: int = 4096, max_transfer: int = 64 * 1024,
             **kw: object) -> tuple[BlockNode, MemDriver]:
    node = BlockNode(name="m", discard_unmap=True)
    drv = MemDriver(node, size, align, max_transfer, **kw)  # type: ignore[arg-type]
    node.driver = drv
    return node, drv


__all__ = ["BatteryFailure", "MemDriver", "Model", "check_block_status", "mem_node",
           "run_battery"]
