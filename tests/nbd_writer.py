"""A blocking NBD client that writes and remembers what the server acknowledged.

Used by the crash matrix and the soak: a thread writes unique 4 KiB patterns at random
aligned offsets through an export, with a FLUSH every few writes, and records each write
(sent, acknowledged) and each acknowledged flush, so that after a crash the test knows which
content every block may hold: the last write made durable by an acknowledged flush (or the
initial content), or any write sent after it.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from dataclasses import dataclass, field

NBD_OPTS_MAGIC = 0x49484156454F5054
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
CMD_WRITE, CMD_FLUSH = 1, 3
BLOCK = 4096


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = s.recv(n - len(out))
        if not got:
            raise ConnectionError("closed")
        out += got
    return out


def connect(path: str, name: str = "disk", limit_s: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(limit_s)
    s.connect(path)
    if _recv(s, 18)[:16] != b"NBDMAGICIHAVEOPT":
        raise ConnectionError("not an NBD server")
    s.sendall(struct.pack(">I", 3))
    payload = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", NBD_OPTS_MAGIC, OPT_GO, len(payload)) + payload)
    while True:
        _, _, rep, length = struct.unpack(">QIII", _recv(s, 20))
        _recv(s, length)
        if rep == 1:
            return s
        if rep != 3:
            raise ConnectionError(f"option reply {rep:#x}")


@dataclass
class Write:
    seq: int
    offset: int
    data: bytes
    acked: bool = False
    durable: bool = False


@dataclass
class WriterLog:
    writes: list[Write] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: str | None = None

    def acceptable(self, initial: bytes, offset: int) -> set[bytes]:
        """Contents block ``offset`` may hold after a crash."""
        block = initial[offset:offset + BLOCK]
        ok = {block}
        with self.lock:
            mine = [w for w in self.writes if w.offset == offset]
        last_durable = max((i for i, w in enumerate(mine) if w.durable), default=-1)
        if last_durable >= 0:
            ok = {mine[last_durable].data}
        ok |= {w.data for w in mine[last_durable + 1:]}
        return ok

    def durable_count(self) -> int:
        with self.lock:
            return sum(w.durable for w in self.writes)


class NbdWriter(threading.Thread):
    """Writes until stopped or the connection dies (a crash); never raises."""

    def __init__(self, path: str, size: int, seed: int, flush_every: int = 4,
                 pace_s: float = 0.0, export: str = "disk") -> None:
        super().__init__(daemon=True)
        self.path = path
        self.export = export
        self.size = size
        self.rng = random.Random(seed)
        self.flush_every = flush_every
        self.pace_s = pace_s
        self.log = WriterLog()
        self.stop = threading.Event()
        self.started_writing = threading.Event()

    def run(self) -> None:
        try:
            s = connect(self.path, self.export)
        except OSError as e:
            self.log.error = f"connect: {e}"
            self.started_writing.set()
            return
        cookie = 0
        unflushed: list[Write] = []
        try:
            while not self.stop.is_set():
                cookie += 1
                seq = len(self.log.writes) + 1
                offset = self.rng.randrange(self.size // BLOCK) * BLOCK
                data = struct.pack(">QQ", seq, offset) * (BLOCK // 16)
                w = Write(seq, offset, data)
                with self.log.lock:
                    self.log.writes.append(w)  # sent (maybe applied) from here on
                s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, CMD_WRITE, cookie,
                                      offset, BLOCK) + data)
                magic, err, _ = struct.unpack(">IIQ", _recv(s, 16))
                if magic != NBD_SIMPLE_REPLY_MAGIC or err:
                    self.log.error = f"write error {err}"
                    return
                w.acked = True
                unflushed.append(w)
                self.started_writing.set()
                if len(unflushed) >= self.flush_every:
                    cookie += 1
                    s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, CMD_FLUSH, cookie,
                                          0, 0))
                    magic, err, _ = struct.unpack(">IIQ", _recv(s, 16))
                    if magic != NBD_SIMPLE_REPLY_MAGIC or err:
                        self.log.error = f"flush error {err}"
                        return
                    with self.log.lock:
                        for u in unflushed:
                            u.durable = True
                    unflushed.clear()
                if self.pace_s:
                    self.stop.wait(self.pace_s)
        except (OSError, struct.error):
            pass  # the daemon was killed: what was acknowledged is recorded
        finally:
            self.started_writing.set()
            s.close()
