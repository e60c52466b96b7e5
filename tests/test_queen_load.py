"""The queen on the paths users walk under load: bursts of connections, a request after a
refused body, and SIGTERM with streams open. The workers are synthetic (the backend for tests
and benchmarks: filler tokens at a fixed rate, no model), started by the queen's own hive."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from harness.helpers import BIN, Daemon, daemon, gone, job_result, run_job, wait_for


@contextlib.contextmanager
def synthetic_queen(folder: Path, *, rate: float = 20.0, slots: int = 50, queen: str = "") -> Iterator[Daemon]:
    config = folder / "rbee.toml"
    config.write_text(f"[hive]\nsynthetic_backend = true\nsynthetic_slots = {slots}\n"
                      f"synthetic_tokens_per_s = {rate}\n[queen]\n{queen}\n")
    env = {f"XDG_{part}_HOME": str(folder / part.lower()) for part in ("STATE", "DATA", "CONFIG", "CACHE")}
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(config)],
                env=env) as queen:
        events, terminator = run_job(queen.url, {"operation": "worker_spawn", "model": "synthetic",
                                                 "backend": "synthetic"})
        assert terminator == "[DONE]", events[-3:]
        yield queen


@pytest.fixture(scope="module")
def queen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with synthetic_queen(tmp_path_factory.mktemp("load")) as queen:
        yield queen


def test_a_burst_of_1000_connections_is_accepted(queen: Daemon) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    port = int(queen.url.rsplit(":", 1)[1])
    answers: list[bytes] = []

    async def one() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = b""
            while data := await stream.receive_some(4096):
                answer += data
        answers.append(answer)

    async def burst() -> None:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for _ in range(1000):
                    nursery.start_soon(one)  # all at once: none waits for another

    try:
        trio.run(burst)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(answers) == 1000
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)


def test_a_request_after_a_413_on_the_same_connection_is_answered(queen: Daemon) -> None:
    with httpx.Client(base_url=queen.url, timeout=5.0) as client:
        refused = client.post("/v1/jobs", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
        assert refused.status_code == 413
        assert refused.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
        # The body was never read: the queen closed that connection, so this one is not stuck behind it.
        assert client.get("/health").status_code == 200


def stream_chat(url: str, lines: list[str], opened: threading.Event) -> None:
    body = {"model": "synthetic", "stream": True, "max_tokens": 1000,
            "messages": [{"role": "user", "content": "hello"}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                opened.set()


def test_sigterm_with_open_streams_ends_each_with_a_terminator_and_leaves_no_process(tmp_path: Path) -> None:
    with synthetic_queen(tmp_path, rate=5.0) as queen:
        workers = job_result(queen.url, {"operation": "worker_list"})
        assert isinstance(workers, list) and len(workers) == 1
        worker_pid = int(workers[0]["pid"])
        streams = [([], threading.Event()) for _ in range(3)]
        readers = [threading.Thread(target=stream_chat, args=(queen.url, lines, opened))
                   for lines, opened in streams]
        for reader in readers:
            reader.start()
        assert all(opened.wait(10) for _, opened in streams)
        assert wait_for(lambda: all(len(lines) >= 3 for lines, _ in streams), timeout=10)

        queen.process.send_signal(signal.SIGTERM)
        assert queen.process.wait(10) == 0
        for reader in readers:
            reader.join(10)
        for lines, _ in streams:
            assert lines[-1] == "[DONE]"
            ended = json.loads(lines[-2])
            assert ended["error"]["code"] == "shutting_down"
        assert wait_for(lambda: gone(worker_pid), timeout=5)


def test_requests_waiting_for_a_slot_are_served_first_come_first_served(tmp_path: Path) -> None:
    """One slot, held 2 s by a first answer; eleven more requests come in one by one (each once the
    one before is in the queue, by the queen's queue depth) and get the slot in the order they came,
    not in whatever order they happen to wake."""
    with synthetic_queen(tmp_path, rate=20.0, slots=1) as queen:
        order: list[int] = []
        lock = threading.Lock()

        def ask(k: int) -> None:
            body = {"model": "synthetic", "messages": [{"role": "user", "content": f"request {k}"}],
                    "max_tokens": 40 if k == 0 else 2, "stream": True}
            with httpx.stream("POST", f"{queen.url}/v1/chat/completions", json=body, timeout=60) as answer:
                assert answer.status_code == 200
                first = True
                for line in answer.iter_lines():  # to the end: a closed stream frees the slot
                    if first and line.startswith("data: {") and '"content"' in line:
                        with lock:
                            order.append(k)  # its first token: it has the slot
                        first = False

        def queued() -> int:
            text = httpx.get(f"{queen.url}/metrics").text
            return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                       if line.startswith("rbee_queen_queue_depth{"))

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(12)]
        threads[0].start()
        assert wait_for(lambda: order == [0], timeout=10)
        for k in range(1, 12):
            threads[k].start()
            assert wait_for(lambda k=k: queued() == k, timeout=5), (k, order)
        for thread in threads:
            thread.join(timeout=60)
        assert order == list(range(12)), str(order)


def test_each_conversation_goes_back_to_the_worker_holding_it_and_spills_when_it_is_busy(
    tmp_path: Path,
) -> None:
    """Two synthetic workers of three slots (whose modelled cache reports what it reuses, a word a
    token): four conversations of three turns, one after another, more than one worker holds. Each
    later turn goes to the worker that holds its conversation and finds all of the turn before in
    its cache. Then that worker is given two long answers of one conversation: with a load margin of
    one, the next turn of it goes to the other, idle worker instead."""
    with synthetic_queen(tmp_path, rate=200.0, slots=3, queen="prefix_load_margin = 1") as queen:
        events, terminator = run_job(queen.url, {"operation": "worker_spawn", "model": "synthetic",
                                                 "backend": "synthetic"})
        assert terminator == "[DONE]", events[-3:]
        client = httpx.Client(base_url=queen.url, timeout=60)

        def turn(history: list[dict[str, str]], max_tokens: int = 4) -> dict[str, Any]:
            answer = client.post("/v1/chat/completions", json={
                "model": "synthetic", "messages": history, "max_tokens": max_tokens})
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            history.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
            return body

        chats = [[{"role": "system", "content": f"You serve tenant {k}. " + f"Tenant {k} rules. " * 60}]
                 for k in range(4)]
        for number in range(3):
            for k, chat in enumerate(chats):
                chat.append({"role": "user", "content": f"Question {number} of tenant {k}?"})
                before = sum(len(m["content"].split()) for m in chat[:-1])
                usage = turn(chat)["usage"]
                if number:  # all of the turn before (and its answer) came from the cache
                    assert usage["prompt_tokens_details"]["cached_tokens"] >= before - 1, (number, k, usage)
        decided = httpx.get(f"{queen.url}/metrics").text
        assert 'rbee_queen_routing_decisions_total{reason="cache"} 8.0' in decided, [
            line for line in decided.splitlines() if line.startswith("rbee_queen_routing")]

        chat = chats[0]
        chat.append({"role": "user", "content": "A long one, please."})
        long_ones = [threading.Thread(target=turn, args=([*chat], 1500)) for _ in range(2)]
        for thread in long_ones:  # 7.5 s each: the holder runs two, more than one beyond the other
            thread.start()
            threading.Event().wait(0.3)
        spilled = turn([*chat[:-1], {"role": "user", "content": "And a short one?"}])
        assert spilled["usage"]["prompt_tokens_details"]["cached_tokens"] < 10  # not the holder
        decided = httpx.get(f"{queen.url}/metrics").text
        assert 'rbee_queen_routing_decisions_total{reason="load"}' in decided
        for thread in long_ones:
            thread.join(timeout=30)


def test_claude_codes_session_header_sends_a_session_back_to_its_worker(tmp_path: Path) -> None:
    """Two workers; two turns of one Claude Code session (its `X-Claude-Code-Session-Id` header,
    no metadata) whose prompts share nothing: no prefix decides, so the session does, and the
    queen counts a routing decision by session."""
    with synthetic_queen(tmp_path, rate=200.0, slots=3) as queen:
        events, terminator = run_job(queen.url, {"operation": "worker_spawn", "model": "synthetic",
                                                 "backend": "synthetic"})
        assert terminator == "[DONE]", events[-3:]
        for text in ("Hello there.", "Something else entirely, with other words."):
            answer = httpx.post(f"{queen.url}/v1/messages", timeout=30,
                                headers={"X-Claude-Code-Session-Id": "3f1c-session"},
                                json={"model": "synthetic", "max_tokens": 4,
                                      "messages": [{"role": "user", "content": text}]})
            assert answer.status_code == 200, answer.text
        decided = httpx.get(f"{queen.url}/metrics").text
        assert 'rbee_queen_routing_decisions_total{reason="session"} 1.0' in decided, [
            line for line in decided.splitlines() if line.startswith("rbee_queen_routing")]
