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
from datetime import UTC, datetime
from typing import Any

import msgspec
from quart import Response
from quart import request as http_request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.errors import ModelNotFound, RbeeError, ValidationFailed
from rbee_common.http import OpenStreams, read_body, sse_response
from rbee_common.validation import decode_body
from rbee_common.wire import EmbedRequest, GenerationParams, InferenceToken, TokenLogprob, ToolCall
from rbee_queen.dialects import toolcalls
from rbee_queen.dialects.anthropic.routes import anthropic_error
from rbee_queen.dialects.common import (
    ERROR_TYPES,
    Answer,
    Embed,
    Generate,
    ListModels,
    Usage,
    context_numbers,
    error_response,
)
from rbee_queen.dialects.openai.requests import (
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
    numbers = context_numbers(error)
    message = error.message if numbers is None else (
        f"This model's maximum context length is {numbers[1]} tokens. However, your messages resulted in "
        f"{numbers[0]} tokens. Please reduce the length of the messages.")
    body = {
        "error": {
            "message": message,
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

    def described(name: str, context: int | None, anthropic: bool) -> dict[str, Any]:
        """A model as OpenAI's clients read it, or Anthropic's (they send `anthropic-version`),
        with its context length where known: `context_length` (as OpenRouter's list and LM Studio
        say it) and Anthropic's `max_input_tokens`."""
        if anthropic:
            stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            return {"type": "model", "id": name, "display_name": name, "created_at": stamp,
                    **({"max_input_tokens": context, "max_tokens": context} if context else {})}
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "rbee",
                **({"context_length": context} if context else {})}

    @app.get("/v1/models")
    async def models() -> Response:
        anthropic = "anthropic-version" in http_request.headers
        try:
            found = await list_models()
        except RbeeError as error:
            return openai_error(error)
        data = [described(name, context, anthropic) for name, context in found.items()]
        names = list(found)
        body: dict[str, Any] = {"object": "list", "data": data}
        if anthropic:  # Anthropic's list: one page, with its cursors
            body = {"data": data, "has_more": False, "first_id": names[0] if names else None,
                    "last_id": names[-1] if names else None}
        return Response(_encode(body), content_type="application/json")

    @app.get("/v1/models/<path:name>")
    async def model(name: str) -> Response:
        anthropic = "anthropic-version" in http_request.headers
        try:
            found = await list_models()
            if name not in found:
                raise ModelNotFound("No hive has that model.", details={"field": "model"},
                                    hint="GET /v1/models lists the models there are.")
        except RbeeError as error:
            return anthropic_error(error) if anthropic else openai_error(error)
        return Response(_encode(described(name, found[name], anthropic)), content_type="application/json")

    async def answer(decoder: msgspec.json.Decoder[Any], to_params: Callable[[Any], GenerationParams],
                     *, chat: bool) -> Response:
        try:
            request = decode_body(await read_body(), decoder)
            params = to_params(request)
            answer = Answer(generate, request.model, params, deadline=deadline(), streams=streams)
        except RbeeError as error:
            return openai_error(error)
        return await _Reply(request, params, answer, chat=chat).respond()

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


class _Reply:
    """One OpenAI answer, chat or legacy completion, whole or streamed (SSE chunks)."""

    def __init__(
        self, request: CommonRequest, params: GenerationParams, answer: Answer, *, chat: bool
    ) -> None:
        self.request = request
        self.answer = answer
        self.chat = chat
        self.ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.usage = answer.usage
        self.tools = [tool.name for tool in params.tools] if params.tool_choice != "none" else []
        echoed = isinstance(request, CompletionRequest) and request.echo
        self.echo = (params.prompt or "") if echoed else ""
        self.wants_logprobs = params.logprobs is not None
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)

    async def respond(self) -> Response:
        if not self.request.stream:
            return await self.whole()
        try:
            first = await self.answer.first()
        except RbeeError as error:
            return openai_error(error)
        return sse_response(self.frames(first))

    def usage_body(self) -> dict[str, Any]:
        usage = self.usage
        return {
            "prompt_tokens": usage.tokens_in,
            "completion_tokens": usage.tokens_out,
            "total_tokens": usage.tokens_in + usage.tokens_out,
            "prompt_tokens_details": {"cached_tokens": usage.tokens_cached},
        }

    def finish(self, calls: list[ToolCall]) -> str:
        if calls:
            return "tool_calls"
        return "length" if self.usage.stop_reason == "length" else "stop"

    def logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any] | None:
        if not self.wants_logprobs:
            return None
        return _chat_logprobs(entries) if self.chat else _completion_logprobs(entries, offset)

    async def whole(self) -> Response:
        try:
            content, calls, pieces = await self.answer.parsed(self.tools)
        except RbeeError as error:
            return openai_error(error)
        text = "".join(piece.t for piece in pieces)
        entries = [entry for piece in pieces for entry in piece.lp or []]
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": self.finish(calls),
            "logprobs": self.logprobs(entries, len(self.echo)),
        }
        if self.chat:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": content if content or not calls else None,
            }
            if calls:
                message["tool_calls"] = _wire_calls(calls)
            choice["message"] = message
        else:
            choice["text"] = self.echo + text
        body = {
            "id": self.ident,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.request.model,
            "choices": [choice],
            "usage": self.usage_body(),
        }
        return Response(_encode(body), content_type="application/json")

    def chunk(
        self,
        delta: dict[str, Any] | str,
        finish_reason: str | None,
        entries: list[TokenLogprob] | None = None,
        offset: int = 0,
    ) -> bytes:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish_reason,
            "logprobs": self.logprobs(entries or [], offset) if entries else None,
        }
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        body: dict[str, Any] = {
            "id": self.ident,
            "object": self.kind,
            "created": self.created,
            "model": self.request.model,
            "choices": [choice],
        }
        if self.include_usage:
            body["usage"] = None
        return b"data: " + _encode(body) + b"\n\n"

    def call_chunk(self, delta: toolcalls.CallDelta) -> bytes:
        part: dict[str, Any] = {"index": delta.number, "function": {"arguments": delta.arguments}}
        if delta.id is not None:  # a call's first delta: its id and name
            part.update(id=delta.id, type="function")
            part["function"]["name"] = delta.name
        return self.chunk({"tool_calls": [part]}, None)

    def usage_chunk(self) -> bytes:
        body = {
            "id": self.ident,
            "object": self.kind,
            "created": self.created,
            "model": self.request.model,
            "choices": [],
            "usage": self.usage_body(),
        }
        return b"data: " + _encode(body) + b"\n\n"

    async def frames(self, first: InferenceToken | None) -> AsyncIterator[bytes]:
        chat, chunk = self.chat, self.chunk
        held = toolcalls.ToolStream(self.tools) if self.tools else None
        pending: list[TokenLogprob] = []
        offset = len(self.echo)
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, None)
            elif self.echo:
                yield chunk(self.echo, None)
            piece: InferenceToken | None = first
            while piece is not None:
                pending.extend(piece.lp or [])
                shown = held.feed(piece.t) if held is not None else piece.t
                if shown:
                    yield chunk({"content": shown} if chat else shown, None, pending, offset)
                    offset += len(shown)
                    pending = []
                for delta in held.deltas() if held is not None else []:
                    yield self.call_chunk(delta)
                piece = await self.answer.next()
            rest, calls, last = held.finish() if held is not None else ("", [], [])
            if rest:
                yield chunk({"content": rest}, None, pending)
                pending = []
            for delta in last:
                yield self.call_chunk(delta)
            yield chunk({} if chat else "", self.finish(calls), pending or None, offset)
            if self.include_usage:
                yield self.usage_chunk()
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
            await self.answer.aclose()
