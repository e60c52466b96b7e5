"""One model over two hosts against the model on one, and against `llama-server --rpc`.

`python -m bench split [--quick]` (root: it makes two namespace hosts with sshd, as the fleet tests
do). Host h2 runs rbee's RPC server (`rbee_worker.rpc_server`, on its loopback); this process opens
the tunnel to it with the queen's own SSH code (`rbee_queen.fleet.ssh`: h1 127.0.0.1:T -> here -> h2
127.0.0.1:rpc), as the queen does for a split worker. Then, on h1, one after the other:

- rbee's worker with the whole model (`llm-worker-rbee`, 1 thread);
- rbee's worker with half the layers on h2 (`--rpc 127.0.0.1:T --tensor-split 0.5,0.5`);
- `llama-server` with the whole model, and with the same half on h2 (`--rpc 127.0.0.1:T -ngl 15`).

Each answers the same greedy prompts; generation speed is tokens after the first over the time
after the first. Every process is on this machine's cores (the RPC server takes 1 thread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.parallel import build_llama_server
from harness import netns
from harness.helpers import BIN
from rbee_common.builtin import builtin_model_path
from rbee_queen.fleet import ssh

TOKEN = "bench-split-token-0123456789abcdef"
PROMPT = "Write a long story about a lighthouse keeper and the sea."
LAYERS = 30
"""SmolLM2-135M's blocks: half of them (15) go to the helper."""


@contextmanager
def in_namespace(host: netns.Host, argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        process = subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], stdout=out, stderr=out,
                                   start_new_session=True, env={**os.environ, "RBEE_API_TOKEN": TOKEN})
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_up(url: str, process: subprocess.Popen[bytes], log: Path, rbee: bool, timeout: float = 120) -> None:
    """Until it can answer: rbee's /v1/ready (its /health answers while the model loads),
    llama-server's /health."""
    deadline = time.monotonic() + timeout
    probe = f"{url}/v1/ready" if rbee else f"{url}/health"
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(probe, timeout=2, headers={"Authorization": f"Bearer {TOKEN}"})
            if answer.status_code == 200 and (not rbee or answer.json().get("state") == "ready"):
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up:\n{log.read_text(errors='replace')[-3000:]}")


def hold_tunnel(fleet: netns.Fleet, rpc_port: int, ready: queue.Queue[int | BaseException],
                stop: threading.Event) -> None:
    """h1 127.0.0.1:T -> this process -> h2 127.0.0.1:rpc_port, as `rbee_queen.fleet.split` opens it."""
    def target(host: netns.Host) -> ssh.Target:
        return ssh.Target(alias=host.name, host=host.address, user="root",
                          identity_file=str(fleet.client_key), known_hosts=str(fleet.known_hosts))

    async def main() -> None:
        async with ssh.open_loop():
            h1, h2 = fleet.hosts
            async with ssh.connect(target(h2), print) as helper, ssh.connect(target(h1), print) as main:
                here = await helper.forward_local(rpc_port)
                ready.put(await main.forward_remote(here))
                while not stop.is_set():  # noqa: ASYNC110 (a thread's event)
                    await trio.sleep(0.1)

    try:
        trio.run(main)
    except BaseException as error:  # noqa: BLE001 (handed to the waiting thread)
        ready.put(error)


def speed(http: httpx.Client, url: str, rbee: bool, tokens: int) -> tuple[float, str]:
    """(generation tokens/s after the first token, the text)."""
    messages = [{"role": "user", "content": PROMPT}]
    if rbee:
        body: dict[str, Any] = {"messages": messages, "max_tokens": tokens, "temperature": 0.0}
        path, headers = "/v1/inference", {"Authorization": f"Bearer {TOKEN}"}
    else:
        body = {"messages": messages, "max_tokens": tokens, "temperature": 0.0, "stream": True,
                "cache_prompt": False}
        path, headers = "/v1/chat/completions", {}
    stamps: list[float] = []
    text = []
    seen: list[str] = []
    with http.stream("POST", url + path, json=body, headers={**headers, "Connection": "close"},
                     timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.read()[:300]!r}")
        for line in response.iter_lines():
            seen.append(line)
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if rbee:
                piece = event.get("t") if event.get("type") == "token" else None
            else:
                piece = (event.get("choices") or [{}])[0].get("delta", {}).get("content")
            if piece:
                stamps.append(time.perf_counter())
                text.append(piece)
            if rbee and event.get("type") == "error":
                raise RuntimeError(line)
    if len(stamps) < 2:
        raise RuntimeError(f"{url} answered {len(stamps)} token(s): {seen[-5:]}")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), "".join(text)


def measure(name: str, host: netns.Host, argv: list[str], port: int, rbee: bool, runs: int,
            tokens: int, logs: Path) -> dict[str, Any]:
    url = f"http://{host.address}:{port}"
    log = logs / f"{name}.log"
    with in_namespace(host, argv, log) as process:
        wait_up(url, process, log, rbee)
        with httpx.Client() as http:
            speed(http, url, rbee, 8)  # warm
            results = [speed(http, url, rbee, tokens) for _ in range(runs)]
    rates = [rate for rate, _ in results]
    print(f"{name}: {statistics.median(rates):.1f} tokens/s ({', '.join(f'{r:.1f}' for r in rates)})",
          file=sys.stderr)
    return {"tokens_per_s": statistics.median(rates), "runs": rates, "text": results[0][1]}


def run(quick: bool = False) -> dict[str, Any]:
    runs, tokens = (2, 64) if quick else (5, 128)
    model = str(builtin_model_path("smollm2-135m"))
    server = build_llama_server()
    with tempfile.TemporaryDirectory() as tmp, netns.fleet(2, Path(tmp) / "fleet") as fleet:
        h1, h2 = fleet.hosts
        logs = Path(tmp)
        rpc_port, worker_port = 50052, 9300
        rpc = [sys.executable, "-m", "rbee_worker.rpc_server", "--port", str(rpc_port), "--threads", "1"]
        with in_namespace(h2, rpc, logs / "rpc.log"):
            time.sleep(1.0)
            ready: queue.Queue[int | BaseException] = queue.Queue()
            stop = threading.Event()
            holder = threading.Thread(target=hold_tunnel, args=(fleet, rpc_port, ready, stop))
            holder.start()
            try:
                got = ready.get(timeout=60)
                if isinstance(got, BaseException):
                    raise got
                endpoint = f"127.0.0.1:{got}"
                print(f"tunnel: h1 {endpoint} -> h2 127.0.0.1:{rpc_port}", file=sys.stderr)
                worker = [str(BIN / "llm-worker-rbee"), "--model", "smollm2-135m", "--device", "CPU-0",
                          "--threads", "1", "--ctx", "1024", "--slots", "1", "--host", h1.address,
                          "--port", str(worker_port)]
                llama = [str(server), "-m", model, "-t", "1", "-tb", "1", "-c", "1024", "-np", "1",
                         "--host", h1.address, "--port", str(worker_port), "--no-webui"]
                half = str(LAYERS // 2)
                setups = {
                    "rbee": (worker, True),
                    "rbee_split": ([*worker, "--rpc", endpoint, "--tensor-split", "0.5,0.5"], True),
                    "llama_server": ([*llama, "-ngl", "0"], False),
                    "llama_server_rpc": ([*llama, "--rpc", endpoint, "-ngl", half], False),
                }
                results = {name: measure(name, h1, argv, worker_port, rbee, runs, tokens, logs)
                           for name, (argv, rbee) in setups.items()}
            finally:
                stop.set()
                holder.join(30)
    results["same_text"] = results["rbee"]["text"] == results["rbee_split"]["text"]
    results["config"] = {"runs": runs, "tokens": tokens, "threads": 1, "helper_layers": LAYERS // 2}
    return results


def table(results: dict[str, Any]) -> str:
    rbee, split = results["rbee"]["tokens_per_s"], results["rbee_split"]["tokens_per_s"]
    ls, ls_rpc = results["llama_server"]["tokens_per_s"], results["llama_server_rpc"]["tokens_per_s"]
    rows = [
        "| | whole model on h1 | half the layers on h2 (RPC through the SSH tunnel) | split / whole |",
        "|---|---|---|---|",
        f"| rbee (`llm-worker-rbee`) | {rbee:.1f} tokens/s | {split:.1f} tokens/s | {split / rbee:.2f} |",
        f"| `llama-server` | {ls:.1f} tokens/s | {ls_rpc:.1f} tokens/s (`--rpc`) | {ls_rpc / ls:.2f} |",
        f"| rbee / `llama-server` | {rbee / ls:.2f} | {split / ls_rpc:.2f} | |",
    ]
    same = "the same" if results["same_text"] else "NOT the same"
    return "\n".join(rows) + f"\n\nrbee's split and whole answers are {same} text (greedy)."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    results = run(args.quick)
    print(table(results))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "text"} if isinstance(v, dict) else v
                      for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
