"""qapi/sockets.json: socket addresses (the flat union, and the legacy one of nbd-server-start)."""

from __future__ import annotations

from blockmirror.qapi.schema import enum, struct, union

enum("SocketAddressType", ["inet", "unix", "vsock", "fd"])
struct("InetSocketAddress", {
    "host": "str", "port": "str", "*numeric": "bool", "*to": "uint16", "*ipv4": "bool",
    "*ipv6": "bool", "*keep-alive": "bool", "*mptcp": "bool",
})
struct("UnixSocketAddress", {"path": "str", "*abstract": "bool", "*tight": "bool"})
struct("VsockSocketAddress", {"cid": "str", "port": "str"})
struct("String", {"str": "str"})
union("SocketAddress", {"type": "SocketAddressType"}, "type", {
    "inet": "InetSocketAddress", "unix": "UnixSocketAddress", "vsock": "VsockSocketAddress",
    "fd": "String",
})

# the legacy ("simple union") form: {"type": ..., "data": {...}}
enum("SocketAddressLegacyType", ["inet", "unix", "vsock", "fd"])
struct("InetSocketAddressWrapper", {"data": "InetSocketAddress"})
struct("UnixSocketAddressWrapper", {"data": "UnixSocketAddress"})
struct("VsockSocketAddressWrapper", {"data": "VsockSocketAddress"})
struct("StringWrapper", {"data": "String"})
union("SocketAddressLegacy", {"type": "SocketAddressLegacyType"}, "type", {
    "inet": "InetSocketAddressWrapper", "unix": "UnixSocketAddressWrapper",
    "vsock": "VsockSocketAddressWrapper", "fd": "StringWrapper",
})
