"""OpenAI's request bodies, as the queen decodes and checks them, and what they become: the
worker's generation parameters (`chat_params`, `completion_params`) or embedding inputs.

Every field is honoured or refused with a 400 that names it: the decoders
refuse unknown fields, and `_REFUSED` lists the known ones rbee does not do,
with what it accepts of them (`n=1`, `store=false`, …).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from rbee_common.errors import ValidationFailed
from rbee_common.wire import ChatMessage, GenerationParams, ResponseFormat, ToolCall, check_embed_inputs
from rbee_queen.dialects.common import named, tool_of

log = logging.getLogger("rbee.queen.openai")


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


class CommonRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
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


class ChatRequest(CommonRequest, kw_only=True, forbid_unknown_fields=True):
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


class CompletionRequest(CommonRequest, kw_only=True, forbid_unknown_fields=True):
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


chat_decoder = msgspec.json.Decoder(ChatRequest)
completion_decoder = msgspec.json.Decoder(CompletionRequest)
embedding_decoder = msgspec.json.Decoder(EmbeddingRequest)

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
    request: CommonRequest, *, prompt: str | None, messages: list[ChatMessage] | None, **extra: Any
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
    session = getattr(request, "prompt_cache_key", None) or request.user
    fields["session"] = session[:256] if session else None
    return GenerationParams(**fields)


def _text(content: str | list[_Part] | None, field: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type != "text":
            raise ValidationFailed(
                f"rbee's models take text only, not `{named(part.type)}` parts.", details={"field": field}
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


def embedding_inputs(value: str | list[Any]) -> list[str | list[int]]:
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
    check_embed_inputs(items)
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


def chat_params(request: ChatRequest) -> GenerationParams:
    return _params(request, prompt=None, messages=_messages(request), **_chat_tools(request))


def completion_params(request: CompletionRequest) -> GenerationParams:
    prompt = request.prompt if isinstance(request.prompt, str) else "".join(request.prompt[:1])
    if isinstance(request.prompt, list) and len(request.prompt) > 1:
        raise ValidationFailed("One prompt per request.", details={"field": "prompt"})
    if not prompt:
        raise ValidationFailed("`prompt` must not be empty.", details={"field": "prompt"})
    if request.logprobs is not None and not 0 <= request.logprobs <= 5:
        raise ValidationFailed("`logprobs` must be between 0 and 5.", details={"field": "logprobs"})
    return _params(request, prompt=prompt, messages=None, logprobs=request.logprobs)
