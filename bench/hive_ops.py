"""A hive operation through the queen: in-process (--local-hive) against a hive over HTTP.

Both queens run as real processes on loopback; the operation is `model_list`
(a catalog read, so the hive's own work is small and the path is what shows).
Each sample is one whole job as a client sees it: POST /v1/jobs, then its SSE
stream to `[DONE]`, over a kept-alive connection.

    .venv/bin/python bench/hive_ops.py [--runs 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import BIN, daemon

OPERATION = {"operation": "model_list"}


def one_job(http: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    created = http.post(f"{url}/v1/jobs", json=OPERATION).json()
    with http.stream("GET", url + created["sse_url"]) as stream:
        for line in stream.iter_lines():
            if line == "data: [DONE]":
                break
    return time.perf_counter() - started


def measure(url: str, runs: int) -> dict[str, float]:
    with httpx.Client(timeout=30) as http:
        for _ in range(20):  # warm up
            one_job(http, url)
        samples = sorted(one_job(http, url) for _ in range(runs))
    return {"median_ms": round(statistics.median(samples) * 1000, 2),
            "p90_ms": round(samples[int(len(samples) * 0.9)] * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"]) as local_queen:
            local = measure(local_queen.url, args.runs)
        with daemon([str(BIN / "rbee-hive"), "--port", "0"]) as hive:
            port = hive.url.rsplit(":", 1)[1]
            config = Path(tmp) / "config.toml"
            config.write_text(f'[hives.localhost]\nhost = "127.0.0.1"\nhive_port = {port}\n')
            with daemon([str(BIN / "queen-rbee"), "--port", "0", "--config", str(config)]) as queen:
                remote = measure(queen.url, args.runs)
            direct = measure(hive.url, args.runs)
    print(f"local-hive (in-process)  median {local['median_ms']:6.2f} ms   p90 {local['p90_ms']:6.2f} ms")
    print(f"HTTP hive via the queen  median {remote['median_ms']:6.2f} ms   p90 {remote['p90_ms']:6.2f} ms")
    print(f"the hive called directly median {direct['median_ms']:6.2f} ms   p90 {direct['p90_ms']:6.2f} ms")
    extra = remote['median_ms'] - local['median_ms']
    print(f"forwarding over HTTP adds {extra:+.2f} ms per operation (median)")
    print(json.dumps({"runs": args.runs, "local_hive": local, "http_hive": remote, "hive_direct": direct}))


if __name__ == "__main__":
    main()
