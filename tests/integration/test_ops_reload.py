"""Config reload: SIGHUP and `cacheproxy reload --pid-file` apply routes and TTLs without dropping a
client; a broken file, an unreachable new backend or a bad query changes nothing."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
import redis
import yaml

from tests.fixtures.helpers import REPO, wait_for
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import ProxyProcess
from tests.fixtures.writebehind import routes, start, user_route

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120)]

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+: ")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=30)


def rewrite_config(p, change) -> None:
    data = yaml.safe_load(p.config_path.read_text())
    change(data)
    p.config_path.write_text(yaml.safe_dump(data, sort_keys=False))


def wait_log(p, text: str, count: int = 1) -> None:
    try:
        wait_for(lambda: p.stderr_text().count(text) >= count, timeout=15, what=f"log line {text!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the proxy's log ends with:\n{p.stderr_text()[-3000:]}") from None


def test_sighup_applies_a_new_ttl_and_new_routes_without_dropping_clients(make_proxy, redis_server, pg):
    p = start(make_proxy, redis_server, pg)
    c = p.client(protocol=2)
    direct = redis_server.client()
    c.get("user:1")
    assert 290_000 < direct.pttl("user:1") <= 300_000
    client_id = c.client_id()
    assert c.get("name:1") is None and not direct.exists("name:1"), "not routed yet: passes through"

    def change(d):
        d["routes"][0]["ttl"] = {"seconds": 42, "jitter": 0}
        d["routes"].append({"key": "name:{id:int}", "backend": "main", "ttl": {"seconds": 60, "jitter": 0},
                            "read": {"query": f"SELECT name FROM {pg.schema}.users WHERE id = $1",
                                     "as": "string", "column": "name"}})
        d["listen"]["max_clients"] = 5         # restart-only: named in a warning, not applied
    rewrite_config(p, change)
    p.signal(signal.SIGHUP)
    wait_log(p, "reloaded")
    c.get("user:2")
    assert 40_000 < direct.pttl("user:2") <= 42_000, "the next load uses the new TTL"
    assert c.get("name:3") == b"user 3", "the new route serves"
    assert 55_000 < direct.pttl("name:3") <= 60_000
    assert "reload: listen.max_clients changed but only take(s) effect on restart" in p.stderr_text()
    others = [p.client(protocol=2) for _ in range(6)]
    assert all(o.ping() for o in others), "max_clients kept its running value"
    assert c.client_id() == client_id, "the client kept its connection"


def test_cacheproxy_reload_signals_the_pid_file_of_serve(tmp_path, redis_server, pg):
    admin = free_port()
    p = ProxyProcess(redis_server, tmp_path / "proxy", {
        "backends": {"main": {"type": "postgres", "dsn": pg.dsn, "connect_timeout": 1}},
        "routes": routes(pg.schema), "admin": {"enabled": True, "port": admin},
        "write_behind": {"max_delay_ms": 50}})
    pid_file = tmp_path / "cacheproxy.pid"
    p.start(argv=p.command() + ["--pid-file", str(pid_file)])
    try:
        assert int(pid_file.read_text()) == p.pid
        c = p.client(protocol=2)
        rewrite_config(p, lambda d: d["routes"][0].update(ttl={"seconds": 7, "jitter": 0}))
        done = cli("reload", "--pid-file", str(pid_file))
        assert done.returncode == 0, done.stderr
        assert f"sent SIGHUP to {p.pid}" in done.stdout
        wait_log(p, "reloaded")
        c.get("user:3")
        assert 5_000 < redis_server.client().pttl("user:3") <= 7_000
    finally:
        p.stop()
    missing = cli("reload", "--pid-file", str(tmp_path / "nope.pid"))
    assert missing.returncode == 1 and "cannot signal the proxy" in missing.stderr


def test_sighup_with_a_broken_file_changes_nothing(make_proxy, redis_server, pg):
    p = start(make_proxy, redis_server, pg)
    c = p.client(protocol=2)
    client_id = c.client_id()
    good = p.config_path.read_text()
    p.config_path.write_text(good + "\nroutes: [{key: 'user:{id:int}', backend: nope}]\n")
    p.signal(signal.SIGHUP)
    wait_log(p, "reload refused")
    assert "duplicate key 'routes'" in p.stderr_text()
    assert c.client_id() == client_id
    p.config_path.write_text(good)
    rewrite_config(p, lambda d: d["routes"][0].update(backend="nope"))
    p.signal(signal.SIGHUP)
    wait_log(p, "reload refused", 2)
    assert "unknown backend 'nope'" in p.stderr_text()
    c.get("user:4")
    assert 290_000 < redis_server.client().pttl("user:4") <= 300_000, "the old routes still serve"
    # A route whose SQL does not fit the database is refused too.
    p.config_path.write_text(good)
    rewrite_config(p, lambda d: d["routes"][0]["read"].update(query="SELECT nope FROM missing_table WHERE x = $1"))
    p.signal(signal.SIGHUP)
    wait_log(p, "reload refused", 3)
    assert json.loads(c.get("user:5"))["name"] == "user 5"
    assert c.client_id() == client_id, "the client kept its connection throughout"
    assert p.alive
    log = p.stderr_text()
    assert "reloaded" not in log
    for line in log.splitlines():       # one line per event, even for a multi-problem refusal
        assert TEXT_LINE.match(line), f"not a log line of its own: {line!r}"


def test_reload_refuses_an_unreachable_new_backend(make_proxy, redis_server, pg):
    p = start(make_proxy, redis_server, pg)
    c = p.client(protocol=2)
    good = p.config_path.read_text()
    rewrite_config(p, lambda d: d["backends"]["main"].update(dsn="postgresql://postgres@127.0.0.1:1/test"))
    p.signal(signal.SIGHUP)
    wait_log(p, "reload refused")
    assert re.search(r"reload refused.*backends\.main: not reachable", p.stderr_text())
    assert json.loads(c.get("user:6"))["name"] == "user 6", "the running backend still serves"
    # Fixed file: the next reload applies (and the running backend is kept: its config is unchanged).
    p.config_path.write_text(good)
    rewrite_config(p, lambda d: d["routes"][0].update(ttl={"seconds": 30, "jitter": 0}))
    p.signal(signal.SIGHUP)
    wait_log(p, "reloaded")
    c.get("user:7")
    assert 25_000 < redis_server.client().pttl("user:7") <= 30_000


def test_reload_changes_write_settings(make_proxy, redis_server, pg):
    """Cache-only writes, then write-behind (the writer starts on reload), then read-only."""
    route = user_route(pg.schema)
    write = route.pop("write")
    p = start(make_proxy, redis_server, pg, route_list=[route])
    c = p.client(protocol=2)
    c.set("user:1", json.dumps({"name": "cache only", "email": "c@x"}))
    assert pg.user(1)["name"] == "user 1", "no write section: only the cache changed"
    rewrite_config(p, lambda d: d["routes"][0].update(write=write))
    p.signal(signal.SIGHUP)
    wait_log(p, "reloaded")
    c.set("user:2", json.dumps({"name": "behind", "email": "b@x"}))
    wait_for(lambda: pg.user(2)["name"] == "behind", timeout=15, what="the write landing in Postgres")
    rewrite_config(p, lambda d: d["routes"][0].update(write={"mode": "read-only"}))
    p.signal(signal.SIGHUP)
    wait_log(p, "reloaded", 2)
    with pytest.raises(redis.ResponseError, match="read-only"):
        c.set("user:3", json.dumps({"name": "refused", "email": "r@x"}))
    assert pg.user(3)["name"] == "user 3"


def test_reload_keeps_the_queue_layout(make_proxy, redis_server, pg):
    """partitions and stream_prefix name where queued entries are: a reload keeps them (and says so)."""
    p = start(make_proxy, redis_server, pg, max_delay_ms=50)
    c = p.client(protocol=2)
    rewrite_config(p, lambda d: d["write_behind"].update(partitions=4, stream_prefix="elsewhere"))
    p.signal(signal.SIGHUP)
    wait_log(p, "reloaded")
    assert "write_behind.partitions changes only on restart" in p.stderr_text()
    assert "write_behind.stream_prefix changes only on restart" in p.stderr_text()
    for i in range(1, 31):          # keys of every one of the 16 partitions
        c.set(f"user:{i}", json.dumps({"name": f"after {i}", "email": f"{i}@x"}))
    wait_for(lambda: all(pg.user(i)["name"] == f"after {i}" for i in range(1, 31)), timeout=15,
             what="every write landing after the reload")
    assert not list(redis_server.client().scan_iter(match="elsewhere*"))
