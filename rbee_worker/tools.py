"""Tool calls on the way in: the chat template's messages and the grammar that forces a call.

A template that knows tools (it mentions `tools`, as Hermes/Qwen, Llama 3.x
and Mistral templates do) gets them as llama-server's `--jinja` passes them:
`tools` in OpenAI's shape, assistant turns with `tool_calls` (arguments as
objects), `tool` turns with `tool_call_id`. A template that does not (SmolLM2's
plain ChatML) gets llama-server's "generic" treatment instead: a system
message lists the functions and asks for a JSON call, an earlier call is the
assistant's JSON text, and a tool's result is a user turn that says whose
result it is.

Under `tool_choice="required"` or a named tool, a grammar (from a JSON schema)
forces the output to be a call, `{"name": ..., "arguments": {...}}`, or a list
of calls when parallel calls are allowed. The queen parses what comes out
(`rbee_queen.dialects.toolcalls`).
"""

from __future__ import annotations

import json
from typing import Any

from rbee_common.wire import ChatMessage, InferenceRequest, Tool, ToolCall

GENERIC_PROMPT = (
    "You can call functions. To call one, answer with only a JSON object "
    '{"name": <function name>, "arguments": <object of arguments>}; to call several, answer with a '
    "JSON list of such objects. Otherwise answer normally.\nThe functions:\n"
)


def knows_tools(template: str) -> bool:
    return "tools" in template


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments


def _spec(tool: Tool) -> dict[str, Any]:
    return {"name": tool.name, "description": tool.description, "parameters": tool.parameters}


def template_messages(request: InferenceRequest, template: str) -> tuple[list[dict[str, Any]], Any]:
    """The messages and `tools` to render `request` with `template`."""
    messages = request.messages or []
    tools = request.tools if request.tool_choice != "none" else []
    if knows_tools(template):
        return [_native(m) for m in messages], (
            [{"type": "function", "function": _spec(tool)} for tool in tools] or None
        )
    rendered = [_generic(m) for m in messages]
    if tools:
        listing = GENERIC_PROMPT + "\n".join(json.dumps(_spec(tool)) for tool in tools)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": rendered[0]["content"] + "\n\n" + listing}
        else:
            rendered.insert(0, {"role": "system", "content": listing})
    return rendered, None


def _native(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments(call)},
            }
            for call in message.tool_calls
        ]
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
        if message.name:
            out["name"] = message.name
    return out


def _generic(message: ChatMessage) -> dict[str, Any]:
    if message.tool_calls:
        calls = [{"name": call.name, "arguments": _arguments(call)} for call in message.tool_calls]
        text = json.dumps(calls[0] if len(calls) == 1 else calls)
        return {"role": "assistant", "content": (message.content + "\n" if message.content else "") + text}
    if message.role == "tool":
        who = message.name or message.tool_call_id or "the function"
        return {"role": "user", "content": f"The result of {who}: {message.content}"}
    return {"role": message.role, "content": message.content}


def _call_schema(tool: Tool) -> dict[str, Any]:
    arguments = dict(tool.parameters) or {"type": "object"}
    if arguments.get("type") == "object":
        arguments.setdefault("additionalProperties", False)  # no invented arguments
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": arguments},
        "required": ["name", "arguments"],
    }


def forced_call_schema(request: InferenceRequest) -> dict[str, Any] | None:
    """The JSON schema every answer must match, when the request forces a call."""
    if request.tool_name is not None:
        tools = [tool for tool in request.tools if tool.name == request.tool_name]
    elif request.tool_choice == "required":
        tools = list(request.tools)
    else:
        return None
    calls = [_call_schema(tool) for tool in tools]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "array", "items": one, "minItems": 1} if request.parallel_tool_calls else one
