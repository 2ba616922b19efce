"""Unit tests of the sans-IO QMP session (qmp/session.py): envelope checks, id echo, modes."""

from __future__ import annotations

import json
from typing import Any

from blockmirror.qmp.registry import load_commands
from blockmirror.qmp.session import Execute, Mode, QMPSession, Reply


def session(negotiated: bool = False, oob: bool = False) -> QMPSession:
    s = QMPSession(load_commands())
    if negotiated:
        args = b',"arguments":{"enable":["oob"]}' if oob else b""
        s.receive_data(b'{"execute":"qmp_capabilities"' + args + b"}")
        req = s.next_request()
        assert isinstance(req, Reply) and req.data == b'{"return": {}}\r\n'
    return s


def replies(s: QMPSession, data: bytes) -> list[Any]:
    s.receive_data(data)
    out: list[Any] = []
    while (req := s.next_request()) is not None:
        if isinstance(req, Reply):
            assert req.data.endswith(b"\r\n")
            out.append(json.loads(req.data))
        else:
            out.append(req)
    return out


def err(desc: str, cls: str = "GenericError", **id_: Any) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}, **id_}


def test_greeting() -> None:
    g = json.loads(QMPSession({}).greeting())
    assert g["QMP"]["capabilities"] == ["oob"]
    assert set(g["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
    assert json.loads(QMPSession({}, oob_offered=False).greeting())["QMP"]["capabilities"] == []


def test_negotiation_mode() -> None:
    s = session()
    hint = "Expecting capabilities negotiation with 'qmp_capabilities'"
    assert replies(s, b'{"execute":"query-version","id":1}') == [
        err(hint, "CommandNotFound", id=1)]
    assert replies(s, b'{"execute":"nope"}') == [err(hint, "CommandNotFound")]
    assert replies(s, b'{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}') == [
        err("Parameter 'null' does not accept value 'foo'")]
    assert s.mode is Mode.NEGOTIATION
    assert s.event({"event": "X", "data": {}, "timestamp": {}}) is None
    assert replies(s, b'{"execute":"qmp_capabilities","id":"c"}') == [{"return": {}, "id": "c"}]
    assert s.mode is Mode.COMMAND
    assert replies(s, b'{"execute":"qmp_capabilities"}') == [err(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound")]
    assert s.event({"event": "X", "data": {}, "timestamp": {"seconds": 1}}) is not None


def test_envelope_errors_and_id_echo() -> None:
    s = session(negotiated=True)
    cases = [
        (b'{"execute": }', err("JSON parse error, expecting value")),
        (b"[1]", err("QMP input must be a JSON object")),
        (b'{"execute":"query-version","foo":1,"id":3}',
         err("QMP input member 'foo' is unexpected", id=3)),
        (b'{"execute":5,"id":4}', err("QMP input member 'execute' must be a string", id=4)),
        (b'{"id":5}', err("QMP input lacks member 'execute'", id=5)),
        (b'{"execute":"query-version","arguments":[],"id":null}',
         err("QMP input member 'arguments' must be an object", id=None)),
        (b'{"exec-oob":"query-version","id":6}',
         err("QMP input member 'exec-oob' is unexpected", id=6)),
        (b'{"execute":"no-such","id":{"a":[1]}}',
         err("The command no-such has not been found", "CommandNotFound", id={"a": [1]})),
        (b'{"execute":"query-version","arguments":{"x":1},"id":true}',
         err("Parameter 'x' is unexpected", id=True)),
        (b'{"execute":"blockdev-del","id":7}', err("Parameter 'node-name' is missing", id=7)),
    ]
    for data, want in cases:
        assert replies(s, data) == [want], data


def test_execute_and_replies() -> None:
    s = session(negotiated=True)
    [req] = replies(s, b'{"execute":"query-named-block-nodes","arguments":{"flat":true},"id":9}')
    assert isinstance(req, Execute) and req.arguments == {"flat": True} and req.id == 9
    assert s.reply_return(req, None) == b'{"return": {}, "id": 9}\r\n'
    assert s.reply_error(req, "GenericError", "boom") == \
        b'{"id": 9, "error": {"class": "GenericError", "desc": "boom"}}\r\n'
    [req] = replies(s, b'{"execute":"query-version"}')
    assert isinstance(req, Execute) and not req.has_id
    assert s.reply_return(req, [1]) == b'{"return": [1]}\r\n'


def test_oob() -> None:
    s = session(negotiated=True, oob=True)
    assert replies(s, b'{"exec-oob":"query-version","id":1}') == [
        err("The command query-version does not support OOB", id=1)]
    assert replies(s, b'{"exec-oob":"nope","id":2}') == [
        err("The command nope has not been found", "CommandNotFound", id=2)]
    [r] = replies(s, b'{"exec-oob":"query-version","execute":"query-version","id":3}')
    assert r["error"]["desc"].startswith("QMP input member '")
    assert "clashes with" in r["error"]["desc"]


def test_one_request_at_a_time() -> None:
    s = session()
    s.receive_data(b'{"execute":"qmp_capabilities"}{"execute":"query-version","id":2}')
    assert s.pending == 2
    first = s.next_request()
    assert isinstance(first, Reply)
    # the second request is classified only now, in command mode
    assert isinstance(s.next_request(), Execute)
