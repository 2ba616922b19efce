"""QEMU's keyval option syntax (cf. util/keyval.c), used by the daemon's command line.

``parse_keyval("null-co,node-name=n0,cache.direct=on", implied="driver")`` gives
``{"driver": "null-co", "node-name": "n0", "cache": {"direct": "on"}}``: values stay strings
(the schema's keyval mode converts them), dotted keys nest, keys that are all 0..N-1 turn a
dict into a list, ",," is a literal comma, and a later key replaces an earlier one. A value
starting with '{' is JSON instead (QEMU's ``-blockdev '{...}'`` form), parsed like QMP input.
Errors carry QEMU's texts. Pure functions; no I/O.
"""

from __future__ import annotations

from typing import Any

from blockmirror.errors import BlockMirrorError


class KeyvalError(BlockMirrorError):
    """A malformed option string."""


def _split(text: str) -> list[str]:
    """Split on single commas; ",," stands for a literal comma."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _key_ok(seg: str) -> bool:
    return bool(seg) and all(c.isalnum() or c in "-_" for c in seg)


def parse_keyval(text: str, implied: str | None = None) -> dict[str, Any]:
    """Parse ``key=value,...`` into a nested dict of strings (and lists).

    Raises:
        KeyvalError: with QEMU's texts ("Invalid parameter '...'", "Expected '=' after
            parameter '...'", "Parameter '...' used inconsistently").
    """
    root: dict[str, Any] = {}
    if text == "":
        return root
    for n, item in enumerate(_split(text)):
        if "=" not in item:
            if n == 0 and implied is not None and item:
                key, value = implied, item
            elif item == "" and n > 0:
                raise KeyvalError("Invalid parameter ''")
            else:
                if not all(_key_ok(s) for s in item.split(".")):
                    raise KeyvalError(f"Invalid parameter '{item}'")
                raise KeyvalError(f"Expected '=' after parameter '{item}'")
        else:
            key, value = item.split("=", 1)
        segs = key.split(".")
        if not all(_key_ok(s) for s in segs):
            raise KeyvalError(f"Invalid parameter '{key}'")
        cur = root
        for depth, seg in enumerate(segs[:-1]):
            nxt = cur.setdefault(seg, {})
            if not isinstance(nxt, dict):
                raise KeyvalError(f"Parameter '{'.'.join(segs[:depth + 1])}' used inconsistently")
            cur = nxt
        if isinstance(cur.get(segs[-1]), dict):
            raise KeyvalError(f"Parameter '{key}' used inconsistently")
        cur[segs[-1]] = value
    listified = _listify(root, "")
    assert isinstance(listified, dict)
    return listified


def _listify(node: Any, path: str) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: _listify(v, f"{path}{k}.") for k, v in node.items()}
    if out and all(k.isdigit() for k in out):
        idx = sorted(int(k) for k in out)
        if idx != list(range(len(idx))):
            missing = next(i for i, v in enumerate(idx) if i != v)
            raise KeyvalError(f"Parameter '{path}{missing}' missing")
        return [out[str(i)] for i in idx]
    return out


def parse_option(text: str, implied: str | None = None) -> dict[str, Any]:
    """An option argument in either keyval or JSON (``{...}``) form.

    Raises:
        KeyvalError: keyval errors, or QEMU's JSON parse errors for the JSON form.
    """
    if text.startswith("{"):
        from blockmirror.qmp.message import JSONParseError, JSONStreamer

        streamer = JSONStreamer()
        results = streamer.feed(text.encode("utf-8", "surrogateescape"))
        if not results:
            raise KeyvalError("JSON parse error, premature EOI")
        first = results[0]
        if isinstance(first, JSONParseError):
            raise KeyvalError(first.desc)
        if not isinstance(first, dict):
            raise KeyvalError("Invalid JSON object given")
        return first
    return parse_keyval(text, implied)


__all__ = ["KeyvalError", "parse_keyval", "parse_option"]
