"""``secret`` objects (cf. crypto/secret_common.c, crypto/secret.c).

The value comes from ``data`` or ``file``, optionally base64-encoded, optionally encrypted
with AES-256-CBC under another secret (``keyid``, with a base64 ``iv``), as libvirt passes
passwords. Decryption uses the ``cryptography`` package; errors carry QEMU's texts.
"""

from __future__ import annotations

import base64
import os
import string
from typing import TYPE_CHECKING, Any

from blockmirror.errors import BlockMirrorError
from blockmirror.objects.registry import UserObject

if TYPE_CHECKING:
    from blockmirror.objects import ObjectLookup

_B64_CHARS = frozenset(string.ascii_letters + string.digits + "+/=\n")


def decode_base64(text: str) -> bytes:
    """cf. qbase64_decode: QEMU's checks and texts, then a lenient decode."""
    if "\0" in text:
        raise BlockMirrorError("Base64 data contains embedded NUL characters")
    if any(c not in _B64_CHARS for c in text):
        raise BlockMirrorError("Base64 data contains invalid characters")
    try:
        return base64.b64decode(text.replace("\n", "") + "==", validate=False)
    except ValueError as e:
        raise BlockMirrorError("Base64 data contains invalid characters") from e


def _read_file(path: str) -> bytes:
    # QEMU's JSON parser keeps a NUL as the bytes C0 80 (see block/hostpath.py, a layer
    # above this one): that is the name opened, and glib shows those two bytes as U+FFFD each
    on_host = path.replace("\0", "\udcc0\udc80")
    try:
        with open(on_host, "rb") as f:
            return f.read()
    except OSError as e:
        # QEMU quotes glib's g_file_get_contents message
        shown = path.replace("\0", "\ufffd\ufffd")
        raise BlockMirrorError(
            f"Unable to read {path}: Failed to open file \u201c{shown}\u201d: "
            f"{e.strerror or os.strerror(e.errno or 0)}") from e


def _aes_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(data) % 16:
        raise BlockMirrorError(f"Length {len(data)} must be a multiple of block size 16")
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    plain = dec.update(data) + dec.finalize()
    if plain:
        pad = plain[-1]
        if pad > len(plain):
            raise BlockMirrorError(
                f"Incorrect number of padding bytes ({pad}) found on decrypted data")
        plain = plain[: len(plain) - pad]
    return plain


class Secret(UserObject):
    qom_type = "secret"
    qom_parent = "secret_common"
    # QEMU stores what qom-set gives; the value loaded at creation stays
    settable = {"data": "str", "file": "str", "format": "QCryptoSecretFormat", "keyid": "str",
                "iv": "str"}

    def __init__(self, oid: str, registry: ObjectLookup, *, data: str | None = None,
                 file: str | None = None, format: str = "raw", keyid: str | None = None,
                 iv: str | None = None) -> None:
        super().__init__(oid)
        self.data, self.file, self.format, self.keyid, self.iv = data, file, format, keyid, iv
        if data is not None and file is not None:
            raise BlockMirrorError("'file' and 'data' are mutually exclusive")
        if data is None and file is None:
            raise BlockMirrorError("Either 'file' or 'data' must be provided")
        raw = data.encode() if data is not None else _read_file(str(file))
        if keyid is not None:
            self.value = self._decrypt(registry, keyid, raw)
        elif format == "base64":
            self.value = decode_base64(raw.decode("utf-8", "replace"))
        else:
            self.value = raw

    def _decrypt(self, registry: ObjectLookup, keyid: str, raw: bytes) -> bytes:
        """cf. qcrypto_secret_decrypt."""
        key = lookup_secret(registry, keyid)
        if len(key) != 32:
            raise BlockMirrorError("Key should be 32 bytes in length")
        if self.iv is None:
            raise BlockMirrorError("IV is required to decrypt secret")
        iv = decode_base64(self.iv)
        if len(iv) != 16:
            raise BlockMirrorError(f"IV should be 16 bytes in length not {len(iv)}")
        cipher = decode_base64(raw.decode("utf-8", "replace")) if self.format == "base64" \
            else raw
        return _aes_cbc_decrypt(key, iv, cipher)

    def as_utf8(self) -> str:
        try:
            return self.value.decode("utf-8")
        except UnicodeDecodeError:
            raise BlockMirrorError(f"Data from secret {self.id} is not valid UTF-8") from None

    def properties(self) -> dict[str, tuple[str, Any]]:
        return {"loaded": ("bool", True), "format": ("QCryptoSecretFormat", self.format),
                "keyid": ("string", self.keyid), "iv": ("string", self.iv),
                "data": ("string", self.data), "file": ("string", self.file)}


def lookup_secret(registry: ObjectLookup, oid: str) -> bytes:
    """cf. qcrypto_secret_lookup: a secret's bytes by id, with QEMU's texts."""
    obj = registry.get(oid)
    if obj is None:
        raise BlockMirrorError(f"No secret with id '{oid}'")
    if not isinstance(obj, Secret):
        raise BlockMirrorError(f"Object with id '{oid}' is not a secret")
    return obj.value


def lookup_secret_utf8(registry: ObjectLookup, oid: str) -> str:
    lookup_secret(registry, oid)
    obj = registry.find(oid, Secret)
    assert obj is not None
    return obj.as_utf8()


__all__ = ["Secret", "decode_base64", "lookup_secret", "lookup_secret_utf8"]
