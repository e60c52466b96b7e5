from __future__ import annotations

import os
import re
import signal
import threading
import time
from datetime import datetime

import httpx
import psutil
from pytest_bdd import parsers, scenarios, then, when

from bdd.conftest import World, hive_job, hive_url, job_value, spawned, start_hive
from harness.helpers import gone, wait_for

scenarios("hive_lifecycle.feature")


def listed(world: World) -> list[dict[str, object]]:
    events_before = world.extra.get("events"), world.extra.get("terminator")
    hive_job(world, {"operation": "worker_list"})
    value = job_value(world)
    world.extra["events"], world.extra["terminator"] = events_before
    assert isinstance(value, list)
    return value



def hive_log(world: World) -> str:
    return str(world.extra["hive"].log())


def freeze(world: World, worker: dict[str, object]) -> None:
    pid = int(str(worker["pid"]))
    os.kill(pid, signal.SIGSTOP)

    def thaw() -> None:  # let it die normally if it is still there
        if not gone(pid):
            os.kill(pid, signal.SIGCONT)

    world.extra["stack"].callback(thaw)


@when("the worker freezes")
@when("the first worker freezes")
def first_freezes(world: World) -> None:
    freeze(world, spawned(world)[0])


@when("the second worker freezes")
def second_freezes(world: World) -> None:
    freeze(world, spawned(world)[1])


@when("every worker freezes")
def all_freeze(world: World) -> None:
    for worker in spawned(world):
        freeze(world, worker)


@when("the first worker is killed with SIGKILL")
def kill_first(world: World) -> None:
    os.kill(int(str(spawned(world)[0]["pid"])), signal.SIGKILL)


@then("the hive still answers /health")
def hive_healthy(world: World) -> None:
    assert httpx.get(f"{hive_url(world)}/health").status_code == 200


@then(parsers.parse('the hive lists the worker as "{state}"'))
def lists_state(world: World, state: str) -> None:
    (worker,) = listed(world)
    assert worker["state"] == state


@then(parsers.re(r"within (?P<seconds>\d+) seconds the (worker|first worker) is gone from the hive"),
      converters={"seconds": int})
def first_gone(world: World, seconds: int) -> None:
    worker_id = spawned(world)[0]["worker_id"]
    assert wait_for(lambda: worker_id not in [w["worker_id"] for w in listed(world)], timeout=seconds)


@then(parsers.parse("within {seconds:d} seconds the second worker is gone from the hive"))
def second_gone(world: World, seconds: int) -> None:
    worker_id = spawned(world)[1]["worker_id"]
    assert wait_for(lambda: worker_id not in [w["worker_id"] for w in listed(world)], timeout=seconds)


@then(parsers.parse('the hive log shows "{text}"'))
def log_shows(world: World, text: str) -> None:
    assert wait_for(lambda: text in hive_log(world), timeout=3), hive_log(world)


@then(parsers.parse('the hive log does not show "{text}"'))
def log_lacks(world: World, text: str) -> None:
    assert text not in hive_log(world)


@when("I send SIGTERM to the hive")
def sigterm_hive(world: World) -> None:
    world.extra["hive"].process.send_signal(signal.SIGTERM)
    world.extra["signalled_at"] = time.monotonic()


@then(parsers.parse("the hive exits with code {code:d} within {seconds:d} seconds"))
def hive_exits(world: World, code: int, seconds: int) -> None:
    assert world.extra["hive"].process.wait(seconds + 1) == code
    # The scenario's bound is the hive's own grace (worker_stop_grace_s) plus a margin for a loaded
    # 2-core machine: exceeding it means a worker was waited on past its grace, not a slow machine.
    assert time.monotonic() - world.extra["signalled_at"] < seconds


@then(parsers.parse('the hive log shows "{text}" for each worker'))
def log_for_each(world: World, text: str) -> None:
    for worker in spawned(world):
        assert f"{worker['url']}{text}" in hive_log(world)


@then("no worker process is left")
def none_left(world: World) -> None:
    pids = [int(str(w["pid"])) for w in spawned(world)]
    assert wait_for(lambda: all(gone(pid) for pid in pids), timeout=2)


@then(parsers.parse('a new hive still lists "{ref}" in its catalog'))
def catalog_survives(world: World, ref: str) -> None:
    start_hive(world)
    hive_job(world, {"operation": "model_get", "model": ref})
    assert job_value(world) == world.extra["downloaded"][ref]


@when("I stop the worker through the hive without waiting")
def stop_in_background(world: World) -> None:
    worker_id = spawned(world)[0]["worker_id"]
    url = hive_url(world)
    thread = threading.Thread(
        target=lambda: httpx.post(f"{url}/v1/jobs", json={"operation": "worker_stop", "worker_id": worker_id})
    )
    thread.start()
    thread.join(5)
    assert wait_for(lambda: "Asking" in hive_log(world), timeout=3)
    # the hive logs "Asking" before its shutdown request reaches the worker: wait for the worker itself
    worker = spawned(world)[0]["url"]
    assert wait_for(lambda: httpx.get(f"{worker}/health", timeout=2).json().get("state") == "draining", timeout=3)


@then(parsers.parse('a new request to the worker gets 503 "{code}"'))
def new_request_refused(world: World, code: str) -> None:
    url = spawned(world)[0]["url"]
    response = httpx.post(f"{url}/v1/inference", json={"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 503 and response.json()["error"]["code"] == code


@then("the worker's pid is a live llm-worker-rbee process, a child of the hive")
def live_child(world: World) -> None:
    (worker,) = listed(world)
    process = psutil.Process(int(str(worker["pid"])))
    assert process.is_running() and process.ppid() == world.extra["hive"].process.pid
    assert any("llm-worker-rbee" in part for part in process.cmdline())


@then("the pid narrated while loading is the pid of the ready worker and of worker_list")
def same_pid(world: World) -> None:
    (started,) = [e for e in world.extra["events"] if e.get("action") == "worker_spawn"]
    pid = started["fields"]["pid"]
    assert job_value(world)["pid"] == pid
    assert [w["pid"] for w in listed(world)] == [pid]


@when("I stop the worker through the hive")
def stop_worker(world: World) -> None:
    hive_job(world, {"operation": "worker_stop", "worker_id": spawned(world)[0]["worker_id"]})


@then("the worker's process is gone")
def process_gone(world: World) -> None:
    assert gone(int(str(spawned(world)[0]["pid"])))


@then(parsers.parse('the hive log shows "{first}" and "{second}" on one line'))
def log_line_with(world: World, first: str, second: str) -> None:
    assert any(first in line and second in line for line in hive_log(world).splitlines())


@then("the hive lists no workers")
def lists_none(world: World) -> None:
    assert listed(world) == []


@then("the started worker's process is gone")
def started_gone(world: World) -> None:
    (started,) = [e for e in world.extra["events"] if e.get("action") == "worker_spawn"]
    assert gone(started["fields"]["pid"])


@then("the hive log shows, in this order:")
def log_in_order(world: World, datatable: list[list[str]]) -> None:
    log = hive_log(world)
    positions = [log.find(row[0].strip()) for row in datatable[1:]]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), log


@then(parsers.parse('worker_get of that worker fails with "{code}"'))
def get_fails(world: World, code: str) -> None:
    hive_job(world, {"operation": "worker_get", "worker_id": spawned(world)[0]["worker_id"]})
    errors = [e["error"] for e in world.extra["events"] if e.get("error")]
    assert errors and errors[-1]["code"] == code


@then(parsers.parse('the hive log shows the worker\'s id and pid with "{text}"'))
def crash_logged(world: World, text: str) -> None:
    worker = spawned(world)[0]
    assert f"worker {worker['worker_id']} (pid {worker['pid']}) {text}" in hive_log(world)


@then(parsers.parse("within {seconds:d} seconds the worker's process is reaped, not a zombie"))
def reaped(world: World, seconds: int) -> None:
    pid = int(str(spawned(world)[0]["pid"]))

    def no_such_process() -> bool:
        try:
            psutil.Process(pid)
        except psutil.NoSuchProcess:
            return True
        return False

    assert wait_for(no_such_process, timeout=seconds)


@then(parsers.parse('the hive log shows {count:d} "{text}" lines within half a second of each other'))
def parallel_kills(world: World, count: int, text: str) -> None:
    stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
              for line in hive_log(world).splitlines() if text in line]
    assert len(stamps) == count
    # Kills one after another would be a grace period (1 s here) apart; parallel ones are milliseconds
    # apart, so half a second separates the two even on a loaded machine.
    assert (max(stamps) - min(stamps)).total_seconds() < 0.5


@then("the hive's SIGKILL log line has a timestamp, the worker id, the pid and the reason")
def audit_line(world: World) -> None:
    worker = spawned(world)[0]
    (line,) = [line for line in hive_log(world).splitlines() if "SIGKILL" in line and "killing" in line]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING hive ", line)
    assert f"killing worker {worker['worker_id']} (pid {worker['pid']}, SIGKILL): " in line
    assert line.rsplit("): ", 1)[1]  # the reason
