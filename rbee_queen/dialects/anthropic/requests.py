"""Anthropic's Messages requests as Claude Code and the SDK send them, and their GenerationParams."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any, Literal

import msgspec

from rbee_common.errors import ValidationFailed
from rbee_common.wire import ChatMessage, GenerationParams, ToolCall
from rbee_queen.dialects import toolcalls
from rbee_queen.dialects.common import (
    fold_system,
    named,
    note_once,
    tool_of,
)

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


decoder = msgspec.json.Decoder(MessagesRequest)


count_decoder = msgspec.json.Decoder(CountTokensRequest)


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


def params_of(request: MessagesRequest, session: str | None = None) -> GenerationParams:
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
    fields["session"] = session[:256] if session else session_of(request.metadata)
    return GenerationParams(**fields)


def session_of(metadata: dict[str, Any] | None) -> str | None:
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
