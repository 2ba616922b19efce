"""Listening unix sockets only their owner can connect to.

QEMU binds its QMP and NBD unix sockets under the process umask (the file gets
0777 & ~umask), so whether other local users may connect depends on how the daemon was
started: with umask 002 any member of the daemon's group can drive the monitor or write
the disk. A monitor is root-equivalent for the images it can open, so we do not inherit
that: every unix socket we listen on is made mode 0600 (owner read/write) before listen(),
whatever the umask. There is no window in which another user can connect: connect() to a
socket that is bound but not yet listening is refused. To share a socket with a group,
place it in a directory the group can enter and chmod it after start-up (as with QEMU's
chardevs, the daemon never widens permissions itself).
"""

from __future__ import annotations

import os
import socket

#: the mode of every unix socket we listen on (owner read/write only)
SOCKET_MODE = 0o600


def bind_unix(path: str) -> socket.socket:
    """A unix stream socket bound to ``path`` with SOCKET_MODE, not yet listening.

    Raises OSError from bind() or chmod() (the socket is closed and the file removed).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    try:
        os.chmod(path, SOCKET_MODE)
    except OSError:
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return sock


def listen_unix(path: str, backlog: int = 16) -> socket.socket:
    """``bind_unix`` then listen()."""
    sock = bind_unix(path)
    sock.listen(backlog)
    return sock


__all__ = ["SOCKET_MODE", "bind_unix", "listen_unix"]
