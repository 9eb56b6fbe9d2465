"""Core (issue 2): volume. A 10,000-command pipeline, 200 concurrent clients with every reply
checked, 10 MB values, 1,000 idle clients on a small upstream pool.
"""

import asyncio
import os
import random
import threading
import time

import pytest

from tests.fixtures.proxy import encode_command

PROTOCOLS = pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])


@PROTOCOLS
@pytest.mark.timeout(60)
def test_pipeline_10000_commands(sproxy, protocol):
    r = sproxy.client(protocol=protocol, decode_responses=True)
    pipe = r.pipeline(transaction=False)
    n = 2500
    for i in range(n):
        pipe.set(f"pl:{i}", f"value-{i}")
        pipe.get(f"pl:{i}")
        pipe.incr("pl:counter")
        pipe.hset("pl:h", f"f{i}", i)
    replies = pipe.execute()
    assert len(replies) == 4 * n
    assert replies[0::4] == [True] * n
    assert replies[1::4] == [f"value-{i}" for i in range(n)]
    assert replies[2::4] == list(range(1, n + 1))
    assert replies[3::4] == [1] * n
    assert r.hlen("pl:h") == n


@PROTOCOLS
@pytest.mark.timeout(60)
async def test_async_pipeline_10000_commands(sproxy, protocol):
    r = sproxy.async_client(protocol=protocol, decode_responses=True)
    try:
        async with r.pipeline(transaction=False) as pipe:
            for i in range(5000):
                pipe.rpush("apl:list", i)
                pipe.lindex("apl:list", i)
            replies = await pipe.execute()
        assert replies[0::2] == list(range(1, 5001))
        assert replies[1::2] == [str(i) for i in range(5000)]
    finally:
        await r.aclose()


@pytest.mark.timeout(60)
def test_raw_pipeline_replies_in_order(sproxy):
    """10,000 commands in one stream (sent while replies are read): replies arrive in order."""
    n = 10000
    cmds = []
    for i in range(n):
        if i % 3 == 0:
            cmds.append(encode_command("INCR", "raw:ctr"))
        elif i % 3 == 1:
            cmds.append(encode_command("ECHO", f"e{i}"))
        else:
            cmds.append(encode_command("GET", "raw:none"))
    with sproxy.raw(timeout=30) as raw:
        sender = threading.Thread(target=raw.send, args=(b"".join(cmds),))
        sender.start()
        ctr = 0
        for i in range(n):
            frame = raw.read_frame()
            if i % 3 == 0:
                ctr += 1
                assert (frame.kind, frame.value) == (":", ctr), (i, frame)
            elif i % 3 == 1:
                assert frame.value == f"e{i}".encode(), (i, frame)
            else:
                assert (frame.kind, frame.value) == ("$", None), (i, frame)
        sender.join(10)


async def _client_workload(endpoint, n: int, ops: int, errors: list):
    protocol = 2 + (n % 2)
    r = endpoint.async_client(protocol=protocol, decode_responses=True)
    rng = random.Random(n)
    p = f"cc{n}:"
    strings: dict[str, str] = {}
    hashes: dict[str, str] = {}
    lst: list[str] = []
    counter = 0
    members: set[str] = set()
    try:
        for op in range(ops):
            choice = rng.randrange(9)
            if choice == 0:
                k, v = f"{p}s{rng.randrange(20)}", f"v{n}-{op}-" + "x" * rng.randrange(200)
                assert await r.set(k, v) is True
                strings[k] = v
            elif choice == 1:
                k = f"{p}s{rng.randrange(20)}"
                assert await r.get(k) == strings.get(k), k
            elif choice == 2:
                counter += 1
                assert await r.incr(f"{p}ctr") == counter
                await r.incr("cc:global")
            elif choice == 3:
                f, v = f"f{rng.randrange(10)}", str(op)
                await r.hset(f"{p}h", f, v)
                hashes[f] = v
                assert await r.hgetall(f"{p}h") == hashes
            elif choice == 4:
                lst.append(str(op))
                assert await r.rpush(f"{p}l", str(op)) == len(lst)
                assert await r.lrange(f"{p}l", -3, -1) == lst[-3:]
            elif choice == 5:
                m = f"m{rng.randrange(15)}"
                added = await r.sadd(f"{p}set", m)
                assert added == (0 if m in members else 1)
                members.add(m)
                assert await r.scard(f"{p}set") == len(members)
            elif choice == 6:
                async with r.pipeline(transaction=op % 2 == 0) as pipe:
                    pipe.set(f"{p}pipe", op)
                    pipe.get(f"{p}pipe")
                    pipe.exists(f"{p}pipe", f"{p}nope")
                    assert await pipe.execute() == [True, str(op), 1]
            elif choice == 7:
                score = await r.zincrby(f"{p}z", 1.5, "member")
                assert isinstance(score, float)
                assert await r.zscore(f"{p}z", "member") == score
            else:
                assert await r.echo(f"{p}{op}") == f"{p}{op}"
    except Exception as exc:
        errors.append((n, repr(exc)))
    finally:
        await r.aclose()
    return counter


@pytest.mark.timeout(150)
async def test_200_concurrent_clients(sproxy):
    clients, ops = 200, 100
    errors: list = []
    t0 = time.monotonic()
    counters = await asyncio.wait_for(
        asyncio.gather(*(_client_workload(sproxy, n, ops, errors) for n in range(clients))), 140
    )
    elapsed = time.monotonic() - t0
    assert not errors, errors[:5]
    direct = sproxy.redis.client()
    assert int(direct.get("cc:global")) == sum(counters)
    for n in range(0, clients, 37):
        assert int(direct.get(f"cc{n}:ctr") or 0) == counters[n]
    print(f"200 clients x {ops} ops: {elapsed:.1f}s")


@PROTOCOLS
@pytest.mark.timeout(60)
def test_10mb_value(sproxy, protocol):
    r = sproxy.client(protocol=protocol, socket_timeout=30)
    value = os.urandom(10 * 1024 * 1024)
    assert r.set(b"big:1", value) is True
    assert r.strlen(b"big:1") == len(value)
    got = r.get(b"big:1")
    assert len(got) == len(value) and got == value
    assert r.getrange(b"big:1", 5_000_000, 5_000_099) == value[5_000_000:5_000_100]
    # pipelined: two big values and small commands around them
    pipe = r.pipeline(transaction=False)
    pipe.set(b"big:2", value[::-1]).echo(b"between").get(b"big:2").get(b"big:1").ping()
    out = pipe.execute()
    assert out[0] is True and out[1] == b"between" and out[2] == value[::-1] and out[3] == value
    assert sproxy.redis.client().get(b"big:2") == value[::-1]


@pytest.mark.timeout(60)
async def test_10mb_value_async_with_concurrent_small_clients(sproxy):
    big = os.urandom(10 * 1024 * 1024)
    r = sproxy.async_client(protocol=3, socket_timeout=30)
    small = [sproxy.async_client(protocol=2, decode_responses=True) for _ in range(5)]

    async def small_traffic(c, i):
        for j in range(50):
            assert await c.set(f"sm:{i}", j) is True
            assert await c.get(f"sm:{i}") == str(j)

    try:
        async def big_traffic():
            assert await r.set(b"abig", big) is True
            assert await r.get(b"abig") == big

        await asyncio.gather(big_traffic(), *(small_traffic(c, i) for i, c in enumerate(small)))
    finally:
        await r.aclose()
        for c in small:
            await c.aclose()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.proxy_only
@pytest.mark.timeout(90)
def test_1000_idle_clients_few_upstream_connections(redis_server, make_proxy):
    proxy = make_proxy(redis_server, upstream={"pool_size": 4})
    conns = []
    try:
        for _ in range(1000):
            c = proxy.raw(timeout=10)
            conns.append(c)
        for i, c in enumerate(conns):
            c.send_command("SET", f"idle:{i}", i)
        for c in conns:
            assert c.read_frame().value == "OK"
        for i, c in enumerate(conns[::50]):
            assert c.cmd("GET", f"idle:{i * 50}").value == str(i * 50).encode()
        connected = int(redis_server.client().info("clients")["connected_clients"])
        # 1 for our INFO connection; the pool plus a few spare are fine, one per client is not
        assert connected <= 4 + 8 + 1, f"{connected} upstream connections for 1000 idle clients"
        rss_mb = _rss_kb(proxy.pid) / 1024
        assert rss_mb < 100, f"proxy RSS {rss_mb:.0f} MB with 1000 idle clients"
        print(f"RSS with 1000 idle clients: {rss_mb:.1f} MB, upstream connections: {connected}")
    finally:
        for c in conns:
            c.close()
    with proxy.raw() as c:
        assert c.cmd("GET", "idle:999").value == b"999"
