"""Micro-benchmark of the request parser's hot path (RequestParser.feed), no sockets, no servers.

    .venv/bin/python bench/parser.py [--commands 100000] [--rounds 7] [--ref REV]

Feeds canonical requests the way a session does, one chunk per read: GET and SET (64-byte value) in
pipelines of 1 and 16 (each read a whole pipeline), a long GET pipeline read 16 KB at a time (reads
end inside requests), and a 1 MB SET fed in 64 KB reads (the slow path's incremental case). Prints CPU
ns per command (process time, so other processes on a shared machine disturb it less than wall time),
the best of --rounds rounds and the median.

--ref REV also times proxy/protocol/resp.py as it is at git revision REV (loaded from `git show` into
a throwaway module), interleaved round by round with the working tree's, so both see the same noise.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from proxy.protocol import resp  # noqa: E402


def load_at(rev: str):
    """proxy/protocol/resp.py at git revision `rev`, as a module of its own."""
    text = subprocess.run(["git", "show", f"{rev}:proxy/protocol/resp.py"], cwd=REPO_ROOT, check=True,
                          capture_output=True, timeout=30).stdout
    path = Path(tempfile.mkdtemp()) / f"resp_{rev.replace('/', '_')}.py"
    path.write_bytes(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def workloads(commands: int) -> dict[str, tuple[list[bytes], int]]:
    """name -> (chunks to feed, commands they hold)."""
    enc = resp.encode_command
    gets = [enc([b"GET", b"key:%d" % (i % 1000)]) for i in range(commands)]
    sets = [enc([b"SET", b"key:%d" % (i % 1000), b"v" * 64]) for i in range(commands)]
    stream = b"".join(gets)
    big = enc([b"SET", b"big", b"x" * (1 << 20)])
    big_chunks = [big[i:i + 65536] for i in range(0, len(big), 65536)]
    return {
        "GET, pipeline 1": (gets, commands),
        "GET, pipeline 16": ([b"".join(gets[i:i + 16]) for i in range(0, commands, 16)], commands),
        "SET 64 B, pipeline 1": (sets, commands),
        "SET 64 B, pipeline 16": ([b"".join(sets[i:i + 16]) for i in range(0, commands, 16)], commands),
        "GET, pipeline of all, 16 KB reads": ([stream[i:i + 16384] for i in range(0, len(stream), 16384)],
                                              commands),
        "SET 1 MB in 64 KB reads": (big_chunks * 20, 20),
    }


def time_feed(module, chunks: list[bytes], count: int) -> float:
    """ns per command to feed `chunks` to one parser; fails loudly if a frame went missing."""
    parser = module.RequestParser()
    feed = parser.feed
    got = 0
    start = time.process_time_ns()
    for chunk in chunks:
        got += len(feed(chunk)[0])
    elapsed = time.process_time_ns() - start
    if got != count or parser.error is not None:
        raise SystemExit(f"{module.__name__}: parsed {got} of {count} commands, error {parser.error!r}")
    return elapsed / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commands", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ref", help="also time resp.py at this git revision (e.g. HEAD, main)")
    args = ap.parse_args()
    modules = {"working tree": resp}
    if args.ref:
        modules = {args.ref: load_at(args.ref), **modules}
    loads = workloads(args.commands)
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, (chunks, count) in loads.items():
            for label, module in modules.items():
                results.setdefault((name, label), []).append(time_feed(module, chunks, count))
    print(f"CPU ns per command, best / median of {args.rounds} rounds ({args.commands} commands per round)\n")
    print("| workload | " + " | ".join(modules) + " |")
    print("|---|" + "---|" * len(modules))
    for name in loads:
        cells = []
        for label in modules:
            samples = sorted(results[(name, label)])
            cells.append(f"{samples[0]:,.0f} / {samples[len(samples) // 2]:,.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
