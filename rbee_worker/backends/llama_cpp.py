"""llama.cpp (`llama-cpp-python`) on a GGUF file: CPU, CUDA, and devices of other hives over RPC.
Blocking code: a worker thread runs `generate` (`base.InThread`), the engine (`engine.py`) steps
every active sequence together."""

from __future__ import annotations

import ctypes
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import jinja2
import numpy as np

from rbee_common import grammar_limits
from rbee_common.errors import (
    BackendUnavailable,
    LimitExceeded,
    ModelLoadFailed,
    RbeeError,
    ValidationFailed,
    WorkerFailed,
)
from rbee_common.ggml import Ggml
from rbee_common.gpus import CUDA_BUILD, cpu_build_problem, gpu_indices, llama_gpu_offload
from rbee_common.prefixes import MAX_HELD, prompt_blocks
from rbee_common.sizing import gguf_metadata
from rbee_common.wire import MAX_EMBED_TOKENS, EmbedRequest, InferenceRequest, StopReason
from rbee_worker import tools
from rbee_worker.backends.base import (
    FEATURES,
    EmbeddingCancelled,
    Generated,
    InThread,
    OnToken,
    StopMatcher,
    token_budget,
)
from rbee_worker.engine import Engine, EngineError, Job
from rbee_worker.models import ResolvedModel

log = logging.getLogger("rbee.worker.backend")

# llama.cpp's `general.file_type` (enum llama_ftype) for the common quantizations.
GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    32: "BF16",
}

N_BATCH = 512
"""Tokens in one decode step: every generating sequence's next token, then prompt chunks."""
PENALTY_LAST_N = 64
"""How many recent tokens the repetition penalties look at (llama.cpp's default)."""

_FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _metadata(lib: Any, model: Any) -> dict[str, str]:
    """The GGUF's key/value metadata, as strings."""
    meta: dict[str, str] = {}
    size = 1024
    buffer = ctypes.create_string_buffer(size)

    def read(fn: Callable[..., int], i: int) -> str:
        nonlocal size, buffer
        n = fn(model, i, buffer, size)
        if n >= size:
            size = n + 1
            buffer = ctypes.create_string_buffer(size)
            fn(model, i, buffer, size)
        return buffer.value.decode("utf-8", errors="replace")

    for i in range(lib.llama_model_meta_count(model)):
        meta[read(lib.llama_model_meta_key_by_index, i)] = read(lib.llama_model_meta_val_str_by_index, i)
    return meta


def _place_layers(
    lib: Any, model: ResolvedModel, params: Any, device: str, split: list[float], rpc: list[str],
) -> Any:
    """Set where the layers go: over this machine's GPUs and the RPC servers' devices, in `split`'s
    shares (this machine's devices first, then each server's). llama.cpp lists RPC devices before
    local GPUs; on a CPU, the layers it keeps are the first ones, and the rest are offloaded.
    Returns the float array `params` points into (keep it alive until the model has loaded)."""
    gpus = len(gpu_indices(device))
    local = max(gpus, 1)
    if not split:
        split = [1.0] * (local + len(rpc))
    counts = Ggml().add_rpc_servers(rpc) if rpc else []
    # a server lending several GPUs: its share, evenly over them (llama.cpp sees each one)
    remote = [share / count for share, count in zip(split[local:], counts, strict=True) for _ in range(count)]
    split = split[:local] + remote
    if len(split) == 1:
        return None
    total = sum(split)
    if gpus:
        order = split[gpus:] + split[:gpus]  # llama.cpp's order: RPC devices, then local GPUs
    else:  # the CPU keeps its share of the layers; the rest go to the RPC devices
        meta = gguf_metadata(model.path)
        blocks = int(meta.get(f"{meta.get('general.architecture')}.block_count") or 0)
        if blocks <= 0:
            raise BackendUnavailable("This GGUF does not say how many layers it has: it cannot be split.")
        params.n_gpu_layers = max(1, min(blocks, round(blocks * (1 - split[0] / total))))
        order = split[1:]
    shares = (ctypes.c_float * len(order))(*(share / sum(order) for share in order))
    params.tensor_split = ctypes.cast(shares, ctypes.POINTER(ctypes.c_float))
    return shares


class LlamaCppBackend(InThread):
    """llama.cpp with continuous batching: the weights once, one context, `slots` sequences.

    Requests share one engine thread (`rbee_worker.engine`); each `generate`
    call tokenizes in its own thread, hands the job over and waits for its end.
    """

    name = "llama-cpp"
    features = frozenset(FEATURES)

    def __init__(
        self, model: ResolvedModel, *, device: str, threads: int, ctx: int, slots: int, cache_bytes: int = 0,
        split: list[float] | None = None, rpc: list[str] | None = None,
    ) -> None:
        try:
            import llama_cpp as lib
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as error:
            raise BackendUnavailable(
                "llama-cpp-python is not installed.", hint="pip install llama-cpp-python"
            ) from error
        if slots < 1:
            raise BackendUnavailable("A worker needs at least one slot.")
        self.ctx = ctx
        self._lib = lib
        import llama_cpp._logger  # installs the log callback that reads this level

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter
        if device.startswith("GPU-") and not llama_gpu_offload():
            raise BackendUnavailable(f"{cpu_build_problem(device)}", hint=f"{CUDA_BUILD}; or use CPU-0.")
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = -1 if device.startswith("GPU-") else 0
        self._split = _place_layers(lib, model, model_params, device, split or [], rpc or [])
        self._model = lib.llama_model_load_from_file(model.path.encode(), model_params)
        if not self._model:
            vram = f" (on {device}: not enough VRAM, CUDA out of memory)" if device.startswith("GPU-") else ""
            raise ModelLoadFailed(
                f"llama.cpp could not load the model: not a valid GGUF file, or too little memory{vram}.",
                hint="Check the file (a finished download, a GGUF this llama.cpp reads) and free memory.",
            )
        context_params = lib.llama_context_default_params()
        context_params.n_ctx = ctx * slots
        context_params.n_seq_max = slots
        context_params.kv_unified = False  # each sequence its own `ctx` positions
        context_params.n_batch = context_params.n_ubatch = N_BATCH
        # Logits for at most one token per sequence a step: the output buffer is slots x vocab
        # floats, not n_batch x vocab (100 MB for a 49k vocabulary).
        context_params.n_outputs_max = slots
        context_params.n_threads = context_params.n_threads_batch = threads
        context_params.no_perf = True
        self._context = lib.llama_init_from_model(self._model, context_params)
        if not self._context:
            lib.llama_model_free(self._model)
            raise ModelLoadFailed(
                f"llama.cpp could not create a context of {slots} x {ctx} tokens: too little memory.",
                hint="Ask for fewer slots or a shorter context (--slots, --ctx).",
            )
        self._vocab = lib.llama_model_get_vocab(self._model)
        meta = _metadata(lib, self._model)
        file_type = int(meta.get("general.file_type", -1))
        architecture = meta.get("general.architecture")
        self.info = {
            "architecture": architecture, "vocab_size": lib.llama_vocab_n_tokens(self._vocab),
            "eos_token_id": lib.llama_vocab_eos(self._vocab),
            "bos_token_id": lib.llama_vocab_bos(self._vocab),
            "quantization": GGUF_FILE_TYPES.get(file_type, f"type {file_type}"),
            "context_length": int(meta.get(f"{architecture}.context_length", 0)) or None,
        }
        self._template = meta.get("tokenizer.chat_template") or _FALLBACK_TEMPLATE
        eos = self._piece(lib.llama_vocab_eos(self._vocab))
        bos = self._piece(lib.llama_vocab_bos(self._vocab))
        self._formatter = Jinja2ChatFormatter(template=self._template, eos_token=eos, bos_token=bos)
        pooling = meta.get(f"{architecture}.pooling_type")
        self.embedding_only = bool(pooling and pooling.isdigit() and int(pooling) > 0)
        """An embedding model (its GGUF names a pooling): it makes vectors, not text."""
        self._pooling = int(pooling) if self.embedding_only and pooling else 1
        """The GGUF's pooling for embeddings; mean (1) for a model that names none (a chat model)."""
        self.info["embedding_only"] = self.embedding_only
        self.info["embedding_length"] = lib.llama_model_n_embd(self._model)
        pooling_names = {1: "mean", 2: "cls", 3: "last", 4: "rank"}
        self.info["pooling"] = pooling_names.get(self._pooling, str(self._pooling))
        self._threads = threads
        self._embed_context: Any = None
        self._embed_lock = threading.Lock()
        self._engine = Engine(lib, self._context, self._vocab, slots=slots, seq_ctx=ctx, n_batch=N_BATCH,
                              matcher=StopMatcher, cache_bytes=cache_bytes)
        self.prompt_cache = self._engine.cache

    def held_prefixes(self) -> list[int]:
        """What its sequences and RAM cache hold, for the heartbeat."""
        return self._engine.held_prefixes(MAX_HELD)

    def close(self) -> None:
        """Stop the engine and free the context and the weights."""
        self._engine.close()
        with self._embed_lock:
            if self._embed_context is not None:
                self._lib.llama_free(self._embed_context)
                self._embed_context = None
        self._lib.llama_free(self._context)
        self._lib.llama_model_free(self._model)

    def _piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)].decode(errors="ignore")

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        size = len(data) + 8
        while True:
            tokens = (self._lib.llama_token * size)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), tokens, size, True, True)
            if n >= 0:
                return list(tokens[:n])
            size = -n

    def _prompt(self, request: InferenceRequest) -> tuple[str, list[str]]:
        if request.messages is not None:
            messages, listed = tools.template_messages(request, self._template)
            try:
                formatted = self._formatter(messages=messages, tools=listed)  # type: ignore[arg-type]
            except (jinja2.TemplateError, ValueError, TypeError) as error:  # and raise_exception's
                raise ValidationFailed(
                    f"The model's chat template refused these messages: {str(error)[:200]}",
                    details={"field": "messages"},
                    hint="Follow the roles the model's template expects (often: user and assistant in turn).",
                ) from None
            stops = formatted.stop if isinstance(formatted.stop, list) else (
                [formatted.stop] if formatted.stop else []
            )
            return formatted.prompt, [stop for stop in stops if stop]  # "" would stop at once
        return request.prompt or "", []

    def _grammar(self, request: InferenceRequest) -> bytes | None:
        """The request's grammar, checked against `grammar_limits` before llama.cpp parses it; b""
        for a schema the converter cannot take. (Its schemas passed `grammar_limits.check_params`
        in `WorkerService.begin`, so the converter's output is bounded.)"""
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

        forced = tools.forced_call_schema(request)
        fmt = request.response_format
        if forced is not None:
            field, schema = "tools", forced
        elif fmt is None or fmt.type == "text":
            return None
        elif fmt.type == "json_schema" and fmt.json_schema:
            field, schema = "response_format", fmt.json_schema.get("schema", fmt.json_schema)
        else:
            return JSON_GBNF.encode()
        try:
            grammar = str(json_schema_to_gbnf(json.dumps(schema)))
        except Exception:  # noqa: BLE001 - the converter's own, any kind: the schema is not one it takes
            return b""
        grammar_limits.check_grammar(field, grammar)
        return grammar.encode()

    def _sampler(self, request: InferenceRequest) -> Any:
        """The request's sampler chain, in llama.cpp's usual order."""
        lib = self._lib
        n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        if any(token >= n_vocab for token in request.logit_bias):
            raise ValidationFailed(f"A `logit_bias` token id is outside the vocabulary (0 to {n_vocab - 1}).",
                                   details={"field": "logit_bias"})
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = lib.llama_sampler_chain_init(params)
        if request.logit_bias:
            biases = (lib.llama_logit_bias * len(request.logit_bias))()
            for k, (token, bias) in enumerate(request.logit_bias.items()):
                biases[k].token, biases[k].bias = token, bias
            lib.llama_sampler_chain_add(
                chain, lib.llama_sampler_init_logit_bias(n_vocab, len(request.logit_bias), biases))
        try:
            grammar = self._grammar(request)
        except RbeeError:
            lib.llama_sampler_free(chain)
            raise
        if grammar is not None:
            sampler = lib.llama_sampler_init_grammar(self._vocab, grammar, b"root") if grammar else None
            if not sampler:
                lib.llama_sampler_free(chain)
                field = "tools" if tools.forced_call_schema(request) is not None else "response_format"
                raise ValidationFailed(
                    "This JSON schema could not be turned into a grammar.", details={"field": field},
                    hint="Use the common JSON schema keywords (type, properties, required, enum, items).",
                )
            lib.llama_sampler_chain_add(chain, sampler)
        if (request.repeat_penalty, request.frequency_penalty, request.presence_penalty) != (1.0, 0.0, 0.0):
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(
                lib.llama_vocab_n_tokens(self._vocab), PENALTY_LAST_N, request.repeat_penalty,
                request.frequency_penalty, request.presence_penalty))
        if request.temperature <= 0.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if request.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(request.top_k))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(request.top_p, 1))
        if request.min_p > 0.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(request.min_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(request.temperature))
        seed = lib.LLAMA_DEFAULT_SEED if request.seed is None else request.seed & 0xFFFFFFFF
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def count_tokens(self, request: InferenceRequest) -> int:
        prompt, _ = self._prompt(request)
        return len(self.tokenize(prompt))

    def generate(
        self, request: InferenceRequest, on_token: OnToken, cancelled: threading.Event
    ) -> Generated:
        if self.embedding_only:
            raise ValidationFailed(
                "This is an embedding model: it makes vectors, not text.", details={"field": "model"},
                hint="Send it to /v1/embeddings, or pick a chat model for completions.")
        prompt, template_stops = self._prompt(request)
        tokens = self.tokenize(prompt)
        max_tokens = token_budget(request, len(tokens), self.ctx, self.info.get("context_length"))
        job = Job(
            tokens=tokens, max_tokens=max_tokens,
            sampler=self._sampler(request), on_piece=on_token, cancelled=cancelled,
            stops=[*template_stops, *request.stop], logprobs=request.logprobs,
            tag=[block.hash for block in prompt_blocks(request)],
        )
        self._engine.submit(job)
        job.finished.wait()
        if isinstance(job.error, EngineError):  # this batch failed; the worker goes on
            raise WorkerFailed(str(job.error), hint="Retry; if it persists, lower the worker's slots or "
                               "context ([hive] worker_slots, worker_ctx), or free the device's memory.")
        if job.error is not None:
            raise job.error
        reason: StopReason = job.reason  # type: ignore[assignment]
        return Generated(len(tokens), job.produced, reason, job.tokens_cached, job.stop_sequence,
                         job.tokens_restored)

    # --- embeddings ---

    EMBED_SEQUENCES = 8
    """Inputs decoded together in one batch."""

    def _embedding_context(self) -> Any:
        """A second context on the same weights, made on the first embedding request."""
        if self._embed_context is None:
            lib = self._lib
            params = lib.llama_context_default_params()
            params.embeddings = True
            params.pooling_type = self._pooling
            params.n_ctx = params.n_batch = params.n_ubatch = self.ctx  # a whole input in one ubatch
            params.n_seq_max = self.EMBED_SEQUENCES
            params.kv_unified = True
            params.n_threads = params.n_threads_batch = self._threads
            params.no_perf = True
            context = lib.llama_init_from_model(self._model, params)
            if not context:
                raise BackendUnavailable("llama.cpp could not make an embedding context: too little memory.")
            self._embed_context = context
        return self._embed_context

    def embed(self, request: EmbedRequest, cancelled: threading.Event) -> tuple[list[list[float]], int]:
        """One unit vector per input, in order; inputs are packed into shared batches, and
        `cancelled` is checked between them."""
        n_vocab = self._lib.llama_vocab_n_tokens(self._vocab)
        inputs: list[list[int]] = []
        total = 0
        for k, item in enumerate(request.input):
            if cancelled.is_set():
                raise EmbeddingCancelled
            tokens = self.tokenize(item) if isinstance(item, str) else list(item)
            total += len(tokens)
            if total > MAX_EMBED_TOKENS:
                raise LimitExceeded(
                    f"These inputs are more than {MAX_EMBED_TOKENS} tokens together; that is the most "
                    "one embedding request may hold.", details={"field": "input", "limit": MAX_EMBED_TOKENS},
                    hint="Send the inputs in several requests.")
            if not tokens:
                raise ValidationFailed(f"Input {k} is empty.", details={"field": f"input[{k}]"})
            if len(tokens) > self.ctx:
                raise ValidationFailed(
                    f"Input {k} is {len(tokens)} tokens; this worker embeds at most {self.ctx}.",
                    details={"field": f"input[{k}]"}, hint="Split the text into shorter pieces.")
            if any(not 0 <= token < n_vocab for token in tokens):
                raise ValidationFailed(
                    f"Input {k} has a token id outside the vocabulary (0 to {n_vocab - 1}).",
                    details={"field": f"input[{k}]"})
            inputs.append(tokens)
        width = int(self.info["embedding_length"])
        if request.dimensions is not None and request.dimensions > width:
            raise ValidationFailed(
                f"This model's vectors have {width} dimensions; `dimensions` may not be more.",
                details={"field": "dimensions"})
        vectors: list[np.ndarray] = []
        with self._embed_lock:
            context = self._embedding_context()
            start = 0
            while start < len(inputs):
                if cancelled.is_set():
                    log.info("embedding stopped before input %d of %d: its client went away", start,
                             len(inputs))
                    raise EmbeddingCancelled
                group = [inputs[start]]
                size = len(inputs[start])
                while (start + len(group) < len(inputs) and len(group) < self.EMBED_SEQUENCES
                       and size + len(inputs[start + len(group)]) <= self.ctx):
                    size += len(inputs[start + len(group)])
                    group.append(inputs[start + len(group)])
                vectors.extend(self._embed_group(context, group, request.dimensions))
                start += len(group)
        return [vector.tolist() for vector in vectors], sum(len(tokens) for tokens in inputs)

    def _embed_group(
        self, context: Any, group: list[list[int]], dimensions: int | None,
    ) -> list[np.ndarray]:
        """Unit vectors for `group`, decoded together (their first `dimensions` values, normalized)."""
        lib = self._lib
        total = sum(len(tokens) for tokens in group)
        batch = lib.llama_batch_init(total, 0, 1)
        try:
            n = 0
            for seq, tokens in enumerate(group):
                for pos, token in enumerate(tokens):
                    batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                    batch.seq_id[n][0] = seq
                    batch.logits[n] = True
                    n += 1
            batch.n_tokens = n
            memory = lib.llama_get_memory(context)
            if memory:  # an encoder-only model keeps no cache
                lib.llama_memory_clear(memory, True)
            if lib.llama_decode(context, batch) != 0:
                raise BackendUnavailable("llama.cpp could not compute these embeddings.")
            n_embd = lib.llama_model_n_embd(self._model)
            out = []
            for seq in range(len(group)):
                pooled = np.ctypeslib.as_array(lib.llama_get_embeddings_seq(context, seq), shape=(n_embd,))
                vector = pooled[:dimensions].astype(np.float64)  # a copy: the buffer is reused
                norm = float(np.linalg.norm(vector))
                out.append(vector / norm if norm > 0 else vector)
            return out
        finally:
            lib.llama_batch_free(batch)
