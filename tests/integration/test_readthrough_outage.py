"""Postgres stopped under a running proxy: clear errors, other keys unaffected, recovery by itself;
and stale-if-error serving the last value while the database is away."""

from __future__ import annotations

import json
import time

import pytest
import redis

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120)]


def start(make_proxy, redis_server, pg, ttl=None):
    pg.execute("CREATE TABLE IF NOT EXISTS users (id bigint PRIMARY KEY, name text);"
               "INSERT INTO users SELECT i, 'user ' || i FROM generate_series(1, 10) i ON CONFLICT DO NOTHING")
    route = {"key": "user:{id:int}", "backend": "main",
             "read": {"query": "SELECT id, name FROM users WHERE id = $1", "as": "json"}}
    if ttl:
        route["ttl"] = ttl
    return make_proxy(redis_server, backends={"main": {"type": "postgres", "dsn": pg.dsn, "connect_timeout": 1,
                                                       "statement_timeout_ms": 2000}},
                      routes=[route])


def test_postgres_stopped_then_restarted(make_inproc_proxy, redis_server, throwaway_pg):
    p = start(make_inproc_proxy, redis_server, throwaway_pg)
    c = p.client(protocol=2)
    assert json.loads(c.get("user:1"))["name"] == "user 1"
    throwaway_pg.stop()
    started = time.monotonic()
    with pytest.raises(redis.ResponseError, match="backend main unavailable"):
        c.get("user:2")
    assert time.monotonic() - started < 10
    assert json.loads(c.get("user:1"))["name"] == "user 1"     # cached keys still hit
    assert c.set("plain", "ok") is True                         # other commands unaffected
    assert redis_server.client().exists("user:2") == 0          # the failure cached nothing
    throwaway_pg.start()
    value, deadline = None, time.monotonic() + 20
    while value is None and time.monotonic() < deadline:
        try:
            value = c.get("user:2")
        except redis.ResponseError:
            time.sleep(0.2)
    assert json.loads(value)["name"] == "user 2", "the proxy did not recover once Postgres was back"
    assert "Traceback" not in p.stderr_text()


def test_stale_if_error_serves_the_last_value(make_inproc_proxy, redis_server, throwaway_pg):
    p = start(make_inproc_proxy, redis_server, throwaway_pg, ttl={"seconds": 1, "jitter": 0, "stale_if_error": 30})
    c = p.client()
    assert json.loads(c.get("user:3"))["name"] == "user 3"
    throwaway_pg.stop()
    time.sleep(1.5)                                             # past the TTL, inside the stale window
    assert json.loads(c.get("user:3"))["name"] == "user 3"
    with pytest.raises(redis.ResponseError, match="backend main unavailable"):
        c.get("user:4")                                         # nothing stale to serve for this one
    assert "Traceback" not in p.stderr_text()
