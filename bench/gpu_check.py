"""The GPU check: does a `GPU-0` worker really run on the GPU, and how does it compare?

Run it where an NVIDIA GPU and the CUDA toolkit are (`nvcc`, cmake):

    .venv/bin/python -m bench.gpu_check [--sdist llama_cpp_python-0.3.36.tar.gz] [--cuda-arch 90]

1. builds llama-cpp-python with CUDA and RPC (`rbee_common.llama_build`, flavour `cuda-rpc`; from
   `--sdist` on a machine without the package index) and installs it into this venv;
2. starts `llm-worker-rbee --device GPU-0` on the built-in model and checks that it offloaded: the
   GPU's used memory grew by at least the model's file, and its tokens/s is far above a CPU
   worker's (at least 3x);
3. builds `llama-server` with CUDA from the same sources and measures it on the same GPU (`-ngl 99`).

It prints one JSON object and exits 1 when a check fails. Every server it starts, it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.parallel import free_port, stop_group, stream_llama_server, stream_rbee, wait_until_up
from harness.helpers import BIN
from rbee_common import llama_build
from rbee_common.builtin import builtin_model_path

TOKENS = 256


def gpu_used_bytes() -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    finally:
        pynvml.nvmlShutdown()


@contextlib.contextmanager
def server(argv: list[str], health: str, name: str, env: dict[str, str] | None = None) -> Iterator[int]:
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True,
                                   env={**os.environ, **(env or {})})
        try:
            wait_until_up(process, health, log, name, 300)
            yield process.pid
        finally:
            stop_group(process, 10)


def tokens_per_s(url: str, rbee: bool) -> float:
    with httpx.Client(headers={"Connection": "close"}) as http:
        stream = stream_rbee if rbee else stream_llama_server
        stream(http, url, "Hello", 8, 1)  # warm
        began = time.perf_counter()
        first, tokens = stream(http, url, "Write a long story about the sea.", TOKENS, 1)
        return tokens / (time.perf_counter() - began - first)


def rbee_speed(device: str) -> tuple[float, int]:
    """(tokens/s, GPU memory the worker took)."""
    before = gpu_used_bytes()
    port = free_port()
    argv = [str(BIN / "llm-worker-rbee"), "--model", "smollm2-135m", "--device", device,
            "--port", str(port), "--threads", "1", "--ctx", "2048", "--slots", "1"]
    with server(argv, f"http://127.0.0.1:{port}/health", f"worker on {device}"):
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # /health answers before the model is in memory
            if httpx.get(f"{url}/v1/ready", timeout=2).json().get("state") == "ready":
                break
            time.sleep(0.5)
        taken = gpu_used_bytes() - before
        return tokens_per_s(url, True), taken


def llama_server_cuda(sdist: Path, arch: str) -> Path:
    root = Path.home() / ".cache" / "rbee" / "llama-server-cuda"
    source = root / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    binary = source / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    subprocess.run(["cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DGGML_CUDA=ON", "-DGGML_RPC=ON",
                    f"-DCMAKE_CUDA_ARCHITECTURES={arch}"], cwd=source, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-server", "-j", str(os.cpu_count() or 4)],
                   cwd=source, check=True, stdout=subprocess.DEVNULL)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, help="llama-cpp-python's sdist (a machine without the index)")
    parser.add_argument("--cuda-arch", default="native", help="CMAKE_CUDA_ARCHITECTURES (90 for an H100)")
    args = parser.parse_args()
    if not llama_build.nvcc():
        raise SystemExit("no nvcc here: this check needs the CUDA toolkit and an NVIDIA GPU")
    os.environ["CMAKE_ARGS"] = f"-DCMAKE_CUDA_ARCHITECTURES={args.cuda_arch}"
    have = llama_build.ensure_installed(lambda text: print(text, file=sys.stderr), "cuda-rpc",
                                        source=str(args.sdist) if args.sdist else None)
    results: dict[str, Any] = {"llama_cpp_python": llama_build.describe(have)}
    size = (builtin_model_path("smollm2-135m") or Path()).stat().st_size
    gpu, taken = rbee_speed("GPU-0")
    cpu, _ = rbee_speed("CPU-0")
    results.update(rbee_gpu_tokens_per_s=round(gpu, 1), rbee_cpu_tokens_per_s=round(cpu, 1),
                   gpu_memory_taken_bytes=taken, model_bytes=size)
    if args.sdist:
        binary = llama_server_cuda(args.sdist, args.cuda_arch)
        port = free_port()
        argv = [str(binary), "-m", str(builtin_model_path("smollm2-135m")), "-ngl", "99", "-c", "2048",
                "-np", "1", "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        with server(argv, f"http://127.0.0.1:{port}/health", "llama-server"):
            speed = tokens_per_s(f"http://127.0.0.1:{port}", False)
            results["llama_server_gpu_tokens_per_s"] = round(speed, 1)
    checks = {"offloaded": taken >= size, "faster_than_cpu": gpu >= 3 * cpu,
              "cuda_build": have["gpu_offload"]}
    results["checks"] = checks
    print(json.dumps(results, indent=1))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
