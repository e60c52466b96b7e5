"""`llm-worker-rbee`: parse arguments, guard against orphaning, run the daemon."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import signal
import sys
import threading
from typing import Annotated

import typer

from rbee_common.auth import load_token, require_token_for_bind
from rbee_common.daemon import (
    announce_ready,
    configure_logging,
    exit_on_config_error,
    package_version,
    run_daemon,
)
from rbee_common.errors import ConfigError
from rbee_common.gpus import check_device, gpu_environment, gpu_indices, parse_split
from rbee_common.sizing import auto_slots
from rbee_worker.config import WorkerConfig
from rbee_worker.serve import serve

cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
PR_SET_PDEATHSIG = 1
THREAD_STACK_BYTES = 64 << 20
"""Reserved, not used: a thread's stack costs only the pages it touches."""
SHORT_SPIN = "200"
"""OpenMP spin iterations before a waiting thread sleeps, for --spin-wait short (bench/threads.py)."""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llm-worker-rbee {package_version()}")
        raise typer.Exit()


def die_with_parent() -> None:
    """Linux: the kernel kills us if the process that started us dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@cli.command()
def main(
    model: Annotated[str, typer.Option(help="smollm2-135m, file:///abs/path.gguf, a .gguf path, or an MLX model dir.")],  # noqa: E501
    model_name: Annotated[str | None, typer.Option(help="The name to report in heartbeats and events (default: --model).")] = None,  # noqa: E501
    device: Annotated[str, typer.Option(help="CPU-0, GPU-<n> or METAL-0; several GPUs of this machine as GPU-0,GPU-1 (the layers split by --tensor-split).")] = "CPU-0",  # noqa: E501
    tensor_split: Annotated[str | None, typer.Option(help="llama.cpp: each device's share of the layers, in order: this machine's (CPU-0, or each GPU of --device), then each --rpc server's; as 0.6,0.4. Default: even.")] = None,  # noqa: E501
    rpc: Annotated[str | None, typer.Option(help="llama.cpp: RPC servers (host:port,...) that hold part of the layers; reached through tunnels, never over an open network.")] = None,  # noqa: E501
    backend: Annotated[str, typer.Option(help="auto, llama-cpp or mlx; synthetic (benchmarks and tests only: fixed-rate filler tokens, no model).")] = "auto",  # noqa: E501
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind; 0 picks a free one.")] = 0,
    worker_id: Annotated[str, typer.Option(help="This worker's id.")] = "worker-local",
    hive_id: Annotated[str, typer.Option(help="The hive that started it.")] = "localhost",
    queen_url: Annotated[str | None, typer.Option(help="Send heartbeats to this queen.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for generation.")] = 1,
    ctx: Annotated[int, typer.Option(min=64, help="Context length of each sequence, in tokens.")] = 2048,
    slots: Annotated[int | None, typer.Option(min=1, help="Concurrent sequences batched on one copy of the model; more requests get 503 ALL_SLOTS_BUSY. Default: 4 on a GPU or Metal; on a CPU as many as 32,768 tokens of cache hold (4 at --ctx 8192 or less).")] = None,  # noqa: E501
    cache_ram: Annotated[int, typer.Option(min=0, help="MiB of host RAM for prompt prefixes saved from sequences about to be reused (llama.cpp): a later request sharing one has it copied back instead of computed. 0: none.")] = 0,  # noqa: E501
    spin_wait: Annotated[str, typer.Option(help="full: llama.cpp's threads spin between operations (fastest on cores nobody else uses); short: they spin briefly, then sleep (GOMP_SPINCOUNT=200), so a process that takes one of the cores costs about half the speed instead of nearly all of it (bench/threads.py).")] = "full",  # noqa: E501
    lifeline_fd: Annotated[int | None, typer.Option(help="Exit when this fd reaches EOF (the parent died).")] = None,  # noqa: E501
    heartbeat_s: Annotated[float, typer.Option(min=0.1, help="Seconds between heartbeats (and one at once on a change of state).")] = 5.0,  # noqa: E501
    drain_s: Annotated[float, typer.Option(min=0, help="On shutdown, let requests finish this long.")] = 5.0,
    synthetic_tokens_per_s: Annotated[float, typer.Option(min=0.01, help="--backend synthetic only: tokens per second per request.")] = 20.0,  # noqa: E501
    synthetic_prefill_tokens_per_s: Annotated[float, typer.Option(min=0, help="--backend synthetic only: prompt tokens not in its modelled cache cost 1/this seconds each before the first token (0: free).")] = 0.0,  # noqa: E501
    script: Annotated[str | None, typer.Option(help="--backend synthetic only (tests): a JSON file of scripted replies, each the `reply` of the first rule whose `when` is in the prompt.")] = None,  # noqa: E501
    metrics_public: Annotated[bool, typer.Option(help="Serve /metrics without the token (a scraper on a trusted network).")] = False,  # noqa: E501
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,  # noqa: E501
) -> None:
    """llm-worker-rbee: serves one model, streaming tokens over SSE."""
    configure_logging("worker")
    problem: str | None = None
    rpc_servers = [server.strip() for server in (rpc or "").split(",") if server.strip()]
    split: list[float] = []
    devices = len(gpu_indices(device)) or 1
    if tensor_split is not None:
        try:
            split = parse_split(tensor_split)
        except ValueError as error:
            problem = f"--tensor-split: {error}."
    if problem is None and (bad := check_device(device)):
        problem = bad
    elif problem is None and split and len(split) != devices + len(rpc_servers):
        problem = (f"--tensor-split needs {devices + len(rpc_servers)} shares: one for each device "
                   "of --device, then one for each --rpc server.")
    elif problem is None and any(not re.fullmatch(r"127\.0\.0\.1:[0-9]{1,5}", s) for s in rpc_servers):
        problem = "--rpc servers must be 127.0.0.1:<port>: tunnels, never an open network."
    elif backend not in ("auto", "llama-cpp", "mlx", "synthetic"):
        problem = "--backend must be auto, llama-cpp, mlx or synthetic."
    elif model_name is not None and not re.fullmatch(r"[A-Za-z0-9._:/@+=-]{1,512}", model_name):
        problem = "--model-name may hold letters, digits and . _ : / @ + = -."
    elif not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", worker_id):
        problem = "--worker-id may hold letters, digits, '.', '_' and '-'."
    elif spin_wait not in ("full", "short"):
        problem = "--spin-wait must be full or short."
    if problem:
        typer.echo(f"llm-worker-rbee: error: {problem}", err=True)
        raise typer.Exit(2)
    for key, value in gpu_environment(device).items():
        os.environ.setdefault(key, value)  # (its hive sets both; this is for a worker run by hand)
    if spin_wait == "short" and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
        os.environ["GOMP_SPINCOUNT"] = SHORT_SPIN  # read when llama.cpp's OpenMP runtime loads
    die_with_parent()
    # Every thread from here on (trio's, where grammars are parsed; the engine's) gets a stack with
    # room for the deepest grammar `grammar_limits` lets through, many times over.
    threading.stack_size(THREAD_STACK_BYTES)
    try:
        token = load_token(None)
        require_token_for_bind(host, token, "llm-worker-rbee")
    except ConfigError as error:
        exit_on_config_error(error, "llm-worker-rbee")
    config = WorkerConfig(
        model=model, model_name=model_name, device=device, backend=backend, host=host, port=port,
        worker_id=worker_id,
        hive_id=hive_id, queen_url=queen_url, threads=threads, ctx=ctx,
        slots=slots or auto_slots(device=device, backend=backend, ctx=ctx), cache_ram_mib=cache_ram,
        lifeline_fd=lifeline_fd, heartbeat_s=heartbeat_s, drain_s=drain_s, api_token=token,
        synthetic_tokens_per_s=synthetic_tokens_per_s, metrics_public=metrics_public, script=script,
        synthetic_prefill_tokens_per_s=synthetic_prefill_tokens_per_s,
        tensor_split=split, rpc=rpc_servers,
    )
    code = run_daemon(
        functools.partial(serve, config),
        component="llm-worker-rbee",
        on_ready=functools.partial(announce_ready, worker_id=worker_id),
    )
    raise typer.Exit(code)


def run() -> None:
    cli()


if __name__ == "__main__":
    run()
