"""Partition leases: which queue partitions this sidecar flushes, and for how long it may trust that.

Rules:
- A partition has one owner at a time: a lease in Redis (`{prefix}:{p}:owner`, SET PX
  claim_idle_ms). The owner renews all its leases every claim_idle_ms / 3 from a task of its own,
  so a batch stuck on the database (a locked table, an outage) never lets its lease lapse.
- The owner trusts a lease only until `claim_idle_ms` after the moment it asked for it (measured on
  its own monotonic clock, before the request was sent, so never later than Redis's expiry). Past
  that (a slow Redis, a process that was paused), it must ask Redis again before writing anything.
- A lease found lapsed counts as lost even if nobody else took it: another sidecar may have owned
  the partition in between and flushed what this one holds in hand. The batch in hand is dropped
  (its entries stay pending, for whoever owns the partition now) and the partition starts over.
- None of this is enough alone (a pause can fall between the check and the database write): the
  database fences every write by version as well (backends/base.py). The lease keeps owners from
  wasting work and from writing out of order in the common case; the fence makes it safe.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..upstream.single import UpstreamUnavailable
from .queue import CLAIM, OTHERS, RELEASE, RENEWED, TAKEN, owner_name

log = logging.getLogger("cacheproxy.writer")


class Leases:
    def __init__(self, pool, prefix: str, name: str, idle_ms: int):
        self.pool = pool
        self.prefix = prefix
        self.name = name
        self.idle_ms = idle_ms
        self.owned: set[int] = set()
        self.lost = 0                              # leases found lapsed or taken (a counter for /metrics)
        self._until: dict[int, float] = {}         # partition -> monotonic time the lease is trusted until

    def holds(self, partition: int) -> bool:
        """Owned, and the lease is certainly still ours (no need to ask Redis)."""
        return partition in self.owned and time.monotonic() < self._until.get(partition, 0.0)

    async def take(self, partition: int) -> int:
        """Take or renew the lease (RENEWED, TAKEN or OTHERS). The caller adds a partition to `owned`
        (through `own`) once it has set up its streams."""
        asked = time.monotonic()
        result = int(await CLAIM(self.pool, [owner_name(self.prefix, partition)], [self.name, self.idle_ms]))
        if result == OTHERS or (result == TAKEN and partition in self.owned):
            self.lose(partition, "another sidecar took it" if result == OTHERS else "it had lapsed")
        if result != OTHERS:
            self._until[partition] = asked + self.idle_ms / 1000
        return result

    def own(self, partition: int) -> None:
        self.owned.add(partition)

    async def confirm(self, partition: int) -> bool:
        """Before a database write: may this sidecar still write for the partition? Asks Redis only
        when the lease is no longer certainly ours."""
        if partition not in self.owned:
            return False
        if self.holds(partition):
            return True
        try:
            return await self.take(partition) == RENEWED
        except UpstreamUnavailable:
            return False          # cannot tell: the lease may lapse before Redis answers again

    def lose(self, partition: int, why: str) -> None:
        if partition in self.owned:
            self.owned.discard(partition)
            self.lost += 1
            log.warning("write-behind: lost partition %d (%s); the batch in hand is left to its owner", partition, why)
        self._until.pop(partition, None)

    def forget_all(self) -> None:
        """The streams are gone (FLUSHALL of the queue): set every partition up again."""
        self.owned.clear()

    async def keep(self) -> None:
        """Renew every owned lease every claim_idle_ms / 3, whatever the partitions are doing."""
        every = self.idle_ms / 3000
        while True:
            await asyncio.sleep(every)
            owned = sorted(self.owned)
            results = await asyncio.gather(*(self.take(p) for p in owned), return_exceptions=True)
            for partition, result in zip(owned, results, strict=True):
                if isinstance(result, BaseException) and not isinstance(result, UpstreamUnavailable):
                    log.error("write-behind: renewing partition %d failed: %r", partition, result)

    async def release(self, partition: int) -> None:
        await RELEASE(self.pool, [owner_name(self.prefix, partition)], [self.name])
        self.owned.discard(partition)
        self._until.pop(partition, None)

    async def release_all(self) -> None:
        for partition in sorted(self.owned):
            await self.release(partition)
