"""QEMU's ``rbd:`` filename syntax (cf. qemu_rbd_parse_filename), parsed into the rbd driver's
options.

Apart from ``drivers/rbd.py`` so that ``block/optsyntax.py``, which every daemon imports to read
filenames, need not import the driver itself (start-up CPU, issue 10).
"""

from __future__ import annotations

from typing import Any

from blockmirror.errors import BlockMirrorError

#: the internal option that carries ``rbd:`` filename key=value pairs (cf. "=keyvalue-pairs")
KEYVALUE_PAIRS = "=keyvalue-pairs"


def _find(text: str, delim: str) -> int:
    """Index of the first unescaped ``delim`` (a backslash escapes the next character)."""
    i = 0
    while i < len(text):
        c = text[i]
        if c == delim:
            return i
        if c == "\\" and i + 1 < len(text):
            i += 1
        i += 1
    return -1


def _next_tok(text: str, delim: str) -> tuple[str, str | None]:
    """(token before the first unescaped delim, rest after it, or None when there is none)."""
    i = _find(text, delim)
    if i < 0:
        return text, None
    return text[:i], text[i + 1:]


def _unescape(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def parse_rbd_filename(filename: str) -> dict[str, Any]:
    """Options for ``rbd:pool/[namespace/]image[@snap][:key=value...]``.

    cf. qemu_rbd_parse_filename: ``conf`` and ``id`` become options, other pairs are Ceph
    configuration set on the cluster handle, in order (kept under ``=keyvalue-pairs``).

    Raises:
        BlockMirrorError: QEMU's texts.
    """
    if not filename.startswith("rbd:"):
        raise BlockMirrorError("File name must start with 'rbd:'")
    pool, rest = _next_tok(filename[4:], "/")
    if rest is None:
        raise BlockMirrorError("Pool name is required")
    opts: dict[str, Any] = {"pool": _unescape(pool)}
    after: str | None
    if _find(rest, "@") >= 0:
        image, rest2 = _next_tok(rest, "@")
        assert rest2 is not None
        snap, after = _next_tok(rest2, ":")
        opts["snapshot"] = _unescape(snap)
    else:
        image, after = _next_tok(rest, ":")
    if _find(image, "/") >= 0:
        ns, name = _next_tok(image, "/")
        assert name is not None
        image = name
        opts["namespace"] = _unescape(ns)
    else:
        opts["namespace"] = ""
    opts["image"] = _unescape(image)
    pairs: list[str] = []
    while after is not None:
        name, value_rest = _next_tok(after, "=")
        if value_rest is None:
            raise BlockMirrorError(f"conf option {name} has no value")
        name = _unescape(name)
        value, after = _next_tok(value_rest, ":")
        value = _unescape(value)
        if name == "conf":
            opts["conf"] = value
        elif name == "id":
            opts["user"] = value
        else:
            pairs += [name, value]
    if pairs:
        import json  # here: rbd: filenames with pairs are rare, every daemon start would pay

        opts[KEYVALUE_PAIRS] = json.dumps(pairs)
    return opts


__all__ = ["KEYVALUE_PAIRS", "parse_rbd_filename"]
