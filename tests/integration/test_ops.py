"""Operating the sidecar: config reload (SIGHUP, `cacheproxy reload`), /readyz, metrics after traffic,
`cacheproxy stats`, secrets kept out of logs and errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import redis
import yaml

from tests.integration.test_writebehind_postgres import (
    DSN,
    REPO,
    make_schema,
    metric_sum,
    pg,
    queued,
    start,
    wait_for,
)

__all__ = ["pg"]   # the fixture, shared with the write-behind tests

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120)]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=30)


def rewrite_config(p, change) -> None:
    data = yaml.safe_load(p.config_path.read_text())
    change(data)
    p.config_path.write_text(yaml.safe_dump(data, sort_keys=False))


def wait_log(p, text: str, count: int = 1) -> None:
    wait_for(lambda: p.stderr_text().count(text) >= count, timeout=15, what=f"log line {text!r}")


def test_sighup_applies_a_new_ttl_without_dropping_clients(make_proxy, redis_server, pg):
    p = start(make_proxy, redis_server, pg)
    c = p.client(protocol=2)
    direct = redis_server.client()
    c.get("user:1")
    assert 290_000 < direct.pttl("user:1") <= 300_000
    client_id = c.client_id()
    rewrite_config(p, lambda d: d["routes"][0].update(ttl={"seconds": 42, "jitter": 0}))
    p.signal(signal.SIGHUP)
    wait_log(p, "reloaded")
    c.get("user:2")
    assert 40_000 < direct.pttl("user:2") <= 42_000, "the next load uses the new TTL"
    assert c.client_id() == client_id, "the client kept its connection"
    # `cacheproxy reload` does the same through a pid file.
    pid_file = p.workdir / "proxy.pid"
    pid_file.write_text(f"{p.pid}\n")
    rewrite_config(p, lambda d: d["routes"][0].update(ttl={"seconds": 7, "jitter": 0}))
    done = cli("reload", "--pid-file", str(pid_file))
    assert done.returncode == 0, done.stderr
    wait_log(p, "reloaded", 2)
    c.get("user:3")
    assert 5_000 < direct.pttl("user:3") <= 7_000


def test_sighup_with_a_broken_file_changes_nothing(make_proxy, redis_server, pg):
    p = start(make_proxy, redis_server, pg)
    c = p.client(protocol=2)
    good = p.config_path.read_text()
    p.config_path.write_text(good + "\nroutes: [{key: 'user:{id:int}', backend: nope}]\n")
    p.signal(signal.SIGHUP)
    wait_log(p, "reload refused")
    assert "duplicate key 'routes'" in p.stderr_text()
    p.config_path.write_text(good)
    rewrite_config(p, lambda d: d["routes"][0].update(backend="nope"))
    p.signal(signal.SIGHUP)
    wait_log(p, "reload refused", 2)
    assert "unknown backend 'nope'" in p.stderr_text()
    c.get("user:4")
    assert 290_000 < redis_server.client().pttl("user:4") <= 300_000, "the old routes still serve"
    # A route whose SQL does not fit the database is refused too.
    rewrite_config(p, lambda d: d["routes"][0]["read"].update(query="SELECT nope FROM missing_table WHERE x = $1"))
    p.signal(signal.SIGHUP)
    wait_log(p, "reload refused", 3)
    assert json.loads(c.get("user:5"))["name"] == "user 5"
    assert p.alive


def test_readyz_follows_postgres(make_proxy, redis_server, throwaway_pg):
    schema = make_schema(throwaway_pg.dsn)
    p = start(make_proxy, redis_server, schema, dsn=throwaway_pg.dsn)
    url = f"http://127.0.0.1:{p.admin_port}/readyz"
    assert urllib.request.urlopen(url, timeout=5).status == 200
    throwaway_pg.stop()
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(url, timeout=10)
    assert failed.value.code == 503
    body = json.loads(failed.value.read())
    assert body["ready"] is False and set(body["problems"]) == {"backend:main"}
    assert urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/healthz", timeout=5).status == 200
    throwaway_pg.start()
    wait_for(lambda: _status(url) == 200, timeout=20, what="/readyz back to 200")


def _status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_metrics_and_stats_follow_traffic(make_proxy, redis_server, throwaway_pg):
    schema = make_schema(throwaway_pg.dsn)
    p = start(make_proxy, redis_server, schema, dsn=throwaway_pg.dsn)
    c = p.client(protocol=2)
    for _ in range(3):
        c.get("user:1")            # 1 miss, 2 hits
    assert metric_sum(p, 'cacheproxy_route_hits_total{route="user:{id:int}"}') == 2
    assert metric_sum(p, 'cacheproxy_route_misses_total{route="user:{id:int}"}') == 1
    before_out = metric_sum(p, 'cacheproxy_client_bytes_total{direction="out"}')
    c.set("plain", "x" * 1000)
    assert c.get("plain") == b"x" * 1000
    c.ping()
    assert metric_sum(p, 'cacheproxy_client_bytes_total{direction="out"}') >= before_out + 1000
    assert metric_sum(p, 'cacheproxy_client_bytes_total{direction="in"}') >= 1000
    assert metric_sum(p, 'cacheproxy_commands_total{kind="routed"}') >= 3
    assert metric_sum(p, 'cacheproxy_commands_total{kind="pass-through"}') >= 2
    assert metric_sum(p, 'cacheproxy_commands_total{kind="local"}') >= 1
    throwaway_pg.stop()
    for i in range(20):
        c.set(f"user:{i}", json.dumps({"name": "m", "email": "m@x"}))
    wait_for(lambda: metric_sum(p, "cacheproxy_writebehind_pending") == 20, what="queue depth rising")
    out = cli("stats", "--admin", f"http://127.0.0.1:{p.admin_port}")
    assert out.returncode == 0, out.stderr
    assert "user:{id:int}" in out.stdout and "66.7%" in out.stdout
    assert "write-behind: 20 queued" in out.stdout
    throwaway_pg.start()
    wait_for(lambda: queued(redis_server.client()) == 0, timeout=40, what="drain")
    wait_for(lambda: metric_sum(p, "cacheproxy_writebehind_pending") == 0, what="queue depth draining")
    assert metric_sum(p, "cacheproxy_writebehind_landed_total") >= 20


def test_secrets_never_reach_logs_or_clients(make_proxy, redis_server):
    secret = "S3cretPassw0rd"
    p = make_proxy(redis_server, backends={"main": {"type": "postgres", "connect_timeout": 1,
                                                    "dsn": f"postgresql://postgres:{secret}@127.0.0.1:1/test"}},
                   routes=[{"key": "user:{id:int}", "backend": "main",
                            "read": {"query": "SELECT 1 AS id WHERE 1 = $1", "as": "json"}}],
                   log={"format": "json", "level": "debug"})
    c = p.client(protocol=2)
    with pytest.raises(redis.ResponseError) as failed:
        c.get("user:1")
    assert secret not in str(failed.value)
    time.sleep(0.3)
    log = p.stderr_text()
    assert log and secret not in log
    for line in log.splitlines():
        if line.startswith("{"):
            json.loads(line)        # one JSON object per line


def test_check_config_and_env_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backends": {"main": {"type": "postgres", "dsn": DSN}}}))
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(cfg)], cwd=REPO, capture_output=True,
                         text=True, timeout=30, env={"CACHEPROXY_UPSTREAM__URL": "redis://cache.internal:6390/2",
                                                     "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "upstream redis://cache.internal:6390/2" in out.stdout
