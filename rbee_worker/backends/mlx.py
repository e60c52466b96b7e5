"""MLX (`mlx-lm`) on an MLX model directory: Metal on Apple Silicon, `mlx[cpu]` elsewhere."""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any

from rbee_common.errors import BackendUnavailable, ModelLoadFailed, ValidationFailed
from rbee_common.wire import EmbedRequest, InferenceRequest, StopReason
from rbee_worker.backends.base import Generated, InThread, OnToken, StopMatcher, token_budget
from rbee_worker.models import ResolvedModel

log = logging.getLogger("rbee.worker.backend")


class _MlxJob:
    def __init__(self, tokens: list[int], max_tokens: int, sampler: Any, on_piece: OnToken,
                 cancelled: threading.Event, stops: list[str], detokenizer: Any, seed: int | None) -> None:
        self.tokens, self.max_tokens, self.sampler, self.seed = tokens, max_tokens, sampler, seed
        self.on_piece, self.cancelled = on_piece, cancelled
        self.matcher = StopMatcher(stops)
        self.detokenizer = detokenizer
        self.produced = 0
        self.stop_sequence: str | None = None
        self.reason: StopReason = "length"
        self.error: BaseException | None = None
        self.finished = threading.Event()


class MlxBackend(InThread):
    """`mlx-lm` on an MLX model directory: Metal on Apple Silicon, `mlx[cpu]` elsewhere.

    Continuous batching through mlx-lm's `BatchGenerator`: one engine thread
    (MLX evaluation is not documented as thread-safe) steps every active
    sequence together and admits new ones between steps. Each sequence has its
    own sampler; a `seed` seeds MLX's one random state when its request starts,
    so sampled (not greedy) output is reproducible only when it runs alone.
    There is no prompt-cache reuse across requests here.
    """

    name = "mlx"
    features: frozenset[str] = frozenset()
    """No grammars (JSON mode, forced tool calls), logprobs or embeddings here yet."""

    def __init__(self, model: ResolvedModel, *, device: str, ctx: int, slots: int = 1) -> None:
        try:
            import mlx.core as mx
            from mlx_lm import load
            from mlx_lm.generate import BatchGenerator
        except ImportError as error:
            raise BackendUnavailable(
                "mlx-lm is not installed.", hint="pip install mlx-lm (and mlx[cpu] on Linux)"
            ) from error
        if device.startswith("GPU-"):
            raise BackendUnavailable(
                "MLX runs on METAL-0 or CPU-0, not on CUDA devices.", hint="Use --backend llama-cpp."
            )
        mx.set_default_device(mx.cpu if device == "CPU-0" else mx.gpu)
        self.ctx = ctx
        self._mx = mx
        try:
            loaded = load(model.path)
        except (ValueError, RuntimeError, OSError, KeyError) as error:
            raise ModelLoadFailed(
                f"mlx-lm could not load the model directory: {type(error).__name__}.",
                hint="Check config.json, weights and tokenizer files; mlx-lm must know the model type.",
            ) from error
        self._model: Any = loaded[0]
        self._tokenizer: Any = loaded[1]
        config = json.loads((Path(model.path) / "config.json").read_text())
        bits = (config.get("quantization") or {}).get("bits")
        self.info = {
            "architecture": config.get("model_type"), "vocab_size": config.get("vocab_size"),
            "eos_token_id": getattr(self._tokenizer, "eos_token_id", None),
            "quantization": f"{bits}-bit" if bits else "none",
            "context_length": config.get("max_position_embeddings"),
        }
        eos = sorted(getattr(self._tokenizer, "eos_token_ids", None) or [self._tokenizer.eos_token_id])
        self._generator: Any = BatchGenerator(
            self._model, stop_tokens=[[token] for token in eos],
            completion_batch_size=slots, prefill_batch_size=slots,
        )
        self._waiting: deque[_MlxJob] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="rbee-mlx-engine", daemon=True)
        self._thread.start()

    def held_prefixes(self) -> list[int]:
        """None: MLX batches without reusing a cached prefix."""
        return []

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._generator.close()

    def _prompt(self, request: InferenceRequest) -> list[int]:
        tokenizer = self._tokenizer
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            if getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                return list(ids["input_ids"] if isinstance(ids, dict) else ids)
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return list(tokenizer.encode(text))
        return list(tokenizer.encode(request.prompt or ""))

    def generate(
        self, request: InferenceRequest, on_token: OnToken, cancelled: threading.Event
    ) -> Generated:
        from mlx_lm.sample_utils import make_sampler

        tokens = self._prompt(request)
        max_tokens = token_budget(request, len(tokens), self.ctx)
        sampler = make_sampler(temp=request.temperature, top_p=request.top_p, min_p=request.min_p,
                               top_k=request.top_k)
        job = _MlxJob(tokens, max_tokens, sampler, on_token,
                      cancelled, list(request.stop), self._tokenizer.detokenizer, request.seed)
        with self._wake:
            if self._closing:
                raise BackendUnavailable("The worker is stopping.")
            self._waiting.append(job)
            self._wake.notify()
        job.finished.wait()
        if job.error is not None:
            raise job.error
        return Generated(len(tokens), job.produced, job.reason, stop_sequence=job.stop_sequence)

    def count_tokens(self, request: InferenceRequest) -> int:
        return len(self._prompt(request))

    def embed(self, request: EmbedRequest, cancelled: threading.Event) -> tuple[list[list[float]], int]:
        raise ValidationFailed("The mlx backend does not compute embeddings.", details={"field": "input"},
                               hint="Serve a GGUF model on llama.cpp for embeddings.")

    # --- the engine thread ---

    def _loop(self) -> None:
        running: dict[int, _MlxJob] = {}
        try:
            while True:
                with self._wake:
                    while not self._closing and not self._waiting and not running:
                        self._wake.wait()
                    if self._closing:
                        break
                    new = list(self._waiting)
                    self._waiting.clear()
                for job in new:
                    if job.seed is not None:
                        self._mx.random.seed(job.seed)
                    (uid,) = self._generator.insert([job.tokens], [job.max_tokens], samplers=[job.sampler])
                    running[uid] = job
                gone = [uid for uid, job in running.items() if job.cancelled.is_set()]
                if gone:
                    self._generator.remove(gone)
                    for uid in gone:
                        self._finish(running.pop(uid), "cancelled")
                if running:
                    self._step(running)
        except Exception as error:  # a bug or a broken model: every job learns of it
            log.error("the MLX engine stopped", exc_info=error)
            for job in [*running.values(), *self._waiting]:
                job.error = error
                job.finished.set()
            return
        for job in [*running.values(), *self._waiting]:
            self._finish(job, "cancelled")

    def _step(self, running: dict[int, _MlxJob]) -> None:
        for response in self._generator.next_generated():
            job = running.get(response.uid)
            if job is None:
                continue
            if response.finish_reason == "stop":  # an end-of-sequence token: not text
                self._finish(running.pop(response.uid), "stop", flush=True)
                continue
            job.produced += 1
            job.detokenizer.add_token(response.token)
            text, stopped = job.matcher.feed(job.detokenizer.last_segment)
            if text:
                job.on_piece(text, None)
            if stopped:
                job.stop_sequence = job.matcher.matched
                self._generator.remove([response.uid])
                self._finish(running.pop(response.uid), "stop")
            elif response.finish_reason is not None:
                self._finish(running.pop(response.uid), "length", flush=True)

    @staticmethod
    def _finish(job: _MlxJob, reason: StopReason, *, flush: bool = False) -> None:
        if flush:
            job.detokenizer.finalize()
            text, stopped = job.matcher.feed(job.detokenizer.last_segment)
            tail = text if stopped else text + job.matcher.flush()
            if stopped:
                job.stop_sequence = job.matcher.matched
            if tail:
                job.on_piece(tail, None)
        job.reason = reason
        job.finished.set()
