#!/usr/bin/env python3
"""Differential fuzzing of the request parser against the model of Redis's own, at length.

    .venv/bin/python scripts/fuzz_parser.py --inputs 1000000 --seed 1 [--jobs 2]

The inputs and the comparison are tests/fixtures/parser_fuzz.py's (the unit tests run a few thousand
of the same); the model is tests/fixtures/redis_model.py, itself checked against redis-server by
tests/integration/test_parser_model.py. Job j of J fuzzes seed * 1000 + j, so a run is reproducible
from (--seed, --jobs). Prints a summary; exits 1 and prints each divergent input (as Python bytes
literals, ready for a unit test) if the parser and the model disagree anywhere.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures import parser_fuzz  # noqa: E402


def _job(task: tuple[int, int]) -> parser_fuzz.Report:
    seed, count = task
    return parser_fuzz.run(seed, count)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (the machine's cores are shared)")
    args = ap.parse_args()
    share, extra = divmod(args.inputs, args.jobs)
    tasks = [(args.seed * 1000 + j, share + (j < extra)) for j in range(args.jobs)]
    started = time.monotonic()
    if args.jobs == 1:
        reports = [_job(tasks[0])]
    else:
        with multiprocessing.Pool(args.jobs) as pool:
            reports = pool.map(_job, tasks)
    elapsed = time.monotonic() - started
    inputs = sum(r.inputs for r in reports)
    divergences = [d for r in reports for d in r.divergences]
    errors = Counter()
    for r in reports:
        for message, n in r.errors.items():
            errors[message.split(", got")[0]] += n
    print(f"inputs {inputs:,} (seed {args.seed}, {args.jobs} jobs) in {elapsed:.0f} s; "
          f"divergences {len(divergences)}")
    print(f"commands read {sum(r.commands for r in reports):,}; inputs left waiting "
          f"{sum(r.pending for r in reports):,}; reads forwarded raw {sum(r.forwarded_raw for r in reports):,}")
    print("protocol errors: " + ", ".join(f"{m} {n:,}" for m, n in errors.most_common()))
    for case, problem in divergences:
        print(f"\nchunks={case.chunks!r} unauthenticated={case.unauthenticated} max_bulk={case.max_bulk}\n"
              f"  {problem}")
    return 1 if divergences else 0


if __name__ == "__main__":
    sys.exit(main())
