"""The model of Redis's parser (tests/fixtures/redis_model.py) against a real redis-server.

The differential fuzzer is only as good as the model, so the model is checked here on a sample of
the fuzzer's own inputs (plus the integrity issue's examples): each input goes, as it is, to a fresh
connection of a redis-server of the test's own, and
  * the replies Redis sends are the replies to the commands the model says it read (the same
    commands, canonically encoded, are replayed on another connection and database, and both the
    replies and the data they leave behind must be equal);
  * where the model sees a protocol error, Redis replies "-ERR Protocol error: <the same words>"
    after those replies and closes the connection;
  * where the model waits for more bytes, Redis holds the same bytes: CLIENT LIST's qbuf (unread
    query buffer) and argv-mem (arguments of the request being collected) match the model's.
Inputs whose commands could change the connection or the server (anything but the fuzzer's RPUSH,
ECHO, GET, SET, or names Redis does not know) are skipped.
"""

from __future__ import annotations

import socket
import time

import pytest

from proxy.protocol.resp import encode_command
from tests.fixtures import parser_fuzz
from tests.fixtures.proxy import Incomplete, parse_frame
from tests.fixtures.redis_model import ClientModel
from tests.fixtures.redis_server import RedisServer

SEED = 424242
SAMPLE = 600
SAFE = {b"RPUSH", b"ECHO", b"GET", b"SET"}

# The integrity issue's examples and the edges of the reading (NUL, \v, \f, lenient line ends).
EXAMPLES = [
    b"*2 \r\n", b"*1\r\n$06\r\nECHO\r\n", b"*1\r\n$0_1\r\n", b"*2\r\r\n$4\r\nECHO\r\n$1\r\na\r\n",
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$40" + b"\r" * 28 + b"\n" + b"a" * 13 + b"xxECHO NOSAVE\r\nECHO    \r\n",
    b"*4\r\n$6\r\nSTRLEN\r\n*0\r\n*0\r\n*1\r\n$1\r\na\r\n", b"ECHO a\vb\r\n", b"\vECHO\fx \v y\r\n",
    b"ECHO a\0b\r\nECHO c\r\n", b"*1\r\n$4\r\nECHOxx", b"*2\rx$4\rxECHO\rx$1\r\rz\r\r", b"*1\r\nX",
    b"*1\r\nX\r", b"*1\r\nX\rx", b"*1\r\n\r\n", b"*-5\r\n*0\r\n\r\n   \r\nECHO a\r\n", b'ECHO "a"b\r\n',
    b'ECHO "a\\x4"\r\n', b"*1\r\n$\x80\r\n", b"*1\0\r\n", b"*2\r\n$4\r\nECHO\r\n$3\r\nab",
    b"a" * 70000, b"*" + b"1" * 70000, b"*1\r\n$" + b"1" * 70000,
]


def _replies(buf: bytes) -> tuple[list[bytes], bytes]:
    """Split complete replies off `buf`: (their raw bytes, the rest)."""
    out = []
    while True:
        try:
            _, end = parse_frame(buf)
        except Incomplete:
            return out, buf
        out.append(buf[:end])
        buf = buf[end:]


def _read_replies(sock: socket.socket, count: int, until_eof: bool) -> tuple[list[bytes], bool]:
    """`count` replies (all of them up to EOF if `until_eof`); and whether the peer closed."""
    buf, replies, closed = b"", [], False
    deadline = time.monotonic() + 5
    while (until_eof and not closed) or len(replies) < count:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            data = b""
        if not data:
            closed = True
            break
        more, buf = _replies(buf + data)
        replies += more
    return replies, closed


def _client_entry(control, port: int) -> dict:
    for entry in control.client_list():
        if entry["addr"].endswith(f":{port}"):
            return entry
    return {}


class Lab:
    """A redis-server, a control connection, and the names Redis knows as commands."""

    def __init__(self, server: RedisServer, password: str | None = None):
        self.server = server
        self.password = password
        self.control = server.client(password=password)
        self.commands = {name.upper().encode() if isinstance(name, str) else name.upper()
                         for name in self.control.command_list()}

    def safe(self, commands: list[list[bytes]]) -> bool:
        return all(args[0].upper() in SAFE or args[0].upper() not in self.commands for args in commands)

    def send(self, data: bytes, db: int = 0) -> socket.socket:
        """Send `data` as it is on a fresh connection; returns the socket, to be closed by the caller."""
        sock = socket.create_connection((self.server.host, self.server.port), timeout=5)
        if db:
            sock.sendall(encode_command([b"SELECT", str(db).encode()]))
            assert _read_replies(sock, 1, False)[0] == [b"+OK\r\n"]
        sock.sendall(data)
        return sock

    def dump(self, db: int) -> dict:
        client = self.server.client(password=self.password, db=db)
        return {key: client.dump(key) for key in client.keys("*")}

    def check(self, data: bytes) -> str | None:
        """Redis against the model for one input; a description of the difference, or None."""
        model = ClientModel(auth_required=self.password is not None)
        model.read(data)
        if not self.safe(model.commands):
            return None
        self.control.flushall()
        sock = self.send(data)
        port = sock.getsockname()[1]
        try:
            replies, closed = _read_replies(sock, len(model.commands), until_eof=model.error is not None)
            if model.error is not None:
                expected = ("-ERR Protocol error: " + model.error).replace("\r", " ").replace("\n", " ")
                if not closed or not replies or replies[-1] != expected.encode("latin-1") + b"\r\n":
                    return f"model: error {model.error!r}; Redis: {replies[-1:]!r}, closed={closed}"
                replies = replies[:-1]
            elif closed:
                return f"model: no error; Redis closed the connection after {replies!r}"
            else:
                state = (model.qbuf, model.argv_mem)
                seen = None
                for _ in range(100):
                    entry = _client_entry(self.control, port)
                    seen = (int(entry.get("qbuf", -1)), int(entry.get("argv-mem", -1)))
                    if seen == state:
                        break
                    time.sleep(0.01)
                if seen != state:
                    return f"model: waiting with (qbuf, argv-mem) = {state}; Redis: {seen}"
            if len(replies) != len(model.commands):
                return f"model: {len(model.commands)} commands {model.commands!r}; Redis replied {replies!r}"
        finally:
            sock.close()
        return self._compare_with_replay(model.commands, replies)

    def _compare_with_replay(self, commands: list[list[bytes]], replies: list[bytes]) -> str | None:
        """The same commands, canonically encoded, on database 1: same replies, same data. (Before
        AUTH nothing runs and SELECT is refused: the replay shares database 0, which stays empty.)"""
        db = 0 if self.password is not None else 1
        sock = self.send(b"".join(map(encode_command, commands)), db=db)
        try:
            replayed, _ = _read_replies(sock, len(commands), until_eof=False)
        finally:
            sock.close()
        if replayed != replies:
            return f"commands {commands!r}: Redis replied {replies!r}, the replay {replayed!r}"
        if self.dump(0) != self.dump(db):
            return f"commands {commands!r}: the data differs from the replay's"
        return None


def _sample(unauthenticated: bool, count: int) -> list[bytes]:
    inputs = []
    for case in parser_fuzz.cases(SEED, count * 10):
        if case.unauthenticated == unauthenticated and case.max_bulk == parser_fuzz.DEFAULT_MAX_BULK \
                and len(case.data) < 60000:     # below 64 KB Redis reads the same however reads split
            inputs.append(case.data)
        if len(inputs) == count:
            return inputs
    return inputs


@pytest.mark.timeout(180)
def test_model_reads_like_redis(redis_server):
    lab = Lab(redis_server)
    differences = []
    for data in EXAMPLES + _sample(False, SAMPLE):
        problem = lab.check(data)
        if problem:
            differences.append(f"{data[:300]!r}\n  {problem}")
    assert not differences, "\n".join(differences[:10])


@pytest.mark.timeout(120)
def test_model_reads_like_redis_before_auth(tmp_path):
    server = RedisServer(tmp_path / "redis", extra_args=["--requirepass", "pw"]).start()
    try:
        lab = Lab(server, password="pw")
        differences = []
        for data in EXAMPLES + _sample(True, SAMPLE // 3):
            problem = lab.check(data)
            if problem:
                differences.append(f"{data[:300]!r}\n  {problem}")
        assert not differences, "\n".join(differences[:10])
    finally:
        server.stop()
