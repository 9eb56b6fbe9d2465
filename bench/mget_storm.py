"""MGET storm: several clients each MGET thousands of missing routed keys at once, while other
clients go on with plain commands and single misses. Measures what the others feel (PING/GET stall,
a miss's latency and errors), the proxy's memory, and how many queries Postgres runs at once.

    .venv/bin/python bench/mget_storm.py                       # the working tree, 4 x MGET of 10,000 keys
    .venv/bin/python bench/mget_storm.py --compare 1c8f19d     # also that commit (before), same run
    .venv/bin/python bench/mget_storm.py --keys 2000 --mgets 2 # smaller

The proxy runs with default settings (backends.main.max_pool 10, connect_timeout 5 s, and for the
new code limits.max_loads_per_command 16, queue_timeout 5 s). Every MGET asks for its own missing
ids (no single-flight sharing). Bounded: each target's storm stops at --timeout seconds; every
process started here is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import redis.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO_ROOT,
    Procs,
    exit_on_sigterm,
    free_port,
    git_describe,
    hwm_kb,
    machine_info,
    md_table,
    rss_kb,
    start_redis,
    wait_for_port,
    write_result,
)

DSN = "postgresql://postgres@127.0.0.1:5432/test"
ROWS = 5000


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


async def watch_commands(port: int, stop: asyncio.Event, out: dict) -> None:
    """Another client: PING, then GET of a plain key, every 10 ms; latency of each (ms)."""
    client = redis.asyncio.Redis(port=port, protocol=2, socket_timeout=60)
    await client.set("plain:key", "x")
    samples, errors = [], []
    while not stop.is_set():
        started = time.perf_counter()
        try:
            await client.ping()
            await client.get("plain:key")
            samples.append((time.perf_counter() - started) * 1000)
            if samples[-1] > 100:
                out.setdefault("stalls", []).append((round(time.perf_counter() - out["t0"], 1), round(samples[-1])))
        except redis.RedisError as exc:
            errors.append(str(exc))
        await asyncio.sleep(0.01)
    out["commands"], out["command_errors"] = samples, errors
    await client.aclose()


async def watch_misses(port: int, stop: asyncio.Event, out: dict) -> None:
    """Another client: a GET of a routed key that exists but is not cached, every 250 ms."""
    client = redis.asyncio.Redis(port=port, protocol=2, socket_timeout=60)
    samples, errors, uid = [], [], 1
    while not stop.is_set():
        started = time.perf_counter()
        try:
            await client.get(f"user:{uid}")
            samples.append((time.perf_counter() - started) * 1000)
        except redis.ResponseError as exc:
            errors.append(str(exc))
        uid += 1
        await asyncio.sleep(0.25)
    out["misses"], out["miss_errors"] = samples, errors
    await client.aclose()


async def watch_memory(pid: int, stop: asyncio.Event, out: dict) -> None:
    peak = 0
    while not stop.is_set():
        peak = max(peak, rss_kb(pid))
        await asyncio.sleep(0.1)
    out["rss_peak"] = peak


async def watch_postgres(stop: asyncio.Event, out: dict) -> None:
    """The most of the proxy's queries Postgres ran at once (pg_stat_activity, every 20 ms)."""
    conn = await asyncpg.connect(DSN)
    peak = 0
    while not stop.is_set():
        n = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cacheproxy' "
                                "AND state = 'active'")
        peak = max(peak, n)
        await asyncio.sleep(0.02)
    out["pg_peak"] = peak
    await conn.close()


async def storm(port: int, index: int, keys: int, out: dict) -> None:
    client = redis.asyncio.Redis(port=port, protocol=2, socket_timeout=600)
    first = 1_000_000 + index * keys
    started = time.perf_counter()
    try:
        await client.mget([f"user:{first + i}" for i in range(keys)])
        out.setdefault("mget_ok", 0)
        out["mget_ok"] += 1
    except redis.RedisError as exc:
        out.setdefault("mget_errors", []).append(str(exc)[:80])
    out.setdefault("mget_seconds", []).append(time.perf_counter() - started)
    await client.aclose()


async def run_target(label: str, name: str, code_dir: Path, schema: str, args, workdir: Path) -> list:
    """One storm against the proxy in `code_dir`; `name` (before/after) names its files."""
    with Procs(workdir) as procs:
        redis_port, proxy_port = free_port(), free_port()
        start_redis(procs, redis_port, name=f"redis-{name}")
        config = workdir / f"proxy-{name}.yaml"
        config.write_text(json.dumps({
            "listen": {"host": "127.0.0.1", "port": proxy_port},
            "upstream": {"url": f"redis://127.0.0.1:{redis_port}/0"},
            "admin": {"enabled": False}, "log": {"level": "error"},
            "backends": {"main": {"type": "postgres", "dsn": DSN}},
            "routes": [{"key": "user:{id:int}", "backend": "main",
                        "read": {"query": f"SELECT id, name FROM {schema}.users WHERE id = $1", "as": "json"}}]}))
        proxy, log = procs.start(f"proxy-{name}", [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                                 cwd=code_dir)
        wait_for_port("127.0.0.1", proxy_port, 30, proxy, log)
        await asyncio.sleep(1.0)
        rss_before = rss_kb(proxy.pid)
        out: dict = {"t0": time.perf_counter() + 0.5}      # the storm starts 0.5 s after the watchers
        stop = asyncio.Event()
        watchers = [asyncio.create_task(w) for w in (
            watch_commands(proxy_port, stop, out), watch_misses(proxy_port, stop, out),
            watch_memory(proxy.pid, stop, out), watch_postgres(stop, out))]
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        storms = asyncio.gather(*(storm(proxy_port, i, args.keys, out) for i in range(args.mgets)))
        try:
            await asyncio.wait_for(storms, args.timeout)
            finished = f"{time.perf_counter() - started:.1f}"
        except TimeoutError:
            finished = f"> {args.timeout:g} (stopped)"
        stop.set()
        await asyncio.gather(*watchers)
        await asyncio.sleep(2.0)
        rss_after, peak = rss_kb(proxy.pid), hwm_kb(proxy.pid)
        procs.stop(proxy)
    commands, misses = out.get("commands", []), out.get("misses", [])
    errors = out.get("miss_errors", [])
    command_errors = out.get("command_errors", [])
    mget_errors = out.get("mget_errors", [])
    worst = sorted(out.get("stalls", []), key=lambda st: -st[1])[:5]
    print(f"{label}: worst PING+GET stalls (s into the storm, ms): {worst}", file=sys.stderr)
    return [label, finished, f"{out.get('mget_ok', 0)}/{args.mgets}" + (f" ({mget_errors[0]})" if mget_errors else ""),
            out.get("pg_peak", 0),
            f"{ms(pct(commands, 0.5))} / {ms(pct(commands, 0.99))} / {ms(max(commands, default=None))}"
            + (f"; {len(command_errors)} errors ({command_errors[0][:40]})" if command_errors else ""),
            f"{ms(pct(misses, 0.5))} / {ms(max(misses, default=None))}",
            f"{len(errors)}" + (f" ({errors[0][:50]})" if errors else ""),
            f"{rss_before / 1024:.0f} / {peak / 1024:.0f} / {rss_after / 1024:.0f}"]


def export(rev: str, workdir: Path) -> Path:
    """The proxy package of commit `rev`, unpacked in a directory of its own (git archive)."""
    target = workdir / f"code-{rev}"
    target.mkdir()
    archive = subprocess.run(["git", "archive", rev, "proxy"], cwd=REPO_ROOT, capture_output=True, timeout=60,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, timeout=60, check=True)
    return target


async def main_async(args, workdir: Path) -> str:
    schema = "storm_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(DSN)
    await conn.execute(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.users (id bigint PRIMARY KEY, name text); "
                       f"INSERT INTO {schema}.users SELECT i, 'user ' || i FROM generate_series(1, {ROWS}) i")
    await conn.close()
    rows = []
    try:
        if args.compare:
            print(f"storm against {args.compare} ...", file=sys.stderr)
            rows.append(await run_target(f"before ({args.compare})", "before", export(args.compare, workdir),
                                         schema, args, workdir))
        print("storm against the working tree ...", file=sys.stderr)
        rows.append(await run_target(f"after ({git_describe()})", "after", REPO_ROOT, schema, args, workdir))
    finally:
        conn = await asyncpg.connect(DSN)
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()
    info = machine_info()
    return "\n".join([
        "## MGET storm: many missing routed keys at once",
        "",
        f"Command: `.venv/bin/python bench/mget_storm.py {' '.join(sys.argv[1:])}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, {info['redis-server']}; load "
        f"average before: {info['loadavg']}. {args.mgets} clients each MGET {args.keys:,} missing `user:{{id:int}}` "
        f"keys at once (Postgres PK lookup, default pool of 10); meanwhile one client sends PING + GET of a plain "
        f"key every 10 ms, another a GET of an uncached routed key every 250 ms.",
        "",
        md_table(["code", "storm s", "MGETs answered", "PG queries at once (peak)",
                  "other client PING+GET ms p50 / p99 / max", "other client's miss ms p50 / max",
                  "other client's miss errors", "proxy RSS MiB before / peak / after"], rows),
    ]) + "\n"


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=10_000, help="missing keys per MGET")
    parser.add_argument("--mgets", type=int, default=4, help="clients sending one MGET each, at once")
    parser.add_argument("--timeout", type=float, default=180, help="seconds before a storm is stopped")
    parser.add_argument("--compare", metavar="REV", help="also run the proxy of this commit (before)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cacheproxy-storm-") as tmp:
        text = asyncio.run(main_async(args, Path(tmp)))
    print(text)
    print(f"(written to {write_result('mget-storm', text)})", file=sys.stderr)


if __name__ == "__main__":
    main()
