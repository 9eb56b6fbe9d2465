"""Cluster mode upstream: the slot map, one small pool per node, redirects, splits and fan-outs.

    session --place(args)--> slot --slots[slot]--> NodePool.pick --> NodeConnection.send(bytes, waiter)
    a reply with MOVED/ASK/TRYAGAIN/CLUSTERDOWN/connection lost --Redirecting--> ClusterPool.run (async):
        MOVED updates the map and asks for a refresh; ASK sends ASKING + the command once; a down
        node waits for a map refresh (failover); then the client's waiter gets the reply in its
        place, so the client never sees a redirect.

The fast path is unchanged from single-node mode: raw bytes on a shared, multiplexed connection; a
reply is only looked at further when it contains an error line ("\\r\\n-"), which is rare.

Retries run a command again only when that cannot run it twice: a redirect (Redis did not run it),
a command that never left the proxy (its node was down, or it was still queued when the connection
died), or a read-only command. A write that may have reached a node that then died gets
`-ERR upstream unavailable` (at most once). Every retry stops after `upstream.command_timeout`.

The map comes from CLUSTER SHARDS (CLUSTER SLOTS before Redis 7), asked of any known node (the
seeds when none answers), every REFRESH_INTERVAL seconds, after a MOVED and after a connection loss,
at most once per REFRESH_GAP. Key positions come from the upstream's COMMAND (protocol/commands.py, placement.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
from itertools import islice
from typing import Any

from redis.crc import key_slot

from ..ops.metrics import UpstreamEvents
from ..protocol import errors
from ..protocol.commands import keys_of
from ..protocol.resp import encode_command, parse_reply, parse_requests, split_replies
from ..tasks import Background
from . import placement as cc
from . import slotmap
from .single import (
    FutureWaiter,
    UpstreamConnection,
    UpstreamPool,
    UpstreamUnavailable,
    _ssl_context,
)

log = logging.getLogger("cacheproxy.cluster")

SLOTS = slotmap.SLOTS
REFRESH_INTERVAL = 5.0
REFRESH_GAP = 0.1
LOST = errors.UPSTREAM_LOST_PREFIX
_RETRY = (b"-MOVED ", b"-ASK ", b"-TRYAGAIN", b"-CLUSTERDOWN", b"-LOADING", b"-READONLY", b"-MASTERDOWN", LOST)
ASKING = encode_command((b"ASKING",))
SCAN_BITS = 10          # SCAN cursors carry the master's index in their low bits (up to 1024 masters)


def needs_retry(reply: bytes) -> bool:
    return reply.startswith(_RETRY)


def _as_bytes(args) -> list[bytes]:
    return [a if isinstance(a, bytes) else str(a).encode() for a in args]


class Redirecting:
    """Wraps a waiter on a node connection: replies go through untouched unless one is a redirect
    or a retryable error, then the cluster pool re-routes those commands and hands the waiter the
    whole batch in order."""

    __slots__ = ("cluster", "request", "waiter", "count", "proto", "done", "unsent")

    def __init__(self, cluster: ClusterPool, request: bytes, waiter, proto: int):
        self.cluster = cluster
        self.request = request
        self.waiter = waiter
        self.count = waiter.count
        self.proto = proto
        self.done = 0           # replies already handed over by partial()
        self.unsent = False     # set when the connection died before these bytes were written

    def on_reply(self, data) -> None:
        if data[:1] != b"-" and b"\r\n-" not in data:
            self.waiter.on_reply(data)
            return
        self.cluster.resolve(self, data)

    def partial(self, data, count: int) -> bool:
        if data[:1] == b"-" or b"\r\n-" in data:
            return False
        if self.waiter.partial(data, count):
            self.waiter.count -= count
            self.done += count
            return True
        return False

    def on_error(self, message: str) -> None:
        self.on_reply(errors.failed(message) * self.count)


class _Waiter(FutureWaiter):
    __slots__ = ("unsent",)

    def __init__(self, future, count: int = 1):
        super().__init__(future, count)
        self.unsent = False


class NodeConnection(UpstreamConnection):
    """A connection to one node. send() follows redirects; send_direct() does not (transactions,
    the pool's own retries)."""

    pool: NodePool

    def send(self, data: bytes, waiter) -> None:
        UpstreamConnection.send(self, data, Redirecting(self.pool.parent, data, waiter, self.proto))

    send_direct = UpstreamConnection.send

    async def call(self, *args) -> bytes:
        """Run a command where its keys live (following redirects); returns the raw reply."""
        return await self.pool.parent.run(args, self.proto)

    async def call_direct(self, *args) -> bytes:
        future = self.loop.create_future()
        self.send_direct(encode_command(args), FutureWaiter(future))
        return await future

    def _fail_all(self, message: str, resend: bool = True) -> None:
        # Requests still queued in `out` never reached the node: they may be retried, even writes.
        if self.out:
            for waiter in islice(reversed(self.waiters), len(self.out)):
                if hasattr(waiter, "unsent"):
                    waiter.unsent = True
        super()._fail_all(message, resend)


class NodePool(UpstreamPool):
    """The shared and dedicated connections to one cluster node."""

    connection_class = NodeConnection

    def __init__(self, cluster: ClusterPool, host: str, port: int):
        super().__init__(cluster.cfg, cluster.loop, cluster.background)
        self.parent = cluster      # the ClusterPool this node belongs to
        self.host, self.port = host, port
        self.addr = f"{host}:{port}"
        self.ssl_context = cluster.ssl_context
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            super().start()

    async def _after_hello(self, conn: UpstreamConnection) -> None:
        """A cluster node: the cluster's version; READONLY when replicas may serve reads (the command
        table and the slot map come from the cluster pool)."""
        self.parent.server_version = self.server_version
        if self.parent.read_from != "primary":
            # Harmless on a master, needed on a replica; roles change in a failover.
            reply = parse_reply(await conn.call_direct("READONLY"))
            if isinstance(reply, Exception):
                raise UpstreamUnavailable(f"READONLY refused by {self.addr}: {reply}")

    def connection_closed(self, conn) -> None:
        super().connection_closed(conn)
        if not self._closing:
            self.parent.request_refresh()

    def connected_once(self) -> bool:
        return self.events.connects > 0 or self.events.connect_errors > 0

    async def wait_conn(self, proto: int, timeout: float) -> UpstreamConnection | None:
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline and not self._closing:
            conn = self.pick(proto)
            if conn is not None:
                return conn
            await asyncio.sleep(0.01)
        return None


class ClusterPool:
    """Same interface as UpstreamPool, over every node of a Redis Cluster."""

    def __init__(self, cfg, loop: asyncio.AbstractEventLoop | None = None, background: Background | None = None):
        self.cfg = cfg
        self.loop = loop or asyncio.get_running_loop()
        self.background = background or Background()
        self.read_from = cfg.read_from
        self.retry_window = cfg.command_timeout
        self.ssl_context = _ssl_context(cfg) if cfg.use_tls else None
        self.seeds = [(cfg.host, cfg.port)] + [(n.rpartition(":")[0], int(n.rpartition(":")[2]))
                                               for n in cfg.nodes]
        self.nodes: dict[str, NodePool] = {}
        self.slots: list[NodePool | None] = [None] * SLOTS
        self.slot_replicas: list[list[NodePool]] = [[] for _ in range(SLOTS)]
        self.master_list: list[NodePool] = []
        self.table: cc.CommandTable | None = None
        self.last_error = "cluster map not known yet"
        self.server_version = "7.0.0"
        self.ready = asyncio.Event()
        self.counters = UpstreamEvents()     # moved, ask, retries, refreshes (node pools count connects)
        self.reason = "cluster map not known yet"
        self._rr = 0
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._wake = asyncio.Event()
        self._next_refresh: asyncio.Future = self.loop.create_future()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks.append(self.loop.create_task(self._refresher()))

    async def wait_ready(self, timeout: float) -> bool:
        deadline = self.loop.time() + timeout
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            return False
        for node in list(self.master_list):
            if not await node.wait_ready(max(0.0, deadline - self.loop.time())):
                return False
        return True

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(node.close() for node in self.nodes.values()), return_exceptions=True)

    @property
    def healthy(self) -> bool:
        return bool(self.master_list) and all(node.pick(2) is not None for node in self.master_list)

    @property
    def credentials_error(self) -> str | None:
        """A node that refuses the proxy's own credentials (logs, /readyz), if any."""
        return next((n.credentials_error for n in self.nodes.values() if n.credentials_error), None)

    @property
    def events(self) -> UpstreamEvents:
        """Every node's connection events and the map's own, summed (read at scrape time)."""
        out = UpstreamEvents()
        for name in out.__slots__:
            total = getattr(self.counters, name) + sum(getattr(n.events, name) for n in self.nodes.values())
            setattr(out, name, total)
        return out

    @property
    def shared(self) -> dict[int, list]:
        return {proto: [c for node in self.nodes.values() for c in node.shared[proto]] for proto in (2, 3)}

    @property
    def dedicated(self) -> set:
        return {c for node in self.nodes.values() for c in node.dedicated}

    # -- the slot map ----------------------------------------------------------------------------
    def request_refresh(self) -> None:
        self._wake.set()

    async def wait_refresh(self, deadline: float) -> None:
        """Ask for a map refresh and wait (until `deadline` at most) for one that starts after now."""
        future = self._next_refresh
        self._wake.set()
        remaining = deadline - self.loop.time()
        if remaining > 0:
            try:
                await asyncio.wait_for(asyncio.shield(future), remaining)
            except TimeoutError:
                pass

    async def _refresher(self) -> None:
        delay = 0.05
        while not self._closing:
            future, self._next_refresh = self._next_refresh, self.loop.create_future()
            self._wake.clear()
            try:
                ok = await self._refresh()
            except Exception:   # a bug here must not stop the refreshes; it is logged
                log.exception("cluster map refresh failed")
                ok = False
            if not future.done():
                future.set_result(ok)
            if not ok and not self.ready.is_set():
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
                continue
            await asyncio.sleep(REFRESH_GAP)
            try:
                await asyncio.wait_for(self._wake.wait(), REFRESH_INTERVAL)
            except TimeoutError:
                pass

    async def _refresh(self) -> bool:
        candidates = [n for n in self.nodes.values() if n.pick(2) is not None]
        random.shuffle(candidates)
        addresses = [(n.host, n.port) for n in candidates]
        addresses += [seed for seed in self.seeds if seed not in addresses]
        problem = "no seed node configured"
        for host, port in addresses:
            try:
                shards, table = await self._ask(host, port)
            except (UpstreamUnavailable, TimeoutError, OSError, ValueError, IndexError, TypeError) as exc:
                problem = f"{host}:{port}: {exc or type(exc).__name__}"
                continue
            if table is not None:
                self.table = table
            if self._apply(shards):
                self.counters.refreshes += 1
                if not self.ready.is_set():
                    log.info("cluster: %d masters, %d replicas", len(self.master_list),
                             sum(len(s[2]) for s in shards))
                    self.ready.set()
                return True
            problem = f"{host}:{port}: the cluster map does not cover every slot"
        self.counters.refresh_errors += 1
        self.reason = "cannot read the cluster map"
        if problem != self.last_error:
            log.warning("cluster: cannot read the slot map: %s", problem)
        self.last_error = problem
        return False

    async def _ask(self, host: str, port: int):
        """(shards, command table or None) from one node: shards are (ranges, master, replicas)."""
        node = self.nodes.get(f"{host}:{port}")
        conn = node.pick(2) if node is not None else None
        temporary = None
        if conn is None:
            probe = NodePool(self, host, port)
            temporary = conn = await probe.connect(2, dedicated=True)
        try:
            timeout = self.cfg.connect_timeout + 1
            raw = await asyncio.wait_for(conn.call_direct("CLUSTER", "SHARDS"), timeout)
            reply = parse_reply(raw)
            if isinstance(reply, Exception):
                reply = parse_reply(await asyncio.wait_for(conn.call_direct("CLUSTER", "SLOTS"), timeout))
                if isinstance(reply, Exception):
                    raise UpstreamUnavailable(str(reply))
                shards = slotmap.from_slots(reply, host)
            else:
                shards = slotmap.from_shards(reply, host)
            table = None
            if self.table is None:
                commands = parse_reply(await asyncio.wait_for(conn.call_direct("COMMAND"), timeout))
                if isinstance(commands, Exception):
                    raise UpstreamUnavailable(f"COMMAND refused: {commands}")
                table = cc.CommandTable(commands)
            return shards, table
        finally:
            if temporary is not None:
                temporary.close()

    def _apply(self, shards: list) -> bool:
        slots: list[NodePool | None] = [None] * SLOTS
        replicas: list[list[NodePool]] = [[] for _ in range(SLOTS)]
        masters: list[tuple[int, NodePool]] = []
        used: set[str] = set()
        for ranges, master, replica_addrs in shards:
            if not ranges or master is None:
                continue
            node = self._node(*master)
            reps = [self._node(*r) for r in replica_addrs] if self.read_from != "primary" else []
            used.add(node.addr)
            used.update(r.addr for r in reps)
            masters.append((min(start for start, _ in ranges), node))
            for start, end in ranges:
                for slot in range(start, end + 1):
                    slots[slot] = node
                    replicas[slot] = reps
        if any(node is None for node in slots):
            return False
        self.slots, self.slot_replicas = slots, replicas
        self.master_list = [node for _, node in sorted(masters, key=lambda m: m[0])]
        for addr in [a for a in self.nodes if a not in used]:
            node = self.nodes.pop(addr)
            log.info("cluster: node %s left the map", addr)
            self._tasks.append(self.loop.create_task(node.close()))
        return True

    def _node(self, host: str, port: int) -> NodePool:
        addr = f"{host}:{port}"
        node = self.nodes.get(addr)
        if node is None:
            node = self.nodes[addr] = NodePool(self, host, port)
            if not self._closing:
                node.start()
        return node

    def _moved(self, slot: int, node: NodePool) -> None:
        self.counters.moved += 1
        if 0 <= slot < SLOTS:
            self.slots[slot] = node
        self.request_refresh()

    # -- routing -----------------------------------------------------------------------------------
    def node_for_slot(self, slot: int, readonly: bool = False) -> NodePool | None:
        if readonly and self.read_from != "primary":
            replicas = self.slot_replicas[slot]
            if replicas:
                self._rr += 1
                for i in range(len(replicas)):
                    node = replicas[(self._rr + i) % len(replicas)]
                    if node.pick(2) is not None or node.pick(3) is not None:
                        return node
            if self.read_from == "replica":
                return replicas[0] if replicas else self.slots[slot]
        return self.slots[slot]

    def any_master(self) -> NodePool | None:
        masters = self.master_list
        for _ in range(len(masters)):
            self._rr += 1
            node = masters[self._rr % len(masters)]
            if node.pick(2) is not None:
                return node
        return masters[0] if masters else None

    def pick(self, proto: int, key: bytes | None = None) -> UpstreamConnection | None:
        """A shared connection to the node that owns `key`'s slot (any master without a key)."""
        node = self.any_master() if key is None else self.slots[key_slot(key)]
        return node.pick(proto) if node is not None else None

    # -- the session's hooks --------------------------------------------------------------------
    cluster = True

    def node_for(self, args: list[bytes]) -> NodePool | None:
        """The node a single-slot command goes to; None for the slow path (no keys, several slots,
        an unknown command or no map yet)."""
        table = self.table
        spec = table.lookup(args) if table is not None else None
        if spec is None:
            return None
        keys = keys_of(spec, args)
        if not keys:
            return None
        slot = key_slot(keys[0])
        for key in keys[1:]:
            if key_slot(key) != slot:
                return None
        return self.node_for_slot(slot, spec.readonly)

    def node_for_key(self, key: bytes) -> NodePool | None:
        return self.slots[key_slot(key)]

    def any_node(self) -> NodePool | None:
        return self.any_master()

    def slot_of(self, args: list[bytes]):
        """The one slot of a command's keys; None without keys; CROSSSLOT when they span slots."""
        keys = self.table.keys(args) if self.table is not None else None
        if not keys:
            return None
        slot = key_slot(keys[0])
        if any(key_slot(k) != slot for k in keys[1:]):
            return cc.CROSSSLOT
        return slot

    def first_key(self, args: list[bytes]) -> bytes | None:
        keys = self.table.keys(args) if self.table is not None else None
        return keys[0] if keys else None

    def relay_key(self, args: list[bytes]) -> bytes | None:
        """SSUBSCRIBE listens on its channel's node; other relays on any master."""
        return self.first_key(args) if args[0].upper() == b"SSUBSCRIBE" else None

    def refusal(self, name: bytes, args: list[bytes]) -> bytes | None:
        """What a cluster cannot do through one proxy connection (answered at once)."""
        if name == b"SELECT" and len(args) == 2 and args[1] != b"0":
            return errors.SELECT_IN_CLUSTER
        if name in (b"MONITOR", b"WAIT", b"WAITAOF", b"SYNC", b"PSYNC", b"REPLCONF"):
            return cc.node_local_error(name.lower())
        spec = self.table.lookup(args) if self.table is not None else None
        if name == b"SSUBSCRIBE" or (spec is not None and spec.blocking):
            if self.slot_of(args) is cc.CROSSSLOT:
                return errors.CROSSSLOT
        return None

    async def run_everywhere(self, args, proto: int = 2) -> list[bytes]:
        """One command on every master (e.g. the FLUSHALL script); every master's reply."""
        masters = list(self.master_list)
        if not masters:
            return [errors.upstream_unavailable(self.reason)]
        return list(await asyncio.gather(*(self._run_on(node, _as_bytes(args), proto) for node in masters)))

    def _node_for_key(self, key) -> NodePool | None:
        if key is None:
            return self.any_master()
        return self.slots[key_slot(key if isinstance(key, bytes) else str(key).encode())]

    # -- dedicated connections -------------------------------------------------------------------
    def take_free(self, proto: int, key: bytes | None = None):
        node = self._node_for_key(key)
        return node.take_free(proto) if node is not None else None

    async def get_dedicated(self, proto: int, key: bytes | None = None):
        node = self._node_for_key(key)
        if node is None:
            raise UpstreamUnavailable(self.reason)
        return await node.get_dedicated(proto)

    def release(self, conn, clean: bool) -> None:
        conn.pool.release(conn, clean)

    # -- running commands with redirects and retries --------------------------------------------------
    async def execute(self, *args, proto: int = 2, key: bytes | None = None):
        """Run one command where its keys live (split and merged when they span slots); returns the
        hiredis-parsed reply. Raises UpstreamUnavailable when no node could take it in time."""
        raw = await self.run(args, proto, key=key)
        if raw.startswith(LOST):
            raise UpstreamUnavailable(raw[5:].decode(errors="replace").strip())
        return parse_reply(raw)

    def resolve(self, redirecting: Redirecting, data) -> None:
        """A batch came back with redirects or retryable errors: redo those commands, then deliver."""
        replies = split_replies(data, redirecting.count)
        redo = [i for i, reply in enumerate(replies) if needs_retry(reply)]
        if not redo:
            redirecting.waiter.on_reply(data)
            return
        # Never leave a client waiting on a bug: it gets the original replies.
        self.background.spawn(self._resolve(redirecting, replies, redo),
                              lambda: redirecting.waiter.on_reply(b"".join(replies)), "cluster: re-routing a batch")

    async def _resolve(self, redirecting: Redirecting, replies: list[bytes], redo: list[int]) -> None:
        commands = parse_requests(redirecting.request)[redirecting.done:]
        results = await asyncio.gather(*(
            self.run(commands[i], redirecting.proto, first=replies[i], unsent=redirecting.unsent)
            for i in redo))
        for i, reply in zip(redo, results, strict=True):
            replies[i] = reply
        redirecting.waiter.on_reply(b"".join(replies))

    async def run(self, args, proto: int = 2, first: bytes | None = None, unsent: bool = False,
                  key: bytes | None = None) -> bytes:
        """Run one command and return its raw reply, following MOVED/ASK and retrying (see the module
        header). `first` is a reply already received for it (a redirect to follow)."""
        args = _as_bytes(args)
        loop = self.loop
        deadline = loop.time() + self.retry_window
        table = self.table
        readonly = table is not None and table.readonly(args)
        if first is not None and table is not None and table.stateful(args):
            return first        # a blocking command or WATCH must not land on a shared connection
        reply = first
        attempts = 0
        while True:
            target, asking = None, False
            if reply is not None:
                if not needs_retry(reply) or loop.time() >= deadline:
                    return reply
                self.counters.retries += 1
                attempts += 1
                if attempts > 3:        # nodes disagree for a moment (mid-reshard): don't spin
                    await asyncio.sleep(min(0.1, 0.01 * attempts))
                if reply.startswith((b"-MOVED ", b"-ASK ")):
                    redirect = slotmap.parse_redirect(reply)
                    if redirect is None:
                        return reply
                    target = self._node(redirect.host, redirect.port)
                    if redirect.ask:
                        self.counters.ask += 1
                        asking = True
                    else:
                        self._moved(redirect.slot, target)
                elif reply.startswith(LOST):
                    if not (unsent or readonly):
                        return reply
                    await self.wait_refresh(deadline)
                else:   # TRYAGAIN (keys mid-migration), CLUSTERDOWN/READONLY/MASTERDOWN/LOADING (failover)
                    self.request_refresh()
                    await asyncio.sleep(0.05)
            if target is None:
                if not self.ready.is_set():
                    await self.wait_refresh(deadline)
                    table = self.table
                    if not self.ready.is_set():
                        return errors.upstream_unavailable(self.reason)
                placed: tuple[int, Any] = cc.place(table, args) if table is not None else (cc.ANY, None)
                kind, value = placed
                if kind == cc.SLOT:
                    target = self.node_for_slot(value, readonly)
                elif kind == cc.ANY:
                    target = self._node_for_key(key)
                elif kind == cc.ERROR:
                    return value
                else:
                    return await self._composite(kind, value, args, proto)
            reply, unsent = await self._send(target, args, proto, asking)

    async def _send(self, node: NodePool | None, args: list[bytes], proto: int, asking: bool = False):
        """Send one command to one node; returns (raw reply, whether it certainly never left)."""
        replies, unsent = await self._send_batch(node, encode_command(args), 1, proto, asking)
        return replies[0], unsent

    async def _send_batch(self, node: NodePool | None, request: bytes, count: int, proto: int,
                          asking: bool = False) -> tuple[list[bytes], bool]:
        """`count` commands as one request to one node (ASKING first when asked): (replies, unsent)."""
        if node is None:
            return [errors.upstream_unavailable(self.reason)] * count, True
        conn = node.pick(proto)
        if conn is None:
            if node.connected_once():
                return [errors.upstream_unavailable(node.reason)] * count, True
            conn = await node.wait_conn(proto, self.cfg.connect_timeout)    # a node just learned of
            if conn is None:
                return [errors.upstream_unavailable(node.reason)] * count, True
        future = self.loop.create_future()
        waiter = _Waiter(future, count + asking)
        conn.send_direct(ASKING + request if asking else request, waiter)
        try:
            raw = await future
        except UpstreamUnavailable as exc:
            return [errors.failed(str(exc))] * count, waiter.unsent
        replies = split_replies(raw, count + asking)
        return (replies[1:] if asking else replies), False

    async def transaction(self, commands: list[list[bytes]], proto: int, slot: int | None,
                          first: list[bytes] | None = None, unsent: bool = False) -> bytes:
        """MULTI + commands + EXEC on the node of `slot` (any master when None); returns EXEC's reply.
        A transaction Redis refused because its slot moved (MOVED/ASK/TRYAGAIN at queue time, so
        nothing ran) is sent again where the slot is now."""
        request = encode_command((b"MULTI",)) + b"".join(map(encode_command, commands)) + \
            encode_command((b"EXEC",))
        count = len(commands) + 2
        deadline = self.loop.time() + self.retry_window
        replies = first
        while True:
            target, asking = None, False
            if replies is not None:
                queued = replies[1:-1]
                moved = next((r for r in queued if r.startswith((b"-MOVED ", b"-ASK ", b"-TRYAGAIN"))), None)
                lost = replies[-1].startswith(LOST) and unsent
                if (moved is None and not lost) or self.loop.time() >= deadline:
                    return replies[-1]
                self.counters.retries += 1
                if moved is not None and not moved.startswith(b"-TRYAGAIN"):
                    redirect = slotmap.parse_redirect(moved)
                    if redirect is None:
                        return replies[-1]
                    target = self._node(redirect.host, redirect.port)
                    if redirect.ask:
                        asking = True
                    else:
                        self._moved(redirect.slot, target)
                elif lost:
                    await self.wait_refresh(deadline)
                else:
                    await asyncio.sleep(0.05)
            if target is None:
                target = self.slots[slot] if slot is not None else self.any_master()
            replies, unsent = await self._send_batch(target, request, count, proto, asking)

    async def _composite(self, kind: int, value, args: list[bytes], proto: int) -> bytes:
        if kind == cc.SPLIT:
            merge, parts = value
            replies = await asyncio.gather(*(self.run(part_args, proto) for _, _, part_args in parts))
            total = (len(args) - 1) // 2 if merge == "ok" else len(args) - 1
            return cc.merge_split(merge, total, parts, list(replies))
        if kind == cc.FANOUT:
            spec, all_nodes = value
            nodes = list(self.master_list)
            if all_nodes:       # replicas too (only known when they serve reads)
                seen = {n.addr for n in nodes}
                for replicas in self.slot_replicas:
                    for replica in replicas:
                        if replica.addr not in seen:
                            seen.add(replica.addr)
                            nodes.append(replica)
            if not nodes:
                return errors.upstream_unavailable(self.reason)
            replies = await asyncio.gather(*(self._run_on(node, args, proto) for node in nodes))
            return cc.merge_fanout(spec, list(replies))
        if kind == cc.SCAN:
            return await self._scan(args, proto)
        if kind == cc.ONE:
            return await self._run_on(self.master_list[0] if self.master_list else None, args, proto)
        return errors.INTERNAL

    async def _run_on(self, node: NodePool | None, args: list[bytes], proto: int) -> bytes:
        reply, _ = await self._send(node, args, proto)
        return reply

    async def _scan(self, args: list[bytes], proto: int) -> bytes:
        """SCAN over every master in turn: the cursor's low bits say which master, the rest is that
        master's own cursor."""
        try:
            cursor = int(args[1])
            if cursor < 0:
                raise ValueError
        except ValueError:
            return errors.INVALID_CURSOR
        masters = self.master_list
        index, node_cursor = cursor & ((1 << SCAN_BITS) - 1), cursor >> SCAN_BITS
        if index >= len(masters):
            return b"*2\r\n$1\r\n0\r\n*0\r\n"
        reply = await self._run_on(masters[index], [args[0], b"%d" % node_cursor, *args[2:]], proto)
        if reply[:1] != b"*":
            return reply
        head, keys = split_replies(reply[reply.index(b"\r\n") + 2:], 2)
        next_cursor = int(parse_reply(head))
        if next_cursor:
            out = (next_cursor << SCAN_BITS) | index
        else:
            out = index + 1 if index + 1 < len(masters) else 0
        text = b"%d" % out
        return b"*2\r\n$%d\r\n%s\r\n" % (len(text), text) + keys
