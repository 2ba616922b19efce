"""TLS credential objects: ``tls-creds-x509``, ``tls-creds-anon``, ``tls-creds-psk``
(cf. crypto/tlscreds*.c).

Creating one checks the files QEMU checks (in its order, with its texts); turning one into an
``ssl.SSLContext`` is ``nbd/tls.py``'s job. An x509 key protected by a password names a secret
with ``passwordid``, resolved through the registry when the object is created.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from blockmirror.errors import BlockMirrorError
from blockmirror.objects.registry import UserObject
from blockmirror.objects.secret import lookup_secret_utf8

if TYPE_CHECKING:
    from blockmirror.objects import ObjectLookup


class TlsCreds(UserObject):
    """What every TLS credentials type has (cf. QCryptoTLSCreds)."""

    qom_parent = "tls-creds"
    settable = {"endpoint": "QCryptoTLSCredsEndpoint", "dir": "str", "verify-peer": "bool",
                "priority": "str"}

    def __init__(self, oid: str, *, endpoint: str = "client", dir: str | None = None,
                 verify_peer: bool = True, priority: str | None = None) -> None:
        super().__init__(oid)
        self.endpoint = endpoint
        self.dir = dir
        self.verify_peer = verify_peer
        self.priority = priority

    def path(self, name: str, required: bool) -> str | None:
        """cf. qcrypto_tls_creds_get_path: a file of the credentials directory."""
        if self.dir is None:
            if required:
                raise BlockMirrorError("Missing 'dir' property value")
            return None
        # a C string in QEMU: a NUL ends the directory name
        path = os.path.join(self.dir.split("\0", 1)[0], name)
        if os.access(path, os.R_OK):
            return path
        if required:
            err = os.strerror(2) if not os.path.exists(path) else os.strerror(13)
            raise BlockMirrorError(f"Unable to access credentials {path}: {err}")
        return None

    def properties(self) -> dict[str, tuple[str, Any]]:
        return {"endpoint": ("QCryptoTLSCredsEndpoint", self.endpoint),
                "dir": ("string", self.dir), "verify-peer": ("bool", self.verify_peer),
                "priority": ("string", self.priority), "loaded": ("bool", True)}


class TlsCredsX509(TlsCreds):
    qom_type = "tls-creds-x509"
    settable = {**TlsCreds.settable, "sanity-check": "bool", "passwordid": "str"}

    def __init__(self, oid: str, registry: ObjectLookup, *, sanity_check: bool = True,
                 passwordid: str | None = None, **common: Any) -> None:
        super().__init__(oid, **common)
        self.sanity_check = sanity_check
        self.passwordid = passwordid
        # cf. qcrypto_tls_creds_x509_load: the CA first, then the endpoint's own pair
        self.ca_cert = self.path("ca-cert.pem", True)
        self.ca_crl = self.path("ca-crl.pem", False)
        server = self.endpoint == "server"
        role = "server" if server else "client"
        self.cert = self.path(f"{role}-cert.pem", server)
        self.key = self.path(f"{role}-key.pem", server)
        if server:
            self.dh_params = self.path("dh-params.pem", False)
        #: the password of an encrypted private key, from the secret ``passwordid``
        self.password = lookup_secret_utf8(registry, passwordid) if passwordid else None

    def properties(self) -> dict[str, tuple[str, Any]]:
        props = super().properties()
        loaded = props.pop("loaded")
        props["sanity-check"] = ("bool", self.sanity_check)
        props["passwordid"] = ("string", self.passwordid)
        props["loaded"] = loaded
        return props


class TlsCredsAnon(TlsCreds):
    qom_type = "tls-creds-anon"

    def __init__(self, oid: str, **common: Any) -> None:
        super().__init__(oid, **common)
        if self.dir is not None and self.endpoint == "server":
            self.dh_params = self.path("dh-params.pem", False)


class TlsCredsPsk(TlsCreds):
    qom_type = "tls-creds-psk"
    settable = {**TlsCreds.settable, "username": "str"}

    def __init__(self, oid: str, *, username: str | None = None, **common: Any) -> None:
        super().__init__(oid, **common)
        self.username = username
        self.keys = self.path("keys.psk", True)

    def properties(self) -> dict[str, tuple[str, Any]]:
        return {**super().properties(), "username": ("string", self.username)}


__all__ = ["TlsCreds", "TlsCredsAnon", "TlsCredsPsk", "TlsCredsX509"]
