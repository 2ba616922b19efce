"""Re-export of ``blockmirror.clock`` (the clock moved to the lowest layer); kept so that
existing imports keep working until they switch to ``blockmirror.clock``."""

from blockmirror.clock import Clock, MonotonicClock, VirtualClock, wall_timestamp

__all__ = ["Clock", "MonotonicClock", "VirtualClock", "wall_timestamp"]
