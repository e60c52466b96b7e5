from __future__ import annotations

import httpx
from pytest_bdd import parsers, scenarios, then, when

from bdd.conftest import World, hive_url, job_value

scenarios("hive_worker_registry.feature")


@when("I ask the hive for /health")
def ask_health(world: World) -> None:
    world.response = httpx.get(f"{hive_url(world)}/health")


@then(parsers.parse('it answers 200 with status "{status}", its version and api_version "{api}"'))
def health_body(world: World, status: str, api: str) -> None:
    assert world.response is not None and world.response.status_code == 200
    body = world.response.json()
    assert body["status"] == status and body["api_version"] == api and body["version"]


@then("the result is an empty list")
def empty(world: World) -> None:
    assert job_value(world) == []


@then(parsers.parse('the result lists 1 worker of "{model}" in state "{state}" with {busy:d} slots busy'))
def one_worker(world: World, model: str, state: str, busy: int) -> None:
    (worker,) = job_value(world)
    assert (worker["model"], worker["state"], worker["slots_busy"]) == (model, state, busy)
    assert worker["pid"] > 0 and worker["url"].startswith("http://127.0.0.1:")


@then(parsers.parse('the result lists 1 worker of "{model}" in state "{state}" with every slot busy'))
def one_full_worker(world: World, model: str, state: str) -> None:
    (worker,) = job_value(world)
    assert (worker["model"], worker["state"]) == (model, state)
    assert worker["slots_busy"] == worker["slots_total"] == 4  # the CPU default: 4 sequences
