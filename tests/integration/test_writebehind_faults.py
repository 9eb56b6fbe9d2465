"""Write-behind under faults: Postgres down, the proxy SIGKILLed, two proxies sharing one queue."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.fixtures.helpers import metric_sum, wait_for
from tests.fixtures.postgres import make_schema
from tests.fixtures.writebehind import Writers, assert_every_ack_landed, queued, start

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(180)]


# How long Postgres stays down under the write load: several times the longest retry delay (2 s
# below), so the flusher's backoff reaches its cap and keeps retrying there, and longer than the
# claim timeout (2 s), while writes keep being acknowledged. CACHEPROXY_TEST_OUTAGE_S makes it longer.
OUTAGE_SECONDS = float(os.environ.get("CACHEPROXY_TEST_OUTAGE_S", "8"))


def test_postgres_down_under_write_load_loses_nothing(make_proxy, redis_server, throwaway_pg):
    pg = make_schema(throwaway_pg.dsn)
    p = start(make_proxy, redis_server, pg, dsn=throwaway_pg.dsn, retry_base_ms=100, retry_max_ms=2000,
              max_attempts=1000)
    with Writers(p, seconds=120, max_writes=1_000_000) as w:     # bounded: stopped when the block ends
        wait_for(lambda: w.count > 200, timeout=30, what="the write load")
        throwaway_pg.stop()
        down_at = w.count
        time.sleep(OUTAGE_SECONDS)
        assert w.count > down_at + 100, "writes must keep being acknowledged while Postgres is down"
        assert queued(redis_server.client()) > 0
        throwaway_pg.start()
        up_at = w.count
        wait_for(lambda: w.count > up_at + 100, timeout=30, what="writes after Postgres is back")
    assert not [e for e in w.errors], w.errors[:3]
    wait_for(lambda: queued(redis_server.client()) == 0, timeout=60, what="the queue to drain")
    assert_every_ack_landed(pg, w.acked)
    assert metric_sum(p, "cacheproxy_writebehind_retries_total") > 0
    assert metric_sum(p, "cacheproxy_writebehind_dead_lettered_total") == 0


def test_proxy_sigkilled_mid_load_then_restarted_loses_no_acknowledged_write(make_proxy, redis_server, pg):
    p = start(make_proxy, redis_server, pg, max_delay_ms=500, batch_size=500)
    with Writers(p, seconds=30) as w:
        wait_for(lambda: w.count > 2000, timeout=30, what="load")
        p.kill()
        w.stop.set()
    acked = dict(w.acked)
    assert queued(redis_server.client()) > 0, "the kill should leave writes queued"
    p.start()          # same port and config: the same consumer, which resumes its partitions
    wait_for(lambda: queued(redis_server.client()) == 0, timeout=60, what="the queue to drain")
    assert_every_ack_landed(pg, acked)
    direct = redis_server.client()
    db = {r["id"]: r["name"] for r in pg.rows("SELECT id, name FROM {s}.users")}
    for key in acked:
        assert json.loads(direct.get(f"user:{key}"))["name"] == db[key], "cache and database disagree"


def test_two_proxies_split_the_queue_and_claim_a_dead_ones_entries(make_proxy, redis_server, throwaway_pg):
    pg = make_schema(throwaway_pg.dsn)
    a = start(make_proxy, redis_server, pg, dsn=throwaway_pg.dsn, claim_idle_ms=1500)
    b = start(make_proxy, redis_server, pg, dsn=throwaway_pg.dsn, claim_idle_ms=1500)

    def owned(p) -> int:
        return int(metric_sum(p, "cacheproxy_writebehind_partitions_owned"))
    wait_for(lambda: owned(a) == 8 and owned(b) == 8, timeout=20, what="an even split of 16 partitions")
    throwaway_pg.stop()                  # writes queue up in both proxies' partitions
    ca, cb = a.client(protocol=2), b.client(protocol=2)
    for i in range(1, 201):
        (ca if i % 2 else cb).set(f"user:{i}", json.dumps({"name": f"w{i}", "email": f"{i}@x"}))
    direct = redis_server.client()

    def pending_by_consumer() -> dict[str, int]:
        out: dict[str, int] = {}
        for k in direct.scan_iter(match="cacheproxy:wb:{*}", _type="stream"):
            for consumer in direct.xpending(k, "cacheproxy")["consumers"]:
                out[consumer["name"]] = out.get(consumer["name"], 0) + consumer["pending"]
        return out
    # Both read (and hold pending) their partitions' entries: a's are what b must claim.
    wait_for(lambda: len([n for n in pending_by_consumer().values() if n > 0]) == 2, timeout=20,
             what="entries pending at both proxies")
    a.kill()
    throwaway_pg.start()
    wait_for(lambda: owned(b) == 16, timeout=20, what="b taking over a's partitions")
    wait_for(lambda: queued(direct) == 0, timeout=60, what="the queue to drain")
    db = {r["id"]: r["name"] for r in pg.rows("SELECT id, name FROM {s}.users")}
    assert all(db[i] == f"w{i}" for i in range(1, 201))


def test_sigterm_flushes_what_is_queued(make_proxy, redis_server, pg):
    p = start(make_proxy, redis_server, pg, max_delay_ms=60000, batch_size=10000)   # would wait a minute
    c = p.client(protocol=2)
    for i in range(1, 51):
        c.set(f"user:{i}", json.dumps({"name": f"t{i}", "email": f"{i}@x"}))
    assert queued(redis_server.client()) == 50
    assert p.stop() == 0
    assert queued(redis_server.client()) == 0
    assert all(pg.user(i)["name"] == f"t{i}" for i in range(1, 51))
