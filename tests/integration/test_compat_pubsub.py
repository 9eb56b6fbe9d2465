"""Compatibility (issue 17 items 3, 4, 7): pub/sub and the other relayed commands behave as with Redis.

- SUBSCRIBE leaves for Redis in the loop turn it arrives in (a spare dedicated connection is ready), so
  a PUBLISH another client sends right after it reaches the new subscriber, as with a direct connection.
- UNSUBSCRIBE / PUNSUBSCRIBE / SUNSUBSCRIBE with no subscription: Redis's bytes exactly.
- SYNC / PSYNC: relayed on a dedicated connection (tools that read the replication stream work).
"""

import time

import pytest

from tests.fixtures.proxy import RawClient

PROTOCOLS = pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])


@PROTOCOLS
@pytest.mark.timeout(60)
def test_subscribe_then_publish_is_delivered(proxy, protocol):
    """100 times: a new client subscribes (redis-py does not wait for the confirmation) and another
    publishes at once: 100/100 delivered (on main: about 6/20, the SUBSCRIBE waited for a new
    upstream connection)."""
    pub = proxy.client(protocol=protocol)
    receivers, received = 0, 0
    for i in range(100):
        sub = proxy.client(protocol=protocol)
        ps = sub.pubsub(ignore_subscribe_messages=True)
        ps.subscribe(f"sp:{i}")
        delivered_to = pub.publish(f"sp:{i}", b"m%d" % i)
        receivers += delivered_to
        deadline = time.monotonic() + (2 if delivered_to else 0)
        while time.monotonic() < deadline:
            message = ps.get_message(timeout=0.2)
            if message is not None:
                received += message["data"] == b"m%d" % i
                break
        ps.close()
        sub.close()
    assert (receivers, received) == (100, 100)


@PROTOCOLS
@pytest.mark.parametrize("command", ["UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"])
@pytest.mark.parametrize("channels", [(), ("a",), ("a", "b")], ids=["none", "one", "two"])
def test_unsubscribe_without_subscription_is_byte_exact(redis_server, proxy, protocol, command, channels):
    """Not subscribed to anything: the proxy answers exactly the bytes Redis sends."""
    replies = []
    for port in (redis_server.port, proxy.port):
        with RawClient("127.0.0.1", port) as c:
            if protocol == 3:
                c.cmd("HELLO", 3)
            c.send_command(command, *channels)
            replies.append(b"".join(c.read_raw() for _ in range(max(1, len(channels)))))
            assert c.cmd("PING").kind == "+"     # and the connection is an ordinary one still
    assert replies[1] == replies[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", [("SYNC",), ("PSYNC", "?", "-1")], ids=["SYNC", "PSYNC"])
def test_replication_stream_is_relayed(redis_server, proxy, command):
    """SYNC/PSYNC: the reply is Redis's (an RDB transfer, then the replication stream), not a refusal;
    a write made after it shows up in the stream."""
    redis_server.client().set("repl:k", "v1")
    with proxy.raw(timeout=10) as replica:
        replica.send_command(*command)
        deadline = time.monotonic() + 10
        data = b""
        while b"REDIS" not in data and time.monotonic() < deadline:    # the RDB payload's magic
            data += replica._recv(deadline)
        assert b"REDIS" in data, data[:200]
        if command[0] == "PSYNC":
            assert data.lstrip(b"\n").startswith(b"+FULLRESYNC"), data[:80]
        redis_server.client().set("repl:k2", "streamed")
        while b"streamed" not in data and time.monotonic() < deadline:
            data += replica._recv(deadline)
        assert b"repl:k2" in data and b"streamed" in data


def test_monitor_shows_commands_the_proxy_answers_too(proxy):
    """MONITOR: PING and ECHO (answered by the proxy itself) appear in the stream as Redis writes them,
    in order with the commands Redis ran (on main they were missing)."""
    import re
    with proxy.raw() as monitor, proxy.raw() as client:
        assert monitor.cmd("MONITOR").value == "OK"
        client_port = client.sock.getsockname()[1]
        assert client.cmd("PING").value == "PONG"
        assert client.cmd("ECHO", 'a"b\n').value == b'a"b\n'
        assert client.cmd("GET", "mon:k").value is None
        lines = []
        while len(lines) < 3:   # other connections' commands (the proxy's own handshakes) may come between
            line = monitor.read_frame(timeout=5).value
            if f":{client_port}]" in line or line.endswith('"GET" "mon:k"'):
                lines.append(line)
    assert re.fullmatch(rf'\d+\.\d{{6}} \[0 127\.0\.0\.1:{client_port}\] "PING"', lines[0]), lines
    assert re.fullmatch(rf'\d+\.\d{{6}} \[0 127\.0\.0\.1:{client_port}\] "ECHO" "a\\"b\\n"', lines[1]), lines
    assert lines[2].endswith('"GET" "mon:k"'), lines
