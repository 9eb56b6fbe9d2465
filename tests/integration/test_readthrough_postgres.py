"""Read-through from Postgres through the proxy: misses load, hits don't, TTL policy, concurrency.

Every route reads through a SQL function that counts its calls in a table (tests/fixtures/postgres.py),
so "one backend query" is measured on the Postgres side, not inferred from the proxy.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import redis
import redis.asyncio

from tests.fixtures.helpers import route_metric, wait_for_lease
from tests.fixtures.ports import free_port
from tests.fixtures.postgres import DSN, routes_config


def start(make_proxy, redis_server, pg, routes, **overrides):
    admin_port = free_port()
    overrides.setdefault("admin", {"enabled": True, "port": admin_port})
    p = make_proxy(redis_server, backends={"main": {"type": "postgres", "dsn": DSN}}, routes=routes, **overrides)
    p.admin_port = overrides["admin"].get("port")
    return p


pytestmark = pytest.mark.proxy_only


def test_miss_loads_then_hits_from_cache(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg, ttl={"seconds": 120, "jitter": 0})])
    c = p.client(protocol=2)
    first = json.loads(c.get("user:7"))
    assert first == {"id": 7, "name": "user 7", "email": "u7@example.com", "score": 10.5, "nick": None}
    assert pg.calls() == 1
    assert json.loads(c.get("user:7")) == first
    assert pg.calls() == 1, "a hit must not query the database"
    direct = redis_server.client()
    assert json.loads(direct.get("user:7")) == first
    assert 115_000 < direct.pttl("user:7") <= 120_000
    assert route_metric(p, "cacheproxy_route_hits_total") == 1
    assert route_metric(p, "cacheproxy_route_misses_total") == 1


def test_unrouted_and_mistyped_keys_pass_through(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg)])
    c = p.client(protocol=3)
    assert c.get("user:abc") is None        # prefix matches, type does not: not routed
    assert c.get("other:1") is None
    assert pg.calls() == 0


def test_types_are_faithful(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg)])
    raw = p.client(protocol=2).get("user:1000")
    assert b"123456789012345678901234567890.123456789" in raw   # numeric keeps every digit
    row = json.loads(raw)
    assert row["name"] == "Zoë ☃ 日本" and row["nick"] is None


def test_hash_encoding_and_wrongtype(make_inproc_proxy, redis_server, pg):
    route = routes_config(pg, **{"as": "hash"})
    p = start(make_inproc_proxy, redis_server, pg, [route])
    c = p.client(protocol=3)
    assert c.hget("user:3", "name") == b"user 3"
    assert pg.calls() == 1
    assert c.hgetall("user:3")[b"email"] == b"u3@example.com"
    assert c.hmget("user:3", ["name", "missing"]) == [b"user 3", None]
    assert c.hexists("user:3", "nick") is False          # NULL columns are not stored
    assert c.hlen("user:4") == 4
    assert pg.calls() == 2
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        c.get("user:5")
    assert c.hgetall("user:999") == {}                    # not found
    assert c.hget("user:999", "name") is None


def test_string_encoding(make_inproc_proxy, redis_server, pg):
    route = routes_config(pg, **{"as": "string", "column": "email"})
    p = start(make_inproc_proxy, redis_server, pg, [route])
    assert p.client().get("user:9") == b"u9@example.com"


def test_mget_mixes_hits_misses_routed_and_unrouted(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg)])
    c = p.client(protocol=2)
    c.set("plain:1", "p1")
    c.get("user:1")                                        # already cached
    keys, expected = [], []
    for i in range(100):
        kind = i % 4
        if kind == 0:
            keys.append(f"user:{i + 1}")
            expected.append(f"user {i + 1}")
        elif kind == 1:
            keys.append(f"user:{5000 + i}")                 # no such row
            expected.append(None)
        elif kind == 2:
            keys.append("plain:1")
            expected.append("p1")
        else:
            keys.append(f"plain:missing:{i}")
            expected.append(None)
    values = c.mget(keys)
    names = [json.loads(v)["name"] if v and v.startswith(b"{") else (v.decode() if v else None) for v in values]
    assert names == expected
    assert pg.calls() == 1 + 25 + 25 - 1                   # user:1 was a hit


def test_negative_caching_one_query_for_many_gets(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg, ttl={"negative_seconds": 30})])
    c = p.client()
    for _ in range(50):
        assert c.get("user:424242") is None
    assert pg.calls() == 1
    assert route_metric(p, "cacheproxy_route_negative_hits_total") == 49
    assert c.exists("user:424242") == 0


@pytest.mark.timeout(60)
def test_single_flight_200_concurrent_gets_one_query(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg, slow=True)])

    async def burst():
        clients = [redis.asyncio.Redis(host="127.0.0.1", port=p.port, protocol=2) for _ in range(200)]
        try:
            return await asyncio.gather(*(cl.get("user:11") for cl in clients))
        finally:
            await asyncio.gather(*(cl.aclose() for cl in clients))

    values = asyncio.run(burst())
    assert all(json.loads(v)["id"] == 11 for v in values)
    assert pg.calls() == 1
    assert route_metric(p, "cacheproxy_route_singleflight_joins_total") >= 150


def test_jitter_spreads_expiries(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg, ttl={"seconds": 100, "jitter": 0.5})])
    c = p.client()
    for i in range(1, 41):
        c.get(f"user:{i}")
    ttls = [redis_server.client().pttl(f"user:{i}") for i in range(1, 41)]
    assert all(49_000 <= t <= 100_000 for t in ttls)
    assert max(ttls) - min(ttls) > 10_000, ttls           # spread, not one expiry for all


@pytest.mark.timeout(60)
def test_refresh_ahead_keeps_a_hot_key_from_missing(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg,
              [routes_config(pg, ttl={"seconds": 2, "jitter": 0, "refresh_ahead": 0.6})])
    c = p.client()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:                    # 5 s of a key whose TTL is 2 s
        assert json.loads(c.get("user:12"))["id"] == 12
        time.sleep(0.02)
    assert route_metric(p, "cacheproxy_route_misses_total") == 1, "the hot key expired and missed"
    assert route_metric(p, "cacheproxy_route_refresh_ahead_total") >= 2
    assert pg.calls() >= 3


@pytest.mark.timeout(30)
def test_write_during_slow_load_wins(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg, slow=True)])
    results = {}

    def reader():
        results["get"] = p.client().get("user:13")

    thread = threading.Thread(target=reader)
    thread.start()
    wait_for_lease(redis_server.client(), "user:13")       # the load is now waiting on Postgres
    p.client().set("user:13", "written-by-app")
    thread.join(10)
    assert results["get"] == b"written-by-app"
    time.sleep(0.2)
    assert redis_server.client().get("user:13") == b"written-by-app", "the fill overwrote a newer write"


@pytest.mark.timeout(30)
def test_delete_during_slow_load_is_not_resurrected(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg, slow=True)])
    thread = threading.Thread(target=lambda: p.client().get("user:14"))
    thread.start()
    wait_for_lease(redis_server.client(), "user:14")       # the load is now waiting on Postgres
    assert p.client().delete("user:14") == 0
    thread.join(10)
    time.sleep(0.2)
    assert redis_server.client().exists("user:14") == 0, "a fill resurrected a deleted key"


def test_several_rows_without_many_is_a_clear_error(make_inproc_proxy, redis_server, pg):
    route = {"key": "all:{id:int}", "backend": "main",
             "read": {"query": f"SELECT id FROM {pg.schema}.users WHERE id <= $1", "as": "json"}}
    many = {"key": "upto:{id:int}", "backend": "main",
            "read": {"query": f"SELECT id FROM {pg.schema}.users WHERE id <= $1 ORDER BY id", "as": "json",
                     "many": True}}
    p = start(make_inproc_proxy, redis_server, pg, [route, many])
    c = p.client()
    with pytest.raises(redis.ResponseError, match="many: true"):
        c.get("all:3")
    assert json.loads(c.get("upto:3")) == [{"id": 1}, {"id": 2}, {"id": 3}]


@pytest.mark.timeout(60)
def test_upstream_down_serves_routed_reads_from_the_backend(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg)])
    c = p.client(protocol=2)
    assert json.loads(c.get("user:15"))["id"] == 15
    redis_server.kill()
    value = None
    for _ in range(50):
        try:
            value = c.get("user:16")
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    assert json.loads(value)["id"] == 16
    with pytest.raises(redis.ResponseError, match="upstream unavailable"):
        c.set("plain", "x")
    redis_server.restart()
    for _ in range(100):
        try:
            if c.set("plain", "x"):
                break
        except (redis.ResponseError, redis.ConnectionError):
            time.sleep(0.1)
    assert json.loads(c.get("user:16"))["id"] == 16
    assert redis_server.client().exists("user:16") == 1     # cached again once the upstream is back


def test_wrong_parameter_count_stops_startup(redis_server, tmp_path, pg):
    from tests.fixtures.proxy import ProxyProcess
    p = ProxyProcess(redis_server, tmp_path / "bad", {
        "backends": {"main": {"type": "postgres", "dsn": DSN}},
        "routes": [{"key": "user:{id:int}", "backend": "main",
                    "read": {"query": f"SELECT * FROM {pg.schema}.users WHERE id = $1 AND name = $2",
                             "params": ["id"], "as": "json"}}]})
    with pytest.raises(Exception):   # noqa: B017 - any startup failure; the message is checked below
        p.start()
    p.stop()
    assert "routes[0]" in p.stderr_text() and "parameter" in p.stderr_text()


def test_ttl_getex_and_exists_load_a_missing_key(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg, ttl={"seconds": 100, "jitter": 0})])
    c = p.client(protocol=2)
    assert 95 <= c.ttl("user:21") <= 100                     # TTL of a missing routed key loads it first
    assert 95_000 <= c.pttl("user:22") <= 100_000
    assert json.loads(c.getex("user:23", ex=500))["id"] == 23
    assert 495 <= redis_server.client().ttl("user:23") <= 500  # GETEX's own option applied after the load
    assert c.exists("user:24", "user:999999", "plain:none") == 1
    assert c.ttl("user:999998") == -2                        # no such row: Redis' answer for a missing key
    assert pg.calls() == 6


def test_ttl_none_keeps_loaded_keys(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, [routes_config(pg, ttl="none")])
    p.client().get("user:25")
    assert redis_server.client().ttl("user:25") == -1
