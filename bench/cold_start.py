"""Cold start per model size: a chat request for a model no worker serves, from the request to its
first token (the queen picks a hive and device, the hive spawns `llm-worker-rbee`, llama.cpp loads).

SmolLM2-135M, the only model here offline, in four sizes: the built-in Q4_1 and llama.cpp's own
requantizations of it to Q8_0, F16 and F32. Each is put in the catalog the way a user gets one
(`model_download` from an HF-compatible server on loopback), then cold-started `runs` times
(the worker is stopped in between). The files were just written, so they are in the page cache:
this is the cold start of the process and the load, not of the disk.

    .venv/bin/python -m bench cold_start [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from harness.fake_hf import FakeHub
from harness.helpers import BIN, daemon, isolated_env, job_result, requantize

SIZES = ("Q4_1", "Q8_0", "F16", "F32")


def first_token_s(url: str, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4,
            "stream": True}
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {") and '"content":"' in line.replace(" ", ""):
                took = time.perf_counter() - started
                for _ in lines:  # read to the end, so the worker is idle again
                    pass
                return took
    raise RuntimeError("no token came back")


def run(*, quick: bool = False) -> dict[str, Any]:
    runs = 1 if quick else 3
    sizes = ("Q4_1", "F16") if quick else SIZES
    rows = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        env = isolated_env(folder / "xdg")
        with FakeHub(folder / "hub") as hub:
            for quant in sizes:
                repo, name = f"bench/smollm2-{quant.lower()}-GGUF", f"smollm2-135m.{quant}.gguf"
                if quant == "Q4_1":  # the built-in file as it is
                    hub.add_builtin(repo, name)
                else:  # threads 0: llama.cpp's default, every core
                    hub.add_file(repo, name, requantize(folder / name, quant, threads=0).read_bytes())
            argv = [str(BIN / "queen-rbee"), "--port", "0", "--local-hive"]
            with daemon(argv, env={**env, "HF_ENDPOINT": hub.url}, timeout=60) as queen:
                for quant in sizes:
                    repo = f"hf:bench/smollm2-{quant.lower()}-GGUF"
                    download = {"operation": "model_download", "model": repo}
                    entry = job_result(queen.url, download, timeout=300)
                    assert isinstance(entry, dict)
                    samples = []
                    for _ in range(runs):
                        samples.append(first_token_s(queen.url, str(entry["id"])))
                        workers = job_result(queen.url, {"operation": "worker_list"})
                        assert isinstance(workers, list)
                        for worker in workers:
                            stop = {"operation": "worker_stop", "worker_id": worker["worker_id"]}
                            job_result(queen.url, stop)
                    rows.append({"quantization": quant, "size_mb": round(int(entry["size_bytes"]) / 1e6, 1),
                                 "first_token_s": [round(s, 2) for s in samples],
                                 "median_s": round(statistics.median(samples), 2)})
    return {"runs": runs, "models": rows}


def table(results: dict[str, Any]) -> str:
    lines = ["| model | file | spawn → first token, median | each run |", "|---|---|---|---|"]
    for row in results["models"]:
        each = ", ".join(f"{s:.2f}" for s in row["first_token_s"])
        lines.append(f"| SmolLM2-135M {row['quantization']} | {row['size_mb']:.0f} MB | "
                     f"{row['median_s']:.2f} s | {each} s |")
    return "\n".join(lines)

