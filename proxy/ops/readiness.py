"""/readyz without hurting traffic: one check at a time, its result reused for a short while.

    request -> result younger than admin.readiness_cache_seconds? -> that result
            -> a check running? -> wait for it (never a second one at the same time)
            -> else start one (upstream state, durability refusal, one ping per backend)

Rules of this module:
- However many probes arrive, at most one readiness check runs at once, and at most one per
  `max_age` seconds: a flood of /readyz cannot multiply backend pings. (The pings themselves use
  connections of their own, never the data path's pool: see backends/postgres.py.)
- The cached result is the last one computed; a probe may see it up to `max_age` seconds late.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable

Report = dict[str, str | None]


class CachedReadiness:
    def __init__(self, check: Callable[[], Awaitable[Report]], max_age: float):
        self._check = check
        self.max_age = max_age
        self._result: Report | None = None
        self._at = -math.inf
        self._running: asyncio.Task | None = None
        self.requests = 0       # /readyz answered
        self.checks = 0         # checks actually run

    async def __call__(self) -> Report:
        self.requests += 1
        loop = asyncio.get_running_loop()
        if self._result is not None and loop.time() - self._at < self.max_age:
            return self._result
        if self._running is None:
            self._running = loop.create_task(self._run())
        # shield: a probe that hangs up must not cancel the check the others wait for
        return await asyncio.shield(self._running)

    async def _run(self) -> Report:
        self.checks += 1
        try:
            result = await self._check()
            self._result, self._at = result, asyncio.get_running_loop().time()
            return result
        finally:
            self._running = None
