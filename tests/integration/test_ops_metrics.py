"""/metrics after scripted traffic, /healthz and /readyz through database and Redis outages, and
`cacheproxy stats` reading a running proxy."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.helpers import REPO, metric_sum, metrics, wait_for
from tests.fixtures.ports import free_port
from tests.fixtures.postgres import make_schema
from tests.fixtures.writebehind import queued, routes, start

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120)]

USER = 'route="user:{id:int}"'


def sample(p, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels` (in any order)."""
    return sum(s.value for family in text_string_to_metric_families(metrics(p)) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_readyz_follows_postgres(make_inproc_proxy, redis_server, throwaway_pg):
    schema = make_schema(throwaway_pg.dsn)
    p = start(make_inproc_proxy, redis_server, schema, dsn=throwaway_pg.dsn)
    admin = f"http://127.0.0.1:{p.admin_port}"
    assert get(f"{admin}/readyz") == (200, {"ready": True, "problems": {}, "warnings": {}})
    throwaway_pg.stop()
    # A result is reused for admin.readiness_cache_seconds (1 s): the next check sees the outage.
    wait_for(lambda: get(f"{admin}/readyz")[0] == 503, timeout=10, what="/readyz 503 with Postgres down")
    status, body = get(f"{admin}/readyz")
    assert status == 503
    assert body["ready"] is False and set(body["problems"]) == {"backend:main"}
    assert get(f"{admin}/healthz")[0] == 200, "alive while not ready"
    throwaway_pg.start()
    wait_for(lambda: get(f"{admin}/readyz")[0] == 200, timeout=20, what="/readyz back to 200")


def test_readyz_follows_the_upstream(make_inproc_proxy, redis_server, pg):
    p = start(make_inproc_proxy, redis_server, pg)
    admin = f"http://127.0.0.1:{p.admin_port}"
    assert get(f"{admin}/readyz")[0] == 200
    redis_server.stop()
    wait_for(lambda: get(f"{admin}/readyz")[0] == 503, timeout=10, what="/readyz 503 with Redis down")
    status, body = get(f"{admin}/readyz")
    assert list(body["problems"]) == ["upstream"] and "upstream unavailable" in body["problems"]["upstream"]
    assert metric_sum(p, "cacheproxy_upstream_up") == 0
    assert metric_sum(p, 'cacheproxy_upstream_events_total{event="connect_errors"}') >= 1
    redis_server.start()
    wait_for(lambda: get(f"{admin}/readyz")[0] == 200, timeout=20, what="/readyz back to 200")
    assert metric_sum(p, "cacheproxy_upstream_up") == 1
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{admin}/nope", timeout=5)
    assert missing.value.code == 404


def test_readyz_names_a_hung_backend_without_waiting_for_it(make_inproc_proxy, redis_server, pg, monkeypatch):
    """Backends that accept connections but never answer: /readyz answers 503 within its 2 s
    per-check bound (checks run concurrently), naming them; the healthy one is not listed."""
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)       # the proxy inherits them
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)            # never accepted, never answered
        admin, hung = free_port(), f"http://127.0.0.1:{silent.getsockname()[1]}"
        make_inproc_proxy(redis_server, admin={"enabled": True, "port": admin}, routes=routes(pg.schema)[:1],
                   backends={"main": {"type": "postgres", "dsn": pg.dsn},
                             "ddb": {"type": "dynamodb", "endpoint_url": hung},
                             "ddb2": {"type": "dynamodb", "endpoint_url": hung}})
        started = time.monotonic()
        status, body = get(f"http://127.0.0.1:{admin}/readyz")
        assert time.monotonic() - started < 3.5, "two hung backends are waited for at once, not one after the other"
        assert status == 503 and body["problems"] == {"backend:ddb": "timed out", "backend:ddb2": "timed out"}


def test_metrics_follow_traffic(make_inproc_proxy, redis_server, pg):
    slow = {"key": "slow:{id:int}", "backend": "main",
            "read": {"query": f"SELECT u.id, u.name FROM {pg.schema}.users u, pg_sleep(0.5) WHERE u.id = $1",
                     "as": "json"}}
    p = start(make_inproc_proxy, redis_server, pg, route_list=routes(pg.schema) + [slow])
    c = p.client(protocol=2)
    for _ in range(3):
        c.get("user:1")            # 1 miss (a load), 2 hits
    for _ in range(3):
        assert c.get("user:9999") is None   # 3 misses: 1 load finds nothing, 2 negative-cache answers
    assert metric_sum(p, f"cacheproxy_route_hits_total{{{USER}}}") == 2
    assert metric_sum(p, f"cacheproxy_route_misses_total{{{USER}}}") == 4
    assert metric_sum(p, f"cacheproxy_route_loads_total{{{USER}}}") == 2
    assert metric_sum(p, f"cacheproxy_route_not_found_total{{{USER}}}") == 1
    assert metric_sum(p, f"cacheproxy_route_negative_hits_total{{{USER}}}") == 2
    assert sample(p, "cacheproxy_load_seconds_count", route="user:{id:int}", backend="main") == 2
    assert sample(p, "cacheproxy_load_seconds_bucket", route="user:{id:int}", backend="main", le="+Inf") == 2

    # Five clients miss the same slow key at once: one query, the others join it.
    barrier = threading.Barrier(5)
    clients = [p.client(protocol=2) for _ in range(5)]

    def miss(client):
        barrier.wait(5)
        client.get("slow:2")
    threads = [threading.Thread(target=miss, args=(cl,)) for cl in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert metric_sum(p, 'cacheproxy_route_loads_total{route="slow:{id:int}"}') == 1
    assert metric_sum(p, 'cacheproxy_route_singleflight_joins_total{route="slow:{id:int}"}') >= 3
    assert metric_sum(p, "cacheproxy_client_connections") >= 6

    # Commands by kind.
    before = {kind: metric_sum(p, f'cacheproxy_commands_total{{kind="{kind}"}}')
              for kind in ("pass-through", "routed", "local", "pinned", "relay", "denied")}
    with p.raw() as r:                                       # raw RESP: no client library extras
        r.cmd("SET", "plain", "x" * 1000)
        assert r.cmd("GET", "plain").value == b"x" * 1000    # 2 pass-through
        r.cmd("GET", "user:1")                               # routed
        r.cmd("PING")                                        # local
        assert r.cmd("BLPOP", "empty-list", "0.1").value is None   # pinned (a blocking command)
        assert "not supported" in r.cmd("SHUTDOWN").value    # denied
        assert r.cmd("SUBSCRIBE", "news").py() == [b"subscribe", b"news", 1]   # relay
    after = {kind: metric_sum(p, f'cacheproxy_commands_total{{kind="{kind}"}}') for kind in before}
    assert {k: after[k] - before[k] for k in after} == {
        "pass-through": 2, "routed": 1, "local": 1, "pinned": 1, "relay": 1, "denied": 1}
    assert metric_sum(p, 'cacheproxy_client_bytes_total{direction="out"}') >= 1000
    assert metric_sum(p, 'cacheproxy_client_bytes_total{direction="in"}') >= 1000
    assert metric_sum(p, 'cacheproxy_upstream_connections{kind="shared"}') >= 1
    assert metric_sum(p, 'cacheproxy_upstream_events_total{event="connects"}') >= 1


def test_backend_errors_queue_depth_and_stats(make_inproc_proxy, redis_server, throwaway_pg):
    schema = make_schema(throwaway_pg.dsn)
    p = start(make_inproc_proxy, redis_server, schema, dsn=throwaway_pg.dsn)
    c = p.client(protocol=2)
    for _ in range(3):
        c.get("user:1")            # 1 miss, 2 hits
    throwaway_pg.stop()
    with pytest.raises(redis.ResponseError, match="backend main unavailable"):
        c.get("user:2")
    assert metric_sum(p, 'cacheproxy_backend_errors_total{backend="main"}') == 1
    assert metric_sum(p, f"cacheproxy_route_load_errors_total{{{USER}}}") == 1
    for i in range(20):
        c.set(f"user:{i}", json.dumps({"name": "m", "email": "m@x"}))
    wait_for(lambda: metric_sum(p, "cacheproxy_writebehind_pending") == 20, what="queue depth rising")
    out = subprocess.run([sys.executable, "-m", "proxy", "stats", "--admin", f"http://127.0.0.1:{p.admin_port}"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("clients: 1 connected; upstream up")
    row = next(line.split() for line in lines if line.startswith("user:{id:int}"))
    assert row == ["user:{id:int}", "4", "50.0%", "2", "1", "20"], out.stdout   # reads ratio loads errors writes
    assert "write-behind: 20 queued, oldest" in out.stdout
    throwaway_pg.start()
    wait_for(lambda: queued(redis_server.client()) == 0, timeout=40, what="drain")
    wait_for(lambda: metric_sum(p, "cacheproxy_writebehind_pending") == 0, what="queue depth draining")
    assert metric_sum(p, "cacheproxy_writebehind_landed_total") >= 20
    assert "cacheproxy_writebehind_lag_seconds" in metrics(p)


def test_stats_without_a_proxy_says_so():
    out = subprocess.run([sys.executable, "-m", "proxy", "stats", "--admin", "http://127.0.0.1:1"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "cannot read http://127.0.0.1:1/metrics" in out.stderr
