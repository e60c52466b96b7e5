"""Tokens/s and time to first token: llm-worker-rbee against llama-cpp-python called directly.

Same model (the built-in SmolLM2-135M GGUF), same threads, same prompt, greedy
sampling so both produce the same tokens; runs alternate between the two so
they share the machine's conditions. The worker is measured from the client's
side of its SSE stream, so the ratio is the whole overhead of HTTP, SSE, the
thread hop into trio and JSON.

    .venv/bin/python bench/worker.py [--threads 2] [--max-tokens 128] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.helpers import BIN, daemon
from rbee_worker.models import resolve_model

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle.\n\n"


def measure_direct(llm: object, max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = last = start
    count = 0
    for chunk in llm.create_completion(  # type: ignore[attr-defined]
        prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, stream=True
    ):
        if chunk["choices"][0]["text"]:
            last = time.perf_counter()
            if count == 0:
                first = last
            count += 1
    return first - start, (count - 1) / (last - first) if count > 1 else 0.0, count


def measure_worker(http: httpx.Client, url: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0}
    start = time.perf_counter()
    first = last = start
    count = 0
    with http.stream("POST", f"{url}/v1/inference", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith('data: {"type":"token"'):
                last = time.perf_counter()
                if count == 0:
                    first = last
                count += 1
    return first - start, (count - 1) / (last - first) if count > 1 else 0.0, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from llama_cpp import Llama

    model = resolve_model("smollm2-135m")
    llm = Llama(model_path=model.path, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    argv = [str(BIN / "llm-worker-rbee"), "--model", "smollm2-135m", "--device", "CPU-0",
            "--threads", str(args.threads), "--port", "0"]
    results: dict[str, list[tuple[float, float, int]]] = {"direct": [], "worker": []}
    # One kept-alive connection, as the queen keeps to its workers.
    with daemon(argv, timeout=60) as worker, httpx.Client() as http:
        measure_direct(llm, 8)  # warm both up
        measure_worker(http, worker.url, 8)
        for _ in range(args.runs):
            results["direct"].append(measure_direct(llm, args.max_tokens))
            results["worker"].append(measure_worker(http, worker.url, args.max_tokens))

    summary: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        summary[name] = {
            "ttft_ms": round(statistics.median(r[0] for r in runs) * 1000, 1),
            "tok_s": round(statistics.median(r[1] for r in runs), 1),
            "tokens": statistics.median(r[2] for r in runs),
        }
        print(f"{name:7} TTFT {summary[name]['ttft_ms']:7.1f} ms   decode {summary[name]['tok_s']:6.1f} tok/s"
              f"   tokens {summary[name]['tokens']:.0f}   (median of {len(runs)})")
    ratio = summary["worker"]["tok_s"] / summary["direct"]["tok_s"]
    print(f"worker/direct tok/s ratio {ratio:.3f}; "
          f"TTFT overhead {summary['worker']['ttft_ms'] - summary['direct']['ttft_ms']:+.1f} ms")
    print(json.dumps({"threads": args.threads, "max_tokens": args.max_tokens, **summary,
                      "tok_s_ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
