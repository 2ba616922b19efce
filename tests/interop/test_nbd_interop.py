"""NBD against real peers: QEMU's tools and libnbd's read and write through our export, and our
nbd driver reads and writes qemu-nbd's and nbdkit's exports, in clear text and over TLS with
certificates made here by the ``openssl`` CLI.

Every peer process is killed when its test ends (``peer`` context manager).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block.driver import BlockStatus
from blockmirror.block.drivers.nbd import NbdDriver
from blockmirror.block.node import BlockNode
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockMirrorError
from blockmirror.objects.factory import create_object
from blockmirror.qmp.commands import nbd as nq
from conftest import require_tool
from nbd_helpers import RamDriver, free_port, peer, ram_node, run, serve
from tls_certs import make_ca, signed

pytestmark = pytest.mark.interop

MiB = 1 << 20

def add_object(d: Daemon, qom_type: str, oid: str, **props: Any) -> None:
    """object-add without a monitor (the factory validates like QEMU)."""
    d.objects.add(create_object(d.objects, d.clock, {"qom-type": qom_type, "id": oid, **props}))


def make_certs(d: Path) -> Path:
    """A CA, a server and a client certificate in QEMU's tls-creds-x509 layout."""
    d.mkdir(parents=True, exist_ok=True)
    make_ca(d, "/CN=blockmirror-test-ca")
    for role in ("server", "client"):
        signed(d, d, "/CN=localhost", f"v3{role}")
    return d


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("openssl")
    return make_certs(tmp_path_factory.mktemp("certs"))


async def nbd_node(server: dict[str, Any], export: str, daemon: Daemon | None = None,
                   **extra: Any) -> BlockNode:
    d = daemon or Daemon()
    node = BlockNode(name=f"c{len(d.graph.nodes)}",
                     options={"server": server, "export": export, **extra},
                     discard_unmap=True)
    node.driver = NbdDriver(node)
    d.graph.add_node(node)
    await node.driver.open()
    return node


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


# --- QEMU / libnbd clients against our export ------------------------------------------------


def test_qemu_and_libnbd_tools_through_our_export(tmp_path: Path) -> None:
    require_tool("qemu-io", "qemu-img", "nbdinfo", "nbdcopy")

    async def main() -> None:
        async with serve(tmp_path, size=8 * MiB) as (d, sock):
            src = d.graph.nodes["n0"].driver
            assert isinstance(src, RamDriver)
            uri = f"nbd+unix:///disk?socket={sock}"
            out = await run("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 192k",
                            "-c", "write -z -u 1088k 64k", "-c", "read -P 0xab 1M 64k",
                            "-c", "read -P 0 1088k 64k", "-c", "flush", uri)
            assert "Pattern verification failed" not in out
            assert bytes(src.data[MiB : MiB + 65536]) == b"\xab" * 65536
            assert bytes(src.data[MiB + 65536 : MiB + 131072]) == bytes(65536)

            info = json.loads(await run("qemu-img", "info", "--output=json", "-f", "raw", uri))
            assert info["virtual-size"] == 8 * MiB

            mapped = json.loads(await run("qemu-img", "map", "--output=json", "-f", "raw", uri))
            data = [(m["start"], m["length"]) for m in mapped if m["data"]]
            assert data == [(MiB, 65536), (MiB + 131072, 65536)]

            nbdmap = await run("nbdinfo", "--map", uri)
            rows = [line.split() for line in nbdmap.splitlines()]
            assert [r[0] for r in rows if r[2] == "0"] == [str(MiB), str(MiB + 131072)]

            local = tmp_path / "copy.raw"
            await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(local))
            assert local.read_bytes() == bytes(src.data)
            assert "Images are identical" in await run(
                "qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(local))

            # writes into the export: qemu-img convert -n and nbdcopy
            img = tmp_path / "in.raw"
            img.write_bytes(pattern(8 * MiB, 3))
            await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(img), uri)
            assert bytes(src.data) == img.read_bytes()
            img.write_bytes(pattern(8 * MiB, 11))
            await run("nbdcopy", str(img), uri)
            assert bytes(src.data) == img.read_bytes()
            back = tmp_path / "back.raw"
            await run("nbdcopy", uri, str(back))
            assert back.read_bytes() == img.read_bytes()
            src.data[5 * MiB] ^= 1  # compare must see a one-bit difference
            out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(back),
                            check=False)
            assert "Content mismatch at offset 5242880!" in out

    asyncio.run(main())


def test_tls_export_with_qemu_and_libnbd_clients(tmp_path: Path, certs: Path) -> None:
    require_tool("qemu-io", "nbdinfo")

    async def main() -> None:
        d = Daemon()
        add_object(d, "tls-creds-x509", "tls0", dir=str(certs), endpoint="server")
        node = ram_node(d.graph, "n0", 4 * MiB)
        port = free_port()
        await nq.nbd_server_start(d, {"addr": {"type": "inet", "data": {
            "host": "127.0.0.1", "port": str(port)}}, "tls-creds": "tls0"})
        await nq.block_export_add(d, {"type": "nbd", "id": "e0", "node-name": "n0",
                                      "name": "disk", "writable": True})
        try:
            opts = (f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
                    "export=disk,tls-creds=tls0")
            obj = f"tls-creds-x509,id=tls0,dir={certs},endpoint=client"
            await run("qemu-io", "--object", obj, "--image-opts", opts,
                      "-c", "write -P 0x5c 64k 64k")
            assert isinstance(node.driver, RamDriver)
            assert bytes(node.driver.data[65536:131072]) == b"\x5c" * 65536
            out = await run("nbdinfo", f"nbds://127.0.0.1:{port}/disk?tls-certificates={certs}")
            assert "with TLS" in out
            # our own driver as the TLS client of our own server
            cd = Daemon()
            add_object(cd, "tls-creds-x509", "tls1", dir=str(certs), endpoint="client")
            c = await nbd_node({"type": "inet", "host": "127.0.0.1", "port": str(port)}, "disk",
                               cd, **{"tls-creds": "tls1"})
            assert await c.read(65536, 4) == b"\x5c" * 4
            await c.write(0, b"ours")
            assert bytes(node.driver.data[:4]) == b"ours"
            await c.driver.close()
            # a client without TLS is refused
            out = await run("qemu-io", "-f", "raw", "-c", "read 0 512",
                            f"nbd://127.0.0.1:{port}/disk", check=False)
            assert "TLS negotiation required before option" in out
        finally:
            await nq.nbd_server_stop(d)

    asyncio.run(main())


# --- our driver against qemu-nbd and nbdkit ----------------------------------------------------


async def exercise(node: BlockNode) -> None:
    """Writes, zeroes, reads and block status through our driver; checks what it reads back."""
    size = node.length()
    await node.write(MiB, pattern(256 * 1024, 5))
    await node.write(3 * MiB + 17, b"unaligned!", fua=True)
    await node.write_zeroes(MiB + 65536, 65536, may_unmap=True)
    await node.flush()
    expect = bytearray(pattern(256 * 1024, 5))
    expect[65536:131072] = bytes(65536)
    assert await node.read(MiB, 256 * 1024) == bytes(expect)
    assert await node.read(3 * MiB + 17, 10) == b"unaligned!"
    parts = await asyncio.gather(*(node.read(i * 65536, 65536) for i in range(size // 65536)))
    assert sum(len(p) for p in parts) == size
    ext = await node.block_status(2 * MiB, MiB)  # (qemu-nbd maps the first 4 KiB as data)
    assert ext.status & BlockStatus.ZERO and not ext.status & BlockStatus.DATA
    ext = await node.block_status(MiB, 65536)
    assert ext.status & BlockStatus.DATA


def test_our_driver_against_qemu_nbd(tmp_path: Path) -> None:
    require_tool("qemu-nbd", "qemu-img")

    async def main() -> None:
        img = tmp_path / "t.raw"
        await run("qemu-img", "create", "-f", "raw", str(img), "8M")
        sock = str(tmp_path / "q.sock")
        async with peer("qemu-nbd", "-f", "raw", "-k", sock, "-x", "exp", "-t", "-e", "4",
                        str(img), ready=sock):
            node = await nbd_node({"type": "unix", "path": sock}, "exp")
            assert node.length() == 8 * MiB
            await exercise(node)
            await node.driver.close()
            with pytest.raises(BlockMirrorError, match=r"^Requested export not available$"):
                await nbd_node({"type": "unix", "path": sock}, "nope")
        raw = img.read_bytes()
        assert raw[3 * MiB + 17 : 3 * MiB + 27] == b"unaligned!"
        assert raw[MiB : MiB + 65536] == pattern(65536, 5)
        with pytest.raises(BlockMirrorError, match=rf"^Failed to connect to '{sock}': "):
            await nbd_node({"type": "unix", "path": sock}, "exp")

    asyncio.run(main())


def test_our_driver_against_nbdkit_memory(tmp_path: Path) -> None:
    require_tool("nbdkit")

    async def main() -> None:
        port = free_port()
        async with peer("nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", "8M",
                        ready=port):
            node = await nbd_node({"type": "inet", "host": "127.0.0.1", "port": str(port)}, "")
            await exercise(node)
            await node.driver.close()

    asyncio.run(main())


def test_our_driver_over_tls_to_qemu_nbd_and_nbdkit(tmp_path: Path, certs: Path) -> None:
    require_tool("qemu-nbd", "nbdkit", "qemu-img")

    async def main() -> None:
        d = Daemon()
        add_object(d, "tls-creds-x509", "tls0", dir=str(certs), endpoint="client")
        img = tmp_path / "t.raw"
        await run("qemu-img", "create", "-f", "raw", str(img), "4M")
        port = free_port()
        async with peer("qemu-nbd", "--object",
                        f"tls-creds-x509,id=tls0,dir={certs},endpoint=server",
                        "--tls-creds", "tls0", "-b", "127.0.0.1", "-p", str(port), "-x", "exp",
                        "-t", "-f", "raw", str(img), ready=port):
            server = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
            node = await nbd_node(server, "exp", d, **{"tls-creds": "tls0"})
            await node.write(0, b"secret data")
            assert await node.read(0, 11) == b"secret data"
            await node.driver.close()
            with pytest.raises(BlockMirrorError, match="TLS negotiation required"):
                await nbd_node(server, "exp")  # no TLS: refused by the server
        assert img.read_bytes()[:11] == b"secret data"
        port = free_port()
        async with peer("nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--tls=require",
                        f"--tls-certificates={certs}", "--tls-verify-peer", "memory", "4M",
                        ready=port):
            server = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
            node = await nbd_node(server, "", d, **{"tls-creds": "tls0"})
            await exercise(node)
            await node.driver.close()

    asyncio.run(main())


def test_tls_psk_is_refused_with_a_clear_error(tmp_path: Path, certs: Path) -> None:
    d = Daemon()
    psk_dir = tmp_path / "psk"
    psk_dir.mkdir()
    (psk_dir / "keys.psk").write_text("user:0123\n")
    add_object(d, "tls-creds-psk", "psk0", dir=str(psk_dir), endpoint="server")

    async def main() -> None:
        with pytest.raises(BlockMirrorError, match="tls-creds-psk is not supported"):
            await nq.nbd_server_start(d, {"addr": {"type": "unix", "data": {"path": "/tmp/x"}},
                                          "tls-creds": "psk0"})
        add_object(d, "tls-creds-x509", "c0", dir=str(certs), endpoint="client")
        with pytest.raises(BlockMirrorError,
                           match=r"^Expected TLS credentials for a server endpoint$"):
            await nq.nbd_server_start(d, {"addr": {"type": "unix", "data": {"path": "/tmp/x"}},
                                          "tls-creds": "c0"})
        with pytest.raises(BlockMirrorError, match=r"^No TLS credentials with id 'nope'$"):
            await nq.nbd_server_start(d, {"addr": {"type": "unix", "data": {"path": "/tmp/x"}},
                                          "tls-creds": "nope"})

    asyncio.run(main())
