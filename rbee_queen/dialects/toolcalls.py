"""Tool calls on the way out: finding them in what a model wrote.

Models write calls in a handful of formats; `parse` knows these:

- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call,
  possibly after some text.
- Llama 3.x: a JSON object `{"name": ..., "parameters": {...}}` (sometimes with
  `"type": "function"`), possibly after `<|python_tag|>`; several separated by `;`.
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]`, or the newer
  `[TOOL_CALLS]name[ARGS]{...}`.
- Plain JSON, which is also what rbee's grammar forces under `tool_choice="required"`: an
  object `{"name", "arguments"}`, a list of them, or `{"tool_calls": [...]}` / `{"tool_call": {...}}`.

Only calls of functions the request offered count; anything else stays text.
`ToolStream` does the same on a stream: it passes text through until a call
may be starting, then holds it back and parses it at the end.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, NamedTuple

import msgspec

from rbee_common.wire import ToolCall

OPENERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<function_call>")
"""Markers that start a call anywhere in the text."""
_FENCE = re.compile(r"^```(?:json)?\s*(?P<body>.*?)\s*```$", re.S)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _decode_all(text: str) -> list[Any] | None:
    """Every JSON value in `text`, one after another (separated by whitespace, `;` or `,`)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t\r\n;,":
            i += 1
        if i >= n:
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _as_call(value: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # OpenAI's own shape, echoed
        value = {**value["function"], "id": value.get("id")}
    name = value.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    ident = value.get("id")
    return ToolCall(
        id=ident if isinstance(ident, str) and ident else new_call_id(),
        name=name,
        arguments=json.dumps(arguments, ensure_ascii=False),
    )


def _calls(values: list[Any], names: set[str]) -> list[ToolCall] | None:
    """The calls in decoded JSON values, or None when any of them is not a call."""
    flat: list[Any] = []
    for value in values:
        if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
            flat.extend(value["tool_calls"])
        elif isinstance(value, dict) and isinstance(value.get("tool_call"), dict):
            flat.append(value["tool_call"])
        elif isinstance(value, list):
            flat.extend(value)
        else:
            flat.append(value)
    calls = [_as_call(value, names) for value in flat]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def _json_calls(text: str, names: set[str]) -> list[ToolCall] | None:
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced["body"]
    values = _decode_all(body)
    return _calls(values, names) if values else None


def _hermes(text: str, names: set[str]) -> tuple[str, list[ToolCall]] | None:
    blocks = re.findall(r"<(tool_call|function_call)>\s*(.*?)\s*(?:</\1>|$)", text, re.S)
    if not blocks:
        return None
    calls: list[ToolCall] = []
    for _, body in blocks:
        found = _json_calls(body, names)
        if found is None:
            return None
        calls.extend(found)
    return text[: re.search(r"<(tool_call|function_call)>", text).start()].strip(), calls  # type: ignore[union-attr]


def _mistral(text: str, names: set[str]) -> tuple[str, list[ToolCall]] | None:
    at = text.find("[TOOL_CALLS]")
    if at < 0:
        return None
    body = text[at + len("[TOOL_CALLS]") :]
    if "[ARGS]" in body:  # [TOOL_CALLS]name[ARGS]{...}, repeated
        calls: list[ToolCall] = []
        for part in body.split("[TOOL_CALLS]"):
            name, _, arguments = part.partition("[ARGS]")
            call = _as_call({"name": name.strip(), "arguments": arguments.strip()}, names)
            if call is None:
                return None
            calls.append(call)
        return text[:at].strip(), calls
    found = _json_calls(body, names)
    return (text[:at].strip(), found) if found else None


def parse(text: str, names: set[str] | list[str]) -> tuple[str, list[ToolCall]]:
    """The text that is not a call, and the calls (empty when the model made none)."""
    names = set(names)
    if not names:
        return text, []
    for finder in (_hermes, _mistral):
        found = finder(text, names)
        if found is not None:
            return found
    at = text.find("<|python_tag|>")
    if at >= 0:
        calls = _json_calls(text[at + len("<|python_tag|>") :], names)
        if calls:
            return text[:at].strip(), calls
    calls = _json_calls(text, names)
    return ("", calls) if calls else (text, [])


def _may_open(text: str) -> bool:
    """Whether `text` (stripped of leading space) could still become a call."""
    stripped = text.lstrip()
    if not stripped:
        return True
    if stripped[0] in "{[`":
        return True
    return any(opener.startswith(stripped[: len(opener)]) for opener in OPENERS)


class CallDelta(NamedTuple):
    """A part of a call as a stream learns it: first its id and name, then arguments text."""

    number: int
    """The call's place among the answer's calls (OpenAI's `index`)."""
    id: str | None
    name: str | None
    arguments: str


_HEADS = (
    re.compile(r'"name"\s*:\s*"(?P<name>[^"\\]{1,64})"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)'),
    re.compile(r"\[TOOL_CALLS\]\s*(?P<name>[A-Za-z0-9_.-]{1,64})\[ARGS\](?=\{)"),
)
"""Where a call's name is known and its arguments object begins: JSON with the name first
(Hermes, Llama 3.x, Mistral's list, rbee's grammar) and Mistral's `name[ARGS]`."""


def _object_end(text: str, start: int) -> int | None:
    """The index after the JSON object that opens at `start`, None while it is still open."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class ToolStream:
    """Text pieces in; what may be shown at once out, and the calls as they form.

    Text that begins like a call (JSON, or a marker) is held back from the start; in
    text that did not, a marker later on (`<tool_call>` after a sentence) starts holding.
    While held, `deltas()` gives each call's id and name as soon as the name is written
    and its arguments text as it comes (when the format names the function first); the
    end (`finish`) parses the whole and gives what was not sent yet.
    """

    def __init__(self, names: list[str]) -> None:
        self._names = set(names)
        self._held = ""
        self._holding = True
        """From the start: until the text cannot be a call any more."""
        self._shown = False
        self._sent: list[list[Any]] = []
        """Per call begun: [id, name, where its arguments start, how far they were sent, where they end]."""

    def feed(self, piece: str) -> str:
        """The text to show now ("" while it may be part of a call)."""
        self._held += piece
        if self._holding and not self._shown:
            if _may_open(self._held):
                return ""
            self._holding = False
        if self._holding:
            return ""
        # Free text: show all of it but a suffix that may begin a marker.
        at = min((i for i in (self._held.find(m) for m in OPENERS) if i >= 0), default=-1)
        if at >= 0:
            shown, self._held = self._held[:at], self._held[at:]
            self._holding = True
            self._shown = True
            return shown
        keep = max(
            (
                n
                for m in OPENERS
                for n in range(min(len(m) - 1, len(self._held)), 0, -1)
                if m.startswith(self._held[-n:])
            ),
            default=0,
        )
        shown, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        self._shown = self._shown or bool(shown)
        return shown

    def deltas(self) -> list[CallDelta]:
        """The parts of calls that are certain now and were not given before."""
        if not self._holding or not self._held:
            return []
        text = self._held
        out: list[CallDelta] = []
        at = 0
        k = 0
        while True:
            found = [m for m in (head.search(text, at) for head in _HEADS) if m is not None]
            if not found:
                break
            head = min(found, key=lambda m: m.start())
            if head["name"] not in self._names:
                break
            begin = head.end()
            if k == len(self._sent):
                self._sent.append([new_call_id(), head["name"], begin, begin, None])
                out.append(CallDelta(k, self._sent[k][0], head["name"], ""))
            sent = self._sent[k]
            end = _object_end(text, begin)
            upto = end if end is not None else len(text)
            if upto > sent[3]:
                out.append(CallDelta(k, None, None, text[sent[3] : upto]))
                sent[3] = upto
            if end is None:
                break
            sent[4] = end
            at, k = end, k + 1
        return out

    def finish(self) -> tuple[str, list[ToolCall], list[CallDelta]]:
        """What is left: text to show, every call, and the call parts not given yet."""
        rest = self.deltas()
        held, self._held = self._held, ""
        if not held:
            return "", [], rest
        text, calls = parse(held, self._names)
        streamed = [
            ToolCall(id=ident, name=name, arguments=held[begin:end] if end else held[begin:upto])
            for ident, name, begin, upto, end in self._sent
        ]
        if not streamed:
            for k, call in enumerate(calls):
                rest += [CallDelta(k, call.id, call.name, ""), CallDelta(k, None, None, call.arguments)]
            return text, calls, rest
        if [c.name for c in calls[: len(streamed)]] != [c.name for c in streamed]:
            return "", streamed, rest  # begun calls that did not end well: sent, so they stand
        for k, call in enumerate(calls[len(streamed) :], start=len(streamed)):
            rest += [CallDelta(k, call.id, call.name, ""), CallDelta(k, None, None, call.arguments)]
        return text, streamed + calls[len(streamed) :], rest


def arguments_object(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as an object (Anthropic's `input`, Ollama's `arguments`)."""
    value = msgspec.json.decode(call.arguments)
    return value if isinstance(value, dict) else {}
