"""Ollama's API on the queen, for the tools that speak it (the `ollama` clients, Open WebUI's
Ollama connection): chat, generate, embed, tags, ps, show, version, pull.

Streams are NDJSON, one object a line, the last with `"done": true`; errors are
`{"error": "..."}` with the status code, also as a line in a stream. How
Ollama's model names and options map onto rbee's is `ollama_requests`.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from quart import Response
from quart import request as http_request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.daemon import package_version
from rbee_common.errors import ModelNotFound, RbeeError, ValidationFailed, error_from_body
from rbee_common.http import OpenStreams, read_body
from rbee_common.jobs import JobServer
from rbee_common.sizing import gguf_metadata
from rbee_common.validation import decode_body
from rbee_common.wire import (
    DONE,
    ERROR_PREFIX,
    CatalogEntry,
    EmbedRequest,
    GenerationParams,
    InferenceToken,
    Progress,
    ToolCall,
    WorkerRecord,
    event_decoder,
)
from rbee_queen.dialects import toolcalls
from rbee_queen.dialects.common import Answer, Embed, Generate, Usage, context_numbers, error_response
from rbee_queen.dialects.ollama.requests import (
    Base,
    ChatRequest,
    EmbedBody,
    GenerateRequest,
    NameBody,
    chat_params,
    generate_params,
    model_id,
    ollama_name,
    pull_operation,
)

_encode = msgspec.json.Encoder().encode


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


def ollama_error(error: RbeeError) -> Response:
    numbers = context_numbers(error)
    if numbers is not None:  # Ollama's own words (with truncate: false), and the numbers
        message = (f"the input length exceeds the context length: the prompt is {numbers[0]} tokens, "
                   f"the context {numbers[1]}")
    else:
        message = f"{error.message} {error.hint}" if error.hint else error.message  # Ollama's: one string
    return error_response({"error": message}, error)


def _counts(usage: Usage, started: float) -> dict[str, Any]:
    total = int((time.monotonic() - started) * 1e9)
    return {
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": usage.tokens_in,
        "prompt_eval_duration": 0,
        "eval_count": usage.tokens_out,
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
    app: QuartTrio, *, generate: Generate, embed: Embed,
    catalogs: Callable[[], Awaitable[list[tuple[str, CatalogEntry]]]],
    workers: Callable[[], list[WorkerRecord]], jobs: JobServer, default_deadline_s: Callable[[], float],
    streams: OpenStreams,
) -> None:
    """Ollama's routes on `app`, as every dialect adds its own (`add_openai_routes`, ...)."""
    OllamaApi(generate=generate, embed=embed, catalogs=catalogs, workers=workers, jobs=jobs,
              default_deadline_s=default_deadline_s, streams=streams).install(app)


class OllamaApi:
    """Ollama's API on the queen: each route a method, registered by `install`."""

    def __init__(
        self,
        *,
        generate: Generate,
        embed: Embed,
        catalogs: Callable[[], Awaitable[list[tuple[str, CatalogEntry]]]],
        workers: Callable[[], list[WorkerRecord]],
        jobs: JobServer,
        default_deadline_s: Callable[[], float],
        streams: OpenStreams,
    ) -> None:
        self.generate = generate
        self.embed = embed
        self.catalogs = catalogs
        self.workers = workers
        self.jobs = jobs
        self.default_deadline_s = default_deadline_s
        self.streams = streams

    def install(self, app: QuartTrio) -> None:
        app.add_url_rule("/api/version", "ollama_version", self.ollama_version, methods=["GET"])
        app.add_url_rule("/api/tags", "ollama_tags", self.ollama_tags, methods=["GET"])
        app.add_url_rule("/api/ps", "ollama_ps", self.ollama_ps, methods=["GET"])
        app.add_url_rule("/api/show", "ollama_show", self.ollama_show, methods=["POST"])
        app.add_url_rule("/api/chat", "ollama_chat", self.ollama_chat, methods=["POST"])
        app.add_url_rule("/api/generate", "ollama_generate", self.ollama_generate, methods=["POST"])
        app.add_url_rule("/api/embed", "ollama_embed", self.ollama_embed, methods=["POST"])
        app.add_url_rule("/api/embeddings", "ollama_embeddings", self.ollama_embeddings, methods=["POST"])
        app.add_url_rule("/api/pull", "ollama_pull", self.ollama_pull, methods=["POST"])

    def deadline(self) -> str | None:
        return deadlines.from_headers(http_request.headers, default_s=self.default_deadline_s() or None)

    async def entries(self) -> dict[str, CatalogEntry]:
        found: dict[str, CatalogEntry] = {}
        for _, entry in await self.catalogs():
            found.setdefault(entry.id, entry)
        return found

    def details(self, entry: CatalogEntry | None) -> dict[str, Any]:
        fmt = entry.format if entry is not None else "gguf"
        meta = _metadata(entry)
        return {
            "parent_model": "",
            "format": fmt,
            "family": meta.get("general.architecture", ""),
            "families": [meta["general.architecture"]] if "general.architecture" in meta else None,
            "parameter_size": meta.get("general.size_label", ""),
            "quantization_level": _quant(entry),
        }

    async def ollama_version(self) -> Response:
        return Response(_encode({"version": package_version()}), content_type="application/json")

    async def ollama_tags(self) -> Response:
        models = [
            {
                "name": ollama_name(i),
                "model": ollama_name(i),
                "modified_at": _iso(e.added_at),
                "size": e.size_bytes,
                "digest": _digest(e),
                "details": self.details(e),
            }
            for i, e in sorted((await self.entries()).items())
        ]
        return Response(_encode({"models": models}), content_type="application/json")

    async def ollama_ps(self) -> Response:
        known = await self.entries()
        models = []
        for w in self.workers():
            entry = known.get(w.model)
            size = entry.size_bytes if entry is not None else 0
            models.append(
                {
                    "name": ollama_name(w.model),
                    "model": ollama_name(w.model),
                    "size": size,
                    "digest": _digest(entry),
                    "details": self.details(entry),
                    "expires_at": _iso(time.time() + 3600),
                    "size_vram": size if w.device.startswith(("GPU", "METAL")) else 0,
                }
            )
        return Response(_encode({"models": models}), content_type="application/json")

    async def ollama_show(self) -> Response:
        try:
            name = decode_body(await read_body(), msgspec.json.Decoder(NameBody)).which
            entry = (await self.entries()).get(model_id(name))
            if entry is None:
                raise ModelNotFound("That model is in no hive's catalog.",
                                    hint="See /api/tags; pull hf.co/<org>/<repo>:<quant> to add one.")
        except RbeeError as error:
            return ollama_error(error)
        meta = _metadata(entry)
        info = {
            k: v
            for k, v in meta.items()
            if not k.startswith("tokenizer.") and isinstance(v, int | float | str)
        }
        if entry.context_length and not any(k.endswith(".context_length") for k in info):
            # a remote hive's model: its header is not here, but its hive read the context
            info[f"{info.get('general.architecture', 'model')}.context_length"] = entry.context_length
        body = {
            "modelfile": f"FROM {entry.reference}\n",
            "parameters": "",
            "template": str(meta.get("tokenizer.chat_template", "")),
            "details": self.details(entry),
            "model_info": info,
            "capabilities": ["completion", "tools", "embedding"]
            if entry.format == "gguf"
            else ["completion"],
            "modified_at": _iso(entry.added_at),
        }
        return Response(_encode(body), content_type="application/json")

    async def run(
        self,
        request: Base,
        params: GenerationParams,
        shape: Callable[[str, bool], dict[str, Any]],
        names: list[str],
    ) -> Response:
        answer = Answer(self.generate, model_id(request.model), params, deadline=self.deadline(),
                        streams=self.streams)
        started = time.monotonic()

        def last(usage: Usage, calls: list[ToolCall], text: str) -> dict[str, Any]:
            line = shape(text, True)
            if calls:
                line["message"]["tool_calls"] = [
                    {"function": {"name": c.name, "arguments": toolcalls.arguments_object(c)}} for c in calls
                ]
            reason = "length" if usage.stop_reason == "length" else "stop"
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

    async def ollama_chat(self) -> Response:
        try:
            request = decode_body(await read_body(), msgspec.json.Decoder(ChatRequest))
            params, names = chat_params(request)
        except RbeeError as error:
            return ollama_error(error)

        def shape(text: str, done: bool) -> dict[str, Any]:
            return {
                "model": request.model,
                "created_at": now_iso(),
                "message": {"role": "assistant", "content": text},
                "done": done,
            }

        return await self.run(request, params, shape, names)

    async def ollama_generate(self) -> Response:
        try:
            request = decode_body(await read_body(), msgspec.json.Decoder(GenerateRequest))
            params = generate_params(request)
        except RbeeError as error:
            return ollama_error(error)

        def shape(text: str, done: bool) -> dict[str, Any]:
            return {"model": request.model, "created_at": now_iso(), "response": text, "done": done}

        if params is None:  # Ollama's way to load a model: nothing to generate
            return Response(
                _encode({**shape("", True), "done_reason": "load"}), content_type="application/json"
            )
        return await self.run(request, params, shape, [])

    async def embed_body(self) -> tuple[EmbedBody, list[list[float]], int, float]:
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
        result = await self.embed(
            model_id(body.model), EmbedRequest(input=list(inputs), dimensions=body.dimensions)
        )
        return body, result.data, result.tokens, started

    async def ollama_embed(self) -> Response:
        try:
            body, vectors, tokens, started = await self.embed_body()
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

    async def ollama_embeddings(self) -> Response:
        try:
            _, vectors, _, _ = await self.embed_body()
        except RbeeError as error:
            return ollama_error(error)
        return Response(_encode({"embedding": vectors[0]}), content_type="application/json")

    async def ollama_pull(self) -> Response:
        try:
            body = decode_body(await read_body(), msgspec.json.Decoder(NameBody))
            operation = pull_operation(body.which)
            reference = operation.model
            job = self.jobs.submit(operation, actor="ollama-api", deadline=self.deadline())
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


def _digest(entry: CatalogEntry | None) -> str:
    source = (entry.source or entry.id) if entry is not None else ""
    return hashlib.sha256(source.encode()).hexdigest()


def _metadata(entry: CatalogEntry | None) -> dict[str, Any]:
    """The GGUF header, when the file is on this machine (the queen's own hive)."""
    if entry is None or entry.format != "gguf" or not Path(entry.path).is_file():
        return {}
    path = Path(entry.path)
    try:
        return gguf_metadata(path)
    except (OSError, ValueError):
        return {}


def _quant(entry: CatalogEntry | None) -> str:
    path = entry.path if entry is not None else ""
    match = re.search(r"(Q\d_K(?:_[SML])?|Q\d_\d|F16|BF16|F32|IQ\d_\w+)", path, re.I)
    return match[1].upper() if match else ""
