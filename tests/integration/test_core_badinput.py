"""Core (issue 2): misbehaving clients. Malformed frames, limits, clients that vanish mid-pipeline
or in the middle of a stateful command, clients that never read their replies. The offender gets
a clear error (or is dropped); everybody else keeps being served, and the proxy logs no traceback.
"""

import socket
import threading
import time

import pytest

from tests.fixtures.proxy import encode_command

MALFORMED = {
    "bad-bulk-len": b"*1\r\n$x\r\n",
    "bad-multibulk-len": b"*abc\r\n",
    "negative-bulk-len": b"*1\r\n$-1\r\n",
    "int-inside-command": b"*1\r\n:5\r\n",
    "nested-array": b"*2\r\n*1\r\n$1\r\na\r\n$1\r\nb\r\n",
    "multibulk-over-int-max": b"*3000000000\r\n",
    "bulk-over-512mb": b"*2\r\n$3\r\nSET\r\n$536870913\r\n",
    "unbalanced-quotes": b'SET "a b\r\n',
}


def assert_no_traceback(endpoint):
    text = endpoint.stderr_text()
    assert "Traceback" not in text, text[-4000:]


def assert_serving(endpoint, tag: str = "x"):
    with endpoint.raw() as c:
        assert c.cmd("SET", f"alive:{tag}", tag).value == "OK"
        assert c.cmd("GET", f"alive:{tag}").value == tag.encode()
        assert c.cmd("PING").value == "PONG"


@pytest.mark.parametrize("payload", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_frame_closes_only_that_client(inproc_proxy, payload):
    with inproc_proxy.raw() as other, inproc_proxy.raw() as bad:
        assert other.cmd("SET", "mf:k", "v").value == "OK"
        # half-finished pipeline on the other client, completed after the bad one is dropped
        other.send(b"*2\r\n$3\r\nGET\r\n$4\r\nmf:k")
        bad.send(encode_command("PING"))
        assert bad.read_raw() == b"+PONG\r\n"
        bad.send(payload)
        line = bad.read_line(timeout=3)
        assert line.startswith(b"-ERR Protocol error"), line
        assert bad.wait_closed(3), "the inproc_proxy kept the connection open after a protocol error"
        other.send(b"\r\n")
        assert other.read_raw() == b"$1\r\nv\r\n"
        assert other.cmd("PING").value == "PONG"
    for i in range(3):  # the shared upstream connections were not poisoned
        assert_serving(inproc_proxy, f"after{i}")
    assert_no_traceback(inproc_proxy)


def test_inline_over_default_limit(inproc_proxy):
    with inproc_proxy.raw() as bad:
        bad.send(b"a" * (70 * 1024))
        line = bad.read_line(timeout=5)
        assert line.startswith(b"-ERR Protocol error"), line
        assert bad.wait_closed(3)
    assert_serving(inproc_proxy)


@pytest.mark.proxy_only
def test_bulk_over_configured_limit(redis_server, make_inproc_proxy):
    proxy = make_inproc_proxy(redis_server, limits={"max_bulk_len": 1024})
    with proxy.raw() as ok:
        assert ok.cmd("SET", "lim:k", "x" * 1024).value == "OK"
        assert ok.cmd("STRLEN", "lim:k").value == 1024
    with proxy.raw() as other, proxy.raw() as bad:
        assert other.cmd("PING").value == "PONG"
        t0 = time.monotonic()
        bad.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2000\r\n")  # header only, no body
        line = bad.read_line(timeout=3)
        assert line.startswith(b"-ERR Protocol error: invalid bulk length"), line
        assert time.monotonic() - t0 < 2
        assert bad.wait_closed(3)
        assert other.cmd("GET", "lim:k").value == b"x" * 1024
    assert redis_server.client().get("k") is None
    assert_no_traceback(proxy)


@pytest.mark.proxy_only
def test_multibulk_over_configured_limit(redis_server, make_inproc_proxy):
    proxy = make_inproc_proxy(redis_server, limits={"max_multibulk_len": 16})
    with proxy.raw() as ok:
        assert ok.cmd("DEL", *[f"k{i}" for i in range(15)]).value == 0  # 16 elements: allowed
    with proxy.raw() as bad:
        bad.send(b"*17\r\n")
        line = bad.read_line(timeout=3)
        assert line.startswith(b"-ERR Protocol error: invalid multibulk length"), line
        assert bad.wait_closed(3)
    assert_serving(proxy)


@pytest.mark.proxy_only
def test_inline_over_configured_limit(redis_server, make_inproc_proxy):
    proxy = make_inproc_proxy(redis_server, limits={"max_inline_len": 1024})
    with proxy.raw() as ok:
        ok.send(b"ECHO " + b"y" * 500 + b"\r\n")
        assert ok.read_frame().value == b"y" * 500
    with proxy.raw() as bad:
        bad.send(b"z" * 2048)
        line = bad.read_line(timeout=3)
        assert line.startswith(b"-ERR Protocol error"), line
        assert bad.wait_closed(3)
    assert_serving(proxy)


@pytest.mark.timeout(60)
def test_client_disconnects_mid_pipeline(inproc_proxy):
    big = b"v" * 10_000
    inproc_proxy.redis.client().set("mp:big", big)
    with inproc_proxy.raw() as other:
        for round_ in range(10):
            s = socket.create_connection((inproc_proxy.host, inproc_proxy.port))
            cmds = []
            for i in range(1000):
                cmds.append(encode_command("GET", "mp:big") if i % 2 else encode_command("INCR", "mp:ctr"))
            s.sendall(b"".join(cmds))
            if round_ % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            s.close()
            assert other.cmd("ECHO", f"r{round_}").value == f"r{round_}".encode()
        # a frame cut in half, then gone
        s = socket.create_connection((inproc_proxy.host, inproc_proxy.port))
        s.sendall(b"*3\r\n$3\r\nSET\r\n$5\r\nmp:hf\r\n$10\r\nabc")
        s.close()
        time.sleep(0.3)
        assert other.cmd("GET", "mp:hf").value is None
        assert other.cmd("GET", "mp:big").value == big
    assert_serving(inproc_proxy)
    assert inproc_proxy.alive
    assert_no_traceback(inproc_proxy)


STATES = {
    "blpop": [("BLPOP", "st:q", 0)],
    "multi": [("MULTI",), ("SET", "st:k", "from-multi")],
    "watch": [("WATCH", "st:k")],
    "select": [("SELECT", 1)],
    "subscribe": [("SUBSCRIBE", "st:chan")],
    "psubscribe": [("PSUBSCRIBE", "st:*")],
    "tracking": [("HELLO", 3), ("CLIENT", "TRACKING", "ON")],
    "setname": [("CLIENT", "SETNAME", "leaver")],
    "monitor": [("MONITOR",)],
}


@pytest.mark.parametrize("state", list(STATES.values()), ids=list(STATES))
@pytest.mark.timeout(30)
def test_client_leaves_in_stateful_command(inproc_proxy, state):
    """A pinned connection left behind must not leak its state into anyone else's commands."""
    leaver = inproc_proxy.raw()
    blocking = state[0][0] == "BLPOP"
    for command in state:
        leaver.send_command(*command)
        if not blocking:
            leaver.read_frame()
    time.sleep(0.2)
    leaver.close()
    time.sleep(0.3)
    # a fresh batch of clients (more than the pool size) sees plain db-0, non-transactional Redis
    for i in range(8):
        with inproc_proxy.raw() as c:
            assert c.cmd("SET", "st:k", f"v{i}").value == "OK", "command got queued/blocked/rejected"
            assert c.cmd("GET", "st:k").value == f"v{i}".encode()
            assert c.cmd("CLIENT", "GETNAME").value is None
    assert inproc_proxy.redis.client(db=0).get("st:k") == b"v7"
    assert inproc_proxy.redis.client(db=1).get("st:k") is None
    # nobody is still blocked on the leaver's behalf, eating pushed items
    r = inproc_proxy.redis.client()
    r.lpush("st:q", "item")
    time.sleep(0.3)
    assert r.llen("st:q") == 1, "a zombie BLPOP consumed the item"
    assert inproc_proxy.client(protocol=2).publish("st:chan", "x") == 0, "a zombie subscription is still active"
    assert_no_traceback(inproc_proxy)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.proxy_only
@pytest.mark.timeout(60)
def test_client_that_never_reads_is_throttled(redis_server, make_proxy):
    """Pipelining GETs of a 100 KB value without reading: the proxy's memory stays bounded."""
    proxy = make_proxy(redis_server, limits={"client_output_soft": 1 << 20, "client_output_hard": 256 << 20})
    redis_server.client().set("thr:big", b"x" * 100_000)
    base_kb = _rss_kb(proxy.pid)
    hog = socket.create_connection((proxy.host, proxy.port))
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    hog.setblocking(False)
    chunk = encode_command("GET", "thr:big") * 1000  # 100 MB of replies per chunk
    sent = 0
    peak_kb = base_kb
    deadline = time.monotonic() + 4
    with proxy.raw() as other:
        while time.monotonic() < deadline:
            try:
                sent += hog.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break  # dropped at the hard limit: also acceptable
            peak_kb = max(peak_kb, _rss_kb(proxy.pid))
        t0 = time.monotonic()
        assert other.cmd("PING").value == "PONG"
        assert other.cmd("GET", "thr:big", timeout=5).value == b"x" * 100_000
        assert time.monotonic() - t0 < 2
        peak_kb = max(peak_kb, _rss_kb(proxy.pid))
    hog.close()
    requested_mb = sent / len(encode_command("GET", "thr:big")) * 0.1
    grown_mb = (peak_kb - base_kb) / 1024
    print(f"hog asked for {requested_mb:.0f} MB of replies; proxy RSS grew {grown_mb:.0f} MB")
    assert grown_mb < 150, f"proxy RSS grew {grown_mb:.0f} MB for a client that never reads"
    assert proxy.alive
    assert_serving(proxy)
    assert_no_traceback(proxy)


@pytest.mark.timeout(60)
def test_slow_reader_gets_every_reply_in_order(inproc_proxy):
    """A client that pipelines 3,000 commands (60 MB of replies), reads nothing for a while, then
    reads: throttling must pause it, never drop or reorder its replies."""
    value = b"s" * 20_000
    inproc_proxy.redis.client().set("slow:v", value)
    n = 3000
    request = b"".join(
        encode_command("ECHO", f"m{i}") if i % 3 == 0 else encode_command("GET", "slow:v") for i in range(n)
    )
    with inproc_proxy.raw(timeout=20) as c:
        sender = threading.Thread(target=c.send, args=(request,), daemon=True)
        sender.start()
        time.sleep(1.0)
        for i in range(n):
            frame = c.read_frame()
            expected = f"m{i}".encode() if i % 3 == 0 else value
            assert frame.value == expected, (i, frame.kind, (frame.value or b"")[:40])
        sender.join(10)
        assert c.cmd("PING").value == "PONG"
    assert_no_traceback(inproc_proxy)


@pytest.mark.proxy_only
@pytest.mark.timeout(60)
def test_non_reading_client_does_not_stall_other_clients(redis_server, make_proxy):
    """Throttling a client that never reads must not make the shared upstream connections (and so
    every other client multiplexed on them) wait behind that client's replies, nor pile its replies
    up in Redis's output buffer for the proxy."""
    # Guard the machine: Redis drops a connection whose output buffer passes 1 GB.
    redis_server.client().config_set("client-output-buffer-limit", "normal 1gb 1gb 0")
    proxy = make_proxy(redis_server, limits={"client_output_soft": 1 << 20})
    value = b"h" * 20_000
    redis_server.client().set("hol:big", value)
    hog = socket.create_connection((proxy.host, proxy.port))
    hog.setblocking(False)
    chunk = encode_command("GET", "hol:big") * 1000
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                hog.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
        # 16 fresh clients of both protocols: between them they use every shared upstream connection
        slow = []
        for i in range(16):
            t0 = time.monotonic()
            try:
                with proxy.raw(timeout=5) as c:
                    if i % 2:
                        assert c.cmd("HELLO", 3).kind == "%"
                    assert c.cmd("GET", "hol:big").value == value
                    assert c.cmd("INCR", "hol:n").value == i + 1
            except TimeoutError:
                slow.append((i, "timed out"))
                continue
            if time.monotonic() - t0 > 2:
                slow.append((i, round(time.monotonic() - t0, 1)))
        upstream_buffers = redis_server.client().info("memory")["used_memory"] / 2**20
    finally:
        hog.close()
    assert not slow, f"clients stalled behind a non-reading client: {slow}"
    assert upstream_buffers < 512, f"Redis holds {upstream_buffers:.0f} MB of replies for the proxy"
