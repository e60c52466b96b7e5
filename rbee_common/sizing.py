"""How many sequences a worker serves, and what its memory costs (hive and worker agree).

A llama.cpp worker holds one copy of the weights and one KV cache of
`slots x ctx` tokens. The hive's preflight counts exactly that; the cache's
size per token comes from the GGUF header (layers, KV heads, head size).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

GPU_SLOTS = 4
"""Sequences on a GPU: a few KV caches cost little next to the weights."""
CPU_KV_TOKENS = 32768
"""On a CPU, the slots share a cache of 32k tokens: 4 slots of 8,192 tokens (the built-in model's
context), 1 of 32,768."""
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


AUTO_CTX_MAX = 32768
"""The most context an automatic choice gives a sequence: what agents' prompts (10-25k tokens)
need, as Ollama gives on a large GPU; `worker_ctx` goes further."""
AUTO_CTX_MIN = 2048
"""Below this the memory check refuses the worker rather than shrink its context further."""
UNKNOWN_CTX = 4096
"""A model whose files do not say what it was trained for gets this (Ollama's default)."""
MEMORY_SHARE = {"VRAM": 0.9, "RAM": 0.5}
"""Of the free memory, what an automatic context may fill: most of a GPU's, half of the RAM
(the machine runs other things, and other workers)."""


def trained_context(fmt: str, path: str | Path) -> int | None:
    """The context the model was trained for: the GGUF's `<arch>.context_length`, or an MLX
    model's `max_position_embeddings`; None when the files do not say."""
    try:
        if fmt == "mlx":
            value = json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings")
        else:
            meta = gguf_metadata(path)
            value = meta.get(f"{meta.get('general.architecture')}.context_length")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value > 0 else None


class ContextChoice(NamedTuple):
    ctx: int
    slots: int
    why: str
    """For the spawn's narration: "the model's trained context", "what fits in …"."""


def choose_context(
    *, trained: int | None, slots: int | None, device: str, backend: str, model_bytes: int,
    kv_per_token: int, free_bytes: int, memory: str,
) -> ContextChoice:
    """Each sequence's context when `worker_ctx` is 0 (automatic): what the model was trained for
    (at most AUTO_CTX_MAX), halved while its worker would not fit in its share of the free memory,
    down to AUTO_CTX_MIN (below that the preflight's memory check says what is missing). `slots`
    None is automatic, which on a CPU depends on the context."""
    ctx = min(trained or UNKNOWN_CTX, AUTO_CTX_MAX)
    why = "the model's trained context" if trained and trained <= AUTO_CTX_MAX else (
        f"the most chosen automatically (the model was trained for {trained})" if trained
        else "a default: the model does not say what it was trained for")
    budget = int(free_bytes * MEMORY_SHARE.get(memory, 0.5))

    def fits(ctx: int) -> tuple[bool, int]:
        n = slots or auto_slots(device=device, backend=backend, ctx=ctx)
        return worker_bytes(model_bytes, kv_per_token=kv_per_token, slots=n, ctx=ctx) <= budget, n

    ok, n = fits(ctx)
    if not ok and ctx > AUTO_CTX_MIN:
        while not ok and ctx > AUTO_CTX_MIN:
            ctx = max(AUTO_CTX_MIN, 1 << ((ctx - 1).bit_length() - 1))
            ok, n = fits(ctx)
        share = f"{MEMORY_SHARE.get(memory, 0.5):.0%}"
        why = f"what fits in {share} of the free {memory} ({free_bytes / 1e6:.0f} MB)"
    return ContextChoice(ctx, n, why)


AUTO_CACHE_RAM_MAX = 8 << 30
"""The most host RAM an automatic prompt cache takes (llama-server's --cache-ram default)."""


def auto_cache_ram(left_bytes: int) -> int:
    """An automatic prompt cache: a quarter of the RAM a worker's preflight leaves, at most 8 GiB,
    in whole MiB."""
    return min(AUTO_CACHE_RAM_MAX, max(left_bytes, 0) // 4) >> 20 << 20


def worker_bytes(model_bytes: int, *, kv_per_token: int, slots: int, ctx: int) -> int:
    """Memory a llama.cpp worker needs: one copy of the weights (and compute slack) plus the cache."""
    return int(model_bytes * COMPUTE_OVERHEAD) + kv_per_token * slots * ctx
