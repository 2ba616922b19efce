"""blockmirror: live block-device mirroring controlled over QMP, compatible with QEMU.

Layers, lowest first (tests/unit/test_import_layers.py enforces the order): ``errors``,
``events``, ``objects`` and the clock; ``qapi`` (the schema); ``nbd`` (sans-IO codec);
``block`` (node graph and drivers); ``jobs`` (job state machine and the mirror); ``export``
(NBD server); ``qmp`` (wire protocol, server, command handlers); ``daemon``; ``cli``.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# The QEMU release whose QMP behaviour we reproduce; reported by query-version and the greeting.
QEMU_COMPAT_VERSION = (7, 2, 22)
QEMU_COMPAT_PACKAGE = f"blockmirror {__version__}"

logging.getLogger("blockmirror").addHandler(logging.NullHandler())

__all__ = ["QEMU_COMPAT_PACKAGE", "QEMU_COMPAT_VERSION", "__version__"]
