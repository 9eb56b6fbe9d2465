"""The demo's walk-through: what the proxy does, step by step, against the running demo setup.

Each step is a function decorated with @step("title"); they run in the order they are defined and
share `state` (e.g. the miss latency, for the hit step to compare with). A step reports with
check(ok, what); the script exits 1 if any check failed. To add a step, write another function.
Ports come from DEMO_PORT / DEMO_ADMIN_PORT (demo.sh sets them).
"""

import asyncio
import json
import os
import sys
import time
import urllib.request

import asyncpg
import redis

PORT = int(os.environ.get("DEMO_PORT", "6380"))
ADMIN = f"http://127.0.0.1:{os.environ.get('DEMO_ADMIN_PORT', '9121')}"
DSN = "postgresql://postgres@127.0.0.1:5432/test"
USER_ROUTE = "user:{id:int}"

proxy = redis.Redis(port=PORT, decode_responses=True)
direct = redis.Redis(port=6379, decode_responses=True)
STEPS = []
failures = []
state = {}


def step(title: str):
    def register(fn):
        STEPS.append((title, fn))
        return fn
    return register


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, (time.perf_counter() - start) * 1000


def check(ok: bool, what: str) -> None:
    print(("   ok: " if ok else "   FAILED: ") + what)
    if not ok:
        failures.append(what)


def metric(name: str, route: str) -> float:
    body = urllib.request.urlopen(f"{ADMIN}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(f'{name}{{route="{route}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for_row(uid: int, name: str, timeout: float = 10.0):
    """Poll Postgres (one connection) until row `uid` has `name`; returns (row, ms waited)."""
    async def poll():
        conn = await asyncpg.connect(DSN)
        try:
            started = time.perf_counter()
            while True:
                row = await conn.fetchrow("SELECT id, name, email FROM demo_users WHERE id = $1", uid)
                waited = (time.perf_counter() - started) * 1000
                if (row is not None and row["name"] == name) or waited > timeout * 1000:
                    return row, waited
                await asyncio.sleep(0.005)
        finally:
            await conn.close()
    return asyncio.run(poll())


def reset() -> None:
    """Start from a cold cache for the demo's keys (the write-behind queue is left alone)."""
    direct.delete("user:3", "user:4", "profile:u2", "user:99999")
    for pattern in ("cacheproxy:lease:*", "cacheproxy:neg:*"):
        for key in direct.scan_iter(pattern):
            direct.delete(key)


@step("A miss: GET user:3 is not in Redis, so the proxy loads it from Postgres")
def miss():
    value, state["miss_ms"] = timed(proxy.get, "user:3")
    print(f"   GET user:3 -> {value}   ({state['miss_ms']:.2f} ms)")
    check(value is not None and json.loads(value)["name"] == "User 3", "row loaded from Postgres")


@step("The same GET again is a hit, answered by Redis")
def hit():
    value, hit_ms = timed(proxy.get, "user:3")
    print(f"   GET user:3 -> {value}   (hit: {hit_ms:.2f} ms; the miss took {state['miss_ms']:.2f} ms)")
    print(f"   Redis now holds it with TTL {direct.ttl('user:3')} s")
    check(direct.exists("user:3") == 1, "value written back to Redis with a TTL")


@step("A DynamoDB item served as a Redis hash")
def dynamodb_hash():
    profile = proxy.hgetall("profile:u2")
    print(f"   HGETALL profile:u2 -> {profile}")
    check(profile.get("Plan") == "free", "item loaded from DynamoDB")


@step("A write: SET user:4 answers from the cache at once and reaches Postgres through write-behind")
def write_behind():
    new = {"name": f"Renamed {int(time.time())}", "email": "user4@example.com"}
    _, set_ms = timed(proxy.set, "user:4", json.dumps(new))
    print(f"   SET user:4 {json.dumps(new)} -> OK ({set_ms:.2f} ms); GET user:4 -> {proxy.get('user:4')}")
    row, waited = wait_for_row(4, new["name"])
    print(f"   Postgres demo_users row 4 -> {dict(row) if row else None} "
          f"(landed {waited:.0f} ms after the reply; write_behind.max_delay_ms is 200)")
    check(row is not None and row["name"] == new["name"], "the write landed in Postgres")


@step("A missing row is cached as 'not found' (no query on every GET)")
def negative_cache():
    for _ in range(5):
        proxy.get("user:99999")
    state["negative"] = metric("cacheproxy_route_negative_hits_total", USER_ROUTE)
    print(f"   5 x GET user:99999 -> nil; negative-cache hits so far: {state['negative']:.0f}")
    check(state["negative"] >= 4, "missing row answered from the negative cache")


@step("Everything else passes through unchanged")
def pass_through():
    proxy.execute_command("SETEX", "session:abc", 60, "alice")
    pipe = proxy.pipeline()
    pipe.incr("ratelimit:alice")
    pipe.expire("ratelimit:alice", 60)
    print(f"   SETEX/GET session -> {proxy.get('session:abc')}; INCR+EXPIRE pipeline -> {pipe.execute()}")
    check(proxy.get("session:abc") == "alice", "pass-through commands work")


@step(f"Hit ratio from the proxy's metrics ({ADMIN}/metrics)")
def hit_ratio():
    hits = metric("cacheproxy_route_hits_total", USER_ROUTE)
    misses = metric("cacheproxy_route_misses_total", USER_ROUTE)
    loads = metric("cacheproxy_route_loads_total", USER_ROUTE)
    served = hits + misses
    print(f"   {USER_ROUTE}: {served:.0f} reads, {hits:.0f} hits, {misses:.0f} misses of which "
          f"{state.get('negative', 0):.0f} answered by the negative cache; {loads:.0f} Postgres queries "
          f"(cache hit ratio {(served - loads) / max(served, 1):.0%})")
    check(served > loads, "more reads than database queries")


def main() -> int:
    reset()
    for title, fn in STEPS:
        print(f"\n== {title}")
        try:
            fn()
        except Exception as exc:        # one broken step must not hide the others
            check(False, f"{title}: {type(exc).__name__}: {exc}")
    print()
    if failures:
        print(f"demo walk-through: {len(failures)} step(s) failed: {failures}")
        return 1
    print("demo walk-through: all steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
