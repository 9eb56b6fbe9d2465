"""Routed hits vs pass-through vs direct Redis, in one run (issue 13's first goal).

    .venv/bin/python bench/hits.py [--rounds 3] [--requests 100000] [--clients 50] [--pipeline 1]

Starts its own redis-server and the proxy (one worker) with one read-through route, `hit:{id}`, backed by
a Postgres table of 2,000 rows (a private schema on 127.0.0.1:5432/test, dropped at the end). Every
routed key is loaded once through the proxy first (misses), so the measured GETs are all hits; the
backend's own query count is read before and after each round to prove it (any query during a round is
reported as misses). Then, round by round and interleaved:

    direct       redis-benchmark GET hit:__rand_int__ straight at redis-server
    passthrough  the same GETs on `plain:__rand_int__` keys through the proxy (no route owns them)
    routed       GET hit:__rand_int__ through the proxy: a routed read that finds the key cached

redis-benchmark's `__rand_int__` is 12 zero-padded digits (`-r 2000`: 000000000000..000000001999), so the
route's parameter is a `str`. Reports requests/s (median of rounds), the ratios routed/passthrough and
proxy/direct, and the proxy's CPU-seconds per 100,000 requests (utime + stime from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg  # noqa: E402
from common import (  # noqa: E402
    CpuWatch,
    Procs,
    free_port,
    md_table,
    median,
    run,
    start_redis,
    wait_for_port,
    write_result,
)

DSN = "postgresql://postgres@127.0.0.1:5432/test"
KEYS = 2000
PYTHON = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python")


def proxy_config(port: int, redis_port: int, schema: str) -> str:
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
upstream: {{url: "redis://127.0.0.1:{redis_port}/0", pool_size: 2}}
admin: {{enabled: false}}
log: {{level: warning}}
backends:
  main: {{type: postgres, dsn: "{DSN}", max_pool: 20}}
routes:
  - key: "hit:{{id}}"
    backend: main
    read: {{query: "SELECT v FROM {schema}.items WHERE id = $1", as: string, column: v}}
    ttl: {{seconds: 3600, jitter: 0}}
"""


async def make_schema(schema: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"CREATE TABLE {schema}.items (id text PRIMARY KEY, v text NOT NULL)")
        await conn.executemany(f"INSERT INTO {schema}.items VALUES ($1, $2)",
                               [(f"{i:012d}", "x" * 64) for i in range(KEYS)])
    finally:
        await conn.close()


async def queries(schema: str) -> int:
    """How many times Postgres ran the route's query (pg_stat_statements is not assumed: seq scans and
    index scans of the table, from pg_stat_user_tables)."""
    conn = await asyncpg.connect(DSN)
    try:
        row = await conn.fetchrow("SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) AS n FROM "
                                  "pg_stat_user_tables WHERE schemaname = $1 AND relname = 'items'", schema)
        return int(row["n"])
    finally:
        await conn.close()


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


def benchmark(port: int, key: str, args) -> float:
    out = run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(args.requests),
               "-c", str(args.clients), "-P", str(args.pipeline), "-r", str(KEYS), "--csv",
               "GET", key], timeout=300).stdout
    line = [row for row in out.splitlines() if row.startswith('"GET')][-1]
    return float(line.split(",")[1].strip('"'))


def cpu_seconds(pid: int) -> float:
    return CpuWatch._proc_cpu(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    schema = "bench_hits_" + uuid.uuid4().hex[:8]
    asyncio.run(make_schema(schema))
    try:
        with tempfile.TemporaryDirectory() as tmp, Procs(Path(tmp)) as procs:
            redis_port, proxy_port = free_port(), free_port()
            start_redis(procs, redis_port)
            cfg = Path(tmp) / "proxy.yaml"
            cfg.write_text(proxy_config(proxy_port, redis_port, schema))
            proxy, log = procs.start("proxy", [PYTHON, "-m", "proxy", "serve", "--config", str(cfg)],
                                     cwd=str(Path(__file__).resolve().parents[1]))
            wait_for_port("127.0.0.1", proxy_port, 20, proxy, log)
            # Warm: every routed key loaded once through the proxy, the plain keys written directly.
            warm = "".join(f"GET hit:{i:012d}\n" for i in range(KEYS))
            run(["redis-cli", "-p", str(proxy_port)], input=warm, timeout=120)
            plain = "".join(f"SET plain:{i:012d} {'x' * 64}\n" for i in range(KEYS))
            run(["redis-cli", "-p", str(redis_port)], input=plain, timeout=120)
            results: dict[str, list[float]] = {"direct": [], "passthrough": [], "routed": []}
            cpu: dict[str, list[float]] = {"passthrough": [], "routed": []}
            misses = 0
            watch = CpuWatch([proxy.pid])
            for _ in range(args.rounds):
                results["direct"].append(benchmark(redis_port, "hit:__rand_int__", args))
                for name, key in (("passthrough", "plain:__rand_int__"), ("routed", "hit:__rand_int__")):
                    before_q = asyncio.run(queries(schema))
                    before = cpu_seconds(proxy.pid)
                    results[name].append(benchmark(proxy_port, key, args))
                    cpu[name].append((cpu_seconds(proxy.pid) - before) * 100_000 / args.requests)
                    misses += asyncio.run(queries(schema)) - before_q
            others, wall = watch.others()
    finally:
        asyncio.run(drop_schema(schema))
    rps = {name: median(values) for name, values in results.items()}
    rows = [[name, f"{rps[name]:,.0f}", f"{rps[name] / rps['direct']:.2f}x",
             f"{median(cpu[name]):.2f}" if name in cpu else "-"] for name in results]
    text = [f"## Routed hits vs pass-through vs direct (`bench/hits.py --rounds {args.rounds} --requests "
            f"{args.requests} --clients {args.clients} --pipeline {args.pipeline}`)", "",
            md_table(["target", "GET requests/s (median)", "vs direct", "proxy CPU-s per 100k"], rows), "",
            f"- routed hit / pass-through: **{rps['routed'] / rps['passthrough']:.2f}x**",
            f"- backend queries during the measured rounds: {misses} (0 means every routed GET was a hit)",
            f"- other processes used {others:.0f} CPU-s in {wall:.0f} s while this ran"]
    print("\n".join(text))
    if not args.no_save:
        write_result("hits", "\n".join(text))


if __name__ == "__main__":
    main()
