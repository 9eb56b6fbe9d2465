"""Cluster mode benchmark: throughput through the proxy vs redis-py's RedisCluster straight at the cluster.

    .venv/bin/python bench/cluster.py [--rounds 3] [--seconds 5] [--workers 4] [--quick]

Starts a 6-node Redis Cluster (3 masters, 3 replicas; the test fixture's code) and the proxy in
cluster mode, on free loopback ports. The same load code runs against both targets:
    proxy   redis.Redis to the proxy (one address; the proxy routes by slot)
    direct  redis.cluster.RedisCluster to the cluster (the client routes by slot itself)
Workloads: `getset` (GET or SET, 50/50, random keys of 10,000, 64-byte values) and `mget10` (MGET of
10 random keys, spread over slots; RedisCluster's mget_nonatomic, which splits the same way).
Write-behind on the cluster (proxy only: a direct client has no queue): `set` (plain SET of 10,000
keys) against `wbset` (SET of 10,000 keys on a write-behind route into a scratch Postgres schema), and
how long the queue takes to drain after the `wbset` load stops.
`--workers` processes each run one client in a loop for `--seconds` (bounded by time and count);
each round runs every target in turn, and the tables show medians of the rounds. Every process
started here is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (  # noqa: E402
    Procs,
    exit_on_sigterm,
    free_port,
    git_describe,
    machine_info,
    md_table,
    median,
    wait_for_port,
    write_result,
)

DSN = "postgresql://postgres@127.0.0.1:5432/test"
KEYS = 10_000
VALUE = b"x" * 64
MAX_OPS = 5_000_000      # per worker and run: a bound besides the duration


def make_client(target: str, address):
    if target == "proxy":
        return redis.Redis(host="127.0.0.1", port=address, protocol=2, socket_timeout=30)
    from redis.cluster import ClusterNode, RedisCluster
    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in address], socket_timeout=30)


def worker(target: str, address, workload: str, seconds: float, seed: int, out) -> None:
    client = make_client(target, address)
    rng = random.Random(seed)
    keys = [f"bench:{i}" for i in range(KEYS)]
    mget = client.mget if target == "proxy" else client.mget_nonatomic
    latencies = []
    ops = 0
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end and ops < MAX_OPS:
        if workload in ("set", "wbset"):
            client.set(f"{'wb' if workload == 'wbset' else 'bench'}:{rng.randrange(KEYS)}", VALUE)
        elif workload == "getset":
            key = keys[rng.randrange(KEYS)]
            if rng.random() < 0.5:
                client.get(key)
            else:
                client.set(key, VALUE)
        else:
            mget(rng.sample(keys, 10))
        t = time.perf_counter()
        latencies.append(t - now)
        now = t
        ops += 1
    out.put((ops, now - start, statistics.median(latencies) if latencies else None))
    client.close()


def run_load(target: str, address, workload: str, seconds: float, workers: int) -> tuple[float, float]:
    """(ops/s summed over the workers, median per-op latency in ms)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(target, address, workload, seconds, n, out), daemon=True)
             for n in range(workers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    rate = sum(ops / elapsed for ops, elapsed, _ in results)
    p50 = median([lat for _, _, lat in results])
    return rate, (p50 or 0) * 1000


def pg(sql: str) -> None:
    async def go():
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(go())


def queue_pending(admin_port: int) -> float:
    import urllib.request
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("cacheproxy_writebehind_pending "))


def wait_drained(admin_port: int, timeout: float = 120.0) -> float:
    """Seconds until the queue is empty (the gauge is read once a second, so +-1 s)."""
    start = time.monotonic()
    time.sleep(1.5)
    while queue_pending(admin_port) > 0 and time.monotonic() - start < timeout:
        time.sleep(0.2)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 2.0
    exit_on_sigterm()
    from tests.fixtures.redis_cluster import RedisCluster

    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = RedisCluster(workdir / "cluster")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    drains: list[float] = []
    schema = f"bench_cluster_{random.randrange(1 << 30):x}"
    pg(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.items (id bigint PRIMARY KEY, value text)")
    try:
        cluster.start()
        with Procs(workdir) as procs:
            port, admin_port = free_port(), free_port()
            route = {"key": "wb:{id:int}", "backend": "main",
                     "read": {"query": f"SELECT value FROM {schema}.items WHERE id = $1", "as": "string"},
                     "write": {"mode": "write-behind", "table": f"{schema}.items", "key_columns": ["id"],
                               "fields": ["value"]}}
            config = {"listen": {"host": "127.0.0.1", "port": port},
                      "upstream": {"url": cluster.url, "cluster": True, "pool_size": args.pool_size},
                      "backends": {"main": {"type": "postgres", "dsn": DSN}}, "routes": [route],
                      "admin": {"enabled": True, "port": admin_port}, "log": {"level": "warning"}}
            config_path = workdir / "proxy.yaml"
            config_path.write_text(yaml.safe_dump(config))
            proc, log = procs.start("proxy", [sys.executable, "-m", "proxy", "serve", "--config", str(config_path)],
                                    cwd=str(Path(__file__).resolve().parents[1]))
            wait_for_port("127.0.0.1", port, 20, proc, log)
            seed = redis.Redis(port=port)
            for start in range(0, KEYS, 1000):
                seed.mset({f"bench:{i}": VALUE for i in range(start, start + 1000)})
            ports = [n.port for n in cluster.nodes]
            for round_no in range(args.rounds):
                for workload in ("getset", "mget10"):
                    for target, address in (("direct", ports), ("proxy", port)):
                        rate, p50 = run_load(target, address, workload, args.seconds, args.workers)
                        results.setdefault((workload, target), []).append((rate, p50))
                        print(f"round {round_no + 1} {workload} {target}: {rate:,.0f} ops/s, p50 {p50:.3f} ms",
                              file=sys.stderr)
                for workload in ("set", "wbset"):
                    rate, p50 = run_load("proxy", port, workload, args.seconds, args.workers)
                    results.setdefault((workload, "proxy"), []).append((rate, p50))
                    print(f"round {round_no + 1} {workload} proxy: {rate:,.0f} ops/s, p50 {p50:.3f} ms",
                          file=sys.stderr)
                drains.append(wait_drained(admin_port))
                print(f"round {round_no + 1} queue drained {drains[-1]:.1f} s after the load", file=sys.stderr)
    finally:
        cluster.stop()
        pg(f"DROP SCHEMA {schema} CASCADE")
    rows = []
    for workload in ("getset", "mget10"):
        direct = median([r for r, _ in results[(workload, "direct")]])
        proxy = median([r for r, _ in results[(workload, "proxy")]])
        rows.append([workload, f"{direct:,.0f}", f"{median([p for _, p in results[(workload, 'direct')]]):.3f}",
                     f"{proxy:,.0f}", f"{median([p for _, p in results[(workload, 'proxy')]]):.3f}",
                     f"{proxy / direct:.2f}x"])
    wb_rows = []
    for workload, label in (("set", "plain SET via proxy"), ("wbset", "write-behind SET via proxy")):
        runs = results[(workload, "proxy")]
        wb_rows.append([label, f"{median([r for r, _ in runs]):,.0f}", f"{median([p for _, p in runs]):.3f}"])
    wb_ratio = median([r for r, _ in results[("wbset", "proxy")]]) / median([r for r, _ in results[("set", "proxy")]])
    info = machine_info()
    text = "\n".join([
        f"Command: `.venv/bin/python bench/cluster.py --rounds {args.rounds} --seconds {args.seconds:g} "
        f"--workers {args.workers}`, {time.strftime('%Y-%m-%d')}, proxy at {git_describe()}, "
        f"pool_size {args.pool_size}; {info.get('nproc', '?')} x {info.get('cpu', '?')}, "
        f"loadavg {info.get('loadavg', '?')}.",
        "",
        md_table(["workload", "RedisCluster direct ops/s", "direct p50 ms", "via proxy ops/s", "proxy p50 ms",
                  "proxy/direct"], rows),
        "",
        md_table(["write on the cluster", "ops/s", "p50 ms"], wb_rows),
        "",
        f"write-behind/plain SET: {wb_ratio:.2f}x; queue empty {median(drains):.1f} s (median) after each "
        f"{args.seconds:g} s write-behind load stopped.",
        "",
    ])
    print(text)
    if not args.no_save:
        print(f"saved to {write_result('cluster', text)}", file=sys.stderr)


if __name__ == "__main__":
    main()
