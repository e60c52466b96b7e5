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

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from quart import Response
from quart import request as http_request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.errors import RbeeError
from rbee_common.http import OpenStreams, read_body, sse_response
from rbee_common.validation import decode_body
from rbee_common.wire import GenerationParams, ToolCall
from rbee_queen.dialects import toolcalls
from rbee_queen.dialects.anthropic.requests import (
    MessagesRequest,
    count_decoder,
    decoder,
    params_of,
)
from rbee_queen.dialects.common import ERROR_TYPES as BASE_TYPES
from rbee_queen.dialects.common import (
    Answer,
    Generate,
    Streamed,
    Usage,
    context_numbers,
    error_response,
    frames_of,
)

_encode = msgspec.json.Encoder().encode
log = logging.getLogger("rbee.queen.anthropic")














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










def _stop(usage: Usage, calls: list[ToolCall], stops: list[str]) -> tuple[str, str | None]:
    if calls:
        return "tool_use", None
    if usage.stop_reason == "length":
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
            request = decode_body(await read_body(), count_decoder)
            count = await count_tokens(request.model, params_of(request))
        except RbeeError as error:
            return anthropic_error(error)
        return Response(_encode({"input_tokens": count}), content_type="application/json")

    @app.post("/v1/messages")
    async def anthropic_messages() -> Response:
        try:
            request = decode_body(await read_body(), decoder)
            params = params_of(request, http_request.headers.get("X-Claude-Code-Session-Id"))
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
        "input_tokens": usage.tokens_in - usage.tokens_cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.tokens_cached,
        "output_tokens": usage.tokens_out,
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
