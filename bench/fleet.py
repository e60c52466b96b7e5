"""Use the whole fleet: a burst for one model, with replicas on demand and without.

Four hives on this machine: a queen with its local hive and three
`rbee-hive` processes on loopback, reached over HTTP as remote hives are,
each able to run one synthetic worker (no model: 8 slots, 20 tokens a second
a stream, so the CPU is not what limits it). One worker of the model is
running; then 64 streams of 512 tokens start at once. With replicas (the
queen's defaults, `scale_after_s = 2`; `replica_idle_s = 10` to see the way
back in a short run) and with `replicas = false`: when the 2nd, 3rd and 4th
workers served, the burst's aggregate tokens a second, the wait for each
stream's first token (p50, p90), and how long after the burst the fleet was
back to one worker.

    .venv/bin/python -m bench fleet [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.fake_hf import FakeHub
from harness.helpers import active_workers, loopback_fleet, metric_samples, metric_total, run_job

HIVE = (
    "synthetic_backend = true\nsynthetic_slots = 8\nsynthetic_tokens_per_s = 20\nworker_idle_timeout_s = 0\n"
)


def _waiting(url: str) -> int:
    """Requests waiting for a slot, as the queen's /metrics say."""
    return int(metric_total(metric_samples(url), "rbee_queen_queue_depth"))


def _burst(replicas: bool, streams: int, tokens: int) -> dict[str, Any]:
    queen = (
        f"replicas = {'true' if replicas else 'false'}\nreplica_idle_s = 10\nqueue_size = 1000\n"
        "queue_timeout_s = 600"
    )
    with (
        tempfile.TemporaryDirectory() as folder,
        loopback_fleet(Path(folder), 3, hive=HIVE, queen=queen) as q,
    ):
        events, terminator = run_job(
            q.url, {"operation": "worker_spawn", "model": "synthetic", "backend": "synthetic"}
        )
        assert terminator == "[DONE]", events[-3:]
        firsts: list[float] = []
        produced: list[int] = []
        serving: dict[int, float] = {}
        done = threading.Event()

        def stream() -> None:
            body = {
                "model": "synthetic",
                "max_tokens": tokens,
                "stream": True,
                "messages": [{"role": "user", "content": "go"}],
            }
            start, first, count = time.perf_counter(), 0.0, 0
            with httpx.stream("POST", f"{q.url}/v1/chat/completions", json=body, timeout=900) as answer:
                for line in answer.iter_lines():
                    if line.startswith("data: {") and '"content":"w' in line.replace(" ", ""):
                        first = first or time.perf_counter() - start
                        count += 1
            firsts.append(first)
            produced.append(count)

        depth: list[int] = []

        def watch() -> None:  # when each worker count was first reached; the line every 5 s
            while not done.wait(0.25):
                at = time.perf_counter() - began
                for n in range(1, len(active_workers(q.url)) + 1):
                    serving.setdefault(n, at)
                if at >= 5 * len(depth):
                    depth.append(_waiting(q.url))

        began = time.perf_counter()
        threads = [threading.Thread(target=stream) for _ in range(streams)]
        watcher = threading.Thread(target=watch)
        watcher.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        done.set()
        watcher.join()
        back = 0.0
        if replicas:
            ended = time.perf_counter()
            while len(active_workers(q.url)) > 1 and time.perf_counter() - ended < 120:
                time.sleep(0.25)
            back = time.perf_counter() - ended
    ordered = sorted(firsts)
    return {
        "replicas": replicas,
        "streams": streams,
        "tokens": tokens,
        "elapsed": elapsed,
        "tokens_per_s": sum(produced) / elapsed,
        "complete": sum(1 for p in produced if p >= tokens),
        "wait_p50": statistics.median(ordered),
        "wait_p90": ordered[int(0.9 * len(ordered))],
        "serving": {n: round(t, 1) for n, t in sorted(serving.items())},
        "back_to_one_s": back,
        "depth": depth,
    }


def copies(quick: bool) -> dict[str, Any]:
    """One model file: from the (fake) Hub to hive h1, then from h1 to h2 and h3 over loopback."""
    size = (50 if quick else 500) * 1000 * 1000
    repo, name = "bench-org/big-GGUF", "big.Q4_K_M.gguf"
    out: dict[str, Any] = {"size": size, "mb_per_s": {}}
    with tempfile.TemporaryDirectory() as folder, FakeHub(Path(folder) / "hub") as hub:
        (hub.root / repo).mkdir(parents=True)
        with open(hub.root / repo / name, "wb") as file:
            for _ in range(size // (1 << 20)):
                file.write(os.urandom(1 << 20))
            file.write(os.urandom(size % (1 << 20)))
        (Path(folder) / "fleet").mkdir()
        with loopback_fleet(Path(folder) / "fleet", 3, hive="", env={"HF_ENDPOINT": hub.url}) as q:
            for hive_id in ("h1", "h2", "h3"):
                before = len(hub.requests)
                began = time.perf_counter()
                events, terminator = run_job(
                    q.url,
                    {"operation": "model_download", "model": f"hf:{repo}", "hive_id": hive_id},
                    timeout=900,
                )
                assert terminator == "[DONE]", events[-3:]
                took = time.perf_counter() - began
                origin = "the Hub" if len(hub.requests) > before else "h1"
                out["mb_per_s"][hive_id] = (origin, size / 1e6 / took, took)
    return out


def run(quick: bool = False) -> dict[str, Any]:
    streams, tokens = (32, 64) if quick else (64, 512)
    return {"burst": [_burst(True, streams, tokens), _burst(False, streams, tokens)], "copies": copies(quick)}


def table(results: dict[str, Any]) -> str:
    on, off = results["burst"]
    lines = [
        f"{on['streams']} streams of {on['tokens']} tokens at once, 4 hives of one synthetic worker each "
        "(8 slots, 20 tokens/s a stream):",
        "",
        "| replicas | 2nd / 3rd / 4th worker serving at | burst took | aggregate tokens/s | "
        "first token p50 / p90 | streams complete | back to one worker after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["burst"]:
        at = " / ".join(f"{r['serving'][n]:.1f} s" if n in r["serving"] else "-" for n in (2, 3, 4))
        back = f"{r['back_to_one_s']:.1f} s" if r["replicas"] else "-"
        lines.append(
            f"| {'on' if r['replicas'] else 'off'} | {at} | {r['elapsed']:.1f} s | {r['tokens_per_s']:.0f} | "
            f"{r['wait_p50']:.1f} / {r['wait_p90']:.1f} s | {r['complete']}/{r['streams']} | {back} |"
        )
    lines += ["", "Requests waiting for a slot, every 5 s from the start:", ""]
    for r in results["burst"]:
        series = ", ".join(str(d) for d in r["depth"])
        lines.append(f"- replicas {'on' if r['replicas'] else 'off'}: {series}")
    lines += [
        "",
        f"Replicas on / off: aggregate tokens/s {on['tokens_per_s'] / off['tokens_per_s']:.2f} x, "
        f"first-token wait p90 {on['wait_p90'] / max(off['wait_p90'], 1e-9):.2f} x.",
    ]
    c = results["copies"]
    lines += [
        "",
        f"A {c['size'] / 1e6:.0f} MB model file, asked for by three hives in turn (`model_download`, one "
        "job each; the fake Hub and the hives on loopback, no rate limit):",
        "",
        "| hive | got it from | took | MB/s |",
        "|---|---|---|---|",
    ]
    for hive_id, (origin, rate, took) in c["mb_per_s"].items():
        lines.append(f"| {hive_id} | {origin} | {took:.1f} s | {rate:.0f} |")
    return "\n".join(lines)


def main() -> None:
    print(table(run(quick="--quick" in sys.argv)))


if __name__ == "__main__":
    main()
