"""The synthetic backend: tokens at a fixed rate and no model. For benchmarks and tests only.

It lets `bench/scale.py` hold thousands of streams through one queen on a
laptop, and lets tests stream without loading weights. Its text is the words
`w0 w1 w2 ...`; it never pretends to be a model (its heartbeats say
`backend: synthetic`). Each request is a trio task, not a thread.

With a script (`--script FILE`, a test double for the model's text: the agent
CLI tests), each answer is the `reply` of the first rule whose `when` (if any)
occurs in the prompt: `[{"when": "rbee-ok", "reply": "It printed rbee-ok."},
{"reply": "<tool_call>...</tool_call>"}]`. Replies stream a word at a time.

Its cache is modelled on the llama.cpp engine's: a word is a token, each of
its `slots` sequences keeps the words of its last prompt and answer, and a
request takes the free sequence that shares the longest prefix with its
prompt (the least recently used when none shares much); `tokens_cached` says
how many words that was. With a prefill rate (`--synthetic-prefill-tokens-per-s`)
each word not cached costs its share of a second before the first token, and
as on a real device the worker prefills one prompt at a time (prompts that
arrive together wait for each other's prefill), so routing can be measured on
a fleet without the CPU that real prefill takes. So what a client sees
of prompt caching (`cached_tokens`, `cache_read_input_tokens`) can be tested
with prompts far longer than the built-in model's context.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from rbee_common.errors import ContextLengthExceeded, ValidationFailed
from rbee_common.prefixes import MAX_HELD, prompt_blocks
from rbee_common.wire import EmbedRequest, InferenceRequest, StopReason
from rbee_worker.backends.base import Generated, Output
from rbee_worker.engine import SAVE_MIN_TOKENS

DEFAULT_TOKENS = 16
"""Tokens per answer when the request gives no max_tokens."""
MODELLED_SEQUENCES = 64
"""Sequences whose cache is modelled; beyond them (a benchmark's thousands of slots) a request
finds nothing cached, and the search for a prefix stays cheap."""


def _prompt_text(request: InferenceRequest) -> str:
    return request.prompt or "\n".join(m.content for m in request.messages or [])


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reply: str
    when: str | None = None
    """Text the prompt must hold for this rule to answer (None: any prompt)."""


def load_script(path: str | Path) -> list[Rule]:
    return msgspec.json.decode(Path(path).read_bytes(), type=list[Rule])


class SyntheticBackend:
    name = "synthetic"
    features: frozenset[str] = frozenset()

    def __init__(
        self, *, tokens_per_s: float, ctx: int, slots: int = 1, script: list[Rule] | None = None,
        prefill_tokens_per_s: float = 0.0,
    ) -> None:
        self.interval = 1.0 / tokens_per_s
        self.prefill_s = 1.0 / prefill_tokens_per_s if prefill_tokens_per_s else 0.0
        """What each prompt token not in the modelled cache costs before the first token."""
        self.ctx = ctx
        self.script = script
        self._sequences: list[list[str]] = [[] for _ in range(min(max(slots, 1), MODELLED_SEQUENCES))]
        """Each sequence's cached words (the modelled KV cache)."""
        self._busy: set[int] = set()
        self._tags: list[list[int]] = [[] for _ in self._sequences]
        """Each sequence's prompt prefix hashes (`rbee_common.prefixes`), for the heartbeat."""
        self._last_used = [0] * len(self._sequences)
        """When each sequence was last taken (a count): of those sharing nothing, the least recent
        is overwritten."""
        self._taken = 0
        self._prefill_free_at = 0.0
        """When the modelled prefill compute is next free (trio's clock): prompts queue for it."""
        if script is not None:  # its scripted text may hold calls, which the queen reads as for a model
            self.features = frozenset({"tools"})
        self.info: dict[str, Any] = {"architecture": "synthetic", "tokens_per_s": tokens_per_s}

    def _reply(self, request: InferenceRequest) -> list[str] | None:
        """The scripted answer's pieces, or None for filler words."""
        if self.script is None:
            return None
        text = _prompt_text(request)
        rule = next((r for r in self.script if r.when is None or r.when in text), None)
        return re.findall(r"\S*\s*", rule.reply)[:-1] or [""] if rule is not None else [""]

    def held_prefixes(self) -> list[int]:
        """What its modelled sequences hold, the most recently used first."""
        seen: dict[int, None] = {}
        for i in sorted(range(len(self._tags)), key=lambda i: -self._last_used[i]):
            for value in reversed(self._tags[i]):
                seen.setdefault(value, None)
        return list(seen)[:MAX_HELD]

    def embed(self, request: EmbedRequest, cancelled: threading.Event) -> tuple[list[list[float]], int]:
        """Never called: `features` has no embeddings, so the worker refuses such a request first."""
        raise ValidationFailed("The synthetic backend does not compute embeddings.",
                               details={"field": "input"})

    def count_tokens(self, request: InferenceRequest) -> int:
        """A word a token: the synthetic backend's modelled tokenizer."""
        return max(len(_prompt_text(request).split()), 1)

    def _take(self, words: list[str]) -> tuple[int, int]:
        """The free sequence sharing the longest prefix with `words`, and that prefix's length;
        (-1, 0) when every modelled sequence is taken."""
        free = [i for i in range(len(self._sequences)) if i not in self._busy]
        if not free:
            return -1, 0

        def shared(i: int) -> int:
            cached = self._sequences[i]
            n = 0
            for a, b in zip(cached, words, strict=False):
                if a != b:
                    break
                n += 1
            return n

        best = max(free, key=lambda i: (shared(i), -self._last_used[i]))
        if shared(best) < min(SAVE_MIN_TOKENS, len(words) // 2):  # a few words: keep longer prompts
            best = min(free, key=lambda i: self._last_used[i])
        self._busy.add(best)
        self._taken += 1
        self._last_used[best] = self._taken
        return best, min(shared(best), len(words) - 1)  # as llama.cpp, the last word is decoded again

    async def run(self, request: InferenceRequest, out: Output) -> Generated:
        return await self.agenerate(request, out.send, out.cancelled, out.woken)

    async def agenerate(
        self, request: InferenceRequest, on_token: Callable[[str], Awaitable[bool]],
        cancelled: threading.Event, woken: trio.Event,
    ) -> Generated:
        """Send `max_tokens` words, one per interval; `on_token` returns False when nobody listens.
        A cancellation (`woken`) ends it at once, not at the next token."""
        tokens_in = self.count_tokens(request)
        if tokens_in >= self.ctx:
            raise ContextLengthExceeded(
                f"The prompt is {tokens_in} tokens; the context here is {self.ctx}.",
                details={"field": "messages" if request.messages else "prompt", "prompt_tokens": tokens_in,
                         "context_tokens": self.ctx})
        scripted = self._reply(request)
        wanted = min(request.max_tokens or DEFAULT_TOKENS, self.ctx - tokens_in)
        if scripted is not None:
            wanted = min(len(scripted), self.ctx - tokens_in)
        words = _prompt_text(request).split() or [""]
        sequence, cached = self._take(words)
        if sequence >= 0:  # it holds the prompt from now (a heartbeat may come before the end)
            self._tags[sequence] = [block.hash for block in prompt_blocks(request)]
        produced = 0
        reason: StopReason = "length" if scripted is None else "stop"
        next_at = max(trio.current_time(), self._prefill_free_at) + self.prefill_s * (tokens_in - cached)
        if self.prefill_s:
            self._prefill_free_at = next_at
        pieces: list[str] = []
        try:
            while produced < wanted:
                next_at += self.interval
                with trio.move_on_at(next_at):
                    await woken.wait()
                piece = f"w{produced} " if scripted is None else scripted[produced]
                if cancelled.is_set() or not await on_token(piece):
                    reason = "cancelled"
                    break
                pieces.append(piece)
                produced += 1
        finally:
            if sequence >= 0:
                self._sequences[sequence] = words + "".join(pieces).split()
                self._busy.discard(sequence)
        return Generated(tokens_in, produced, reason, tokens_cached=cached)
