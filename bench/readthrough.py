"""Read-through with vs without the cache, in one run (issue 13's second goal).

    .venv/bin/python bench/readthrough.py [--seconds 8] [--hit-ratios 0.5,0.8,0.95] [--clients 100]

A Postgres query that takes 20 ms (`pg_sleep(0.02)` joined in), read by `--clients` closed-loop clients:

    without   the clients ask Postgres themselves through an asyncpg pool of --pool connections
    with      the clients send GETs to the proxy (one route, the same query, the same pool size)

The hit ratio is set by design: a request asks one of the --hot keys (loaded before the run) with
probability h, else a key nobody asked before (a miss). The hit ratio actually reached is checked from
the database's own count of the route's queries (pg_stat_user_tables), not from the proxy. The limit set
by the hit ratio is 1/(1-h): the misses alone keep the same pool as busy as "without" is.

The load generator is lean: --procs processes, each an asyncio loop of closed-loop clients on raw sockets
with pre-encoded requests and hiredis reading the replies; its own CPU is reported so one can see it was
not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import hiredis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CpuWatch, Procs, free_port, md_table, start_redis, wait_for_port, write_result  # noqa: E402

DSN = "postgresql://postgres@127.0.0.1:5432/test"
PYTHON = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python")


def config(port: int, redis_port: int, schema: str, pool: int) -> str:
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
upstream: {{url: "redis://127.0.0.1:{redis_port}/0", pool_size: 2}}
admin: {{enabled: false}}
log: {{level: warning}}
backends:
  main: {{type: postgres, dsn: "{DSN}", min_pool: {pool}, max_pool: {pool}}}
routes:
  - key: "rt:{{id}}"
    backend: main
    read: {{query: "{query(schema)}", as: string, column: v}}
    ttl: {{seconds: 3600, jitter: 0, negative_seconds: 3600}}
limits: {{max_loads_per_command: 16}}
"""


def query(schema: str) -> str:
    return f"SELECT v FROM {schema}.items, pg_sleep(0.02) WHERE id = $1"


def keys_for(proc: int, hot: int, h: float, seed: int):
    """An endless stream of keys: hot with probability h, else a key nobody asked before."""
    rng = random.Random(seed)
    cold = 0
    while True:
        if rng.random() < h:
            yield f"h{rng.randrange(hot)}"
        else:
            cold += 1
            yield f"c{seed}-{proc}-{cold}"


async def _proxy_clients(port: int, clients: int, seconds: float, hot: int, h: float, seed: int, proc: int):
    keys = keys_for(proc, hot, h, seed)
    done = 0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        parser = hiredis.Reader()
        while time.monotonic() < deadline:
            key = next(keys).encode()
            writer.write(b"*2\r\n$3\r\nGET\r\n$%d\r\nrt:%s\r\n" % (len(key) + 3, key))
            while (reply := parser.gets()) is False:
                parser.feed(await reader.read(65536))
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"proxy error: {reply}")
            done += 1
        writer.close()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done


async def _db_clients(schema: str, pool_size: int, clients: int, seconds: float, hot: int, h: float, seed: int,
                      proc: int):
    keys = keys_for(proc, hot, h, seed)
    done = 0
    deadline = time.monotonic() + seconds
    sql = query(schema)
    async with asyncpg.create_pool(DSN, min_size=pool_size, max_size=pool_size) as pool:
        async def client() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                await pool.fetchval(sql, next(keys))
                done += 1
        await asyncio.gather(*(client() for _ in range(clients)))
    return done


def _worker(kind: str, args: tuple, out) -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    start = time.process_time()
    done = asyncio.run(_proxy_clients(*args) if kind == "proxy" else _db_clients(*args))
    out.put((done, time.process_time() - start))


def load(kind: str, procs: int, make_args) -> tuple[float, float]:
    """(requests done by all processes, their CPU-seconds)."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_worker, args=(kind, make_args(n), queue)) for n in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=600) for _ in workers]
    for w in workers:
        w.join(30)
    return sum(r[0] for r in results), sum(r[1] for r in results)


async def db(sql: str, *args):
    conn = await asyncpg.connect(DSN)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def scans(schema: str) -> int:
    rows = asyncio.run(db("SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) AS n FROM pg_stat_user_tables "
                          "WHERE schemaname = $1 AND relname = 'items'", schema))
    return int(rows[0]["n"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--hit-ratios", default="0.5,0.8,0.95")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--hot", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    ratios = [float(x) for x in args.hit_ratios.split(",")]
    schema = "bench_rt_" + uuid.uuid4().hex[:8]
    asyncio.run(db(f"CREATE SCHEMA {schema}"))
    rows, notes = [], []
    try:
        asyncio.run(db(f"CREATE TABLE {schema}.items (id text PRIMARY KEY, v text NOT NULL)"))
        asyncio.run(db(f"INSERT INTO {schema}.items SELECT 'h' || i, repeat('x', 64) FROM generate_series(0, "
                       f"{args.hot - 1}) i"))
        with tempfile.TemporaryDirectory() as tmp, Procs(Path(tmp)) as procs:
            redis_port, port = free_port(), free_port()
            start_redis(procs, redis_port)
            cfg = Path(tmp) / "proxy.yaml"
            cfg.write_text(config(port, redis_port, schema, args.pool))
            proxy, log = procs.start("proxy", [PYTHON, "-m", "proxy", "serve", "--config", str(cfg)],
                                     cwd=str(Path(__file__).resolve().parents[1]))
            wait_for_port("127.0.0.1", port, 20, proxy, log)
            # The hot keys, loaded once (a miss each) before any measurement.
            load("proxy", 1, lambda n: (port, 50, 3.0, args.hot, 1.0, 0, n))
            per = args.clients // args.procs
            for index, h in enumerate(ratios):
                seed = 1000 + index
                before = scans(schema)
                without, gen_cpu_db = load("db", args.procs, lambda n, h=h, seed=seed: (
                    schema, max(1, args.pool // args.procs), per, args.seconds, args.hot, h, seed, n))
                mid = scans(schema)
                cpu0 = CpuWatch._proc_cpu(proxy.pid)
                with_cache, gen_cpu = load("proxy", args.procs, lambda n, h=h, seed=seed + 500: (
                    port, per, args.seconds, args.hot, h, seed, n))
                proxy_cpu = CpuWatch._proc_cpu(proxy.pid) - cpu0
                queries = scans(schema) - mid
                rate_without, rate_with = without / args.seconds, with_cache / args.seconds
                reached = 1 - queries / with_cache if with_cache else 0.0
                limit = 1 / (1 - h)
                ratio = rate_with / rate_without if rate_without else 0.0
                rows.append([f"{h:.2f}", f"{reached:.3f}", f"{rate_without:,.0f}", f"{rate_with:,.0f}",
                             f"{ratio:.1f}x", f"{limit:.1f}x", f"{ratio / limit:.0%}",
                             f"{proxy_cpu / args.seconds:.0%}", f"{gen_cpu / args.seconds:.0%}"])
                notes.append(f"h={h}: Postgres ran {mid - before:,} queries without the cache, {queries:,} with")
    finally:
        asyncio.run(db(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    text = [f"## Read-through with vs without the cache (`bench/readthrough.py --seconds {args.seconds:g} "
            f"--clients {args.clients} --pool {args.pool} --procs {args.procs}`; 20 ms query)", "",
            md_table(["hit ratio (design)", "reached (from Postgres)", "without req/s", "with req/s", "with/without",
                      "limit 1/(1-h)", "of the limit", "proxy CPU", "load generator CPU"], rows), "",
            *[f"- {note}" for note in notes],
            f"- CPU columns: share of one core over the {args.seconds:g} s of the measured side"]
    print("\n".join(text))
    if not args.no_save:
        write_result("readthrough", "\n".join(text))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
