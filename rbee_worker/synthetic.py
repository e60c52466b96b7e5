"""The synthetic backend: tokens at a fixed rate and no model. For benchmarks and tests only.

It lets `bench/scale.py` hold thousands of streams through one queen on a
laptop, and lets tests stream without loading weights. Its text is the words
`w0 w1 w2 ...`; it never pretends to be a model (its heartbeats say
`backend: synthetic`). Each request is a trio task, not a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from rbee_common.wire import InferenceRequest, StopReason
from rbee_worker.backends import Generated

DEFAULT_TOKENS = 16
"""Tokens per answer when the request gives no max_tokens."""


class SyntheticBackend:
    name = "synthetic"
    features: frozenset[str] = frozenset()
    is_async = True

    def __init__(self, *, tokens_per_s: float, ctx: int) -> None:
        self.interval = 1.0 / tokens_per_s
        self.ctx = ctx
        self.info: dict[str, Any] = {"architecture": "synthetic", "tokens_per_s": tokens_per_s}

    async def agenerate(
        self, request: InferenceRequest, on_token: Callable[[str], Awaitable[bool]],
        cancelled: threading.Event, woken: trio.Event,
    ) -> Generated:
        """Send `max_tokens` words, one per interval; `on_token` returns False when nobody listens.
        A cancellation (`woken`) ends it at once, not at the next token."""
        text = request.prompt or " ".join(m.content for m in request.messages or [])
        tokens_in = max(len(text.split()), 1)
        wanted = min(request.max_tokens or DEFAULT_TOKENS, self.ctx - tokens_in)
        produced = 0
        reason: StopReason = "length"
        next_at = trio.current_time()
        while produced < wanted:
            next_at += self.interval
            with trio.move_on_at(next_at):
                await woken.wait()
            if cancelled.is_set() or not await on_token(f"w{produced} "):
                reason = "cancelled"
                break
            produced += 1
        return Generated(tokens_in, produced, reason)
