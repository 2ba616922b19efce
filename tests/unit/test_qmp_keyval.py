"""Unit tests of the keyval option parser (cli/keyval.py) and the daemon's argv pass."""

from __future__ import annotations

import pytest

from blockmirror.cli.daemon import UsageError, parse_argv
from blockmirror.cli.keyval import KeyvalError, parse_keyval, parse_option


def test_keyval() -> None:
    assert parse_keyval("null-co,node-name=n0,cache.direct=on", "driver") == {
        "driver": "null-co", "node-name": "n0", "cache": {"direct": "on"}}
    assert parse_keyval("a.0=x,a.1=y,b=c,,d") == {"a": ["x", "y"], "b": "c,d"}
    assert parse_keyval("b=c,,d") == {"b": "c,d"}
    assert parse_keyval("k=1,k=2") == {"k": "2"}
    with pytest.raises(KeyvalError, match="Expected '=' after parameter 'bar'"):
        parse_keyval("foo,bar", "driver")
    with pytest.raises(KeyvalError, match=r"^Parameters 'a\.\*' used inconsistently$"):
        parse_keyval("a=1,a.b=2")
    with pytest.raises(KeyvalError, match=r"^Parameter 'l\.0' missing$"):
        parse_keyval("l.1=x")
    with pytest.raises(KeyvalError, match=r"^Help is not available for this option$"):
        parse_keyval("null-co,help", "driver")
    with pytest.raises(KeyvalError, match=r"^Invalid parameter ''$"):
        parse_keyval("x,,", "driver")
    assert parse_keyval("x,", "driver") == {"driver": "x"}
    assert parse_option('{"driver":"null-co","node-name":"n"}') == {
        "driver": "null-co", "node-name": "n"}
    with pytest.raises(KeyvalError, match="JSON parse error, premature EOI"):
        parse_option('{"driver":"null-co"')


def test_argv() -> None:
    assert parse_argv(["--blockdev", "x", "--pidfile=/p", "-V", "--daemonize"]) == [
        ("blockdev", "x"), ("pidfile", "/p"), ("version", None), ("daemonize", None)]
    for argv, msg in [(["--bogus"], "unrecognized option '--bogus'"),
                      (["-d"], "invalid option -- 'd'"),
                      (["--pidfile"], "option '--pidfile' requires an argument")]:
        with pytest.raises(UsageError) as e:
            parse_argv(argv)
        assert str(e.value) == msg
    assert parse_argv(["foo"]) == [("", "foo")]
