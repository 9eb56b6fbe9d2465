"""What write fencing costs a Postgres batch: PostgresBackend.write_batch of N upserts with the
versions table (the default) and without it (`versions_table: ''`), same rows, same connection pool.

    .venv/bin/python bench/fencing.py [--batch 500] [--rounds 40]

Each round writes one batch of `--batch` distinct keys with a version higher than the last round's,
so every key wins its version check and every upsert runs (the common case). Prints the median and
p90 batch time and rows/s of each mode; a private schema is created and dropped. Bounded in rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from proxy.backends.base import WriteOp, WriteSpec  # noqa: E402
from proxy.backends.postgres import PostgresBackend  # noqa: E402
from proxy.config import PostgresBackend as PostgresConfig  # noqa: E402

DSN = "postgresql://postgres@127.0.0.1:5432/test"


async def run_mode(schema: str, versions: str | None, batch: int, rounds: int) -> list[float]:
    backend = PostgresBackend("main", PostgresConfig(type="postgres", dsn=DSN, versions_table=versions or ""))
    table = f"{schema}.users_{'fenced' if versions else 'plain'}"
    spec = WriteSpec(route="user:{id:int}", key_params=["id"], fields=["name", "email"],
                     upsert=f"INSERT INTO {table} (id, name, email) VALUES ($1, $2, $3) ON CONFLICT (id) "
                            f"DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email")
    times = []
    try:
        for r in range(rounds + 2):           # two warm-up rounds (prepare, pool, versions table)
            version = time.time_ns()          # grows from round to round, across both passes
            ops = [WriteOp("upsert", {"id": i}, fields={"name": f"n{r}", "email": f"{i}@x"}, version=version,
                           key=b"user:%d" % i) for i in range(batch)]
            started = time.perf_counter()
            results = await backend.write_batch(spec, ops)
            elapsed = time.perf_counter() - started
            assert results == [None] * batch, results[:3]
            if r >= 2:
                times.append(elapsed)
    finally:
        await backend.close()
    return times


async def main_async(args) -> None:
    schema = "benchfence_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(DSN)
    await conn.execute(f"""CREATE SCHEMA {schema};
        CREATE TABLE {schema}.users_fenced (id bigint PRIMARY KEY, name text, email text);
        CREATE TABLE {schema}.users_plain (id bigint PRIMARY KEY, name text, email text);""")
    try:
        results = {}
        for _ in range(2):                    # alternate the modes, twice, to spread the machine's noise
            for label, versions in (("unfenced", None), ("fenced", f"{schema}.versions")):
                results.setdefault(label, []).extend(await run_mode(schema, versions, args.batch, args.rounds // 2))
        print(f"write_batch of {args.batch} upserts, {args.rounds} rounds per mode (after warm-up):")
        print("| mode | median ms | p90 ms | rows/s (median) |")
        print("|---|---:|---:|---:|")
        for label, times in results.items():
            median = statistics.median(times)
            p90 = statistics.quantiles(times, n=10)[-1]
            print(f"| {label} | {median * 1000:.1f} | {p90 * 1000:.1f} | {args.batch / median:,.0f} |")
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=40)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
