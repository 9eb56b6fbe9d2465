"""Routed writes on routes with `write.mode` write-behind or write-through.

write-behind: one Lua script (wbqueue.WRITE) runs the client's own command on the cached key and
    appends the key's resulting state to its partition's stream, so Redis decides the reply and the
    options (NX, XX, GET, EX, KEEPTTL ...), and the cache and the queue change together. Commands
    whose result depends on the key's current value (HSET of some fields, INCR, SET NX, DEL's count)
    need the key cached first: the script answers LOAD, the key is loaded through the read path, and
    the script runs again.
write-through: the database first (the key's resulting row, computed here), then the cache; a
    database error leaves the cache unchanged and reaches the client. Its database write supersedes
    (backends/base.py): it always applies, and every entry queued for the key before it is skipped
    when it reaches the database, so it cannot be overwritten by an older queued write.

Checks, in Redis's order (arguments.py): the arity, then the options and numeric arguments as Redis
would check them, then the route's rules and the value. Nothing changes, in the cache or the
database, for a command refused at any of these steps.

A session's routed write holds the session's later commands until it is answered, so a pipeline
reads its own writes. MSET, DEL and UNLINK with several keys are applied key by key.

Upstream unreachable on a single node: SET/SETEX/PSETEX/DEL on a write-behind route fall back to
write-through. That Redis may come back with older entries of the key still queued: they reach the
database after the write-through, find its newer version there and are skipped, and the cached
value they left is dropped (flusher.py), so readers get the write-through's value. Versions compare a
queue entry's id (Redis's clock) with the write-through's (this host's clock), so the two clocks must
agree to within the time between the outage and the key's next queued write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..backends.base import BackendBusy, BackendError, WriteOp
from ..cache.encoding import from_hash
from ..cache.keys import companion
from ..cache.loader import Loader, Outcome, ttl_ms
from ..protocol import errors
from ..protocol.resp import OK, encode_reply
from ..upstream.scripts import Script
from ..upstream.single import UpstreamUnavailable
from .arguments import argument_error, set_options
from .queue import WRITE

log = logging.getLogger("cacheproxy.writes")

SET_FAMILY = {b"SET", b"SETEX", b"PSETEX", b"SETNX", b"GETSET", b"GETDEL"}
STRING_ONLY = {b"INCR", b"INCRBY", b"DECR", b"DECRBY", b"INCRBYFLOAT", b"APPEND", b"SETRANGE"}
HASH_WRITES = {b"HSET", b"HMSET", b"HSETNX", b"HDEL", b"HINCRBY", b"HINCRBYFLOAT"}
DELETES = {b"DEL", b"UNLINK"}
MANAGED = SET_FAMILY | STRING_ONLY | HASH_WRITES | DELETES | {b"MSET"}
# Commands that state the key's whole new value: no need to know the old one, nothing to compare.
ASSERTING = {b"SETEX", b"PSETEX", b"HSET", b"HMSET"}
THROUGH_COMMANDS = {b"SET", b"SETEX", b"PSETEX", b"HSET", b"HMSET", b"HDEL"} | DELETES
VALUE_AT = {b"SET": 2, b"SETNX": 2, b"GETSET": 2, b"SETEX": 3, b"PSETEX": 3}

# write-through cache step: KEYS data, lease, neg; ARGV ttl ms (0: keep what the command leaves), command...
_THROUGH = """
redis.call('DEL', KEYS[2], KEYS[3])
local reply = redis.pcall(unpack(ARGV, 2))
if type(reply) == 'table' and reply.err then return {'ERR', reply.err} end
if type(reply) == 'table' and reply.ok then reply = nil end
local ttl = tonumber(ARGV[1])
if ttl > 0 and redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ttl) end
if reply == nil then return {'OK'} end
return {'DONE', reply}
"""


class WriteRefused(Exception):
    """A write the proxy refuses before anything changed; `reply` is the client's error line."""

    def __init__(self, reply: bytes):
        super().__init__(reply.decode(errors="replace").strip())
        self.reply = reply


def needs_state(name: bytes, args: list[bytes]) -> bool:
    """Does the command's result depend on the key's current value (which may only be in the database)?"""
    if name == b"SET":
        return bool(set_options(args))
    return name not in (b"SETEX", b"PSETEX")


def compares(name: bytes, args: list[bytes]) -> bool:
    """Queue only if the key changed (NX that lost, HDEL of a missing field ...)? Commands that state
    the whole value are always queued: the database may differ from the cache."""
    if name == b"SET":
        return bool(set_options(args) & {b"NX", b"XX"})
    return name not in ASSERTING and name not in (b"INCR", b"INCRBY", b"DECR", b"DECRBY", b"INCRBYFLOAT")


class Writes:
    def __init__(self, router, pool, loader: Loader, wb_cfg, writer=None):
        self.router = router
        self.pool = pool
        self.loader = loader
        self.cfg = wb_cfg
        self.writer = writer          # notified of new entries so the local flusher wakes at once
        self._locks: dict[bytes, list] = {}      # key -> [lock, users]: write-through order per key
        self._seq = 0
        # Set by the server (ops/durability.py): its `refusal` says why the upstream may lose queued
        # writes (upstream.durability: refuse), and write-behind writes are refused while it does.
        self.queue_guard: Any = None   # ops/durability.DurabilityMonitor: refuses writes when the queue is unsafe

    def reconfigure(self, router, wb_cfg, writer) -> None:
        self.router, self.cfg, self.writer = router, wb_cfg, writer

    # -- dispatch --------------------------------------------------------------------------------------
    def handles(self, name: bytes, args: list[bytes]) -> bool:
        """True when some key of the command is on a route that takes writes (or refuses them)."""
        if name not in MANAGED:
            return False
        for key in _keys(name, args):
            hit = self.router.match(key)
            if hit is not None and (hit[0].write is not None or hit[0].read_only):
                return True
        return False

    def start(self, session, frames: list, i: int) -> int:
        """Answer frames[i]; the session's later commands wait for it (read-your-writes)."""
        args = frames[i]
        slot = session.new_slot(1)
        proto = session.proto

        async def step():
            await session.wait_turn(slot)     # the script runs on another connection: after earlier commands
            session.fill(slot, await self.execute(args, proto))
        return session.step(frames, i, step, slot)

    async def execute(self, args: list[bytes], proto: int) -> bytes:
        name = args[0].upper()
        if name == b"MSET":
            if len(args) < 3 or len(args) % 2 == 0:
                return errors.wrong_arity(name)
            for key, value in zip(args[1::2], args[2::2], strict=True):
                reply = await self.one([b"SET", key, value], proto)
                if reply.startswith(b"-"):
                    return reply
            return OK
        if name in DELETES:
            if len(args) < 2:
                return errors.wrong_arity(name)
            removed = 0
            for key in args[1:]:
                reply = await self.one([args[0], key], proto)
                if reply.startswith(b"-"):
                    return reply
                removed += int(reply[1:-2])
            return b":%d\r\n" % removed
        return await self.one(args, proto)

    async def one(self, args: list[bytes], proto: int) -> bytes:
        """A single-key write: args[1] is the key."""
        name, key = args[0].upper(), args[1]
        hit = self.router.match(key)
        if hit is None or (hit[0].write is None and not hit[0].read_only):
            # Not routed, or a route without `write`: the cache alone changes; void any fill in flight.
            return await self._plain(args, proto)
        route, params = hit
        stats = route.stats
        refusal = argument_error(name, args)
        if refusal is not None:          # what Redis itself would answer, before any rule of the proxy's
            stats.write_errors += 1
            return refusal
        try:
            self._check(route, name, args)
            mode = route.write.mode
            refusal = self.queue_guard.refusal if self.queue_guard is not None and mode == "write-behind" else None
            if refusal:
                stats.write_errors += 1
                return errors.write_behind_refused(refusal)
            if mode == "write-behind":
                try:
                    reply = await self._behind(route, params, name, args, proto)
                except UpstreamUnavailable:
                    # The queue lives on the upstream: without it, only the database can take the write.
                    # Not on a cluster: there a slot is down only while a replica takes over, and its
                    # queued entries survive to land after (and over) a write-through.
                    if self.writer.layout.cluster or (needs_state(name, args) and name not in DELETES):
                        raise
                    reply = await self._through(route, params, name, args, proto)
            else:
                reply = await self._through(route, params, name, args, proto)
        except WriteRefused as exc:
            stats.write_errors += 1
            return exc.reply
        except UpstreamUnavailable as exc:
            stats.write_errors += 1
            return errors.upstream_unavailable(str(exc))
        except BackendError as exc:
            stats.write_errors += 1
            if isinstance(exc, BackendBusy):      # every pooled connection in use: our saturation
                return errors.backend_busy(exc.backend, str(exc))
            if exc.transient:
                return errors.backend_unavailable(exc.backend, str(exc))
            return errors.backend_refused(exc.backend, str(exc))
        stats.writes += 1
        return reply

    def _check(self, route, name: bytes, args: list[bytes]) -> None:
        """Refuse, before anything changes, a write the route cannot store."""
        where = f"route {route.name!r}"
        if route.read_only:
            raise WriteRefused(errors.refused(f"{where} is read-only (write.mode: read-only); the write was refused"))
        if route.read.many:
            raise WriteRefused(errors.refused(f"{where} caches a list of rows (many: true) and cannot be written"))
        hash_route = route.family == "hash"
        if hash_route and (name in SET_FAMILY or name in STRING_ONLY):
            raise WriteRefused(errors.refused(f"{name.decode()} is not supported on {where}: it stores hashes "
                                              f"(use HSET/HDEL)"))
        if not hash_route and name in HASH_WRITES:
            raise WriteRefused(errors.WRONGTYPE)
        if name in STRING_ONLY and route.encoding != "string":
            raise WriteRefused(errors.refused(f"{name.decode()} is not supported on {where}: it stores JSON "
                                              f"documents (use SET with the whole document)"))
        if route.write.mode == "write-through" and name not in THROUGH_COMMANDS:
            raise WriteRefused(errors.refused(f"{name.decode()} is not supported on write-through {where}: use "
                                              f"{'HSET/HDEL' if hash_route else 'SET/SETEX/PSETEX/MSET'} or DEL"))
        if route.write.mode == "write-through" and name == b"SET" and set_options(args) - {b"KEEPTTL"}:
            raise WriteRefused(errors.refused(f"SET with NX, XX or GET is not supported on write-through {where}"))
        at = VALUE_AT.get(name)
        if at is not None and len(args) > at and route.encoding == "json":
            try:
                route.value_fields(args[at])
            except ValueError as exc:
                raise WriteRefused(errors.bad_value(route.name, str(exc))) from None

    def _upsert(self, route, key: bytes, params: dict, value: bytes, version: int = 0) -> WriteOp:
        try:
            return route.upsert_op(key, params, value, version)
        except ValueError as exc:
            raise WriteRefused(errors.bad_value(route.name, str(exc))) from None

    # -- write-behind ----------------------------------------------------------------------------------
    async def _behind(self, route, params: dict, name: bytes, args: list[bytes], proto: int) -> bytes:
        key = args[1]
        layout = self.writer.layout       # a write-behind route always has a flusher (server.install_routes)
        slot, partition, stream = layout.place(key)
        keys = [key, companion("pend", key), companion("lease", key), companion("neg", key), stream]
        cap = -(-self.cfg.max_pending // layout.partitions)
        state = "1" if needs_state(name, args) else "0"
        compare = "1" if compares(name, args) else "0"
        for _ in range(3):
            result = await WRITE(self.pool, keys, [cap, state, compare, *args])
            status = result[0]
            if status != b"LOAD":
                break
            outcome, found = await self.loader.load(route, key, params)
            if outcome == Outcome.DIRECT:
                raise UpstreamUnavailable(self.pool.last_error)
            if found is not None and not found.exists:
                state = "0"          # the database has no such row: the key is known to be absent
        else:
            state = "0"
            result = await WRITE(self.pool, keys, [cap, state, compare, *args])
            status = result[0]
        if status == b"FULL":
            route.stats.queue_full += 1
            if route.write.on_backpressure == "write-through" and name in THROUGH_COMMANDS:
                return await self._through(route, params, name, args, proto)
            raise WriteRefused(errors.queue_full(int(result[1]), partition, self.cfg.max_pending))
        if len(result) > 2 or (status == b"OK" and len(result) > 1):      # an entry was queued
            if layout.cluster:
                # Tell the partition's owner (maybe another sidecar) which slot stream has entries. A
                # crash before this SADD is caught by the owners' sweep.
                dirty = layout.dirty(partition)
                try:
                    await self.pool.execute(b"SADD", dirty, slot, key=dirty)
                except UpstreamUnavailable as exc:      # the write is queued: answer it all the same
                    log.warning("write-behind: could not mark slot %d dirty (%s); the sweep will find it", slot, exc)
                    self.writer.sweep_soon()
            self.writer.notify(partition)
        return _reply(result, proto)

    # -- write-through ---------------------------------------------------------------------------------
    async def _through(self, route, params: dict, name: bytes, args: list[bytes], proto: int) -> bytes:
        key = args[1]
        entry = self._locks.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:      # this proxy applies one key's writes to the database and cache in order
                op = await self._through_op(route, params, name, args)
                if op is not None:
                    results = await route.backend.write_batch(route.write_spec, [op])
                    if isinstance(results[0], BackendError):
                        raise results[0]
                ttl = ttl_ms(route.ttl) if route.ttl.seconds is not None else 0
                try:
                    result = await THROUGH(self.pool, [key, companion("lease", key), companion("neg", key)],
                                           [ttl, *args])
                except UpstreamUnavailable:
                    # The database has the write; the cache is unreachable and will be refilled later.
                    return b":1\r\n" if name in DELETES else OK
                return _reply(result, proto)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._locks[key]

    async def _through_op(self, route, params: dict, name: bytes, args: list[bytes]) -> WriteOp | None:
        """The database write of a write-through command: it supersedes whatever is stored."""
        op = await self._through_row(route, params, name, args)
        if op is not None:
            op.supersede = True
        return op

    async def _through_row(self, route, params: dict, name: bytes, args: list[bytes]) -> WriteOp | None:
        self._seq = (self._seq + 1) % (1 << 20)
        version = (int(time.time() * 1000) << 20) + self._seq
        key = args[1]
        if name in DELETES:
            return route.write_op("delete", key, params, version=version) if route.write.delete_on_del else None
        if name in (b"SET", b"SETEX", b"PSETEX"):
            return self._upsert(route, key, params, args[VALUE_AT[name]], version)
        # HSET/HMSET/HDEL: the database gets the whole resulting row.
        outcome, found = await self.loader.load(route, args[1], params)
        if outcome == Outcome.DIRECT:
            row = dict(found.pairs or []) if found is not None else {}
        else:
            row = dict(_pairs(await self.pool.execute(b"HGETALL", args[1], key=args[1])))
        if name == b"HDEL":
            for field in args[2:]:
                row.pop(field, None)
            if not row:
                return route.write_op("delete", key, params, version=version) if route.write.delete_on_del else None
        else:
            row.update(zip(args[2::2], args[3::2], strict=True))
        return route.write_op("upsert", key, params, fields=from_hash(row.items()), version=version)

    async def _plain(self, args: list[bytes], proto: int) -> bytes:
        key = args[1]
        voided = [b"DEL", companion("lease", key), companion("neg", key)] if self.router.match(key) else None
        try:
            if voided:
                await self.pool.execute(*voided, key=key)
            reply = await self.pool.execute(*args, proto=proto, key=key)
        except UpstreamUnavailable as exc:
            return errors.upstream_unavailable(str(exc))
        if isinstance(reply, Exception):
            return errors.line(str(reply))
        if reply == b"OK":
            return OK
        return encode_reply(reply, proto)


def _keys(name: bytes, args: list[bytes]) -> list[bytes]:
    if name in DELETES:
        return args[1:]
    if name == b"MSET":
        return args[1::2]
    return args[1:2]


def _pairs(flat) -> list[tuple[bytes, bytes]]:
    if isinstance(flat, dict):
        return list(flat.items())
    return list(zip(flat[0::2], flat[1::2], strict=False))


def _reply(result: list, proto: int) -> bytes:
    status = result[0]
    if status == b"OK":
        return OK
    if status == b"ERR":
        message = result[1].decode(errors="replace") if isinstance(result[1], bytes) else str(result[1])
        return errors.line(message)
    return encode_reply(result[1], proto)


THROUGH = Script(_THROUGH)
