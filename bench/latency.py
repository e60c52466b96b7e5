"""What the queen adds to a request, next to what LiteLLM's proxy adds to `llama-server`.

Four paths, each a streamed chat completion timed from the request to `[DONE]`:

- the worker called directly (`POST /v1/inference` on `llm-worker-rbee`);
- the queen's OpenAI route (`POST /v1/chat/completions` on `queen-rbee --local-hive`), in front of
  that same worker;
- `llama-server` called directly (its own `/v1/chat/completions`), same model and threads;
- LiteLLM's proxy (`litellm[proxy]`, its own venv, a master key, `LITELLM_LOCAL_MODEL_COST_MAP=True`)
  in front of that `llama-server`.

"Added" is a proxy's percentile minus its engine's. Samples alternate between the four paths, so
drift in the machine hits all of them. `max_tokens` 1 shows the fixed cost of a request; 64 adds
the cost of relaying a stream of tokens. The prompt makes SmolLM2 count, so it never stops early.

    .venv/bin/python -m bench latency [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench import percentile
from bench.parallel import build_llama_server, free_port, llama_server, stop_group, wait_until_up
from harness.helpers import BIN, daemon, isolated_env, job_result
from rbee_worker.models import resolve_model

LITELLM_VERSION = "1.108.7"
MASTER_KEY = "sk-bench-rbee-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "Count from 1 to 1000, separated by commas: 1, 2, 3,"}]

Timed = Callable[[httpx.Client, int], tuple[float, int]]
"""(client, max tokens) -> (seconds to [DONE], completion tokens)."""


def litellm_binary() -> Path:
    """`litellm` from its own venv, made once under ~/.cache/rbee (its pins would fight ours)."""
    venv = Path.home() / ".cache" / "rbee" / f"litellm-{LITELLM_VERSION}"
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
                       check=True)
    return binary


@contextmanager
def litellm_proxy(upstream: str) -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "litellm.yaml"
        config.write_text(
            "model_list:\n  - model_name: smollm2\n    litellm_params:\n      model: openai/smollm2\n"
            f"      api_base: {upstream}/v1\n      api_key: none\n"
            f"general_settings:\n  master_key: {MASTER_KEY}\n"
        )
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(
                [str(litellm_binary()), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                stdout=log, stderr=log, env=env, start_new_session=True, cwd=folder,
            )
            try:
                url = f"http://127.0.0.1:{port}"
                wait_until_up(process, f"{url}/health/liveliness", log, "litellm", 180)
                yield url
            finally:
                stop_group(process, 15)


def _openai_stream(url: str, model: str, headers: dict[str, str] | None = None) -> Timed:
    def timed(http: httpx.Client, max_tokens: int) -> tuple[float, int]:
        body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        tokens = 0
        started = time.perf_counter()
        with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    break
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens = usage["completion_tokens"]
        return time.perf_counter() - started, tokens
    return timed


def _worker_stream(url: str) -> Timed:
    def timed(http: httpx.Client, max_tokens: int) -> tuple[float, int]:
        body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
        tokens = 0
        started = time.perf_counter()
        with http.stream("POST", f"{url}/v1/inference", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    break
                if line.startswith('data: {"type":"end"'):
                    tokens = json.loads(line[6:])["tokens_out"]
        return time.perf_counter() - started, tokens
    return timed


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p95_ms": round(percentile(ordered, 0.95) * 1000, 2),
            "p99_ms": round(percentile(ordered, 0.99) * 1000, 2)}


def run(*, quick: bool = False, threads: int | None = None) -> dict[str, Any]:
    threads = threads or os.cpu_count() or 2
    counts = {1: 20, 64: 6} if quick else {1: 300, 64: 100}
    binary = build_llama_server()
    model = resolve_model("smollm2-135m").path
    with tempfile.TemporaryDirectory() as folder:
        env = isolated_env(Path(folder))
        queen_cm = daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"], env=env, timeout=60)
        server_cm = llama_server(binary, model, threads=threads, ctx=2048, slots=4)
        with queen_cm as queen, server_cm as (server_url, _):
            worker = job_result(queen.url, {"operation": "worker_spawn", "model": "smollm2-135m",
                                            "threads": threads}, timeout=120)
            assert isinstance(worker, dict)
            with litellm_proxy(server_url) as proxy_url:
                paths: dict[str, Timed] = {
                    "worker": _worker_stream(str(worker["url"])),
                    "queen": _openai_stream(queen.url, "smollm2-135m"),
                    "llama_server": _openai_stream(server_url, "smollm2"),
                    "litellm": _openai_stream(proxy_url, "smollm2",
                                              {"Authorization": f"Bearer {MASTER_KEY}"}),
                }
                results: dict[str, Any] = {"threads": threads, "litellm": LITELLM_VERSION, "tokens": {}}
                clients = {name: httpx.Client(timeout=120) for name in paths}
                try:
                    for name, timed in paths.items():  # warm up: connections, caches, the prompt
                        for _ in range(5):
                            timed(clients[name], 4)
                    for max_tokens, runs in counts.items():
                        samples: dict[str, list[float]] = {name: [] for name in paths}
                        produced: dict[str, set[int]] = {name: set() for name in paths}
                        for _ in range(runs):
                            for name, timed in paths.items():
                                took, tokens = timed(clients[name], max_tokens)
                                samples[name].append(took)
                                produced[name].add(tokens)
                        row = {name: percentiles(values) for name, values in samples.items()}
                        for name in paths:
                            row[name]["completion_tokens"] = sorted(produced[name])
                        for proxy, engine in (("queen", "worker"), ("litellm", "llama_server")):
                            row[f"{proxy}_added"] = {k: round(row[proxy][k] - row[engine][k], 2)
                                                     for k in ("p50_ms", "p95_ms", "p99_ms")}
                        row["runs"] = runs
                        results["tokens"][str(max_tokens)] = row
                finally:
                    for client in clients.values():
                        client.close()
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| max_tokens | path | p50 ms | p95 ms | p99 ms | tokens |", "|---|---|---|---|---|---|"]
    names = {"worker": "llm-worker-rbee, direct", "queen": "queen-rbee OpenAI route → that worker",
             "queen_added": "**added by the queen**", "llama_server": "llama-server, direct",
             "litellm": "LiteLLM proxy → that llama-server", "litellm_added": "**added by LiteLLM**"}
    for max_tokens, row in results["tokens"].items():
        for key, label in names.items():
            cell = row[key]
            tokens = ",".join(str(t) for t in cell.get("completion_tokens", [])) or ""
            lines.append(f"| {max_tokens} | {label} | {cell['p50_ms']:.2f} | {cell['p95_ms']:.2f} | "
                         f"{cell['p99_ms']:.2f} | {tokens} |")
    return "\n".join(lines)

