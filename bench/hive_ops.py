"""A hive operation through the queen: in-process (--local-hive) against a hive over HTTP.

Both queens run as real processes on loopback; the operation is `model_list`
(a catalog read, so the hive's own work is small and the path is what shows).
Each sample is one whole job as a client sees it: POST /v1/jobs, then its SSE
stream to `[DONE]`, over a kept-alive connection. Also timed: the hive's
`GET /v1/capabilities` (device detection: psutil, /proc and NVML), called directly.

    .venv/bin/python -m bench hive_ops [--quick]
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
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.helpers import BIN, daemon, isolated_env

OPERATION = {"operation": "model_list"}


def one_job(http: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    created = http.post(f"{url}/v1/jobs", json=OPERATION).json()
    with http.stream("GET", url + created["sse_url"]) as stream:
        for line in stream.iter_lines():
            if line == "data: [DONE]":
                break
    return time.perf_counter() - started


def capabilities(http: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    http.get(f"{url}/v1/capabilities").raise_for_status()
    return time.perf_counter() - started


def measure(url: str, runs: int, sample: Any = one_job) -> dict[str, float]:
    with httpx.Client(timeout=30) as http:
        for _ in range(20):  # warm up
            sample(http, url)
        samples = sorted(sample(http, url) for _ in range(runs))
    return {"median_ms": round(statistics.median(samples) * 1000, 2),
            "p90_ms": round(samples[int(len(samples) * 0.9)] * 1000, 2)}


def run(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        env = isolated_env(Path(tmp) / "xdg")
        with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"], env=env) as local_queen:
            local = measure(local_queen.url, runs)
        with daemon([str(BIN / "rbee-hive"), "--port", "0"], env=env) as hive:
            port = hive.url.rsplit(":", 1)[1]
            config = Path(tmp) / "config.toml"
            config.write_text(f'[hives.localhost]\nhost = "127.0.0.1"\nhive_port = {port}\n')
            with daemon([str(BIN / "queen-rbee"), "--port", "0", "--config", str(config)], env=env) as queen:
                remote = measure(queen.url, runs)
            direct = measure(hive.url, runs)
            caps = measure(hive.url, runs, capabilities)
    return {"runs": runs, "local_hive": local, "http_hive": remote, "hive_direct": direct,
            "capabilities": caps, "http_adds_ms": round(remote["median_ms"] - local["median_ms"], 2)}


def table(results: dict[str, Any]) -> str:
    rows = [("`model_list` through `queen-rbee --local-hive` (in-process)", results["local_hive"]),
            ("`model_list` through the queen to an `rbee-hive` over HTTP", results["http_hive"]),
            ("`model_list` on that `rbee-hive` directly", results["hive_direct"]),
            ("`GET /v1/capabilities` on that `rbee-hive` directly", results["capabilities"])]
    lines = ["| operation (one whole job: POST, then its stream to `[DONE]`) | median ms | p90 ms |",
             "|---|---|---|"]
    lines += [f"| {name} | {cell['median_ms']:.2f} | {cell['p90_ms']:.2f} |" for name, cell in rows]
    lines.append(f"| **forwarding over HTTP adds (median)** | {results['http_adds_ms']:+.2f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    results = run(args.runs)
    print(table(results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
