"""QMP wire format, sans-IO: QEMU's incremental JSON streamer and QEMU's JSON printer.

``JSONStreamer.feed(bytes)`` returns the values (or parse errors) completed by those bytes. It
follows QEMU's three stages (cf. qobject/json-lexer.c, json-streamer.c, json-parser.c): a lexer
that recovers from bad bytes by skipping to the next structural or control character, a
streamer that collects tokens until braces and brackets balance (or go negative), and a parser
whose first error wins. Error texts are QEMU's. ``to_json()`` prints the way QEMU does: ASCII
only, ``%.17g`` floats, and dict members in QDict hash-bucket order, so replies built in schema
order come out byte-identical to QEMU's. No sockets, tasks or clocks live here.
"""

from __future__ import annotations

import re
import struct
import sys
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from blockmirror.qapi.qdict import qdict_order

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10

# The parser recurses once per nesting level (three frames each); the streamer caps nesting at
# MAX_NESTING, so this bound is always enough.
if sys.getrecursionlimit() < 4 * MAX_NESTING + 200:
    sys.setrecursionlimit(4 * MAX_NESTING + 200)


#: bytes of an unfinished token or value kept in memory before the rest goes to an anonymous
#: temporary file. QEMU keeps up to MAX_TOKEN_SIZE (64 MiB) per client in memory; a client
#: sending a huge token that will only be refused must not cost the daemon that much RSS
#: (issue 15: at most 16 MiB), so the limits stay QEMU's and only the storage changes.
SPOOL_MEMORY = 1 << 20


class _Spool:
    """Append-only bytes: in memory up to SPOOL_MEMORY, then in a temporary file."""

    __slots__ = ("_file", "_len", "_mem")

    def __init__(self) -> None:
        self._mem = bytearray()
        self._file: Any = None
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def extend(self, data: bytes | bytearray) -> None:
        self._len += len(data)
        if self._file is None:
            self._mem += data
            if len(self._mem) > SPOOL_MEMORY:
                # tempfile (and shutil under it) only for huge values: not at start-up
                import tempfile

                # closed by close(), which every owner calls when the value is done
                self._file = tempfile.TemporaryFile()  # noqa: SIM115
                self._file.write(self._mem)
                self._mem = bytearray()
        else:
            self._file.write(data)

    def read(self, offset: int, length: int) -> bytes:
        if self._file is None:
            return bytes(self._mem[offset:offset + length])
        self._file.seek(offset)
        data: bytes = self._file.read(length)
        self._file.seek(0, 2)
        return data

    def getvalue(self) -> bytes:
        return self.read(0, self._len)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._mem = bytearray()
        self._len = 0


class Tok(IntEnum):
    LCURLY = 1
    RCURLY = 2
    LSQUARE = 3
    RSQUARE = 4
    COLON = 5
    COMMA = 6
    INTEGER = 7
    FLOAT = 8
    KEYWORD = 9
    STRING = 10
    ERROR = 11
    #: a token cut off at MAX_TOKEN_SIZE (QEMU passes the lexer state as the type)
    PARTIAL = 12


class _S(IntEnum):
    """Lexer states (cf. enum json_lexer_state)."""

    START = 0
    RECOVERY = 1
    DQ = 2
    DQ_ESC = 3
    SQ = 4
    SQ_ESC = 5
    ZERO = 6
    SIGN = 7
    DIGITS = 8
    MANTISSA = 9
    MANTISSA_DIGITS = 10
    EXP_E = 11
    EXP_SIGN = 12
    EXP_DIGITS = 13
    KEYWORD = 14


_STRUCTURAL = {ord("{"): Tok.LCURLY, ord("}"): Tok.RCURLY, ord("["): Tok.LSQUARE,
               ord("]"): Tok.RSQUARE, ord(":"): Tok.COLON, ord(","): Tok.COMMA}
_WS = frozenset(b" \t\r\n")
_DIGIT = frozenset(b"0123456789")
_LOWER = frozenset(range(ord("a"), ord("z") + 1))

# Runs a state may swallow whole; matching them with a regex keeps a 64 MiB input from
# costing one Python loop iteration per byte.
_RUNS: dict[_S, re.Pattern[bytes]] = {
    _S.DQ: re.compile(rb'[\x20-\x21\x23-\x5b\x5d-\xfd]+'),
    _S.SQ: re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]+"),
    _S.RECOVERY: re.compile(rb"[\t\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]+"),
    _S.START: re.compile(rb"[ \t\r\n]+"),
    _S.KEYWORD: re.compile(rb"[a-z]+"),
    _S.DIGITS: re.compile(rb"[0-9]+"),
    _S.MANTISSA_DIGITS: re.compile(rb"[0-9]+"),
    _S.EXP_DIGITS: re.compile(rb"[0-9]+"),
}


class JSONParseError(Exception):
    """One input the streamer rejected; ``desc`` is QEMU's text (the QMP GenericError)."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


@dataclass(frozen=True, slots=True)
class Token:
    """One lexical token of QMP input: its kind and its bytes."""

    type: Tok
    text: bytes


Parsed = Any | JSONParseError


class _Pending:
    """The tokens of an unfinished value, compactly: per token a type byte, a 4-byte length
    and the text, all in one spool. (A list of Token objects costs ~90 bytes per token: at
    QEMU's 2M token limit that is ~180 MiB held for a value that will only be refused.)"""

    __slots__ = ("count", "spool")

    _HEAD = struct.Struct("<BI")

    def __init__(self) -> None:
        self.count = 0
        self.spool = _Spool()

    def __len__(self) -> int:
        return self.count

    def add(self, t: Tok, text: bytes) -> None:
        self.spool.extend(self._HEAD.pack(t, len(text)))
        self.spool.extend(text)
        self.count += 1

    def tokens(self) -> list[Token]:
        blob = self.spool.getvalue()
        out: list[Token] = []
        pos, head = 0, self._HEAD
        while pos < len(blob):
            t, n = head.unpack_from(blob, pos)
            pos += head.size
            out.append(Token(Tok(t), blob[pos:pos + n]))
            pos += n
        return out

    def close(self) -> None:
        self.spool.close()


class JSONStreamer:
    """Bytes in, complete JSON values (or JSONParseError instances) out, in input order."""

    def __init__(self) -> None:
        self._state = _S.START
        self._tok = bytearray()
        #: the front of a token longer than SPOOL_MEMORY (self._tok holds the rest)
        self._tok_spool = _Spool()
        self._pending = _Pending()
        self._token_size = 0
        self._brace = 0
        self._bracket = 0
        self._out: list[Parsed] = []

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished value (bounded by MAX_TOKEN_SIZE twice over; in
        memory at most about 2 * SPOOL_MEMORY plus 5 bytes per token)."""
        return len(self._tok_spool) + len(self._tok) + self._token_size

    def feed(self, data: bytes) -> list[Parsed]:
        i, n = 0, len(data)
        while i < n:
            run = _RUNS.get(self._state)
            if run is not None:
                m = run.match(data, i)
                if m is not None:
                    if self._state is not _S.START and self._state is not _S.RECOVERY:
                        self._tok += m.group()
                        self._check_size()
                    i = m.end()
                    continue
            self._char(data[i])
            i += 1
        out, self._out = self._out, []
        return out

    # -- lexer ---------------------------------------------------------------------------

    def _char(self, c: int) -> None:
        # Loop because a lookahead transition re-examines the same character from START.
        while True:
            consumed = self._step(c)
            if consumed:
                break
        self._check_size()

    def _check_size(self) -> None:
        if len(self._tok) > SPOOL_MEMORY:
            self._tok_spool.extend(self._tok)
            self._tok = bytearray()
        if len(self._tok_spool) and len(self._tok_spool) + len(self._tok) > MAX_TOKEN_SIZE:
            self._cut_token()

    def _cut_token(self) -> None:
        # The token is over the limit and will only be reported: drop it without copying.
        self._tok = bytearray()
        self._tok_spool.close()
        self._token(Tok.PARTIAL, MAX_TOKEN_SIZE + 1)
        self._state = _S.START

    def _emit_tok(self, t: Tok) -> None:
        self._token(t)
        self._state = _S.START

    def _error(self) -> None:
        self._token(Tok.ERROR)
        self._state = _S.RECOVERY

    def _step(self, c: int) -> bool:
        """One table transition; returns whether ``c`` was consumed."""
        s = self._state
        if s is _S.START:
            if c in _WS:
                return True
            tok = _STRUCTURAL.get(c)
            if tok is not None:
                self._tok.append(c)
                self._emit_tok(tok)
                return True
            nxt = {0x22: _S.DQ, 0x27: _S.SQ, 0x30: _S.ZERO, 0x2D: _S.SIGN}.get(c)
            if nxt is None:
                if c in _DIGIT:
                    nxt = _S.DIGITS
                elif c in _LOWER:
                    nxt = _S.KEYWORD
            self._tok.append(c)
            if nxt is None:
                self._error()
            else:
                self._state = nxt
            return True
        if s is _S.RECOVERY:
            if (c < 0x20 and c != 0x09) or c >= 0xFE or c in _STRUCTURAL:
                self._state = _S.START
                return False
            return True
        if s in (_S.DQ, _S.SQ):
            quote = 0x22 if s is _S.DQ else 0x27
            self._tok.append(c)
            if c == quote:
                self._emit_tok(Tok.STRING)
            elif c == 0x5C:
                self._state = _S.DQ_ESC if s is _S.DQ else _S.SQ_ESC
            elif not 0x20 <= c <= 0xFD:
                self._error()
            return True
        if s in (_S.DQ_ESC, _S.SQ_ESC):
            self._tok.append(c)
            if 0x20 <= c <= 0xFD:
                self._state = _S.DQ if s is _S.DQ_ESC else _S.SQ
            else:
                self._error()
            return True
        # numbers and keywords: a character outside the token ends it by lookahead
        if s is _S.KEYWORD:
            if c in _LOWER:
                self._tok.append(c)
                return True
            self._emit_tok(Tok.KEYWORD)
            return False
        if s in (_S.ZERO, _S.DIGITS):
            if c in _DIGIT and s is _S.DIGITS:
                self._tok.append(c)
                return True
            if c == 0x2E:
                self._tok.append(c)
                self._state = _S.MANTISSA
                return True
            if s is _S.DIGITS and c in (0x65, 0x45):
                self._tok.append(c)
                self._state = _S.EXP_E
                return True
            if c in _DIGIT:  # a digit after a leading zero
                self._tok.append(c)
                self._error()
                return True
            self._emit_tok(Tok.INTEGER)
            return False
        if s in (_S.MANTISSA_DIGITS, _S.EXP_DIGITS):
            if c in _DIGIT:
                self._tok.append(c)
                return True
            if s is _S.MANTISSA_DIGITS and c in (0x65, 0x45):
                self._tok.append(c)
                self._state = _S.EXP_E
                return True
            self._emit_tok(Tok.FLOAT)
            return False
        # states that need one more specific character, else error (consuming it)
        self._tok.append(c)
        if s is _S.SIGN and c == 0x30:
            self._state = _S.ZERO
        elif s is _S.SIGN and c in _DIGIT:
            self._state = _S.DIGITS
        elif s is _S.MANTISSA and c in _DIGIT:
            self._state = _S.MANTISSA_DIGITS
        elif s is _S.EXP_E and c in (0x2B, 0x2D):
            self._state = _S.EXP_SIGN
        elif s in (_S.EXP_E, _S.EXP_SIGN) and c in _DIGIT:
            self._state = _S.EXP_DIGITS
        else:
            self._error()
        return True

    # -- streamer ------------------------------------------------------------------------

    def _token(self, t: Tok, size: int | None = None) -> None:
        if len(self._tok_spool):
            self._tok_spool.extend(self._tok)
            text = self._tok_spool.getvalue()
            self._tok_spool.close()
        else:
            text = bytes(self._tok)
        self._tok = bytearray() if len(self._tok) > 4096 else self._tok
        self._tok.clear()
        length = len(text) if size is None else size
        err: str | None = None
        if t is Tok.LCURLY:
            self._brace += 1
        elif t is Tok.RCURLY:
            self._brace -= 1
        elif t is Tok.LSQUARE:
            self._bracket += 1
        elif t is Tok.RSQUARE:
            self._bracket -= 1
        elif t is Tok.ERROR:
            # QEMU formats the token as a C string: it ends at the first NUL byte
            shown = text.split(b"\0", 1)[0].decode("utf-8", "replace")
            err = "JSON parse error, stray '" + shown + "'"
        if err is None:
            if self._token_size + length + 1 > MAX_TOKEN_SIZE:
                err = "JSON token size limit exceeded"
            elif len(self._pending) + 1 > MAX_TOKEN_COUNT:
                err = "JSON token count limit exceeded"
            elif self._brace + self._bracket > MAX_NESTING:
                err = "JSON nesting depth limit exceeded"
        if err is None:
            self._pending.add(t, text)
            self._token_size += len(text)
            if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 \
                    and self._bracket >= 0:
                return
            result: Parsed = _Parser(self._pending.tokens()).parse()
        else:
            result = JSONParseError(err)
        self._brace = self._bracket = 0
        self._pending.close()
        self._pending = _Pending()
        self._token_size = 0
        self._out.append(result)


class _Fail(Exception):
    pass


class _Parser:
    """Recursive descent over one balanced token list; the first error is the one reported."""

    def __init__(self, tokens: list[Token]) -> None:
        self._toks = tokens
        self._pos = 0

    def parse(self) -> Parsed:
        try:
            return self._value()
        except _Fail as e:
            return JSONParseError("JSON parse error, " + str(e))

    def _peek(self) -> Token | None:
        return self._toks[self._pos] if self._pos < len(self._toks) else None

    def _pop(self) -> Token:
        tok = self._peek()
        if tok is None:
            raise _Fail("premature EOI")
        self._pos += 1
        return tok

    def _value(self) -> Any:
        tok = self._peek()
        if tok is None:
            raise _Fail("premature EOI")
        t = tok.type
        if t is Tok.LCURLY:
            return self._object()
        if t is Tok.LSQUARE:
            return self._array()
        self._pos += 1
        if t is Tok.STRING:
            return _parse_string(tok.text)
        if t is Tok.INTEGER:
            v = int(tok.text)
            if -(1 << 63) <= v < (1 << 64):
                return v
            return _strtod(tok.text)
        if t is Tok.FLOAT:
            return _strtod(tok.text)
        if t is Tok.KEYWORD:
            kw = {b"true": True, b"false": False, b"null": None}
            if tok.text in kw:
                return kw[tok.text]
            raise _Fail(f"invalid keyword '{tok.text.decode('ascii')}'")
        raise _Fail("expecting value")

    def _object(self) -> dict[str, Any]:
        self._pos += 1
        out: dict[str, Any] = {}
        peek = self._peek()
        if peek is None:
            raise _Fail("premature EOI")
        if peek.type is Tok.RCURLY:
            self._pos += 1
            return out
        self._pair(out)
        tok = self._pop()
        while tok.type is not Tok.RCURLY:
            if tok.type is not Tok.COMMA:
                raise _Fail("expected separator in dict")
            self._pair(out)
            tok = self._pop()
        return out

    def _pair(self, out: dict[str, Any]) -> None:
        if self._peek() is None:
            raise _Fail("premature EOI")
        key = self._value()
        if not isinstance(key, str):
            raise _Fail("key is not a string in object")
        if self._pop().type is not Tok.COLON:
            raise _Fail("missing : in object pair")
        value = self._value()
        if key in out:
            raise _Fail("duplicate key")
        out[key] = value

    def _array(self) -> list[Any]:
        self._pos += 1
        out: list[Any] = []
        peek = self._peek()
        if peek is None:
            raise _Fail("premature EOI")
        if peek.type is Tok.RSQUARE:
            self._pos += 1
            return out
        out.append(self._value())
        tok = self._pop()
        while tok.type is not Tok.RSQUARE:
            if tok.type is not Tok.COMMA:
                raise _Fail("expected separator in list")
            out.append(self._value())
            tok = self._pop()
        return out


def _strtod(text: bytes) -> float:
    # like strtod: out-of-range magnitudes become inf (float() does that already)
    return float(text)


_SIMPLE_ESC = {0x22: '"', 0x27: "'", 0x5C: "\\", 0x2F: "/", 0x62: "\b", 0x66: "\f",
               0x6E: "\n", 0x72: "\r", 0x74: "\t"}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _hex4(b: bytes) -> int:
    if len(b) < 4 or any(c not in _HEX for c in b[:4]):
        return -1
    return int(b[:4], 16)


def _utf8_seq(text: bytes, i: int) -> tuple[int, int]:
    """Decode one modified-UTF-8 sequence at ``i``: (code point or -1, next index)."""
    c = text[i]
    if c < 0x80:
        return c, i + 1
    if c == 0xC0 and i + 1 < len(text) and text[i + 1] == 0x80:
        return 0, i + 2
    n = 2 if 0xC2 <= c <= 0xDF else 3 if 0xE0 <= c <= 0xEF else 4 if 0xF0 <= c <= 0xF4 else 0
    if n == 0:
        return -1, i + 1
    seq = text[i:i + n]
    try:
        cp = ord(seq.decode("utf-8"))
    except UnicodeDecodeError:
        return -1, i + 1
    # QEMU's mod_utf8_codepoint also refuses the noncharacters U+xFFFE/U+xFFFF
    if cp & 0xFFFE == 0xFFFE or 0xFDD0 <= cp <= 0xFDEF:
        return -1, i + n
    return cp, i + n


def _parse_string(text: bytes) -> str:
    quote = text[0]
    out: list[str] = []
    i = 1
    end = len(text) - 1
    while i < end and text[i] != quote:
        c = text[i]
        if c == 0x5C:
            beg = i
            e = text[i + 1]
            i += 2
            if e in _SIMPLE_ESC:
                out.append(_SIMPLE_ESC[e])
                continue
            if e != 0x75:
                raise _Fail("invalid escape sequence in string")
            cp = _hex4(text[i:i + 4])
            i += 4
            if 0xD800 <= cp <= 0xDBFF and text[i:i + 2] == b"\\u":
                trail = _hex4(text[i + 2:i + 6])
                if 0xDC00 <= trail <= 0xDFFF:
                    cp = 0x10000 + ((cp & 0x3FF) << 10) | (trail & 0x3FF)
                    i += 6
                else:
                    cp = -1
            if cp < 0 or 0xD800 <= cp <= 0xDFFF or cp > 0x10FFFF:
                shown = text[beg:min(i, len(text))].decode("utf-8", "replace")
                raise _Fail(f"{shown} is not a valid Unicode character")
            out.append(chr(cp))
            continue
        cp, i = _utf8_seq(text, i)
        if cp < 0:
            raise _Fail("invalid UTF-8 sequence in string")
        out.append(chr(cp))
    return "".join(out)


# -- printer -------------------------------------------------------------------------------

_ESCAPED = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n",
            "\r": "\\r", "\t": "\\t"}
#: every character that is not printed as itself
_NOT_PLAIN = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    esc = _ESCAPED.get(ch)
    if esc is not None:
        return esc
    cp = ord(ch)
    if 0xDC80 <= cp <= 0xDCFF:  # an undecodable byte carried as a lone surrogate
        return "\\uFFFD"
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 | cp >> 10:04X}\\u{0xDC00 | cp & 0x3FF:04X}"
    return f"\\u{cp:04X}"


def _escape(s: str) -> str:
    # runs of plain characters are copied in bulk: a long string costs one copy, not a list
    # of one reference per character (8 bytes each: 8 MiB for a 1 MiB error token)
    return '"' + _NOT_PLAIN.sub(_escape_char, s) + '"'


def format_number(v: int | float) -> str:
    if isinstance(v, int):
        return str(v)
    return format(v, ".17g")


def to_json(value: Any, pretty: bool = False, _indent: int = 0) -> str:
    """Serialise like QEMU's qobject_to_json (``pretty``: qobject_to_json_pretty)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return format_number(value)
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, dict):
        keys = qdict_order(list(value))
        if pretty:
            pad = "    " * (_indent + 1)
            items = [f"{pad}{_escape(k)}: {to_json(value[k], True, _indent + 1)}" for k in keys]
            close = "    " * _indent
            return "{\n" + ",\n".join(items) + ("\n" if items else "") + close + "}"
        return "{" + ", ".join(f"{_escape(k)}: {to_json(value[k])}" for k in keys) + "}"
    if isinstance(value, list | tuple):
        if pretty:
            pad = "    " * (_indent + 1)
            items = [pad + to_json(v, True, _indent + 1) for v in value]
            close = "    " * _indent
            return "[\n" + ",\n".join(items) + ("\n" if items else "") + close + "]"
        return "[" + ", ".join(to_json(v) for v in value) + "]"
    raise TypeError(f"cannot serialise {type(value).__name__} as QMP JSON")


def encode(value: Any, pretty: bool = False) -> bytes:
    """One complete server message: ASCII JSON followed by CRLF.

    The monitor turns every newline into CRLF, the pretty printer's included.
    """
    text = to_json(value, pretty)
    if pretty:
        text = text.replace("\n", "\r\n")
    return (text + "\r\n").encode("ascii")


__all__ = [
    "MAX_NESTING",
    "MAX_TOKEN_COUNT",
    "MAX_TOKEN_SIZE",
    "JSONParseError",
    "JSONStreamer",
    "encode",
    "format_number",
    "qdict_order",
    "to_json",
]
