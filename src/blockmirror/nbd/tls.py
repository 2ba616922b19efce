"""TLS contexts from QEMU-style credential objects (``--object tls-creds-x509,...``).

The credentials live in the daemon's object registry (``objects/``); this module turns a
``tls-creds-x509`` one into an ``ssl.SSLContext`` for the NBD server or the nbd client driver,
and reads the distinguished name of a peer's certificate the way QEMU (GnuTLS) prints it, for
``tls-authz``. The directory layout is QEMU's (ca-cert.pem, server-cert.pem, server-key.pem,
client-cert.pem, client-key.pem). No sockets here.
"""

from __future__ import annotations

import asyncio
import ssl

from blockmirror.errors import BlockMirrorError
from blockmirror.objects import ObjectLookup
from blockmirror.objects.tls import TlsCreds, TlsCredsAnon, TlsCredsPsk, TlsCredsX509


def find_creds(objects: ObjectLookup, creds_id: str, endpoint: str) -> TlsCreds:
    """Look a credentials object up, with QEMU's texts (cf. nbd_get_tls_creds)."""
    if objects.get(creds_id) is None:
        raise BlockMirrorError(f"No TLS credentials with id '{creds_id}'")
    creds = objects.find(creds_id, TlsCreds)
    if creds is None:
        raise BlockMirrorError(f"Object with id '{creds_id}' is not TLS credentials")
    if creds.endpoint != endpoint:
        raise BlockMirrorError(f"Expected TLS credentials for a {endpoint} endpoint")
    return creds


def _x509(creds: TlsCreds) -> TlsCredsX509:
    if isinstance(creds, TlsCredsPsk):
        raise BlockMirrorError(
            "tls-creds-psk is not supported: the TLS-PSK API of Python's ssl module needs "
            "Python 3.13 (use tls-creds-x509)"
        )
    if isinstance(creds, TlsCredsAnon) or not isinstance(creds, TlsCredsX509):
        raise BlockMirrorError("tls-creds-anon is not supported (use tls-creds-x509)")
    return creds


def _load_pair(ctx: ssl.SSLContext, creds: TlsCredsX509) -> None:
    if creds.cert and creds.key:
        try:
            ctx.load_cert_chain(creds.cert, creds.key, password=creds.password)
        except ssl.SSLError as e:
            raise BlockMirrorError(f"Cannot load certificate '{creds.cert}' & key "
                                   f"'{creds.key}': {e.reason or e}") from e


def server_context(objects: ObjectLookup, creds_id: str) -> ssl.SSLContext:
    creds = _x509(find_creds(objects, creds_id, "server"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_pair(ctx, creds)
    if creds.verify_peer:
        assert creds.ca_cert is not None
        ctx.load_verify_locations(creds.ca_cert)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(objects: ObjectLookup, creds_id: str, hostname: str | None
                   ) -> ssl.SSLContext:
    """A client context; ``hostname`` is checked against the certificate (None: unix socket)."""
    creds = _x509(find_creds(objects, creds_id, "client"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if creds.verify_peer:
        assert creds.ca_cert is not None
        ctx.load_verify_locations(creds.ca_cert)
        ctx.check_hostname = hostname is not None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    _load_pair(ctx, creds)
    return ctx


#: GnuTLS's short names for the attributes QEMU prints in a DN (others print as dotted OIDs)
_DN_NAMES = {
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O",
    "2.5.4.11": "OU", "2.5.4.9": "STREET", "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID", "1.2.840.113549.1.9.1": "EMAIL",
    "2.5.4.5": "serialNumber", "2.5.4.12": "title", "2.5.4.4": "SN", "2.5.4.42": "GN",
    "2.5.4.43": "initials", "2.5.4.44": "generationQualifier", "2.5.4.46": "dnQualifier",
    "2.5.4.65": "pseudonym", "2.5.4.17": "postalCode", "2.5.4.41": "name",
}


def peer_dn(der: bytes) -> str:
    """The subject DN of a DER certificate as QEMU's ``tls-authz`` sees it
    (cf. gnutls_x509_crt_get_dn): attributes in certificate order, RFC 4514 escaping."""
    from cryptography import x509
    from cryptography.x509.oid import ObjectIdentifier

    cert = x509.load_der_x509_certificate(der)
    names = {ObjectIdentifier(oid): short for oid, short in _DN_NAMES.items()}
    return ",".join(rdn.rfc4514_string(names) for rdn in cert.subject.rdns)


def cleartext_pending(reader: asyncio.StreamReader) -> bool:
    """True when bytes that arrived before the TLS upgrade are still buffered in ``reader``.

    asyncio's start_tls keeps the StreamReader's buffer, so such bytes would later be read as
    if they had come through TLS (a STARTTLS injection); callers refuse the connection instead.
    """
    return bool(getattr(reader, "_buffer", b""))
