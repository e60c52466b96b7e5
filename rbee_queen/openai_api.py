"""The OpenAI-compatible API on the queen (DESIGN §3): models, chat, completions.

Errors on these routes use OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`, so that the official clients raise their usual classes.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import msgspec
import trio
from quart import Response
from quart import request as http_request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.errors import RbeeError, ShuttingDown, ValidationFailed
from rbee_common.http import OpenStreams, read_body, sse_response
from rbee_common.validation import decode_body
from rbee_common.wire import ChatMessage, GenerationParams, ResponseFormat

_encode = msgspec.json.Encoder().encode
log = logging.getLogger("rbee.queen.openai")


class _Part(msgspec.Struct, kw_only=True):
    type: str = "text"
    text: str = ""


class _Message(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[_Part] | None = None


class _StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _JsonSchema(msgspec.Struct, kw_only=True):
    name: str = "response"
    schema: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class _ResponseFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: _JsonSchema | None = None


class _Common(msgspec.Struct, kw_only=True):
    model: str
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_k: int | None = None
    """llama.cpp's extensions, as llama-server and Ollama take them."""
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    response_format: _ResponseFormat | None = None


class ChatRequest(_Common, kw_only=True):
    messages: list[_Message]


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[str]


_chat_decoder = msgspec.json.Decoder(ChatRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error",
                422: "invalid_request_error",
                429: "rate_limit_error"}


def openai_error(error: RbeeError) -> Response:
    body = {"error": {
        "message": error.message, "type": OPENAI_TYPES.get(error.status, "server_error"),
        "param": error.details.get("field"), "code": error.code.lower(),
    }}
    response = Response(_encode(body), status=error.status, content_type="application/json")
    retry = error.details.get("retry_after_s")
    if isinstance(retry, int):
        response.headers["Retry-After"] = str(retry)
    return response


def _decode(body: bytes, decoder: msgspec.json.Decoder[Any]) -> Any:
    return decode_body(body, decoder)  # errors name the field, never echo the value


def _params(request: _Common, *, prompt: str | None, messages: list[ChatMessage] | None) -> GenerationParams:
    if request.n != 1:
        raise ValidationFailed("Only n=1 is supported.", details={"field": "n"})
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    fmt = None
    if request.response_format is not None and request.response_format.type != "text":
        schema = request.response_format.json_schema
        fmt = ResponseFormat(
            type=request.response_format.type,
            json_schema={"schema": schema.schema} if schema is not None and schema.schema else None,
        )
    fields: dict[str, Any] = {"prompt": prompt, "messages": messages, "stop": stop, "seed": request.seed,
                              "response_format": fmt}
    # Unset: until the context is full or the model stops, as OpenAI does.
    fields["max_tokens"] = request.max_completion_tokens or request.max_tokens
    if request.temperature is not None:
        fields["temperature"] = request.temperature
    for name in ("top_p", "frequency_penalty", "presence_penalty", "top_k", "min_p", "repeat_penalty"):
        if (value := getattr(request, name)) is not None:
            fields[name] = value
    return GenerationParams(**fields)


def _text(content: str | list[_Part] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content if part.type == "text")


Generate = Callable[[str, GenerationParams, "Usage", str | None], AsyncGenerator[str, None]]
ListModels = Callable[[], Awaitable[list[str]]]


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = "stop"


def add_openai_routes(
    app: QuartTrio, *, generate: Generate, list_models: ListModels,
    default_deadline_s: Callable[[], float] = lambda: 0.0, streams: OpenStreams | None = None,
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

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        try:
            request = _decode(await read_body(), _chat_decoder)
            if not request.messages:
                raise ValidationFailed("`messages` must not be empty.", details={"field": "messages"})
            messages = [
                ChatMessage(role="system" if m.role == "developer" else m.role, content=_text(m.content))
                for m in request.messages
            ]
            params = _params(request, prompt=None, messages=messages)
            until = deadline()
        except RbeeError as error:
            return openai_error(error)
        return await _respond(request, params, generate, chat=True, deadline=until, streams=streams)

    @app.post("/v1/completions")
    async def completions() -> Response:
        try:
            request = _decode(await read_body(), _completion_decoder)
            prompt = request.prompt if isinstance(request.prompt, str) else "".join(request.prompt[:1])
            if not prompt:
                raise ValidationFailed("`prompt` must not be empty.", details={"field": "prompt"})
            params = _params(request, prompt=prompt, messages=None)
            until = deadline()
        except RbeeError as error:
            return openai_error(error)
        return await _respond(request, params, generate, chat=False, deadline=until, streams=streams)


async def _respond(
    request: _Common, params: GenerationParams, generate: Generate, *, chat: bool, deadline: str | None,
    streams: OpenStreams,
) -> Response:
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    usage = Usage()
    pieces = generate(request.model, params, usage, deadline)

    def usage_body() -> dict[str, Any]:
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}

    def finish() -> str:
        return "length" if usage.finish_reason == "length" else "stop"

    until = deadlines.trio_deadline(deadline)

    def timed_out() -> RbeeError:
        log.warning("request timeout: the deadline %s passed", deadline)
        return deadlines.exceeded(deadline or "")

    if not request.stream:
        try:
            with trio.move_on_at(until) as scope:
                async with contextlib.aclosing(pieces) as stream:
                    text = "".join([piece async for piece in stream])
            if scope.cancelled_caught:
                raise timed_out()
        except RbeeError as error:
            return openai_error(error)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish(), "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": request.model, "choices": [choice], "usage": usage_body()}
        return Response(_encode(body), content_type="application/json")

    # Start the stream before answering, so that scheduling errors get a proper status code.
    first: str | None = None
    try:
        with trio.move_on_at(until) as scope:
            first = await pieces.__anext__()
        if scope.cancelled_caught:
            raise timed_out()
    except StopAsyncIteration:
        first = None
    except RbeeError as error:
        await pieces.aclose()
        return openai_error(error)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict[str, Any] | str, finish_reason: str | None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        body: dict[str, Any] = {"id": ident, "object": kind, "created": created, "model": request.model,
                                "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return b"data: " + _encode(body) + b"\n\n"

    async def next_piece() -> str | None:
        """The next piece, None at the end; SHUTTING_DOWN when the queen stops meanwhile."""
        with streams.guard() as scope:
            scope.deadline = until
            try:
                return await pieces.__anext__()
            except StopAsyncIteration:
                return None
        if scope.cancelled_caught and trio.current_time() >= until:
            raise timed_out()
        if scope.cancelled_caught:
            raise ShuttingDown("The queen is shutting down; this answer ends here.",
                               hint="Retry the request on a running queen.")
        return None

    async def frames() -> AsyncIterator[bytes]:
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, None)
            piece = first
            while piece is not None:
                yield chunk({"content": piece} if chat else piece, None)
                piece = await next_piece()
            yield chunk({} if chat else "", finish())
            if include_usage:
                body = {"id": ident, "object": kind, "created": created, "model": request.model,
                        "choices": [], "usage": usage_body()}
                yield b"data: " + _encode(body) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except RbeeError as error:
            body = {"error": {"message": error.message, "type": "server_error", "param": None,
                              "code": error.code.lower()}}
            yield b"data: " + _encode(body) + b"\n\n"
            yield b"data: [DONE]\n\n"  # the stream's terminator, after an error too
        finally:
            await pieces.aclose()

    return sse_response(frames())
