"""SIGTERM to an idle `queen-rbee --local-hive` with two idle workers: how long until
the workers are gone, and until the queen has exited.

Each run starts a fresh queen (real processes on loopback, isolated XDG dirs),
spawns two SmolLM2 workers with one thread each, waits a second, sends SIGTERM
and polls the pids. The queen's own stop order is what shows.

    .venv/bin/python bench/stop_time.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.helpers import BIN, daemon, gone, job_result, run_job, wait_for


def one_run() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        names = ("STATE", "DATA", "CONFIG", "CACHE")
        env = {f"XDG_{name}_HOME": f"{folder}/{name.lower()}" for name in names}
        with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"], env=env) as queen:
            for _ in range(2):
                run_job(queen.url, {"operation": "worker_spawn", "model": "smollm2-135m", "threads": 1})
            workers = job_result(queen.url, {"operation": "worker_list"})
            assert isinstance(workers, list) and len(workers) == 2
            pids = [int(worker["pid"]) for worker in workers]
            time.sleep(1.0)
            os.kill(queen.process.pid, signal.SIGTERM)
            sent = time.monotonic()
            wait_for(lambda: all(gone(pid) for pid in pids), timeout=30, interval=0.01)
            workers_gone = time.monotonic() - sent
            queen.process.wait(30)
            return workers_gone, time.monotonic() - sent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    runs = [one_run() for _ in range(parser.parse_args().runs)]
    for label, values in (("workers gone", [r[0] for r in runs]), ("queen exited", [r[1] for r in runs])):
        print(f"{label}: median {statistics.median(values):.2f} s, max {max(values):.2f} s "
              f"({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
