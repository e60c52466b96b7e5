from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World, hive_url, many_workers

scenarios("device_detection.feature")


def capabilities(world: World) -> dict[str, Any]:
    started = time.monotonic()
    response = httpx.get(f"{hive_url(world)}/v1/capabilities", timeout=10)
    world.extra["took"] = time.monotonic() - started
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    value = response.json()
    assert isinstance(value, dict)
    return value


def stable(caps: dict[str, Any]) -> dict[str, Any]:
    """Everything but what changes between two calls by itself."""
    devices = [{k: v for k, v in d.items() if k != "memory_free_bytes"} for d in caps["devices"]]
    return {**{k: v for k, v in caps.items() if k != "disk_free_bytes"}, "devices": devices}


@given(parsers.parse('{count:d} workers of "{model}" are running on the hive'))
def running_workers(world: World, count: int, model: str) -> None:
    many_workers(world, count, model, "CPU-0")


@when("I ask the hive for its capabilities")
def ask(world: World) -> None:
    world.extra["caps"] = [capabilities(world)]


@when("I ask the hive for its capabilities twice")
def ask_twice(world: World) -> None:
    world.extra["caps"] = [capabilities(world), capabilities(world)]


@when(parsers.parse("{count:d} clients ask the hive for its capabilities at once"))
def ask_at_once(world: World, count: int) -> None:
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        world.extra["caps"] = list(pool.map(lambda _: capabilities(world), range(count)))


def caps(world: World) -> dict[str, Any]:
    value = world.extra["caps"][0]
    assert isinstance(value, dict)
    return value


@then("the answer is 200 JSON with a CPU-0 entry, a list of devices, and model and worker counts")
def has_cpu(world: World) -> None:
    value = caps(world)
    assert value["devices"][0]["id"] == "CPU-0"
    assert isinstance(value["models"], int) and isinstance(value["workers"], int)


@then("the devices hold no GPU entry")
def no_gpu(world: World) -> None:
    assert [d["kind"] for d in caps(world)["devices"]] == ["cpu"]


@then(parsers.parse("it counts {models:d} models and {workers:d} workers"))
def counts(world: World, models: int, workers: int) -> None:
    assert (caps(world)["models"], caps(world)["workers"]) == (models, workers)


@then("CPU-0 has this machine's physical cores, logical cores and total RAM")
def real_cpu(world: World) -> None:
    (cpu,) = [d for d in caps(world)["devices"] if d["id"] == "CPU-0"]
    assert cpu["cores"] == psutil.cpu_count(logical=False)
    assert cpu["logical_cores"] == psutil.cpu_count()
    assert cpu["memory_total_bytes"] == psutil.virtual_memory().total
    assert 0 < cpu["memory_free_bytes"] <= cpu["memory_total_bytes"]


@then("its name is this machine's CPU model")
def cpu_name(world: World) -> None:
    (cpu,) = [d for d in caps(world)["devices"] if d["id"] == "CPU-0"]
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    assert cpu["name"] == names[0]


@then("the hive log holds no error")
def no_error(world: World) -> None:
    log = world.extra["hive"].log()
    assert " ERROR " not in log and "Traceback" not in log


@then("it has hive_id, devices, backends, disk_free_bytes, models and workers")
def top_level(world: World) -> None:
    assert set(caps(world)) == {"hive_id", "devices", "backends", "disk_free_bytes", "models", "workers"}
    assert caps(world)["hive_id"] == "localhost" and "llama-cpp" in caps(world)["backends"]


@then("each device has id, kind, name, memory_total_bytes and memory_free_bytes")
def device_fields(world: World) -> None:
    for device in caps(world)["devices"]:
        assert {"id", "kind", "name", "memory_total_bytes", "memory_free_bytes"} <= set(device)


@then("both answers are the same apart from free memory and free disk")
def idempotent(world: World) -> None:
    first, second = world.extra["caps"]
    assert stable(first) == stable(second)


@then(parsers.parse("it answered within {seconds:d} seconds"))
def quick(world: World, seconds: int) -> None:
    # A deadline for a loaded 2-core CI machine, not a benchmark: the time itself is measured by
    # `bench/hive_ops.py` (capabilities is one of its operations) and reported in bench/RESULTS.md.
    assert world.extra["took"] < seconds


@then(parsers.parse("all {count:d} answer 200 and agree apart from free memory and free disk"))
def concurrent_agree(world: World, count: int) -> None:
    answers = world.extra["caps"]
    assert len(answers) == count and all(stable(a) == stable(answers[0]) for a in answers)


@then(parsers.parse('the devices are "{ids}"'))
def device_ids(world: World, ids: str) -> None:
    assert [d["id"] for d in caps(world)["devices"]] == ids.split(", ")


@then(parsers.parse('{device} is a cuda device "{name}" with {total:d} MB, {free:d} MB free'))
def gpu_device(world: World, device: str, name: str, total: int, free: int) -> None:
    (found,) = [d for d in caps(world)["devices"] if d["id"] == device]
    assert (found["kind"], found["name"]) == ("cuda", name)
    assert (found["memory_total_bytes"], found["memory_free_bytes"]) == (total * 1_000_000, free * 1_000_000)
    assert found["compute_capability"] == "8.6"
