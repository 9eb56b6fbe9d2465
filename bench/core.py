"""Core benchmark: the proxy vs direct Redis vs twemproxy (nutcracker), in one run.

    .venv/bin/python bench/core.py [--rounds 3] [--requests 200000] [--quick] [--targets direct,proxy,twemproxy]

Starts its own redis-server, the proxy (one worker, pointing at that redis) and twemproxy (same redis),
each on a free loopback port, then runs redis-benchmark against each target, interleaved round by round
(round 1: direct, proxy, twemproxy; round 2: the same; ...), and reports medians of the rounds:

* GET/SET with 50 clients, without and with ``-P 16`` (requests/s, and p50/p99 latency from the CSV)
* single-client GET latency p50 (``-c 1``), and the overhead over direct Redis in microseconds
* RSS of the proxy (and twemproxy) idle, after the load, peak, and with 1,000 idle clients connected,
  plus how many upstream connections the proxy holds to Redis meanwhile (multiplexing)

It prints a markdown section for BENCHMARKS.md and writes it to bench/results/core-<timestamp>.md.
Every process it starts is stopped by PID at the end, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import resource
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO_ROOT,
    BenchError,
    CpuWatch,
    Procs,
    exit_on_sigterm,
    first_line,
    free_port,
    git_describe,
    hwm_kb,
    machine_info,
    md_table,
    median,
    mib,
    rss_kb,
    run,
    start_redis,
    tcp_peers,
    uses_uvloop,
    wait_for_port,
    write_result,
)

HOST = "127.0.0.1"
TESTS = ("GET", "SET", "GET -P16", "SET -P16")
PEERS = ("proxy", "twemproxy")


@dataclass
class Target:
    name: str
    port: int
    proc: object = None  # subprocess.Popen, None for direct redis (redis is watched separately)
    log: Path | None = None
    dead: str | None = None  # why it stopped being measured


@dataclass
class Results:
    # rps[target][test] -> list over rounds; lat[target][test] -> list of (p50 ms, p99 ms)
    rps: dict = field(default_factory=dict)
    lat: dict = field(default_factory=dict)
    # single client: one[method][target] -> list over rounds of (p50 us, avg us);
    # methods: "redis-benchmark" (CSV, 8 us histogram buckets) and "socket" (perf_counter_ns per GET)
    one: dict = field(default_factory=dict)
    csv_has_p50: bool = True
    proxy_rss_rounds: list = field(default_factory=list)
    mem: dict = field(default_factory=dict)  # target -> {label: kb}
    idle: dict = field(default_factory=dict)  # target -> info about the idle-clients step
    notes: list = field(default_factory=list)


# --------------------------------------------------------------------------- redis-benchmark


def parse_csv(text: str) -> dict[str, dict[str, float]]:
    """redis-benchmark --csv -> {test: {column: value}}. Handles the header-less pre-6.2 format too."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows:
        return {}
    header = rows[0] if rows[0][0] == "test" else ["test", "rps"]
    body = rows[1:] if rows[0][0] == "test" else rows
    out = {}
    for row in body:
        values = {}
        for name, value in zip(header[1:], row[1:], strict=False):
            with contextlib.suppress(ValueError):
                values[name] = float(value)
        out[row[0].split()[0].upper()] = values
    return out


def bench_cmd(port: int, args: list[str]) -> list[str]:
    return ["redis-benchmark", "-h", HOST, "-p", str(port), *args, "--csv"]


def redis_benchmark(port: int, args: list[str], timeout: float) -> dict[str, dict[str, float]]:
    res = run(bench_cmd(port, args), timeout=timeout)
    parsed = parse_csv(res.stdout)
    if not parsed:
        raise BenchError(f"no CSV rows from: {shlex.join(bench_cmd(port, args))}\n{res.stdout[-500:]}"
                         f"{res.stderr[-500:]}")
    return parsed


def socket_loop_p50(port: int, n: int) -> tuple[float, float]:
    """Single-client latency with microsecond resolution: one TCP connection, n GETs of a 64-byte
    value sent one at a time (RESP encoded once, replies parsed by hiredis), each timed with
    perf_counter_ns. Returns (p50 us, avg us). Needs no client library handshake, so every target
    (twemproxy included) sees the same bytes."""
    import hiredis

    key = b"bench:lat"
    cmd = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = hiredis.Reader()

        def call(payload: bytes) -> object:
            sock.sendall(payload)
            while True:
                reply = reader.gets()
                if reply is not False:
                    return reply
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("connection closed by the target")
                reader.feed(data)

        value = b"x" * 64
        if call(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$64\r\n%s\r\n" % (len(key), key, value)) != b"OK":
            raise BenchError("SET bench:lat failed")
        for _ in range(min(1000, n)):  # warm up
            call(cmd)
        times = []
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            reply = call(cmd)
            times.append(clock() - t0)
        if reply != value:
            raise BenchError(f"GET bench:lat returned {reply!r:.80}")
    times.sort()
    return times[len(times) // 2] / 1000, sum(times) / len(times) / 1000


# --------------------------------------------------------------------------- targets


def proxy_python() -> str:
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def proxy_config(port: int, redis_port: int, pool_size: int) -> str:
    return (f"listen: {{host: {HOST}, port: {port}}}\n"
            f'upstream: {{url: "redis://{HOST}:{redis_port}/0", pool_size: {pool_size}}}\n'
            "admin: {enabled: false}\n"
            "log: {level: warning}\n")


def twemproxy_config(port: int, redis_port: int) -> str:
    return ("bench:\n"
            f"  listen: {HOST}:{port}\n"
            "  hash: fnv1a_64\n"
            "  distribution: ketama\n"
            "  redis: true\n"
            "  auto_eject_hosts: false\n"
            "  preconnect: true\n"
            "  servers:\n"
            f"   - {HOST}:{redis_port}:1\n")


def ensure_nutcracker(notes: list[str]) -> str | None:
    path = shutil.which("nutcracker") or (Path("/usr/sbin/nutcracker").exists() and "/usr/sbin/nutcracker")
    if path:
        return path
    if os.geteuid() != 0:
        notes.append("twemproxy skipped: `nutcracker` is not installed and we are not root "
                     "(install the Debian package `nutcracker`)")
        return None
    print("nutcracker not found; apt-get install -y nutcracker ...", file=sys.stderr)
    try:
        run(["apt-get", "install", "-y", "nutcracker"], timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except BenchError as exc:
        notes.append(f"twemproxy skipped: apt-get install nutcracker failed: {str(exc)[:300]}")
        return None
    return shutil.which("nutcracker") or "/usr/sbin/nutcracker"


def start_proxy(procs: Procs, redis_port: int, args) -> Target:
    port = free_port()
    cfg = procs.workdir / "proxy.yaml"
    cfg.write_text(proxy_config(port, redis_port, args.pool_size))
    argv = [proxy_python(), "-m", "proxy", "serve", "--config", str(cfg), *shlex.split(args.proxy_args)]
    proc, log = procs.start("proxy", argv, cwd=REPO_ROOT)
    wait_for_port(HOST, port, 20, proc, log)
    return Target("proxy", port, proc, log)


def start_twemproxy(procs: Procs, binary: str, redis_port: int) -> Target:
    port, stats = free_port(), free_port()
    cfg = procs.workdir / "nutcracker.yml"
    cfg.write_text(twemproxy_config(port, redis_port))
    run([binary, "-t", "-c", str(cfg)], timeout=10)
    log = procs.workdir / "nutcracker-events.log"
    argv = [binary, "-c", str(cfg), "-s", str(stats), "-a", HOST, "-o", str(log),
            "-p", str(procs.workdir / "nutcracker.pid")]
    proc, _ = procs.start("nutcracker", argv)
    wait_for_port(HOST, port, 10, proc, log)
    return Target("twemproxy", port, proc, log)


def check_alive(t: Target, res: Results) -> None:
    if t.proc is not None and t.dead is None and t.proc.poll() is not None:
        t.dead = f"{t.name} exited with code {t.proc.returncode}"
        res.notes.append(t.dead + log_tail(t.log))


def log_tail(log: Path | None, n: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()[-n:]
    return ("; last log lines:\n```\n" + "\n".join(lines) + "\n```") if lines else ""


# --------------------------------------------------------------------------- idle clients


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n + 256:
        want = n + 256 if hard == resource.RLIM_INFINITY else min(hard, n + 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def open_idle_clients(port: int, n: int) -> tuple[list[socket.socket], int, str | None]:
    """n connections, each sends PING and reads +PONG; returns (sockets, pongs, first error)."""
    socks, pongs, error = [], 0, None
    for i in range(n):
        try:
            s = socket.create_connection((HOST, port), timeout=5)
            socks.append(s)
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            buf = b""
            while not buf.endswith(b"\r\n"):
                chunk = s.recv(64)
                if not chunk:
                    raise ConnectionError("connection closed")
                buf += chunk
            if buf == b"+PONG\r\n":
                pongs += 1
            elif error is None:
                error = f"client {i}: unexpected reply {buf[:80]!r}"
        except OSError as exc:
            if error is None:
                error = f"client {i}: {exc!r}"
            if len(socks) - pongs > 20:  # the target is refusing clients; stop trying
                break
    return socks, pongs, error


def redis_clients(redis_port: int) -> list[dict[str, str]]:
    """Redis CLIENT LIST as dicts, without the redis-cli connection that asked."""
    out = run(["redis-cli", "-h", HOST, "-p", str(redis_port), "client", "list"], timeout=10).stdout
    clients = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]
    return [c for c in clients if c.get("cmd") != "client|list"]


def idle_clients_step(t: Target, redis_port: int, n: int, res: Results) -> None:
    mem = res.mem.setdefault(t.name, {})
    info = res.idle.setdefault(t.name, {})
    socks, pongs, error = open_idle_clients(t.port, n)
    try:
        time.sleep(0.5)
        mem["idle_clients"] = rss_kb(t.proc.pid)
        info["pongs"] = pongs
        info["opened"] = len(socks)
        info["error"] = error
        ports = tcp_peers(t.proc.pid, redis_port)
        clients = redis_clients(redis_port)
        info["upstream"] = len(ports)
        info["redis_clients"] = len(clients)
        resp = [c.get("resp", "?") for c in clients if int(c["addr"].rsplit(":", 1)[1]) in ports]
        info["upstream_resp"] = {v: resp.count(v) for v in sorted(set(resp))}
    finally:
        for s in socks:
            s.close()
    time.sleep(1.0)
    check_alive(t, res)
    if t.dead is None:
        mem["after_close"] = rss_kb(t.proc.pid)


# --------------------------------------------------------------------------- the run


def measure(args, targets: list[Target], redis_proc, redis_port: int, res: Results) -> None:
    n, c = args.requests, args.clients
    base = ["-t", "get,set", "-n", str(n), "-c", str(c), "-r", "100000", "-d", "64"]
    modes = [("", base), (" -P16", [*base, "-P", "16"])]
    # generous, but bounded: 2 tests at >= 1,000 rps
    timeout = 60 + 2 * n / 1000
    lat_args = ["-c", "1", "-n", str(args.latency_requests), "-t", "get"]
    lat_timeout = 60 + args.latency_requests / 500
    proxy = next((t for t in targets if t.name == "proxy"), None)

    for rnd in range(args.rounds):
        for suffix, bargs in modes:
            for t in targets:
                if t.dead:
                    continue
                label = f"round {rnd + 1}/{args.rounds} {t.name:9s} {'-P 16' if suffix else 'plain'}"
                t0 = time.monotonic()
                try:
                    out = redis_benchmark(t.port, bargs, timeout)
                except BenchError as exc:
                    res.notes.append(f"round {rnd + 1}, {t.name}{suffix}: {exc}")
                    print(f"{label}: FAILED {str(exc)[:200]}", file=sys.stderr)
                    check_alive(t, res)
                    continue
                for test in ("GET", "SET"):
                    row = out.get(test, {})
                    key = test + suffix
                    res.rps.setdefault(t.name, {}).setdefault(key, []).append(row.get("rps"))
                    res.lat.setdefault(t.name, {}).setdefault(key, []).append(
                        (row.get("p50_latency_ms"), row.get("p99_latency_ms")))
                print(f"{label}: " + "  ".join(f"{k} {v.get('rps', 0):>10,.0f} rps" for k, v in out.items())
                      + f"  ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
                check_alive(t, res)
        # single-client latency, interleaved the same way
        for t in targets:
            for method in ("redis-benchmark", "socket"):
                if t.dead or (method == "redis-benchmark" and not res.csv_has_p50):
                    continue
                try:
                    if method == "redis-benchmark":
                        row = redis_benchmark(t.port, lat_args, lat_timeout).get("GET", {})
                        if "p50_latency_ms" not in row:  # redis-benchmark < 6.2: rps only
                            res.csv_has_p50 = False
                            continue
                        p50, avg = row["p50_latency_ms"] * 1000, row["avg_latency_ms"] * 1000
                    else:
                        p50, avg = socket_loop_p50(t.port, args.latency_requests)
                except Exception as exc:  # noqa: BLE001 - report and go on with the other targets
                    res.notes.append(f"round {rnd + 1}, {t.name} single-client latency ({method}): {exc}")
                    check_alive(t, res)
                    continue
                res.one.setdefault(method, {}).setdefault(t.name, []).append((p50, avg))
                print(f"round {rnd + 1}/{args.rounds} {t.name:9s} 1 client, {method:15s}: "
                      f"p50 {p50:.1f} us, avg {avg:.1f} us", file=sys.stderr)
                check_alive(t, res)
        if proxy is not None and proxy.dead is None:
            res.proxy_rss_rounds.append(rss_kb(proxy.proc.pid))
        if redis_proc.poll() is not None:
            raise BenchError("redis-server exited during the run")


def run_all(args) -> str:
    res = Results()
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(wanted) - {"direct", *PEERS}
    if unknown or "direct" not in wanted:
        raise SystemExit(f"--targets: give direct plus any of {', '.join(PEERS)} (got {args.targets})")
    for tool in ("redis-server", "redis-benchmark", "redis-cli"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (apt-get install redis-server redis-tools)")
    raise_nofile(args.idle_clients)
    nutcracker = ensure_nutcracker(res.notes) if "twemproxy" in wanted else None
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    machine = machine_info()  # before we add load

    with tempfile.TemporaryDirectory(prefix="cacheproxy-bench-") as tmp, Procs(Path(tmp)) as procs:
        redis_port = free_port()
        redis_proc = start_redis(procs, redis_port)
        targets = [Target("direct", redis_port)]
        configs = {}
        if "proxy" in wanted:
            try:
                targets.append(start_proxy(procs, redis_port, args))
                configs["proxy"] = (procs.workdir / "proxy.yaml").read_text()
            except BenchError as exc:
                res.notes.append(f"proxy did not start: {exc}")
                print(f"proxy did not start: {exc}", file=sys.stderr)
        if nutcracker:
            try:
                targets.append(start_twemproxy(procs, nutcracker, redis_port))
                configs["twemproxy"] = (procs.workdir / "nutcracker.yml").read_text()
            except BenchError as exc:
                res.notes.append(f"twemproxy did not start: {exc}")
        time.sleep(0.5)
        for t in targets[1:]:
            res.mem.setdefault(t.name, {})["idle_start"] = rss_kb(t.proc.pid)
        uvloop = uses_uvloop(targets[1].proc.pid) if len(targets) > 1 and targets[1].name == "proxy" else None

        watch = CpuWatch([redis_proc.pid, *(t.proc.pid for t in targets[1:])])
        measure(args, targets, redis_proc, redis_port, res)
        others, wall = watch.others()
        top_others = watch.top_others()

        for t in targets[1:]:
            check_alive(t, res)
            if t.dead:
                continue
            res.mem[t.name]["after_load"] = rss_kb(t.proc.pid)
            idle_clients_step(t, redis_port, args.idle_clients, res)
            if t.dead is None:
                res.mem[t.name]["peak"] = hwm_kb(t.proc.pid)
        for t in targets[1:]:
            check_alive(t, res)
            if t.name == "proxy" and t.log and t.log.exists() and t.log.stat().st_size:
                res.notes.append(f"the proxy wrote {len(t.log.read_text(errors='replace').splitlines())} "
                                 "log lines (level warning)" + log_tail(t.log, 10))
        info = {
            "targets": [t.name for t in targets],
            "started": started,
            "machine": machine,
            "machine_after": machine_info()["loadavg"],
            "others_cpu": (others, wall),
            "top_others": top_others,
            "uvloop": uvloop,
            "configs": configs,
            "nutcracker": nutcracker and first_line([nutcracker, "--version"]).removeprefix("This is "),
            "proxy_python": run([proxy_python(), "--version"], timeout=10).stdout.strip(),
        }
    return report(args, res, info)


# --------------------------------------------------------------------------- the report


def fmt_rps(v: float | None) -> str | None:
    return None if v is None else f"{v:,.0f}"


def ratio(a: float | None, b: float | None) -> str | None:
    return None if a is None or not b else f"{a / b:.2f}x"


def report(args, res: Results, info: dict) -> str:
    names = info["targets"]
    peers = [p for p in PEERS if p in names]
    n, c = args.requests, args.clients
    med = {t: {k: median(v) for k, v in res.rps.get(t, {}).items()} for t in names}
    out = []
    cmdline = " ".join([".venv/bin/python", "bench/core.py", *sys.argv[1:]])
    out.append("## Core: proxy vs direct Redis vs twemproxy\n")
    out.append(f"Command: `{cmdline}` (run {info['started']}, proxy at commit {git_describe()})\n")
    out.append(f"Load: `redis-benchmark -h 127.0.0.1 -p PORT -t get,set -n {n} -c {c} -r 100000 -d 64 --csv`, "
               f"and again with `-P 16`; single client: `redis-benchmark -h 127.0.0.1 -p PORT -c 1 "
               f"-n {args.latency_requests} -t get --csv`. Targets run interleaved in each round "
               f"({', '.join(names)}), {args.rounds} round(s); figures are medians of the rounds. "
               "redis-server, the target and redis-benchmark share the machine's cores.\n")

    mi = info["machine"]
    uv = {True: "yes", False: "no", None: "?"}[info["uvloop"]]
    out.append("### Machine\n")
    out.append(f"- {mi['nproc']} CPUs: {mi['cpu']}; {mi['memory']} RAM; Linux {mi['kernel']}; "
               f"load average before the run {mi['loadavg']}, after {info['machine_after']}")
    others, wall = info["others_cpu"]
    ncpu = os.cpu_count() or 1
    busy = f"{others:.0f} CPU-seconds in {wall:.0f} s ({100 * others / (wall * ncpu):.0f}% of the machine)"
    out.append(f"- other processes used about {busy} during the load phases")
    if others > 0.05 * wall * ncpu:
        top = "; ".join(f"`{name}` {cpu:.0f} s" for name, cpu in info["top_others"])
        res.notes.append(f"the machine was not idle: other processes used about {busy} while the benchmark "
                         "ran; treat the figures with care and re-run on a quiet machine"
                         + (f" (the busiest: {top})" if top else ""))
    out.append(f"- {mi['redis-server']}; {mi['redis-benchmark']}")
    if "proxy" in names:
        out.append(f"- proxy: {info['proxy_python']}, one worker, upstream pool_size {args.pool_size}, "
                   f"uvloop in use: {uv}" + (f", extra args `{args.proxy_args}`" if args.proxy_args else ""))
    if "twemproxy" in names:
        out.append(f"- twemproxy: {info['nutcracker']} (one server, `redis: true`, default "
                   "server_connections: 1)")
    out.append("")

    out.append(f"### Throughput (requests/s, {c} clients, median of {args.rounds})\n")
    headers = ["test", "direct rps"]
    for p in peers:
        headers += [f"{p} rps", f"{p}/direct"]
    rows = []
    for test in TESTS:
        row = [test, fmt_rps(med["direct"].get(test))]
        for p in peers:
            row += [fmt_rps(med[p].get(test)), ratio(med[p].get(test), med["direct"].get(test))]
        rows.append(row)
    out.append(md_table(headers, rows) + "\n")

    if any(p50 is not None for t in names for v in res.lat.get(t, {}).values() for p50, _ in v):
        out.append(f"### Latency under load ({c} clients; p50 / p99 in ms from redis-benchmark, "
                   "median of rounds)\n")
        rows = []
        for test in TESTS:
            row = [test]
            for t in names:
                pairs = res.lat.get(t, {}).get(test, [])
                p50, p99 = median([a for a, _ in pairs]), median([b for _, b in pairs])
                row.append(None if p50 is None else f"{p50:.3f} / {p99:.3f}")
            rows.append(row)
        out.append(md_table(["test", *names], rows) + "\n")

    out.append(f"### Single-client latency (GET, 1 client, {args.latency_requests} requests, median of "
               f"{args.rounds})\n")
    methods = [m for m in ("redis-benchmark", "socket") if m in res.one]
    headers, rows = ["target"], [[t] for t in names]
    for m in methods:
        headers += [f"{m} p50", f"{m} avg", f"{m} p50 overhead"]
        d50 = median([a for a, _ in res.one[m].get("direct", [])])
        for row, t in zip(rows, names, strict=True):
            vals = res.one[m].get(t, [])
            p50, avg = median([a for a, _ in vals]), median([b for _, b in vals])
            over = "—" if t == "direct" else (None if p50 is None or d50 is None else f"{p50 - d50:+.0f} us")
            row += [None if p50 is None else f"{p50:.0f} us", None if avg is None else f"{avg:.0f} us", over]
    out.append(md_table(headers, rows) + "\n")
    if "redis-benchmark" in methods:
        out.append("redis-benchmark's latency histogram has 8 us buckets below ~16 ms (its lowest discernible "
                   "value is 10 us), so its p50s move in steps of 8 us. The `socket` columns come from a "
                   "Python loop on one TCP connection (RESP encoded once, hiredis parsing, "
                   "`time.perf_counter_ns` around each GET of a 64-byte value): microsecond resolution, "
                   "with the loop's own cost the same for every target, so its overhead column is the "
                   "finer measure.\n")
    else:
        out.append("This redis-benchmark prints no latency columns; `socket` is a Python loop on one TCP "
                   "connection timing each GET with `time.perf_counter_ns`.\n")

    if peers:
        out.append("### Memory (RSS of the process, /proc/PID/status)\n")
        labels = [("idle_start", "idle, after start"), ("after_load", "after the load"),
                  ("idle_clients", f"{args.idle_clients:,} idle clients connected"),
                  ("after_close", "after those clients disconnected"), ("peak", "peak over the run (VmHWM)")]
        rows = [[label, *(mib(res.mem.get(p, {}).get(key)) for p in peers)] for key, label in labels]
        out.append(md_table(["", *peers], rows) + "\n")
        for p in peers:
            i = res.idle.get(p)
            if not i:
                continue
            line = (f"- {p}: {i['pongs']}/{args.idle_clients} idle clients answered +PONG; "
                    f"while connected it held **{i['upstream']}** TCP connection(s) to Redis ("
                    + " + ".join(f"{k} RESP{v}" for v, k in i["upstream_resp"].items())
                    + f"; Redis `CLIENT LIST` then showed {i['redis_clients']} clients in all, besides redis-cli)")
            if i.get("error"):
                line += f"; first problem: {i['error']}"
            out.append(line)
        if res.proxy_rss_rounds:
            out.append("- proxy RSS after each round: " + ", ".join(mib(v) for v in res.proxy_rss_rounds))
        out.append("")

    out.append("### Raw figures per round (requests/s; single-client p50 in us)\n")
    rows = []
    for rnd in range(args.rounds):
        for test in TESTS:
            row = [rnd + 1, test]
            for t in names:
                vals = res.rps.get(t, {}).get(test, [])
                row.append(fmt_rps(vals[rnd]) if rnd < len(vals) else None)
            rows.append(row)
        for m in res.one:
            row = [rnd + 1, f"GET 1 client p50 us ({m})"]
            for t in names:
                vals = res.one[m].get(t, [])
                row.append(f"{vals[rnd][0]:.1f}" if rnd < len(vals) else None)
            rows.append(row)
    out.append(md_table(["round", "test", *names], rows, left=2) + "\n")

    if info["configs"]:
        out.append("<details><summary>configs used</summary>\n")
        for name, text in info["configs"].items():
            out.append(f"{name}:\n```yaml\n{text.rstrip()}\n```")
        out.append("</details>\n")

    if res.notes:
        out.append("### Notes\n")
        out += [f"- {note}" for note in res.notes]
        out.append("")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", "-n", type=int, default=200_000, help="requests per test and round")
    parser.add_argument("--clients", "-c", type=int, default=50)
    parser.add_argument("--latency-requests", type=int, default=20_000, help="GETs for the 1-client p50")
    parser.add_argument("--idle-clients", type=int, default=1000)
    parser.add_argument("--pool-size", type=int, default=2, help="the proxy's upstream.pool_size")
    parser.add_argument("--targets", default="direct,proxy,twemproxy",
                        help="comma-separated: direct plus any of proxy, twemproxy")
    parser.add_argument("--proxy-args", default="", help="extra arguments for `proxy serve`, e.g. --no-uvloop")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round, -n 20000, 5000 single-client GETs (< 1 minute)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/core-*.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.latency_requests = 1, 20_000, 5_000
    exit_on_sigterm()
    t0 = time.monotonic()
    try:
        text = run_all(args)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; all started processes were stopped", file=sys.stderr)
        return 130
    print(text)
    if not args.no_save:
        print(f"(written to {write_result('core', text)}; took {time.monotonic() - t0:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
