"""Threads that do not collapse: llm-worker-rbee's tokens/s with and without a busy core.

llama.cpp (built with OpenMP, as llama-cpp-python builds it) meets at a
barrier after every operation of the graph. With as many threads as cores,
a process that takes one core deschedules one of them, and every barrier
waits for it. This measures, for each thread count and OpenMP wait policy,
the aggregate tokens/s at 1 and 4 concurrent streams, on a quiet machine and
beside one busy process (a Python loop: a test, a compile, another worker).

    .venv/bin/python bench/threads.py [--max-tokens 64] [--runs 2]

Run it on a quiet machine; it stops every process it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from parallel import one_run, stream_rbee

from harness.helpers import BIN, daemon


@contextmanager
def busy_core(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        yield
    finally:
        os.killpg(hog.pid, signal.SIGKILL)
        hog.wait()


def measure(threads: int, env: dict[str, str], busy: bool, max_tokens: int, runs: int) -> dict[str, float]:
    argv = [str(BIN / "llm-worker-rbee"), "--model", "smollm2-135m", "--threads", str(threads),
            "--slots", "4", "--port", "0"]
    rates: dict[str, float] = {}
    with daemon(argv, env=env, timeout=120) as worker, busy_core(busy):
        one_run(stream_rbee, worker.url, 1, 4)  # warm up
        for concurrency in (1, 4):
            best = max(one_run(stream_rbee, worker.url, concurrency, max_tokens)[0] for _ in range(runs))
            rates[f"c{concurrency}_tok_s"] = round(best, 1)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=["all", "all:OMP_WAIT_POLICY=PASSIVE",
                        "all:GOMP_SPINCOUNT=20000", "all:GOMP_SPINCOUNT=2000", "all-1"],
                        help="threads[:VAR=value,...]; threads is a number, all (the cores) or all-1")
    parser.add_argument("--quiet-only", action="store_true", help="skip the runs beside a busy core")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    print("| threads | environment | quiet C=1 | quiet C=4 | one core busy C=1 | one core busy C=4 |")
    print("|---|---|---|---|---|---|")
    for config in args.configs:
        count, _, variables = config.partition(":")
        threads = {"all": cores, "all-1": max(cores - 1, 1)}.get(count) or int(count)
        env = dict(pair.split("=", 1) for pair in variables.split(",") if pair)
        quiet = measure(threads, env, False, args.max_tokens, args.runs)
        busy = measure(threads, env, True, args.max_tokens, args.runs) if not args.quiet_only else {}
        print(f"| {threads} | {variables or 'default'} | {quiet['c1_tok_s']} | {quiet['c4_tok_s']} | "
              f"{busy.get('c1_tok_s', '-')} | {busy.get('c4_tok_s', '-')} |", flush=True)
        print(json.dumps({"threads": threads, "env": env, "quiet": quiet, "busy": busy}), file=sys.stderr)


if __name__ == "__main__":
    main()
