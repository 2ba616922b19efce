"""The sans-IO NBD codec shared by the export (server) and the nbd block driver (client).

``handshake`` (server role) and ``handshake_client`` negotiate; ``transmission`` encodes and
decodes requests and replies; ``constants`` holds the wire numbers; ``tls`` builds SSL contexts
from QEMU-style credential objects. Nothing in this package opens a socket.
"""

from __future__ import annotations

from blockmirror.nbd.handshake import ExportInfo, Negotiated, ServerHandshake, StartTLS
from blockmirror.nbd.handshake_client import ClientHandshake
from blockmirror.nbd.transmission import ReplyDecoder, Request, RequestDecoder
from blockmirror.nbd.wire import NBDProtocolError

__all__ = [
    "ClientHandshake",
    "ExportInfo",
    "NBDProtocolError",
    "Negotiated",
    "ReplyDecoder",
    "Request",
    "RequestDecoder",
    "ServerHandshake",
    "StartTLS",
]
