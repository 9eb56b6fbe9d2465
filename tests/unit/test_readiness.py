"""CachedReadiness: concurrent probes share one check; a result is reused for max_age seconds."""

from __future__ import annotations

import asyncio

from proxy.ops.readiness import CachedReadiness


def test_probes_share_one_check_and_reuse_its_result():
    async def scenario():
        calls = 0

        async def check():
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            return {"backend:main": None if calls == 1 else "down"}
        probe = CachedReadiness(check, max_age=0.2)
        first = await asyncio.gather(*(probe() for _ in range(100)))
        assert calls == 1 and all(r == {"backend:main": None} for r in first)
        assert await probe() == {"backend:main": None} and calls == 1      # reused
        await asyncio.sleep(0.25)
        assert await probe() == {"backend:main": "down"} and calls == 2     # stale: checked again
        assert (probe.requests, probe.checks) == (102, 2)

        uncached = CachedReadiness(check, max_age=0)
        await asyncio.gather(*(uncached() for _ in range(10)))
        assert uncached.checks == 1, "checks never overlap, even without a cache"
    asyncio.run(asyncio.wait_for(scenario(), 10))
