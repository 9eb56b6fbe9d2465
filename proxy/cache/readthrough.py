"""Routed commands inside a client session: reads served through the loader, writes that void leases.

A routed read goes to the upstream like any command, with a waiter that looks at the reply:
    hit  -> the raw reply goes to the client as it is (refresh-ahead may start in the background)
    miss -> a task loads the key (loader.py), then re-issues the client's command so the reply is
            exactly what Redis answers for the freshly filled key (or its negative entry)
The client's slot in its reply queue is filled whenever that finishes: later commands in the same
pipeline are not held up, and replies still leave in request order.

A nil is only a miss when it cannot mean anything else: GET/GETEX nil, HGETALL empty, HLEN 0,
EXISTS 0, TTL -2. For HGET/HMGET/HEXISTS (a nil field may sit in an existing hash), and for routes
that need the remaining TTL (refresh-ahead, stale-if-error), a PTTL rides in the same batch.

Routed writes are forwarded after a DEL of the key's lease and negative entry, so a fill that
started before the write can no longer land (see loader.py).

MGET/EXISTS over many missing keys run at most limits.max_loads_per_command loads at once (and at
most UPSTREAM_FANOUT per-key upstream calls), never one task per key; the loads wait in the client
session's own admission lane (loader.py), so one command cannot crowd out other clients.
"""

from __future__ import annotations

import logging

from ..backends.base import BackendBusy, BackendError
from ..protocol import errors
from ..protocol.commands import MULTI_READS, SINGLE_READS, routed_keys
from ..protocol.resp import encode_command, encode_reply, parse_reply, scan_replies
from ..upstream.single import UpstreamUnavailable
from .admission import map_bounded
from .keys import companion
from .loader import Found, Loader, Outcome

log = logging.getLogger("cacheproxy.readthrough")

# A nil is only a miss when it cannot mean anything else (see the module docstring).
MISS_REPLIES = frozenset((b"$-1\r\n", b"_\r\n", b"*0\r\n", b"%0\r\n", b":0\r\n", b":-2\r\n"))
WRONGTYPE = errors.WRONGTYPE
UPSTREAM_FANOUT = 64      # per-key upstream calls (EXISTS) one command keeps in flight at once


class ReadThrough:
    def __init__(self, router, pool, loader: Loader, writes=None, max_loads_per_command: int = 16):
        self.router = router
        self.pool = pool
        self.loader = loader
        self.writes = writes      # writes.Writes: routes with write-behind / write-through
        self.max_loads = max_loads_per_command
        self.prefixes = router.prefixes   # bytes.startswith(tuple): the cheap first test

    def owns(self, name: bytes, args: list[bytes]) -> bool:
        """Does any key of this command belong to a route? Called on the hot path for routable names."""
        if len(args) < 2:
            return False
        keys = routed_keys(name, args)
        prefixes = self.prefixes
        match = self.router.match
        return any(key.startswith(prefixes) and match(key) is not None for key in keys)

    # -- dispatch from the session -------------------------------------------------------------------
    def handle(self, session, frames: list, i: int) -> int:
        """The session found a routed command it owns (owns() was true): answer frames[i] in order.
        Returns the index of the next frame to dispatch (a write holds the rest until it is done)."""
        args = frames[i]
        name = args[0].upper()
        if name in SINGLE_READS:
            self._single(session, name, args)
        elif name in MULTI_READS:
            return self._multi(session, frames, i, name)
        elif self.writes is not None and self.writes.handles(name, args):
            return self.writes.start(session, frames, i)
        else:
            self._write(session, name, args)
        return i + 1

    def _single(self, session, name: bytes, args: list[bytes]) -> None:
        key = args[1]
        route, params = self.router.match(key)
        family, ambiguous = SINGLE_READS[name]
        if family is not None and family != route.family:
            session.reply(WRONGTYPE)
            return
        slot = session.new_slot(1)
        with_ttl = ambiguous or route.needs_pttl
        read = _Read(self, session, slot, route, key, params, args, with_ttl)
        conn = session.conn_for_key(key)
        if conn is None:
            read.miss(None)
            return
        request = encode_command(args)
        if with_ttl:
            request = encode_command((b"PTTL", key)) + request
        conn.send(request, read)

    def _multi(self, session, frames: list, i: int, name: bytes) -> int:
        """MGET/EXISTS over routed keys read on the pool's connections: a step, so they run after the
        client's earlier commands and before its later ones."""
        args = frames[i]
        slot = session.new_slot(1)

        async def step():
            await session.wait_turn(slot)
            await self._multi_task(session, slot, name, args)
        return session.step(frames, i, step, slot)

    def _write(self, session, name: bytes, args: list[bytes]) -> None:
        voided: list[bytes] = []
        for key in routed_keys(name, args):
            if self.router.match(key) is not None:
                voided += (companion("lease", key), companion("neg", key))
        session.send_commands([[b"DEL", *voided], args], after=_drop_first)

    # -- multi-key reads -----------------------------------------------------------------------------
    async def _multi_task(self, session, slot, name: bytes, args: list[bytes]) -> None:
        keys = args[1:]
        proto = session.proto
        try:
            if name == b"MGET":
                values = await self._call(proto, args)
            else:   # EXISTS counts every key (repeats included): ask per key to know which are missing
                values = await self._call_many(proto, [(b"EXISTS", k) for k in keys])
        except UpstreamUnavailable:
            values = [None] * len(keys) if name == b"MGET" else [0] * len(keys)
        if isinstance(values, Exception):
            session.fill(slot, errors.line(str(values)))
            return
        missing = {}
        for index, key in enumerate(keys):
            if values[index] in (None, 0) and key not in missing:
                hit = self.router.match(key)
                if hit is not None and (name == b"EXISTS" or hit[0].family == "value"):
                    missing[key] = hit
        if missing:
            async def load(item):
                key, (route, params) = item
                return await self._load(route, key, params, session)
            try:
                loaded = await map_bounded(load, list(missing.items()), self.max_loads)
            except BackendError as exc:
                session.fill(slot, backend_error(exc))
                return
            found = dict(zip(missing, loaded, strict=True))
            recheck = [k for k, (outcome, _) in found.items() if outcome == Outcome.CACHED]
            fresh = {}
            if recheck:
                try:
                    if name == b"MGET":
                        fresh = dict(zip(recheck, await self._call(proto, [b"MGET", *recheck]), strict=True))
                    else:
                        fresh = dict(zip(recheck, await self._call_many(proto, [(b"EXISTS", k) for k in recheck]),
                                         strict=True))
                except UpstreamUnavailable:
                    pass
            for index, key in enumerate(keys):
                if key in found:
                    outcome, result = found[key]
                    if key in fresh:
                        values[index] = fresh[key]
                    elif result is not None:
                        values[index] = result.value if name == b"MGET" else int(result.exists)
        if name == b"MGET":
            session.fill(slot, encode_reply(list(values), proto))
        else:
            session.fill(slot, b":%d\r\n" % sum(values))

    async def _load(self, route, key, params, session):
        route.stats.misses += 1
        return await self.loader.load(route, key, params, owner=session)

    async def _call(self, proto: int, args):
        return await self.pool.execute(*args, proto=proto, key=args[1])

    async def _call_many(self, proto: int, commands: list) -> list:
        return await map_bounded(lambda c: self.pool.execute(*c, proto=proto, key=c[1]), commands, UPSTREAM_FANOUT)


class _Read:
    """Waiter for one routed single-key read (one reply, or PTTL + the reply)."""

    __slots__ = ("rt", "session", "slot", "route", "key", "params", "args", "with_ttl", "count")

    def __init__(self, rt: ReadThrough, session, slot, route, key, params, args, with_ttl: bool):
        self.rt, self.session, self.slot = rt, session, slot
        self.route, self.key, self.params, self.args = route, key, params, args
        self.with_ttl = with_ttl
        self.count = 2 if with_ttl else 1

    def on_reply(self, data) -> None:
        route = self.route
        if errors.is_upstream_lost(data):
            self.miss(None)       # the upstream died under this read: answer from the backend
            return
        if self.with_ttl:
            split, _ = scan_replies(data, 0, 1)
            pttl = parse_reply(data[:split])
            reply = data[split:]
            miss = not isinstance(pttl, int) or pttl == -2
        else:
            pttl = None
            reply = data
            miss = reply in MISS_REPLIES
        if not miss and pttl is not None and pttl >= 0 and route.ttl.stale_if_error:
            if pttl <= route.ttl.stale_if_error * 1000:
                self.miss(reply)            # logically expired: reload, but keep the stale reply
                return
        if miss:
            self.miss(None)
            return
        route.stats.hits += 1
        if pttl is not None and pttl > 0:
            self.rt.loader.maybe_refresh(route, self.key, self.params, pttl)
        self.session.fill(self.slot, reply)

    def miss(self, stale) -> None:
        self.route.stats.misses += 1
        session = self.session
        session.host.background.spawn(self._answer(stale), lambda: session.fill(self.slot, errors.INTERNAL),
                                      f"read-through of {self.key!r}")

    async def _answer(self, stale) -> None:
        rt, session = self.rt, self.session
        try:
            outcome, found = await rt.loader.load(self.route, self.key, self.params, owner=session)
        except BackendError as exc:
            if stale is not None:
                self.route.stats.stale_served += 1
                session.fill(self.slot, stale)
            else:
                session.fill(self.slot, backend_error(exc))
            return
        if outcome == Outcome.CACHED:
            conn = session.conn_for_key(self.key)
            if conn is not None:
                try:
                    session.fill(self.slot, await conn.call(*self.args))
                    return
                except UpstreamUnavailable:
                    pass
            if found is None:
                session.fill(self.slot, errors.upstream_unavailable(rt.pool.reason))
                return
        session.fill(self.slot, reply_from_found(self.args, found or Found(), session.proto))


def backend_error(exc: BackendError) -> bytes:
    """The client's error line for a failed load: busy (our pool is saturated), unavailable (try
    again), or a read that cannot work for this key (retrying does not help)."""
    if isinstance(exc, BackendBusy):
        return errors.backend_busy(exc.backend, str(exc))
    if not exc.transient:
        return errors.backend_read_failed(exc.backend, str(exc))
    return errors.backend_unavailable(exc.backend, str(exc))


def reply_from_found(args: list[bytes], found: Found, proto: int) -> bytes:
    """Answer a read from a loaded row when the cache cannot (upstream down): what Redis would say."""
    name = args[0].upper()
    pairs = dict(found.pairs or [])
    if name in (b"GET", b"GETEX"):
        return encode_reply(found.value, proto)
    if name == b"HGETALL":
        return encode_reply(pairs, proto)
    if name == b"HGET":
        return encode_reply(pairs.get(args[2]), proto)
    if name == b"HMGET":
        return encode_reply([pairs.get(f) for f in args[2:]], proto)
    if name == b"HEXISTS":
        return encode_reply(int(args[2] in pairs), proto)
    if name == b"HLEN":
        return encode_reply(len(pairs), proto)
    if name in (b"TTL", b"PTTL"):
        return b":-1\r\n" if found.exists else b":-2\r\n"
    return errors.upstream_unavailable()


def _drop_first(slot, data):
    """The lease DEL that precedes a routed write: the client only sees the write's reply."""
    split, _ = scan_replies(data, 0, 1)
    return data[split:]
