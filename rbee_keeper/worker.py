"""`rbee-keeper worker …`: start, list and stop workers on the hives."""

from __future__ import annotations

from typing import Annotated

import typer

from rbee_common.wire import WorkerGet, WorkerList, WorkerScale, WorkerSpawn, WorkerStop
from rbee_keeper import lifecycle
from rbee_keeper.common import (
    HiveOption,
    KeepQueen,
    build,
    handles_errors,
    keeper_context,
    print_fields,
    print_table,
    run_with_queen,
)
from rbee_keeper.output import say

worker_cli = typer.Typer(no_args_is_help=True, help="Start, list and stop workers on the hives.")


@worker_cli.command("spawn")
@handles_errors
def worker_spawn(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="A model in the hive's catalog, or file:///abs/path.gguf.")],
    device: Annotated[str, typer.Option(help="CPU-0, GPU-<n> or METAL-0; several GPUs of the hive as GPU-0,GPU-1 (the layers split by free VRAM).")] = "CPU-0",  # noqa: E501
    hive: HiveOption = "localhost",
    helper: Annotated[list[str] | None, typer.Option("--helper", help="Another hive that holds part of the layers (llama.cpp RPC through SSH tunnels the queen opens; shares follow free memory). Repeat for more.")] = None,  # noqa: E501
    backend: Annotated[str, typer.Option(help="auto, llama-cpp or mlx.")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: the hive's free cores).")] = None,  # noqa: E501
    keep_queen: KeepQueen = False,
    replicas: Annotated[int | None, typer.Option(min=1, max=64, help="At least this many workers of the model across the fleet, placed by the queen (a hive with the file, a GPU, the most free memory; one a device); --hive, --device, --backend and --threads do not apply.")] = None,  # noqa: E501
) -> None:
    """Start a worker for a model on a hive, with its progress (or, with --replicas, as many as
    asked over the fleet)."""
    c = keeper_context(ctx)
    if not keep_queen and not lifecycle.is_healthy(c.queen_url):
        say("No queen runs: one starts for this command, and the worker stops with it at the end.")
        say("To keep the worker: `rbee-keeper queen start` first, or pass --keep-queen.")
    if replicas is not None:
        scaled = run_with_queen(c, build(WorkerScale, model=model, replicas=replicas), keep_queen=keep_queen)
        rows = [[w.worker_id, w.model, w.hive_id, w.device, w.url, str(w.pid)] for w in scaled]
        print_table(rows, ["WORKER", "MODEL", "HIVE", "DEVICE", "URL", "PID"])
        return
    operation = build(WorkerSpawn, model=model, device=device, hive_id=hive, backend=backend, threads=threads,
                      helpers=helper or [])
    worker = run_with_queen(c, operation, keep_queen=keep_queen)
    helped = f"  (part of its layers on {', '.join(worker.helpers)})" if worker.helpers else ""
    print(f"{worker.worker_id}  {worker.model}  {worker.device}  {worker.url}  (pid {worker.pid}){helped}")


@worker_cli.command("list")
@handles_errors
def worker_list(ctx: typer.Context, hive: HiveOption = "localhost") -> None:
    """The workers of a hive."""
    workers = run_with_queen(keeper_context(ctx), build(WorkerList, hive_id=hive))
    rows = [[w.worker_id, w.model, w.device, w.state, f"{w.slots_busy}/{w.slots_total}", str(w.ctx or "-"),
             w.url, str(w.pid)] for w in workers]
    print_table(rows, ["WORKER", "MODEL", "DEVICE", "STATE", "BUSY", "CTX", "URL", "PID"])


@worker_cli.command("get")
@handles_errors
def worker_get(ctx: typer.Context, worker_id: str, hive: HiveOption = "localhost") -> None:
    """One worker of a hive."""
    print_fields(run_with_queen(keeper_context(ctx), build(WorkerGet, worker_id=worker_id, hive_id=hive)))


@worker_cli.command("stop")
@handles_errors
def worker_stop(ctx: typer.Context, worker_id: str, hive: HiveOption = "localhost") -> None:
    """Stop a worker (graceful, then SIGKILL after the hive's deadline)."""
    worker = run_with_queen(keeper_context(ctx), build(WorkerStop, worker_id=worker_id, hive_id=hive))
    print(f"{worker.worker_id} stopped")
