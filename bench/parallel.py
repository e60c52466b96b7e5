"""Concurrent streams on one worker: llm-worker-rbee against llama.cpp's own `llama-server`.

Both serve the built-in SmolLM2-135M GGUF with the same threads, the same
context per sequence and as many sequences as concurrent requests (C): our
`--slots C --ctx N` against `-np C -c C*N`. Each of the C clients sends its
own prompt (the same prompts to both, greedy sampling, so both produce the
same tokens) and streams up to `--max-tokens` tokens.
Reported per C: aggregate tokens/s (all tokens over the wall time from the
first request to the last token), time to first token p50/p95, and the
server's peak RSS (VmHWM). For each C both servers run at once, and `--runs`
runs alternate between them (so drift in the machine hits both); the median
run counts.

`llama-server` is built once from the llama.cpp sources vendored in the
llama-cpp-python sdist of the installed version, into
`~/.cache/rbee/llama-server-<version>/` (about 5 minutes on 2 cores).

    .venv/bin/python -m bench parallel [--quick]
    .venv/bin/python bench/parallel.py [--threads 2] [--concurrency 1 2 4 8] [--max-tokens 128]

Run it on a quiet machine; it stops every server it starts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import percentile
from harness.helpers import BIN, daemon
from rbee_worker.models import resolve_model

PROMPTS = [  # beginnings that a small model continues for a long while
    "Once upon a time, in a small village by the sea, there lived an old lighthouse keeper who",
    "The history of the Roman Empire begins with the founding of Rome, when",
    "In the morning the baker woke before dawn, lit the oven and",
    "The robot looked at the blank canvas for a long time. Then it picked up a brush and",
    "Chapter one. The ship left the harbour at noon, and the two friends",
    "The first colonists on Mars stepped out of their shelter and saw",
    "Deep in the forest, a small dragon who was afraid of the dark",
    "The detective opened the door of the old library and noticed that",
]

Stream = Callable[[httpx.Client, str, str, int, int], tuple[float, int]]
"""(client, base url, prompt, max tokens, seed) -> (seconds to the first token, tokens)."""


def build_llama_server() -> Path:
    version = importlib.metadata.version("llama-cpp-python")
    cache = Path.home() / ".cache" / "rbee" / f"llama-server-{version}"
    source = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    binary = source / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    if shutil.which("cmake") is None:
        raise SystemExit("cmake is needed to build llama-server (apt-get install cmake)")
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        print(f"downloading the llama-cpp-python {version} sdist", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(cache)], check=True)
    if not source.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    print("building llama-server (about 5 minutes on 2 cores)", file=sys.stderr)
    subprocess.run(["cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_RPC=ON"],
                   cwd=source, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   cwd=source, check=True, stdout=subprocess.DEVNULL)
    return binary


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_up(process: subprocess.Popen[bytes], health: str, log: Any, name: str, timeout: float) -> None:
    """Poll `health` until it answers 200; on an early exit or the timeout, raise with the log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise RuntimeError(f"{name} did not start:\n{log.read().decode(errors='replace')}")
        time.sleep(0.2)


def stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def llama_server(
    binary: Path, model: str, *, threads: int, ctx: int, slots: int,
) -> Iterator[tuple[str, int]]:
    port = free_port()
    argv = [str(binary), "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(ctx * slots),
            "-np", str(slots), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(process, f"{url}/health", log, "llama-server", 120)
            yield url, process.pid
        finally:
            stop_group(process, 10)


@contextmanager
def rbee_worker(
    *, threads: int, ctx: int, slots: int, extra: list[str] | None = None,
) -> Iterator[tuple[str, int]]:
    argv = [str(BIN / "llm-worker-rbee"), "--model", "smollm2-135m", "--device", "CPU-0",
            "--threads", str(threads), "--ctx", str(ctx), "--slots", str(slots), "--port", "0",
            *(extra or [])]
    with daemon(argv, timeout=120) as worker:
        yield worker.url, worker.process.pid


def stream_rbee(http: httpx.Client, url: str, prompt: str, max_tokens: int, seed: int) -> tuple[float, int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": seed}
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    with http.stream("POST", f"{url}/v1/inference", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith('data: {"type":"token"') and not first:
                first = time.perf_counter() - start
            elif line.startswith('data: {"type":"end"'):
                tokens = json.loads(line[6:])["tokens_out"]
            elif line.startswith('data: {"type":"error"'):
                raise RuntimeError(line)
    return first, tokens


def stream_llama_server(
    http: httpx.Client, url: str, prompt: str, max_tokens: int, seed: int,
) -> tuple[float, int]:
    body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "seed": seed, "stream": True}
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    with http.stream("POST", f"{url}/completion", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("content") and not first:
                first = time.perf_counter() - start
            if event.get("stop"):
                tokens = event.get("timings", {}).get("predicted_n", tokens)
    return first, tokens


def one_run(stream: Stream, url: str, concurrency: int, max_tokens: int) -> tuple[float, list[float]]:
    """(aggregate tokens/s, time to first token of each stream)."""
    clients = [httpx.Client() for _ in range(concurrency)]
    try:
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(
                lambda i: stream(clients[i], url, PROMPTS[i % len(PROMPTS)], max_tokens, 1000 + i),
                range(concurrency),
            ))
        elapsed = time.perf_counter() - start
    finally:
        for client in clients:
            client.close()
    return sum(tokens for _, tokens in results) / elapsed, [first for first, _ in results]


def summary(results: list[tuple[float, list[float]]], pid: int) -> dict[str, float]:
    rate = statistics.median(r[0] for r in results)
    firsts = sorted(first for _, run_firsts in results for first in run_firsts)
    p95 = percentile(firsts, 0.95)
    return {"tok_s": round(rate, 1), "ttft_p50_ms": round(statistics.median(firsts) * 1000, 1),
            "ttft_p95_ms": round(p95 * 1000, 1), "rss_mb": round(peak_rss_mb(pid), 1)}


def measure(binary: Path, model: str, args: argparse.Namespace, concurrency: int) -> dict[str, object]:
    """Both servers up at once, idle but for the one measured: runs alternate between them, so
    both see the same machine."""
    ours_cm = rbee_worker(threads=args.threads, ctx=args.ctx, slots=concurrency)
    theirs_cm = llama_server(binary, model, threads=args.threads, ctx=args.ctx, slots=concurrency)
    with ours_cm as (our_url, our_pid), theirs_cm as (their_url, their_pid):
        one_run(stream_rbee, our_url, concurrency, 8)  # warm up
        one_run(stream_llama_server, their_url, concurrency, 8)
        ours: list[tuple[float, list[float]]] = []
        theirs: list[tuple[float, list[float]]] = []
        for _ in range(args.runs):
            ours.append(one_run(stream_rbee, our_url, concurrency, args.max_tokens))
            theirs.append(one_run(stream_llama_server, their_url, concurrency, args.max_tokens))
        mine, other = summary(ours, our_pid), summary(theirs, their_pid)
    return {"concurrency": concurrency, "rbee": mine, "llama_server": other,
            "tok_s_ratio": round(mine["tok_s"] / other["tok_s"], 2),
            "rss_ratio": round(mine["rss_mb"] / other["rss_mb"], 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    binary = build_llama_server()
    model = resolve_model("smollm2-135m").path
    rows = []
    for c in args.concurrency:
        row = measure(binary, model, args, c)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {"threads": args.threads, "ctx": args.ctx, "max_tokens": args.max_tokens, "runs": args.runs,
            "rows": rows}


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=2048, help="context per sequence, both servers")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    return parser.parse_args(argv)


def table(results: dict[str, Any]) -> str:
    lines = [f"threads {results['threads']}, ctx {results['ctx']} per sequence, "
             f"{results['max_tokens']} tokens per stream, median of {results['runs']} runs", "",
             "| C | rbee tok/s | llama-server tok/s | ratio | TTFT p50/p95 ms (rbee) | TTFT p50/p95 ms "
             "(llama-server) | RSS MB (rbee / llama-server) | RSS ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        ours, theirs = row["rbee"], row["llama_server"]
        lines.append(f"| {row['concurrency']} | {ours['tok_s']} | {theirs['tok_s']} | {row['tok_s_ratio']} | "
                     f"{ours['ttft_p50_ms']:.0f} / {ours['ttft_p95_ms']:.0f} | "
                     f"{theirs['ttft_p50_ms']:.0f} / {theirs['ttft_p95_ms']:.0f} | "
                     f"{ours['rss_mb']:.0f} / {theirs['rss_mb']:.0f} | {row['rss_ratio']} |")
    return "\n".join(lines)


def main() -> None:
    print(table(run(options())))


if __name__ == "__main__":
    main()
