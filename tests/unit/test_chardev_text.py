"""The ringbuf byte <-> string conversions (chardev/text.py) and the registry's rules, pure."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.chardev import ChardevRegistry
from blockmirror.chardev.text import decode_base64, encode_qmp_string, qmp_string_of
from blockmirror.errors import BlockMirrorError
from blockmirror.objects import ObjectRegistry


@given(st.binary(max_size=64))
def test_base64_of_padded_input_is_standard(data: bytes) -> None:
    assert decode_base64(base64.b64encode(data).decode()) == data


def test_base64_glib_leniency() -> None:
    assert decode_base64("YW") == b""  # an incomplete group yields nothing
    assert decode_base64("YWJ") == b""
    assert decode_base64("YQ==YQ==") == b"aa"  # '=' mid-string is a zero digit
    assert decode_base64("YW\nJj") == b"abc"  # newlines pass QEMU's check and are skipped
    with pytest.raises(BlockMirrorError, match=r"^Base64 data contains invalid characters$"):
        decode_base64("Y W")


@given(st.text(max_size=32).filter(lambda t: "\0" not in t and not any(
    0xD800 <= ord(c) <= 0xDFFF or 0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE
    for c in t)))
def test_valid_text_round_trips(text: str) -> None:
    assert qmp_string_of(encode_qmp_string(text)) == text


def test_invalid_sequences_as_qemu_writes_them() -> None:
    assert encode_qmp_string("a\0b") == b"a\xc0\x80b"
    assert qmp_string_of(b"a\xc0\x80b") == "a\0b"  # modified UTF-8's NUL
    assert qmp_string_of(b"ab\0cd") == "ab"  # a C string ends at NUL
    assert qmp_string_of(b"\xff\x80") == "\ufffd\ufffd"  # one per impossible/stray byte
    assert qmp_string_of(b"\xf0\x9f\x98") == "\ufffd"  # a truncated sequence: one
    assert qmp_string_of(b"\xe0\x80\x80x") == "\ufffdx"  # overlong
    assert qmp_string_of(b"\xed\xa0\x80") == "\ufffd"  # a surrogate
    assert qmp_string_of(b"\xef\xbf\xbe") == "\ufffd"  # a noncharacter


def test_registry_rules() -> None:
    reg = ChardevRegistry(ObjectRegistry())
    assert reg.add("r", {"type": "ringbuf", "data": {"size": 4}}) == {}
    with pytest.raises(BlockMirrorError, match=r"^Chardev with id 'r' already exists$"):
        reg.add("r", {"type": "null", "data": {}})
    with pytest.raises(BlockMirrorError, match=r"^Failed to add chardev 'x': size of ringbuf "
                                               r"chardev must be power of two$"):
        reg.add("x", {"type": "ringbuf", "data": {"size": 6}})
    ring = reg.ringbuf("r")
    ring.write(b"abcdef")
    assert ring.read(10) == b"cdef"
    # a huge power of two is taken without allocating it
    reg.add("huge", {"type": "memory", "data": {"size": 1 << 62}})
    reg.ringbuf("huge").write(b"x" * 10)
    assert reg.ringbuf("huge").count == 10
    reg.add("m", {"type": "mux", "data": {"chardev": "r"}})
    for label in ("m", "r"):
        with pytest.raises(BlockMirrorError, match=rf"^Chardev '{label}' is busy$"):
            reg.remove(label)
    reg.add("s", {"type": "stdio", "data": {}})
    reg.remove("s")
    with pytest.raises(BlockMirrorError, match="Failed to set FD nonblocking"):
        reg.add("s", {"type": "stdio", "data": {}})
    reg.close_all()
    assert list(reg) == []
