"""Inference backends behind one protocol (`base.Backend`): llama.cpp (`llama_cpp`) serves
GGUF files on CPU and CUDA; MLX (`mlx-lm`, `mlx`) serves MLX model directories; the
synthetic backend (`synthetic`) streams filler words with no model, for tests and benchmarks.
`--backend auto` picks MLX for an MLX model directory, llama.cpp otherwise (DESIGN §4).
"""

from __future__ import annotations

from rbee_common.errors import BackendUnavailable
from rbee_worker.backends.base import Backend
from rbee_worker.models import ResolvedModel


def choose_backend(model: ResolvedModel, requested: str) -> str:
    if requested != "auto":
        return requested
    # MLX models only run on MLX (natively on Apple Silicon, `mlx[cpu]` elsewhere).
    return "mlx" if model.format == "mlx" else "llama-cpp"


def load_backend(
    model: ResolvedModel, *, backend: str, device: str, threads: int, ctx: int, slots: int,
    cache_bytes: int = 0, split: list[float] | None = None, rpc: list[str] | None = None,
) -> Backend:
    name = choose_backend(model, backend)
    if name == "llama-cpp":
        from rbee_worker.backends.llama_cpp import LlamaCppBackend

        if model.format != "gguf":
            raise BackendUnavailable("llama.cpp serves GGUF files; this model is an MLX directory.")
        return LlamaCppBackend(model, device=device, threads=threads, ctx=ctx, slots=slots,
                               cache_bytes=cache_bytes, split=split or [], rpc=rpc or [])
    if rpc or len(split or []) > 1:
        raise BackendUnavailable(f"Only llama.cpp splits a model over devices, not {name}.")
    if name == "mlx":
        if model.format != "mlx":
            raise BackendUnavailable(
                "MLX serves MLX model directories; this model is a GGUF file.",
                hint="Use --backend llama-cpp (or auto) for GGUF models.",
            )
        from rbee_worker.backends.mlx import MlxBackend

        return MlxBackend(model, device=device, ctx=ctx, slots=slots)
    raise BackendUnavailable(f"Unknown backend {name}.", hint="Use auto, llama-cpp or mlx.")
