"""Accept loop, client sessions, limits and graceful shutdown.

One ClientSession per client socket:

    bytes --RequestParser--> frames --dispatch--> shared upstream (raw bytes, one Slot per batch)
                                              |-> local reply (PING, AUTH, HELLO ...)
                                              |-> pinned upstream (MULTI, WATCH, BLPOP, SELECT n)
                                              '-> relay (SUBSCRIBE, MONITOR, CLIENT TRACKING)
    replies: a deque of Slots in request order; a Slot is filled by its upstream reply (or by the
    proxy, or later by the loader) and the head of the deque is written while it is ready.

Flow control: a session stops reading from its client while its unsent replies exceed
limits.client_output_soft, while it has more than limits.max_inflight commands in flight, while its
upstream connection's write buffer is full, and while an asynchronous step (pinning, entering relay
mode) is in progress. A client past limits.client_output_hard is disconnected, as Redis does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque

from ..protocol import commands
from ..protocol.commands import DENY, LOCAL, PASS, PIN, RELAY, ROUTED, TABLE, kind_of
from ..protocol.resp import OK, RequestParser, encode_command, encode_reply, error
from ..upstream.single import UpstreamUnavailable

log = logging.getLogger("cacheproxy.session")

_ids = itertools.count(1)

# A frame the parser could not read: dispatched in order like a command, so the protocol error is
# answered after the replies of the well-formed commands before it.
PROTOCOL_ERROR = object()
_FAIL = 6
_TABLE = dict(TABLE)
_TABLE[PROTOCOL_ERROR] = _FAIL

NOAUTH = error("NOAUTH Authentication required.")
WRONGPASS = error("WRONGPASS invalid username-password pair or user is disabled.")


class Slot:
    """The place of one request (or a batch of `count` pipelined requests) in a session's replies."""

    __slots__ = ("session", "count", "data", "after")

    def __init__(self, session: ClientSession, count: int, after=None):
        self.session = session
        self.count = count
        self.data = None        # the reply bytes once they are known
        self.after = after      # called with (slot, reply) before the reply is queued for writing

    def on_reply(self, data) -> None:
        self.session.fill(self, data)

    def partial(self, data, count: int) -> bool:
        """The first `count` replies of this batch; taken only when they can be written now."""
        return self.after is None and self.session.fill_partial(self, data, count)


class ClientSession(asyncio.Protocol):
    def __init__(self, server):
        self.server = server
        self.pool = server.pool
        limits = server.cfg.limits
        self.parser = RequestParser(limits.max_bulk_len, limits.max_multibulk_len, limits.max_inline_len,
                                    limits.max_query_buffer)
        self.table = server.table
        self.max_inflight = limits.max_inflight
        self.output_hard = limits.client_output_hard
        self.transport: asyncio.Transport | None = None
        self.id = next(_ids)
        self.replies: deque[Slot] = deque()
        self.inflight = 0
        self.proto = 2
        self.conn = None          # the shared upstream connection this client's commands go to
        self.pin = None           # a dedicated upstream connection while state is held
        self.relay = None         # the dedicated connection once this session is a byte relay
        self.authed = not server.auth_required
        self.in_multi = self.watching = self.named = False
        self.blocking = 0
        self.db = server.cfg.upstream.db
        self.paused: set[str] = set()
        self.write_paused = False
        self.hold: asyncio.Task | None = None   # an async step in progress (pinning, relay)
        self.backlog: list | None = None        # frames parsed while `hold` runs
        self.drained: asyncio.Future | None = None
        self.closing = False      # QUIT or a protocol error: close once the replies are written
        self.last_active = server.clock

    # -- connection lifecycle --------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        server = self.server
        if len(server.sessions) >= server.cfg.listen.max_clients:
            transport.write(error("ERR max number of clients reached"))
            transport.close()
            self.transport = None
            return
        server.sessions.add(self)
        server.stats["connections"] += 1
        # No get_extra_info("socket") here: uvloop hands out a dup()ed fd that would keep the
        # connection open after close(). Both loops already set TCP_NODELAY on TCP transports.
        transport.set_write_buffer_limits(high=self.server.cfg.limits.client_output_soft)

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.server.sessions.discard(self)
        self.replies.clear()
        if self.hold is not None:
            self.hold.cancel()
        if self.relay is not None:
            self.relay.relay_to = None
            self.relay.close()
            self.relay = None
        if self.pin is not None:
            self._unpin(clean=not self._holds_state())
        if self.drained is not None and not self.drained.done():
            self.drained.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.relay is not None and self.relay.transport is not None:
            self.relay.transport.pause_reading()
        self.pause("output")

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.relay is not None and self.relay.transport is not None:
            self.relay.transport.resume_reading()
        self.resume("output")

    def pause(self, reason: str) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        """Drop a pause reason; once none is left, frames held back go first, then reading resumes."""
        if reason not in self.paused:
            return
        self.paused.discard(reason)
        if self.paused or self.transport is None:
            return
        if self.backlog is not None and self.hold is None:
            backlog, self.backlog = self.backlog, None
            self._dispatch(backlog, 0)          # may pause again (in-flight cap, a new hold ...)
        if not self.paused and self.transport is not None:
            self.transport.resume_reading()

    # -- requests ----------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        server = self.server
        self.last_active = server.clock
        server.io[0] += len(data)
        if self.relay is not None:
            self.relay.send_raw(data)
            return
        if self.closing:
            return
        self.parser.unauthenticated = not self.authed    # Redis's request limits before AUTH
        frames, raw = self.parser.feed(data)
        if self.parser.error is not None:
            frames.append([PROTOCOL_ERROR, self.parser.error])
            raw = None
        if not frames:
            return
        if self.backlog is not None:            # earlier frames still wait: keep the order
            self.backlog.extend(frames)
            return
        if raw is not None and self.authed and self.pin is None and \
                self.inflight + len(frames) <= self.max_inflight:
            # Fast path: every command passes through, so the client's bytes go upstream untouched.
            table = self.table
            for args in frames:
                kind = table.get(args[0])
                if kind is None:
                    kind = table.get(args[0].upper(), PASS)
                if kind:
                    if kind == ROUTED and not self.server.readthrough.owns(args[0].upper(), args):
                        continue
                    break
            else:
                server.commands[PASS] += len(frames)
                self.send_shared(raw, len(frames))
                return
        self._dispatch(frames, 0)
        if self.parser.deferred and self.backlog is None:
            self.data_received(b"")     # requests held back until an AUTH among `frames` had run

    def _dispatch(self, frames: list, i: int) -> None:
        run: list[bytes] = []       # consecutive pass-through commands, sent as one batch
        n = len(frames)
        table = self.table
        while i < n and self.hold is None and not self.closing:
            if self.inflight + len(run) >= self.max_inflight:
                self.pause("inflight")          # the rest waits until replies come back
                break
            args = frames[i]
            kind = table.get(args[0])
            if kind is None:
                kind = kind_of(table, args[0])
            if kind == ROUTED and not self.server.readthrough.owns(args[0].upper(), args):
                kind = PASS
            if kind == PASS and self.pin is None and self.authed:
                run.append(encode_command(args))
                i += 1
                continue
            if run:
                self.server.commands[PASS] += len(run)
                self.send_shared(b"".join(run), len(run))
                run = []
            self.server.commands[kind] += 1
            i = self._command(frames, i, kind)
        if run:
            self.server.commands[PASS] += len(run)
            self.send_shared(b"".join(run), len(run))
        if i < n and not self.closing:
            self.backlog = frames[i:]

    def _command(self, frames: list, i: int, kind: int) -> int:
        """Handle frames[i]; returns the index of the next frame to dispatch."""
        args = frames[i]
        if kind == _FAIL:
            self.server.stats["protocol_errors"] += 1
            self.reply(error(f"ERR Protocol error: {args[1]}"))
            self.closing = True
            self._close_if_done()
            return len(frames)
        name = args[0].upper()
        if not self.authed and name not in (b"AUTH", b"HELLO", b"QUIT"):
            self.reply(NOAUTH)
            return i + 1
        if kind == DENY:
            self.reply(error(f"ERR command '{name.decode(errors='replace')}' is not supported by cacheproxy"))
            return i + 1
        if self.pin is not None:
            if self.pin.up:
                return self._pinned(frames, i, name, kind)
            self._pin_lost()
        if kind == LOCAL:
            return self._local(frames, i, name)
        if kind == RELAY:
            return self._start_relay(frames, i)
        if kind == ROUTED:
            return self.server.readthrough.handle(self, frames, i)
        if kind == PIN:
            if name == b"MULTI":
                end = _transaction_end(frames, i, self.table)
                if end is not None:
                    # The whole transaction arrived at once: written contiguously, it needs no pin.
                    block = frames[i:end]
                    self.send_shared(b"".join(map(encode_command, block)), len(block))
                    return end
            elif name != b"WATCH" and not commands.is_blocking(name, args):
                self.send_shared(encode_command(args), 1)
                return i + 1
            return self._start_pin(frames, i)
        # PASS before authentication (answered above) or a kind added by later modules.
        self.send_shared(encode_command(args), 1)
        return i + 1

    # -- shared connections ------------------------------------------------------------------------
    def send_shared(self, data: bytes, count: int, after=None) -> None:
        conn = self.conn
        if conn is None or not conn.up:
            conn = self.conn = self.pool.pick(self.proto)
            if conn is None:
                self.reply(error(f"ERR upstream unavailable: {self.pool.last_error}") * count)
                return
        slot = Slot(self, count, after)
        self.replies.append(slot)
        self.inflight += count
        conn.send(data, slot)
        if self.inflight > self.max_inflight:
            self.pause("inflight")
        if conn.write_paused:
            conn.blocked_sessions.add(self)
            self.pause("upstream")

    def new_slot(self, count: int) -> Slot:
        """A place in the reply order for a reply someone else will deliver through fill()."""
        slot = Slot(self, count)
        self.replies.append(slot)
        self.inflight += count
        return slot

    def reply(self, data: bytes) -> None:
        """A reply the proxy knows now: written at once unless earlier replies are still pending."""
        if self.transport is None:
            return
        if not self.replies:
            self.server.io[1] += len(data)
            self.transport.write(data)
        else:
            slot = Slot(self, 0)
            slot.data = data
            self.replies.append(slot)

    def fill(self, slot: Slot, data) -> None:
        """An upstream (or loader) reply for `slot` arrived: write every reply that is now in order."""
        self.inflight -= slot.count
        if slot.after is not None:
            data = slot.after(slot, data)
        transport = self.transport
        if transport is None:
            return
        replies = self.replies
        if replies and replies[0] is slot:
            replies.popleft()
            if replies and replies[0].data is not None:
                out = [data]
                while replies and replies[0].data is not None:
                    out.append(replies.popleft().data)
                data = b"".join(out)
            self.server.io[1] += len(data)
            transport.write(data)
            if self.write_paused:
                self._check_output(transport)
                if self.transport is None:
                    return
        else:
            slot.data = data
        if self.paused and "inflight" in self.paused and self.inflight <= self.max_inflight // 2:
            self.resume("inflight")
        if not replies:
            if self.drained is not None and not self.drained.done():
                self.drained.set_result(None)
            if self.closing:
                self._close_if_done()

    def fill_partial(self, slot: Slot, data, count: int) -> bool:
        transport = self.transport
        if transport is None or not self.replies or self.replies[0] is not slot:
            return False
        self.inflight -= count
        self.server.io[1] += len(data)
        transport.write(data)
        self._check_output(transport)
        return True

    def _check_output(self, transport) -> None:
        if self.write_paused and self.output_hard and transport.get_write_buffer_size() > self.output_hard:
            log.warning("client %d: output buffer over %d bytes, disconnecting", self.id, self.output_hard)
            self.server.stats["output_limit_disconnects"] += 1
            transport.abort()

    def _close_if_done(self) -> None:
        if self.closing and not self.replies and self.transport is not None:
            self.transport.close()

    async def _wait_drained(self) -> None:
        """Wait until every earlier reply has been written (before switching connections)."""
        while self.replies:
            self.drained = asyncio.get_running_loop().create_future()
            await self.drained
        self.drained = None

    # -- async steps: pinning and relaying ---------------------------------------------------------
    def _run_hold(self, frames: list, i: int, step) -> int:
        """Stop reading, run `step` (a coroutine function), then continue with the frames from i."""
        self.backlog = frames[i:]
        self.pause("hold")
        self.hold = asyncio.get_running_loop().create_task(self._hold(step))
        return len(frames)

    async def _hold(self, step) -> None:
        try:
            await step()
        except asyncio.CancelledError:
            return
        except Exception:  # a bug in a step must not leave the client hanging
            log.exception("client %d: internal error", self.id)
            self.reply(error("ERR internal proxy error"))
            self.closing = True
            self._close_if_done()
        self.hold = None
        self.resume("hold")     # continues with the frames that waited for this step

    def _start_pin(self, frames: list, i: int) -> int:
        if not self.replies:
            conn = self.pool.take_free(self.proto)
            if conn is not None:
                self.pin = conn
                return self._pinned(frames, i, frames[i][0].upper(), kind_of(self.table, frames[i][0]))

        async def acquire():
            await self._wait_drained()
            try:
                self.pin = await self.pool.get_dedicated(self.proto)
                # frames[i] is dispatched (and counted) again from the backlog: count it once.
                self.server.commands[kind_of(self.table, frames[i][0])] -= 1
            except UpstreamUnavailable as exc:
                # Answer the command that needed the pin; the rest proceed as usual.
                self.reply(error(f"ERR upstream unavailable: {exc}"))
                del self.backlog[0]
        return self._run_hold(frames, i, acquire)

    def _holds_state(self) -> bool:
        return (self.in_multi or self.watching or self.named or self.blocking > 0
                or self.db != self.server.cfg.upstream.db)

    def _pin_lost(self) -> None:
        """The dedicated connection died: its state (transaction, watches, db, name) is gone too."""
        self._unpin(clean=False)
        self.in_multi = self.watching = self.named = False
        self.blocking = 0
        self.db = self.server.cfg.upstream.db

    def _unpin(self, clean: bool) -> None:
        conn, self.pin = self.pin, None
        if conn is not None:
            self.pool.release(conn, clean)

    def _pinned(self, frames: list, i: int, name: bytes, kind: int) -> int:
        """While pinned, everything goes to the dedicated connection but proxy-local session commands."""
        args = frames[i]
        if name in (b"AUTH", b"QUIT", b"HELLO"):
            return self._local(frames, i, name)
        if name == b"CLIENT" and len(args) > 1 and args[1].upper() in (b"SETINFO", b"ID"):
            return self._local(frames, i, name)
        if kind == RELAY or (name == b"CLIENT" and _starts_relay(args)):
            return self._start_relay(frames, i)
        after = self._after_pinned
        if name == b"MULTI":
            self.in_multi = True
        elif name in (b"EXEC", b"DISCARD"):
            self.in_multi = self.watching = False
        elif name == b"WATCH" and not self.in_multi:
            self.watching = True
        elif name == b"UNWATCH" and not self.in_multi:
            self.watching = False
        elif name == b"CLIENT" and len(args) > 2 and args[1].upper() == b"SETNAME":
            self.named = True
        elif name == b"SELECT" and not self.in_multi:
            after = _after_select(self, args)
        elif name == b"RESET":
            after = self._after_reset
        elif not self.in_multi and commands.is_blocking(name, args):
            self.blocking += 1
            self.pin.timeout_exempt += 1
            after = self._after_blocking
        slot = Slot(self, 1, after)
        self.replies.append(slot)
        self.inflight += 1
        self.pin.send(encode_command(args), slot)
        return i + 1

    def _after_pinned(self, slot: Slot, data):
        if self.pin is not None and not self.pin.waiters and not self._holds_state():
            self._unpin(clean=True)
        return data

    def _after_blocking(self, slot: Slot, data):
        self.blocking -= 1
        if self.pin is not None:
            self.pin.timeout_exempt -= 1
        return self._after_pinned(slot, data)

    def _after_reset(self, slot: Slot, data):
        self._reset_state()
        return self._after_pinned(slot, data)

    def _reset_state(self) -> None:
        self.in_multi = self.watching = self.named = False
        self.db = self.server.cfg.upstream.db
        self.proto = 2
        self.conn = None
        self.authed = not self.server.auth_required

    def _start_relay(self, frames: list, i: int) -> int:
        """Turn this session into a byte relay on a dedicated connection, from frames[i] on."""
        async def enter():
            await self._wait_drained()
            conn = self.pin
            self.pin = None
            if conn is None:
                try:
                    conn = await self._dedicated(self.backlog[0])
                except UpstreamUnavailable as exc:
                    self.reply(error(f"ERR upstream unavailable: {exc}"))
                    del self.backlog[0]
                    return
            conn.relay_to = self
            conn.timeout_exempt += 1
            self.relay = conn
            self.server.stats["relays"] += 1
            backlog, self.backlog = self.backlog, None
            frames = []
            for args in backlog:
                if args[0] is PROTOCOL_ERROR:   # relay what came before it, then drop the client
                    self.closing = True
                    break
                frames.append(encode_command(args))
            conn.send_raw(b"".join(frames) + (b"" if self.closing else self.parser.pending()))
        return self._run_hold(frames, i, enter)

    async def _dedicated(self, args: list[bytes]):
        """The connection a relay starts on (a cluster session picks the node by the command)."""
        return await self.pool.get_dedicated(self.proto)

    def relay_data(self, data: bytes) -> None:
        if self.transport is not None:
            self.server.io[1] += len(data)
            self.transport.write(data)

    def relay_lost(self) -> None:
        """The relayed upstream connection closed (QUIT, upstream restart): so does the client."""
        self.relay = None
        if self.transport is not None:
            self.transport.close()

    # -- proxy-local commands ----------------------------------------------------------------------
    def _local(self, frames: list, i: int, name: bytes) -> int:
        args = frames[i]
        problem = commands.arity_error(name, args)
        if problem:
            self.reply(error(problem))
            return i + 1
        if name == b"PING":
            self.reply(b"+PONG\r\n" if len(args) == 1 else encode_reply(args[1]))
        elif name == b"ECHO":
            self.reply(encode_reply(args[1]))
        elif name == b"QUIT":
            self.reply(OK)
            self.closing = True
            self._close_if_done()
            return len(frames)
        elif name == b"AUTH":
            self.reply(self._auth(args[1:]))
        elif name == b"HELLO":
            self.reply(self._hello(args))
        elif name == b"RESET":
            self._reset_state()
            self.reply(b"+RESET\r\n")
        elif name == b"SELECT":
            return self._select(frames, i)
        elif name == b"CLIENT":
            return self._client(frames, i)
        return i + 1

    def _auth(self, creds: list[bytes]) -> bytes:
        server = self.server
        if not server.auth_required:
            return error("ERR AUTH <password> called without any password configured for the default "
                         "user. Are you sure your configuration is correct?")
        if server.check_password(creds):
            self.authed = True
            return OK
        self.server.stats["auth_failures"] += 1
        return WRONGPASS

    def _hello(self, args: list[bytes]) -> bytes:
        proto = self.proto
        rest = args[1:]
        if rest:
            try:
                proto = int(rest[0])
            except ValueError:
                return error("ERR Protocol version is not an integer or out of range")
            if proto not in (2, 3):
                return error("NOPROTO unsupported protocol version")
            rest = rest[1:]
        authed = self.authed
        while rest:
            option = rest[0].upper()
            if option == b"AUTH" and len(rest) >= 3:
                if not self.server.auth_required or not self.server.check_password(rest[1:3]):
                    self.server.stats["auth_failures"] += 1
                    return WRONGPASS
                authed = True
                rest = rest[3:]
            elif option == b"SETNAME" and len(rest) >= 2:
                rest = rest[2:]   # accepted; the name stays with the proxy session
            else:
                return error(f"ERR Syntax error in HELLO option '{rest[0].decode(errors='replace')}'")
        if not authed:
            return error("NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                         "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
                         "select the RESP protocol version at the same time")
        if self.pin is not None and proto != self.proto:
            return error("ERR cacheproxy cannot change the protocol inside a transaction or while "
                         "the connection holds state")
        self.authed = True
        if proto != self.proto:
            self.proto = proto
            self.conn = None
        info = {"server": "redis", "version": self.pool.server_version, "proto": proto, "id": self.id,
                "mode": "standalone", "role": "master", "modules": []}
        return encode_reply(info, proto)

    def _select(self, frames: list, i: int) -> int:
        try:
            db = int(frames[i][1])
        except ValueError:
            self.reply(error("ERR value is not an integer or out of range"))
            return i + 1
        if db == self.db:
            self.reply(OK)
            return i + 1
        return self._start_pin(frames, i)

    def _client(self, frames: list, i: int) -> int:
        args = frames[i]
        sub = args[1].upper()
        if sub == b"SETINFO":
            self.reply(OK)   # redis-py sends it on connect; library names are per proxy client
        elif sub == b"ID":
            self.reply(b":%d\r\n" % self.id)
        elif sub == b"GETNAME":
            self.reply(encode_reply(None, self.proto))
        elif sub == b"SETNAME":
            return self._start_pin(frames, i)
        elif _starts_relay(args):
            return self._start_relay(frames, i)
        elif sub in (b"TRACKING", b"REPLY"):
            self.reply(OK)   # TRACKING off / REPLY on: already the case
        else:
            self.send_shared(encode_command(args), 1)
        return i + 1


def _starts_relay(args: list[bytes]) -> bool:
    """CLIENT TRACKING on and CLIENT REPLY off/skip: replies stop pairing with requests."""
    if len(args) < 3:
        return False
    sub, mode = args[1].upper(), args[2].upper()
    return (sub == b"TRACKING" and mode == b"ON") or (sub == b"REPLY" and mode in (b"OFF", b"SKIP"))


def _transaction_end(frames: list, i: int, table) -> int | None:
    """If frames[i] is MULTI and its EXEC/DISCARD is in the same batch, with only plain commands in
    between (nothing that changes the connection: SELECT, SUBSCRIBE, HELLO ...), return the index after it."""
    for j in range(i + 1, len(frames)):
        args = frames[j]
        if args[0] is PROTOCOL_ERROR:
            return None
        name = args[0].upper()
        if name in (b"EXEC", b"DISCARD"):
            return j + 1
        if kind_of(table, args[0]) != PASS and name not in (b"PING", b"ECHO"):
            return None
    return None


def _after_select(session: ClientSession, args: list[bytes]):
    db = int(args[1])

    def after(slot: Slot, data):
        if data == OK:
            session.db = db
        return session._after_pinned(slot, data)
    return after
