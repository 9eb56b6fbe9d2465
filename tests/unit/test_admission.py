"""FairGate (at most `limit` holders, owners served in turn) and map_bounded (a fixed number of workers)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.cache.admission import FairGate, map_bounded


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_owners_take_turns_and_the_limit_holds():
    async def scenario():
        gate = FairGate(2)
        order: list[str] = []
        running = peak = 0

        async def load(owner: str, n: int):
            nonlocal running, peak
            async with gate.slot(owner, timeout=5):
                running += 1
                peak = max(peak, running)
                order.append(f"{owner}{n}")
                await asyncio.sleep(0.001)
                running -= 1
        hog = [asyncio.create_task(load("a", n)) for n in range(50)]
        await asyncio.sleep(0)             # a's 50 loads are queued first
        single = asyncio.create_task(load("b", 0))
        await asyncio.gather(*hog, single)
        return order, peak, gate
    order, peak, gate = run(scenario())
    assert peak == 2
    assert order.index("b0") <= 3, f"b waited behind a's queue: {order[:10]}"
    assert order[:2] == ["a0", "a1"] and [o for o in order if o.startswith("a")] == [f"a{n}" for n in range(50)]
    assert gate.active == 0 and gate.waiting == 0


def test_a_waiter_times_out_and_a_cancelled_grant_is_handed_on():
    async def scenario():
        gate = FairGate(1)
        await gate.acquire("a", 1)
        with pytest.raises(TimeoutError):
            await gate.acquire("b", 0.05)
        assert gate.waiting == 0 and not gate._lanes
        waiter = asyncio.create_task(gate.acquire("c", 5))
        later = asyncio.create_task(gate.acquire("d", 5))
        await asyncio.sleep(0)
        gate.release()                     # granted to c ...
        waiter.cancel()                    # ... which leaves before it resumes: d must get the slot
        await asyncio.wait_for(later, 1)
        assert gate.active == 1
        gate.release()
        assert gate.active == 0
    run(scenario())


def test_map_bounded_keeps_order_bounds_concurrency_and_stops_on_the_first_error():
    async def scenario():
        running = peak = 0
        started: list[int] = []

        async def work(n: int) -> int:
            nonlocal running, peak
            started.append(n)
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.001)
            running -= 1
            if n == 5:
                raise ValueError("five")
            return n * 2
        assert await map_bounded(work, list(range(5)), 3) == [0, 2, 4, 6, 8]
        assert peak == 3
        started.clear()
        with pytest.raises(ValueError, match="five"):
            await map_bounded(work, list(range(1000)), 4)
        assert len(started) < 20, "no new work after the first error"
        assert await map_bounded(work, [], 4) == []
    run(scenario())
