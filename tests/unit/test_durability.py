"""upstream/durability.py: what the eviction policy and persistence settings mean for the queue."""

from __future__ import annotations

import pytest

from proxy.upstream.durability import OK, UNKNOWN, UNSAFE, NodeSettings, assess, parse_info


def states(**settings) -> dict[str, str]:
    return {f.aspect: f.state for f in assess(NodeSettings("h:1", **settings))}


@pytest.mark.parametrize("policy, maxmemory, state", [
    ("noeviction", 100, OK),
    ("volatile-lru", 100, OK),          # the queue's keys carry no TTL
    ("volatile-ttl", 100, OK),
    ("allkeys-lru", 100, UNSAFE),
    ("allkeys-random", None, UNSAFE),   # maxmemory unknown: assume it is set
    ("allkeys-lfu", 0, OK),             # no maxmemory: nothing is ever evicted
    (None, 100, UNKNOWN),
])
def test_eviction(policy, maxmemory, state):
    assert states(policy=policy, maxmemory=maxmemory, appendonly=True)["eviction"] == state


@pytest.mark.parametrize("settings, state, words", [
    ({"appendonly": True, "replicas": 0, "save": ""}, OK, "appendonly yes"),
    ({"appendonly": False, "replicas": 2, "save": ""}, OK, "2 connected replica(s)"),
    ({"appendonly": False, "replicas": 0, "save": "3600 1"}, UNSAFE, "RDB snapshots only"),
    ({"appendonly": False, "replicas": 0, "save": ""}, UNSAFE, "loses every queued write"),
    ({"appendonly": False, "replicas": 0, "save": None}, UNSAFE, "snapshot schedule could not be read"),
    ({"appendonly": None, "replicas": 0}, UNKNOWN, "could not be read"),
])
def test_persistence(settings, state, words):
    finding = next(f for f in assess(NodeSettings("h:1", policy="noeviction", **settings))
                   if f.aspect == "persistence")
    assert finding.state == state and words in finding.message and finding.message.startswith("h:1: ")
    if state == UNSAFE:
        assert "fix: CONFIG SET appendonly yes" in finding.message


def test_parse_info():
    text = "# Memory\r\nmaxmemory:0\r\nmaxmemory_policy:noeviction\r\n\r\n# Replication\r\nconnected_slaves:1\r\n"
    assert parse_info(text) == {"maxmemory": "0", "maxmemory_policy": "noeviction", "connected_slaves": "1"}
