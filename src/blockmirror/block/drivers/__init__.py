"""Driver registry: driver name (as QMP spells it) -> driver class.

Driver modules register themselves with ``@register``; ``load_all()`` imports every module so
the registry is complete before options are parsed.
"""

from __future__ import annotations

import importlib

from blockmirror.block.driver import BlockDriver

DRIVERS: dict[str, type[BlockDriver]] = {}

_MODULES = (
    "file",
    "raw",
    "null",
    "blkdebug",
    "qcow2",
    "nbd",
    "mirror_top",
)


def register(cls: type[BlockDriver]) -> type[BlockDriver]:
    DRIVERS[cls.format_name] = cls
    return cls


def load_all() -> dict[str, type[BlockDriver]]:
    for mod in _MODULES:
        try:
            importlib.import_module(f"blockmirror.block.drivers.{mod}")
        except ModuleNotFoundError as e:
            # a driver module that does not exist yet; any other import error is a bug
            if e.name != f"blockmirror.block.drivers.{mod}":
                raise
    return DRIVERS
