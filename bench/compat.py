"""Issue 17's two figures, direct Redis vs through the proxy, in one run.

    .venv/bin/python bench/compat.py [--kills 20] [--publishes 100] [--repo PATH]

1. Upstream connections killed: `--kills` times, CLIENT KILL of every normal connection on Redis (the
   proxy's, or the direct client's own), then 3 GETs from a redis-py client (RESP2 and RESP3, redis-py's
   default retry left as it is): errors seen by the application.
2. Subscribe then publish: `--publishes` times, a new redis-py client subscribes (redis-py does not wait
   for the confirmation) and another publishes at once: messages delivered. It starts 0.5 s after the
   last kill: a spare connection killed a moment ago may not be known dead yet (its close not read),
   and a SUBSCRIBE sent on it is lost with it (the client sees its connection close).

`--repo` runs the proxy from another checkout (e.g. an export of main) to compare before/after. Every
process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures import proxy as proxy_fixture  # noqa: E402
from tests.fixtures.proxy import ProxyProcess  # noqa: E402
from tests.fixtures.redis_server import RedisServer  # noqa: E402


def kill_errors(port: int, admin: redis.Redis, kills: int) -> int:
    admin.set("bench:k", "v")
    clients = [redis.Redis(port=port, protocol=p, socket_timeout=10) for p in (2, 3)]
    errors = 0
    for _ in range(kills):
        admin.client_kill_filter(_type="normal", skipme=True)
        for client in clients:
            for _ in range(3):
                try:
                    client.get("bench:k")
                except redis.RedisError as exc:
                    if not errors:
                        print(f"first error: {exc!r} {exc}", file=sys.stderr)
                    errors += 1
    return errors


def delivered(port: int, publishes: int) -> int:
    pub = redis.Redis(port=port, socket_timeout=10)
    count = 0
    for i in range(publishes):
        sub = redis.Redis(port=port, socket_timeout=10)
        ps = sub.pubsub(ignore_subscribe_messages=True)
        ps.subscribe(f"bench:ch{i}")
        if pub.publish(f"bench:ch{i}", b"m"):
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                if ps.get_message(timeout=0.1) is not None:
                    count += 1
                    break
        ps.close()
        sub.close()
    return count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--publishes", type=int, default=100)
    ap.add_argument("--repo", type=Path, help="run the proxy from this checkout instead of this one")
    args = ap.parse_args()
    if args.repo is not None:
        proxy_fixture.REPO_ROOT = args.repo.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        proxy = None
        try:
            proxy = ProxyProcess(server, Path(tmp) / "proxy").start()
            admin = server.client()
            print(f"| target | GET errors after {args.kills} kills x 3 GETs x 2 clients | subscribe-then-publish "
                  f"delivered |")
            print("|---|---|---|")
            for name, port in (("direct", server.port), ("proxy", proxy.port)):
                errors = kill_errors(port, admin, args.kills)
                time.sleep(0.5)
                print(f"| {name} | {errors} | {delivered(port, args.publishes)}/{args.publishes} |")
        finally:
            if proxy is not None:
                proxy.stop()
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
