"""`cacheproxy stats`: a human summary of a running proxy's /metrics (hit ratio per route, queue lag)."""

from __future__ import annotations

import sys
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families


def read_metrics(admin: str) -> dict[str, list]:
    """name -> [(labels, value)] (counters by their family name, without _total)."""
    body = urllib.request.urlopen(admin.rstrip("/") + "/metrics", timeout=5).read().decode()
    out: dict[str, list] = defaultdict(list)
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[sample.name.removesuffix("_total")].append((sample.labels, sample.value))
    return out


def print_stats(admin: str) -> int:
    try:
        m = read_metrics(admin)
    except OSError as exc:
        print(f"cacheproxy stats: cannot read {admin}/metrics: {exc}", file=sys.stderr)
        return 1

    def value(name: str, **labels) -> float:
        return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))

    up = "up" if value("cacheproxy_upstream_up") else "DOWN"
    print(f"clients: {value('cacheproxy_client_connections'):.0f} connected; upstream {up}, "
          f"{value('cacheproxy_upstream_connections'):.0f} connections")
    routes = sorted({lab["route"] for lab, _ in m.get("cacheproxy_route_hits", [])})
    if routes:
        print(f"{'route':32} {'reads':>9} {'hit ratio':>9} {'loads':>8} {'errors':>7} {'writes':>8}")
    for route in routes:
        hits, misses = value("cacheproxy_route_hits", route=route), value("cacheproxy_route_misses", route=route)
        loads = value("cacheproxy_route_loads", route=route)
        reads = hits + misses
        ratio = f"{(reads - loads) / reads:.1%}" if reads else "-"
        errors = value("cacheproxy_route_load_errors", route=route) + value("cacheproxy_route_write_errors",
                                                                              route=route)
        print(f"{route:32} {reads:9.0f} {ratio:>9} {loads:8.0f} {errors:7.0f} "
              f"{value('cacheproxy_route_writes', route=route):8.0f}")
    if "cacheproxy_writebehind_pending" in m:
        print(f"write-behind: {value('cacheproxy_writebehind_pending'):.0f} queued, oldest "
              f"{value('cacheproxy_writebehind_lag_seconds'):.1f} s, {value('cacheproxy_writebehind_landed'):.0f} "
              f"landed, {value('cacheproxy_writebehind_retries'):.0f} retries, "
              f"{value('cacheproxy_writebehind_dead_letters'):.0f} dead letters, "
              f"{value('cacheproxy_writebehind_partitions_owned'):.0f} partitions owned here")
    return 0
