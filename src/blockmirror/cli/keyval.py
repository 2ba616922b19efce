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
from blockmirror.qapi.qdict import qdict_order
from blockmirror.qmp.message import JSONParseError, JSONStreamer


class KeyvalError(BlockMirrorError):
    """A malformed option string."""


def split_qemuopts(text: str) -> list[str]:
    """Split on single commas; ",," stands for a literal comma (QemuOpts, --chardev)."""
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


def _name_len(s: str, i: int) -> int:
    """Length of the QAPI name at ``s[i:]`` (a letter, then alphanumerics, '-', '_'), or 0."""
    if i >= len(s) or not (s[i].isascii() and s[i].isalpha()):
        return 0
    j = i + 1
    while j < len(s) and s[j].isascii() and (s[j].isalnum() or s[j] in "-_"):
        j += 1
    return j - i


def _index_len(s: str, i: int) -> int:
    j = i
    while j < len(s) and "0" <= s[j] <= "9":
        j += 1
    return j - i


def _put(cur: dict[str, Any], name: str, value: str | None, shown: str) -> dict[str, Any]:
    """cf. keyval_parse_put: ``value`` None means "a nested dict"."""
    old = cur.get(name)
    if old is not None:
        if isinstance(old, dict) != (value is None):
            raise KeyvalError(f"Parameters '{shown}.*' used inconsistently")
        if value is None:
            assert isinstance(old, dict)
            return old
    new: Any = {} if value is None else value
    cur[name] = new
    return new if isinstance(new, dict) else cur


def _parse_one(root: dict[str, Any], text: str, pos: int, implied: str | None) -> int:
    """One KEY=VALUE at ``text[pos:]`` (cf. keyval_parse_one); returns the next position."""
    n = len(text)
    stop = pos
    while stop < n and text[stop] not in "=,":
        stop += 1
    key_src, key_start, key_end = text, pos, stop
    val_end = -1
    if stop > pos and (stop == n or text[stop] != "="):
        if text[pos:stop] in ("help", "?"):
            raise KeyvalError("Help is not available for this option")
        if implied is not None:
            key_src, key_start, key_end, val_end = implied, 0, len(implied), stop
    key = key_src[key_start:key_end]
    cur = root
    i = key_start
    fragment = ""
    while True:
        ln = _index_len(key_src, i) if i != key_start else 0
        if ln == 0:
            ln = _name_len(key_src, i)
        if ln == 0 or (i + ln < key_end and key_src[i + ln] != "."):
            raise KeyvalError(f"Invalid parameter '{key}'")
        if i != key_start:
            cur = _put(cur, fragment, None, key_src[key_start:i - 1])
        fragment = key_src[i:i + ln]
        i += ln
        if i >= key_end or key_src[i] != ".":
            break
        i += 1
    if val_end >= 0:
        value = text[pos:val_end]
        nxt = val_end + 1 if val_end < n and text[val_end] == "," else val_end
    else:
        if i >= n or text[i] != "=":
            raise KeyvalError(f"Expected '=' after parameter '{text[pos:i]}'")
        j = i + 1
        chars: list[str] = []
        while j < n:
            if text[j] == ",":
                j += 1
                if j >= n or text[j] != ",":
                    break
            chars.append(text[j])
            j += 1
        value, nxt = "".join(chars), j
    _put(cur, fragment, value, key)
    return nxt


def parse_keyval(text: str, implied: str | None = None) -> dict[str, Any]:
    """Parse ``key=value,...`` into a nested dict of strings (and lists), cf. keyval_parse.

    Raises:
        KeyvalError: with QEMU's texts ("Invalid parameter '...'", "Expected '=' after
            parameter '...'", "Parameters '...' used inconsistently", "Parameter 'x.0'
            missing").
    """
    root: dict[str, Any] = {}
    pos = 0
    while pos < len(text):
        pos = _parse_one(root, text, pos, implied)
        implied = None
    listified = _listify(root, "")
    assert isinstance(listified, dict)
    return listified


def _listify(cur: dict[str, Any], path: str) -> Any:
    """cf. keyval_listify: dicts whose keys are all indexes become lists (QDict order)."""
    has_index = has_member = False
    for key in qdict_order(list(cur)):
        if key[:1].isdigit() and key.isdigit():
            has_index = True
        else:
            has_member = True
        if isinstance(cur[key], dict):
            cur[key] = _listify(cur[key], f"{path}{key}.")
    if has_index and has_member:
        raise KeyvalError(f"Parameters '{path}*' used inconsistently")
    if not has_index:
        return cur
    elems: dict[int, Any] = {int(k): v for k, v in cur.items()}
    out = []
    for i in range(min(len(cur) + 1, max(elems) + 1)):
        if i not in elems:
            raise KeyvalError(f"Parameter '{path}{i}' missing")
        out.append(elems[i])
    return out


def parse_option(text: str, implied: str | None = None) -> dict[str, Any]:
    """An option argument in either keyval or JSON (``{...}``) form.

    Raises:
        KeyvalError: keyval errors, or QEMU's JSON parse errors for the JSON form.
    """
    if text.startswith("{"):
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


__all__ = ["KeyvalError", "parse_keyval", "parse_option", "split_qemuopts"]
