"""The schema is the single source: enums, handlers, emitted events, results and the docs.

- every StrEnum the code uses for a schema enum is the schema's own (declared once, with
  ``qapi_enum``), and no other StrEnum of the same name exists;
- every declared command has exactly one handler, and every handler a declaration;
- every event name the code emits is declared, and the suite-wide checks (tests/conftest.py)
  really reject bad event data and bad command results;
- docs/qmp.md's command reference is what the schema generates.
"""

from __future__ import annotations

import ast
import asyncio
import re
from enum import StrEnum
from pathlib import Path

import pytest

from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import check_options
from blockmirror.daemon import Daemon
from blockmirror.jobs import status
from blockmirror.qapi import COMMANDS, ENUM_CLASSES, EVENTS, TYPES, checks, doc, enum_values
from blockmirror.qapi.schema import EnumType
from blockmirror.qmp.registry import COMMANDS as HANDLERS
from blockmirror.qmp.registry import load_commands
from conftest import ROOT

SRC = ROOT / "src" / "blockmirror"


def test_enum_classes_are_the_schema_enums() -> None:
    assert {"JobStatus", "JobVerb", "MirrorCopyMode", "QMPCapability"} <= set(ENUM_CLASSES)
    for name, cls in ENUM_CLASSES.items():
        assert [m.value for m in cls] == list(enum_values(name)), name
    # the job core's tables use the schema's classes themselves
    assert status.JobStatus is ENUM_CLASSES["JobStatus"]
    assert status.JobVerb is ENUM_CLASSES["JobVerb"]


def test_no_second_declaration_of_a_schema_enum() -> None:
    """A StrEnum or enum() call named like a schema enum anywhere else would be a copy."""
    copies = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name in TYPES:
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                decorators = {getattr(d, "id", "") for d in node.decorator_list}
                if "StrEnum" in bases and "qapi_enum" not in decorators:
                    copies.append(f"{path}: class {node.name}")
    assert not copies, copies
    assert all(isinstance(TYPES[n], EnumType) for n in ENUM_CLASSES)


def test_every_command_has_one_handler() -> None:
    load_commands()
    assert list(HANDLERS) == list(COMMANDS)
    for name, cmd in HANDLERS.items():
        assert cmd.args == COMMANDS[name].args and cmd.returns == COMMANDS[name].returns


def test_emitted_event_names_are_declared() -> None:
    """Every ``.emit("NAME", ...)`` in the code names a declared event."""
    names = set()
    for path in SRC.rglob("*.py"):
        names |= set(re.findall(r'\.emit\(\s*"([A-Z_]+)"', path.read_text()))
    assert names, "no emitter found: the pattern is out of date"
    assert names <= set(EVENTS), names - set(EVENTS)


def test_event_check_rejects_bad_data() -> None:
    checks.check_event("BLOCK_EXPORT_DELETED", {"id": "e0"})
    with pytest.raises(checks.SchemaViolation, match="not declared"):
        checks.check_event("NO_SUCH_EVENT", {})
    with pytest.raises(checks.SchemaViolation, match="'status' does not accept value 'x'"):
        checks.check_event("JOB_STATUS_CHANGE", {"id": "j", "status": "x"})
    with pytest.raises(checks.SchemaViolation, match="'len' is missing"):
        checks.check_event("BLOCK_JOB_READY", {"type": "mirror", "device": "d", "offset": 0,
                                               "speed": 0})
    checks.forget()  # expected ones: not this test's failure


def test_daemon_event_bus_checks_under_the_test_suite() -> None:
    """The suite switches the checks on, so a Daemon's bus reports a bad event."""
    assert checks.enabled()
    d = Daemon()
    d.events.emit("BLOCK_EXPORT_DELETED", {"id": "e0"})
    assert checks.VIOLATIONS == []
    d.events.emit("BLOCK_EXPORT_DELETED", {"id": 5})
    assert len(checks.VIOLATIONS) == 1 and "expected: string" in checks.VIOLATIONS[0]
    checks.forget()
    asyncio.run(d.shutdown())


def test_return_check_rejects_bad_results() -> None:
    checks.check_return("query-version", {"qemu": {"major": 7, "minor": 2, "micro": 22},
                                          "package": "p"})
    checks.check_return("quit", None)
    with pytest.raises(checks.SchemaViolation, match=r"'return\.package' is missing"):
        checks.check_return("query-version", {"qemu": {"major": 7, "minor": 2, "micro": 0}})
    with pytest.raises(checks.SchemaViolation, match="declares nothing"):
        checks.check_return("quit", {"x": 1})
    with pytest.raises(checks.SchemaViolation, match="expected: array"):
        checks.check_return("query-block-exports", {})
    checks.forget()


def test_docs_reference_is_current() -> None:
    path = ROOT / "docs" / "qmp.md"
    text = path.read_text()
    assert doc.render(text) == text, "docs/qmp.md is stale: python -m blockmirror.qapi.doc " \
        "docs/qmp.md"
    for name in COMMANDS:
        assert f"| `{name}` |" in text


def test_docs_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    path = ROOT / "docs" / "qmp.md"
    stale = path.read_text().replace("| `quit` |", "| `quit-old` |")
    target = tmp_path / "qmp.md"
    target.write_text(stale)
    assert doc.main(["--check", str(target)]) == 1
    assert doc.main([str(target)]) == 0
    assert doc.main(["--check", str(target)]) == 0


def test_strenum_subclass_used() -> None:
    for cls in ENUM_CLASSES.values():
        assert issubclass(cls, StrEnum)


def test_block_layer_reads_strings_the_keyval_way() -> None:
    """open_blockdev's raw options convert strings as QEMU does ("y", leading-0 octal)."""
    got = check_options({"driver": "null-co", "node-name": "n", "size": "010",
                         "read-only": "y", "cache.direct": "off", "latency-ns": "0x10"})
    assert got == {"driver": "null-co", "node-name": "n", "size": 8, "read-only": True,
                   "cache": {"direct": False}, "latency-ns": 16}
    assert list(got) == ["driver", "node-name", "size", "read-only", "cache", "latency-ns"]
    assert BlockGraph().objects.get("x") is None
