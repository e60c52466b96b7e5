"""Ollama's request bodies, as the queen decodes and checks them, and how Ollama's names and
options map onto rbee's.

Model names: Ollama clients send `name:tag`. A catalog id is an Ollama name
with the tag `latest` (`smollm2-135m:latest`, or `smollm2-135m` alone). A
Hugging Face name as Ollama writes it, `hf.co/<org>/<repo>:<quant>`, is the
catalog id the hive gives that download (`<org>--<repo>--<quant>`, lower case),
and `/api/pull` downloads it: `hf.co/org/repo:Q4_K_M` is rbee's
`hf:org/repo:Q4_K_M`. Ollama's own library (`llama3.2`) is not reachable from
rbee; pulling such a name is a 400 that says how to name a Hugging Face model.

Options: the sampling ones are honoured (`temperature`, `top_p`, `top_k`,
`min_p`, `num_predict`, `stop`, `seed`, `repeat_penalty`, `presence_penalty`,
`frequency_penalty`). Load-time ones (`num_ctx`, `num_thread`, `num_gpu`, …)
are the hive's to set when it starts a worker (`[hive] worker_ctx`, threads),
so they are accepted and do not change a running worker; any other is a 400.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import msgspec

from rbee_common.errors import ValidationFailed
from rbee_common.modelref import readable_id
from rbee_common.wire import ChatMessage, GenerationParams, ModelDownload, ResponseFormat, ToolCall
from rbee_queen.dialects import toolcalls
from rbee_queen.dialects.common import named, tool_of

SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
LOAD_TIME = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "num_keep",
    }
)
_HF_NAME = re.compile(
    r"^(?:https?://)?(?:hf\.co|huggingface\.co)/(?P<repo>[A-Za-z0-9._-]+/[A-Za-z0-9._-]+)"
    r"(?::(?P<tag>[A-Za-z0-9._-]+))?\Z"
)


def model_id(name: str) -> str:
    """The catalog id (or served name) an Ollama model name stands for."""
    hf = _HF_NAME.match(name)
    if hf:
        tag = hf["tag"] if hf["tag"] and hf["tag"] != "latest" else None
        # With a quantization, the file's catalog id; without, the reference (the hive picks its file).
        return readable_id(hf["repo"], tag) if tag else f"hf:{hf['repo']}"
    return name[: -len(":latest")] if name.endswith(":latest") else name


def ollama_name(model: str) -> str:
    return model if ":" in model else f"{model}:latest"


def pull_operation(name: str) -> ModelDownload:
    """The model download on the `localhost` hive that an Ollama pull of `name` is."""
    hf = _HF_NAME.match(name)
    reference = None
    if hf:
        tag = hf["tag"] if hf["tag"] and hf["tag"] != "latest" else None
        reference = f"hf:{hf['repo']}" + (f":{tag}" if tag else "")
    elif name.startswith("hf:"):
        reference = name
    if reference is not None:
        try:
            return msgspec.convert({"operation": "model_download", "model": reference}, ModelDownload)
        except msgspec.ValidationError:
            raise ValidationFailed("That model name is not valid.", details={"field": "model"}) from None
    raise ValidationFailed(
        "rbee pulls models from Hugging Face, not from Ollama's library.",
        details={"field": "model"},
        hint="Name the model as hf.co/<org>/<repo>:<quantization>, "
        "e.g. hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M.",
    )


class _Function(msgspec.Struct, kw_only=True):
    name: str
    arguments: dict[str, Any] | str = msgspec.field(default_factory=dict)


class _Call(msgspec.Struct, kw_only=True):
    function: _Function
    id: str | None = None


class _Message(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[_Call] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class _ToolFunction(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(msgspec.Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: _ToolFunction


class Base(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    """Accepted: the hive's idle timeout decides when a worker stops."""
    think: bool | str | None = None


class ChatRequest(Base, kw_only=True, forbid_unknown_fields=True):
    messages: list[_Message] = msgspec.field(default_factory=list)
    tools: list[_Tool] | None = None


class GenerateRequest(Base, kw_only=True, forbid_unknown_fields=True):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    images: list[str] | None = None
    template: str | None = None
    context: list[int] | None = None


class EmbedBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: str | list[str] = ""
    prompt: str | None = None
    """`/api/embeddings`, Ollama's older route, sends one `prompt`."""
    truncate: bool = True
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


class NameBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool = False
    verbose: bool = False

    @property
    def which(self) -> str:
        if not (self.model or self.name):
            raise ValidationFailed("Name a model.", details={"field": "model"})
        return self.model or self.name or ""


def _options(request: Base) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in (request.options or {}).items():
        if key in SAMPLING:
            fields[SAMPLING[key]] = value
        elif key == "num_predict":
            fields["max_tokens"] = value if isinstance(value, int) and value > 0 else None
        elif key == "stop":
            fields["stop"] = [value] if isinstance(value, str) else value
        elif key not in LOAD_TIME:
            raise ValidationFailed(
                f"rbee does not take the option `{named(key)}`.", details={"field": f"options.{named(key)}"}
            )
    if "max_tokens" not in fields:
        fields["max_tokens"] = None  # Ollama's default: until the model stops or the context is full
    if request.format == "json":
        fields["response_format"] = ResponseFormat(type="json_object")
    elif isinstance(request.format, dict):
        fields["response_format"] = ResponseFormat(type="json_schema", json_schema={"schema": request.format})
    elif request.format not in (None, ""):
        raise ValidationFailed('`format` is "json" or a JSON schema.', details={"field": "format"})
    if request.think:
        raise ValidationFailed(
            "rbee's models do not think aloud; leave out `think`.", details={"field": "think"}
        )
    return fields


def _convert(fields: dict[str, Any], field: str) -> GenerationParams:
    try:
        return msgspec.convert(fields, GenerationParams)
    except msgspec.ValidationError as error:
        path = str(error).rpartition("$.")[2].rstrip("`") or None
        raise ValidationFailed(
            f"An option has the wrong type{f' (`{path}`)' if path else ''}.",
            details={"field": f"{field}.{path}" if path else field},
        ) from None


def _chat_messages(request: ChatRequest) -> list[ChatMessage]:
    if not request.messages:
        raise ValidationFailed("`messages` must not be empty.", details={"field": "messages"})
    out = []
    for k, m in enumerate(request.messages):
        if m.images:
            raise ValidationFailed(
                "rbee's models take text only, not images.", details={"field": f"messages[{k}].images"}
            )
        calls = [
            ToolCall(
                id=c.id or toolcalls.new_call_id(),
                name=c.function.name,
                arguments=c.function.arguments
                if isinstance(c.function.arguments, str)
                else json.dumps(c.function.arguments),
            )
            for c in m.tool_calls or []
        ]
        out.append(
            ChatMessage(
                m.role,
                m.content,
                tool_calls=calls,
                name=m.tool_name,
                tool_call_id=m.tool_name if m.role == "tool" else None,
            )
        )
    return out


def chat_params(request: ChatRequest) -> tuple[GenerationParams, list[str]]:
    """The generation parameters of a chat, and the names of its tools."""
    tools = [
        tool_of(t.function.name, t.function.description, t.function.parameters, f"tools[{k}]")
        for k, t in enumerate(request.tools or [])
    ]
    fields = {**_options(request), "messages": _chat_messages(request), "tools": tools}
    return _convert(fields, "options"), [tool.name for tool in tools]


def generate_params(request: GenerateRequest) -> GenerationParams | None:
    """The generation parameters of a prompt (None for an empty one: Ollama's way to load a model)."""
    for field in ("suffix", "images", "template", "context"):
        if getattr(request, field):
            raise ValidationFailed(f"/api/generate here takes no `{field}`.", details={"field": field})
    fields = _options(request)
    if request.raw:
        fields["prompt"] = request.prompt
    else:
        system = [ChatMessage("system", request.system)] if request.system else []
        fields["messages"] = [*system, ChatMessage("user", request.prompt)]
    return _convert(fields, "options") if request.prompt else None
