"""What this machine has: CPU cores and RAM, NVIDIA GPUs through NVML, Metal, disk.

No GPU, no NVIDIA driver or no `nvidia-ml-py` simply means no GPU entries;
detection never fails the hive (DESIGN §4, hive issue).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import msgspec
import psutil

from rbee_common.gpus import CUDA_BUILD, cpu_build_problem, llama_gpu_offload
from rbee_common.wire import Device

log = logging.getLogger("rbee.hive.devices")


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def cpu_device() -> Device:
    memory = psutil.virtual_memory()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return Device(
        id="CPU-0", kind="cpu", name=name, memory_total_bytes=memory.total,
        memory_free_bytes=memory.available, cores=physical_cores(), logical_cores=psutil.cpu_count() or 1,
    )


def nvidia_devices() -> list[Device]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:  # no driver, no GPU: a normal CPU machine
        log.debug("NVML unavailable: %s", error)
        return []
    devices = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name: Any = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            devices.append(Device(
                id=f"GPU-{index}", kind="cuda", name=name.decode() if isinstance(name, bytes) else str(name),
                memory_total_bytes=int(memory.total), memory_free_bytes=int(memory.free),
                compute_capability=f"{major}.{minor}",
            ))
    except pynvml.NVMLError as error:
        log.warning("NVML failed while listing GPUs: %s", error)
    finally:
        pynvml.nvmlShutdown()
    return devices


def metal_devices() -> list[Device]:
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return []
    memory = psutil.virtual_memory()  # unified memory
    return [Device(id="METAL-0", kind="metal", name="Apple Silicon GPU", memory_total_bytes=memory.total,
                   memory_free_bytes=memory.available)]


def detect_devices() -> list[Device]:
    return [cpu_device(), *nvidia_devices(), *metal_devices()]


def mark_unusable(devices: list[Device]) -> list[Device]:
    """The devices, each CUDA GPU marked unusable when llama-cpp-python here cannot offload to it."""
    if not any(d.kind == "cuda" for d in devices) or llama_gpu_offload() is not False:
        return devices
    why = f"{cpu_build_problem('a GPU')} Fix: {CUDA_BUILD}"
    return [msgspec.structs.replace(d, unusable=why) if d.kind == "cuda" else d for d in devices]


def available_backends() -> list[str]:
    """Backends whose libraries this machine can import (without importing them)."""
    found = []
    if importlib.util.find_spec("llama_cpp") is not None:
        found.append("llama-cpp")
    if importlib.util.find_spec("mlx_lm") is not None and importlib.util.find_spec("mlx") is not None:
        found.append("mlx")
    return found


def disk_free(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free
