"""Prometheus metrics.

The hot path (a hit, a pass-through) only bumps plain integers on objects it already touches; this
module turns them into Prometheus families when /metrics is scraped. Latency histograms are observed
only off the hot path (backend loads, write-behind flushes).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Labels for commands.PASS, LOCAL, PIN, RELAY, DENY, ROUTED and server._FAIL, in that order.
COMMAND_KINDS = ("pass-through", "local", "pinned", "relay", "denied", "routed", "protocol-error")
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class RouteStats:
    """Counters for one route, bumped by the read-through and write paths."""

    # rejected_keys: misses whose key no row can have (int4 overflow, NUL in text): answered as not
    # found, never counted as backend errors. load_busy: loads refused because every backend
    # connection was in use (part of load_errors, not of cacheproxy_backend_errors).
    __slots__ = ("hits", "misses", "negative_hits", "loads", "load_errors", "singleflight_joins",
                 "refresh_ahead", "stale_served", "not_found", "writes", "write_errors", "queue_full",
                 "rejected_keys", "load_busy")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.routes: dict[str, RouteStats] = {}
        self.backend_errors: dict[str, int] = {}
        self.load_seconds = Histogram(
            "cacheproxy_load_seconds", "Backend load latency on a cache miss", ["route", "backend"],
            buckets=LOAD_BUCKETS, registry=self.registry)
        self.server = None
        self.extra_collectors: list = []   # callables yielding metric families (e.g. write-behind)
        self.registry.register(_Collector(self))

    def route(self, key: str) -> RouteStats:
        stats = self.routes.get(key)
        if stats is None:
            stats = self.routes[key] = RouteStats()
        return stats


class _Collector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        m = self.metrics
        server = m.server
        if server is not None:
            yield GaugeMetricFamily("cacheproxy_client_connections", "Connected clients",
                                    value=len(server.sessions))
            stats = CounterMetricFamily("cacheproxy_client_events", "Client connection events", labels=["event"])
            for name, value in server.stats.items():
                stats.add_metric([name], value)
            yield stats
            io = CounterMetricFamily("cacheproxy_client_bytes", "Bytes from and to clients", labels=["direction"])
            io.add_metric(["in"], server.io[0])
            io.add_metric(["out"], server.io[1])
            yield io
            commands = CounterMetricFamily("cacheproxy_commands", "Client commands by how the proxy handled them",
                                           labels=["kind"])
            for kind, value in zip(COMMAND_KINDS, server.commands, strict=True):
                commands.add_metric([kind], value)
            yield commands
            pool = server.pool
            if pool is not None:
                shared = sum(1 for cs in pool.shared.values() for c in cs if c is not None and c.up)
                gauge = GaugeMetricFamily("cacheproxy_upstream_connections", "Open upstream connections",
                                          labels=["kind"])
                gauge.add_metric(["shared"], shared)
                gauge.add_metric(["dedicated"], len(pool.dedicated))
                yield gauge
                up = GaugeMetricFamily("cacheproxy_upstream_up", "1 when a shared upstream connection is up")
                up.add_metric([], 1 if pool.healthy else 0)
                yield up
                events = CounterMetricFamily("cacheproxy_upstream_events", "Upstream connection events",
                                             labels=["event"])
                for name, value in pool.stats.items():
                    events.add_metric([name], value)
                yield events
        families = {}
        for name in RouteStats.__slots__:
            families[name] = CounterMetricFamily(f"cacheproxy_route_{name}", f"Route {name.replace('_', ' ')}",
                                                 labels=["route"])
        for route, stats in m.routes.items():
            for name in RouteStats.__slots__:
                families[name].add_metric([route], getattr(stats, name))
        yield from families.values()
        errors = CounterMetricFamily("cacheproxy_backend_errors", "Backend errors", labels=["backend"])
        for backend, value in m.backend_errors.items():
            errors.add_metric([backend], value)
        yield errors
        for collect in m.extra_collectors:
            yield from collect()
