"""Inference backends: blocking code that runs in a worker thread.

A backend turns an `InferenceRequest` into text pieces through `on_token`,
checking `cancelled` between tokens, and returns the counts. llama.cpp
(`llama-cpp-python`) serves GGUF files on CPU and CUDA; MLX (`mlx-lm`) serves
MLX model directories. `--backend auto` picks MLX for an MLX model on
darwin/arm64, llama.cpp otherwise (DESIGN §4).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec

from rbee_common.errors import ServiceUnavailable, Unprocessable, ValidationFailed
from rbee_common.wire import InferenceRequest, StopReason
from rbee_worker.models import ResolvedModel

log = logging.getLogger("rbee.worker.backend")

OnToken = Callable[[str], None]


class Generated(msgspec.Struct, frozen=True):
    tokens_in: int
    tokens_out: int
    stop_reason: StopReason


class Backend(Protocol):
    name: str
    ctx: int
    json_mode: bool
    """Whether `response_format` json_object / json_schema can be enforced."""
    info: dict[str, Any]
    """What the model file says: architecture, vocab size, eos token, quantization."""

    def generate(
        self, request: InferenceRequest, on_token: OnToken, cancelled: threading.Event
    ) -> Generated: ...


class BackendUnavailable(ServiceUnavailable):
    code = "BACKEND_UNAVAILABLE"


class ModelLoadFailed(Unprocessable):
    code = "MODEL_LOAD_FAILED"


def choose_backend(model: ResolvedModel, requested: str) -> str:
    if requested != "auto":
        return requested
    # MLX models only run on MLX (natively on Apple Silicon, `mlx[cpu]` elsewhere).
    return "mlx" if model.format == "mlx" else "llama-cpp"


def load_backend(
    model: ResolvedModel, *, backend: str, device: str, threads: int, ctx: int, slots: int
) -> Backend:
    name = choose_backend(model, backend)
    if name == "llama-cpp":
        if model.format != "gguf":
            raise BackendUnavailable("llama.cpp serves GGUF files; this model is an MLX directory.")
        return LlamaCppBackend(model, device=device, threads=threads, ctx=ctx, slots=slots)
    if name == "mlx":
        if model.format != "mlx":
            raise BackendUnavailable(
                "MLX serves MLX model directories; this model is a GGUF file.",
                hint="Use --backend llama-cpp (or auto) for GGUF models.",
            )
        return MlxBackend(model, device=device, ctx=ctx)
    raise BackendUnavailable(f"Unknown backend {name}.", hint="Use auto, llama-cpp or mlx.")


# llama.cpp's `general.file_type` (enum llama_ftype) for the common quantizations.
GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    32: "BF16",
}

_FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class LlamaCppBackend:
    name = "llama-cpp"
    json_mode = True

    def __init__(self, model: ResolvedModel, *, device: str, threads: int, ctx: int, slots: int) -> None:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as error:
            raise BackendUnavailable(
                "llama-cpp-python is not installed.", hint="pip install llama-cpp-python"
            ) from error
        self.ctx = ctx
        gpu_layers = -1 if device.startswith("GPU-") else 0
        # One context per slot: a llama.cpp context serves one sequence at a time.
        self._pool: queue.Queue[Any] = queue.Queue()
        first = None
        for _ in range(slots):
            try:
                llm = Llama(
                    model_path=model.path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                    n_gpu_layers=gpu_layers, verbose=False,
                )
            except (ValueError, RuntimeError, OSError) as error:  # llama.cpp says little more
                raise ModelLoadFailed(
                    "llama.cpp could not load the model: not a valid GGUF file, or too little memory.",
                    hint="Check the file (a finished download, a GGUF this llama.cpp reads) and free memory.",
                ) from error
            first = first or llm
            self._pool.put(llm)
        if first is None:
            raise BackendUnavailable("A worker needs at least one slot.")
        meta = first.metadata
        file_type = int(meta.get("general.file_type", -1))
        self.info = {
            "architecture": meta.get("general.architecture"), "vocab_size": first.n_vocab(),
            "eos_token_id": first.token_eos(), "bos_token_id": first.token_bos(),
            "quantization": GGUF_FILE_TYPES.get(file_type, f"type {file_type}"),
            "context_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 0)) or None,
        }
        template = meta.get("tokenizer.chat_template") or _FALLBACK_TEMPLATE
        eos = first.detokenize([first.token_eos()], special=True).decode(errors="ignore")
        bos = first.detokenize([first.token_bos()], special=True).decode(errors="ignore")
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    def _prompt(self, request: InferenceRequest) -> tuple[str, list[str]]:
        if request.messages is not None:
            formatted = self._formatter(
                messages=[{"role": m.role, "content": m.content} for m in request.messages]  # type: ignore[misc]
            )
            stops = formatted.stop if isinstance(formatted.stop, list) else (
                [formatted.stop] if formatted.stop else []
            )
            return formatted.prompt, [stop for stop in stops if stop]  # "" would stop at once
        return request.prompt or "", []

    def _grammar(self, request: InferenceRequest) -> Any:
        fmt = request.response_format
        if fmt is None or fmt.type == "text":
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        if fmt.type == "json_schema" and fmt.json_schema:
            schema = fmt.json_schema.get("schema", fmt.json_schema)
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)

    def generate(
        self, request: InferenceRequest, on_token: OnToken, cancelled: threading.Event
    ) -> Generated:
        llm = self._pool.get()
        try:
            prompt, template_stops = self._prompt(request)
            tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            if len(tokens) >= self.ctx:
                raise ValidationFailed(
                    f"The prompt is {len(tokens)} tokens; this worker's context is {self.ctx}.",
                    details={"field": "messages" if request.messages else "prompt"},
                )
            max_tokens = min(request.max_tokens or self.ctx, self.ctx - len(tokens))
            stream = llm.create_completion(
                prompt=tokens, max_tokens=max_tokens, temperature=request.temperature,
                top_p=request.top_p, top_k=request.top_k, seed=request.seed,
                stop=[*template_stops, *request.stop] or None, grammar=self._grammar(request),
                stream=True,
            )
            produced = 0
            reason: StopReason = "length"
            try:
                for chunk in stream:
                    if cancelled.is_set():
                        reason = "cancelled"
                        break
                    choice = chunk["choices"][0]
                    if choice["text"]:
                        on_token(choice["text"])
                        produced += 1
                    if choice["finish_reason"]:
                        reason = "stop" if choice["finish_reason"] == "stop" else "length"
            finally:
                stream.close()
            return Generated(len(tokens), produced, reason)
        finally:
            self._pool.put(llm)


class StopMatcher:
    """Finds stop sequences across token boundaries, holding back a partial match."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop sequence was met."""
        text = self._pending + piece
        hits = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)], True
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


class MlxBackend:
    """`mlx-lm` on an MLX model directory: Metal on Apple Silicon, `mlx[cpu]` elsewhere.

    MLX evaluation is not documented as thread-safe, so generations take turns
    under one lock: with `--slots 2` the second request waits for the first.
    """

    name = "mlx"
    json_mode = False

    def __init__(self, model: ResolvedModel, *, device: str, ctx: int) -> None:
        try:
            import mlx.core as mx
            from mlx_lm import load
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
        self._lock = threading.Lock()

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
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        tokens = self._prompt(request)
        if len(tokens) >= self.ctx:
            raise ValidationFailed(
                f"The prompt is {len(tokens)} tokens; this worker's context is {self.ctx}.",
                details={"field": "messages" if request.messages else "prompt"},
            )
        sampler = make_sampler(temp=request.temperature, top_p=request.top_p, top_k=request.top_k)
        stops = StopMatcher(request.stop)
        produced = 0
        reason: StopReason = "length"
        with self._lock:
            if request.seed is not None:
                self._mx.random.seed(request.seed)
            stream = stream_generate(
                self._model, self._tokenizer, tokens,
                max_tokens=min(request.max_tokens or self.ctx, self.ctx - len(tokens)), sampler=sampler,
            )
            try:
                for response in stream:
                    if cancelled.is_set():
                        reason = "cancelled"
                        break
                    produced = response.generation_tokens
                    text, stopped = stops.feed(response.text)
                    if text:
                        on_token(text)
                    if stopped:
                        reason = "stop"
                        break
                    if response.finish_reason:
                        reason = "stop" if response.finish_reason == "stop" else "length"
                else:
                    if tail := stops.flush():
                        on_token(tail)
            finally:
                stream.close()
        return Generated(len(tokens), produced, reason)
