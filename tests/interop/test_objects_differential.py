"""object-add / object-del / qom-* against qemu-storage-daemon 7.2: the same replies, error
classes and texts, step by step (``qsd_diff``), and the same ``--object`` command-line errors.

Known, deliberate differences are kept out of the compared scripts and tested on their own:
``authz-listfile`` (QSD 7.2 refuses every one with "invalid object type: authz-listfile",
because its QMP name and its QOM type name "authz-list-file" differ; we create it), TLS
servers with ``tls-creds-anon`` (Python's ssl has no anonymous TLS), and qom-list-types
without ``implements`` (QSD lists its 200-odd internal types).
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import require_tool
from qsd_diff import Step, diff, transcript

pytestmark = pytest.mark.interop

KEY = b"k" * 32
IV = b"i" * 16


def _encrypted(tmp: Path, plain: bytes) -> str:
    ct = subprocess.run(["openssl", "enc", "-aes-256-cbc", "-K", KEY.hex(), "-iv", IV.hex()],
                        input=plain, capture_output=True, check=True).stdout
    return base64.b64encode(ct).decode()


def _steps(tmp: Path, certs: Path) -> list[Step]:
    (tmp / "key.b64").write_text(base64.b64encode(KEY).decode())
    (tmp / "pw.txt").write_text("from-a-file")
    img = tmp / "r.raw"
    img.write_bytes(bytes(1 << 20))
    iv = base64.b64encode(IV).decode()
    ct = _encrypted(tmp, b"secret-password")

    def add(qom_type: str, oid: str, **props: Any) -> Step:
        return ("object-add", {"qom-type": qom_type, "id": oid, **props})

    def get(oid: str, prop: str) -> Step:
        return ("qom-get", {"path": f"/objects/{oid}", "property": prop})

    return [
        # secrets
        add("secret", "s0", data="hello"),
        add("secret", "s0", data="hello"),
        add("secret", "s1"),
        add("secret", "s2", data="aGVsbG8=", format="base64"),
        add("secret", "s3", data="!!!", format="base64"),
        add("secret", "s4", data="x", file=str(tmp / "pw.txt")),
        add("secret", "s5", file=str(tmp / "nonexistent")),
        add("secret", "s6", file=str(tmp / "pw.txt")),
        add("secret", "s7", data="x", keyid="nope"),
        add("secret", "s8", data="x", keyid="s0"),
        add("secret", "1bad", data="x"),
        add("secret", "key", file=str(tmp / "key.b64"), format="base64"),
        add("secret", "e1", data=ct, format="base64", keyid="key", iv=iv),
        add("secret", "e2", data=ct, format="base64", keyid="key"),
        add("secret", "e3", data="abc", keyid="key", iv=iv),
        add("secret", "e4", data=ct, keyid="key", iv=base64.b64encode(b"x" * 8).decode()),
        add("secret", "e5", data=ct, format="base64", keyid="s2", iv=iv),
        add("secret", "e6", data=ct, format="base64", keyid="1bad", iv=iv),
        add("bogus", "b"),
        ("qom-list", {"path": "/objects/e1"}),
        get("e1", "data"), get("e1", "format"), get("e1", "keyid"), get("e1", "loaded"),
        get("s0", "nope"),
        # authz
        add("authz-simple", "a0", identity="CN=x"),
        add("authz-simple", "a1"),
        add("authz-list", "a2", policy="deny",
            rules=[{"match": "CN=*", "policy": "allow", "format": "glob"}]),
        add("authz-list", "a3"),
        add("authz-list", "a4", rules=[{"match": "x"}]),
        add("authz-list", "a5", rules=[{"match": "x", "policy": "maybe"}]),
        add("authz-listfile", "a6"),
        ("qom-list", {"path": "/objects/a0"}), get("a0", "identity"),
        ("qom-list", {"path": "/objects/a3"}), get("a3", "rules"), get("a3", "policy"),
        get("a2", "policy"),
        # TLS credentials
        add("tls-creds-x509", "x0", dir=str(tmp / "nonexistent"), endpoint="server"),
        add("tls-creds-x509", "x1", dir=str(certs), endpoint="server"),
        add("tls-creds-x509", "x2", dir=str(certs), endpoint="client"),
        add("tls-creds-x509", "x3", dir=str(certs), endpoint="server", passwordid="nope"),
        add("tls-creds-x509", "x4", dir=str(tmp), endpoint="client", **{"verify-peer": False}),
        add("tls-creds-x509", "x5", dir=str(certs), endpoint="middle"),
        add("tls-creds-anon", "x6", endpoint="server"),
        add("tls-creds-anon", "x7"),
        ("qom-list", {"path": "/objects/x1"}), ("qom-list", {"path": "/objects/x6"}),
        get("x1", "endpoint"), get("x1", "dir"), get("x1", "verify-peer"),
        get("x6", "endpoint"),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp / "n.s")}},
                              "tls-creds": "x2"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp / "n.s")}},
                              "tls-creds": "a0"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp / "n.s")}},
                              "tls-creds": "nope"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp / "n.s")}},
                              "tls-creds": "x1", "tls-authz": "nope"}),
        ("nbd-server-stop", {}),
        # throttle groups
        add("throttle-group", "t0", **{"x-bps-total": 1000, "x-iops-read": 5}),
        get("t0", "limits"), get("t0", "x-bps-total"), get("t0", "x-iops-read-max-length"),
        ("qom-list", {"path": "/objects/t0"}),
        add("throttle-group", "t1", **{"x-bps-total": 1000, "limits": {"iops-total": 4}}),
        get("t1", "limits"),
        add("throttle-group", "t2", limits={"bps-total": 1000, "bps-read": 5}),
        add("throttle-group", "t3", limits={"iops-total": -1}),
        add("throttle-group", "t4", limits={"bps-total-max": 10}),
        add("throttle-group", "t5", **{"x-bps-total-max-length": 3, "x-bps-total": 10,
                                       "x-bps-total-max": 1}),
        add("throttle-group", "t6", **{"x-iops-size": 3}),
        add("throttle-group", "t7", **{"x-iops-total-max-length": 0}),
        add("throttle-group", "t8", **{"x-bps-total-max-length": 3}),
        add("throttle-group", "t9", **{"x-bps-total": 1, "x-bps-total-max": 2,
                                       "x-bps-total-max-length": 86401}),
        add("throttle-group", "t10", **{"x-bps-total": "1"}),
        ("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)}),
        ("blockdev-add", {"driver": "throttle", "node-name": "th", "throttle-group": "t0",
                          "file": "f"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "th2", "throttle-group": "nope",
                          "file": "f"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "th3", "file": "f"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "th4", "throttle-group": "a0",
                          "file": "f"}),
        ("query-named-block-nodes", {}),
        ("object-del", {"id": "t0"}),
        ("blockdev-del", {"node-name": "th"}),
        ("object-del", {"id": "t0"}),
        # qom-set
        ("qom-set", {"path": "/objects/t1", "property": "limits", "value": {"iops-total": 5}}),
        get("t1", "limits"),
        ("qom-set", {"path": "/objects/t1", "property": "x-bps-read", "value": 7}),
        ("qom-set", {"path": "/objects/t1", "property": "limits",
                     "value": {"bps-total-max": 5}}),
        ("qom-set", {"path": "/objects/t1", "property": "limits", "value": {"iops-total": -5}}),
        ("qom-set", {"path": "/objects/t1", "property": "limits", "value": {"iops-total": "x"}}),
        ("qom-set", {"path": "/objects/t1", "property": "limits", "value": {"bogus": 1}}),
        ("qom-set", {"path": "/objects/t1", "property": "limits", "value": 5}),
        get("t1", "limits"),
        ("qom-set", {"path": "/objects/t1", "property": "nope", "value": 1}),
        ("qom-set", {"path": "/objects/t1", "property": "type", "value": "x"}),
        ("qom-set", {"path": "/objects", "property": "type", "value": "x"}),
        ("qom-set", {"path": "/objects/nope", "property": "limits", "value": {}}),
        ("qom-set", {"path": "/objects/a0", "property": "identity", "value": "y"}),
        ("qom-set", {"path": "/objects/a0", "property": "identity", "value": 5}),
        get("a0", "identity"),
        ("qom-set", {"path": "/objects/a3", "property": "policy", "value": "allow"}),
        ("qom-set", {"path": "/objects/a3", "property": "policy", "value": "maybe"}),
        ("qom-set", {"path": "/objects/a3", "property": "rules",
                     "value": [{"match": "a", "policy": "deny"}]}),
        ("qom-set", {"path": "/objects/a3", "property": "rules", "value": [{"match": "a"}]}),
        ("qom-set", {"path": "/objects/a3", "property": "rules", "value": {"match": "a"}}),
        get("a3", "rules"), get("a3", "policy"), get("a2", "rules"),
        ("qom-set", {"path": "/objects/x6", "property": "verify-peer", "value": False}),
        get("x6", "verify-peer"),
        ("qom-set", {"path": "/objects/e1", "property": "data", "value": "y"}),
        ("qom-set", {"path": "/objects/e1", "property": "loaded", "value": False}),
        get("e1", "data"),
        # iothread objects are accepted
        add("iothread", "io0"),
        add("iothread", "io1", **{"poll-max-ns": 5, "thread-pool-max": 8}),
        add("main-loop", "ml0"),
        add("main-loop", "ml1"),
        ("qom-list", {"path": "/objects/io0"}), ("qom-list", {"path": "/objects/ml0"}),
        get("io0", "poll-max-ns"), get("io1", "poll-max-ns"), get("io1", "thread-pool-max"),
        get("ml0", "thread-pool-max"),
        ("qom-set", {"path": "/objects/io0", "property": "poll-max-ns", "value": 7}),
        get("io0", "poll-max-ns"),
        ("qom-list-types", {"implements": "event-loop-base", "abstract": True}),
        # the tree
        ("object-del", {"id": "s0"}), ("object-del", {"id": "s0"}),
        ("qom-list", {"path": "/objects"}), ("qom-list", {"path": "/"}),
        ("qom-list", {"path": "/nope"}), ("qom-list", {"path": "/objects/nope"}),
        get("nope", "type"), ("qom-get", {"path": "/objects", "property": "type"}),
        get("a0", "type"), get("t1", "type"),
        ("qom-list-types", {"implements": "secret"}),
        ("qom-list-types", {"implements": "authz"}),
        ("qom-list-types", {"implements": "authz", "abstract": True}),
        ("qom-list-types", {"implements": "throttle-group"}),
        ("qom-list-types", {"implements": "no-such-type"}),
        *(("qom-list-properties", {"typename": t}) for t in (
            "object", "container", "secret_common", "secret", "tls-creds", "tls-creds-x509",
            "tls-creds-anon", "tls-creds-psk", "tls-cipher-suites", "authz", "authz-simple",
            "authz-list", "authz-list-file", "throttle-group", "event-loop-base", "iothread",
            "main-loop", "nope")),
    ]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("openssl")
    from test_nbd_interop import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))


def test_object_commands_same_as_qsd(tmp_path: Path, certs: Path) -> None:
    require_tool("qemu-storage-daemon", "openssl")
    steps = _steps(tmp_path, certs)
    want = transcript("qsd", str(tmp_path / "q.sock"), steps)
    got = transcript("ours", str(tmp_path / "o.sock"), steps)
    assert not diff(want, got), diff(want, got)
    # and the script did exercise successes and failures
    assert sum("error" in w["reply"] for w in want) >= 30
    assert sum("return" in w["reply"] for w in want) >= 30


OBJECT_ARGS = [
    "secret,id=s0,data=x",
    "secret,id=s0",
    "secret,id=s0,data=x,format=bad",
    '{"qom-type":"secret","id":"s0","data":"aGk=","format":"base64"}',
    '{"qom-type":"secret","id":"s0","data":"x","format":"bad"}',
    "authz-simple,id=a0,identity=CN=x,,O=y",
    "authz-simple,id=a0",
    "authz-list,id=a0,policy=allow,rules.0.match=CN=x,rules.0.policy=deny",
    "authz-list,id=a0,rules.0.match=CN=x",
    "throttle-group,id=t0,x-bps-total=100,x-bps-read=4",
    "throttle-group,id=t0,limits.bps-total=100",
    "throttle-group,id=t0,x-iops-total=abc",
    "tls-creds-x509,id=t0,dir=/nonexistent,endpoint=server",
    "nosuch,id=x",
    "secret,data=x",
]


@pytest.mark.parametrize("arg", OBJECT_ARGS)
def test_object_option_same_as_qsd(tmp_path: Path, arg: str) -> None:
    require_tool("qemu-storage-daemon")

    def run(base: list[str]) -> tuple[int, str]:
        # a daemon that starts (no monitor needed): --object, then a bad option to stop it
        r = subprocess.run([*base, "--object", arg, "--blockdev", "driver=nosuch"],
                           capture_output=True, text=True, timeout=60)
        return r.returncode, r.stderr.split(": ", 1)[-1]

    want = run(["qemu-storage-daemon"])
    got = run([sys.executable, "-m", "blockmirror.cli.main", "daemon"])
    assert got == want
