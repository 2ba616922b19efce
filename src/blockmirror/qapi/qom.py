"""qapi/qom.json: user-creatable objects (``--object``, ``object-add``) and the QOM queries
management stacks read (qom-list, qom-get, qom-list-types)."""

from __future__ import annotations

from blockmirror.qapi.schema import TypeRef, command, enum, struct, union

#: the QOM type names ``--object help`` lists (qemu-storage-daemon 7.2's user-creatable types)
OBJECT_TYPES = [
    "authz-list", "authz-list-file", "authz-simple", "iothread", "main-loop",
    "pr-manager-helper", "secret", "secret_keyring", "thread-context", "throttle-group",
    "tls-cipher-suites", "tls-creds-anon", "tls-creds-psk", "tls-creds-x509",
]

#: QEMU 7.2's ObjectType (QMP names: "authz-listfile" is QOM's "authz-list-file")
OBJECT_TYPE_ENUM = [
    "authz-list", "authz-listfile", "authz-pam", "authz-simple", "can-bus",
    "can-host-socketcan", "colo-compare", "cryptodev-backend", "cryptodev-backend-builtin",
    "cryptodev-backend-lkcf", "cryptodev-vhost-user", "dbus-vmstate", "filter-buffer",
    "filter-dump", "filter-mirror", "filter-redirector", "filter-replay", "filter-rewriter",
    "input-barrier", "input-linux", "iothread", "main-loop", "memory-backend-epc",
    "memory-backend-file", "memory-backend-memfd", "memory-backend-ram", "pef-guest",
    "pr-manager-helper", "qtest", "rng-builtin", "rng-egd", "rng-random", "secret",
    "secret_keyring", "sev-guest", "thread-context", "s390-pv-guest", "throttle-group",
    "tls-creds-anon", "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites",
    "x-remote-object", "x-vfio-user-server",
]

#: ThrottleLimits' members, in QAPI order
THROTTLE_LIMIT_KEYS = [
    *(f"{unit}-{kind}{suffix}"
      for unit in ("iops", "bps") for kind in ("total", "read", "write")
      for suffix in ("", "-max", "-max-length")),
    "iops-size",
]

enum("ObjectType", OBJECT_TYPE_ENUM)
enum("QAuthZListPolicy", ["deny", "allow"])
enum("QAuthZListFormat", ["exact", "glob"])
struct("QAuthZListRule", {"match": "str", "policy": "QAuthZListPolicy",
                          "*format": "QAuthZListFormat"})
struct("AuthZListProperties", {"*policy": "QAuthZListPolicy", "*rules": ["QAuthZListRule"]})
struct("AuthZListFileProperties", {"filename": "str", "*refresh": "bool"})
struct("AuthZSimpleProperties", {"identity": "str"})
struct("EventLoopBaseProperties", {"*aio-max-batch": "int", "*thread-pool-min": "int",
                                   "*thread-pool-max": "int"})
struct("IothreadProperties", {"*poll-max-ns": "int", "*poll-grow": "int",
                              "*poll-shrink": "int"}, base="EventLoopBaseProperties")
struct("MainLoopProperties", {}, base="EventLoopBaseProperties")
enum("QCryptoSecretFormat", ["raw", "base64"])
struct("SecretCommonProperties", {"*loaded": "bool", "*format": "QCryptoSecretFormat",
                                  "*keyid": "str", "*iv": "str"})
struct("SecretProperties", {"*data": "str", "*file": "str"}, base="SecretCommonProperties")
enum("QCryptoTLSCredsEndpoint", ["client", "server"])
_TLS: dict[str, TypeRef] = {"*verify-peer": "bool", "*dir": "str",
                            "*endpoint": "QCryptoTLSCredsEndpoint", "*priority": "str"}
struct("TlsCredsProperties", _TLS)
struct("TlsCredsAnonProperties", {"*loaded": "bool"}, base="TlsCredsProperties")
struct("TlsCredsPskProperties", {"*loaded": "bool", "*username": "str"},
       base="TlsCredsProperties")
struct("TlsCredsX509Properties", {"*loaded": "bool", "*sanity-check": "bool",
                                  "*passwordid": "str"}, base="TlsCredsProperties")
struct("ThrottleLimits", {f"*{k}": "int" for k in THROTTLE_LIMIT_KEYS})
struct("ThrottleGroupProperties", {"*limits": "ThrottleLimits",
                                   **{f"*x-{k}": "int" for k in THROTTLE_LIMIT_KEYS}})
union("ObjectOptions", {"qom-type": "ObjectType", "id": "str"}, "qom-type", {
    "authz-list": "AuthZListProperties", "authz-listfile": "AuthZListFileProperties",
    "authz-simple": "AuthZSimpleProperties", "iothread": "IothreadProperties",
    "main-loop": "MainLoopProperties", "secret": "SecretProperties",
    "throttle-group": "ThrottleGroupProperties", "tls-creds-anon": "TlsCredsAnonProperties",
    "tls-creds-psk": "TlsCredsPskProperties", "tls-creds-x509": "TlsCredsX509Properties",
})
struct("ObjectPropertyInfo", {"name": "str", "type": "str", "*description": "str",
                              "*default-value": "any"})
struct("ObjectTypeInfo", {"name": "str", "*abstract": "bool", "*parent": "str"})

command("object-add", "ObjectOptions",
        doc="`secret` (`data`/`file`, `format`, AES-256-CBC `keyid`/`iv`), `tls-creds-x509` "
            "(`passwordid`), `tls-creds-anon`, `tls-creds-psk`, `authz-simple`, `authz-list`, "
            "`authz-listfile` (`refresh`), `throttle-group` (`limits`, `x-` properties), "
            "`iothread`, `main-loop`; QEMU's checks and texts")
command("object-del", {"id": "str"}, doc="refuses an object in use (a throttle group)")
command("qom-list", {"path": "str"}, returns=["ObjectPropertyInfo"],
        doc="`/`, `/objects`, `/objects/ID`; our order (QEMU's follows a hash table)")
command("qom-get", {"path": "str", "property": "str"}, returns="any")
command("qom-set", {"path": "str", "property": "str", "value": "any"},
        doc="throttle-group `limits` (merged, then checked), authz `identity`/`policy`/"
            "`rules`, secret and TLS credential properties (stored; no reload)")
command("qom-list-properties", {"typename": "str"}, returns=["ObjectPropertyInfo"],
        doc="the types qom-list-types lists")
command("qom-list-types", {"*implements": "str", "*abstract": "bool"},
        returns=["ObjectTypeInfo"], defaults={"abstract": False},
        doc="the types blockmirror creates (and their abstract parents)")

__all__ = ["OBJECT_TYPES", "OBJECT_TYPE_ENUM", "THROTTLE_LIMIT_KEYS"]
