from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import httpx
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World, active_workers, job_error_body, start_queen
from harness.helpers import nvml_standin, run_job, wait_for

scenarios("queen_inference.feature")

COUNT = {"operation": "infer", "model": "smollm2-135m", "prompt": "Count from 1 to 1000: 1, 2, 3, 4,",
         "temperature": 0}


@given(parsers.parse("every slot of the worker is busy with requests through the queen for {seconds:d} seconds"))
def busy_through_queen(world: World, seconds: int) -> None:
    (worker,) = active_workers(world)
    slots = int(worker["slots_total"])
    # Greedy counting at about 100 tokens/s on one thread, shared by the batched slots.
    body = {**COUNT, "max_tokens": max(seconds * 100 // slots, 20)}
    for _ in range(slots):
        thread = threading.Thread(target=lambda: run_job(world.queen_url, body), daemon=True)
        thread.start()
        world.extra["stack"].callback(lambda thread=thread: thread.join(60))
    assert wait_for(lambda: [w["slots_busy"] for w in active_workers(world)] == [slots], timeout=10)


@when("I ask the queen's OpenAI API for a completion")
def openai_completion(world: World) -> None:
    world.response = httpx.post(f"{world.queen_url}/v1/completions",
                                json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 3})


@then(parsers.parse('the OpenAI error code is "{code}" with a Retry-After header'))
def openai_code(world: World, code: str) -> None:
    assert world.response is not None
    error = world.response.json()["error"]
    assert error["code"] == code and error["type"] == "rate_limit_error" and error["message"]
    assert int(world.response.headers["retry-after"]) >= 1


def stream_job(world: World, body: dict[str, Any], on_tokens: Any) -> None:
    """Run a queen job, reading its stream, and act once a few tokens arrived."""
    created = httpx.post(f"{world.queen_url}/v1/jobs", json=body).json()
    world.extra["job_id"] = created["job_id"]
    seen: list[dict[str, Any]] = []
    acted = False
    with httpx.stream("GET", world.queen_url + created["sse_url"], timeout=60) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if not data.startswith("{"):
                world.extra["terminator"] = data
                break
            seen.append(json.loads(data))
            if not acted and sum(e["type"] == "token" for e in seen) >= 3:
                acted = True
                on_tokens()
    world.extra["events"] = seen


@when("an inference through the queen has streamed tokens and its worker is killed")
def kill_mid_answer(world: World) -> None:
    pid = int(world.extra["workers"][0]["pid"])
    stream_job(world, {**COUNT, "max_tokens": 1000}, lambda: os.kill(pid, signal.SIGKILL))


@when("an inference through the queen has streamed tokens and I cancel its job")
def cancel_mid_answer(world: World) -> None:
    stream_job(world, {**COUNT, "max_tokens": 1000},
               lambda: httpx.delete(f"{world.queen_url}/v1/jobs/{world.extra['job_id']}"))


@then("the tokens that arrived before stay in the job's stream")
def partial_kept(world: World) -> None:
    tokens = [e for e in world.extra["events"] if e["type"] == "token"]
    assert len(tokens) >= 3 and [t["i"] for t in tokens] == list(range(len(tokens)))
    assert "stopped in the middle" in job_error_body(world)["message"]


@then(parsers.parse("the worker is gone from the queen's list within {seconds:d} second"))
def gone_from_list(world: World, seconds: int) -> None:
    # "At once": the queen drops a worker whose connection failed without waiting for the staleness
    # timeout (15 s); a second tells the two apart with a margin.
    assert wait_for(lambda: active_workers(world) == [], timeout=seconds)


@then(parsers.parse('the job ends with "{terminator}"'))
def ends_with(world: World, terminator: str) -> None:
    assert world.extra["terminator"] == terminator


@then(parsers.parse('the worker is "{state}" again within {seconds:d} seconds'))
def worker_state(world: World, state: str, seconds: int) -> None:
    url = world.extra["workers"][0]["url"]
    assert wait_for(lambda: httpx.get(f"{url}/v1/ready").json()["state"] == state, timeout=seconds)
    assert httpx.get(f"{url}/v1/ready").json()["slots_busy"] == 0


@given(parsers.parse('a running queen whose local hive serves synthetic workers and whose NVML reports "{cards}"'))
def queen_synthetic_gpus(world: World, cards: str) -> None:
    config = world.tmp / "synthetic.toml"
    config.write_text("[hive]\nsynthetic_backend = true\n")  # every spawn is synthetic, a cold start's too
    start_queen(world, "--local-hive", "--config", str(config), env=nvml_standin(cards))


@then(parsers.parse('the queen lists one worker of "{model}", on "{device}"'))
def one_worker_on(world: World, model: str, device: str) -> None:
    assert [(w["model"], w["device"]) for w in active_workers(world)] == [(model, device)]
