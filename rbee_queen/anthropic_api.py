"""Anthropic's Messages API on the queen: `POST /v1/messages`, as the official clients speak it.

System prompt, messages of content blocks (text, `tool_use`, `tool_result`),
`max_tokens`, `stop_sequences`, sampling fields, tools and `tool_choice`;
streamed as Anthropic's event sequence (`message_start`, `content_block_*`,
`message_delta`, `message_stop`). Errors take Anthropic's shape,
`{"type": "error", "error": {"type", "message"}}`. The client's key may come as
`x-api-key` (its default) or `Authorization: Bearer`.

As Claude Code sends it: `system`-role messages anywhere in the conversation
are folded into the next user turn (the system prompt when they come first),
since most chat templates take one system message, first. Fields that only
tune or hint (`thinking` of any type, `context_management`, `output_config`,
`metadata`, `cache_control`, the `anthropic-beta` header and `?beta=true`)
are accepted and logged once per kind; a text block of the system prompt
that starts `x-anthropic-billing-header:` changes with every session and
version, so it is dropped before rendering and two turns share their cached
prefix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import msgspec
from quart import Response
from quart import request as http_request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.errors import RbeeError, ValidationFailed
from rbee_common.http import OpenStreams, read_body, sse_response
from rbee_common.validation import decode_body
from rbee_common.wire import ChatMessage, GenerationParams, ToolCall
from rbee_queen import toolcalls
from rbee_queen.dialects import ERROR_TYPES as BASE_TYPES
from rbee_queen.dialects import (
    Answer,
    Generate,
    Streamed,
    Usage,
    check_choice,
    context_numbers,
    error_response,
    fold_system,
    frames_of,
    named,
    note_once,
    tool_of,
)

_encode = msgspec.json.Encoder().encode
log = logging.getLogger("rbee.queen.anthropic")
_VOLATILE = re.compile(r"^\s*x-anthropic-billing-header:", re.IGNORECASE)
"""A system text block that differs per session: kept out of the prompt (and its cache)."""


class _Block(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[_Block] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None


class _Message(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant", "system"]
    content: str | list[_Block]


class _Tool(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None
    cache_control: dict[str, Any] | None = None


class _ToolChoice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    max_tokens: int
    messages: list[_Message]
    system: str | list[_Block] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[_Tool] | None = None
    tool_choice: _ToolChoice | None = None
    # Accepted, logged once, not applied: they only tune or hint.
    metadata: dict[str, Any] | None = None
    """`user_id` (Claude Code sends a JSON string) goes nowhere but the request."""
    cache_control: dict[str, Any] | None = None
    """The worker reuses a cached prompt prefix by itself."""
    thinking: dict[str, Any] | None = None
    """Any type: no thinking blocks come back unless the model's template makes them."""
    context_management: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    """`effort`: how hard to think; rbee's models answer as they do."""
    service_tier: str | None = None


class CountTokensRequest(MessagesRequest, kw_only=True, forbid_unknown_fields=True):
    """`POST /v1/messages/count_tokens`: a message request without `max_tokens`."""

    max_tokens: int = 1


_decoder = msgspec.json.Decoder(MessagesRequest)
_count_decoder = msgspec.json.Decoder(CountTokensRequest)
CountTokens = Callable[[str, GenerationParams], Awaitable[int]]

ERROR_TYPES = {**BASE_TYPES, 413: "request_too_large", 503: "overloaded_error"}


def anthropic_error(error: RbeeError) -> Response:
    """An error in Anthropic's shape (the model routes, shared with OpenAI's, use it too)."""
    return error_response({"type": "error", "error": _error_body(error)}, error)


def _error_body(error: RbeeError) -> dict[str, str]:
    numbers = context_numbers(error)
    message = error.message if numbers is None else \
        f"prompt is too long: {numbers[0]} tokens > {numbers[1]} maximum"
    return {"type": ERROR_TYPES.get(error.status, "api_error"), "message": message}


def _text_of(blocks: str | list[_Block] | None, field: str, *, volatile: bool = False) -> str:
    """The text of `blocks`; with `volatile`, without the blocks that change every session."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    parts = []
    for block in blocks:
        if block.type != "text":
            raise ValidationFailed(
                f"Here a `{named(block.type)}` block is not supported; send text.", details={"field": field}
            )
        if volatile and _VOLATILE.match(block.text or ""):
            continue
        parts.append(block.text or "")
    return "\n\n".join(part for part in parts if part) if volatile else "".join(parts)


def _messages(request: MessagesRequest) -> list[ChatMessage]:
    system = _text_of(request.system, "system", volatile=True)
    out: list[ChatMessage] = [ChatMessage("system", system)] if system else []
    if not request.messages:
        raise ValidationFailed("`messages` must not be empty.", details={"field": "messages"})
    for k, message in enumerate(request.messages):
        if message.role == "system":  # Claude Code's reminders: `fold_system` places them
            said = _text_of(message.content, f"messages[{k}].content", volatile=True)
            out.append(ChatMessage("system", said))
            continue
        if isinstance(message.content, str):
            out.append(ChatMessage(message.role, message.content))
            continue
        text: list[str] = []
        calls: list[ToolCall] = []
        for j, block in enumerate(message.content):
            where = f"messages[{k}].content[{j}]"
            if block.type == "text":
                text.append(block.text or "")
            elif block.type == "tool_use" and message.role == "assistant":
                calls.append(
                    ToolCall(
                        id=block.id or toolcalls.new_call_id(),
                        name=block.name or "",
                        arguments=json.dumps(block.input or {}),
                    )
                )
            elif block.type == "tool_result" and message.role == "user":
                result = _text_of(block.content, where + ".content")
                out.append(
                    ChatMessage(
                        "tool",
                        ("Error: " if block.is_error else "") + result,
                        tool_call_id=block.tool_use_id or "",
                    )
                )
            elif block.type in ("thinking", "redacted_thinking"):
                continue  # another model's thoughts are not for this one
            else:
                raise ValidationFailed(
                    f"A `{named(block.type)}` block is not supported in a {message.role} message.",
                    details={"field": where},
                    hint="rbee's models take text, tool_use and tool_result blocks.",
                )
        if text or calls:
            out.append(ChatMessage(message.role, "".join(text), tool_calls=calls))
    return fold_system(out)


def _params(request: MessagesRequest, session: str | None = None) -> GenerationParams:
    """What the worker is asked; `session` is Claude Code's `X-Claude-Code-Session-Id` header, which
    wins over `metadata.user_id`."""
    for kind in ("thinking", "context_management", "output_config", "metadata", "cache_control"):
        if getattr(request, kind) is not None:
            note_once(kind)
    if request.service_tier not in (None, "auto", "standard_only"):
        raise ValidationFailed("rbee has one service tier.", details={"field": "service_tier"})
    if request.max_tokens < 1:
        raise ValidationFailed("`max_tokens` must be 1 or more.", details={"field": "max_tokens"})
    for k, tool in enumerate(request.tools or []):
        if tool.type not in (None, "custom"):
            raise ValidationFailed(
                "Only custom tools (with an `input_schema`) are supported.", details={"field": f"tools[{k}]"}
            )
    tools = [
        tool_of(t.name, t.description, t.input_schema, f"tools[{k}]")
        for k, t in enumerate(request.tools or [])
    ]
    choice = request.tool_choice
    mode = (
        {"auto": "auto", "any": "required", "tool": "auto", "none": "none"}[choice.type] if choice else "auto"
    )
    name = choice.name if choice is not None and choice.type == "tool" else None
    if choice is not None and choice.type == "tool" and not name:
        raise ValidationFailed(
            "`tool_choice` of type `tool` needs a `name`.", details={"field": "tool_choice"}
        )
    check_choice(tools, mode, name, "tool_choice")
    fields: dict[str, Any] = {
        "messages": _messages(request),
        "max_tokens": request.max_tokens,
        "stop": request.stop_sequences or [],
        "tools": tools,
        "tool_choice": mode,
        "tool_name": name,
        "parallel_tool_calls": not (choice is not None and choice.disable_parallel_tool_use),
    }
    for field in ("temperature", "top_p", "top_k"):
        if (value := getattr(request, field)) is not None:
            fields[field] = value
    fields["session"] = session[:256] if session else _session(request.metadata)
    return GenerationParams(**fields)


def _session(metadata: dict[str, Any] | None) -> str | None:
    """The conversation a request belongs to: `metadata.user_id`, whose JSON Claude Code fills with
    its `session_id` (a user's sessions differ), else the id as it is."""
    user = (metadata or {}).get("user_id")
    if not isinstance(user, str) or not user:
        return None
    with contextlib.suppress(ValueError):
        said = json.loads(user)
        if isinstance(said, dict) and isinstance(said.get("session_id"), str):
            return str(said["session_id"])[:256]
    return user[:256]


def _stop(usage: Usage, calls: list[ToolCall], stops: list[str]) -> tuple[str, str | None]:
    if calls:
        return "tool_use", None
    if usage.finish_reason == "length":
        return "max_tokens", None
    if usage.stop_sequence is not None and usage.stop_sequence in stops:
        return "stop_sequence", usage.stop_sequence
    return "end_turn", None


def _tool_block(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": toolcalls.arguments_object(call)}


def add_anthropic_routes(
    app: QuartTrio,
    *,
    generate: Generate,
    count_tokens: CountTokens,
    default_deadline_s: Callable[[], float],
    streams: OpenStreams,
) -> None:
    @app.post("/v1/messages/count_tokens")
    async def anthropic_count_tokens() -> Response:
        """The prompt's tokens as a worker of the model renders it (its tokenizer and template)."""
        try:
            request = decode_body(await read_body(), _count_decoder)
            count = await count_tokens(request.model, _params(request))
        except RbeeError as error:
            return anthropic_error(error)
        return Response(_encode({"input_tokens": count}), content_type="application/json")

    @app.post("/v1/messages")
    async def anthropic_messages() -> Response:
        try:
            request = decode_body(await read_body(), _decoder)
            params = _params(request, http_request.headers.get("X-Claude-Code-Session-Id"))
            until = deadlines.from_headers(http_request.headers, default_s=default_deadline_s() or None)
            answer = Answer(generate, request.model, params, deadline=until, streams=streams)
        except RbeeError as error:
            return anthropic_error(error)
        return await _respond(request, params, answer)


def _usage(usage: Usage) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` are the prompt's tokens that were not in the cache, the
    rest are `cache_read_input_tokens` (their sum is the prompt). The stream's `message_delta`
    carries all of them: the SDKs and Claude Code take the cache's numbers from it."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
    }


async def _respond(request: MessagesRequest, params: GenerationParams, answer: Answer) -> Response:
    ident = "msg_" + uuid.uuid4().hex
    usage = answer.usage
    tools = [tool.name for tool in params.tools] if params.tool_choice != "none" else []
    stops = list(params.stop)

    def message(
        content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None
    ) -> dict[str, Any]:
        return {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": _usage(usage),
        }

    if not request.stream:
        try:
            text, calls, _ = await answer.parsed(tools)
        except RbeeError as error:
            return anthropic_error(error)
        content = ([{"type": "text", "text": text}] if text or not calls else []) + [
            _tool_block(c) for c in calls
        ]
        reason, sequence = _stop(usage, calls, stops)
        return Response(_encode(message(content, reason, sequence)), content_type="application/json")

    try:
        first = await answer.first()
    except RbeeError as error:
        return anthropic_error(error)

    def event(kind: str, body: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: ".encode() + _encode({"type": kind, **body}) + b"\n\n"

    async def frames() -> AsyncIterator[bytes]:
        index = -1
        open_kind: str | None = None

        def begin(block: dict[str, Any]) -> list[bytes]:
            """Close the open block and open the next."""
            nonlocal index, open_kind
            frames = [event("content_block_stop", {"index": index})] if open_kind else []
            index += 1
            open_kind = block["type"]
            return [*frames, event("content_block_start", {"index": index, "content_block": block})]

        def text(shown: str) -> list[bytes]:
            frames = begin({"type": "text", "text": ""}) if open_kind != "text" else []
            delta = {"type": "text_delta", "text": shown}
            return (
                [*frames, event("content_block_delta", {"index": index, "delta": delta})] if shown else frames
            )

        def call(delta: toolcalls.CallDelta) -> list[bytes]:
            frames = []
            if delta.id is not None:
                frames = begin({"type": "tool_use", "id": delta.id, "name": delta.name, "input": {}})
            if delta.arguments:
                json_delta = {"type": "input_json_delta", "partial_json": delta.arguments}
                frames.append(event("content_block_delta", {"index": index, "delta": json_delta}))
            return frames

        left = Streamed()
        try:
            yield event("message_start", {"message": message([], None, None)})
            async for frame in frames_of(first, answer, tools, text, call, left):
                yield frame
            if left.rest or open_kind is None:  # an answer has at least one block
                for frame in text(left.rest):
                    yield frame
            yield event("content_block_stop", {"index": index})
            reason, sequence = _stop(usage, left.calls, stops)
            yield event(
                "message_delta",
                {
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": _usage(usage),
                },
            )
            yield event("message_stop", {})
        except RbeeError as error:
            yield event("error", {"error": _error_body(error)})
        finally:
            await answer.aclose()

    return sse_response(frames())
