"""Continuous batching on one copy of a GGUF model (llama.cpp's low-level API).

One model, one context with `slots` sequences, one engine thread. Each step
builds a single batch from every active sequence (a prompt chunk for a new
one, one token for each one that is generating), decodes it, samples every
sequence that asked for logits with its own sampler chain, and hands the
pieces to their requests. A request waits only for the next step boundary:
it is admitted as soon as a sequence is free, and a cancelled one frees its
sequence at the next step.

Each sequence keeps the tokens whose keys and values are in its part of the
cache. A new request takes the free sequence that shares the longest prefix
with its prompt and decodes only the rest (`tokens_cached`): a follow-up turn
of a conversation, or a shared system prompt.

A sequence about to be overwritten by a prompt it shares little with is first
saved, its keys and values copied out (`llama_state_seq_get_data`), into a
bounded host-RAM cache keyed by its tokens (`PromptCache`, `--cache-ram`). A
request takes the longest prefix among the free sequences and that cache; a
RAM hit is copied back into a sequence and only the rest is decoded
(`tokens_cached` counts it), as `llama-server --cache-ram` does.

The cache is not unified: every sequence has its own `ctx` positions
(`kv_unified = false`), so one long prompt cannot starve the others and a
sequence's attention never sees another's cells.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rbee_common.wire import TokenLogprob, TopLogprob

log = logging.getLogger("rbee.worker.engine")

OnPiece = Callable[[str, "list[TokenLogprob] | None"], None]
"""Called from the engine thread with each piece of text (and, when asked, the log-probabilities
of the tokens it came from); must not block."""


def decode_failure(status: int) -> str:
    """What a failed `llama_decode` means, for the requests it ends (llama.h's codes)."""
    if status == 1:
        return "llama.cpp found no room in the KV cache for this batch (llama_decode: 1)."
    if status == 2:
        return "llama.cpp aborted the batch (llama_decode: 2)."
    if status == -1:
        return "llama.cpp refused the batch as invalid (llama_decode: -1)."
    return (f"llama.cpp could not compute the batch (llama_decode: {status}): the device ran out of memory "
            "(on a GPU: CUDA out of memory) or failed.")


class EngineError(Exception):
    """llama.cpp could not decode a batch (out of memory, a broken context)."""


@dataclass(eq=False)
class Job:
    """One request's life in the engine."""

    tokens: list[int]
    """The prompt, tokenized."""
    max_tokens: int
    sampler: Any
    """A `llama_sampler` chain; the engine frees it when the job ends."""
    on_piece: OnPiece
    cancelled: threading.Event
    stops: list[str] = field(default_factory=list)
    logprobs: int | None = None
    """Report log-probabilities with this many alternatives (None: none)."""
    tag: list[int] = field(default_factory=list)
    """The prompt's prefix hashes (`rbee_common.prefixes`): what its sequence will hold."""
    # --- set by the engine ---
    produced: int = 0
    stop_sequence: str | None = None
    tokens_cached: int = 0
    tokens_restored: int = 0
    """Of `tokens_cached`, those that came back from the RAM cache."""
    reason: str = "length"
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    _seq: _Sequence | None = None
    _feed: list[int] = field(default_factory=list)
    """Prompt tokens still to decode."""
    _next: int | None = None
    """The token sampled last step, decoded this step."""
    _decoder: Any = None
    _matcher: Any = None
    _lp: list[TokenLogprob] = field(default_factory=list)
    """Log-probabilities of tokens whose text is still held back."""


@dataclass(eq=False)
class _Sequence:
    id: int
    cached: list[int] = field(default_factory=list)
    """Tokens whose keys and values are in the cache, position 0 onwards."""
    job: Job | None = None
    used: int = 0
    """When a job last took it (a count): of sequences sharing nothing, the least recent is reused."""
    tag: list[int] = field(default_factory=list)
    """The prefix hashes of the prompt it holds."""


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n > 64:  # long prompts: compare in numpy
        diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
        return int(diff[0]) if diff.size else n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


SAVE_MIN_TOKENS = 64
"""A sequence is saved to the RAM cache before it is overwritten only when at least this many of its
tokens would be lost: fewer cost less to decode again than to keep."""


@dataclass(eq=False)
class _Saved:
    tokens: list[int]
    data: Any
    """The sequence's state, as `llama_state_seq_get_data` wrote it (a ctypes byte array)."""
    size: int
    """The state's bytes (what `llama_state_seq_set_data` reads)."""
    tag: list[int] = field(default_factory=list)
    held: int = 0
    """The room it takes in RAM (a save allots a little more than the state)."""


SPARES = 2
"""Buffers of dropped entries kept for the next saves: writing into pages already mapped costs a
quarter of what fresh ones do (3 ms against 12 for 600 tokens of the built-in model)."""


class PromptCache:
    """Saved sequences in host RAM, least recently used first out, at most `limit` bytes (the
    spare buffers included)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: list[_Saved] = []
        """Least recently used first."""
        self.bytes = 0
        self._spares: list[Any] = []
        """Buffers no entry holds any more (ctypes byte arrays), the oldest first."""
        self._spare_bytes = 0
        self.saved = self.restored = self.evicted = 0
        self.restored_tokens = 0

    def best(self, tokens: list[int]) -> tuple[_Saved | None, int]:
        """The entry sharing the longest prefix with `tokens`, and that prefix's length."""
        best, length = None, 0
        for entry in self.entries:
            n = common_prefix(entry.tokens, tokens)
            if n > length:
                best, length = entry, n
        return best, length

    def add(self, tokens: list[int], data: Any, size: int, tag: list[int] | None = None) -> bool:
        """Keep a state; False when it is larger than the whole cache. An entry whose tokens are a
        prefix of these is replaced; if an entry already holds these tokens, nothing is added."""
        held = ctypes.sizeof(data) if isinstance(data, ctypes.Array) else size  # the room it takes
        if held > self.limit:
            return False
        for entry in list(self.entries):
            shared = common_prefix(entry.tokens, tokens)
            if shared == len(tokens):  # held already (a longer or equal entry)
                self.entries.remove(entry)
                self.entries.append(entry)
                self.release(data)
                return True
            if shared == len(entry.tokens):
                self._drop(entry)
        while self.entries and self.bytes + held > self.limit:
            self._drop(self.entries[0])
            self.evicted += 1
        self.entries.append(_Saved(list(tokens), data, size, list(tag or []), held))
        self.bytes += held
        self._trim()
        self.saved += 1
        return True

    def take(self, entry: _Saved) -> None:
        """Remove an entry that goes back into a sequence (saved again when that is overwritten);
        its buffer is the caller's until it `release`s it."""
        self.entries.remove(entry)
        self.bytes -= entry.held
        self.restored += 1

    def _drop(self, entry: _Saved) -> None:
        self.entries.remove(entry)
        self.bytes -= entry.held
        self.release(entry.data)

    def release(self, data: Any) -> None:
        """Keep a buffer no entry holds for a later save, while there is room."""
        if not isinstance(data, ctypes.Array):
            return
        self._spares.append(data)
        self._spare_bytes += ctypes.sizeof(data)
        self._trim()

    def _trim(self) -> None:
        while self._spares and (len(self._spares) > SPARES or self.bytes + self._spare_bytes > self.limit):
            self._spare_bytes -= ctypes.sizeof(self._spares.pop(0))

    def buffer(self, size: int) -> Any:
        """A buffer of at least `size` bytes: the smallest spare that is large enough, or a new one."""
        fits = [b for b in self._spares if ctypes.sizeof(b) >= size]
        if not fits:
            return (ctypes.c_uint8 * size)()
        chosen = min(fits, key=ctypes.sizeof)
        self._spares.remove(chosen)
        self._spare_bytes -= ctypes.sizeof(chosen)
        return chosen


class Engine:
    """The step loop over a loaded llama.cpp context (owned by the caller)."""

    def __init__(self, lib: Any, ctx: Any, vocab: Any, *, slots: int, seq_ctx: int, n_batch: int,
                 matcher: Callable[[list[str]], Any], cache_bytes: int = 0) -> None:
        self._lib = lib
        self._ctx = ctx
        self._vocab = vocab
        self._n_vocab = lib.llama_vocab_n_tokens(vocab)
        self._memory = lib.llama_get_memory(ctx)
        self._seq_ctx = seq_ctx
        self._n_batch = n_batch
        self._matcher = matcher
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self._sequences = [_Sequence(i) for i in range(slots)]
        self.cache = PromptCache(cache_bytes)
        self._taken = 0
        self._state_per_token = 0.0
        """Bytes of a saved sequence per token, as the last save measured it."""
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._thread = threading.Thread(target=self._loop, name="rbee-engine", daemon=True)
        self._thread.start()

    # --- from request threads ---

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closing:
                raise EngineError("The engine is stopping.")
            self._waiting.append(job)
            self._wake.notify()

    def close(self) -> None:
        """Stop the loop: running and waiting jobs end as cancelled. The caller frees the context."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._lib.llama_batch_free(self._batch)

    def held_prefixes(self, limit: int) -> list[int]:
        """The prefix hashes the sequences and the RAM cache hold, most recently used first (read
        from another thread: a snapshot, good to a step)."""
        tags = [s.tag for s in sorted(self._sequences, key=lambda s: -s.used)]
        tags += [entry.tag for entry in reversed(list(self.cache.entries))]
        seen: dict[int, None] = {}
        for tag in tags:
            for value in reversed(tag):  # a prompt's longest prefix first
                seen.setdefault(value, None)
                if len(seen) >= limit:
                    return list(seen)
        return list(seen)

    # --- the engine thread ---

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closing and not self._waiting and not self._running():
                        self._wake.wait()
                    if self._closing:
                        break
                    self._admit()
                try:
                    self._step()
                except EngineError as error:  # this batch failed: its jobs end, the cache starts over
                    log.error("decoding failed: %s", error)
                    for job in self._running():
                        self._finish(job, "error", error=error)
                    self._lib.llama_memory_clear(self._memory, True)
                    for seq in self._sequences:
                        seq.cached.clear()
                        seq.tag = []  # it holds no prefix: heartbeats stop saying it does
        except BaseException as error:  # a bug: every job learns of it, and the worker is broken
            log.error("the engine stopped", exc_info=error)
            for job in [*self._running(), *self._waiting]:
                self._finish(job, "error", error=error)
            self._waiting.clear()
            return
        for job in [*self._running(), *self._waiting]:
            self._finish(job, "cancelled")
        self._waiting.clear()

    def _running(self) -> list[Job]:
        return [s.job for s in self._sequences if s.job is not None]

    def _admit(self) -> None:
        """Give each waiting job the free sequence whose cache shares most of its prompt."""
        free = [s for s in self._sequences if s.job is None]
        while self._waiting and free:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
                continue
            try:
                self._admit_one(job, free)
            except BaseException as error:  # a bug: this job learns of it too, not only those running
                self._finish(job, "error", error=error)
                raise

    def _admit_one(self, job: Job, free: list[_Sequence]) -> None:
        """Give `job` a sequence: a free one with its prefix, or with the RAM cache's."""
        seq = max(free, key=lambda s: (common_prefix(s.cached, job.tokens), -s.used))
        in_slot = common_prefix(seq.cached, job.tokens)
        if in_slot < min(SAVE_MIN_TOKENS, len(job.tokens) // 2):  # a chat template's few tokens:
            seq = min(free, key=lambda s: s.used)  # keep the longer prompts, take the oldest
            in_slot = common_prefix(seq.cached, job.tokens)
        saved, in_ram = self.cache.best(job.tokens) if self.cache.entries else (None, 0)
        restored = saved is not None and in_ram > in_slot
        if saved is not None and restored:  # the prefix is in RAM: back into a sequence
            seq = min(free, key=lambda s: s.used)
            self.cache.take(saved)  # out first: saving the sequence it replaces may evict
            self._save(seq, 0)
            self._restore(seq, saved)
            self.cache.release(saved.data)
        else:
            self._save(seq, in_slot)
        free.remove(seq)
        # Decode at least the prompt's last token: its logits pick the first new token.
        keep = min(common_prefix(seq.cached, job.tokens), len(job.tokens) - 1)
        self._lib.llama_memory_seq_rm(self._memory, seq.id, keep, -1)
        del seq.cached[keep:]
        if restored:
            self.cache.restored_tokens += keep
            job.tokens_restored = keep
        self._taken += 1
        seq.used = self._taken
        seq.tag = job.tag
        seq.job, job._seq = job, seq
        job.tokens_cached = keep
        job._feed = job.tokens[keep:]
        job._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        job._matcher = self._matcher(job.stops)

    def _save(self, seq: _Sequence, keep: int) -> None:
        """Copy a sequence's state into the RAM cache before all but `keep` of its tokens go."""
        if not self.cache.limit or len(seq.cached) - keep < SAVE_MIN_TOKENS:
            return
        lib = self._lib
        written = 0
        if self._state_per_token:  # one pass, into room for what the last save took a token
            data = self.cache.buffer(int(len(seq.cached) * self._state_per_token * 1.1) + (1 << 16))
            written = lib.llama_state_seq_get_data(self._ctx, data, ctypes.sizeof(data), seq.id)
        if not written:  # the first save, or that was too little room: llama.cpp measures it first
            size = lib.llama_state_seq_get_size(self._ctx, seq.id)
            if size <= 0 or size > self.cache.limit:
                return
            data = self.cache.buffer(size)
            written = lib.llama_state_seq_get_data(self._ctx, data, ctypes.sizeof(data), seq.id)
        if written > 0:
            self._state_per_token = written / max(len(seq.cached), 1)
            self.cache.add(seq.cached, data, written, seq.tag)

    def _restore(self, seq: _Sequence, saved: _Saved) -> None:
        """Put a saved state (taken out of the cache) into `seq`, whose own tokens went to the
        cache or were not worth keeping."""
        self._lib.llama_memory_seq_rm(self._memory, seq.id, -1, -1)
        read = self._lib.llama_state_seq_set_data(self._ctx, saved.data, saved.size, seq.id)
        if read == 0:  # llama.cpp could not place it: the sequence starts empty
            log.warning("a saved prompt of %d tokens could not be restored", len(saved.tokens))
            self._lib.llama_memory_seq_rm(self._memory, seq.id, -1, -1)
            seq.cached = []
            return
        seq.cached = list(saved.tokens)

    def _step(self) -> None:
        lib, batch = self._lib, self._batch
        n = 0
        outputs: list[tuple[_Sequence, Job, int]] = []
        added: list[tuple[_Sequence, list[int]]] = []
        for job in self._running():
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
        # Generating sequences first (one token each), then prompt chunks in what room is left.
        busy = [(s, s.job) for s in self._sequences if s.job is not None]
        for seq, job in sorted(busy, key=lambda pair: pair[1]._next is None):
            if job._next is not None:
                chunk = [job._next]
            else:
                room = self._n_batch - n
                if room <= 0:
                    continue
                chunk = job._feed[:room]
                del job._feed[:room]
            last = not job._feed
            pos = len(seq.cached)
            for k, token in enumerate(chunk):
                batch.token[n] = token
                batch.pos[n] = pos + k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.id
                wants = last and k == len(chunk) - 1
                batch.logits[n] = wants
                if wants:
                    outputs.append((seq, job, n))
                n += 1
            added.append((seq, chunk))
        if n == 0:
            return
        batch.n_tokens = n
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(decode_failure(status))
        for seq, chunk in added:
            seq.cached.extend(chunk)
        for seq, job, index in outputs:
            token = lib.llama_sampler_sample(job.sampler, self._ctx, index)
            job._next = None
            if lib.llama_vocab_is_eog(self._vocab, token):
                self._finish(job, "stop", flush=True)
                continue
            job.produced += 1
            piece = self._piece(token)
            if job.logprobs is not None:
                job._lp.append(self._logprob(index, token, piece, job.logprobs))
            text, stopped = job._matcher.feed(job._decoder.decode(piece))
            if text:
                job.on_piece(text, self._take_lp(job))
            if stopped:
                job.stop_sequence = job._matcher.matched
                self._finish(job, "stop")
            elif job.produced >= job.max_tokens or len(seq.cached) + 1 >= self._seq_ctx:
                self._finish(job, "length", flush=True)
            else:
                job._next = token

    @staticmethod
    def _take_lp(job: Job) -> list[TokenLogprob] | None:
        if job.logprobs is None:
            return None
        taken, job._lp = job._lp, []
        return taken

    def _logprob(self, index: int, token: int, piece: bytes, top: int) -> TokenLogprob:
        """The chosen token's log-probability under the model's raw distribution, and the `top`
        likeliest tokens' (before sampling's filters, as OpenAI and llama-server report them)."""
        raw = self._lib.llama_get_logits_ith(self._ctx, index)
        logits = np.ctypeslib.as_array(raw, shape=(self._n_vocab,))
        peak = float(logits.max())
        log_total = peak + float(np.log(np.exp(logits - peak).sum()))
        best: list[TopLogprob] = []
        if top:
            ids = np.argpartition(logits, -top)[-top:]
            for other in sorted(ids.tolist(), key=lambda i: -float(logits[i])):
                raw = self._piece(other)
                best.append(TopLogprob(raw.decode(errors="replace"), float(logits[other]) - log_total,
                                       list(raw)))
        return TokenLogprob(piece.decode(errors="replace"), float(logits[token]) - log_total, list(piece),
                            best)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = self._piece_buf
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:max(n, 0)]
        return piece

    def _finish(
        self, job: Job, reason: str, *, flush: bool = False, error: BaseException | None = None,
    ) -> None:
        """End `job`; `flush` emits what the decoder and the stop matcher still hold back."""
        if job.finished.is_set():
            return
        if flush:
            text, stopped = job._matcher.feed(job._decoder.decode(b"", final=True))
            tail = text if stopped else text + job._matcher.flush()
            if stopped:
                job.stop_sequence = job._matcher.matched
            if tail:
                job.on_piece(tail, self._take_lp(job))
        if job._seq is not None:
            job._seq.job = None
            job._seq = None
        job.reason, job.error = reason, error
        self._lib.llama_sampler_free(job.sampler)
        job.finished.set()
