"""What counting costs: a request's latency through the queen, and one scrape of /metrics.

A queen with `--local-hive` serves a synthetic worker (filler tokens at 1,000 tokens/s, no model),
so what is timed is the queen's own path: a 1-token chat completion, not streamed, sent
sequentially `--runs` times after a warm-up; then `/metrics` scraped `--runs` times. Reported:
medians and p95, in ms. To compare with a commit without metrics, run it with PYTHONPATH pointing
at a worktree of that commit (the daemons it starts import from there); the scrape is skipped
where the queen has no /metrics.

    .venv/bin/python bench/metrics_cost.py [--runs 300]

Run it on a quiet machine; the queen and its worker stop at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.helpers import BIN, daemon, isolated_env


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "queen.toml"
        config.write_text("[hive]\nsynthetic_backend = true\nsynthetic_tokens_per_s = 1000\n")
        env = isolated_env(root)
        with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(config)],
                    env=env) as queen, httpx.Client(base_url=queen.url, timeout=30) as http:
            body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            assert http.post("/v1/chat/completions", json=body).status_code == 200  # cold start
            for _ in range(20):
                http.post("/v1/chat/completions", json=body)
            chats = []
            for _ in range(args.runs):
                began = time.perf_counter()
                response = http.post("/v1/chat/completions", json=body)
                chats.append((time.perf_counter() - began) * 1000)
                assert response.status_code == 200, response.text
            print(f"chat, 1 token:  median {statistics.median(chats):.2f} ms, "
                  f"p95 {percentile(chats, 0.95):.2f} ms ({args.runs} requests)")
            if http.get("/metrics").status_code != 200:
                print("/metrics: not served by this queen")
                return
            scrapes = []
            for _ in range(args.runs):
                began = time.perf_counter()
                size = len(http.get("/metrics").content)
                scrapes.append((time.perf_counter() - began) * 1000)
            print(f"/metrics scrape: median {statistics.median(scrapes):.2f} ms, "
                  f"p95 {percentile(scrapes, 0.95):.2f} ms ({size} bytes)")


if __name__ == "__main__":
    main()
