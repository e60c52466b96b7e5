from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import (
    World,
    hive_url,
    hub,
    job_error_body,
    models_dir,
    spawn_worker,
    start_hive,
)
from harness.helpers import wait_for

scenarios("worker_preflight.feature")


def preflight(world: World) -> dict[str, object]:
    (event,) = [e for e in world.extra["events"] if e.get("action") == "worker_preflight"]
    assert isinstance(event, dict)
    return event


@then("the preflight narration shows the RAM needed and available")
def ram_numbers(world: World) -> None:
    event = preflight(world)
    fields = event["fields"]
    assert isinstance(fields, dict) and 0 < fields["required_bytes"] < fields["available_bytes"]
    assert "MB of the" in str(event["human"]) and "RAM available" in str(event["human"])


@then(parsers.parse('the backend check passed for "{backend}"'))
def backend_passed(world: World, backend: str) -> None:
    fields = preflight(world)["fields"]
    assert isinstance(fields, dict) and fields["backend"] == backend
    assert world.extra["terminator"] == "[DONE]"


@given("a sparse GGUF file as large as this machine's RAM")
def sparse(world: World) -> None:
    path = models_dir(world) / "huge.gguf"
    with open(path, "wb") as file:
        file.truncate(psutil.virtual_memory().total)
    world.extra["model_file"] = path


@given(parsers.parse('a file "{name}" that llama.cpp cannot load'))
def broken(world: World, name: str) -> None:
    path = models_dir(world) / name
    path.write_bytes(b"GGUF? no." * 1000)
    world.extra["model_file"] = path


@when(parsers.parse('I spawn a worker of that file on "{device}"'))
def spawn_file(world: World, device: str) -> None:
    spawn_worker(world, f"file://{world.extra['model_file']}", device)


@then("the error details give required_bytes as 1.2 times the file and the available bytes")
def ram_details(world: World) -> None:
    details = job_error_body(world)["details"]
    size = Path(world.extra["model_file"]).stat().st_size
    assert details["required_bytes"] == int(size * 1.2)
    assert 0 < details["available_bytes"] < details["required_bytes"]


@then("no worker was started")
def none_started(world: World) -> None:
    assert not [e for e in world.extra["events"] if e.get("action") == "worker_spawn"]


@then(parsers.parse('the error says in one line "{text}", and the hive\'s log has the worker\'s last lines under its correlation id'))
def one_line(world: World, text: str) -> None:
    error = job_error_body(world)
    assert text in error["message"] and "\n" not in error["message"] and "last_log_lines" not in error["details"]
    assert wait_for(lambda: error["correlation_id"] in world.extra["hive"].log())
    hive_log = world.extra["hive"].log()
    assert "could not load the model" in hive_log[hive_log.index(error["correlation_id"]):]


@then("the error lists the available backends")
def lists_backends(world: World) -> None:
    error = job_error_body(world)
    assert "llama-cpp" in error["details"]["available_backends"]
    assert "llama-cpp" in error["details"]["hint"]


@then(parsers.parse('the error lists only the device "{device}"'))
def lists_devices(world: World, device: str) -> None:
    assert job_error_body(world)["details"]["devices"] == [device]


@then("the error details give required_bytes 10000000, the available bytes and how much to free")
def disk_details(world: World) -> None:
    details = job_error_body(world)["details"]
    assert details["required_bytes"] == 10_000_000 and details["available_bytes"] > 0
    assert details["free_at_least_bytes"] > 0 and "Free at least" in details["hint"]


@then("nothing was downloaded")
def nothing_downloaded(world: World) -> None:
    assert hub(world).file_requests == []


@then(parsers.parse('the error details give the VRAM required and the {mb:d} MB available on "{device}"'))
def vram_details(world: World, mb: int, device: str) -> None:
    error = job_error_body(world)
    details = error["details"]
    assert details["device"] == device and details["model"] == "smollm2-135m"
    assert details["available_bytes"] == mb * 1_000_000 < details["required_bytes"]
    assert "VRAM" in error["message"]


@given(parsers.parse('the hub serves "{repo}" with a {mb:d} MB file "{name}" at {rate:d} MB/s'))
def hub_serves_slowly(world: World, repo: str, mb: int, name: str, rate: int) -> None:
    hub(world).add_file(repo, name, os.urandom(mb * 1_000_000))
    hub(world).rate = rate * 1_000_000


@given(parsers.parse('a running hive whose data dir is a {mb:d} MB disk, with "{settings}"'))
def small_disk_hive(world: World, mb: int, settings: str) -> None:
    disk = world.tmp / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    # registered before the hive starts, so it runs after the hive has stopped
    world.extra["stack"].callback(subprocess.run, ["umount", "-l", str(disk)], capture_output=True)
    world.extra["small_disk"] = disk
    start_hive(world, f"{settings},data_dir={disk}")


@when(parsers.parse('a download of "{ref}" is under way and another writer fills the disk'))
def fill_during_download(world: World, ref: str) -> None:
    url = hive_url(world)
    created = httpx.post(f"{url}/v1/jobs", json={"operation": "model_download", "model": ref}, timeout=30)
    assert created.status_code == 201, created.text
    events: list[dict[str, Any]] = []
    terminator = ""
    filled = False
    with httpx.stream("GET", url + created.json()["sse_url"], timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if not filled and events[-1]["type"] == "progress" and events[-1]["done"] > 0:
                    fill(world.extra["small_disk"] / "other-writer")
                    filled = True
            elif line.startswith("data: "):
                terminator = line[6:]
    assert filled, "the download ended before it reported progress"
    world.extra["events"], world.extra["terminator"] = events, terminator


def fill(path: Path) -> None:
    """Write until the disk is full, as another program might."""
    chunk = b"x" * (1 << 20)
    with open(path, "wb") as file:
        try:
            while True:
                file.write(chunk)
                file.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC


@then(parsers.parse('the error says "{text}"'))
def error_says(world: World, text: str) -> None:
    assert text in job_error_body(world)["message"]


@then("the hive still answers its health check")
def still_healthy(world: World) -> None:
    assert httpx.get(f"{hive_url(world)}/health", timeout=10).json()["status"] == "ok"
