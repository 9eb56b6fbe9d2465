"""The write path's errors as a client sees them: Redis's own checks first, in Redis's order and
words (compared with a real redis-server), then the route's rules; and string routes that bind
their value to the one field they write."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis
import yaml

from tests.fixtures.helpers import REPO, wait_for
from tests.fixtures.postgres import DSN
from tests.fixtures.writebehind import queued, start

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120)]

DOC = json.dumps({"name": "n", "email": "n@x"})

# (command on a routed key, the same command on a plain key for redis-server itself)
BAD_ARGUMENTS = [
    ("SETEX", "user:1", "abc", "{}"),                 # the TTL is checked before the JSON
    ("SETEX", "user:1", "0", DOC),
    ("SETEX", "user:1", "-5", DOC),
    ("SETEX", "user:1", "01", DOC),
    ("SETEX", "user:1", "+1", DOC),
    ("SETEX", "user:1", "1.5", DOC),
    ("SETEX", "user:1", "99999999999999999999", DOC),
    ("PSETEX", "user:1", "9223372036854775807", DOC),
    ("SETEX", "user:1", "abc"),                       # arity first
    ("SET", "user:1", "not json", "EX", "abc"),
    ("SET", "user:1", "{}", "EX", "0"),
    ("SET", "user:1", "{}", "EX", "10", "PX", "5"),
    ("SET", "user:1", "{}", "BOGUS"),
    ("SET", "user:1", "{}", "EX"),
    ("SET", "user:1", "{}", "KEEPTTL", "EX", "1"),
    ("SET", "user:1", "{}", "NX", "XX"),
    ("SET", "user:1", "{}", "EXAT", "9223372036854775807"),
    ("INCRBY", "counter:hits", "abc"),
    ("DECRBY", "counter:hits", "1.0"),
    ("INCRBYFLOAT", "counter:hits", "abc"),
    ("SETRANGE", "counter:hits", "-1", "x"),
    ("SETRANGE", "counter:hits", "x", "x"),
    ("HINCRBY", "uh:1", "name", "abc"),
    ("HINCRBYFLOAT", "uh:1", "name", "nan"),
    ("HSET", "uh:1", "name"),
]


def plain(args: tuple) -> tuple:
    return (args[0], "plain:" + args[1], *args[2:])


def redis_error(client: redis.Redis, args: tuple) -> str:
    with pytest.raises(redis.ResponseError) as info:
        client.execute_command(*args)
    return str(info.value)


@pytest.mark.parametrize("mode", ["write-behind", "write-through"])
def test_bad_arguments_get_redis_own_error_and_change_nothing(make_proxy, redis_server, pg, mode):
    p = start(make_proxy, redis_server, pg, mode=mode)
    c, direct = p.client(protocol=2), redis_server.client()
    for args in BAD_ARGUMENTS:
        if mode == "write-through" and args[0] in ("INCRBY", "DECRBY", "INCRBYFLOAT", "SETRANGE", "HINCRBY",
                                                   "HINCRBYFLOAT"):
            continue       # refused by the route anyway (not a write-through command)
        expected = redis_error(direct, plain(args))
        assert redis_error(c, args) == expected, f"{' '.join(args)}"
    assert direct.exists("user:1", "uh:1") == 0
    assert direct.get("counter:hits") in (None, b"41")
    assert queued(direct) == 0
    assert pg.user(1) == {"id": 1, "name": "user 1", "email": "u1@example.com"}
    assert pg.rows("SELECT value FROM {s}.counters WHERE name = 'hits'") == [{"value": 41}]
    # A valid TTL: now the value is judged, and good writes go through.
    with pytest.raises(redis.ResponseError, match="lacks field"):
        c.execute_command("SETEX", "user:1", "100", "{}")
    assert c.execute_command("SETEX", "user:2", "100", DOC) is True
    wait_for(lambda: pg.user(2)["name"] == "n", what="the SETEX row")


# ------------------------------------------------------------------------------------ string routes

def string_route(s: str, mode: str = "write-behind", fields=("v",)) -> dict:
    return {"key": "kv:{k}", "backend": "main",
            "read": {"query": f"SELECT v FROM {s}.kv WHERE k = $1", "as": "string"},
            "write": {"mode": mode, "table": f"{s}.kv", "key_columns": ["k"], "fields": list(fields)}}


@pytest.mark.parametrize("mode", ["write-behind", "write-through"])
def test_a_string_route_without_read_column_writes_its_value(make_proxy, redis_server, pg, mode):
    pg.rows("CREATE TABLE {s}.kv (k text PRIMARY KEY, v text)")
    p = start(make_proxy, redis_server, pg, route_list=[string_route(pg.schema, mode)])
    c = p.client(protocol=2)
    for i in range(50):
        assert c.set(f"kv:{i}", f"value {i}") is True
    wait_for(lambda: len(pg.rows("SELECT k FROM {s}.kv")) == 50, what="50 rows")
    rows = {r["k"]: r["v"] for r in pg.rows("SELECT k, v FROM {s}.kv")}
    assert rows == {str(i): f"value {i}" for i in range(50)}
    assert c.get("kv:7") == b"value 7"


def test_check_config_refuses_a_string_route_with_two_fields(tmp_path):
    cfg = {"backends": {"main": {"type": "postgres", "dsn": DSN}},
           "routes": [string_route("public", fields=("v", "w"))]}
    path = tmp_path / "two-fields.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "routes[0].write.fields: a string route stores one value, but 2 fields are listed (v, w)" in result.stderr
    assert "fix:" in result.stderr
