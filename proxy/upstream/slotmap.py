"""The cluster's slot map and redirects, sans-IO: CLUSTER SHARDS / CLUSTER SLOTS replies -> shards,
and MOVED/ASK error lines -> where to go. No sockets, no asyncio; cluster.py acts on the results.

A shard is (slot ranges, master (host, port), [replica (host, port) ...]); nodes that are not online
are left out. A node that announces no address ("?" or empty) is reached at the address that was asked.
"""

from __future__ import annotations

from typing import NamedTuple

SLOTS = 16384


class Redirect(NamedTuple):
    ask: bool           # ASK: this command only, after ASKING; MOVED: the slot has a new owner
    slot: int
    host: str
    port: int


def parse_redirect(reply: bytes) -> Redirect | None:
    """A -MOVED/-ASK error line as a Redirect; None when it is not one (or is malformed)."""
    if not reply.startswith((b"-MOVED ", b"-ASK ")):
        return None
    try:
        kind, slot_text, address = reply.split(b"\r\n", 1)[0].split(b" ")
        host, _, port = address.decode().rpartition(":")
        return Redirect(kind == b"-ASK", int(slot_text), host or "127.0.0.1", int(port))
    except ValueError:
        return None


def from_shards(reply: list, asked_host: str) -> list:
    shards = []
    for shard in reply:
        info = dict(zip(shard[::2], shard[1::2], strict=False))
        flat = info.get(b"slots") or []
        ranges = list(zip(flat[::2], flat[1::2], strict=False))
        master, replicas = None, []
        for node in info.get(b"nodes") or []:
            fields = dict(zip(node[::2], node[1::2], strict=False))
            if fields.get(b"health") != b"online":
                continue
            host = _host(fields.get(b"endpoint"), fields.get(b"ip"), asked_host)
            port = fields.get(b"port") or fields.get(b"tls-port")
            if port is None:
                continue
            if fields.get(b"role") == b"master":
                master = (host, int(port))
            else:
                replicas.append((host, int(port)))
        shards.append((ranges, master, replicas))
    return shards


def from_slots(reply: list, asked_host: str) -> list:
    shards = []
    for entry in reply:
        start, end, master, *replicas = entry
        shards.append(([(start, end)], (_host(master[0], None, asked_host), int(master[1])),
                       [(_host(r[0], None, asked_host), int(r[1])) for r in replicas]))
    return shards


def _host(endpoint, ip, asked_host: str) -> str:
    for value in (endpoint, ip):
        if value and value != b"?":
            return value.decode()
    return asked_host
