"""Core (issue 2): commands that carry connection state work through the proxy as with real Redis.

Pub/sub (RESP2 and RESP3 push), MULTI/EXEC/DISCARD, WATCH conflicts, blocking commands woken by
another client (and never blocking the other clients), CLIENT TRACKING invalidation pushes, MONITOR.
"""

import asyncio
import select
import threading
import time

import pytest
import redis

from tests.fixtures.helpers import async_wait_blocked, wait_blocked

PROTOCOLS = pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])


def next_message(ps, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = ps.get_message(timeout=0.1)
        if msg is not None:
            return msg
    raise AssertionError(f"no pub/sub message within {timeout}s")


def no_message(ps, wait: float = 0.3) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        msg = ps.get_message(timeout=0.05)
        assert msg is None, f"unexpected pub/sub message {msg}"


async def async_wait_subscribed(server_client, channel: str, present: bool = True) -> None:
    """Until Redis has a subscriber of ``channel`` and a pattern subscription (or, with
    ``present=False``, no subscriber of ``channel`` any more)."""
    deadline = time.monotonic() + 10
    while True:
        numsub = dict(server_client.pubsub_numsub(channel)).get(channel.encode(), 0)
        if (numsub == 1 and server_client.pubsub_numpat() >= 1) if present else numsub == 0:
            return
        assert time.monotonic() < deadline, f"{numsub} subscriber(s) of {channel}"
        await asyncio.sleep(0.01)


def hello(raw, protocol: int) -> None:
    if protocol == 3:
        reply = raw.cmd("HELLO", 3)
        assert reply.kind == "%", reply
        assert reply.py()[b"proto"] == 3


# --------------------------------------------------------------------------- pub/sub


@PROTOCOLS
def test_pubsub_two_clients(sproxy, protocol):
    sub = sproxy.client(protocol=protocol, decode_responses=True)
    pub = sproxy.client(protocol=protocol, decode_responses=True)
    ps = sub.pubsub()
    ps.subscribe("news")
    ps.psubscribe("ev:*")
    confirmations = [next_message(ps), next_message(ps)]
    assert [(m["type"], m["channel"]) for m in confirmations] == [("subscribe", "news"), ("psubscribe", "ev:*")]
    assert pub.pubsub_numsub("news") == [("news", 1)] or pub.pubsub_numsub("news") == [["news", 1]]
    assert pub.publish("news", "hello") == 1
    assert pub.publish("ev:login", "u1") == 1
    assert pub.publish("nobody-listens", "x") == 0
    m = next_message(ps)
    assert (m["type"], m["channel"], m["data"]) == ("message", "news", "hello")
    m = next_message(ps)
    assert (m["type"], m["pattern"], m["channel"], m["data"]) == ("pmessage", "ev:*", "ev:login", "u1")
    # the publisher's connection is an ordinary one: normal commands still work on it
    assert pub.set("ps:k", "v") is True and pub.get("ps:k") == "v"
    ps.unsubscribe("news")
    m = next_message(ps)
    assert (m["type"], m["channel"]) == ("unsubscribe", "news")
    assert pub.publish("news", "after-unsub") == 0
    assert pub.publish("ev:x", "still-psub") == 1
    m = next_message(ps)
    assert (m["type"], m["channel"], m["data"]) == ("pmessage", "ev:x", "still-psub")
    ps.punsubscribe()
    assert next_message(ps)["type"] == "punsubscribe"
    assert pub.publish("ev:y", "gone") == 0
    no_message(ps)
    ps.close()
    sub.close()
    pub.close()


def test_pubsub_fanout_and_binary_payload(sproxy):
    pub = sproxy.client(protocol=2)
    subs = [sproxy.client(protocol=p).pubsub() for p in (2, 3, 2, 3)]
    for ps in subs:
        ps.subscribe(b"bin\r\nchan")
        assert next_message(ps)["type"] in ("subscribe", b"subscribe")
    payload = bytes(range(256)) + b"\r\n"
    assert pub.publish(b"bin\r\nchan", payload) == 4
    for ps in subs:
        m = next_message(ps)
        assert m["channel"] == b"bin\r\nchan" and m["data"] == payload
        ps.close()


def test_raw_resp2_subscribe_mode(sproxy):
    with sproxy.raw() as sub, sproxy.raw() as pub:
        assert sub.cmd("SUBSCRIBE", "rc").py() == [b"subscribe", b"rc", 1]
        # RESP2 subscribed mode: only (P)SUBSCRIBE/UNSUBSCRIBE/PING/QUIT/RESET allowed
        err = sub.cmd("GET", "x")
        assert err.is_error and "only" in err.value.lower(), err
        assert sub.cmd("PING").py() == [b"pong", b""]
        assert pub.cmd("PUBLISH", "rc", "m1").value == 1
        assert sub.read_frame().py() == [b"message", b"rc", b"m1"]
        assert sub.cmd("UNSUBSCRIBE", "rc").py() == [b"unsubscribe", b"rc", 0]
        # back to a normal connection
        assert sub.cmd("SET", "rc:k", "v").value == "OK"
        assert sub.cmd("GET", "rc:k").value == b"v"
        assert pub.cmd("PUBLISH", "rc", "m2").value == 0


def test_raw_resp3_push_messages(sproxy):
    with sproxy.raw() as sub, sproxy.raw() as pub:
        hello(sub, 3)
        reply = sub.cmd("SUBSCRIBE", "r3")
        assert reply.kind == ">" and reply.py() == [b"subscribe", b"r3", 1]
        # RESP3 lets a subscribed client run any command
        assert sub.cmd("SET", "r3:k", "v").value == "OK"
        assert sub.cmd("GET", "r3:k").value == b"v"
        assert pub.cmd("PUBLISH", "r3", "hi").value == 1
        push = sub.read_frame()
        assert push.kind == ">" and push.py() == [b"message", b"r3", b"hi"]
        # a push arriving between a request and its reply must not be mistaken for the reply
        assert pub.cmd("PUBLISH", "r3", "second").value == 1
        assert not sub.buf and select.select([sub.sock], [], [], 5)[0], "the push did not arrive"
        sub.send_command("GET", "r3:k")
        frames = [sub.read_frame(), sub.read_frame()]
        kinds = sorted(f.kind for f in frames)
        assert kinds == ["$", ">"], frames
        assert next(f for f in frames if f.kind == "$").value == b"v"
        assert next(f for f in frames if f.kind == ">").py() == [b"message", b"r3", b"second"]
        reply = sub.cmd("UNSUBSCRIBE", "r3")
        assert reply.kind == ">" and reply.py() == [b"unsubscribe", b"r3", 0]
        assert sub.cmd("PING").value == "PONG"


@PROTOCOLS
async def test_async_pubsub(sproxy, protocol):
    sub = sproxy.async_client(protocol=protocol, decode_responses=True)
    pub = sproxy.async_client(protocol=protocol, decode_responses=True)
    ps = sub.pubsub()
    try:
        await ps.subscribe("achan")
        await ps.psubscribe("ap:*")
        got = []
        async def collect(n):
            while len(got) < n:
                m = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if m is not None:
                    got.append(m)
        await async_wait_subscribed(sproxy.redis.client(), "achan")
        for i in range(5):
            assert await pub.publish("achan", f"m{i}") == 1
        assert await pub.publish("ap:1", "pm") == 1
        await asyncio.wait_for(collect(6), 5)
        assert [m["data"] for m in got] == ["m0", "m1", "m2", "m3", "m4", "pm"]
        assert got[-1]["type"] == "pmessage" and got[-1]["channel"] == "ap:1"
        await ps.unsubscribe("achan")
        await ps.punsubscribe("ap:*")
        await async_wait_subscribed(sproxy.redis.client(), "achan", present=False)
        assert await pub.publish("achan", "late") == 0
    finally:
        await ps.aclose()
        await sub.aclose()
        await pub.aclose()


# --------------------------------------------------------------------------- transactions


@PROTOCOLS
def test_multi_exec_raw(sproxy, protocol):
    with sproxy.raw() as a, sproxy.raw() as b:
        hello(a, protocol)
        assert a.cmd("MULTI").value == "OK"
        assert a.cmd("SET", "tx:a", "1").value == "QUEUED"
        assert a.cmd("INCR", "tx:a").value == "QUEUED"
        assert a.cmd("INCR", "tx:c").value == "QUEUED"
        # another client is not inside A's transaction: its commands run now
        assert b.cmd("SET", "tx:c", "100").value == "OK"
        assert b.cmd("GET", "tx:c").value == b"100"
        assert b.cmd("GET", "tx:a").value is None
        assert a.cmd("EXEC").py() == ["OK", 2, 101]
        assert b.cmd("GET", "tx:a").value == b"2"
        # DISCARD
        assert a.cmd("MULTI").value == "OK"
        assert a.cmd("SET", "tx:d", "1").value == "QUEUED"
        assert a.cmd("DISCARD").value == "OK"
        assert a.cmd("GET", "tx:d").value is None
        # an error while queueing aborts EXEC
        assert a.cmd("MULTI").value == "OK"
        assert a.cmd("SET", "tx:e").is_error
        reply = a.cmd("EXEC")
        assert reply.is_error and reply.value.startswith("EXECABORT"), reply
        assert a.cmd("GET", "tx:e").value is None
        reply = a.cmd("EXEC")
        assert reply.is_error and "EXEC without MULTI" in reply.value
        # a runtime error inside EXEC is per command
        assert a.cmd("MULTI").value == "OK"
        a.cmd("SET", "tx:s", "str")
        a.cmd("INCR", "tx:s")
        a.cmd("GET", "tx:s")
        out = a.cmd("EXEC").value
        assert out[0].value == "OK" and out[1].is_error and out[2].value == b"str"
        assert a.cmd("PING").value == "PONG"


@PROTOCOLS
def test_multi_exec_redis_py(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    with r.pipeline(transaction=True) as pipe:
        pipe.set("txp:a", "x").append("txp:a", "y").get("txp:a").lpush("txp:l", 1, 2).lrange("txp:l", 0, -1)
        assert pipe.execute() == [True, 2, "xy", 2, ["2", "1"]]


@PROTOCOLS
def test_watch_conflict(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    other = sproxy.client(protocol=protocol, decode_responses=True)
    r.set("w:k", "0")
    with r.pipeline() as pipe:
        pipe.watch("w:k")
        assert pipe.get("w:k") == "0"  # immediate mode after WATCH
        other.set("w:k", "changed")
        pipe.multi()
        pipe.set("w:k", "mine")
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert r.get("w:k") == "changed"
    # no conflict: goes through
    with r.pipeline() as pipe:
        pipe.watch("w:k")
        pipe.multi()
        pipe.set("w:k", "mine")
        assert pipe.execute() == [True]
    assert other.get("w:k") == "mine"


@PROTOCOLS
def test_watch_conflict_raw(sproxy, protocol):
    with sproxy.raw() as a, sproxy.raw() as b:
        hello(a, protocol)
        assert a.cmd("WATCH", "wr:k").value == "OK"
        assert b.cmd("SET", "wr:k", "theirs").value == "OK"
        assert a.cmd("MULTI").value == "OK"
        assert a.cmd("SET", "wr:k", "mine").value == "QUEUED"
        reply = a.cmd("EXEC")
        assert reply.kind == ("*" if protocol == 2 else "_") and reply.value is None, reply
        assert b.cmd("GET", "wr:k").value == b"theirs"
        # UNWATCH forgets the watch
        assert a.cmd("WATCH", "wr:k").value == "OK"
        assert a.cmd("UNWATCH").value == "OK"
        assert b.cmd("SET", "wr:k", "theirs2").value == "OK"
        assert a.cmd("MULTI").value == "OK"
        assert a.cmd("SET", "wr:k", "mine").value == "QUEUED"
        assert a.cmd("EXEC").py() == ["OK"]
        assert b.cmd("GET", "wr:k").value == b"mine"


@pytest.mark.timeout(60)
def test_watch_optimistic_increments_concurrently(sproxy):
    """Threads doing WATCH/GET/MULTI/SET/EXEC with retries: no lost update."""
    threads, per_thread = 5, 20
    sproxy.client().set("w:ctr", 0)
    errors = []

    def worker():
        try:
            r = sproxy.client(protocol=2)

            def incr(pipe):
                value = int(pipe.get("w:ctr"))
                pipe.multi()
                pipe.set("w:ctr", value + 1)

            for _ in range(per_thread):
                r.transaction(incr, "w:ctr")
            r.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(50)
    assert not errors, errors
    assert int(sproxy.client().get("w:ctr")) == threads * per_thread


# --------------------------------------------------------------------------- blocking commands


def _pair(reply):
    return None if reply is None else tuple(reply)


@PROTOCOLS
@pytest.mark.timeout(30)
def test_blpop_woken_by_another_client(sproxy, protocol):
    waiter = sproxy.client(protocol=protocol, decode_responses=True)
    pusher = sproxy.client(protocol=protocol, decode_responses=True)
    result = {}

    def block():
        t0 = time.monotonic()
        result["reply"] = waiter.blpop(["bq:1", "bq:2"], timeout=10)
        result["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=block)
    t.start()
    wait_blocked(sproxy.redis.client(), "blpop")
    assert t.is_alive(), "BLPOP returned before anything was pushed"
    # the pusher is not stuck behind the blocked client
    t0 = time.monotonic()
    for i in range(50):
        assert pusher.set(f"bq:x{i}", i) is True
    assert time.monotonic() - t0 < 2.0
    assert pusher.lpush("bq:2", "job") == 1
    t.join(5)
    assert not t.is_alive()
    assert _pair(result["reply"]) == ("bq:2", "job")
    assert result["elapsed"] < 5
    assert pusher.llen("bq:2") == 0
    # timeout expiry returns nil
    t0 = time.monotonic()
    assert waiter.blpop("bq:empty", timeout=1) is None
    assert 0.8 <= time.monotonic() - t0 < 4
    # the waiter's connection is usable afterwards
    assert waiter.set("bq:after", "1") is True and waiter.get("bq:after") == "1"


@pytest.mark.timeout(40)
async def test_many_blocked_clients_do_not_block_others(sproxy):
    """More blocked clients than the upstream pool size (4), and the proxy still serves everyone."""
    n = 8
    blockers = [sproxy.async_client(protocol=2 + (i % 2), decode_responses=True) for i in range(n)]
    other = sproxy.async_client(protocol=3, decode_responses=True)
    try:
        tasks = [asyncio.create_task(c.blpop(f"mb:q{i}", timeout=20)) for i, c in enumerate(blockers)]
        await async_wait_blocked(sproxy.redis.client(), "blpop", count=n)
        assert not any(t.done() for t in tasks)
        t0 = time.monotonic()
        for i in range(100):
            assert await other.set(f"mb:k{i}", i) is True
            assert await other.get(f"mb:k{i}") == str(i)
        assert time.monotonic() - t0 < 5.0
        for i in reversed(range(n)):
            assert await other.rpush(f"mb:q{i}", f"v{i}") == 1
        replies = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert [_pair(r) for r in replies] == [(f"mb:q{i}", f"v{i}") for i in range(n)]
    finally:
        for c in blockers + [other]:
            await c.aclose()


@pytest.mark.timeout(30)
async def test_other_blocking_commands(sproxy):
    waiter = sproxy.async_client(protocol=3, decode_responses=True)
    other = sproxy.async_client(protocol=2, decode_responses=True)
    try:
        direct = sproxy.redis.client()
        t = asyncio.create_task(waiter.blmove("bm:src", "bm:dst", 10, "LEFT", "RIGHT"))
        await async_wait_blocked(direct, "blmove")
        await other.rpush("bm:src", "item")
        assert await asyncio.wait_for(t, 5) == "item"
        assert await other.lrange("bm:dst", 0, -1) == ["item"]

        t = asyncio.create_task(waiter.bzpopmin("bz:z", timeout=10))
        await async_wait_blocked(direct, "bzpopmin")
        await other.zadd("bz:z", {"m": 4.5})
        reply = await asyncio.wait_for(t, 5)
        assert list(reply) == ["bz:z", "m", 4.5]

        t = asyncio.create_task(waiter.brpop("br:l", timeout=10))
        await async_wait_blocked(direct, "brpop")
        await other.rpush("br:l", "a", "b")
        assert _pair(await asyncio.wait_for(t, 5)) == ("br:l", "b")

        await other.xadd("bx:s", {"old": "1"}, id="1-0")
        t = asyncio.create_task(waiter.xread({"bx:s": "$"}, block=10000))
        await async_wait_blocked(direct, "xread")      # XREAD $ only sees entries added after it runs
        await other.xadd("bx:s", {"new": "2"}, id="2-0")
        got = await asyncio.wait_for(t, 5)
        entries = got["bx:s"][0] if isinstance(got, dict) else dict(got)["bx:s"]
        assert [(eid, dict(f)) for eid, f in entries] == [("2-0", {"new": "2"})]

        await other.xgroup_create("bx:s", "g", id="$")
        t = asyncio.create_task(waiter.xreadgroup("g", "c1", {"bx:s": ">"}, block=10000))
        await async_wait_blocked(direct, "xreadgroup")
        await other.xadd("bx:s", {"n": "3"}, id="3-0")
        got = await asyncio.wait_for(t, 5)
        entries = got["bx:s"][0] if isinstance(got, dict) else dict(got)["bx:s"]
        assert [eid for eid, _ in entries] == ["3-0"]
        assert await waiter.ping() is True
    finally:
        await waiter.aclose()
        await other.aclose()


@PROTOCOLS
@pytest.mark.timeout(30)
def test_blpop_raw_then_pipeline_on_same_connection(sproxy, protocol):
    """A blocking command followed by pipelined commands on the same connection: order is kept."""
    with sproxy.raw(timeout=10) as a, sproxy.raw() as b:
        hello(a, protocol)
        a.send(b"".join([
            b"*3\r\n$5\r\nBLPOP\r\n$5\r\nbr:q1\r\n$1\r\n5\r\n",
            b"*3\r\n$3\r\nSET\r\n$5\r\nbr:k1\r\n$1\r\n1\r\n",
            b"*2\r\n$3\r\nGET\r\n$5\r\nbr:k1\r\n",
        ]))
        wait_blocked(sproxy.redis.client(), "blpop")
        assert b.cmd("GET", "br:k1").value is None  # SET waits behind BLPOP on A's connection
        assert b.cmd("RPUSH", "br:q1", "x").value == 1
        assert a.read_frame().py() == [b"br:q1", b"x"]
        assert a.read_frame().value == "OK"
        assert a.read_frame().value == b"1"


# --------------------------------------------------------------------------- tracking, monitor


def test_client_tracking_invalidation_push(sproxy):
    with sproxy.raw() as a, sproxy.raw() as b:
        hello(a, 3)
        assert a.cmd("CLIENT", "TRACKING", "ON").value == "OK"
        assert a.cmd("GET", "trk:k").value is None
        assert a.cmd("GET", "trk:other").value is None
        assert b.cmd("SET", "trk:k", "v").value == "OK"
        push = a.read_frame()
        assert push.kind == ">", push
        assert push.py() == [b"invalidate", [b"trk:k"]]
        assert a.cmd("CLIENT", "TRACKING", "OFF").value == "OK"
        assert a.cmd("GET", "trk:k").value == b"v"
        assert b.cmd("SET", "trk:k", "v2").value == "OK"
        assert a.cmd("PING").value == "PONG"  # no invalidation arrives before the reply


@pytest.mark.timeout(30)
def test_monitor_sees_other_clients(sproxy):
    with sproxy.raw() as mon, sproxy.raw() as b:
        reply = mon.cmd("MONITOR")
        assert reply.value == "OK", reply
        assert b.cmd("SET", "mon:key", "mon-value").value == "OK"
        deadline = time.monotonic() + 5
        lines = []
        while time.monotonic() < deadline:
            line = mon.read_frame(timeout=deadline - time.monotonic())
            lines.append(line.value)
            if '"mon:key"' in line.value:
                break
        assert any('"SET" "mon:key" "mon-value"' in line for line in lines), lines
