"""upstream.durability: the proxy checks that the upstream can keep the write-behind queue.

Real redis-server processes started with the settings under test (an evicting maxmemory-policy, AOF,
RDB snapshots, a replica, CONFIG renamed away as on ElastiCache), and CONFIG SET while the proxy runs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.helpers import metrics, wait_for
from tests.fixtures.postgres import DSN
from tests.fixtures.redis_cluster import cluster_proxy
from tests.fixtures.redis_server import RedisServer, free_port
from tests.fixtures.writebehind import routes

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120)]

EVICTING = ["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"]
USER = json.dumps({"name": "Ann", "email": "ann@x.org"})


def start(make_proxy, upstream, pg, durability, route_list=None, **overrides):
    admin = free_port()
    p = make_proxy(upstream, upstream={"durability": durability},
                   backends={"main": {"type": "postgres", "dsn": DSN, "connect_timeout": 1}},
                   routes=route_list or routes(pg.schema)[:1], write_behind={"max_delay_ms": 50},
                   admin={"enabled": True, "port": admin}, **overrides)
    p.admin_port = admin
    return p


def readyz(p) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/readyz", timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def durability_gauge(p) -> dict[str, float]:
    """aspect -> value of cacheproxy_upstream_durability (1 ok, 0 unsafe, -1 unknown), one node."""
    return {s.labels["aspect"]: s.value for family in text_string_to_metric_families(metrics(p))
            for s in family.samples if s.name == "cacheproxy_upstream_durability"}


@pytest.fixture
def upstream_with(tmp_path):
    """Factory: a redis-server started with extra arguments; all stopped at teardown."""
    started = []

    def make(*args: str, name: str = "up") -> RedisServer:
        server = RedisServer(tmp_path / f"{name}{len(started)}", extra_args=list(args)).start()
        started.append(server)
        return server
    yield make
    for server in started:
        server.stop()


def test_an_evicting_upstream_is_refused_at_startup(make_proxy, upstream_with, pg):
    upstream = upstream_with(*EVICTING)
    with pytest.raises(RuntimeError) as refused:
        start(make_proxy, upstream, pg, {"eviction": "refuse"})
    text = str(refused.value)
    assert "proxy exited with 2" in text
    assert "maxmemory-policy is allkeys-lru" in text and "CONFIG SET maxmemory-policy noeviction" in text
    # A cache that only reads through may be evicted freely: no write-behind route, no refusal.
    read_only = routes(pg.schema)[3]
    p = start(make_proxy, upstream, pg, {"eviction": "refuse"}, route_list=[read_only])
    assert p.client().get("ro:1") is not None
    assert readyz(p) == (200, {"ready": True, "problems": {}, "warnings": {}})
    assert durability_gauge(p) == {}


def test_an_evicting_upstream_under_warn_starts_and_says_so(make_proxy, upstream_with, pg):
    upstream = upstream_with(*EVICTING)
    p = start(make_proxy, upstream, pg, {"eviction": "warn", "persistence": "ignore"})
    assert p.client().set("user:1", USER) is True
    status, body = readyz(p)
    assert status == 200 and body["problems"] == {}
    assert list(body["warnings"]) == ["durability:eviction"]
    assert "maxmemory-policy is allkeys-lru with maxmemory 104857600" in body["warnings"]["durability:eviction"]
    assert durability_gauge(p) == {"eviction": 0, "persistence": 0}
    assert "upstream durability: 127.0.0.1" in p.stderr_text() and "allkeys-lru" in p.stderr_text()


def test_a_policy_changed_at_runtime_refuses_writes_until_it_is_safe_again(make_proxy, upstream_with, pg):
    upstream = upstream_with()
    p = start(make_proxy, upstream, pg, {"eviction": "refuse", "persistence": "ignore", "check_interval": 0.3})
    c = p.client()
    assert c.set("user:1", USER) is True
    assert readyz(p)[0] == 200 and durability_gauge(p)["eviction"] == 1
    direct = upstream.client()
    direct.config_set("maxmemory", "100mb")
    direct.config_set("maxmemory-policy", "allkeys-lru")
    wait_for(lambda: readyz(p)[0] == 503, what="/readyz 503 once the policy evicts")
    assert "allkeys-lru" in readyz(p)[1]["problems"]["durability"]
    with pytest.raises(redis.ResponseError, match="write-behind refused: the upstream may lose queued writes"):
        c.set("user:2", USER)
    assert direct.get("user:2") is None, "a refused write is not in the cache"
    assert c.get("user:1") is not None, "reads go on"
    direct.config_set("maxmemory-policy", "volatile-lru")        # safe: queue keys carry no TTL
    wait_for(lambda: readyz(p)[0] == 200, what="/readyz 200 once the policy is safe")
    assert c.set("user:2", USER) is True
    assert "(fixed)" in p.stderr_text()


def test_persistence_aof_rdb_and_replicas(make_proxy, upstream_with, pg):
    upstream = upstream_with()          # the fixture's server: no AOF, no RDB snapshots
    p = start(make_proxy, upstream, pg, {"persistence": "warn", "check_interval": 0.3})

    def warning() -> str:
        return readyz(p)[1]["warnings"].get("durability:persistence", "")
    assert "neither AOF nor a replica: a restart loses every queued write" in warning()
    direct = upstream.client()
    direct.config_set("save", "3600 1")
    wait_for(lambda: "RDB snapshots only" in warning(), what="the RDB-only warning")
    assert "loses the writes queued since the last snapshot" in warning()
    direct.config_set("appendonly", "yes")
    wait_for(lambda: warning() == "", what="no warning with AOF")
    assert durability_gauge(p) == {"eviction": 1, "persistence": 1}
    direct.config_set("appendonly", "no")
    wait_for(lambda: warning() != "", what="the warning back without AOF")
    replica = upstream_with("--replicaof", "127.0.0.1", str(upstream.port), name="replica")
    wait_for(lambda: direct.info("replication")["connected_slaves"] == 1, what="the replica connected")
    wait_for(lambda: warning() == "", what="no warning with a connected replica")
    assert readyz(p)[0] == 200
    replica.stop()


def test_config_renamed_away_falls_back_to_info(make_proxy, upstream_with, pg):
    """As on ElastiCache: CONFIG is not available, INFO still shows the policy, AOF and replicas."""
    upstream = upstream_with("--rename-command", "CONFIG", "", *EVICTING)
    with pytest.raises(RuntimeError, match="maxmemory-policy is allkeys-lru"):
        start(make_proxy, upstream, pg, {"eviction": "refuse"})
    p = start(make_proxy, upstream, pg, "warn")
    warnings = readyz(p)[1]["warnings"]
    assert "allkeys-lru" in warnings["durability:eviction"]
    persistence = warnings["durability:persistence"]
    assert "neither AOF nor a replica" in persistence
    assert "the RDB snapshot schedule could not be read (CONFIG GET refused: ERR unknown command" in persistence


def test_every_cluster_master_is_checked(make_proxy, shared_cluster, pg):
    """A cluster's masters each have a replica (persistence ok); one master that evicts is named."""
    evicting = shared_cluster.master_nodes()[1]
    direct = evicting.client()
    direct.config_set("maxmemory", "1gb")
    direct.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(RuntimeError) as refused:
            cluster_proxy(make_proxy, shared_cluster, upstream={"durability": {"eviction": "refuse"}},
                          backends={"main": {"type": "postgres", "dsn": DSN}}, routes=routes(pg.schema)[:1])
        reason = next(line for line in str(refused.value).splitlines() if "cannot start" in line)
        assert f"127.0.0.1:{evicting.port}: maxmemory-policy is allkeys-lru" in reason
        others = [n.port for n in shared_cluster.master_nodes() if n is not evicting]
        assert not any(f"127.0.0.1:{port}" in reason for port in others)
    finally:
        direct.config_set("maxmemory-policy", "noeviction")
    admin = free_port()
    p = cluster_proxy(make_proxy, shared_cluster, upstream={"durability": {"eviction": "refuse",
                                                                            "persistence": "refuse"}},
                      backends={"main": {"type": "postgres", "dsn": DSN}}, routes=routes(pg.schema)[:1],
                      admin={"enabled": True, "port": admin})
    p.admin_port = admin
    assert readyz(p) == (200, {"ready": True, "problems": {}, "warnings": {}})
    samples = [s for family in text_string_to_metric_families(metrics(p)) for s in family.samples
               if s.name == "cacheproxy_upstream_durability"]
    assert len(samples) == 6 and all(s.value == 1 for s in samples)     # 3 masters x 2 aspects
