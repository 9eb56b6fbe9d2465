"""The write-behind flusher: takes queued writes from the partition streams to the databases.

Each sidecar heartbeats into a members set and owns at most its fair share of the partitions
(ceil(partitions / live sidecars)) through leases. An owner reads its partition through the consumer
group (its own pending entries first: they are what it, or a dead owner whose entries it claimed,
read but never acknowledged), waits up to `max_delay_ms` for a batch to fill, keeps only each key's
last write (`coalesce`), and writes each route's share with one backend batch. Landed entries are
acknowledged and deleted, and their keys get their TTL back (wbqueue.DONE). A database that is down
or slow is retried with exponential backoff and jitter, the partition waiting in order; a row the
database refuses (or a batch still failing after `max_attempts`) goes to the dead letters with its
error, and its cached value is dropped so reads see what the database holds.

A sidecar that dies leaves its leases to expire (`claim_idle_ms`); whoever takes its partitions
claims its pending entries (XAUTOCLAIM) and replays them. Backend writes are idempotent (upserts,
deletes, DynamoDB puts conditional on a version), so a replay is harmless.

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

from ..backends.base import BackendError, WriteOp
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
    WB_PARTITIONS,
    WB_PENDING,
    WB_RETRIES,
)
from ..upstream.single import UpstreamUnavailable
from .queue import (
    CLAIM,
    DONE,
    GROUP,
    RELEASE,
    Entry,
    Layout,
    dead_name,
    entry_age_ms,
    entry_version,
    members_name,
    owner_name,
    slot_stream_name,
    slot_stream_pattern,
    stream_name,
)

log = logging.getLogger("cacheproxy.writer")

DEAD_MAXLEN = 100_000
SWEEP_EVERY = 60.0      # cluster mode: how often the masters are scanned for streams nobody was told about


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
        self.owned: set[int] = set()
        self.live = 1
        self.pending = 0
        self.lag_s = 0.0
        self.dead_letters = 0
        self.metrics = metrics
        self._events = [asyncio.Event() for _ in range(self.cfg.partitions)]
        self._tasks: list[asyncio.Task] = []
        self._partition_tasks: list[asyncio.Task] = []
        self._active: dict[int, dict[bytes, _Stream]] = {}     # partition -> streams being read
        self._sweep_now = asyncio.Event()
        self._stopping = False
        self._last_error = ""       # why the last backend batch failed (for dead letters after max_attempts)
        self.batch_size = metrics.histogram(WB_BATCH_SIZE)
        self.flush_seconds = metrics.histogram(WB_FLUSH_SECONDS)
        metrics.read(WB_PENDING, lambda: self.pending)
        metrics.read(WB_LAG, lambda: self.lag_s)
        metrics.read(WB_DEAD_LETTERS, lambda: self.dead_letters)
        metrics.read(WB_PARTITIONS, lambda: len(self.owned))
        metrics.declare(*_OUTCOMES.values())

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._partition_tasks = [loop.create_task(self._partition(p)) for p in range(self.cfg.partitions)]
        self._tasks = [loop.create_task(self._heartbeat()), loop.create_task(self._monitor()),
                       *self._partition_tasks]
        if self.layout.cluster:
            self._tasks.append(loop.create_task(self._sweep()))

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

    async def close(self, deadline: float) -> None:
        """SIGTERM: flush what is already queued until `deadline` (loop time); the rest stays queued."""
        self._stopping = True
        for event in self._events:
            event.set()
        loop = asyncio.get_running_loop()
        if self._partition_tasks:
            await asyncio.wait(self._partition_tasks, timeout=max(0.0, deadline - loop.time()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            for p in list(self.owned):
                await RELEASE(self.pool, [owner_name(self.cfg.stream_prefix, p)], [self.name])
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
        """Take or renew the partition's lease. A new owner claims every pending entry of the stream:
        while the lease was free, nobody else may be flushing it."""
        owner = owner_name(self.cfg.stream_prefix, partition)
        if partition not in self.owned and len(self.owned) >= self.share:
            return False
        if not await CLAIM(self.pool, [owner], [self.name, self.cfg.claim_idle_ms]):
            self.owned.discard(partition)
            return False
        if partition not in self.owned:
            if self.layout.cluster:
                self._sweep_now.set()     # a dead owner may have left streams out of the dirty set
            else:
                await self._activate(stream_name(self.cfg.stream_prefix, partition))
            self.owned.add(partition)
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
        ready: set[bytes] = set()       # cluster: streams set up (group, claimed entries) in this ownership
        renew_every = self.cfg.claim_idle_ms / 3000
        renewed = time.monotonic()
        poll = min(0.25, renew_every)
        cluster = self.layout.cluster
        while True:
            if not self._stopping and time.monotonic() - renewed > renew_every:
                if not await self._claim(partition):
                    log.warning("write-behind: lost partition %d", partition)
                    return
                renewed = time.monotonic()
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
            await self._flush(entries)

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
        slots = sorted({stream.slot for stream in streams.values()})
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
        await RELEASE(self.pool, [owner_name(self.cfg.stream_prefix, partition)], [self.name])
        self.owned.discard(partition)
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
                    self.owned.clear()
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
    async def _flush(self, raw: list) -> None:
        entries: list[Entry] = []
        settled: dict[bytes, list] = {}     # stream -> ids to acknowledge without a key to finish
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
        attempts = 0
        while groups:
            for route in list(groups):
                items = groups[route]
                if await self._write(route, items, attempts):
                    del groups[route]
            if not groups:
                break
            attempts += 1
            if attempts >= self.cfg.max_attempts:
                for route, items in groups.items():
                    for entry, _ in items:
                        await self._dead(entry, route, self._last_error, attempts)
                break
            if self._stopping:
                return          # shutting down: the entries stay pending for the next owner
            delay = min(self.cfg.retry_max_ms, self.cfg.retry_base_ms * 2 ** (attempts - 1)) / 1000
            await asyncio.sleep(delay * (0.5 + random.random()))
        await asyncio.gather(*(DONE(self.pool, [stream], [GROUP, len(ids), *ids]) for stream, ids in settled.items()))

    async def _write(self, route, items: list, attempts: int) -> bool:
        """One route's share of a batch; False when it must be retried (the database is unavailable)."""
        backend = route.backend_name
        ops = [op for _, op in items if op is not None]
        started = time.perf_counter()
        try:
            results = await route.backend.write_batch(route.write_spec, ops) if ops else []
        except BackendError as exc:
            self._last_error = f"{exc.backend}: {exc}"
            self._count(route.name, "retry")
            if attempts == 0 or attempts % 5 == 0:
                log.warning("write-behind to %s failed (attempt %d, will retry): %s", backend, attempts + 1, exc)
            return False
        self.flush_seconds.labels(backend).observe(time.perf_counter() - started)
        self.batch_size.labels(backend).observe(len(ops))
        results_iter = iter(results)
        landed = []
        for entry, op in items:
            result = next(results_iter) if op is not None else None
            if result is None:
                landed.append(entry)
            else:
                await self._dead(entry, route, str(result), attempts + 1)
        if landed:
            ttl = ttl_ms(route.ttl) if route.ttl.seconds is not None else 0
            by_stream: dict[bytes, list[Entry]] = {}
            for entry in landed:
                by_stream.setdefault(entry.stream, []).append(entry)

            async def done(stream: bytes, group: list[Entry]) -> None:
                keys, args = [stream], [GROUP, len(group), *(e.id for e in group)]
                for entry in group:
                    keys += [entry.key, companion("pend", entry.key)]
                    args += [entry.id, "ttl", entry.expiry, ttl]
                await DONE(self.pool, keys, args)
            await asyncio.gather(*(done(stream, group) for stream, group in by_stream.items()))
            self._count(route.name, "landed", len(landed))
        return True

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


_OUTCOMES = {"landed": WB_LANDED, "retry": WB_RETRIES, "dead": WB_DEAD_LETTERED}


def _op(route, params: dict, entry: Entry) -> WriteOp | None:
    """The database write for a queue entry; ValueError if the value can never be written."""
    version = entry_version(entry.id)
    if entry.op == "del":
        return route.write_op("delete", params, version=version) if route.write.delete_on_del else None
    if entry.op == "hset":
        return route.write_op("upsert", params, fields=from_hash(entry.pairs), version=version)
    return route.upsert_op(params, entry.value, version)
