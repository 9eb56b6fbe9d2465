"""Upstream Redis connections: multiplexed, pipelined, batched per event-loop turn.

    session --send(bytes, waiter)--> UpstreamConnection.out --(one write per loop turn)--> Redis
    Redis --bytes--> data_received --scan_replies--> waiter.on_reply(raw bytes of its replies)

Redis answers in order on one connection, so each connection keeps a FIFO of waiters; a waiter
stands for `count` consecutive replies (a whole pipeline from one client is one waiter). Requests of
all clients queued during one loop turn leave in a single socket write: per-request system calls,
not Python code, are what a proxy pays for.

The pool keeps `pool_size` shared connections per RESP version (a connection's protocol decides the
shape of its replies, so RESP2 and RESP3 clients never share one), reconnects them in the background
with backoff, and hands out dedicated connections for clients that carry connection state. It keeps
`spare_connections` of those per RESP version connected and authenticated ahead of time (refilled in
the background as they are taken or die), so a SUBSCRIBE, MONITOR, WATCH or blocking command leaves
for Redis in the loop turn it arrived in: a PUBLISH another client sends right after it finds the
subscriber already there, as with a direct connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl

from ..ops.metrics import UpstreamEvents
from ..protocol import errors
from ..protocol.commands import CommandTable
from ..protocol.resp import encode_command, parse_reply, scan_replies
from ..tasks import Background
from .demux import ReplyDemux

log = logging.getLogger("cacheproxy.upstream")



class UpstreamUnavailable(Exception):
    """No usable connection to the upstream Redis; the text says why (never a secret)."""


class CredentialsRefused(UpstreamUnavailable):
    """The upstream refused the proxy's own credentials (upstream.url) on a new connection."""


def credentials_problem(reply: Exception) -> str | None:
    """Why a handshake reply means the proxy's own credentials no longer work, else None."""
    text = str(reply).split("\n")[0]
    if text.startswith(("NOAUTH", "WRONGPASS")):
        return (f"the upstream refused the proxy's own credentials (upstream.url): {text}; connections "
                "already open keep working, new ones fail: was requirepass or the ACL changed (CONFIG SET "
                "requirepass, ACL SETUSER)? Give the proxy an ACL user of its own in upstream.url")
    return None


class FutureWaiter:
    """Waiter for the proxy's own requests: resolves a future with the raw reply bytes."""

    __slots__ = ("future", "count")

    def __init__(self, future: asyncio.Future, count: int = 1):
        self.future = future
        self.count = count

    def on_reply(self, data) -> None:
        if not self.future.done():
            self.future.set_result(bytes(data))

    def partial(self, data, count: int) -> bool:
        return False

    def on_error(self, message: str) -> None:
        if not self.future.done():
            self.future.set_exception(UpstreamUnavailable(message))


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, proto: int, dedicated: bool):
        self.pool = pool
        self.proto = proto
        self.dedicated = dedicated
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.up = False
        self.demux = ReplyDemux()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.relay_to = None    # a session that receives every byte as it arrives (pub/sub...)
        self.progress_at = 0.0  # last time this connection sent a reply or went from idle to busy
        self.timeout_exempt = 0  # blocking commands in flight: the command timeout does not apply
        self.write_paused = False
        self.blocked_sessions: set = set()
        self.closed: asyncio.Future = self.loop.create_future()
        self.db = 0
        self.redis_id: int | None = None    # Redis's CLIENT ID of this connection (from HELLO)

    # -- asyncio callbacks ---------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.up = False
        self.transport = None
        self._fail_all("upstream unavailable: connection lost")
        if self.relay_to is not None:
            session, self.relay_to = self.relay_to, None
            session.relay_lost()
        self._wake_blocked()
        if not self.closed.done():
            self.closed.set_result(None)
        self.pool.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_blocked()

    def _wake_blocked(self) -> None:
        blocked, self.blocked_sessions = self.blocked_sessions, set()
        for session in blocked:
            session.resume("upstream")

    def data_received(self, data: bytes) -> None:
        if self.relay_to is not None:
            self.relay_to.relay_data(data)
            return
        self.progress_at = self.loop.time()
        if not self.demux.feed(data):
            log.warning("unexpected data from upstream on a shared connection; closing it")
            self.close()

    # -- sending -------------------------------------------------------------------------------
    def send(self, data: bytes, waiter) -> None:
        """Queue a request (one or more commands) and the waiter for its replies.

        An idle connection writes at once: there is nothing to batch with, and waiting a loop turn
        only adds latency. A busy one batches everything queued during this loop turn into one write.
        """
        waiters = self.demux.waiters
        if not waiters:
            self.progress_at = self.loop.time()
            if not self.out and self.transport is not None:
                waiters.append(waiter)
                self.transport.write(data)
                return
        waiters.append(waiter)
        self.out.append(data)
        if self.transport is None and self.closed.done():
            # Lost already (killed during the handshake): nothing would ever answer; fail it now.
            self._fail_all("upstream unavailable: connection lost")
            return
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def send_raw(self, data: bytes) -> None:
        """Relay mode: bytes with no waiter (replies go straight to the relayed session), written at once
        when nothing is queued (a SUBSCRIBE must not wait a loop turn behind a PUBLISH sent after it)."""
        if not self.out and self.transport is not None:
            self.transport.write(data)
            return
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        out = self.out
        if not out:
            return
        self.out = []
        if self.transport is None:
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def call(self, *args) -> bytes:
        """The proxy's own request on this connection; returns the raw reply."""
        future = self.loop.create_future()
        self.send(encode_command(args), FutureWaiter(future))
        return await future

    send_direct = send      # a cluster node connection's send() follows redirects; this one has none

    @property
    def waiters(self):
        return self.demux.waiters

    @property
    def busy(self) -> bool:
        return bool(self.demux.waiters)
    async def call_direct(self, *args) -> bytes:
        """call() on this very connection: the same here (a cluster node's call() routes by key)."""
        return await UpstreamConnection.call(self, *args)

    def _fail_all(self, message: str, resend: bool = True) -> None:
        """Answer every waiter: the connection is gone. A waiter that can be sent again elsewhere
        (`on_lost`, a session's slot) is told whether its request had left (`resend`: False after a
        command timeout, when the client has waited long enough)."""
        reply = errors.failed(message)
        waiters = self.demux.reset()
        unsent_from = len(waiters) - len(self.out)     # requests still in `out` never left the proxy
        self.out = []
        for index, waiter in enumerate(waiters):
            if isinstance(waiter, FutureWaiter):
                waiter.on_error(message)
            elif resend and hasattr(waiter, "on_lost"):
                waiter.on_lost(self, index >= unsent_from, message)
            else:
                waiter.on_reply(reply * waiter.count)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """The connections to one Redis node; in single-node mode it is also the whole upstream (the
    session's hooks below: every command goes to this one node)."""

    connection_class = UpstreamConnection
    cluster = False

    def __init__(self, cfg, loop: asyncio.AbstractEventLoop | None = None, background: Background | None = None):
        self.cfg = cfg   # the `upstream` config section
        self.loop = loop or asyncio.get_running_loop()
        self.background = background or Background()
        self.host, self.port = cfg.host, cfg.port   # a cluster node pool sets its own
        self.shared: dict[int, list[UpstreamConnection | None]] = {2: [], 3: []}
        self.free: dict[int, list[UpstreamConnection]] = {2: [], 3: []}
        self.dedicated: set[UpstreamConnection] = set()
        self.free_cap = max(4, cfg.pool_size, cfg.spare_connections)
        self.spares = cfg.spare_connections     # dedicated connections to keep ready, per RESP version
        self.warming: dict[int, int] = {2: 0, 3: 0}     # spare connections being opened
        self._reconnected = asyncio.Event()     # set (and replaced) whenever a shared connection comes up
        self.last_error = "not connected yet"     # for logs: names the address
        self.credentials_error: str | None = None   # the proxy's own credentials refused (logs, /readyz)
        self.reason = "not connected yet"         # for clients: never an address or a secret
        self.table: CommandTable | None = None    # the upstream's COMMAND reply, read on first connect
        self.down_since: float | None = self.loop.time()    # no shared connection up since then
        self.server_version = "7.0.0"
        self._rr = 0
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.ssl_context = _ssl_context(cfg) if cfg.use_tls else None
        self.events = UpstreamEvents()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        for proto in (2, 3):
            self.shared[proto] = [None] * self.cfg.pool_size
            for index in range(self.cfg.pool_size):
                self._tasks.append(self.loop.create_task(self._keep_connected(proto, index)))
        self._tasks.append(self.loop.create_task(self._watchdog()))

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until every shared connection has connected (or `timeout` passed): at startup, so
        the first clients do not find a healthy upstream "unavailable"."""
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline:
            if all(c is not None and c.up for conns in self.shared.values() for c in conns):
                return True
            await asyncio.sleep(0.01)
        return False

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conns in self.shared.values():
            for conn in conns:
                if conn is not None:
                    conn.close()
        for conn in list(self.dedicated):
            conn.close()

    @property
    def healthy(self) -> bool:
        return self.pick(2) is not None

    # -- shared connections --------------------------------------------------------------------
    def pick(self, proto: int, key: bytes | None = None) -> UpstreamConnection | None:
        """A shared connection, round robin. `key` is ignored here; a cluster pool routes by it."""
        conns = self.shared[proto]
        for _ in range(len(conns)):
            self._rr = (self._rr + 1) % len(conns)
            conn = conns[self._rr]
            if conn is not None and conn.up:
                return conn
        return None

    async def _keep_connected(self, proto: int, index: int) -> None:
        delay = 0.05
        while not self._closing:
            try:
                conn = await self.connect(proto, dedicated=False)
            except UpstreamUnavailable:
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            if self._closing:       # closed while connecting (3.11's wait_for may swallow the cancel)
                conn.close()
                return
            self.shared[proto][index] = conn
            self.down_since = None
            # The upstream takes connections again: spares waiting out a backoff try now.
            reconnected, self._reconnected = self._reconnected, asyncio.Event()
            reconnected.set()
            self._replenish(2)
            self._replenish(3)
            await conn.closed
            self.shared[proto][index] = None
            if self.down_since is None and self.pick(proto) is None:
                self.down_since = self.loop.time()

    async def connect(self, proto: int, dedicated: bool) -> UpstreamConnection:
        cfg = self.cfg
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: self.connection_class(self, proto, dedicated), self.host, self.port,
                    ssl=self.ssl_context,
                    server_hostname=(cfg.tls.server_hostname or self.host) if self.ssl_context else None),
                cfg.connect_timeout)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self._connect_failed(exc)
            raise UpstreamUnavailable(self.last_error) from None
        try:
            await asyncio.wait_for(self._handshake(conn, proto), cfg.connect_timeout)
        except (TimeoutError, UpstreamUnavailable) as exc:
            conn.close()
            self._connect_failed(exc)
            raise UpstreamUnavailable(self.last_error) from None
        if conn.transport is None:      # lost during the handshake (CLIENT KILL, a restart): never "up"
            self._connect_failed(ConnectionError("connection lost during the handshake"))
            raise UpstreamUnavailable(self.last_error)
        conn.up = True
        self.events.connects += 1
        if self.credentials_error is not None:
            log.warning("upstream %s:%d accepts the proxy's credentials again", self.host, self.port)
            self.credentials_error = None
        if dedicated:
            self.dedicated.add(conn)
        return conn

    def _connect_failed(self, exc: BaseException) -> None:
        self.events.connect_errors += 1
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError):
            reason = "timed out"
        self.reason = f"cannot connect: {reason}"
        message = f"cannot reach {self.host}:{self.port}: {reason}"
        if isinstance(exc, CredentialsRefused):
            self.reason = "the upstream refused the proxy's credentials"
            self.credentials_error = message = f"{self.host}:{self.port}: {reason}"
        if message != self.last_error:
            log.warning("upstream: %s", message)
        self.last_error = message

    async def _handshake(self, conn: UpstreamConnection, proto: int) -> None:
        cfg = self.cfg
        hello = ["HELLO", str(proto)]
        if cfg.password is not None:
            hello += ["AUTH", cfg.username or "default", cfg.password]
        reply = parse_reply(await conn.call_direct(*hello))
        if isinstance(reply, Exception):
            problem = credentials_problem(reply)
            if problem is not None:
                raise CredentialsRefused(problem)
            raise UpstreamUnavailable(f"HELLO refused: {str(reply).splitlines()[0]}")
        info = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=False))
        conn.redis_id = info.get(b"id")
        version = info.get(b"version")
        if version:
            self.server_version = version.decode()
        await self._after_hello(conn)

    async def _after_hello(self, conn: UpstreamConnection) -> None:
        """Single node: learn the command table once, select the configured database."""
        cfg = self.cfg
        if self.table is None:
            self.table = await _command_table(conn)
        if cfg.db:
            reply = parse_reply(await conn.call("SELECT", str(cfg.db)))
            if isinstance(reply, Exception):
                raise UpstreamUnavailable(f"SELECT {cfg.db} refused: {reply}")
        conn.db = cfg.db

    # -- the session's hooks (one node: everything goes here) -----------------------------------
    def node_for(self, args: list[bytes]) -> UpstreamPool:
        return self

    def node_for_key(self, key: bytes) -> UpstreamPool:
        return self

    def node_for_slot(self, slot: int, readonly: bool = False) -> UpstreamPool:
        return self

    def any_node(self) -> UpstreamPool:
        return self

    def slot_of(self, args: list[bytes]) -> int | None:
        """One node holds every key: any command with an argument is "in slot 0"."""
        return 0 if len(args) > 1 else None

    def first_key(self, args: list[bytes]) -> bytes | None:
        return None

    def relay_key(self, args: list[bytes]) -> bytes | None:
        return None

    def refusal(self, name: bytes, args: list[bytes]) -> bytes | None:
        return None

    async def run(self, args, proto: int = 2) -> bytes:
        """One command, its raw reply; waits (up to connect_timeout) for a connection if none is up."""
        conn = await self.wait_conn(proto, self.cfg.connect_timeout)
        if conn is None:
            return errors.upstream_unavailable(self.reason)
        try:
            return await conn.call(*args)
        except UpstreamUnavailable as exc:
            return errors.upstream_unavailable(str(exc))

    async def run_everywhere(self, args, proto: int = 2) -> list[bytes]:
        return [await self.run(args, proto)]

    async def transaction(self, commands: list, proto: int, slot, first=None, unsent: bool = False) -> bytes:
        """MULTI + commands + EXEC again after the block was lost before it left; EXEC's reply."""
        if first is not None and not unsent:
            return first[-1]
        conn = await self.wait_conn(proto, self.cfg.connect_timeout)
        if conn is None:
            return errors.upstream_unavailable(self.reason)
        future = self.loop.create_future()
        request = b"".join(map(encode_command, [(b"MULTI",), *commands, (b"EXEC",)]))
        conn.send(request, FutureWaiter(future, len(commands) + 2))
        try:
            raw = await future
        except UpstreamUnavailable as exc:
            return errors.upstream_unavailable(str(exc))
        pos, _ = scan_replies(raw, 0, len(commands) + 1)
        return raw[pos:]

    async def wait_conn(self, proto: int, timeout: float) -> UpstreamConnection | None:
        """A shared connection, waiting for one to come up: up to `timeout` after the upstream went
        down, so commands queued behind each other share one wait instead of waiting in turn."""
        conn = self.pick(proto)
        deadline = self.loop.time() + timeout
        if self.down_since is not None:
            deadline = min(deadline, self.down_since + timeout)
        while conn is None and self.loop.time() < deadline and not self._closing:
            await asyncio.sleep(0.01)
            conn = self.pick(proto)
        return conn

    # -- dedicated connections -----------------------------------------------------------------
    def take_free(self, proto: int, key: bytes | None = None) -> UpstreamConnection | None:
        """A connected, authenticated dedicated connection at once (a spare), or None."""
        free = self.free[proto]
        conn = None
        while free:
            candidate = free.pop()
            if candidate.up:
                conn = candidate
                break
        self._replenish(proto)
        return conn

    def _replenish(self, proto: int) -> None:
        """Open spare dedicated connections in the background until `spares` are ready, while the
        shared connections are up. A refused connection is tried again with backoff (that is also how
        the pool notices that its credentials work again)."""
        free = self.free[proto]
        if not all(c.up for c in free):
            free[:] = [c for c in free if c.up]     # one that died as it was being added
        missing = self.spares - len(free) - self.warming[proto]
        if missing <= 0 or self._closing or self.down_since is not None:
            return
        self.warming[proto] += missing
        for _ in range(missing):
            self.background.spawn(self._warm(proto), None, "upstream: a spare connection")

    async def _warm(self, proto: int) -> None:
        delay = 0.05
        try:
            while True:
                if self._closing or self.down_since is not None:
                    return      # the shared connections' reconnect refills the spares
                try:
                    conn = await self.connect(proto, dedicated=True)
                    break
                except UpstreamUnavailable:
                    # A connection killed on its way up is tried again soon; refused credentials
                    # back off longer, but not past a shared connection coming up.
                    limit = 5.0 if self.credentials_error is not None else 0.5
                    wake = self._reconnected.wait()
                    try:
                        await asyncio.wait_for(wake, delay * (0.5 + random.random()))
                    except TimeoutError:
                        pass
                    delay = min(delay * 2, limit)
        finally:
            self.warming[proto] -= 1
        if not conn.up:
            self._replenish(proto)      # killed before it could be kept (CLIENT KILL, a restart)
        elif self._closing or len(self.free[proto]) >= self.free_cap:
            conn.close()
        else:
            self.free[proto].append(conn)

    async def get_dedicated(self, proto: int, key: bytes | None = None) -> UpstreamConnection:
        return self.take_free(proto) or await self.connect(proto, dedicated=True)

    def release(self, conn: UpstreamConnection, clean: bool) -> None:
        """Give back a dedicated connection; reuse it only when its state is known to be clean."""
        conn.timeout_exempt = 0
        if (clean and conn.up and not conn.waiters and conn.relay_to is None and conn.db == self.cfg.db
                and len(self.free[conn.proto]) < self.free_cap and not self._closing):
            self.free[conn.proto].append(conn)
        else:
            conn.close()

    def connection_closed(self, conn: UpstreamConnection) -> None:
        self.dedicated.discard(conn)
        free = self.free[conn.proto]
        if conn in free:        # a spare died (Redis restarted, idle timeout, CLIENT KILL): open another
            free.remove(conn)
            self._replenish(conn.proto)

    # -- the proxy's own commands --------------------------------------------------------------
    async def execute(self, *args, proto: int = 2, key: bytes | None = None):
        """Run one command on a shared connection; returns the hiredis-parsed reply. `key` names the
        key that places the command (a cluster pool routes by it; here it is ignored)."""
        conn = self.pick(proto, key)
        if conn is None:
            raise UpstreamUnavailable(self.last_error)
        return parse_reply(await conn.call(*args))

    # -- command timeout -----------------------------------------------------------------------
    async def _watchdog(self) -> None:
        """Abort connections whose head request has waited longer than command_timeout.

        One timestamp per connection (updated when replies arrive) instead of a timer per request.
        """
        timeout = self.cfg.command_timeout
        while True:
            await asyncio.sleep(min(0.25, timeout / 4))
            now = self.loop.time()
            conns = [c for cs in self.shared.values() for c in cs if c is not None]
            conns += list(self.dedicated)
            for conn in conns:
                if (conn.waiters and not conn.timeout_exempt and conn.relay_to is None
                        and now - conn.progress_at > timeout):
                    self.events.timeouts += 1
                    log.warning("upstream: no reply for %.1fs, closing the connection", timeout)
                    conn._fail_all(f"upstream unavailable: no reply within {timeout:g}s", resend=False)
                    conn.close()


async def _command_table(conn: UpstreamConnection) -> CommandTable | None:
    """The upstream's COMMAND reply as a table (None if refused: key positions are then unknown)."""
    reply = parse_reply(await conn.call("COMMAND"))
    if isinstance(reply, Exception) or not isinstance(reply, list):
        log.warning("upstream: COMMAND refused (%s); reserved-key checks look at every argument", reply)
        return None
    return CommandTable(reply)


def _ssl_context(cfg) -> ssl.SSLContext:
    tls = cfg.tls
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
