"""qapi/qom.json: user-creatable objects (``--object``), the types their options take."""

from __future__ import annotations

from blockmirror.qapi.schema import TypeRef, enum, struct, union

OBJECT_TYPES = [
    "authz-list", "authz-list-file", "authz-simple", "iothread", "main-loop",
    "pr-manager-helper", "secret", "secret_keyring", "thread-context", "throttle-group",
    "tls-cipher-suites", "tls-creds-anon", "tls-creds-psk", "tls-creds-x509",
]

enum("ObjectType", OBJECT_TYPES)
enum("QCryptoTLSCredsEndpoint", ["client", "server"])
enum("QCryptoSecretFormat", ["raw", "base64"])
struct("IothreadProperties", {
    "*poll-max-ns": "int", "*poll-grow": "int", "*poll-shrink": "int",
    "*aio-max-batch": "int", "*thread-pool-min": "int", "*thread-pool-max": "int"})
_TLS: dict[str, TypeRef] = {"*verify-peer": "bool", "*dir": "str",
                            "*endpoint": "QCryptoTLSCredsEndpoint", "*priority": "str"}
struct("TlsCredsX509Properties", {**_TLS, "*sanity-check": "bool", "*passwordid": "str"})
struct("TlsCredsPskProperties", {**_TLS, "*username": "str"})
struct("TlsCredsAnonProperties", _TLS)
struct("SecretProperties", {"*data": "str", "*file": "str", "*format": "QCryptoSecretFormat",
                            "*keyid": "str", "*iv": "str"})
union("ObjectOptions", {"qom-type": "ObjectType", "id": "str"}, "qom-type", {
    "iothread": "IothreadProperties", "tls-creds-x509": "TlsCredsX509Properties",
    "tls-creds-psk": "TlsCredsPskProperties", "tls-creds-anon": "TlsCredsAnonProperties",
    "secret": "SecretProperties",
})

__all__ = ["OBJECT_TYPES"]
