"""Write-behind and write-through to Postgres through the proxy, seen from a client and the database."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import redis

from tests.fixtures.helpers import REPO, metric_sum, wait_for
from tests.fixtures.postgres import make_schema
from tests.fixtures.writebehind import queued, start

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120)]



# ------------------------------------------------------------------------------------ write-behind

def test_set_is_read_back_at_once_and_lands_in_postgres(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg)
    c = p.client(protocol=2)
    direct = redis_server.client()
    assert c.set("user:1", json.dumps({"name": "Ann", "email": "ann@x.org"})) is True
    assert json.loads(c.get("user:1")) == {"name": "Ann", "email": "ann@x.org"}
    wait_for(lambda: pg.user(1)["name"] == "Ann", what="the row in Postgres")
    assert pg.user(1) == {"id": 1, "name": "Ann", "email": "ann@x.org"}
    # Once flushed, the key gets the route's TTL back (it had none while its write was queued).
    wait_for(lambda: direct.pttl("user:1") > 0, what="the route TTL")
    assert 290_000 < direct.pttl("user:1") <= 300_000
    assert queued(direct) == 0


def test_pending_write_is_never_replaced_by_the_older_row(make_inproc_proxy, redis_server, pg):
    # A long batch delay keeps the writes queued while we read.
    p = start(make_inproc_proxy, redis_server, pg, max_delay_ms=3000, batch_size=1000)
    c = p.client(protocol=2)
    direct = redis_server.client()
    c.set("user:2", json.dumps({"name": "new", "email": "n@x"}))
    assert direct.pttl("user:2") == -1, "a key with a queued write must not expire before it lands"
    assert c.delete("user:3") == 1                      # the row exists in Postgres, so DEL counts it
    assert c.get("user:3") is None, "a queued delete must not let a miss load the old row"
    assert pg.user(3) is not None                       # still queued
    assert json.loads(c.get("user:2"))["name"] == "new"
    wait_for(lambda: pg.user(3) is None, what="the delete in Postgres")
    assert pg.user(2)["name"] == "new"
    assert c.get("user:3") is None


def test_set_options_see_the_database_row(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg)
    c = p.client(protocol=2)
    direct = redis_server.client()
    # user:4 is only in Postgres: NX must fail, XX and GET must see the row.
    assert c.set("user:4", json.dumps({"name": "x", "email": "x@x"}), nx=True) is None
    old = c.set("user:4", json.dumps({"name": "Four", "email": "4@x"}), xx=True, get=True)
    assert json.loads(old)["name"] == "user 4"
    assert c.set("user:999", json.dumps({"name": "n", "email": "n@x"}), xx=True) is None
    assert c.set("user:998", json.dumps({"name": "Nine", "email": "9@x"}), nx=True, ex=100) is True
    wait_for(lambda: (pg.user(4) or {}).get("name") == "Four" and pg.user(998) is not None, what="rows")
    assert pg.user(999) is None
    wait_for(lambda: direct.pttl("user:998") > 0, what="the client's TTL")
    assert 90_000 < direct.pttl("user:998") <= 100_000, "EX given by the client is kept after the flush"
    assert c.execute_command("SETEX", "user:997", 50, json.dumps({"name": "s", "email": "s@x"})) is True
    wait_for(lambda: pg.user(997) is not None, what="SETEX row")


def test_bad_values_are_refused_and_change_nothing(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg)
    c = p.client(protocol=2)
    with pytest.raises(redis.ResponseError, match="not valid JSON"):
        c.set("user:5", "not json")
    with pytest.raises(redis.ResponseError, match="lacks field"):
        c.set("user:5", json.dumps({"name": "no email"}))
    with pytest.raises(redis.ResponseError, match="must be a JSON object"):
        c.set("user:5", "[1, 2]")
    with pytest.raises(redis.ResponseError, match="read-only"):
        c.set("ro:5", "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        c.hset("user:5", "name", "x")
    with pytest.raises(redis.ResponseError, match="stores hashes"):
        c.set("uh:5", "x")
    with pytest.raises(redis.ResponseError, match="not supported"):
        c.incr("user:5")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        c.execute_command("SET", "user:5")
    assert redis_server.client().exists("user:5", "ro:5", "uh:5") == 0
    assert queued(redis_server.client()) == 0
    assert pg.user(5)["name"] == "user 5"


def test_hash_route_sends_the_whole_row(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg)
    c = p.client(protocol=3)
    assert c.hset("uh:6", "name", "Six") == 0              # loaded first: the field existed
    assert c.hgetall("uh:6") == {b"id": b"6", b"name": b"Six", b"email": b"u6@example.com"}
    wait_for(lambda: pg.user(6)["name"] == "Six", what="hash write")
    assert pg.user(6)["email"] == "u6@example.com"
    c.hdel("uh:6", "email")
    wait_for(lambda: pg.user(6)["email"] is None, what="HDEL -> NULL column")
    c.hset("uh:500", mapping={"name": "Five hundred", "email": "500@x"})
    wait_for(lambda: pg.user(500) is not None, what="new row from HSET")


def test_incr_on_a_string_route_starts_from_the_database(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg)
    c = p.client(protocol=2)
    assert c.incr("counter:hits") == 42
    assert c.incrby("counter:hits", 8) == 50
    assert c.incr("counter:new") == 1
    wait_for(lambda: {r["name"]: r["value"] for r in pg.rows("SELECT * FROM {s}.counters")}
             == {"hits": 50, "new": 1}, what="counters")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        c.set("counter:text", "abc") and c.incr("counter:text")


def test_mset_and_multi_key_del_mix_routed_and_plain_keys(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg)
    c = p.client(protocol=2)
    assert c.mset({"user:7": json.dumps({"name": "Seven", "email": "7@x"}), "plain:1": "p"}) is True
    assert c.get("plain:1") == b"p"
    wait_for(lambda: pg.user(7)["name"] == "Seven", what="MSET row")
    assert c.delete("user:8", "plain:1", "user:9999") == 2
    wait_for(lambda: pg.user(8) is None, what="DEL row")
    assert c.get("plain:1") is None


def test_pipeline_reads_its_own_writes(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg)
    c = p.client(protocol=2)
    pipe = c.pipeline(transaction=False)
    for i in range(20):
        pipe.hset("uh:10", "name", f"v{i}")
        pipe.hget("uh:10", "name")
    replies = pipe.execute()
    assert replies[1::2] == [f"v{i}".encode() for i in range(20)]
    wait_for(lambda: pg.user(10)["name"] == "v19", what="last write wins")


def test_many_clients_database_equals_cache(make_proxy, redis_server, pg):
    """10,000 writes over 1,000 keys from 50 clients: after the queue drains, every key agrees."""
    p = start(make_proxy, redis_server, pg, max_delay_ms=100, batch_size=200)
    errors = []

    def client(n: int):
        c = p.client(protocol=2)
        try:
            for i in range(200):
                key = (n * 37 + i * 13) % 1000 + 1
                c.set(f"user:{key}", json.dumps({"name": f"c{n}-{i}", "email": f"{n}.{i}@x"}))
        except Exception as exc:
            errors.append(exc)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[:3]
    direct = redis_server.client()
    wait_for(lambda: queued(direct) == 0, timeout=60, what="the queue to drain")
    db = {r["id"]: {"name": r["name"], "email": r["email"]}
          for r in pg.rows("SELECT id, name, email FROM {s}.users")}
    for key in range(1, 1001):
        cached = direct.get(f"user:{key}")
        assert cached is not None
        assert json.loads(cached) == db[key], f"user:{key}"
    assert metric_sum(p, "cacheproxy_writebehind_landed_total") >= 1000


def test_poison_row_goes_to_dead_letters_and_the_rest_land(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, max_delay_ms=300)
    c = p.client(protocol=2)
    c.set("user:11", json.dumps({"name": "ok", "email": "ok@x"}))
    c.set("user:12", json.dumps({"name": "bad", "email": "no-at-sign"}))   # violates the CHECK
    c.set("user:13", json.dumps({"name": "ok too", "email": "ok2@x"}))
    wait_for(lambda: pg.user(11)["name"] == "ok" and pg.user(13)["name"] == "ok too", what="good rows")
    direct = redis_server.client()
    wait_for(lambda: direct.xlen("cacheproxy:wb:dead") == 1, what="the dead letter")
    assert pg.user(12)["name"] == "user 12"
    # The refused value leaves the cache (just after its dead letter is written): a read shows what
    # the database holds.
    wait_for(lambda: json.loads(c.get("user:12"))["name"] == "user 12", what="the refused value dropped")
    cfg = str(p.config_path)
    listed = subprocess.run([sys.executable, "-m", "proxy", "dlq", "list", "--json", "-c", cfg], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    item = json.loads(listed.stdout.splitlines()[0])
    assert item["key"] == "user:12" and "CheckViolation" in item["error"]
    assert json.loads(item["value"])["email"] == "no-at-sign"
    # Fix the schema, replay: the write lands.
    pg.rows("ALTER TABLE {s}.users DROP CONSTRAINT users_email_check")
    replay = subprocess.run([sys.executable, "-m", "proxy", "dlq", "replay", "--all", "-c", cfg], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert replay.returncode == 0 and "replay: 1" in replay.stdout, replay.stderr
    wait_for(lambda: pg.user(12)["name"] == "bad", what="the replayed write")
    assert direct.xlen("cacheproxy:wb:dead") == 0
    assert metric_sum(p, "cacheproxy_writebehind_dead_lettered_total") == 1


def test_queue_full_refuses_writes(make_inproc_proxy, redis_server, throwaway_pg):
    pg = make_schema(throwaway_pg.dsn)
    p = start(make_inproc_proxy, redis_server, pg, dsn=throwaway_pg.dsn, max_pending=16, partitions=1)
    throwaway_pg.stop()           # nothing drains
    c = p.client(protocol=2)
    for i in range(16):
        c.set(f"user:{100 + i}", json.dumps({"name": "q", "email": "q@x"}))
    with pytest.raises(redis.ResponseError, match="write-behind queue full"):
        c.set("user:200", json.dumps({"name": "q", "email": "q@x"}))
    throwaway_pg.start()
    wait_for(lambda: queued(redis_server.client()) == 0, timeout=40, what="drain after restart")
    assert c.set("user:200", json.dumps({"name": "q", "email": "q@x"})) is True


# ------------------------------------------------------------------------------------ write-through

def test_write_through_lands_before_the_reply(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, mode="write-through")
    c = p.client(protocol=2)
    c.set("user:20", json.dumps({"name": "Twenty", "email": "20@x"}))
    assert pg.user(20)["name"] == "Twenty"               # no waiting: it is there when SET returns
    assert 290_000 < redis_server.client().pttl("user:20") <= 300_000
    c.hset("uh:21", "name", "TwentyOne")
    assert pg.user(21) == {"id": 21, "name": "TwentyOne", "email": "u21@example.com"}
    assert c.delete("user:22") == 1 or pg.user(22) is None
    assert pg.user(22) is None
    assert queued(redis_server.client()) == 0


def test_write_through_error_leaves_the_cache_unchanged(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg, mode="write-through")
    c = p.client(protocol=2)
    before = c.get("user:23")
    with pytest.raises(redis.ResponseError, match="backend main refused the write.*CheckViolation"):
        c.set("user:23", json.dumps({"name": "bad", "email": "no-at"}))
    assert c.get("user:23") == before
    assert pg.user(23)["name"] == "user 23"
    with pytest.raises(redis.ResponseError, match="not supported on write-through"):
        c.incr("counter:hits")


def test_write_through_with_postgres_down_reports_it(make_inproc_proxy, redis_server, throwaway_pg):
    pg = make_schema(throwaway_pg.dsn)
    p = start(make_inproc_proxy, redis_server, pg, mode="write-through", dsn=throwaway_pg.dsn)
    c = p.client(protocol=2)
    assert json.loads(c.get("user:24"))["name"] == "user 24"
    throwaway_pg.stop()
    with pytest.raises(redis.ResponseError, match="backend main unavailable"):
        c.set("user:24", json.dumps({"name": "lost?", "email": "l@x"}))
    assert json.loads(c.get("user:24"))["name"] == "user 24"
