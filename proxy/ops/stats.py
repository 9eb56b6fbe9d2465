"""`cacheproxy stats`: a human summary of a running proxy's /metrics (hit ratio per route, loads,
errors, write-behind queue depth and lag).

It reads only the Prometheus text, so it works against any proxy version that exports these names;
a family that is missing (no routes, no write-behind) simply leaves its lines out. The write-behind
gauges `cacheproxy_writebehind_pending` and `cacheproxy_writebehind_lag_seconds` may carry a
`route` label; when they do, the route table gets `queued` and `lag` columns.
"""

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


def summary(m: dict[str, list]) -> list[str]:
    """The lines `cacheproxy stats` prints for metrics `m` (as read_metrics returns them)."""
    def value(name: str, how=sum, **labels) -> float:
        return how([v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items())] or [0.0])

    lines = []
    up = "up" if value("cacheproxy_upstream_up") else "DOWN"
    lines.append(f"clients: {value('cacheproxy_client_connections'):.0f} connected; upstream {up}, "
                 f"{value('cacheproxy_upstream_connections'):.0f} connections, "
                 f"{value('cacheproxy_upstream_events', event='connect_errors'):.0f} connect errors")
    routes = sorted({lab["route"] for lab, _ in m.get("cacheproxy_route_hits", [])})
    queue_by_route = any("route" in lab for lab, _ in m.get("cacheproxy_writebehind_pending", []))
    if routes:
        header = f"{'route':32} {'reads':>9} {'hit ratio':>9} {'loads':>8} {'errors':>7} {'writes':>8}"
        lines.append(header + (f" {'queued':>7} {'lag':>7}" if queue_by_route else ""))
    for route in routes:
        hits, misses = value("cacheproxy_route_hits", route=route), value("cacheproxy_route_misses", route=route)
        loads = value("cacheproxy_route_loads", route=route)
        reads = hits + misses
        # Hit ratio = reads answered without a database query (negative-cache answers count as hits).
        ratio = f"{(reads - loads) / reads:.1%}" if reads else "-"
        errors = value("cacheproxy_route_load_errors", route=route) + value("cacheproxy_route_write_errors",
                                                                              route=route)
        line = (f"{route:32} {reads:9.0f} {ratio:>9} {loads:8.0f} {errors:7.0f} "
                f"{value('cacheproxy_route_writes', route=route):8.0f}")
        if queue_by_route:
            line += (f" {value('cacheproxy_writebehind_pending', route=route):7.0f}"
                     f" {value('cacheproxy_writebehind_lag_seconds', max, route=route):6.1f}s")
        lines.append(line)
    backend_errors = [(lab.get("backend", "?"), v) for lab, v in m.get("cacheproxy_backend_errors", []) if v]
    if backend_errors:
        lines.append("backend errors: " + ", ".join(f"{name} {v:.0f}" for name, v in sorted(backend_errors)))
    if "cacheproxy_writebehind_pending" in m:
        lines.append(
            f"write-behind: {value('cacheproxy_writebehind_pending'):.0f} queued, oldest "
            f"{value('cacheproxy_writebehind_lag_seconds', max):.1f} s, "
            f"{value('cacheproxy_writebehind_landed'):.0f} landed, {value('cacheproxy_writebehind_retries'):.0f} "
            f"retries, {value('cacheproxy_writebehind_dead_letters'):.0f} dead letters, "
            f"{value('cacheproxy_writebehind_partitions_owned'):.0f} partitions owned here")
    return lines


def print_stats(admin: str) -> int:
    try:
        m = read_metrics(admin)
    except (OSError, ValueError) as exc:
        print(f"cacheproxy stats: cannot read {admin.rstrip('/')}/metrics: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary(m)))
    return 0
