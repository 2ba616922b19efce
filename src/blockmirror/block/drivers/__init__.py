"""Driver registry: driver name (as QMP spells it) -> driver class.

Driver modules register themselves with ``@register``. ``load(name)`` imports only the module
that implements ``name`` (a daemon opening two raw files never imports qcow2 or rbd: start-up
CPU, issue 10); ``load_all()`` imports every module, for the callers that need the whole table.
"""

from __future__ import annotations

import importlib
import logging

from blockmirror.block.driver import BlockDriver

log = logging.getLogger(__name__)

DRIVERS: dict[str, type[BlockDriver]] = {}

#: driver name -> the module (in this package) that registers it; load_all() imports them all
_MODULE_OF = {
    "file": "file",
    "host_device": "file",
    "raw": "raw",
    "null-co": "null",
    "null-aio": "null",
    "blkdebug": "blkdebug",
    "qcow2": "qcow2",
    "nbd": "nbd",
    "mirror_top": "mirror_top",
    "throttle": "throttle",
    "rbd": "rbd",
}
_MODULES = tuple(dict.fromkeys(_MODULE_OF.values()))


def register(cls: type[BlockDriver]) -> type[BlockDriver]:
    DRIVERS[cls.format_name] = cls
    return cls


#: driver modules that failed to import: module -> error text (a bug, logged once)
BROKEN: dict[str, str] = {}


def load(name: str) -> type[BlockDriver] | None:
    """The driver class called ``name``, its module imported on first use; None if
    blockmirror has no such driver (or its module is broken)."""
    cls = DRIVERS.get(name)
    if cls is None:
        mod = _MODULE_OF.get(name)
        if mod is not None:
            _import(mod)
        else:
            load_all()  # a name this table does not know: look everywhere, as before
        cls = DRIVERS.get(name)
    return cls


def load_all() -> dict[str, type[BlockDriver]]:
    for mod in _MODULES:
        _import(mod)
    return DRIVERS


def _import(mod: str) -> None:
    if mod in BROKEN:
        return
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


def _broken(mod: str, err: ImportError) -> None:
    BROKEN[mod] = f"{type(err).__name__}: {err}"
    log.error("block driver module %r cannot be imported: %s", mod, err, exc_info=err)
