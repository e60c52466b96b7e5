"""A stand-in for nvidia-ml-py's `pynvml` (not ours), for tests that need GPUs, or their absence,
on any machine. A daemon started with this folder first on `PYTHONPATH` reads its cards from
`$RBEE_STANDIN_NVML`: `absent` makes `nvmlInit` fail as it does without a driver; otherwise a JSON
list of cards, each `{"name": str, "total": bytes, "free": bytes}`.

Only the calls `rbee_hive.devices` makes exist here; anything else is an AttributeError, so a
new call in our code cannot pass silently against the stand-in.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any


class NVMLError(Exception):
    pass


def _cards() -> list[dict[str, Any]]:
    spec = os.environ.get("RBEE_STANDIN_NVML", "absent")
    if spec == "absent":
        raise NVMLError("NVML Shared Library Not Found")
    cards: list[dict[str, Any]] = json.loads(spec)
    return cards


def nvmlInit() -> None:
    _cards()


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_cards())


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if not 0 <= index < len(_cards()):
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetName(handle: int) -> bytes:
    return str(_cards()[handle]["name"]).encode()


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    card = _cards()[handle]
    return SimpleNamespace(total=card["total"], free=card["free"], used=card["total"] - card["free"])


def nvmlDeviceGetCudaComputeCapability(handle: int) -> tuple[int, int]:
    return (8, 6)
