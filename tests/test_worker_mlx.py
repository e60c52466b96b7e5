"""llm-worker-rbee on MLX (`mlx[cpu]` on Linux) with a tiny random-weight model."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.helpers import BIN, Daemon, daemon
from rbee_worker.backends.base import StopMatcher
from tests.test_worker import stream_events


@pytest.fixture
def mlx_worker(isolated_dirs: Path, tiny_mlx_model: Path) -> Iterator[Daemon]:
    argv = [str(BIN / "llm-worker-rbee"), "--model", str(tiny_mlx_model), "--device", "CPU-0", "--port", "0"]
    with daemon(argv, timeout=60) as running:
        yield running


def tokens_of(events: list[object]) -> list[dict[str, object]]:
    return [e for e in events if isinstance(e, dict) and e["type"] == "token"]


def test_auto_picks_mlx_for_an_mlx_directory_and_streams_chat(mlx_worker: Daemon) -> None:
    ready = httpx.get(f"{mlx_worker.url}/v1/ready").json()
    assert ready["state"] == "ready" and ready["backend"] == "mlx"
    body = {"messages": [{"role": "user", "content": "why is the sky blue"}], "max_tokens": 24, "seed": 3}
    events = stream_events(mlx_worker.url, body)
    assert events[0]["type"] == "started" and events[-1] == "[DONE]"  # type: ignore[index]
    tokens = tokens_of(events)
    assert tokens and [t["i"] for t in tokens] == list(range(len(tokens)))
    end = events[-2]
    assert isinstance(end, dict) and end["type"] == "end"
    # The chat template wraps the message in role markers: more prompt tokens than the raw text.
    assert end["tokens_in"] > 8
    assert 1 <= end["tokens_out"] <= 24
    assert end["stop_reason"] in ("stop", "length")


def test_mlx_batches_concurrent_requests_with_the_tokens_each_gives_alone(mlx_worker: Daemon) -> None:
    ready = httpx.get(f"{mlx_worker.url}/v1/ready").json()
    assert ready["slots_total"] == 4  # the CPU default at --ctx 2048: one model, four sequences
    bodies = [{"prompt": prompt, "max_tokens": 12, "temperature": 0} for prompt in
              ("hello world", "the quick brown fox", "once upon a time there", "rain")]

    def text(body: dict[str, object]) -> str:
        return "".join(str(t["t"]) for t in tokens_of(stream_events(mlx_worker.url, body)))

    alone = [text(body) for body in bodies]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(text, bodies))
    assert together == alone and all(alone)


def test_same_seed_same_text_on_mlx(mlx_worker: Daemon) -> None:
    body = {"prompt": "hello world", "max_tokens": 16, "seed": 11, "temperature": 1.0}
    first = "".join(str(t["t"]) for t in tokens_of(stream_events(mlx_worker.url, body)))
    second = "".join(str(t["t"]) for t in tokens_of(stream_events(mlx_worker.url, body)))
    assert first and first == second


def test_stop_sequence_ends_mlx_output_before_it(mlx_worker: Daemon) -> None:
    body: dict[str, object] = {"prompt": "the quick brown", "max_tokens": 24, "seed": 5, "temperature": 1.0}
    free = "".join(str(t["t"]) for t in tokens_of(stream_events(mlx_worker.url, body)))
    assert len(free) >= 6
    stop = free[4:6]
    events = stream_events(mlx_worker.url, {**body, "stop": [stop]})
    stopped = "".join(str(t["t"]) for t in tokens_of(events))
    assert stopped == free[: free.find(stop)]
    end = events[-2]
    assert isinstance(end, dict) and end["stop_reason"] == "stop"


def test_what_mlx_cannot_do_is_refused_up_front_by_name(mlx_worker: Daemon) -> None:
    chat = [{"role": "user", "content": "hi"}]
    tool = {"name": "get_time", "parameters": {"type": "object"}}
    asks = {
        "response_format": {"prompt": "hi", "response_format": {"type": "json_object"}},
        "tools": {"messages": chat, "tools": [tool]},
        "logprobs": {"prompt": "hi", "logprobs": 2},
        "logit_bias": {"prompt": "hi", "logit_bias": {"5": -100}},
    }
    for field, body in asks.items():
        response = httpx.post(f"{mlx_worker.url}/v1/inference", json=body)
        assert response.status_code == 400, field
        error = response.json()["error"]
        assert error["details"]["field"] == field and "llama.cpp" in error["details"]["hint"]
    response = httpx.post(f"{mlx_worker.url}/v1/embeddings", json={"input": ["hi"]})
    assert response.status_code == 400 and "embeddings" in response.json()["error"]["message"]


def test_gguf_with_backend_mlx_fails_at_start_with_the_fix(isolated_dirs: Path) -> None:
    argv = [str(BIN / "llm-worker-rbee"), "--model", "smollm2-135m", "--backend", "mlx", "--port", "0"]
    with pytest.raises(RuntimeError) as failed, daemon(argv, timeout=30):
        pass
    message = str(failed.value)
    assert "GGUF" in message and "--backend llama-cpp" in message
    assert "Traceback" not in message


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "stopped"),
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["a<", "/s", ">b"], ["</s>"], "a", True),
        (["a<", "b"], ["</s>"], "a<b", False),
        (["abc"], [], "abc", False),
    ],
)
def test_stop_sequences_split_across_tokens(pieces: list[str], stops: list[str], emitted: str, stopped: bool) -> None:
    matcher = StopMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (emitted, stopped)
