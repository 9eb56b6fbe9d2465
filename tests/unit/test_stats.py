"""`cacheproxy stats` formatting from Prometheus text (no proxy needed)."""

from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from proxy.ops.stats import summary

BASE = """
cacheproxy_client_connections 3
cacheproxy_upstream_up 1
cacheproxy_upstream_connections{kind="shared"} 4
cacheproxy_upstream_events_total{event="connect_errors"} 2
cacheproxy_route_hits_total{route="user:{id:int}"} 90
cacheproxy_route_misses_total{route="user:{id:int}"} 10
cacheproxy_route_loads_total{route="user:{id:int}"} 4
cacheproxy_route_load_errors_total{route="user:{id:int}"} 1
cacheproxy_route_writes_total{route="user:{id:int}"} 7
cacheproxy_backend_errors_total{backend="main"} 1
"""


def parse(text: str) -> dict:
    out = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name.removesuffix("_total")].append((s.labels, s.value))
    return out


def test_routes_and_errors_without_write_behind():
    lines = summary(parse(BASE))
    assert lines[0] == "clients: 3 connected; upstream up, 4 connections, 2 connect errors"
    assert lines[2].split() == ["user:{id:int}", "100", "96.0%", "4", "1", "7"]
    assert lines[3] == "backend errors: main 1"
    assert not any(line.startswith("write-behind") for line in lines)


def test_write_behind_totals_and_per_route_columns():
    totals = summary(parse(BASE + "cacheproxy_writebehind_pending 5\ncacheproxy_writebehind_lag_seconds 1.5\n"))
    assert totals[-1].startswith("write-behind: 5 queued, oldest 1.5 s")
    by_route = BASE + """
cacheproxy_writebehind_pending{route="user:{id:int}"} 5
cacheproxy_writebehind_pending{route="profile:{id}"} 2
cacheproxy_writebehind_lag_seconds{route="user:{id:int}"} 0.5
cacheproxy_writebehind_lag_seconds{route="profile:{id}"} 2.0
"""
    lines = summary(parse(by_route))
    assert lines[1].split()[-2:] == ["queued", "lag"]
    assert lines[2].split()[-2:] == ["5", "0.5s"]
    assert lines[-1].startswith("write-behind: 7 queued, oldest 2.0 s"), "lag is the oldest, not a sum"


def test_upstream_down_and_no_routes():
    lines = summary(parse("cacheproxy_upstream_up 0\n"))
    assert lines == ["clients: 0 connected; upstream DOWN, 0 connections, 0 connect errors"]
