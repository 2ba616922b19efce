"""The byte <-> QMP string conversions of the ringbuf commands, as QEMU 7.2 makes them.

QEMU keeps QMP strings as C strings in *modified* UTF-8 (U+0000 is the two bytes C0 80), so
``ringbuf-write`` stores those bytes. ``ringbuf-read`` returns raw bytes as a C string: the
reply ends at the first NUL byte, and QEMU's JSON writer turns each invalid sequence into
U+FFFD by the rules of its ``mod_utf8_codepoint``. ``base64`` input passes QEMU's character
check and is then decoded by glib's lenient decoder, which quietly drops an incomplete last
group and treats ``=`` as a zero digit that suppresses output bytes.
"""

from __future__ import annotations

import string

from blockmirror.errors import BlockMirrorError

_B64_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
#: QEMU's accepted characters (util/base64.c): the alphabet, padding and newlines
_B64_VALID = frozenset(_B64_ALPHABET + "=\n")
_B64_RANK = {c: i for i, c in enumerate(_B64_ALPHABET)} | {"=": 0}

#: the smallest code point each sequence length may encode (longer is overlong)
_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def encode_qmp_string(text: str) -> bytes:
    """The bytes QEMU holds for a QMP string: UTF-8, with NUL as C0 80."""
    return text.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")


def decode_base64(text: str) -> bytes:
    """``qbase64_decode``: QEMU's character check, then glib's decoding."""
    if any(c not in _B64_VALID for c in text):
        raise BlockMirrorError("Base64 data contains invalid characters")
    out = bytearray()
    value = count = 0
    last = prev = ""
    for c in text:
        rank = _B64_RANK.get(c)
        if rank is None:  # newlines: skipped
            continue
        prev, last = last, c
        value = (value << 6) | rank
        count += 1
        if count == 4:
            out.append((value >> 16) & 0xFF)
            if prev != "=":
                out.append((value >> 8) & 0xFF)
            if last != "=":
                out.append(value & 0xFF)
            value = count = 0
    return bytes(out)


def _valid_codepoint(cp: int) -> bool:
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return False
    return not (0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE)


def _codepoint(data: bytes, i: int) -> tuple[int, int]:
    """(code point or -1, index after the sequence) of the sequence at ``data[i]``, where
    ``data[i]`` is not NUL and ``data`` ends at the C string's end."""
    byte = data[i]
    if byte < 0x80:
        return byte, i + 1
    if byte >= 0xFE or not byte & 0x40:  # impossible byte, or a stray continuation byte
        return -1, i + 1
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    j = i + 1
    for _ in range(1, length):
        nxt = data[j] if j < len(data) else 0
        if nxt & 0xC0 != 0x80:
            return -1, j
        cp = (cp << 6) | (nxt & 0x3F)
        j += 1
    if not _valid_codepoint(cp) or (cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2)):
        return -1, j
    return cp, j


def qmp_string_of(data: bytes) -> str:
    """What QEMU's JSON writer sends for ``data`` read as a C string."""
    end = data.find(b"\0")
    if end >= 0:
        data = data[:end]
    out = []
    i = 0
    while i < len(data):
        cp, i = _codepoint(data, i)
        out.append(chr(cp) if cp >= 0 else "\ufffd")
    return "".join(out)


__all__ = ["decode_base64", "encode_qmp_string", "qmp_string_of"]
