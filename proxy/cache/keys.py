"""The proxy's own keys in the upstream: companions of a data key (lease, negative entry, pending
mark) and the reserved `cacheproxy:` namespace that clients may not touch.

A companion carries its data key's hash tag, so it lives in the same Redis Cluster slot and one
script can touch both.
"""

from __future__ import annotations

PREFIX = "cacheproxy"
RESERVED = b"cacheproxy:"
# Cache state that FLUSHALL/FLUSHDB through the proxy clears with the data; the rest of the reserved
# namespace (the write-behind queue, pending marks, ownership) survives them.
CACHE_STATE = (b"cacheproxy:lease:", b"cacheproxy:neg:")
PENDING = b"cacheproxy:pend:"


def reserved_prefixes(stream_prefix: str) -> tuple[bytes, ...]:
    """Key prefixes clients may not touch: the proxy's namespace and the write-behind queue's."""
    queue = stream_prefix.encode() + b":"
    return (RESERVED,) if queue.startswith(RESERVED) else (RESERVED, queue)


def reserved_in(data: bytes, prefixes: tuple[bytes, ...]) -> bool:
    """Could `data` (a client's request bytes) name a reserved key? A cheap test before the exact one."""
    for prefix in prefixes:
        if prefix in data:
            return True
    return False


def hash_tag(key: bytes) -> bytes:
    """The part of a key Redis Cluster hashes: the first non-empty {...}, else the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def companion(kind: str, key: bytes) -> bytes:
    """A proxy-owned key in the same cluster slot as `key`, e.g. cacheproxy:lease:{user:42}."""
    return b"%s:%s:{%s}:%s" % (PREFIX.encode(), kind.encode(), hash_tag(key), key)
