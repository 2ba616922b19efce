"""Test certificates, made with the ``openssl`` CLI in the directory layout of QEMU's
tls-creds-x509 (``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``,
``client-cert.pem`` and ``client-key.pem``).

``make_ca`` writes a CA into a directory; ``signed`` and ``encrypted_client`` write a
certificate it signed, with the CA's certificate beside it, into a directory of its own (or
the CA's).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

#: the extensions of server and client certificates (``-extensions v3server|v3client``)
EXT = """\
[v3server]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
[v3client]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
"""


def ossl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


def make_ca(d: Path, subj: str) -> None:
    """A self-signed CA in ``d`` (and the extensions file its certificates use)."""
    (d / "ext.cnf").write_text(EXT)
    ossl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out",
         "ca-cert.pem", "-days", "2", "-subj", subj,
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _sign(ca: Path, out: Path, role: str, ext: str) -> None:
    ossl(ca, "x509", "-req", "-in", str(out / "req.csr"), "-CA", "ca-cert.pem", "-CAkey",
         "ca-key.pem", "-CAcreateserial", "-out", str(out / f"{role}-cert.pem"), "-days", "2",
         "-extfile", "ext.cnf", "-extensions", ext)
    if out != ca:
        (out / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())


def signed(ca: Path, out: Path, subj: str, ext: str) -> None:
    """A key and a certificate signed by the CA in ``ca``: a server's with ``ext``
    ``v3server``, else a client's."""
    out.mkdir(parents=True, exist_ok=True)
    role = "server" if ext == "v3server" else "client"
    ossl(ca, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(out / f"{role}-key.pem"),
         "-out", str(out / "req.csr"), "-subj", subj)
    _sign(ca, out, role, ext)


def encrypted_client(ca: Path, out: Path, subj: str, password: str) -> None:
    """A client certificate whose key is encrypted (AES-256) with ``password``."""
    out.mkdir(parents=True, exist_ok=True)
    key = str(out / "client-key.pem")
    ossl(ca, "genrsa", "-aes256", "-passout", f"pass:{password}", "-out", key, "2048")
    ossl(ca, "req", "-new", "-key", key, "-passin", f"pass:{password}", "-out",
         str(out / "req.csr"), "-subj", subj)
    _sign(ca, out, "client", "v3client")
