"""Core (issue 2): the wire protocol itself. RESP2/RESP3 replies byte-identical to Redis's, HELLO,
inline commands (what telnet/nc send), QUIT, and redis-cli in its usual modes.
"""

import time

import pytest

from tests.fixtures.proxy import RawClient, encode_command

PROTOCOLS = pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
MARKER = "end-of-replies-7f3a"


def _setup_data(redis_server):
    r = redis_server.client()
    r.hset("t:h", mapping={"f1": "v1", "f2": "v2"})
    r.sadd("t:s", "a", "b", "c")
    r.sadd("t:si", 1, 2, 3)
    r.zadd("t:z", {"m": 1.5, "n": -0.25, "big": 1e20})
    r.set("t:n", "12")
    r.rpush("t:l", "x", "y")
    r.xadd("t:st", {"f": "v"}, id="1-1")


def _replies(raw: RawClient, *command) -> bytes:
    """Send command then ECHO MARKER; return every byte before the marker reply."""
    raw.send(encode_command(*command) + encode_command("ECHO", MARKER))
    out = b""
    while True:
        frame = raw.read_raw()
        if frame.endswith(MARKER.encode() + b"\r\n") and MARKER.encode() in frame[:40]:
            return out
        out += frame


COMMANDS = [
    ("HGETALL", "t:h"),
    ("HGETALL", "t:none"),
    ("SMEMBERS", "t:s"),
    ("SMEMBERS", "t:si"),
    ("ZSCORE", "t:z", "m"),
    ("ZSCORE", "t:z", "none"),
    ("ZRANGE", "t:z", 0, -1, "WITHSCORES"),
    ("ZINCRBY", "t:z", 0, "big"),
    ("ZPOPMIN", "t:z", 0),
    ("GET", "t:none"),
    ("GET", "t:n"),
    ("INCRBY", "t:n", 0),
    ("EXISTS", "t:n", "t:none"),
    ("LRANGE", "t:l", 0, -1),
    ("LRANGE", "t:none", 0, -1),
    ("LPOP", "t:none"),
    ("MGET", "t:n", "t:none"),
    ("HMGET", "t:h", "f1", "nope"),
    ("XRANGE", "t:st", "-", "+"),
    ("XREAD", "STREAMS", "t:st", "0"),
    ("XREAD", "STREAMS", "t:none", "0"),
    ("TYPE", "t:z"),
    ("OBJECT", "ENCODING", "t:s"),
    ("SISMEMBER", "t:s", "a"),
    ("EVAL", "return {1, 'two', {3.5}, redis.status_reply('FINE')}", 0),
    ("EVAL", "redis.setresp(3); return redis.call('HGETALL', KEYS[1])", 1, "t:h"),
    ("EVAL", "return redis.error_reply('MYERR custom')", 0),
    ("SET", "t:n"),
    ("NOSUCHCOMMAND",),
]


@PROTOCOLS
def test_replies_byte_identical_to_redis(sproxy, protocol):
    """Every reply type reaches the client exactly as Redis encodes it, in RESP2 and RESP3."""
    _setup_data(sproxy.redis)
    direct = RawClient(sproxy.redis.host, sproxy.redis.port)
    via = sproxy.raw()
    try:
        for raw in (direct, via):
            if protocol == 3:
                assert raw.cmd("HELLO", 3).kind == "%"
        for command in COMMANDS:
            expected = _replies(direct, *command)
            got = _replies(via, *command)
            assert got == expected, f"{command}: proxy sent {got!r}, Redis sends {expected!r}"
    finally:
        direct.close()
        via.close()


DEBUG_TYPES = ["string", "integer", "double", "bignum", "null", "array", "set", "map", "attrib", "push",
               "verbatim", "true", "false"]


@PROTOCOLS
@pytest.mark.parametrize("kind", DEBUG_TYPES)
def test_debug_protocol_types_intact(sproxy, protocol, kind):
    """DEBUG PROTOCOL <type> emits each RESP3 type (bignum, verbatim, attribute, push ...)."""
    direct = RawClient(sproxy.redis.host, sproxy.redis.port)
    via = sproxy.raw()
    try:
        for raw in (direct, via):
            if protocol == 3:
                assert raw.cmd("HELLO", 3).kind == "%"
        expected = _replies(direct, "DEBUG", "PROTOCOL", kind)
        got = _replies(via, "DEBUG", "PROTOCOL", kind)
        assert got == expected
    finally:
        direct.close()
        via.close()


def test_resp3_types_decoded(sproxy):
    _setup_data(sproxy.redis)
    with sproxy.raw() as raw:
        reply = raw.cmd("HELLO", 3)
        assert reply.kind == "%" and reply.py()[b"proto"] == 3
        h = raw.cmd("HGETALL", "t:h")
        assert h.kind == "%" and h.py() == {b"f1": b"v1", b"f2": b"v2"}
        s = raw.cmd("SMEMBERS", "t:s")
        assert s.kind == "~" and s.py() == {b"a", b"b", b"c"}
        d = raw.cmd("ZSCORE", "t:z", "m")
        assert d.kind == "," and d.value == 1.5
        assert raw.cmd("GET", "t:none").kind == "_"
        b = raw.cmd("DEBUG", "PROTOCOL", "bignum")
        assert b.kind == "(" and b.value == 1234567999999999999999999999999999999
        assert raw.cmd("DEBUG", "PROTOCOL", "true").kind == "#"
        v = raw.cmd("DEBUG", "PROTOCOL", "verbatim")
        assert v.kind == "=" and v.value.startswith(b"txt:")


def test_hello_switches_protocol(sproxy):
    sproxy.redis.client().hset("hs:h", "f", "v")
    with sproxy.raw() as raw:
        assert raw.cmd("HGETALL", "hs:h").kind == "*"  # RESP2 by default
        r3 = raw.cmd("HELLO", 3)
        assert r3.kind == "%"
        info = r3.py()
        assert info[b"proto"] == 3
        assert b"server" in info and b"version" in info
        assert raw.cmd("HGETALL", "hs:h").kind == "%"
        r2 = raw.cmd("HELLO", 2)
        assert r2.kind == "*"
        flat = r2.py()
        assert dict(zip(flat[::2], flat[1::2], strict=True))[b"proto"] == 2
        assert raw.cmd("HGETALL", "hs:h").kind == "*"
        assert raw.cmd("GET", "hs:none").kind == "$"
        err = raw.cmd("HELLO", 4)
        assert err.is_error and err.value.startswith("NOPROTO"), err
        assert raw.cmd("PING").value == "PONG"


def test_resp2_and_resp3_clients_interleaved(sproxy):
    """Clients of both protocols sharing the proxy each get their own encoding, always."""
    r = sproxy.redis.client()
    r.hset("mix:h", mapping={"a": "1"})
    r.zadd("mix:z", {"m": 2.5})
    clients2 = [sproxy.raw() for _ in range(3)]
    clients3 = [sproxy.raw() for _ in range(3)]
    try:
        for c in clients3:
            assert c.cmd("HELLO", 3).kind == "%"
        for _ in range(30):
            for c2, c3 in zip(clients2, clients3, strict=True):
                c2.send_command("HGETALL", "mix:h")
                c3.send_command("HGETALL", "mix:h")
                c2.send_command("ZSCORE", "mix:z", "m")
                c3.send_command("ZSCORE", "mix:z", "m")
                c3.send_command("GET", "mix:none")
                c2.send_command("GET", "mix:none")
            for c2, c3 in zip(clients2, clients3, strict=True):
                assert c2.read_raw() == b"*2\r\n$1\r\na\r\n$1\r\n1\r\n"
                assert c2.read_raw() == b"$3\r\n2.5\r\n"
                assert c2.read_raw() == b"$-1\r\n"
                assert c3.read_raw() == b"%1\r\n$1\r\na\r\n$1\r\n1\r\n"
                assert c3.read_raw() == b",2.5\r\n"
                assert c3.read_raw() == b"_\r\n"
    finally:
        for c in clients2 + clients3:
            c.close()


# --------------------------------------------------------------------------- inline commands


def test_inline_commands(sproxy):
    with sproxy.raw() as raw:
        raw.send(b"PING\r\n")
        assert raw.read_raw() == b"+PONG\r\n"
        raw.send(b"SET a b\r\n")
        assert raw.read_raw() == b"+OK\r\n"
        raw.send(b"GET a\r\n")
        assert raw.read_raw() == b"$1\r\nb\r\n"
        # several inline commands in one packet, answered in order
        raw.send(b"SET n 1\r\nINCR n\r\nGET n\r\nDEL n a\r\n")
        assert [raw.read_raw() for _ in range(4)] == [b"+OK\r\n", b":2\r\n", b"$1\r\n2\r\n", b":2\r\n"]
        # inline and multibulk mixed on one connection
        raw.send(b"ECHO hi\r\n" + encode_command("ECHO", "there") + b"PING\r\n")
        assert [raw.read_raw() for _ in range(3)] == [b"$2\r\nhi\r\n", b"$5\r\nthere\r\n", b"+PONG\r\n"]


def test_inline_quotes_and_bare_newline(sproxy):
    """What telnet and `nc` send: quoted arguments, LF-only line ends, stray empty lines."""
    with sproxy.raw() as raw:
        raw.send(b'SET "key with space" "value \\x41 here"\r\n')
        assert raw.read_raw() == b"+OK\r\n"
        raw.send(b"GET 'key with space'\r\n")
        assert raw.read_raw() == b"$12\r\nvalue A here\r\n"
        raw.send(b"PING\n")
        assert raw.read_raw() == b"+PONG\r\n"
        raw.send(b"\r\n\r\nECHO x\r\n")
        assert raw.read_raw() == b"$1\r\nx\r\n"


def test_inline_split_across_packets(sproxy):
    with sproxy.raw() as raw:
        for chunk in (b"SE", b"T spl", b"it val", b"ue\r", b"\nGET split\r\n"):
            raw.send(chunk)
            time.sleep(0.02)
        assert raw.read_raw() == b"+OK\r\n"
        assert raw.read_raw() == b"$5\r\nvalue\r\n"


def test_multibulk_split_byte_by_byte(sproxy):
    payload = encode_command("SET", "bytewise", "x\r\ny") + encode_command("GET", "bytewise")
    with sproxy.raw() as raw:
        for i in range(len(payload)):
            raw.send(payload[i:i + 1])
        assert raw.read_raw() == b"+OK\r\n"
        assert raw.read_raw() == b"$4\r\nx\r\ny\r\n"


def test_quit_closes_connection(sproxy):
    with sproxy.raw() as raw:
        assert raw.cmd("SET", "q:k", "1").value == "OK"
        raw.send(encode_command("QUIT"))
        assert raw.read_raw() == b"+OK\r\n"
        assert raw.wait_closed(3)
    with sproxy.raw() as raw:
        assert raw.cmd("GET", "q:k").value == b"1"


# --------------------------------------------------------------------------- redis-cli


def _ok(proc):
    assert proc.returncode == 0, f"redis-cli exited {proc.returncode}: {proc.stdout!r} {proc.stderr!r}"
    return proc.stdout


def test_redis_cli_commands(sproxy):
    assert _ok(sproxy.cli("PING")) == "PONG\n"
    assert _ok(sproxy.cli("SET", "cli:k", "hello world")) == "OK\n"
    assert _ok(sproxy.cli("GET", "cli:k")) == "hello world\n"
    assert _ok(sproxy.cli("INCR", "cli:n")) == "1\n"
    assert _ok(sproxy.cli("--no-raw", "INCR", "cli:n")) == "(integer) 2\n"
    assert _ok(sproxy.cli("--no-raw", "GET", "cli:none")) == "(nil)\n"
    assert _ok(sproxy.cli("HSET", "cli:h", "f", "v", "g", "w")) == "2\n"
    assert _ok(sproxy.cli("HGETALL", "cli:h")) == "f\nv\ng\nw\n"
    assert _ok(sproxy.cli("RPUSH", "cli:l", "a", "b")) == "2\n"
    assert _ok(sproxy.cli("LRANGE", "cli:l", "0", "-1")) == "a\nb\n"
    assert "WRONGTYPE" in _ok(sproxy.cli("GET", "cli:h"))
    assert _ok(sproxy.cli("-r", "3", "INCR", "cli:rep")) == "1\n2\n3\n"
    assert sproxy.redis.client().get("cli:k") == b"hello world"


def test_redis_cli_resp3(sproxy):
    sproxy.redis.client().hset("cli3:h", "f", "v")
    sproxy.redis.client().zadd("cli3:z", {"m": 1.5})
    assert _ok(sproxy.cli("-3", "--no-raw", "HGETALL", "cli3:h")) == '1# "f" => "v"\n'
    assert _ok(sproxy.cli("-3", "--no-raw", "ZSCORE", "cli3:z", "m")) == "(double) 1.5\n"
    assert _ok(sproxy.cli("-3", "--no-raw", "GET", "cli3:none")) == "(nil)\n"


def test_redis_cli_stdin_and_db(sproxy):
    out = _ok(sproxy.cli(input="SET a 1\nINCR a\nGET a\nSET b \"two words\"\nGET b\n"))
    assert out == "OK\n2\n2\nOK\ntwo words\n"
    assert _ok(sproxy.cli("-n", "1", "SET", "cli:db", "one")) == "OK\n"
    assert _ok(sproxy.cli("-n", "1", "GET", "cli:db")) == "one\n"
    assert _ok(sproxy.cli("-n", "0", "GET", "cli:db")) == "\n"
    assert sproxy.redis.client(db=1).get("cli:db") == b"one"


def test_redis_cli_scan(sproxy):
    sproxy.redis.client().mset({f"scan:{i}": i for i in range(300)})
    sproxy.redis.client().set("other", 1)
    out = _ok(sproxy.cli("--scan", "--pattern", "scan:*"))
    assert sorted(out.split()) == sorted(f"scan:{i}" for i in range(300))


@pytest.mark.timeout(60)
def test_redis_cli_pipe_mass_insert(sproxy):
    n = 5000
    data = b"".join(encode_command("SET", f"mass:{i}", f"v{i}") for i in range(n))
    proc = sproxy.cli("--pipe", input=data, timeout=50)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"errors: 0, replies: {n}" in out
    r = sproxy.redis.client()
    assert r.dbsize() == n
    assert r.get("mass:4999") == b"v4999"
