"""The session without sockets: a fake client transport and a fake upstream pool.

What a client sees (bytes written to its transport, in order), whether its reading is paused, and
what reaches the upstream (the bytes each connection was asked to send).
"""

from __future__ import annotations

import asyncio

from proxy.config import config_from_dict
from proxy.ops.metrics import ProxyStats
from proxy.protocol.commands import TABLE
from proxy.protocol.resp import encode_command
from proxy.session.guard import Guard
from proxy.session.monitor import Monitors
from proxy.session.session import Session
from proxy.tasks import Background


class Transport:
    def __init__(self):
        self.out = bytearray()
        self.reading = True
        self.closed = False

    def write(self, data):
        self.out += data

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def close(self):
        self.closed = True

    abort = close

    def get_write_buffer_size(self):
        return 0

    def set_write_buffer_limits(self, high=None):
        pass

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 5000)


class Conn:
    def __init__(self, up: bool = True):
        self.up = up
        self.proto = 2
        self.sent: list[tuple[bytes, object]] = []
        self.write_paused = False
        self.blocked_sessions: set = set()
        self.waiters: list = []

    def send(self, data, waiter):
        self.sent.append((data, waiter))

    send_direct = send


class Pool:
    cluster = False
    table = None
    server_version = "7.0.0"
    reason = "cannot connect: refused"

    def __init__(self, conn: Conn | None):
        self.conn = conn

    def node_for(self, args):
        return self

    node_for_key = node_for_slot = node_for

    def any_node(self):
        return self

    def pick(self, proto):
        return self.conn if self.conn is not None and self.conn.up else None

    def refusal(self, name, args):
        return None

    def slot_of(self, args):
        return 0 if len(args) > 1 else None

    async def run(self, args, proto=2):
        return b"-ERR upstream unavailable: " + self.reason.encode() + b"\r\n"


class Host:
    def __init__(self, pool: Pool, **cfg):
        self.cfg = config_from_dict(cfg)
        self.pool = pool
        self.table = TABLE
        self.readthrough = None
        self.sessions: set = set()
        self.stats = ProxyStats()
        self.clock = 0.0
        self.auth_required = bool(self.cfg.listen.password)
        self.upstream_auth = None      # listen.auth: local
        self.monitors = Monitors()
        self.guard = Guard(pool, "cacheproxy:wb", 0)
        self.background = Background()
        self.query_buffered = 0

    def over_query_budget(self):
        raise AssertionError("no test here passes the query buffer budget")

    def check_password(self, creds):
        return creds[-1].decode() == self.cfg.listen.password



def connect(host: Host) -> tuple[Session, Transport]:
    session, transport = Session(host), Transport()
    session.connection_made(transport)
    return session, transport


def cmds(*commands) -> bytes:
    return b"".join(encode_command(c) for c in commands)


def test_a_pipeline_goes_up_as_the_clients_bytes_and_replies_keep_their_order():
    conn = Conn()
    session, transport = connect(Host(Pool(conn)))
    data = cmds(("GET", "a"), ("GET", "b"))
    session.data_received(data)
    assert [sent for sent, _ in conn.sent] == [data]
    session.data_received(cmds(("PING",), ("GET", "c")))
    first, second = conn.sent[0][1], conn.sent[1][1]
    second.on_reply(b"$1\r\nc\r\n")              # the later reply arrives first
    assert transport.out == b""
    first.on_reply(b"$1\r\na\r\n$1\r\nb\r\n")
    assert transport.out == b"$1\r\na\r\n$1\r\nb\r\n+PONG\r\n$1\r\nc\r\n"


def test_reading_pauses_at_the_inflight_cap_and_resumes_as_replies_return():
    conn = Conn()
    session, transport = connect(Host(Pool(conn), limits={"max_inflight": 4}))
    session.data_received(cmds(*[("GET", f"k{i}") for i in range(10)]))
    assert not transport.reading
    assert sum(waiter.count for _, waiter in conn.sent) == 4
    answered = 0
    while answered < len(conn.sent):       # each batch of replies lets the next requests go up
        assert sum(w.count for _, w in conn.sent[answered:]) <= 4
        waiter = conn.sent[answered][1]
        answered += 1
        waiter.on_reply(b":1\r\n" * waiter.count)
    assert sum(waiter.count for _, waiter in conn.sent) == 10
    assert transport.reading
    assert transport.out == b":1\r\n" * 10


async def test_without_an_upstream_every_request_is_answered_and_reading_resumes():
    session, transport = connect(Host(Pool(None), limits={"max_inflight": 8}))
    session.data_received(cmds(*[("GET", f"k{i}") for i in range(2000)]))
    for _ in range(200):
        if transport.out.count(b"\r\n") >= 2000 and transport.reading:
            break
        await asyncio.sleep(0.01)
    assert transport.out.count(b"-ERR upstream unavailable") == 2000
    assert transport.reading and not session.paused


def test_reserved_keys_never_reach_the_upstream():
    conn = Conn()
    session, transport = connect(Host(Pool(conn)))
    session.data_received(cmds(("DEL", "cacheproxy:wb:{0}"), ("PING",)))
    assert conn.sent == []
    assert transport.out.startswith(b"-ERR keys cacheproxy:* are reserved") and transport.out.endswith(b"+PONG\r\n")


def test_a_protocol_error_is_answered_after_earlier_replies_then_the_client_is_closed():
    conn = Conn()
    session, transport = connect(Host(Pool(conn)))
    session.data_received(cmds(("GET", "a")) + b"*1\r\n$x\r\n")
    assert not transport.closed
    conn.sent[0][1].on_reply(b"$1\r\na\r\n")
    assert transport.out.startswith(b"$1\r\na\r\n-ERR Protocol error")
    assert transport.closed


def test_auth_is_required_before_anything_reaches_the_upstream():
    conn = Conn()
    session, transport = connect(Host(Pool(conn), listen={"password": "pw"}))
    session.data_received(cmds(("GET", "a"), ("AUTH", "nope"), ("AUTH", "pw"), ("RESET",), ("GET", "a")))
    assert conn.sent == []
    assert transport.out == (b"-NOAUTH Authentication required.\r\n-WRONGPASS invalid username-password pair or "
                             b"user is disabled.\r\n+OK\r\n+RESET\r\n-NOAUTH Authentication required.\r\n")


async def test_a_step_that_fails_answers_its_command_and_the_client_goes_on():
    class Broken(Pool):
        async def run(self, args, proto=2):
            raise RuntimeError("a bug in the slow path")

    session, transport = connect(Host(Broken(None)))
    session.data_received(cmds(("GET", "a"), ("PING",)))
    for _ in range(100):
        if transport.out.endswith(b"+PONG\r\n"):
            break
        await asyncio.sleep(0.01)
    assert transport.out == b"-ERR internal proxy error\r\n+PONG\r\n"
    assert not transport.closed and transport.reading
