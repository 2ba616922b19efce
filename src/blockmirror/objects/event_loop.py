"""``iothread`` and ``main-loop`` objects (cf. iothread.c, util/main-loop.c).

blockmirror runs everything in one asyncio loop, so these objects only hold their properties
(with QEMU's defaults) for qom-get/qom-set and for the stacks that create them anyway.
"""

from __future__ import annotations

from typing import Any

from blockmirror.errors import BlockMirrorError
from blockmirror.objects.registry import ObjectRegistry, UserObject

_BASE = {"thread-pool-min": 0, "aio-max-batch": 0, "thread-pool-max": 64}


class EventLoopBase(UserObject):
    qom_parent = "event-loop-base"
    defaults: dict[str, int] = _BASE
    settable = dict.fromkeys(_BASE, "int")

    def __init__(self, oid: str, props: dict[str, Any]) -> None:
        super().__init__(oid)
        self.values = {**self.defaults, **{k: int(v) for k, v in props.items()}}

    def set_property(self, name: str, value: Any) -> None:
        self.values[name] = int(value)

    def properties(self) -> dict[str, tuple[str, Any]]:
        return {k: ("int", v) for k, v in self.values.items()}


_IOTHREAD = {**_BASE, "poll-max-ns": 32768, "poll-grow": 0, "poll-shrink": 0}


class IOThread(EventLoopBase):
    qom_type = "iothread"
    defaults = _IOTHREAD
    settable = dict.fromkeys(_IOTHREAD, "int")


class MainLoop(EventLoopBase):
    qom_type = "main-loop"

    def __init__(self, oid: str, props: dict[str, Any], registry: ObjectRegistry) -> None:
        if any(isinstance(o, MainLoop) for o in registry):
            raise BlockMirrorError("only one main-loop instance allowed")
        super().__init__(oid, props)


__all__ = ["IOThread", "MainLoop"]
