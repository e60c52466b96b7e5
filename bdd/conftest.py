"""Shared steps. Steps are synchronous; they reach trio through an anyio
blocking portal (STYLE 15), and every program runs as a real process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest
from anyio.from_thread import BlockingPortal
from pytest_bdd import given, parsers, then, when

from tests.helpers import BIN, Daemon, daemon, free_port, port_open


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
    world.result = subprocess.run(
        [str(BIN / "rbee-keeper"), "--queen-url", world.queen_url, *args.split()],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )


@when(parsers.parse('I submit the operation "{operation}"'))
def submit_operation(world: World, operation: str) -> None:
    world.response = httpx.post(f"{world.queen_url}/v1/jobs", json={"operation": operation})
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
