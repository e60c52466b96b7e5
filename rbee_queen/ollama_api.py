"""Ollama's API on the queen, for the tools that speak it (the `ollama` clients, Open WebUI's
Ollama connection): chat, generate, embed, tags, ps, show, version, pull.

Streams are NDJSON, one object a line, the last with `"done": true`; errors are
`{"error": "..."}` with the status code, also as a line in a stream.

Model names: Ollama clients send `name:tag`. A catalog id is an Ollama name
with the tag `latest` (`smollm2-135m:latest`, or `smollm2-135m` alone). A
Hugging Face name as Ollama writes it, `hf.co/<org>/<repo>:<quant>`, is the
catalog id the hive gives that download (`<org>--<repo>--<quant>`, lower case),
and `/api/pull` downloads it: `hf.co/org/repo:Q4_K_M` is rbee's
`hf:org/repo:Q4_K_M`. Ollama's own library (`llama3.2`) is not reachable from
rbee; pulling such a name is a 400 that says how to name a Hugging Face model.

Options: the sampling ones are honoured (`temperature`, `top_p`, `top_k`,
`min_p`, `num_predict`, `stop`, `seed`, `repeat_penalty`, `presence_penalty`,
`frequency_penalty`). Load-time ones (`num_ctx`, `num_thread`, `num_gpu`, …)
are the hive's to set when it starts a worker (`[hive] worker_ctx`, threads),
so they are accepted and do not change a running worker; any other is a 400.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import msgspec
from quart import Response
from quart import request as http_request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.daemon import package_version
from rbee_common.errors import NotFound, RbeeError, ValidationFailed, error_from_body
from rbee_common.http import OpenStreams, read_body
from rbee_common.jobs import JobServer
from rbee_common.sizing import gguf_metadata
from rbee_common.validation import decode_body
from rbee_common.wire import (
    DONE,
    ERROR_PREFIX,
    ChatMessage,
    EmbedRequest,
    GenerationParams,
    InferenceToken,
    ModelDownload,
    Progress,
    ResponseFormat,
    ToolCall,
    WorkerInfo,
    event_decoder,
)
from rbee_hive.catalog import catalog_id
from rbee_queen import toolcalls
from rbee_queen.dialects import Answer, Embed, Generate, Usage, error_response, tool_of

_encode = msgspec.json.Encoder().encode

SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
LOAD_TIME = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "num_keep",
    }
)
_HF_NAME = re.compile(
    r"^(?:https?://)?(?:hf\.co|huggingface\.co)/(?P<repo>[A-Za-z0-9._-]+/[A-Za-z0-9._-]+)"
    r"(?::(?P<tag>[A-Za-z0-9._-]+))?$"
)


def model_id(name: str) -> str:
    """The catalog id (or served name) an Ollama model name stands for."""
    hf = _HF_NAME.match(name)
    if hf:
        tag = hf["tag"] if hf["tag"] and hf["tag"] != "latest" else None
        return catalog_id(f"hf:{hf['repo']}" + (f":{tag}" if tag else ""))
    return name[: -len(":latest")] if name.endswith(":latest") else name


def ollama_name(model: str) -> str:
    return model if ":" in model else f"{model}:latest"


def pull_reference(name: str) -> str:
    hf = _HF_NAME.match(name)
    if hf:
        tag = hf["tag"] if hf["tag"] and hf["tag"] != "latest" else None
        return f"hf:{hf['repo']}" + (f":{tag}" if tag else "")
    if name.startswith("hf:"):
        return name
    raise ValidationFailed(
        "rbee pulls models from Hugging Face, not from Ollama's library.",
        details={"field": "model"},
        hint="Name the model as hf.co/<org>/<repo>:<quantization>, "
        "e.g. hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M.",
    )


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


class _Function(msgspec.Struct, kw_only=True):
    name: str
    arguments: dict[str, Any] | str = msgspec.field(default_factory=dict)


class _Call(msgspec.Struct, kw_only=True):
    function: _Function
    id: str | None = None


class _Message(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[_Call] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class _ToolFunction(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(msgspec.Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: _ToolFunction


class _Base(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    """Accepted: the hive's idle timeout decides when a worker stops."""
    think: bool | str | None = None


class ChatRequest(_Base, kw_only=True, forbid_unknown_fields=True):
    messages: list[_Message] = msgspec.field(default_factory=list)
    tools: list[_Tool] | None = None


class GenerateRequest(_Base, kw_only=True, forbid_unknown_fields=True):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    images: list[str] | None = None
    template: str | None = None
    context: list[int] | None = None


class EmbedBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: str | list[str] = ""
    prompt: str | None = None
    """`/api/embeddings`, Ollama's older route, sends one `prompt`."""
    truncate: bool = True
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


class NameBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool = False
    verbose: bool = False

    @property
    def which(self) -> str:
        if not (self.model or self.name):
            raise ValidationFailed("Name a model.", details={"field": "model"})
        return self.model or self.name or ""


def ollama_error(error: RbeeError) -> Response:
    message = f"{error.message} {error.hint}" if error.hint else error.message  # Ollama's: one string
    return error_response({"error": message}, error)


def _options(request: _Base) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in (request.options or {}).items():
        if key in SAMPLING:
            fields[SAMPLING[key]] = value
        elif key == "num_predict":
            fields["max_tokens"] = value if isinstance(value, int) and value > 0 else None
        elif key == "stop":
            fields["stop"] = [value] if isinstance(value, str) else value
        elif key not in LOAD_TIME:
            raise ValidationFailed(
                f"rbee does not take the option `{key[:40]}`.", details={"field": f"options.{key[:40]}"}
            )
    if "max_tokens" not in fields:
        fields["max_tokens"] = None  # Ollama's default: until the model stops or the context is full
    if request.format == "json":
        fields["response_format"] = ResponseFormat(type="json_object")
    elif isinstance(request.format, dict):
        fields["response_format"] = ResponseFormat(type="json_schema", json_schema={"schema": request.format})
    elif request.format not in (None, ""):
        raise ValidationFailed('`format` is "json" or a JSON schema.', details={"field": "format"})
    if request.think:
        raise ValidationFailed(
            "rbee's models do not think aloud; leave out `think`.", details={"field": "think"}
        )
    return fields


def _convert(fields: dict[str, Any], field: str) -> GenerationParams:
    try:
        return msgspec.convert(fields, GenerationParams)
    except msgspec.ValidationError as error:
        path = str(error).rpartition("$.")[2].rstrip("`") or None
        raise ValidationFailed(
            f"An option has the wrong type{f' (`{path}`)' if path else ''}.",
            details={"field": f"{field}.{path}" if path else field},
        ) from None


def _chat_messages(request: ChatRequest) -> list[ChatMessage]:
    if not request.messages:
        raise ValidationFailed("`messages` must not be empty.", details={"field": "messages"})
    out = []
    for k, m in enumerate(request.messages):
        if m.images:
            raise ValidationFailed(
                "rbee's models take text only, not images.", details={"field": f"messages[{k}].images"}
            )
        calls = [
            ToolCall(
                id=c.id or toolcalls.new_call_id(),
                name=c.function.name,
                arguments=c.function.arguments
                if isinstance(c.function.arguments, str)
                else json.dumps(c.function.arguments),
            )
            for c in m.tool_calls or []
        ]
        out.append(
            ChatMessage(
                m.role,
                m.content,
                tool_calls=calls,
                name=m.tool_name,
                tool_call_id=m.tool_name if m.role == "tool" else None,
            )
        )
    return out


def _counts(usage: Usage, started: float) -> dict[str, Any]:
    total = int((time.monotonic() - started) * 1e9)
    return {
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": 0,
        "eval_count": usage.completion_tokens,
        "eval_duration": total,
    }


def _ndjson(lines: AsyncIterator[dict[str, Any]]) -> Response:
    async def body() -> AsyncIterator[bytes]:
        async for line in lines:
            yield _encode(line) + b"\n"

    response = Response(body(), content_type="application/x-ndjson")
    response.timeout = None
    return response


def add_ollama_routes(
    app: QuartTrio,
    *,
    generate: Generate,
    embed: Embed,
    catalogs: Callable[[], Awaitable[list[dict[str, Any]]]],
    workers: Callable[[], list[WorkerInfo]],
    jobs: JobServer,
    default_deadline_s: Callable[[], float],
    streams: OpenStreams,
) -> None:
    def deadline() -> str | None:
        return deadlines.from_headers(http_request.headers, default_s=default_deadline_s() or None)

    async def entries() -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for entry in await catalogs():
            found.setdefault(str(entry["id"]), entry)
        return found

    def details(entry: dict[str, Any] | None) -> dict[str, Any]:
        fmt = (entry or {}).get("format", "gguf")
        meta = _metadata(entry)
        return {
            "parent_model": "",
            "format": fmt,
            "family": meta.get("general.architecture", ""),
            "families": [meta["general.architecture"]] if "general.architecture" in meta else None,
            "parameter_size": meta.get("general.size_label", ""),
            "quantization_level": _quant(entry),
        }

    @app.get("/api/version")
    async def ollama_version() -> Response:
        return Response(_encode({"version": package_version()}), content_type="application/json")

    @app.get("/api/tags")
    async def ollama_tags() -> Response:
        models = [
            {
                "name": ollama_name(i),
                "model": ollama_name(i),
                "modified_at": _iso(e.get("added_at", 0)),
                "size": e.get("size_bytes", 0),
                "digest": _digest(e),
                "details": details(e),
            }
            for i, e in sorted((await entries()).items())
        ]
        return Response(_encode({"models": models}), content_type="application/json")

    @app.get("/api/ps")
    async def ollama_ps() -> Response:
        known = await entries()
        models = []
        for w in workers():
            entry = known.get(w.model)
            size = entry.get("size_bytes", 0) if entry else 0
            models.append(
                {
                    "name": ollama_name(w.model),
                    "model": ollama_name(w.model),
                    "size": size,
                    "digest": _digest(entry),
                    "details": details(entry),
                    "expires_at": _iso(time.time() + 3600),
                    "size_vram": size if w.device.startswith(("GPU", "METAL")) else 0,
                }
            )
        return Response(_encode({"models": models}), content_type="application/json")

    @app.post("/api/show")
    async def ollama_show() -> Response:
        try:
            name = decode_body(await read_body(), msgspec.json.Decoder(NameBody)).which
            entry = (await entries()).get(model_id(name))
            if entry is None:
                raise NotFound(f"model '{name[:100]}' not found", code="MODEL_NOT_FOUND")
        except RbeeError as error:
            return ollama_error(error)
        meta = _metadata(entry)
        info = {
            k: v
            for k, v in meta.items()
            if not k.startswith("tokenizer.") and isinstance(v, int | float | str)
        }
        body = {
            "modelfile": f"FROM {entry.get('reference', name)}\n",
            "parameters": "",
            "template": str(meta.get("tokenizer.chat_template", "")),
            "details": details(entry),
            "model_info": info,
            "capabilities": ["completion", "tools", "embedding"]
            if entry.get("format") == "gguf"
            else ["completion"],
            "modified_at": _iso(entry.get("added_at", 0)),
        }
        return Response(_encode(body), content_type="application/json")

    async def run(
        request: _Base,
        params: GenerationParams,
        shape: Callable[[str, bool], dict[str, Any]],
        names: list[str],
    ) -> Response:
        answer = Answer(generate, model_id(request.model), params, deadline=deadline(), streams=streams)
        started = time.monotonic()

        def last(usage: Usage, calls: list[ToolCall], text: str) -> dict[str, Any]:
            line = shape(text, True)
            if calls:
                line["message"]["tool_calls"] = [
                    {"function": {"name": c.name, "arguments": toolcalls.arguments_object(c)}} for c in calls
                ]
            reason = "length" if usage.finish_reason == "length" else "stop"
            return {**line, "done_reason": reason, **_counts(usage, started)}

        if not request.stream:
            try:
                text, calls, _ = await answer.parsed(names)
            except RbeeError as error:
                return ollama_error(error)
            return Response(_encode(last(answer.usage, calls, text)), content_type="application/json")
        try:
            first = await answer.first()
        except RbeeError as error:
            return ollama_error(error)

        async def lines() -> AsyncIterator[dict[str, Any]]:
            held = toolcalls.ToolStream(names) if names else None
            try:
                piece: InferenceToken | None = first
                while piece is not None:
                    shown = held.feed(piece.t) if held is not None else piece.t
                    if shown:
                        yield shape(shown, False)
                    piece = await answer.next()
                rest, calls, _ = held.finish() if held is not None else ("", [], [])
                yield last(answer.usage, calls, rest)
            except RbeeError as error:
                yield {"error": error.message}
            finally:
                await answer.aclose()

        return _ndjson(lines())

    @app.post("/api/chat")
    async def ollama_chat() -> Response:
        try:
            request = decode_body(await read_body(), msgspec.json.Decoder(ChatRequest))
            tools = [
                tool_of(t.function.name, t.function.description, t.function.parameters, f"tools[{k}]")
                for k, t in enumerate(request.tools or [])
            ]
            params = _convert(
                {**_options(request), "messages": _chat_messages(request), "tools": tools}, "options"
            )
        except RbeeError as error:
            return ollama_error(error)

        def shape(text: str, done: bool) -> dict[str, Any]:
            return {
                "model": request.model,
                "created_at": now_iso(),
                "message": {"role": "assistant", "content": text},
                "done": done,
            }

        return await run(request, params, shape, [t.name for t in tools])

    @app.post("/api/generate")
    async def ollama_generate() -> Response:
        try:
            request = decode_body(await read_body(), msgspec.json.Decoder(GenerateRequest))
            for field in ("suffix", "images", "template", "context"):
                if getattr(request, field):
                    raise ValidationFailed(
                        f"rbee does not take `{field}` on /api/generate.", details={"field": field}
                    )
            fields = _options(request)
            if request.raw:
                fields["prompt"] = request.prompt
            else:
                fields["messages"] = ([ChatMessage("system", request.system)] if request.system else []) + [
                    ChatMessage("user", request.prompt)
                ]
            params = _convert(fields, "options") if request.prompt else None
        except RbeeError as error:
            return ollama_error(error)

        def shape(text: str, done: bool) -> dict[str, Any]:
            return {"model": request.model, "created_at": now_iso(), "response": text, "done": done}

        if params is None:  # Ollama's way to load a model: nothing to generate
            return Response(
                _encode({**shape("", True), "done_reason": "load"}), content_type="application/json"
            )
        return await run(request, params, shape, [])

    async def embed_body() -> tuple[EmbedBody, list[list[float]], int, float]:
        started = time.monotonic()
        body = decode_body(await read_body(), msgspec.json.Decoder(EmbedBody))
        inputs = (
            [body.prompt]
            if body.prompt is not None
            else ([body.input] if isinstance(body.input, str) else list(body.input))
        )
        if not inputs or not all(inputs):
            raise ValidationFailed(
                "`input` must be a non-empty string or list of them.", details={"field": "input"}
            )
        result = await embed(
            model_id(body.model), EmbedRequest(input=list(inputs), dimensions=body.dimensions)
        )
        return body, result.data, result.tokens, started

    @app.post("/api/embed")
    async def ollama_embed() -> Response:
        try:
            body, vectors, tokens, started = await embed_body()
        except RbeeError as error:
            return ollama_error(error)
        took = int((time.monotonic() - started) * 1e9)
        return Response(
            _encode(
                {
                    "model": body.model,
                    "embeddings": vectors,
                    "total_duration": took,
                    "load_duration": 0,
                    "prompt_eval_count": tokens,
                }
            ),
            content_type="application/json",
        )

    @app.post("/api/embeddings")
    async def ollama_embeddings() -> Response:
        try:
            _, vectors, _, _ = await embed_body()
        except RbeeError as error:
            return ollama_error(error)
        return Response(_encode({"embedding": vectors[0]}), content_type="application/json")

    @app.post("/api/pull")
    async def ollama_pull() -> Response:
        try:
            body = decode_body(await read_body(), msgspec.json.Decoder(NameBody))
            reference = pull_reference(body.which)
            job = jobs.submit(ModelDownload(model=reference), actor="ollama-api", deadline=deadline())
        except RbeeError as error:
            return ollama_error(error)

        async def statuses() -> AsyncIterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            async for _, data in job.follow():
                if not data:
                    continue
                if data == DONE:
                    yield {"status": "verifying sha256 digest"}
                    yield {"status": "writing manifest"}
                    yield {"status": "success"}
                    return
                if data.startswith(ERROR_PREFIX):
                    yield {"error": data[len(ERROR_PREFIX) :].strip() or "The download failed."}
                    return
                if data.startswith("["):  # cancelled
                    yield {"error": "The download was cancelled."}
                    return
                event = event_decoder.decode(data)
                if isinstance(event, Progress) and event.what == "download":
                    yield {
                        "status": f"pulling {reference}",
                        "digest": reference,
                        "total": event.total or 0,
                        "completed": event.done,
                    }

        if body.stream:
            return _ndjson(statuses())
        last: dict[str, Any] = {}
        async for line in statuses():
            last = line
        if "error" in last:
            return Response(
                _encode(last),
                status=error_from_body(job.error, 503).status if job.error is not None else 503,
                content_type="application/json",
            )
        return Response(_encode(last), content_type="application/json")


def _digest(entry: dict[str, Any] | None) -> str:
    source = str((entry or {}).get("source") or (entry or {}).get("id") or "")
    return hashlib.sha256(source.encode()).hexdigest()


def _metadata(entry: dict[str, Any] | None) -> dict[str, Any]:
    """The GGUF header, when the file is on this machine (the queen's own hive)."""
    path = Path(str((entry or {}).get("path", "")))
    if not entry or entry.get("format") != "gguf" or not path.is_file():
        return {}
    try:
        return gguf_metadata(path)
    except (OSError, ValueError):
        return {}


def _quant(entry: dict[str, Any] | None) -> str:
    match = re.search(
        r"(Q\d_K(?:_[SML])?|Q\d_\d|F16|BF16|F32|IQ\d_\w+)", str((entry or {}).get("path", "")), re.I
    )
    return match[1].upper() if match else ""
