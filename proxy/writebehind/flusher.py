"""The write-behind flusher: takes queued writes from the partition streams to the databases.

Each sidecar heartbeats into a members set and owns at most its fair share of the partitions
(ceil(partitions / live sidecars)) through leases (leases.py). An owner reads its partition through
the consumer group (its own pending entries first: they are what it, or a dead owner whose entries
it claimed, read but never acknowledged), waits up to `max_delay_ms` for a batch to fill, keeps only
each key's last write (`coalesce`), and writes each route's share with one backend batch. Landed
entries are acknowledged and deleted, and their keys get their TTL back (wbqueue.DONE).

Errors, and what an acknowledged write can and cannot become:
- The database unavailable (BackendUnavailable: down, timed out, locked, throttled): the batch is
  retried without limit, with capped exponential backoff and jitter, the partition waiting in order.
  Nothing is dropped and nothing reverts for readers; /metrics shows how long (retrying_seconds,
  lag_seconds) and the log says so at a bounded rate.
- A row the database refuses (BackendPermanentError: a constraint, a type): only that row goes to
  the dead letters with its error (a batch that fails as a whole is retried row by row to find it),
  and its cached value is dropped so reads see what the database holds.
- A write the database skips because it holds a newer version of the key (SUPERSEDED: see
  backends/base.py) is acknowledged; if it was the key's newest queued write, the cached value is
  dropped too, since the database's is newer.
- Before each attempt the owner makes sure it still holds the partition's lease; if not, it drops the
  batch in hand, unwritten and unacknowledged, for the partition's owner.

A sidecar that dies leaves its leases to expire (`claim_idle_ms`); whoever takes its partitions
claims its pending entries (XAUTOCLAIM) and replays them. Backend writes are idempotent and fenced
by version, so a replay is harmless and an older write never lands over a newer one.

On a Redis Cluster a partition is many slot streams (see wbqueue): the owner reads the streams of
the partition's dirty slots together, so a batch still spans many keys, and acknowledges each
stream's share in that stream's slot.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass

from redis.crc import key_slot

from ..backends.base import SUPERSEDED, BackendError, BackendPermanentError, WriteOp
from ..cache.encoding import from_hash
from ..cache.keys import companion
from ..cache.loader import ttl_ms
from ..ops.metrics import (
    WB_BATCH_SIZE,
    WB_DEAD_LETTERED,
    WB_DEAD_LETTERS,
    WB_FLUSH_SECONDS,
    WB_LAG,
    WB_LANDED,
    WB_LEASES_LOST,
    WB_PARTITIONS,
    WB_PENDING,
    WB_RETRIES,
    WB_RETRYING,
    WB_SUPERSEDED,
)
from ..upstream.single import UpstreamUnavailable
from .leases import Leases
from .queue import (
    DONE,
    GROUP,
    OTHERS,
    TAKEN,
    Entry,
    Layout,
    dead_name,
    entry_age_ms,
    entry_version,
    members_name,
    slot_stream_name,
    slot_stream_pattern,
    stream_name,
)

log = logging.getLogger("cacheproxy.writer")

DEAD_MAXLEN = 100_000
SWEEP_EVERY = 60.0      # cluster mode: how often the masters are scanned for streams nobody was told about
FAILING_LOG_EVERY = 30.0    # a route whose database keeps failing is logged at most this often


@dataclass
class _Stream:
    """A stream the owner of a partition reads."""
    name: bytes
    slot: int | None = None      # cluster mode: the slot it belongs to
    history: bool = True         # read its own pending entries first (after a restart or a claim)


def consumer_name(cfg) -> str:
    """Stable across restarts of the same sidecar, so a restarted one resumes its own partitions at once."""
    if cfg.write_behind.consumer:
        return cfg.write_behind.consumer
    worker = os.environ.get("CACHEPROXY_WORKER")
    name = f"{socket.gethostname()}:{cfg.listen.port}"
    return f"{name}:{worker}" if worker else name


class Writer:
    def __init__(self, pool, router, cfg, metrics, name: str):
        self.pool = pool
        self.router = router
        self.cfg = cfg.write_behind
        self.name = name
        self.layout = Layout(self.cfg.stream_prefix, self.cfg.partitions, cfg.upstream.cluster)
        self.leases = Leases(pool, self.cfg.stream_prefix, name, self.cfg.claim_idle_ms)
        self.live = 1
        self.pending = 0
        self.lag_s = 0.0
        self.dead_letters = 0
        self.metrics = metrics
        self._retrying: dict[int, float] = {}     # partition -> wall time its batch in hand first failed
        self._failing: dict[str, list] = {}       # route -> [since, failed attempts, last logged] (monotonic)
        self._stopped = asyncio.Event()           # cuts a retry's backoff short on shutdown
        self._events = [asyncio.Event() for _ in range(self.cfg.partitions)]
        self._tasks: list[asyncio.Task] = []
        self._partition_tasks: list[asyncio.Task] = []
        self._active: dict[int, dict[bytes, _Stream]] = {}     # partition -> streams being read
        self._sweep_now = asyncio.Event()
        self._stopping = False
        self.batch_size = metrics.histogram(WB_BATCH_SIZE)
        self.flush_seconds = metrics.histogram(WB_FLUSH_SECONDS)
        metrics.read(WB_PENDING, lambda: self.pending)
        metrics.read(WB_LAG, lambda: self.lag_s)
        metrics.read(WB_DEAD_LETTERS, lambda: self.dead_letters)
        metrics.read(WB_PARTITIONS, lambda: len(self.owned))
        metrics.read(WB_RETRYING, self._retrying_seconds)
        metrics.read(WB_LEASES_LOST, lambda: self.leases.lost)
        metrics.declare(*_OUTCOMES.values())

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def owned(self) -> set[int]:
        return self.leases.owned

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._warn_unused()
        self._partition_tasks = [loop.create_task(self._partition(p)) for p in range(self.cfg.partitions)]
        self._tasks = [loop.create_task(self._heartbeat()), loop.create_task(self._monitor()),
                       loop.create_task(self.leases.keep()), *self._partition_tasks]
        if self.layout.cluster:
            self._tasks.append(loop.create_task(self._sweep()))

    def _warn_unused(self) -> None:
        if "max_attempts" in self.cfg.model_fields_set:
            log.warning("write_behind.max_attempts is no longer used: an unavailable database is retried "
                        "without limit and a refused row is dead-lettered at once; remove the setting")

    def notify(self, partition: int) -> None:
        self._events[partition].set()

    def sweep_soon(self) -> None:
        self._sweep_now.set()

    def reconfigure(self, cfg, router) -> None:
        """A reload: new routes and batch settings apply from the next batch. The queue's layout
        (partitions, stream_prefix) stays: changing it would strand the entries already queued."""
        self.router = router
        kept = {"partitions": self.layout.partitions, "stream_prefix": self.layout.prefix}
        for field, value in kept.items():
            if getattr(cfg.write_behind, field) != value:
                log.warning("write_behind.%s changes only on restart (keeping %r)", field, value)
        self.cfg = cfg.write_behind.model_copy(update=kept)
        self.leases.idle_ms = self.cfg.claim_idle_ms
        self._warn_unused()

    async def close(self, deadline: float) -> None:
        """SIGTERM: flush what is already queued until `deadline` (loop time); the rest stays queued."""
        self._stopping = True
        self._stopped.set()
        for event in self._events:
            event.set()
        loop = asyncio.get_running_loop()
        if self._partition_tasks:
            await asyncio.wait(self._partition_tasks, timeout=max(0.0, deadline - loop.time()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.leases.release_all()
            await self.pool.execute(b"ZREM", members_name(self.cfg.stream_prefix), self.name)
        except UpstreamUnavailable:
            pass
        self.owned.clear()

    # -- membership and ownership ------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        members = members_name(self.cfg.stream_prefix)
        while True:
            try:
                now = int(time.time() * 1000)
                await self.pool.execute(b"ZADD", members, now, self.name, key=members)
                await self.pool.execute(b"ZREMRANGEBYSCORE", members, "-inf", now - self.cfg.claim_idle_ms,
                                        key=members)
                self.live = max(1, int(await self.pool.execute(b"ZCARD", members, key=members)))
            except UpstreamUnavailable:
                pass
            except Exception:
                log.exception("write-behind heartbeat failed")
            await asyncio.sleep(min(1.0, self.cfg.claim_idle_ms / 3000))

    @property
    def share(self) -> int:
        return math.ceil(self.cfg.partitions / self.live)

    async def _claim(self, partition: int) -> bool:
        """Take or renew the partition's lease. A new owner (or one whose lease had lapsed) claims
        every pending entry of the stream: while the lease was free, nobody else may be flushing it."""
        if partition not in self.owned and len(self.owned) >= self.share:
            return False
        result = await self.leases.take(partition)
        if result == OTHERS:
            return False
        if partition not in self.owned or result == TAKEN:
            if self.layout.cluster:
                self._sweep_now.set()     # a dead owner may have left streams out of the dirty set
            else:
                await self._activate(stream_name(self.cfg.stream_prefix, partition))
            self.leases.own(partition)
            log.debug("write-behind: now flushing partition %d", partition)
        return True

    async def _activate(self, stream: bytes) -> None:
        """Before reading a stream: make sure the group exists, and take over every entry another
        consumer read but never acknowledged (only the partition's owner gets here)."""
        reply = await self.pool.execute(b"XGROUP", b"CREATE", stream, GROUP, b"0", b"MKSTREAM", key=stream)
        if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
            raise UpstreamUnavailable(str(reply))
        cursor = b"0-0"
        while True:
            reply = await self.pool.execute(b"XAUTOCLAIM", stream, GROUP, self.name, 0, cursor,
                                            b"COUNT", 1000, b"JUSTID", key=stream)
            if isinstance(reply, Exception):
                raise UpstreamUnavailable(str(reply))
            cursor = reply[0]
            if cursor in (b"0-0", "0-0"):
                break

    # -- one partition -----------------------------------------------------------------------------
    async def _partition(self, partition: int) -> None:
        idle = min(1.0, self.cfg.claim_idle_ms / 3000)
        while not self._stopping:
            try:
                if await self._claim(partition):
                    await self._drain(partition)
                    continue
            except UpstreamUnavailable:
                pass
            except Exception:
                log.exception("write-behind partition %d failed", partition)
            await self._wait(partition, idle * (0.5 + random.random()))
        if partition in self.owned:        # shutting down: one last pass over what is queued
            try:
                await self._drain(partition)
            except Exception as exc:
                log.warning("write-behind partition %d: final flush stopped: %s", partition, exc)

    async def _wait(self, partition: int, seconds: float) -> None:
        event = self._events[partition]
        try:
            await asyncio.wait_for(event.wait(), max(0.0, seconds))
        except TimeoutError:
            pass
        event.clear()

    async def _drain(self, partition: int) -> None:
        """Flush batches while this sidecar owns the partition; returns when it should re-check."""
        streams: dict[bytes, _Stream] = {}
        self._active[partition] = streams
        if not self.layout.cluster:
            name = stream_name(self.cfg.stream_prefix, partition)
            streams[name] = _Stream(name)
        try:
            await self._drain_streams(partition, streams)
        finally:
            if self.layout.cluster:
                await self._give_back(partition, streams)

    async def _drain_streams(self, partition: int, streams: dict[bytes, _Stream]) -> None:
        ready: set[bytes] = set()       # cluster: streams set up (group, claimed entries) recently
        poll = min(0.25, self.cfg.claim_idle_ms / 3000)
        cluster = self.layout.cluster
        reclaim_at = time.monotonic() + self.cfg.claim_idle_ms / 1000
        while True:
            if not await self.leases.confirm(partition):
                return                   # the lease is renewed by Leases.keep; lost, the partition starts over
            if time.monotonic() >= reclaim_at:
                reclaim_at = time.monotonic() + self.cfg.claim_idle_ms / 1000
                await self._reclaim(streams, ready)
            if not self._stopping and len(self.owned) > self.share:
                await self._release(partition)
                return
            cfg = self.cfg
            if cluster:
                await self._take_news(partition, streams, ready)
            history = any(s.history for s in streams.values())
            entries = await self._read_many(streams, cfg.batch_size)
            if not entries:
                if history:
                    continue         # own pending entries done: now the new ones
                if self._stopping:
                    return
                await self._wait(partition, poll)
                continue
            if not history and not self._stopping and len(entries) < cfg.batch_size and cfg.max_delay_ms:
                due = min(int(entry_id.partition(b"-")[0]) for _, entry_id, _ in entries) + cfg.max_delay_ms
                if cluster:
                    # Many slot streams: one more look when the batch is due, not one per write.
                    while not self._stopping and (left := due - time.time() * 1000) > 0:
                        await asyncio.sleep(min(left / 1000, 0.1))
                    await self._take_news(partition, streams, ready)
                    entries += await self._read_many(streams, cfg.batch_size - len(entries))
                while not cluster and len(entries) < cfg.batch_size and not self._stopping:
                    left = due - time.time() * 1000
                    if left <= 0:
                        break
                    await self._wait(partition, min(left / 1000, poll))
                    entries += await self._read_many(streams, cfg.batch_size - len(entries))
            await self._flush(partition, entries)

    async def _reclaim(self, streams: dict[bytes, _Stream], ready: set[bytes]) -> None:
        """Every claim_idle_ms, take over entries another consumer read but never acknowledged: a
        former owner paused between its lease check and its read leaves them in its own pending list,
        where nobody would ever read them again. (Older than what was landed since? The database's
        version check skips them.) On a cluster, streams are set up again as they come back dirty."""
        if self.layout.cluster:
            ready.clear()
            return
        for stream in streams.values():
            await self._activate(stream.name)
            stream.history = True

    async def _take_news(self, partition: int, streams: dict[bytes, _Stream], ready: set[bytes]) -> None:
        """Cluster mode: pop the slots written since the last look from the partition's dirty set, and
        read their streams from now on (until a read finds no more)."""
        dirty = self.layout.dirty(partition)
        members = await self.pool.execute(b"SPOP", dirty, 1024, key=dirty)
        if isinstance(members, Exception):
            raise UpstreamUnavailable(str(members))
        new = []
        for slot in self.layout.dirty_slots(members, partition):
            name = slot_stream_name(self.cfg.stream_prefix, slot)
            if name not in streams:
                # First time in this ownership: own pending entries first, and take over a dead owner's.
                new.append(_Stream(name, slot, history=name not in ready))
        streams.update((stream.name, stream) for stream in new)
        await asyncio.gather(*(self._activate(stream.name) for stream in new if stream.history))
        ready.update(stream.name for stream in new)

    async def _give_back(self, partition: int, streams: dict[bytes, _Stream]) -> None:
        """Cluster mode, leaving a partition: its streams still being read go back into the dirty set
        for whoever flushes it next (the sweep finds them if even this fails)."""
        slots = sorted({stream.slot for stream in streams.values() if stream.slot is not None})
        streams.clear()
        if not slots:
            return
        dirty = self.layout.dirty(partition)
        try:
            await self.pool.execute(b"SADD", dirty, *slots, key=dirty)
        except Exception as exc:
            log.warning("write-behind: could not give back partition %d's streams (%s); the sweep will find them",
                        partition, exc)
            self.sweep_soon()

    async def _release(self, partition: int) -> None:
        await self.leases.release(partition)
        log.info("write-behind: handed partition %d over (fair share is %d)", partition, self.share)

    async def _read_many(self, streams: dict[bytes, _Stream], count: int) -> list:
        """Up to about `count` entries from the streams, as (stream, id, fields): a stream still in
        its history gives its own pending entries, the others new ones. On a cluster, a stream that
        gave fewer than it was asked for is done until its slot is marked dirty again."""
        chosen = list(streams.values())
        if not chosen:
            return []
        each = count if len(chosen) == 1 else max(8, -(-count // len(chosen)))
        replies = await asyncio.gather(*(self._read(s, each) for s in chosen), return_exceptions=True)
        out, failure = [], None
        for stream, rows in zip(chosen, replies, strict=True):
            if isinstance(rows, BaseException):
                failure = failure or rows
                if "NOGROUP" in str(rows):       # the stream was deleted (FLUSHALL): set it up again
                    self.leases.forget_all()
                continue
            out += [(stream.name, entry_id, fields) for entry_id, fields in rows]
            if stream.history:
                stream.history = bool(rows)
            elif self.layout.cluster and len(rows) < each:
                del streams[stream.name]
        if failure is not None:
            # What the other streams gave is now pending to this consumer: the next pass (or the next
            # owner) reads it again as history.
            raise failure if isinstance(failure, UpstreamUnavailable) else UpstreamUnavailable(str(failure))
        return out

    async def _read(self, stream: _Stream, count: int) -> list:
        start = b"0" if stream.history else b">"
        reply = await self.pool.execute(b"XREADGROUP", b"GROUP", GROUP, self.name, b"COUNT", count,
                                        b"STREAMS", stream.name, start, key=stream.name)
        if isinstance(reply, Exception):
            raise UpstreamUnavailable(str(reply))
        if not reply:
            return []
        if isinstance(reply, dict):       # RESP3 map
            reply = list(reply.items())
        return list(reply[0][1])

    # -- one batch ---------------------------------------------------------------------------------
    async def _flush(self, partition: int, raw: list) -> None:
        entries, settled = await self._parse(raw)
        groups = await self._group(entries)
        attempts = 0
        try:
            while groups:
                if not await self.leases.confirm(partition):
                    return          # another sidecar owns the partition now: the batch is its to write
                for route in list(groups):
                    if await self._write(route, groups[route], attempts):
                        del groups[route]
                if not groups or self._stopping:
                    break
                attempts += 1
                self._retrying.setdefault(partition, time.time())
                await self._backoff(attempts)
        finally:
            self._retrying.pop(partition, None)
        if groups:
            return                  # shutting down: the entries stay pending for the next owner
        await asyncio.gather(*(DONE(self.pool, [stream], [GROUP, len(ids), *ids]) for stream, ids in settled.items()))

    async def _parse(self, raw: list) -> tuple[list[Entry], dict[bytes, list]]:
        """The batch's entries (each key's last only, with `coalesce`), and the ids to acknowledge
        without a write (superseded in the batch, deleted from the stream, or not an entry at all)."""
        entries: list[Entry] = []
        settled: dict[bytes, list] = {}
        for stream, entry_id, fields in raw:
            if not fields:                  # deleted from the stream after it was read (XDEL): nothing to do
                settled.setdefault(stream, []).append(entry_id)
                continue
            try:
                entries.append(Entry.parse(entry_id, fields, stream))
            except (ValueError, IndexError) as exc:
                await self._dead_letter(entry_id, fields, "", str(exc), 0)
                settled.setdefault(stream, []).append(entry_id)
        if self.cfg.coalesce:
            last: dict[bytes, Entry] = {}
            for entry in entries:
                if entry.key in last:       # superseded by a later write in the batch (same stream)
                    settled.setdefault(entry.stream, []).append(last.pop(entry.key).id)
                last[entry.key] = entry
            entries = list(last.values())
        return entries, settled

    async def _group(self, entries: list[Entry]) -> dict:
        """route -> [(entry, database op or None)]; an entry no route can write is dead-lettered."""
        groups: dict = {}
        for entry in entries:
            hit = self.router.match(entry.key)
            route = hit[0] if hit is not None else None
            if route is None or route.write_spec is None:
                await self._dead(entry, None, "no write route matches the key (config changed?)", 0)
                continue
            try:
                op = _op(route, hit[1], entry)
            except ValueError as exc:
                await self._dead(entry, route, str(exc), 0)
                continue
            groups.setdefault(route, []).append((entry, op))
        return groups

    async def _backoff(self, attempts: int) -> None:
        """Capped exponential backoff with jitter; shutdown cuts it short."""
        cfg = self.cfg
        delay = min(cfg.retry_max_ms, cfg.retry_base_ms * 2 ** min(attempts - 1, 32)) / 1000
        try:
            await asyncio.wait_for(self._stopped.wait(), delay * (0.5 + random.random() / 2))
        except TimeoutError:
            pass

    async def _write(self, route, items: list, attempts: int) -> bool:
        """One route's share of a batch; False when it must be retried (the database is unavailable)."""
        backend = route.backend_name
        ops = [op for _, op in items if op is not None]
        started = time.perf_counter()
        try:
            results = await self._apply(route, ops)
        except BackendError as exc:
            self._failed(route, exc)
            return False
        self._recovered(route)
        self.flush_seconds.labels(backend).observe(time.perf_counter() - started)
        self.batch_size.labels(backend).observe(len(ops))
        results_iter = iter(results)
        landed, superseded = [], []
        for entry, op in items:
            result = next(results_iter) if op is not None else None
            if result is None:
                landed.append(entry)
            elif result is SUPERSEDED:
                superseded.append(entry)
            else:
                await self._dead(entry, route, str(result), attempts + 1)
        await self._done(route, landed, superseded)
        return True

    async def _apply(self, route, ops: list[WriteOp]) -> list:
        """The backend's results for `ops`; a batch refused as a whole is split until the refused
        rows are alone (so only they are dead-lettered). Raises BackendUnavailable."""
        if not ops:
            return []
        try:
            return await route.backend.write_batch(route.write_spec, ops)
        except BackendPermanentError as exc:
            if len(ops) == 1:
                return [exc]
        results: list = []
        for op in ops:
            results += await self._apply(route, [op])
        return results

    async def _done(self, route, landed: list[Entry], superseded: list[Entry]) -> None:
        """Acknowledge what the database has settled. A landed key gets its TTL back; a superseded
        one (the database holds a newer version) loses its cached value if this was its newest write."""
        ttl = ttl_ms(route.ttl) if route.ttl.seconds is not None else 0
        by_stream: dict[bytes, list[tuple[Entry, str]]] = {}
        for entry in landed:
            by_stream.setdefault(entry.stream, []).append((entry, "ttl"))
        for entry in superseded:
            by_stream.setdefault(entry.stream, []).append((entry, "drop"))

        async def done(stream: bytes, group: list[tuple[Entry, str]]) -> None:
            keys, args = [stream], [GROUP, len(group), *(e.id for e, _ in group)]
            for entry, action in group:
                keys += [entry.key, companion("pend", entry.key)]
                args += [entry.id, action, entry.expiry, ttl]
            await DONE(self.pool, keys, args)
        await asyncio.gather(*(done(stream, group) for stream, group in by_stream.items()))
        if landed:
            self._count(route.name, "landed", len(landed))
        if superseded:
            self._count(route.name, "superseded", len(superseded))

    def _failed(self, route, exc: BackendError) -> None:
        """The database was unavailable for a route's batch: count it, and log at a bounded rate."""
        self._count(route.name, "retry")
        now = time.monotonic()
        state = self._failing.setdefault(route.name, [now, 0, -math.inf])
        state[1] += 1
        if now - state[2] >= FAILING_LOG_EVERY:
            state[2] = now
            log.warning("write-behind to %s (route %s) unavailable for %.0f s (%d failed attempts); retrying "
                        "without limit, nothing is dropped: %s", exc.backend, route.name, now - state[0], state[1], exc)

    def _recovered(self, route) -> None:
        state = self._failing.pop(route.name, None)
        if state is not None:
            log.warning("write-behind to %s (route %s) recovered after %.0f s and %d failed attempts",
                        route.backend_name, route.name, time.monotonic() - state[0], state[1])

    async def _dead(self, entry: Entry, route, reason: str, attempts: int) -> None:
        """Dead-letter a parsed entry, and drop its cached value if it is still the key's newest write."""
        name = route.name if route is not None else ""
        log.error("write-behind: dead letter for %r (route %s) after %d attempt(s): %s",
                  entry.key, name or "-", attempts, reason)
        await self._dead_letter(entry.id, entry.fields(), name, reason, attempts)
        await DONE(self.pool, [entry.stream, entry.key, companion("pend", entry.key)],
                   [GROUP, 1, entry.id, entry.id, "drop", "", 0])

    async def _dead_letter(self, entry_id: bytes, fields: list, route: str, reason: str, attempts: int) -> None:
        dead = dead_name(self.cfg.stream_prefix)
        await self.pool.execute(b"XADD", dead, b"MAXLEN", b"~", DEAD_MAXLEN, b"*", b"id", entry_id,
                                b"route", route, b"error", reason, b"attempts", attempts, *fields, key=dead)
        self._count(route, "dead")

    def _count(self, route: str, what: str, n: int = 1) -> None:
        self.metrics.count(_OUTCOMES[what], (route,), n)

    # -- metrics -----------------------------------------------------------------------------------
    async def _monitor(self) -> None:
        """Queue depth and lag for /metrics, read once a second (scrapes never wait on Redis)."""
        prefix = self.cfg.stream_prefix
        while True:
            await asyncio.sleep(1.0)
            try:
                streams = await self._all_streams()
                depths = await asyncio.gather(*(self.pool.execute(b"XLEN", s, key=s) for s in streams))
                firsts = await asyncio.gather(*(self.pool.execute(b"XRANGE", s, b"-", b"+", b"COUNT", 1, key=s)
                                                for s in streams))
                dead = dead_name(prefix)
                self.dead_letters = int(await self.pool.execute(b"XLEN", dead, key=dead))
                self.pending = sum(int(d) for d in depths if isinstance(d, int))
                now = time.time() * 1000
                ages = [entry_age_ms(f[0][0], now) for f in firsts if isinstance(f, list) and f]
                self.lag_s = max(ages, default=0.0) / 1000
            except UpstreamUnavailable:
                pass
            except Exception:
                log.exception("write-behind monitor failed")

    async def _all_streams(self) -> list[bytes]:
        """The streams to measure: every partition's; on a cluster, those of the partitions this
        sidecar owns (being read, or marked dirty), so each sidecar reports its own share."""
        prefix, partitions = self.cfg.stream_prefix, self.layout.partitions
        if not self.layout.cluster:
            return [stream_name(prefix, p) for p in range(partitions)]
        owned = sorted(self.owned)
        names = {name for p in owned for name in self._active.get(p, {})}
        dirty = [self.layout.dirty(p) for p in owned]
        for members in await asyncio.gather(*(self.pool.execute(b"SMEMBERS", d, key=d) for d in dirty)):
            if isinstance(members, list):
                names.update(slot_stream_name(prefix, slot) for slot in self.layout.dirty_slots(members))
        return sorted(names)

    # -- cluster mode: streams nobody was told about -----------------------------------------------
    async def _sweep(self) -> None:
        """SCAN the masters for slot streams and mark their slots dirty: a sidecar that died between
        a write's script and its SADD (or a failover that lost the SADD) leaves such a stream."""
        while True:
            try:
                await asyncio.wait_for(self._sweep_now.wait(), SWEEP_EVERY)
            except TimeoutError:
                pass
            self._sweep_now.clear()
            if not self.owned:
                continue                   # the owners sweep
            try:
                await self._sweep_once()
            except UpstreamUnavailable:
                self._sweep_now.set()
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("write-behind sweep failed")

    async def _sweep_once(self) -> None:
        prefix, partitions = self.cfg.stream_prefix, self.layout.partitions
        found: dict[int, set[int]] = {}
        cursor = b"0"
        while True:
            reply = await self.pool.execute(b"SCAN", cursor, b"MATCH", slot_stream_pattern(prefix),
                                            b"COUNT", 1000, b"TYPE", b"stream")
            if isinstance(reply, Exception):
                raise UpstreamUnavailable(str(reply))
            cursor, names = reply[0], reply[1]
            lengths = await asyncio.gather(*(self.pool.execute(b"XLEN", name, key=name) for name in names))
            for name, length in zip(names, lengths, strict=True):
                if isinstance(length, int) and length > 0:      # drained streams stay, empty (one per slot)
                    slot = key_slot(name)
                    found.setdefault(slot % partitions, set()).add(slot)
            if int(cursor) == 0:
                break
        for partition, slots in found.items():
            dirty = self.layout.dirty(partition)
            await self.pool.execute(b"SADD", dirty, *sorted(slots), key=dirty)
            self.notify(partition)

    def _retrying_seconds(self) -> float:
        now = time.time()
        return max((now - t for t in self._retrying.values()), default=0.0)


_OUTCOMES = {"landed": WB_LANDED, "retry": WB_RETRIES, "dead": WB_DEAD_LETTERED, "superseded": WB_SUPERSEDED}


def _op(route, params: dict, entry: Entry) -> WriteOp | None:
    """The database write for a queue entry; ValueError if the value can never be written."""
    version = entry_version(entry.id)
    if entry.op == "del":
        return route.write_op("delete", entry.key, params, version=version) if route.write.delete_on_del else None
    if entry.op == "hset":
        return route.write_op("upsert", entry.key, params, fields=from_hash(entry.pairs), version=version)
    return route.upsert_op(entry.key, params, entry.value, version)
