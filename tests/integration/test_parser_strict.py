"""The request parser through the real proxy and a real Redis (integrity issue, items 2, 10 and 13).

A client must get from the proxy exactly what Redis would have answered to the same bytes, and the
shared upstream connections must only ever carry requests the proxy has read (and vetted) itself:
no smuggled command, no frame that makes Redis drop a connection other clients share.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.fixtures.proxy import encode_command

WAIT = 0.5      # "no reply": how long a client waits before it concludes nothing is coming


def exchange(endpoint, *sends: bytes, wait: float = WAIT) -> list[tuple[bytes, bool]]:
    """Send each of `sends` in turn on a fresh connection; after each, every byte that came back
    until the peer closed or `wait` seconds passed without any, and whether it closed."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=5)
    steps = []
    try:
        for data in sends:
            sock.sendall(data)
            got, closed = _drain(sock, wait)
            steps.append((got, closed))
            if closed:
                break
        return steps
    finally:
        sock.close()


def _drain(sock: socket.socket, wait: float) -> tuple[bytes, bool]:
    got = b""
    while True:
        sock.settimeout(wait)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return got, False
        except ConnectionResetError:
            return got, True
        if not data:
            return got, True
        got += data


def upstream_client_ids(redis_server) -> set[str]:
    """The proxy's connections to Redis (every client of the test's Redis but this one)."""
    client = redis_server.client()
    me = client.client_id()
    return {str(c["id"]) for c in client.client_list() if int(c["id"]) != me}


def test_smuggled_shutdown_never_reaches_redis(proxy, redis_server):
    # A length line ending in 28 \r: Redis ends it at the first \r and skips one byte, so the "value"
    # a lenient parser sees holds a SHUTDOWN NOSAVE that Redis runs. The proxy must see it too.
    value = b"a" * 13 + b"xx" + b"SHUTDOWN NOSAVE\r\n" + b"PING    "
    data = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$40" + b"\r" * 28 + b"\n" + value + b"\r\n"
    [(got, closed)] = exchange(proxy, data)
    assert got.startswith(b"+OK\r\n-ERR command 'SHUTDOWN' is not supported"), (got, proxy.stderr_text()[-2000:])
    assert got.endswith(b"\r\n+PONG\r\n") and not closed
    time.sleep(0.2)
    assert redis_server.running, "the smuggled SHUTDOWN reached Redis"
    assert redis_server.client().get("k") == b"\r" * 26 + b"\n" + b"a" * 13   # what Redis itself stores


@pytest.mark.parametrize("data", [
    b"*2 \r\n$4\r\nECHO\r\n$1\r\na\r\n",
    b"*1\r\n$06\r\nECHO\r\n",
    b"*2\r\n$4\r\nECHO\r\n$0_1\r\na\r\n",
    b"*2\r\r\n$4\r\nECHO\r\n$1\r\na\r\n",
    b"*4\r\n$6\r\nSTRLEN\r\n*0\r\n*0\r\n*1\r\n$1\r\na\r\n",       # nested arrays: hiredis reads them
    b"*3\r\n$4\r\nECHO\r\n+ab\r\n=7\r\ntxt:abc\r\n",
], ids=["space-in-count", "leading-zero", "underscore", "cr-cr-lf", "nested-arrays", "resp3-types"])
def test_malformed_lengths_get_redis_own_answer_and_never_reach_it(proxy, redis_server, data):
    before = upstream_client_ids(redis_server)
    expected = exchange(redis_server, data)
    got = exchange(proxy, data)
    assert got == expected, f"proxy answered {got!r}, Redis answers {expected!r}"
    assert expected[-1][1], "Redis closes the connection after a protocol error"
    # The shared upstream connections were never handed the frame: none was dropped by Redis.
    assert before <= upstream_client_ids(redis_server)
    with proxy.raw() as c:
        assert c.cmd("ECHO", "still here").value == b"still here"


@pytest.mark.parametrize("sends", [
    [b"ECHO a\vb\r\n"],                           # \v and \f do not split an argument in Redis
    [b"\vECHO\fx \v y\r\n"],
    [b"ECHO a\fb\r\n"],
    [b"*1\r\n$4\r\nECHOxx*2\rx$4\rxECHO\rx$1\r\rz\r\r"],   # Redis's leniencies, read its way
    [b"ECHO a\0b\r\nECHO c\r\n", b"x" * 65536],    # a NUL: Redis never finds the end of the line
    [b"*1\0\r\n$4\r\nPING\r\n", b"y" * 65536],
    [b"*1\r\nX", b"\r", b"x"],                     # "expected '$'" only once the line is complete
], ids=["vtab", "formfeed-command", "formfeed-arg", "lenient", "nul-inline", "nul-count", "late-dollar"])
def test_inline_and_edges_answered_as_redis_answers(proxy, redis_server, sends):
    expected = exchange(redis_server, *sends)
    got = exchange(proxy, *sends)
    assert got == expected, f"proxy answered {got!r}, Redis answers {expected!r}"


@pytest.mark.proxy_only
def test_unauthenticated_limits_with_a_password(redis_server, make_proxy):
    proxy = make_proxy(redis_server, listen={"password": "pw"})
    for data, message in [(b"*11\r\n", b"unauthenticated multibulk length"),
                          (b"*2\r\n$4\r\nECHO\r\n$16385\r\n", b"unauthenticated bulk length")]:
        assert exchange(proxy, data) == [(b"-ERR Protocol error: " + message + b"\r\n", True)]
    # Redis runs a pipelined AUTH before it reads on: what follows it is not held to the limits.
    mset = encode_command("MSET", *[f"k{i}" for i in range(6) for _ in (0, 1)])
    big = encode_command("ECHO", "v" * 20000)
    [(got, closed)] = exchange(proxy, encode_command("AUTH", "pw") + mset + big)
    assert got == b"+OK\r\n+OK\r\n$20000\r\n" + b"v" * 20000 + b"\r\n" and not closed
    [(got, closed)] = exchange(proxy, encode_command("AUTH", "wrong") + mset)
    assert got.startswith(b"-WRONGPASS") and got.endswith(b"-ERR Protocol error: unauthenticated multibulk length\r\n")
    assert closed


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.proxy_only
def test_declared_bulk_over_the_query_buffer_is_refused_before_it_arrives(redis_server, make_proxy):
    proxy = make_proxy(redis_server, limits={"max_query_buffer": 1 << 20})
    base = _rss_mb(proxy.pid)
    header = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$150000000\r\n"
    reply = b"-ERR Protocol error: request too big for the query buffer (limits.max_query_buffer)\r\n"
    assert exchange(proxy, header + b"v" * 65536) == [(reply, True)]
    assert _rss_mb(proxy.pid) - base < 20
    with proxy.raw() as c:      # a request that fits still goes through
        assert c.cmd("SET", "k", "v" * 500_000).value == "OK"
    assert redis_server.client().strlen("k") == 500_000
