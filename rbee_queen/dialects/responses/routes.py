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
from typing import Any

import msgspec
from quart import Response
from quart import request as http_request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.errors import NotFound, RbeeError
from rbee_common.http import OpenStreams, read_body, sse_response
from rbee_common.validation import decode_body
from rbee_common.wire import ChatMessage, GenerationParams, InferenceToken, ToolCall
from rbee_queen.dialects import toolcalls
from rbee_queen.dialects.common import (
    Answer,
    Generate,
    Streamed,
    Usage,
    frames_of,
    named,
)
from rbee_queen.dialects.openai.routes import openai_error
from rbee_queen.dialects.responses.requests import (
    ResponsesRequest,
    decoder,
    messages_of,
    params_of,
)

log = logging.getLogger("rbee.queen.responses")
_encode = msgspec.json.Encoder().encode
















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








def add_responses_routes(
    app: QuartTrio, *, generate: Generate, store: ResponseStore, default_deadline_s: Callable[[], float],
    streams: OpenStreams,
) -> None:
    @app.post("/v1/responses")
    async def responses_create() -> Response:
        try:
            request = decode_body(await read_body(), decoder)
            earlier = store.get(request.previous_response_id).messages if request.previous_response_id else []
            messages = messages_of(request, earlier)
            params = params_of(request, messages)
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
                "input_tokens": usage.tokens_in,
                "input_tokens_details": {"cached_tokens": usage.tokens_cached},
                "output_tokens": usage.tokens_out,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.tokens_in + usage.tokens_out,
            },
        }

    def status(self) -> str:
        return "incomplete" if self.usage.stop_reason == "length" else "completed"


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

