"""Upstream Redis connections: multiplexed, pipelined, batched per event-loop turn.

    session --send(bytes, waiter)--> UpstreamConnection.out --(one write per loop turn)--> Redis
    Redis --bytes--> data_received --scan_replies--> waiter.on_reply(raw bytes of its replies)

Redis answers in order on one connection, so each connection keeps a FIFO of waiters; a waiter
stands for `count` consecutive replies (a whole pipeline from one client is one waiter). Requests of
all clients queued during one loop turn leave in a single socket write: per-request system calls,
not Python code, are what a proxy pays for.

The pool keeps `pool_size` shared connections per RESP version (a connection's protocol decides the
shape of its replies, so RESP2 and RESP3 clients never share one), reconnects them in the background
with backoff, and hands out dedicated connections for clients that carry connection state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections import deque

from ..protocol.resp import encode_command, error, parse_reply, scan_replies

log = logging.getLogger("cacheproxy.upstream")

# An incomplete batch whose received part passes this many bytes is delivered reply by reply.
STREAM_THRESHOLD = 256 * 1024


class UpstreamUnavailable(Exception):
    """No usable connection to the upstream Redis; the text says why (never a secret)."""


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
        self.waiters: deque = deque()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.buf = bytearray()
        self.start = 0          # where the head waiter's replies begin in buf
        self.cursor = 0         # where scanning resumes in buf
        self.left = 0           # replies the head waiter still misses (0: head not started)
        self.relay_to = None    # a session that receives every byte as it arrives (pub/sub...)
        self.progress_at = 0.0  # last time this connection sent a reply or went from idle to busy
        self.timeout_exempt = 0  # blocking commands in flight: the command timeout does not apply
        self.write_paused = False
        self.blocked_sessions: set = set()
        self.closed: asyncio.Future = self.loop.create_future()
        self.db = 0

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
        if self.buf:
            self.buf += data
            buf = self.buf
        else:
            buf = data
        waiters = self.waiters
        start, cursor, left = self.start, self.cursor, self.left
        size = len(buf)
        while waiters:
            waiter = waiters[0]
            if not left:
                left = waiter.count
            cursor, left = scan_replies(buf, cursor, left)
            if left:
                if cursor - start > STREAM_THRESHOLD and waiter.count > 1:
                    start = self._stream(waiter, buf, start)
                break
            waiters.popleft()
            # Hand out bytes (one copy), never the reusable bytearray itself.
            waiter.on_reply(data if buf is data and start == 0 and cursor == size
                            else bytes(memoryview(buf)[start:cursor]))
            start = cursor
        self.left = left
        if start >= size:
            if buf is not data:
                self.buf = bytearray()
            self.start = self.cursor = 0
        elif not waiters:
            # Bytes nobody asked for (e.g. an unexpected push): the stream can no longer be trusted.
            log.warning("unexpected data from upstream on a shared connection; closing it")
            self.buf = bytearray()
            self.start = self.cursor = 0
            self.close()
        else:
            if buf is data:
                self.buf = bytearray(data[start:])
            elif start:
                del self.buf[:start]
            self.start = 0
            self.cursor = cursor - start

    def _stream(self, waiter, buf, start: int) -> int:
        """A big batch is still incomplete: hand its complete replies over now, so a pipeline of
        large values is not held in memory whole. Returns where the undelivered part starts."""
        end, done = start, 0
        while done < waiter.count - 1:
            pos, left = scan_replies(buf, end, 1)
            if left:
                break
            end, done = pos, done + 1
        if done and waiter.partial(bytes(memoryview(buf)[start:end]), done):
            waiter.count -= done
            return end
        return start

    # -- sending -------------------------------------------------------------------------------
    def send(self, data: bytes, waiter) -> None:
        """Queue a request (one or more commands) and the waiter for its replies.

        An idle connection writes at once: there is nothing to batch with, and waiting a loop turn
        only adds latency. A busy one batches everything queued during this loop turn into one write.
        """
        waiters = self.waiters
        if not waiters:
            self.progress_at = self.loop.time()
            if not self.out and self.transport is not None:
                waiters.append(waiter)
                self.transport.write(data)
                return
        waiters.append(waiter)
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def send_raw(self, data: bytes) -> None:
        """Relay mode: bytes with no waiter (replies go straight to the relayed session)."""
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

    async def call_direct(self, *args) -> bytes:
        """call() on this very connection: the same here (a cluster node's call() routes by key)."""
        return await UpstreamConnection.call(self, *args)

    def _fail_all(self, message: str) -> None:
        reply = error("ERR " + message)
        waiters, self.waiters = self.waiters, deque()
        self.out = []
        self.buf = bytearray()
        self.start = self.cursor = self.left = 0
        for waiter in waiters:
            if isinstance(waiter, FutureWaiter):
                waiter.on_error(message)
            else:
                waiter.on_reply(reply * waiter.count)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    connection_class = UpstreamConnection
    def __init__(self, cfg, loop: asyncio.AbstractEventLoop | None = None):
        self.cfg = cfg   # the `upstream` config section
        self.loop = loop or asyncio.get_running_loop()
        self.host, self.port = cfg.host, cfg.port   # a cluster node pool sets its own
        self.shared: dict[int, list[UpstreamConnection | None]] = {2: [], 3: []}
        self.free: dict[int, list[UpstreamConnection]] = {2: [], 3: []}
        self.dedicated: set[UpstreamConnection] = set()
        self.free_cap = max(4, cfg.pool_size)
        self.last_error = "not connected yet"
        self.server_version = "7.0.0"
        self._rr = 0
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.ssl_context = _ssl_context(cfg) if cfg.use_tls else None
        self.stats = {"connects": 0, "connect_errors": 0, "timeouts": 0}

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
            self.shared[proto][index] = conn
            await conn.closed
            self.shared[proto][index] = None

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
        conn.up = True
        self.stats["connects"] += 1
        if dedicated:
            self.dedicated.add(conn)
        return conn

    def _connect_failed(self, exc: BaseException) -> None:
        self.stats["connect_errors"] += 1
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError):
            reason = "timed out"
        message = f"cannot reach {self.host}:{self.port}: {reason}"
        if message != self.last_error:
            log.warning("upstream: %s", message)
        self.last_error = message

    async def _handshake(self, conn: UpstreamConnection, proto: int) -> None:
        cfg = self.cfg
        hello = ["HELLO", str(proto)]
        if cfg.password is not None:
            hello += ["AUTH", cfg.username or "default", cfg.password]
        reply = parse_reply(await conn.call(*hello))
        if isinstance(reply, Exception):
            raise UpstreamUnavailable(f"HELLO refused: {str(reply).split(chr(10))[0]}")
        info = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=False))
        version = info.get(b"version")
        if version:
            self.server_version = version.decode()
        if cfg.db:
            reply = parse_reply(await conn.call("SELECT", str(cfg.db)))
            if isinstance(reply, Exception):
                raise UpstreamUnavailable(f"SELECT {cfg.db} refused: {reply}")
        conn.db = cfg.db

    # -- dedicated connections -----------------------------------------------------------------
    def take_free(self, proto: int) -> UpstreamConnection | None:
        free = self.free[proto]
        while free:
            conn = free.pop()
            if conn.up:
                return conn
        return None

    async def get_dedicated(self, proto: int) -> UpstreamConnection:
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
                    self.stats["timeouts"] += 1
                    log.warning("upstream: no reply for %.1fs, closing the connection", timeout)
                    conn._fail_all(f"upstream unavailable: no reply within {timeout:g}s")
                    conn.close()


def _ssl_context(cfg) -> ssl.SSLContext:
    tls = cfg.tls
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
