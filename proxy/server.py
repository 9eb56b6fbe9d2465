"""ProxyServer: listen, start, reload, shutdown; owns the sessions, the pool and the tasks it starts."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal

from .cache.loader import Loader
from .cache.readthrough import ReadThrough
from .cache.routes import build_router, start_backends
from .config import StartupError
from .ops.admin import AdminServer
from .ops.durability import DurabilityMonitor
from .ops.metrics import (
    CLIENT_CONNECTIONS,
    READINESS_CHECKS,
    READINESS_REQUESTS,
    UPSTREAM_CONNECTIONS,
    UPSTREAM_EVENTS,
    UPSTREAM_UP,
    Metrics,
)
from .ops.readiness import CachedReadiness
from .ops.reload import reload as reload_config
from .protocol import errors
from .protocol.commands import ROUTED_COMMANDS, TABLE, with_routed
from .session.guard import Guard
from .session.monitor import Monitors
from .session.session import Session
from .tasks import Background
from .upstream.auth import UpstreamAuth
from .upstream.cluster import ClusterPool
from .upstream.single import UpstreamPool
from .writebehind.flusher import Writer, consumer_name
from .writebehind.writes import Writes

log = logging.getLogger("cacheproxy.server")


class ProxyServer:
    """Owns the listener, the sessions and the upstream pool; `run()` serves until a signal."""

    def __init__(self, cfg, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path      # re-read on SIGHUP (reload.py)
        self.reload_lock = asyncio.Lock()
        self.sessions: set[Session] = set()
        self.monitors = Monitors()      # clients in MONITOR mode: the proxy's own commands go to them too
        self.table = TABLE
        self.pool: UpstreamPool | ClusterPool | None = None
        self.guard: Guard | None = None
        self.metrics = Metrics()
        self.stats = self.metrics.stats
        self.backends: dict = {}
        self.readthrough: ReadThrough | None = None
        self.writer: Writer | None = None          # the write-behind flusher, when a route writes behind
        self.admin: AdminServer | None = None
        self.durability: DurabilityMonitor | None = None   # the upstream's fitness for the write-behind queue
        self.ready_probe = CachedReadiness(self.readiness, cfg.admin.readiness_cache_seconds)
        self.metrics.read(READINESS_REQUESTS, lambda: self.ready_probe.requests)
        self.metrics.read(READINESS_CHECKS, lambda: self.ready_probe.checks)
        self.listener: asyncio.base_events.Server | None = None
        self.clock = 0.0
        self.query_buffered = 0     # bytes of unfinished requests held for all clients (limits.max_query_buffer_total)
        listen = cfg.listen
        self.local_auth_required = bool(listen.password or listen.users)
        self.upstream_auth: UpstreamAuth | None = None     # listen.auth: upstream (created in start())
        self._stopping = asyncio.Event()      # set by a signal (or a test): shut down
        self._tasks: list[asyncio.Task] = []
        self.background = Background()     # sessions' steps, loads, retries: cancelled at shutdown

    @property
    def auth_required(self) -> bool:
        """Must a new client authenticate? With listen.auth: upstream, as the upstream's default user
        says (probed, cached briefly: upstream/auth.py)."""
        if self.upstream_auth is None:
            return self.local_auth_required
        self.upstream_auth.refresh_open()
        return not self.upstream_auth.open

    def check_password(self, creds: list[bytes]) -> bool:
        listen = self.cfg.listen
        if len(creds) == 1:
            user, given = "default", creds[0]
        else:
            user, given = creds[0].decode(errors="replace"), creds[1]
        # Constant time: how much of a guess matched must not show in the answer's timing.
        if user == "default" and listen.password is not None:
            return hmac.compare_digest(given, listen.password.encode(errors="surrogateescape"))
        expected = listen.users.get(user)
        return expected is not None and hmac.compare_digest(given, expected.encode(errors="surrogateescape"))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.clock = loop.time()
        pool_class = ClusterPool if self.cfg.upstream.cluster else UpstreamPool
        self.pool = pool = pool_class(self.cfg.upstream, loop, self.background)
        self.guard = Guard(pool, self.cfg.write_behind.stream_prefix, self.cfg.upstream.db)
        if self.cfg.listen.auth == "upstream":
            self.upstream_auth = UpstreamAuth(self.cfg.upstream, loop, pool.ssl_context)
        self._register_gauges(pool)
        pool.start()
        # Listen only once the upstream had its chance: a sidecar may start before Redis, so an
        # unreachable upstream does not stop startup, it only delays it by connect_timeout.
        if not await pool.wait_ready(self.cfg.upstream.connect_timeout):
            log.warning("upstream not reachable yet (%s); serving anyway, reconnecting in the background",
                        pool.last_error)
        if self.upstream_auth is not None:
            await self.upstream_auth.probe()
        self.durability = durability = await self._check_durability(pool)
        if self.cfg.routes:
            await self._start_routes()
        durability.start()
        if self.cfg.admin.enabled:
            self.admin = admin = AdminServer(self.cfg.admin, self.metrics, self.ready_probe, durability.warnings)
            await admin.start()
        listen = self.cfg.listen
        self.listener = await loop.create_server(
            lambda: Session(self), listen.host, listen.port,
            reuse_port=listen.reuse_port or None, backlog=1024)
        self._tasks.append(loop.create_task(self._tick()))
        log.info("listening on %s:%d, upstream %s", listen.host, listen.port, self.cfg.upstream.redacted_url)

    async def _check_durability(self, pool) -> DurabilityMonitor:
        """Before any write is taken: can the upstream keep the write-behind queue? An unsafe setting
        under `refuse` stops startup (an unreachable upstream does not: the watch checks later)."""
        durability = DurabilityMonitor(pool, self.cfg.upstream.durability)
        durability.register(self.metrics)
        durability.active = writes_behind(self.cfg.routes)
        if durability.active:
            await durability.check()
            if durability.refusal:
                raise StartupError(f"{durability.refusal}; to start anyway, set that upstream.durability "
                                   f"setting to warn")
        return durability

    async def _start_routes(self) -> None:
        """Backends, routes and the read-through path; routed command names get the ROUTED kind."""
        self.backends = await start_backends(self.cfg)
        self.install_routes(await build_router(self.cfg, self.backends, self.metrics), self.cfg)

    def install_routes(self, router, cfg) -> None:
        """Serve `router` from now on (at startup, and on a reload): the read path, the write path and
        the write-behind flusher follow it; sessions keep their connections."""
        behind = writes_behind(router.routes)
        if self.durability is not None:
            self.durability.set_active(behind)
        if self.writer is not None:
            self.writer.reconfigure(cfg, router)
        elif behind:
            self.writer = writer = Writer(self.pool, router, cfg, self.metrics, consumer_name(cfg))
            writer.start()
        if self.readthrough is None:
            loader = Loader(self.pool, self.metrics)
            writes = Writes(router, self.pool, loader, cfg.write_behind, self.writer)
            writes.queue_guard = self.durability
            self.readthrough = ReadThrough(router, self.pool, loader, writes, cfg.limits.max_loads_per_command)
        else:
            self.readthrough.router, self.readthrough.prefixes = router, router.prefixes
            self.readthrough.writes.reconfigure(router, cfg.write_behind, self.writer)
        table = with_routed(ROUTED_COMMANDS)
        self.table = table
        for session in self.sessions:
            session.table = table

    async def readiness(self) -> dict[str, str | None]:
        """What /readyz reports: None for a healthy component, else the reason. Called through
        self.ready_probe (ops/readiness.py): one check at a time, reused for a short while."""
        problems: dict[str, str | None] = {
            "upstream": None if self.pool is not None and self.pool.healthy else
            f"upstream unavailable: {self.pool.last_error if self.pool else 'not started'}",
            # Open connections may still work while new ones are refused: say so before they all close.
            "upstream_credentials": self.pool.credentials_error if self.pool is not None else None,
            "durability": self.durability.refusal if self.durability is not None else None}

        async def check(name, backend) -> None:
            try:
                await asyncio.wait_for(backend.ping(), 2)
                problems[f"backend:{name}"] = None
            except Exception as exc:   # any failure means "not ready"; the reason is reported
                problems[f"backend:{name}"] = str(exc) or ("timed out" if isinstance(exc, TimeoutError)
                                                           else type(exc).__name__)
        # Concurrently: one hung backend must not make the probe wait for the others too.
        await asyncio.gather(*(check(name, backend) for name, backend in list(self.backends.items())))
        return problems

    def _register_gauges(self, pool: UpstreamPool | ClusterPool) -> None:
        metrics = self.metrics
        metrics.read(CLIENT_CONNECTIONS, lambda: len(self.sessions))
        metrics.read(UPSTREAM_UP, lambda: 1 if pool.healthy else 0)
        metrics.read(UPSTREAM_CONNECTIONS, lambda: [
            (("shared",), sum(1 for conns in pool.shared.values() for c in conns if c is not None and c.up)),
            (("dedicated",), len(pool.dedicated))])
        metrics.read(UPSTREAM_EVENTS, lambda: [((name,), value) for name, value in pool.events.samples()])

    @property
    def port(self) -> int:
        assert self.listener is not None, "the proxy is not listening yet"
        return self.listener.sockets[0].getsockname()[1]

    def over_query_budget(self) -> None:
        """All clients' unfinished requests passed limits.max_query_buffer_total: the client holding the
        most is dropped (an attacker's giant bulk, not the many small requests in flight)."""
        biggest = max(self.sessions, key=lambda s: s.buffered, default=None)
        if biggest is not None and biggest.buffered:
            log.warning("client %d holds %d bytes of an unfinished request; the proxy-wide limit is passed, "
                        "closing it", biggest.id, biggest.buffered)
            biggest.drop(errors.protocol_error(errors.PROTO_QUERY_BUFFER_TOTAL), "query_buffer_disconnects")

    async def _tick(self) -> None:
        """A coarse clock for idle tracking (cheaper than a clock call per read), idle timeouts, and the
        deadline for finishing a request once begun."""
        loop = asyncio.get_running_loop()
        idle = self.cfg.listen.idle_timeout
        while True:
            await asyncio.sleep(0.25)
            before, self.clock = self.clock, loop.time()
            if self.clock - before > 1.0:
                # The loop itself was stalled: the clients' bytes may still wait to be read, so nobody
                # is judged idle or slow on this tick.
                continue
            deadline = self.cfg.limits.request_timeout
            if deadline:
                for session in list(self.sessions):
                    if session.partial_since is None:
                        continue
                    if session.paused:          # the proxy is not reading: the client is not to blame
                        session.partial_since = self.clock
                    elif self.clock - session.partial_since > deadline:
                        session.drop(errors.request_timeout(deadline), "request_timeouts")
            if idle:
                for session in list(self.sessions):
                    if (self.clock - session.last_active > idle and not session.order
                            and session.relay is None and not session.blocking and session.transport):
                        self.stats.clients.idle_disconnects += 1
                        session.transport.close()

    async def reload(self) -> bool:
        """Re-read the config file and apply routes, TTLs, backends and write settings in place
        (reload.py); False when the new config is refused and the running one stays."""
        return await reload_config(self)

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.config_path or "(no config file)")
        self._tasks.append(asyncio.get_running_loop().create_task(self.reload()))

    def request_stop(self) -> None:
        if self._stopping.is_set():
            log.warning("second signal: exiting now")
            raise SystemExit(1)
        log.info("shutting down: no new connections, finishing in-flight replies")
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Signals first: a SIGTERM that arrives while we are still starting must stop us cleanly.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        await self.start()
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, stop reading requests, wait for in-flight replies (bounded), close."""
        if self.listener is not None:
            self.listener.close()
        for session in list(self.sessions):
            session.pause("shutdown")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.shutdown.grace_seconds
        while loop.time() < deadline and any(s.order for s in self.sessions):
            await asyncio.sleep(0.02)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        if self.writer is not None:      # flush what is queued, within what is left of the grace period
            await self.writer.close(max(deadline, loop.time() + 1.0))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.background.close()
        if self.admin is not None:
            await self.admin.close()
        if self.durability is not None:
            await self.durability.close()
        for backend in self.backends.values():
            await backend.close()
        if self.pool is not None:
            await self.pool.close()
        log.info("stopped")


def writes_behind(routes) -> bool:
    """Does any route (config or runtime) write behind, so the upstream holds a queue?"""
    return any(r.write is not None and r.write.mode == "write-behind" for r in routes)
