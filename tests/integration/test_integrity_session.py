"""Integrity of the session (issue 11): no reply crosses clients, every pause resumes, the proxy's own
keys are out of clients' reach, relay mode keeps the deny-list and RESET logs out at once.

Every test runs against a real redis-server; the ones about the queue against real Postgres too.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import asyncpg
import pytest
import redis

from tests.fixtures.helpers import wait_for
from tests.fixtures.postgres import DSN
from tests.fixtures.proxy import RawClient, encode_command, parse_frame
from tests.fixtures.writebehind import queued, start

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120)]


def drain(sock: socket.socket, seconds: float) -> bytes:
    """Whatever the peer sends within `seconds` (the chaos clients do not check their replies)."""
    sock.settimeout(0.05)
    out = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        out += data
    return out


def frames(data: bytes) -> list:
    out, pos = [], 0
    while pos < len(data):
        frame, pos = parse_frame(data, pos)
        out.append(frame)
    return out


# --------------------------------------------------------------------------------- replies in place

UNSUBSCRIBES = [("UNSUBSCRIBE",), ("UNSUBSCRIBE", "a", "b"), ("PUNSUBSCRIBE",), ("PUNSUBSCRIBE", "p*"),
                ("SUNSUBSCRIBE",), ("SUNSUBSCRIBE", "s1", "s2"), ("PING",)]


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_unsubscribe_without_a_subscription_is_answered_as_redis_does(make_proxy, redis_server, protocol):
    p = make_proxy(redis_server)
    replies = []
    for port in (redis_server.port, p.port):
        with RawClient("127.0.0.1", port) as c:
            if protocol == 3:
                c.cmd("HELLO", 3)
            c.send(b"".join(encode_command(*args) for args in UNSUBSCRIBES))
            replies.append([c.read_raw() for _ in range(1 + 2 + 1 + 1 + 1 + 2 + 1)])
    assert replies[1] == replies[0]


CHAOS = [
    ("UNSUBSCRIBE",), ("UNSUBSCRIBE", "a", "b", "c", "d", "e", "f", "g", "h"), ("PUNSUBSCRIBE", "x*", "y*"),
    ("SUNSUBSCRIBE", "s"), ("CLIENT", "REPLY", "ON"), ("CLIENT", "REPLY", "bogus"), ("CLIENT", "TRACKING", "OFF"),
    ("CLIENT", "TRACKING", "bogus"), ("HELLO", "3"), ("HELLO", "2"), ("RESET",), ("PING",), ("ECHO", "e"),
    ("ASKING",), ("READONLY",), ("READWRITE",), ("CLIENT", "NO-EVICT", "on"), ("CLIENT", "NO-TOUCH", "on"),
    ("CLIENT", "SETNAME", "chaos"), ("CLIENT", "GETNAME"), ("CLIENT", "KILL", "ID", "999999"), ("MULTI",),
    ("EXEC",), ("DISCARD",), ("WATCH", "w"), ("UNWATCH",), ("SELECT", "0"), ("CLIENT", "ID"),
    ("SUBSCRIBE", "chan"), ("CLIENT", "TRACKING", "ON"), ("CLIENT", "REPLY", "SKIP"), ("GET", "secret:0:0"),
]


def chaos_client(port: int, seed: int, rounds: int, stop: threading.Event, protocol: int) -> None:
    """Sends random mixes of commands whose reply count or kind is not "one reply per request", on
    connections of the verifiers' protocol (they share upstream connections by protocol)."""
    rng = random.Random(seed)
    for _ in range(rounds):
        if stop.is_set():
            return
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            batch = [("HELLO", str(protocol))] + [rng.choice(CHAOS) for _ in range(rng.randint(1, 12))]
            if rng.random() < 0.3:
                batch.append(("QUIT",))
            sock.sendall(b"".join(encode_command(*args) for args in batch))
            drain(sock, 0.05)
        finally:
            sock.close()


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_no_client_ever_reads_another_clients_reply(make_proxy, redis_server, protocol):
    """Verifiers pipeline GETs of their own secrets while chaos clients send commands with odd reply
    counts; every reply a verifier gets must be its own value."""
    p = make_proxy(redis_server, upstream={"pool_size": 1})      # one shared connection: worst case
    direct = redis_server.client()
    for n in range(6):
        direct.mset({f"secret:{n}:{j}": f"token-{n}-{j}" for j in range(10)})
    stop = threading.Event()
    wrong: list[str] = []
    problems: list[BaseException] = []

    def verifier(n: int) -> None:
        try:
            with RawClient("127.0.0.1", p.port, timeout=10) as c:
                if protocol == 3:
                    c.cmd("HELLO", 3)
                for _ in range(150):
                    c.send(b"".join(encode_command("GET", f"secret:{n}:{j}") for j in range(10)))
                    for j in range(10):
                        frame = c.read_frame()
                        if frame.value != f"token-{n}-{j}".encode():
                            wrong.append(f"client {n} asked secret:{n}:{j}, got {frame.kind}{frame.value!r}")
        except BaseException as exc:   # reported below: a hang or a closed connection fails the test
            problems.append(exc)

    threads = [threading.Thread(target=verifier, args=(n,)) for n in range(6)]
    threads += [threading.Thread(target=chaos_client, args=(p.port, seed, 60, stop, protocol)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads[:6]:
        t.join(90)
    stop.set()
    for t in threads[6:]:
        t.join(30)
    assert not problems, problems[:3]
    assert not wrong, wrong[:5]
    assert direct.ping()


# --------------------------------------------------------------------------- every pause resumes

def test_a_pipeline_gets_every_reply_across_an_upstream_restart(make_proxy, redis_server):
    """Tens of thousands of pipelined GETs while Redis is killed and restarted: every request gets a
    reply (a value or an error), the client is never left paused, and it works afterwards."""
    p = make_proxy(redis_server, upstream={"connect_timeout": 1})
    redis_server.client().set("k", "v")
    total = 40_000
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    sender = threading.Thread(target=lambda: sock.sendall(encode_command("GET", "k") * total))
    sender.start()
    got, buf, restarted = 0, b"", False
    deadline = time.monotonic() + 60
    sock.settimeout(1.0)
    while got < total and time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            continue
        assert data, f"the proxy closed the connection after {got} replies"
        buf += data
        pos = 0
        while True:
            try:
                _, end = parse_frame(buf, pos)
            except Exception:
                break
            pos = end
            got += 1
        buf = buf[pos:]
        if got > 2000 and not restarted:
            redis_server.kill()
            time.sleep(0.3)
            redis_server.start()
            restarted = True
    sender.join(10)
    assert got == total, f"{got} of {total} replies"
    sock.settimeout(5)
    sock.sendall(encode_command("SET", "after", "1") + encode_command("GET", "after"))
    tail = b""
    while tail.count(b"\r\n") < 3:
        tail += sock.recv(4096)
    assert tail == b"+OK\r\n$1\r\n1\r\n"
    sock.close()
    with p.raw() as c:
        listing = c.cmd("CLIENT", "LIST").value
        assert listing.count(b"id=") == 1, listing          # the pipelining client is gone


# ------------------------------------------------------------------------------ the reserved keys

REFUSED = [
    ("DEL", "cacheproxy:wb:{0}"), ("XTRIM", "cacheproxy:wb:{0}", "MAXLEN", "0"),
    ("SET", "cacheproxy:neg:{user:5}:user:5", "1"), ("SET", "cacheproxy:lease:{user:5}:user:5", "t", "PX", "9000"),
    ("EVAL", "return redis.call('DEL', KEYS[1])", "1", "cacheproxy:wb:{0}"),
    ("EVAL", "return redis.call('DEL', 'cacheproxy:wb:{0}')", "0"),
    ("RENAME", "plain", "cacheproxy:wb:{1}"), ("UNLINK", "plain", "cacheproxy:pend:{x}:x"),
    ("SORT", "list", "BY", "cacheproxy:*"), ("OBJECT", "ENCODING", "cacheproxy:wb:{0}"),
    ("NOSUCHCOMMAND", "cacheproxy:wb:{0}"),
]


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_clients_cannot_touch_the_proxys_keys(make_proxy, redis_server, protocol):
    p = make_proxy(redis_server)
    direct = redis_server.client()
    direct.xadd("cacheproxy:wb:{0}", {"k": "user:1"})
    direct.set("cacheproxy:pend:{x}:x", "1-0")
    direct.set("plain", "p")
    direct.rpush("list", "a")
    c = p.client(protocol=protocol)
    for args in REFUSED:
        with pytest.raises(redis.ResponseError, match="reserved for cacheproxy"):
            c.execute_command(*args)
    assert direct.xlen("cacheproxy:wb:{0}") == 1
    assert direct.get("cacheproxy:pend:{x}:x") == b"1-0"
    assert direct.get("plain") == b"p"
    assert not direct.exists("cacheproxy:neg:{user:5}:user:5", "cacheproxy:lease:{user:5}:user:5")
    # In a pipeline the refusals keep their place; in a transaction they void it, as Redis errors do.
    pipe = c.pipeline(transaction=False)
    pipe.get("plain").delete("cacheproxy:wb:{0}").get("plain")
    assert pipe.execute(raise_on_error=False)[0::2] == [b"p", b"p"]
    with pytest.raises(redis.ResponseError, match="reserved for cacheproxy"):
        c.pipeline(transaction=True).set("plain", "q").delete("cacheproxy:wb:{0}").execute()
    assert direct.get("plain") == b"p"
    # Listings leave them out.
    assert sorted(c.keys("*")) == [b"list", b"plain"]
    assert sorted(c.scan_iter(match="*", count=2)) == [b"list", b"plain"]
    # SWAPDB would move the queue away.
    with pytest.raises(redis.ResponseError, match="SWAPDB of database 0"):
        c.swapdb(0, 1)
    assert c.swapdb(1, 2) is True


def test_relay_mode_keeps_the_deny_list_and_the_reserved_keys(make_proxy, redis_server):
    p = make_proxy(redis_server)
    with p.raw() as c:
        c.cmd("HELLO", 3)
        assert c.cmd("CLIENT", "TRACKING", "ON").value == "OK"
        reply = c.cmd("SHUTDOWN", "NOSAVE")
        assert reply.is_error and "not supported" in reply.value
        reply = c.cmd("XTRIM", "cacheproxy:wb:{0}", "MAXLEN", "0")
        assert reply.is_error and "reserved" in reply.value
        assert c.cmd("SET", "x", "1").value == "OK"
    assert redis_server.client().ping()
    assert redis_server.client().get("x") == b"1"


def test_reset_logs_out_at_once_even_in_relay_mode(make_proxy, redis_server):
    p = make_proxy(redis_server, listen={"password": "s3cret"})
    for state in (("SUBSCRIBE", "c"), ("WATCH", "w"), ("CLIENT", "TRACKING", "ON")):
        with p.raw() as c:
            c.send(encode_command("AUTH", "s3cret") + encode_command(*state) + encode_command("RESET")
                   + encode_command("SET", "k", "1") + encode_command("PING"))
            got = frames(drain(c.sock, 1.5))
            assert got[-2].is_error and got[-2].value.startswith("NOAUTH"), (state, got)
        assert redis_server.client().get("k") is None, state


def test_flushall_through_the_proxy_keeps_acknowledged_writes(make_proxy, redis_server, pg):
    """Writes queued while Postgres holds a lock survive FLUSHALL and FLUSHDB through the proxy and
    land; the cache is emptied otherwise (plain keys, negative entries)."""
    p = start(make_proxy, redis_server, pg)
    c = p.client(protocol=2)
    direct = redis_server.client()

    async def locked(seconds: float):
        conn = await asyncpg.connect(DSN)
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {pg.schema}.users IN ACCESS EXCLUSIVE MODE")
                await asyncio.sleep(seconds)
        finally:
            await conn.close()

    assert c.get("user:99999") is None      # a negative entry
    assert list(direct.scan_iter(match="cacheproxy:neg:*"))
    holder = threading.Thread(target=lambda: asyncio.run(locked(4)))
    holder.start()
    time.sleep(0.3)
    for i in range(1, 301):
        assert c.set(f"user:{i}", json.dumps({"name": f"n{i}", "email": f"{i}@x"})) is True
    c.set("plain", "1")
    assert c.flushall() is True
    assert c.flushdb() is True
    assert direct.get("plain") is None
    assert not list(direct.scan_iter(match="cacheproxy:neg:*"))
    assert queued(direct) > 0
    assert json.loads(c.get("user:7")) == {"name": "n7", "email": "7@x"}   # queued: still cached
    holder.join(10)
    wait_for(lambda: queued(direct) == 0, timeout=30, what="the queue to drain")
    rows = {r["id"]: r["name"] for r in pg.rows("SELECT id, name FROM {s}.users WHERE id <= 300")}
    assert rows == {i: f"n{i}" for i in range(1, 301)}


# ------------------------------------------------------------------------------------ clear errors

def test_client_errors_name_the_clients_mistake(make_proxy, redis_server):
    p = make_proxy(redis_server, upstream={"connect_timeout": 0.5})
    c = p.client(protocol=2)
    for args in (("CLIENT", "TRACKING", "bogus"), ("CLIENT", "REPLY", "bogus")):
        with pytest.raises(redis.ResponseError, match="syntax error"):
            c.execute_command(*args)
    redis_server.kill()
    with pytest.raises(redis.ResponseError) as caught:
        c.get("k")
    text = str(caught.value)
    assert "upstream unavailable" in text
    assert str(redis_server.port) not in text and "127.0.0.1" not in text


# ----------------------------------------------------------------------------- memory and slow loris

def test_unfinished_requests_are_capped_across_clients(make_proxy, redis_server):
    """Clients that declare huge bulks and send them slowly hold at most max_query_buffer_total bytes
    together: past it the client holding the most is closed; the others and new clients are served."""
    mb = 1 << 20
    p = make_proxy(redis_server, limits={"max_query_buffer": 8 * mb, "max_query_buffer_total": 12 * mb})
    holders = []
    for size in (5, 5, 3):
        c = RawClient("127.0.0.1", p.port, timeout=5)
        c.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % (6 * mb) + b"x" * (size * mb))
        holders.append(c)
        time.sleep(0.2)
    closed = [c for c in holders if c.wait_closed(timeout=1.0)]
    assert len(closed) == 1
    assert closed[0] is not holders[2]          # the smallest holder is not the one dropped
    with p.raw() as probe:
        assert probe.cmd("SET", "probe", "1").value == "OK"
    for c in holders:
        c.close()


def test_a_request_that_never_finishes_is_closed(make_proxy, redis_server):
    p = make_proxy(redis_server, limits={"request_timeout": 1})
    slow = RawClient("127.0.0.1", p.port, timeout=5)
    slow.send(b"*2\r\n$3\r\nGET\r\n$100\r\n")
    try:
        for _ in range(8):              # a byte now and then does not keep it alive
            time.sleep(0.4)
            slow.send(b"x")
    except OSError:                     # closed while trickling: what this test wants
        pass
    assert slow.wait_closed(timeout=4.0)
    # A client that is merely idle between requests stays.
    with p.raw() as idle:
        assert idle.cmd("PING").value == "PONG"
        time.sleep(1.8)
        assert idle.cmd("PING").value == "PONG"
