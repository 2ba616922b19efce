"""The qcow2 format: driver (``driver.py``), image creation (``create.py``) and their helpers.

Importing the package registers ``Qcow2Driver`` under the QMP driver name "qcow2".
"""

from __future__ import annotations

from blockmirror.block.drivers import register
from blockmirror.block.drivers.qcow2.create import create_qcow2
from blockmirror.block.drivers.qcow2.driver import Qcow2Driver

register(Qcow2Driver)

__all__ = ["Qcow2Driver", "create_qcow2"]
