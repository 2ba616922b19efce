"""Checks of what blockmirror emits against the schema: event data and command returns.

QEMU generates its event emitters and return marshallers from the schema, so what it sends
always matches; ours are written by hand, so the test suite runs every emitted event and every
command result through these checks (see tests/conftest.py and ``EventBus(check=...)``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from blockmirror.qapi.schema import COMMANDS, EVENTS
from blockmirror.qapi.validate import SchemaError, validate, validate_members

log = logging.getLogger(__name__)

#: set to "1" (the test suite does, for in-process and spawned daemons) to run the checks
ENV_SWITCH = "BLOCKMIRROR_SCHEMA_CHECKS"
#: a file every violation is also appended to (spawned daemons report through it)
ENV_LOG = "BLOCKMIRROR_SCHEMA_VIOLATIONS"
#: every violation seen in this process, for the test suite's per-test assertion
VIOLATIONS: list[str] = []


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH) == "1"


def forget() -> None:
    """Drop the violations recorded so far (for tests that provoke them on purpose)."""
    VIOLATIONS.clear()
    path = os.environ.get(ENV_LOG)
    if path:
        with open(path, "w", encoding="utf-8"):
            pass


class SchemaViolation(AssertionError):
    """Something blockmirror emitted does not match its declaration (a bug of ours)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        VIOLATIONS.append(text)
        path = os.environ.get(ENV_LOG)
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text.replace("\n", " ") + "\n")


def check_event(name: str, data: dict[str, Any]) -> None:
    """Raise SchemaViolation unless ``name`` is declared and ``data`` matches its members."""
    decl = EVENTS.get(name)
    if decl is None:
        raise SchemaViolation(f"event {name} is not declared in the schema")
    try:
        validate_members(decl.data, data)
    except SchemaError as e:
        raise SchemaViolation(f"event {name}: {e.desc}: {data!r}") from None


def report_event(name: str, data: dict[str, Any]) -> None:
    """``check_event`` for an EventBus: a violation is recorded (and logged), not raised,
    so that a job emitting a bad event still finishes and the test reports the violation."""
    try:
        check_event(name, data)
    except SchemaViolation as e:
        log.error("schema violation: %s", e)


def check_return(command: str, value: Any) -> None:
    """Raise SchemaViolation unless ``value`` matches ``command``'s declared return type
    (no declared type: the reply must be ``{}``, which a None result becomes)."""
    decl = COMMANDS[command]
    if decl.returns is None:
        if value not in (None, {}):
            raise SchemaViolation(f"{command} returns {value!r} but declares nothing")
        return
    try:
        validate(decl.returns, value, None, "return")
    except SchemaError as e:
        raise SchemaViolation(f"{command} return value: {e.desc}") from None


__all__ = ["ENV_SWITCH", "VIOLATIONS", "SchemaViolation", "check_event", "check_return",
           "enabled", "forget", "report_event"]
