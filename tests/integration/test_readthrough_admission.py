"""Bounded, fair loads: an MGET of many missing keys neither floods Postgres nor starves other clients.

Every load goes through a SQL function that records, in a table (INSERT: no row lock shared between
loads), how many of this schema's loads were running in Postgres when it started
(pg_stat_activity). So the bound on concurrent queries and the order in which clients are served
are measured on the database side.
"""

from __future__ import annotations

import asyncio
import json
import threading

import asyncpg
import pytest
import redis

from tests.fixtures.helpers import metric_sum
from tests.fixtures.postgres import DSN, create_schema
from tests.fixtures.redis_server import free_port

SCHEMA_SQL = """
CREATE TABLE {s}.users (id bigint PRIMARY KEY, name text);
CREATE TABLE {s}.seen (seq bigserial, uid bigint, running int);
INSERT INTO {s}.users SELECT i, 'user ' || i FROM generate_series(1, 50) AS i;
CREATE FUNCTION {s}.get_user(uid bigint, pause float8) RETURNS SETOF {s}.users LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO {s}.seen (uid, running) SELECT uid, count(*) FROM pg_stat_activity
    WHERE state = 'active' AND query LIKE '%{s}.get_user(%';
  PERFORM pg_sleep(pause);
  RETURN QUERY SELECT * FROM {s}.users WHERE id = uid;
END $$;
"""

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120)]


class Loads:
    """The schema's load log: how many loads ran, in which order, and the most that ran at once."""

    def __init__(self, schema: str):
        self.schema = schema

    async def _fetch(self, sql: str):
        conn = await asyncpg.connect(DSN)
        try:
            return await conn.fetch(sql.format(s=self.schema))
        finally:
            await conn.close()

    def count(self) -> int:
        return asyncio.run(self._fetch("SELECT count(*) AS n FROM {s}.seen"))[0]["n"]

    def running(self) -> int:
        """Loads running in Postgres right now (a load's own log row shows only once it is done)."""
        return asyncio.run(self._fetch("SELECT count(*) AS n FROM pg_stat_activity WHERE state = 'active' "
                                       "AND query LIKE '%{s}.get_user(%'"))[0]["n"]

    def position(self, uid: int) -> int:
        """How many loads started before the first load of `uid`."""
        return asyncio.run(self._fetch(f"SELECT count(*) AS n FROM {{s}}.seen WHERE seq < "
                                       f"(SELECT min(seq) FROM {{s}}.seen WHERE uid = {uid})"))[0]["n"]

    def peak(self) -> int:
        return asyncio.run(self._fetch("SELECT max(running) AS n FROM {s}.seen"))[0]["n"]


@pytest.fixture
def loads():
    helper = Loads(create_schema(DSN, "adm", SCHEMA_SQL))
    yield helper
    asyncio.run(helper._fetch("DROP SCHEMA {s} CASCADE"))


def start(make_proxy, redis_server, loads, pause: float, max_pool: int, max_loads: int, **backend):
    admin = free_port()
    route = {"key": "user:{id:int}", "backend": "main",
             "read": {"query": f"SELECT id, name FROM {loads.schema}.get_user($1, {pause})", "as": "json"}}
    p = make_proxy(redis_server, backends={"main": {"type": "postgres", "dsn": DSN, "max_pool": max_pool,
                                                    **backend}},
                   routes=[route], limits={"max_loads_per_command": max_loads},
                   admin={"enabled": True, "port": admin})
    p.admin_port = admin
    return p


def wait_until(predicate, timeout: float, what: str) -> None:
    done = threading.Event()
    deadline = timeout
    while deadline > 0 and not predicate():
        done.wait(0.02)
        deadline -= 0.02
    assert predicate(), f"timed out waiting for {what}"


def test_another_clients_miss_gets_the_next_turn_during_a_huge_mget(loads, make_proxy, redis_server):
    """Client A's MGET of 1,200 missing keys queues 1,000 loads at once (max_loads_per_command 1000)
    behind a pool of 4; client B's single miss is served at the next free connection, not after
    A's queue, and Postgres never runs more than 4 of these loads at once."""
    p = start(make_proxy, redis_server, loads, pause=0.02, max_pool=4, max_loads=1000, queue_timeout=60)
    keys = [f"user:{100_000 + i}" for i in range(1200)]
    result: dict = {}

    def big_mget():
        try:
            result["values"] = p.client(protocol=2, socket_timeout=60).mget(keys)
        except Exception as exc:       # reported by the assertion below
            result["error"] = exc
    a = threading.Thread(target=big_mget)
    a.start()
    wait_until(lambda: loads.count() >= 40, timeout=20, what="client A's loads to run")
    before = loads.count()
    assert json.loads(p.client(protocol=2).get("user:7")) == {"id": 7, "name": "user 7"}
    served_meanwhile = loads.position(7) - before
    a.join(60)
    assert not a.is_alive() and "error" not in result, result.get("error")
    assert result["values"] == [None] * 1200
    # Fair turns: B's load started after a few more of A's (the time to send it, and one turn of
    # the 4 connections); first come, first served would put it after the ~950 A had queued.
    assert served_meanwhile <= 40, f"{served_meanwhile} more of A's loads started before B's single miss"
    assert loads.peak() <= 4, f"{loads.peak()} loads ran at once with max_pool 4"
    assert loads.count() == 1201


def test_one_mget_runs_at_most_max_loads_per_command(loads, make_proxy, redis_server):
    p = start(make_proxy, redis_server, loads, pause=0.05, max_pool=10, max_loads=3)
    values = p.client().mget([f"user:{i}" for i in range(1, 61)])
    assert [json.loads(v)["id"] if v else None for v in values] == list(range(1, 51)) + [None] * 10
    assert loads.count() == 60
    assert loads.peak() <= 3, f"{loads.peak()} loads of one MGET ran at once (max_loads_per_command 3)"


def test_a_saturated_pool_answers_busy_not_unavailable(loads, make_proxy, redis_server):
    p = start(make_proxy, redis_server, loads, pause=1.5, max_pool=1, max_loads=16, queue_timeout=0.3,
              connect_timeout=0.3)
    first = threading.Thread(target=lambda: p.client(protocol=2).get("user:1"))
    first.start()
    wait_until(lambda: loads.running() >= 1, timeout=10, what="the first load to hold the only connection")
    with pytest.raises(redis.ResponseError) as busy:
        p.client(protocol=2).get("user:2")
    first.join(10)
    assert str(busy.value).startswith("backend main busy: all 1 connections in use"), str(busy.value)
    assert metric_sum(p, 'cacheproxy_route_load_busy_total{route="user:{id:int}"}') == 1
    assert metric_sum(p, 'cacheproxy_backend_errors_total{backend="main"}') == 0, "the database did not fail"
    assert json.loads(p.client(protocol=2).get("user:2"))["id"] == 2, "served once a turn comes"


def test_a_write_through_finding_every_connection_taken_says_busy(loads, make_proxy, redis_server):
    """Writes do not queue for a turn like loads; when the pool itself has no free connection
    within connect_timeout, the client is told the pool is busy, not that Postgres is unavailable."""
    admin = free_port()
    s = loads.schema
    p = make_proxy(redis_server, backends={"main": {"type": "postgres", "dsn": DSN, "max_pool": 1,
                                                    "connect_timeout": 0.3}},
                   routes=[{"key": "user:{id:int}", "backend": "main",
                            "read": {"query": f"SELECT id, name FROM {s}.get_user($1, 1.5)", "as": "json"},
                            "write": {"mode": "write-through", "table": f"{s}.users", "key_columns": ["id"],
                                      "fields": ["name"]}}],
                   admin={"enabled": True, "port": admin})
    p.admin_port = admin
    first = threading.Thread(target=lambda: p.client(protocol=2).get("user:1"))
    first.start()
    wait_until(lambda: loads.running() >= 1, timeout=10, what="the load to hold the only connection")
    with pytest.raises(redis.ResponseError) as busy:
        p.client(protocol=2).set("user:3", json.dumps({"name": "three"}))
    first.join(10)
    assert str(busy.value) == "backend main busy: all 1 connections in use; none came free within 0.3s"
    assert p.client(protocol=2).set("user:3", json.dumps({"name": "three"})) is True
