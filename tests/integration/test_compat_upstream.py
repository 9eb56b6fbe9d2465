"""Compatibility (issue 17 item 1): an upstream connection lost under a client's feet.

A direct redis-py client whose connection dies gets a ConnectionError and retries it; a proxy client
keeps its connection, so the proxy must do what the retry would: commands not yet sent wait for the
reconnect, read-only commands that were on the wire are sent again, and only a write that may have
run gets an error (and is never run twice).
"""

import threading
import time

import pytest
import redis

from tests.fixtures.proxy import encode_command
from tests.integration.test_cluster_basic import cluster_proxy

proxy_only = pytest.mark.proxy_only


def read_loop(client: redis.Redis, stop: threading.Event, errors: list, counts: list) -> None:
    n = 0
    while not stop.is_set():
        try:
            client.get("loss:k")
            client.mget("loss:a", "loss:b")
            n += 1
        except redis.RedisError as exc:     # ConnectionError or an error reply: both count
            errors.append(repr(exc))
    counts.append(n)


@pytest.mark.timeout(90)
def test_reads_survive_redis_restarts_under_load(redis_server, make_proxy):
    """Redis is killed (SIGKILL) and restarted 3 times while redis-py clients (RESP2 and RESP3) read:
    no client sees an error; direct clients need redis-py's retry for the same (they get a
    ConnectionError, the proxy's clients never do)."""
    proxy = make_proxy(redis_server, upstream={"connect_timeout": 3.0})
    clients = [proxy.client(protocol=p, socket_timeout=10) for p in (2, 3, 2, 3)]
    if proxy.direct:
        pytest.skip("a direct client sees the ConnectionError itself")
    stop, errors, counts = threading.Event(), [], []
    threads = [threading.Thread(target=read_loop, args=(c, stop, errors, counts)) for c in clients]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            time.sleep(0.4)
            redis_server.kill()
            time.sleep(0.2)
            redis_server.start()
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert errors == [], f"{len(errors)} errors, first: {errors[:3]}"
    assert len(counts) == 4 and all(n > 0 for n in counts), counts


@pytest.mark.timeout(60)
def test_reads_survive_client_kill_of_the_proxys_connections(redis_server, make_proxy):
    """20 times: CLIENT KILL of every normal connection on Redis (the proxy's), then 3 GETs through the
    proxy, RESP2 and RESP3: no error (on main: errors on the first GETs after a kill)."""
    proxy = make_proxy(redis_server)
    admin = redis_server.client()
    admin.set("loss:k", "v")
    clients = [proxy.client(protocol=2), proxy.client(protocol=3)]
    problems = []
    for _ in range(20):
        admin.client_kill_filter(_type="normal", skipme=True)
        for client in clients:
            for _ in range(3):
                try:
                    assert client.get("loss:k") == b"v"
                except redis.RedisError as exc:
                    problems.append(repr(exc))
    assert problems == [], f"{len(problems)} errors, first: {problems[:3]}"


@proxy_only
@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", [2, 3])
def test_write_in_flight_gets_an_error_and_is_not_run_twice(redis_server, make_proxy, protocol):
    """A client's INCR waits in Redis (CLIENT PAUSE WRITE) when its connection is killed: Redis drops
    it unrun; the proxy cannot know it did not run, so the client gets an error, and the INCR is never
    sent again. A read pipelined the same way is sent again and answered."""
    proxy = make_proxy(redis_server, upstream={"pool_size": 1})
    admin = redis_server.client()
    admin.set("loss:k", "v")
    with proxy.raw(timeout=10) as writer, proxy.raw(timeout=10) as reader:
        if protocol == 3:
            writer.cmd("HELLO", 3)
            reader.cmd("HELLO", 3)
        assert writer.cmd("PING").value == "PONG"
        assert reader.cmd("GET", "loss:k").value == b"v"
        admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        try:
            writer.send(encode_command("INCR", "loss:n"))
            time.sleep(0.3)     # the INCR waits in Redis, paused; a GET behind it on the shared connection
            reader.send(encode_command("GET", "loss:k"))
            time.sleep(0.3)
            admin.client_kill_filter(_type="normal", skipme=True)
            incr = writer.read_frame(timeout=8)
            get = reader.read_frame(timeout=8)
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
        assert incr.is_error and incr.value.startswith("ERR upstream unavailable"), incr
        assert get.value == b"v", get
        time.sleep(0.3)
        assert admin.get("loss:n") is None      # never run, never sent again
        assert writer.cmd("INCR", "loss:n").value == 1      # the client goes on


@proxy_only
@pytest.mark.timeout(60)
def test_unsent_commands_wait_for_the_reconnect(redis_server, make_proxy):
    """Commands that arrive while Redis is down wait for it (up to upstream.connect_timeout), writes
    too: they have not run anywhere."""
    proxy = make_proxy(redis_server, upstream={"connect_timeout": 4.0})
    r = proxy.client(protocol=3, socket_timeout=10)
    assert r.set("loss:w", "1") is True
    redis_server.kill()
    time.sleep(0.3)
    restart = threading.Timer(1.0, redis_server.start)
    restart.start()
    try:
        t0 = time.monotonic()
        assert r.set("loss:w", "2") is True
        assert r.get("loss:w") == b"2"
        assert time.monotonic() - t0 < 4.5
    finally:
        restart.join()


@pytest.mark.timeout(120)
def test_cluster_reads_survive_client_kill_of_the_proxys_connections(make_proxy, redis_cluster):
    """The cluster path: CLIENT KILL of the proxy's connections on every master, 10 times, each followed
    by GETs of keys on every master (RESP2 and RESP3): no error."""
    p = cluster_proxy(make_proxy, redis_cluster)
    direct = redis_cluster.direct()
    keys = [f"{{t{n}}}:k" for n in range(12)]
    for key in keys:
        direct.set(key, "v")
    clients = [p.client(protocol=2), p.client(protocol=3)]
    problems = []
    for _ in range(10):
        for node in redis_cluster.master_nodes():
            node.client().client_kill_filter(_type="normal", skipme=True)
        for client in clients:
            for key in keys:
                try:
                    assert client.get(key) == b"v"
                except redis.RedisError as exc:
                    problems.append(repr(exc))
    assert problems == [], f"{len(problems)} errors, first: {problems[:3]}"
