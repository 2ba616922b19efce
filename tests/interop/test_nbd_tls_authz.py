"""tls-authz on the NBD server is enforced, as qemu-storage-daemon 7.2 enforces it.

Certificates are made here with the ``openssl`` CLI: one CA, a server certificate and two
client certificates with different subject DNs. Each daemon (QSD and ours, as processes with
the same command line) serves an export with ``tls-authz`` naming an authz object that allows
only the first client: qemu-io with that client's certificate reads, with the other one it is
refused, with the same client-side error, and the daemon reports the same line on stderr. A
server that ignored tls-authz would let the second client read, and these tests fail.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from blockmirror.daemon import Daemon
from blockmirror.objects.factory import create_object
from blockmirror.qmp.commands import nbd as nq
from blockmirror.qmp.testing import DaemonProcess, daemon_argv
from conftest import require_tool
from nbd_helpers import free_port, ram_node
from tls_certs import encrypted_client, make_ca, signed

pytestmark = pytest.mark.interop

#: subject of each client; the DN QEMU checks is printed in certificate order
CLIENTS = {
    "alice": ("/C=GB/O=Example, Ltd/CN=alice", r"C=GB,O=Example\, Ltd,CN=alice"),
    "mallory": ("/C=GB/O=Example, Ltd/CN=mallory", r"C=GB,O=Example\, Ltd,CN=mallory"),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "/CN=authz-test-ca")
    signed(d, d / "server", "/CN=localhost", "v3server")
    for name, (subj, _) in CLIENTS.items():
        signed(d, d / name, subj, "v3client")
    return d


def _qemu_io(pki: Path, client: str, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-r", "--object", f"tls-creds-x509,id=c0,dir={pki / client},endpoint=client",
         "--image-opts", f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
         f"server.port={port},export=disk,tls-creds=c0", "-c", "read -P 0 0 4k"],
        capture_output=True, text=True, timeout=60)


AUTHZ = {
    "simple": "authz-simple,id=auth0,identity=" + CLIENTS["alice"][1].replace(",", ",,"),
    "list-glob": json.dumps({"qom-type": "authz-list", "id": "auth0", "policy": "deny",
                             "rules": [{"match": "*CN=alice", "policy": "allow",
                                        "format": "glob"}]}),
    "list-exact-deny": json.dumps({"qom-type": "authz-list", "id": "auth0", "policy": "allow",
                                   "rules": [{"match": CLIENTS["mallory"][1],
                                              "policy": "deny"}]}),
}


def _run_daemon(kind: str, tmp_path: Path, pki: Path, authz: str
                ) -> dict[str, tuple[int, str, str]]:
    img = tmp_path / f"{kind}.raw"
    img.write_bytes(bytes(1 << 20))
    port = free_port()
    sock = str(tmp_path / f"{kind}.qmp")
    base, monitor = daemon_argv(kind, sock)[:-4], daemon_argv(kind, sock)[-4:]
    # the monitor last: once its socket exists, the NBD server listens too
    argv = [
        *base,
        "--object", f"tls-creds-x509,id=tls0,dir={pki / 'server'},endpoint=server",
        "--object", authz,
        "--blockdev", f"driver=file,node-name=disk,filename={img}",
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},"
        "tls-creds=tls0,tls-authz=auth0",
        "--export", "type=nbd,id=e0,node-name=disk,name=disk", *monitor]
    out: dict[str, tuple[int, str, str]] = {}
    with DaemonProcess(argv, sock) as proc:
        for client in CLIENTS:
            r = _qemu_io(pki, client, port)
            out[client] = (r.returncode, r.stdout + r.stderr, "")
        with proc.connect() as qmp:  # a QMP round trip: stderr is complete up to here
            qmp.send(b'{"execute":"qmp_capabilities"}')
            qmp.read_message()
        err = proc.output(stderr=True)
    lines = [ln.split(": ", 1)[1] for ln in err.splitlines()
             if "option negotiation failed" in ln]
    return {c: (rc, text, "\n".join(lines)) for c, (rc, text, _) in out.items()}


@pytest.mark.parametrize("authz", sorted(AUTHZ))
def test_tls_authz_same_as_qsd(tmp_path: Path, pki: Path, authz: str) -> None:
    require_tool("qemu-storage-daemon", "qemu-io")
    want = _run_daemon("qsd", tmp_path, pki, AUTHZ[authz])
    got = _run_daemon("ours", tmp_path, pki, AUTHZ[authz])
    # the allowed client reads; the other one is refused by both, the same way
    assert want["alice"][0] == 0 and got["alice"][0] == 0, (want, got)
    assert want["mallory"][0] != 0, want
    assert got["mallory"][0] != 0, f"tls-authz not enforced: {got['mallory']}"
    assert got["mallory"][1] == want["mallory"][1]
    assert "Software caused connection abort" in got["mallory"][1]
    denied = f"option negotiation failed: TLS x509 authz check for {CLIENTS['mallory'][1]} " \
             "is denied"
    assert got["mallory"][2] == want["mallory"][2] == denied


def test_tls_authz_listfile_refresh(tmp_path: Path, pki: Path) -> None:
    """authz-listfile (ours only: QSD 7.2 cannot create it, its QMP and QOM names differ)
    re-reads a changed file on the next connection."""
    require_tool("qemu-io")
    rules = tmp_path / "authz.json"
    rules.write_text(json.dumps({"policy": "deny", "rules": [
        {"match": CLIENTS["alice"][1], "policy": "allow"}]}))

    async def main() -> None:
        d = Daemon()
        for opts in ({"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(pki / "server"),
                      "endpoint": "server"},
                     {"qom-type": "authz-listfile", "id": "auth0", "filename": str(rules),
                      "refresh": True}):
            d.objects.add(create_object(d.objects, d.clock, opts))
        ram_node(d.graph, "n0", 1 << 20)
        port = free_port()
        await nq.nbd_server_start(d, {"addr": {"type": "inet", "data": {
            "host": "127.0.0.1", "port": str(port)}}, "tls-creds": "tls0",
            "tls-authz": "auth0"})
        await nq.block_export_add(d, {"type": "nbd", "id": "e0", "node-name": "n0",
                                      "name": "disk"})
        try:
            r = await asyncio.to_thread(_qemu_io, pki, "alice", port)
            assert r.returncode == 0, r.stderr
            r = await asyncio.to_thread(_qemu_io, pki, "mallory", port)
            assert r.returncode != 0
            # swap the roles in the file: the next connections see the new rules
            rules.write_text(json.dumps({"policy": "deny", "rules": [
                {"match": "*CN=mallory", "policy": "allow", "format": "glob"}]}))
            r = await asyncio.to_thread(_qemu_io, pki, "mallory", port)
            assert r.returncode == 0, r.stderr
            r = await asyncio.to_thread(_qemu_io, pki, "alice", port)
            assert r.returncode != 0
        finally:
            await nq.nbd_server_stop(d)

    asyncio.run(main())


def test_encrypted_client_key_through_a_secret(tmp_path: Path, pki: Path) -> None:
    """The nbd driver's tls-creds-x509 with ``passwordid``: the key's password comes from a
    secret object (here AES-encrypted under another secret, as libvirt passes it), through
    the registry; the server's tls-authz lets that client's DN in."""
    from blockmirror.block.drivers.nbd import NbdDriver  # noqa: F401  (registers the driver)
    from blockmirror.block.options import open_blockdev

    client = tmp_path / "enc"
    encrypted_client(pki, client, "/O=Example/CN=enc", "hunter2")
    assert b"ENCRYPTED" in (client / "client-key.pem").read_bytes()
    key, iv = b"K" * 32, b"I" * 16
    ct = subprocess.run(["openssl", "enc", "-aes-256-cbc", "-K", key.hex(), "-iv", iv.hex()],
                        input=b"hunter2", capture_output=True, check=True).stdout

    async def main() -> None:
        import base64

        server = Daemon()
        for opts in ({"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(pki / "server"),
                      "endpoint": "server"},
                     {"qom-type": "authz-simple", "id": "auth0", "identity": "O=Example,CN=enc"}):
            server.objects.add(create_object(server.objects, server.clock, opts))
        ram_node(server.graph, "n0", 1 << 20)
        port = free_port()
        await nq.nbd_server_start(server, {"addr": {"type": "inet", "data": {
            "host": "127.0.0.1", "port": str(port)}}, "tls-creds": "tls0",
            "tls-authz": "auth0"})
        await nq.block_export_add(server, {"type": "nbd", "id": "e0", "node-name": "n0",
                                           "name": "disk", "writable": True})
        d = Daemon()
        for opts in (
            {"qom-type": "secret", "id": "master", "data": base64.b64encode(key).decode(),
             "format": "base64"},
            {"qom-type": "secret", "id": "pw", "data": base64.b64encode(ct).decode(),
             "format": "base64", "keyid": "master", "iv": base64.b64encode(iv).decode()},
            {"qom-type": "secret", "id": "bad", "data": "wrong"},
            {"qom-type": "tls-creds-x509", "id": "c0", "dir": str(client), "endpoint": "client",
             "passwordid": "pw"},
            {"qom-type": "tls-creds-x509", "id": "c1", "dir": str(client), "endpoint": "client",
             "passwordid": "bad"},
        ):
            d.objects.add(create_object(d.objects, d.clock, opts))
        server_opts = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
        try:
            await open_blockdev(d.graph, {"driver": "nbd", "node-name": "c", "export": "disk",
                                          "server": server_opts, "tls-creds": "c0"})
            node = d.graph.nodes["c"]
            await node.write(0, b"through an encrypted key")
            assert await node.read(0, 24) == b"through an encrypted key"
            with pytest.raises(Exception, match="Cannot load certificate"):
                await open_blockdev(d.graph, {"driver": "nbd", "node-name": "c2",
                                              "export": "disk", "server": server_opts,
                                              "tls-creds": "c1"})
        finally:
            await d.shutdown()
            await nq.nbd_server_stop(server)

    asyncio.run(main())
