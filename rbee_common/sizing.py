"""How many sequences a worker serves, and what its memory costs (hive and worker agree).

A llama.cpp worker holds one copy of the weights and one KV cache of
`slots x ctx` tokens. The hive's preflight counts exactly that; the cache's
size per token comes from the GGUF header (layers, KV heads, head size).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

GPU_SLOTS = 4
"""Sequences on a GPU: a few KV caches cost little next to the weights."""
CPU_KV_TOKENS = 8192
"""On a CPU, the slots share the cache of one 8k context: 4 slots of 2,048 tokens, 1 of 8,192."""
MAX_AUTO_SLOTS = 4
KV_BYTES_PER_VALUE = 2
"""The cache's keys and values are f16 (llama.cpp's default)."""
COMPUTE_OVERHEAD = 1.2
"""Compute buffers and allocator slack on top of the weights (the hive's old 1.2 x size)."""


def auto_slots(*, device: str, backend: str, ctx: int) -> int:
    """Slots when none are asked for (the synthetic backend, for tests, takes 1 unless told)."""
    if backend == "synthetic":
        return 1
    if device.startswith(("GPU-", "METAL-")):
        return GPU_SLOTS
    return max(1, min(MAX_AUTO_SLOTS, CPU_KV_TOKENS // ctx))


# --- the GGUF header ------------------------------------------------------------------------

_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


class GgufError(ValueError):
    pass


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GgufError("the file ends inside its header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> bytes:
    n = _read(f, "<Q")
    if n > 1 << 24:
        raise GgufError("a header string is implausibly long")
    data = f.read(n)
    if len(data) != n:
        raise GgufError("the file ends inside its header")
    return data


def _value(f: BinaryIO, kind: int, keep: bool) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f).decode("utf-8", errors="replace")
    if kind == _ARRAY:
        item, n = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS and not keep:  # skip a long array (the vocabulary's scores) in one seek
            f.seek(struct.calcsize(_SCALARS[item]) * n, 1)
            return None
        if keep:
            return [_value(f, item, keep) for _ in range(n)]
        for _ in range(n):
            if item == _STRING:
                f.seek(_read(f, "<Q"), 1)
            else:
                _value(f, item, keep)
        return None
    raise GgufError(f"unknown value type {kind}")


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF header's scalar and string values (arrays are skipped)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GgufError("not a GGUF file")
        version = _read(f, "<I")
        if version < 2:
            raise GgufError(f"GGUF version {version} is too old")
        _read(f, "<Q")  # tensors
        count = _read(f, "<Q")
        meta: dict[str, Any] = {}
        for _ in range(count):
            key = _string(f).decode("utf-8", errors="replace")
            kind = _read(f, "<I")
            value = _value(f, kind, keep=False)
            if kind != _ARRAY:
                meta[key] = value
        return meta


def kv_bytes_per_token(meta: dict[str, Any]) -> int:
    """Keys and values of one token in every layer; 0 when the header does not say."""
    arch = meta.get("general.architecture")

    def number(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        return value if isinstance(value, int) and value > 0 else 0

    layers, heads, embd = number("block_count"), number("attention.head_count"), number("embedding_length")
    if not (layers and heads and embd):
        return 0
    kv_heads = number("attention.head_count_kv", heads)
    key_len = number("attention.key_length", embd // heads)
    value_len = number("attention.value_length", embd // heads)
    return layers * kv_heads * (key_len + value_len) * KV_BYTES_PER_VALUE


def worker_bytes(model_bytes: int, *, kv_per_token: int, slots: int, ctx: int) -> int:
    """Memory a llama.cpp worker needs: one copy of the weights (and compute slack) plus the cache."""
    return int(model_bytes * COMPUTE_OVERHEAD) + kv_per_token * slots * ctx
