"""Building objects from validated ``object-add`` / ``--object`` options (ObjectOptions).

``create_object`` maps a ``qom-type`` to its class; ``QOM_TYPES`` describes the type tree
that ``qom-list-types`` reports for the types blockmirror can create.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from blockmirror.errors import BlockMirrorError
from blockmirror.objects.authz import AuthzList, AuthzListFile, AuthzSimple, rules_from
from blockmirror.objects.event_loop import IOThread, MainLoop
from blockmirror.objects.registry import ObjectRegistry, UserObject
from blockmirror.objects.secret import Secret
from blockmirror.objects.throttle import LIMIT_KEYS, ThrottleGroup
from blockmirror.objects.tls import TlsCredsAnon, TlsCredsPsk, TlsCredsX509

if TYPE_CHECKING:
    from blockmirror.clock import Clock

#: cf. id_wellformed
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")

#: QOM type -> (parent, abstract), for qom-list-types (cf. the TypeInfos of these objects)
QOM_TYPES: dict[str, tuple[str | None, bool]] = {
    "object": (None, True),
    "secret_common": ("object", True),
    "secret": ("secret_common", False),
    "tls-creds": ("object", True),
    "tls-creds-x509": ("tls-creds", False),
    "tls-creds-anon": ("tls-creds", False),
    "tls-creds-psk": ("tls-creds", False),
    "tls-cipher-suites": ("tls-creds", False),
    "authz": ("object", True),
    "authz-simple": ("authz", False),
    "authz-list": ("authz", False),
    "authz-list-file": ("authz", False),
    "throttle-group": ("object", False),
    "event-loop-base": ("object", True),
    "iothread": ("event-loop-base", False),
    "main-loop": ("event-loop-base", False),
    "container": ("object", False),
}

_TLS = [("endpoint", "QCryptoTLSCredsEndpoint"), ("dir", "string"), ("verify-peer", "bool"),
        ("priority", "string")]
_SECRET = [("loaded", "bool"), ("format", "QCryptoSecretFormat"), ("keyid", "string"),
           ("iv", "string")]
_LOOP = [("thread-pool-min", "int"), ("aio-max-batch", "int"), ("thread-pool-max", "int")]
_LIMITS = [("limits", "ThrottleLimits"), *((f"x-{k}", "int") for k in LIMIT_KEYS)]

#: QOM type -> the properties its class declares (qom-list-properties), "type" excluded;
#: an instance's qom-list shows the same (tests/unit/test_objects_registry.py checks it)
TYPE_PROPERTIES: dict[str, list[tuple[str, str]]] = {
    "object": [], "container": [], "authz": [],
    "secret_common": _SECRET, "secret": [*_SECRET, ("data", "string"), ("file", "string")],
    "tls-creds": _TLS, "tls-cipher-suites": _TLS,
    "tls-creds-anon": [*_TLS, ("loaded", "bool")],
    "tls-creds-psk": [*_TLS, ("username", "string"), ("loaded", "bool")],
    "tls-creds-x509": [*_TLS, ("sanity-check", "bool"), ("passwordid", "string"),
                       ("loaded", "bool")],
    "authz-simple": [("identity", "string")],
    "authz-list": [("policy", "QAuthZListPolicy"), ("rules", "QAuthZListRule")],
    "authz-list-file": [("filename", "string"), ("refresh", "bool")],
    "throttle-group": _LIMITS,
    "event-loop-base": _LOOP, "main-loop": _LOOP,
    "iothread": [*_LOOP, ("poll-max-ns", "int"), ("poll-grow", "int"), ("poll-shrink", "int")],
}


def _tls_common(opts: dict[str, Any]) -> dict[str, Any]:
    return {"endpoint": opts.get("endpoint", "client"), "dir": opts.get("dir"),
            "verify_peer": opts.get("verify-peer", True), "priority": opts.get("priority")}


def create_object(registry: ObjectRegistry, clock: Clock, options: dict[str, Any]
                  ) -> UserObject:
    """Build (but do not register) the object ``options`` describe (cf.
    user_creatable_add_qapi); ``options`` were validated against ObjectOptions."""
    opts = dict(options)
    qom_type = str(opts.pop("qom-type"))
    oid = str(opts.pop("id"))
    if not _ID_RE.match(oid):
        raise BlockMirrorError("Parameter 'id' expects an identifier")
    if qom_type == "secret":
        return Secret(oid, registry, data=opts.get("data"), file=opts.get("file"),
                      format=opts.get("format", "raw"), keyid=opts.get("keyid"),
                      iv=opts.get("iv"))
    if qom_type == "tls-creds-x509":
        return TlsCredsX509(oid, registry, sanity_check=opts.get("sanity-check", True),
                            passwordid=opts.get("passwordid"), **_tls_common(opts))
    if qom_type == "tls-creds-anon":
        return TlsCredsAnon(oid, **_tls_common(opts))
    if qom_type == "tls-creds-psk":
        return TlsCredsPsk(oid, username=opts.get("username"), **_tls_common(opts))
    if qom_type == "authz-simple":
        return AuthzSimple(oid, str(opts["identity"]))
    if qom_type == "authz-list":
        return AuthzList(oid, opts.get("policy", "deny"), rules_from(opts.get("rules", [])))
    if qom_type == "authz-listfile":
        return AuthzListFile(oid, str(opts["filename"]), bool(opts.get("refresh", True)))
    if qom_type == "throttle-group":
        limits = opts.pop("limits", None)
        return ThrottleGroup(oid, clock, limits=limits, props=opts)
    if qom_type == "iothread":
        return IOThread(oid, opts)
    if qom_type == "main-loop":
        return MainLoop(oid, opts, registry)
    raise BlockMirrorError(f"object type '{qom_type}' is not supported by blockmirror")


__all__ = ["QOM_TYPES", "TYPE_PROPERTIES", "create_object"]
