"""OpenAI's Responses requests as Codex CLI and the SDK send them, and their GenerationParams."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from rbee_common.errors import ValidationFailed
from rbee_common.wire import ChatMessage, GenerationParams, ResponseFormat, ToolCall
from rbee_queen.dialects import toolcalls
from rbee_queen.dialects.common import (
    fold_system,
    named,
    note_once,
    tool_of,
)


class _Part(msgspec.Struct, kw_only=True):
    type: str = "input_text"
    text: str | None = None


class _Item(msgspec.Struct, kw_only=True):
    """One input item; which fields count depends on `type`."""

    type: str = "message"
    role: str | None = None
    content: str | list[_Part] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[_Part] | None = None
    id: str | None = None
    status: str | None = None


class _Format(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None
    description: str | None = None


class _Text(msgspec.Struct, kw_only=True):
    format: _Format | None = None
    verbosity: str | None = None


class _NamedChoice(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: str | list[_Item] = ""
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | _NamedChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: _Text | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    # Accepted, logged once, not applied: they only tune or hint.
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    client_metadata: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    service_tier: str | None = None
    truncation: str | None = None
    max_tool_calls: int | None = None
    stream_options: dict[str, Any] | None = None
    top_logprobs: int | None = None
    # Refused unless left as they are: ignoring them would change the answer.
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None


decoder = msgspec.json.Decoder(ResponsesRequest)


_HINTS = ("reasoning", "include", "prompt_cache_key", "safety_identifier", "client_metadata", "metadata",
          "user", "service_tier", "truncation", "max_tool_calls", "stream_options", "top_logprobs")


def _text(content: str | list[_Part] | None, field: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for k, part in enumerate(content):
        if part.type not in ("input_text", "output_text", "text", "refusal"):
            raise ValidationFailed(f"rbee's models take text only, not `{named(part.type)}` parts.",
                                   details={"field": f"{field}[{k}]"})
        parts.append(part.text or "")
    return "".join(parts)


def messages_of(request: ResponsesRequest, earlier: list[ChatMessage]) -> list[ChatMessage]:
    """The conversation: an earlier response's, then this input (instructions not included)."""
    out = list(earlier)
    items = [_Item(role="user", content=request.input)] if isinstance(request.input, str) else request.input
    for k, item in enumerate(items):
        field = f"input[{k}]"
        if item.type == "message":
            role = {"developer": "system"}.get(item.role or "user", item.role or "user")
            if role not in ("system", "user", "assistant"):
                raise ValidationFailed("A message's role must be user, assistant, system or developer.",
                                       details={"field": f"{field}.role"})
            out.append(ChatMessage(role, _text(item.content, f"{field}.content")))  # type: ignore[arg-type]
        elif item.type == "function_call":
            call = ToolCall(id=item.call_id or toolcalls.new_call_id(), name=item.name or "",
                            arguments=item.arguments or "{}")
            if out and out[-1].role == "assistant":  # calls of one turn are one assistant message
                out[-1] = msgspec.structs.replace(out[-1], tool_calls=[*out[-1].tool_calls, call])
            else:
                out.append(ChatMessage("assistant", "", tool_calls=[call]))
        elif item.type == "function_call_output":
            result = _text(item.output, f"{field}.output")
            out.append(ChatMessage("tool", result, tool_call_id=item.call_id or ""))
        elif item.type == "reasoning":
            continue  # rbee's models produce none, and another model's are not for them
        else:
            raise ValidationFailed(f"An input item of type `{named(item.type)}` is not supported.",
                                   details={"field": f"{field}.type"},
                                   hint="Send message, function_call and function_call_output items.")
    if not out:
        raise ValidationFailed("`input` must not be empty.", details={"field": "input"})
    return out


def params_of(request: ResponsesRequest, messages: list[ChatMessage]) -> GenerationParams:
    for hint in _HINTS:
        if getattr(request, hint) is not None:
            note_once(hint)
    if request.background:
        raise ValidationFailed("rbee answers in the foreground; leave out `background`.",
                               details={"field": "background"})
    for field in ("conversation", "prompt"):
        if getattr(request, field) is not None:
            raise ValidationFailed(f"rbee does not keep `{field}` objects; send the input itself.",
                                   details={"field": field})
    if request.max_output_tokens is not None and request.max_output_tokens < 1:
        raise ValidationFailed("`max_output_tokens` must be 1 or more.",
                               details={"field": "max_output_tokens"})
    tools = []
    for k, spec in enumerate(request.tools or []):
        if spec.get("type") != "function":
            note_once("tools that are not functions (web_search, namespace, ...: not offered to the model)")
            continue
        tools.append(tool_of(str(spec.get("name") or ""), spec.get("description"), spec.get("parameters"),
                             f"tools[{k}]"))
    choice = request.tool_choice
    name = choice.name if isinstance(choice, _NamedChoice) else None
    mode = choice if isinstance(choice, str) else ("auto" if choice is None else "required")
    fmt = request.text.format if request.text is not None else None
    response_format = None
    if fmt is not None and fmt.type != "text":
        response_format = ResponseFormat(type=fmt.type, json_schema={"name": fmt.name or "response",
                                                                     "schema": fmt.schema or {}}
                                         if fmt.type == "json_schema" else None)
    system = request.instructions or ""
    fields: dict[str, Any] = {
        "messages": fold_system(([ChatMessage("system", system)] if system else []) + messages),
        "max_tokens": request.max_output_tokens,
        "tools": tools, "tool_choice": mode if name is None else "auto", "tool_name": name,
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "response_format": response_format,
        "session": (request.prompt_cache_key or request.user or "")[:256] or None,
    }
    for field in ("temperature", "top_p"):
        if (value := getattr(request, field)) is not None:
            fields[field] = value
    try:
        return msgspec.convert(fields, GenerationParams)
    except msgspec.ValidationError as error:
        raise ValidationFailed(f"A field has the wrong type ({str(error)[:80]}).") from None
