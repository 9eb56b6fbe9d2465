"""Admission of cache-miss loads to a backend: a bounded, fair queue in front of its connection pool.

    load (owner = the client session) -> FairGate.slot(owner): at most `limit` loads hold a slot;
    the others wait in their owner's lane -> lanes take turns (round robin) as slots come free

Rules of this module:
- At most `limit` holders at once (the backend's pool size), so a burst of misses waits here, in
  order, instead of piling onto the pool or the database.
- Fair between owners: each owner has a FIFO lane and a freed slot goes to the next lane in turn,
  so one client's 10,000 misses cannot starve another client's single miss. Within a lane, first
  come, first served.
- A waiter gives up after `timeout` (TimeoutError: the caller names it "busy"); a waiter cancelled
  after it was granted a slot hands the slot on, so no slot is ever lost.
- No asyncio task per waiter: a waiter is one future in a deque. map_bounded() runs a command's
  many loads with a fixed number of workers, so a 10,000-key MGET never holds 10,000 coroutines.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class FairGate:
    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self.waiting = 0
        # owner -> its waiters; dict order is the turn order (an owner served moves to the back)
        self._lanes: dict[Hashable, deque[asyncio.Future]] = {}

    @asynccontextmanager
    async def slot(self, owner: Hashable, timeout: float) -> AsyncIterator[None]:
        """Hold one of the `limit` slots for the block; TimeoutError when none came in `timeout` s."""
        await self.acquire(owner, timeout)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, owner: Hashable, timeout: float) -> None:
        if self.active < self.limit and not self._lanes:
            self.active += 1
            return
        future = asyncio.get_running_loop().create_future()
        self._lanes.setdefault(owner, deque()).append(future)
        self.waiting += 1
        try:
            async with asyncio.timeout(timeout):
                await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release()       # granted, but the waiter left: pass the slot on
            else:
                future.cancel()
                self._forget(owner, future)
            raise
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self.active -= 1
        self._grant()

    def _grant(self) -> None:
        lanes = self._lanes
        while self.active < self.limit and lanes:
            owner = next(iter(lanes))
            lane = lanes.pop(owner)
            future = lane.popleft()
            if lane:
                lanes[owner] = lane          # back of the turn order
            if not future.done():
                self.active += 1
                future.set_result(None)

    def _forget(self, owner: Hashable, future: asyncio.Future) -> None:
        lane = self._lanes.get(owner)
        if lane is None:
            return
        try:
            lane.remove(future)
        except ValueError:
            return
        if not lane:
            del self._lanes[owner]


async def map_bounded(fn: Callable[[T], Awaitable[R]], items: Sequence[T], limit: int) -> list[R]:
    """[await fn(item) for item in items], at most `limit` at once, results in the items' order.

    `limit` workers pull from one iterator, so there are never more than `limit` coroutines however
    many items there are. The first exception stops new work; the running calls finish, then it is
    raised."""
    results: list = [None] * len(items)
    todo = iter(enumerate(items))
    failures: list[Exception] = []

    async def worker() -> None:
        for index, item in todo:
            if failures:
                return
            try:
                results[index] = await fn(item)
            except Exception as exc:
                failures.append(exc)
                return

    await asyncio.gather(*(worker() for _ in range(min(limit, len(items)))))
    if failures:
        raise failures[0]
    return results
