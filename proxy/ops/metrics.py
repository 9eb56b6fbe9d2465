"""The one catalogue of metrics: every family the proxy exports is declared here (name, type, help,
labels), and every module counts through the containers below (twemproxy's nc_stats.h, Envoy's
ALL_*_STATS).

Rules of this module:
- The hot path (a hit, a pass-through) only bumps plain integers on objects it already holds
  (`Counters` subclasses, RouteStats, the per-kind command list); nothing is formatted until /metrics
  is scraped. Histograms are observed only off the hot path (loads, write-behind flushes).
- A counter group names its family and its fields are the label values, so the struct and the export
  cannot drift apart; a test checks that everything exported is in CATALOGUE and the other way round.
- Gauges that are read, not counted (connections, queue depth) are registered as callables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..protocol.commands import KIND_NAMES


@dataclass(frozen=True)
class Family:
    name: str
    type: str                    # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# -- clients and commands
CLIENT_CONNECTIONS = Family("cacheproxy_client_connections", "gauge", "Connected clients")
CLIENT_EVENTS = Family("cacheproxy_client_events", "counter", "Client connection events", ("event",))
CLIENT_BYTES = Family("cacheproxy_client_bytes", "counter", "Bytes from and to clients", ("direction",))
COMMANDS = Family("cacheproxy_commands", "counter", "Client commands by how the proxy handled them", ("kind",))
# -- upstream
UPSTREAM_CONNECTIONS = Family("cacheproxy_upstream_connections", "gauge", "Open upstream connections", ("kind",))
UPSTREAM_UP = Family("cacheproxy_upstream_up", "gauge", "1 when a shared upstream connection is up")
UPSTREAM_EVENTS = Family("cacheproxy_upstream_events", "counter", "Upstream connection events", ("event",))
# -- routes and backends
# rejected_keys: misses whose key no row can have (int4 overflow, NUL in text): answered as not found,
# never counted as backend errors. load_busy: loads refused because every backend connection was in use
# (part of load_errors, not of cacheproxy_backend_errors).
ROUTE_FIELDS = ("hits", "misses", "negative_hits", "loads", "load_errors", "singleflight_joins",
                "refresh_ahead", "stale_served", "not_found", "writes", "write_errors", "queue_full",
                "rejected_keys", "load_busy")
ROUTE = {field: Family(f"cacheproxy_route_{field}", "counter", f"Route {field.replace('_', ' ')}", ("route",))
         for field in ROUTE_FIELDS}
BACKEND_ERRORS = Family("cacheproxy_backend_errors", "counter", "Backend errors", ("backend",))
LOAD_SECONDS = Family("cacheproxy_load_seconds", "histogram", "Backend load latency on a cache miss",
                      ("route", "backend"), LOAD_BUCKETS)
# -- readiness and the upstream's durability
READINESS_REQUESTS = Family("cacheproxy_readiness_requests", "counter", "/readyz requests answered")
READINESS_CHECKS = Family("cacheproxy_readiness_checks", "counter",
                          "Readiness checks run (pings of the upstream and backends); at most one at a time")
DURABILITY = Family("cacheproxy_upstream_durability", "gauge",
                    "Can the upstream keep the write-behind queue: 1 ok, 0 unsafe, -1 unknown", ("node", "aspect"))
DURABILITY_CHECKS = Family("cacheproxy_upstream_durability_checks", "counter",
                           "Checks of the upstream's eviction policy and persistence")
# -- write-behind
WB_PENDING = Family("cacheproxy_writebehind_pending", "gauge", "Writes queued and not yet in the database")
WB_LAG = Family("cacheproxy_writebehind_lag_seconds", "gauge", "Age of the oldest queued write")
WB_DEAD_LETTERS = Family("cacheproxy_writebehind_dead_letters", "gauge", "Entries in the dead-letter stream")
WB_PARTITIONS = Family("cacheproxy_writebehind_partitions_owned", "gauge", "Queue partitions this sidecar flushes")
WB_LANDED = Family("cacheproxy_writebehind_landed", "counter", "Queued writes that reached the database",
                   ("route",))
WB_RETRIES = Family("cacheproxy_writebehind_retries", "counter", "Backend batch writes retried", ("route",))
WB_DEAD_LETTERED = Family("cacheproxy_writebehind_dead_lettered", "counter", "Writes sent to the dead letters",
                          ("route",))
WB_SUPERSEDED = Family("cacheproxy_writebehind_superseded", "counter",
                       "Queued writes skipped because the database held a newer version of the key", ("route",))
WB_RETRYING = Family("cacheproxy_writebehind_retrying_seconds", "gauge",
                     "How long this sidecar's oldest batch has been retrying an unavailable database (0: none "
                     "is); alert on it")
WB_LEASES_LOST = Family("cacheproxy_writebehind_leases_lost", "counter",
                        "Partition leases found lapsed or taken by another sidecar while this one owned them")
WB_BATCH_SIZE = Family("cacheproxy_writebehind_batch_size", "histogram", "Writes per backend batch",
                       ("backend",), BATCH_BUCKETS)
WB_FLUSH_SECONDS = Family("cacheproxy_writebehind_flush_seconds", "histogram", "Backend batch write latency",
                          ("backend",), FLUSH_BUCKETS)

CATALOGUE: tuple[Family, ...] = (
    CLIENT_CONNECTIONS, CLIENT_EVENTS, CLIENT_BYTES, COMMANDS,
    UPSTREAM_CONNECTIONS, UPSTREAM_UP, UPSTREAM_EVENTS,
    *ROUTE.values(), BACKEND_ERRORS, LOAD_SECONDS,
    READINESS_REQUESTS, READINESS_CHECKS, DURABILITY, DURABILITY_CHECKS,
    WB_PENDING, WB_LAG, WB_DEAD_LETTERS, WB_PARTITIONS, WB_LANDED, WB_RETRIES, WB_DEAD_LETTERED,
    WB_SUPERSEDED, WB_RETRYING, WB_LEASES_LOST,
    WB_BATCH_SIZE, WB_FLUSH_SECONDS,
)


class Counters:
    """Plain integer counters that export as one labelled family: one sample per field, the field's
    name (or its entry in `label_values`) as the label value."""

    __slots__ = ()
    family: ClassVar[Family]
    label_values: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        names: tuple[str, ...] = self.__slots__
        for name in names:
            setattr(self, name, 0)

    def samples(self) -> list[tuple[str, int]]:
        names: tuple[str, ...] = self.__slots__
        return [(self.label_values.get(name, name), getattr(self, name)) for name in names]


class ClientEvents(Counters):
    family = CLIENT_EVENTS
    connections: int
    protocol_errors: int
    auth_failures: int
    relays: int
    output_limit_disconnects: int
    idle_disconnects: int
    reserved_refusals: int
    query_buffer_disconnects: int
    request_timeouts: int
    __slots__ = ("connections", "protocol_errors", "auth_failures", "relays", "output_limit_disconnects",
                 "idle_disconnects", "reserved_refusals", "query_buffer_disconnects", "request_timeouts")


class ClientBytes(Counters):
    family = CLIENT_BYTES
    received: int
    sent: int
    label_values = {"received": "in", "sent": "out"}
    __slots__ = ("received", "sent")


class UpstreamEvents(Counters):
    family = UPSTREAM_EVENTS
    connects: int
    connect_errors: int
    timeouts: int
    moved: int
    ask: int
    retries: int
    refreshes: int
    refresh_errors: int
    __slots__ = ("connects", "connect_errors", "timeouts", "moved", "ask", "retries", "refreshes",
                 "refresh_errors")


class ProxyStats:
    """What the sessions count: client events and bytes, commands by kind."""

    def __init__(self) -> None:
        self.clients = ClientEvents()
        self.bytes = ClientBytes()
        self.commands = [0] * len(KIND_NAMES)


class RouteStats:
    """Counters for one route, bumped by the read-through and write paths."""

    __slots__ = ROUTE_FIELDS

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.stats = ProxyStats()
        self.routes: dict[str, RouteStats] = {}
        self.backend_errors: dict[str, int] = {}
        self.counters: list[Counters] = [self.stats.clients, self.stats.bytes]
        self.labelled: dict[Family, dict[tuple[str, ...], int]] = {}
        self.readers: dict[Family, Callable[[], float | Iterable[tuple[tuple[str, ...], float]]]] = {}
        self.histograms: dict[Family, Histogram] = {}
        self.load_seconds = self.histogram(LOAD_SECONDS)
        self.registry.register(_Collector(self))

    def route(self, key: str) -> RouteStats:
        stats = self.routes.get(key)
        if stats is None:
            stats = self.routes[key] = RouteStats()
        return stats

    def histogram(self, family: Family) -> Histogram:
        if family not in self.histograms:
            self.histograms[family] = Histogram(family.name, family.help, list(family.labels),
                                                buckets=family.buckets, registry=self.registry)
        return self.histograms[family]

    def read(self, family: Family, read: Callable[[], float | Iterable[tuple[tuple[str, ...], float]]]) -> None:
        """Export `family` as whatever `read()` returns at scrape time: a value, or (labels, value) pairs
        (gauges such as the connection count, or counters another object keeps)."""
        self.readers[family] = read

    def declare(self, *families: Family) -> None:
        """Export these labelled counters from now on, even before their first count."""
        for family in families:
            self.labelled.setdefault(family, {})

    def count(self, family: Family, labels: tuple[str, ...], n: int = 1) -> None:
        """A labelled counter off the hot path (e.g. write-behind outcomes per route)."""
        values = self.labelled.setdefault(family, {})
        values[labels] = values.get(labels, 0) + n

    def value(self, family: Family, labels: tuple[str, ...] = ()) -> int:
        return self.labelled.get(family, {}).get(labels, 0)


class _Collector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        m = self.metrics
        for family, read in m.readers.items():
            kind = GaugeMetricFamily if family.type == "gauge" else CounterMetricFamily
            out = kind(family.name, family.help, labels=list(family.labels))
            value = read()
            if isinstance(value, int | float):
                out.add_metric([], value)
            else:
                for labels, sample in value:
                    out.add_metric(list(labels), sample)
            yield out
        for counters in m.counters:
            family = counters.family
            out = CounterMetricFamily(family.name, family.help, labels=list(family.labels))
            for label, value in counters.samples():
                out.add_metric([label], value)
            yield out
        commands = CounterMetricFamily(COMMANDS.name, COMMANDS.help, labels=list(COMMANDS.labels))
        for kind, value in zip(KIND_NAMES, m.stats.commands, strict=True):
            commands.add_metric([kind], value)
        yield commands
        for field, family in ROUTE.items():
            out = CounterMetricFamily(family.name, family.help, labels=["route"])
            for route, stats in m.routes.items():
                out.add_metric([route], getattr(stats, field))
            yield out
        errors = CounterMetricFamily(BACKEND_ERRORS.name, BACKEND_ERRORS.help, labels=["backend"])
        for backend, value in m.backend_errors.items():
            errors.add_metric([backend], value)
        yield errors
        for family, values in m.labelled.items():
            out = CounterMetricFamily(family.name, family.help, labels=list(family.labels))
            for labels, value in values.items():
                out.add_metric(list(labels), value)
            yield out
