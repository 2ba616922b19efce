"""Harness: keyval option strings and --blockdev/--export/--nbd-server JSON or keyval.

Invariant: parsing and schema validation either succeed or raise KeyvalError/OptionError
(QEMU-style texts); nothing else, whatever the text.
"""

from __future__ import annotations

from blockmirror.cli.daemon import OptionError, _validated
from blockmirror.cli.keyval import KeyvalError, parse_keyval, parse_option
from blockmirror.errors import BlockMirrorError
from fuzz.common import Finding
from fuzz.provider import Input

DICT = [b"driver=", b"node-name=", b"file.", b"file.driver=file", b"filename=", b"qcow2",
        b"raw", b"null-co", b"nbd", b"server.type=unix", b"server.path=", b"=", b",", b",,",
        b".", b"0.", b"1.", b"size=", b"read-only=on", b"off", b"cache.direct=", b"{", b"}",
        b'"driver"', b'"file"', b":", b"[", b"]", b"true", b"null", b"1e9", b"-1",
        b"0x10", b"addr.type=", b"inet", b"addr.host=", b"addr.port=", b"type=nbd",
        b"id=", b"writable=on", b"backing=", b"detect-zeroes=unmap", b"discard=",
        b"blkdebug", b"image.", b"inject-error.0.event=", b"\xff", b"\\u0000"]

#: the option types of the command line, with the key a bare value stands for
TYPES = (("BlockdevOptions", "driver"), ("BlockExportOptions", "type"),
         ("NbdServerOptions", None), ("MonitorOptions", "chardev"))
IMPLIED = (None, "driver", "type", "chardev")


def one_input(data: bytes) -> None:
    inp = Input(data)
    mode = inp.below(4)
    implied = inp.pick(IMPLIED)
    text = inp.rest().decode("utf-8", "surrogateescape")
    try:
        if mode == 0:
            parse_keyval(text, implied)
        elif mode == 1:
            parse_option(text, implied)
        else:
            type_name, key = TYPES[0] if mode == 2 else TYPES[implied_index(data)]
            _validated(type_name, text, key)
    except (KeyvalError, OptionError):
        pass
    except BlockMirrorError as e:
        raise Finding(f"{type(e).__name__} instead of an option error: {e}") from e
    except Exception as e:
        raise Finding(f"{type(e).__name__}: {e}") from e


def implied_index(data: bytes) -> int:
    return (data[1] if len(data) > 1 else 0) % len(TYPES)
