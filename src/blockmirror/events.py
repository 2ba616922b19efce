"""The event bus: layers emit QMP events here; every QMP server subscribes.

An event is ``(name, data)``; the timestamp is added by the bus so that all monitors see the
same one. Subscribers are plain callables and must not block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blockmirror.clock import wall_timestamp

Event = dict[str, Any]
Subscriber = Callable[[Event], None]
#: checks an event's name and data before it goes out (the test suite passes the schema's)
EventCheck = Callable[[str, dict[str, Any]], None]


class EventBus:
    def __init__(self, check: EventCheck | None = None) -> None:
        self._subscribers: list[Subscriber] = []
        self._check = check
        #: every event emitted, for tests and the CLI's progress display (bounded)
        self.history: list[Event] = []
        self.history_limit = 1000  # a long-running daemon keeps 1000 events, not 10000 (RSS)

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        self._subscribers.append(fn)

        def unsubscribe() -> None:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

        return unsubscribe

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        if self._check is not None:
            self._check(name, data if data is not None else {})
        event: Event = {"event": name, "data": data if data is not None else {},
                        "timestamp": wall_timestamp()}
        self.history.append(event)
        if len(self.history) > self.history_limit:
            del self.history[: len(self.history) // 2]
        for fn in list(self._subscribers):
            fn(event)
        return event
