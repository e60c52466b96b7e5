"""What clients speak, with the official clients unchanged: OpenAI's tool calls, embeddings and
logprobs; Anthropic's Messages API; Ollama's API. One queen (`--local-hive`) and its one worker
serve the whole module."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import numpy as np
import ollama
import pytest
from openai import OpenAI

from harness.fake_hf import FakeHub
from harness.helpers import BIN, Daemon, daemon, isolated_env
from rbee_common.builtin import builtin_model_path
from rbee_common.client import JobClient
from rbee_common.errors import HiveInProcess
from rbee_common.wire import (
    Capabilities,
    Embed,
    EmbedResult,
    HiveDetails,
    HiveGet,
    HiveHealth,
    HiveList,
    HiveRefreshCapabilities,
    HiveStatus,
    Infer,
    InferResult,
    QueenStatus,
    SshTest,
    Status,
    WorkerListActive,
    WorkerRecord,
)

MODEL = "smollm2-135m"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time now in a time zone.",
                 "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                                "required": ["zone"]}},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HUB_REPO = "smol-org/SmolLM2-GGUF"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    with FakeHub(tmp_path_factory.mktemp("hub")) as running:
        running.add_builtin(HUB_REPO)
        yield running


@pytest.fixture(scope="module")
def queen(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("dialects")
    env = isolated_env(root)
    env["HF_ENDPOINT"] = hub.url
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"], env=env) as running:
        yield running
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def openai(queen: Daemon) -> OpenAI:
    return OpenAI(base_url=f"{queen.url}/v1", api_key="not-needed", max_retries=0)


def matches_weather_schema(arguments: str) -> dict[str, Any]:
    value = json.loads(arguments)
    assert set(value) == {"city", "unit"}, value
    assert isinstance(value["city"], str) and len(value["city"]) <= 40
    assert value["unit"] in ("celsius", "fahrenheit")
    return dict(value)


# --- OpenAI -----------------------------------------------------------------------------------


def test_required_tool_call_then_a_second_turn_with_its_result(openai: OpenAI) -> None:
    reply = openai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",  # type: ignore[list-item]
        temperature=0, max_tokens=120,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls and all(call.function.name in ("get_weather", "get_time") for call in calls)
    weather = [call for call in calls if call.function.name == "get_weather"]
    assert weather, "the weather question calls get_weather"
    matches_weather_schema(weather[0].function.arguments)
    assert weather[0].id.startswith("call_")

    turn = [*ASK, choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": weather[0].id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    answer = openai.chat.completions.create(model=MODEL, messages=turn, tools=[WEATHER],  # type: ignore[arg-type,list-item]
                                            tool_choice="none", temperature=0, max_tokens=30)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
    # The call and its result reached the prompt: it is longer than the question alone by both.
    alone = openai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],  # type: ignore[list-item]
                                           tool_choice="none", temperature=0, max_tokens=1)
    assert answer.usage is not None and alone.usage is not None
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_named_tool_call_streams_openai_deltas(openai: OpenAI) -> None:
    stream = openai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[TIME, WEATHER], stream=True, parallel_tool_calls=False,  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=120,
    )
    ids, names, arguments, finish, chunks = [], [], "", None, 0
    for chunk in stream:
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            assert call.index == 0  # one call: parallel calls were turned off
            if call.id:
                ids.append(call.id)
            if call.function and call.function.name:
                names.append(call.function.name)
            if call.function and call.function.arguments:
                arguments += call.function.arguments
                chunks += 1
        assert not delta.content, "a forced call streams no text"
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and names == ["get_weather"] and len(ids) == 1
    assert chunks > 3, "the arguments stream as the model writes them"
    matches_weather_schema(arguments)


def test_required_streamed_and_named_whole_give_the_same_calls(openai: OpenAI) -> None:
    named = openai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[TIME, WEATHER], temperature=0, max_tokens=120,  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
    )
    (call,) = named.choices[0].message.tool_calls or []
    assert named.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    matches_weather_schema(call.function.arguments)

    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in openai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0,  # type: ignore[list-item]
        max_tokens=120, stream=True,
    ):
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            if delta.function and delta.function.name:
                entry["name"] = delta.function.name
            if delta.function and delta.function.arguments:
                entry["arguments"] += delta.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls
    weather = [entry for entry in calls.values() if entry["name"] == "get_weather"]
    assert weather, "the weather question calls get_weather"
    matches_weather_schema(weather[0]["arguments"])


def test_embeddings_are_deterministic_unit_vectors_of_the_models_width(openai: OpenAI) -> None:
    texts = ["The sky is blue.", "Bees make honey.", "The sky is blue."]
    first = openai.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    vectors = np.array([item.embedding for item in first.data])
    assert vectors.shape == (3, 576)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2], atol=1e-6)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-2)
    again = openai.embeddings.create(model=MODEL, input="The sky is blue.", encoding_format="float")
    assert np.allclose(again.data[0].embedding, vectors[0], atol=1e-5)
    assert first.usage.prompt_tokens > 0
    short = openai.embeddings.create(model=MODEL, input=[[504, 3658, 314]], dimensions=64,
                                     encoding_format="float")
    assert len(short.data[0].embedding) == 64
    assert np.isclose(np.linalg.norm(short.data[0].embedding), 1.0, atol=1e-5)


def test_logprobs_on_chat_and_completions(openai: OpenAI) -> None:
    reply = openai.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=8,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the token taken is the likeliest one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes or []).decode(errors="replace") == entry.token

    stream = openai.completions.create(model=MODEL, prompt="The capital of France is", temperature=0,
                                       max_tokens=6, logprobs=2, stream=True)
    text, tokens = "", []
    for chunk in stream:
        text += chunk.choices[0].text
        if chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens or []
    assert text and "".join(tokens) == text


# Every field of OpenAI's chat request: honoured (200) or refused with a 400 that names it.
CHAT_FIELDS: list[tuple[str, Any, bool]] = [
    ("frequency_penalty", 0.5, True), ("presence_penalty", 0.5, True), ("logit_bias", {"28": -100}, True),
    ("logprobs", True, True), ("top_logprobs", 2, False),  # top_logprobs alone: it needs logprobs
    ("max_tokens", 2, True), ("max_completion_tokens", 2, True), ("n", 1, True), ("n", 2, False),
    ("parallel_tool_calls", False, True), ("response_format", {"type": "json_object"}, True),
    ("seed", 7, True), ("stop", ["\n"], True), ("stream", False, True),
    ("stream_options", {"include_usage": True}, True), ("temperature", 0.2, True), ("top_p", 0.5, True),
    ("tools", [WEATHER], True), ("tool_choice", "none", True), ("tool_choice", "required", False),
    ("user", "user-1", True), ("safety_identifier", "u1", True), ("prompt_cache_key", "k", True),
    ("store", False, True), ("store", True, False), ("metadata", {"a": "b"}, False),
    ("service_tier", "auto", True), ("service_tier", "priority", False),
    ("modalities", ["text"], True), ("modalities", ["text", "audio"], False),
    ("audio", {"voice": "alloy", "format": "mp3"}, False), ("prediction", {"type": "content", "content": "x"}, False),
    ("reasoning_effort", "low", False), ("verbosity", "low", False), ("web_search_options", {}, False),
    ("functions", [WEATHER["function"]], False), ("function_call", "auto", False),
    ("top_k", 5, True), ("min_p", 0.1, True), ("repeat_penalty", 1.1, True),
    ("frobnicate", 1, False),  # a field OpenAI does not have
]


@pytest.mark.parametrize(("field", "value", "honoured"), CHAT_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v, _ in CHAT_FIELDS])
def test_every_chat_field_is_honoured_or_refused_by_name(queen: Daemon, field: str, value: Any, honoured: bool) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "max_tokens": 2, field: value}
    response = httpx.post(f"{queen.url}/v1/chat/completions", json=body, timeout=60)
    if honoured:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field


@pytest.mark.parametrize(("field", "value", "honoured"), [
    ("echo", True, True), ("logprobs", 2, True), ("best_of", 1, True), ("best_of", 2, False),
    ("suffix", "end", False), ("n", 3, False), ("stream_options", {"include_usage": True}, True),
])
def test_every_completion_field_is_honoured_or_refused_by_name(
    queen: Daemon, field: str, value: Any, honoured: bool,
) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": "Once upon", "max_tokens": 2, field: value}
    response = httpx.post(f"{queen.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == (200 if honoured else 400), response.text
    if honoured and field == "echo":
        assert response.json()["choices"][0]["text"].startswith("Once upon")
    if not honoured:
        assert response.json()["error"]["param"] == field


def test_logit_bias_bans_the_greedy_token(openai: OpenAI) -> None:
    from llama_cpp import Llama

    vocab = Llama(model_path=str(builtin_model_path(MODEL)), vocab_only=True, verbose=False)
    prompt = "The capital of France is"
    plain = openai.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=1)
    token = plain.choices[0].text
    (token_id,) = vocab.tokenize(token.encode(), add_bos=False, special=False)
    banned = openai.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=1,
                                       logit_bias={str(token_id): -100})
    assert banned.choices[0].text and banned.choices[0].text != token


# --- Anthropic ----------------------------------------------------------------------------------


GREEDY = {"temperature": 0}
"""The SDK has no `temperature` argument any more; the Messages API still takes it."""


@pytest.fixture(scope="module")
def claude(queen: Daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=queen.url, api_key="not-needed", max_retries=0)


def test_anthropic_message_and_stream(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=12, system="Answer briefly.",
                                     messages=[{"role": "user", "content": "Why is the sky blue?"}], extra_body=GREEDY)
    assert message.role == "assistant" and message.type == "message"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 12

    with claude.messages.stream(model=MODEL, max_tokens=12, system="Answer briefly.", extra_body=GREEDY,
                                messages=[{"role": "user", "content": "Why is the sky blue?"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text == final.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == message.stop_reason and final.usage.output_tokens == message.usage.output_tokens

    # A stop sequence from inside the greedy answer ends it there, and says which.
    word = message.content[0].text.split()[-1]  # type: ignore[union-attr]
    cut = claude.messages.create(model=MODEL, max_tokens=12, system="Answer briefly.", extra_body=GREEDY,
                                 messages=[{"role": "user", "content": "Why is the sky blue?"}],
                                 stop_sequences=[word])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == word


def test_anthropic_tool_use_and_its_result(claude: anthropic.Anthropic) -> None:
    tool = {"name": "get_weather", "description": "The current weather in a city.",
            "input_schema": WEATHER["function"]["parameters"]}  # type: ignore[index]
    message = claude.messages.create(model=MODEL, max_tokens=120, tools=[tool],  # type: ignore[list-item]
                                     tool_choice={"type": "tool", "name": "get_weather"},
                                     messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                                     extra_body=GREEDY)
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert uses and uses[0].name == "get_weather"
    matches_weather_schema(json.dumps(uses[0].input))

    with claude.messages.stream(model=MODEL, max_tokens=120, tools=[tool],  # type: ignore[list-item]
                                tool_choice={"type": "any"}, extra_body=GREEDY,
                                messages=[{"role": "user", "content": "What is the weather in Paris?"}]) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [u.input for u in uses]

    followup = claude.messages.create(model=MODEL, max_tokens=20, tools=[tool], extra_body=GREEDY,  # type: ignore[list-item]
                                      messages=[
                                          {"role": "user", "content": "What is the weather in Paris?"},
                                          {"role": "assistant", "content": message.content},  # type: ignore[typeddict-item]
                                          {"role": "user", "content": [{"type": "tool_result",
                                                                        "tool_use_id": uses[0].id,
                                                                        "content": "21 degrees, sunny"}]},
                                      ])
    assert followup.content and _prompt(followup.usage) > _prompt(message.usage)


def _prompt(usage: anthropic.types.Usage) -> int:
    """A prompt's tokens in Anthropic's usage: those not cached, and those read from the cache."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def _claude_code_turn(session: str, turns: list[dict[str, Any]]) -> dict[str, Any]:
    """A request as Claude Code 2.1 sends it (trimmed): a billing header that changes per session,
    cached system blocks, system-role reminders mid-conversation, and the fields that only hint."""
    return {
        "model": MODEL, "max_tokens": 32000, "stream": False, "temperature": 0,
        "system": [
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.328.{session}; cc_entrypoint=cli;"},
            {"type": "text", "text": "You are a terse assistant. " * 40, "cache_control": {"type": "ephemeral"}},
        ],
        "messages": turns,
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": json.dumps({"device_id": "d" * 64, "session_id": session})},
    }


def test_claude_codes_requests_are_taken_and_its_billing_header_never_reaches_the_cache(queen: Daemon) -> None:
    headers = {"anthropic-version": "2023-06-01",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27"}
    first = [{"role": "user", "content": [{"type": "text", "text": "Reply with the single word: hello"}]},
             {"role": "system", "content": "<system-reminder>Today is Monday.</system-reminder>"}]
    answers = []
    for session, turns in (("aaa", first), ("bbb", first)):
        reply = httpx.post(f"{queen.url}/v1/messages?beta=true", json=_claude_code_turn(session, turns),
                           headers=headers, timeout=120)
        assert reply.status_code == 200, reply.text
        answers.append(reply.json())
    assert answers[0]["content"][0]["text"] == answers[1]["content"][0]["text"]
    assert answers[0]["stop_reason"] in ("end_turn", "max_tokens")
    # The second session's prompt differs only in the billing header: all of it but the last few
    # tokens comes from the cache (Anthropic's input_tokens are the rest).
    usage = answers[1]["usage"]
    assert usage["input_tokens"] <= 8 and usage["cache_read_input_tokens"] > 200, usage


def test_anthropic_count_tokens_is_what_the_answer_counts(claude: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    counted = claude.messages.count_tokens(model=MODEL, system="Answer briefly.", messages=messages)  # type: ignore[arg-type]
    message = claude.messages.create(model=MODEL, max_tokens=1, system="Answer briefly.", messages=messages,  # type: ignore[arg-type]
                                     extra_body=GREEDY)
    assert counted.input_tokens == _prompt(message.usage) > 5


def test_both_clients_discover_the_models(claude: anthropic.Anthropic, openai: OpenAI) -> None:
    import openai as sdk

    assert MODEL in [m.id for m in claude.models.list()]
    listed = claude.models.retrieve(MODEL)
    # what it was trained for: the context a request may fill (a worker with room is started)
    assert listed.display_name == MODEL and listed.max_input_tokens == 8192
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.models.retrieve("no-such-model")
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert MODEL in [m.id for m in openai.models.list()]
    described = openai.models.retrieve(MODEL)
    assert described.owned_by == "rbee" and (described.model_extra or {})["context_length"] == 8192
    with pytest.raises(sdk.NotFoundError):
        openai.models.retrieve("no-such-model")


def test_anthropic_errors_have_anthropics_shape(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=MODEL, max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "iVBORw0KGgo="}}]}])
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


# --- OpenAI's Responses API ------------------------------------------------------------------------


def test_responses_plain_and_streamed_give_the_same_text(openai: OpenAI) -> None:
    whole = openai.responses.create(model=MODEL, instructions="Answer briefly.", input="Why is the sky blue?",
                                    max_output_tokens=12, temperature=0)
    assert whole.status in ("completed", "incomplete") and whole.output_text
    assert whole.usage is not None and whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 12
    kinds: list[str] = []
    with openai.responses.stream(model=MODEL, instructions="Answer briefly.", input="Why is the sky blue?",
                                 max_output_tokens=12, temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert final.output_text == whole.output_text
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
    # The second identical prompt comes from the cache.
    assert final.usage is not None and final.usage.input_tokens_details.cached_tokens > 0


def test_responses_force_a_function_call_and_take_its_output(openai: OpenAI) -> None:
    tool = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
            "parameters": WEATHER["function"]["parameters"]}  # type: ignore[index]
    first = openai.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[tool],  # type: ignore[list-item]
                                    tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                                    max_output_tokens=120)
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    matches_weather_schema(calls[0].arguments)
    with openai.responses.stream(model=MODEL, input="What is the weather in Paris?", tools=[tool],  # type: ignore[list-item]
                                 tool_choice="required", temperature=0, max_output_tokens=120) as stream:
        deltas = [e for e in stream if e.type == "response.function_call_arguments.delta"]
        streamed = stream.get_final_response()
    assert deltas and [i.arguments for i in streamed.output if i.type == "function_call"] == [calls[0].arguments]
    # The second turn continues the stored first one: the call's output is all it sends.
    second = openai.responses.create(model=MODEL, previous_response_id=first.id, tools=[tool],  # type: ignore[list-item]
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": "21 degrees, sunny"}],
                                     temperature=0, max_output_tokens=20)
    assert second.output_text and second.previous_response_id == first.id
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens


def test_responses_are_stored_found_and_deleted(openai: OpenAI) -> None:
    import openai as sdk

    made = openai.responses.create(model=MODEL, input="Say hi.", max_output_tokens=3)
    assert openai.responses.retrieve(made.id).output_text == made.output_text
    openai.responses.delete(made.id)
    with pytest.raises(sdk.NotFoundError):
        openai.responses.retrieve(made.id)
    with pytest.raises(sdk.NotFoundError):
        openai.responses.create(model=MODEL, input="Again.", previous_response_id=made.id, max_output_tokens=3)
    stateless = openai.responses.create(model=MODEL, input="Say hi.", max_output_tokens=3, store=False)
    with pytest.raises(sdk.NotFoundError):
        openai.responses.retrieve(stateless.id)


# --- Ollama ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(queen: Daemon) -> ollama.Client:
    return ollama.Client(host=queen.url)


def test_ollama_chat_generate_and_embed(llama: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 10}
    reply = llama.chat(model=f"{MODEL}:latest", messages=ASK, options=options)
    assert reply.done and reply.message.role == "assistant" and reply.message.content
    assert reply.eval_count and 0 < reply.eval_count <= 10 and reply.done_reason in ("stop", "length")
    streamed = list(llama.chat(model=MODEL, messages=ASK, options=options, stream=True))
    assert streamed[-1].done and not any(part.done for part in streamed[:-1])
    assert "".join(part.message.content for part in streamed) == reply.message.content

    generated = llama.generate(model=MODEL, prompt="Why is the sky blue?", options=options)
    assert generated.done and generated.response
    raw = "".join(p.response for p in llama.generate(model=MODEL, prompt="Once upon a time", raw=True,
                                                     options=options, stream=True))
    assert raw

    tool = llama.chat(model=MODEL, messages=ASK, tools=[WEATHER], options={"temperature": 0, "num_predict": 60})
    assert tool.done  # auto: the model may or may not call it; a call it makes parses
    for call in tool.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)

    embedded = llama.embed(model=MODEL, input=["The sky is blue.", "Bees make honey."])
    assert len(embedded.embeddings) == 2 and all(len(v) == 576 for v in embedded.embeddings)
    again = llama.embed(model=MODEL, input="The sky is blue.")
    assert np.allclose(again.embeddings[0], embedded.embeddings[0], atol=1e-6)

    with pytest.raises(ollama.ResponseError) as caught:
        llama.chat(model=MODEL, messages=ASK, options={"mirostat": 2})
    assert caught.value.status_code == 400 and "mirostat" in caught.value.error


def test_ollama_list_ps_show_version_and_pull(llama: ollama.Client, hub: FakeHub) -> None:
    llama.generate(model=MODEL, prompt="Hi", options={"num_predict": 1})  # a worker runs
    names = [m.model for m in llama.list().models]
    assert f"{MODEL}:latest" in names
    running = llama.ps().models
    assert [m.model for m in running] == [f"{MODEL}:latest"] and running[0].size and running[0].size > 0
    shown = llama.show(f"{MODEL}:latest")
    assert shown.details.family == "llama" and shown.modelinfo and shown.modelinfo["llama.embedding_length"] == 576
    assert shown.modelinfo["llama.context_length"] == 8192
    assert "<|im_start|>" in (shown.template or "")
    assert httpx.get(f"{llama._client.base_url}/api/version").json()["version"]

    statuses = list(llama.pull(f"hf.co/{HUB_REPO}:Q4_1", stream=True))
    assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
    progress = [s for s in statuses if s.total]
    assert progress and progress[-1].completed == progress[-1].total
    assert "smollm2-q4_1:latest" in [m.model for m in llama.list().models]

    with pytest.raises(ollama.ResponseError) as caught:
        llama.pull("llama3.2")
    assert caught.value.status_code == 400 and "hf.co/" in caught.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        llama.show("no-such-model")
    assert missing.value.status_code == 404


# --- rbee-keeper embed ------------------------------------------------------------------------------


def test_keeper_embed_prints_vectors_and_json(queen: Daemon) -> None:
    from tests.test_keeper_queen import keeper

    lines = keeper("embed", "The sky is blue.", "Bees make honey.", "--dimensions", "8", url=queen.url)
    assert lines.returncode == 0, lines.stderr
    rows = [[float(x) for x in line.split()] for line in lines.stdout.splitlines()]
    assert len(rows) == 2 and all(len(row) == 8 for row in rows)
    assert all(abs(np.linalg.norm(row) - 1.0) < 1e-4 for row in rows)
    as_json = keeper("embed", "The sky is blue.", "--json", url=queen.url)
    assert as_json.returncode == 0, as_json.stderr
    value = json.loads(as_json.stdout)
    assert value["model"] == MODEL and len(value["data"][0]) == 576 and value["tokens"] > 0
    assert np.allclose(value["data"][0][:8] / np.linalg.norm(value["data"][0][:8]), rows[0], atol=1e-5)


@pytest.mark.parametrize(("field", "value", "honoured"), [
    ("encoding_format", "float", True), ("encoding_format", "base64", True), ("encoding_format", "int8", False),
    ("dimensions", 16, True), ("dimensions", 100000, False), ("dimensions", 0, False), ("user", "u1", True),
    ("input", [], False), ("input", [""], False), ("input", [[1, 2], "x"], True), ("frobnicate", 1, False),
])
def test_every_embeddings_field_is_honoured_or_refused_by_name(
    queen: Daemon, field: str, value: Any, honoured: bool,
) -> None:
    body: dict[str, Any] = {"model": MODEL, "input": "hello", field: value}
    response = httpx.post(f"{queen.url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == (200 if honoured else 400), response.text
    if not honoured:
        assert response.json()["error"]["param"] == field


async def test_queen_operations_answer_their_declared_types(queen: Daemon) -> None:
    """The queen's own operations, through `JobClient.call`: each result decoded as its operation declares
    (the hive operations have theirs in tests/test_results.py, for both hive transports)."""
    async with httpx.AsyncClient() as http:
        client = JobClient(queen.url, http=http)
        answer = await client.call(Infer(model=MODEL, prompt="Say hi", max_tokens=4, temperature=0.0))
        assert isinstance(answer, InferResult) and answer.tokens_out >= 1 and answer.worker_id
        vectors = await client.call(Embed(model=MODEL, input=["a", "b"]))
        assert isinstance(vectors, EmbedResult) and len(vectors.data) == 2
        status = await client.call(Status())
        assert isinstance(status, QueenStatus) and all(isinstance(w, WorkerRecord) for w in status.workers)
        active = await client.call(WorkerListActive(model=MODEL))
        assert [w.worker_id for w in active] == [answer.worker_id] and active[0].state in ("ready", "busy")
        listing = await client.call(HiveList())
        assert [(h.hive_id, h.local) for h in listing] == [("localhost", True)]
        details = await client.call(HiveGet(hive_id="localhost"))
        assert isinstance(details, HiveDetails) and details.local and details.url == "in-process"
        health = await client.call(HiveStatus(hive_id="localhost"))
        assert isinstance(health, HiveHealth) and health.reachable
        capabilities = await client.call(HiveRefreshCapabilities(hive_id="localhost"))
        assert isinstance(capabilities, Capabilities) and capabilities.devices
        with pytest.raises(HiveInProcess):  # no SSH lifecycle for the hive inside the queen
            await client.call(SshTest(hive_id="localhost"))
