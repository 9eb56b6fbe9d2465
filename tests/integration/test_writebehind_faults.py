"""Write-behind under faults: Postgres down, the proxy SIGKILLed, two proxies sharing one queue."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from tests.integration.test_writebehind_postgres import make_schema, metric_sum, pg, queued, start, wait_for

__all__ = ["pg"]   # the fixture, shared with the Postgres write tests

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(180)]


class Writers:
    """Clients writing increasing sequence numbers to 200 keys; remembers the last acknowledged one."""

    def __init__(self, p, clients: int = 10, seconds: float = 30.0, max_writes: int = 20000):
        self.p = p
        self.acked: dict[int, int] = {}
        self.errors: list[Exception] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.count = 0
        self.deadline = time.monotonic() + seconds
        self.max_writes = max_writes
        self.threads = [threading.Thread(target=self._run, args=(n, clients)) for n in range(clients)]

    def _run(self, n: int, clients: int) -> None:
        c = self.p.client(protocol=2, socket_timeout=5)
        seq = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline and self.count < self.max_writes:
            seq += 1
            key = (seq * clients + n) % 200 + 1           # each key has exactly one writer: order is known
            value = json.dumps({"name": f"{n}:{seq}", "email": f"{seq}@x"})
            try:
                c.set(f"user:{key}", value)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                self.errors.append(exc)
                if self.stop.is_set():
                    return
                time.sleep(0.05)
                continue
            with self.lock:
                self.acked[key] = seq
                self.count += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def assert_every_ack_landed(pg, acked: dict[int, int]) -> None:
    db = {r["id"]: r["name"] for r in pg.rows("SELECT id, name FROM {s}.users")}
    for key, seq in acked.items():
        stored = int(db[key].split(":")[1]) if ":" in db[key] else -1
        assert stored >= seq, f"user:{key}: database has seq {stored}, acknowledged {seq}"


def test_postgres_down_20s_under_write_load_loses_nothing(make_proxy, redis_server, throwaway_pg):
    pg = make_schema(throwaway_pg.dsn)
    p = start(make_proxy, redis_server, pg, dsn=throwaway_pg.dsn, retry_base_ms=100, retry_max_ms=2000,
              max_attempts=1000)
    with Writers(p, seconds=60) as w:
        time.sleep(2)
        throwaway_pg.stop()
        down_at = w.count
        time.sleep(20)
        assert w.count > down_at + 100, "writes must keep being acknowledged while Postgres is down"
        assert queued(redis_server.client()) > 0
        throwaway_pg.start()
        time.sleep(2)
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
    time.sleep(1.5)                      # both read (and hold pending) their partitions' entries
    pending_a = sum(direct.xpending(k, "cacheproxy")["pending"]
                    for k in direct.scan_iter(match="cacheproxy:wb:{*}", _type="stream"))
    assert pending_a > 0
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
