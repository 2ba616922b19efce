"""Driver registry: driver name (as QMP spells it) -> driver class.

Driver modules register themselves with ``@register``; ``load_all()`` imports every module so
the registry is complete before options are parsed.
"""

from __future__ import annotations

import importlib
import logging

from blockmirror.block.driver import BlockDriver

log = logging.getLogger(__name__)

DRIVERS: dict[str, type[BlockDriver]] = {}

_MODULES = (
    "file",
    "raw",
    "null",
    "blkdebug",
    "qcow2",
    "nbd",
    "mirror_top",
    "throttle",
    "rbd",
)


def register(cls: type[BlockDriver]) -> type[BlockDriver]:
    DRIVERS[cls.format_name] = cls
    return cls


#: driver modules that failed to import: module -> error text (a bug, logged once)
BROKEN: dict[str, str] = {}


def load_all() -> dict[str, type[BlockDriver]]:
    for mod in _MODULES:
        if mod in BROKEN:
            continue
        try:
            importlib.import_module(f"blockmirror.block.drivers.{mod}")
        except ModuleNotFoundError as e:
            # a driver module that does not exist yet
            if e.name != f"blockmirror.block.drivers.{mod}":
                _broken(mod, e)
        except ImportError as e:
            # one broken driver must not take every other driver down with it: its name is
            # then simply unknown (and the bug is in the log)
            _broken(mod, e)
    return DRIVERS


def _broken(mod: str, err: ImportError) -> None:
    BROKEN[mod] = f"{type(err).__name__}: {err}"
    log.error("block driver module %r cannot be imported: %s", mod, err, exc_info=err)
