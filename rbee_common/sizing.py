"""How many sequences a worker serves, and what its memory costs (hive and worker agree).

A llama.cpp worker holds one copy of the weights and one KV cache of
`slots x ctx` tokens. The hive's preflight counts exactly that; the cache's
size per token comes from the GGUF header (layers, KV heads, head size).
"""

from __future__ import annotations

import os
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


MAX_KEYS = 1 << 16
"""Key-value pairs in a header (a real model has a few dozen)."""
MAX_ARRAY_ITEMS = 1 << 24
"""Items in one header array (a vocabulary has up to a few hundred thousand)."""


def _skip(f: BinaryIO, size: int, end: int) -> None:
    if f.seek(size, 1) > end:
        raise GgufError("the file ends inside its header")


def _value(f: BinaryIO, kind: int, end: int) -> Any:
    """One value: a scalar or a string, or None for an array, which is skipped without recursion
    (an array of arrays, which llama.cpp does not read either, is refused)."""
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f).decode("utf-8", errors="replace")
    if kind != _ARRAY:
        raise GgufError(f"unknown value type {kind}")
    item, n = _read(f, "<I"), _read(f, "<Q")
    if n > MAX_ARRAY_ITEMS:
        raise GgufError(f"a header array has {n} items (at most {MAX_ARRAY_ITEMS})")
    if item in _SCALARS:  # a long array (the vocabulary's scores) in one seek
        _skip(f, struct.calcsize(_SCALARS[item]) * n, end)
    elif item == _STRING:
        for _ in range(n):
            _skip(f, _read(f, "<Q"), end)
    elif item == _ARRAY:
        raise GgufError("the header nests arrays in arrays")
    else:
        raise GgufError(f"unknown value type {item}")
    return None


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF header's scalar and string values (arrays are skipped); `GgufError` for a header
    that is cut short, malformed or over the limits above, whatever its content."""
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        if f.read(4) != b"GGUF":
            raise GgufError("not a GGUF file")
        version = _read(f, "<I")
        if version < 2:
            raise GgufError(f"GGUF version {version} is too old")
        _read(f, "<Q")  # tensors
        count = _read(f, "<Q")
        if count > MAX_KEYS:
            raise GgufError(f"the header has {count} keys (at most {MAX_KEYS})")
        meta: dict[str, Any] = {}
        for _ in range(count):
            key = _string(f).decode("utf-8", errors="replace")
            kind = _read(f, "<I")
            value = _value(f, kind, end)
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
