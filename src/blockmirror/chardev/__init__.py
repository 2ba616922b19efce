"""Character devices: the ``--chardev`` and chardev-add backends and their registry.

A layer beside export/ (it opens sockets and files, like the NBD server): it uses errors,
objects (TLS credentials) and nothing above; the QMP commands and the command line use it.
"""

from __future__ import annotations

from blockmirror.chardev.backends import Chardev, RingbufChardev, SocketChardev, StdioChardev
from blockmirror.chardev.registry import BACKENDS, ChardevRegistry

__all__ = ["BACKENDS", "Chardev", "ChardevRegistry", "RingbufChardev", "SocketChardev",
           "StdioChardev"]
