"""Authorization objects: ``authz-simple``, ``authz-list``, ``authz-listfile`` (cf. authz/*.c).

Each answers ``is_allowed(identity)``; the NBD server asks the one named by ``tls-authz``
with the client certificate's distinguished name. ``authz-listfile`` re-reads its file when
it is asked and the file changed since the last read (size, mtime or inode), when ``refresh``
is on: the same effect as QEMU's inotify watch, without a watcher task.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockmirror.errors import BlockMirrorError
from blockmirror.objects.registry import UserObject

if TYPE_CHECKING:
    from blockmirror.objects import ObjectLookup


class Authz(UserObject):
    qom_parent = "authz"

    def is_allowed(self, identity: str) -> bool:
        raise NotImplementedError


class AuthzSimple(Authz):
    qom_type = "authz-simple"
    settable = {"identity": "str"}

    def __init__(self, oid: str, identity: str) -> None:
        super().__init__(oid)
        self.identity = identity

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity

    def properties(self) -> dict[str, tuple[str, Any]]:
        return {"identity": ("string", self.identity)}


@dataclass(frozen=True)
class Rule:
    """One rule of an authz-list object: the identity it matches and the answer."""

    match: str
    policy: str  # allow | deny
    #: exact | glob; None: not given (exact), and qom-get shows it absent as QEMU does
    format: str | None = None

    def matches(self, identity: str) -> bool:
        if self.format == "glob":
            # cf. g_pattern_match_simple: only '*' and '?' are special
            pattern = "".join(
                ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in self.match)
            return re.fullmatch(pattern, identity, re.DOTALL) is not None
        return identity == self.match

    def as_qapi(self) -> dict[str, str]:
        out = {"match": self.match, "policy": self.policy}
        if self.format is not None:
            out["format"] = self.format
        return out


def rules_from(values: list[dict[str, Any]]) -> list[Rule]:
    return [Rule(str(r["match"]), str(r["policy"]),
                 str(r["format"]) if "format" in r else None) for r in values]


class AuthzList(Authz):
    qom_type = "authz-list"
    settable = {"policy": "QAuthZListPolicy", "rules": ["QAuthZListRule"]}
    emptied_on_error = {"rules": []}

    def __init__(self, oid: str, policy: str = "deny", rules: list[Rule] | None = None) -> None:
        super().__init__(oid)
        self.policy = policy
        self.rules = list(rules or [])

    def is_allowed(self, identity: str) -> bool:
        for rule in self.rules:
            if rule.matches(identity):
                return rule.policy == "allow"
        return self.policy == "allow"

    def set_property(self, name: str, value: Any) -> None:
        if name == "rules":
            self.rules = rules_from(value)
        else:
            self.policy = str(value)

    def properties(self) -> dict[str, tuple[str, Any]]:
        return {"policy": ("QAuthZListPolicy", self.policy),
                "rules": ("QAuthZListRule", [r.as_qapi() for r in self.rules])}


class AuthzListFile(Authz):
    # the QOM type name; QMP's ObjectType spells it "authz-listfile"
    qom_type = "authz-list-file"

    def __init__(self, oid: str, filename: str, refresh: bool = True) -> None:
        super().__init__(oid)
        self.filename = filename
        # QEMU's JSON parser keeps a NUL as the bytes C0 80 (block/hostpath.py, a layer up):
        # the name opened; glib's messages show those bytes as U+FFFD each
        self._host = filename.replace("\0", "\udcc0\udc80")
        self.refresh = refresh
        self._stamp: tuple[int, int, int] | None = None
        self._list = self._load()

    def _load(self) -> AuthzList:
        """cf. qauthz_list_file_load: the file holds an authz-list's properties as JSON."""
        try:
            st = os.stat(self._host)
            with open(self._host, "rb") as f:
                content = f.read()
        except OSError as e:
            shown = self.filename.replace("\0", "\ufffd\ufffd")
            raise BlockMirrorError(
                f"Failed to open file \u201c{shown}\u201d: {e.strerror}") from e
        if not content:
            self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            return AuthzList(self.id)
        import json  # here: only authz-list-file needs it, every daemon start would pay

        try:
            doc = json.loads(content)
        except ValueError as e:
            raise BlockMirrorError(f"Unable to parse '{self.filename}': {e}") from e
        if not isinstance(doc, dict):
            raise BlockMirrorError(f"File '{self.filename}' must contain a JSON object")
        rules = doc.get("rules", [])
        policy = doc.get("policy", "deny")
        if policy not in ("allow", "deny") or not isinstance(rules, list) or not all(
                isinstance(r, dict) and isinstance(r.get("match"), str)
                and r.get("policy") in ("allow", "deny")
                and r.get("format", "exact") in ("exact", "glob") for r in rules):
            raise BlockMirrorError(f"Unable to parse '{self.filename}': invalid authz list")
        self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        return AuthzList(self.id, policy, rules_from(rules))

    def _maybe_reload(self) -> None:
        if not self.refresh:
            return
        try:
            st = os.stat(self._host)
        except OSError:
            return  # QEMU keeps the last good list when the file goes away
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self._stamp:
            try:
                self._list = self._load()
            except BlockMirrorError:
                pass  # keep the last good list, as a failed reload does in QEMU

    def is_allowed(self, identity: str) -> bool:
        self._maybe_reload()
        return self._list.is_allowed(identity)

    def properties(self) -> dict[str, tuple[str, Any]]:
        return {"filename": ("string", self.filename), "refresh": ("bool", self.refresh)}


def is_allowed_by_id(registry: ObjectLookup, authz_id: str, identity: str) -> bool:
    """cf. qauthz_is_allowed_by_id: look the object up by id, then ask it."""
    obj = registry.get(authz_id)
    if obj is None:
        raise BlockMirrorError(f"Cannot find QAuthZ object ID {authz_id}")
    if not isinstance(obj, Authz):
        raise BlockMirrorError(f"Object '{authz_id}' is not a QAuthZ subclass")
    return obj.is_allowed(identity)


__all__ = ["Authz", "AuthzList", "AuthzListFile", "AuthzSimple", "Rule", "is_allowed_by_id",
           "rules_from"]
