"""Client sessions in cluster mode: each command goes to the node that owns its keys' slot.

    frames --place by slot--> runs of consecutive commands for one node connection, one write each
                        |---> slow path (split MGET/MSET/DEL..., fan-out, no node up yet): ClusterPool.run
                        |---> MULTI ... EXEC: queued here (+QUEUED), sent as one block to the slot's node
                        '---> blocking commands, WATCH, SSUBSCRIBE: a dedicated connection to the key's node

Replies keep request order through the same Slots as single-node sessions. A command on the slow
path holds the client's later commands until it is answered, so a pipeline still reads its own
writes (MSET a 1 b 2 then GET a). The single-node session (server.py) is not touched: this class is
only chosen when `upstream.cluster` is true.
"""

from __future__ import annotations

import asyncio
import logging

from redis.crc import key_slot

from ..protocol.commands import DENY, LOCAL, PASS, PIN, RELAY, ROUTED, is_blocking, kind_of
from ..protocol.resp import OK, encode_command, error, scan_replies
from ..upstream import placement as cc
from ..upstream.cluster import LOST, parse_requests, split_replies
from ..upstream.placement import CROSSSLOT, keys_of, node_local_error
from ..upstream.single import UpstreamUnavailable
from .session import PROTOCOL_ERROR, ClientSession, Slot

log = logging.getLogger("cacheproxy.cluster")

QUEUED = b"+QUEUED\r\n"
EXECABORT = error("EXECABORT Transaction discarded because of previous errors.")


class ClusterSession(ClientSession):
    def __init__(self, server):
        super().__init__(server)
        self.tx: list | None = None       # commands queued since MULTI
        self.tx_slot: int | None = None   # the slot every key of the transaction (and WATCH) is in
        self.tx_failed = False            # a queued command was refused: EXEC answers EXECABORT
        self.watch_slot: int | None = None
        # One connection per node for this client, so its commands to a node stay in order.
        self.node_conns: dict = {}

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
        if self.backlog is not None:
            self.backlog.extend(frames)
            return
        if raw is not None and len(frames) == 1 and self.pin is None and self.tx is None and self.authed \
                and self.inflight < self.max_inflight:
            # One plain command for one slot (a client without pipelining): its bytes go as they came.
            args = frames[0]
            kind = self.table.get(args[0])
            if kind is None:
                kind = kind_of(self.table, args[0])
            if kind == PASS:
                conn = self._route(args)
                if conn is not None:
                    self.server.commands[PASS] += 1
                    slot = Slot(self, 1)
                    self.replies.append(slot)
                    self.inflight += 1
                    conn.send(raw, slot)
                    if conn.write_paused:
                        conn.blocked_sessions.add(self)
                        self.pause("upstream")
                    return
        self._dispatch(frames, 0)
        if self.parser.deferred and self.backlog is None:
            self.data_received(b"")     # requests held back until an AUTH among `frames` had run

    def _dispatch(self, frames: list, i: int) -> None:
        run: list = []          # consecutive commands for `run_conn`, sent as one write
        run_conn = None
        n = len(frames)
        table = self.table
        commands = self.server.commands
        while i < n and self.hold is None and not self.closing:
            if self.inflight + len(run) >= self.max_inflight:
                self.pause("inflight")
                break
            args = frames[i]
            kind = table.get(args[0])
            if kind is None:
                kind = kind_of(table, args[0])
            if kind == ROUTED and not self.server.readthrough.owns(args[0].upper(), args):
                kind = PASS
            if kind == PASS and self.pin is None and self.tx is None and self.authed:
                conn = self._route(args)
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
                if self._split(args):
                    commands[PASS] += 1
                    i += 1
                    continue
            if run:
                self._send_run(run_conn, run)
                run = []
            commands[kind] += 1
            i = self._command(frames, i, kind)
        if run:
            self._send_run(run_conn, run)
        if i < n and not self.closing:
            self.backlog = frames[i:]

    def _route(self, args: list[bytes]):
        """The shared connection for a single-slot command, or None (slow path decides)."""
        ctable = self.pool.table
        if ctable is None:
            return None
        spec = ctable.lookup(args)
        if spec is None:
            return None
        keys = keys_of(spec, args)
        if not keys:
            return None
        slot = key_slot(keys[0])
        for key in keys[1:]:
            if key_slot(key) != slot:
                return None
        return self._conn(slot, spec.readonly)

    def _conn(self, slot: int, readonly: bool):
        node = self.pool.node_for_slot(slot, readonly)
        if node is None:
            return None
        conn = self.node_conns.get(node)
        if conn is None or not conn.up or conn.proto != self.proto:
            conn = node.pick(self.proto)
            if conn is None:
                return None
            self.node_conns[node] = conn
        return conn

    def _split(self, args: list[bytes]) -> bool:
        """MGET/MSET/DEL/EXISTS/TOUCH/UNLINK over several slots: one part per slot on this client's
        connection to each node (so later commands stay behind them), merged when all are back."""
        ctable = self.pool.table
        if ctable is None:
            return False
        kind, value = cc.place(ctable, args)
        if kind != cc.SPLIT:
            return False
        merge, parts = value
        readonly = ctable.readonly(args)
        conns = [self._conn(slot, readonly) for slot, _, _ in parts]
        if None in conns:
            return False
        slot = Slot(self, 1)
        self.replies.append(slot)
        self.inflight += 1
        total = (len(args) - 1) // 2 if merge == "ok" else len(args) - 1
        gather = _Gather(slot, merge, total, parts)
        for index, ((_, _, part_args), conn) in enumerate(zip(parts, conns, strict=True)):
            conn.send(encode_command(part_args), _Part(gather, index))
        return True

    def _send_run(self, conn, run: list) -> None:
        self.server.commands[PASS] += len(run)
        count = len(run)
        data = encode_command(run[0]) if count == 1 else b"".join(map(encode_command, run))
        slot = Slot(self, count)
        self.replies.append(slot)
        self.inflight += count
        conn.send(data, slot)
        if self.inflight > self.max_inflight:
            self.pause("inflight")
        if conn.write_paused:
            conn.blocked_sessions.add(self)
            self.pause("upstream")

    def send_shared(self, data: bytes, count: int, after=None) -> None:
        """Commands other code hands over as bytes (pass-through, routed writes, CLIENT ...): one
        node when they all live there, else the slow path (split, fan-out, waiting for a node)."""
        commands = parse_requests(data)
        conn = None
        for args in commands:
            routed = self._route(args)
            if routed is None or (conn is not None and routed is not conn):
                conn = None
                break
            conn = routed
        if conn is not None:
            slot = Slot(self, count, after)
            self.replies.append(slot)
            self.inflight += count
            conn.send(data, slot)
            if self.inflight > self.max_inflight:
                self.pause("inflight")
            return
        slot = Slot(self, count, after)
        self.replies.append(slot)
        self.inflight += count
        proto = self.proto

        async def step():
            replies = []
            for args in commands:       # in order: a batch may be "DEL lease; SET key"
                replies.append(await self.pool.run(args, proto))
            slot.on_reply(b"".join(replies))
        self._barrier(step)

    def _barrier(self, step) -> None:
        """Run `step` while the client's later commands wait (they are dispatched after it)."""
        if self.hold is not None:       # already inside a step: just run it
            asyncio.get_running_loop().create_task(self._guarded(step))
            return
        if self.backlog is None:
            self.backlog = []
        self.pause("hold")
        self.hold = asyncio.get_running_loop().create_task(self._hold(step))

    async def _guarded(self, step) -> None:
        try:
            await step()
        except Exception:
            log.exception("client %d: internal error", self.id)

    # -- commands that are not plain pass-through ----------------------------------------------------
    def _command(self, frames: list, i: int, kind: int) -> int:
        args = frames[i]
        if args[0] is PROTOCOL_ERROR or kind == DENY or not self.authed:
            return super()._command(frames, i, kind)
        name = args[0].upper()
        if self.tx is not None:
            return self._queue(frames, i, name)
        if name in (b"MULTI", b"EXEC", b"DISCARD", b"WATCH"):
            return self._transaction(frames, i, name)
        if name == b"UNWATCH":
            self.watch_slot = None
            if self.pin is None:
                self.reply(OK)
                return i + 1
        if self.pin is not None and self.pin.up:
            return super()._command(frames, i, kind)
        if kind == PIN:
            if name in (b"WAIT", b"WAITAOF"):
                self.reply(node_local_error(name.lower()))
                return i + 1
            if not is_blocking(name, args):
                self.send_shared(encode_command(args), 1)     # XREAD without BLOCK: a plain command
                return i + 1
            if self._slot_of(args) is CROSSSLOT:
                self.reply(CROSSSLOT)
                return i + 1
            return self._start_pin(frames, i)
        if kind == RELAY:
            if name == b"MONITOR":
                self.reply(node_local_error(b"monitor"))
                return i + 1
            if name == b"SSUBSCRIBE" and self._slot_of(args) is CROSSSLOT:
                self.reply(CROSSSLOT)
                return i + 1
        if kind == LOCAL:
            if name == b"SELECT" and len(args) == 2 and args[1] != b"0":
                self.reply(error("ERR SELECT is not allowed in cluster mode"))
                return i + 1
            if name == b"CLIENT" and len(args) == 3 and args[1].upper() == b"SETNAME":
                self.reply(OK)      # kept by the proxy: a name must not pin the client to one node
                return i + 1
        return super()._command(frames, i, kind)

    def _slot_of(self, args: list[bytes]):
        """The one slot of a command's keys; None without keys; CROSSSLOT when they span slots."""
        ctable = self.pool.table
        keys = ctable.keys(args) if ctable is not None else None
        if not keys:
            return None
        slot = key_slot(keys[0])
        if any(key_slot(k) != slot for k in keys[1:]):
            return CROSSSLOT
        return slot

    def _first_key(self, args: list[bytes]) -> bytes | None:
        ctable = self.pool.table
        keys = ctable.keys(args) if ctable is not None else None
        return keys[0] if keys else None

    # -- dedicated connections: on the node of the command's key -------------------------------------
    def _start_pin(self, frames: list, i: int) -> int:
        key = self._first_key(frames[i])
        if not self.replies:
            conn = self.pool.take_free(self.proto, key)
            if conn is not None:
                self.pin = conn
                return self._pinned(frames, i, frames[i][0].upper(), kind_of(self.table, frames[i][0]))

        async def acquire():
            await self._wait_drained()
            try:
                self.pin = await self.pool.get_dedicated(self.proto, key)
                # frames[i] is dispatched (and counted) again from the backlog: count it once.
                self.server.commands[kind_of(self.table, frames[i][0])] -= 1
            except UpstreamUnavailable as exc:
                self.reply(error(f"ERR upstream unavailable: {exc}"))
                del self.backlog[0]
        return self._run_hold(frames, i, acquire)

    async def _dedicated(self, args: list[bytes]):
        """A relay's connection (server.py asks): SSUBSCRIBE goes to its channel's node."""
        key = self._first_key(args) if args[0].upper() == b"SSUBSCRIBE" else None
        return await self.pool.get_dedicated(self.proto, key)

    def _pin_lost(self) -> None:
        super()._pin_lost()
        self.watch_slot = None

    def _reset_state(self) -> None:
        super()._reset_state()
        self.tx, self.tx_slot, self.tx_failed, self.watch_slot = None, None, False, None

    # -- transactions ----------------------------------------------------------------------------------
    def _transaction(self, frames: list, i: int, name: bytes) -> int:
        args = frames[i]
        if name == b"MULTI":
            if len(args) != 1:
                self.reply(error("ERR wrong number of arguments for 'multi' command"))
                return i + 1
            self.tx, self.tx_slot, self.tx_failed = [], self.watch_slot, False
            self.reply(OK)
            return i + 1
        if name in (b"EXEC", b"DISCARD"):
            self.reply(error(f"ERR {name.decode()} without MULTI"))
            return i + 1
        # WATCH: on a dedicated connection to the keys' node; a transaction must then stay in that slot.
        slot = self._slot_of(args)
        if slot is None:
            self.reply(error("ERR wrong number of arguments for 'watch' command"))
            return i + 1
        if slot is CROSSSLOT or (self.watch_slot is not None and slot != self.watch_slot):
            self.reply(CROSSSLOT)
            return i + 1
        self.watch_slot = slot
        if self.pin is not None and self.pin.up:
            return self._pinned(frames, i, name, PIN)
        return self._start_pin(frames, i)

    def _queue(self, frames: list, i: int, name: bytes) -> int:
        args = frames[i]
        if name == b"EXEC":
            return self._exec(i)
        if name == b"DISCARD":
            self.tx = None
            self.reply(OK)
            self._end_watch(clean=False)
            return i + 1
        if name == b"MULTI":
            self.reply(error("ERR MULTI calls can not be nested"))
            return i + 1
        if name == b"WATCH":
            self.reply(error("ERR WATCH inside MULTI is not allowed"))
            return i + 1
        kind = kind_of(self.table, args[0])
        if name in (b"QUIT", b"RESET"):         # run at once inside MULTI, as Redis does
            return super()._command(frames, i, kind)
        if kind in (LOCAL, RELAY, DENY) and name not in (b"PING", b"ECHO"):
            # Connection state (HELLO, AUTH, SELECT, CLIENT, SUBSCRIBE ...) must never run inside a
            # block on a shared connection.
            self.tx_failed = True
            self.reply(error("ERR Command not allowed inside a transaction"))
            return i + 1
        ctable = self.pool.table
        spec = ctable.lookup(args) if ctable is not None else None
        if spec is None or (spec.arity > 0 and len(args) != spec.arity) or len(args) < -spec.arity:
            # Unknown command or wrong arity: Redis's own error (it runs nothing), and the
            # transaction is void, as in Redis.
            self.tx_failed = True
            self.send_shared(encode_command(args), 1)
            return i + 1
        keys = keys_of(spec, args) or []
        for key in keys:
            slot = key_slot(key)
            if self.tx_slot is None:
                self.tx_slot = slot
            elif slot != self.tx_slot:
                self.tx_failed = True
                self.reply(CROSSSLOT)
                return i + 1
        self.tx.append(args)
        self.reply(QUEUED)
        return i + 1

    def _exec(self, i: int) -> int:
        tx, self.tx = self.tx, None
        if self.tx_failed:
            self.reply(EXECABORT)
            self._end_watch(clean=False)
            return i + 1
        pin = self.pin if self.pin is not None and self.pin.up and self.watching else None
        if self.watching and pin is None:       # the watch's connection died: its state is gone
            self._end_watch(clean=False)
            self.reply(error("ERR upstream unavailable: the connection holding WATCH was lost"))
            return i + 1
        count = len(tx) + 2
        slot = Slot(self, count, self._after_exec)
        self.replies.append(slot)
        self.inflight += count
        request = encode_command((b"MULTI",)) + b"".join(map(encode_command, tx)) + encode_command((b"EXEC",))
        if pin is not None:
            pin.send_direct(request, slot)
            return i + 1
        node = self.pool.slots[self.tx_slot] if self.tx_slot is not None else self.pool.any_master()
        conn = node.pick(self.proto) if node is not None else None
        if conn is not None:
            conn.send_direct(request, _TxWaiter(self, slot, tx, self.tx_slot))
        else:
            _TxWaiter(self, slot, tx, self.tx_slot).retry(None, True)
        return i + 1

    def _after_exec(self, slot: Slot, data):
        """A transaction's replies: MULTI's +OK and the +QUEUED were answered already; EXEC's stays."""
        if self.watching:
            self._end_watch(clean=True)     # EXEC ran on the pin: Redis dropped the watch
        pos, _ = scan_replies(data, 0, slot.count - 1)
        return data[pos:]

    def _end_watch(self, clean: bool) -> None:
        """EXEC/DISCARD end a WATCH: give back its connection (closed unless EXEC reached it: then
        it still holds the watch)."""
        self.watch_slot = None
        if self.watching:
            self.watching = False
            if self.pin is not None and not self._holds_state():
                self._unpin(clean=clean)


class _Gather:
    """Collects the replies of a split command's parts and fills the client's slot with the merge."""

    __slots__ = ("slot", "merge", "total", "parts", "replies", "left")

    def __init__(self, slot: Slot, merge: str, total: int, parts: list):
        self.slot, self.merge, self.total, self.parts = slot, merge, total, parts
        self.replies: list = [None] * len(parts)
        self.left = len(parts)

    def done(self, index: int, data) -> None:
        self.replies[index] = bytes(data)
        self.left -= 1
        if not self.left:
            self.slot.on_reply(cc.merge_split(self.merge, self.total, self.parts, self.replies))


class _Part:
    __slots__ = ("gather", "index", "count")

    def __init__(self, gather: _Gather, index: int):
        self.gather, self.index, self.count = gather, index, 1

    def on_reply(self, data) -> None:
        self.gather.done(self.index, data)

    def partial(self, data, count: int) -> bool:
        return False


class _TxWaiter:
    """The replies of MULTI ... EXEC on a shared connection; a transaction refused because its slot
    moved is sent again where the slot is now (nothing ran)."""

    __slots__ = ("session", "slot", "tx", "tx_slot", "count")

    def __init__(self, session: ClusterSession, slot: Slot, tx: list, tx_slot: int | None):
        self.session, self.slot, self.tx, self.tx_slot = session, slot, tx, tx_slot
        self.count = len(tx) + 2

    def on_reply(self, data) -> None:
        replies = split_replies(data, self.count)
        if any(r.startswith((b"-MOVED ", b"-ASK ", b"-TRYAGAIN")) for r in replies[1:-1]) or \
                replies[-1].startswith(LOST):
            self.retry(replies, False)
            return
        self.slot.on_reply(data)

    def partial(self, data, count: int) -> bool:
        return False

    def retry(self, replies, unsent: bool) -> None:
        session = self.session

        async def again():
            reply = await session.pool.transaction(self.tx, session.proto, self.tx_slot, replies, unsent)
            # The slot expects MULTI's and every command's reply before EXEC's (_after_exec drops them).
            self.slot.on_reply(OK + QUEUED * len(self.tx) + reply)
        asyncio.get_running_loop().create_task(again())
