"""Unit tests of schema validation (QEMU's visitor texts), keyval mode and introspection."""

from __future__ import annotations

from typing import Any

import pytest

from blockmirror.qapi import COMMANDS, EVENTS, SchemaError, validate, validate_command_args
from blockmirror.qapi.introspect import introspect
from blockmirror.qmp.registry import load_commands

load_commands()


def check(spec: Any, args: dict[str, Any]) -> str:
    with pytest.raises(SchemaError) as e:
        validate_command_args(spec, args)
    return e.value.desc


def test_blockdev_options_texts() -> None:
    ba = "BlockdevOptions"
    assert check(ba, {"node-name": "a"}) == "Parameter 'driver' is missing"
    assert check(ba, {"driver": "zzz"}) == "Parameter 'driver' does not accept value 'zzz'"
    assert check(ba, {"driver": "qcow2", "file": 5}) == \
        "Invalid parameter type for 'file', expected: BlockdevRef"
    assert check(ba, {"driver": "qcow2", "file": {"driver": "file"}}) == \
        "Parameter 'file.filename' is missing"
    assert check(ba, {"driver": "file", "filename": "x", "cache": {"direct": 1}}) == \
        "Invalid parameter type for 'cache.direct', expected: boolean"
    assert check(ba, {"driver": "blkdebug", "image": "x",
                      "inject-error": [{"event": "read_aio", "errno": "x"}]}) == \
        "Invalid parameter type for 'inject-error[0].errno', expected: integer"
    assert check(ba, {"driver": "blkdebug", "image": "x", "inject-error": [{"event": "b"}]}) == \
        "Parameter 'event' does not accept value 'b'"
    assert check(ba, {"driver": "blkdebug", "image": "x", "max-transfer": 1 << 32}) == \
        "Parameter 'max-transfer' expects int32_t"
    assert check(ba, {"driver": "nbd", "server": {"type": "unix"}}) == \
        "Parameter 'server.path' is missing"
    assert check(ba, {"driver": "null-co", "size": 1.5}) == \
        "Invalid parameter type for 'size', expected: integer"
    assert check(ba, {"driver": "null-co", "bogus": 1}) == "Parameter 'bogus' is unexpected"
    ok = validate_command_args(ba, {"driver": "qcow2", "node-name": "q",
                                    "file": {"driver": "file", "filename": "/x"},
                                    "backing": None})
    assert ok["backing"] is None and ok["file"] == {"driver": "file", "filename": "/x"}


def test_integer_kinds() -> None:
    assert validate("uint64", -1) == (1 << 64) - 1  # QEMU wraps negative numbers
    with pytest.raises(SchemaError, match="expects uint32_t"):
        validate("uint32", 1 << 32, "granularity", "granularity")
    with pytest.raises(SchemaError, match="expected: integer"):
        validate("int", 1 << 63, "x", "x")
    with pytest.raises(SchemaError, match="expected: integer"):
        validate("int", True, "x", "x")
    assert validate("number", 3) == 3


def test_keyval_mode() -> None:
    opts = {"driver": "null-co", "node-name": "n", "size": "0x100", "read-only": "on",
            "cache": {"direct": "off"}}
    out = validate("BlockdevOptions", opts, keyval=True)
    assert isinstance(out, dict)
    assert out["size"] == 256 and out["read-only"] is True
    with pytest.raises(SchemaError, match="Parameter 'size' expects integer"):
        validate("BlockdevOptions", {"driver": "null-co", "size": "1k"}, keyval=True)
    with pytest.raises(SchemaError, match=r"Parameter 'cache\.direct' expects 'on' or 'off'"):
        validate("BlockdevOptions", {"driver": "null-co", "cache": {"direct": "x"}},
                 keyval=True)


def test_introspection_shape() -> None:
    infos = introspect(COMMANDS.values(), EVENTS.values())
    by_name = {i["name"]: i for i in infos}
    assert by_name["0"] == {"name": "0", "members": [], "meta-type": "object"}
    assert by_name["query-version"]["arg-type"] == "0"
    ba = by_name[str(by_name["blockdev-add"]["arg-type"])]
    assert ba["tag"] == "driver" and ba["meta-type"] == "object"
    assert {v["case"] for v in ba["variants"]} >= {"file", "qcow2", "raw", "null-co"}
    referenced = {m["type"] for i in infos for m in i.get("members", []) if "type" in m}
    assert referenced <= set(by_name), referenced - set(by_name)
    assert by_name["str"] == {"name": "str", "json-type": "string", "meta-type": "builtin"}
