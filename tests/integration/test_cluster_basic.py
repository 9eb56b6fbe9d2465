"""Cluster mode through the proxy, on a real 6-node Redis Cluster (3 masters, 3 replicas).

An ordinary redis.Redis client talks to the proxy; redis-py's RedisCluster client talks to the
cluster directly to check where things landed.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis
from redis.crc import key_slot

from tests.fixtures.redis_cluster import cluster_proxy

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120), pytest.mark.xdist_group("shared_cluster")]



@pytest.fixture
def cproxy(make_inproc_proxy, shared_cluster):
    return cluster_proxy(make_inproc_proxy, shared_cluster)


def keys_by_master(cluster, keys):
    counts = {}
    for key in keys:
        port = cluster.node_for_key(key).port
        counts[port] = counts.get(port, 0) + 1
    return counts


def test_thousand_keys_over_all_slots(cproxy, shared_cluster):
    keys = [f"key:{i}" for i in range(1000)]
    slots = {key_slot(k.encode()) for k in keys}
    assert len(slots) > 900
    for proto in (2, 3):
        c = cproxy.client(protocol=proto)
        for i, key in enumerate(keys):
            assert c.set(key, f"v{proto}:{i}")
        for i, key in enumerate(keys):
            assert c.get(key) == f"v{proto}:{i}".encode()
    direct = shared_cluster.direct()
    assert direct.get("key:500") == b"v3:500"
    assert len(keys_by_master(shared_cluster, keys[:60])) == 3, "keys land on every master"
    assert cproxy.client().dbsize() == 1000


def test_pipeline_across_slots_keeps_order(cproxy):
    c = cproxy.client(protocol=2)
    pipe = c.pipeline(transaction=False)
    for i in range(300):
        pipe.set(f"p:{i}", i)
        pipe.incr(f"p:{i}")
        pipe.get(f"p:{i}")
    replies = pipe.execute()
    assert replies == [x for i in range(300) for x in (True, i + 1, str(i + 1).encode())]


def test_multi_key_commands_split_and_merge(cproxy, shared_cluster):
    for proto in (2, 3):
        c = cproxy.client(protocol=proto)
        c.flushall()
        data = {f"m:{i}": f"val{i}" for i in range(50)}
        assert c.mset(data) is True
        direct = shared_cluster.direct()
        assert direct.get("m:17") == b"val17"
        keys = [f"m:{i}" for i in range(49, -1, -1)] + ["missing:1", "m:3"]
        assert c.mget(keys) == [f"val{i}".encode() for i in range(49, -1, -1)] + [None, b"val3"]
        assert c.exists("m:1", "m:2", "m:2", "nope") == 3
        assert c.touch("m:1", "m:2", "nope") == 2
        assert c.delete("m:1", "m:2", "m:30", "nope") == 3
        assert c.unlink("m:3", "m:4") == 2
        assert c.exists(*data) == 45
        assert direct.exists("m:1") == 0


def test_hash_tags_and_crossslot(cproxy):
    c = cproxy.client(protocol=2)
    assert c.msetnx({"{user:1}:a": 1, "{user:1}:b": 2}) is True
    assert c.mget("{user:1}:a", "{user:1}:b") == [b"1", b"2"]
    with pytest.raises(redis.ResponseError, match="same slot"):
        c.msetnx({"a1": 1, "b2": 2})
    with pytest.raises(redis.ResponseError, match="same slot"):
        c.sunionstore("dest", "s1", "s2")
    c.sadd("{t}s1", "x")
    c.sadd("{t}s2", "y")
    assert c.sunionstore("{t}dest", "{t}s1", "{t}s2") == 2
    with pytest.raises(redis.ResponseError, match="same slot"):
        c.rename("a1", "b2")
    # Lua: keys in one slot run on that slot's node; keys in several slots are refused.
    script = "redis.call('set', KEYS[1], ARGV[1]); return redis.call('get', KEYS[2])"
    assert c.eval(script, 2, "{s}:x", "{s}:y", "hello") is None
    assert c.eval("return redis.call('get', KEYS[1])", 1, "{s}:x") == b"hello"
    with pytest.raises(redis.ResponseError, match="same slot"):
        c.eval(script, 2, "x1", "y2", "v")
    sha = c.script_load("return redis.call('incr', KEYS[1])")
    for i in range(30):      # the script is on every master: EVALSHA works whatever the key's slot
        assert c.evalsha(sha, 1, f"counter:{i}") == 1
    assert c.script_exists(sha) == [True]
    assert c.eval("return 7", 0) == 7
    # FCALL numkeys
    lib = "#!lua name=cplib\nredis.register_function('cget', function(keys, args) return redis.call('get', keys[1]) end)"
    assert c.function_load(lib, replace=True) == b"cplib"
    c.set("fk", "fv")
    assert c.fcall("cget", 1, "fk") == b"fv"


def test_transactions_in_one_slot(cproxy, shared_cluster):
    c = cproxy.client(protocol=2)
    pipe = c.pipeline(transaction=True)
    pipe.set("{acct}:a", 10).incrby("{acct}:a", 5).set("{acct}:b", 1).get("{acct}:a")
    assert pipe.execute() == [True, 15, True, b"15"]
    with pytest.raises(redis.ResponseError):
        c.pipeline(transaction=True).set("a1", 1).set("b2", 2).execute()
    assert c.get("a1") is None, "a refused transaction runs nothing"
    # Step by step, as an interactive client does it.
    with cproxy.raw() as r:
        assert r.cmd("MULTI").value == "OK"
        assert r.cmd("SET", "{q}x", "1").value == "QUEUED"
        assert r.cmd("INCR", "{q}x").value == "QUEUED"
        assert r.cmd("INCR", "other-slot").is_error
        assert r.cmd("EXEC").value.startswith("EXECABORT")
        assert r.cmd("MULTI").value == "OK"
        assert r.cmd("NOSUCHCOMMAND", "x").is_error
        assert r.cmd("EXEC").value.startswith("EXECABORT")
        assert r.cmd("MULTI").value == "OK"
        assert r.cmd("SET", "{q}x", "1").value == "QUEUED"
        assert r.cmd("INCR", "{q}x").value == "QUEUED"
        assert r.cmd("EXEC").py() == ["OK", 2]
        assert r.cmd("EXEC").value == "ERR EXEC without MULTI"
        # Connection state never runs inside a block on a shared connection.
        assert r.cmd("MULTI").value == "OK"
        assert r.cmd("HELLO", "3").is_error
        assert r.cmd("SUBSCRIBE", "ch").is_error
        assert r.cmd("PING").value == "QUEUED"
        assert r.cmd("EXEC").value.startswith("EXECABORT")
        assert r.cmd("GET", "{q}x").value == b"2"
        assert r.cmd("DISCARD").value == "ERR DISCARD without MULTI"
    # WATCH: a change by another client voids the transaction.
    c.set("{w}k", 1)
    with cproxy.raw() as r:
        assert r.cmd("WATCH", "{w}k").value == "OK"
        shared_cluster.direct().set("{w}k", 2)
        assert r.cmd("MULTI").value == "OK"
        assert r.cmd("SET", "{w}k", "3").value == "QUEUED"
        assert r.cmd("EXEC").value is None
        assert r.cmd("WATCH", "{w}k").value == "OK"
        assert r.cmd("WATCH", "elsewhere").value.startswith("CROSSSLOT")
        assert r.cmd("MULTI").value == "OK"
        assert r.cmd("SET", "{w}k", "4").value == "QUEUED"
        assert r.cmd("EXEC").py() == ["OK"]
    assert c.get("{w}k") == b"4"
    # redis-py's optimistic locking helper
    c.set("{w}n", 0)

    def bump(pipe):
        value = int(pipe.get("{w}n"))
        pipe.multi()
        pipe.set("{w}n", value + 1)
    for _ in range(5):
        c.transaction(bump, "{w}n")
    assert c.get("{w}n") == b"5"


def test_keyless_commands(cproxy, shared_cluster):
    c = cproxy.client(protocol=3)
    for i in range(200):
        c.set(f"kl:{i}", i)
    assert c.dbsize() == 200
    assert sorted(c.keys("kl:*")) == sorted(f"kl:{i}".encode() for i in range(200))
    assert sorted(c.scan_iter(match="kl:*", count=20)) == sorted(f"kl:{i}".encode() for i in range(200))
    assert c.randomkey().startswith(b"kl:")
    assert c.ping() is True
    assert c.echo("hi") == b"hi"
    assert "redis_version" in c.info("server")
    assert isinstance(c.time(), tuple | list)
    with pytest.raises(redis.ResponseError, match="single node"):
        c.execute_command("SAVE")
    # CLIENT KILL is about the proxy's own clients (never the nodes' connections, which others share).
    assert c.execute_command("CLIENT", "KILL", "ID", "999999") == 0
    assert c.flushall() is True
    assert c.dbsize() == 0
    for node in shared_cluster.master_nodes():
        assert node.client().dbsize() == 0


def test_bad_input_gets_redis_errors(cproxy, shared_cluster):
    direct_node = shared_cluster.master_nodes()[0].client()
    with cproxy.raw() as r:
        for args in (("NOSUCHCMD", "a"), ("GET",), ("SET", "a"), ("EVAL", "return 1", "x"),
                     ("EVAL", "return 1", "5", "a"), ("MSET", "a"), ("MGET",), ("DEL",), ("OBJECT",)):
            reply = r.cmd(*args)
            assert reply.is_error, args
            try:
                direct_node.execute_command(*args)
            except redis.ResponseError as exc:
                assert reply.value == str(exc) or reply.value.endswith(str(exc)), (args, reply.value, exc)
        assert r.cmd("PING").value == "PONG"
        assert r.cmd("SELECT", "1").value == "ERR SELECT is not allowed in cluster mode"
        assert r.cmd("SELECT", "0").value == "OK"


def test_blocking_and_pubsub(cproxy, shared_cluster):
    c = cproxy.client(protocol=2)
    direct = shared_cluster.direct()

    def push():
        time.sleep(0.3)
        direct.rpush("queue:x", "job")
    threading.Thread(target=push).start()
    assert c.blpop(["queue:x"], timeout=5) == (b"queue:x", b"job")
    assert c.get("after-blpop") is None      # the session works after its pin is released

    sub = cproxy.client(protocol=2).pubsub()
    sub.subscribe("news")
    assert sub.get_message(timeout=2)["type"] == "subscribe"
    node = shared_cluster.master_nodes()[-1].client()
    node.publish("news", "hello")           # cluster pub/sub broadcasts to every node
    message = sub.get_message(timeout=5)
    assert message and message["data"] == b"hello"
    sub.close()

    shard = cproxy.client(protocol=3).pubsub()
    shard.ssubscribe("orders:{eu}")
    assert shard.get_sharded_message(timeout=2)["type"] == "ssubscribe"
    direct.spublish("orders:{eu}", "o1")
    message = shard.get_sharded_message(timeout=5)
    assert message and message["data"] == b"o1"
    shard.close()


@pytest.mark.parametrize("read_from", ["replica", "prefer_replica"])
def test_replica_reads(make_inproc_proxy, shared_cluster, read_from):
    p = cluster_proxy(make_inproc_proxy, shared_cluster, upstream={"read_from": read_from})
    c = p.client(protocol=2)
    for node in shared_cluster.running_nodes():
        node.client().config_resetstat()
    for i in range(100):
        c.set(f"r:{i}", i)
    time.sleep(0.3)       # replication is asynchronous
    for i in range(100):
        assert c.get(f"r:{i}") == str(i).encode()
    gets = {}
    for node in shared_cluster.running_nodes():
        stats = node.client().info("commandstats")
        gets[shared_cluster.role_of(node)] = gets.get(shared_cluster.role_of(node), 0) + \
            stats.get("cmdstat_get", {}).get("calls", 0)
    assert gets.get("slave", 0) == 100 and gets.get("master", 0) == 0, gets
    assert c.incr("r:1") == 2               # writes still go to the masters


def test_first_seed_down_uses_the_others(make_inproc_proxy, shared_cluster):
    from tests.fixtures.redis_server import free_port
    dead = f"redis://127.0.0.1:{free_port()}"
    p = make_inproc_proxy(dead, upstream={"cluster": True, "nodes": shared_cluster.seeds[2:4]})
    c = p.client(protocol=2)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert c.set("seeded", "yes") is True
            break
        except redis.ResponseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert c.get("seeded") == b"yes"
    assert shared_cluster.direct().get("seeded") == b"yes"
