"""block-set-write-threshold (cf. block/write-threshold.c).

A node's ``write_threshold`` (0: off) is checked before every write, zero-write and discard
reaches its driver: the first request ending past it emits BLOCK_WRITE_THRESHOLD with the
amount exceeded, and the threshold goes back to 0. The check is a write interceptor, so the
request path needs nothing of its own; the event goes out through the ``emit`` callable the
interceptor was built with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blockmirror.block.node import BlockNode

Emit = Callable[[str, dict[str, Any]], Any]

_UINT64 = (1 << 64) - 1


class ThresholdWatch:
    """The interceptor installed on a node while its threshold is set."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit

    async def around_write(self, node: BlockNode, kind: str, offset: int, length: int,
                           proceed: Any) -> None:
        threshold = node.write_threshold
        end = offset + length
        # a discard the node ignores (discard=ignore) never becomes a request in QEMU
        real = kind != "discard" or node.discard_unmap
        if threshold and real and end > threshold:
            node.write_threshold = 0
            _unwatch(node)
            self.emit("BLOCK_WRITE_THRESHOLD", {"node-name": node.name,
                                                "amount-exceeded": end - threshold,
                                                "write-threshold": threshold})
        await proceed()


def _unwatch(node: BlockNode) -> None:
    node.interceptors[:] = [i for i in node.interceptors if not isinstance(i, ThresholdWatch)]


def set_write_threshold(node: BlockNode, threshold: int, emit: Emit) -> None:
    """Set (or with 0, clear) the node's threshold; QEMU takes it as a uint64."""
    node.write_threshold = threshold & _UINT64
    _unwatch(node)
    if node.write_threshold:
        node.interceptors.append(ThresholdWatch(emit))


__all__ = ["ThresholdWatch", "set_write_threshold"]
