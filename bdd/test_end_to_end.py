from __future__ import annotations

from typing import Any

from pytest_bdd import given, parsers, scenarios, then

from bdd.conftest import (
    World,
    hive_job,
    hub_serves_smol,
    job_value,
    queen_job,
    start_hive,
    start_queen_for_hive,
)
from harness.helpers import free_port

scenarios("end_to_end.feature")


@given(parsers.parse('a fake Hugging Face hub serving the built-in SmolLM2 GGUF as "{repo}"'))
def hub_smol(world: World, repo: str) -> None:
    hub_serves_smol(world, repo)


@given("a running hive that reports to a queen")
def hive_to_queen(world: World) -> None:
    world.extra["queen_port"] = free_port()
    start_hive(world, f"queen_url=http://127.0.0.1:{world.extra['queen_port']}")


@given("that queen, which reaches the hive over HTTP")
def queen_over_http(world: World) -> None:
    start_queen_for_hive(world)


def events(world: World) -> list[dict[str, Any]]:
    value = world.extra["events"]
    assert isinstance(value, list)
    return value


@then("the result is an empty list")
def empty(world: World) -> None:
    assert job_value(world) == []


@then("the job relayed the hive's download progress up to the file's size")
def relayed_progress(world: World) -> None:
    progress = [e for e in events(world) if e["type"] == "progress"]
    entry = job_value(world)
    assert progress and progress[-1]["done"] == progress[-1]["total"] == entry["size_bytes"]
    assert all(p["job_id"] == progress[0]["job_id"] for p in progress)  # the queen's job, not the hive's


@then(parsers.parse('the job relayed the hive\'s narration "{text}"'))
def relayed_narration(world: World, text: str) -> None:
    assert any(e["type"] == "narration" and e["actor"] == "hive" and text in e["human"] for e in events(world))


@then(parsers.parse("the job streamed {count:d} tokens in order"))
def tokens_in_order(world: World, count: int) -> None:
    tokens = [e for e in events(world) if e["type"] == "token"]
    assert [t["i"] for t in tokens] == list(range(count))
    assert job_value(world)["tokens_out"] == count and job_value(world)["text"] == "".join(t["t"] for t in tokens)


@then("the hive lists one worker of that model")
def hive_lists(world: World) -> None:
    served = job_value(world)
    hive_job(world, {"operation": "worker_list"})
    (worker,) = job_value(world)
    assert worker["worker_id"] == served["worker_id"]


@given(parsers.parse('I have run one inference on "{model}" through the queen'))
def first_inference(world: World, model: str) -> None:
    queen_job(world, {"operation": "infer", "model": model, "prompt": "Hi,", "max_tokens": 3})
    world.extra["first"] = job_value(world)


@then("the job did not start a worker")
def no_cold_start(world: World) -> None:
    assert not [e for e in events(world) if e.get("action") in ("cold_start", "worker_spawn")]


@then("the same worker served both requests")
def same_worker(world: World) -> None:
    assert job_value(world)["worker_id"] == world.extra["first"]["worker_id"]
