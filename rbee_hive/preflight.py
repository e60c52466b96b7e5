"""Before a worker starts: is the model there, the device, the backend, the memory, the threads?

Pure but for what it reads of the machine (devices, free memory, the model's
GGUF header): each refusal names the problem and the fix (DESIGN §4).
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import psutil

from rbee_common.builtin import BUILTIN_MODELS, builtin_model_path
from rbee_common.config import HiveSettings
from rbee_common.errors import (
    BackendUnavailable,
    DeviceNotFound,
    InsufficientCpu,
    InsufficientRam,
    InsufficientVram,
    ModelNotFound,
    ModelPathNotAllowed,
    ValidationFailed,
    WorkerBinaryNotFound,
)
from rbee_common.ggml import RPC_BUILD
from rbee_common.gpus import CUDA_BUILD, cpu_build_problem, llama_gpu_offload, llama_rpc, shares
from rbee_common.sizing import (
    UNKNOWN_CTX,
    GgufError,
    auto_cache_ram,
    auto_slots,
    choose_context,
    gguf_metadata,
    kv_bytes_per_token,
    trained_context,
    worker_bytes,
)
from rbee_common.wire import Device, WorkerSpawn
from rbee_hive.catalog import Catalog, check_reference
from rbee_hive.devices import available_backends, detect_devices


class Preflight(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    model_arg: str
    backend: str
    threads: int
    required_bytes: int
    available_bytes: int
    memory: str
    slots: int = 1
    ctx: int = 2048
    """Each sequence's context, in tokens."""
    ctx_why: str = ""
    """Where that context comes from, for the spawn's narration."""
    cache_ram_mib: int = 0
    """Host RAM for the worker's prompt cache (llama.cpp), counted in `required_bytes` on a CPU."""
    tensor_split: list[float] = []
    """A worker over several GPUs: each one's share of the layers, in proportion to its free VRAM."""




def worker_command(settings: HiveSettings) -> list[str]:
    if settings.worker_binary:
        return [settings.worker_binary]
    beside = Path(sys.executable).parent / "llm-worker-rbee"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "rbee_worker"]


def resolve_model(settings: HiveSettings, catalog: Catalog, ref: str) -> tuple[str, str, str, int]:
    """(name reported by the worker, path or built-in name, format, size in bytes)."""
    check_reference(ref)
    entry = catalog.find(ref)
    if entry is not None:
        model_arg = entry.id if entry.provider == "builtin" else entry.path
        return entry.id, model_arg, entry.format, entry.size_bytes
    if ref.startswith("file://"):
        path = confined(settings, catalog, Path(ref.removeprefix("file://")))
        if path.is_file() and path.suffix == ".gguf":
            return ref, str(path), "gguf", path.stat().st_size
        if path.is_dir() and (path / "config.json").is_file():
            size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
            return ref, str(path), "mlx", size
    raise ModelNotFound(
        "That model is not on this hive.",
        hint=f"Download it first: rbee-keeper model download {ref} --hive {settings.hive_id} (an hf: "
             "reference), or give file:///abs/path.gguf.",
    )

def model_roots(settings: HiveSettings, catalog: Catalog) -> list[Path]:
    roots = [catalog.root, *(Path(root).expanduser() for root in settings.model_roots)]
    builtin = builtin_model_path("smollm2-135m")
    return roots + ([builtin.parent] if builtin is not None else [])

def confined(settings: HiveSettings, catalog: Catalog, path: Path) -> Path:
    """A `file://` path, once it resolves (symlinks followed) inside a model root.

    Checked before the path is opened, and answered the same whether it
    exists or not: a client cannot use a hive to open or probe other files.
    """
    resolved = path.resolve() if path.is_absolute() else None
    roots = [root.resolve() for root in model_roots(settings, catalog)]
    if resolved is None or not any(resolved.is_relative_to(root) for root in roots):
        raise ModelPathNotAllowed(
            "file:// models must be inside this hive's model folders.",
            hint="Put the file in the hive's catalog folder, or add its folder to [hive] model_roots "
                 "on the hive.",
        )
    return resolved

def preflight(
    settings: HiveSettings, catalog: Catalog, op: WorkerSpawn, *, cpu_budget: tuple[int, int]
) -> Preflight:
    """Check the model, device, backend, memory and threads (`cpu_budget`: the threads CPU workers may
    use together, and those they use now). Blocking (NVML, disk): call it in a thread."""
    command = worker_command(settings)
    if not Path(command[0]).exists():
        raise WorkerBinaryNotFound(
            f"The worker program was not found at {command[0]}.",
            hint="Install rbee on this machine, or fix [hive] worker_binary.",
        )
    if op.backend == "synthetic" or (op.backend == "auto" and settings.synthetic_backend):
        return _synthetic(settings, op)
    name, model_arg, fmt, size = resolve_model(settings, catalog, op.model)
    chosen = _devices(op.device)
    device = chosen[0]
    backends = available_backends()
    backend = op.backend if op.backend != "auto" else ("mlx" if fmt == "mlx" else "llama-cpp")
    problem = None
    if backend not in backends:
        problem = f"The {backend} backend is not installed on this hive."
    elif backend == "mlx" and op.device.startswith("GPU-"):
        problem = "MLX runs on METAL-0 or CPU-0, not on CUDA GPUs."
    elif (backend == "mlx") != (fmt == "mlx"):
        problem = f"The {backend} backend cannot serve a {fmt.upper()} model."
    if problem:
        raise BackendUnavailable(
            problem, details={"available_backends": backends},
            hint=f"Available here: {', '.join(backends) or 'none'}.",
        )
    if op.rpc and backend != "llama-cpp":
        raise BackendUnavailable(f"Only llama.cpp splits a model over hives, not {backend}.")
    if op.rpc and not llama_rpc():
        raise BackendUnavailable(
            "llama-cpp-python on this hive was built without the RPC backend: it cannot use other "
            "hives' devices.", hint=f"On this hive: {RPC_BUILD}")
    kv_per_token, trained = 0, trained_context(fmt, model_arg) if fmt == "mlx" else None
    if fmt == "gguf":
        try:
            path = builtin_model_path(model_arg) if model_arg in BUILTIN_MODELS else Path(model_arg)
            meta = gguf_metadata(path or model_arg)
            kv_per_token = kv_bytes_per_token(meta)
            trained = meta.get(f"{meta.get('general.architecture')}.context_length")
        except (OSError, GgufError):
            pass  # llama.cpp will say what is wrong with the file
    kind = "VRAM" if device.kind == "cuda" else "RAM"
    free = (sum(d.memory_free_bytes for d in chosen) if device.kind == "cuda"
            else psutil.virtual_memory().available)
    split = list(op.tensor_split) or (
        shares([d.memory_free_bytes for d in chosen]) if len(chosen) > 1 else [])
    if op.rpc and not split:
        split = [1.0] * (len(chosen) + len(op.rpc))  # even, as llama.cpp would
    if split and len(split) != len(chosen) + len(op.rpc):
        raise ValidationFailed(
            f"tensor_split needs {len(chosen) + len(op.rpc)} shares: one for each device of "
            f"{op.device}, then one for each RPC server.", details={"tensor_split": split})
    here = sum(split[:len(chosen)]) / sum(split) if op.rpc else 1.0  # the rest is on the RPC servers
    if op.ctx or settings.worker_ctx:
        ctx = op.ctx or settings.worker_ctx
        slots = settings.worker_slots or auto_slots(device=op.device, backend=backend, ctx=ctx)
        why = "the spawn asked for it" if op.ctx else "[hive] worker_ctx"
    else:
        ctx, slots, why = choose_context(
            trained=trained if isinstance(trained, int) and trained > 0 else None,
            slots=settings.worker_slots or None, device=op.device, backend=backend, model_bytes=size,
            kv_per_token=kv_per_token, free_bytes=free, memory=kind)
    needed = round(worker_bytes(size, kv_per_token=kv_per_token, slots=slots, ctx=ctx) * here)
    cache_ram = 0
    if backend == "llama-cpp":
        ram_left = psutil.virtual_memory().available - (needed if kind == "RAM" else 0)
        cache_ram = (settings.worker_cache_ram << 20 if settings.worker_cache_ram is not None
                     else auto_cache_ram(ram_left))
        if kind == "RAM":
            needed += cache_ram
    if needed > free:
        cache = f" and a cache of {slots} x {ctx} tokens" if kv_per_token else ""
        cache += f" and {cache_ram >> 20} MiB of prompt cache" if cache_ram and kind == "RAM" else ""
        raise (InsufficientVram if kind == "VRAM" else InsufficientRam)(
            f"Not enough {kind} on {op.device}: the model needs {needed / 1e6:.0f} MB "
            f"(its {size / 1e6:.0f} MB once{cache}) and {free / 1e6:.0f} MB are available.",
            details={"required_bytes": needed, "available_bytes": free, "device": op.device,
                     "model": name},
            hint="Stop a worker, pick a smaller quantization, use another device, or lower "
                 "[hive] worker_slots, worker_ctx or worker_cache_ram.",
        )
    for gpu, share in zip(chosen if device.kind == "cuda" else [], split, strict=False):
        share /= sum(split[:len(chosen)])
        if needed * share > gpu.memory_free_bytes:  # (shares follow free memory: only by rounding)
            raise InsufficientVram(
                f"Not enough VRAM on {gpu.id}: its share ({share:.0%}) of the model needs "
                f"{needed * share / 1e6:.0f} MB and {gpu.memory_free_bytes / 1e6:.0f} MB are free.",
                details={"required_bytes": int(needed * share),
                         "available_bytes": gpu.memory_free_bytes, "device": gpu.id, "model": name},
                hint="Stop a worker on it, or split over other GPUs.",
            )
    if backend == "llama-cpp" and device.kind == "cuda" and llama_gpu_offload() is False:
        raise BackendUnavailable(  # (after the memory check: that answer holds whatever the build)
            cpu_build_problem(op.device), details={"available_backends": backends, "device": op.device},
            hint=f"Build it with CUDA on this machine: {CUDA_BUILD} (or reinstall the hive from a "
                 "CUDA wheelhouse: rbee-keeper hive install <alias> --force); or use CPU-0.",
        )
    threads = op.threads or 1
    if op.device == "CPU-0":
        total, used = cpu_budget
        free_threads = total - used
        threads = op.threads or free_threads
        if threads < 1 or threads > free_threads:
            raise InsufficientCpu(
                f"CPU workers may use {total} threads together; {used} are taken, "
                f"{max(free_threads, 0)} are free.",
                details={"threads_total": total, "threads_used": used, "threads_requested": threads},
                hint="Stop a CPU worker, or ask for fewer threads.",
            )
    return Preflight(name=name, model_arg=model_arg, backend=backend, threads=threads,
                     required_bytes=needed, available_bytes=free, memory=kind, slots=slots, ctx=ctx,
                     ctx_why=why, cache_ram_mib=cache_ram >> 20, tensor_split=split)


def _devices(wanted: str) -> list[Device]:
    """The devices a spawn names (one, or several GPUs), as this machine has them."""
    devices = {d.id: d for d in detect_devices()}
    missing = [name for name in wanted.split(",") if name not in devices]
    if missing:
        raise DeviceNotFound(
            f"This hive has no device {', '.join(missing)}.",
            details={"devices": sorted(devices)}, hint=f"Use one of: {', '.join(sorted(devices))}.",
        )
    return [devices[name] for name in wanted.split(",")]

def _synthetic(settings: HiveSettings, op: WorkerSpawn) -> Preflight:
    """The synthetic backend (benchmarks and tests): no model to find, no memory to check."""
    if not settings.synthetic_backend:
        raise BackendUnavailable(
            "The synthetic backend is for benchmarks and tests, and is off on this hive.",
            details={"available_backends": available_backends()},
            hint="Set [hive] synthetic_backend = true on a test hive.",
        )
    check_reference(op.model)
    chosen = _devices(op.device) if "," in op.device else []
    return Preflight(name=op.model, model_arg=op.model, backend="synthetic", threads=1,
                     tensor_split=shares([d.memory_free_bytes for d in chosen]) if chosen else [],
                     required_bytes=0, available_bytes=psutil.virtual_memory().available, memory="RAM",
                     slots=settings.synthetic_slots, ctx=op.ctx or settings.worker_ctx or UNKNOWN_CTX,
                     ctx_why="[hive] worker_ctx" if op.ctx or settings.worker_ctx else
                     "a default: a synthetic model was trained for nothing")
