"""Read-through routes (Postgres) with the proxy in front of a Redis Cluster.

The loader's keys (leases, negative entries) carry the data key's hash tag, so every script runs in
the data key's slot; these tests check that loads, hits, multi-key reads and writes work whichever
node a key lives on.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import redis
import redis.asyncio

from tests.fixtures.helpers import wait_for_lease
from tests.fixtures.postgres import DSN, routes_config
from tests.fixtures.redis_cluster import cluster_proxy

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120), pytest.mark.xdist_group("shared_cluster")]


def start(make_proxy, cluster, pg, routes, **overrides):
    return cluster_proxy(make_proxy, cluster, backends={"main": {"type": "postgres", "dsn": DSN}},
                         routes=routes, **overrides)


def test_misses_load_on_every_node(make_inproc_proxy, shared_cluster, pg):
    p = start(make_inproc_proxy, shared_cluster, pg, [routes_config(pg, ttl={"seconds": 120, "jitter": 0})])
    c = p.client(protocol=2)
    for i in range(1, 61):
        assert json.loads(c.get(f"user:{i}"))["name"] == f"user {i}"
    assert pg.calls() == 60
    for i in range(1, 61):
        assert json.loads(c.get(f"user:{i}"))["id"] == i
    assert pg.calls() == 60, "hits must not query the database"
    ports = {shared_cluster.node_for_key(f"user:{i}").port for i in range(1, 61)}
    assert len(ports) == 3, "the routed keys live on every master"
    direct = shared_cluster.direct()
    assert json.loads(direct.get("user:42"))["id"] == 42
    assert 0 < direct.pttl("user:42") <= 120_000


def test_mget_exists_and_negative_cache_across_slots(make_inproc_proxy, shared_cluster, pg):
    p = start(make_inproc_proxy, shared_cluster, pg, [routes_config(pg, ttl={"negative_seconds": 30})])
    c = p.client(protocol=3)
    c.set("plain:1", "p1")
    keys = [f"user:{i}" for i in range(1, 31)] + [f"user:{9000 + i}" for i in range(10)] + ["plain:1", "plain:2"]
    values = c.mget(keys)
    assert [json.loads(v)["id"] for v in values[:30]] == list(range(1, 31))
    assert values[30:] == [None] * 10 + [b"p1", None]
    assert pg.calls() == 40
    assert c.mget(keys)[:30] == values[:30]
    assert pg.calls() == 40
    for _ in range(5):
        assert c.get("user:9001") is None            # negatively cached: no query
    assert pg.calls() == 40
    assert c.exists("user:31", "user:32", "user:9999", "plain:1") == 3
    assert pg.calls() == 43


def test_writes_and_deletes_void_leases_across_slots(make_inproc_proxy, shared_cluster, pg):
    p = start(make_inproc_proxy, shared_cluster, pg, [routes_config(pg)])
    c = p.client(protocol=2)
    assert json.loads(c.get("user:5"))["id"] == 5
    assert c.set("user:5", "app-value") is True
    assert c.get("user:5") == b"app-value"
    assert c.mset({"user:6": "six", "user:7": "seven", "plain:x": "x"}) is True
    assert c.mget("user:6", "user:7", "plain:x") == [b"six", b"seven", b"x"]
    assert c.delete("user:5", "user:6", "user:7", "plain:x") == 4
    assert json.loads(c.get("user:6"))["id"] == 6      # loaded again after the delete


@pytest.mark.timeout(60)
def test_single_flight_and_fill_guard_on_cluster(make_inproc_proxy, shared_cluster, pg):
    p = start(make_inproc_proxy, shared_cluster, pg, [routes_config(pg, slow=True)])

    async def burst():
        clients = [redis.asyncio.Redis(host="127.0.0.1", port=p.port, protocol=2) for _ in range(100)]
        try:
            return await asyncio.gather(*(cl.get("user:11") for cl in clients))
        finally:
            await asyncio.gather(*(cl.aclose() for cl in clients))

    values = asyncio.run(burst())
    assert all(json.loads(v)["id"] == 11 for v in values)
    assert pg.calls() == 1
    # A delete while a load waits on Postgres: the fill must not resurrect the key.
    thread = threading.Thread(target=lambda: p.client().get("user:14"))
    thread.start()
    wait_for_lease(shared_cluster.direct(), "user:14")     # the load is now waiting on Postgres
    assert p.client().delete("user:14") == 0
    thread.join(10)
    time.sleep(0.2)
    assert shared_cluster.direct().exists("user:14") == 0


def test_hash_route_on_cluster(make_inproc_proxy, shared_cluster, pg):
    p = start(make_inproc_proxy, shared_cluster, pg, [routes_config(pg, **{"as": "hash"})])
    c = p.client(protocol=3)
    for i in (3, 4, 5, 6):
        assert c.hget(f"user:{i}", "name") == f"user {i}".encode()
    assert c.hgetall("user:3")[b"email"] == b"u3@example.com"
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        c.get("user:5")
