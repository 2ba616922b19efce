"""Property: through the generic request path, any driver alignment looks like a byte array."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from conformance import mem_node


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["w", "z", "d"]), st.integers(0, 65535),
                  st.integers(1, 20000)),
        min_size=1, max_size=12,
    ),
    align=st.sampled_from([1, 512, 4096]),
    size=st.sampled_from([96 * 1024, 96 * 1024 + 1536]),
)
def test_property_any_alignment_matches_model(ops: list[tuple[str, int, int]],
                                              align: int, size: int) -> None:
    """Whatever the driver's alignment (even beyond a partial last block), the node behaves
    like a plain byte array."""
    node, drv = mem_node(size=size, align=align, max_transfer=16 * 1024)
    model = bytearray(size)

    async def main() -> None:
        for i, (kind, offset, length) in enumerate(ops):
            offset = min(offset, size - 1)
            length = min(length, size - offset)
            if kind == "w":
                data = bytes([(i % 250) + 1]) * length
                await node.write(offset, data)
                model[offset : offset + length] = data
            elif kind == "z":
                await node.write_zeroes(offset, length)
                model[offset : offset + length] = bytes(length)
            else:
                # discard may drop whole aligned blocks inside the range: read back and adopt
                await node.discard(offset, length)
                model[offset : offset + length] = drv.buf[offset : offset + length]
        assert await node.read(0, size) == bytes(model)

    asyncio.run(main())
