"""The host file name QEMU ends up using for a file name that came in through JSON.

QEMU's JSON parser cannot keep a NUL inside a C string, so it stores U+0000 as the overlong
UTF-8 pair C0 80 ("modified UTF-8"): a QMP or JSON file name with a NUL in it opens or
creates a file whose name has those two bytes where the NUL was, and replies print the NUL
back as \\u0000. Names stay as given everywhere else; only the system calls get the bytes.
"""

from __future__ import annotations

#: U+0000 as the bytes C0 80 once os.fsencode (surrogateescape) turns the name into bytes
_NUL_ON_HOST = "\udcc0\udc80"


def host_path(name: str) -> str:
    """``name`` for open(2) and friends: a NUL becomes the bytes C0 80, as in QEMU."""
    return name.replace("\0", _NUL_ON_HOST) if "\0" in name else name
