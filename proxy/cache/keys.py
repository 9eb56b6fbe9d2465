"""The proxy's own keys in the upstream: companions of a data key (lease, negative entry, pending
mark) and the reserved `cacheproxy:` namespace that clients may not touch.

A companion carries its data key's hash tag, so it lives in the same Redis Cluster slot and one
script can touch both.
"""

from __future__ import annotations

PREFIX = "cacheproxy"


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
