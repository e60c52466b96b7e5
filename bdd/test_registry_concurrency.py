from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any

import httpx
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World, active_workers, start_queen

scenarios("registry_concurrency.feature")


def beat(worker_id: str, hive: str, *, state: str = "ready", port: int = 9351) -> dict[str, Any]:
    return {"worker_id": worker_id, "hive_id": hive, "url": f"http://127.0.0.1:{port}", "model": "smollm2-135m",
            "backend": "llama-cpp", "device": "CPU-0", "state": state, "slots_total": 1,
            "slots_busy": int(state == "busy"), "pid": port}


def post(world: World, body: dict[str, Any]) -> int:
    return httpx.post(f"{world.queen_url}/v1/worker-heartbeat", json=body, timeout=10).status_code


@given(parsers.parse('a running queen that knows the hives "{hives}"'))
def queen_with_hives(world: World, hives: str) -> None:
    config = world.tmp / "queen.toml"
    config.write_text("".join(f'[hives.{h.strip()}]\nhost = "127.0.0.1"\n' for h in hives.split(",")))
    world.extra["config"] = config
    start_queen(world, "--config", str(config))


@given(parsers.parse("the queen drops workers silent for {seconds:d} second"))
def short_stale(world: World, seconds: int) -> None:
    assert world.queen is not None
    start_queen(world, "--config", str(world.extra["config"]), env={"RBEE_QUEEN__WORKER_STALE_S": str(seconds)})


@when(parsers.parse('the hives "{hives}" register the worker "{worker_id}" at the same moment'))
def register_at_once(world: World, hives: str, worker_id: str) -> None:
    names = [h.strip() for h in hives.split(",")]
    barrier = threading.Barrier(len(names))

    def register(index: int) -> int:
        barrier.wait()
        return post(world, beat(worker_id, names[index], port=9351 + index))

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        world.extra["codes"] = list(pool.map(register, range(len(names))))


@then(parsers.parse('exactly one registration answers 204 and the others 409 "{code}"'))
def one_wins(world: World, code: str) -> None:
    assert sorted(world.extra["codes"]) == [204, 409, 409]


@then(parsers.parse('the queen lists exactly one "{worker_id}"'))
def exactly_one(world: World, worker_id: str) -> None:
    assert [w["worker_id"] for w in active_workers(world)].count(worker_id) == 1


@given(parsers.parse('the worker "{worker_id}" of "{hive}" has registered'))
def registered(world: World, worker_id: str, hive: str) -> None:
    assert post(world, beat(worker_id, hive)) == 204
    world.extra["hive_of"] = hive


@when(parsers.parse('{count:d} heartbeats of "{worker_id}" with alternating states arrive at once'))
def alternating(world: World, count: int, worker_id: str) -> None:
    hive = world.extra["hive_of"]
    states = ["busy" if n % 2 else "ready" for n in range(count)]
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        world.extra["codes"] = list(pool.map(lambda s: post(world, beat(worker_id, hive, state=s)), states))


@when(parsers.parse('one more heartbeat says "{state}"'))
def one_more(world: World, state: str) -> None:
    world.extra["codes"].append(post(world, beat("worker-001", world.extra["hive_of"], state=state)))


@then("every heartbeat answered 204")
def all_204(world: World) -> None:
    assert set(world.extra["codes"]) == {204}


@then(parsers.parse('the queen lists exactly one "{worker_id}" in state "{state}"'))
def one_in_state(world: World, worker_id: str, state: str) -> None:
    (worker,) = [w for w in active_workers(world) if w["worker_id"] == worker_id]
    assert worker["state"] == state and worker["slots_busy"] == int(state == "busy")


@when(parsers.parse("{seconds:d} seconds pass"))
def wait(seconds: int) -> None:
    time.sleep(seconds)


@when(parsers.parse('the worker "{worker_id}" of "{hive}" registers while the registry is listed'))
def register_while_listing(world: World, worker_id: str, hive: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        listing = pool.submit(active_workers, world)
        code = pool.submit(post, world, beat(worker_id, hive, port=9360))
        assert code.result(10) == 204 and isinstance(listing.result(10), list)


@then(parsers.parse('the queen lists only "{worker_id}"'))
def only(world: World, worker_id: str) -> None:
    assert [w["worker_id"] for w in active_workers(world)] == [worker_id]


@when(parsers.parse('heartbeats and listings of "{worker_id}" run at once for {seconds:d} second'))
def beats_and_lists(world: World, worker_id: str, seconds: int) -> None:
    deadline = time.monotonic() + seconds
    hive = world.extra["hive_of"]
    codes: list[int] = []
    listings: list[bool] = []

    def beats() -> None:
        n = 0
        while time.monotonic() < deadline:
            codes.append(post(world, beat(worker_id, hive, state="busy" if n % 2 else "ready")))
            n += 1

    def lists() -> None:
        while time.monotonic() < deadline:
            listings.append(any(w["worker_id"] == worker_id for w in active_workers(world)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(beats), pool.submit(lists)]
        for future in running:
            future.result(seconds + 30)  # a failure in either thread fails the scenario here
    world.extra["codes"], world.extra["listings"] = codes, listings


@then("every heartbeat answered 204 and every listing succeeded")
def all_ok(world: World) -> None:
    assert world.extra["codes"] and set(world.extra["codes"]) == {204}
    assert world.extra["listings"] and all(world.extra["listings"])


@then(parsers.parse('the queen lists exactly one "{worker_id}", last seen under {seconds:d} second ago'))
def fresh(world: World, worker_id: str, seconds: int) -> None:
    (worker,) = [w for w in active_workers(world) if w["worker_id"] == worker_id]
    # The beats ran until just now; a timestamp that beats did not refresh would be at least the
    # scenario's length (1 s) old.
    assert worker["last_seen_s"] < seconds
