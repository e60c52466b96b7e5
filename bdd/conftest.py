"""Shared steps. Steps are synchronous; they reach trio through an anyio
blocking portal (STYLE 15), and every program runs as a real process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest
from anyio.from_thread import BlockingPortal
from pytest_bdd import given, parsers, then, when

from harness.fake_hf import FakeHub
from harness.helpers import (
    BIN,
    Daemon,
    daemon,
    free_port,
    job_result,
    nvml_standin,
    port_open,
    run_job,
    wait_for,
)


class World:
    """What one scenario has done and seen so far."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.queen: Daemon | None = None
        self.queen_url = ""
        self.response: httpx.Response | None = None
        self.responses: list[httpx.Response] = []
        self.job_id = ""
        self.events: list[str] = []
        self.result: subprocess.CompletedProcess[str] | None = None
        self.error: BaseException | None = None
        self.extra: dict[str, Any] = {}


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    with anyio.from_thread.start_blocking_portal(backend="trio") as blocking_portal:
        yield blocking_portal


@pytest.fixture
def world(isolated_dirs: Path) -> Iterator[World]:
    state = World(isolated_dirs)
    with contextlib.ExitStack() as stack:
        state.extra["stack"] = stack
        yield state


@given("no queen is running")
def no_queen(world: World) -> None:
    port = free_port()
    world.queen_url = f"http://127.0.0.1:{port}"
    assert not port_open(port)


@given("a running queen")
def running_queen(world: World) -> None:
    stack: contextlib.ExitStack = world.extra["stack"]
    world.queen = stack.enter_context(daemon([str(BIN / "queen-rbee"), "--port", "0"]))
    world.queen_url = world.queen.url


@when(parsers.parse('I run rbee-keeper with "{args}"'))
def run_keeper(world: World, args: str) -> None:
    started = time.monotonic()
    world.result = subprocess.run(
        [str(BIN / "rbee-keeper"), "--queen-url", world.queen_url, *args.split()],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    world.extra["took"] = time.monotonic() - started


@when(parsers.parse('I submit the operation "{operation}"'))
def submit_operation(world: World, operation: str) -> None:
    world.response = httpx.post(f"{world.queen_url}/v1/jobs", json={"operation": operation})
    if world.response.status_code == 201:
        world.job_id = world.response.json()["job_id"]


@when(parsers.parse('I submit the operation "{operation}" for the hive "{hive}"'))
def submit_operation_for(world: World, operation: str, hive: str) -> None:
    world.response = httpx.post(f"{world.queen_url}/v1/jobs", json={"operation": operation, "hive_id": hive})
    if world.response.status_code == 201:
        world.job_id = world.response.json()["job_id"]


@when(parsers.parse("I submit a job with body '{body}'"))
def submit_body(world: World, body: str) -> None:
    world.response = httpx.post(
        f"{world.queen_url}/v1/jobs", content=body.encode(), headers={"Content-Type": "application/json"}
    )
    world.responses.append(world.response)


@when("I open the job's SSE stream")
def open_stream(world: World) -> None:
    with httpx.stream("GET", f"{world.queen_url}/v1/jobs/{world.job_id}/stream", timeout=10) as response:
        assert response.status_code == 200
        world.events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


@then(parsers.parse("the response status is {status:d}"))
def response_status(world: World, status: int) -> None:
    assert world.response is not None
    assert world.response.status_code == status, world.response.text


@then(parsers.parse('the error code is "{code}"'))
def error_code(world: World, code: str) -> None:
    assert world.response is not None
    assert world.response.json()["error"]["code"] == code


@then(parsers.parse('the output contains "{text}"'))
def output_contains(world: World, text: str) -> None:
    assert world.result is not None
    assert text in world.result.stdout + world.result.stderr


def error_bodies(world: World) -> list[dict[str, Any]]:
    return [json.loads(r.text)["error"] for r in world.responses if r.status_code >= 400]


@given(parsers.re(r"a running worker with (?P<slots>\d+) slots?"), converters={"slots": int})
def running_worker(world: World, slots: int) -> None:
    argv = [str(BIN / "llm-worker-rbee"), "--model", "smollm2-135m", "--device", "CPU-0", "--threads", "1",
            "--slots", str(slots), "--port", "0"]
    world.extra["worker"] = world.extra["stack"].enter_context(daemon(argv))


# --- hives, the fake Hub, hive jobs ---------------------------------------------------------


def hub(world: World) -> FakeHub:
    if "hub" not in world.extra:
        world.extra["hub"] = world.extra["stack"].enter_context(FakeHub(world.tmp / "hub"))
    value = world.extra["hub"]
    assert isinstance(value, FakeHub)
    return value


@given(parsers.parse('a fake Hugging Face hub serving "{repo}" with a {mb:d} MB file "{name}"'))
@given(parsers.parse('the hub also serves "{repo}" with a {mb:d} MB file "{name}"'))
def hub_serves(world: World, repo: str, mb: int, name: str) -> None:
    hub(world).add_file(repo, name, os.urandom(mb * 1000 * 1000))


@given(parsers.parse("the hub cuts the connection once after {mb:d} MB"))
def cut_once(world: World, mb: int) -> None:
    hub(world).cut_once_after = mb * 1000 * 1000


@given(parsers.parse('the hub serves the built-in SmolLM2 GGUF as "{repo}"'))
def hub_serves_smol(world: World, repo: str) -> None:
    hub(world).add_builtin(repo)


def start_hive(world: World, settings: str = "", cwd: Path | None = None, nvml: str | None = None) -> Daemon:
    """`nvml`: None for this machine's own NVML, else what the stand-in reports (`nvml_standin`)."""
    env = {"HF_ENDPOINT": hub(world).url, **(nvml_standin(nvml) if nvml is not None else {})}
    for pair in filter(None, (p.strip() for p in settings.split(","))):
        key, value = pair.split("=", 1)
        env[f"RBEE_HIVE__{key.strip().upper()}"] = value.strip()
    hive: Daemon = world.extra["stack"].enter_context(
        daemon([str(BIN / "rbee-hive"), "--port", "0"], env=env, cwd=cwd)
    )
    world.extra["hive"] = hive
    return hive


@given("a running hive")
def running_hive(world: World) -> None:
    start_hive(world)


@given(parsers.parse('a running hive with "{settings}"'))
def running_hive_with(world: World, settings: str) -> None:
    start_hive(world, settings)


@given("a running hive with NVML hidden")
def running_hive_no_nvml(world: World) -> None:
    """As on a machine without an NVIDIA driver, whatever this machine has."""
    start_hive(world, nvml="absent")


@given(parsers.parse('a running hive whose NVML reports "{cards}"'))
def running_hive_cards(world: World, cards: str) -> None:
    start_hive(world, nvml=cards)


@given(parsers.parse("a running hive whose NVML reports {count:d} cards"))
def running_hive_count(world: World, count: int) -> None:
    start_hive(world, nvml="; ".join(f"Stand-in {i}: 24000 MB, 24000 MB free" for i in range(count)))


def models_dir(world: World) -> Path:
    """A folder inside the hive's catalog root, where `file://` models are allowed."""
    folder = world.tmp / "data" / "rbee" / "models" / "local"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def hive_url(world: World) -> str:
    return str(world.extra["hive"].url)


def hive_job(world: World, operation: dict[str, Any]) -> list[dict[str, Any]]:
    events, terminator = run_job(hive_url(world), operation)
    world.extra["events"], world.extra["terminator"] = events, terminator
    return events


def job_value(world: World) -> Any:
    assert world.extra["terminator"] == "[DONE]", world.extra["events"][-3:]
    (value,) = [e["value"] for e in world.extra["events"] if e["type"] == "result"]
    return value


def job_error_body(world: World) -> dict[str, Any]:
    assert world.extra["terminator"].startswith("[ERROR]"), world.extra["events"][-3:]
    errors = [e["error"] for e in world.extra["events"] if e["type"] == "narration" and e.get("error")]
    assert errors
    error = errors[-1]
    assert isinstance(error, dict)
    return error


@when(parsers.parse("I run the hive operation {body}"))
def run_hive_operation(world: World, body: str) -> None:
    hive_job(world, json.loads(body))


@given(parsers.parse('the hive has downloaded "{ref}"'))
def hive_downloaded(world: World, ref: str) -> None:
    hive_job(world, {"operation": "model_download", "model": ref})
    assert world.extra["terminator"] == "[DONE]", world.extra["events"][-3:]
    world.extra.setdefault("downloaded", {})[ref] = job_value(world)


@when(parsers.parse('I spawn a worker of "{model}" on "{device}"'))
@given(parsers.parse('a worker of "{model}" spawned on "{device}"'))
def spawn_worker(world: World, model: str, device: str) -> None:
    hive_job(world, {"operation": "worker_spawn", "model": model, "device": device, "threads": 1})
    if world.extra["terminator"] == "[DONE]":
        world.extra.setdefault("workers", []).append(job_value(world))


@then(parsers.parse('the hive\'s catalog does not list "{model_id}"'))
def not_listed(world: World, model_id: str) -> None:
    listed = [entry["id"] for entry in job_result(hive_url(world), {"operation": "model_list"})]
    assert "smollm2-135m" in listed and model_id not in listed  # a listing, without the model


@then("the job succeeds")
def job_succeeds(world: World) -> None:
    assert world.extra["terminator"] == "[DONE]", world.extra["events"][-3:]


@then(parsers.parse('the job fails with "{code}"'))
def job_fails_with(world: World, code: str) -> None:
    assert job_error_body(world)["code"] == code


@then(parsers.parse('the job narrates "{text}"'))
def job_narrates(world: World, text: str) -> None:
    humans = [str(e["human"]) for e in world.extra["events"] if e["type"] == "narration"]
    assert any(text in human for human in humans), humans


@then(parsers.parse('the error hint mentions "{text}"'))
def hint_mentions(world: World, text: str) -> None:
    assert text in str(job_error_body(world).get("details", {}).get("hint", ""))


@then(parsers.parse('the error message mentions "{text}"'))
def message_mentions(world: World, text: str) -> None:
    assert text in str(job_error_body(world)["message"])


# --- streams and workers shared by several features ---------------------------------------

COUNTING = {"prompt": "Count from 1 to 1000: 1, 2, 3, 4,", "max_tokens": 1500, "temperature": 0}
"""Greedy SmolLM2 counts for the full 1500 tokens (about 15 s alone): a request that stays busy."""


class Streaming:
    """One inference request read in a thread, as a client would."""

    def __init__(self, url: str, body: dict[str, object]) -> None:
        self.url, self.body = url, body
        self.status = 0
        self.error: dict[str, object] | None = None
        self.events: list[str] = []
        self.first_token = threading.Event()
        self.disconnect = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/inference", json=self.body, timeout=60) as response:
            self.status = response.status_code
            if response.status_code != 200:
                self.error = json.loads(response.read())["error"]
                self.first_token.set()
                return
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                self.events.append(line[6:])
                if '"type":"token"' in line:
                    self.first_token.set()
                if self.disconnect.is_set():
                    return  # leaving the `with` closes the connection mid-stream


@given(parsers.parse('{count:d} workers of "{model}" spawned on "{device}"'))
def many_workers(world: World, count: int, model: str, device: str) -> None:
    for _ in range(count):
        spawn_worker(world, model, device)
        assert world.extra["terminator"] == "[DONE]", world.extra["events"][-3:]


# --- the queen with its local hive ----------------------------------------------------------


def start_queen(world: World, *args: str, env: dict[str, str] | None = None, port: int = 0) -> Daemon:
    queen: Daemon = world.extra["stack"].enter_context(
        daemon([str(BIN / "queen-rbee"), "--port", str(port), *args], env=env)
    )
    world.queen, world.queen_url = queen, queen.url
    return queen


@given("a running queen with a local hive")
def queen_local_hive(world: World) -> None:
    start_queen(world, "--local-hive")


@given(parsers.parse('a running queen with a local hive and "{settings}"'))
def queen_local_hive_with(world: World, settings: str) -> None:
    start_queen(world, "--local-hive", env=settings_env(settings))


def queen_job(world: World, operation: dict[str, Any]) -> list[dict[str, Any]]:
    events, terminator = run_job(world.queen_url, operation)
    world.extra["events"], world.extra["terminator"] = events, terminator
    return events


@when(parsers.parse("I run the queen operation {body}"))
def run_queen_operation(world: World, body: str) -> None:
    queen_job(world, json.loads(body))


@given(parsers.parse('{count:d} workers of "{model}" spawned through the queen'))
@given(parsers.parse('{count:d} worker of "{model}" spawned through the queen'))
def spawned_through_queen(world: World, count: int, model: str) -> None:
    for _ in range(count):
        queen_job(world, {"operation": "worker_spawn", "model": model, "threads": 1})
        world.extra.setdefault("workers", []).append(job_value(world))


def active_workers(world: World, **filters: str) -> list[dict[str, Any]]:
    events, terminator = run_job(world.queen_url, {"operation": "worker_list_active", **filters})
    assert terminator == "[DONE]"
    (value,) = [e["value"] for e in events if e["type"] == "result"]
    assert isinstance(value, list)
    return value


def spawned(world: World) -> list[dict[str, Any]]:
    """The workers this scenario spawned, in order."""
    value = world.extra["workers"]
    assert isinstance(value, list)
    return value


@then(parsers.parse("within {seconds:d} seconds the queen lists only the second worker"))
def queen_lists_only_second(world: World, seconds: int) -> None:
    second = spawned(world)[1]["worker_id"]
    assert wait_for(lambda: [w["worker_id"] for w in active_workers(world)] == [second], timeout=seconds)


def start_queen_for_hive(world: World, settings: str = "") -> Daemon:
    """A queen on `world.extra["queen_port"]` whose `localhost` hive is the running hive, over HTTP."""
    hive_port = world.extra["hive"].url.rsplit(":", 1)[1]
    config = world.tmp / "queen.toml"
    config.write_text(f'[hives.localhost]\nhost = "127.0.0.1"\nhive_port = {hive_port}\n')
    return start_queen(world, "--config", str(config), port=world.extra["queen_port"], env=settings_env(settings))


def settings_env(settings: str) -> dict[str, str]:
    """`"queen.worker_stale_s=1.5, hive.x=y"` as the environment variables that override the config."""
    env = {}
    for pair in filter(None, (p.strip() for p in settings.split(","))):
        key, value = pair.split("=", 1)
        section, name = key.strip().split(".", 1)
        env[f"RBEE_{section.upper()}__{name.upper()}"] = value.strip()
    return env


@given("a free port for the queen")
def queen_port(world: World) -> None:
    world.extra["queen_port"] = free_port()
    world.queen_url = f"http://127.0.0.1:{world.extra['queen_port']}"


@given("a running hive that reports to that queen")
def hive_reporting(world: World) -> None:
    start_hive(world, f"queen_url={world.queen_url}")


@given(parsers.parse('a running hive that reports to that queen with "{settings}"'))
def hive_reporting_with(world: World, settings: str) -> None:
    start_hive(world, f"queen_url={world.queen_url},{settings}")


@given("a queen on that port")
def queen_on_port(world: World) -> None:
    start_queen_for_hive(world)


@given(parsers.parse('a queen on that port with "{settings}"'))
def queen_on_port_with(world: World, settings: str) -> None:
    start_queen_for_hive(world, settings)


def stream_on_worker(world: World, url: str, body: dict[str, Any]) -> Streaming:
    """A client streaming from a worker until the scenario ends (then it cancels and leaves)."""
    stream = Streaming(url, body)

    def cancel() -> None:
        stream.disconnect.set()
        if "request_id" in body:
            httpx.delete(f"{url}/v1/inference/{body['request_id']}")
        stream.thread.join(30)

    world.extra["stack"].callback(cancel)
    assert stream.first_token.wait(30) and stream.status == 200
    return stream


@given("every slot of the worker is busy with a long request")
@when("every slot of the worker is busy with a long request")
def worker_busy(world: World) -> None:
    worker = spawned(world)[-1]
    for slot in range(int(worker["slots_total"])):
        stream_on_worker(world, worker["url"], {**COUNTING, "request_id": f"req-busy-{slot}"})


@given(parsers.parse("the worker is generating {tokens:d} tokens for a client"))
def worker_generating(world: World, tokens: int) -> None:
    body = {"prompt": COUNTING["prompt"], "max_tokens": tokens, "temperature": 0}
    world.extra["client"] = stream_on_worker(world, spawned(world)[0]["url"], body)


@then(parsers.parse('the client\'s stream ends with an "{kind}" event, then "[DONE]"'))
def client_stream_ends(world: World, kind: str) -> None:
    stream: Streaming = world.extra["client"]
    stream.thread.join(30)
    assert stream.events[-1] == "[DONE]"
    end = json.loads(stream.events[-2])
    assert end["type"] == kind and end["stop_reason"] in ("length", "stop")  # finished, not cut off
