#!/usr/bin/env python3
"""Run redis-py's own test suite against Redis directly and through the proxy; print the difference.

    .venv/bin/python scripts/compat_redis_py.py --redis-py /tmp/redispy [--python /tmp/redispy-venv/bin/python]
        [--protocol 2 --protocol 3] [--files tests/test_commands.py ...] [--budget 1500]

`--redis-py` is a checkout of redis-py's repository (its tests/ folder is what runs; none of it is part
of this project); `--python` is an interpreter with that redis-py version and its test dependencies
installed (pytest, pytest-asyncio, pytest-timeout, packaging, numpy). The script starts its own
redis-server for each side (same arguments, on free ports) and one proxy in front of the second
(`listen.auth: upstream` by default: the suite sets requirepass and authenticates), runs
the same test files with `--redis-url` pointing at each, and prints, per protocol, the counts
(passed/failed/skipped/error) of both sides and every test that passes direct but fails through the
proxy, with the first line of its error. Module, cluster, TLS, sentinel and replica tests are
deselected on both sides alike (a plain redis-server cannot run them).

Every pytest run is bounded (`--timeout` per test, `--budget` seconds per run); every process the
script starts is stopped when it ends. Exit status: 0 when nothing differs, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

DEFAULT_FILES = [
    "tests/test_commands.py", "tests/test_pipeline.py", "tests/test_pubsub.py", "tests/test_connection.py",
    "tests/test_connection_pool.py", "tests/test_lock.py", "tests/test_scripting.py", "tests/test_function.py",
    "tests/test_monitor.py", "tests/test_encoding.py", "tests/test_retry.py", "tests/test_client.py",
    "tests/test_asyncio/test_commands.py", "tests/test_asyncio/test_pipeline.py",
    "tests/test_asyncio/test_pubsub.py", "tests/test_asyncio/test_connection.py",
    "tests/test_asyncio/test_connection_pool.py", "tests/test_asyncio/test_lock.py",
    "tests/test_asyncio/test_scripting.py", "tests/test_asyncio/test_monitor.py",
    "tests/test_asyncio/test_encoding.py",
]
# What a plain redis-server (no modules, no cluster, no TLS, no sentinels) cannot run, on both sides.
DESELECT = "not redismod and not onlycluster and not ssl and not replica and not cp_integration " \
           "and not experimental and not multidb_integration"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not answer PING within {timeout}s")


class Processes:
    """Every process started here, stopped (by its own id) at the end."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        out = open(log, "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def start_redis(procs: Processes, workdir: Path) -> int:
    port = free_port()
    binary = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server") or "redis-server"
    proc = procs.start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                        "--dir", str(workdir), "--enable-debug-command", "yes", "--enable-module-command", "yes"],
                       workdir / f"redis-{port}.log")
    wait_port(port, 10, proc)
    return port


def start_proxy(procs: Processes, workdir: Path, redis_port: int, auth: str) -> int:
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port, "auth": auth},
        "upstream": {"url": f"redis://127.0.0.1:{redis_port}/0", "pool_size": 2,
                     "durability": {"persistence": "ignore"}},
        "admin": {"enabled": False},
        "log": {"level": "warning"},
    }
    path = workdir / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = procs.start([str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable,
                        "-m", "proxy", "serve", "--config", str(path)], workdir / "proxy.log", cwd=REPO, env=env)
    wait_port(port, 15, proc)
    return port


def run_suite(python: str, redis_py: Path, files: list[str], url: str, protocol: str, junit: Path,
              timeout: int, budget: float) -> str:
    argv = [python, "-m", "pytest", *files, f"--redis-url={url}", "--redis-mod-url=redis://127.0.0.1:1",
            f"--protocol={protocol}", "-m", DESELECT, "-p", "no:cacheprovider", "-q", "-o", "addopts=",
            f"--timeout={timeout}", f"--junitxml={junit}", "-W", "ignore"]
    try:
        done = subprocess.run(argv, cwd=redis_py, capture_output=True, text=True, timeout=budget,
                              start_new_session=True)
        return done.stdout[-2000:]
    except subprocess.TimeoutExpired as exc:
        return f"pytest stopped after {budget}s budget\n{(exc.stdout or b'')[-2000:]}"


def results(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, first line of the error)."""
    out: dict[str, tuple[str, str]] = {}
    if not junit.exists():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "").strip().splitlines()
                message = message[0][:240] if message else ""
                break
        out[name] = (outcome, message)
    return out


def counts(res: dict[str, tuple[str, str]]) -> str:
    tally = {k: 0 for k in ("passed", "failed", "error", "skipped")}
    for outcome, _ in res.values():
        tally[outcome] += 1
    return " ".join(f"{k}={v}" for k, v in tally.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-py", type=Path, required=True, help="a checkout of redis-py (its tests/ run)")
    ap.add_argument("--python", default=sys.executable, help="interpreter with redis-py and its test deps")
    ap.add_argument("--protocol", action="append", help="2 and/or 3 (default: both)")
    ap.add_argument("--files", nargs="+", default=DEFAULT_FILES, help="test files, relative to --redis-py")
    ap.add_argument("--timeout", type=int, default=30, help="seconds per test")
    ap.add_argument("--budget", type=float, default=1500, help="seconds per pytest run")
    ap.add_argument("--keep", type=Path, help="keep the junit files and logs here")
    ap.add_argument("--auth", default="upstream", choices=("upstream", "local"),
                    help="the proxy's listen.auth (the suite sets requirepass and AUTHs: upstream is transparent)")
    args = ap.parse_args()
    files = [f for f in args.files if (args.redis_py / f).exists()]
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="compat-"))
    workdir.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    differ = 0
    try:
        for side in ("direct", "proxy"):
            (workdir / side).mkdir(exist_ok=True)
        direct_port = start_redis(procs, workdir / "direct")
        upstream_port = start_redis(procs, workdir / "proxy")
        proxy_port = start_proxy(procs, workdir / "proxy", upstream_port, args.auth)
        for protocol in args.protocol or ["2", "3"]:
            res = {}
            for side, port in (("direct", direct_port), ("proxy", proxy_port)):
                junit = workdir / side / f"resp{protocol}.xml"
                started = time.monotonic()
                tail = run_suite(args.python, args.redis_py, files, f"redis://127.0.0.1:{port}/0", protocol,
                                 junit, args.timeout, args.budget)
                res[side] = results(junit)
                print(f"RESP{protocol} {side:6}: {counts(res[side])}  ({time.monotonic() - started:.0f}s)")
                if not res[side]:
                    print(tail)
            worse = sorted(name for name, (outcome, _) in res["proxy"].items()
                           if outcome in ("failed", "error") and res["direct"].get(name, ("",))[0] == "passed")
            better = sorted(name for name, (outcome, _) in res["direct"].items()
                            if outcome in ("failed", "error") and res["proxy"].get(name, ("",))[0] == "passed")
            differ += len(worse)
            print(f"RESP{protocol}: {len(worse)} pass direct but fail through the proxy")
            for name in worse:
                print(f"  {name}\n      {res['proxy'][name][1]}")
            if better:
                print(f"RESP{protocol}: {len(better)} fail direct but pass through the proxy")
                for name in better:
                    print(f"  {name}\n      {res['direct'][name][1]}")
    finally:
        procs.stop_all()
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
