"""TLS contexts from QEMU-style credential objects (``--object tls-creds-x509,...``).

The daemon keeps ``--object``/``object-add`` instances in ``daemon.objects[id] = (qom_type,
props)``; this module turns a ``tls-creds-x509`` one into an ``ssl.SSLContext`` for the NBD
server or the nbd client driver. The directory layout is QEMU's (ca-cert.pem, server-cert.pem,
server-key.pem, client-cert.pem, client-key.pem). No sockets here.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import Any

from blockmirror.errors import BlockMirrorError
from blockmirror.objects import ObjectLookup

TLS_TYPES = ("tls-creds-x509", "tls-creds-psk", "tls-creds-anon")


def _truthy(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("on", "yes", "true", "1")


def find_creds(
    objects: ObjectLookup, creds_id: str, endpoint: str
) -> tuple[str, dict[str, Any]]:
    """Look a credentials object up, with QEMU's texts (cf. nbd_get_tls_creds)."""
    obj = objects.get(creds_id)
    if obj is None:
        raise BlockMirrorError(f"No TLS credentials with id '{creds_id}'")
    qom_type, props = obj
    if qom_type not in TLS_TYPES:
        raise BlockMirrorError(f"Object with id '{creds_id}' is not TLS credentials")
    if str(props.get("endpoint", "client")) != endpoint:
        raise BlockMirrorError(f"Expected TLS credentials for a {endpoint} endpoint")
    return qom_type, props


def _require_psk_support(qom_type: str) -> None:
    if qom_type == "tls-creds-psk":
        raise BlockMirrorError(
            "tls-creds-psk is not supported: the TLS-PSK API of Python's ssl module needs "
            "Python 3.13 (use tls-creds-x509)"
        )
    if qom_type == "tls-creds-anon":
        raise BlockMirrorError("tls-creds-anon is not supported (use tls-creds-x509)")


def _file(directory: str, name: str, creds_id: str, required: bool = True) -> str | None:
    path = os.path.join(directory, name)
    if os.path.exists(path):
        return path
    if required:
        raise BlockMirrorError(f"Unable to access credentials {path}: No such file or directory")
    return None


def server_context(objects: ObjectLookup, creds_id: str) -> ssl.SSLContext:
    qom_type, props = find_creds(objects, creds_id, "server")
    _require_psk_support(qom_type)
    directory = str(props.get("dir", ""))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert = _file(directory, "server-cert.pem", creds_id)
    key = _file(directory, "server-key.pem", creds_id)
    assert cert is not None and key is not None
    ctx.load_cert_chain(cert, key)
    if _truthy(props.get("verify-peer"), True):
        ca = _file(directory, "ca-cert.pem", creds_id)
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    objects: ObjectLookup, creds_id: str, hostname: str | None
) -> ssl.SSLContext:
    """A client context; ``hostname`` is checked against the certificate (None: unix socket)."""
    qom_type, props = find_creds(objects, creds_id, "client")
    _require_psk_support(qom_type)
    directory = str(props.get("dir", ""))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if _truthy(props.get("verify-peer"), True):
        ca = _file(directory, "ca-cert.pem", creds_id)
        ctx.load_verify_locations(ca)
        ctx.check_hostname = hostname is not None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    cert = _file(directory, "client-cert.pem", creds_id, required=False)
    key = _file(directory, "client-key.pem", creds_id, required=False)
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


def cleartext_pending(reader: asyncio.StreamReader) -> bool:
    """True when bytes that arrived before the TLS upgrade are still buffered in ``reader``.

    asyncio's start_tls keeps the StreamReader's buffer, so such bytes would later be read as
    if they had come through TLS (a STARTTLS injection); callers refuse the connection instead.
    """
    return bool(getattr(reader, "_buffer", b""))
