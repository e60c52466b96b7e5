"""Tool calls in and out, without a model: the parsers on the formats models write (transcribed from
each family's chat-template documentation and real transcripts), the stream splitter, and the
prompt side (templates with and without tool support, the grammar's schema)."""

from __future__ import annotations

import json

import pytest
from jinja2 import Environment

from rbee_common.wire import ChatMessage, InferenceRequest, Tool, ToolCall
from rbee_queen.dialects import toolcalls
from rbee_worker import tools

NAMES = ["get_weather", "get_time"]
PARIS = {"city": "Paris", "unit": "celsius"}

RECORDED: list[tuple[str, str, str, list[tuple[str, dict[str, object]]]]] = [
    ("hermes / qwen2.5",
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     "", [("get_weather", PARIS)]),
    ("hermes, text first, two calls",
     'Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
     '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n'
     "</tool_call>",
     "Let me look that up.", [("get_weather", PARIS), ("get_time", {"zone": "Europe/Paris"})]),
    ("hermes, cut off before its closing tag",
     '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}', "", [("get_time", {"zone": "UTC"})]),
    ("llama 3.2 json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     "", [("get_weather", PARIS)]),
    ("llama 3.1 python_tag",
     '<|python_tag|>{"type": "function", "name": "get_time", "parameters": {"zone": "UTC"}}',
     "", [("get_time", {"zone": "UTC"})]),
    ("llama 3.2, two calls with ;",
     '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
     '{"name": "get_time", "parameters": {"zone": "UTC"}}',
     "", [("get_weather", PARIS), ("get_time", {"zone": "UTC"})]),
    ("mistral v0.3",
     '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, "id": "a1B2c3D4e"}]',
     "", [("get_weather", PARIS)]),
    ("mistral small 3.2 [ARGS]", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}',
     "", [("get_weather", PARIS)]),
    ("plain json list (rbee's grammar)",
     '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', "", [("get_weather", PARIS)]),
    ("fenced json", '```json\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n```', "",
     [("get_time", {"zone": "UTC"})]),
    ("generic envelope", '{"tool_calls": [{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}]}', "",
     [("get_time", {"zone": "UTC"})]),
    ("openai shape echoed",
     '[{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}]',
     "", [("get_time", {"zone": "UTC"})]),
]


@pytest.mark.parametrize(("text", "content", "expected"), [r[1:] for r in RECORDED], ids=[r[0] for r in RECORDED])
def test_recorded_outputs_parse_into_calls(text: str, content: str, expected: list[tuple[str, object]]) -> None:
    found_content, calls = toolcalls.parse(text, NAMES)
    assert found_content == content
    assert [(call.name, json.loads(call.arguments)) for call in calls] == expected
    assert all(call.id for call in calls)


def test_mistral_keeps_the_models_call_id() -> None:
    _, (call,) = toolcalls.parse('[TOOL_CALLS] [{"name": "get_time", "arguments": {}, "id": "a1B2c3D4e"}]', NAMES)
    assert call.id == "a1B2c3D4e"


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.",
    '{"answer": 42}',  # JSON, but not a call
    '{"name": "delete_everything", "arguments": {}}',  # a function nobody offered
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"</tool_call>',  # broken JSON
])
def test_what_is_not_a_call_of_an_offered_tool_stays_text(text: str) -> None:
    assert toolcalls.parse(text, NAMES) == (text, [])


def test_without_tools_nothing_is_a_call() -> None:
    text = '{"name": "get_time", "arguments": {}}'
    assert toolcalls.parse(text, []) == (text, [])


def feed_all(pieces: list[str]) -> tuple[list[str], str, list[ToolCall]]:
    stream = toolcalls.ToolStream(NAMES)
    shown = [stream.feed(piece) for piece in pieces]
    rest, calls, _ = stream.finish()
    return shown, rest, calls


def test_stream_shows_plain_text_at_once() -> None:
    shown, rest, calls = feed_all(["The", " sky", " is", " blue."])
    assert shown == ["The", " sky", " is", " blue."] and rest == "" and calls == []


def test_stream_holds_a_json_call_and_parses_it_at_the_end() -> None:
    pieces = [' {"name', '": "get_time", ', '"arguments": {"zone": ', '"UTC"}}']
    shown, rest, calls = feed_all(pieces)
    assert shown == ["", "", "", ""] and rest == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]


def test_stream_shows_text_then_holds_a_marker_split_across_pieces() -> None:
    pieces = ["Checking", " now.\n<to", "ol_call>", '{"name": "get_time", "arguments": {"zone": "UTC"}}', "</tool_call>"]
    shown, rest, calls = feed_all(pieces)
    assert "".join(shown) == "Checking now.\n" and shown[2:] == ["", "", ""]
    assert rest == "" and [c.name for c in calls] == ["get_time"]


def test_stream_gives_back_held_json_that_was_no_call() -> None:
    shown, rest, calls = feed_all(['{"answer"', ": 42}"])
    assert shown == ["", ""] and rest == '{"answer": 42}' and calls == []


# --- the prompt side (rbee_worker.tools) ---------------------------------------------------------

WEATHER = Tool(name="get_weather", description="Weather in a city",
               parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HERMES = (  # the tool parts of Qwen2.5's template, shortened
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
)
HISTORY = [
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')]),
    ChatMessage("tool", '{"sky": "sunny"}', tool_call_id="call_1", name="get_weather"),
]


def render(template: str, request: InferenceRequest) -> str:
    messages, listed = tools.template_messages(request, template)
    return Environment().from_string(template).render(messages=messages, tools=listed, add_generation_prompt=True)


def test_a_template_without_tools_gets_them_in_a_system_message() -> None:
    prompt = render(CHATML, InferenceRequest(messages=HISTORY, tools=[WEATHER]))
    assert prompt.startswith("<|im_start|>system\nYou can call functions.")
    assert '"name": "get_weather"' in prompt and '"required": ["city"]' in prompt
    assert '<|im_start|>assistant\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert '<|im_start|>user\nThe result of get_weather: {"sky": "sunny"}' in prompt


def test_a_template_with_tools_renders_them_itself() -> None:
    prompt = render(HERMES, InferenceRequest(messages=HISTORY, tools=[WEATHER]))
    assert '<tools>\n{"function": {"description": "Weather in a city", "name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in prompt
    assert "You can call functions" not in prompt


def test_tool_choice_none_leaves_the_tools_out() -> None:
    assert "get_weather" not in render(CHATML, InferenceRequest(messages=HISTORY[:1], tools=[WEATHER],
                                                                 tool_choice="none"))


def test_the_forced_schema_follows_the_choice() -> None:
    other = Tool(name="get_time", parameters={"type": "object", "properties": {}})
    asked = InferenceRequest(messages=HISTORY[:1], tools=[WEATHER, other])
    assert tools.forced_call_schema(asked) is None  # auto
    named = tools.forced_call_schema(InferenceRequest(messages=HISTORY[:1], tools=[WEATHER, other],
                                                      tool_name="get_time", parallel_tool_calls=False))
    assert named is not None and named["properties"]["name"] == {"const": "get_time"}
    assert named["properties"]["arguments"]["additionalProperties"] is False
    required = tools.forced_call_schema(InferenceRequest(messages=HISTORY[:1], tools=[WEATHER, other],
                                                         tool_choice="required"))
    assert required is not None and required["type"] == "array" and len(required["items"]["anyOf"]) == 2


def test_stream_gives_a_calls_name_first_then_its_arguments_as_they_come() -> None:
    stream = toolcalls.ToolStream(NAMES)
    seen: list[list[toolcalls.CallDelta]] = []
    for piece in ['[{"name": "get_weather", ', '"arguments": {"ci', 'ty": "Pa\\"ris"', "}}, ",
                  '{"name": "get_time", "arguments": {"zone": "UTC"}}]']:
        assert stream.feed(piece) == ""
        seen.append(stream.deltas())
    assert seen[0] == []  # the name is there, but not yet where its arguments begin
    (header, first) = seen[1]
    assert (header.number, header.name, header.arguments) == (0, "get_weather", "") and header.id
    assert (first.number, first.id, first.arguments) == (0, None, '{"ci')
    assert [d.arguments for d in seen[2]] == ['ty": "Pa\\"ris"'] and [d.arguments for d in seen[3]] == ["}"]
    assert [(d.number, d.name, d.arguments) for d in seen[4]] == [(1, "get_time", ""), (1, None, '{"zone": "UTC"}')]
    rest, calls, last = stream.finish()
    assert rest == "" and last == []
    assert [(c.id, c.name) for c in calls] == [(header.id, "get_weather"), (seen[4][0].id, "get_time")]
    streamed = "".join(d.arguments for step in seen for d in step if d.number == 0)
    assert json.loads(streamed) == {"city": 'Pa"ris'} == json.loads(calls[0].arguments)


def test_stream_sends_a_call_it_could_only_parse_at_the_end_whole() -> None:
    stream = toolcalls.ToolStream(NAMES)
    for piece in ['{"arguments": {"zone": "UTC"}, ', '"name": "get_time"}']:  # arguments first
        stream.feed(piece)
        assert stream.deltas() == []
    _, calls, last = stream.finish()
    assert [(d.number, d.name, d.arguments) for d in last] == [(0, "get_time", ""), (0, None, '{"zone": "UTC"}')]
    assert last[0].id == calls[0].id
