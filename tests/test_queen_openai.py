"""queen-rbee --local-hive with the official `openai` client, scheduling and cascades."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

from harness.helpers import BIN, Daemon, active_workers, daemon, gone, job_result, run_job, wait_for

CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture
def queen(isolated_dirs: Path) -> Iterator[Daemon]:
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"]) as running:
        yield running


def client(queen: Daemon) -> OpenAI:
    return OpenAI(base_url=f"{queen.url}/v1", api_key="not-needed", max_retries=0)


def active(queen: Daemon) -> list[dict[str, object]]:
    return active_workers(queen.url)



def test_openai_client_streams_with_usage_after_a_cold_start(queen: Daemon) -> None:
    openai = client(queen)
    assert "smollm2-135m" in [m.id for m in openai.models.list()]
    assert active(queen) == []  # no worker yet: the first request starts one
    stream = openai.chat.completions.create(
        model="smollm2-135m", messages=CHAT, stream=True, stream_options={"include_usage": True}, max_tokens=30,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) >= 5
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    # 30 tokens, or fewer when the model ended its answer itself (it samples: no seed here)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    produced = chunks[-1].usage.completion_tokens
    assert (finish, produced == 30) in (("length", True), ("stop", False)) and produced > 0, (finish, produced)
    assert chunks[-1].usage.prompt_tokens > 5
    assert [w["model"] for w in active(queen)] == ["smollm2-135m"]
    assert "local-hive" in httpx.get(f"{queen.url}/v1/build-info").json()["features"]
    # The next turn of the conversation: the worker still holds the first prompt in its cache.
    turn = [*CHAT, {"role": "assistant", "content": text}, {"role": "user", "content": "And at sunset?"}]
    reply = openai.chat.completions.create(model="smollm2-135m", messages=turn, max_tokens=10)
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    cached = reply.usage.prompt_tokens_details.cached_tokens or 0
    assert chunks[-1].usage.prompt_tokens <= cached < reply.usage.prompt_tokens


def test_openai_client_without_streaming_and_json_mode(queen: Daemon) -> None:
    openai = client(queen)
    reply = openai.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=20)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 20
    cat = [{"role": "user", "content": "Describe a cat as JSON with name and age."}]
    reply = openai.chat.completions.create(
        model="smollm2-135m", messages=cat, response_format={"type": "json_object"}, temperature=0,
    )
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    reply = openai.chat.completions.create(
        model="smollm2-135m", messages=cat, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
    )
    value = json.loads(reply.choices[0].message.content or "")
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    completion = openai.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert "Paris" in completion.choices[0].text


def test_openai_errors_have_openai_shape(queen: Daemon) -> None:
    import openai as sdk

    with pytest.raises(sdk.BadRequestError) as bad:
        client(queen).chat.completions.create(model="smollm2-135m", messages=[], max_tokens=5)
    assert bad.value.body["code"] == "validation_failed"  # type: ignore[index]
    with pytest.raises(sdk.NotFoundError) as missing:
        client(queen).chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=5)
    assert "no-such-model" not in str(missing.value)


def test_two_workers_share_concurrent_requests_and_survive_a_kill(queen: Daemon) -> None:
    for _ in range(2):
        events, terminator = run_job(queen.url, {"operation": "worker_spawn", "model": "smollm2-135m",
                                                 "threads": 1})
        assert terminator == "[DONE]", events[-3:]
    assert wait_for(lambda: len(active(queen)) == 2, timeout=10)
    busy_seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:  # what the heartbeats say while the requests run
        while not stop.is_set():
            busy_seen.update(str(w["worker_id"]) for w in active(queen) if w["slots_busy"])
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    body = {"operation": "infer", "model": "smollm2-135m", "messages": CHAT, "max_tokens": 40}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: job_result(queen.url, body), range(8)))
    stop.set()
    watcher.join()
    served = {r["worker_id"] for r in results}  # type: ignore[index]
    workers = {str(w["worker_id"]) for w in active(queen)}
    assert served == workers and busy_seen == workers
    # Kill the worker the scheduler would pick first: the next requests find it dead before any token.
    first = min(active(queen), key=lambda w: str(w["worker_id"]))
    os.kill(int(str(first["pid"])), signal.SIGKILL)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        after = list(pool.map(lambda _: job_result(queen.url, body), range(3)))
    assert {r["worker_id"] for r in after} == workers - {first["worker_id"]}  # type: ignore[index]
    assert any(r["attempts"] == 2 for r in after)  # type: ignore[index]
    assert all(r["text"] for r in after)  # type: ignore[index]


@pytest.mark.parametrize(("sig", "limit"), [(signal.SIGTERM, 6.0), (signal.SIGKILL, 5.0)])
def test_the_queens_end_takes_its_local_hive_workers(isolated_dirs: Path, sig: int, limit: float) -> None:
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"]) as queen:
        for _ in range(2):
            run_job(queen.url, {"operation": "worker_spawn", "model": "smollm2-135m", "threads": 1})
        pids = [int(str(w["pid"])) for w in job_result(queen.url, {"operation": "worker_list"})]  # type: ignore[union-attr]
        assert len(pids) == 2 and all(psutil.Process(p).ppid() == queen.process.pid for p in pids)
        os.kill(queen.process.pid, sig)
        sent = time.monotonic()
        assert wait_for(lambda: all(gone(p) for p in pids), timeout=limit)
        assert time.monotonic() - sent < limit  # DESIGN §6: graceful 5 s, then SIGKILL; a margin on top
        if sig == signal.SIGTERM:
            assert queen.process.wait(limit) == 0


def test_hive_operations_answered_by_the_queen(queen: Daemon) -> None:
    status = job_result(queen.url, {"operation": "hive_status", "hive_id": "localhost"})
    assert isinstance(status, dict) and status["reachable"] is True
    caps = job_result(queen.url, {"operation": "hive_refresh_capabilities"})
    assert isinstance(caps, dict) and caps["devices"][0]["id"] == "CPU-0"
    entry = job_result(queen.url, {"operation": "hive_get", "hive_id": "localhost"})
    assert isinstance(entry, dict) and entry["local"] is True
    events, terminator = run_job(queen.url, {"operation": "hive_status", "hive_id": "nowhere"})
    assert terminator.startswith("[ERROR]")
    assert [e["error"]["code"] for e in events if e.get("error")] == ["HIVE_NOT_FOUND"]


def test_infer_on_a_hive_that_is_not_up_does_not_run_elsewhere(isolated_dirs: Path) -> None:
    config = isolated_dirs / "queen.toml"
    config.write_text('[hives.lab-9]\nhost = "127.0.0.1"\nhive_port = 1\n')  # nothing listens there
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(config)]) as queen:
        body = {"operation": "infer", "model": "smollm2-135m", "prompt": "Hi,", "max_tokens": 3}
        assert job_result(queen.url, body)  # localhost serves it
        events, terminator = run_job(queen.url, {**body, "hive_id": "lab-9"})
        assert terminator.startswith("[ERROR]")
        assert [e["error"]["code"] for e in events if e.get("error")] == ["NO_HIVE"]
