"""The rbd driver's pure parts: QEMU's ``rbd:`` filename syntax, options, secrets, filenames.

No cluster is needed (nor librbd's bindings): these are the parsers and the bookkeeping
around them, checked against the results QEMU 7.2's qemu_rbd_parse_filename gives.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.block.drivers.rbd import (
    KEYVALUE_PAIRS,
    _lookup_secret,
    location_from_options,
    parse_rbd_filename,
)
from blockmirror.block.graph import BlockGraph
from blockmirror.block.optsyntax import child_keys, parse_filename
from blockmirror.errors import BlockMirrorError
from blockmirror.objects import ObjectRegistry
from blockmirror.objects.authz import AuthzSimple
from blockmirror.objects.secret import Secret


def test_pool_image() -> None:
    assert parse_rbd_filename("rbd:rbd/disk") == {"pool": "rbd", "namespace": "",
                                                  "image": "disk"}


def test_namespace_snapshot_and_options() -> None:
    opts = parse_rbd_filename(
        "rbd:pool/ns/img@snap1:conf=/etc/c.conf:id=admin2:rados_osd_op_timeout=5")
    assert opts["pool"] == "pool"
    assert opts["namespace"] == "ns"
    assert opts["image"] == "img"
    assert opts["snapshot"] == "snap1"
    assert opts["conf"] == "/etc/c.conf"
    assert opts["user"] == "admin2"
    assert json.loads(opts[KEYVALUE_PAIRS]) == ["rados_osd_op_timeout", "5"]


def test_escapes() -> None:
    opts = parse_rbd_filename(r"rbd:p/im\:g:mon_host=127.0.0.1\:6789")
    assert opts["image"] == "im:g"
    assert json.loads(opts[KEYVALUE_PAIRS]) == ["mon_host", "127.0.0.1:6789"]


@pytest.mark.parametrize(("name", "text"), [
    ("file:/x", "File name must start with 'rbd:'"),
    ("rbd:", "Pool name is required"),
    ("rbd:pool", "Pool name is required"),
    ("rbd:p/i:novalue", "conf option novalue has no value"),
])
def test_filename_errors(name: str, text: str) -> None:
    with pytest.raises(BlockMirrorError) as e:
        parse_rbd_filename(name)
    assert str(e.value) == text


@given(st.text(alphabet="abcXYZ019_-.:@/=\\", min_size=1, max_size=12),
       st.text(alphabet="abcXYZ019_-.:@/=\\", min_size=1, max_size=12))
def test_escaped_names_round_trip(pool: str, image: str) -> None:
    def esc(s: str) -> str:
        return "".join("\\" + c if c in ":@/=\\" else c for c in s)

    opts = parse_rbd_filename(f"rbd:{esc(pool)}/{esc(image)}")
    assert (opts["pool"], opts["image"]) == (pool, image)


def test_generic_filename_parsing_hands_rbd_to_the_driver() -> None:
    assert parse_filename("rbd:a/b:conf=/c") == {"driver": "rbd", "pool": "a", "namespace": "",
                                                 "image": "b", "conf": "/c"}
    # "image" names a child of blkdebug but is a plain option of rbd
    assert "image" in child_keys("blkdebug")
    assert "image" not in child_keys("rbd")


def test_location_from_blockdev_options_and_filename() -> None:
    loc = location_from_options(parse_rbd_filename("rbd:p/i:conf=/c:rbd_cache=false"), None)
    assert (loc.pool, loc.image, loc.conf) == ("p", "i", "/c")
    assert loc.keypairs == [("rbd_cache", "false")]
    loc = location_from_options({
        "pool": "p", "image": "i", "auth-client-required": ["cephx", "none"],
        "server": [{"host": "10.0.0.1", "port": "6789"}, {"host": "::1", "port": "3300"}]},
        None)
    assert loc.mon_host == "10.0.0.1:6789;[::1]:3300"
    assert loc.auth_client_required == ["cephx", "none"]
    with pytest.raises(BlockMirrorError, match="Parameter 'image' is missing"):
        location_from_options({"pool": "p"}, None)
    with pytest.raises(BlockMirrorError, match="does not accept value 'kerberos'"):
        location_from_options({"pool": "p", "image": "i",
                               "auth-client-required": ["kerberos"]}, None)


def test_secrets(tmp_path: Path) -> None:
    key = base64.b64encode(b"sixteen byte key").decode()
    (tmp_path / "k").write_text(key + "\n")
    objects = ObjectRegistry()
    objects.add(Secret("b64", objects, data=key, format="base64"))
    objects.add(Secret("raw", objects, data="plain"))
    objects.add(Secret("file", objects, file=str(tmp_path / "k"), format="base64"))
    objects.add(AuthzSimple("tls", "CN=x"))  # any object that is not a secret
    graph = BlockGraph(objects=objects)
    assert _lookup_secret(graph, "b64") == b"sixteen byte key"
    assert _lookup_secret(graph, "file") == b"sixteen byte key"
    assert _lookup_secret(graph, "raw") == b"plain"
    with pytest.raises(BlockMirrorError, match="No secret with id 'nope'"):
        _lookup_secret(graph, "nope")
    with pytest.raises(BlockMirrorError, match="Object with id 'tls' is not a secret"):
        _lookup_secret(graph, "tls")
    # key-secret: rados gets the secret's bytes in base64 (qcrypto_secret_lookup_as_base64)
    loc = location_from_options({"pool": "p", "image": "i", "key-secret": "b64"}, graph)
    assert loc.key == key
