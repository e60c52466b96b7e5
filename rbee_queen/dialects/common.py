"""What the queen's API dialects (OpenAI, Anthropic, Ollama) share: one generation, read under
the request's deadline and the queen's shutdown, and what it reports at its end."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import trio
from quart import Response, g

from rbee_common import deadlines
from rbee_common.errors import ContextLengthExceeded, RbeeError, ShuttingDown, ValidationFailed
from rbee_common.http import OpenStreams
from rbee_common.wire import (
    ChatMessage,
    EmbedRequest,
    EmbedResult,
    GenerationParams,
    InferenceToken,
    Tool,
    ToolCall,
)
from rbee_queen.dialects import toolcalls
from rbee_queen.inference import Served

log = logging.getLogger("rbee.queen.api")


Usage = Served
"""What a finished request reports: one record from the worker's end event to each dialect's
usage (`tokens_in`, `tokens_out`, `tokens_cached`, `stop_reason`, `stop_sequence`)."""


Generate = Callable[[str, GenerationParams, Usage, str | None], AsyncGenerator[InferenceToken, None]]
Embed = Callable[[str, EmbedRequest], Awaitable[EmbedResult]]
ListModels = Callable[[], Awaitable[dict[str, int | None]]]
"""Each model a request can name, with the context it was trained for (None: unknown)."""


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
"""The error `type` OpenAI's and Anthropic's bodies give for a status (each dialect adds its own)."""


_noted: set[str] = set()


def note_once(kind: str) -> None:
    """Log, once per process, that a field which only tunes or hints was accepted and not applied."""
    if kind not in _noted:
        _noted.add(kind)
        log.info("accepted %s: it only tunes or hints, and rbee does not apply it (logged once)", kind)


def fold_system(messages: list[ChatMessage]) -> list[ChatMessage]:
    """One system message, first, as most chat templates take it: the system messages before the
    first turn make it; a later one (an agent's mid-conversation reminder) opens the next user turn,
    or closes the last one when none follows."""
    system: list[str] = []
    held: list[str] = []
    out: list[ChatMessage] = []
    for message in messages:
        if message.role == "system":
            (held if out else system).append(message.content)
            continue
        if held and message.role == "user":
            message = msgspec.structs.replace(message, content="\n\n".join([*held, message.content]))
            held = []
        out.append(message)
    if held:
        last = max((k for k, m in enumerate(out) if m.role == "user"), default=None)
        if last is None:
            system += held
        else:
            out[last] = msgspec.structs.replace(out[last], content="\n\n".join([out[last].content, *held]))
    joined = "\n\n".join(part for part in system if part)
    return ([ChatMessage("system", joined)] if joined else []) + out


def context_numbers(error: RbeeError) -> tuple[int, int] | None:
    """(prompt tokens, context tokens) of a prompt too long for the context; None for other errors."""
    if error.code != ContextLengthExceeded.code:
        return None
    prompt, context = error.details.get("prompt_tokens"), error.details.get("context_tokens")
    return (prompt, context) if isinstance(prompt, int) and isinstance(context, int) else None


def error_response(body: dict[str, Any], error: RbeeError) -> Response:
    """A dialect's error body with the error's status, and `Retry-After` when it has one (429, 503)."""
    response = Response(msgspec.json.encode(body), status=error.status, content_type="application/json")
    g.error_code = error.code  # counted by the metrics (rbee_common.metrics)
    retry = error.details.get("retry_after_s")
    if isinstance(retry, int):
        response.headers["Retry-After"] = str(retry)
    return response


class Answer:
    """One generation as an HTTP route reads it.

    `first()` is awaited before the response starts, so that scheduling errors
    (no worker, a full queue, a refused field) get their own status code; the
    rest is read with `next()`, which ends at the deadline (REQUEST_TIMEOUT) and
    when the queen stops (SHUTTING_DOWN), so every stream gets its terminator.
    """

    def __init__(
        self,
        generate: Generate,
        model: str,
        params: GenerationParams,
        *,
        deadline: str | None,
        streams: OpenStreams,
    ) -> None:
        self.usage = Usage()
        self._deadline = deadline
        self._until = deadlines.trio_deadline(deadline)
        self._streams = streams
        self._pieces = generate(model, params, self.usage, deadline)

    def _timed_out(self) -> RbeeError:
        log.warning("request timeout: the deadline %s passed", self._deadline)
        return deadlines.exceeded(self._deadline or "")

    async def first(self) -> InferenceToken | None:
        try:
            with trio.move_on_at(self._until):
                return await self._pieces.__anext__()
            raise self._timed_out()
        except StopAsyncIteration:
            return None
        except RbeeError:
            await self._pieces.aclose()
            raise

    async def next(self) -> InferenceToken | None:
        """The next piece, None at the end."""
        with self._streams.guard() as scope:
            scope.deadline = self._until
            try:
                return await self._pieces.__anext__()
            except StopAsyncIteration:
                return None
        if scope.cancelled_caught and trio.current_time() >= self._until:
            raise self._timed_out()
        if scope.cancelled_caught:
            raise ShuttingDown(
                "The queen is shutting down; this answer ends here.",
                hint="Retry the request on a running queen.",
            )
        return None

    async def all(self) -> list[InferenceToken]:
        """Every piece (an answer that is not streamed)."""
        try:
            with trio.move_on_at(self._until):
                return [piece async for piece in self._pieces]
            raise self._timed_out()
        finally:
            await self._pieces.aclose()

    async def parsed(self, tools: list[str]) -> tuple[str, list[ToolCall], list[InferenceToken]]:
        """The whole answer (not streamed): its text, the tool calls in it, and its pieces."""
        pieces = await self.all()
        text, calls = toolcalls.parse("".join(piece.t for piece in pieces), tools)
        return text, calls, pieces

    async def aclose(self) -> None:
        await self._pieces.aclose()


class Streamed(msgspec.Struct):
    """What a streamed answer left when its pieces ran out (`frames_of`)."""

    rest: str = ""
    """Text held back as a possible call that turned out not to be one."""
    calls: list[ToolCall] = msgspec.field(default_factory=list)


async def frames_of(
    first: InferenceToken | None, answer: Answer, tools: list[str], text: Callable[[str], list[bytes]],
    call: Callable[[toolcalls.CallDelta], list[bytes]], left: Streamed,
) -> AsyncIterator[bytes]:
    """A streamed answer's frames in a dialect's words: its text through `text`, its tool calls through
    `call` as they form (`toolcalls.ToolStream`); what is left at the end goes into `left`."""
    held = toolcalls.ToolStream(tools) if tools else None
    piece = first
    while piece is not None:
        visible = held.feed(piece.t) if held is not None else piece.t
        for frame in text(visible) if visible else []:
            yield frame
        for delta in held.deltas() if held is not None else []:
            for frame in call(delta):
                yield frame
        piece = await answer.next()
    rest, calls, last = held.finish() if held is not None else ("", [], [])
    for delta in last:
        for frame in call(delta):
            yield frame
    left.rest, left.calls = rest, calls


def named(text: str) -> str:
    """A name from the request (a block type, an option) fit to quote back: only when it looks like one."""
    return text if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", text) else "(an unknown name)"


def tool_of(name: str, description: str | None, parameters: dict[str, Any] | None, field: str) -> Tool:
    """A tool from any dialect's description of it, or a 400 naming `field`."""
    try:
        return msgspec.convert(
            {
                "name": name,
                "description": description or "",
                "parameters": parameters or {"type": "object", "properties": {}},
            },
            Tool,
        )
    except msgspec.ValidationError:
        raise ValidationFailed(
            "A tool's name must be 1 to 64 letters, digits, `_`, `.` or `-`.",
            details={"field": field},
        ) from None
