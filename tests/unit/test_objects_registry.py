"""The object registry and the objects' own rules (secrets, authz, TLS credentials)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.errors import BlockMirrorError
from blockmirror.objects.authz import AuthzList, AuthzListFile, AuthzSimple, Rule, is_allowed_by_id
from blockmirror.objects.factory import create_object
from blockmirror.objects.registry import ObjectRegistry
from blockmirror.objects.secret import Secret, lookup_secret
from blockmirror.objects.throttle import ThrottleGroup
from mirror_scripts.vclock import VirtualClock


def make(reg: ObjectRegistry, **opts: object) -> None:
    reg.add(create_object(reg, VirtualClock(), dict(opts)))


def test_typed_lookup_and_delete() -> None:
    reg = ObjectRegistry()
    make(reg, **{"qom-type": "secret", "id": "s0", "data": "pw"})
    make(reg, **{"qom-type": "throttle-group", "id": "tg"})
    assert reg.find("s0", Secret) is not None
    assert reg.find("s0", ThrottleGroup) is None
    assert reg.find("nope", Secret) is None
    with pytest.raises(BlockMirrorError, match="duplicate property 's0'"):
        make(reg, **{"qom-type": "secret", "id": "s0", "data": "x"})
    tg = reg.find("tg", ThrottleGroup)
    assert tg is not None
    tg.users += 1
    with pytest.raises(BlockMirrorError, match=r"^object 'tg' is in use, can not be deleted$"):
        reg.delete("tg")
    tg.users -= 1
    reg.delete("tg")
    with pytest.raises(BlockMirrorError, match=r"^object 'tg' not found$"):
        reg.delete("tg")
    assert [o.id for o in reg] == ["s0"]


def _aes_encrypt(key: bytes, iv: bytes, plain: bytes) -> bytes:
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    padder = padding.PKCS7(128).padder()
    data = padder.update(plain) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


@given(st.binary(min_size=0, max_size=100), st.binary(min_size=32, max_size=32),
       st.binary(min_size=16, max_size=16))
def test_encrypted_secret_round_trip(plain: bytes, key: bytes, iv: bytes) -> None:
    reg = ObjectRegistry()
    make(reg, **{"qom-type": "secret", "id": "k", "data": base64.b64encode(key).decode(),
                 "format": "base64"})
    ct = base64.b64encode(_aes_encrypt(key, iv, plain)).decode()
    make(reg, **{"qom-type": "secret", "id": "s", "data": ct, "format": "base64",
                 "keyid": "k", "iv": base64.b64encode(iv).decode()})
    assert lookup_secret(reg, "s") == plain


def test_secret_from_file(tmp_path: Path) -> None:
    reg = ObjectRegistry()
    (tmp_path / "pw").write_bytes(b"c2VjcmV0")
    make(reg, **{"qom-type": "secret", "id": "s", "file": str(tmp_path / "pw"),
                 "format": "base64"})
    assert lookup_secret(reg, "s") == b"secret"
    make(reg, **{"qom-type": "authz-simple", "id": "a", "identity": "x"})
    with pytest.raises(BlockMirrorError, match=r"^Object with id 'a' is not a secret$"):
        lookup_secret(reg, "a")


def test_authz_list_first_match_wins() -> None:
    authz = AuthzList("a", "deny", [Rule("CN=bob", "deny"), Rule("CN=b*", "allow", "glob"),
                                    Rule("CN=?lice", "allow", "glob")])
    assert not authz.is_allowed("CN=bob")
    assert authz.is_allowed("CN=bobby")
    assert authz.is_allowed("CN=alice")
    assert not authz.is_allowed("CN=aalice")
    assert not authz.is_allowed("CN=[b]ob")
    assert AuthzSimple("s", "CN=x").is_allowed("CN=x")
    assert not AuthzSimple("s", "CN=x").is_allowed("CN=x ")


def test_authz_listfile_rereads_a_changed_file(tmp_path: Path) -> None:
    f = tmp_path / "list.json"
    f.write_text(json.dumps({"policy": "deny", "rules": [{"match": "a", "policy": "allow"}]}))
    authz = AuthzListFile("l", str(f), refresh=True)
    fixed = AuthzListFile("m", str(f), refresh=False)
    assert authz.is_allowed("a") and not authz.is_allowed("b")
    f.write_text(json.dumps({"policy": "allow", "rules": [{"match": "a", "policy": "deny"}]}))
    os.utime(f, ns=(1, 1))  # a different mtime even on coarse-timestamp filesystems
    assert not authz.is_allowed("a") and authz.is_allowed("b")
    assert fixed.is_allowed("a") and not fixed.is_allowed("b")
    # a broken file keeps the last good list
    f.write_text("{not json")
    os.utime(f, ns=(2, 2))
    assert authz.is_allowed("b")


def test_authz_by_id_texts() -> None:
    reg = ObjectRegistry()
    make(reg, **{"qom-type": "secret", "id": "s", "data": "x"})
    with pytest.raises(BlockMirrorError, match=r"^Cannot find QAuthZ object ID nope$"):
        is_allowed_by_id(reg, "nope", "CN=x")
    with pytest.raises(BlockMirrorError, match=r"^Object 's' is not a QAuthZ subclass$"):
        is_allowed_by_id(reg, "s", "CN=x")


def test_tls_creds_check_files_in_qemus_order(tmp_path: Path) -> None:
    reg = ObjectRegistry()
    with pytest.raises(BlockMirrorError) as e:
        make(reg, **{"qom-type": "tls-creds-x509", "id": "t", "dir": str(tmp_path),
                     "endpoint": "server"})
    assert str(e.value) == (f"Unable to access credentials {tmp_path}/ca-cert.pem: "
                            "No such file or directory")
    (tmp_path / "ca-cert.pem").write_text("x")
    with pytest.raises(BlockMirrorError, match=r"server-cert.pem: No such file"):
        make(reg, **{"qom-type": "tls-creds-x509", "id": "t", "dir": str(tmp_path),
                     "endpoint": "server"})
    make(reg, **{"qom-type": "tls-creds-x509", "id": "t", "dir": str(tmp_path),
                 "endpoint": "client"})


def test_type_properties_match_the_instances(tmp_path: Path) -> None:
    """qom-list-properties (per type) and qom-list (per instance) must agree."""
    from blockmirror.objects.factory import QOM_TYPES, TYPE_PROPERTIES

    assert set(TYPE_PROPERTIES) == set(QOM_TYPES)
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "keys.psk"):
        (tmp_path / name).write_text("x")
    (tmp_path / "list.json").write_text("{}")
    reg = ObjectRegistry()
    samples = {
        "secret": {"data": "x"}, "tls-creds-x509": {"dir": str(tmp_path)},
        "tls-creds-anon": {}, "tls-creds-psk": {"dir": str(tmp_path)},
        "authz-simple": {"identity": "x"}, "authz-list": {},
        "authz-listfile": {"filename": str(tmp_path / "list.json")},
        "throttle-group": {}, "iothread": {}, "main-loop": {},
    }
    for i, (qom_type, props) in enumerate(samples.items()):
        obj = create_object(reg, VirtualClock(), {"qom-type": qom_type, "id": f"o{i}", **props})
        got = sorted((k, t) for k, (t, _) in obj.properties().items())
        assert got == sorted(TYPE_PROPERTIES[obj.qom_type]), qom_type
