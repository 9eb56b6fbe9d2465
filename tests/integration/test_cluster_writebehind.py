"""Write-behind and write-through routes with the proxy in front of a Redis Cluster.

The queue keeps one stream per hash slot, in the data key's own slot, so the write script changes the
cache and the queue together on whichever node holds the key. These tests check that writes to keys on
every master land in Postgres, that the keys get their TTL back and the slot streams are retired once
drained, that a dead letter and a replay work across nodes, and that a master killed under write load
loses no acknowledged write.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from tests.fixtures.helpers import REPO, metric_sum, wait_for
from tests.fixtures.ports import free_port
from tests.fixtures.postgres import DSN
from tests.fixtures.redis_cluster import cluster_proxy
from tests.fixtures.writebehind import Writers, assert_every_ack_landed, routes

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(180), pytest.mark.xdist_group("shared_cluster")]

PREFIX = "cacheproxy:wb"


def start(make_proxy, cluster, pg, mode="write-behind", upstream=None, **wb):
    admin = free_port()
    p = cluster_proxy(make_proxy, cluster, upstream=upstream or {},
                      backends={"main": {"type": "postgres", "dsn": DSN, "connect_timeout": 1,
                                         "statement_timeout_ms": 3000,
                                         "versions_table": f"{pg.schema}.cacheproxy_versions"}},
                      routes=routes(pg.schema, mode), write_behind={"max_delay_ms": 50, "claim_idle_ms": 2000, **wb},
                      admin={"enabled": True, "port": admin}, shutdown={"grace_seconds": 5})
    p.admin_port = admin
    return p


def slot_streams(cluster) -> dict[bytes, int]:
    """Every queue stream on the cluster's masters, with its length."""
    out = {}
    for node in cluster.master_nodes():
        with node.client(socket_timeout=5) as c:
            for name in c.scan_iter(match=f"{PREFIX}:s:{{*}}", _type="stream", count=1000):
                out[name] = c.xlen(name)
    return out


def queued(cluster) -> int:
    return sum(slot_streams(cluster).values())


def test_writes_on_every_master_land_and_get_their_ttl_back(make_inproc_proxy, shared_cluster, pg):
    p = start(make_inproc_proxy, shared_cluster, pg)
    c = p.client(protocol=2)
    direct = shared_cluster.direct()
    ids = range(1, 41)
    for i in ids:
        assert c.set(f"user:{i}", json.dumps({"name": f"N{i}", "email": f"{i}@x"})) is True
        assert json.loads(c.get(f"user:{i}"))["name"] == f"N{i}"
    ports = {shared_cluster.node_for_key(f"user:{i}").port for i in ids}
    assert len(ports) == 3, "the written keys live on every master"
    wait_for(lambda: all(pg.user(i)["name"] == f"N{i}" for i in ids), what="every row in Postgres")
    # Landed: each key has the route's TTL again and no pending mark, and the streams are drained.
    wait_for(lambda: all(direct.pttl(f"user:{i}") > 0 for i in ids), what="the route TTL on every key")
    assert all(290_000 < direct.pttl(f"user:{i}") <= 300_000 for i in ids)
    assert not any(direct.exists(f"cacheproxy:pend:{{user:{i}}}:user:{i}") for i in ids)
    assert queued(shared_cluster) == 0
    assert len(slot_streams(shared_cluster)) <= 40, "at most one stream per slot written"
    assert sum(direct.scard(f"{PREFIX}:{{{n}}}:dirty") for n in range(16)) == 0, "the owner took every news"
    assert metric_sum(p, "cacheproxy_writebehind_landed_total") >= 40


def test_hash_counter_delete_and_mset_across_slots(make_inproc_proxy, shared_cluster, pg):
    p = start(make_inproc_proxy, shared_cluster, pg, max_delay_ms=3000, batch_size=1000)
    c = p.client(protocol=3)
    direct = shared_cluster.direct()
    assert c.hset("uh:6", "name", "Six") == 0             # loaded from Postgres first, then changed
    assert c.incr("counter:hits") == 42
    assert c.mset({"user:7": json.dumps({"name": "Seven", "email": "7@x"}), "plain:1": "p",
                   "user:8": json.dumps({"name": "Eight", "email": "8@x"})}) is True
    assert c.delete("user:3", "plain:1") == 2
    # Still queued (3 s batch delay): reads see the writes, and the delete is not undone by a load.
    assert c.get("user:3") is None
    assert direct.pttl("user:7") == -1, "a key with a queued write must not expire before it lands"
    assert pg.user(3) is not None
    assert queued(shared_cluster) >= 5
    wait_for(lambda: pg.user(3) is None, what="the delete in Postgres")
    wait_for(lambda: (pg.user(6)["name"], pg.user(7)["name"], pg.user(8)["name"]) == ("Six", "Seven", "Eight"),
             what="the hash and MSET rows")
    assert pg.user(6)["email"] == "u6@example.com", "a hash write sends the whole row"
    assert pg.rows("SELECT value FROM {s}.counters WHERE name = 'hits'")[0]["value"] == 42
    assert c.get("user:3") is None


def test_poison_row_is_dead_lettered_and_replayed_on_a_cluster(make_inproc_proxy, shared_cluster, pg):
    p = start(make_inproc_proxy, shared_cluster, pg)
    c = p.client(protocol=2)
    c.set("user:20", json.dumps({"name": "fine", "email": "f@x"}))
    c.set("user:21", json.dumps({"name": "bad", "email": "no-at-sign"}))     # the CHECK refuses it
    wait_for(lambda: pg.user(20)["name"] == "fine", what="the good row")
    wait_for(lambda: metric_sum(p, "cacheproxy_writebehind_dead_lettered_total") == 1, what="a dead letter")
    # The flusher counts the dead letter, then drops the refused value from the cache.
    wait_for(lambda: json.loads(c.get("user:21"))["name"] == "user 21",
             what="the refused value dropped from the cache")
    cli = [sys.executable, "-m", "proxy", "dlq"]
    config = str(p.config_path)
    listed = subprocess.run([*cli, "list", "--json", "-c", config], cwd=REPO, capture_output=True, text=True,
                            timeout=30)
    assert listed.returncode == 0, listed.stderr
    item = json.loads(listed.stdout.splitlines()[0])
    assert item["key"] == "user:21" and "CheckViolation" in item["error"]
    pg.rows("ALTER TABLE {s}.users DROP CONSTRAINT users_email_check")
    replay = subprocess.run([*cli, "replay", "--all", "-c", config], cwd=REPO, capture_output=True, text=True,
                            timeout=30)
    assert replay.returncode == 0 and "replay: 1" in replay.stdout, replay.stderr
    wait_for(lambda: pg.user(21)["email"] == "no-at-sign", what="the replayed row")


def test_write_through_on_a_cluster(make_inproc_proxy, shared_cluster, pg):
    p = start(make_inproc_proxy, shared_cluster, pg, mode="write-through")
    c = p.client(protocol=2)
    for i in range(30, 36):
        assert c.set(f"user:{i}", json.dumps({"name": f"T{i}", "email": f"{i}@x"})) is True
        assert pg.user(i)["name"] == f"T{i}", "write-through lands before the reply"
    assert c.delete("user:30") == 1
    assert pg.user(30) is None
    assert queued(shared_cluster) == 0


def test_master_killed_under_write_load_loses_no_acknowledged_write(make_proxy, redis_cluster, pg):
    p = start(make_proxy, redis_cluster, pg, upstream={"command_timeout": 15}, max_delay_ms=200)
    with Writers(p, clients=8, seconds=60, max_writes=6000) as w:
        wait_for(lambda: w.count > 1000, timeout=30, what="write load")
        victim = redis_cluster.master_nodes()[1]
        victim.kill()                    # SIGKILL by PID: its replica takes over
        killed_at = w.count
        wait_for(lambda: w.count > killed_at + 2000, timeout=60, what="writes after the failover")
    # A write on the wire to the node as it died may have run or not: its client got an error.
    assert len(w.errors) <= 8, w.errors[:5]
    assert not [e for e in w.errors if "upstream unavailable" not in str(e)], w.errors[:5]
    redis_cluster.wait_ok()
    wait_for(lambda: queued(redis_cluster) == 0, timeout=60, what="the queue to drain")
    assert_every_ack_landed(pg, w.acked)
    db = {r["id"]: r["name"] for r in pg.rows("SELECT id, name FROM {s}.users")}
    c = p.client(protocol=2)
    for key in w.acked:
        assert json.loads(c.get(f"user:{key}"))["name"] == db[key], f"user:{key}: cache and database disagree"
    with pytest.raises(redis.ResponseError, match="read-only"):
        c.set("ro:1", "x")


def test_streams_missing_from_the_dirty_sets_are_found_by_the_sweep(make_proxy, shared_cluster, pg):
    # A sidecar that dies between a write's script and its SADD leaves a queued entry in a slot stream
    # that no dirty set names. Here: queue writes (a one-minute batch delay holds them), wipe the dirty
    # sets, SIGKILL the proxy and start it again: the sweep at startup must find every stream.
    p = start(make_proxy, shared_cluster, pg, max_delay_ms=60000, batch_size=10000)
    c = p.client(protocol=2)
    for i in range(1, 31):
        c.set(f"user:{i}", json.dumps({"name": f"S{i}", "email": f"{i}@x"}))
    assert queued(shared_cluster) == 30
    direct = shared_cluster.direct()
    p.kill()
    direct.delete(*[f"{PREFIX}:{{{n}}}:dirty" for n in range(16)])
    p.start()
    wait_for(lambda: all(pg.user(i)["name"] == f"S{i}" for i in range(1, 31)), timeout=30,
             what="every queued write to land after the restart")
    wait_for(lambda: queued(shared_cluster) == 0, what="the queue to drain")


def test_reshard_under_write_load_moves_the_queue_with_its_slots(make_proxy, redis_cluster, pg):
    # The slot streams, pending marks and consumer groups migrate with their slots (MIGRATE keeps a
    # stream's groups): writes and the flusher follow the redirects, and nothing is lost.
    p = start(make_proxy, redis_cluster, pg, max_delay_ms=100)
    source, target = redis_cluster.master_nodes()[:2]
    on_source = [i for i in range(1, 201) if redis_cluster.node_for_key(f"user:{i}").port == source.port]
    with Writers(p, clients=6, seconds=90, max_writes=100000) as w:
        wait_for(lambda: w.count > 500, timeout=30, what="write load")
        reshard = redis_cluster.reshard(source, target, 1000)
        try:
            output, _ = reshard.communicate(timeout=120)
        finally:
            if reshard.poll() is None:
                reshard.kill()
                reshard.wait(5)
    assert reshard.returncode == 0, output[-2000:]
    moved = [i for i in on_source if redis_cluster.node_for_key(f"user:{i}").port == target.port]
    assert moved, "some written keys (and their slot streams) moved to the target"
    assert w.errors == [], w.errors[:5]
    assert w.count > 1000
    wait_for(lambda: queued(redis_cluster) == 0, timeout=60, what="the queue to drain")
    assert_every_ack_landed(pg, w.acked)
    db = {r["id"]: r["name"] for r in pg.rows("SELECT id, name FROM {s}.users")}
    c = p.client(protocol=2)
    for key in w.acked:
        assert json.loads(c.get(f"user:{key}"))["name"] == db[key], f"user:{key}: cache and database disagree"


def test_write_to_an_unreachable_slot_is_refused_not_written_through(make_inproc_proxy, redis_cluster, pg):
    # With a shard's master and replica both down, its slots are unreachable. On a single node the
    # proxy would take a plain SET through to the database; on a cluster it must not (queued entries
    # of the slot would land over it after recovery): the client gets an error and nothing changes.
    p = start(make_inproc_proxy, redis_cluster, pg, upstream={"command_timeout": 1})
    c = p.client(protocol=2, socket_timeout=30)
    master = redis_cluster.node_for_key("user:1")
    for node in redis_cluster.running_nodes():
        if node is not master and redis_cluster.role_of(node) == "slave":
            with node.client(socket_timeout=2) as r:
                if int(r.info("replication")["master_port"]) == master.port:
                    node.kill()
    master.kill()
    with pytest.raises(redis.ResponseError, match="upstream unavailable"):
        c.set("user:1", json.dumps({"name": "lost", "email": "l@x"}))
    assert pg.user(1)["name"] == "user 1", "nothing reached the database"
