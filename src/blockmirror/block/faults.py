"""Fault rules: errors and delays injected into any node's requests at run time.

A ``FaultRule`` sits in ``BlockNode.fault_rules``; the generic request path (``block/io.py``)
calls ``check()`` once per request, only when the node has rules. A rule matches one kind of
request (read, write, zero, discard, flush, block-status) overlapping an optional byte range;
it fires on the nth match (and, unless ``once``, every match after), or with a probability
drawn from its own seeded generator, so a run is repeatable. Firing tells the rule's
``notify`` (the daemon's event bus: ``X_FAULT_INJECTED``), waits ``delay_ns`` on the rule's
clock (virtual time when the daemon runs one), then fails the request with ``errno`` if set.

blkdebug (``drivers/blkdebug.py``) stays as QEMU's configuration-time way to do this; these
rules are its run-time superset, driven by the ``x-fault-*`` QMP commands
(qmp/commands/testkit.py). A failed request raises the same ``BlockIOError`` a blkdebug rule
or a real disk would, so jobs and exports react exactly as they would to those.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockmirror.errors import BlockIOError
from blockmirror.qapi.testkit import XFaultErrno, XFaultOperation

if TYPE_CHECKING:
    import random

    from blockmirror.block.node import BlockNode
    from blockmirror.clock import Clock

#: request kinds, as the QMP commands name them (the schema's XFaultOperation)
OPERATIONS = tuple(op.value for op in XFaultOperation)

#: errno names a rule may inject (the schema's XFaultErrno)
ERRNOS: dict[str, int] = {e.value: getattr(_errno, e.value) for e in XFaultErrno}
ERRNO_NAMES = {v: k for k, v in ERRNOS.items()}


@dataclass(eq=False)
class FaultRule:
    """One injected fault (x-fault-add): which requests of a node it hits, when, and how."""

    id: str
    node_name: str
    operation: str
    #: the range a request must overlap; ``length`` None: to the end of the node
    offset: int = 0
    length: int | None = None
    #: fire from the nth matching request on (1-based); None: from the first
    nth: int | None = None
    #: fire with this probability (after ``nth``), drawn from a generator seeded with ``seed``
    probability: float | None = None
    seed: int = 0
    #: the error to fail the request with; None: delay only
    errno: int | None = _errno.EIO
    delay_ns: int = 0
    #: remove the rule after it fired once
    once: bool = False
    clock: Clock | None = None
    notify: Callable[[FaultRule, str, int, int], None] | None = None
    matched: int = 0
    fired: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import random  # here: only fault rules need it, every daemon start would pay (issue 10)

        self._rng = random.Random(self.seed)

    def overlaps(self, offset: int, length: int) -> bool:
        if self.operation == "flush":
            return True  # a flush has no range
        end = None if self.length is None else self.offset + self.length
        return offset + max(length, 1) > self.offset and (end is None or offset < end)

    def decide(self) -> bool:
        """Count one matching request; True if the rule fires on it."""
        self.matched += 1
        if self.nth is not None and self.matched < self.nth:
            return False
        return self.probability is None or self._rng.random() < self.probability

    def describe(self) -> dict[str, Any]:
        """The rule as x-query-faults reports it."""
        out: dict[str, Any] = {"id": self.id, "node-name": self.node_name,
                               "operation": self.operation, "offset": self.offset,
                               "once": self.once, "delay-ns": self.delay_ns,
                               "matched": self.matched, "fired": self.fired}
        if self.length is not None:
            out["length"] = self.length
        if self.nth is not None:
            out["nth"] = self.nth
        if self.probability is not None:
            out["probability"] = self.probability
            out["seed"] = self.seed
        if self.errno is not None:
            out["errno"] = ERRNO_NAMES.get(self.errno, str(self.errno))
        return out


class _Watching:
    """A pass-through write interceptor, present while a node has rules. Shortcuts that move
    bytes around the request path (the mirror's copy_file_range offload) stand back from
    nodes with interceptors; this keeps them off nodes whose requests a rule must see."""

    async def around_write(self, node: BlockNode, kind: str, offset: int, length: int,
                           proceed: Any) -> None:
        await proceed()


_WATCHING = _Watching()


def add_rule(node: BlockNode, rule: FaultRule) -> None:
    node.fault_rules.append(rule)
    if _WATCHING not in node.interceptors:
        node.interceptors.append(_WATCHING)


def remove_rule(node: BlockNode, rule: FaultRule) -> None:
    if rule in node.fault_rules:
        node.fault_rules.remove(rule)
    if not node.fault_rules and _WATCHING in node.interceptors:
        node.interceptors.remove(_WATCHING)


async def check(node: BlockNode, operation: str, offset: int, length: int) -> None:
    """Apply the node's rules to one request: maybe wait, maybe fail it (BlockIOError)."""
    for rule in list(node.fault_rules):
        if rule.operation != operation or not rule.overlaps(offset, length):
            continue
        if not rule.decide():
            continue
        rule.fired += 1
        if rule.once:
            remove_rule(node, rule)
        if rule.notify is not None:
            rule.notify(rule, operation, offset, length)
        if rule.delay_ns > 0 and rule.clock is not None:
            await rule.clock.sleep_ns(rule.delay_ns)
        if rule.errno is not None:
            raise BlockIOError(rule.errno)


__all__ = ["ERRNOS", "ERRNO_NAMES", "OPERATIONS", "FaultRule", "add_rule", "check",
           "remove_rule"]
