"""The OpenAI-compatible API on the queen (DESIGN §3): models, chat, completions, embeddings.

Errors on these routes use OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`, so that the official clients raise their usual classes.

Every request field is honoured or refused with a 400 that names it: an
unknown field is refused by the decoder, and `_REFUSED` lists the known ones
rbee does not do, with what it does accept of them (`n=1`, `store=false`, …).
"""

from __future__ import annotations

import base64
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import msgspec
from quart import Response
from quart import request as http_request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.errors import RbeeError, ValidationFailed
from rbee_common.http import OpenStreams, read_body, sse_response
from rbee_common.validation import decode_body
from rbee_common.wire import (
    ChatMessage,
    EmbedRequest,
    GenerationParams,
    InferenceToken,
    ResponseFormat,
    TokenLogprob,
    ToolCall,
)
from rbee_queen import toolcalls
from rbee_queen.dialects import (
    ERROR_TYPES,
    Answer,
    Embed,
    Generate,
    ListModels,
    Usage,
    check_choice,
    error_response,
    tool_of,
)

_encode = msgspec.json.Encoder().encode
log = logging.getLogger("rbee.queen.openai")

__all__ = ["Usage", "add_openai_routes", "openai_error"]


class _Part(msgspec.Struct, kw_only=True):
    type: str = "text"
    text: str = ""


class _CallFunction(msgspec.Struct, kw_only=True):
    name: str
    arguments: str = "{}"


class _CallIn(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: _CallFunction


class _Message(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[_Part] | None = None
    name: str | None = None
    tool_calls: list[_CallIn] | None = None
    tool_call_id: str | None = None


class _StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False


class _JsonSchema(msgspec.Struct, kw_only=True):
    name: str = "response"
    schema: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None
    description: str | None = None


class _ResponseFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: _JsonSchema | None = None


class _Function(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _Tool(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: _Function


class _Named(msgspec.Struct, kw_only=True):
    name: str


class _NamedChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: _Named


class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
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
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    """Who the end user is: written in the queen's log with the request."""


class ChatRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    messages: list[_Message]
    max_completion_tokens: int | None = None
    response_format: _ResponseFormat | None = None
    tools: list[_Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Accepted with no effect on the answer (what they ask for, rbee does anyway):
    prompt_cache_key: str | None = None
    """The worker reuses any cached prefix by itself."""
    safety_identifier: str | None = None
    # Refused unless left at what rbee does (`_REFUSED`):
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


class CompletionRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


_chat_decoder = msgspec.json.Decoder(ChatRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_embedding_decoder = msgspec.json.Decoder(EmbeddingRequest)

_REFUSED: list[tuple[str, Callable[[Any], bool], str]] = [
    ("n", lambda v: v in (None, 1), "Only one choice per request (`n=1`); send several requests."),
    ("best_of", lambda v: v in (None, 1), "Only `best_of=1`."),
    ("store", lambda v: not v, "rbee keeps no completions (`store` may only be false)."),
    ("metadata", lambda v: not v, "`metadata` belongs to stored completions, which rbee does not keep."),
    ("service_tier", lambda v: v in (None, "auto", "default"), "rbee has one service tier (`auto`)."),
    ("modalities", lambda v: v in (None, ["text"]), 'rbee answers with text only (`modalities: ["text"]`).'),
    ("audio", lambda v: v is None, "rbee answers with text only; `audio` is not available."),
    ("prediction", lambda v: v is None, "Predicted outputs are not supported."),
    ("reasoning_effort", lambda v: v is None, "rbee's models take no `reasoning_effort`."),
    ("verbosity", lambda v: v is None, "rbee's models take no `verbosity`."),
    ("web_search_options", lambda v: v is None, "rbee does not search the web."),
    ("functions", lambda v: v is None, "`functions` is OpenAI's old form: send `tools`."),
    ("function_call", lambda v: v is None, "`function_call` is OpenAI's old form: send `tool_choice`."),
    ("suffix", lambda v: v is None, "Fill-in-the-middle (`suffix`) is not supported."),
]
"""Known fields rbee does not honour: what of them it accepts, and why not the rest."""

OPENAI_TYPES = ERROR_TYPES


def openai_error(error: RbeeError) -> Response:
    body = {
        "error": {
            "message": error.message,
            "type": OPENAI_TYPES.get(error.status, "server_error"),
            "param": error.details.get("field"),
            "code": error.code.lower(),
        }
    }
    return error_response(body, error)


def _refuse_unsupported(request: msgspec.Struct) -> None:
    for name, accepted, why in _REFUSED:
        if hasattr(request, name) and not accepted(getattr(request, name)):
            raise ValidationFailed(why, details={"field": name})


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not key.isdigit():
            raise ValidationFailed("`logit_bias` keys are token ids.", details={"field": "logit_bias"})
        out[int(key)] = value
    return out


def _params(
    request: _Common, *, prompt: str | None, messages: list[ChatMessage] | None, **extra: Any
) -> GenerationParams:
    _refuse_unsupported(request)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    fields: dict[str, Any] = {
        "prompt": prompt,
        "messages": messages,
        "stop": stop,
        "seed": request.seed,
        "logit_bias": _logit_bias(request.logit_bias),
        **extra,
    }
    # Unset: until the context is full or the model stops, as OpenAI does.
    fields["max_tokens"] = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if request.temperature is not None:
        fields["temperature"] = request.temperature
    for name in ("top_p", "frequency_penalty", "presence_penalty", "top_k", "min_p", "repeat_penalty"):
        if (value := getattr(request, name)) is not None:
            fields[name] = value
    if request.user:
        log.info("request for user=%s", request.user[:64])
    return GenerationParams(**fields)


def _text(content: str | list[_Part] | None, field: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type != "text":
            raise ValidationFailed(
                f"rbee's models take text only, not `{part.type[:32]}` parts.", details={"field": field}
            )
    return "".join(part.text for part in content)


def _messages(request: ChatRequest) -> list[ChatMessage]:
    if not request.messages:
        raise ValidationFailed("`messages` must not be empty.", details={"field": "messages"})
    out = []
    for k, m in enumerate(request.messages):
        calls = [
            ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
            for c in m.tool_calls or []
        ]
        if m.role == "tool" and not m.tool_call_id:
            raise ValidationFailed(
                "A `tool` message needs its `tool_call_id`.", details={"field": f"messages[{k}].tool_call_id"}
            )
        out.append(
            ChatMessage(
                role="system" if m.role == "developer" else m.role,
                content=_text(m.content, f"messages[{k}].content"),
                tool_calls=calls,
                tool_call_id=m.tool_call_id,
                name=m.name,
            )
        )
    return out


def _chat_tools(request: ChatRequest) -> dict[str, Any]:
    """`tools`, `tool_choice`, `parallel_tool_calls` and logprobs as generation parameters."""
    tools = [
        tool_of(t.function.name, t.function.description, t.function.parameters, f"tools[{k}]")
        for k, t in enumerate(request.tools or [])
    ]
    choice = request.tool_choice
    name = choice.function.name if isinstance(choice, _NamedChoice) else None
    mode = "auto" if choice is None or isinstance(choice, _NamedChoice) else choice
    check_choice(tools, mode, name, "tool_choice")
    extra: dict[str, Any] = {"tools": tools, "tool_choice": mode, "tool_name": name}
    if request.parallel_tool_calls is not None:
        extra["parallel_tool_calls"] = request.parallel_tool_calls
    if request.top_logprobs is not None and not 0 <= request.top_logprobs <= 20:
        raise ValidationFailed("`top_logprobs` must be between 0 and 20.", details={"field": "top_logprobs"})
    if request.top_logprobs is not None and not request.logprobs:
        raise ValidationFailed("`top_logprobs` needs `logprobs: true`.", details={"field": "top_logprobs"})
    if request.logprobs:
        extra["logprobs"] = request.top_logprobs or 0
    if request.response_format is not None and request.response_format.type != "text":
        schema = request.response_format.json_schema
        extra["response_format"] = ResponseFormat(
            type=request.response_format.type,
            json_schema={"schema": schema.schema} if schema is not None and schema.schema else None,
        )
    return extra


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


def _embedding_inputs(value: str | list[Any]) -> list[str | list[int]]:
    def bad(message: str) -> ValidationFailed:
        return ValidationFailed(
            message,
            details={"field": "input"},
            hint="Send a string, a list of strings, a list of token ids, or a list of those.",
        )

    if isinstance(value, str):
        items: list[Any] = [value]
    elif value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        items = [value]
    else:
        items = value
    if not items:
        raise bad("`input` must not be empty.")
    if len(items) > 2048:
        raise bad("At most 2048 inputs per request.")
    out: list[str | list[int]] = []
    for item in items:
        if (isinstance(item, str) and item) or (
            isinstance(item, list)
            and item
            and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        ):
            out.append(item)
        else:
            raise bad("Each input must be a non-empty string or a non-empty list of token ids.")
    return out


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

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        try:
            request = decode_body(await read_body(), _chat_decoder)
            params = _params(request, prompt=None, messages=_messages(request), **_chat_tools(request))
            answer = Answer(generate, request.model, params, deadline=deadline(), streams=streams)
        except RbeeError as error:
            return openai_error(error)
        return await _respond(request, params, answer, chat=True)

    @app.post("/v1/completions")
    async def completions() -> Response:
        try:
            request = decode_body(await read_body(), _completion_decoder)
            prompt = request.prompt if isinstance(request.prompt, str) else "".join(request.prompt[:1])
            if isinstance(request.prompt, list) and len(request.prompt) > 1:
                raise ValidationFailed("One prompt per request.", details={"field": "prompt"})
            if not prompt:
                raise ValidationFailed("`prompt` must not be empty.", details={"field": "prompt"})
            if request.logprobs is not None and not 0 <= request.logprobs <= 5:
                raise ValidationFailed("`logprobs` must be between 0 and 5.", details={"field": "logprobs"})
            params = _params(request, prompt=prompt, messages=None, logprobs=request.logprobs)
            answer = Answer(generate, request.model, params, deadline=deadline(), streams=streams)
        except RbeeError as error:
            return openai_error(error)
        return await _respond(request, params, answer, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        try:
            request = decode_body(await read_body(), _embedding_decoder)
            inputs = _embedding_inputs(request.input)
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


async def _respond(request: _Common, params: GenerationParams, answer: Answer, *, chat: bool) -> Response:
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
