"""Core (issue 2): the ordinary Redis data types and app patterns through the proxy, with redis-py.

Every test runs with RESP2 and RESP3; the sync client is the main driver, and the asyncio client
runs the same kinds of commands in test_async_*. Replies are checked value by value.
"""

import asyncio
import time

import pytest
import redis

PROTOCOLS = pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])


@PROTOCOLS
def test_strings(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    assert r.set("s:1", "hello") is True
    assert r.get("s:1") == "hello"
    assert r.append("s:1", " world") == 11
    assert r.strlen("s:1") == 11
    assert r.getrange("s:1", 0, 4) == "hello"
    assert r.setrange("s:1", 6, "WORLD") == 11
    assert r.get("s:1") == "hello WORLD"
    assert r.set("s:n", 10) is True
    assert r.incr("s:n") == 11
    assert r.incrby("s:n", 5) == 16
    assert r.decr("s:n") == 15
    assert r.incrbyfloat("s:n", 0.5) == 15.5
    assert r.mset({"s:a": "1", "s:b": "2"}) is True
    assert r.mget("s:a", "s:b", "s:missing") == ["1", "2", None]
    assert r.setnx("s:a", "x") is False
    assert r.set("s:new", "x", nx=True) is True
    assert r.set("s:new", "y", nx=True) is None
    assert r.set("s:a", "z", get=True) == "1"
    assert r.getdel("s:b") == "2"
    assert r.get("s:b") is None
    assert r.exists("s:a", "s:new", "s:missing") == 2
    assert r.delete("s:a", "s:new", "s:missing") == 2
    assert r.get("s:missing") is None
    with pytest.raises(redis.ResponseError, match="not an integer"):
        r.incr("s:1")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        r.lpush("s:1", "x")
    with pytest.raises(redis.ResponseError, match="(?i)unknown command"):
        r.execute_command("NOSUCHCOMMAND", "x")
    with pytest.raises(redis.ResponseError, match="(?i)wrong number of arguments"):
        r.execute_command("GET")
    # the connection is still usable after error replies
    assert r.get("s:1") == "hello WORLD"
    assert r.ping() is True
    assert r.echo("echo me") == "echo me"


@PROTOCOLS
def test_hashes(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    assert r.hset("h:1", mapping={"name": "ada", "lang": "python", "n": "1"}) == 3
    assert r.hset("h:1", "name", "grace") == 0
    assert r.hget("h:1", "name") == "grace"
    assert r.hget("h:1", "nope") is None
    assert r.hgetall("h:1") == {"name": "grace", "lang": "python", "n": "1"}
    assert r.hgetall("h:missing") == {}
    assert r.hmget("h:1", ["name", "nope", "lang"]) == ["grace", None, "python"]
    assert r.hincrby("h:1", "n", 41) == 42
    assert r.hincrbyfloat("h:1", "f", 1.25) == 1.25
    assert r.hlen("h:1") == 4
    assert r.hexists("h:1", "lang") is True
    assert r.hexists("h:1", "nope") is False
    assert sorted(r.hkeys("h:1")) == ["f", "lang", "n", "name"]
    assert sorted(r.hvals("h:1")) == ["1.25", "42", "grace", "python"]
    assert r.hdel("h:1", "lang", "nope") == 1
    assert not r.hsetnx("h:1", "name", "x")
    # HSCAN across many fields: cursors are stateless, so every field comes back exactly once
    r.hset("h:big", mapping={f"f{i}": str(i) for i in range(500)})
    seen = dict(r.hscan_iter("h:big", count=50))
    assert seen == {f"f{i}": str(i) for i in range(500)}


@PROTOCOLS
def test_lists(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    assert r.rpush("l:1", "b", "c") == 2
    assert r.lpush("l:1", "a") == 3
    assert r.lrange("l:1", 0, -1) == ["a", "b", "c"]
    assert r.lindex("l:1", 1) == "b"
    assert r.llen("l:1") == 3
    assert r.linsert("l:1", "AFTER", "b", "bb") == 4
    assert r.lset("l:1", 0, "A") is True
    assert r.lrange("l:1", 0, -1) == ["A", "b", "bb", "c"]
    assert r.lpos("l:1", "bb") == 2
    assert r.lrem("l:1", 0, "bb") == 1
    assert r.lpop("l:1") == "A"
    assert r.rpop("l:1") == "c"
    assert r.rpush("l:1", *[str(i) for i in range(10)]) == 11
    assert r.lpop("l:1", 3) == ["b", "0", "1"]
    assert r.ltrim("l:1", 0, 2) is True
    assert r.lrange("l:1", 0, -1) == ["2", "3", "4"]
    assert r.lmove("l:1", "l:2", "LEFT", "RIGHT") == "2"
    assert r.lrange("l:2", 0, -1) == ["2"]
    assert r.lpop("l:missing") is None
    assert r.lrange("l:missing", 0, -1) == []


@PROTOCOLS
def test_sets(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    assert r.sadd("set:a", "x", "y", "z") == 3
    assert r.sadd("set:a", "x") == 0
    assert r.sadd("set:b", "y", "z", "w") == 3
    assert r.smembers("set:a") == {"x", "y", "z"}
    assert r.smembers("set:missing") == set()
    assert r.sismember("set:a", "x") in (True, 1)
    assert r.sismember("set:a", "q") in (False, 0)
    assert [bool(v) for v in r.smismember("set:a", ["x", "q"])] == [True, False]
    assert r.scard("set:a") == 3
    assert r.sinter("set:a", "set:b") == {"y", "z"}
    assert r.sunion("set:a", "set:b") == {"x", "y", "z", "w"}
    assert r.sdiff("set:a", "set:b") == {"x"}
    assert r.sinterstore("set:c", ["set:a", "set:b"]) == 2
    assert r.smembers("set:c") == {"y", "z"}
    assert r.srem("set:a", "x", "q") == 1
    assert r.srandmember("set:a") in {"y", "z"}
    popped = r.spop("set:a")
    assert popped in {"y", "z"}
    assert r.scard("set:a") == 1
    r.sadd("set:ints", *range(100))
    assert r.smembers("set:ints") == {str(i) for i in range(100)}


@PROTOCOLS
def test_sorted_sets(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    assert r.zadd("z:1", {"a": 1, "b": 2.5, "c": 3}) == 3
    assert r.zadd("z:1", {"a": 1}, nx=True) == 0
    score = r.zscore("z:1", "b")
    assert isinstance(score, float) and score == 2.5
    assert r.zscore("z:1", "nope") is None
    assert r.zrank("z:1", "c") == 2
    assert r.zrange("z:1", 0, -1) == ["a", "b", "c"]
    assert [tuple(x) for x in r.zrange("z:1", 0, -1, withscores=True)] == [("a", 1.0), ("b", 2.5), ("c", 3.0)]
    assert r.zrangebyscore("z:1", 2, "+inf") == ["b", "c"]
    assert r.zcount("z:1", "-inf", 2.5) == 2
    assert r.zincrby("z:1", 10, "a") == 11.0
    assert r.zrevrange("z:1", 0, 0) == ["a"]
    assert r.zrem("z:1", "c", "nope") == 1
    assert r.zcard("z:1") == 2
    popped = r.zpopmin("z:1")  # RESP2: [(m, s)]; RESP3 (redis-py 8): [m, s]
    assert popped in ([("b", 2.5)], ["b", 2.5])
    r.zadd("z:2", {"x": 1, "a": 2})
    assert r.zunionstore("z:3", ["z:1", "z:2"]) == 2
    assert [tuple(x) for x in r.zrange("z:3", 0, -1, withscores=True)] == [("x", 1.0), ("a", 13.0)]


@PROTOCOLS
def test_streams(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    assert r.xadd("st:1", {"temp": "20"}, id="1-1") == "1-1"
    assert r.xadd("st:1", {"temp": "21"}, id="2-1") == "2-1"
    auto_id = r.xadd("st:1", {"temp": "22", "unit": "C"})
    assert r.xlen("st:1") == 3
    entries = r.xrange("st:1")
    assert [(eid, dict(fields)) for eid, fields in entries] == [
        ("1-1", {"temp": "20"}), ("2-1", {"temp": "21"}), (auto_id, {"temp": "22", "unit": "C"}),
    ]
    assert [eid for eid, _ in r.xrevrange("st:1", count=1)] == [auto_id]
    assert r.xrange("st:1", min="2-0", max="2-5") == [("2-1", {"temp": "21"})]
    assert r.xgroup_create("st:1", "workers", id="0") is True
    got = r.xreadgroup("workers", "w1", {"st:1": ">"}, count=2)
    # RESP2: [[stream, entries]]; RESP3: {stream: [entries]}
    items = got["st:1"][0] if isinstance(got, dict) else dict(got)["st:1"]
    assert [eid for eid, _ in items] == ["1-1", "2-1"]
    assert [dict(fields) for _, fields in items] == [{"temp": "20"}, {"temp": "21"}]
    pending = r.xpending("st:1", "workers")
    assert pending["pending"] == 2
    assert r.xack("st:1", "workers", "1-1", "2-1") == 2
    assert r.xpending("st:1", "workers")["pending"] == 0
    got = r.xreadgroup("workers", "w2", {"st:1": ">"})
    items = got["st:1"][0] if isinstance(got, dict) else dict(got)["st:1"]
    assert [eid for eid, _ in items] == [auto_id]
    assert r.xdel("st:1", "1-1") == 1
    assert r.xlen("st:1") == 2
    assert r.xtrim("st:1", maxlen=1, approximate=False) == 1
    assert [eid for eid, _ in r.xrange("st:1")] == [auto_id]


@PROTOCOLS
def test_session_store(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    payload = '{"user_id": 42, "roles": ["admin"], "csrf": "abc\\u00e9"}'
    assert r.execute_command("SETEX", "session:abc", 60, payload) in (True, "OK")
    assert r.get("session:abc") == payload
    assert 55 <= r.ttl("session:abc") <= 60
    assert r.expire("session:abc", 120) is True
    assert 115 <= r.ttl("session:abc") <= 120
    assert r.persist("session:abc") is True
    assert r.ttl("session:abc") == -1
    assert r.ttl("session:none") == -2
    assert r.set("session:short", "x", px=150) is True
    assert 0 < r.pttl("session:short") <= 150
    time.sleep(0.3)
    assert r.get("session:short") is None
    assert r.exists("session:short") == 0
    assert r.delete("session:abc") == 1
    assert r.get("session:abc") is None


@PROTOCOLS
def test_leaderboard(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    assert r.zadd("lb", {"alice": 10, "bob": 20, "carol": 15}) == 3
    new = r.zincrby("lb", 12.5, "alice")
    assert isinstance(new, float) and new == 22.5
    assert r.zincrby("lb", 1, "dave") == 1.0
    top = r.zrevrange("lb", 0, 2, withscores=True)
    assert [tuple(x) for x in top] == [("alice", 22.5), ("bob", 20.0), ("carol", 15.0)]
    assert all(isinstance(score, float) for _, score in top)
    assert r.zrevrank("lb", "carol") == 2
    assert r.zscore("lb", "dave") == 1.0
    raw = sproxy.client(protocol=protocol).zrevrange("lb", 0, 0, withscores=True)
    assert [tuple(x) for x in raw] == [(b"alice", 22.5)]


@PROTOCOLS
def test_rate_limiter_pipelines(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    limit = 10
    allowed = 0
    for i in range(1, 16):
        pipe = r.pipeline(transaction=False)
        pipe.incr("rl:user:1")
        pipe.expire("rl:user:1", 60)
        count, expired = pipe.execute()
        assert count == i and expired is True
        allowed += count <= limit
    assert allowed == limit
    assert 55 <= r.ttl("rl:user:1") <= 60
    for i in range(1, 6):
        pipe = r.pipeline(transaction=True)
        pipe.incr("rl:user:2")
        pipe.expire("rl:user:2", 30)
        pipe.ttl("rl:user:2")
        assert pipe.execute() == [i, True, 30]
    assert r.get("rl:user:2") == "5"


@PROTOCOLS
def test_binary_keys_and_values(sproxy, protocol):
    r = sproxy.client(protocol=protocol)  # bytes in, bytes out
    all_bytes = bytes(range(256))
    key = b"bin:" + all_bytes
    value = all_bytes * 4 + b"\r\n$3\r\nfoo\r\n*1\r\n" + all_bytes
    assert r.set(key, value) is True
    assert r.get(key) == value
    assert r.strlen(key) == len(value)
    # one key per byte value, including \r \n \0 and space
    keys = [b"b:" + bytes([i]) + b"\r\n" for i in range(256)]
    r.mset({k: bytes([i]) * (i + 1) for i, k in enumerate(keys)})
    assert r.mget(keys) == [bytes([i]) * (i + 1) for i in range(256)]
    assert r.hset(b"bh\r\n", all_bytes, b"\x00\r\n\xff") == 1
    assert r.hgetall(b"bh\r\n") == {all_bytes: b"\x00\r\n\xff"}
    assert r.set(b"empty", b"") is True
    assert r.get(b"empty") == b""
    assert r.set(b"key with spaces", b"v a l") is True
    assert r.get(b"key with spaces") == b"v a l"
    assert r.rpush(b"bl", b"\r\n", b"", all_bytes) == 3
    assert r.lrange(b"bl", 0, -1) == [b"\r\n", b"", all_bytes]


@PROTOCOLS
def test_select_db_isolation(sproxy, protocol):
    r1 = sproxy.client(protocol=protocol, db=1, decode_responses=True)
    r0 = sproxy.client(protocol=protocol, decode_responses=True)
    assert r1.set("sel:k", "in-db-1") is True
    assert r0.get("sel:k") is None
    assert r0.set("sel:k", "in-db-0") is True
    assert r1.get("sel:k") == "in-db-1"
    assert r0.get("sel:k") == "in-db-0"
    # explicit SELECT on one connection does not move another client's connection
    c = sproxy.client(protocol=protocol, decode_responses=True, single_connection_client=True)
    assert c.execute_command("SELECT", 1) in (True, "OK")
    assert c.get("sel:k") == "in-db-1"
    assert r0.get("sel:k") == "in-db-0"
    assert c.dbsize() == 1
    assert c.execute_command("SELECT", 0) in (True, "OK")
    assert c.get("sel:k") == "in-db-0"
    # many interleaved db-0 clients never see db 1
    others = [sproxy.client(protocol=protocol, decode_responses=True) for _ in range(5)]
    for i in range(20):
        assert r1.set(f"sel:{i}", "one") is True
        for o in others:
            assert o.get(f"sel:{i}") is None
    assert sproxy.redis.client(db=1).get("sel:k") == b"in-db-1"
    assert sproxy.redis.client(db=0).get("sel:k") == b"in-db-0"
    for o in others + [r0, r1, c]:
        o.close()


@PROTOCOLS
def test_client_setname_getname(sproxy, protocol):
    a = sproxy.client(protocol=protocol, decode_responses=True, single_connection_client=True)
    b = sproxy.client(protocol=protocol, decode_responses=True, single_connection_client=True)
    assert a.client_getname() is None
    assert a.client_setname("alpha") is True
    assert a.client_getname() == "alpha"
    assert b.client_getname() is None
    assert b.client_setname("beta") is True
    assert a.client_getname() == "alpha"
    assert b.client_getname() == "beta"
    assert a.set("cn:k", "v") is True and b.get("cn:k") == "v"
    named = sproxy.client(protocol=protocol, decode_responses=True, client_name="gamma",
                          single_connection_client=True)
    assert named.client_getname() == "gamma"
    for c in (a, b, named):
        c.close()


def test_redis_py_8_default_connect(sproxy):
    """redis-py 8's defaults: HELLO 3, CLIENT SETINFO lib-name/lib-ver, maint notifications probe."""
    r = redis.Redis(host=sproxy.host, port=sproxy.port, socket_timeout=10)
    assert r.ping() is True
    assert r.set("py8", "ok") is True
    assert r.get("py8") == b"ok"
    assert r.hgetall("nothing") == {}
    r.close()
    with sproxy.raw() as raw:
        reply = raw.cmd("CLIENT", "SETINFO", "LIB-NAME", "redis-py")
        # Redis >= 7.2 says +OK, 7.0 an error; either way the connection must stay up.
        assert reply.kind in "+-", reply
        assert raw.cmd("CLIENT", "SETINFO", "LIB-VER", "8.1.0").kind in "+-"
        assert raw.cmd("PING").value == "PONG"
        assert raw.cmd("GET", "py8").value == b"ok"


async def test_redis_py_8_default_connect_async(sproxy):
    r = redis.asyncio.Redis(host=sproxy.host, port=sproxy.port, socket_timeout=10)
    try:
        assert await r.ping() is True
        assert await r.set("py8a", "ok") is True
        assert await r.get("py8a") == b"ok"
    finally:
        await r.aclose()


@PROTOCOLS
async def test_async_data_types(sproxy, protocol):
    r = sproxy.async_client(protocol=protocol, decode_responses=True)
    try:
        assert await r.set("a:s", "v") is True
        assert await r.get("a:s") == "v"
        assert await r.incrby("a:n", 7) == 7
        assert await r.hset("a:h", mapping={"x": "1", "y": "2"}) == 2
        assert await r.hgetall("a:h") == {"x": "1", "y": "2"}
        assert await r.rpush("a:l", "1", "2", "3") == 3
        assert await r.lrange("a:l", 0, -1) == ["1", "2", "3"]
        assert await r.sadd("a:set", "p", "q") == 2
        assert await r.smembers("a:set") == {"p", "q"}
        assert await r.zadd("a:z", {"m": 1.5, "n": 0.5}) == 2
        assert [tuple(x) for x in await r.zrange("a:z", 0, -1, withscores=True)] == [("n", 0.5), ("m", 1.5)]
        score = await r.zincrby("a:z", 1, "n")
        assert isinstance(score, float) and score == 1.5
        assert await r.xadd("a:st", {"f": "v"}, id="5-0") == "5-0"
        assert [(eid, dict(f)) for eid, f in await r.xrange("a:st")] == [("5-0", {"f": "v"})]
        assert await r.execute_command("SETEX", "a:sess", 60, "data") in (True, "OK")
        assert 55 <= await r.ttl("a:sess") <= 60
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            await r.get("a:h")
        assert await r.get("a:s") == "v"
        # concurrent commands on one client object: replies are matched to their requests
        results = await asyncio.gather(*(r.incr("a:ctr") for _ in range(50)))
        assert sorted(results) == list(range(1, 51))
    finally:
        await r.aclose()


@PROTOCOLS
async def test_async_pipelines(sproxy, protocol):
    r = sproxy.async_client(protocol=protocol, decode_responses=True)
    try:
        for i in range(1, 6):
            async with r.pipeline(transaction=False) as pipe:
                pipe.incr("a:rl")
                pipe.expire("a:rl", 60)
                assert await pipe.execute() == [i, True]
        async with r.pipeline(transaction=True) as pipe:
            pipe.set("a:t1", "1")
            pipe.incr("a:t1")
            pipe.get("a:t1")
            assert await pipe.execute() == [True, 2, "2"]
        async with r.pipeline(transaction=False) as pipe:
            for i in range(500):
                pipe.set(f"a:p{i}", i)
                pipe.get(f"a:p{i}")
            out = await pipe.execute()
        assert out[0::2] == [True] * 500
        assert out[1::2] == [str(i) for i in range(500)]
    finally:
        await r.aclose()
