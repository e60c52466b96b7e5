from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import (
    World,
    active_workers,
    hub,
    job_value,
    queen_job,
    spawned,
    start_queen,
    start_queen_for_hive,
)
from harness.helpers import wait_for

scenarios("failure_recovery.feature")



@when("the first worker is killed")
def kill_first(world: World) -> None:
    os.kill(int(spawned(world)[0]["pid"]), signal.SIGKILL)



@then("no request is routed to the first worker any more")
def not_routed(world: World) -> None:
    for _ in range(3):
        queen_job(world, {"operation": "infer", "model": "smollm2-135m", "prompt": "Hi,", "max_tokens": 3})
        result = job_value(world)
        assert result["worker_id"] == spawned(world)[1]["worker_id"] and result["attempts"] == 1


@when("its catalog entry's meta.json is corrupted")
def corrupt_meta(world: World) -> None:
    entry = world.extra["downloaded"]["hf:test-org/tiny-GGUF"]
    meta = Path(entry["path"]).parent / "meta.json"
    meta.write_text('{"id": "half a')
    world.extra["meta"] = meta


@then("the corrupt entry is set aside as meta.json.corrupt and logged with how to recover")
def set_aside(world: World) -> None:
    meta: Path = world.extra["meta"]
    assert not meta.exists() and meta.with_name("meta.json.corrupt").exists()
    assert [m["id"] for m in job_value(world)] == ["smollm2-135m"]
    assert "is corrupt: moved to" in world.extra["hive"].log()
    assert "download the model again" in world.extra["hive"].log()


@then("the hive still answers /health")
def hive_health(world: World) -> None:
    import httpx

    assert httpx.get(f"{world.extra['hive'].url}/health").status_code == 200


@given(parsers.parse('a running queen with a local hive that downloads from the hub with "{settings}"'))
def queen_with_hub(world: World, settings: str) -> None:
    env = {"HF_ENDPOINT": hub(world).url}
    for pair in settings.split(","):
        key, value = pair.strip().split("=", 1)
        section, name = key.split(".", 1)
        env[f"RBEE_{section.upper()}__{name.upper()}"] = value
    start_queen(world, "--local-hive", env=env)


@when("a new queen starts on the same port")
def new_queen_on_port(world: World) -> None:
    start_queen_for_hive(world)


@when("the queen is killed with SIGKILL")
def kill_queen(world: World) -> None:
    assert world.queen is not None
    world.queen.process.kill()
    world.queen.process.wait()


@then(parsers.parse("within {seconds:d} seconds the new queen lists the worker again"))
def relisted(world: World, seconds: int) -> None:
    worker_id = spawned(world)[0]["worker_id"]
    assert wait_for(lambda: [w["worker_id"] for w in active_workers(world)] == [worker_id], timeout=seconds)


@then("the worker kept running")
def kept_running(world: World) -> None:
    assert psutil.Process(int(spawned(world)[0]["pid"])).is_running()


@when("the worker receives SIGTERM")
def sigterm_worker(world: World) -> None:
    states: list[str] = []  # what the queen's registry says while the worker drains
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            states.extend(str(w["state"]) for w in active_workers(world))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def stop_watching() -> None:
        stop.set()
        watcher.join(10)

    world.extra["stack"].callback(stop_watching)
    world.extra["states"] = states
    os.kill(int(spawned(world)[0]["pid"]), signal.SIGTERM)


@then(parsers.parse('the queen saw the worker "{state}"'))
def saw_state(world: World, state: str) -> None:
    assert wait_for(lambda: state in world.extra["states"], timeout=2)


@then("the worker exits with code 0")
def exits_zero(world: World) -> None:
    assert world.queen is not None
    worker = spawned(world)[0]
    assert wait_for(lambda: f"worker {worker['worker_id']} (pid {worker['pid']}) died with exit code 0"
                    in world.queen.log(), timeout=10)


@when(parsers.parse("an inference of {total:d} tokens through the queen has streamed {first:d} and its worker is frozen "
                    "for {seconds:d} seconds"))
def freeze_mid_stream(world: World, total: int, first: int, seconds: int) -> None:
    pid = int(world.extra["workers"][0]["pid"])
    listings: list[int] = []

    def freeze() -> None:
        os.kill(pid, signal.SIGSTOP)
        try:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                listings.append(len(active_workers(world)))
                time.sleep(0.2)
        finally:
            os.kill(pid, signal.SIGCONT)

    thread: threading.Thread | None = None
    created = httpx.post(f"{world.queen_url}/v1/jobs", timeout=30, json={
        "operation": "infer", "model": "smollm2-135m", "prompt": "Hello,", "max_tokens": total})
    events: list[dict[str, Any]] = []
    with httpx.stream("GET", world.queen_url + created.json()["sse_url"], timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if thread is None and sum(e["type"] == "token" for e in events) >= first:
                    thread = threading.Thread(target=freeze)
                    thread.start()
            elif line.startswith("data: "):
                world.extra["terminator"] = line[6:]
    assert thread is not None, "the answer ended before the worker was frozen"
    thread.join()
    world.extra["events"], world.extra["listings"] = events, listings


@then("while it was frozen the queen stopped routing to it")
def stopped_routing(world: World) -> None:
    assert world.extra["listings"][0] == 1 and 0 in world.extra["listings"], world.extra["listings"]


@then(parsers.parse("the job succeeds with all {total:d} tokens in order"))
def all_tokens(world: World, total: int) -> None:
    assert world.extra["terminator"] == "[DONE]", world.extra["events"][-3:]
    tokens = [e for e in world.extra["events"] if e["type"] == "token"]
    assert [t["i"] for t in tokens] == list(range(total))


@then(parsers.parse("within {seconds:d} seconds the queen lists the worker again"))
def listed_again(world: World, seconds: int) -> None:
    worker_id = world.extra["workers"][0]["worker_id"]
    assert wait_for(lambda: [w["worker_id"] for w in active_workers(world)] == [worker_id], timeout=seconds)
