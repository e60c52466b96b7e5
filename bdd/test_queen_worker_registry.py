from __future__ import annotations

import contextlib
import os
import signal
import time

import httpx
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World, active_workers, job_value, queen_job, spawned
from harness.helpers import wait_for

scenarios("queen_worker_registry.feature")



@then("the queen lists that worker with its url, hive, model, backend, device and slots")
def lists_worker(world: World) -> None:
    (mine,) = spawned(world)
    assert wait_for(lambda: active_workers(world) != [], timeout=5)
    (listed,) = active_workers(world)
    assert (listed["worker_id"], listed["url"], listed["hive_id"]) == (
        mine["worker_id"], mine["url"], "localhost")
    assert (listed["model"], listed["backend"], listed["device"]) == ("smollm2-135m", "llama-cpp", "CPU-0")
    assert listed["slots_total"] == mine["slots_total"] == 4 and listed["pid"] == mine["pid"]


@then("after 3 more heartbeats the queen's log says once that the worker registered")
def registered_once(world: World) -> None:
    (mine,) = spawned(world)
    time.sleep(3 * 0.4 + 0.2)  # three beats of the 0.4 s configured in the scenario
    assert active_workers(world)[0]["last_seen_s"] < 0.8  # the beats came
    assert world.queen is not None
    lines = [line for line in world.queen.log().splitlines()
             if f"worker {mine['worker_id']} (" in line and ") registered: " in line]
    assert len(lines) == 1, lines


@then(parsers.parse("the result lists {count:d} workers, each with worker_id, hive_id, url, model, device and state"))
def lists_count(world: World, count: int) -> None:
    value = job_value(world)
    assert len(value) == count
    for worker in value:
        assert {"worker_id", "hive_id", "url", "model", "device", "state"} <= set(worker)


@then(parsers.parse('within {seconds:d} seconds the queen lists the worker as "{state}"'))
def listed_as(world: World, seconds: int, state: str) -> None:
    assert wait_for(lambda: [w["state"] for w in active_workers(world)] == [state], timeout=seconds)


@when("I stop that worker through the queen")
def stop_through_queen(world: World) -> None:
    queen_job(world, {"operation": "worker_stop", "worker_id": spawned(world)[0]["worker_id"]})
    assert world.extra["terminator"] == "[DONE]"


@then("the queen lists no workers")
def lists_none(world: World) -> None:
    assert active_workers(world) == []


@when("the first worker stops sending heartbeats")
def first_silent(world: World) -> None:
    pid = int(spawned(world)[0]["pid"])
    os.kill(pid, signal.SIGSTOP)  # alive, but silent

    def thaw() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    world.extra["stack"].callback(thaw)



@then("the queen log says the first worker is out of routing after missed heartbeats")
def log_out_of_routing(world: World) -> None:
    assert world.queen is not None
    first = spawned(world)[0]["worker_id"]
    assert f"worker {first} out of routing: no heartbeat for" in world.queen.log()


@then(parsers.parse("the worker was last seen less than {seconds:d} seconds ago, twice over {span:d} seconds"))
def last_seen(world: World, seconds: int, span: int) -> None:
    assert wait_for(lambda: len(active_workers(world)) == 1, timeout=5)
    for _ in range(2):
        (worker,) = active_workers(world)
        assert worker["last_seen_s"] < seconds
        time.sleep(span / 2)


@when(parsers.parse('a worker of the hive "{hive}" sends a heartbeat'))
def unknown_hive_beat(world: World, hive: str) -> None:
    beat = {"worker_id": "worker-stray", "hive_id": hive, "url": "http://127.0.0.1:9", "model": "m",
            "backend": "llama-cpp", "device": "CPU-0", "state": "ready", "slots_total": 1, "slots_busy": 0,
            "pid": 4242}
    world.response = httpx.post(f"{world.queen_url}/v1/worker-heartbeat", json=beat)


@given(parsers.parse("within {seconds:d} seconds the queen lists {count:d} worker"))
@then(parsers.parse("within {seconds:d} seconds the queen lists {count:d} workers"))
def lists_n(world: World, seconds: int, count: int) -> None:
    assert wait_for(lambda: len(active_workers(world)) == count, timeout=seconds)


@when("the hive is killed with SIGKILL")
def kill_hive(world: World) -> None:
    world.extra["hive"].process.kill()
    world.extra["hive"].process.wait()


@then(parsers.parse('the queen\'s status reports the hive "{hive_id}" unreachable'))
def hive_unreachable(world: World, hive_id: str) -> None:
    queen_job(world, {"operation": "status"})
    hives = {h["hive_id"]: h for h in job_value(world)["hives"]}
    assert hives[hive_id]["reachable"] is False
