"""One client connection: pipelining, reply order, connection state, flow control.

    bytes --RequestParser--> frames --dispatch--> the node's shared connection (raw bytes, one Slot per run)
                                              |-> slow path: the pool runs it (split, fan-out, no connection yet)
                                              |-> local reply (PING, AUTH, HELLO, CLIENT, UNSUBSCRIBE ...)
                                              |-> MULTI ... EXEC queued here, sent as one block
                                              |-> pinned: a dedicated connection (WATCH, blocking, SELECT n)
                                              |-> relay: a dedicated connection as a byte pipe (pub/sub, MONITOR)
                                              '-> routed: the read-through / write path (cache/, writebehind/)
    replies: a ReplyOrder of Slots (replies.py); the head run is written as soon as it is ready.

Single node and cluster differ only in the pool (upstream/): `pool.node_for(args)` says which node's
connection a command takes (None: the pool's slow path decides), the pool's command table gives key
positions, and `pool.refusal(args)` names what one mode cannot do. The session keeps one shared
connection per node, so a client's commands to a node stay in order.

Rules of this module:
- Every request gets exactly one reply slot, in order; a command that is answered later (a miss, a
  routed write, the slow path) holds only its own slot, or, when later commands must see its effect,
  holds the client's later commands until it is done (a "step").
- Nothing on a shared connection may change that connection's state or its reply count: such commands
  are answered here, pinned to a dedicated connection, relayed, or refused (commands.py says which).
- Keys in the proxy's reserved namespace (cache/keys.py) are refused in every key position, also in
  relay mode.
- A shared connection that dies before answering: its read-only commands (and any that never left)
  are sent again on a live connection to the same node after the reconnect, before the client's later
  commands (upstream_lost; the rule is upstream/resend.py); a write that may have run gets the error.
- Entering a relay or a pin with nothing pending and a spare connection ready happens at once, in the
  loop turn the command arrived in (no task), so it reaches Redis before anything sent after it.
- Flow control: reading stops while unsent replies exceed limits.client_output_soft, while more than
  limits.max_inflight replies are missing, while the upstream connection's write buffer is full, and
  while a step runs; every pause reason has its resume. A client past limits.client_output_hard is
  disconnected, as Redis does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from ..cache.keys import reserved_in
from ..protocol import errors
from ..protocol.commands import (
    DENY,
    FAIL,
    FLUSH,
    LISTKEYS,
    LOCAL,
    PASS,
    PIN,
    RELAY,
    ROUTED,
    TX,
    is_blocking,
    kind_of,
)
from ..protocol.request import RequestParser
from ..protocol.resp import OK, encode_command
from ..upstream.base import Connection, Node, Pool
from ..upstream.resend import MAX_RESENDS, RESEND_MAX_BYTES, resendable
from ..upstream.single import UpstreamUnavailable
from . import local, transaction
from .monitor import Monitoring
from .replies import ReplyOrder, Slot

log = logging.getLogger("cacheproxy.session")

_ids = itertools.count(1)

# A frame the parser could not read: dispatched in order like a command, so the protocol error is
# answered after the replies of the well-formed commands before it.
PROTOCOL_ERROR: Any = object()


class Session(asyncio.Protocol):
    def __init__(self, host: Any):
        """`host` is the ProxyServer: cfg, pool, table, readthrough, sessions, stats, clock, auth."""
        self.host = host
        self.pool: Pool = host.pool
        limits = host.cfg.limits
        self.parser = RequestParser(limits.max_bulk_len, limits.max_multibulk_len, limits.max_inline_len,
                                    limits.max_query_buffer)
        self.table = host.table
        self.max_inflight = limits.max_inflight
        self.output_hard = limits.client_output_hard
        self.transport: asyncio.Transport | None = None
        self.id = next(_ids)
        self.name: bytes | None = None
        self.order = ReplyOrder()
        self.proto = 2
        self.conns: dict[Node, Connection] = {}   # node -> this client's shared connection to it
        self.pin: Connection | None = None     # a dedicated upstream connection while state is held
        self.relay: Connection | None = None   # the dedicated connection once this session is a byte relay
        self.authed = not host.auth_required
        self.user = b"default"
        self.watching = False
        self.watch_slot: int | None = None
        self.tx: transaction.Transaction | None = None
        self.blocking = 0
        self.db = host.cfg.upstream.db
        self.paused: set[str] = set()
        self.write_paused = False
        self.hold: asyncio.Task | None = None   # a step in progress: later frames wait in `backlog`
        self.backlog: list | None = None
        self.turn: asyncio.Future | None = None    # resolved when replies are written (wait_turn)
        self.closing = False      # QUIT or a protocol error: close once the replies are written
        self.last_active = self.connected_at = host.clock
        self.buffered = 0         # bytes of an unfinished request the parser holds (host.query_buffered)
        self.partial_since: float | None = None   # when the unfinished request began (limits.request_timeout)
        self.suspicious = False   # the last request's bytes contain a reserved prefix (guard.py)
        self.last_command: list | None = None   # the last command read (CLIENT LIST shows its name)
        self.monitoring: Monitoring | None = None     # MONITOR sent on the relay (monitor.py)
        self.lost: list[tuple[Slot, Any, int]] = []   # (slot, node, proto) to send again (upstream_lost)
        self.resending = False    # a task is sending `lost` again; reading waits for it

    # -- connection lifecycle --------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        host = self.host
        if len(host.sessions) >= host.cfg.listen.max_clients:
            transport.write(errors.MAX_CLIENTS)
            transport.close()
            self.transport = None
            return
        host.sessions.add(self)
        host.stats.clients.connections += 1
        # No get_extra_info("socket") here: uvloop hands out a dup()ed fd that would keep the
        # connection open after close(). Both loops already set TCP_NODELAY on TCP transports.
        transport.set_write_buffer_limits(high=host.cfg.limits.client_output_soft)

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.host.query_buffered -= self.buffered
        self.buffered = 0
        self.host.sessions.discard(self)
        self.order.clear()
        self.backlog = None
        if self.hold is not None:
            self.hold.cancel()
        if self.relay is not None:
            self.relay.relay_to = None
            self.relay.close()
            self.relay = None
        self._stop_monitoring()
        if self.pin is not None:
            self._unpin(clean=not self._holds_state())
        if self.turn is not None and not self.turn.done():
            self.turn.cancel()

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
            self._dispatch(backlog, 0)          # may pause again (in-flight cap, a new step ...)
            if self.parser.deferred and self.backlog is None and not self.paused:
                self.data_received(b"")         # requests held back until an AUTH had run
        if not self.paused and self.transport is not None:
            self.transport.resume_reading()

    # -- requests ----------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        host = self.host
        self.last_active = host.clock
        host.stats.bytes.received += len(data)
        if self.relay is not None:
            self._relay_in(data)
            return
        if self.closing:
            return
        self.parser.unauthenticated = not self.authed    # Redis's request limits before AUTH
        frames, raw = self.parser.feed(data)
        self._account(data)
        if self.parser.error is not None:
            frames.append(_failed(self.parser.error))
            raw = None
        if not frames:
            return
        self.last_command = frames[-1]      # CLIENT LIST's cmd= (one store per read)
        # Deferred requests (data == b"") came in an earlier read: check them all.
        self.suspicious = reserved_in(data, host.guard.prefixes) if data else True
        if self.backlog is not None:            # earlier frames still wait: keep the order
            self.backlog.extend(frames)
            return
        if raw is not None and self.authed and self.pin is None and self.tx is None \
                and not self.suspicious and self.order.inflight + len(frames) <= self.max_inflight:
            # Fast path: every command passes through to one node: the client's bytes go as they came.
            conn = self._fast_conn(frames)
            if conn is not None:
                host.stats.commands[PASS] += len(frames)
                self._send(conn, raw, len(frames))
                return
        self._dispatch(frames, 0)
        if self.parser.deferred and self.backlog is None:
            self.data_received(b"")     # requests held back until an AUTH among `frames` had run

    def _account(self, data: bytes) -> None:
        """Unfinished requests: the proxy-wide byte total, and the time the current one began."""
        held = self.parser.buffered
        self.host.query_buffered += held - self.buffered
        self.buffered = held
        if self.parser.partial:
            if self.partial_since is None:
                self.partial_since = self.host.clock
        else:
            self.partial_since = None
        limit = self.host.cfg.limits.max_query_buffer_total
        if limit and self.host.query_buffered > limit:
            self.host.over_query_budget()

    def drop(self, reply: bytes, event: str) -> None:
        """Answer `reply` and close at once (a limit was passed): pending replies are not awaited."""
        setattr(self.host.stats.clients, event, getattr(self.host.stats.clients, event) + 1)
        if self.transport is not None:
            self._write(reply)
            self.transport.close()

    def _fast_conn(self, frames: list):
        """The one shared connection all of `frames` go to as plain pass-through, or None."""
        table, pool = self.table, self.pool
        node = None
        for args in frames:
            kind = table.get(args[0])
            if kind is None:
                kind = table.get(args[0].upper(), PASS)
            if kind:
                if kind != ROUTED or self.host.readthrough.owns(args[0].upper(), args):
                    return None
            target = pool.node_for(args)
            if target is None or (node is not None and target is not node):
                return None
            node = target
        return self._conn(node)

    def _dispatch(self, frames: list, i: int) -> None:
        run: list = []          # consecutive pass-through commands for `run_conn`, sent as one write
        run_conn = None
        n = len(frames)
        table = self.table
        counts = self.host.stats.commands
        while i < n and self.hold is None and not self.closing:
            if self.order.inflight + len(run) >= self.max_inflight:
                if run:
                    self._send_run(run_conn, run)
                    run = []
                if self.order.inflight >= self.max_inflight:
                    self.pause("inflight")      # the rest waits until replies come back
                    break
            args = frames[i]
            kind = table.get(args[0])
            if kind is None:
                kind = FAIL if args[0] is PROTOCOL_ERROR else kind_of(table, args[0])
            if kind == ROUTED and not self.host.readthrough.owns(args[0].upper(), args):
                kind = PASS
            if kind == PASS and self.pin is None and self.tx is None and self.authed \
                    and not (self.suspicious and self.host.guard.refuses(args)):
                conn = self._conn_for(args)
                if conn is not None:
                    if run and conn is not run_conn:
                        self._send_run(run_conn, run)
                        run = []
                    run_conn = conn
                    run.append(args)
                    i += 1
                    continue
            if run:
                self._send_run(run_conn, run)
                run = []
            counts[kind] += 1
            i = self._command(frames, i, kind)
        if run:
            self._send_run(run_conn, run)
        if i < n and not self.closing:
            self.backlog = frames[i:]

    def _command(self, frames: list, i: int, kind: int) -> int:
        """Handle frames[i]; returns the index of the next frame to dispatch."""
        args = frames[i]
        if kind == FAIL:
            self.host.stats.clients.protocol_errors += 1
            self.reply(errors.protocol_error(args[1]))
            self.closing = True
            self._close_if_done()
            return len(frames)
        name = args[0].upper()
        if not self.authed and name not in (b"AUTH", b"HELLO", b"QUIT", b"RESET"):
            self.reply(errors.NOAUTH)
            return i + 1
        if kind == DENY:
            self.reply(errors.not_supported(name))
            return i + 1
        if self.suspicious and self.host.guard.refuses(args):
            self.host.stats.clients.reserved_refusals += 1
            self.reply(self.host.guard.refusal)
            if self.tx is not None:
                self.tx.failed = True
            return i + 1
        if self.tx is not None:
            return transaction.queue(self, frames, i, name, kind)
        if kind == TX:
            return transaction.start(self, frames, i, name)
        if self.pin is not None:
            if self.pin.up:
                return self._pinned(frames, i, name, kind)
            self._pin_lost()
        problem = self.pool.refusal(name, args)
        if problem is not None:
            self.reply(problem)
            return i + 1
        if kind == LOCAL:
            return local.run(self, frames, i, name)
        if kind == RELAY:
            return self._start_relay(frames, i)
        if kind == ROUTED:
            return self.host.readthrough.handle(self, frames, i)
        if kind == PIN:
            if not is_blocking(name, args):
                self.send_commands([args])     # XREAD without BLOCK: a plain command
                return i + 1
            return self._start_pin(frames, i)
        if kind == FLUSH:
            if name == b"SWAPDB":
                problem = self.host.guard.swapdb_refusal(args)
                if problem is None:
                    self.send_commands([args])
                else:
                    self.reply(problem)
                return i + 1
            slot = self.new_slot(1)
            return self.step(frames, i, lambda: self._flush(slot, args), slot)
        if kind == LISTKEYS:
            self.send_commands([args], after=self.host.guard.listing_filter(name))
            return i + 1
        # PASS that could not take the fast lane: before authentication (answered above), or the
        # slow path (no connection yet, several nodes, fan-out).
        self.send_commands([args])
        return i + 1

    # -- shared connections --------------------------------------------------------------------------
    def _conn(self, node):
        """This client's shared connection to `node` (the same one while it is up: order per node)."""
        conn = self.conns.get(node)
        if conn is None or not conn.up or conn.proto != self.proto:
            conn = node.pick(self.proto)
            if conn is None:
                return None
            self.conns[node] = conn
        return conn

    def _conn_for(self, args: list[bytes]):
        node = self.pool.node_for(args)
        return None if node is None else self._conn(node)

    def conn_for_key(self, key: bytes):
        """The shared connection a command on `key` takes (routed reads use it, so they stay in order
        with the client's other commands on that node); None when there is none right now."""
        node = self.pool.node_for_key(key)
        return None if node is None else self._conn(node)

    def _send(self, conn, data: bytes, count: int, after=None) -> Slot:
        slot = self.order.add(self, count, after)
        if len(data) <= RESEND_MAX_BYTES:
            slot.request = data     # kept (a reference) in case the connection dies before answering
        conn.send(data, slot)
        if self.order.inflight > self.max_inflight:
            self.pause("inflight")
        if conn.write_paused:
            conn.blocked_sessions.add(self)
            self.pause("upstream")
        return slot

    def _send_run(self, conn, run: list) -> None:
        self.host.stats.commands[PASS] += len(run)
        data = encode_command(run[0]) if len(run) == 1 else b"".join(map(encode_command, run))
        self._send(conn, data, len(run))

    def send_commands(self, commands: list[list[bytes]], after=None) -> None:
        """Commands whose replies fill one slot (e.g. a lease DEL, then a routed write): one write on
        one node's connection when they all go there, else the pool's slow path, in order, while the
        client's later commands wait."""
        conn = None
        for args in commands:
            target = self._conn_for(args)
            if target is None or (conn is not None and target is not conn):
                conn = None
                break
            conn = target
        if conn is not None:
            self._send(conn, b"".join(map(encode_command, commands)), len(commands), after)
            return
        slot = self.order.add(self, len(commands), after)
        proto = self.proto

        async def slow():
            await self.wait_turn(slot)
            replies = [await self.pool.run(args, proto) for args in commands]
            self.fill(slot, b"".join(replies))
        self.step_inline(slow, slot)

    # -- a shared connection died before answering ----------------------------------------------------
    def upstream_lost(self, slot: Slot, conn, unsent: bool, message: str) -> None:
        """`slot`'s connection died. What cannot run twice (upstream/resend.py) is sent again on a live
        connection to the same node, waiting for the reconnect (upstream.connect_timeout); the client's
        later commands wait for it, so none overtakes it. The rest gets the error, as before."""
        if self.transport is not None and slot.resent < MAX_RESENDS:
            request = resendable(self.pool.table, slot.request, slot.count, unsent)
            if request is not None:
                slot.request = request
                slot.resent += 1
                self.lost.append((slot, conn.pool, conn.proto))
                conn.pool.events.retries += 1     # upstream events{event=retries}
                if not self.resending:
                    self.resending = True
                    self.pause("resend")
                    self.host.background.spawn(self._resend(), self._resend_failed, f"client {self.id}")
                return
        self.fill(slot, errors.failed(message) * slot.count)

    async def _resend(self) -> None:
        timeout = self.host.cfg.upstream.connect_timeout
        try:
            while self.lost:
                slot, node, proto = self.lost.pop(0)
                if self.transport is None or slot not in self.order.slots:
                    continue        # the client left
                conn = await node.wait_conn(proto, timeout)
                if conn is None:
                    self.fill(slot, errors.upstream_unavailable(node.reason) * slot.count)
                    continue
                if proto == self.proto:
                    self.conns[node] = conn     # the client's later commands follow on this connection
                conn.send(slot.request, slot)
        finally:
            self.resending = False
        self.resume("resend")

    def _resend_failed(self) -> None:
        self.resending = False
        lost, self.lost = self.lost, []
        for slot, _, _ in lost:
            if slot in self.order.slots and slot.data is None:
                self.fill(slot, errors.INTERNAL * slot.count)
        self.resume("resend")

    def new_slot(self, count: int) -> Slot:
        """A place in the reply order for a reply someone else will deliver through fill()."""
        return self.order.add(self, count)

    def reply(self, data: bytes) -> None:
        """A reply the proxy knows now: written at once unless earlier replies are still pending."""
        if self.transport is None:
            return
        out = self.order.ready(self, data)
        if out is not None:
            self._write(out)

    def fill(self, slot: Slot, data) -> None:
        """A reply for `slot` arrived (upstream, loader, a step): write every reply now in order."""
        if slot.after is not None:
            data = slot.after(slot, data)
        if self.transport is None:
            self.order.inflight -= slot.count
            return
        out = self.order.fill(slot, data)
        if out is not None:
            self._write(out)
            if self.transport is None:
                return
            if self.turn is not None and not self.turn.done():
                self.turn.set_result(None)
        self._after_fill()

    def fill_partial(self, slot: Slot, data, count: int) -> bool:
        if self.transport is None or not self.order.can_stream(slot):
            return False
        self.order.streamed(count)
        self._write(data)
        return True

    def _after_fill(self) -> None:
        if "inflight" in self.paused and self.order.inflight <= self.max_inflight // 2:
            self.resume("inflight")
        if not self.order and self.closing:
            self._close_if_done()

    def _write(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None, "written only while connected"
        self.host.stats.bytes.sent += len(data)
        transport.write(data)
        if self.write_paused and self.output_hard and transport.get_write_buffer_size() > self.output_hard:
            log.warning("client %d: output buffer over %d bytes, disconnecting", self.id, self.output_hard)
            self.host.stats.clients.output_limit_disconnects += 1
            transport.abort()

    def _close_if_done(self) -> None:
        if self.closing and not self.order and self.transport is not None:
            self.transport.close()

    async def wait_turn(self, slot: Slot | None = None) -> None:
        """Wait until every reply before `slot` (every reply, without one) has been written. Work that
        runs elsewhere than this client's own connections (a routed write's script, the slow path, a
        new dedicated connection) waits for it, so it never overtakes the client's earlier commands."""
        while self.order and (slot is None or self.order.slots[0] is not slot):
            self.turn = asyncio.get_running_loop().create_future()
            await self.turn
        self.turn = None

    # -- steps: work that later commands must wait for -----------------------------------------------
    def step(self, frames: list, i: int, step, slot: Slot | None = None) -> int:
        """Stop reading, run `step` (a coroutine function), then continue with frames[i + 1:]
        (frames[i] is the command the step answers, in `slot`). Returns the index where dispatch stops."""
        self.backlog = frames[i + 1:]
        self._start_step(step, slot)
        return len(frames)

    def step_inline(self, step, slot: Slot) -> None:
        """Like step(), for work started in the middle of dispatching: the frames not yet dispatched
        become the backlog when dispatch stops (see _dispatch)."""
        if self.hold is not None:       # already inside a step: run it as part of that one
            self.host.background.spawn(step(), lambda: self._step_failed(slot), f"client {self.id}")
            return
        if self.backlog is None:
            self.backlog = []
        self._start_step(step, slot)

    def _start_step(self, step, slot: Slot | None) -> None:
        self.pause("hold")
        self.hold = self.host.background.spawn(self._hold(step, slot), None, f"client {self.id}")

    async def _hold(self, step, slot: Slot | None) -> None:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("client %d: internal error", self.id)
            self._step_failed(slot)
        finally:
            self.hold = None
        self.resume("hold")     # continues with the frames that waited for this step

    def _step_failed(self, slot: Slot | None) -> None:
        """A bug in a step must not leave the client hanging: the command it answers gets an error
        (and the client goes on); without a command of its own, the client gets one and is closed."""
        if slot is not None:
            if slot in self.order.slots and slot.data is None:
                slot.after = None
                self.fill(slot, errors.INTERNAL * slot.count)
            return
        self.reply(errors.INTERNAL)
        self.closing = True
        self._close_if_done()

    # -- pinning -------------------------------------------------------------------------------------
    def _start_pin(self, frames: list, i: int) -> int:
        args = frames[i]
        key = self.pool.first_key(args)
        if not self.order:
            conn = self.pool.take_free(self.proto, key)
            if conn is not None:
                self.pin = conn
                return self._pinned(frames, i, args[0].upper(), kind_of(self.table, args[0]))
        self.backlog = frames[i:]

        async def acquire():
            await self.wait_turn()
            try:
                self.pin = await self.pool.get_dedicated(self.proto, key)
                # frames[i] is dispatched (and counted) again from the backlog: count it once.
                self.host.stats.commands[kind_of(self.table, args[0])] -= 1
            except UpstreamUnavailable as exc:
                # Answer the command that needed the pin; the rest proceed as usual.
                self.reply(errors.upstream_unavailable(str(exc)))
                del self.backlog[0]
        self._start_step(acquire, None)
        return len(frames)

    def _holds_state(self) -> bool:
        return self.watching or self.blocking > 0 or self.db != self.host.cfg.upstream.db

    def _pin_lost(self) -> None:
        """The dedicated connection died: its state (watches, db) is gone too."""
        self._unpin(clean=False)
        self.watching = False
        self.watch_slot = None
        self.blocking = 0
        self.db = self.host.cfg.upstream.db

    def _unpin(self, clean: bool) -> None:
        conn, self.pin = self.pin, None
        if conn is not None:
            self.pool.release(conn, clean)

    def _pinned(self, frames: list, i: int, name: bytes, kind: int) -> int:
        """While pinned, everything goes to the dedicated connection but proxy-local commands."""
        if kind == LOCAL and name != b"SELECT":
            return local.run(self, frames, i, name)
        if kind == RELAY:
            return self._start_relay(frames, i)
        if kind == TX:
            return transaction.start(self, frames, i, name)
        self.send_pinned(frames[i])
        return i + 1

    def send_pinned(self, args: list[bytes], after=None) -> None:
        """One command on the dedicated connection; the state it starts or ends is tracked here."""
        pin = self.pin
        assert pin is not None, "send_pinned needs a dedicated connection"
        name = args[0].upper()
        if after is None:
            after = self._after_pinned
            if name == b"WATCH":
                self.watching = True
            elif name == b"UNWATCH":
                self.watching = False
                self.watch_slot = None
            elif name == b"SELECT":
                after = _after_select(self, args)
            elif is_blocking(name, args):
                self.blocking += 1
                pin.timeout_exempt += 1
                after = self._after_blocking
        slot = self.order.add(self, 1, after)
        pin.send_direct(encode_command(args), slot)

    def _after_pinned(self, slot: Slot, data):
        if self.pin is not None and not self.pin.busy and not self._holds_state():
            self._unpin(clean=True)
        return data

    def _after_blocking(self, slot: Slot, data):
        self.blocking -= 1
        if self.pin is not None:
            self.pin.timeout_exempt -= 1
        return self._after_pinned(slot, data)

    def end_watch(self, clean: bool) -> None:
        """EXEC/DISCARD end a WATCH: give back its connection (closed unless EXEC reached it: then
        Redis dropped the watch and the connection is clean)."""
        self.watch_slot = None
        if self.watching:
            self.watching = False
            if self.pin is not None and not self._holds_state():
                self._unpin(clean=clean)

    def reset_state(self) -> None:
        """RESET: back to a new connection's state (and authentication), at once."""
        self.tx = None
        self.end_watch(clean=False)
        if self.pin is not None:
            self._unpin(clean=False)
        self.blocking = 0
        self.db = self.host.cfg.upstream.db
        self.proto = 2
        self.name = None
        self.authed = not self.host.auth_required
        self.user = b"default"

    # -- relaying -----------------------------------------------------------------------------------
    def _start_relay(self, frames: list, i: int) -> int:
        """Turn this session into a byte relay on a dedicated connection, from frames[i] on. With no
        reply pending and a spare connection ready, at once: the command leaves in this loop turn."""
        first = frames[i]
        key = self.pool.relay_key(first)
        if not self.order:
            conn = self.pin if self.pin is not None else self.pool.take_free(self.proto, key)
            if conn is not None:
                self.pin = None
                self._enter_relay(conn, frames[i:])
                return len(frames)
        self.backlog = frames[i:]

        async def enter():
            await self.wait_turn()
            conn = self.pin
            self.pin = None
            if conn is None:
                try:
                    conn = await self.pool.get_dedicated(self.proto, key)
                except UpstreamUnavailable as exc:
                    self.reply(errors.upstream_unavailable(str(exc)))
                    del self.backlog[0]
                    return
            backlog, self.backlog = self.backlog, None
            self._enter_relay(conn, backlog)
        self._start_step(enter, None)
        return len(frames)

    def _enter_relay(self, conn, frames: list) -> None:
        conn.relay_to = self
        conn.timeout_exempt += 1
        self.relay = conn
        self.host.stats.clients.relays += 1
        self._relay_frames(frames)

    def _relay_in(self, data: bytes) -> None:
        """Client bytes in relay mode: still parsed and checked (denied commands, reserved keys,
        RESET), then forwarded in order."""
        if not data:
            return
        frames, _ = self.parser.feed(data)
        if self.parser.error is not None:
            frames.append(_failed(self.parser.error))
        if frames:
            self.last_command = frames[-1]
            self.suspicious = reserved_in(data, self.host.guard.prefixes)
            self._relay_frames(frames)

    def _relay_frames(self, frames: list) -> None:
        out = []
        for args in frames:
            if args[0] is PROTOCOL_ERROR:   # relay what came before it, then drop the client
                self.closing = True
                break
            out.append(self._relay_command(args))
        if out and self.relay is not None:
            self.relay.send_raw(b"".join(out))
        if self.closing and self.transport is not None:
            self.transport.close()

    def _relay_command(self, args: list[bytes]) -> bytes:
        """The bytes to relay for one command. What the proxy answers or refuses itself becomes a
        script that makes Redis answer exactly that, so the reply keeps its place in the stream."""
        name = args[0].upper()
        if not self.authed and name not in (b"AUTH", b"HELLO", b"QUIT", b"RESET"):
            return _answer(errors.NOAUTH)
        if kind_of(self.table, args[0]) == DENY:
            return _answer(errors.not_supported(name))
        if self.suspicious and self.host.guard.refuses(args):
            self.host.stats.clients.reserved_refusals += 1
            return _answer(self.host.guard.refusal)
        if name == b"CLIENT" and len(args) >= 3 and args[1].upper() == b"TRACKING" and args[2].upper() == b"ON":
            args, problem = local.tracking_redirect(self, args)
            if problem is not None:
                return _answer(problem)
        if self.host.upstream_auth is not None and name in (b"AUTH", b"HELLO"):
            # The dedicated connection's Redis checks them and refuses this connection's commands itself
            # if they were wrong, so the proxy need not wait for the answer to let the client go on.
            if name == b"AUTH" or any(a.upper() == b"AUTH" for a in args[2:]):
                self.authed = True
            return encode_command(args)
        if name == b"AUTH":
            return _answer(local.auth(self, args[1:]) if 2 <= len(args) <= 3 else errors.wrong_arity(name))
        if name == b"HELLO" and any(a.upper() == b"AUTH" for a in args[2:]):
            return _answer(errors.HELLO_AUTH_IN_RELAY)
        if name == b"MONITOR" and self.monitoring is None:
            self.monitoring = Monitoring()      # active once Redis's +OK has been relayed
        if name == b"RESET":
            # Nothing after RESET may run with the old state: the client is logged out now.
            self._stop_monitoring()
            self.authed = not self.host.auth_required
            self.user = b"default"
        return encode_command(args)

    def relay_data(self, data: bytes) -> None:
        if self.transport is not None:
            self.host.stats.bytes.sent += len(data)
            self.transport.write(data)
            if self.monitoring is not None:
                self._monitor_relayed(data)

    def relay_lost(self) -> None:
        """The relayed upstream connection closed (QUIT, upstream restart): so does the client."""
        self.relay = None
        self._stop_monitoring()
        if self.transport is not None:
            self.transport.close()

    # -- MONITOR: the proxy's own commands in the stream (monitor.py) -----------------------------------
    def _monitor_relayed(self, data: bytes) -> None:
        monitoring = self.monitoring
        assert monitoring is not None, "called for a MONITOR relay only"
        if not monitoring.active:
            monitoring.active = True        # the first bytes after MONITOR hold its +OK
            self.host.monitors.sessions.add(self)
        monitoring.at_line_end = data.endswith(b"\r\n")
        if monitoring.at_line_end and monitoring.lines:
            lines, monitoring.lines = monitoring.lines, []
            self._write(b"".join(lines))

    def monitor_line(self, line: bytes) -> None:
        """A command the proxy answered, for this monitoring client: now, or after Redis's current line."""
        monitoring = self.monitoring
        if monitoring is None or self.transport is None:
            return
        if monitoring.at_line_end and not monitoring.lines:
            self._write(line)
        else:
            monitoring.lines.append(line)

    def _stop_monitoring(self) -> None:
        if self.monitoring is not None:
            self.monitoring = None
            self.host.monitors.sessions.discard(self)

    # -- FLUSHALL / FLUSHDB: the proxy's own state survives -------------------------------------------
    async def _flush(self, slot: Slot, args: list[bytes]) -> None:
        await self.wait_turn(slot)
        self.fill(slot, await self.host.guard.flush(args, self.proto))


def _failed(message: str) -> list[Any]:
    """The frame that stands for a request the parser refused (dispatched in its place, in order)."""
    return [PROTOCOL_ERROR, message]


def _answer(reply: bytes) -> bytes:
    """A request that makes Redis answer `reply` (a status or an error line) in the relay's order."""
    script = b"return redis.status_reply(ARGV[1])" if reply[:1] == b"+" else b"return redis.error_reply(ARGV[1])"
    return encode_command((b"EVAL", script, b"0", reply[1:-2]))


def _after_select(session: Session, args: list[bytes]):
    db = int(args[1])

    def after(slot: Slot, data):
        if data == OK:
            session.db = db
        return session._after_pinned(slot, data)
    return after
