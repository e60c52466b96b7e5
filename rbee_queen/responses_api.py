"""OpenAI's Responses API on the queen: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

What Codex CLI (which speaks nothing else) and `client.responses.create` send:
`input` as a string or items (messages of `input_text` parts, with roles user,
assistant, system and developer; `function_call` and `function_call_output`;
`reasoning` items, which are skipped), `instructions`, function `tools`,
`tool_choice`, `parallel_tool_calls`, `max_output_tokens`, `temperature`,
`top_p`, `text.format` (json_object, json_schema), `stream`. The answer is a
`response` object whose `output` holds a message and function calls; streamed,
it is the Responses event sequence (`response.created`, `.output_item.added`,
`.output_text.delta`, `.function_call_arguments.delta`, the `.done` events,
`response.completed`). Usage reports cached tokens.

State: with `store` (the API's default) a response is kept in a bounded store
(`[queen] responses_max_stored`, `responses_ttl_s`), so a later request can
continue it with `previous_response_id` (its messages, not its instructions,
as the API defines) and `GET`/`DELETE` find it; an unknown or expired id is a
404 in the API's shape. `store: false` is stateless (Codex's way: it sends the
whole conversation each turn). Tools that are not functions (`web_search`,
`namespace`) and hints (`reasoning`, `include`, `prompt_cache_key`,
`client_metadata`, `metadata`) are accepted and logged once; an image or a
file in the input, `background` and `conversation` would change the answer's
meaning if ignored, so they are refused with a 400 naming them.
"""

from __future__ import annotations

import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import msgspec
from quart import Response
from quart import request as http_request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.errors import NotFound, RbeeError, ValidationFailed
from rbee_common.http import OpenStreams, read_body, sse_response
from rbee_common.validation import decode_body
from rbee_common.wire import ChatMessage, GenerationParams, InferenceToken, ResponseFormat, ToolCall
from rbee_queen import toolcalls
from rbee_queen.dialects import (
    Answer,
    Generate,
    Streamed,
    Usage,
    check_choice,
    fold_system,
    frames_of,
    named,
    note_once,
    tool_of,
)
from rbee_queen.openai_api import openai_error

log = logging.getLogger("rbee.queen.responses")
_encode = msgspec.json.Encoder().encode


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


_decoder = msgspec.json.Decoder(ResponsesRequest)
_HINTS = ("reasoning", "include", "prompt_cache_key", "safety_identifier", "client_metadata", "metadata",
          "user", "service_tier", "truncation", "max_tool_calls", "stream_options", "top_logprobs")


class Stored(msgspec.Struct, kw_only=True):
    response: dict[str, Any]
    messages: list[ChatMessage]
    """The conversation through this response, without its instructions."""
    at: float


class ResponseStore:
    """Responses kept for `previous_response_id` and GET: at most `max_items`, each `ttl_s`."""

    def __init__(self, max_items: Callable[[], int], ttl_s: Callable[[], float]) -> None:
        self._items: collections.OrderedDict[str, Stored] = collections.OrderedDict()
        self._max_items, self._ttl_s = max_items, ttl_s

    def put(self, stored: Stored) -> None:
        self._items[stored.response["id"]] = stored
        while len(self._items) > max(self._max_items(), 0):
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored:
        stored = self._items.get(response_id)
        if stored is not None and time.time() - stored.at > self._ttl_s():
            del self._items[response_id]
            stored = None
        if stored is None:
            raise NotFound(f"Response with id '{named(response_id)}' not found.",
                           details={"field": "previous_response_id"},
                           hint="Responses are kept only with store=true, for [queen] responses_ttl_s.")
        return stored

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._items[response_id]


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


def _messages(request: ResponsesRequest, earlier: list[ChatMessage]) -> list[ChatMessage]:
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


def _params(request: ResponsesRequest, messages: list[ChatMessage]) -> GenerationParams:
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
    check_choice(tools, mode, name, "tool_choice")
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


def add_responses_routes(
    app: QuartTrio, *, generate: Generate, store: ResponseStore, default_deadline_s: Callable[[], float],
    streams: OpenStreams,
) -> None:
    @app.post("/v1/responses")
    async def responses_create() -> Response:
        try:
            request = decode_body(await read_body(), _decoder)
            earlier = store.get(request.previous_response_id).messages if request.previous_response_id else []
            messages = _messages(request, earlier)
            params = _params(request, messages)
            until = deadlines.from_headers(http_request.headers, default_s=default_deadline_s() or None)
            answer = Answer(generate, request.model, params, deadline=until, streams=streams)
        except RbeeError as error:
            return openai_error(error)
        return await _respond(request, params, messages, answer, store)

    @app.get("/v1/responses/<response_id>")
    async def responses_get(response_id: str) -> Response:
        try:
            return Response(_encode(store.get(response_id).response), content_type="application/json")
        except RbeeError as error:
            return openai_error(error)

    @app.delete("/v1/responses/<response_id>")
    async def responses_delete(response_id: str) -> Response:
        try:
            store.delete(response_id)
        except RbeeError as error:
            return openai_error(error)
        body = {"id": response_id, "object": "response.deleted", "deleted": True}
        return Response(_encode(body), content_type="application/json")


class _Shape:
    """The response object and its output items, as the answer fills them in."""

    def __init__(self, request: ResponsesRequest, params: GenerationParams, usage: Usage) -> None:
        self.id = "resp_" + uuid.uuid4().hex
        self.request, self.params, self.usage = request, params, usage
        self.created = int(time.time())
        self.message_id = "msg_" + uuid.uuid4().hex

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": content if status == "completed" else []}

    @staticmethod
    def call(call: ToolCall, item_id: str, status: str = "completed") -> dict[str, Any]:
        return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
                "arguments": call.arguments if status == "completed" else "", "status": status}

    def response(
        self, output: list[dict[str, Any]], status: str, error: RbeeError | None = None,
    ) -> dict[str, Any]:
        usage = self.usage
        incomplete = status == "incomplete"
        fmt = self.request.text.format if self.request.text is not None else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.request.model, "output": output,
            "error": None if error is None else {"code": error.code.lower(), "message": error.message},
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": self.request.instructions, "max_output_tokens": self.request.max_output_tokens,
            "parallel_tool_calls": self.params.parallel_tool_calls,
            "previous_response_id": self.request.previous_response_id,
            "temperature": self.params.temperature, "top_p": self.params.top_p,
            "tool_choice": self.params.tool_choice if self.params.tool_name is None else
            {"type": "function", "name": self.params.tool_name},
            "tools": [{"type": "function", "name": t.name, "description": t.description,
                       "parameters": t.parameters, "strict": False} for t in self.params.tools],
            "text": {"format": {"type": fmt.type if fmt is not None else "text"}},
            "store": self.request.store, "metadata": self.request.metadata or {},
            "reasoning": {"effort": None, "summary": None}, "truncation": "disabled",
            "user": self.request.user,
            "usage": None if status == "in_progress" else {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            },
        }

    def status(self) -> str:
        return "incomplete" if self.usage.finish_reason == "length" else "completed"


def _keep(store: ResponseStore, shape: _Shape, messages: list[ChatMessage], text: str, calls: list[ToolCall],
          response: dict[str, Any]) -> None:
    if shape.request.store:
        said = ChatMessage("assistant", text, tool_calls=calls)
        store.put(Stored(response=response, messages=[*messages, said], at=time.time()))


async def _respond(
    request: ResponsesRequest, params: GenerationParams, messages: list[ChatMessage], answer: Answer,
    store: ResponseStore,
) -> Response:
    shape = _Shape(request, params, answer.usage)
    tools = [tool.name for tool in params.tools] if params.tool_choice != "none" else []
    if not request.stream:
        try:
            text, calls, _ = await answer.parsed(tools)
        except RbeeError as error:
            return openai_error(error)
        output = ([shape.message(text)] if text or not calls else []) + [
            shape.call(c, "fc_" + uuid.uuid4().hex) for c in calls]
        response = shape.response(output, shape.status())
        _keep(store, shape, messages, text, calls, response)
        return Response(_encode(response), content_type="application/json")

    try:
        first = await answer.first()
    except RbeeError as error:
        return openai_error(error)
    return sse_response(_events(shape, first, answer, tools, store, messages))


async def _events(
    shape: _Shape, first: InferenceToken | None, answer: Answer, tools: list[str], store: ResponseStore,
    messages: list[ChatMessage],
) -> AsyncIterator[bytes]:
    sequence = 0
    output: list[dict[str, Any]] = []
    shown: list[str] = []
    open_item: dict[str, Any] | None = None
    call_ids: dict[int, str] = {}
    arguments: dict[int, str] = {}

    def event(kind: str, **body: Any) -> bytes:
        nonlocal sequence
        sequence += 1
        data = _encode({"type": kind, "sequence_number": sequence, **body})
        return f"event: {kind}\ndata: ".encode() + data + b"\n\n"

    def close_item() -> list[bytes]:
        nonlocal open_item
        if open_item is None:
            return []
        index, item, open_item = len(output), open_item, None
        if item["type"] == "message":
            text = "".join(shown)
            done = shape.message(text)
            part = done["content"][0]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            frames = [event("response.output_text.done", **where, text=text, logprobs=[]),
                      event("response.content_part.done", **where, part=part)]
        else:
            number = item["number"]
            done = {k: v for k, v in item.items() if k != "number"}
            done.update(arguments=arguments.get(number, ""), status="completed")
            frames = [event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=done["arguments"])]
        output.append(done)
        return [*frames, event("response.output_item.done", output_index=index, item=done)]

    def text(piece: str) -> list[bytes]:
        nonlocal open_item
        frames: list[bytes] = []
        if open_item is None or open_item["type"] != "message":
            frames = close_item()
            open_item = shape.message("", status="in_progress")
            index = len(output)
            frames += [event("response.output_item.added", output_index=index, item=open_item),
                       event("response.content_part.added", item_id=open_item["id"], output_index=index,
                             content_index=0, part={"type": "output_text", "text": "", "annotations": []})]
        shown.append(piece)
        where = {"item_id": open_item["id"], "output_index": len(output), "content_index": 0}
        return [*frames, event("response.output_text.delta", **where, delta=piece, logprobs=[])]

    def call(delta: toolcalls.CallDelta) -> list[bytes]:
        nonlocal open_item
        frames: list[bytes] = []
        if delta.id is not None:
            frames = close_item()
            item_id = "fc_" + uuid.uuid4().hex
            call_ids[delta.number] = item_id
            added = shape.call(ToolCall(id=delta.id, name=delta.name or "", arguments=""), item_id,
                               status="in_progress")
            open_item = {**added, "number": delta.number}
            frames.append(event("response.output_item.added", output_index=len(output), item=added))
        if delta.arguments:
            arguments[delta.number] = arguments.get(delta.number, "") + delta.arguments
            frames.append(event("response.function_call_arguments.delta", item_id=call_ids[delta.number],
                                output_index=len(output), delta=delta.arguments))
        return frames

    left = Streamed()
    try:
        yield event("response.created", response=shape.response([], "in_progress"))
        yield event("response.in_progress", response=shape.response([], "in_progress"))
        async for frame in frames_of(first, answer, tools, text, call, left):
            yield frame
        if left.rest or (open_item is None and not output):  # an answer has at least one item
            for frame in text(left.rest):
                yield frame
        for frame in close_item():
            yield frame
        status = shape.status()
        response = shape.response(output, status)
        _keep(store, shape, messages, "".join(shown), left.calls, response)
        # `response.completed` ends every answer that ran, an incomplete one too (its status and
        # incomplete_details say so): the SDKs' and Codex's stream readers wait for that event.
        yield event("response.completed", response=response)
    except RbeeError as error:
        yield event("response.failed", response=shape.response(output, "failed", error))
    finally:
        await answer.aclose()

