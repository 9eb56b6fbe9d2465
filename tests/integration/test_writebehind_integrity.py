"""Write-behind integrity: an older value never lands over a newer one, and nothing acknowledged is
lost or reverted, when partitions change owner, an owner is paused, the database is out for longer
than any retry budget, a row is refused, or the upstream goes away and comes back with its data.

Durations are small parameters (claim_idle_ms 1000, locks of a few seconds) so the tests stay quick.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import asyncpg
import pytest

from tests.fixtures.helpers import metric_sum, wait_for
from tests.fixtures.postgres import DSN, make_schema
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.writebehind import queued, start

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(180)]

FAST = {"claim_idle_ms": 1000, "retry_base_ms": 100, "retry_max_ms": 400}


def doc(i: int, tag: str) -> str:
    return json.dumps({"name": f"{tag}-{i}", "email": f"{i}@{tag}.x"})


class TableLock:
    """Holds `LOCK TABLE ... IN EXCLUSIVE MODE` (writes wait, reads go on) from another connection,
    in a thread, until release() (or the with-block ends)."""

    def __init__(self, dsn: str, table: str):
        self.dsn, self.table = dsn, table
        self._held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)

    async def _hold(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {self.table} IN EXCLUSIVE MODE")
                self._held.set()
                while not self._release.is_set():
                    await asyncio.sleep(0.02)
        finally:
            await conn.close()

    def __enter__(self) -> TableLock:
        self._thread.start()
        assert self._held.wait(10), "could not lock the table"
        return self

    def release(self) -> None:
        self._release.set()
        self._thread.join(10)

    def __exit__(self, *exc) -> None:
        self.release()


def names(pg) -> dict[int, str]:
    return {r["id"]: r["name"] for r in pg.rows("SELECT id, name FROM {s}.users")}


def pending_entries(r) -> int:
    return sum(r.xpending(k, "cacheproxy")["pending"] for k in r.scan_iter(match="cacheproxy:wb:{*}", _type="stream"))


def dead_letters(r) -> int:
    return r.xlen("cacheproxy:wb:dead") if r.exists("cacheproxy:wb:dead") else 0


# ------------------------------------------------------------------------------------ owner changes

def test_owner_change_while_the_table_is_locked_lands_the_newest_value(make_proxy, redis_server, pg):
    """The issue's scenario, scaled down: table locked for longer than claim_idle_ms, 200 keys set to
    v1 through one proxy, a second proxy starts and sets them to v2, the table is unlocked."""
    keys = range(1, 201)
    a = start(make_proxy, redis_server, pg, statement_timeout_ms=1000, **FAST)
    with TableLock(pg.dsn, f"{pg.schema}.users") as lock:
        locked_at = time.monotonic()
        ca = a.client(protocol=2)
        for i in keys:
            ca.set(f"user:{i}", doc(i, "v1"))
        time.sleep(1.5)                       # a's batches wait on the lock for longer than claim_idle_ms
        b = start(make_proxy, redis_server, pg, statement_timeout_ms=1000, **FAST)
        cb = b.client(protocol=2)
        for i in keys:
            cb.set(f"user:{i}", doc(i, "v2"))
        time.sleep(max(0.0, 4.0 - (time.monotonic() - locked_at)))
        lock.release()
    direct = redis_server.client()
    wait_for(lambda: queued(direct) == 0, timeout=60, what="the queue to drain")
    db = names(pg)
    stale = [i for i in keys if db[i] != f"v2-{i}"]
    assert not stale, f"{len(stale)} of 200 rows hold an older value, e.g. user:{stale[0]} = {db[stale[0]]!r}"
    assert all(json.loads(cb.get(f"user:{i}"))["name"] == f"v2-{i}" for i in keys)
    assert dead_letters(direct) == 0


def test_a_paused_owner_does_not_overwrite_newer_writes(make_proxy, redis_server, pg):
    """SIGSTOP the owner while it holds a batch (past claim_idle_ms), let a second proxy take over and
    land newer values, SIGCONT the first: it must not write its older batch over them."""
    keys = range(1, 51)
    direct = redis_server.client()
    a = start(make_proxy, redis_server, pg, statement_timeout_ms=1000, **FAST)
    with TableLock(pg.dsn, f"{pg.schema}.users") as lock:
        ca = a.client(protocol=2)
        for i in keys:
            ca.set(f"user:{i}", doc(i, "v1"))
        wait_for(lambda: pending_entries(direct) > 0, what="a to read its batches")
        time.sleep(0.3)               # (a partition's batch waiting on the lock reads no further)
        os.kill(a.pid, signal.SIGSTOP)
        try:
            time.sleep(2.5)        # a's leases lapse; its statement times out and its session is ended
            b = start(make_proxy, redis_server, pg, statement_timeout_ms=1000, **FAST)
            wait_for(lambda: metric_sum(b, "cacheproxy_writebehind_partitions_owned") == 16, timeout=20,
                     what="b to own every partition")
            lock.release()
            wait_for(lambda: queued(direct) == 0, timeout=30, what="b to land a's claimed entries")
            cb = b.client(protocol=2)
            for i in keys:
                cb.set(f"user:{i}", doc(i, "v2"))
            wait_for(lambda: queued(direct) == 0 and all(n == f"v2-{i}" for i, n in names(pg).items() if i in keys),
                     timeout=30, what="b to land v2")
        finally:
            os.kill(a.pid, signal.SIGCONT)
    time.sleep(3.0)                  # a wakes up with its batch of v1 in hand, retries, and must give up
    db = names(pg)
    stale = [i for i in keys if db[i] != f"v2-{i}"]
    assert not stale, f"the paused owner wrote {len(stale)} older rows over newer ones, e.g. user:{stale[0]}"
    assert all(json.loads(cb.get(f"user:{i}"))["name"] == f"v2-{i}" for i in keys)
    assert a.alive
    assert metric_sum(a, "cacheproxy_writebehind_leases_lost_total") > 0


# ------------------------------------------------------------------------------------ outages

@pytest.mark.parametrize("outage", ["locked", "stopped"])
def test_an_outage_longer_than_max_attempts_loses_and_reverts_nothing(make_proxy, redis_server, throwaway_pg,
                                                                     outage):
    """max_attempts 3 and an outage of several seconds: every acknowledged write stays readable
    (never reverted to the old row) and lands once the database is back; no dead letters. 'locked':
    a table lock with lock_timeout (55P03) and statement timeouts; 'stopped': connection refused."""
    keys = range(1, 101)
    pg_ = make_schema(throwaway_pg.dsn)
    dsn = throwaway_pg.dsn + ("?lock_timeout=200" if outage == "locked" else "")
    p = start(make_proxy, redis_server, pg_, dsn=dsn, max_attempts=3, statement_timeout_ms=1000,
              retry_base_ms=50, retry_max_ms=300)
    c, direct = p.client(protocol=2), redis_server.client()
    lock = TableLock(throwaway_pg.dsn, f"{pg_.schema}.users") if outage == "locked" else None
    if lock:
        lock.__enter__()
    else:
        throwaway_pg.stop()
    try:
        for i in keys:
            assert c.set(f"user:{i}", doc(i, "acked")) is True
        time.sleep(4.0)         # dozens of attempts at 50-300 ms: far past max_attempts
        reverted = [i for i in keys if json.loads(c.get(f"user:{i}"))["name"] != f"acked-{i}"]
        assert not reverted, f"{len(reverted)} acknowledged writes reverted for readers, e.g. user:{reverted[0]}"
        assert dead_letters(direct) == 0
        assert queued(direct) == len(keys)
        wait_for(lambda: metric_sum(p, "cacheproxy_writebehind_retrying_seconds") > 1, what="the alert gauge")
        assert metric_sum(p, "cacheproxy_writebehind_retries_total") > 3
    finally:
        if lock:
            lock.release()
        else:
            throwaway_pg.start()
    wait_for(lambda: queued(direct) == 0, timeout=60, what="the queue to drain")
    db = names(pg_)
    assert all(db[i] == f"acked-{i}" for i in keys)
    assert dead_letters(direct) == 0
    wait_for(lambda: metric_sum(p, "cacheproxy_writebehind_retrying_seconds") == 0, what="the gauge to clear")
    log = p.stderr_text()
    assert "retrying without limit" in log and "recovered after" in log
    assert log.count("retrying without limit") <= 4, "failures are logged at a bounded rate"


def test_a_refused_row_is_dead_lettered_alone_after_an_outage(make_proxy, redis_server, pg):
    """A lock (transient) first, then one row the database refuses in the same batch as 20 good ones:
    only that row goes to the dead letters."""
    direct = redis_server.client()
    p = start(make_proxy, redis_server, pg, dsn=DSN + "?lock_timeout=200", partitions=1, max_delay_ms=300,
              max_attempts=2, statement_timeout_ms=1000, retry_base_ms=50, retry_max_ms=200)
    c = p.client(protocol=2)
    with TableLock(pg.dsn, f"{pg.schema}.users"):
        for i in range(1, 21):
            c.set(f"user:{i}", doc(i, "good"))
        c.set("user:21", json.dumps({"name": "bad", "email": "no-at-sign"}))     # violates the CHECK
        time.sleep(2.0)
        assert dead_letters(direct) == 0, "an unavailable database must not dead-letter anything"
    wait_for(lambda: queued(direct) == 0, timeout=30, what="the queue to drain")
    db = names(pg)
    assert all(db[i] == f"good-{i}" for i in range(1, 21))
    assert db[21] == "user 21"
    assert dead_letters(direct) == 1
    assert b"CheckViolation" in direct.xrange("cacheproxy:wb:dead")[0][1][b"error"]
    assert json.loads(c.get("user:21"))["name"] == "user 21", "the refused value left the cache"


# ------------------------------------------------------------------------------------ upstream back with its data

@pytest.fixture
def persistent_redis(tmp_path):
    server = RedisServer(tmp_path / "redis-aof", extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_write_through_fallback_is_not_overwritten_by_older_queued_entries(make_proxy, persistent_redis, pg):
    """The upstream goes away with a write still queued, a SET falls back to write-through, the
    upstream comes back with its data: the older queued entry must not land over the newer write."""
    direct = persistent_redis.client()
    p = start(make_proxy, persistent_redis, pg, statement_timeout_ms=1000, **FAST)
    c = p.client(protocol=2)
    with TableLock(pg.dsn, f"{pg.schema}.users"):
        assert c.set("user:1", doc(1, "queued")) is True
        wait_for(lambda: pending_entries(direct) == 1, what="the flusher to hold the entry")
        persistent_redis.stop()                  # SIGTERM: the data (AOF) survives
    assert c.set("user:1", doc(1, "through")) is True      # no upstream: written through to Postgres
    assert names(pg)[1] == "through-1"
    persistent_redis.start()                     # back, with the older entry still queued
    direct = persistent_redis.client()
    wait_for(lambda: queued(direct) == 0, timeout=30, what="the older entry to be flushed")
    time.sleep(0.5)
    assert names(pg)[1] == "through-1", "an older queued write landed over the write-through"
    assert json.loads(c.get("user:1"))["name"] == "through-1", "readers must see the newer write"
    assert metric_sum(p, "cacheproxy_writebehind_superseded_total") >= 1


def test_entries_left_in_another_consumers_pending_list_are_taken_over(make_proxy, redis_server, pg):
    """A former owner paused between its lease check and its read leaves entries in its own pending
    list; the partition's owner must take them over (and land them) while it keeps the partition."""
    p = start(make_proxy, redis_server, pg, partitions=1, **FAST)
    direct = redis_server.client()
    c = p.client(protocol=2)
    c.set("user:2", doc(2, "warm-up"))                       # the owner is up and reading
    wait_for(lambda: names(pg)[2] == "warm-up-2", what="the warm-up write")
    stream = "cacheproxy:wb:{0}"
    tx = direct.pipeline(transaction=True)                   # nothing can read between the two
    tx.xadd(stream, {"k": "user:1", "o": "set", "x": "", "v": doc(1, "orphan")})
    tx.xreadgroup("cacheproxy", "paused-old-owner", {stream: ">"}, count=10)
    tx.execute()
    assert direct.xpending(stream, "cacheproxy")["pending"] == 1
    wait_for(lambda: names(pg)[1] == "orphan-1", timeout=15, what="the orphaned entry to land")
    wait_for(lambda: queued(direct) == 0, what="the queue to drain")
