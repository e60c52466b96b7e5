"""The llama.cpp engine: four sequences batched on one copy of the real SmolLM2 model.

One worker with four slots serves every test here but the memory one.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from harness.helpers import BIN, Daemon, daemon, wait_for
from rbee_common.sizing import gguf_metadata, kv_bytes_per_token
from rbee_worker.models import resolve_model

QUESTIONS = [
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What is the capital of France?",
    "List three uses of copper.",
]


def worker_argv(slots: int) -> list[str]:
    return [str(BIN / "llm-worker-rbee"), "--model", "smollm2-135m", "--device", "CPU-0", "--threads", "1",
            "--slots", str(slots), "--port", "0"]


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("engine")
    env = {f"XDG_{name}_HOME": str(home / name) for name in ("CONFIG", "STATE", "DATA", "CACHE")}
    with daemon(worker_argv(4), env=env) as running:
        yield running


def stream(url: str, body: dict[str, object], on_token: threading.Event | None = None) -> dict[str, object]:
    """The text and the end event of one request."""
    text: list[str] = []
    end: dict[str, object] = {}
    with httpx.stream("POST", f"{url}/v1/inference", json=body, timeout=httpx.Timeout(10, read=120)) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["type"] == "token":
                text.append(event["t"])
                if on_token is not None:
                    on_token.set()
            elif event["type"] in ("end", "error"):
                end = event
    return {"text": "".join(text), **end}


def chat(question: str, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": 48, **extra}


def concurrently(url: str, bodies: list[dict[str, object]]) -> list[dict[str, object]]:
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: stream(url, body), bodies))


def test_four_concurrent_requests_give_the_tokens_each_gives_alone(four: Daemon) -> None:
    # Greedy, and sampled with fixed seeds: each sequence has its own sampler and random state.
    bodies = [chat(q, temperature=0) for q in QUESTIONS[:2]]
    bodies += [chat(q, temperature=0.9, seed=11 + i) for i, q in enumerate(QUESTIONS[2:])]
    alone = [stream(four.url, body) for body in bodies]
    together = concurrently(four.url, bodies)
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["tokens_out"] for r in together] == [r["tokens_out"] for r in alone]
    assert all(len(str(r["text"]).split()) >= 5 for r in alone)
    assert len({r["text"] for r in alone}) == 4  # four different answers, not one repeated


def test_a_cancelled_request_frees_its_slot_for_the_next_at_once(four: Daemon) -> None:
    started = [threading.Event() for _ in range(4)]
    # Counting, greedy: a stream that runs to max_tokens rather than stopping early.
    long = [{"prompt": f"Count from {start} upwards: {start}, {start + 1}, {start + 2},", "max_tokens": 1500,
             "temperature": 0, "request_id": f"req-long-{i}"} for i, start in enumerate((1, 50, 300, 7000))]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(stream, four.url, body, started[i]) for i, body in enumerate(long)]
        assert all(event.wait(60) for event in started)
        waiting = chat("Say hello.", max_tokens=8)
        refused = httpx.post(f"{four.url}/v1/inference", json=waiting)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "ALL_SLOTS_BUSY"
        assert httpx.delete(f"{four.url}/v1/inference/req-long-2").status_code == 204
        # No retry loop: the slot is free when the DELETE answers.
        served = stream(four.url, waiting)
        assert served["type"] == "end" and served["text"]
        cancelled = running[2].result(60)
        assert cancelled["stop_reason"] == "cancelled"
        for i in (0, 1, 3):
            httpx.delete(f"{four.url}/v1/inference/req-long-{i}")
        assert [f.result(60)["stop_reason"] for f in running] == ["cancelled"] * 4
    assert wait_for(lambda: httpx.get(f"{four.url}/v1/ready").json()["slots_busy"] == 0, timeout=10)


def test_the_second_turn_of_a_conversation_reuses_the_cached_prompt(four: Daemon) -> None:
    system = {"role": "system", "content": "You are a patient teacher of astronomy for children."}
    first_turn = [system, {"role": "user", "content": "What is a comet?"}]
    first = stream(four.url, {"messages": first_turn, "max_tokens": 24, "temperature": 0})
    second_turn = [*first_turn, {"role": "assistant", "content": first["text"]},
                   {"role": "user", "content": "And a meteor?"}]
    second = stream(four.url, {"messages": second_turn, "max_tokens": 24, "temperature": 0})
    # The whole first prompt is in the cache; only the reply and the new question are decoded.
    assert int(str(second["tokens_cached"])) >= int(str(first["tokens_in"]))
    assert int(str(second["tokens_cached"])) < int(str(second["tokens_in"]))
    # A prompt shared by nobody reuses nothing.
    other = stream(four.url, {"prompt": "Zebras graze on the savanna", "max_tokens": 4})
    assert other["tokens_cached"] == 0


def test_repetition_penalties_change_what_a_greedy_request_repeats(four: Daemon) -> None:
    body = {"prompt": "red red red red red red red red", "max_tokens": 12, "temperature": 0}
    plain = stream(four.url, body)
    for field, value in (("repeat_penalty", 1.8), ("frequency_penalty", 2.0), ("presence_penalty", 2.0)):
        penalised = stream(four.url, {**body, field: value})
        assert penalised["type"] == "end" and penalised["text"], field
        assert str(penalised["text"]).count("red") < str(plain["text"]).count("red"), (field, penalised)


def test_json_schema_still_parses_under_concurrency(four: Daemon) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
    animals = ["cat", "dog", "horse", "owl"]
    bodies = [chat(f"Describe a {a} as JSON with name and age.", max_tokens=60, temperature=0.7, seed=i,
                   response_format=fmt) for i, a in enumerate(animals)]
    for result in concurrently(four.url, bodies):
        value = json.loads(str(result["text"]))
        assert isinstance(value["name"], str) and isinstance(value["age"], int)


def test_four_slots_hold_one_copy_of_the_weights(four: Daemon, tmp_path: Path) -> None:
    model = resolve_model("smollm2-135m").path
    kv = kv_bytes_per_token(gguf_metadata(model))
    assert kv > 0
    with daemon(worker_argv(1)) as one:
        stream(one.url, chat(QUESTIONS[0]))  # touch the weights as the four-slot worker has
        one_rss = psutil.Process(one.process.pid).memory_info().rss
    four_rss = psutil.Process(four.process.pid).memory_info().rss
    # Four copies would add three models' worth (~100 MB each); one copy adds at most three caches.
    three_caches = 3 * 2048 * kv
    assert four_rss <= 1.2 * (one_rss + three_caches), (four_rss, one_rss, three_caches)


# --- the host-RAM prompt cache --------------------------------------------------------------------

TENANTS = [f"{name} sells {goods}. " * 50
           for name, goods in (("Ada", "copper pipes"), ("Bo", "garden tools"), ("Cy", "rain boots"))]
"""System prompts of about 300 tokens each, distinct from their first word on (the chat template's
few tokens before it are shared)."""


def tenant(k: int, question: str = "What do you sell?") -> dict[str, object]:
    return {"messages": [{"role": "system", "content": TENANTS[k]}, {"role": "user", "content": question}],
            "max_tokens": 24, "temperature": 0}


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"rbee_worker_{name}{{"))


def test_a_prompt_restored_from_host_ram_gives_the_tokens_it_gave_in_its_slot(isolated_dirs: Path) -> None:
    """One slot, three tenants in turn: each tenant's prefix is overwritten by the next, saved to
    RAM first, and comes back from there: only the last prompt token is computed, and the greedy
    answer is token for token the one a worker without the RAM cache gives when the prefix is still
    in the slot. (Not always a cold run's: llama.cpp computes one token alone with other kernels than
    a batch, and the two can round apart; a slot hit and a RAM hit both decode the last token alone.)"""
    with daemon([*worker_argv(1), "--cache-ram", "256"]) as worker:
        cold = [stream(worker.url, tenant(k)) for k in range(3)]
        assert all(int(c["tokens_cached"]) < 8 for c in cold), cold  # type: ignore[call-overload]
        again = [stream(worker.url, tenant(k)) for k in range(3)]
        assert [a["tokens_cached"] for a in again] == [int(c["tokens_in"]) - 1 for c in cold]  # type: ignore[call-overload]
        assert metric(worker.url, "prompt_cache_hits_total") == 3
        # another question of a tenant: its system prompt comes back, the question is computed
        other = stream(worker.url, tenant(0, "Do you deliver?"))
        assert 250 < int(other["tokens_cached"]) < int(other["tokens_in"]) - 3  # type: ignore[call-overload]
        lookups = [line for line in httpx.get(f"{worker.url}/metrics").text.splitlines()
                   if line.startswith("rbee_worker_prefix_lookups_total{")]
        assert sorted(lookups) == [  # where each request's prefix was: none for the cold runs
            'rbee_worker_prefix_lookups_total{found="none",model="smollm2-135m"} 3.0',
            'rbee_worker_prefix_lookups_total{found="ram",model="smollm2-135m"} 4.0'], lookups
    with daemon(worker_argv(1)) as plain:  # the same history, each tenant twice in its slot
        in_slot = [(stream(plain.url, tenant(k)), stream(plain.url, tenant(k)))[1] for k in range(3)]
    assert [s["text"] for s in in_slot] == [a["text"] for a in again]
    assert [s["tokens_cached"] for s in in_slot] == [a["tokens_cached"] for a in again]
    assert cold[0]["text"] == again[0]["text"]  # the first tenant's cold run was in an empty slot


def test_the_host_ram_cache_keeps_within_its_bound(isolated_dirs: Path) -> None:
    """A cache with room for one saved prompt (each is about 8 MB: 330 tokens x 23 KB): saving a
    second evicts the first, whose tenant is then computed again."""
    with daemon([*worker_argv(1), "--cache-ram", "12"]) as worker:
        for k in range(3):  # Ada saved when Bo comes, then Bo when Cy comes: Ada is evicted, Bo kept
            stream(worker.url, tenant(k))
        assert metric(worker.url, "prompt_cache_entries") == 1
        assert 0 < metric(worker.url, "prompt_cache_bytes") <= 12 << 20
        assert metric(worker.url, "prompt_cache_evictions_total") == 1
        assert int(stream(worker.url, tenant(1))["tokens_cached"]) > 250  # type: ignore[call-overload]
        assert int(stream(worker.url, tenant(0))["tokens_cached"]) < 8  # type: ignore[call-overload]


def test_the_prompt_cache_reuses_dropped_buffers_within_its_bound() -> None:
    """A dropped entry's buffer serves the next save (its pages are mapped already), and the
    spare buffers count against the bound: entries and spares together never pass it."""
    import ctypes

    from rbee_worker.engine import PromptCache

    cache = PromptCache(limit=10_000)
    first = cache.buffer(4_000)
    cache.add([1, 2, 3], first, 4_000)
    cache.add([4, 5, 6], cache.buffer(4_000), 4_000)
    cache.add([7, 8, 9], cache.buffer(4_000), 4_000)  # evicts [1, 2, 3]; no room for a spare
    assert [e.tokens for e in cache.entries] == [[4, 5, 6], [7, 8, 9]] and cache.evicted == 1
    assert cache.bytes <= 10_000
    (restored,) = [e for e in cache.entries if e.tokens == [4, 5, 6]]
    cache.take(restored)
    cache.release(restored.data)  # back in its sequence: the buffer is free again
    assert cache.buffer(3_000) is restored.data  # the smallest spare that fits
    cache.release(restored.data)
    assert cache.buffer(5_000) is not restored.data  # too small: a new one
    assert ctypes.sizeof(cache.buffer(5_000)) == 5_000
