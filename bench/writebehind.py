"""Write-behind benchmark, in one run:

1. rows/s landed in Postgres and DynamoDB (moto's server) through write-behind (50 clients SET through
   the proxy; the clock stops when the last row is in the database) vs the same rows written one by
   one with single-row INSERT ... ON CONFLICT / PutItem calls (10 concurrent connections);
2. the SET latency a client sees: plain SET on Redis, write-behind route, write-through route.

    .venv/bin/python bench/writebehind.py [--rows 20000] [--ddb-rows 3000] [--latency 2000]

Everything runs on loopback; every process started here is stopped by PID at the end; every loop is
bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
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
CLIENTS = 50
DEADLINE_S = 300


def value(i: int) -> str:
    return json.dumps({"name": f"user {i}", "email": f"u{i}@example.com"})


async def drive(client, keys: list[str]) -> None:
    """CLIENTS concurrent writers over `keys`."""
    queue = iter(range(len(keys)))

    async def worker():
        for i in queue:
            await client.set(keys[i], value(i))
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CLIENTS))), DEADLINE_S)


async def wait_landed(count, expected: int) -> float:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if await count() >= expected:
            return time.perf_counter()
        await asyncio.sleep(0.02)
    raise RuntimeError(f"only {await count()} of {expected} rows landed within {DEADLINE_S}s")


async def drain_rate(redis_port: int, client, keys: list[str], count, already: int) -> float:
    """The flusher alone: hold every partition's lease so the queue fills, then let go and time the
    drain (the proxy re-claims within ~0.1 s, included)."""
    r = redis.asyncio.Redis(port=redis_port)
    owners = [f"cacheproxy:wb:{{{p}}}:owner" for p in range(16)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:          # take each lease as the proxy lets it go
        for key in owners:
            await r.set(key, "bench-holder", px=120_000)
        await asyncio.sleep(0.05)
        if all([await r.get(k) == b"bench-holder" for k in owners]):
            break
    await asyncio.sleep(0.5)                     # batches in flight finish
    await drive(client, keys)
    base = await count()
    started = time.perf_counter()
    await r.delete(*owners)
    landed = await wait_landed(count, already + len(keys))
    await r.aclose()
    return (already + len(keys) - base) / (landed - started)


async def one_by_one(n: int, write) -> float:
    """Each row in its own call, 10 at a time; returns rows/s."""
    queue = iter(range(n))

    async def worker():
        for i in queue:
            await write(i)
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(10))), DEADLINE_S)
    return n / (time.perf_counter() - started)


def set_latency(port: int, key: str, n: int) -> list[float]:
    c = redis.Redis(port=port)
    out = []
    for i in range(n):
        started = time.perf_counter()
        c.set(key.format(i=i % 500), value(i))
        out.append((time.perf_counter() - started) * 1e6)
    c.close()
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if q < 1 else max(values)


async def main_async(args, workdir: Path) -> str:
    schema = "benchwb_" + uuid.uuid4().hex[:8]
    table = "BenchWriteProfiles" + uuid.uuid4().hex[:6]
    conn = await asyncpg.connect(DSN)
    await conn.execute(f"""CREATE SCHEMA {schema};
        CREATE TABLE {schema}.users (id bigint PRIMARY KEY, name text, email text);
        CREATE TABLE {schema}.direct (id bigint PRIMARY KEY, name text, email text);""")
    upsert = ("INSERT INTO {t} (id, name, email) VALUES ($1, $2, $3) ON CONFLICT (id) "
              "DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email")
    try:
        with Procs(workdir) as procs:
            redis_port, moto_port, proxy_port = free_port(), free_port(), free_port()
            start_redis(procs, redis_port)
            env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                       AWS_DEFAULT_REGION="us-east-1")
            os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
            moto, moto_log = procs.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                                  "-p", str(moto_port)], env=env)
            wait_for_port("127.0.0.1", moto_port, 30, moto, moto_log)
            endpoint = f"http://127.0.0.1:{moto_port}"
            async with get_session().create_client("dynamodb", region_name="us-east-1", endpoint_url=endpoint) as ddb:
                for name in (table, table + "Direct"):
                    await ddb.create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                                           KeySchema=[{"AttributeName": "UserId", "KeyType": "HASH"}],
                                           AttributeDefinitions=[{"AttributeName": "UserId", "AttributeType": "S"}])
                pg_write = {"mode": "write-behind", "fields": ["name", "email"],
                            "upsert": upsert.format(t=f"{schema}.users"),
                            "delete": f"DELETE FROM {schema}.users WHERE id = $1"}
                read = {"query": f"SELECT id, name, email FROM {schema}.users WHERE id = $1", "as": "json"}
                config = workdir / "proxy.yaml"
                config.write_text(json.dumps({
                    "listen": {"host": "127.0.0.1", "port": proxy_port},
                    "upstream": {"url": f"redis://127.0.0.1:{redis_port}/0"},
                    "admin": {"enabled": False}, "log": {"level": "warning"},
                    "backends": {"main": {"type": "postgres", "dsn": DSN, "max_pool": 10,
                                          "versions_table": f"{schema}.cacheproxy_versions"},
                                 "ddb": {"type": "dynamodb", "endpoint_url": endpoint}},
                    "write_behind": {"batch_size": args.batch_size, "max_delay_ms": 100, "claim_idle_ms": 300},
                    "routes": [
                        {"key": "user:{id:int}", "backend": "main", "read": read, "write": pg_write},
                        {"key": "wt:{id:int}", "backend": "main", "read": read,
                         "write": {**pg_write, "mode": "write-through"}},
                        {"key": "profile:{user_id}", "backend": "ddb",
                         "read": {"table": table, "key": {"UserId": "{user_id}"}, "as": "json"},
                         "write": {"mode": "write-behind"}}]}))
                proxy, proxy_log = procs.start("proxy", [sys.executable, "-m", "proxy", "serve", "--config",
                                                         str(config)], env=env)
                wait_for_port("127.0.0.1", proxy_port, 30, proxy, proxy_log)
                client = redis.asyncio.Redis(port=proxy_port, max_connections=CLIENTS)
                rows = []

                # Postgres
                print(f"Postgres: {args.rows:,} rows ...", file=sys.stderr)
                count_pg = lambda: conn.fetchval(f"SELECT count(*) FROM {schema}.users")  # noqa: E731
                started = time.perf_counter()
                await drive(client, [f"user:{i}" for i in range(args.rows)])
                acked = time.perf_counter()
                landed = await wait_landed(count_pg, args.rows)
                drain = await drain_rate(redis_port, client, [f"user:{args.rows + i}" for i in range(args.rows)],
                                         count_pg, args.rows)
                pool = await asyncpg.create_pool(DSN, min_size=10, max_size=10)
                sql = upsert.format(t=f"{schema}.direct")
                direct = await one_by_one(args.rows, lambda i: pool.execute(sql, i, f"user {i}", f"u{i}@example.com"))
                await pool.close()
                wb = args.rows / (landed - started)
                rows.append(["Postgres", f"{args.rows:,}", f"{args.rows / (acked - started):,.0f}", f"{wb:,.0f}",
                             f"{drain:,.0f}", f"{direct:,.0f}", f"{drain / direct:.1f}x"])

                # DynamoDB
                print(f"DynamoDB: {args.ddb_rows:,} items ...", file=sys.stderr)

                async def ddb_count(name=table):
                    return (await ddb.scan(TableName=name, Select="COUNT"))["Count"]
                started = time.perf_counter()
                await drive(client, [f"profile:{i}" for i in range(args.ddb_rows)])
                acked = time.perf_counter()
                landed = await wait_landed(ddb_count, args.ddb_rows)
                drain = await drain_rate(redis_port, client, [f"profile:{args.ddb_rows + i}" for i in range(args.ddb_rows)],
                                         ddb_count, args.ddb_rows)
                direct = await one_by_one(args.ddb_rows, lambda i: ddb.put_item(
                    TableName=table + "Direct", Item={"UserId": {"S": str(i)}, "name": {"S": f"user {i}"},
                                                      "email": {"S": f"u{i}@example.com"}}))
                wb = args.ddb_rows / (landed - started)
                rows.append(["DynamoDB (moto)", f"{args.ddb_rows:,}", f"{args.ddb_rows / (acked - started):,.0f}",
                             f"{wb:,.0f}", f"{drain:,.0f}", f"{direct:,.0f}", f"{drain / direct:.1f}x"])
                await client.aclose()

            # SET latency, one client
            print("SET latency ...", file=sys.stderr)
            latency = []
            for label, port, key in (("plain SET on Redis", redis_port, "plain:{i}"),
                                     ("plain SET through the proxy", proxy_port, "plain:{i}"),
                                     ("write-behind route", proxy_port, "user:{i}"),
                                     ("write-through route (Postgres)", proxy_port, "wt:{i}")):
                values = set_latency(port, key, args.latency)
                latency.append([label, f"{pct(values, 0.5):.0f}", f"{pct(values, 0.99):.0f}"])
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()
    info = machine_info()
    out = [
        "## Write-behind: rows landed vs one-by-one writes, and SET latency",
        "",
        f"Command: `.venv/bin/python bench/writebehind.py {' '.join(sys.argv[1:])}` "
        f"(proxy at commit {git_describe()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, {info['redis-server']}; "
        f"load average before: {info['loadavg']}. Write-behind: {CLIENTS} redis-py asyncio clients SET distinct "
        f"keys through the proxy (batch_size {args.batch_size}, max_delay_ms 100); 'end to end' counts until "
        f"the last row is in the database (the clients' SET rate bounds it); 'flusher drain' times the flusher alone "
        f"on a queue filled while it was held off. One by one: the same rows as single-row upserts (asyncpg pool of 10) "
        f"or PutItem calls (aiobotocore), 10 in flight.",
        "",
        md_table(["database", "rows", "SETs acknowledged/s", "end to end landed rows/s", "flusher drain rows/s",
                  "one-by-one rows/s", "drain / one-by-one"], rows),
        "",
        f"SET latency, 1 client, {args.latency:,} SETs (redis-py, microseconds):",
        "",
        md_table(["", "p50", "p99"], latency),
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--ddb-rows", type=int, default=3000)
    parser.add_argument("--latency", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="2,000 / 500 rows, 500 latency samples")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.ddb_rows, args.latency = 2000, 500, 500
    with tempfile.TemporaryDirectory(prefix="cacheproxy-bench-") as tmp:
        text = asyncio.run(main_async(args, Path(tmp)))
    print(text)
    print(f"(written to {write_result('writebehind', text)})", file=sys.stderr)


if __name__ == "__main__":
    main()
