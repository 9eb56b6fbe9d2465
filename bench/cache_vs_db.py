"""Read-through benchmark: the same zipfian workload through the proxy's routes and straight at the
database, in one run, for a primary-key lookup and an aggregate join (Postgres) and GetItem (DynamoDB
on moto's server). Also the hit latency through the proxy vs a GET on Redis itself.

    .venv/bin/python bench/cache_vs_db.py [--seconds 8] [--quick]

Everything runs on loopback; every process started here is stopped by PID at the end; every load
loop is bounded by its duration.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import asyncpg
import redis
import redis.asyncio
from aiobotocore.session import get_session

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Procs,
    free_port,
    git_describe,
    machine_info,
    md_table,
    start_redis,
    wait_for_port,
    write_result,
)

DSN = "postgresql://postgres@127.0.0.1:5432/test"
ROWS = 10_000
CLIENTS = 50


def zipf_sampler(n: int, s: float = 1.1, seed: int = 7):
    weights = [1 / (rank ** s) for rank in range(1, n + 1)]
    cumulative, total = [], 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    ids = list(range(1, n + 1))
    random.Random(seed).shuffle(ids)      # hot ids spread over the key space
    rng = random.Random(seed + 1)
    return lambda: ids[bisect.bisect_left(cumulative, rng.random() * total)]


async def setup_postgres(schema: str) -> float:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"""
            CREATE SCHEMA {schema};
            CREATE TABLE {schema}.users (id bigint PRIMARY KEY, name text, email text);
            CREATE TABLE {schema}.orders (id bigserial PRIMARY KEY, user_id bigint, total numeric);
            INSERT INTO {schema}.users SELECT i, 'user ' || i, 'u' || i || '@example.com'
                FROM generate_series(1, {ROWS}) i;
            INSERT INTO {schema}.orders (user_id, total)
                SELECT 1 + (i * 7919) % {ROWS}, (i % 1000) / 10.0 FROM generate_series(1, 200000) i;
            ANALYZE {schema}.users; ANALYZE {schema}.orders;
        """)
        # No index on orders.user_id: the aggregate scans the orders, a query costing milliseconds.
        started = time.perf_counter()
        for uid in range(1, 21):
            await conn.fetch(stats_sql(schema), uid)
        return (time.perf_counter() - started) / 20 * 1000
    finally:
        await conn.close()


def stats_sql(schema: str) -> str:
    return (f"SELECT u.id, u.name, count(o.id) AS orders, coalesce(sum(o.total), 0) AS total "
            f"FROM {schema}.users u LEFT JOIN {schema}.orders o ON o.user_id = u.id "
            f"WHERE u.id = $1 GROUP BY u.id, u.name")


async def setup_dynamodb(endpoint: str, table: str) -> None:
    async with get_session().create_client("dynamodb", region_name="us-east-1", endpoint_url=endpoint) as ddb:
        await ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                               KeySchema=[{"AttributeName": "UserId", "KeyType": "HASH"}],
                               AttributeDefinitions=[{"AttributeName": "UserId", "AttributeType": "S"}])
        for start in range(1, ROWS + 1, 25):
            items = [{"PutRequest": {"Item": {"UserId": {"S": str(i)}, "Plan": {"S": "pro"},
                                              "Logins": {"N": str(i)}}}}
                     for i in range(start, min(start + 25, ROWS + 1))]
            await ddb.batch_write_item(RequestItems={table: items})


async def drive(call, seconds: float, sample) -> tuple[int, list[float]]:
    """CLIENTS workers calling call(id) until the deadline; returns (requests, latencies in ms)."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def worker():
        while time.monotonic() < deadline:
            key = sample()
            started = time.perf_counter()
            await call(key)
            latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return len(latencies), latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def route_metric(admin_port: int, name: str, route: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(f'cacheproxy_route_{name}_total{{route="{route}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def scenario(name, route, proxy_call, direct_call, seconds, admin_port, flush) -> list:
    flush()
    before = {m: route_metric(admin_port, m, route) for m in ("hits", "misses", "loads")}
    sample = zipf_sampler(ROWS)
    n_proxy, lat_proxy = await drive(proxy_call, seconds, sample)
    after = {m: route_metric(admin_port, m, route) for m in ("hits", "misses", "loads")}
    hits = after["hits"] - before["hits"]
    misses = after["misses"] - before["misses"]
    loads = after["loads"] - before["loads"]
    n_direct, lat_direct = await drive(direct_call, seconds, zipf_sampler(ROWS))
    return [
        name,
        f"{n_direct / seconds:,.0f}", f"{pct(lat_direct, 0.5):.2f} / {pct(lat_direct, 0.99):.2f}",
        f"{n_proxy / seconds:,.0f}", f"{pct(lat_proxy, 0.5):.2f} / {pct(lat_proxy, 0.99):.2f}",
        f"{hits / max(hits + misses, 1):.1%}", f"{(n_proxy - loads) / seconds:,.0f}",
        f"{n_proxy / max(n_direct, 1):.1f}x",
    ]


def hit_latency(proxy_port: int, redis_port: int, count: int) -> list:
    def measure(port: int, key: str) -> list[float]:
        client = redis.Redis(port=port, protocol=2)
        client.get(key)
        samples = []
        for _ in range(count):
            started = time.perf_counter_ns()
            client.get(key)
            samples.append((time.perf_counter_ns() - started) / 1000)
        client.close()
        return samples

    redis.Redis(port=redis_port).set("plain:key", json.dumps({"id": 1, "name": "user 1"}))
    routed = measure(proxy_port, "user:1")
    direct = measure(redis_port, "plain:key")
    return [["p50", f"{pct(direct, 0.5):.0f}", f"{pct(routed, 0.5):.0f}", f"+{pct(routed, 0.5) - pct(direct, 0.5):.0f}"],
            ["p99", f"{pct(direct, 0.99):.0f}", f"{pct(routed, 0.99):.0f}", f"+{pct(routed, 0.99) - pct(direct, 0.99):.0f}"]]


async def main_async(args, workdir: Path) -> str:
    schema = "bench_" + uuid.uuid4().hex[:8]
    table = "BenchProfiles"
    with Procs(workdir) as procs:
        redis_port, moto_port, proxy_port, admin_port = (free_port() for _ in range(4))
        start_redis(procs, redis_port)
        env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1")
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        moto, moto_log = procs.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                              "-p", str(moto_port)], env=env)
        wait_for_port("127.0.0.1", moto_port, 30, moto, moto_log)
        endpoint = f"http://127.0.0.1:{moto_port}"
        print("filling Postgres and DynamoDB ...", file=sys.stderr)
        stats_ms = await setup_postgres(schema)
        await setup_dynamodb(endpoint, table)
        try:
            config = workdir / "proxy.yaml"
            config.write_text(json.dumps({
                "listen": {"host": "127.0.0.1", "port": proxy_port},
                "upstream": {"url": f"redis://127.0.0.1:{redis_port}/0"},
                "admin": {"enabled": True, "port": admin_port}, "log": {"level": "warning"},
                "backends": {"main": {"type": "postgres", "dsn": DSN, "max_pool": 10},
                             "ddb": {"type": "dynamodb", "endpoint_url": endpoint}},
                "routes": [
                    {"key": "user:{id:int}", "backend": "main",
                     "read": {"query": f"SELECT id, name, email FROM {schema}.users WHERE id = $1", "as": "json"}},
                    {"key": "userstats:{id:int}", "backend": "main", "read": {"query": stats_sql(schema), "as": "json"}},
                    {"key": "profile:{user_id}", "backend": "ddb",
                     "read": {"table": table, "key": {"UserId": "{user_id}"}, "as": "json"}}]}))
            proxy, proxy_log = procs.start("proxy", [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                                           env=env)
            wait_for_port("127.0.0.1", proxy_port, 30, proxy, proxy_log)
            client = redis.asyncio.Redis(port=proxy_port, max_connections=CLIENTS)
            pool = await asyncpg.create_pool(DSN, min_size=10, max_size=10)
            flush = redis.Redis(port=redis_port).flushall
            rows = []
            async with get_session().create_client("dynamodb", region_name="us-east-1", endpoint_url=endpoint) as ddb:
                pk = f"SELECT id, name, email FROM {schema}.users WHERE id = $1"
                rows.append(await scenario(
                    "Postgres PK lookup", "user:{id:int}", lambda i: client.get(f"user:{i}"),
                    lambda i: pool.fetch(pk, i), args.seconds, admin_port, flush))
                rows.append(await scenario(
                    f"Postgres aggregate join (~{stats_ms:.1f} ms)", "userstats:{id:int}",
                    lambda i: client.get(f"userstats:{i}"), lambda i: pool.fetch(stats_sql(schema), i),
                    args.seconds, admin_port, flush))
                rows.append(await scenario(
                    "DynamoDB GetItem (moto)", "profile:{user_id}", lambda i: client.get(f"profile:{i}"),
                    lambda i: ddb.get_item(TableName=table, Key={"UserId": {"S": str(i)}}),
                    args.seconds, admin_port, flush))
            await client.aclose()
            await pool.close()
            latency = hit_latency(proxy_port, redis_port, args.hit_requests)
        finally:
            conn = await asyncpg.connect(DSN)
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
            await conn.close()
    info = machine_info()
    out = [
        "## Read-through: cache vs database",
        "",
        f"Command: `.venv/bin/python bench/cache_vs_db.py {' '.join(sys.argv[1:])}` "
        f"(proxy at commit {git_describe()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, {info['redis-server']}; "
        f"load average before: {info['loadavg']}. Workload: {CLIENTS} asyncio clients (redis-py asyncio through the "
        f"proxy; asyncpg pool of 10 / aiobotocore direct) in one process, zipfian (s=1.1) over {ROWS:,} ids, "
        f"{args.seconds:g} s per side, cold cache at the start of each proxy run. 'DB queries/s saved' = requests "
        f"served through the proxy minus backend loads, per second.",
        "",
        md_table(["scenario", "direct ops/s", "direct p50 / p99 ms", "proxy ops/s", "proxy p50 / p99 ms",
                  "hit ratio", "DB queries/s saved", "proxy/direct"], rows),
        "",
        f"Hit latency, 1 client, {args.hit_requests:,} GETs (redis-py, microseconds): a cached routed key through "
        f"the proxy vs a plain key on Redis itself.",
        "",
        md_table(["", "Redis direct", "proxy (routed hit)", "difference"], latency),
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--hit-requests", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="2 s per side, 1,000 hit-latency GETs")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.hit_requests = 2, 1000
    with tempfile.TemporaryDirectory(prefix="cacheproxy-bench-") as tmp:
        text = asyncio.run(main_async(args, Path(tmp)))
    print(text)
    print(f"(written to {write_result('cache-vs-db', text)})", file=sys.stderr)


if __name__ == "__main__":
    main()
