"""GPUs as llama.cpp sees them: which build can use them, which card is which, how a model splits.

- A llama-cpp-python built without GPU offload runs a `GPU-0` worker on the CPU, silently; the
  hive and the worker ask `llama_supports_gpu_offload()` first and refuse with the fix.
- NVML numbers cards in PCI bus order; CUDA numbers them fastest first unless
  `CUDA_DEVICE_ORDER=PCI_BUS_ID`. Every GPU worker gets that, so `GPU-1` is the card the hive
  measured.
- A worker may take several GPUs (`GPU-0,GPU-1`): llama.cpp splits the layers in the shares we
  give it (`tensor_split`), here in proportion to each card's free memory.
"""

from __future__ import annotations

import functools
import re

LLAMA_CPP_VERSION = "0.3.36"
CUDA_BUILD = (f'CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on" pip install --force-reinstall --no-deps '
              f"--no-cache-dir llama-cpp-python=={LLAMA_CPP_VERSION}")
"""The command that gives a machine with the CUDA toolkit a llama-cpp-python that offloads."""

DEVICE_PATTERN = r"CPU-0|METAL-0|GPU-[0-9]{1,3}(?:,GPU-[0-9]{1,3}){0,15}"
"""One device, or several GPUs of one machine that one worker splits a model over."""


def gpu_indices(device: str) -> list[int]:
    """`GPU-0,GPU-2` -> [0, 2]; [] for CPU-0 or METAL-0."""
    return [int(part.removeprefix("GPU-")) for part in device.split(",") if part.startswith("GPU-")]


def check_device(device: str) -> str | None:
    """What is wrong with a `--device` value, or None."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        return "--device must be CPU-0, METAL-0, GPU-<n>, or GPUs of this machine as GPU-0,GPU-1."
    indices = gpu_indices(device)
    if len(set(indices)) != len(indices):
        return "--device names a GPU twice."
    return None


def gpu_environment(device: str) -> dict[str, str]:
    """What a worker on `device` needs in its environment: CUDA numbers the cards as NVML does, and
    sees only its own."""
    indices = gpu_indices(device)
    if not indices:
        return {}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, indices))}


def shares(free_bytes: list[int]) -> list[float]:
    """Each card's share of the model, in proportion to its free memory (rounded to 1/1000, summing
    to 1)."""
    total = sum(max(free, 0) for free in free_bytes)
    if not free_bytes or total <= 0:
        return [1 / len(free_bytes)] * len(free_bytes) if free_bytes else []
    rounded = [round(max(free, 0) / total, 3) for free in free_bytes]
    rounded[-1] = round(1 - sum(rounded[:-1]), 3)
    return rounded


def format_split(split: list[float]) -> str:
    return ",".join(f"{share:g}" for share in split)


def parse_split(text: str) -> list[float]:
    """`0.6,0.4` -> [0.6, 0.4]; ValueError unless every share is positive."""
    split = [float(part) for part in text.split(",") if part.strip()]
    if not split or any(not share > 0 for share in split):
        raise ValueError("shares must be positive numbers, as 0.6,0.4")
    return split


@functools.cache
def llama_gpu_offload() -> bool | None:
    """Whether the installed llama-cpp-python can use an NVIDIA GPU (it has ggml's CUDA backend); None
    when it is not installed.

    Imports llama_cpp (its library loads, about 0.1 s): asked only where there is a GPU."""
    try:
        from rbee_common.ggml import Ggml

        return Ggml().has_backend("CUDA")  # (llama_supports_gpu_offload() is true for RPC alone)
    except (ImportError, OSError):
        return None


def cpu_build_problem(device: str) -> str:
    return (f"llama-cpp-python on this machine was built without GPU offload: a worker on {device} "
            "would run on the CPU.")


@functools.cache
def llama_rpc() -> bool:
    """Whether the installed llama-cpp-python has llama.cpp's RPC backend (GGML_RPC)."""
    try:
        import llama_cpp
    except (ImportError, OSError):
        return False
    return bool(llama_cpp.llama_supports_rpc())
