"""/readyz under a flood: no false 503 while the data path holds every pooled connection, and the
number of backend pings stays bounded (one check at a time, reused for admin.readiness_cache_seconds,
on a connection of its own)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import pytest

from tests.fixtures.helpers import metric_sum
from tests.fixtures.redis_server import free_port

DSN = "postgresql://postgres@127.0.0.1:5432/test"

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(90)]


async def _sql(sql: str):
    conn = await asyncpg.connect(DSN)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


@pytest.fixture
def slow_schema():
    name = "rz_" + uuid.uuid4().hex[:10]
    asyncio.run(_sql(f"CREATE SCHEMA {name}"))
    asyncio.run(_sql(f"CREATE TABLE {name}.users AS SELECT i AS id, 'user ' || i AS name "
                     f"FROM generate_series(1, 10) i"))
    yield name
    asyncio.run(_sql(f"DROP SCHEMA {name} CASCADE"))


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_readyz_flood_while_loads_hold_the_pool(slow_schema, make_proxy, redis_server):
    admin = free_port()
    route = {"key": "slow:{id:int}", "backend": "main",
             "read": {"query": f"SELECT u.id, u.name FROM {slow_schema}.users u, pg_sleep(2.5) WHERE u.id = $1",
                      "as": "json"}}
    p = make_proxy(redis_server, backends={"main": {"type": "postgres", "dsn": DSN, "max_pool": 2}},
                   routes=[route], admin={"enabled": True, "port": admin, "readiness_cache_seconds": 1.0})
    p.admin_port = admin
    url = f"http://127.0.0.1:{admin}/readyz"
    assert status_of(url) == 200
    loaded: dict[int, object] = {}

    def cold_load(uid: int) -> None:
        loaded[uid] = json.loads(p.client(protocol=2).get(f"slow:{uid}"))
    loads = [threading.Thread(target=cold_load, args=(uid,)) for uid in (1, 2)]
    for t in loads:
        t.start()               # both pooled connections are now busy for 2.5 s
    started = time.monotonic()
    with ThreadPoolExecutor(8) as flood:
        statuses = list(flood.map(status_of, [url] * 320))
    elapsed = time.monotonic() - started
    for t in loads:
        t.join(10)
    assert statuses.count(200) == 320, f"{statuses.count(503)} false 503s while Postgres was up"
    assert loaded == {1: {"id": 1, "name": "user 1"}, 2: {"id": 2, "name": "user 2"}}
    checks = metric_sum(p, "cacheproxy_readiness_checks_total")
    assert metric_sum(p, "cacheproxy_readiness_requests_total") == 321
    assert checks <= elapsed / 1.0 + 3, f"{checks} readiness checks for 321 requests in {elapsed:.1f}s"
    probes = asyncio.run(_sql("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = "
                              "'cacheproxy-readiness'"))[0]["n"]
    assert probes == 1, "readiness pings run on one connection of their own"
