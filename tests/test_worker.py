"""llm-worker-rbee as a real process with the real SmolLM2 model (llama.cpp)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from harness.helpers import BIN, Daemon, daemon, gone, wait_for

CHAT = {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 40, "seed": 7}


def worker_argv(*extra: str) -> list[str]:
    return [str(BIN / "llm-worker-rbee"), "--model", "smollm2-135m", "--device", "CPU-0", "--threads", "1", *extra]


@pytest.fixture
def worker(isolated_dirs: Path) -> Iterator[Daemon]:
    with daemon(worker_argv("--port", "0", "--slots", "1")) as running:
        yield running


def stream_events(url: str, body: dict[str, object]) -> list[object]:
    events: list[object] = []
    with httpx.stream("POST", f"{url}/v1/inference", json=body, timeout=httpx.Timeout(10, read=60)) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_streams_readable_english_and_an_end_event(worker: Daemon) -> None:
    assert worker.ready["worker_id"] == "worker-local"
    events = stream_events(worker.url, CHAT)
    assert events[-1] == "[DONE]"
    assert isinstance(events[0], dict) and events[0]["type"] == "started"
    tokens = [e for e in events if isinstance(e, dict) and e["type"] == "token"]
    assert len(tokens) >= 20
    assert [t["i"] for t in tokens] == list(range(len(tokens)))
    text = "".join(t["t"] for t in tokens)
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) >= 10
    assert {w.lower() for w in words} & {"the", "is", "of", "and", "a", "to", "sky", "blue"}
    end = events[-2]
    assert isinstance(end, dict) and end["type"] == "end"
    assert end["tokens_out"] == len(tokens)
    assert end["tokens_in"] > 5
    assert end["stop_reason"] in ("stop", "length")


def test_raw_prompt_completion(worker: Daemon) -> None:
    events = stream_events(worker.url, {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    text = "".join(e["t"] for e in events if isinstance(e, dict) and e["type"] == "token")
    assert "Paris" in text


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"schema": {
            "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        }}},
    ],
)
def test_json_response_format_parses(worker: Daemon, response_format: dict[str, object]) -> None:
    body = {
        "messages": [{"role": "user", "content": "Describe a cat as JSON with name and age."}],
        "max_tokens": 400, "response_format": response_format, "temperature": 0,
    }
    events = stream_events(worker.url, body)
    end = events[-2]
    assert isinstance(end, dict) and end["stop_reason"] == "stop"
    text = "".join(e["t"] for e in events if isinstance(e, dict) and e["type"] == "token")
    value = json.loads(text)
    assert isinstance(value, dict)
    if response_format["type"] == "json_schema":
        assert isinstance(value["name"], str) and isinstance(value["age"], int)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"messages": []}, "messages"),
        ({"prompt": "hi", "temperature": 3}, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_invalid_requests_get_an_envelope_naming_the_field(worker: Daemon, body: dict[str, object], field: str) -> None:
    response = httpx.post(f"{worker.url}/v1/inference", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_FAILED" and error["details"]["field"] == field


def test_max_tokens_is_a_ceiling_and_the_context_ends_the_answer(isolated_dirs: Path) -> None:
    """As llama-server and Ollama: agents send max_tokens of 32,000; generation stops when the
    sequence's context is full (`length`), and only a prompt that fills it is refused."""
    with daemon(worker_argv("--port", "0", "--slots", "1", "--ctx", "96")) as small:
        body = {"prompt": "Count: 1, 2, 3, 4, 5,", "max_tokens": 32000, "temperature": 0, "repeat_penalty": 1.0}
        events = stream_events(small.url, body)
        end = events[-2]
        assert isinstance(end, dict) and end["type"] == "end" and end["stop_reason"] == "length", end
        assert 90 <= end["tokens_in"] + end["tokens_out"] <= 96
        refused = httpx.post(f"{small.url}/v1/inference", json={"prompt": "word " * 200, "max_tokens": 5})
        error = [json.loads(line[6:]) for line in refused.text.splitlines()
                 if line.startswith("data: {")][-1]
        assert error["type"] == "error" and error["code"] == "CONTEXT_LENGTH_EXCEEDED"
        assert error["details"]["context_tokens"] == 96 and error["details"]["prompt_tokens"] > 96


def test_one_slot_second_request_gets_503(worker: Daemon) -> None:
    started = threading.Event()
    results: list[list[object]] = []

    def first() -> None:
        with httpx.stream("POST", f"{worker.url}/v1/inference", json={**CHAT, "max_tokens": 200}, timeout=60) as response:
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
            results.append(events)

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(30)
    second = httpx.post(f"{worker.url}/v1/inference", json=CHAT)
    assert second.status_code == 503
    assert second.json()["error"]["code"] == "ALL_SLOTS_BUSY"
    assert httpx.get(f"{worker.url}/v1/ready").json()["state"] == "busy"
    thread.join(60)
    assert results[0][-1] == "[DONE]"
    assert httpx.get(f"{worker.url}/v1/ready").json()["state"] == "ready"


def test_delete_cancels_a_running_request(worker: Daemon) -> None:
    events: list[dict[str, object]] = []
    body = {**CHAT, "max_tokens": 1000, "request_id": "req-cancel-me"}
    with httpx.stream("POST", f"{worker.url}/v1/inference", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    assert httpx.delete(f"{worker.url}/v1/inference/req-cancel-me").status_code == 204
    assert events[-1]["type"] == "end" and events[-1]["stop_reason"] == "cancelled"
    assert httpx.delete(f"{worker.url}/v1/inference/req-cancel-me").status_code == 204  # idempotent
    assert httpx.delete(f"{worker.url}/v1/inference/req-never-was").status_code == 404


def test_sigterm_mid_stream_ends_the_stream_and_exits_0(isolated_dirs: Path) -> None:
    with daemon(worker_argv("--port", "0", "--drain-s", "1")) as worker:
        events: list[str] = []
        with httpx.stream("POST", f"{worker.url}/v1/inference", json={**CHAT, "max_tokens": 1500}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        worker.process.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["type"] in ("end", "error")
        assert worker.process.wait(timeout=4) == 0


PARENT = """
import os, subprocess, sys, time
read_end, write_end = os.pipe()
child = subprocess.Popen(sys.argv[1:] + ["--lifeline-fd", str(read_end)], pass_fds=[read_end])
os.close(read_end)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_worker_exits_when_its_parent_is_killed(isolated_dirs: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, *worker_argv("--port", "0")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        assert wait_for(lambda: psutil.pid_exists(worker_pid), timeout=5)
        time.sleep(2)  # let it load and serve
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        killed_at = time.monotonic()

        assert wait_for(lambda: gone(worker_pid), timeout=5)
        # No orphan outlives its parent by more than a few seconds (DESIGN §6); PR_SET_PDEATHSIG and the
        # lifeline act at once, so 2 s is a deadline with a wide margin, not a speed.
        assert time.monotonic() - killed_at < 2.0
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_the_synthetic_backend_models_the_prefix_cache(isolated_dirs: Path) -> None:
    """A test double's cache, as the engine's: a word a token, the free sequence sharing the longest
    prefix is taken, and `tokens_cached` says how much was shared (the last word is decoded again)."""
    argv = [str(BIN / "llm-worker-rbee"), "--model", "any", "--backend", "synthetic", "--port", "0",
            "--slots", "2", "--synthetic-tokens-per-s", "1000"]
    with daemon(argv) as synthetic:
        def end(prompt: str) -> dict[str, object]:
            events = stream_events(synthetic.url, {"prompt": prompt, "max_tokens": 2})
            (last,) = [e for e in events if isinstance(e, dict) and e["type"] == "end"]
            return last

        system = "You are an agent. " * 50  # 200 words
        assert end(system + "First question?")["tokens_cached"] == 0
        assert end("Something else entirely.")["tokens_cached"] == 0  # the other sequence
        again = end(system + "Second question?")
        assert again["tokens_in"] == 202 and again["tokens_cached"] == 200
        assert end("Something else entirely.")["tokens_cached"] == 2


def test_the_synthetic_backend_prefills_one_prompt_at_a_time(isolated_dirs: Path) -> None:
    """With a prefill cost, two uncached prompts that arrive together are prefilled in turn, as a
    device shares its compute: the second's first token waits for both prefills (2 x 0.5 s)."""
    argv = [str(BIN / "llm-worker-rbee"), "--model", "any", "--backend", "synthetic", "--port", "0",
            "--slots", "2", "--synthetic-tokens-per-s", "1000", "--synthetic-prefill-tokens-per-s", "1000"]
    with daemon(argv) as synthetic:
        firsts: list[float] = []

        def first_token(words: str) -> None:
            start = time.perf_counter()
            body = {"prompt": (words + " ") * 500, "max_tokens": 2}
            with httpx.stream("POST", f"{synthetic.url}/v1/inference", json=body, timeout=30) as response:
                for line in response.iter_lines():
                    if '"type":"token"' in line.replace(" ", ""):
                        firsts.append(time.perf_counter() - start)
                        break

        threads = [threading.Thread(target=first_token, args=(w,)) for w in ("alpha", "beta")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(firsts) == 2 and min(firsts) >= 0.45 and max(firsts) >= 0.95, firsts
