"""The OpenAI-compatible API on the queen (DESIGN §3): models, chat, completions, embeddings.

Errors on these routes use OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`, so that the official clients raise their usual classes.
What a request may say, and what is refused by name, is `openai_requests`.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from quart import Response
from quart import request as http_request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.errors import RbeeError, ValidationFailed
from rbee_common.http import OpenStreams, read_body, sse_response
from rbee_common.validation import decode_body
from rbee_common.wire import EmbedRequest, GenerationParams, InferenceToken, TokenLogprob, ToolCall
from rbee_queen import toolcalls
from rbee_queen.dialects import ERROR_TYPES, Answer, Embed, Generate, ListModels, Usage, error_response
from rbee_queen.openai_requests import (
    CommonRequest,
    CompletionRequest,
    chat_decoder,
    chat_params,
    completion_decoder,
    completion_params,
    embedding_decoder,
    embedding_inputs,
)

_encode = msgspec.json.Encoder().encode

__all__ = ["Usage", "add_openai_routes", "openai_error"]


def openai_error(error: RbeeError) -> Response:
    body = {
        "error": {
            "message": error.message,
            "type": ERROR_TYPES.get(error.status, "server_error"),
            "param": error.details.get("field"),
            "code": error.code.lower(),
        }
    }
    return error_response(body, error)


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def _completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def _wire_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def add_openai_routes(
    app: QuartTrio,
    *,
    generate: Generate,
    list_models: ListModels,
    embed: Embed | None = None,
    default_deadline_s: Callable[[], float] = lambda: 0.0,
    streams: OpenStreams | None = None,
) -> None:
    """`default_deadline_s` is asked per request (SIGHUP may change it); 0 is none."""
    streams = OpenStreams() if streams is None else streams

    def deadline() -> str | None:
        """X-Request-Deadline, or the client's timeout (X-Stainless-Timeout), or the default."""
        return deadlines.from_headers(http_request.headers, default_s=default_deadline_s() or None)

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            names = await list_models()
        except RbeeError as error:
            return openai_error(error)
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "rbee"} for name in names]
        return Response(_encode({"object": "list", "data": data}), content_type="application/json")

    async def answer(decoder: msgspec.json.Decoder[Any], to_params: Callable[[Any], GenerationParams],
                     *, chat: bool) -> Response:
        try:
            request = decode_body(await read_body(), decoder)
            params = to_params(request)
            answer = Answer(generate, request.model, params, deadline=deadline(), streams=streams)
        except RbeeError as error:
            return openai_error(error)
        return await _respond(request, params, answer, chat=chat)

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        return await answer(chat_decoder, chat_params, chat=True)

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await answer(completion_decoder, completion_params, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        try:
            request = decode_body(await read_body(), embedding_decoder)
            inputs = embedding_inputs(request.input)
            if request.dimensions is not None and request.dimensions < 1:
                raise ValidationFailed("`dimensions` must be 1 or more.", details={"field": "dimensions"})
            if embed is None:
                raise ValidationFailed("This server computes no embeddings.", details={"field": "model"})
            result = await embed(request.model, EmbedRequest(input=inputs, dimensions=request.dimensions))
        except RbeeError as error:
            return openai_error(error)

        def encoded(vector: list[float]) -> list[float] | str:
            if request.encoding_format == "base64":  # little-endian float32, as OpenAI sends them
                return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            return vector

        data = [
            {"object": "embedding", "index": k, "embedding": encoded(v)} for k, v in enumerate(result.data)
        ]
        body = {
            "object": "list",
            "data": data,
            "model": request.model,
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        }
        return Response(_encode(body), content_type="application/json")


async def _respond(
    request: CommonRequest, params: GenerationParams, answer: Answer, *, chat: bool
) -> Response:
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    usage = answer.usage
    tools = [tool.name for tool in params.tools] if params.tool_choice != "none" else []
    echo = params.prompt if isinstance(request, CompletionRequest) and request.echo and params.prompt else ""
    wants_logprobs = params.logprobs is not None

    def usage_body() -> dict[str, Any]:
        return {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        }

    def finish(calls: list[ToolCall]) -> str:
        if calls:
            return "tool_calls"
        return "length" if usage.finish_reason == "length" else "stop"

    def logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any] | None:
        if not wants_logprobs:
            return None
        return _chat_logprobs(entries) if chat else _completion_logprobs(entries, offset)

    if not request.stream:
        try:
            content, calls, pieces = await answer.parsed(tools)
        except RbeeError as error:
            return openai_error(error)
        text = "".join(piece.t for piece in pieces)
        entries = [entry for piece in pieces for entry in piece.lp or []]
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish(calls),
            "logprobs": logprobs(entries, len(echo)),
        }
        if chat:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": content if content or not calls else None,
            }
            if calls:
                message["tool_calls"] = _wire_calls(calls)
            choice["message"] = message
        else:
            choice["text"] = echo + text
        body = {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": request.model,
            "choices": [choice],
            "usage": usage_body(),
        }
        return Response(_encode(body), content_type="application/json")

    try:
        first = await answer.first()
    except RbeeError as error:
        return openai_error(error)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        delta: dict[str, Any] | str,
        finish_reason: str | None,
        entries: list[TokenLogprob] | None = None,
        offset: int = 0,
    ) -> bytes:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish_reason,
            "logprobs": logprobs(entries or [], offset) if entries else None,
        }
        if chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        body: dict[str, Any] = {
            "id": ident,
            "object": kind,
            "created": created,
            "model": request.model,
            "choices": [choice],
        }
        if include_usage:
            body["usage"] = None
        return b"data: " + _encode(body) + b"\n\n"

    def call_chunk(delta: toolcalls.CallDelta) -> bytes:
        part: dict[str, Any] = {"index": delta.number, "function": {"arguments": delta.arguments}}
        if delta.id is not None:  # a call's first delta: its id and name
            part.update(id=delta.id, type="function")
            part["function"]["name"] = delta.name
        return chunk({"tool_calls": [part]}, None)

    async def frames() -> AsyncIterator[bytes]:
        held = toolcalls.ToolStream(tools) if tools else None
        pending: list[TokenLogprob] = []
        offset = len(echo)
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, None)
            elif echo:
                yield chunk(echo, None)
            piece: InferenceToken | None = first
            while piece is not None:
                pending.extend(piece.lp or [])
                shown = held.feed(piece.t) if held is not None else piece.t
                if shown:
                    yield chunk({"content": shown} if chat else shown, None, pending, offset)
                    offset += len(shown)
                    pending = []
                for delta in held.deltas() if held is not None else []:
                    yield call_chunk(delta)
                piece = await answer.next()
            rest, calls, last = held.finish() if held is not None else ("", [], [])
            if rest:
                yield chunk({"content": rest}, None, pending)
                pending = []
            for delta in last:
                yield call_chunk(delta)
            yield chunk({} if chat else "", finish(calls), pending or None, offset)
            if include_usage:
                body = {
                    "id": ident,
                    "object": kind,
                    "created": created,
                    "model": request.model,
                    "choices": [],
                    "usage": usage_body(),
                }
                yield b"data: " + _encode(body) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except RbeeError as error:
            body = {
                "error": {
                    "message": error.message,
                    "type": "server_error",
                    "param": None,
                    "code": error.code.lower(),
                }
            }
            yield b"data: " + _encode(body) + b"\n\n"
            yield b"data: [DONE]\n\n"  # the stream's terminator, after an error too
        finally:
            await answer.aclose()

    return sse_response(frames())
