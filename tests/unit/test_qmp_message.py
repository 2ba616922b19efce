"""Unit tests of the sans-IO JSON streamer and printer (qmp/message.py).

Expected texts were captured from qemu-storage-daemon 7.2 (see tests/qmp_corpus for the
differential version of the same cases).
"""

from __future__ import annotations

from typing import Any

import pytest

from blockmirror.qmp import message
from blockmirror.qmp.message import (
    MAX_NESTING,
    JSONParseError,
    JSONStreamer,
    encode,
    qdict_order,
    to_json,
)


def feed(*chunks: bytes) -> list[Any]:
    s = JSONStreamer()
    out: list[Any] = []
    for c in chunks:
        out += s.feed(c)
    return [x.desc if isinstance(x, JSONParseError) else x for x in out]


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (b'{"execute": }', ["JSON parse error, expecting value"]),
        (b'{"execute":"x" "id": 16}', ["JSON parse error, expected separator in dict"]),
        (b"nul ", ["JSON parse error, invalid keyword 'nul'"]),
        (b"\x01", ["JSON parse error, stray '\x01'"]),
        (b"\xff", ["JSON parse error, stray '\ufffd'"]),
        (b"\x00", ["JSON parse error, stray ''"]),
        (b'{"a":1,"a":2}', ["JSON parse error, duplicate key"]),
        (b"garbage here\n", ["JSON parse error, invalid keyword 'garbage'",
                             "JSON parse error, invalid keyword 'here'"]),
        (b'{"id": 007}', ["JSON parse error, stray '00'", "JSON parse error, expecting value"]),
        (b'{"id": 1.}', ["JSON parse error, stray '1.}'"]),
        (b'{"id": True}', ["JSON parse error, stray 'T'", "JSON parse error, expecting value"]),
        (b"[1 2]", ["JSON parse error, expected separator in list"]),
        (b'{"a" 1}', ["JSON parse error, missing : in object pair"]),
        (b"{{}:1}", ["JSON parse error, key is not a string in object"]),
        (b"]]]", ["JSON parse error, expecting value"] * 3),
        (b'{"id":"\\uZZ"}', ['JSON parse error, \\uZZ" is not a valid Unicode character']),
        (b'{"id":"\\ud83d\\u0041"}',
         ["JSON parse error, \\ud83d is not a valid Unicode character"]),
        (b'{"id":"\\x"}', ["JSON parse error, invalid escape sequence in string"]),
        (b'{"id":"\xc3"}', ["JSON parse error, invalid UTF-8 sequence in string"]),
        (b'{"id":"\xef\xbf\xbf"}', ["JSON parse error, invalid UTF-8 sequence in string"]),
        (b'"abc\x01xyz"', ["JSON parse error, stray '\"abc\x01'"]),
    ],
)
def test_errors_and_resync(data: bytes, want: list[str]) -> None:
    assert feed(data) == want


def test_values_and_extensions() -> None:
    assert feed(b"{'a': 'it\\'s \"q\"'}") == [{"a": "it's \"q\""}]
    assert feed(b'"\xc0\x80"') == ["\0"]  # modified UTF-8 NUL
    assert feed(b'[1, -0, 1.5e3, 12345678901234567890, -9223372036854775809]') == [
        [1, 0, 1500.0, 12345678901234567890, -9.223372036854775809e18]]
    assert feed(b'"\\ud83d\\ude00"') == ["\U0001F600"]


def test_framing_is_a_stream() -> None:
    whole = b'{"execute":"a"}{"execute":"b"}\n{"execute":\n"c"}'
    assert feed(whole) == [{"execute": "a"}, {"execute": "b"}, {"execute": "c"}]
    # the same bytes one at a time give the same values
    assert feed(*[whole[i:i + 1] for i in range(len(whole))]) == feed(whole)
    assert feed(b'{"a":1 "b"') == []  # waits for the object to close


def test_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    deep = b"[" * (MAX_NESTING + 1)
    assert feed(deep)[0] == "JSON nesting depth limit exceeded"
    s = JSONStreamer()
    big = b'"' + b"a" * (64 << 20) + b'"'
    out = s.feed(big)
    assert isinstance(out[0], JSONParseError)
    assert out[0].desc == "JSON token size limit exceeded"
    assert s.buffered < 1 << 20  # nothing of the huge token is kept
    monkeypatch.setattr(message, "MAX_TOKEN_COUNT", 1000)  # the real 2 Mi is slow to build
    count = JSONStreamer().feed(b"[" + b"1," * 600 + b"1]")
    assert next(x.desc for x in count if isinstance(x, JSONParseError)) == \
        "JSON token count limit exceeded"


def test_printer_matches_qemu() -> None:
    assert to_json({"b": 1, "a": 2, "id": 3, "zz": {"q": 1}}) == \
        '{"a": 2, "zz": {"q": 1}, "b": 1, "id": 3}'
    assert to_json({"return": {}, "id": 1}) == '{"return": {}, "id": 1}'
    assert to_json({"error": {"class": "C", "desc": "D"}, "id": 1}) == \
        '{"id": 1, "error": {"class": "C", "desc": "D"}}'
    assert to_json([1.0, 0.1, 1e100, -0.0, 1e-5, float("inf")]) == \
        "[1, 0.10000000000000001, 1e+100, -0, 1.0000000000000001e-05, inf]"
    assert to_json("a/b\u00e9\U0001F600\t\"\0\x7f") == \
        '"a/b\\u00E9\\uD83D\\uDE00\\t\\"\\u0000\\u007F"'
    assert encode({"return": {}}) == b'{"return": {}}\r\n'
    # "minor" and "micro" share a QDict bucket: the later insertion comes first
    assert qdict_order(["major", "minor", "micro"]) == ["micro", "minor", "major"]
    assert qdict_order(["major", "micro", "minor"]) == ["minor", "micro", "major"]


def test_pretty_printer_matches_qemu() -> None:
    # captured from qemu-storage-daemon --monitor chardev=m,pretty=on
    want = (b'{\r\n    "return": [\r\n    ],\r\n    "id": [\r\n        1,\r\n        {\r\n'
            b'        }\r\n    ]\r\n}\r\n')
    assert encode({"return": [], "id": [1, {}]}, pretty=True) == want
    assert encode({"return": {}}, pretty=True) == b'{\r\n    "return": {\r\n    }\r\n}\r\n'
