"""What every backend is (`Backend`), and the pieces they share.

A backend turns an `InferenceRequest` into text pieces and returns the counts
(`Generated`). What a backend can do is data, `Backend.features`; how it
runs is its `run`: in a worker thread for blocking code (`InThread`:
llama.cpp, MLX), as a trio task for the synthetic backend.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import trio

from rbee_common.errors import ContextLengthExceeded, ValidationFailed
from rbee_common.wire import EmbedRequest, InferenceRequest, StopReason, TokenLogprob

OnToken = Callable[[str, "list[TokenLogprob] | None"], None]

FEATURES = ("response_format", "tools", "logprobs", "logit_bias", "embeddings")
"""What a request may ask that a backend may not do; `Backend.features` names what it does."""


class EmbeddingCancelled(Exception):
    """The client of an embedding request left; the backend stopped between two batches."""


class Generated(msgspec.Struct, frozen=True):
    tokens_in: int
    tokens_out: int
    stop_reason: StopReason
    tokens_cached: int = 0
    """Prompt tokens whose keys and values were already in the cache."""
    stop_sequence: str | None = None
    tokens_restored: int = 0
    """Of `tokens_cached`, those restored from the host-RAM prompt cache."""


@dataclass(frozen=True)
class Output:
    """Where one request's pieces go, and how it is stopped."""

    on_token: OnToken
    """From a generating thread: queued for trio (`run_sync_soon`)."""
    send: Callable[[str], Awaitable[bool]]
    """From trio: False when nobody listens any more."""
    cancelled: threading.Event
    """Set when the request is to stop: checked between tokens."""
    woken: trio.Event
    """The same, for code in trio that waits."""
    threads: trio.CapacityLimiter
    """The worker threads generation may take."""


class Backend(Protocol):
    name: str
    ctx: int
    features: frozenset[str]
    """Which of `FEATURES` it does (JSON grammars, tool calls, logprobs, embeddings)."""
    info: dict[str, Any]
    """What the model file says: architecture, vocab size, eos token, quantization."""

    async def run(self, request: InferenceRequest, out: Output) -> Generated:
        """Generate the request's answer into `out`."""
        ...

    def embed(self, request: EmbedRequest, cancelled: threading.Event) -> tuple[list[list[float]], int]:
        """Vectors and the tokens they took; stops with `EmbeddingCancelled` between batches once
        `cancelled` is set."""
        ...

    def count_tokens(self, request: InferenceRequest) -> int:
        """The prompt's tokens as `generate` would feed them (chat template and tools applied)."""
        ...

    def held_prefixes(self) -> list[int]:
        """The prompt prefixes its cache holds, the most recently used first (for the heartbeat)."""
        ...


class InThread:
    """`run` for a backend whose `generate` blocks: a worker thread runs it. Every piece is queued
    for trio (`run_sync_soon`) before the thread's result, so all are sent before the end."""

    def generate(self, request: InferenceRequest, on_token: OnToken, cancelled: threading.Event) -> Generated:
        raise NotImplementedError

    async def run(self, request: InferenceRequest, out: Output) -> Generated:
        return await trio.to_thread.run_sync(
            functools.partial(self.generate, request, out.on_token, out.cancelled), limiter=out.threads)


def token_budget(request: InferenceRequest, prompt_tokens: int, ctx: int, trained: int | None = None) -> int:
    """Tokens the request may generate in a sequence of `ctx`: `max_tokens` is a ceiling, not a
    promise (generation stops when the context is full, as llama-server and Ollama do); a prompt
    that leaves no room at all is refused, before any token, with the model's own context
    (`trained`, from its GGUF) when known, so that the queen can find a worker with room."""
    if prompt_tokens >= ctx:
        raise ContextLengthExceeded(
            f"The prompt is {prompt_tokens} tokens; the context here is {ctx}.",
            details={"field": "messages" if request.messages else "prompt", "prompt_tokens": prompt_tokens,
                     "context_tokens": ctx, **({"model_context_tokens": trained} if trained else {})},
            hint="Shorten the prompt, or serve the model with a longer context ([hive] worker_ctx).",
        )
    if not prompt_tokens:
        raise ValidationFailed("The prompt is empty.", details={"field": "prompt"})
    return min(request.max_tokens or ctx, ctx - prompt_tokens)


class StopMatcher:
    """Finds stop sequences across token boundaries, holding back a partial match."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._pending = ""
        self.matched: str | None = None
        """The stop sequence that was met."""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop sequence was met."""
        text = self._pending + piece
        hits = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            at = min(hits)
            self.matched = next(stop for stop in self._stops if text.find(stop) == at)
            return text[:at], True
        hold = max(
            (n for stop in self._stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
             if stop.startswith(text[-n:])),
            default=0,
        )
        self._pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text
