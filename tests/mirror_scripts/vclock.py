"""The virtual clock of the mirror tests is the package's own (``blockmirror.clock``)."""

from blockmirror.clock import VirtualClock

__all__ = ["VirtualClock"]
