"""The qcow2 format: driver (``driver.py``), image creation (``create.py``) and their helpers.

Importing the package registers ``Qcow2Driver`` under the QMP driver name "qcow2". Image
creation is imported from ``create.py`` by whoever creates images: a daemon that only opens
them does without it (start-up CPU, issue 10).
"""

from __future__ import annotations

from blockmirror.block.drivers import register
from blockmirror.block.drivers.qcow2.driver import Qcow2Driver

register(Qcow2Driver)

__all__ = ["Qcow2Driver"]
