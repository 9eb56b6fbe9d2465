"""Read-through: a miss on a routed key is loaded from its backend and written back to the cache.

    miss -> single-flight (one load per key in this proxy)
         -> BEGIN script: negative entry? key appeared meanwhile? else take a lease (SET NX PX)
         -> backend fetch -> encode -> FILL script: write only while our lease still holds
    answer: the caller re-issues the client's own command, so the reply is exactly what Redis says

Leases, not SET NX, guard fills (the memcache lease idea): a write or delete through the proxy
removes the lease, so a fill that started before it can neither overwrite a newer value nor
resurrect a deleted key. Across proxies the lease also keeps a cold key to about one load: a proxy
that finds the lease taken waits briefly for the winner's fill.

Companion keys (lease, negative entry) carry the data key's hash slot, so the scripts touch one slot
and work unchanged on a Redis Cluster.

Admission: a fetch waits for a slot of its backend's FairGate (admission.py: as many slots as the
backend's pool has connections, lanes per client taken in turn), so a burst of misses queues here
instead of flooding the database, and one client's burst cannot starve another client's miss. A
wait longer than the backend's queue_timeout answers "backend NAME busy". The lease is taken before
the wait, so it lasts LEASE_MS plus that wait.

A key the backend rejects (BackendKeyRejected: an int above int4, a NUL in text) is not found, as
for any key no row has: the client gets nil (and a negative entry), and it is counted as
`rejected_keys`, never as a backend error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import weakref
from collections.abc import Hashable
from dataclasses import dataclass

from ..backends.base import BackendBusy, BackendError, BackendKeyRejected, BackendPermanentError
from ..upstream.scripts import Script
from ..upstream.single import UpstreamUnavailable
from .admission import FairGate
from .keys import companion

log = logging.getLogger("cacheproxy.loader")

LEASE_MS = 10_000           # longer than any sane backend timeout; a crashed loader's lease expires
BUSY_WAIT_S = 1.0           # how long a proxy waits for another proxy's fill before loading itself
REFRESH_GUARD_S = 1.0       # at most one refresh-ahead attempt per key per second from this proxy

# KEYS: key, lease, neg, pend. A key with an unflushed write-behind entry (pend) is never loaded:
# the cache holds the newest value, or the key waits to be deleted in the database.
_BEGIN = """
if redis.call('EXISTS', KEYS[4]) == 1 then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 'HIT' end
  return 'NEG'
end
if ARGV[3] == 'miss' then
  if redis.call('EXISTS', KEYS[3]) == 1 then return 'NEG' end
  if redis.call('EXISTS', KEYS[1]) == 1 then return 'HIT' end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'LEASE' end
return 'BUSY'
"""

# KEYS: key, lease, neg. ARGV: token, kind (value|hash|neg), ttl_ms (0 = none), overwrite, payload...
_FILL = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
local ttl = tonumber(ARGV[3])
if ARGV[2] == 'neg' then
  redis.call('DEL', KEYS[1])
  if ttl > 0 then redis.call('SET', KEYS[3], '1', 'PX', ttl) end
  return 1
end
if ARGV[4] == '0' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[3])
if ARGV[2] == 'hash' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
elseif ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[5], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[5])
end
return 1
"""


@dataclass
class Found:
    """What a load produced: the cache value (bytes) or hash pairs, or nothing (not found)."""
    value: bytes | None = None
    pairs: list[tuple[bytes, bytes]] | None = None

    @property
    def exists(self) -> bool:
        return self.value is not None or bool(self.pairs)


class Outcome:
    CACHED = "cached"        # the cache now answers for the key (value, negative entry or a newer write)
    DIRECT = "direct"        # upstream unavailable: answer from `found`, nothing cached


BEGIN = Script(_BEGIN)
FILL = Script(_FILL)


def ttl_ms(policy, negative: bool = False) -> int:
    """Physical TTL for a fill: the route's TTL less a random jitter fraction, plus the stale window."""
    if negative:
        return int(policy.negative_seconds * 1000)
    if policy.seconds is None:
        return 0
    base = policy.seconds * 1000 * (1 - policy.jitter * random.random())
    return max(1, int(base + policy.stale_if_error * 1000))


class Loader:
    def __init__(self, pool, metrics):
        self.pool = pool
        self.metrics = metrics
        self.flights: dict[bytes, asyncio.Future] = {}
        self.refreshed: dict[bytes, float] = {}
        self._errors_logged: set[str] = set()
        # One gate per backend object: a reload that replaces a backend (new pool size) gets a new one.
        self.gates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def gate(self, backend) -> FairGate:
        """The admission gate of `backend`, sized from its pool (backends.NAME.max_pool)."""
        gate = self.gates.get(backend)
        if gate is None:
            gate = self.gates[backend] = FairGate(backend.cfg.max_pool)
        return gate

    async def load(self, route, key: bytes, params: dict, owner: Hashable = None) -> tuple[str, Found | None]:
        """Make the cache answer for `key`; single-flight per key. Returns (Outcome, found). `owner`
        (the client's session) decides the admission lane the backend fetch waits in."""
        flight = self.flights.get(key)
        if flight is not None:
            route.stats.singleflight_joins += 1
            return await asyncio.shield(flight)
        flight = asyncio.get_running_loop().create_future()
        self.flights[key] = flight
        try:
            result = await self._load(route, key, params, refresh=False, owner=owner)
        except BaseException as exc:
            flight.set_exception(exc)
            flight.exception()   # joiners re-raise it; mark it retrieved for the lone-caller case
            raise
        else:
            flight.set_result(result)
            return result
        finally:
            del self.flights[key]

    def maybe_refresh(self, route, key: bytes, params: dict, remaining_ms: int) -> None:
        """Refresh-ahead: a hit close to expiry reloads the key in the background (XFetch-style:
        the closer to expiry, the likelier), at most once per second per key from this proxy."""
        policy = route.ttl
        if not policy.refresh_ahead or policy.seconds is None or key in self.flights:
            return
        window = policy.refresh_ahead * policy.seconds * 1000
        logical = remaining_ms - policy.stale_if_error * 1000
        if logical > window or random.random() * window < logical * 0.5:
            return
        now = time.monotonic()
        if now - self.refreshed.get(key, 0.0) < REFRESH_GUARD_S:
            return
        self.refreshed[key] = now
        if len(self.refreshed) > 10000:
            self.refreshed = {k: t for k, t in self.refreshed.items() if now - t < REFRESH_GUARD_S}
        route.stats.refresh_ahead += 1
        asyncio.get_running_loop().create_task(self._refresh(route, key, params))

    async def _refresh(self, route, key: bytes, params: dict) -> None:
        flight = asyncio.get_running_loop().create_future()
        self.flights[key] = flight
        try:
            flight.set_result(await self._load(route, key, params, refresh=True))
        except Exception as exc:
            flight.set_result((Outcome.CACHED, None))   # joiners re-read the cache, which still holds the value
            log.info("refresh-ahead of %r failed: %s", key, exc)
        finally:
            del self.flights[key]

    async def _load(self, route, key: bytes, params: dict, refresh: bool,
                    owner: Hashable = None) -> tuple[str, Found | None]:
        keys = [key, companion("lease", key), companion("neg", key), companion("pend", key)]
        token = os.urandom(8).hex()
        lease = LEASE_MS + int(route.backend.cfg.queue_timeout * 1000)   # outlives the admission wait
        try:
            status = await BEGIN(self.pool, keys, [token, lease, "refresh" if refresh else "miss"])
            deadline = time.monotonic() + BUSY_WAIT_S
            while status == b"BUSY" and not refresh and time.monotonic() < deadline:
                # Another proxy is loading this key: give its fill a moment instead of a second query.
                await asyncio.sleep(0.01)
                status = await BEGIN(self.pool, keys, [token, lease, "miss"])
        except UpstreamUnavailable:
            found = await self._fetch(route, key, params, owner)
            return Outcome.DIRECT, found
        if status == b"NEG":
            route.stats.negative_hits += 1
            return Outcome.CACHED, None
        if status == b"HIT" or (status == b"BUSY" and refresh):
            return Outcome.CACHED, None
        found = await self._fetch(route, key, params, owner)
        if status == b"BUSY":
            return Outcome.DIRECT, found      # the other proxy never filled: answer, don't cache
        if found.exists:
            kind = "hash" if found.pairs is not None else "value"
            payload = [v for pair in found.pairs or () for v in pair] if kind == "hash" else [found.value]
            ttl = ttl_ms(route.ttl)
        else:
            route.stats.not_found += 1
            kind, payload, ttl = "neg", [], ttl_ms(route.ttl, negative=True)
        try:
            await FILL(self.pool, keys[:3], [token, kind, ttl, "1" if refresh else "0", *payload])
        except UpstreamUnavailable:
            return Outcome.DIRECT, found
        return Outcome.CACHED, found

    async def _fetch(self, route, key: bytes, params: dict, owner: Hashable = None) -> Found:
        stats = route.stats
        gate = await self._admit(route, owner)
        stats.loads += 1
        started = time.perf_counter()
        try:
            rows = await route.fetch(params)
        except BackendKeyRejected as exc:
            stats.rejected_keys += 1          # the client's key, not the backend's failure
            log.debug("route %s: %r cannot exist: %s", route.name, key, exc)
            return Found()
        except BackendError as exc:
            stats.load_errors += 1
            if isinstance(exc, BackendBusy):
                stats.load_busy += 1          # the proxy's pool is saturated; the database is fine
            else:
                errors = self.metrics.backend_errors
                errors[route.backend_name] = errors.get(route.backend_name, 0) + 1
            if not exc.transient:
                self._log_once(route, exc)
            raise
        finally:
            gate.release()
            self.metrics.load_seconds.labels(route.name, route.backend_name).observe(time.perf_counter() - started)
        try:
            return route.encode(rows)
        except BackendPermanentError as exc:
            self._log_once(route, exc)
            raise

    def _log_once(self, route, exc: BackendError) -> None:
        """A read that cannot work is most likely the route's mistake: say so once per route."""
        if route.name not in self._errors_logged:
            self._errors_logged.add(route.name)
            log.error("route %s: %s", route.name, exc)

    async def _admit(self, route, owner: Hashable) -> FairGate:
        """Wait for a slot of the route's backend (fair between owners); BackendBusy after queue_timeout."""
        gate = self.gate(route.backend)
        timeout = route.backend.cfg.queue_timeout
        try:
            await gate.acquire(owner, timeout)
        except TimeoutError:
            route.stats.load_errors += 1
            route.stats.load_busy += 1
            raise BackendBusy(route.backend_name, f"all {gate.limit} connections in use; no turn came within "
                                                  f"{timeout:g}s ({gate.waiting} loads waiting)") from None
        return gate
